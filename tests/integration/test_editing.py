"""CoSINE editing in ComfyUI: DDIM inversion, the inverted-latent NOISE, the η-DDIM SAMPLER.

Inversion quality depends on how smooth the model is in x and σ. Random weights are
much rougher than a trained denoiser (their outputs at neighbouring timesteps are
unrelated), so the reconstruction tests use tiny models made smooth in time with a
damped output layer (``tiny_models.smooth_in_time_``); the numbers they produce are
recorded in benchmarks/RESULTS.md by benchmarks/bench_inversion.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from devtools import tiny_models
from integration.helpers import edit_prompt

pytestmark = pytest.mark.integration


def _calm(arch):
    model, clip = tiny_models.build_model(arch, seed=0)
    tiny_models.smooth_in_time_(model, output_scale=0.3)
    return model, clip


def _latent(arch, seed=1, size=8):
    """A LATENT in VAE space whose model-space values have unit variance, like real images."""
    model_scale = {"SD15": 0.18215, "SD21v": 0.18215, "SDXL": 0.13025, "Flux": 0.3611}[arch]
    c = tiny_models.latent_channels(arch)
    return {"samples": torch.randn(1, c, size, size, generator=torch.Generator().manual_seed(seed)) / model_scale}


def reconstruction_error(model, positive, latent, steps, refine, scheduler="normal"):
    """Invert, then sample back with the same prompt and η = 0; relative error in VAE space."""
    import comfy.samplers

    from comfyui_svdiff.svdiff.comfy import editing as comfy_editing

    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps)
    out, _ = comfy_editing.round_trip(model, positive, latent, sigmas, refine)
    return float((out - latent["samples"]).norm() / latent["samples"].norm())


def test_inversion_error_falls_with_steps_and_is_below_half_a_percent_at_50(comfy):
    model, clip = _calm("SD15")
    positive = tiny_models.encode_prompt(clip, "photo of a crown with a blue diamond")
    latent = _latent("SD15")
    plain = [reconstruction_error(model, positive, latent, steps, refine=0) for steps in (10, 25, 50)]
    assert plain[0] > plain[1] > plain[2], plain
    refined = [reconstruction_error(model, positive, latent, steps, refine=3) for steps in (10, 50)]
    assert refined[0] > refined[1], refined
    assert refined[1] <= 0.005, refined  # the bar: ≤ 0.5 % at 50 steps on a tiny eps model
    assert refined[1] < plain[2] / 10


@pytest.mark.parametrize(("arch", "scheduler"), [("SD15", "normal"), ("SD21v", "normal"), ("SDXL", "normal"), ("Flux", "simple")])
def test_default_inversion_reconstructs_encoded_images_within_half_a_percent(comfy, arch, scheduler):
    """The node's defaults (refinement to the tolerance, capped) on a VAE-encoded image at 50 steps.

    The models are made smoother than the other tests' (output scale 0.2): along 50
    steps the tiny SDXL at 0.3 amplifies a step's 1e-7 float32 rounding some 2·10⁴-fold,
    so no float32 inversion gets it below ~0.4 %; trained denoisers are smoother still.
    """
    import comfy.samplers

    from comfyui_svdiff.nodes.editing import DEFAULT_REFINE_CAP
    from comfyui_svdiff.svdiff.comfy import editing as comfy_editing

    model, clip = tiny_models.build_model(arch, seed=0)
    tiny_models.smooth_in_time_(model, output_scale=0.2)
    positive = tiny_models.encode_prompt(clip, "photo of a crown with a blue diamond")
    latent = tiny_models.encoded_picture(arch)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, 50)
    out, _ = comfy_editing.round_trip(model, positive, latent, sigmas, DEFAULT_REFINE_CAP)
    error = float((out - latent["samples"]).norm() / latent["samples"].norm())
    assert error <= 0.005, error
    # What the node reports is that error, measured by its own sampling back; the two
    # samplers round differently, which this close to float32 precision shows as up to
    # a factor of 2 between them.
    reported = comfy_editing.invert(model, positive, latent, sigmas, refine_iterations=DEFAULT_REFINE_CAP)
    assert error / 2 <= reported.reconstruction_error <= 2 * error, (reported.reconstruction_error, error)
    assert reported.model_calls < 20 * 50  # converges long before the cap
    plain = comfy_editing.invert(model, positive, latent, sigmas, refine_iterations=0)
    assert plain.reconstruction_error > 10 * error


@pytest.mark.parametrize(("arch", "scheduler"), [("SD21v", "normal"), ("Flux", "simple")])
def test_inversion_of_v_prediction_and_flow_models(comfy, arch, scheduler):
    model, clip = _calm(arch)
    positive = tiny_models.encode_prompt(clip, "photo of a crown")
    latent = _latent(arch)
    coarse = reconstruction_error(model, positive, latent, 10, 0, scheduler)
    fine = reconstruction_error(model, positive, latent, 50, 0, scheduler)
    refined = reconstruction_error(model, positive, latent, 50, 3, scheduler)
    assert coarse > fine > refined, (coarse, fine, refined)
    assert refined <= 0.005


@pytest.mark.parametrize("arch", ["SD15", "Flux"])
def test_inverted_noise_starts_at_the_inversion_and_alpha_one_is_random_noise(comfy, arch):
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import Noise_RandomNoise

    from comfyui_svdiff.svdiff import editing
    from comfyui_svdiff.svdiff.comfy import editing as comfy_editing

    model, clip = _calm(arch)
    positive = tiny_models.encode_prompt(clip, "photo")
    latent = _latent(arch)
    sampling = model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(sampling, "simple", 4)
    inverted = comfy_editing.invert(model, positive, latent, sigmas, refine_iterations=0)
    sigma0 = sigmas[0]
    processed = model.model.process_latent_in(latent["samples"])
    # α = 0: ComfyUI's own noise scaling of our noise (image latent given to the sampler) is x_T.
    noise = comfy_editing.InvertedNoise(inverted, seed=5, alpha=0.0).generate_noise(latent)
    start = sampling.noise_scaling(sigma0, noise, processed.clone(), True)
    torch.testing.assert_close(start, inverted.latent, rtol=1e-5, atol=1e-5)
    # α = 1 with an empty latent: exactly the stock RandomNoise of the same seed.
    empty = {"samples": torch.zeros_like(latent["samples"])}
    ours = comfy_editing.InvertedNoise(inverted, seed=5, alpha=1.0).generate_noise(empty)
    torch.testing.assert_close(ours, Noise_RandomNoise(5).generate_noise(empty), rtol=1e-6, atol=1e-6)
    # α in between: the start is k·slerp(α, x_T/k, ε) (eq. 7 in the variance-preserving scale)
    mid = comfy_editing.InvertedNoise(inverted, seed=5, alpha=0.4).generate_noise(empty)
    k = editing.vp_scale(float(sigma0), inverted.family)
    fresh = Noise_RandomNoise(5).generate_noise(empty)
    expected = k * editing.slerp(0.4, inverted.latent / k, fresh)
    torch.testing.assert_close(sampling.noise_scaling(sigma0, mid, torch.zeros_like(mid), True), expected, rtol=1e-5, atol=1e-5)


def test_ddim_sampler_equals_comfyui_euler_and_euler_ancestral_for_eps_models(comfy):
    """For ε-models deterministic DDIM is Euler in σ and η-DDIM is Euler-ancestral (same noise)."""
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import Noise_RandomNoise

    from comfyui_svdiff.svdiff.comfy import editing as comfy_editing

    model, clip = tiny_models.build_model("SD15", seed=0)
    positive = tiny_models.encode_prompt(clip, "photo")
    empty = {"samples": torch.zeros(1, 4, 8, 8)}
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 6)

    def run(sampler):
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(positive, [])
        guider.set_cfg(1.0)
        return guider.sample(Noise_RandomNoise(3).generate_noise(empty), empty["samples"], sampler, sigmas, disable_pbar=True, seed=3)

    torch.testing.assert_close(run(comfy_editing.ddim_sampler(0.0)), run(comfy.samplers.ksampler("euler")), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(
        run(comfy_editing.ddim_sampler(0.5)),
        run(comfy.samplers.ksampler("euler_ancestral", {"eta": 0.5, "s_noise": 1.0})),
        rtol=1e-4,
        atol=1e-4,
    )
    assert not torch.allclose(run(comfy_editing.ddim_sampler(0.5)), run(comfy_editing.ddim_sampler(0.0)), atol=1e-3)


def test_eta_ddim_is_the_closed_form_on_a_model_whose_predictions_are_known(comfy):
    """Replace the UNet's ε by a known function and compare two η-DDIM steps with Song et al."""
    import comfy.samplers

    from comfyui_svdiff.svdiff.comfy import editing as comfy_editing

    model, clip = tiny_models.build_model("SD15", seed=0)
    positive = tiny_models.encode_prompt(clip, "photo")
    model = model.clone()

    def known_eps(x_in):  # a function of x_in = x/√(1+σ²), the input the UNet would see
        return 0.5 * x_in + 0.1 * torch.sin(3 * x_in)

    def wrapper(apply_model, args):  # ComfyUI wants x̂₀ = x − σ·ε̂ back
        x, sigma = args["input"], args["timestep"].view(-1, 1, 1, 1)
        return x - sigma * known_eps(x / torch.sqrt(1 + sigma**2))

    model.set_model_unet_function_wrapper(wrapper)
    eta, seed = 0.7, 11
    sigmas = torch.tensor([3.0, 1.0, 0.2])
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0)) * math.sqrt(1 + 9.0)
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, [])
    guider.set_cfg(1.0)
    # noise such that ComfyUI's scaling (σ₀ = 3 < σ_max: x = σ₀·noise) starts at x
    got = guider.sample(x / 3.0, torch.zeros_like(x), comfy_editing.ddim_sampler(eta), sigmas, disable_pbar=True, seed=seed)
    got = model.model.process_latent_in(got)  # the guider returns VAE-space latents

    gen = torch.Generator().manual_seed(seed + 1)  # k-diffusion's default noise sampler (seed + 1 on CPU)
    state = x.double()
    for s, s_next in ((3.0, 1.0), (1.0, 0.2)):
        abar_t, abar_n = 1 / (1 + s * s), 1 / (1 + s_next * s_next)
        x_vp = state * math.sqrt(abar_t)
        eps = known_eps(state / math.sqrt(1 + s * s)).double()
        x0 = (x_vp - math.sqrt(1 - abar_t) * eps) / math.sqrt(abar_t)
        sigma_eta = eta * math.sqrt((1 - abar_n) / (1 - abar_t)) * math.sqrt(1 - abar_t / abar_n)
        z = torch.randn(x.shape, generator=gen).double()
        x_vp = math.sqrt(abar_n) * x0 + math.sqrt(1 - abar_n - sigma_eta**2) * eps + sigma_eta * z
        state = x_vp / math.sqrt(abar_n)
    torch.testing.assert_close(got.double(), state, rtol=1e-4, atol=1e-4)


def test_inversion_refuses_mismatched_latents(comfy):
    import comfy.samplers

    from comfyui_svdiff.svdiff.comfy import editing as comfy_editing

    model, clip = tiny_models.build_model("SD15", seed=0)
    positive = tiny_models.encode_prompt(clip, "photo")
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 3)
    with pytest.raises(ValueError, match="latent has 16 channels but this model works on 4"):
        comfy_editing.invert(model, positive, {"samples": torch.randn(1, 16, 8, 8)}, sigmas)
    with pytest.raises(ValueError, match="needs a negative"):
        comfy_editing.invert(model, positive, _latent("SD15"), sigmas, cfg=5.0)
    inverted = comfy_editing.invert(model, positive, _latent("SD15"), sigmas)
    with pytest.raises(ValueError, match="latent_image of the sampler has shape"):
        comfy_editing.InvertedNoise(inverted, 0, 0.0).generate_noise({"samples": torch.zeros(1, 4, 16, 16)})


# ----------------------------------------------------------------------------------
# Through ComfyUI's executor


def test_edit_workflow_runs_in_comfyui(comfy_handle, tiny_checkpoint):
    result = comfy_handle.run_prompt(edit_prompt(tiny_checkpoint, alpha=0.3, eta=0.5), fresh_executor=True)
    assert result.success, result.error_message
    assert len(result.output("13")["images"]) == 1
