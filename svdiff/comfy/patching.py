"""Put a spectral shift on a ComfyUI MODEL / CLIP: weight patches or bypass hooks.

Order of work, so that nothing is half-applied and no input is mutated:

1. resolve every key against the model (refuse the whole shift on a mismatch);
2. decompose every targeted base weight (cached; may be cancelled);
3. only then clone the patchers and install the adapters on the clones, through
   ``ModelPatcher.add_patches`` (weight patches) or one injection (bypass mode).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import comfy.utils
import torch

from ..cache import DecompositionCache, content_hash, default_cache
from ..fileformat import HASH_CHARS, encode_base_hashes
from ..shift import SpectralShift, Target
from ..spectral import Decomposition
from ..targets import ResolvedShift, resolve
from .adapter import SpectralShiftAdapter, Terms, is_spectral_patch
from .bypass import BYPASS_KEY, ShiftInjection, bypass_injection, has_activation_form

log = logging.getLogger("svdiff")

Progress = Callable[[int, int], None]
_warned_bases: set[tuple[str, str]] = set()


@dataclass
class ApplyReport:
    """What an apply did, for the node's text output and the log."""

    shift: str
    model_layers: int = 0
    clip_layers: int = 0
    elementwise: int = 0
    skipped_clip: int = 0
    checked_hashes: int = 0
    base_mismatches: int = 0
    decomposed: int = 0
    mode: str = "patch"
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"'{self.shift}': {self.model_layers} model + {self.clip_layers} text-encoder spectral layers"]
        if self.elementwise:
            parts.append(f"{self.elementwise} elementwise deltas")
        if self.decomposed:
            parts.append(f"{self.decomposed} weights decomposed")
        if self.mode != "patch":
            parts.append(f"{self.mode} mode")
        parts.append(f"{self.seconds:.2f} s")
        return ", ".join(parts) + "".join(f"\n{note}" for note in self.notes)


def component_architecture(patcher) -> str | None:
    """The ComfyUI model-config class name (``SD15``, ``SDXL``, ...) of a MODEL."""
    config = getattr(getattr(patcher, "model", None), "model_config", None)
    return type(config).__name__ if config is not None else None


def _base_weights(patcher, params: list[str]) -> dict[str, torch.Tensor]:
    """Unpatched weights of ``params`` (the first entry of ``get_key_patches``)."""
    key_patches = patcher.get_key_patches()
    bases = {}
    for param in params:
        weight, convert = key_patches[param][0]
        bases[param] = convert(weight, inplace=False)
    return bases


def _shapes(patcher) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in patcher.model_state_dict().items()}


def check_fits(model, clip, shift: SpectralShift) -> ResolvedShift:
    """Every key of ``shift`` matched to ``model``/``clip``, or :class:`ShiftMismatchError`."""
    return resolve(
        shift,
        _shapes(model) if model is not None else None,
        _shapes(clip.patcher) if clip is not None else None,
        component_architecture(model) if model is not None else None,
    )


@dataclass
class PreparedComponent:
    """One component (MODEL or CLIP) with its targets resolved and decomposed."""

    component: str  # "model" | "clip"
    patcher: object
    targets: dict[str, Target]
    strength: float
    bases: dict[str, torch.Tensor]
    decompositions: dict[str, Decomposition]


def prepare(
    model,
    clip,
    shift: SpectralShift,
    strength_model: float,
    strength_clip: float,
    report: ApplyReport,
    progress: Progress | None = None,
    cache: DecompositionCache | None = None,
) -> list[PreparedComponent]:
    """Steps 1 and 2: resolve every key, then decompose every targeted base weight.

    A component that is ``None`` or has strength 0 is left out. Raises before any
    patcher is touched.
    """
    cache = cache or default_cache()
    resolved = check_fits(model, clip, shift)
    report.skipped_clip = len(resolved.skipped_clip)
    if resolved.skipped_clip:
        report.notes.append(f"{len(resolved.skipped_clip)} text-encoder tensors not applied: no CLIP connected")
    plan = []
    if model is not None and strength_model != 0:
        plan.append(("model", model, resolved.model, strength_model))
    if clip is not None and strength_clip != 0:
        plan.append(("clip", clip.patcher, resolved.clip, strength_clip))
    total = sum(1 for *_, targets, _ in plan for t in targets.values() if t.kind == "spectral")
    done = 0
    prepared = []
    for component, patcher, targets, strength in plan:
        bases = _base_weights(patcher, sorted({t.param for t in targets.values()}))
        decompositions = {}
        for key, target in targets.items():
            if target.kind != "spectral":
                continue
            before = cache.stats["computed"]
            decompositions[key] = cache.get_or_compute(bases[target.param], content_hash(bases[target.param]))
            report.decomposed += cache.stats["computed"] - before
            done += 1
            if progress is not None:
                progress(done, total)
        _check_base_hashes(shift, targets, bases, report)
        prepared.append(PreparedComponent(component, patcher, targets, strength, bases, decompositions))
    return prepared


MODES = ("patch", "bypass")


def apply_shift(
    model,
    clip,
    shift: SpectralShift,
    strength_model: float,
    strength_clip: float,
    progress: Progress | None = None,
    cache: DecompositionCache | None = None,
    mode: str = "patch",
):
    """Return ``(model', clip', report)``; inputs are never modified.

    ``mode`` "patch" adds ΔW to the weights (ComfyUI's weight patches); "bypass" leaves
    the weights alone and corrects each layer's output in a forward hook (ComfyUI's
    bypass mode, for quantized weights). Either way, shifts already on a weight, in
    either mode, join the new one inside one ReLU. A component whose strength is 0 (or
    that is ``None``) is returned as given.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}; pick one in the node")
    started = time.perf_counter()
    report = ApplyReport(shift.name)
    prepared = prepare(model, clip, shift, strength_model, strength_clip, report, progress, cache)

    # Step 3: install on clones.
    new_model, new_clip = model, clip
    for part in prepared:
        if part.component == "clip":
            new_clip = clip.clone()
            target_patcher = new_clip.patcher
        else:
            new_model = model.clone()
            target_patcher = new_model
        elementwise = {}
        spectral = {}
        for key, target in part.targets.items():
            tensor = shift.tensors[key]
            if target.kind == "spectral":
                spectral[target.param] = ((part.strength, tensor), part.decompositions[key])
            else:
                elementwise[target.param] = ("diff", (tensor,))
        install_spectral(target_patcher, spectral, mode)
        if elementwise:
            target_patcher.add_patches(elementwise, part.strength)
        target_patcher.patches_uuid = uuid.uuid4()
        setattr(report, f"{part.component}_layers", len(part.decompositions))
        report.elementwise += len(elementwise)

    report.mode = mode
    report.seconds = time.perf_counter() - started
    return new_model, new_clip, report


def install_spectral(patcher, spectral: dict[str, tuple[tuple[float, torch.Tensor], Decomposition]], mode: str) -> None:
    """Put one term per weight on ``patcher`` (a clone), merged with the shifts already there.

    ``spectral`` maps a weight key to ``((strength, δ), decomposition)``. Spectral
    adapters already on that weight, as weight patches or in this extension's bypass
    injection, are folded into one adapter (their strengths inside the terms, so the new
    adapter sees Σ sᵢδᵢ inside one ReLU: eqs. 4, 5), which goes where ``mode`` says:

    * "patch": first in the weight's patch list, so ComfyUI hands it the unpatched weight
      whatever LoRAs come after;
    * "bypass": into one injection placed *first* among the patcher's injections, so its
      hooks are innermost and see the bare layer whatever bypass LoRAs are added. Layers
      without an activation form (embeddings: their input is token ids) keep a weight patch.

    The injection gets a new key each time: ComfyUI compares injection keys (not their
    contents) to decide whether a loaded clone already has the right ones.
    """
    current = bypass_injection(patcher)
    bypass = dict(current.adapters) if current is not None else {}
    patched: dict[str, SpectralShiftAdapter] = {}
    for param, (term, decomposition) in spectral.items():
        terms: Terms = ()
        found = None
        entries = patcher.patches.get(param, [])
        for patch in entries:
            if is_spectral_patch(patch):
                terms += tuple((patch[0] * s, d) for s, d in patch[1].terms)
                found = found or patch[1].decomposition
        previous = bypass.pop(param, None)
        if previous is not None:
            terms += tuple((previous.multiplier * s, d) for s, d in previous.terms)
            found = found or previous.decomposition
        strength, delta = term
        adapter = SpectralShiftAdapter.create({param}, terms + ((float(strength), delta),), decomposition or found, key=param)
        # The folded adapters leave (the new one carries their terms); a fresh list, so the
        # patcher this one was cloned from keeps its own.
        others = [patch for patch in entries if not is_spectral_patch(patch)]
        if others:
            patcher.patches[param] = others
        else:
            patcher.patches.pop(param, None)
        if mode == "patch" or not has_activation_form(comfy.utils.get_attr(patcher.model, param.rsplit(".", 1)[0])):
            patched[param] = adapter
        else:
            bypass[param] = adapter
    if patched:
        patcher.add_patches(patched, 1.0, 1.0)
        for param in patched:  # first: ComfyUI hands it the unpatched weight
            entries = patcher.patches[param]
            entries.insert(0, entries.pop())
    if current is None and not bypass:
        return
    kept = {k: v for k, v in patcher.injections.items() if not k.startswith(BYPASS_KEY)}
    patcher.injections = ({f"{BYPASS_KEY}.{uuid.uuid4().hex[:12]}": [ShiftInjection(bypass)]} if bypass else {}) | kept


def _check_base_hashes(shift: SpectralShift, targets: dict[str, Target], bases: dict[str, torch.Tensor], report: ApplyReport) -> None:
    """Same architecture, other checkpoint: apply, but say so (once per pair)."""
    if not shift.base_hashes:
        return
    mismatched = 0
    checked = 0
    for target in targets.values():
        expected = shift.base_hashes.get(target.param)
        if not expected:
            continue
        checked += 1
        if content_hash(bases[target.param])[:HASH_CHARS] != expected:
            mismatched += 1
    report.checked_hashes += checked
    report.base_mismatches += mismatched
    if mismatched:
        note = (
            f"'{shift.name}' was made on a different checkpoint: {mismatched} of {checked} base weights differ. "
            "It is applied anyway; results can differ from what its author saw."
        )
        report.notes.append(note)
        first = min(bases)
        key = (encode_base_hashes(shift), content_hash(bases[first]))
        if key not in _warned_bases:
            _warned_bases.add(key)
            log.warning(note)
