"""File format v1: round trips, refusals of bad files, svdiff-pytorch import."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from comfyui_svdiff.svdiff.diffusers_names import unet_module_to_ldm
from comfyui_svdiff.svdiff.fileformat import ShiftFileError, read_shift, write_shift
from comfyui_svdiff.svdiff.shift import SpectralShift

ROOT = Path(__file__).resolve().parents[1]


def sample_shift(seed=0) -> SpectralShift:
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "diffusion_model.input_blocks.1.1.proj_in.delta": torch.randn(32, generator=g) * 0.05,
        "diffusion_model.input_blocks.1.0.in_layers.2.delta": torch.randn(32, generator=g) * 0.05,
        "diffusion_model.input_blocks.1.0.in_layers.0.diff": torch.randn(32, generator=g) * 1e-4,
        "diffusion_model.out.2.diff_b": torch.randn(4, generator=g) * 1e-3,
        "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.delta": torch.randn(16, generator=g) * 0.01,
    }
    meta = {"svdiff.architecture": "SD15", "svdiff.training": json.dumps({"trigger_words": ["sks"], "steps": 500})}
    hashes = {"diffusion_model.input_blocks.1.1.proj_in.weight": "0123abcd"}
    return SpectralShift(tensors, meta, hashes, name="sample")


def test_round_trip_fp32_is_bit_identical(tmp_path):
    shift = sample_shift()
    path = write_shift(tmp_path / "a.safetensors", shift, precision="fp32")
    loaded = read_shift(path)
    assert set(loaded.tensors) == set(shift.tensors)
    for key, t in shift.tensors.items():
        assert torch.equal(loaded.tensors[key], t), key
    assert loaded.metadata["svdiff.format"] == "1"
    assert loaded.metadata["svdiff.architecture"] == "SD15"
    assert loaded.training_summary() == {"trigger_words": ["sks"], "steps": 500}
    assert loaded.base_hashes == shift.base_hashes
    # load → save → load is bit-identical as well
    again = read_shift(write_shift(tmp_path / "b.safetensors", loaded, precision="fp32"))
    for key, t in loaded.tensors.items():
        assert torch.equal(again.tensors[key], t)


def test_fp16_round_trip_error_is_half_an_ulp(tmp_path):
    shift = sample_shift()
    loaded = read_shift(write_shift(tmp_path / "h.safetensors", shift, precision="fp16"))
    for key, t in shift.tensors.items():
        back = loaded.tensors[key]
        normal = t.abs() >= 2**-14  # float16 normal range: relative error ≤ 2^-11
        rel = ((back - t).abs() / t.abs().clamp_min(1e-30))[normal]
        assert float(rel.max()) <= 2**-11 + 1e-7, key
        tiny_error = (back - t).abs()[~normal]
        assert tiny_error.numel() == 0 or float(tiny_error.max()) <= 2**-25, key  # subnormal spacing / 2


def test_values_that_would_overflow_fp16_stay_fp32(tmp_path):
    shift = SpectralShift({"diffusion_model.x.delta": torch.tensor([1e5, 1.0])})
    loaded = read_shift(write_shift(tmp_path / "big.safetensors", shift, precision="fp16"))
    assert torch.equal(loaded.tensors["diffusion_model.x.delta"], torch.tensor([1e5, 1.0]))


def test_never_overwrites_silently_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "shift.safetensors"
    write_shift(target, sample_shift(0))
    first = target.read_bytes()
    with pytest.raises(FileExistsError, match="already exists"):
        write_shift(target, sample_shift(1))
    assert target.read_bytes() == first
    write_shift(target, sample_shift(1), overwrite=True)
    assert target.read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shift.safetensors"]


# ----------------------------------------------------------------------------------
# Bad files: each refused with a message naming the file and the problem.


def _write_bytes(tmp_path, name, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_empty_file(tmp_path):
    with pytest.raises(ShiftFileError, match=r"'empty.safetensors' is empty"):
        read_shift(_write_bytes(tmp_path, "empty.safetensors", b""))


def test_truncated_file(tmp_path):
    full = write_shift(tmp_path / "full.safetensors", sample_shift()).read_bytes()
    with pytest.raises(ShiftFileError, match=r"'cut.safetensors' is truncated"):
        read_shift(_write_bytes(tmp_path, "cut.safetensors", full[:-50]))
    with pytest.raises(ShiftFileError, match=r"'head.safetensors' is truncated"):
        read_shift(_write_bytes(tmp_path, "head.safetensors", full[:5]))
    with pytest.raises(ShiftFileError, match=r"truncated or not a \.safetensors file"):
        read_shift(_write_bytes(tmp_path, "half.safetensors", full[:40]))


def test_pickled_file_is_refused_without_unpickling(tmp_path):
    path = tmp_path / "shift.pt"
    marker = tmp_path / "unpickled"

    class Boom:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"x": Boom()}, path)
    with pytest.raises(ShiftFileError, match="pickled PyTorch file; SVDiff never unpickles"):
        read_shift(path)
    assert not marker.exists()
    import pickle

    legacy = _write_bytes(tmp_path, "legacy.ckpt", pickle.dumps({"a": 1}, protocol=2))
    with pytest.raises(ShiftFileError, match="pickled"):
        read_shift(legacy)


def test_random_bytes_and_bad_header(tmp_path):
    with pytest.raises(ShiftFileError, match="truncated or not a .safetensors file"):
        read_shift(_write_bytes(tmp_path, "noise.safetensors", os.urandom(64)))
    header = b'{"a.delta": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}'  # missing brace
    data = struct.pack("<Q", len(header)) + header + b"\0" * 8
    with pytest.raises(ShiftFileError, match="not a valid .safetensors file"):
        read_shift(_write_bytes(tmp_path, "badjson.safetensors", data))


def test_no_tensors(tmp_path):
    path = tmp_path / "none.safetensors"
    save_file({}, str(path), metadata={"svdiff.format": "1"})
    with pytest.raises(ShiftFileError, match="contains no spectral shifts"):
        read_shift(path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values(tmp_path, bad):
    path = tmp_path / "nan.safetensors"
    save_file({"diffusion_model.a.delta": torch.tensor([0.1, bad])}, str(path), metadata={"svdiff.format": "1"})
    with pytest.raises(ShiftFileError, match=r"'diffusion_model.a.delta' contains 1 NaN/Inf values"):
        read_shift(path)


def test_wrong_shapes_and_dtypes(tmp_path):
    path = tmp_path / "matrix.safetensors"
    save_file({"diffusion_model.a.delta": torch.zeros(2, 2)}, str(path), metadata={"svdiff.format": "1"})
    with pytest.raises(ShiftFileError, match="must be a non-empty vector"):
        read_shift(path)
    path = tmp_path / "int.safetensors"
    save_file({"diffusion_model.a.delta": torch.zeros(3, dtype=torch.int32)}, str(path), metadata={"svdiff.format": "1"})
    with pytest.raises(ShiftFileError, match="dtype torch.int32"):
        read_shift(path)


def test_unknown_keys_newer_format_and_loras(tmp_path):
    path = tmp_path / "extra.safetensors"
    save_file({"diffusion_model.a.delta": torch.zeros(3), "something.else": torch.zeros(1)}, str(path), metadata={"svdiff.format": "1"})
    with pytest.raises(ShiftFileError, match="unexpected key 'something.else'"):
        read_shift(path)
    path = tmp_path / "future.safetensors"
    save_file({"diffusion_model.a.delta": torch.zeros(3)}, str(path), metadata={"svdiff.format": "7"})
    with pytest.raises(ShiftFileError, match="format 7, newer than this extension reads"):
        read_shift(path)
    path = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_up.weight": torch.zeros(2, 1), "lora_unet_x.lora_down.weight": torch.zeros(1, 2)}, str(path))
    with pytest.raises(ShiftFileError, match="is a LoRA"):
        read_shift(path)


def test_a_format_field_of_non_ascii_digits_is_an_unknown_format(tmp_path):
    """Found by the fuzzer: '¹'.isdigit() is True, but int('¹') raises."""
    path = tmp_path / "odd.safetensors"
    save_file({"diffusion_model.a.delta": torch.zeros(3)}, str(path), metadata={"svdiff.format": "\u00b9"})
    with pytest.raises(ShiftFileError, match="declares an unknown spectral-shift format '\u00b9'"):
        read_shift(path)


def test_huge_metadata_is_read_or_refused_cleanly(tmp_path):
    path = tmp_path / "meta.safetensors"
    save_file({"diffusion_model.a.delta": torch.zeros(3)}, str(path), metadata={"svdiff.format": "1", "svdiff.training": "x" * 5_000_000})
    shift = read_shift(path)  # 5 MB of metadata is legal; the summary parser ignores non-JSON
    assert shift.training_summary() == {}
    huge = tmp_path / "huge.safetensors"
    save_file({"diffusion_model.a.delta": torch.zeros(3)}, str(huge), metadata={"svdiff.description": "x" * (17 * 2**20)})
    with pytest.raises(ShiftFileError, match=r"'huge.safetensors' has a 17.0 MB header .* get a clean copy"):
        read_shift(huge)


# ----------------------------------------------------------------------------------
# svdiff-pytorch import


# Pairs written out from the LDM and diffusers layouts of the SD1.x UNet (ResBlock
# in_layers = [GroupNorm, SiLU, Conv], out_layers = [GroupNorm, SiLU, Dropout, Conv]).
KNOWN_PAIRS = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "down_blocks.0.resnets.0.norm1": "input_blocks.1.0.in_layers.0",
    "down_blocks.0.resnets.1.conv2": "input_blocks.2.0.out_layers.3",
    "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k": "input_blocks.2.1.transformer_blocks.0.attn2.to_k",
    "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
    "down_blocks.1.resnets.0.conv_shortcut": "input_blocks.4.0.skip_connection",
    "down_blocks.2.attentions.0.proj_in": "input_blocks.7.1.proj_in",
    "down_blocks.3.resnets.1.time_emb_proj": "input_blocks.11.0.emb_layers.1",
    "mid_block.resnets.0.conv1": "middle_block.0.in_layers.2",
    "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj": "middle_block.1.transformer_blocks.0.ff.net.0.proj",
    "mid_block.resnets.1.norm2": "middle_block.2.out_layers.0",
    "up_blocks.0.resnets.2.conv1": "output_blocks.2.0.in_layers.2",
    "up_blocks.0.upsamplers.0.conv": "output_blocks.2.1.conv",
    "up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_out.0": "output_blocks.5.1.transformer_blocks.0.attn1.to_out.0",
    "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
    "up_blocks.3.attentions.2.proj_out": "output_blocks.11.1.proj_out",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def test_diffusers_names_map_to_ldm():
    for diffusers, ldm in KNOWN_PAIRS.items():
        assert unet_module_to_ldm(diffusers) == ldm, diffusers
    with pytest.raises(ValueError, match="not a module of a Stable Diffusion 1.x/2.x UNet"):
        unet_module_to_ldm("transformer_blocks.0.attn.to_q")


def write_svdiff_pytorch_checkpoint(folder, with_te=True):
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    unet = {
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.delta": torch.randn(320, generator=g) * 0.01,
        "down_blocks.0.resnets.0.norm1.delta": torch.tensor([0.02]),
        "conv_in.delta": torch.randn(36, generator=g) * 0.01,
    }
    save_file(unet, str(folder / "spectral_shifts.safetensors"))
    te = {
        "text_model.encoder.layers.3.mlp.fc1.delta": torch.randn(768, generator=g) * 0.01,
        "text_model.final_layer_norm.delta": torch.tensor([-0.01]),
    }
    if with_te:
        save_file({**te, "modifier_tokens.<new1>": torch.randn(768, generator=g)}, str(folder / "spectral_shifts_te.safetensors"))
    return unet, te


def test_svdiff_pytorch_import_with_text_encoder(tmp_path):
    unet, te = write_svdiff_pytorch_checkpoint(tmp_path / "dog")
    shift = read_shift(tmp_path / "dog" / "spectral_shifts.safetensors")
    assert shift.name == "dog"
    assert shift.metadata["svdiff.source"] == "svdiff-pytorch"
    expected = {
        "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.delta": unet[
            "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.delta"
        ],
        "diffusion_model.input_blocks.1.0.in_layers.0.delta": unet["down_blocks.0.resnets.0.norm1.delta"],
        "diffusion_model.input_blocks.0.0.delta": unet["conv_in.delta"],
        "text_encoders.clip_l.transformer.text_model.encoder.layers.3.mlp.fc1.delta": te["text_model.encoder.layers.3.mlp.fc1.delta"],
        "text_encoders.clip_l.transformer.text_model.final_layer_norm.delta": te["text_model.final_layer_norm.delta"],
    }
    assert set(shift.tensors) == set(expected)
    for key, t in expected.items():
        assert torch.equal(shift.tensors[key], t)


def test_svdiff_pytorch_import_unet_only(tmp_path):
    write_svdiff_pytorch_checkpoint(tmp_path / "cat", with_te=False)
    shift = read_shift(tmp_path / "cat" / "spectral_shifts.safetensors")
    assert not any(k.startswith("text_encoders.") for k in shift.tensors)


COMFY_MODULES = ("comfy", "comfy_api", "comfy_extras", "folder_paths", "node_helpers", "nodes", "server", "execution", "latent_preview")


def _core_modules() -> list[Path]:
    """Every module of svdiff/ outside svdiff/comfy/, the ComfyUI layer."""
    core = sorted((ROOT / "svdiff").rglob("*.py"))
    return [p for p in core if (ROOT / "svdiff" / "comfy") not in p.parents]


def test_no_core_module_imports_comfyui_even_lazily():
    """Read every core module's imports (also those inside functions): none names ComfyUI
    or the ComfyUI layer. The ComfyUI layer is svdiff/comfy/ alone."""
    import ast

    modules = _core_modules()
    assert len(modules) >= 20, modules  # the glob found the core
    offenders = []
    for path in modules:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")] + [f"{node.module}.{a.name}" for a in node.names if node.level]
            else:
                continue
            for name in names:
                top = name.lstrip(".").split(".")[0]
                relative_to_layer = node.level if isinstance(node, ast.ImportFrom) else 0
                if (not relative_to_layer and top in COMFY_MODULES) or (relative_to_layer and ".comfy" in "." + name.lstrip(".")):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}")
    assert not offenders, offenders


def test_core_imports_without_comfyui():
    """Every core module imports with no ComfyUI anywhere (tests and scripts rely on it)."""
    names = [".".join(("comfyui_svdiff", *p.relative_to(ROOT).with_suffix("").parts)).removesuffix(".__init__") for p in _core_modules()]
    code = (
        "import importlib, importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('comfyui_svdiff', r'{ROOT / '__init__.py'}', submodule_search_locations=[r'{ROOT}'])\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['comfyui_svdiff'] = m; spec.loader.exec_module(m)\n"
        f"for name in {names!r}: importlib.import_module(name)\n"
        f"bad = [k for k in sys.modules if k.split('.')[0] in {COMFY_MODULES!r} or k.startswith('comfyui_svdiff.svdiff.comfy')]\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr


def test_the_demo_node_can_import_tiny_models_inside_the_extension():
    """The Install Demo Files node imports devtools/tiny_models as part of the extension's
    package (comfyui_svdiff.devtools.tiny_models), where ``devtools`` is not importable: its
    modules must import each other relatively (the entry point __main__.py aside)."""
    import ast

    modules = sorted((ROOT / "devtools" / "tiny_models").glob("*.py"))
    assert len(modules) >= 8, modules
    offenders = []
    for path in modules:
        if path.name == "__main__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            offenders += [f"{path.name}:{node.lineno} {n}" for n in names if n.split(".")[0] == "devtools"]
    assert not offenders, offenders


def test_a_header_length_starting_with_0x80_is_not_mistaken_for_a_pickle(tmp_path):
    """A safetensors header of 128 + 256·k bytes makes the file start with 0x80, like a pickle."""
    for pad in range(0, 400):
        path = tmp_path / "x.safetensors"
        save_file({"diffusion_model.a.delta": torch.zeros(3)}, str(path), metadata={"svdiff.format": "1", "pad": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    else:
        pytest.fail("could not produce a header length ≡ 128 (mod 256)")
    assert torch.equal(read_shift(path).tensors["diffusion_model.a.delta"], torch.zeros(3))
