"""The training state beside a shift file (``<name>.svdiffstate``), for an exact resume.

A shift file stores δ rounded to its precision (fp16 by default); the state keeps every
trained tensor in float32 and the optimizer moments (``Trainer.state_tensors``), and says
which file and which step it belongs to, so a state of another step is never used.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ..atomic import atomic_save
from ..shift import SpectralShift

log = logging.getLogger("svdiff")

SUFFIX = ".svdiffstate"


def _steps(shift: SpectralShift) -> str:
    return str(shift.training_summary().get("steps", ""))


def write_state(shift_path: Path, state: dict[str, torch.Tensor], shift: SpectralShift) -> Path:
    """Write ``state`` beside ``shift_path`` (replacing an older state of that file)."""
    return atomic_save(
        shift_path.with_suffix(SUFFIX),
        {k: v.contiguous().cpu() for k, v in state.items()},
        {"svdiff.state_for": shift_path.name, "svdiff.steps": _steps(shift)},
        overwrite=True,
    )


def read_state(shift_path: Path, shift: SpectralShift) -> dict[str, torch.Tensor] | None:
    """The state saved beside ``shift_path``, if there is one for ``shift``'s step."""
    sidecar = shift_path.with_suffix(SUFFIX)
    if not sidecar.is_file():
        return None
    with safe_open(str(sidecar), framework="pt") as f:
        steps = (f.metadata() or {}).get("svdiff.steps")
    expected = _steps(shift)
    if steps is not None and steps != expected:
        log.warning("resume_from: %s is the state of step %s, the file is at step %s: not used", sidecar.name, steps, expected)
        return None
    return load_file(str(sidecar))
