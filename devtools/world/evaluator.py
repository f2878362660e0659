"""An evaluator for toy-world pictures, trained on the world's ground truth only.

A small CNN with one head per attribute (shape, colour, texture, background, size,
position, and the count of objects). It is trained on rendered scenes, held-out shapes and
combinations included, with blur, noise and colour jitter so that it also reads the
softer pictures a diffusion model draws; it never sees a diffusion model's output. A
two-object picture is scored per half: each half, padded to a square, goes through the
same network (trained on such halves too).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch import nn

from .render import render
from .scenes import ATTRIBUTES, OBJECT_ATTRIBUTES, Scene, evaluator_scene

WEIGHTS = Path(__file__).with_name("evaluator.safetensors")
SIZE = 64
HEADS = {**{name: len(values) for name, values in ATTRIBUTES.items()}, "count": 2}
IGNORE = -100


class Evaluator(nn.Module):
    def __init__(self, width: int = 24):
        super().__init__()
        layers, channels = [], 3
        for out in (width, 2 * width, 3 * width, 4 * width):
            layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            layers += [nn.Conv2d(out, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            channels = out
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.heads = nn.ModuleDict({name: nn.Linear(channels, n) for name, n in HEADS.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``images``: (B, 3, 64, 64) in [0, 1] → logits per attribute."""
        features = self.features(images * 2 - 1)
        return {name: head(features) for name, head in self.heads.items()}


def half(image: Image.Image, side: str) -> Image.Image:
    """The left or right half of a picture, padded to a square with its own edge colours."""
    w, h = image.size
    box = (0, 0, w // 2, h) if side == "left" else (w // 2, 0, w, h)
    crop = np.asarray(image.crop(box))
    pad = (h - crop.shape[1]) // 2
    return Image.fromarray(np.pad(crop, ((0, 0), (pad, h - crop.shape[1] - pad), (0, 0)), mode="edge"))


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    arrays = [np.asarray(im.convert("RGB").resize((SIZE, SIZE), Image.BILINEAR), dtype=np.float32) / 255 for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _labels(scene: Scene, region: str | None) -> dict[str, int]:
    """Targets for the whole picture (region None) or one half of a two-object picture."""
    labels = dict.fromkeys(HEADS, IGNORE)
    labels["background"] = ATTRIBUTES["background"].index(scene.background)
    if region is None:
        labels["count"] = len(scene.things) - 1
        if len(scene.things) == 1:
            thing = scene.things[0]
            for name in ("shape", "colour", "texture", "size", "position"):
                labels[name] = ATTRIBUTES[name].index(getattr(thing, name))
        return labels
    thing = next(t for t in scene.things if t.position == region)
    for name in OBJECT_ATTRIBUTES:
        labels[name] = ATTRIBUTES[name].index(getattr(thing, name))
    return labels


def _degrade(image: Image.Image, rng: random.Random) -> Image.Image:
    """What a generator's pictures look like next to the renders: softer, noisier, shifted colours."""
    if rng.random() < 0.5:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.2, 1.2)))
    array = np.asarray(image, dtype=np.float32)
    array = array * np.array([rng.uniform(0.9, 1.1) for _ in range(3)]) + rng.uniform(-12, 12)
    array = array + np.random.default_rng(rng.randrange(2**31)).normal(0, rng.uniform(0, 10), array.shape)
    return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))


def training_batch(rng: random.Random, count: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    images, targets = [], []
    while len(images) < count:
        scene = evaluator_scene(rng)
        picture = render(scene, SIZE, seed=rng.randrange(2**31))
        if len(scene.things) == 2 and rng.random() < 0.6:
            region = rng.choice(("left", "right"))
            picture = half(picture, region)
        else:
            region = None
        images.append(_degrade(picture, rng))
        targets.append(_labels(scene, region))
    labels = {name: torch.tensor([t[name] for t in targets]) for name in HEADS}
    return to_tensor(images), labels


def train(steps: int = 3000, batch: int = 96, seed: int = 0, progress=None) -> Evaluator:
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = Evaluator()
    optimiser = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    loss_fn = nn.CrossEntropyLoss(ignore_index=IGNORE)
    model.train()
    for step in range(steps):
        images, labels = training_batch(rng, batch)
        logits = model(images)
        loss = sum(loss_fn(logits[name], labels[name]) for name in HEADS if (labels[name] != IGNORE).any())
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        if progress is not None:
            progress(step + 1, steps, float(loss.detach()))
    return model.eval()


def save(model: Evaluator, path: Path = WEIGHTS, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().to(torch.float16 if v.is_floating_point() else v.dtype).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"world.evaluator": "1", **(metadata or {})})


def load(path: Path = WEIGHTS) -> Evaluator:
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no trained evaluator; build it with `python -m devtools.world evaluator`")
    model = Evaluator()
    state = load_file(str(path))
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return model.eval()


@torch.no_grad()
def predict(model: Evaluator, images: list[Image.Image]) -> dict[str, list[str | int]]:
    """The evaluator's reading of each picture: attribute values (names), and the object count."""
    logits = model(to_tensor(images))
    out = {name: [values[i] for i in logits[name].argmax(-1).tolist()] for name, values in ATTRIBUTES.items()}
    out["count"] = [i + 1 for i in logits["count"].argmax(-1).tolist()]
    return out


@dataclass
class Reading:
    """How a picture matches the scene its prompt asked for, attribute by attribute."""

    correct: dict[str, bool]

    @property
    def all_correct(self) -> bool:
        return all(self.correct.values())


def score(model: Evaluator, image: Image.Image, scene: Scene) -> Reading:
    """Per attribute: does the picture show what ``scene`` says? Two-object scenes are read per
    half ("left.shape", "right.colour", ...) plus the count and background of the whole."""
    whole = predict(model, [image])
    correct = {"count": whole["count"][0] == len(scene.things), "background": whole["background"][0] == scene.background}
    if len(scene.things) == 1:
        thing = scene.things[0]
        correct.update({name: whole[name][0] == getattr(thing, name) for name in ("shape", "colour", "texture", "size", "position")})
        return Reading(correct)
    halves = predict(model, [half(image, "left"), half(image, "right")])
    for i, thing in enumerate(sorted(scene.things, key=lambda t: t.position)):  # "left" < "right"
        for name in OBJECT_ATTRIBUTES:
            correct[f"{thing.position}.{name}"] = halves[name][i] == getattr(thing, name)
    return Reading(correct)
