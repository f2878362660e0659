"""What the nodes share: their category, the custom socket types, input checks."""

from __future__ import annotations

import logging
import math

from comfy_api.latest import io

log = logging.getLogger("svdiff")

CATEGORY = "SVDiff"
SpectralShiftType = io.Custom("SPECTRAL_SHIFT")
DatasetType = io.Custom("SVDIFF_DATASET")
"""A single-subject ``Dataset`` or a Cut-Mix-Unmix ``MultiSubjectDataset``."""
AttentionType = io.Custom("SVDIFF_ATTENTION")


def require_finite(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} is {value}; set a finite number (1.0 applies the shift as trained, 0 disables it)")
    return float(value)
