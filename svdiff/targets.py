"""Match a shift's keys to a model's parameters, or explain why they do not fit.

Pure bookkeeping over ``{param: shape}`` maps, so the rules are testable without
ComfyUI: every key must name an existing parameter, a δ may be at most as long as
the weight's spectrum (shorter is a rank-limited shift), and an elementwise delta
must have the parameter's exact shape. A shift that does not fit is refused as a
whole; nothing is half-applied.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from .shift import WEIGHT_DIFF_SUFFIX, SpectralShift, Target, parse_key
from .spectral import spectrum_length

Shapes = Mapping[str, tuple[int, ...]]
MAX_LISTED = 5


class ShiftMismatchError(ValueError):
    """The shift does not fit the model; the message lists what does not fit."""


@dataclass
class ResolvedShift:
    """The keys of a shift that apply, with their parameters in the model/CLIP."""

    model: dict[str, Target] = field(default_factory=dict)
    clip: dict[str, Target] = field(default_factory=dict)
    skipped_clip: list[str] = field(default_factory=list)


def _retarget_clip(param: str, clip_shapes: Shapes, shift: SpectralShift) -> str:
    """svdiff-pytorch text-encoder keys are written for SD1.x (clip_l); SD2.x uses clip_h."""
    if param in clip_shapes or shift.metadata.get("svdiff.source") != "svdiff-pytorch":
        return param
    if param.startswith("clip_l."):
        alternative = "clip_h." + param[len("clip_l.") :]
        if alternative in clip_shapes:
            return alternative
    return param


def resolve(
    shift: SpectralShift,
    model_shapes: Shapes | None,
    clip_shapes: Shapes | None,
    model_architecture: str | None = None,
) -> ResolvedShift:
    """Check every key of ``shift`` against the given components.

    ``clip_shapes`` may be ``None`` (no CLIP connected): text-encoder keys are then
    reported in ``skipped_clip`` rather than refused, as ComfyUI's model-only LoRA
    loader does. Raises :class:`ShiftMismatchError` naming the first few problems.
    """
    resolved = ResolvedShift()
    problems: list[tuple[str, str]] = []  # (component, what is wrong)
    checked: Counter[str] = Counter()
    for key, tensor in shift.tensors.items():
        target = parse_key(key)
        if target.component == "clip":
            if clip_shapes is None:
                resolved.skipped_clip.append(key)
                continue
            param = _retarget_clip(target.param, clip_shapes, shift)
            target = Target("clip", param, target.kind)
            shapes = clip_shapes
            checked["clip"] += 1
        else:
            checked["model"] += 1
            if model_shapes is None:
                problems.append(("model", f"'{key}' targets the diffusion model, which is not connected"))
                continue
            shapes = model_shapes
        shape = shapes.get(target.param)
        if shape is None and key.endswith(WEIGHT_DIFF_SUFFIX):
            # ComfyUI's generic LoRA format also addresses 1-D parameters that are not
            # called "weight" (Flux's RMSNorm ".scale") as "<full name>.diff".
            stem = target.param[: -len(".weight")]
            if stem in shapes:
                target = Target(target.component, stem, target.kind)
                shape = shapes[stem]
        if shape is None:
            where = "text encoder" if target.component == "clip" else "model"
            problems.append((target.component, f"'{key}': the {where} has no parameter '{target.param}'"))
            continue
        problem = _shape_problem(key, target, tuple(tensor.shape), tuple(shape))
        if problem:
            problems.append((target.component, problem))
            continue
        getattr(resolved, target.component)[key] = target
    if problems:
        raise ShiftMismatchError(_mismatch_message(shift, problems, checked, model_architecture))
    return resolved


def _shape_problem(key: str, target: Target, tensor_shape: tuple[int, ...], param_shape: tuple[int, ...]) -> str | None:
    if target.kind == "spectral":
        if len(param_shape) == 0:
            return f"'{key}': parameter '{target.param}' is a scalar and has no spectrum"
        rank = spectrum_length(param_shape)
        if tensor_shape[0] > rank:
            return (
                f"'{key}' has {tensor_shape[0]} singular-value shifts but '{target.param}' "
                f"{list(param_shape)} has only {rank} singular values"
            )
        return None
    if tensor_shape != param_shape:
        return f"'{key}' has shape {list(tensor_shape)} but '{target.param}' has shape {list(param_shape)}"
    return None


NAMES = {"model": "diffusion-model", "clip": "text-encoder"}


def _mismatch_message(shift: SpectralShift, problems: list[tuple[str, str]], checked: Counter, model_architecture: str | None) -> str:
    head = f"spectral shift '{shift.name}' does not fit this model"
    arch = shift.architecture
    if model_architecture and arch not in ("unknown", model_architecture):
        head += f" (the shift was made for {arch}, the model is {model_architecture})"
    listed = "; ".join(text for _, text in problems[:MAX_LISTED])
    more = f"; and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    bad = Counter(component for component, _ in problems)
    components = [c for c in ("model", "clip") if checked[c]]
    if len(components) == 1:
        count = f"{len(problems)} of {checked[components[0]]} {NAMES[components[0]]} tensors do not fit"
    else:
        parts = ", ".join(f"{bad[c]} of {checked[c]} {NAMES[c]}" for c in components)
        count = f"{len(problems)} of {sum(checked.values())} tensors do not fit ({parts})"
    return f"{head}: {count}: {listed}{more}. Use a shift made for this architecture, or drop those layers with SVDiffSelectLayers."
