"""The loader panel's facts (svdiff/file_info.py), against safetensors' own reader and
the closed-form spectrum length min(out, in·k·k)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from comfyui_svdiff.svdiff import file_info
from comfyui_svdiff.svdiff.fileformat import ShiftFileError, write_shift
from comfyui_svdiff.svdiff.shift import SpectralShift

CHECKPOINT = {
    "model.diffusion_model.input_blocks.1.1.proj_in.weight": (8, 4),
    "model.diffusion_model.input_blocks.0.0.weight": (3, 3, 3, 3),
    "model.diffusion_model.out.0.weight": (5,),
    "cond_stage_model.transformer.text_model.final_layer_norm.weight": (6,),
}


def _checkpoint(path, prefix_free=False):
    tensors = {k: torch.zeros(shape) for k, shape in CHECKPOINT.items()}
    if prefix_free:
        tensors = {k[len("model.diffusion_model.") :]: v for k, v in tensors.items() if k.startswith("model.diffusion_model.")}
    save_file(tensors, str(path), metadata={"note": "x"})
    return path


def _shift(lengths=(4, 3), norm=5, clip=False) -> SpectralShift:
    tensors = {
        "diffusion_model.input_blocks.1.1.proj_in.delta": torch.ones(lengths[0]),
        "diffusion_model.input_blocks.0.0.delta": torch.ones(lengths[1]),
        "diffusion_model.out.0.diff": torch.ones(norm),
    }
    if clip:
        tensors = {"text_encoders.clip_l.transformer.text_model.final_layer_norm.diff": torch.ones(6)}
    return SpectralShift(tensors, {"svdiff.architecture": "SD15"}, name="s")


def test_header_shapes_match_safetensors_and_need_no_data(tmp_path):
    path = _checkpoint(tmp_path / "ckpt.safetensors")
    metadata, shapes = file_info.safetensors_shapes(path)
    with safe_open(str(path), "pt") as f:
        assert shapes == {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        assert metadata == f.metadata()
    # Cut the tensor data off: the header alone still answers.
    data = path.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    (tmp_path / "cut.safetensors").write_bytes(data[:header_end])
    assert file_info.safetensors_shapes(tmp_path / "cut.safetensors")[1] == shapes
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(ShiftFileError, match="junk.safetensors"):
        file_info.safetensors_shapes(tmp_path / "junk.safetensors")


@pytest.mark.parametrize("prefix_free", [False, True], ids=["checkpoint", "bare-unet"])
def test_fit_uses_the_spectrum_length_min_out_in(tmp_path, prefix_free):
    path = _checkpoint(tmp_path / "ckpt.safetensors", prefix_free)
    # min(8, 4) = 4 and min(3, 3·3·3) = 3 singular values; shorter (rank-limited) fits too.
    assert file_info.fit(_shift((4, 3)), path, "SD15")["status"] == "fits"
    assert file_info.fit(_shift((2, 1)), path, "SD15")["status"] == "fits"
    too_long = file_info.fit(_shift((5, 3)), path, "SD15")
    assert too_long["status"] == "does_not_fit" and "has only 4 singular values" in too_long["message"]
    wrong_norm = file_info.fit(_shift((4, 3), norm=7), path, "SD15")
    assert wrong_norm["status"] == "does_not_fit" and "shape [7]" in wrong_norm["message"]
    other_arch = file_info.fit(_shift((5, 3)), path, "SDXL")
    assert "the shift was made for SD15, the model is SDXL" in other_arch["message"]
    assert file_info.fit(_shift(clip=True), path, "SD15")["status"] == "no_model_layers"


def test_summary_reports_what_the_file_holds(tmp_path):
    losses = [float(i) for i in range(1000)]
    shift = _shift()
    shift.metadata["svdiff.training"] = json.dumps({"trigger_words": ["sks"], "steps": 1000, "rank": 0, "losses": losses})
    shift.metadata["svdiff.description"] = "a dog"
    path = write_shift(tmp_path / "dog.safetensors", shift)
    _, info = file_info.describe(path)
    assert info["file"] == "dog.safetensors" and info["bytes"] == path.stat().st_size
    assert (info["architecture"], info["trigger_words"], info["steps"], info["description"]) == ("SD15", ["sks"], 1000, "a dog")
    assert (info["model_layers"], info["text_encoder_layers"], info["spectral"], info["elementwise"]) == (3, 0, 2, 1)
    assert info["values"] == 4 + 3 + 5
    curve = info["losses"]
    assert len(curve) == file_info.MAX_LOSS_POINTS and curve[0] == 0.0 and curve[-1] == 999.0 and curve == sorted(curve)
    json.dumps(info)  # the route sends it as JSON


@pytest.mark.parametrize(
    "training, expected",
    [
        # Found by the fuzzer: each broke the panel (an exception, or NaN in its JSON).
        ("[" * 50_000 + "]" * 50_000, {"steps": None, "losses": [], "trigger_words": []}),
        (json.dumps({"losses": None, "steps": [], "trigger_words": 5}), {"steps": None, "losses": [], "trigger_words": []}),
        ('{"losses": [0.5, NaN, Infinity, true, "1"], "steps": 2.5, "rank": 4.0}', {"steps": None, "rank": 4, "losses": [0.5]}),
        (json.dumps({"trigger_words": "sks, zwx", "steps": 12}), {"steps": 12, "trigger_words": ["sks", "zwx"]}),
    ],
)
def test_summary_of_hostile_training_metadata_is_strict_json(tmp_path, training, expected):
    path = tmp_path / "odd.safetensors"
    save_file(
        {"diffusion_model.a.delta": torch.zeros(3)},
        str(path),
        metadata={"svdiff.format": "1", "svdiff.training": training, "svdiff.history": "[" * 50_000},
    )
    _, info = file_info.describe(path)
    json.dumps(info, allow_nan=False)
    assert {k: info[k] for k in expected} == expected and info["history"] == []


def test_svdiff_pytorch_file_with_a_foreign_module_is_refused_as_a_shift_file(tmp_path):
    path = tmp_path / "spectral_shifts.safetensors"
    save_file({"eown_blocks.0.attentions.0.proj_in.delta": torch.zeros(4)}, str(path))
    with pytest.raises(ShiftFileError, match="is not a module of a Stable Diffusion 1.x/2.x UNet"):
        file_info.describe(path)
