"""Pictures from the world checkpoint through ComfyUI's own code, and how well they follow prompts.

Everything goes the way a graph of stock nodes goes: ``comfy.sd.load_checkpoint_guess_config``
(CheckpointLoaderSimple), ``clip.tokenize`` + ``encode_from_tokens_scheduled``
(CLIPTextEncode), ``comfy.sample.sample`` (KSampler) and ``vae.decode`` (VAEDecode).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from . import base, evaluator
from .scenes import Scene, random_scene

SAMPLER = {"steps": 20, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal"}


def load(path=None):
    """(model, clip, vae) from the world checkpoint, refusing a load ComfyUI complained about."""
    from ..tiny_models.checkpoints import load_checkpoint_checked

    model, clip, vae, problems = load_checkpoint_checked(path or base.world_checkpoint())
    if problems:
        raise RuntimeError(f"the world checkpoint did not load cleanly: {problems[:3]}")
    return model, clip, vae


def encode(clip, text: str):
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def sample_latents(model, clip, prompts: list[str], seeds: list[int], negative: str = "", **sampler) -> list[torch.Tensor]:
    """One latent per (prompt, seed), as KSampler on an empty latent makes it."""
    import comfy.sample

    settings = {**SAMPLER, **sampler}
    negative_cond = encode(clip, negative)
    out = []
    cache: dict[str, list] = {}
    for prompt, seed in zip(prompts, seeds, strict=True):
        positive = cache.get(prompt) or cache.setdefault(prompt, encode(clip, prompt))
        latent = torch.zeros(1, 4, base.LATENT_SIZE, base.LATENT_SIZE)
        noise = comfy.sample.prepare_noise(latent, seed)
        out.append(
            comfy.sample.sample(
                model,
                noise,
                settings["steps"],
                settings["cfg"],
                settings["sampler_name"],
                settings["scheduler"],
                positive,
                negative_cond,
                latent,
                seed=seed,
                disable_pbar=True,
            )
        )
    return out


def generate(model, clip, vae, prompts: list[str], seeds: list[int], negative: str = "", **sampler) -> list[Image.Image]:
    """One picture per (prompt, seed), as KSampler + VAEDecode would make it."""
    out = []
    for samples in sample_latents(model, clip, prompts, seeds, negative, **sampler):
        pixels = vae.decode(samples)[0].clamp(0, 1).mul(255).round().to(torch.uint8).cpu().numpy()
        out.append(Image.fromarray(pixels))
    return out


@dataclass
class Accuracy:
    """Share of generated pictures whose evaluator reading matches the prompt, per attribute."""

    count: int
    per_attribute: dict[str, float]
    all_correct: float
    pictures: list[Image.Image] = field(default_factory=list, repr=False)


def prompt_scenes(count: int, seed: int, two_objects: float) -> list[Scene]:
    rng = random.Random(seed)
    return [random_scene(rng, two_objects=two_objects) for _ in range(count)]


def prompt_accuracy(model, clip, vae, scenes: list[Scene], seed: int = 0, **sampler) -> Accuracy:
    judge = evaluator.load()
    pictures = generate(model, clip, vae, [s.caption() for s in scenes], [seed + i for i in range(len(scenes))], **sampler)
    hits: dict[str, list[bool]] = {}
    every = []
    for picture, scene in zip(pictures, scenes, strict=True):
        reading = evaluator.score(judge, picture, scene)
        every.append(reading.all_correct)
        for name, ok in reading.correct.items():
            key = ("pair " + name.split(".")[-1]) if "." in name else name
            hits.setdefault(key, []).append(ok)
    return Accuracy(len(scenes), {k: float(np.mean(v)) for k, v in sorted(hits.items())}, float(np.mean(every)), pictures)


def grid(pictures: list[Image.Image], columns: int = 10, scale: int = 2) -> Image.Image:
    w, h = pictures[0].size
    rows = (len(pictures) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * w, rows * h), (128, 128, 128))
    for i, p in enumerate(pictures):
        sheet.paste(p, ((i % columns) * w, (i // columns) * h))
    return sheet.resize((sheet.width * scale, sheet.height * scale), Image.NEAREST)
