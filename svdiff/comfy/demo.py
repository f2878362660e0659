"""The demo files the shipped workflows name, put in ComfyUI's own folders.

A tiny SD1.5-layout checkpoint with random weights (it loads and samples like a real
one, in seconds on a CPU, and draws noise), two spectral shifts, a LoRA, Custom
Diffusion K/V deltas with their modifier token, two folders of synthetic subject
photos with captions and one photo to edit. They stand in for real models and photos
so every workflow runs from the UI as loaded; each model file says "demo" in its
metadata. :func:`install_demo_files` is idempotent: a demo file already in place is
left alone, and a file of the same name that is not a demo file is never replaced.

The writers are also used by ``scripts/run_workflow.py``, which makes demo shifts and
LoRAs that fit whichever checkpoint it is given.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import folder_paths
import torch
from safetensors import safe_open

from ..atomic import atomic_save
from ..fileformat import write_shift
from ..shift import SpectralShift
from .folders import EMBEDDING_FOLDER, LORA_FOLDER, SHIFT_FOLDER

DEMO_CHECKPOINT = "svdiff_demo_sd15.safetensors"
DEMO_MARK = "svdiff.demo"
"""Metadata key every demo model file carries (value: what wrote it)."""

DEMO_SHIFTS = {"demo_dog.safetensors": 1, "demo_cat.safetensors": 2}
DEMO_LORAS = {"demo_style_lora.safetensors": 3}
DEMO_KV = {"demo_kv_cat.safetensors": 4}
DEMO_SUBJECTS = {"sks_dog": ((120, 72, 30), 0), "zwx_sculpture": ((40, 40, 40), 1)}
DEMO_IMAGE_FOLDERS = tuple(f"demo_{name}" for name in DEMO_SUBJECTS)
DEMO_PHOTO = "demo_crown.png"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass(frozen=True)
class Placed:
    """One demo file (or image folder) and what :func:`install_demo_files` did with it."""

    path: Path
    status: str  # "written", "already there", "kept: not a demo file"

    def line(self) -> str:
        return f"{self.status}: {self.path}"


def _first_folder(kind: str) -> Path:
    if kind == "input":
        return Path(folder_paths.get_input_directory())
    return Path(folder_paths.get_folder_paths(kind)[0])


def is_demo_file(path: Path) -> bool:
    """A safetensors file this module (or the tiny-model builder) wrote."""
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
    except Exception:  # not safetensors, unreadable: not ours
        return False
    return DEMO_MARK in metadata or "tiny_models" in metadata


def install_demo_files(progress: Callable[[int, int], None] | None = None) -> list[Placed]:
    """Put every demo file in place in ComfyUI's folders (first path of each kind).

    Refuses, before writing anything, when ``models/checkpoints`` holds a file named
    like the demo checkpoint that is not it (the demo shifts are made for its shapes).
    """
    checkpoint = _first_folder("checkpoints") / DEMO_CHECKPOINT
    if checkpoint.exists() and not is_demo_file(checkpoint):
        raise ValueError(f"{checkpoint} exists and is not the SVDiff demo checkpoint; rename or move it, then run this again")
    total = 1 + len(DEMO_SHIFTS) + len(DEMO_LORAS) + len(DEMO_KV) + len(DEMO_IMAGE_FOLDERS) + 1
    done = 0

    def tick():
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    placed = []
    if checkpoint.exists():
        placed.append(Placed(checkpoint, "already there"))
    else:
        write_demo_checkpoint(checkpoint)
        placed.append(Placed(checkpoint, "written"))
    tick()

    model = clip = None
    for names, kind, writer in (
        (DEMO_SHIFTS, SHIFT_FOLDER, write_demo_shift),
        (DEMO_LORAS, LORA_FOLDER, write_demo_lora),
        (DEMO_KV, LORA_FOLDER, None),
    ):
        for name, seed in names.items():
            path = _first_folder(kind) / name
            companion = _first_folder(EMBEDDING_FOLDER) / name if writer is None else None
            wanted = [p for p in (path, companion) if p is not None]
            if all(p.exists() for p in wanted):
                placed += [Placed(p, "already there" if is_demo_file(p) else "kept: not a demo file") for p in wanted]
            elif any(p.exists() and not is_demo_file(p) for p in wanted):
                placed += [Placed(p, "kept: not a demo file") for p in wanted if p.exists()]
            else:
                if model is None:
                    model, clip = load_demo_checkpoint(checkpoint)
                if writer is None:
                    write_demo_kv(path, companion, model, clip, seed)
                else:
                    writer(path, model, clip, seed)
                placed += [Placed(p, "written") for p in wanted]
            tick()

    for name in DEMO_IMAGE_FOLDERS:
        folder = _first_folder("input") / name
        if folder.is_dir() and any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir()):
            placed.append(Placed(folder, "already there"))
        else:
            write_demo_images(folder)
            placed.append(Placed(folder, "written"))
        tick()
    photo = _first_folder("input") / DEMO_PHOTO
    if photo.exists():
        placed.append(Placed(photo, "already there"))
    else:
        write_demo_photo(photo)
        placed.append(Placed(photo, "written"))
    tick()
    return placed


def write_demo_checkpoint(path: Path) -> None:
    """The tiny SD1.5-layout checkpoint (random weights, ~266 MiB: the text encoder is a
    full-size CLIP-L, which ComfyUI's loader insists on), written atomically."""
    from ...devtools import tiny_models

    with tiny_models.inside_running_comfyui():
        tensors, metadata = tiny_models.tiny_checkpoint_tensors("SD15", seed=0)
    metadata[DEMO_MARK] = "svdiff demo checkpoint: random weights, draws noise; for trying the workflows"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(path, tensors, metadata)


def load_demo_checkpoint(path: Path):
    import comfy.sd

    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=False, output_clipvision=False)
    return model, clip


def write_demo_shift(path: Path, model, clip, seed: int) -> None:
    """A random full shift (all ≥2-D weights + 1-D norm deltas) for ``model``/``clip``."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for prefix, sd in (("", model.model.state_dict()), ("text_encoders.", clip.cond_stage_model.state_dict())):
        for key, w in sd.items():
            if not key.endswith(".weight") or not w.is_floating_point() or (not prefix and not key.startswith("diffusion_model.")):
                continue
            stem = prefix + key[: -len(".weight")]
            if w.ndim >= 2:
                tensors[stem + ".delta"] = 0.02 * torch.randn(min(w.shape[0], w[0].numel()), generator=g)
            elif w.ndim == 1:
                tensors[stem + ".diff"] = 1e-3 * torch.randn(w.shape, generator=g)
    meta = {
        "svdiff.architecture": type(model.model.model_config).__name__,
        "svdiff.description": "demo: a random shift, not a trained concept",
        DEMO_MARK: "random spectral shift",
    }
    write_shift(path, SpectralShift(tensors, meta, name=path.stem), overwrite=True)


def write_demo_lora(path: Path, model, clip, seed: int) -> None:
    from ...devtools import tiny_models

    lora = tiny_models.make_test_lora(model=model, clip=clip, rank=4, seed=seed, scale=0.05)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"svdiff.description": "demo LoRA (random)", DEMO_MARK: "random LoRA"}
    atomic_save(path, {k: v.contiguous() for k, v in lora.items()}, metadata, overwrite=True)


def write_demo_kv(path: Path, embedding_path: Path, model, clip, seed: int) -> None:
    """Random Custom Diffusion K/V deltas (.diff keys) and a modifier-token embedding of the same name."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, w in model.model.state_dict().items():
        if key.endswith((".attn2.to_k.weight", ".attn2.to_v.weight")):
            tensors[key[: -len(".weight")] + ".diff"] = 0.05 * float(w.float().std()) * torch.randn(w.shape, generator=g)
    meta = {
        "svdiff.architecture": type(model.model.model_config).__name__,
        "svdiff.description": "demo: random K/V deltas, not a trained concept",
        DEMO_MARK: "random K/V deltas",
    }
    write_shift(path, SpectralShift(tensors, meta, name=path.stem), precision="fp16", overwrite=True)
    vectors = {}
    for name in ("clip_l", "clip_g"):
        encoder = getattr(clip.cond_stage_model, name, None)
        if encoder is not None:
            table = encoder.transformer.get_input_embeddings().weight
            vectors[name] = table[int(torch.randint(1000, 40000, (1,), generator=g))].float()[None].clone()
    embedding_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(embedding_path, vectors, {"svdiff.description": "demo modifier token (random)", DEMO_MARK: "random token"}, overwrite=True)


def write_demo_images(folder: Path, count: int = 4) -> None:
    """Synthetic "subject" photos (a coloured shape on varied backgrounds) with captions,
    published as a whole folder (added to an existing one, replacing nothing). ``demo_<token>_<noun>`` folders get captions
    "photo of a <token> <noun>" (a brown "sks dog", a dark "zwx sculpture")."""
    import numpy as np
    from PIL import Image, ImageDraw

    name = folder.name.removeprefix("demo_") if folder.name.startswith("demo_") and "_" in folder.name[5:] else "sks_dog"
    colour, seed = DEMO_SUBJECTS.get(name, ((90, 120, 160), 2))
    rng = np.random.default_rng(seed)
    staging = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        for i in range(count):
            background = tuple(int(c) for c in rng.integers(40, 220, 3))
            image = Image.new("RGB", (512, 512), background)
            draw = ImageDraw.Draw(image)
            x, y = (int(v) for v in rng.integers(120, 260, 2))
            draw.ellipse([x, y, x + 200, y + 160], fill=colour)
            draw.ellipse([x + 140, y - 60, x + 240, y + 40], fill=tuple(min(255, c + 20) for c in colour))
            image.save(staging / f"{name}_{i}.png")
            (staging / f"{name}_{i}.txt").write_text("photo of a " + name.replace("_", " ", 1))
        if folder.is_dir():  # a folder of other files: add the pictures, replace nothing
            for file in staging.iterdir():
                if not (folder / file.name).exists():
                    os.replace(file, folder / file.name)
        else:
            os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_demo_photo(path: Path) -> None:
    """A synthetic "crown with a blue diamond and a golden eagle" for the CoSINE workflow."""
    from PIL import Image, ImageDraw

    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (512, 512), (70, 40, 90))
    draw = ImageDraw.Draw(image)
    draw.polygon([(96, 380), (96, 200), (176, 290), (256, 170), (336, 290), (416, 200), (416, 380)], fill=(212, 170, 40))
    draw.ellipse([226, 300, 286, 360], fill=(40, 90, 220))  # the blue diamond
    draw.polygon([(256, 60), (196, 120), (226, 150), (256, 125), (286, 150), (316, 120)], fill=(230, 190, 60))  # the eagle
    staging = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    try:
        image.save(staging)
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)
