"""CoSINE editing math (svdiff.editing) against closed forms, in float64."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from comfyui_svdiff.svdiff import editing


def _vp_ddim(x_vp, eps, abar_t, abar_n, eta, z):
    """Song et al. (2021) eq. 12 in the variance-preserving form, written out independently."""
    x0 = (x_vp - math.sqrt(1 - abar_t) * eps) / math.sqrt(abar_t)
    sigma_eta = eta * math.sqrt((1 - abar_n) / (1 - abar_t)) * math.sqrt(1 - abar_t / abar_n)
    return math.sqrt(abar_n) * x0 + math.sqrt(1 - abar_n - sigma_eta**2) * eps + sigma_eta * z, x0


@pytest.mark.parametrize("eta", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize(("sigma", "sigma_next"), [(14.6, 12.9), (3.0, 1.2), (0.4, 0.03)])
def test_eps_step_is_song_et_al_ddim(eta, sigma, sigma_next):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64) * math.sqrt(1 + sigma**2)
    eps = torch.randn(x.shape, generator=g, dtype=torch.float64)  # the prediction we control
    z = torch.randn(x.shape, generator=g, dtype=torch.float64)
    abar_t, abar_n = 1 / (1 + sigma**2), 1 / (1 + sigma_next**2)  # ComfyUI: σ = √((1 − ᾱ)/ᾱ)
    expected_vp, x0 = _vp_ddim(x * math.sqrt(abar_t), eps, abar_t, abar_n, eta, z)
    got = editing.ddim_step(x, x0, sigma, sigma_next, "eps", eta, z)
    torch.testing.assert_close(got * math.sqrt(abar_n), expected_vp, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize(("sigma", "sigma_next"), [(0.95, 0.8), (0.5, 0.2), (0.1, 0.02)])
def test_flow_step_is_ddim_of_the_equivalent_vp_process(eta, sigma, sigma_next):
    """x = (1−σ)x₀ + σε is (1−σ)·(x₀ + s·ε) with s = σ/(1−σ): DDIM on that, mapped back."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 2, 2, generator=g, dtype=torch.float64)
    x0 = torch.randn(x.shape, generator=g, dtype=torch.float64) * 0.5
    z = torch.randn(x.shape, generator=g, dtype=torch.float64)
    s, s_n = sigma / (1 - sigma), sigma_next / (1 - sigma_next)
    x_ve = x / (1 - sigma)
    eps = (x_ve - x0) / s
    abar_t, abar_n = 1 / (1 + s**2), 1 / (1 + s_n**2)
    expected_vp, _ = _vp_ddim(x_ve * math.sqrt(abar_t), eps, abar_t, abar_n, eta, z)
    expected = expected_vp / math.sqrt(abar_n) * (1 - sigma_next)
    got = editing.ddim_step(x, x0, sigma, sigma_next, "flow", eta, z)
    torch.testing.assert_close(got, expected, rtol=1e-11, atol=1e-11)
    if eta == 0.0:  # rectified-flow DDIM is an Euler step along the velocity ε − x₀
        velocity = (x - (1 - sigma) * x0) / sigma - x0
        torch.testing.assert_close(got, x + (sigma_next - sigma) * velocity, rtol=1e-11, atol=1e-11)


def test_flow_step_from_sigma_one_is_the_finite_limit():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 16, 2, 2, generator=g, dtype=torch.float64)
    x0 = torch.randn(x.shape, generator=g, dtype=torch.float64)
    z = torch.randn(x.shape, generator=g, dtype=torch.float64)
    at_one = editing.ddim_step(x, x0, 1.0, 0.7, "flow", 0.9, z)
    near_one = editing.ddim_step(x, x0, 1.0 - 1e-9, 0.7, "flow", 0.9, z)
    assert torch.isfinite(at_one).all()
    torch.testing.assert_close(at_one, near_one, rtol=1e-6, atol=1e-6)


def _gaussian_denoiser(sd, family):
    """The exact posterior mean E[x₀ | x] for data x₀ ~ N(0, sd²·I)."""

    def denoise(x, sigma):
        s = float(sigma[0])
        if family == "eps":
            return x * sd**2 / (sd**2 + s**2)
        c, v = 1 - s, s * s  # x = c·x₀ + s·ε
        return x * c * sd**2 / (c * c * sd**2 + v)

    return denoise


def test_inversion_converges_to_the_probability_flow_solution():
    """For Gaussian data the DDIM ODE has the closed form x(σ) = x₀·√(sd² + σ²)/sd."""
    sd = 0.8
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(1, 4, 4, 4, generator=g, dtype=torch.float64) * sd
    errors = []
    for steps in (10, 40, 160):
        sigmas = torch.cat([torch.linspace(10.0, 0.05, steps, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
        trace = editing.ddim_invert(_gaussian_denoiser(sd, "eps"), x0, sigmas, "eps", refine_iterations=20)
        exact = x0 * math.sqrt(sd**2 + 10.0**2) / sd
        errors.append(float((trace.latents[-1] - exact).norm() / exact.norm()))
    # first order in the step size, as DDIM (an Euler step in σ) is: 4× the steps, ~4× less error
    assert errors[0] > 3 * errors[1] > 9 * errors[2], errors


@pytest.mark.parametrize("family", ["eps", "flow"])
def test_refined_inversion_is_the_exact_inverse_of_the_sampler(family):
    sd = 0.8
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(2, 4, 4, 4, generator=g, dtype=torch.float64) * sd
    sigmas = torch.tensor(
        [14.6, 7.0, 3.0, 1.0, 0.3, 0.03, 0.0] if family == "eps" else [1.0, 0.8, 0.5, 0.2, 0.05, 0.0], dtype=torch.float64
    )
    denoise = _gaussian_denoiser(sd, family)
    plain = editing.ddim_invert(denoise, x0, sigmas, family, refine_iterations=0)
    refined = editing.ddim_invert(denoise, x0, sigmas, family, refine_iterations=200, tolerance=0.0)
    err_plain = float((editing.ddim_sample(denoise, plain.latents[-1], sigmas, family) - x0).norm() / x0.norm())
    err_refined = float((editing.ddim_sample(denoise, refined.latents[-1], sigmas, family) - x0).norm() / x0.norm())
    assert err_refined < 1e-9 < err_plain
    assert plain.model_calls == len(sigmas) - 1
    assert refined.model_calls > plain.model_calls


def test_inversion_stops_refining_once_converged():
    identity_eps = lambda x, s: x * 0.5  # noqa: E731  (ε̂ = 0.5·x/σ·σ, a contraction for small steps)
    x0 = torch.ones(1, 1, 2, 2, dtype=torch.float64)
    sigmas = torch.tensor([0.2, 0.1, 0.0], dtype=torch.float64)
    trace = editing.ddim_invert(identity_eps, x0, sigmas, "eps", refine_iterations=100, tolerance=1e-6)
    assert trace.model_calls < 2 * 100


def test_inversion_reports_what_each_step_reached():
    """Per step the last fixed-point update (relative); steps that end above the tolerance are counted."""
    sd = 0.8
    x0 = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * sd
    sigmas = torch.tensor([14.6, 7.0, 3.0, 1.0, 0.3, 0.0], dtype=torch.float64)
    denoise = _gaussian_denoiser(sd, "eps")
    capped = editing.ddim_invert(denoise, x0, sigmas, "eps", refine_iterations=1, tolerance=1e-12)
    assert capped.unconverged == 5 and all(r is not None and r > 1e-12 for r in capped.step_residuals)
    full = editing.ddim_invert(denoise, x0, sigmas, "eps", refine_iterations=200, tolerance=1e-9)
    assert full.unconverged == 0 and full.worst_residual <= 1e-9 < capped.worst_residual
    plain = editing.ddim_invert(denoise, x0, sigmas, "eps", refine_iterations=0)
    assert plain.step_residuals == [None] * 5 and plain.worst_residual is None and plain.unconverged == 0


def _np_slerp(alpha, a, b):
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    phi = np.arccos(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))
    return (np.sin((1 - alpha) * phi) * a + np.sin(alpha * phi) * b) / np.sin(phi)


@pytest.mark.parametrize("alpha", [0.1, 0.5, 0.9])
def test_slerp_is_eq_7_per_sample(alpha):
    g = torch.Generator().manual_seed(5)
    z = torch.randn(3, 4, 5, 5, generator=g)
    e = torch.randn(3, 4, 5, 5, generator=g) * 2.0
    out = editing.slerp(alpha, z, e)
    for i in range(3):
        np.testing.assert_allclose(out[i].numpy().ravel(), _np_slerp(alpha, z[i].numpy(), e[i].numpy()), rtol=1e-5, atol=1e-5)


def test_slerp_endpoints_norms_and_degenerate_inputs():
    g = torch.Generator().manual_seed(6)
    z = torch.randn(2, 4, 8, 8, generator=g)
    e = torch.randn(2, 4, 8, 8, generator=g)
    assert torch.equal(editing.slerp(0.0, z, e), z)
    assert torch.equal(editing.slerp(1.0, z, e), e)
    # equal norms stay on the sphere for every α
    e_same = e / e.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * z.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    for alpha in (0.25, 0.5, 0.75):
        norms = editing.slerp(alpha, z, e_same).flatten(1).norm(dim=1)
        torch.testing.assert_close(norms, z.flatten(1).norm(dim=1), rtol=1e-5, atol=0)
    # parallel and antiparallel inputs: the linear limit, never NaN
    for other in (2.0 * z, z.clone(), -z):
        out = editing.slerp(0.3, z, other)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, 0.7 * z + 0.3 * other, rtol=1e-5, atol=1e-6)
    zero = torch.zeros_like(z)
    assert torch.isfinite(editing.slerp(0.5, zero, e)).all()


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan")])
def test_slerp_refuses_alpha_outside_the_unit_interval(alpha):
    with pytest.raises(ValueError, match="alpha must be within"):
        editing.slerp(alpha, torch.zeros(1, 2), torch.ones(1, 2))


@pytest.mark.parametrize(
    ("sigmas", "message"),
    [([], "no step"), ([5.0], "no step"), ([1.0, 2.0, 0.0], "decrease"), ([2.0, -1.0], "negative"), ([2.0, 1.0, 0.0], "above 1")],
)
def test_schedules_without_steps_or_out_of_order_are_refused(sigmas, message):
    family = "flow" if message == "above 1" else "eps"
    with pytest.raises(ValueError, match=message):
        editing.ddim_invert(lambda x, s: x, torch.zeros(1, 1, 2, 2), torch.tensor(sigmas), family)


def test_negative_eta_is_refused():
    with pytest.raises(ValueError, match="eta must be"):
        editing.ddim_sample(lambda x, s: x, torch.zeros(1, 1, 2, 2), torch.tensor([1.0, 0.0]), "eps", eta=-0.1)
