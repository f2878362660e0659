"""Spectral shifts as ComfyUI weight patches, checked against float64 references.

Each expected weight is computed here from the unpatched weights with a float64
``torch.linalg.svd`` and the paper's formula, independently of the extension's Gram
decomposition and additive form.
"""

from __future__ import annotations

import pytest
import torch

from comfyui_svdiff.svdiff.comfy.patching import apply_shift
from comfyui_svdiff.svdiff.layers import layer_selector
from comfyui_svdiff.svdiff.shift import combine, parse_key, select
from comfyui_svdiff.svdiff.targets import ShiftMismatchError
from devtools import tiny_models
from integration.helpers import assert_weights_close, base_state, clamping_pair, expected_state, patched_state_dict, random_shift

pytestmark = pytest.mark.integration


def test_apply_matches_float64_reference_on_model_and_clip(build):
    model, clip = build("SD15")
    shift = random_shift(model, clip)
    base_model, base_clip = base_state(model), base_state(clip.patcher)
    new_model, new_clip, report = apply_shift(model, clip, shift, 0.7, 1.3)
    assert report.model_layers > 30 and report.clip_layers > 10
    got = patched_state_dict(new_model)
    expected = expected_state(base_model, "diffusion_model.", [(shift, 0.7)])
    assert_weights_close(got, expected, base_model, what="model ")
    got = patched_state_dict(new_clip.patcher)
    expected = expected_state(base_clip, "text_encoders.", [(shift, 1.3)])
    assert_weights_close(got, expected, base_clip, what="clip ")


def test_inputs_are_never_mutated_and_strength_zero_is_identity(build):
    model, clip = build("SD15")
    before_patches = {k: list(v) for k, v in model.patches.items()}
    before_clip = {k: list(v) for k, v in clip.patcher.patches.items()}
    weights = base_state(model)
    shift = random_shift(model, clip)
    new_model, new_clip, _ = apply_shift(model, clip, shift, 1.0, 1.0)
    patched_state_dict(new_model)  # load and unload the patched clone
    assert new_model is not model and new_clip is not clip
    assert {k: list(v) for k, v in model.patches.items()} == before_patches
    assert {k: list(v) for k, v in clip.patcher.patches.items()} == before_clip
    for k, v in model.model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    same_model, same_clip, _ = apply_shift(model, clip, shift, 0.0, 0.0)
    assert same_model is model and same_clip is clip


@pytest.mark.parametrize("arch", ["SD15", "SDXL"])
def test_chained_applies_combine_inside_one_relu(build, arch):
    """Two apply nodes give U diag(ReLU(σ + s₁δ₁ + s₂δ₂)) Vᵀ (eqs. 4, 5)."""
    model, clip = build(arch)
    first, second = clamping_pair(model)
    base = base_state(model)
    m1, _, _ = apply_shift(model, None, first, 0.8, 0.0)
    m2, _, _ = apply_shift(m1, None, second, 1.5, 0.0)
    got = patched_state_dict(m2)
    expected = expected_state(base, "diffusion_model.", [(first, 0.8), (second, 1.5)])
    assert_weights_close(got, expected, base)
    # One adapter per weight, not two.
    key = next(k for k in first.tensors if k.endswith(".delta"))
    param = parse_key(key).param
    assert sum(1 for p in m2.patches[param] if getattr(p[1], "name", "") == "svdiff") == 1


@pytest.mark.parametrize("arch", ["SD15", "SDXL"])
def test_stacks_with_loras_in_both_orders(build, arch):
    model, clip = build(arch)
    base_m, base_c = base_state(model), base_state(clip.patcher)
    shift = random_shift(model, clip, seed=3)
    lora = tiny_models.make_test_lora(model=model, clip=clip, rank=4, seed=5, scale=0.5)
    import comfy.sd

    lora_model, lora_clip = comfy.sd.load_lora_for_models(model, clip, lora, 0.9, 1.1)
    lora_only_m = patched_state_dict(lora_model)
    lora_only_c = patched_state_dict(lora_clip.patcher)
    lora_delta_m = {k: lora_only_m[k].double() - base_m[k].double() for k in base_m if not torch.equal(lora_only_m[k], base_m[k])}
    lora_delta_c = {k: lora_only_c[k].double() - base_c[k].double() for k in base_c if not torch.equal(lora_only_c[k], base_c[k])}
    assert lora_delta_m and lora_delta_c

    # LoRA first, then the shift
    a_m, a_c, _ = apply_shift(lora_model, lora_clip, shift, 0.6, 0.6)
    # shift first, then the LoRA
    s_m, s_c, _ = apply_shift(model, clip, shift, 0.6, 0.6)
    b_m, b_c = comfy.sd.load_lora_for_models(s_m, s_c, lora, 0.9, 1.1)

    exp_m = expected_state(base_m, "diffusion_model.", [(shift, 0.6)], lora_delta_m)
    exp_c = expected_state(base_c, "text_encoders.", [(shift, 0.6)], lora_delta_c)
    for patcher_m, patcher_c, order in [(a_m, a_c, "lora→shift "), (b_m, b_c, "shift→lora ")]:
        assert_weights_close(patched_state_dict(patcher_m), exp_m, base_m, what=order)
        assert_weights_close(patched_state_dict(patcher_c.patcher), exp_c, base_c, what=order)


@pytest.mark.parametrize("arch", ["SD15", "SDXL"])
def test_combined_and_selected_shifts_apply_as_their_formula(build, arch):
    model, _ = build(arch)
    a = random_shift(model, None, seed=7, name="a")
    b = random_shift(model, None, seed=8, name="b", rank=3)
    mixed = combine(a, 0.3, b, 0.7)
    base = base_state(model)
    got = patched_state_dict(apply_shift(model, None, mixed, 1.0, 0.0)[0])
    expected = expected_state(base, "diffusion_model.", [(a, 0.3), (b, 0.7)])
    assert_weights_close(got, expected, base)
    # Style mixing: down blocks from a, everything else from b (Fig. 12).
    down = select(a, layer_selector(a, "all", False, "none", False, False), "down")
    rest = select(b, lambda key: key not in down.tensors, "rest")
    assert down.tensors and rest.tensors
    got = patched_state_dict(apply_shift(model, None, combine(down, 1.0, rest, 1.0), 1.0, 0.0)[0])
    expected = expected_state(base, "diffusion_model.", [(down, 1.0), (rest, 1.0)])
    assert set(expected) == {parse_key(k).param for k in {**a.tensors, **b.tensors}}
    assert_weights_close(got, expected, base)


def test_half_precision_models(build):
    for dtype in (torch.float16, torch.bfloat16):
        model, _ = build("SD15", dtype=dtype)
        base = base_state(model)
        shift = random_shift(model, None, seed=9, scale=0.2)
        got = patched_state_dict(apply_shift(model, None, shift, 1.0, 0.0)[0])
        assert got["diffusion_model.input_blocks.1.1.proj_in.weight"].dtype == dtype
        expected = expected_state(base, "diffusion_model.", [(shift, 1.0)])
        # fp16/bf16 results are rounded (stochastically) to the model dtype: one ulp.
        assert_weights_close(got, expected, base, rel=1e-4, what=f"{dtype} ")


def test_lowvram_patching_matches_full_load(build):
    """ComfyUI's partial loading calls the adapter on every forward (LowVramPatch)."""
    model, clip = build("SD15")
    shift = random_shift(model, None, seed=11)
    patched, _, _ = apply_shift(model, None, shift, 1.0, 0.0)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500.0])
    context = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))

    def run(lowvram):
        import comfy.model_management as mm

        mm.unload_all_models()
        patched.patch_model(device_to=torch.device("cpu"), lowvram_model_memory=1 if lowvram else 0)
        try:
            if lowvram:
                assert patched.model.model_lowvram and patched.model.lowvram_patch_counter > 0
            with torch.no_grad():
                return patched.model.diffusion_model(x, timesteps=t, context=context)
        finally:
            patched.unpatch_model()

    full, low = run(False), run(True)
    torch.testing.assert_close(low, full, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        base_out = model.model.diffusion_model(x, timesteps=t, context=context)
    assert float((full - base_out).abs().max()) > 1e-3


def test_sampling_with_a_patched_model(build):
    model, clip = build("SD15")
    shift = random_shift(model, clip, seed=12, clamp_some=False)
    pos = tiny_models.encode_prompt(clip, "photo of a sks dog")
    neg = tiny_models.encode_prompt(clip, "")
    base = tiny_models.sample_tiny(model, pos, neg, "SD15", seed=3, steps=3)
    new_model, new_clip, _ = apply_shift(model, clip, shift, 1.0, 1.0)
    pos2 = tiny_models.encode_prompt(new_clip, "photo of a sks dog")
    neg2 = tiny_models.encode_prompt(new_clip, "")
    out = tiny_models.sample_tiny(new_model, pos2, neg2, "SD15", seed=3, steps=3)
    assert torch.isfinite(out).all()
    assert float((out - base).abs().mean()) > 1e-4
    zero_model, zero_clip, _ = apply_shift(model, clip, shift, 0.0, 0.0)
    again = tiny_models.sample_tiny(zero_model, pos, neg, "SD15", seed=3, steps=3)
    assert torch.equal(again, base)


def test_sdxl_two_text_encoders(build):
    model, clip = build("SDXL")
    shift = random_shift(model, clip, seed=13)
    assert any(".clip_g." in k for k in shift.tensors) and any(".clip_l." in k for k in shift.tensors)
    base_m, base_c = base_state(model), base_state(clip.patcher)
    m, c, report = apply_shift(model, clip, shift, 1.0, 0.5)
    assert_weights_close(patched_state_dict(m), expected_state(base_m, "diffusion_model.", [(shift, 1.0)]), base_m)
    assert_weights_close(patched_state_dict(c.patcher), expected_state(base_c, "text_encoders.", [(shift, 0.5)]), base_c)


def test_v_prediction_and_flow_models_patch(build):
    for arch in ("SD21v", "Flux"):
        model, clip = build(arch)
        shift = random_shift(model, clip, seed=14)
        base = base_state(model)
        m, _, _ = apply_shift(model, clip, shift, 1.0, 1.0)
        assert_weights_close(patched_state_dict(m), expected_state(base, "diffusion_model.", [(shift, 1.0)]), base, what=f"{arch} ")


def test_shift_for_another_architecture_is_refused_whole(build):
    sd15, clip = build("SD15")
    sdxl, _ = build("SDXL")
    shift = random_shift(sdxl, None, seed=15)
    before = {k: list(v) for k, v in sd15.patches.items()}
    with pytest.raises(ShiftMismatchError, match="made for SDXL, the model is SD15"):
        apply_shift(sd15, clip, shift, 1.0, 1.0)
    assert {k: list(v) for k, v in sd15.patches.items()} == before


def test_same_architecture_other_checkpoint_applies_with_a_note(build, caplog):
    """Base hashes tell "different checkpoint" (apply, warn once) from "this checkpoint"."""
    from comfyui_svdiff.svdiff.cache import content_hash

    original, _ = build("SD15", seed=0)
    other, _ = build("SD15", seed=1)
    shift = random_shift(original, None, seed=16)
    weights = original.model.state_dict()
    shift.base_hashes = {parse_key(k).param: content_hash(weights[parse_key(k).param])[:8] for k in shift.tensors}

    _, _, report = apply_shift(original, None, shift, 1.0, 0.0)
    assert report.base_mismatches == 0 and report.checked_hashes == len(shift.tensors)
    assert not report.notes

    with caplog.at_level("WARNING", logger="svdiff"):
        _, _, first = apply_shift(other, None, shift, 1.0, 0.0)
        _, _, second = apply_shift(other, None, shift, 1.0, 0.0)
    assert first.base_mismatches == len(shift.tensors)
    assert "was made on a different checkpoint" in first.summary() and "was made on a different checkpoint" in second.summary()
    assert sum("different checkpoint" in r.getMessage() for r in caplog.records) == 1  # warned once


def test_every_count_of_a_shift_agrees(build, tmp_path):
    """Inspect, the loader panel's summary and the apply report count one shift's tensors the same,
    counted here from the file's keys by suffix and prefix (independent of the parser)."""
    from comfyui_svdiff.svdiff import file_info
    from comfyui_svdiff.svdiff.fileformat import write_shift
    from comfyui_svdiff.svdiff.inspection import describe

    model, clip = build("SD15")
    shift = random_shift(model, clip)
    keys = list(shift.tensors)
    model_spectral = sum(1 for k in keys if k.endswith(".delta") and not k.startswith("text_encoders."))
    clip_spectral = sum(1 for k in keys if k.endswith(".delta") and k.startswith("text_encoders."))
    elementwise = sum(1 for k in keys if not k.endswith(".delta"))
    assert model_spectral > 30 and clip_spectral > 10 and elementwise > 10
    words = f"{model_spectral} diffusion-model + {clip_spectral} text-encoder spectral layers, {elementwise} elementwise deltas"
    assert shift.layer_summary() == words
    assert words in describe(shift)  # SVDiffInspect
    path = write_shift(tmp_path / "counted.safetensors", shift)
    assert file_info.summary(shift, path)["layers"] == words  # the loader panel
    _, _, report = apply_shift(model, clip, shift, 1.0, 1.0)
    assert (report.model_layers, report.clip_layers, report.elementwise) == (model_spectral, clip_spectral, elementwise)
