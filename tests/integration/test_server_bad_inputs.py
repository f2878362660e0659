"""The bad-input matrix, through a real ComfyUI server (POST /prompt, /history).

Every case is a prompt a user could queue from the UI. For each one:

* the refusal reaches the UI (HTTP 400 from validation, or the execution error of
  /history) and names the input and the fix: every expected phrase is in it;
* the node that refuses is the one that owns the input;
* no file under models/, input/ or output/ appears, disappears or changes (no partial
  file, no touched input) — accepted cases may write only their declared outputs;
* the server is alive and serves the next prompt: a canary prompt on the same cached
  checkpoint (CheckpointLoaderSimple's MODEL and CLIP objects are shared between
  prompts) gives a latent bit-identical to the one before the matrix, so no case left
  a patch, a wrapper or a changed weight on the shared model or CLIP.

Accepted-but-unusual inputs (grayscale, RGBA and 16-bit images, an existing file
name) are in the matrix too, checked against closed-form pixel values.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from devtools.server import error_of
from integration.helpers import canary_latent, cd_train_prompt, edit_prompt, ksampler, train_prompt

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SHIFTS = "spectral_shifts"


# ----------------------------------------------------------------------------------
# Files the cases use (written once into the server's folders)


def _header_file(path: Path, header: bytes, data: bytes = b"") -> None:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


def _shift_tensors(good: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(good), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())


def _make_files(server, model, clip, sdxl_model, sdxl_clip) -> None:
    from comfyui_svdiff.svdiff.comfy.demo import write_demo_shift

    folder = server.models(SHIFTS)
    good = folder / "bad_good.safetensors"
    write_demo_shift(good, model, clip, seed=11)
    write_demo_shift(folder / "bad_sdxl.safetensors", sdxl_model, sdxl_clip, seed=12)
    tensors, meta = _shift_tensors(good)
    some_delta = next(k for k in sorted(tensors) if k.endswith(".delta") and k.startswith("diffusion_model."))

    def variant(name: str, change: Callable[[dict], None], metadata: dict | None = None) -> None:
        t = {k: v.clone() for k, v in tensors.items()}
        change(t)
        save_file(t, str(folder / f"bad_{name}.safetensors"), metadata=metadata if metadata is not None else meta)

    raw = good.read_bytes()
    (folder / "bad_truncated.safetensors").write_bytes(raw[: len(raw) - 100])
    (folder / "bad_empty.safetensors").write_bytes(b"")
    torch.save({"x": torch.zeros(3)}, folder / "bad_pickled.safetensors")  # zip container
    torch.save({"x": torch.zeros(3)}, folder / "bad_legacy_pickle.safetensors", _use_new_zipfile_serialization=False)
    variant("delta_length", lambda t: t.__setitem__(some_delta, torch.zeros(t[some_delta].numel() + 7)))
    variant("missing_layer", lambda t: t.__setitem__("diffusion_model.input_blocks.99.0.proj.delta", torch.zeros(4)))
    variant("nan", lambda t: t[some_delta].__setitem__(0, float("nan")))
    variant("inf", lambda t: t[some_delta].__setitem__(1, float("inf")))
    variant("int_dtype", lambda t: t.__setitem__(some_delta, torch.zeros(t[some_delta].numel(), dtype=torch.int32)))
    variant("matrix_delta", lambda t: t.__setitem__(some_delta, torch.zeros(2, t[some_delta].numel())))
    variant("future_format", lambda t: None, {**meta, "svdiff.format": "7"})
    variant("huge_metadata", lambda t: None, {**meta, "svdiff.description": "x" * (20 * 1024 * 1024)})
    save_file({"lora_unet_input_blocks_1_1_proj_in.lora_up.weight": torch.zeros(4, 2)}, str(folder / "bad_lora.safetensors"))
    # Header claims 2^40 bytes; header with invalid UTF-8 in a metadata value; metadata that is not str → str.
    _header_file(folder / "bad_header_claims.safetensors", b"{}" + b" " * 6, b"")
    data = (folder / "bad_header_claims.safetensors").read_bytes()
    (folder / "bad_header_claims.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + data[8:])
    _header_file(folder / "bad_non_utf8.safetensors", b'{"__metadata__": {"svdiff.description": "\xff\xfe caf\xe9"}}')
    _header_file(folder / "bad_metadata_not_text.safetensors", b'{"__metadata__": {"svdiff.format": 1}}')

    # Training data in input/: a good folder, and degenerate ones.
    def image_folder(name: str, images: dict[str, Image.Image | bytes], caption: str | None = "photo of a sks dog") -> None:
        path = server.input_dir / name
        path.mkdir(parents=True, exist_ok=True)
        for file, image in images.items():
            if isinstance(image, bytes):
                (path / file).write_bytes(image)
            else:
                image.save(path / file)
            if caption is not None:
                (path / file).with_suffix(".txt").write_text(caption)

    rng = np.random.default_rng(0)
    image_folder("bad_ok", {"a.png": Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))})
    (server.input_dir / "bad_empty_folder").mkdir(parents=True, exist_ok=True)
    image_folder("bad_tiny", {"tiny.png": Image.new("RGB", (1, 1), (10, 20, 30))})
    image_folder("bad_corrupt", {"broken.png": b"\x89PNG\r\n\x1a\n this is not a png"})
    image_folder("bad_gray", {"gray.png": Image.new("L", (96, 80), 100)})
    image_folder("bad_rgba", {"rgba.png": Image.new("RGBA", (80, 80), (200, 50, 50, 128))})
    sixteen = Image.fromarray(np.full((80, 72), 40000, dtype=np.uint16))  # mode I;16
    assert sixteen.mode == "I;16"
    image_folder("bad_16bit", {"deep.png": sixteen})
    image_folder("bad_cd", {"a.png": Image.new("RGB", (64, 64), (90, 60, 30))}, caption="photo of <new1> dog")
    save_file(
        {"latent_tensor": torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))}, str(server.input_dir / "bad_sd3.latent")
    )
    image_folder("bad_zwx", {"z.png": Image.new("RGB", (64, 64), (30, 90, 160))}, caption="photo of zwx sculpture")
    image_folder("bad_no_trigger", {"a.png": Image.new("RGB", (64, 64), (90, 90, 90))}, caption="photo of a dog")


# ----------------------------------------------------------------------------------
# Prompts


def loader_prompt(ckpt: str, shift: str, strength: float = 1.0) -> dict:
    """Checkpoint → SVDiffLoader → encode → KSampler → SaveLatent."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {
            "class_type": "SVDiffLoader",
            "inputs": {"model": ["1", 0], "clip": ["1", 1], "shift_name": shift, "strength_model": strength, "strength_clip": 1.0},
        },
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": "photo of a sks dog"}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": ksampler(["2", 0], ["3", 0], ["3", 0], ["4", 0], seed=1, steps=1, cfg=1.0),
        "6": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": "bad/loader"}},
    }


def save_prompt(prefix: str) -> dict:
    return {
        "1": {"class_type": "SVDiffLoadShift", "inputs": {"shift_name": "bad_good.safetensors"}},
        "2": {
            "class_type": "SVDiffSave",
            "inputs": {"shift": ["1", 0], "filename_prefix": prefix, "precision": "fp16", "overwrite": False},
        },
    }


def train(ckpt: str, folder: str = "bad_ok", dataset: dict | None = None, **overrides) -> dict:
    defaults = {
        "steps": 1,
        "prior_weight": 0.0,
        "num_class_images": 0,
        "save_every": 0,
        "preview_every": 0,
        "filename_prefix": "bad/trained",
    }
    prompt = train_prompt(ckpt, folder, **{**defaults, **overrides})
    if dataset:
        prompt["2"]["inputs"].update(dataset)
    return prompt


def dataset_only(folder: str, case: str) -> dict:
    inputs = {"folder": folder, "resolution": 64, "default_caption": "sks dog", "trigger_word": "sks", "caption_extension": ".txt"}
    return {
        "2": {"class_type": "SVDiffDatasetFromFolder", "inputs": inputs},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 1], "filename_prefix": f"bad/{case}"}},
    }


def images_dataset(ckpt: str, captions: str) -> dict:
    prompt = train(ckpt)
    prompt["2"] = {
        "class_type": "SVDiffDatasetFromImages",
        "inputs": {"images": ["20", 0], "captions": captions, "trigger_word": "sks", "resolution": 64},
    }
    prompt["20"] = {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 3, "color": 0x808080}}
    return prompt


def cutmix(second: str | None = "bad_zwx", trigger_2: str = "zwx", resolution_2: int = 64, phrases: str = "sks dog\nzwx sculpture") -> dict:
    """Two folder datasets → Cut-Mix-Unmix (an output node: it shows its collages)."""
    from comfyui_svdiff.svdiff.training.cutmix import DEFAULT_TEMPLATES

    def folder(name, trigger, resolution):
        inputs = {"folder": name, "resolution": resolution, "default_caption": "", "trigger_word": trigger, "caption_extension": ".txt"}
        return {"class_type": "SVDiffDatasetFromFolder", "inputs": inputs}

    inputs = {
        "subject_1": ["2", 0], "phrases": phrases, "probability": 0.6, "layout": "left_right", "split_min": 0.5, "split_max": 0.5,
        "prompt_templates": DEFAULT_TEMPLATES, "collages": 2, "random_flip": True, "seed": 0,
    }  # fmt: skip
    prompt = {"2": folder("bad_ok", "sks", 64), "4": {"class_type": "SVDiffCutMixUnmix", "inputs": inputs}}
    if second is not None:
        prompt["3"] = folder(second, trigger_2, resolution_2)
        inputs["subject_2"] = ["3", 0]
    return prompt


def edit(ckpt: str, **kwargs) -> dict:
    prompt = edit_prompt(ckpt, steps=2, **kwargs)
    prompt["13"] = {"class_type": "SaveLatent", "inputs": {"samples": ["11", 0], "filename_prefix": "bad/edit"}}
    return prompt


def edit_with(ckpt: str, node: str, **inputs) -> dict:
    prompt = edit(ckpt)
    prompt[node]["inputs"].update(inputs)
    return prompt


def edit_latent(ckpt: str, latent_node: dict, into: str = "latent") -> dict:
    """Replace the encoded image by another latent (at the inversion, or at the sampler)."""
    prompt = edit(ckpt)
    prompt["20"] = latent_node
    if into == "latent":
        prompt["5"]["inputs"]["latent"] = ["20", 0]
    else:
        prompt["11"]["inputs"]["latent_image"] = ["20", 0]
    return prompt


def cd(ckpt: str, trigger: str = "<new1>", **overrides) -> dict:
    base = {"steps": 1, "prior_weight": 0.0, "augment_variants": 1, "filename_prefix": "bad/cd"}
    prompt = cd_train_prompt(ckpt, ("bad_cd", "bad_ok"), **{**base, **overrides})
    prompt["2"]["inputs"]["trigger_word"] = trigger
    return prompt


def merge_no_captions(ckpt: str) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "SVDiffLoadShift", "inputs": {"shift_name": "bad_good.safetensors"}},
        "3": {
            "class_type": "SVDiffConcept",
            "inputs": {"deltas": ["2", 0], "token": "sks", "class_word": "dog", "prompts": "{token} {class}"},
        },
        "4": {
            "class_type": "SVDiffMergeConcepts",
            "inputs": {
                "model": ["1", 0],
                "clip": ["1", 1],
                "concepts": ["3", 0],
                "builtin_captions": False,
                "extra_captions": " \n ",
                "filename_prefix": "bad/merged",
            },
        },  # fmt: skip
    }


# ----------------------------------------------------------------------------------
# The matrix


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[str], dict]  # checkpoint name → API prompt
    expect: tuple[str, ...] = ()  # phrases the refusal must contain (input name, what is wrong, the fix)
    node: str | None = None  # class_type that must report the refusal
    validation: bool = False  # refused by ComfyUI's validation (HTTP 400) rather than at execution
    accepted: Callable | None = None  # accepted cases: check(server, entry, new_files)
    writes: tuple[str, ...] = field(default_factory=tuple)  # globs an accepted case may create


def uniform_image(expected_rgb: tuple[int, int, int]):
    """The dataset's image output, saved by SaveImage, is one flat colour (closed form)."""

    def check(server, entry, new_files):
        (png,) = [p for p in new_files if p.suffix == ".png"]
        with Image.open(server.base_dir / png) as picture:
            pixels = np.asarray(picture.convert("RGB")).astype(int)
        assert pixels.shape == (64, 64, 3)
        assert np.abs(pixels - np.array(expected_rgb)).max() <= 1, (pixels.min((0, 1)), pixels.max((0, 1)), expected_rgb)

    return check


def numbered_copy(server, entry, new_files):
    (saved,) = [p for p in new_files if p.suffix == ".safetensors"]
    assert saved.name == "bad_good_00001.safetensors", saved
    from comfyui_svdiff.svdiff.fileformat import read_shift

    a, b = read_shift(server.models(SHIFTS) / "bad_good.safetensors"), read_shift(server.base_dir / saved)
    assert a.tensors.keys() == b.tensors.keys() and all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


FILE_CASES = [
    Case("shift truncated", lambda c: loader_prompt(c, "bad_truncated.safetensors"), ("shift_name", "'bad_truncated.safetensors' is truncated", "get the file again"), "SVDiffLoader"),
    Case("shift empty", lambda c: loader_prompt(c, "bad_empty.safetensors"), ("shift_name", "is empty (0 bytes)", "get the file again"), "SVDiffLoader"),
    Case("shift pickled (zip)", lambda c: loader_prompt(c, "bad_pickled.safetensors"), ("shift_name", "pickled PyTorch file", "never unpickles", "Convert it to .safetensors"), "SVDiffLoader"),
    Case("shift pickled (legacy)", lambda c: loader_prompt(c, "bad_legacy_pickle.safetensors"), ("shift_name", "pickled PyTorch file", "Convert it to .safetensors"), "SVDiffLoader"),
    Case("shift for another architecture", lambda c: loader_prompt(c, "bad_sdxl.safetensors"), ("shift_name", "does not fit this model", "made for SDXL", "Use a shift made for this architecture"), "SVDiffLoader"),
    Case("wrong delta length", lambda c: loader_prompt(c, "bad_delta_length.safetensors"), ("shift_name", "singular-value shifts but", "has only", "Use a shift made for this architecture"), "SVDiffLoader"),
    Case("keys for missing layers", lambda c: loader_prompt(c, "bad_missing_layer.safetensors"), ("shift_name", "the model has no parameter 'diffusion_model.input_blocks.99.0.proj.weight'", "SVDiffSelectLayers"), "SVDiffLoader"),
    Case("NaN in a delta", lambda c: loader_prompt(c, "bad_nan.safetensors"), ("shift_name", "contains 1 NaN/Inf values", "training diverged"), "SVDiffLoader"),
    Case("Inf in a delta", lambda c: loader_prompt(c, "bad_inf.safetensors"), ("shift_name", "contains 1 NaN/Inf values"), "SVDiffLoader"),
    Case("integer delta", lambda c: loader_prompt(c, "bad_int_dtype.safetensors"), ("shift_name", "has dtype torch.int32", "must be floating point"), "SVDiffLoader"),
    Case("2-D delta", lambda c: loader_prompt(c, "bad_matrix_delta.safetensors"), ("shift_name", "must be a non-empty vector"), "SVDiffLoader"),
    Case("newer format version", lambda c: loader_prompt(c, "bad_future_format.safetensors"), ("shift_name", "format 7, newer than this extension reads", "update ComfyUI-SVDiff"), "SVDiffLoader"),
    Case("huge metadata", lambda c: loader_prompt(c, "bad_huge_metadata.safetensors"), ("shift_name", "MB header", "get a clean copy"), "SVDiffLoader"),
    Case("header length beyond the file", lambda c: loader_prompt(c, "bad_header_claims.safetensors"), ("shift_name", "header claims 1099511627776 bytes", "get the file again"), "SVDiffLoader"),
    Case("non-UTF-8 metadata", lambda c: loader_prompt(c, "bad_non_utf8.safetensors"), ("shift_name", "is not a valid .safetensors file", "get the file again"), "SVDiffLoader"),
    Case("metadata value not text", lambda c: loader_prompt(c, "bad_metadata_not_text.safetensors"), ("shift_name", "is not a valid .safetensors file"), "SVDiffLoader"),
    Case("a LoRA as a shift", lambda c: loader_prompt(c, "bad_lora.safetensors"), ("shift_name", "is a LoRA", "load it with a LoRA loader"), "SVDiffLoader"),
    Case("shift not in the folder", lambda c: loader_prompt(c, "nope.safetensors"), ("shift_name", "Value not in list"), "SVDiffLoader", validation=True),
    Case("strength NaN", lambda c: loader_prompt(c, "bad_good.safetensors", float("nan")), ("strength_model is nan", "set a finite number"), "SVDiffLoader"),
    Case("strength out of range", lambda c: loader_prompt(c, "bad_good.safetensors", 1e6), ("strength_model", "bigger than max"), "SVDiffLoader", validation=True),
    Case("save prefix with ..", lambda c: save_prompt("../escape"), ("filename_prefix '../escape' is not a valid name", "use a relative name"), "SVDiffSave"),
    Case("save prefix absolute", lambda c: save_prompt("/tmp/svdiff_abs"), ("filename_prefix '/tmp/svdiff_abs' is not a valid name",), "SVDiffSave"),
    Case("save prefix hidden", lambda c: save_prompt(".hidden/x"), ("is not a valid name", "no hidden names"), "SVDiffSave"),
    Case("save prefix through a symlink", lambda c: save_prompt("bad_link_out/x"), ("filename_prefix 'bad_link_out/x' leads outside", "choose another name"), "SVDiffSave"),
    Case("save prefix climbing out of a subfolder", lambda c: save_prompt("a/../../b"), ("filename_prefix 'a/../../b' is not a valid name",), "SVDiffSave"),
    Case("save prefix with a drive letter", lambda c: save_prompt("C:/windows"), ("filename_prefix 'C:/windows' is not a valid name",), "SVDiffSave"),
    Case("save over an existing name", lambda c: save_prompt("bad_good"), accepted=numbered_copy, writes=("models/spectral_shifts/bad_good_00001.safetensors",)),
]  # fmt: skip

TRAINING_CASES = [
    Case("dataset folder empty", lambda c: train(c, "bad_empty_folder"), ("folder", "contains no images", "add images to it"), "SVDiffDatasetFromFolder"),
    Case("dataset folder missing", lambda c: train(c, "bad_no_such_folder"), ("folder", "does not exist"), "SVDiffDatasetFromFolder"),
    Case("dataset folder absolute", lambda c: train(c, "/etc"), ("folder '/etc' is not a folder inside ComfyUI's input folder", "write its name"), "SVDiffDatasetFromFolder"),
    Case("dataset folder climbing out", lambda c: train(c, "../models/checkpoints"), ("folder '../models/checkpoints' is not a folder inside ComfyUI's input folder",), "SVDiffDatasetFromFolder"),
    Case("dataset folder through a symlink", lambda c: train(c, "bad_link_in"), ("folder 'bad_link_in' leads outside ComfyUI's input folder", "copy the images"), "SVDiffDatasetFromFolder"),
    Case("image 1×1", lambda c: train(c, "bad_tiny"), ("image 'tiny.png' is 1×1", "at least 64 px", "remove it or replace it"), "SVDiffDatasetFromFolder"),
    Case("image file corrupt", lambda c: train(c, "bad_corrupt"), ("image 'broken.png' cannot be read", "remove it or convert it"), "SVDiffDatasetFromFolder"),
    Case("captions and images mismatched", lambda c: images_dataset(c, "photo of sks dog\nsks dog on grass"), ("2 captions for 3 images", "one caption for all, or one per image"), "SVDiffDatasetFromImages"),
    Case("prompts without the trigger word", lambda c: train(c, "bad_no_trigger"), ("do not contain the trigger word 'sks'", "add it to the captions, or clear trigger_word"), "SVDiffDatasetFromFolder"),
    Case("zero steps", lambda c: train(c, steps=0), ("steps", "smaller than min of 1"), "SVDiffTrain", validation=True),
    Case("learning rate 0", lambda c: train(c, learning_rate=0.0), ("learning_rate is 0.0", "must be positive"), "SVDiffTrain"),
    Case("learning rate negative", lambda c: train(c, learning_rate=-1e-3), ("learning_rate", "smaller than min of 0.0"), "SVDiffTrain", validation=True),
    Case("learning rate NaN", lambda c: train(c, learning_rate=float("nan")), ("learning_rate is nan",), "SVDiffTrain"),
    Case("layer subset matching nothing", lambda c: train(c, layers="custom patterns only", name_patterns="no_such_layer"), ("name_patterns 'no_such_layer' matches no weight of this model", "fix name_patterns"), "SVDiffTrain"),
    Case("layer pattern not a regex", lambda c: train(c, layers="custom patterns only", name_patterns="re:(["), ("name_patterns: invalid regular expression '(['", "drop the 're:' prefix"), "SVDiffTrain"),
    Case("custom subset without patterns", lambda c: train(c, layers="custom patterns only"), ("name_patterns is empty", "write at least one pattern"), "SVDiffTrain"),
    Case("prior without prior images", lambda c: train(c, prior_weight=1.0, num_class_images=0, class_prompt="photo of a dog"), ("there is no prior data",), "SVDiffTrain"),
    Case("prior without a class prompt", lambda c: train(c, prior_weight=1.0, num_class_images=2, class_prompt=""), ("class_prompt is empty", "set prior_weight to 0"), "SVDiffTrain"),
    Case("resume from another architecture", lambda c: train(c, resume_from="bad_sdxl.safetensors"), ("resume_from", "does not fit this model"), "SVDiffTrain"),
    Case("save prefix with .. (training)", lambda c: train(c, filename_prefix="../../escape"), ("filename_prefix", "is not a valid name"), "SVDiffTrain"),
    Case("modifier token missing from captions", lambda c: cd(c, modifier_token="<new9>", trigger=""), ("modifier_token", "<new9>"), "SVDiffTrainCustomDiffusion"),
    Case("initializer of several words", lambda c: cd(c, initializer_token="big dog"), ("initializer_token 'big dog' must be one word", "e.g. 42170"), "SVDiffTrainCustomDiffusion"),
    Case("one subject for Cut-Mix-Unmix", lambda c: cutmix(second=None, phrases="sks dog"), ("needs at least two subjects", "connect a dataset to subject_2"), "SVDiffCutMixUnmix"),
    Case("subjects of different resolutions", lambda c: cutmix(resolution_2=128), ("different resolutions (64, 128)", "give every dataset node the same resolution"), "SVDiffCutMixUnmix"),
    Case("phrases not one per subject", lambda c: cutmix(phrases="sks dog"), ("phrases has 1 lines for 2 connected subjects", "one line per subject"), "SVDiffCutMixUnmix"),
    Case("two subjects with one trigger word", lambda c: cutmix(second="bad_ok", trigger_2="sks", phrases="sks dog\nsks dog"), ("share the trigger word 'sks'", "its own rare word"), "SVDiffCutMixUnmix"),
    Case("merge with no captions", merge_no_captions, ("regularization captions: the list is empty", "turn on builtin_captions"), "SVDiffMergeConcepts"),
    Case("grayscale image", lambda c: dataset_only("bad_gray", "gray"), accepted=uniform_image((100, 100, 100)), writes=("output/bad/gray_*.png",)),
    Case("RGBA image", lambda c: dataset_only("bad_rgba", "rgba"), accepted=uniform_image((228, 153, 153)), writes=("output/bad/rgba_*.png",)),
    Case("16-bit image", lambda c: dataset_only("bad_16bit", "deep"), accepted=uniform_image((156, 156, 156)), writes=("output/bad/deep_*.png",)),
]  # fmt: skip

EDIT_CASES = [
    Case("latent of another model family", lambda c: edit_latent(c, {"class_type": "LoadLatent", "inputs": {"latent": "bad_sd3.latent"}}), ("latent has 16 channels but this model works on 4", "encode the image with this model's VAE"), "SVDiffDDIMInversion"),
    Case("empty latent to invert", lambda c: edit_latent(c, {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}), ("latent is all zeros", "connect the VAE-encoded image"), "SVDiffDDIMInversion"),
    Case("sampler latent of another size", lambda c: edit_latent(c, {"class_type": "EmptyLatentImage", "inputs": {"width": 96, "height": 64, "batch_size": 1}}, into="sampler"), ("latent_image of the sampler has shape",), "SamplerCustomAdvanced"),
    Case("ordinary latent as inverted latent", lambda c: edit(c, noise_latent=("4", 0)), ("inverted_latent does not come from DDIM Inversion",), "SVDiffInvertedNoise"),
    Case("edit steps 0", lambda c: edit(c, denoise=0.0), ("sigmas holds 0 value(s)",), "SVDiffDDIMInversion"),
    Case("alpha above 1", lambda c: edit(c, alpha=1.5), ("alpha", "bigger than max of 1.0"), "SVDiffInvertedNoise", validation=True),
    Case("alpha NaN", lambda c: edit(c, alpha=float("nan")), ("alpha must be within [0, 1]",), "SVDiffInvertedNoise"),
    Case("eta negative", lambda c: edit(c, eta=-0.5), ("eta", "smaller than min of 0.0"), "SVDiffDDIMSampler", validation=True),
    Case("eta NaN", lambda c: edit(c, eta=float("nan")), ("eta must be ≥ 0",), "SVDiffDDIMSampler"),
    Case("inversion cfg without a negative", lambda c: edit_with(c, "5", cfg=4.0), ("cfg = 4.0 needs a negative conditioning", "set cfg to 1"), "SVDiffDDIMInversion"),
]  # fmt: skip

CASES = FILE_CASES + TRAINING_CASES + EDIT_CASES


HASHED_BYTES = 4 * 2**20


def _snapshot(base: Path) -> dict[str, str]:
    """Every file under models/, input/ and output/ (the canaries' own output aside) →
    its content hash; files above 4 MB (the 278 MB checkpoint) → size and mtime."""
    found = {}
    for top in ("models", "input", "output"):
        for path in (base / top).rglob("*"):
            if path.is_file() and "canary" not in path.parts:
                stat = path.stat()
                if stat.st_size > HASHED_BYTES:
                    found[str(path.relative_to(base))] = f"{stat.st_size}:{stat.st_mtime_ns}"
                else:
                    found[str(path.relative_to(base))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


@pytest.fixture(scope="module")
def matrix(comfy_server, comfy_handle, tiny_checkpoint, tmp_path_factory):
    import comfy.sd

    from devtools import tiny_models

    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(
        str(comfy_handle.model_dir("checkpoints") / tiny_checkpoint), output_vae=False, output_clipvision=False
    )
    xl_model, xl_clip = tiny_models.build_model("SDXL", seed=0)
    _make_files(comfy_server, model, clip, xl_model, xl_clip)
    outside = tmp_path_factory.mktemp("outside")
    link = comfy_server.models(SHIFTS) / "bad_link_out"
    if not link.exists():
        link.symlink_to(outside, target_is_directory=True)
    images_outside = tmp_path_factory.mktemp("images-outside")  # readable by the server, outside its input folder
    Image.fromarray(np.full((64, 64, 3), 120, dtype=np.uint8)).save(images_outside / "secret.png")
    (images_outside / "secret.txt").write_text("photo of a sks dog")
    link_in = comfy_server.input_dir / "bad_link_in"
    if not link_in.exists():
        link_in.symlink_to(images_outside, target_is_directory=True)
    baseline = canary_latent(comfy_server, tiny_checkpoint, 0, "bad")
    return {"baseline": baseline, "outside": outside, "canaries": [1]}


def test_matrix_has_at_least_thirty_refusals():
    refusals = [c for c in CASES if c.accepted is None]
    assert len(refusals) >= 30 and len({c.id for c in CASES}) == len(CASES), len(refusals)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_through_the_server(comfy_server, tiny_checkpoint, matrix, case):
    server = comfy_server
    before = _snapshot(server.base_dir)
    prompt = case.build(tiny_checkpoint)
    status, answer = server.submit(prompt)
    if case.validation:
        # 400, or 200 when other output nodes of the prompt are valid and run alone
        # (ComfyUI queues them and lists the invalid node in node_errors).
        errors = answer.get("node_errors", {})
        refusing = {entry["class_type"] for entry in errors.values()}
        assert case.node in refusing, (case.id, status, answer)
        message = json.dumps(errors, ensure_ascii=False)
        if status == 200:
            server.wait(answer["prompt_id"], timeout=600)
        else:
            assert status == 400, (case.id, answer)
    else:
        assert status == 200, (case.id, answer)
        entry = server.wait(answer["prompt_id"], timeout=600)
        message = error_of(entry)
        if case.accepted is not None:
            assert message is None, (case.id, message)
        else:
            assert message is not None, f"{case.id}: the prompt was not refused"
            assert message.startswith(f"{case.node} ("), (case.id, message)
    for phrase in case.expect:
        assert phrase in message, f"{case.id}: {phrase!r} not in {message!r}"

    after = _snapshot(server.base_dir)
    changed = sorted(k for k in before if after.get(k) != before[k])
    new = sorted(set(after) - set(before))
    assert not changed, f"{case.id} changed or removed files: {changed}"
    allowed = [n for n in new if any(Path(n).match(g) for g in case.writes)]
    assert new == allowed, f"{case.id} left files: {sorted(set(new) - set(allowed))}"
    assert not any(Path(n).name.startswith(".") for n in new)
    assert not any(matrix["outside"].iterdir())
    if case.accepted is not None:
        case.accepted(server, entry, [Path(n) for n in new])

    # The server serves the next prompt, on the very MODEL/CLIP objects the case received.
    assert server.alive()
    index = matrix["canaries"][-1]
    matrix["canaries"].append(index + 1)
    assert torch.equal(canary_latent(server, tiny_checkpoint, index, "bad"), matrix["baseline"]), f"{case.id} left the shared model changed"
