"""The toy world: seeded pictures, captions that name what is drawn, held-out concepts kept
out of base training, and an evaluator that reads fresh pictures as their ground truth says."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from devtools.world import BASE_SHAPES, CONCEPT_SHAPES, HELD_OUT_COMBINATIONS, Scene, Thing, evaluator_scene, random_scene, render
from devtools.world.scenes import COLOURS


def test_pictures_are_seeded():
    scene = Scene((Thing("star", "red", "striped"),), "gradient")
    a, b, c = (np.asarray(render(scene, 64, seed=s)) for s in (3, 3, 4))
    assert a.shape == (64, 64, 3) and (a == b).all() and not (a == c).all()


def test_captions_name_every_attribute():
    rng = random.Random(1)
    for _ in range(500):
        scene = evaluator_scene(rng)
        caption = scene.caption()
        assert f"{scene.background} background" in caption
        for thing in scene.things:
            assert f"{thing.colour} " in caption and f" {thing.shape}" in caption
            assert (thing.texture in caption) == (thing.texture != "plain")
        if len(scene.things) == 1:
            thing = scene.things[0]
            assert thing.size in caption and (f"on the {thing.position}" in caption) == (thing.position != "center")
        else:
            assert " on the left and " in caption and " on the right" in caption
        assert " a orange" not in caption and " a a" not in caption


def test_base_training_never_shows_the_held_out_concepts():
    rng = random.Random(2)
    seen = set()
    for _ in range(3000):
        for thing in random_scene(rng).things:
            assert thing.shape not in CONCEPT_SHAPES
            assert (thing.shape, thing.texture) not in HELD_OUT_COMBINATIONS
            seen.add(thing.shape)
    assert seen == set(BASE_SHAPES)


@pytest.mark.parametrize("colour", list(COLOURS))
def test_a_plain_object_is_drawn_in_its_named_colour(colour):
    """The centre of a large plain circle has the colour table's value (up to the noise)."""
    picture = np.asarray(render(Scene((Thing("circle", colour),), "dark"), 64, seed=0, noise=0), dtype=float)
    centre = picture[28:36, 28:36].reshape(-1, 3).mean(0)
    assert np.abs(centre - np.array(COLOURS[colour])).max() < 4


@pytest.fixture(scope="module")
def shipped_evaluator():
    from devtools.world import evaluator

    return evaluator.load()


def test_the_shipped_evaluator_reads_fresh_pictures_as_their_ground_truth(shipped_evaluator):
    """300 scenes from seeds the training never drew (it drew from random.Random(0)), held-out
    shapes and combinations included; accuracy per attribute against the scene itself."""
    from devtools.world import evaluator

    rng = random.Random(123_456)
    hits: dict[str, list[bool]] = {}
    for i in range(300):
        scene = evaluator_scene(rng)
        for name, ok in evaluator.score(shipped_evaluator, render(scene, 64, seed=900_000 + i), scene).correct.items():
            hits.setdefault(name.split(".")[-1] if "." not in name else "pair " + name.split(".")[1], []).append(ok)
    accuracy = {name: sum(v) / len(v) for name, v in hits.items()}
    floors = {"shape": 0.95, "colour": 0.97, "background": 0.97, "count": 0.97, "position": 0.95, "size": 0.9, "texture": 0.85}
    floors |= {"pair shape": 0.9, "pair colour": 0.95, "pair texture": 0.75}
    below = {name: round(accuracy[name], 3) for name, floor in floors.items() if accuracy[name] < floor}
    assert not below, f"accuracy below its floor: {below}; all: {json.dumps(accuracy)}"


def test_int8_storage_of_the_base_unet_rounds_each_weight_to_its_rows_grid():
    """dequantize(quantize(W)) is W rounded to the nearest of 255 steps of max|row|/127: the
    error of every entry is at most half a step, a row's largest entry is exact, and 1-D
    tensors are only rounded to fp16."""
    import torch

    from devtools.world.base import dequantize, quantize

    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 32, 3, 3, generator=g) * torch.logspace(-3, 0, 64).view(-1, 1, 1, 1)
    bias = torch.randn(64, generator=g)
    stored = quantize({"w": w, "b": bias})
    assert stored["w"].dtype == torch.int8 and stored["b"].dtype == torch.float16
    back = dequantize(stored)
    step = w.reshape(64, -1).abs().amax(1) / 127
    err = (back["w"] - w).reshape(64, -1).abs()
    assert (err <= step[:, None] / 2 + 1e-7).all()
    rows = w.reshape(64, -1)
    peak = rows.abs().argmax(1)
    assert torch.allclose(back["w"].reshape(64, -1).gather(1, peak[:, None]), rows.gather(1, peak[:, None]), rtol=1e-6)
    assert torch.equal(back["b"], bias.half().float())
