"""The demo files on the world model: what the shipped workflows and the main job use.

Pictures and captions are drawn here (pure PIL, seeded); the trained files (two spectral
shifts, a LoRA, Custom Diffusion K/V deltas and their token) are made once by
``python -m devtools.world demo`` through the extension's own nodes and ComfyUI's Train
LoRA on the world checkpoint, and shipped in ``devtools/world/demo/`` (each file's
metadata holds the settings it was trained with). The Install Demo Files node copies
them into ComfyUI's folders.

The subjects are the two shapes the base model never saw (``scenes.CONCEPT_SHAPES``):
a red heart named "sks circle" and a red diamond named "zwx square", the rare token and
the class word of the nearest shape the model knows, as DreamBooth names "sks dog".
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

from .concepts import concept_caption, instance_scenes
from .render import render
from .scenes import BASE_SHAPES, COLOURS, POSITIONS, SIZES, Scene, Thing

HERE = Path(__file__).parent / "demo"
SUBJECTS = {
    # folder: (shape, name in captions, class prompt of the prior images)
    "demo_sks_circle": ("heart", "sks circle", "a photo of a large red circle on a dark background"),
    "demo_zwx_square": ("diamond", "zwx square", "a photo of a large red square on a dark background"),
}
PICTURES = 5
PHOTO_SCENE = Scene((Thing("star", "yellow", "plain", "large", "center"),), "dark")
"""The photo the CoSINE workflow edits ("a photo of a large yellow star on a dark background")."""
PHOTO_EDIT = Scene((Thing("star", "blue", "plain", "large", "center"),), "dark")
STRIPES = "demo_stripes"
"""Folder of the stripes LoRA's pictures: any object on a striped background, captions without the background."""


def subject_pictures(folder: str, count: int = PICTURES) -> list[tuple[str, object, str]]:
    """(file stem, 64² picture, caption) of a demo subject folder."""
    shape, name, _ = SUBJECTS[folder]
    stem = name.replace(" ", "_")
    return [
        (f"{stem}_{i}", render(scene, 64, seed=300 + i), concept_caption(scene.caption(), shape, name))
        for i, scene in enumerate(instance_scenes(count, seed=7, shape=shape))
    ]


def stripes_scenes(count: int = 16, seed: int = 11) -> list[Scene]:
    rng = random.Random(seed)
    return [
        Scene((Thing(rng.choice(BASE_SHAPES), rng.choice(tuple(COLOURS)), "plain", rng.choice(SIZES), rng.choice(POSITIONS)),), "striped")
        for _ in range(count)
    ]


def without_background(caption: str) -> str:
    """ "a photo of a large red star on the left on a striped background" -> "a photo of a large red star on the left"."""
    return caption.rsplit(" on a", 1)[0].rsplit(" on an", 1)[0]


def write_folder(folder: Path, items: list[tuple[str, object, str]]) -> None:
    """Pictures (PNG) with their captions (.txt beside them), published as a whole folder;
    added to an existing folder, replacing nothing."""
    staging = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        for stem, picture, caption in items:
            picture.save(staging / f"{stem}.png")
            (staging / f"{stem}.txt").write_text(caption)
        if folder.is_dir():
            for file in staging.iterdir():
                if not (folder / file.name).exists():
                    os.replace(file, folder / file.name)
        else:
            os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_subject_folder(folder: Path) -> None:
    write_folder(folder, subject_pictures(folder.name if folder.name in SUBJECTS else "demo_sks_circle"))


def write_photo(path: Path) -> None:
    """The CoSINE workflow's photo: one world scene at 64²."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    try:
        render(PHOTO_SCENE, 64, seed=900).save(staging)
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)
