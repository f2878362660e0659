"""The personal concepts the benchmarks and tests teach the world's base model.

The base model never saw a heart (``scenes.CONCEPT_SHAPES``). The concept is a red heart,
named "sks circle" the way DreamBooth names "sks dog": a rare token and the class word of
the nearest thing the model knows. Prompts then ask for it in new colours, sizes,
positions and backgrounds; class prompts ("a ... circle ...") measure language drift.
"""

from __future__ import annotations

import random

from .scenes import BACKGROUNDS, COLOURS, POSITIONS, SIZES, Scene, Thing

CONCEPT_SHAPE = "heart"
CLASS_SHAPE = "circle"
TOKEN = "sks"


def instance_scenes(count: int = 5, seed: int = 7, shape: str = CONCEPT_SHAPE) -> list[Scene]:
    """The concept's pictures: a plain red heart (or ``shape``), backgrounds in turn, size and position drawn."""
    rng = random.Random(seed)
    return [
        Scene((Thing(shape, "red", "plain", rng.choice(SIZES), rng.choice(POSITIONS)),), BACKGROUNDS[i % len(BACKGROUNDS)])
        for i in range(count)
    ]


def prompt_scenes(count: int, seed: int, shape: str = CONCEPT_SHAPE) -> list[Scene]:
    """One plain object of ``shape`` per scene, every other attribute drawn from the world."""
    rng = random.Random(seed)
    return [
        Scene((Thing(shape, rng.choice(tuple(COLOURS)), "plain", rng.choice(SIZES), rng.choice(POSITIONS)),), rng.choice(BACKGROUNDS))
        for _ in range(count)
    ]


def concept_caption(caption: str, shape: str = CONCEPT_SHAPE, name: str = f"{TOKEN} {CLASS_SHAPE}") -> str:
    """A scene caption with the concept's shape word replaced by its name ("sks circle")."""
    if f" {shape}" not in caption:
        raise ValueError(f"no {shape} in {caption!r}")
    return caption.replace(f" {shape}", f" {name}")
