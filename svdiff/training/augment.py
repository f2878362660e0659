"""Custom Diffusion's scale augmentation (Kumari et al., 2023, and their reference code).

Per draw, for a training size ``S`` (pixels, a multiple of the VAE factor 8):

* with probability 2/3 the image is **shrunk** to a side drawn uniformly from the
  integers ``[S // 3, S]`` and pasted at a uniformly drawn place on a mid-grey
  ``S × S`` canvas; the loss is masked to the pasted square, shrunk by one latent
  pixel on each side (so the blurred border of the paste is not learnt);
* otherwise the image is **enlarged** to a side drawn uniformly from the integers
  ``[int(1.2 S), int(1.4 S))`` and an ``S × S`` window is cropped at a uniformly drawn
  place; the mask is everything.

Prompt words follow the reference implementation: a paste smaller than ``0.6 S``
gets "a far away " or "very small " (equally likely) in front of the caption, an
enlarged image gets "zoomed in " or "close up "; a paste between ``0.6 S`` and ``S``
keeps its caption. The decisions are drawn from a ``torch.Generator``, so a seed
reproduces them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

FAR = ("a far away ", "very small ")
NEAR = ("zoomed in ", "close up ")
SHRINK_PROBABILITY = 2.0 / 3.0
SMALL_FRACTION = 0.6
LATENT_FACTOR = 8


@dataclass(frozen=True)
class Augmentation:
    """One draw of the policy for a ``size × size`` training image."""

    size: int
    scale: int
    """Side of the resized image in pixels."""
    top: int
    left: int
    """Paste position (shrink) or crop position (enlarge), pixels."""
    prefix: str
    """Words put in front of the caption ("" for none)."""

    @property
    def shrunk(self) -> bool:
        return self.scale <= self.size


def _randint(generator: torch.Generator, low: int, high: int) -> int:
    """Uniform integer in ``[low, high)``."""
    return int(torch.randint(low, high, (1,), generator=generator))


def draw(generator: torch.Generator, size: int) -> Augmentation:
    """Draw one augmentation (see the module docstring for the distribution)."""
    if size < 3 * LATENT_FACTOR or size % LATENT_FACTOR:
        raise ValueError(f"augmentation needs a training size that is a multiple of {LATENT_FACTOR} (got {size})")
    if float(torch.rand((), generator=generator)) < SHRINK_PROBABILITY:
        scale = _randint(generator, size // 3, size + 1)
    else:
        scale = _randint(generator, int(1.2 * size), int(1.4 * size))
    outer, inner = (scale, size) if scale > size else (size, scale)
    top = _randint(generator, 0, outer - inner + 1)
    left = _randint(generator, 0, outer - inner + 1)
    prefix = ""
    if scale < SMALL_FRACTION * size:
        prefix = FAR[_randint(generator, 0, 2)]
    elif scale > size:
        prefix = NEAR[_randint(generator, 0, 2)]
    return Augmentation(size, scale, top, left, prefix)


def mask_of(aug: Augmentation) -> torch.Tensor:
    """``(S/8, S/8)`` float mask of the latent pixels the loss sees."""
    side = aug.size // LATENT_FACTOR
    mask = torch.zeros(side, side)
    if not aug.shrunk:
        return mask + 1.0
    f = LATENT_FACTOR
    mask[aug.top // f + 1 : (aug.top + aug.scale) // f - 1, aug.left // f + 1 : (aug.left + aug.scale) // f - 1] = 1.0
    return mask


def apply(image: torch.Tensor, aug: Augmentation) -> tuple[torch.Tensor, torch.Tensor]:
    """``(augmented image, latent mask)`` for an ``(S, S, C)`` image in [0, 1].

    Resizing is bilinear with antialiasing; the canvas of a shrunk image is 0.5 (the
    reference code pastes on zeros in [-1, 1]).
    """
    size = aug.size
    if image.shape[0] != size or image.shape[1] != size:
        raise ValueError(f"augmentation expects a {size}×{size} image, got {tuple(image.shape[:2])}")
    chw = image.permute(2, 0, 1)[None].float()
    resized = F.interpolate(chw, size=(aug.scale, aug.scale), mode="bilinear", align_corners=False, antialias=True)[0]
    resized = resized.clamp(0.0, 1.0).permute(1, 2, 0)
    if aug.shrunk:
        canvas = torch.full((size, size, image.shape[2]), 0.5)
        canvas[aug.top : aug.top + aug.scale, aug.left : aug.left + aug.scale] = resized
        out = canvas
    else:
        out = resized[aug.top : aug.top + size, aug.left : aug.left + size].contiguous()
    return out, mask_of(aug)
