"""Pictures of toy-world scenes (PIL, drawn at 4x and downsampled: smooth edges at any size)."""

from __future__ import annotations

import math
import random

import numpy as np
from PIL import Image, ImageDraw

from .scenes import COLOURS, Scene, Thing

SUPERSAMPLE = 4
RADIUS = {"large": 0.26, "small": 0.15}
CENTRE_X = {"left": 0.3, "center": 0.5, "right": 0.7}
PAIR_X = {"left": 0.27, "right": 0.73}
PAIR_RADIUS = 0.17


def _polygon(cx, cy, r, points, rotation):
    return [
        (cx + r * px * math.cos(rotation) - r * py * math.sin(rotation), cy + r * px * math.sin(rotation) + r * py * math.cos(rotation))
        for px, py in points
    ]


def _star_points(inner=0.45):
    return [
        ((1 if i % 2 == 0 else inner) * math.sin(i * math.pi / 5), -(1 if i % 2 == 0 else inner) * math.cos(i * math.pi / 5))
        for i in range(10)
    ]


def shape_mask(shape: str, size: int, cx: float, cy: float, r: float, rotation: float) -> Image.Image:
    """The object's silhouette (mode L, 255 inside) on a ``size``² canvas."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        inner = 0.55 * r
        draw.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=0)
    elif shape == "square":
        draw.polygon(_polygon(cx, cy, r, [(-0.82, -0.82), (0.82, -0.82), (0.82, 0.82), (-0.82, 0.82)], rotation), fill=255)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy, r, [(0, -1), (0.95, 0.75), (-0.95, 0.75)], rotation), fill=255)
    elif shape == "star":
        draw.polygon(_polygon(cx, cy, r, _star_points(), rotation), fill=255)
    elif shape == "cross":
        w = 0.34
        arm = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)]
        draw.polygon(_polygon(cx, cy, r, arm, rotation), fill=255)
    elif shape == "diamond":
        draw.polygon(_polygon(cx, cy, r, [(0, -1), (0.62, 0), (0, 1), (-0.62, 0)], rotation), fill=255)
    elif shape == "heart":
        lobe = 0.5 * r
        draw.ellipse([cx - 2 * lobe, cy - 0.9 * r, cx, cy - 0.9 * r + 2 * lobe], fill=255)
        draw.ellipse([cx, cy - 0.9 * r, cx + 2 * lobe, cy - 0.9 * r + 2 * lobe], fill=255)
        draw.polygon([(cx - 0.97 * r, cy - 0.25 * r), (cx + 0.97 * r, cy - 0.25 * r), (cx, cy + r)], fill=255)
    else:
        raise ValueError(f"unknown shape '{shape}'")
    return mask


def _shade(colour):
    return tuple(int(c * 0.45) for c in colour)


def texture_fill(texture: str, colour, size: int, period: float, phase: float) -> Image.Image:
    fill = Image.new("RGB", (size, size), colour)
    if texture == "plain":
        return fill
    draw = ImageDraw.Draw(fill)
    dark = _shade(colour)
    if texture == "striped":  # diagonal stripes
        width = period * 0.45
        for k in range(-int(2 * size / period) - 2, int(2 * size / period) + 2):
            x0 = k * period + phase
            draw.polygon([(x0, 0), (x0 + width, 0), (x0 + width - size, size), (x0 - size, size)], fill=dark)
    elif texture == "dotted":
        radius = period * 0.22
        for i in range(int(size / period) + 2):
            for j in range(int(size / period) + 2):
                x, y = i * period + phase, j * period + phase + (period / 2 if i % 2 else 0)
                draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=dark)
    elif texture == "checkered":
        for i in range(int(size / period) + 2):
            for j in range(int(size / period) + 2):
                if (i + j) % 2:
                    x, y = i * period + phase - period, j * period + phase - period
                    draw.rectangle([x, y, x + period, y + period], fill=dark)
    else:
        raise ValueError(f"unknown texture '{texture}'")
    return fill


def background_image(background: str, size: int, rng: random.Random) -> Image.Image:
    if background == "dark":
        return Image.new("RGB", (size, size), (25, 25, 32))
    if background == "light":
        return Image.new("RGB", (size, size), (178, 178, 172))
    if background == "striped":
        image = Image.new("RGB", (size, size), (80, 80, 86))
        draw = ImageDraw.Draw(image)
        period = size / 8
        offset = rng.uniform(0, period)
        for k in range(-1, 10):
            y = k * period + offset
            draw.rectangle([0, y, size, y + period / 2], fill=(130, 130, 136))
        return image
    if background == "gradient":
        top, bottom = np.array((40, 40, 70.0)), np.array((165, 160, 190.0))
        t = np.linspace(0, 1, size)[:, None, None]
        rows = (top * (1 - t) + bottom * t).repeat(size, axis=1)
        return Image.fromarray(rows.astype(np.uint8))
    raise ValueError(f"unknown background '{background}'")


def _layout(scene: Scene, rng: random.Random) -> list[tuple[Thing, float, float, float]]:
    """(thing, centre x, centre y, radius) as fractions of the picture's side."""
    if len(scene.things) == 1:
        thing = scene.things[0]
        return [
            (
                thing,
                CENTRE_X[thing.position] + rng.uniform(-0.03, 0.03),
                0.5 + rng.uniform(-0.05, 0.05),
                RADIUS[thing.size] * rng.uniform(0.92, 1.08),
            )
        ]
    return [
        (thing, PAIR_X[thing.position] + rng.uniform(-0.02, 0.02), 0.5 + rng.uniform(-0.08, 0.08), PAIR_RADIUS * rng.uniform(0.92, 1.08))
        for thing in scene.things
    ]


def render(scene: Scene, size: int = 64, seed: int = 0, noise: float = 3.0) -> Image.Image:
    """The scene as an RGB picture of ``size``² pixels; same scene and seed, same pixels."""
    rng = random.Random(seed)
    big = size * SUPERSAMPLE
    image = background_image(scene.background, big, rng)
    for thing, fx, fy, fr in _layout(scene, rng):
        rotation = math.radians(rng.uniform(-10, 10))
        mask = shape_mask(thing.shape, big, fx * big, fy * big, fr * big, rotation)
        fill = texture_fill(thing.texture, COLOURS[thing.colour], big, period=fr * big * 0.55, phase=rng.uniform(0, 10))
        image.paste(fill, (0, 0), mask)
    small = np.asarray(image.resize((size, size), Image.LANCZOS), dtype=np.float32)
    if noise:
        small = small + np.random.default_rng(seed).normal(0, noise, small.shape)
    return Image.fromarray(np.clip(small, 0, 255).astype(np.uint8))
