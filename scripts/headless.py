"""Headless ComfyUI with this extension, and the demo assets the example workflows use.

Shared by ``run_workflow.py`` (the main job) and ``build_workflows.py``.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository root, for devtools/ (test tooling shared with tests/ and benchmarks/)

log = logging.getLogger("svdiff.demo")

from devtools.extension import import_extension  # noqa: E402


def start_comfy(base_dir: Path | None = None):
    """A CPU-only, in-process ComfyUI (no web server) with the SVDiff nodes registered."""
    from devtools.harness import setup_comfyui
    from devtools.locate import find_comfyui

    if find_comfyui() is None:
        raise SystemExit(
            "ComfyUI not found: set COMFYUI_PATH to a ComfyUI checkout (tested: v0.8.0, v0.33.0), or install this extension under ComfyUI/custom_nodes/"
        )
    handle = setup_comfyui(base_dir=base_dir)
    handle.register_module(import_extension())
    return handle


def demo_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "comfyui-svdiff" / "demo"


def tiny_checkpoint() -> Path:
    """A small SD1.5-architecture checkpoint with random weights, built once and cached.

    ComfyUI's checkpoint loader fixes the text encoder at full CLIP-L size, so the file
    is ~265 MiB although the UNet is tiny; it is written in a few seconds.
    """
    from devtools import tiny_models

    # "_v2": files written before v0.33 support were saved with the wrong layout there.
    path = demo_cache_dir() / "svdiff_tiny_sd15_v2.safetensors"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tiny_models.write_tiny_checkpoint(tmp, arch="SD15", seed=0)
        os.replace(tmp, path)
    return path


def write_demo_shift(path: Path, model, clip, seed: int) -> None:
    """A random full shift (all ≥2-D weights + 1-D norm deltas) for ``model``/``clip``.

    Stands in for a trained shift so the workflows run without downloads; its
    metadata says so.
    """
    import torch

    from comfyui_svdiff.svdiff.fileformat import write_shift
    from comfyui_svdiff.svdiff.shift import SpectralShift

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
        "svdiff.description": "demo: random shift written by scripts/run_workflow.py, not a trained concept",
    }
    write_shift(path, SpectralShift(tensors, meta, name=path.stem), overwrite=True)


def write_demo_lora(path: Path, model, clip, seed: int) -> None:
    from safetensors.torch import save_file

    from devtools import tiny_models

    lora = tiny_models.make_test_lora(model=model, clip=clip, rank=4, seed=seed, scale=0.05)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in lora.items()}, str(path), metadata={"svdiff.description": "demo LoRA (random)"})


def write_demo_kv(path: Path, embedding_path: Path, model, clip, seed: int) -> None:
    """Random Custom Diffusion K/V deltas (.diff keys) and a modifier-token embedding of the same name.

    Stand-ins for a trained concept so the merge workflow runs without downloads.
    """
    import torch
    from safetensors.torch import save_file

    from comfyui_svdiff.svdiff.fileformat import write_shift
    from comfyui_svdiff.svdiff.shift import SpectralShift

    g = torch.Generator().manual_seed(seed)
    state = model.model.state_dict()
    tensors = {}
    for key, w in state.items():
        if key.endswith((".attn2.to_k.weight", ".attn2.to_v.weight")):
            tensors[key[: -len(".weight")] + ".diff"] = 0.05 * float(w.float().std()) * torch.randn(w.shape, generator=g)
    meta = {
        "svdiff.architecture": type(model.model.model_config).__name__,
        "svdiff.description": "demo: random K/V deltas written by scripts/run_workflow.py, not a trained concept",
    }
    write_shift(path, SpectralShift(tensors, meta, name=path.stem), precision="fp16")
    vectors = {}
    for name in ("clip_l", "clip_g"):
        encoder = getattr(clip.cond_stage_model, name, None)
        if encoder is not None:
            table = encoder.transformer.get_input_embeddings().weight
            vectors[name] = table[int(torch.randint(1000, 40000, (1,), generator=g))].float()[None].clone()
    embedding_path.parent.mkdir(parents=True, exist_ok=True)
    save_file(vectors, str(embedding_path), metadata={"svdiff.description": "demo modifier token (random)"})


DEMO_SUBJECTS = {"sks_dog": ((120, 72, 30), 0), "zwx_sculpture": ((40, 40, 40), 1)}


def write_demo_images(folder: Path, count: int = 4) -> None:
    """Synthetic "subject" photos (a coloured shape on varied backgrounds) with captions.

    Stand-ins so the training workflows run without downloads; replace them with
    3-5 photos of your subject. ``demo_<token>_<noun>`` folders get captions
    "photo of a <token> <noun>" (a brown "sks dog" by default, a dark "zwx sculpture").
    """
    import numpy as np
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    name = folder.name.removeprefix("demo_") if folder.name.startswith("demo_") and "_" in folder.name[5:] else "sks_dog"
    colour, seed = DEMO_SUBJECTS.get(name, ((90, 120, 160), 2))
    rng = np.random.default_rng(seed)
    for i in range(count):
        background = tuple(int(c) for c in rng.integers(40, 220, 3))
        image = Image.new("RGB", (512, 512), background)
        draw = ImageDraw.Draw(image)
        x, y = (int(v) for v in rng.integers(120, 260, 2))
        draw.ellipse([x, y, x + 200, y + 160], fill=colour)
        draw.ellipse([x + 140, y - 60, x + 240, y + 40], fill=tuple(min(255, c + 20) for c in colour))
        image.save(folder / f"{name}_{i}.png")
        (folder / f"{name}_{i}.txt").write_text("photo of a " + name.replace("_", " ", 1))


def write_demo_photo(path: Path) -> None:
    """A synthetic "crown with a blue diamond and a golden eagle" for the CoSINE workflow."""
    from PIL import Image, ImageDraw

    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (512, 512), (70, 40, 90))
    draw = ImageDraw.Draw(image)
    draw.polygon([(96, 380), (96, 200), (176, 290), (256, 170), (336, 290), (416, 200), (416, 380)], fill=(212, 170, 40))
    draw.ellipse([226, 300, 286, 360], fill=(40, 90, 220))  # the blue diamond
    draw.polygon([(256, 60), (196, 120), (226, 150), (256, 125), (286, 150), (316, 120)], fill=(230, 190, 60))  # the eagle
    image.save(path)
