"""Training spectral shifts in ComfyUI on tiny models built in code."""

from __future__ import annotations

import json

import pytest
import torch

from comfyui_svdiff.svdiff.comfy.patching import apply_shift
from comfyui_svdiff.svdiff.fileformat import read_shift, write_shift
from comfyui_svdiff.svdiff.training.config import TrainConfig
from devtools import tiny_models
from integration.helpers import DOG, SKS, base_state, random_shift, tiny_examples, train_tiny

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("arch", ["SD15", "SD21v", "SDXL", "Flux"])
def test_native_target_is_eps_v_or_velocity(build, arch):
    """native_mse inverts ComfyUI's x̂₀ to the model's own target: ε, v or the flow velocity."""
    from comfyui_svdiff.svdiff.comfy.training.loss import native_mse

    model, _ = build(arch)
    inner = model.model
    sampling = inner.model_sampling
    g = torch.Generator().manual_seed(0)
    c = tiny_models.latent_channels(arch)
    x0 = torch.randn(3, c, 4, 4, generator=g)
    eps = torch.randn(3, c, 4, 4, generator=g)
    sigma = torch.tensor([float(sampling.percent_to_sigma(p)) for p in (0.1, 0.5, 0.9)])
    x_t = sampling.noise_scaling(sigma, eps, x0)
    s = sigma.view(-1, 1, 1, 1)
    if arch == "Flux":
        target = eps - x0  # rectified flow: x_t = σε + (1−σ)x₀, velocity ε − x₀
    elif arch == "SD21v":
        sigma_data = sampling.sigma_data
        # v = (x_t·σ_d²/(σ²+σ_d²) − x₀)·√(σ²+σ_d²)/(σ·σ_d), the inverse of ComfyUI's V_PREDICTION
        target = (x_t * sigma_data**2 / (s**2 + sigma_data**2) - x0) * (s**2 + sigma_data**2) ** 0.5 / (s * sigma_data)
    else:
        target = eps
    out = torch.randn(x0.shape, generator=g)
    denoised = sampling.calculate_denoised(sigma, out, x_t)
    got = native_mse(inner, x_t, sigma, denoised, x0)
    expected = ((out - target) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_training_lowers_the_loss_and_leaves_the_input_untouched(build):
    model, clip = build("SD15")
    before = base_state(model)
    patches_before = {k: list(v) for k, v in model.patches.items()}
    one = tiny_examples("SD15", count=1)
    config = TrainConfig(steps=30, lr_spectral=3e-2, lr_1d=1e-3, prior_weight=0.0, flip=False, seed=3, max_grad_norm=0)
    result = train_tiny(model, clip, config, instance=one)
    assert result.steps == 30 and len(result.losses) == 30
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    for k, v in model.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert {k: list(v) for k, v in model.patches.items()} == patches_before
    keys = list(result.shift.tensors)
    assert any(k.endswith(".delta") for k in keys) and any(k.endswith(".diff") for k in keys)
    assert result.shift.base_hashes and result.shift.metadata["svdiff.architecture"] == "SD15"


def test_same_seed_gives_bit_identical_shifts(build):
    model, clip = build("SD15")
    config = TrainConfig(steps=4, lr_spectral=1e-2, prior_weight=0.0, seed=11)
    a = train_tiny(model, clip, config).shift
    b = train_tiny(model, clip, config).shift
    assert a.tensors.keys() == b.tensors.keys()
    for key in a.tensors:
        assert torch.equal(a.tensors[key], b.tensors[key]), key
    c = train_tiny(model, clip, TrainConfig(steps=4, lr_spectral=1e-2, prior_weight=0.0, seed=12)).shift
    assert any(not torch.equal(a.tensors[k], c.tensors[k]) for k in a.tensors)


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_resume_from_a_file_equals_the_uninterrupted_run_bit_for_bit(build, tmp_path, precision):
    """3 steps, saved as a file (fp16, the default, or fp32) with its state, 2 more == 5 steps straight."""
    model, clip = build("SD15")
    config = TrainConfig(steps=5, lr_spectral=1e-2, lr_1d=1e-3, prior_weight=0.0, seed=5)
    straight = train_tiny(model, clip, config)
    first = train_tiny(model, clip, TrainConfig(steps=3, lr_spectral=1e-2, lr_1d=1e-3, prior_weight=0.0, seed=5))
    first.shift.metadata["svdiff.training"] = json.dumps({"steps": first.steps, "losses": first.losses})
    path = write_shift(tmp_path / "first.safetensors", first.shift, precision=precision)
    saved = read_shift(path)
    if precision == "fp16":  # the file alone would not do: its δ is rounded
        assert any(not torch.equal(saved.tensors[k].float(), first.shift.tensors[k]) for k in saved.tensors)
    resumed = train_tiny(model, clip, config, resume=saved, resume_state=first.optimizer_state)
    assert resumed.steps == 5 and resumed.losses[:3] == first.losses and len(resumed.losses) == 5
    for key in straight.shift.tensors:
        assert torch.equal(resumed.shift.tensors[key], straight.shift.tensors[key]), key
    assert resumed.losses == straight.losses


def test_resume_without_the_state_says_it_continues_from_the_rounded_shift(build, tmp_path, caplog):
    model, clip = build("SD15")
    first = train_tiny(model, clip, TrainConfig(steps=3, lr_spectral=1e-2, prior_weight=0.0, seed=5))
    first.shift.metadata["svdiff.training"] = json.dumps({"steps": first.steps, "losses": first.losses})
    saved = read_shift(write_shift(tmp_path / "alone.safetensors", first.shift, precision="fp16"))
    with caplog.at_level("WARNING", logger="svdiff"):
        train_tiny(model, clip, TrainConfig(steps=4, lr_spectral=1e-2, prior_weight=0.0, seed=5), resume=saved)
    assert "has no training state (.svdiffstate) beside it: training continues from the values rounded as stored in the file (fp16)" in (
        caplog.text
    )


@pytest.mark.parametrize("arch", ["SD15", "SDXL"])
def test_trained_layers_and_the_inference_patch_agree(build, arch):
    """The model ComfyUI samples with (shift applied as a weight patch) computes what
    training computed: compare the loss of one fixed batch both ways."""

    model, clip = build(arch)
    examples = tiny_examples("SD15", count=1, seed=4)
    config = TrainConfig(steps=3, lr_spectral=5e-2, lr_1d=1e-2, prior_weight=0.0, seed=2, flip=False)
    result = train_tiny(model, clip, config, instance=examples)
    # Evaluate the loss at step index 3 (a fresh random draw) with the trained δ, via
    # a zero-learning-rate continuation: the loss recorded there uses the training forms.
    probe = TrainConfig(steps=4, lr_spectral=1e-12, lr_1d=1e-12, prior_weight=0.0, seed=2, flip=False, max_grad_norm=0)
    result.shift.metadata["svdiff.training"] = '{"steps": 3}'
    continued = train_tiny(model, clip, probe, instance=examples, resume=result.shift)
    training_loss = continued.losses[-1]
    # The same draw against the patched model, computed directly.
    patched, _, _ = apply_shift(model, None, result.shift, 1.0, 0.0)
    inference_loss = _loss_at(patched, clip, examples, seed=2, step=3)
    assert abs(training_loss - inference_loss) <= 1e-4 * max(1.0, abs(inference_loss)), (training_loss, inference_loss)


def _loss_at(model, clip, examples, seed, step):
    """The training loss of one step's random draw, with ComfyUI's own sampling path."""
    import comfy.model_management
    import comfy.samplers

    from comfyui_svdiff.svdiff.comfy.training.examples import uniform_plan
    from comfyui_svdiff.svdiff.comfy.training.guider import batched_conditioning
    from comfyui_svdiff.svdiff.comfy.training.loss import native_mse
    from comfyui_svdiff.svdiff.training.loop import step_generator

    comfy.model_management.load_models_gpu([model], force_full_load=True)
    inner = model.model
    positive = tiny_models.encode_prompt(clip, "photo of a sks dog")
    generator = step_generator(seed, step, 0)
    data = [inner.process_latent_in(ex.latent.float()) for ex in examples]
    rows, _ = uniform_plan(len(data), 0)(generator, 1)
    x0 = torch.cat([data[row] for row in rows])
    noise = torch.randn(x0.shape, generator=generator)
    percent = torch.rand(x0.shape[0], generator=generator)
    sigma = torch.tensor([float(inner.model_sampling.percent_to_sigma(float(p))) for p in percent])
    x_t = inner.model_sampling.noise_scaling(sigma, noise, x0)
    guider = comfy.samplers.CFGGuider(model)
    guider.inner_set_conds({"positive": positive})
    conds = comfy.samplers.process_conds(inner, x_t, {"positive": [c.copy() for c in guider.original_conds["positive"]]}, x_t.device)
    c = batched_conditioning(conds["positive"], [0], x_t, sigma)
    with torch.no_grad():
        denoised = inner.apply_model(x_t, sigma, transformer_options={"cond_or_uncond": [0], "sigmas": sigma}, **c)
        loss = native_mse(inner, x_t, sigma, denoised, x0).mean()
    comfy.model_management.unload_all_models()
    return float(loss)


@pytest.mark.parametrize("arch", ["SD21v", "SDXL", "Flux"])
def test_other_architecturestrain_tiny(build, arch):
    model, clip = build(arch)
    c = tiny_models.latent_channels(arch)
    from comfyui_svdiff.svdiff.comfy.training.examples import Example

    g = torch.Generator().manual_seed(0)
    instance = [Example(torch.randn(1, c, 8, 8, generator=g), SKS) for _ in range(2)]
    prior = [Example(torch.randn(1, c, 8, 8, generator=g), DOG) for _ in range(2)]
    result = train_tiny(model, clip, TrainConfig(steps=3, prior_weight=1.0, seed=1), instance=instance, prior=prior)
    assert result.steps == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    new_model, _, report = apply_shift(model, None, result.shift, 1.0, 0.0)
    assert report.model_layers > 0


def test_refuses_a_model_that_already_carries_patches(build):
    model, clip = build("SD15")
    lora = tiny_models.make_test_lora(model=model, rank=2)
    import comfy.sd

    patched, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)
    with pytest.raises(ValueError, match="already carries patches"):
        train_tiny(patched, clip, TrainConfig(steps=1, prior_weight=0.0))
    # a shift in bypass mode hooks the layers instead of patching them: refused the same way
    bypassed, _, _ = apply_shift(model, None, random_shift(model, None, seed=4), 1.0, 0.0, mode="bypass")
    assert not any(bypassed.patches.get(k) for k in bypassed.patches if k.endswith(".weight") and "attn" in k)
    with pytest.raises(ValueError, match="in bypass mode"):
        train_tiny(bypassed, clip, TrainConfig(steps=1, prior_weight=0.0))


def test_gradient_checkpointing_gives_the_same_shift(build):
    model, clip = build("SD15")
    config = TrainConfig(steps=3, lr_spectral=1e-2, prior_weight=0.0, seed=9)
    plain = train_tiny(model, clip, config).shift
    checkpointed = train_tiny(model, clip, config, gradient_checkpointing=True).shift
    for key in plain.tensors:
        torch.testing.assert_close(checkpointed.tensors[key], plain.tensors[key], rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", ["SD15", "SDXL"])
def test_text_encoder_training(build, arch):
    """Text-encoder shifts learn (their own learning rate) and apply to the CLIP."""
    model, clip = build(arch)
    before = base_state(clip.patcher)
    from comfyui_svdiff.svdiff.comfy.training.run import TrainRequest, train

    config = TrainConfig(steps=3, lr_spectral=1e-2, lr_text=1e-2, prior_weight=0.0, seed=1, train_text_encoder=True)
    result = train(TrainRequest(model, config, tiny_examples("SD15", count=2), clip=clip, architecture=arch))
    text_keys = [k for k in result.shift.tensors if k.startswith("text_encoders.")]
    assert len(text_keys) >= 10 and all(float(result.shift.tensors[k].abs().sum()) > 0 for k in text_keys)
    if arch == "SD15":  # the pooled projection does not reach an SD1.x UNet: no gradient, left out
        assert not any("text_projection" in k for k in text_keys)
    else:  # SDXL reads clip_g's pooled projection (the "y" vector)
        assert any("clip_g.transformer.text_projection" in k for k in text_keys)
    if arch == "SDXL":
        assert any(".clip_g." in k for k in text_keys) and any(".clip_l." in k for k in text_keys)
    for k, v in clip.patcher.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    new_model, new_clip, report = apply_shift(model, clip, result.shift, 1.0, 1.0)
    assert report.clip_layers == len(text_keys) and report.base_mismatches == 0
    a = tiny_models.encode_prompt(clip, "photo of a sks dog")[0][0]
    b = tiny_models.encode_prompt(new_clip, "photo of a sks dog")[0][0]
    assert float((a - b).abs().max()) > 0


def test_a_state_of_another_step_is_not_used(comfy_handle, tmp_path, caplog):
    """A .svdiffstate written for step 2 beside a file at step 3 (e.g. copied by hand) is ignored, with a message."""
    from comfyui_svdiff.svdiff import atomic
    from comfyui_svdiff.svdiff.shift import SpectralShift
    from comfyui_svdiff.svdiff.training.checkpoint import read_state

    shift = SpectralShift({"diffusion_model.a.delta": torch.zeros(3)}, {"svdiff.training": json.dumps({"steps": 3})}, name="x")
    path = write_shift(tmp_path / "x.safetensors", shift)
    state = {"diffusion_model.a.weight.value": torch.ones(3)}
    for steps, used in (("3", True), ("2", False)):
        atomic.atomic_save(path.with_suffix(".svdiffstate"), state, {"svdiff.steps": steps}, overwrite=True)
        with caplog.at_level("WARNING", logger="svdiff"):
            loaded = read_state(path, read_shift(path))
        assert (loaded is not None) == used
    assert "x.svdiffstate is the state of step 2, the file is at step 3: not used" in caplog.text
