"""Interoperability: ComfyUI's stock LoRA loader, LoRA export, svdiff-pytorch files."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from comfyui_svdiff.svdiff import diffusers_names
from comfyui_svdiff.svdiff.comfy.export import export_lora
from comfyui_svdiff.svdiff.comfy.patching import apply_shift
from comfyui_svdiff.svdiff.fileformat import read_shift, write_shift
from comfyui_svdiff.svdiff.shift import SpectralShift
from integration.helpers import assert_weights_close, base_state, expected_state, patched_state_dict, random_shift

pytestmark = pytest.mark.integration


def test_stock_lora_loader_reads_a_shift_file_like_svdiff_apply(build, tmp_path):
    """A v1 file handed to ComfyUI's own LoRA loader (the "Load LoRA" node's code path)."""
    import comfy.sd
    import comfy.utils

    model, clip = build("SD15")
    shift = random_shift(model, clip, seed=21)
    path = write_shift(tmp_path / "shift.safetensors", shift, precision="fp32")
    lora_dict = comfy.utils.load_torch_file(str(path), safe_load=True)
    stock_model, stock_clip = comfy.sd.load_lora_for_models(model, clip, lora_dict, 0.8, 1.2)
    ours_model, ours_clip, _ = apply_shift(model, clip, read_shift(path), 0.8, 1.2)
    base_m, base_c = base_state(model), base_state(clip.patcher)
    expected_m = expected_state(base_m, "diffusion_model.", [(shift, 0.8)])
    expected_c = expected_state(base_c, "text_encoders.", [(shift, 1.2)])
    for m, c, label in [(stock_model, stock_clip, "stock "), (ours_model, ours_clip, "svdiff ")]:
        assert_weights_close(patched_state_dict(m), expected_m, base_m, what=label)
        assert_weights_close(patched_state_dict(c.patcher), expected_c, base_c, what=label)


def test_export_at_full_rank_reproduces_the_shift_through_the_stock_loader(build):
    import comfy.sd

    model, clip = build("SD15")
    shift = random_shift(model, clip, seed=22)
    tensors, report = export_lora(model, clip, shift, rank=4096, strength_model=0.9, strength_clip=1.1)
    assert report.layers > 40 and report.exact_layers == report.layers and report.total_error == 0.0
    assert any(k.endswith(".lora_up.weight") for k in tensors) and any(k.endswith(".diff_b") for k in tensors)
    lora_model, lora_clip = comfy.sd.load_lora_for_models(model, clip, tensors, 1.0, 1.0)
    base_m, base_c = base_state(model), base_state(clip.patcher)
    assert_weights_close(patched_state_dict(lora_model), expected_state(base_m, "diffusion_model.", [(shift, 0.9)]), base_m, rel=2e-4)
    assert_weights_close(patched_state_dict(lora_clip.patcher), expected_state(base_c, "text_encoders.", [(shift, 1.1)]), base_c, rel=2e-4)


def test_low_rank_export_reports_the_eckart_young_error(build):
    model, _ = build("SD15")
    shift = random_shift(model, None, seed=23, clamp_some=False)
    rank = 4
    tensors, report = export_lora(model, None, shift, rank=rank)
    base = base_state(model)
    worst_gap = 0.0
    for stem, error in report.per_layer.items():
        param = stem + ".weight"
        w = base[param].double()
        matrix = w.reshape(w.shape[0], -1)
        exact = (expected_state(base, stem + ".", [(shift, 1.0)])[param] - w).reshape(matrix.shape)
        s = torch.linalg.svdvals(exact)
        optimum = float(s[rank:].norm() / s.norm())
        up = tensors[stem + ".lora_up.weight"].double().reshape(matrix.shape[0], -1)
        down = tensors[stem + ".lora_down.weight"].double().reshape(-1, matrix.shape[1])
        achieved = float((up @ down - exact).norm() / exact.norm())
        worst_gap = max(worst_gap, abs(achieved - optimum), abs(error - optimum))
    assert report.layers == len(report.per_layer) > 40
    assert worst_gap < 1e-4
    assert 0 < report.total_error < 1


def test_diffusers_mapping_agrees_with_comfyui_for_sd15(comfy):
    """Our hand-written SD1.x table against comfy.utils.unet_to_diffusers (full SD1.5 layout)."""
    import comfy.utils

    sd15 = {
        "num_res_blocks": [2, 2, 2, 2],
        "channel_mult": [1, 2, 4, 4],
        "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
        "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        "transformer_depth_middle": 1,
    }
    mapping = comfy.utils.unet_to_diffusers(sd15)
    checked = 0
    for diffusers_key, ldm_key in mapping.items():
        if not diffusers_key.endswith(".weight"):
            continue
        module = diffusers_key[: -len(".weight")]
        if module.startswith(("class_embedding.", "add_embedding.")):
            continue  # SDXL's label embedding; SD1.x has none
        assert diffusers_names.unet_module_to_ldm(module) + ".weight" == ldm_key, module
        checked += 1
    assert checked > 250


def test_svdiff_pytorch_file_applies_correctly(build, tmp_path):
    """A checkpoint written the way svdiff-pytorch writes it, for a model with the SD1.x
    block layout: diffusers module names (taken from ComfyUI's own mapping), one
    scalar δ per norm layer, text-encoder shifts in a sibling file."""
    import comfy.utils

    widths = {"channel_mult": [1, 2, 4, 4], "num_res_blocks": 2, "transformer_depth": [1, 1, 1, 0]}
    model, clip = build("SD15", widths=widths)
    mapping = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    ldm_to_diffusers = {v: k for k, v in mapping.items() if k.endswith(".weight")}
    sd = model.model.diffusion_model.state_dict()
    g = torch.Generator().manual_seed(31)
    unet_file, te_file = {}, {}
    norm_scalars = {}
    for ldm, w in sd.items():
        if not ldm.endswith(".weight") or ldm not in ldm_to_diffusers:
            continue
        module = ldm_to_diffusers[ldm][: -len(".weight")]
        if w.ndim >= 2:
            unet_file[module + ".delta"] = 0.05 * torch.randn(min(w.shape[0], w[0].numel()), generator=g)
        else:
            unet_file[module + ".delta"] = norm_scalars[ldm] = 0.1 * torch.randn(1, generator=g)
    clip_sd = clip.cond_stage_model.state_dict()
    for key, w in clip_sd.items():
        if key.startswith("clip_l.transformer.text_model.") and key.endswith(".weight") and w.ndim == 2:
            te_file[key[len("clip_l.transformer.") : -len(".weight")] + ".delta"] = 0.05 * torch.randn(min(w.shape), generator=g)
    folder = tmp_path / "sks_dog"
    folder.mkdir()
    save_file(unet_file, str(folder / "spectral_shifts.safetensors"))
    save_file(te_file, str(folder / "spectral_shifts_te.safetensors"))

    shift = read_shift(folder / "spectral_shifts.safetensors")
    assert len(shift.tensors) == len(unet_file) + len(te_file)
    m, c, report = apply_shift(model, clip, shift, 1.0, 1.0)
    assert report.model_layers == len(unet_file) and report.clip_layers == len(te_file)

    # Reference: svdiff-pytorch's own semantics, W' = U diag(ReLU(σ + δ)) Vᵀ per module;
    # for a norm layer (a 1 × C matrix) that is w · ReLU(‖w‖ + δ) / ‖w‖.
    base_m = base_state(model)
    reference = SpectralShift(
        {
            "diffusion_model." + ldm[: -len(".weight")] + ".delta": unet_file[ldm_to_diffusers[ldm][: -len(".weight")] + ".delta"]
            for ldm in sd
            if ldm in ldm_to_diffusers and ldm.endswith(".weight")
        }
    )
    expected = expected_state(base_m, "diffusion_model.", [(reference, 1.0)])
    for ldm, scalar in norm_scalars.items():
        w = base_m["diffusion_model." + ldm].double()
        norm = w.norm()
        torch.testing.assert_close(expected["diffusion_model." + ldm], w * torch.relu(norm + scalar.double()) / norm)
    assert_weights_close(patched_state_dict(m), expected, base_m)
    base_c = base_state(clip.patcher)
    te_reference = SpectralShift({"text_encoders.clip_l.transformer." + k: v for k, v in te_file.items()})
    assert_weights_close(patched_state_dict(c.patcher), expected_state(base_c, "text_encoders.", [(te_reference, 1.0)]), base_c)


def test_exported_lora_file_round_trips_through_safetensors(build, tmp_path):
    model, _ = build("SD15")
    shift = random_shift(model, None, seed=24)
    tensors, _ = export_lora(model, None, shift, rank=8)
    path = tmp_path / "lora.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    loaded = load_file(str(path))
    assert set(loaded) == set(tensors)
    alphas = [float(v) for k, v in loaded.items() if k.endswith(".alpha")]
    assert alphas and all(1 <= a <= 8 for a in alphas)
