"""What the loader nodes' info panel shows: a shift file's summary, and whether it fits a checkpoint.

Pure (no ComfyUI): the server route in ``nodes/routes.py`` resolves names inside the
model folders and calls these. A checkpoint is judged from its safetensors header
alone (names and shapes, no tensor data), so checking a 7 GB SDXL file costs a few
milliseconds; the shift itself is a few hundred KB and is read whole, which also
validates it exactly as the loaders will.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections import Counter
from pathlib import Path

from .fileformat import MAX_HEADER_BYTES, ShiftFileError, read_shift
from .inspection import group_of
from .shift import MODEL_PREFIX, SpectralShift, parse_key
from .targets import ShiftMismatchError, resolve

# Checkpoint key prefixes of the diffusion model, most specific first: full checkpoints
# (model.diffusion_model.*), then bare diffusion-model files (no prefix).
CHECKPOINT_MODEL_PREFIX = "model.diffusion_model."
MAX_LOSS_POINTS = 200


def safetensors_shapes(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    """Metadata and ``{name: shape}`` from a safetensors header; no tensor data is read."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ShiftFileError(f"'{path.name}' is not a .safetensors file (only {size} bytes)")
            (length,) = struct.unpack("<Q", head)
            if length > MAX_HEADER_BYTES or 8 + length > size:
                raise ShiftFileError(f"'{path.name}' is not a .safetensors file or is truncated")
            raw = f.read(length)
    except OSError as exc:
        raise ShiftFileError(f"cannot read '{path.name}': {exc.strerror or exc}") from exc
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, nesting too deep
        raise ShiftFileError(f"'{path.name}' has no valid safetensors header") from exc
    if not isinstance(header, dict):
        raise ShiftFileError(f"'{path.name}' has no valid safetensors header")
    metadata = header.pop("__metadata__", None) or {}
    shapes = {}
    for key, entry in header.items():
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if isinstance(shape, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in shape):
            shapes[key] = tuple(shape)
    return metadata, shapes


def model_shapes(checkpoint_shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The diffusion model's parameters as ComfyUI's ModelPatcher names them (``diffusion_model.*``)."""
    if any(k.startswith(CHECKPOINT_MODEL_PREFIX) for k in checkpoint_shapes):
        start = len("model.")
        return {k[start:]: v for k, v in checkpoint_shapes.items() if k.startswith(CHECKPOINT_MODEL_PREFIX)}
    return {MODEL_PREFIX + k: v for k, v in checkpoint_shapes.items()}


def _downsample(values: list[float], points: int) -> list[float]:
    if len(values) <= points:
        return values
    step = len(values) / points
    return [values[int(i * step)] for i in range(points - 1)] + [values[-1]]


# The training summary is JSON written by this extension, but a file can come from
# anywhere: every field is coerced to the type the panel documents, or dropped.


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _whole(value) -> int | None:
    """An integer field (steps, rank), or None."""
    if _is_number(value) and math.isfinite(value) and float(value).is_integer():
        return int(value)
    return None


def _words(value) -> list[str]:
    """Trigger words from a list of words or a comma-separated string."""
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, list):
        return []
    return [w.strip() for w in value if isinstance(w, str) and w.strip()]


def summary(shift: SpectralShift, path: Path) -> dict:
    """The panel's facts about a shift file, JSON-ready."""
    training = shift.training_summary()
    targets = shift.targets()
    components = Counter(t.component for t in targets.values())
    kinds = Counter(t.kind for t in targets.values())
    blocks = list(dict.fromkeys(group_of(k) for k in shift.tensors))
    triggers = _words(training.get("trigger_words")) or _words(shift.metadata.get("svdiff.trigger_words", ""))
    losses = training.get("losses")
    losses = [float(x) for x in losses if _is_number(x) and math.isfinite(x)] if isinstance(losses, list) else []
    return {
        "file": path.name,
        "bytes": path.stat().st_size,
        "architecture": shift.architecture,
        "source": shift.metadata.get("svdiff.source", "svdiff"),
        "trigger_words": triggers,
        "steps": _whole(training.get("steps")),
        "rank": _whole(training.get("rank")),
        "layers": shift.layer_summary(),
        "model_layers": components.get("model", 0),
        "text_encoder_layers": components.get("clip", 0),
        "spectral": kinds.get("spectral", 0),
        "elementwise": kinds.get("elementwise", 0),
        "values": shift.num_values(),
        "blocks": blocks,
        "losses": _downsample(losses, MAX_LOSS_POINTS),
        "history": shift.history()[-5:],
        "description": shift.metadata.get("svdiff.description", ""),
    }


def fit(shift: SpectralShift, checkpoint: str | os.PathLike, architecture: str | None = None) -> dict:
    """Whether the shift's diffusion-model layers fit a checkpoint file (names and shapes).

    ``status`` is ``fits``, ``does_not_fit`` or ``no_model_layers`` (a text-encoder-only
    shift); ``message`` says which layers do not fit, in the loaders' words. Text-encoder
    layers are not checked here (checkpoints name them differently per family; the
    loader checks them against the loaded CLIP).
    """
    checkpoint = Path(checkpoint)
    _, shapes = safetensors_shapes(checkpoint)
    model_only = SpectralShift(
        {k: t for k, t in shift.tensors.items() if parse_key(k).component == "model"}, shift.metadata, {}, shift.name
    )
    result = {"checkpoint": checkpoint.name, "architecture": architecture, "checked": len(model_only.tensors)}
    if not model_only.tensors:
        return {**result, "status": "no_model_layers", "message": "text-encoder layers only; they are checked when the CLIP is loaded"}
    try:
        resolve(model_only, model_shapes(shapes), None, architecture)
    except ShiftMismatchError as exc:
        return {**result, "status": "does_not_fit", "message": str(exc)}
    message = f"all {len(model_only.tensors)} diffusion-model layers fit {checkpoint.name}"
    if architecture and shift.architecture not in ("unknown", architecture) and not shift.architecture.startswith("SD1/SD2"):
        message += f" (the shift says {shift.architecture}, the checkpoint is {architecture})"
    return {**result, "status": "fits", "message": message}


def describe(path: str | os.PathLike) -> tuple[SpectralShift, dict]:
    """Read and summarise a shift file; :class:`ShiftFileError` says what is wrong with it."""
    path = Path(path)
    shift = read_shift(path)
    return shift, summary(shift, path)
