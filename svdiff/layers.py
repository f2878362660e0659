"""Choosing layers of a shift: UNet blocks by index or resolution level, names.

Block indices are ComfyUI's (LDM) ones: ``input_blocks.N`` (down), ``middle_block``,
``output_blocks.N`` (up). Both SD1.x/2.x (4 levels) and SDXL (3 levels) use two
ResNet blocks per level, so a resolution level ℓ (0 = full latent resolution) is:

* down: ``input_blocks`` 1+3ℓ, 2+3ℓ and the downsampler 3+3ℓ (level 0 also 0, conv_in);
* up:   ``output_blocks`` 3(L−1−ℓ) … 3(L−1−ℓ)+2, L the number of levels (the up path
  starts at the lowest resolution).

Index lists are written ``all``, ``none``, ``0-3, 7``, and levels ``L1`` or ``L0-1``,
freely mixed: ``L2, 0``.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from .shift import SpectralShift, parse_key, pattern_matcher, unet_block

RES_BLOCKS = 2
_TOKEN = re.compile(r"^\s*(l?)\s*(\d+)\s*(?:-\s*(l?)\s*(\d+)\s*)?$", re.IGNORECASE)


def unet_levels(shift: SpectralShift) -> int:
    """Resolution levels of the UNet a shift was made for (SDXL 3, SD1.x/2.x 4).

    Taken from the block indices present when they say more than the architecture
    name (e.g. an imported or combined shift).
    """
    levels = 3 if shift.architecture.startswith("SDXL") else 4
    for key in shift.tensors:
        block = unet_block(parse_key(key).param)
        if block is None or block[0] == "middle":
            continue
        group, index = block
        levels = max(levels, (index - 1) // (RES_BLOCKS + 1) + 1 if group == "input" else index // (RES_BLOCKS + 1) + 1)
    return levels


def _level_blocks(group: str, level: int, levels: int) -> set[int]:
    if group == "input":
        blocks = {1 + 3 * level, 2 + 3 * level, 3 + 3 * level}
        return blocks | {0} if level == 0 else blocks
    first = 3 * (levels - 1 - level)
    return {first, first + 1, first + 2} if first >= 0 else set()


def parse_blocks(text: str, group: str, levels: int, input_name: str) -> set[int] | None:
    """'all' → None (every block); '' / 'none' → ∅; indices, ranges and L-levels → a set."""
    text = text.strip().lower()
    if text == "all":
        return None
    if text in ("", "none"):
        return set()
    chosen: set[int] = set()
    for part in text.split(","):
        match = _TOKEN.match(part)
        if match is None or (match.group(3) and not match.group(1)):  # '1-L2' mixes kinds
            raise ValueError(
                f"{input_name}: '{part.strip()}' is not a block index, range or level; write e.g. 'all', 'none', '0-3, 7' or 'L1'"
            )
        start = int(match.group(2))
        end = int(match.group(4)) if match.group(4) else start
        if end < start:
            raise ValueError(f"{input_name}: range '{part.strip()}' runs backwards; write it the other way round")
        if match.group(1):
            if end >= levels:
                raise ValueError(f"{input_name}: level {end} does not exist; this UNet has levels L0-L{levels - 1}")
            for level in range(start, end + 1):
                chosen |= _level_blocks(group, level, levels)
        else:
            chosen.update(range(start, end + 1))
    return chosen


def layer_selector(
    shift: SpectralShift,
    input_blocks: str = "all",
    middle_block: bool = True,
    output_blocks: str = "all",
    other_unet: bool = True,
    text_encoder: bool = True,
    name_patterns: str = "",
) -> Callable[[str], bool]:
    """Predicate over file keys: the union of every criterion that is switched on."""
    levels = unet_levels(shift)
    down = parse_blocks(input_blocks, "input", levels, "input_blocks")
    up = parse_blocks(output_blocks, "output", levels, "output_blocks")
    by_name = pattern_matcher(name_patterns)

    def chosen(key: str) -> bool:
        if by_name(key):
            return True
        target = parse_key(key)
        if target.component == "clip":
            return text_encoder
        block = unet_block(target.param)
        if block is None:
            return other_unet
        group, index = block
        if group == "middle":
            return middle_block
        blocks = down if group == "input" else up
        return blocks is None or index in blocks

    return chosen
