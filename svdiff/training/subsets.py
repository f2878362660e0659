"""Which weights to train: the 12 UNet subsets of the paper's Table 1, plus patterns.

A subset is a predicate over a diffusion-model parameter key (``diffusion_model.…``)
and the parameter's number of dimensions. "CA" is cross-attention (``attn2`` in
ComfyUI's LDM naming); "1-D" are 1-D weights (norm scales, trained elementwise);
"2-D"/"4-D" are linear / convolution weights (spectral shifts). Block subsets take
every weight of the block. Biases are never in a subset unless named by a pattern.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from ..shift import pattern_matcher, unet_block

Predicate = Callable[[str, int], bool]


def _is_weight(key: str) -> bool:
    return key.endswith(".weight")


def _cross_attention(key: str) -> bool:
    return ".attn2." in key


def _in_block(group: str) -> Callable[[str], bool]:
    def inside(key: str) -> bool:
        block = unet_block(key)
        return block is not None and block[0] == group

    return inside


_DOWN, _MID, _UP = _in_block("input"), _in_block("middle"), _in_block("output")

SUBSETS: dict[str, tuple[str, Predicate]] = {
    "UNet": ("all UNet layers", lambda k, d: _is_weight(k) and d >= 1),
    "UNet-CA": ("all cross-attention layers", lambda k, d: _is_weight(k) and d >= 2 and _cross_attention(k)),
    "UNet-CA-KV": ("W^K, W^V of cross-attention", lambda k, d: d >= 2 and (".attn2.to_k.weight" in k or ".attn2.to_v.weight" in k)),
    "UNet-1D": ("all 1-D weights", lambda k, d: _is_weight(k) and d == 1),
    "UNet-2D": ("all 2-D weights", lambda k, d: _is_weight(k) and d == 2),
    "UNet-4D": ("all 4-D weights", lambda k, d: _is_weight(k) and d == 4),
    "Up-Blocks": ("up blocks", lambda k, d: _is_weight(k) and d >= 1 and _UP(k)),
    "Down-Blocks": ("down blocks", lambda k, d: _is_weight(k) and d >= 1 and _DOWN(k)),
    "Mid-Block": ("mid block", lambda k, d: _is_weight(k) and d >= 1 and _MID(k)),
    "Up-CA": ("cross-attention in up blocks", lambda k, d: _is_weight(k) and d >= 2 and _cross_attention(k) and _UP(k)),
    "Down-CA": ("cross-attention in down blocks", lambda k, d: _is_weight(k) and d >= 2 and _cross_attention(k) and _DOWN(k)),
    "Mid-CA": ("cross-attention in the mid block", lambda k, d: _is_weight(k) and d >= 2 and _cross_attention(k) and _MID(k)),
}

CUSTOM = "custom patterns only"


def select_parameters(shapes: Mapping[str, tuple[int, ...]], subset: str, patterns: str = "") -> list[str]:
    """Diffusion-model parameter keys chosen by ``subset`` and/or name ``patterns``.

    ``patterns`` (substring, glob or ``re:`` regex, comma separated) adds keys; with
    ``subset == CUSTOM`` only the patterns choose. Scalars and non-float entries are
    never chosen.
    """
    if subset != CUSTOM and subset not in SUBSETS:
        raise ValueError(f"unknown layer subset '{subset}'; choose one of {', '.join([*SUBSETS, CUSTOM])}")
    in_subset = SUBSETS[subset][1] if subset in SUBSETS else (lambda k, d: False)
    by_name = pattern_matcher(patterns)
    chosen = []
    for key, shape in shapes.items():
        if not key.startswith("diffusion_model.") or len(shape) == 0:
            continue
        if in_subset(key, len(shape)) or by_name(key):
            chosen.append(key)
    return sorted(chosen)
