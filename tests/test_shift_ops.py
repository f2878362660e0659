"""Combination and selection rules, resolution against a model, export, inspection."""

from __future__ import annotations

import pytest
import torch
from test_spectral import make_weight, reference_update

from comfyui_svdiff.svdiff.inspection import block_magnitudes, cosine_by_layer, cosine_plot, describe, magnitude_plot
from comfyui_svdiff.svdiff.layers import layer_selector, parse_blocks, unet_levels
from comfyui_svdiff.svdiff.lora import layer_factors
from comfyui_svdiff.svdiff.shift import SpectralShift, combine, parse_key, pattern_matcher, select, unet_block
from comfyui_svdiff.svdiff.spectral import as_matrix, decompose, spectral_update
from comfyui_svdiff.svdiff.targets import ShiftMismatchError, resolve

A = "diffusion_model.input_blocks.1.1.proj_in.delta"
B = "diffusion_model.output_blocks.3.1.transformer_blocks.0.attn2.to_k.delta"
N = "diffusion_model.middle_block.0.in_layers.0.diff"
T = "text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.delta"


def shift(values: dict, name="s", **meta) -> SpectralShift:
    return SpectralShift({k: torch.tensor(v, dtype=torch.float32) for k, v in values.items()}, dict(meta), name=name)


def test_key_mapping():
    assert parse_key(A).param == "diffusion_model.input_blocks.1.1.proj_in.weight"
    assert parse_key(N).kind == "elementwise"
    assert parse_key("diffusion_model.out.2.diff_b").param == "diffusion_model.out.2.bias"
    t = parse_key(T)
    assert (t.component, t.param) == ("clip", "clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight")
    for bad in ["diffusion_model.x.weight", "unet.x.delta", "diffusion_model..delta"[:-7] + ".delta"]:
        with pytest.raises(ValueError):
            parse_key(bad)


def test_add_interpolate_scale_follow_eqs_4_and_5():
    a = shift({A: [1.0, 2.0, 3.0], N: [0.5, 0.5]})
    b = shift({A: [10.0, 20.0], B: [7.0]})
    added = combine(a, 1.0, b, 1.0)  # eq. 4: δ₁ + δ₂, shorter one zero-padded
    assert added.tensors[A].tolist() == [11.0, 22.0, 3.0]
    assert added.tensors[B].tolist() == [7.0] and added.tensors[N].tolist() == [0.5, 0.5]
    alpha = 0.25
    mixed = combine(a, alpha, b, 1 - alpha)  # eq. 5
    torch.testing.assert_close(mixed.tensors[A], torch.tensor([0.25 + 7.5, 0.5 + 15.0, 0.75]))
    scaled = combine(a, -2.0)
    assert scaled.tensors[A].tolist() == [-2.0, -4.0, -6.0]
    assert "combine" in added.metadata["svdiff.history"] and "scale -2" in scaled.metadata["svdiff.history"]


def test_combined_shift_applies_inside_one_relu():
    """ReLU(σ + δ₁ + δ₂) differs from two separately clamped updates when clamping bites."""
    weight = make_weight((12, 20), torch.float32, spread=1.0)
    d = decompose(weight)
    delta1 = torch.full((12,), -0.8) * d.sigma.float()  # pulls σ down to 0.2σ
    delta2 = torch.full((12,), 0.5) * d.sigma.float()  # pushes back up
    together = spectral_update(d, weight, delta1 + delta2)
    expected = reference_update(weight, delta1 + delta2)
    torch.testing.assert_close(together.double(), expected, rtol=0, atol=1e-5)
    separate = spectral_update(d, weight, delta1) + spectral_update(d, weight, delta2)
    # Separate updates agree here (no clamp); with a larger pull they must not:
    big = torch.full((12,), -1.5) * d.sigma.float()
    clamped_sum = spectral_update(d, weight, big) + spectral_update(d, weight, delta2)
    one_relu = spectral_update(d, weight, big + delta2)
    assert float((clamped_sum - one_relu).norm()) > 0.1 * float(one_relu.norm())
    torch.testing.assert_close(separate, together, rtol=0, atol=1e-5)


def test_combine_rejects_elementwise_shape_conflicts():
    with pytest.raises(ValueError, match="has shape"):
        combine(shift({N: [1.0, 2.0]}, "a"), 1.0, shift({N: [1.0]}, "b"), 1.0)


def test_block_selection_and_patterns():
    assert unet_block("diffusion_model.input_blocks.7.1.proj_in.weight") == ("input", 7)
    assert unet_block("diffusion_model.middle_block.1.proj_in.weight") == ("middle", 0)
    assert unet_block("diffusion_model.out.2.weight") is None
    s = shift({A: [1.0], B: [2.0], N: [3.0], T: [4.0]})
    kept = select(s, pattern_matcher("attn2"), "attn2")
    assert set(kept.tensors) == {B}
    assert set(select(s, pattern_matcher("*.mlp.fc1.*, re:middle_block"), "x").tensors) == {T, N}
    assert select(s, pattern_matcher(""), "none").tensors == {}
    with pytest.raises(ValueError, match="invalid regular expression"):
        pattern_matcher("re:(")


def test_resolve_accepts_fitting_and_rank_limited_shifts():
    s = shift({A: [0.1] * 4, N: [0.0] * 8, T: [0.2] * 16})
    model = {"diffusion_model.input_blocks.1.1.proj_in.weight": (32, 16, 1, 1), "diffusion_model.middle_block.0.in_layers.0.weight": (8,)}
    clip = {"clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight": (64, 16)}
    resolved = resolve(s, model, clip)
    assert set(resolved.model) == {A, N} and set(resolved.clip) == {T}
    resolved = resolve(s, model, None)
    assert resolved.skipped_clip == [T]


def test_resolve_refuses_with_a_list_of_what_does_not_fit():
    s = shift({A: [0.1] * 40, B: [0.1], N: [0.0] * 3}, architecture="x", **{"svdiff.architecture": "SDXL"})
    model = {"diffusion_model.input_blocks.1.1.proj_in.weight": (32, 16, 1, 1), "diffusion_model.middle_block.0.in_layers.0.weight": (8,)}
    with pytest.raises(ShiftMismatchError) as info:
        resolve(s, model, None, model_architecture="SD15")
    message = str(info.value)
    assert "made for SDXL, the model is SD15" in message
    assert "3 of 3 diffusion-model tensors do not fit" in message
    assert "has 40 singular-value shifts but" in message and "has only 16 singular values" in message
    assert "the model has no parameter 'diffusion_model.output_blocks.3.1.transformer_blocks.0.attn2.to_k.weight'" in message
    assert "has shape [3] but" in message


def test_svdiff_pytorch_text_encoder_keys_follow_sd2_clip_h():
    s = shift({T: [0.1]}, **{"svdiff.source": "svdiff-pytorch"})
    clip = {"clip_h.transformer.text_model.encoder.layers.0.mlp.fc1.weight": (64, 16)}
    resolved = resolve(s, None, clip)
    assert resolved.clip[T].param.startswith("clip_h.")


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (16, 8, 3, 3)])
def test_export_factors_exact_at_full_rank_and_optimal_below(shape):
    weight = make_weight(shape, torch.float32, spread=1.0)
    d = decompose(weight)
    delta = torch.randn(d.rank, generator=torch.Generator().manual_seed(2)) * 0.1
    exact = reference_update(weight, delta)
    full = layer_factors(d, weight, delta, rank=d.rank)
    product = (as_matrix(full.up).double() @ as_matrix(full.down).double()).reshape(shape)
    assert float((product - exact).norm() / exact.norm()) < 1e-5
    assert full.relative_error == 0.0
    assert full.up.shape[:2] == (shape[0], d.rank) and full.down.shape[0] == d.rank
    # Below full rank: the error equals the Eckart–Young optimum from an SVD of ΔW.
    k = 5
    low = layer_factors(d, weight, delta, rank=k)
    product = as_matrix(low.up).double() @ as_matrix(low.down).double()
    s = torch.linalg.svdvals(as_matrix(exact))
    optimum = float(s[k:].norm() / s.norm())
    achieved = float((product - as_matrix(exact)).norm() / exact.norm())
    assert abs(achieved - optimum) < 1e-5 and abs(low.relative_error - optimum) < 1e-5


def test_inspection_statistics_and_plots():
    a = shift({A: [1.0, -1.0], B: [2.0], T: [3.0]}, name="a")
    b = shift({A: [1.0, -1.0], B: [-2.0]}, name="b")
    magnitudes = block_magnitudes(a)
    assert magnitudes["in 1"] == 1.0 and magnitudes["out 3"] == 2.0 and magnitudes["clip_l 0"] == 3.0
    assert list(magnitudes)[:2] == ["in 1", "out 3"]
    cos = cosine_by_layer(a, b)
    assert cos[A] == pytest.approx(1.0) and cos[B] == pytest.approx(-1.0)
    text = describe(a, b)
    assert "000 over 2 shared layers" in text and "cosine similarity with 'b'" in text
    assert magnitude_plot(a).size == (900, 420) and cosine_plot(a, b).size == (900, 420)


def _unet_shift(levels: int, architecture: str) -> SpectralShift:
    keys = [f"diffusion_model.input_blocks.{i}.0.op.delta" for i in range(3 * levels)]
    keys += [f"diffusion_model.output_blocks.{i}.0.skip_connection.delta" for i in range(3 * levels)]
    keys += ["diffusion_model.middle_block.1.proj_in.delta", "diffusion_model.out.2.delta", T]
    return shift({k: [0.1] for k in keys}, **{"svdiff.architecture": architecture})


def test_levels_follow_the_sd_block_layout():
    """L-levels against the LDM layout written out: SD1.5 has 4 levels, SDXL 3."""
    sd15 = _unet_shift(4, "SD15")
    assert unet_levels(sd15) == 4
    assert unet_levels(_unet_shift(3, "SDXL")) == 3
    assert parse_blocks("L0", "input", 4, "x") == {0, 1, 2, 3}
    assert parse_blocks("L1", "input", 4, "x") == {4, 5, 6}
    assert parse_blocks("L0", "output", 4, "x") == {9, 10, 11}  # up path ends at full resolution
    assert parse_blocks("L3", "output", 4, "x") == {0, 1, 2}
    assert parse_blocks("L0", "output", 3, "x") == {6, 7, 8}  # SDXL
    assert parse_blocks("L1-2, 0", "output", 4, "x") == {0, 3, 4, 5, 6, 7, 8}
    assert parse_blocks("all", "input", 4, "x") is None and parse_blocks(" none ", "input", 4, "x") == set()
    for bad, message in [
        ("L4", "level 4 does not exist"),
        ("5-3", "runs backwards"),
        ("two", "not a block index"),
        ("L1-2x", "not a block"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_blocks(bad, "input", 4, "input_blocks")


def test_selector_keeps_the_union_of_criteria():
    s = _unet_shift(4, "SD15")
    keep = layer_selector(s, input_blocks="L1", middle_block=False, output_blocks="none", other_unet=False, text_encoder=True)
    chosen = sorted(k for k in s.tensors if keep(k))
    assert chosen == [f"diffusion_model.input_blocks.{i}.0.op.delta" for i in (4, 5, 6)] + [T]
    only_names = layer_selector(s, "none", False, "none", False, False, "middle_block")
    assert [k for k in s.tensors if only_names(k)] == ["diffusion_model.middle_block.1.proj_in.delta"]
