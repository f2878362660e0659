"""The demo files the shipped workflows name, put in ComfyUI's own folders.

They are the toy world's (``devtools/world``): a small SD1.5-layout checkpoint trained
from scratch on pictures of coloured shapes (``svdiff_world_sd15.safetensors``, 64²
pictures, seconds per picture on a CPU), two spectral shifts trained on it (a heart and
a diamond it never saw, both as "sks circle"), a LoRA trained with ComfyUI's Train LoRA
(stripes behind everything), Custom Diffusion K/V deltas with their modifier token (the
diamond as "zwx square"), two folders of subject pictures with captions and one photo
to edit. Every model file says "demo" in its metadata. :func:`install_demo_files` is
idempotent: a demo file already in place is left alone, and a file of the same name that
is not a demo file is never replaced.

The random writers further down (``write_demo_shift`` …) serve ``scripts/run_workflow.py``
when it is given another checkpoint: they make demo files that fit its shapes.
"""

from __future__ import annotations

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

DEMO_CHECKPOINT = "svdiff_world_sd15.safetensors"
DEMO_MARK = "svdiff.demo"
"""Metadata key every demo model file carries (value: what wrote it)."""

SHIPPED = Path(__file__).resolve().parents[2] / "devtools" / "world" / "demo"
"""The trained demo files (``python -m devtools.world demo`` writes them)."""
DEMO_SHIFTS = ("demo_heart.safetensors", "demo_diamond.safetensors")
DEMO_LORAS = ("demo_stripes_lora.safetensors",)
DEMO_KV = ("demo_kv_diamond.safetensors",)
"""K/V deltas in loras/, each with its modifier token of the same name in embeddings/."""
DEMO_IMAGE_FOLDERS = ("demo_sks_circle", "demo_zwx_square")
DEMO_PHOTO = "demo_star.png"
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
    """A safetensors file this module, the world builder or the tiny-model builder wrote."""
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
    except Exception:  # not safetensors, unreadable: not ours
        return False
    return DEMO_MARK in metadata or "tiny_models" in metadata or "svdiff.world" in metadata


def _shipped_files() -> list[tuple[Path, list[Path]]]:
    """(shipped source, destinations) of every trained demo file."""
    files = [(SHIPPED / name, [_first_folder(SHIFT_FOLDER) / name]) for name in DEMO_SHIFTS]
    files += [(SHIPPED / name, [_first_folder(LORA_FOLDER) / name]) for name in DEMO_LORAS]
    for name in DEMO_KV:
        token = SHIPPED / name.replace(".safetensors", ".token.safetensors")
        files += [(SHIPPED / name, [_first_folder(LORA_FOLDER) / name]), (token, [_first_folder(EMBEDDING_FOLDER) / name])]
    return files


def install_demo_files(progress: Callable[[int, int], None] | None = None) -> list[Placed]:
    """Put every demo file in place in ComfyUI's folders (first path of each kind).

    Refuses, before writing anything, when ``models/checkpoints`` holds a file named
    like the demo checkpoint that is not it (the demo shifts are made for its shapes).
    """
    checkpoint = _first_folder("checkpoints") / DEMO_CHECKPOINT
    if checkpoint.exists() and not is_demo_file(checkpoint):
        raise ValueError(f"{checkpoint} exists and is not the SVDiff demo checkpoint; rename or move it, then run this again")
    shipped = _shipped_files()
    missing = [str(source) for source, _ in shipped if not source.is_file()]
    if missing:
        raise ValueError(f"the extension's demo files are missing ({', '.join(missing)}); reinstall the extension")
    total = 1 + len(shipped) + len(DEMO_IMAGE_FOLDERS) + 1
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

    for source, (path,) in shipped:
        if path.exists():
            placed.append(Placed(path, "already there" if is_demo_file(path) else "kept: not a demo file"))
        else:
            copy_model_file(source, path)
            placed.append(Placed(path, "written"))
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


def copy_model_file(source: Path, path: Path) -> None:
    """A shipped safetensors file, rewritten atomically (ComfyUI's output permissions)."""
    from safetensors.torch import load_file

    with safe_open(str(source), "pt") as f:
        metadata = dict(f.metadata() or {})
    atomic_save(path, load_file(str(source)), metadata)


def write_demo_checkpoint(path: Path) -> None:
    """The world checkpoint (trained UNet and VAE, the designed CLIP-L; ~290 MB: the text
    encoder is a full-size CLIP-L, which ComfyUI's loader insists on), written atomically."""
    from ...devtools import tiny_models
    from ...devtools.world import base

    with tiny_models.inside_running_comfyui():
        tensors, metadata = base.checkpoint_tensors()
    metadata[DEMO_MARK] = "svdiff world model: trained from scratch on the toy world's coloured shapes, 64x64 pictures"
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


def write_demo_images(folder: Path) -> None:
    """A demo subject's pictures with captions: ``demo_sks_circle`` the heart ("a photo of a
    large red sks circle ..."), ``demo_zwx_square`` the diamond; any other folder name gets
    the heart. Published as a whole folder (added to an existing one, replacing nothing)."""
    from ...devtools.world import demo_files

    demo_files.write_subject_folder(folder)


def write_demo_photo(path: Path) -> None:
    """The CoSINE workflow's photo: "a photo of a large yellow star on a dark background" (64²)."""
    from ...devtools.world import demo_files

    demo_files.write_photo(path)
