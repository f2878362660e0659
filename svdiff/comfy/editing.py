"""CoSINE editing on ComfyUI objects: DDIM inversion through a guider, the η-DDIM
SAMPLER, and the NOISE source that starts sampling from an inverted latent.

The math lives in :mod:`svdiff.editing`; this module only plugs it into ComfyUI's
sampling machinery so that conditioning, hooks, model wrappers, LoRAs and spectral
shifts behave exactly as in any other sampler run:

* Inversion runs *as a sampler* inside ``CFGGuider.sample`` (a ``Sampler`` whose
  ``sample`` walks the schedule upwards), so model loading, cond processing and CFG
  are ComfyUI's own. Its result is kept in model space (after ``process_latent_in``).
* The NOISE object returns the noise that ComfyUI's ``noise_scaling`` (for the
  sampler's first σ, its ``max_denoise`` rule and the sampler's latent image) turns
  into exactly the inverted latent (α = 0), or its slerp with seeded noise (α > 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .. import editing

INVERSION_KEY = "svdiff_inversion"


def model_family(model_sampling) -> str:
    """``"eps"`` or ``"flow"`` from a ComfyUI ``model_sampling`` object, or a clear refusal."""
    import comfy.model_sampling as ms

    if isinstance(model_sampling, ms.CONST):
        return "flow"
    if isinstance(model_sampling, ms.EPS):
        return "eps"
    raise ValueError(
        f"DDIM inversion supports ε/v-prediction and rectified-flow models; this model samples with "
        f"{type(model_sampling).__name__}, which it does not know how to invert"
    )


def _is_max_denoise(model_sampling, sigma: float) -> bool:
    """ComfyUI's ``Sampler.max_denoise`` rule (samplers.py): start at or above σ_max."""
    max_sigma = float(model_sampling.sigma_max)
    return math.isclose(max_sigma, sigma, rel_tol=1e-05) or sigma > max_sigma


@dataclass
class InversionResult:
    """An inverted latent in model space, with what is needed to start a sampler from it."""

    latent: torch.Tensor  # x at sigma, model space (after process_latent_in), float32, CPU
    sigma: float
    family: str
    model_sampling: Any
    latent_format: Any
    steps: int
    model_calls: int
    reconstruction_error: float | None = None
    """‖x̂₀ − x₀‖/‖x₀‖ in VAE space after sampling the result back (η = 0, same prompt and cfg)."""
    step_residual: float | None = None
    """The largest last fixed-point update of any step, relative (None without refinement)."""
    unconverged: int = 0
    """Steps whose refinement ended above the tolerance (cap or the model's precision reached)."""

    def summary(self) -> str:
        parts = [f"DDIM inversion over {self.steps} steps, {self.model_calls} model calls"]
        if self.reconstruction_error is not None:
            parts.append(f"reconstruction error {self.reconstruction_error:.3%} of the latent")
        if self.unconverged:
            parts.append(f"{self.unconverged} of {self.steps} steps stopped above the tolerance")
        return ", ".join(parts)

    def vp_latent(self) -> torch.Tensor:
        """x / k(σ): the variance-preserving latent (z_T in the paper's eq. 6-7)."""
        return self.latent / editing.vp_scale(self.sigma, self.family)


class InversionSampler:
    """A ComfyUI ``Sampler`` that runs DDIM inversion instead of sampling.

    ``CFGGuider.sample(noise, latent_image, InversionSampler(...), sigmas)`` calls
    :meth:`sample` with the processed latent; the inverted latent is kept on
    ``self.result`` in model space (what the guider returns has been through
    ``process_latent_out`` and is not used).
    """

    def __init__(self, family: str, refine_iterations: int = 0, tolerance: float = editing.DEFAULT_TOLERANCE, check: bool = True):
        self.family = family
        self.refine_iterations = refine_iterations
        self.tolerance = tolerance
        self.check = check
        self.result: torch.Tensor | None = None
        self.trace: editing.InversionTrace | None = None
        self.reconstructed: torch.Tensor | None = None
        self.model_calls = 0

    def max_denoise(self, model_wrap, sigmas) -> bool:  # the Sampler interface
        return _is_max_denoise(model_wrap.inner_model.model_sampling, float(sigmas[0]))

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None, disable_pbar=False):
        model_options = extra_args.get("model_options", {})
        seed = extra_args.get("seed")

        def denoiser(x, sigma):
            return model_wrap(x, sigma, model_options=model_options, seed=seed)

        def progress(i, total):
            if callback is not None:
                callback(i, None, None, total)

        x0 = latent_image if latent_image is not None else torch.zeros_like(noise)
        trace = editing.ddim_invert(
            denoiser, x0.float(), sigmas.float(), self.family, self.refine_iterations, tolerance=self.tolerance, callback=progress
        )
        self.trace = trace
        self.result = trace.latents[-1]
        self.model_calls = trace.model_calls
        if self.check:  # sample it back with the same model, conds and cfg: the residual reached
            self.reconstructed = editing.ddim_sample(denoiser, self.result, sigmas.float(), self.family)
            self.model_calls += len(sigmas) - 1
        return self.result


def invert(
    model,
    positive,
    latent: dict,
    sigmas: torch.Tensor,
    cfg: float = 1.0,
    negative=None,
    refine_iterations: int = 0,
    callback=None,
    tolerance: float = editing.DEFAULT_TOLERANCE,
    check: bool = True,
) -> InversionResult:
    """DDIM-invert ``latent`` (a ComfyUI LATENT dict, VAE space) along ``sigmas``.

    With ``check``, the result is sampled back (η = 0, one model call per step) and the
    relative reconstruction error in VAE space is reported on the result.
    """
    import comfy.model_management
    import comfy.sample
    import comfy.samplers

    sampling = model.get_model_object("model_sampling")
    family = model_family(sampling)
    values = editing.validate_sigmas(sigmas, family)
    if refine_iterations < 0:
        raise ValueError(f"refine_iterations must be ≥ 0, got {refine_iterations}")
    if not math.isfinite(cfg) or cfg < 0.0:
        raise ValueError(f"cfg must be a finite number ≥ 0, got {cfg}")
    if negative is None and not math.isclose(cfg, 1.0):
        raise ValueError(f"cfg = {cfg} needs a negative conditioning; connect one, or set cfg to 1 (the paper's choice)")
    samples = latent["samples"]
    if getattr(samples, "is_nested", False):
        raise ValueError("latent: nested (multi-resolution) latents cannot be inverted; pass an ordinary LATENT")
    samples = comfy.sample.fix_empty_latent_channels(model, samples)
    expected = model.model.latent_format.latent_channels
    if samples.ndim >= 4 and samples.shape[1] != expected:
        raise ValueError(
            f"latent has {samples.shape[1]} channels but this model works on {expected}; encode the image with this model's VAE"
        )
    if torch.count_nonzero(samples) == 0:
        raise ValueError("latent is all zeros (an empty latent?); connect the VAE-encoded image to invert")
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative if negative is not None else [])
    guider.set_cfg(cfg)
    if not (tolerance >= 0.0 and math.isfinite(tolerance)):
        raise ValueError(f"tolerance must be a number ≥ 0 (0: refine until no further progress), got {tolerance}")
    sampler = InversionSampler(family, refine_iterations, tolerance, check)
    with torch.no_grad():
        guider.sample(
            torch.zeros_like(samples),
            samples,
            sampler,
            torch.tensor(values, dtype=torch.float32),
            callback=callback,
            disable_pbar=True,
            seed=0,
        )
    result = sampler.result.to(comfy.model_management.intermediate_device(), torch.float32)
    if not torch.isfinite(result).all():
        raise ValueError("the inversion produced NaN/Inf; check the model and the latent (an fp16 model may overflow)")
    error = None
    if sampler.reconstructed is not None:
        latent_format = model.model.latent_format
        back = latent_format.process_out(sampler.reconstructed.to(result.device, torch.float32))
        original = samples.to(result.device, torch.float32)
        error = float((back - original).norm() / original.norm())
    return InversionResult(
        latent=result,
        sigma=values[0],
        family=family,
        model_sampling=sampling,
        latent_format=model.model.latent_format,
        steps=len(values) - 1,
        model_calls=sampler.model_calls,
        reconstruction_error=error,
        step_residual=sampler.trace.worst_residual,
        unconverged=sampler.trace.unconverged,
    )


class InvertedNoise:
    """A ComfyUI NOISE source (``generate_noise(latent)``, ``seed``) for SamplerCustomAdvanced.

    ComfyUI starts a sampler at ``noise_scaling(σ₀, noise, latent_image, max_denoise)``,
    an affine map of the noise. This returns the noise for which that start is

        k(σ₀) · slerp(α, x_T / k(σ₀), ε)

    with x_T the inverted latent, k the variance-preserving scale and ε ComfyUI's own
    seeded noise (``comfy.sample.prepare_noise``, as the stock RandomNoise). α = 0 starts
    exactly at the inverted latent, α = 1 exactly where RandomNoise with the same seed
    and an empty latent starts. The sampler must use the SIGMAS the inversion used.
    """

    def __init__(self, inversion: InversionResult, seed: int, alpha: float):
        if not (0.0 <= alpha <= 1.0) or not math.isfinite(alpha):
            raise ValueError(f"alpha must be within [0, 1] (0 = the inverted latent, 1 = fresh noise), got {alpha}")
        self.inversion = inversion
        self.seed = seed
        self.alpha = alpha

    def start_latent(self, like: dict) -> torch.Tensor:
        """The model-space latent the sampler should start from."""
        import comfy.sample

        inv = self.inversion
        if self.alpha == 0.0:
            return inv.latent.clone()
        samples = like["samples"]
        fresh = comfy.sample.prepare_noise(samples, self.seed, like.get("batch_index")).to(torch.float32)
        k = editing.vp_scale(inv.sigma, inv.family)
        return k * editing.slerp(self.alpha, inv.vp_latent(), fresh)

    def generate_noise(self, input_latent: dict) -> torch.Tensor:
        inv = self.inversion
        samples = input_latent["samples"]
        if tuple(samples.shape) != tuple(inv.latent.shape):
            raise ValueError(
                f"latent_image of the sampler has shape {tuple(samples.shape)} but the inverted latent has "
                f"{tuple(inv.latent.shape)}; connect the latent you inverted (or an empty latent of its size)"
            )
        start = self.start_latent(input_latent)
        image = samples.to(torch.float32)
        if torch.count_nonzero(image) > 0:  # ComfyUI does not shift an empty latent (CFGGuider.inner_sample)
            image = inv.latent_format.process_in(image)
        sigma = torch.tensor(inv.sigma, dtype=torch.float32)
        md = _is_max_denoise(inv.model_sampling, inv.sigma)
        offset = inv.model_sampling.noise_scaling(sigma, torch.zeros_like(image), image.clone(), md)
        gain = inv.model_sampling.noise_scaling(sigma, torch.ones_like(image), torch.zeros_like(image), md)
        return (start - offset) / gain


def sample_ddim(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=0.0, s_noise=1.0, noise_sampler=None):
    """η-DDIM as a k-diffusion style sampler function (wrap with ``comfy.samplers.KSAMPLER``).

    Works for ε-, v-prediction and flow models (see :mod:`svdiff.editing`); η = 0 is
    deterministic DDIM, η = 1 DDPM-like ancestral sampling.
    """
    from comfy.k_diffusion import sampling as k_sampling
    from tqdm.auto import trange

    extra_args = {} if extra_args is None else extra_args
    family = model_family(model.inner_model.inner_model.model_sampling)
    if noise_sampler is None:
        noise_sampler = k_sampling.default_noise_sampler(x, seed=extra_args.get("seed"))
    values = [float(s) for s in sigmas]
    if len(values) < 2:
        return x
    bar = trange(len(values) - 1, disable=disable)
    s_in = x.new_ones([x.shape[0]])
    for i in bar:
        sigma, sigma_next = values[i], values[i + 1]
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        noise = None
        if eta > 0.0 and sigma_next > 0.0:
            noise = noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise
        x = editing.ddim_step(x, denoised, sigma, sigma_next, family, eta, noise)
    return x


def ddim_sampler(eta: float = 0.0, s_noise: float = 1.0):
    """A ComfyUI SAMPLER object running :func:`sample_ddim`."""
    import comfy.samplers

    if not math.isfinite(eta) or eta < 0.0:
        raise ValueError(f"eta must be ≥ 0 (0 = deterministic DDIM; the paper uses 0.5 and 0.9), got {eta}")
    return comfy.samplers.KSAMPLER(sample_ddim, extra_options={"eta": float(eta), "s_noise": float(s_noise)})


def round_trip(
    model, positive, latent: dict, sigmas: torch.Tensor, refine_iterations: int = 0, tolerance: float = editing.DEFAULT_TOLERANCE
) -> tuple[torch.Tensor, InversionResult]:
    """Invert ``latent`` and sample it back with the same prompt, cfg 1 and η = 0.

    Returns the reconstructed VAE-space latent and the inversion: the check of
    eq. 6 (how well DDIM inversion inverts the sampler), used by tests and benchmarks.
    The sampling back goes through ComfyUI's own sampler path (noise scaling, latent
    format), independently of the inversion's own check.
    """
    import comfy.samplers

    inverted = invert(model, positive, latent, sigmas, refine_iterations=refine_iterations, tolerance=tolerance, check=False)
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, [])
    guider.set_cfg(1.0)
    noise = InvertedNoise(inverted, seed=0, alpha=0.0).generate_noise(latent)
    with torch.no_grad():
        out = guider.sample(noise, latent["samples"], ddim_sampler(0.0), sigmas, disable_pbar=True, seed=0)
    return out, inverted
