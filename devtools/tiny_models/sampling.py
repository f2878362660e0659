"""Conditioning and sampling with tiny models: CLIPTextEncode and KSampler equivalents."""

from __future__ import annotations

import torch

from .configs import latent_channels


def encode_prompt(clip, text: str):
    """CLIPTextEncode equivalent: ``[[cond, {"pooled_output": ...}]]``."""
    tokens = clip.tokenize(text)
    return clip.encode_from_tokens_scheduled(tokens)


def sample_tiny(
    model,
    positive,
    negative,
    arch: str,
    seed: int = 0,
    steps: int = 3,
    size: int = 8,
    cfg: float = 2.0,
) -> torch.Tensor:
    """KSampler equivalent on a ``1 x C x size x size`` empty latent (euler)."""
    import comfy.sample

    latent = torch.zeros(1, latent_channels(arch), size, size)
    noise = comfy.sample.prepare_noise(latent, seed)
    scheduler = "simple" if arch == "Flux" else "normal"
    return comfy.sample.sample(
        model,
        noise,
        steps,
        cfg,
        "euler",
        scheduler,
        positive,
        negative,
        latent,
        seed=seed,
        disable_pbar=True,
    )
