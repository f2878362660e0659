"""Single-image editing (CoSINE, paper §3.4): DDIM inversion, η-DDIM and slerp noise.

Everything here is pure torch and works in ComfyUI's sigma space, where a noisy
latent at noise level σ is

    x = c(σ) · (x₀ + s(σ) · ε)

with two families of models:

* ``"eps"`` (ε-, v- and x₀-prediction, EDM: ComfyUI's ``EPS`` noise scaling):
  c = 1, s = σ (the variance-exploding form of DDPM: ᾱ = 1 / (1 + σ²));
* ``"flow"`` (rectified flow, ComfyUI's ``CONST``): x = (1 − σ)x₀ + σε, i.e.
  c = 1 − σ, s = σ / (1 − σ).

In both, c(σ)·s(σ) = σ. DDIM (Song et al. 2021) written in these terms is

    x_next = c_n · x̂₀ + √(σ_n² − u²) · ε̂ + u · z,     u = min(σ_n, η · σ_n · √(1 − r²))

with ε̂ = (x − c·x̂₀)/σ, z ~ N(0, I) and r = s_n / s (for eps models r = σ_n / σ).
This is the textbook η-DDIM update mapped through ᾱ = 1/(1 + s²) (for eps models
it is k-diffusion's ancestral step), and every quantity stays finite at the
flow model's σ = 1 where s = ∞ (r → 0, c·s = σ), so no division by 1 − σ happens.

DDIM inversion runs the deterministic (η = 0) update backwards: from x at σ_{i+1}
to the x at σ_i that the sampler's step σ_i → σ_{i+1} maps onto it,

    x_i = ρ · x_{i+1} + (σ_i − ρ·σ_{i+1}) · ε̂(x_i, σ_i),      ρ = c_i / c_{i+1}.

ε̂(x_i, σ_i) is unknown; classical DDIM inversion uses ε̂(x_{i+1}, σ_{i+1}) instead
(``refine_iterations=0``). Each refinement iteration re-evaluates ε̂ at the
current estimate of x_i (fixed-point iteration), which makes the inversion an
exact inverse of the η = 0 sampler as the iteration converges. It runs until an
iteration moves x_i by at most ``tolerance`` relative to its norm (a fixed count
is too few on some latents and wasted on others), with ``refine_iterations`` as a
cap; the trace records how far each step got.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``denoiser(x, sigma) -> x̂₀``: the model's clean-latent prediction at noise level sigma."""

FAMILIES = ("eps", "flow")
# Fixed-point refinement stops once an iteration moves x_i by at most this, relative.
DEFAULT_TOLERANCE = 1e-6


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {FAMILIES}")


def scale(sigma: float, family: str) -> float:
    """c(σ): 1 for eps models, 1 − σ for flow models."""
    _check_family(family)
    return 1.0 if family == "eps" else 1.0 - sigma


def vp_scale(sigma: float, family: str) -> float:
    """k(σ) with x / k(σ) the variance-preserving latent (unit variance for pure noise).

    eps: √(1 + σ²) (x / k = √ᾱ·x₀ + √(1−ᾱ)·ε); flow: √((1 − σ)² + σ²).
    """
    _check_family(family)
    if family == "eps":
        return math.sqrt(1.0 + sigma * sigma)
    return math.sqrt((1.0 - sigma) ** 2 + sigma * sigma)


def ratio(sigma_next: float, sigma: float, family: str) -> float:
    """r = s(σ_next) / s(σ) ∈ [0, 1) for σ_next < σ, finite at a flow model's σ = 1."""
    _check_family(family)
    if sigma_next <= 0.0:
        return 0.0
    if family == "eps":
        return sigma_next / sigma
    return sigma_next * (1.0 - sigma) / (sigma * (1.0 - sigma_next))


def predicted_noise(x: torch.Tensor, x0: torch.Tensor, sigma: float, family: str) -> torch.Tensor:
    """ε̂ = (x − c·x̂₀) / σ (finite for σ > 0, including a flow model's σ = 1)."""
    return (x - scale(sigma, family) * x0) / sigma


def ddim_step(
    x: torch.Tensor,
    x0: torch.Tensor,
    sigma: float,
    sigma_next: float,
    family: str,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """One η-DDIM step from σ to σ_next < σ given the model's x̂₀ (and z for η > 0)."""
    if sigma_next <= 0.0:
        return x0.clone()
    eps = predicted_noise(x, x0, sigma, family)
    up = 0.0
    if eta > 0.0:
        r = ratio(sigma_next, sigma, family)
        up = min(sigma_next, eta * sigma_next * math.sqrt(max(0.0, 1.0 - r * r)))
    down = math.sqrt(max(0.0, sigma_next * sigma_next - up * up))
    out = scale(sigma_next, family) * x0 + down * eps
    if up > 0.0:
        if noise is None:
            raise ValueError("eta > 0 needs a noise tensor")
        out = out + up * noise
    return out


def validate_sigmas(sigmas: torch.Tensor, family: str, name: str = "sigmas") -> list[float]:
    """The schedule as floats; refuses empty, increasing, negative or (flow) > 1 schedules."""
    values = [float(s) for s in torch.as_tensor(sigmas).flatten()]
    if len(values) < 2:
        raise ValueError(
            f"{name} holds {len(values)} value(s), so there is no step to take; connect a scheduler with steps ≥ 1 (e.g. BasicScheduler)"
        )
    if any(not math.isfinite(v) or v < 0.0 for v in values):
        raise ValueError(f"{name} contains a negative or non-finite noise level; connect a scheduler's SIGMAS")
    if any(b >= a for a, b in zip(values, values[1:], strict=False)):
        raise ValueError(f"{name} must decrease strictly (as a scheduler's SIGMAS do); got {values[:6]}...")
    if family == "flow" and values[0] > 1.0 + 1e-6:
        raise ValueError(f"{name} starts at {values[0]:.4g}, above 1, which a flow model cannot use")
    return values


def _inversion_guess(x_prev, eps, sigma, sigma_prev, c, c_prev):
    """x_i = ρ·x_{i+1} + (σ_i − ρ·σ_{i+1})·ε̂ with ρ = c_i / c_{i+1}."""
    rho = c / c_prev
    return rho * x_prev + (sigma - rho * sigma_prev) * eps


@dataclass
class InversionTrace:
    """What an inversion produced: x at every σ (from clean to noisiest) and the model calls.

    ``step_residuals``: per step (clean to noisiest), the relative size of the last
    fixed-point update, ‖Δx_i‖/‖x_i‖ (None where no refinement ran); ``unconverged``:
    the steps that hit the cap above ``tolerance``.
    """

    sigmas: list[float]
    latents: list[torch.Tensor]
    model_calls: int
    step_residuals: list[float | None]
    unconverged: int = 0

    @property
    def worst_residual(self) -> float | None:
        known = [r for r in self.step_residuals if r is not None]
        return max(known) if known else None


def ddim_invert(
    denoiser: Denoiser,
    x0: torch.Tensor,
    sigmas: torch.Tensor,
    family: str,
    refine_iterations: int = 0,
    keep_trajectory: bool = False,
    tolerance: float = DEFAULT_TOLERANCE,
    callback: Callable[[int, int], None] | None = None,
) -> InversionTrace:
    """Invert the η = 0 DDIM sampler that runs along ``sigmas`` (decreasing).

    ``x0`` is the clean latent in model space at ``sigmas[-1]`` (normally 0; for a
    partial schedule, the latent at that noise level). Returns the latent at
    ``sigmas[0]``, from which the sampler with the same ``sigmas`` and η = 0
    reconstructs ``x0`` up to the inversion error. ``refine_iterations`` caps the
    fixed-point iterations per step, which stop once one moves x_i by at most
    ``tolerance`` relative to its norm.
    """
    _check_family(family)
    if refine_iterations < 0:
        raise ValueError(f"refine_iterations must be ≥ 0, got {refine_iterations}")
    if not (tolerance >= 0.0 and math.isfinite(tolerance)):
        raise ValueError(f"tolerance must be a number ≥ 0 (0: refine until no further progress), got {tolerance}")
    values = validate_sigmas(sigmas, family)
    batch = x0.shape[0]
    x = x0.clone()
    latents = [x.clone()] if keep_trajectory else []
    calls = 0
    steps = len(values) - 1
    residuals: list[float | None] = []
    unconverged = 0

    def x0_at(latent: torch.Tensor, sigma: float) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return denoiser(latent, torch.full((batch,), sigma, dtype=latent.dtype, device=latent.device))

    def eps_at(latent: torch.Tensor, sigma: float) -> torch.Tensor:
        return predicted_noise(latent, x0_at(latent, sigma), sigma, family)

    for n, i in enumerate(range(steps - 1, -1, -1)):
        sigma, sigma_prev = values[i], values[i + 1]  # going up: sigma_prev < sigma
        c, c_prev = scale(sigma, family), scale(sigma_prev, family)
        # ε̂ at the known point; at σ = 0 the model cannot be asked, so use (x, σ_i).
        new = _inversion_guess(x, eps_at(x, sigma_prev) if sigma_prev > 0.0 else eps_at(x, sigma), sigma, sigma_prev, c, c_prev)
        residual = None
        for _ in range(refine_iterations if (c > 0.0 or sigma_prev > 0.0) else 0):
            if c > 0.0:  # x_i = ρ·x_{i+1} + (σ_i − ρ·σ_{i+1})·ε̂(x_i)
                update = _inversion_guess(x, eps_at(new, sigma), sigma, sigma_prev, c, c_prev)
            else:  # flow at σ = 1 (c = 0, the ε-form degenerates): x_i = (x_{i+1} − c_{i+1}·x̂₀(x_i)) / σ_{i+1}
                update = (x - c_prev * x0_at(new, sigma)) / sigma_prev
            previous, residual = residual, float((update - new).norm() / update.norm().clamp_min(1e-30))
            if previous is not None and residual >= previous:
                # No progress: the model's own rounding (float32 ~1e-7, fp16 ~1e-3) is reached.
                residual = previous
                break
            new = update
            if residual <= tolerance:
                break
        if residual is not None and residual > tolerance:
            unconverged += 1
        residuals.append(residual)
        x = new
        if keep_trajectory:
            latents.append(x.clone())
        if callback is not None:
            callback(n, steps)
    if not keep_trajectory:
        latents = [x]
    return InversionTrace(values[::-1], latents, calls, residuals, unconverged)


def ddim_sample(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    family: str,
    eta: float = 0.0,
    noise_sampler: Callable[[float, float], torch.Tensor] | None = None,
    callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """η-DDIM along ``sigmas`` (decreasing) from x at ``sigmas[0]``."""
    _check_family(family)
    if eta < 0.0 or not math.isfinite(eta):
        raise ValueError(f"eta must be ≥ 0 (0 = deterministic DDIM), got {eta}")
    values = validate_sigmas(sigmas, family)
    batch = x.shape[0]
    for i in range(len(values) - 1):
        sigma, sigma_next = values[i], values[i + 1]
        sigma_vec = torch.full((batch,), sigma, dtype=x.dtype, device=x.device)
        x0 = denoiser(x, sigma_vec)
        if callback is not None:
            callback(i, x0, x)
        noise = None
        if eta > 0.0 and sigma_next > 0.0:
            if noise_sampler is None:
                raise ValueError("eta > 0 needs a noise_sampler")
            noise = noise_sampler(sigma, sigma_next)
        x = ddim_step(x, x0, sigma, sigma_next, family, eta, noise)
    return x


def slerp(alpha: float, z: torch.Tensor, noise: torch.Tensor, parallel_eps: float = 1e-6) -> torch.Tensor:
    """Eq. 7: sin((1−α)φ)/sin φ · z + sin(αφ)/sin φ · ε, with cos φ = ⟨z, ε⟩/(‖z‖‖ε‖) per sample.

    Computed in float64. When z and ε are (anti)parallel, sin φ → 0 and the
    formula's limit for parallel inputs, (1−α)·z + α·ε, is used (for antiparallel
    inputs slerp has no unique path; the same linear blend is used). α = 0 returns z
    and α = 1 returns ε exactly.
    """
    if not (0.0 <= alpha <= 1.0) or not math.isfinite(alpha):
        raise ValueError(f"alpha must be within [0, 1] (0 = the inverted latent, 1 = fresh noise), got {alpha}")
    if z.shape != noise.shape:
        raise ValueError(f"slerp needs tensors of one shape, got {tuple(z.shape)} and {tuple(noise.shape)}")
    if alpha == 0.0:
        return z.clone()
    if alpha == 1.0:
        return noise.clone()
    a = z.double().flatten(1)
    b = noise.double().flatten(1)
    norms = a.norm(dim=1) * b.norm(dim=1)
    cos = torch.where(norms > 0, (a * b).sum(dim=1) / norms.clamp_min(1e-300), torch.ones_like(norms)).clamp(-1.0, 1.0)
    phi = torch.arccos(cos)
    sin_phi = torch.sin(phi)
    degenerate = sin_phi < parallel_eps
    safe = torch.where(degenerate, torch.ones_like(sin_phi), sin_phi)
    wa = torch.where(degenerate, torch.full_like(phi, 1.0 - alpha), torch.sin((1.0 - alpha) * phi) / safe)
    wb = torch.where(degenerate, torch.full_like(phi, alpha), torch.sin(alpha * phi) / safe)
    out = wa[:, None] * a + wb[:, None] * b
    return out.view(z.shape).to(z.dtype)
