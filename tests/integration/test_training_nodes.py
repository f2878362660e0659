"""SVDiffTrain and the dataset nodes through ComfyUI's executor, on the tiny checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from comfyui_svdiff.svdiff.fileformat import read_shift
from integration.helpers import ksampler, train_prompt

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def image_folder(comfy_handle):
    folder = comfy_handle.input_dir / "svdiff_train" / "5_sks dog"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (72, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "0.txt").write_text("photo of a sks dog")
    return "svdiff_train"


def test_train_node_saves_resumes_and_reports(comfy_handle, tiny_checkpoint, image_folder, monkeypatch):
    # The loss stream goes to ComfyUI's PromptServer.instance; in this in-process ComfyUI
    # that is the recording server (the real server is covered by test_browser.py).
    from comfyui_svdiff.svdiff.comfy import loss_stream

    monkeypatch.setattr(loss_stream, "prompt_server", lambda: comfy_handle.server)
    priors_before = set((comfy_handle_cache_dir() / "priors").glob("*.safetensors"))
    result = comfy_handle.run_prompt(train_prompt(tiny_checkpoint, image_folder), fresh_executor=True, timeout=900)
    assert result.success, result.error_message
    text = result.output("3")["text"][0]
    assert "for 3 steps" in text and "saved dog.safetensors" in text
    folder = comfy_handle.model_dir("spectral_shifts") / "tests"
    saved = read_shift(folder / "dog.safetensors")
    assert (folder / "dog.svdiffstate").is_file() and (folder / "dog_step000002.safetensors").is_file()
    summary = json.loads(saved.metadata["svdiff.training"])
    assert summary["steps"] == 3 and summary["subset"] == "UNet-CA-KV" and summary["trigger_words"] == ["sks"]
    assert len(summary["losses"]) == 3 and saved.metadata["svdiff.trigger_words"] == "sks"
    assert all(".attn2.to_k." in k or ".attn2.to_v." in k for k in saved.tensors)
    assert saved.base_hashes and len(saved.base_hashes) == len(saved.tensors)
    # The live curve's messages carry every step's loss once, in order, for node "3";
    # the node's output keeps the whole curve for the browser after the run.
    messages = [m.data for m in result.events("svdiff.train")]
    assert {m["node"] for m in messages} == {"3"}
    # First what the node does before training (each phase ends at done == total), then the steps.
    first = next(i for i, m in enumerate(messages) if m["event"] != "phase")
    phases, stream = messages[:first], messages[first:]
    assert {m["text"] for m in phases} >= {"encoding the images", "generating prior images", "decomposing the layers"}, phases
    for text in {m["text"] for m in phases}:
        last = [m for m in phases if m["text"] == text][-1]
        assert last["done"] == last["total"] > 0, last
    assert [m["event"] for m in (stream[0], stream[-1])] == ["start", "done"] and "phase" not in {m["event"] for m in stream}
    streamed = [x for m in stream if m["event"] == "losses" for x in m["losses"]]
    assert streamed == pytest.approx(summary["losses"], abs=1e-6)
    assert result.output("3")["svdiff_loss"] == pytest.approx(summary["losses"], abs=1e-6)

    # Prior images were generated once and cached: a second run finds them.
    priors = set((comfy_handle_cache_dir() / "priors").glob("*.safetensors")) - priors_before
    assert len(priors) == 1

    resumed = comfy_handle.run_prompt(
        train_prompt(
            tiny_checkpoint, image_folder, steps=5, resume_from="tests/dog.safetensors", filename_prefix="tests/dog_more", save_every=0
        ),
        fresh_executor=True,
        timeout=900,
    )
    assert resumed.success, resumed.error_message
    report = resumed.output("3")["text"][0]
    assert "for 2 steps (steps 4–5, resumed)" in report, report  # the steps of this run, not the total
    more = read_shift(folder / "dog_more.safetensors")
    assert json.loads(more.metadata["svdiff.training"])["steps"] == 5

    # Resumed runs equal the uninterrupted one bit for bit, from the final file and from a
    # step checkpoint (both fp16 files with their .svdiffstate).
    straight = comfy_handle.run_prompt(
        train_prompt(tiny_checkpoint, image_folder, steps=5, filename_prefix="tests/dog_straight", save_every=0),
        fresh_executor=True,
        timeout=900,
    )
    assert straight.success, straight.error_message
    from_checkpoint = comfy_handle.run_prompt(
        train_prompt(
            tiny_checkpoint, image_folder, steps=5, resume_from="tests/dog_step000002.safetensors", filename_prefix="tests/dog_from2",
            save_every=0,
        ),
        fresh_executor=True,
        timeout=900,
    )  # fmt: skip
    assert from_checkpoint.success, from_checkpoint.error_message
    reference = read_shift(folder / "dog_straight.safetensors")
    for name in ("dog_more", "dog_from2"):
        other = read_shift(folder / f"{name}.safetensors")
        assert other.tensors.keys() == reference.tensors.keys()
        assert all(torch.equal(other.tensors[k], reference.tensors[k]) for k in reference.tensors), name
        assert json.loads(other.metadata["svdiff.training"])["losses"] == json.loads(reference.metadata["svdiff.training"])["losses"]


def comfy_handle_cache_dir():
    from comfyui_svdiff.svdiff.cache import default_cache

    return default_cache().directory


def train_lora_prompt(comfy_handle, ckpt: str, prefix: str, **inputs) -> dict:
    """Train LoRA (algorithm "SVDiff") → SaveLoRA and LoraModelLoader → KSampler, for this ComfyUI.

    The node changed between releases (v0.11: the ``model`` output went, ``lora`` became
    output 0, ``bypass_mode``, ``checkpoint_depth``, ``offloading`` and
    ``quantized_backward`` were added; LoraModelLoader gained ``bypass``), so required
    inputs not given here take the node's own defaults and outputs are found by type.
    """
    info = comfy_handle.object_info(["TrainLoraNode", "LoraModelLoader"])
    node = info["TrainLoraNode"]
    lora_output = node["output"].index("LORA_MODEL")
    values = {
        "batch_size": 1, "grad_accumulation_steps": 1, "steps": 2, "learning_rate": 1e-2, "rank": 8,
        "optimizer": "AdamW", "loss_function": "MSE", "seed": 0, "training_dtype": "fp32", "lora_dtype": "fp32",
        "algorithm": "SVDiff", "gradient_checkpointing": False, "existing_lora": "[None]", "bucket_mode": False,
    }  # fmt: skip
    for name, spec in node["input"]["required"].items():
        if name not in values and name not in ("model", "latents", "positive"):
            values[name] = spec[1]["default"]
    values.update(inputs)
    loader = {"model": ["1", 0], "lora": ["4", lora_output], "strength_model": 1.0}
    if "bypass" in info["LoraModelLoader"]["input"]["required"]:
        loader["bypass"] = bool(inputs.get("bypass_mode", False))
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "photo of a sks dog"}},
        "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "4": {"class_type": "TrainLoraNode", "inputs": {"model": ["1", 0], "latents": ["3", 0], "positive": ["2", 0], **values}},
        "5": {"class_type": "SaveLoRA", "inputs": {"lora": ["4", lora_output], "prefix": f"loras/{prefix}"}},
        "6": {"class_type": "LoraModelLoader", "inputs": loader},
        "7": ksampler(["6", 0], ["2", 0], ["2", 0], ["3", 0], seed=1, steps=1, cfg=1.0),
        "8": {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": f"t/{prefix}"}},
    }


def _trained(comfy_handle, ckpt: str, prefix: str, **inputs):
    result = comfy_handle.run_prompt(train_lora_prompt(comfy_handle, ckpt, prefix, **inputs), fresh_executor=True, timeout=900)
    assert result.success, result.error_message
    (path,) = sorted((comfy_handle.output_dir / "loras").glob(f"{prefix}*.safetensors"))
    (latent,) = sorted((comfy_handle.output_dir / "t").glob(f"{prefix}*.latent"))
    return read_shift(path), load_file(str(latent))["latent_tensor"]


def test_comfyui_train_lora_node_trains_svdiff(comfy_handle, tiny_checkpoint):
    """The adapter appears as algorithm "SVDiff" in ComfyUI's own Train LoRA node, trains,
    and its LoRA output is a v1 shift (".delta" next to ".diff"/".diff_b") that loads back."""
    info = comfy_handle.object_info(["TrainLoraNode"])["TrainLoraNode"]
    assert "SVDiff" in info["input"]["required"]["algorithm"][1]["options"]
    shift, _ = _trained(comfy_handle, tiny_checkpoint, "svdiff_from_train_lora")
    deltas = [k for k in shift.tensors if k.endswith(".delta")]
    assert len(deltas) > 20 and any(bool(shift.tensors[k].any()) for k in deltas)
    assert all(k.startswith("diffusion_model.") for k in shift.tensors)


def test_comfyui_train_lora_node_bypass_mode_trains_the_same_shift(comfy_handle, tiny_checkpoint):
    """``bypass_mode`` (v0.11+) trains δ through forward hooks: the same δ as weight wrappers."""
    info = comfy_handle.object_info(["TrainLoraNode"])["TrainLoraNode"]
    if "bypass_mode" not in info["input"]["required"]:
        pytest.skip("this ComfyUI's Train LoRA node has no bypass_mode (added in v0.11)")
    patched, patched_latent = _trained(comfy_handle, tiny_checkpoint, "svdiff_train_patch", bypass_mode=False, steps=3)
    hooked, hooked_latent = _trained(comfy_handle, tiny_checkpoint, "svdiff_train_bypass", bypass_mode=True, steps=3)
    deltas = sorted(k for k in patched.tensors if k.endswith(".delta"))
    assert deltas == sorted(k for k in hooked.tensors if k.endswith(".delta"))
    a = torch.cat([patched.tensors[k].flatten() for k in deltas]).double()
    b = torch.cat([hooked.tensors[k].flatten() for k in deltas]).double()
    assert a.norm() > 0 and float((a - b).norm() / a.norm()) < 1e-3
    assert float((patched_latent - hooked_latent).norm() / patched_latent.norm()) < 1e-3


def test_dataset_from_comfyui_dataset_node_lists(comfy_handle, image_folder):
    """ComfyUI's own 'Load Image and Text Dataset from Folder' feeds SVDiffDatasetFromImages."""
    caption_2 = comfy_handle.input_dir / image_folder / "5_sks dog" / "1.txt"
    prompt = {
        "1": {"class_type": "LoadImageTextDataSetFromFolder", "inputs": {"folder": image_folder}},
        "2": {
            "class_type": "SVDiffDatasetFromImages",
            "inputs": {"images": ["1", 0], "captions": ["1", 1], "trigger_word": "", "resolution": 64},
        },
    }
    result = comfy_handle.run_prompt(prompt, fresh_executor=True)
    assert "the caption of image 1 is empty" in result.exception_message  # 1.png has no caption file
    caption_2.write_text("photo of a sks dog running")
    try:
        result = comfy_handle.run_prompt(prompt, fresh_executor=True)
    finally:
        caption_2.unlink()
    assert result.success, result.error_message
    assert result.output("2")["text"][0] == "10 images"  # 2 images × 5 repeats (ComfyUI's loader repeats them)
    single = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 96, "batch_size": 3, "color": 0}},
        "2": {
            "class_type": "SVDiffDatasetFromImages",
            "inputs": {"images": ["1", 0], "captions": "photo of a {trigger} dog", "trigger_word": "sks", "resolution": 64},
        },
    }
    result = comfy_handle.run_prompt(single, fresh_executor=True)
    assert result.success and result.output("2")["text"][0] == "3 images"
