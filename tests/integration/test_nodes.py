"""The SVDiff nodes executed by ComfyUI's own prompt executor (validation included).

Prompts are in API format; results are read the way the UI reads them (history
outputs, error dialog text) and from the files the nodes write.
"""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from comfyui_svdiff.svdiff.fileformat import read_shift, write_shift
from devtools import tiny_models
from integration.helpers import ksampler, random_shift

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def files(comfy_handle, tiny_checkpoint):
    """Shift files made for the tiny checkpoint, in models/spectral_shifts."""
    model, clip, _, problems = tiny_models.load_checkpoint_checked(comfy_handle.model_dir("checkpoints") / tiny_checkpoint)
    assert not problems
    folder = comfy_handle.model_dir("spectral_shifts")
    made = {}
    for name, seed in [("dog", 1), ("cat", 2)]:
        shift = random_shift(model, clip, seed=seed, clamp_some=False, scale=0.02, name=name)
        made[name] = write_shift(folder / f"{name}.safetensors", shift, overwrite=True)
    sdxl_model, _ = tiny_models.build_model("SDXL")
    made["sdxl"] = write_shift(folder / "made_for_sdxl.safetensors", random_shift(sdxl_model, None, name="x"), overwrite=True)
    return made


def txt2img(ckpt, extra: dict, model_ref=("1", 0), clip_ref=("1", 1), seed=7, save_latent="svdiff_test/latent"):
    """Checkpoint → (extra nodes) → encode → KSampler (2 steps, 64 px) → SaveLatent."""
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": list(clip_ref), "text": "photo of a sks dog"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": list(clip_ref), "text": ""}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": ksampler(model_ref, ["2", 0], ["3", 0], ["4", 0], seed=seed, steps=2, cfg=2.0),
        "6": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": save_latent}},
    }
    prompt.update(extra)
    return prompt


def latent_of(result) -> torch.Tensor:
    (path,) = [p for p in result.output_files() if p.suffix == ".latent"]
    return load_file(str(path))["latent_tensor"]


def test_loader_patches_sampling_and_strength_zero_is_identity(comfy_handle, tiny_checkpoint, files):
    base = comfy_handle.run_prompt(txt2img(tiny_checkpoint, {}, save_latent="t/base"), fresh_executor=True).raise_for_error()
    loader = {
        "10": {
            "class_type": "SVDiffLoader",
            "inputs": {"model": ["1", 0], "clip": ["1", 1], "shift_name": "dog.safetensors", "strength_model": 1.0, "strength_clip": 1.0},
        }
    }
    shifted = comfy_handle.run_prompt(txt2img(tiny_checkpoint, loader, ("10", 0), ("10", 1), save_latent="t/dog")).raise_for_error()
    loader["10"]["inputs"].update(strength_model=0.0, strength_clip=0.0)
    zero = comfy_handle.run_prompt(txt2img(tiny_checkpoint, loader, ("10", 0), ("10", 1), save_latent="t/zero")).raise_for_error()
    assert torch.isfinite(latent_of(shifted)).all()
    assert float((latent_of(shifted) - latent_of(base)).abs().mean()) > 1e-4
    assert torch.equal(latent_of(zero), latent_of(base))


def test_chained_with_a_stock_lora_and_a_second_shift(comfy_handle, tiny_checkpoint, files):
    model, clip, _, _ = tiny_models.load_checkpoint_checked(comfy_handle.model_dir("checkpoints") / tiny_checkpoint)
    lora = tiny_models.make_test_lora(model=model, clip=clip, rank=4, seed=3, scale=0.2)
    save_file({k: v.contiguous() for k, v in lora.items()}, str(comfy_handle.model_dir("loras") / "style.safetensors"))
    extra = {
        "10": {
            "class_type": "LoraLoader",
            "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": "style.safetensors", "strength_model": 0.8, "strength_clip": 0.8},
        },
        "11": {
            "class_type": "SVDiffLoader",
            "inputs": {"model": ["10", 0], "clip": ["10", 1], "shift_name": "dog.safetensors", "strength_model": 0.7, "strength_clip": 1.0},
        },
        "12": {"class_type": "SVDiffLoadShift", "inputs": {"shift_name": "cat.safetensors"}},
        "13": {
            "class_type": "SVDiffApply",
            "inputs": {"model": ["11", 0], "clip": ["11", 1], "shift": ["12", 0], "strength_model": 0.5, "strength_clip": 0.5},
        },
    }
    result = comfy_handle.run_prompt(txt2img(tiny_checkpoint, extra, ("13", 0), ("13", 1), save_latent="t/chain")).raise_for_error()
    assert torch.isfinite(latent_of(result)).all()
    assert "spectral layers" in result.output("11")["text"][0]


def test_combine_select_save_inspect(comfy_handle, files):
    prompt = {
        "1": {"class_type": "SVDiffLoadShift", "inputs": {"shift_name": "dog.safetensors"}},
        "2": {"class_type": "SVDiffLoadShift", "inputs": {"shift_name": "cat.safetensors"}},
        "3": {
            "class_type": "SVDiffSelectLayers",
            "inputs": {
                "shift": ["1", 0],
                "mode": "keep",
                "input_blocks": "all",
                "middle_block": False,
                "output_blocks": "none",
                "other_unet": False,
                "text_encoder": False,
                "name_patterns": "",
            },
        },
        "4": {
            "class_type": "SVDiffSelectLayers",
            "inputs": {
                "shift": ["2", 0],
                "mode": "drop",
                "input_blocks": "all",
                "middle_block": False,
                "output_blocks": "none",
                "other_unet": False,
                "text_encoder": False,
                "name_patterns": "",
            },
        },
        "5": {"class_type": "SVDiffCombine", "inputs": {"shift_a": ["3", 0], "weight_a": 1.0, "shift_b": ["4", 0], "weight_b": 1.0}},
        "6": {
            "class_type": "SVDiffSave",
            "inputs": {
                "shift": ["5", 0],
                "filename_prefix": "mixed/dog_in_cat_out",
                "precision": "fp32",
                "overwrite": False,
                "trigger_words": "sks",
                "description": "style mix",
            },
        },
        "7": {"class_type": "SVDiffInspect", "inputs": {"shift": ["5", 0], "shift_b": ["2", 0]}},
    }
    result = comfy_handle.run_prompt(prompt, fresh_executor=True).raise_for_error()
    saved = comfy_handle.model_dir("spectral_shifts") / "mixed" / "dog_in_cat_out.safetensors"
    assert saved.exists()
    mixed, dog, cat = read_shift(saved), read_shift(files["dog"]), read_shift(files["cat"])
    assert mixed.metadata["svdiff.trigger_words"] == "sks"
    for key, tensor in mixed.tensors.items():
        source = dog if ".input_blocks." in key else cat
        assert (
            ".input_blocks." in key
            or key.startswith("text_encoders.")
            or ".output_blocks." in key
            or ".middle_block." in key
            or ".out." in key
            or "time_embed" in key
        )
        assert torch.equal(tensor, source.tensors[key]), key
    assert any(".input_blocks." in k for k in mixed.tensors) and any(".output_blocks." in k for k in mixed.tensors)
    inspect = result.output("7")
    assert "cosine similarity with" in inspect["text"][0]
    assert len(inspect["images"]) == 2
    # Same prefix again: a numbered file, never an overwrite.
    again = comfy_handle.run_prompt(prompt, fresh_executor=True).raise_for_error()
    assert (comfy_handle.model_dir("spectral_shifts") / "mixed" / "dog_in_cat_out_00001.safetensors").exists()
    assert again.output("6")["text"][0].startswith("saved mixed/dog_in_cat_out_00001.safetensors")


def test_export_lora_node_writes_a_lora_the_stock_loader_applies(comfy_handle, tiny_checkpoint, files):
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny_checkpoint}},
        "2": {"class_type": "SVDiffLoadShift", "inputs": {"shift_name": "dog.safetensors"}},
        "3": {
            "class_type": "SVDiffExportLoRA",
            "inputs": {
                "model": ["1", 0],
                "clip": ["1", 1],
                "shift": ["2", 0],
                "rank": 8,
                "strength_model": 1.0,
                "strength_clip": 1.0,
                "filename_prefix": "exported/dog_r8",
                "precision": "fp16",
            },
        },
    }
    result = comfy_handle.run_prompt(prompt, fresh_executor=True).raise_for_error()
    report = result.output("3")["text"][0]
    assert "exported/dog_r8.safetensors" in report and "relative Frobenius error" in report
    path = comfy_handle.model_dir("loras") / "exported" / "dog_r8.safetensors"
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        assert f.metadata()["svdiff.export_rank"] == "8"
    assert any(k.endswith(".lora_up.weight") for k in keys)
    use = {
        "10": {
            "class_type": "LoraLoader",
            "inputs": {
                "model": ["1", 0],
                "clip": ["1", 1],
                "lora_name": "exported/dog_r8.safetensors",
                "strength_model": 1.0,
                "strength_clip": 1.0,
            },
        }
    }
    comfy_handle.run_prompt(txt2img(tiny_checkpoint, use, ("10", 0), ("10", 1), save_latent="t/exported")).raise_for_error()


def test_stock_load_lora_node_reads_a_shift_file(comfy_handle, tiny_checkpoint, files):
    target = comfy_handle.model_dir("loras") / "dog_as_lora.safetensors"
    target.write_bytes(files["dog"].read_bytes())
    use = {
        "10": {
            "class_type": "LoraLoader",
            "inputs": {
                "model": ["1", 0],
                "clip": ["1", 1],
                "lora_name": "dog_as_lora.safetensors",
                "strength_model": 1.0,
                "strength_clip": 1.0,
            },
        }
    }
    stock = comfy_handle.run_prompt(
        txt2img(tiny_checkpoint, use, ("10", 0), ("10", 1), save_latent="t/stock"), fresh_executor=True
    ).raise_for_error()
    ours = {
        "10": {
            "class_type": "SVDiffLoader",
            "inputs": {"model": ["1", 0], "clip": ["1", 1], "shift_name": "dog.safetensors", "strength_model": 1.0, "strength_clip": 1.0},
        }
    }
    mine = comfy_handle.run_prompt(txt2img(tiny_checkpoint, ours, ("10", 0), ("10", 1), save_latent="t/ours")).raise_for_error()
    torch.testing.assert_close(latent_of(stock), latent_of(mine), rtol=1e-3, atol=1e-3)
