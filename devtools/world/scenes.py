"""The toy world's vocabulary, its scenes and their captions (pure Python, seeded).

A scene is one object, or two side by side, on a background. Every attribute a caption
names is a field of the scene, so an evaluator can be trained on ground truth and a
generated picture can be scored against the prompt that asked for it.

Held out of base training (the *personal concepts* of the fidelity benchmark): the
shapes in ``CONCEPT_SHAPES`` never appear in base-training scenes, and the combinations in
``HELD_OUT_COMBINATIONS`` (shape, texture) neither. The evaluator sees everything.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

SHAPES = ("circle", "square", "triangle", "star", "ring", "cross", "heart", "diamond")
CONCEPT_SHAPES = ("heart", "diamond")
BASE_SHAPES = tuple(s for s in SHAPES if s not in CONCEPT_SHAPES)
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 230),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
    "white": (240, 240, 240),
}
TEXTURES = ("plain", "striped", "dotted", "checkered")
BACKGROUNDS = ("dark", "light", "striped", "gradient")
SIZES = ("small", "large")
POSITIONS = ("left", "center", "right")
HELD_OUT_COMBINATIONS = frozenset({("ring", "dotted"), ("star", "checkered")})

ATTRIBUTES = {
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "texture": TEXTURES,
    "background": BACKGROUNDS,
    "size": SIZES,
    "position": POSITIONS,
}
OBJECT_ATTRIBUTES = ("shape", "colour", "texture")
"""What a region of a two-object picture is scored on."""


@dataclass(frozen=True)
class Thing:
    shape: str
    colour: str
    texture: str = "plain"
    size: str = "large"
    position: str = "center"

    def phrase(self, with_size: bool = True) -> str:
        words = [self.size] if with_size else []
        words.append(self.colour)
        if self.texture != "plain":
            words.append(self.texture)
        words.append(self.shape)
        return " ".join(words)


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


@dataclass(frozen=True)
class Scene:
    things: tuple[Thing, ...]
    background: str = "dark"

    def caption(self) -> str:
        """The full caption, every attribute named ("a photo of a large red striped star on the
        left, on a dark background"; two objects: "... on the left and a ... on the right")."""
        if len(self.things) == 1:
            thing = self.things[0]
            where = "" if thing.position == "center" else f" on the {thing.position}"
            return f"a photo of {_a(thing.phrase())}{where} on {_a(self.background)} background"
        left, right = self.things
        return (
            f"a photo of {_a(left.phrase(with_size=False))} on the left and {_a(right.phrase(with_size=False))} "
            f"on the right, on {_a(self.background)} background"
        )


def random_thing(rng: random.Random, shapes=BASE_SHAPES, held_out=HELD_OUT_COMBINATIONS, position=None) -> Thing:
    while True:
        shape, texture = rng.choice(shapes), rng.choice(TEXTURES)
        if (shape, texture) not in held_out:
            break
    return Thing(
        shape=shape,
        colour=rng.choice(tuple(COLOURS)),
        texture=texture,
        size=rng.choice(SIZES),
        position=position or rng.choice(POSITIONS),
    )


def random_scene(rng: random.Random, two_objects: float = 0.25, shapes=BASE_SHAPES, held_out=HELD_OUT_COMBINATIONS) -> Scene:
    """A base-training scene: one object (or, with probability ``two_objects``, two side by side)."""
    background = rng.choice(BACKGROUNDS)
    if rng.random() < two_objects:
        left = random_thing(rng, shapes, held_out, position="left")
        right = random_thing(rng, shapes, held_out, position="right")
        return Scene((replace(left, size="small"), replace(right, size="small")), background)
    return Scene((random_thing(rng, shapes, held_out),), background)


def evaluator_scene(rng: random.Random) -> Scene:
    """A scene from the whole world, held-out shapes and combinations included."""
    return random_scene(rng, two_objects=0.3, shapes=SHAPES, held_out=frozenset())
