"""Closed-form concept merge on a ComfyUI MODEL and CLIP (see :mod:`svdiff.merge`).

Text features are what the UNet's cross-attention reads: the CLIP's conditioning
tensor (both encoders' features side by side on SDXL), with the CLIP's own settings
(e.g. CLIPSetLastLayer). As in the reference code, a caption contributes the rows
from its first word after the start token up to and including the end token; a
target prompt contributes the rows from the concept's token (its ``embedding:name``
or word) to the end token, so "a photo of <token> cat" adds "<token> cat</s>".
Captions are encoded as one batch (each caption's first 77-token chunk).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import merge
from ..cache import content_hash, default_cache
from ..shift import SpectralShift, plural
from ..spectral import spectral_update
from ..targets import ShiftMismatchError, resolve
from .folders import LORA_FOLDER, free_paths, save_shift
from .patching import component_architecture
from .progress import NodeProgress
from .tokens import end_token, first_chunk, is_token_id, token_positions

log = logging.getLogger("svdiff")

CAPTIONS_FILE = Path(__file__).parents[1] / "data" / "regularization_captions.txt"
KV_SUFFIXES = (".attn2.to_k.weight", ".attn2.to_v.weight")
EMBEDDING = "embedding:"


def builtin_captions() -> list[str]:
    """The ~200 everyday captions shipped for regularisation (one per line)."""
    return [line.strip() for line in CAPTIONS_FILE.read_text(encoding="utf-8").splitlines() if line.strip()]


@dataclass
class Concept:
    """One fine-tuned concept to merge: its deltas, the token that names it, its target prompts."""

    deltas: SpectralShift
    token: str
    prompts: list[str]

    @property
    def label(self) -> str:
        return f"'{self.deltas.name}' ({self.token})"

    def token_key(self) -> str:
        """What two concepts must not share: the embedding's name, or the word."""
        token = self.token.strip()
        if token.lower().startswith(EMBEDDING):
            name = token[len(EMBEDDING) :].strip()
            return EMBEDDING + re.sub(r"\.(safetensors|pt|bin)$", "", name).replace("\\", "/").lower()
        return token.lower()


def check_concepts(concepts: list[Concept]) -> None:
    """Refuse lists a merged model could not tell apart (shared or cross-used tokens)."""
    if not concepts:
        raise ValueError("concepts: connect at least one 'Concept for Merge (SVDiff)' node")
    seen: dict[str, int] = {}
    for i, concept in enumerate(concepts, start=1):
        if not concept.token.strip():
            raise ValueError(f"concept {i} {concept.label}: token is empty; write its modifier token, e.g. embedding:my_cat")
        if not concept.prompts:
            raise ValueError(f"concept {i} {concept.label}: no target prompts; write at least one, e.g. '{{token}} cat'")
        key = concept.token_key()
        if key in seen:
            raise ValueError(
                f"concepts {seen[key]} and {i} both use the modifier token '{concept.token}'; a merged model cannot tell them "
                "apart — train each concept with its own modifier token (its own embedding name)"
            )
        seen[key] = i
    for i, concept in enumerate(concepts, start=1):
        for j, other in enumerate(concepts, start=1):
            if i != j and any(other.token.strip().lower() in prompt.lower() for prompt in concept.prompts):
                raise ValueError(
                    f"concept {i}'s target prompts contain concept {j}'s token '{other.token.strip()}'; "
                    "each concept's prompts must name that concept only"
                )


# ----------------------------------------------------------------------------------
# Text features


def text_features(clip, captions: list[str], starts: list[int | str]) -> list[torch.Tensor]:
    """Rows ``start … end token`` of each caption's conditioning (float64 on the CPU).

    ``starts[i]`` is a row index, or ``"token:<word>"`` / ``"embedding"`` to start at
    that word's first position / the first embedding vector.
    """
    tokens = [clip.tokenize(caption) for caption in captions]
    keys = sorted(tokens[0]) if tokens else []
    key = "l" if "l" in keys else keys[0]
    end = end_token(clip, key)
    spans = []
    for caption, tok, start in zip(captions, tokens, starts, strict=True):
        flat = first_chunk(tok, key)
        stop = next((i for i in range(1, len(flat)) if is_token_id(flat[i]) and int(flat[i]) == end), None)
        if stop is None:
            raise ValueError(f"the caption '{caption[:60]}' is longer than the text encoder's 77 tokens; shorten it")
        if start == "embedding":
            first = next((i for i, t in enumerate(flat) if not is_token_id(t)), None)
            if first is None:
                raise ValueError(f"the prompt '{caption}' names an embedding that ComfyUI did not find; put it in models/embeddings")
        elif isinstance(start, str):
            first = token_positions(clip, caption, start[len("token:") :])[0]
        else:
            first = start
        spans.append((first, stop + 1))
    # One batch, each caption's first 77-token chunk (ComfyUI's CLIP adds the whole
    # position table, so chunks cannot be cut shorter).
    batch = {k: [tok[k][0] for tok in tokens] for k in keys}
    length = len(batch[key][0])
    with torch.no_grad():
        cond = clip.encode_from_tokens(batch)
    cond = cond.reshape(len(captions), length, cond.shape[-1]).to("cpu", torch.float64)
    return [cond[i, first:stop] for i, (first, stop) in enumerate(spans)]


ENOUGH_CAPTIONS = 150
"""From about this many captions on, "use more captions" is not the advice (the builtin list has about 200)."""

_FEATURES: OrderedDict[str, torch.Tensor] = OrderedDict()
_FEATURES_MAX = 8


def clip_fingerprint(clip) -> str:
    """Identity of what a CLIP computes: a few of its weights, its layer option, its patches."""
    state = clip.patcher.model_state_dict()
    keys = sorted(k for k in state if state[k].ndim >= 2 and state[k].is_floating_point())
    picked = [keys[0], keys[len(keys) // 2], keys[-1]] if keys else []
    parts = [content_hash(state[k]) for k in picked]
    parts.append(repr(getattr(clip, "layer_idx", None)))
    if clip.patcher.patches:
        parts.append(str(clip.patcher.patches_uuid))
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


def regularization_features(clip, captions: list[str]) -> torch.Tensor:
    """Feature rows of the captions, cached in memory and on disk (SD1.5's CLIP-L takes
    about half a minute for 200 captions on two CPU cores; a cache hit takes none)."""
    if not captions:
        raise ValueError("regularization captions: the list is empty; turn on the built-in captions or write one caption per line")
    key = hashlib.sha256((clip_fingerprint(clip) + "\n" + "\n".join(captions)).encode()).hexdigest()[:32]
    if key in _FEATURES:
        _FEATURES.move_to_end(key)
        return _FEATURES[key]
    path = default_cache().directory / "text_features" / f"{key}.safetensors"
    features = None
    if path.is_file():
        try:
            from safetensors.torch import load_file

            features = load_file(str(path))["features"].to(torch.float64)
        except Exception as exc:  # a damaged cache entry is recomputed, never trusted
            log.warning("SVDiff: ignoring the damaged text-feature cache entry %s (%s)", path.name, exc)
    if features is None:
        features = torch.cat(text_features(clip, captions, [1] * len(captions)))  # row 0 is the start token
        try:
            from ..atomic import atomic_save

            atomic_save(path, {"features": features.float().contiguous()}, {"captions": str(len(captions))}, overwrite=True)
            features = features.float().to(torch.float64)  # what a later cache hit returns, bit for bit
        except OSError as exc:
            log.warning("SVDiff: could not cache text features (%s)", exc)
    _FEATURES[key] = features
    while len(_FEATURES) > _FEATURES_MAX:
        _FEATURES.popitem(last=False)
    return features


def target_features(clip, concept: Concept) -> torch.Tensor:
    """The concept's target rows, exact duplicates removed (they carry the same constraint)."""
    start = "embedding" if concept.token.strip().lower().startswith(EMBEDDING) else f"token:{concept.token.strip()}"
    rows = torch.cat(text_features(clip, concept.prompts, [start] * len(concept.prompts)))
    return torch.unique(rows, dim=0, sorted=False) if rows.shape[0] > 1 else rows


# ----------------------------------------------------------------------------------
# The merge


@dataclass
class MergeReport:
    layers: int = 0
    targets: int = 0
    regularization_rows: int = 0
    rank: int = 0
    regularization_rank: int = 0
    width: int = 0
    target_residual_max: float = 0.0
    target_residual_mean: float = 0.0
    regularization_change_max: float = 0.0
    regularization_change_mean: float = 0.0
    per_layer: dict[str, tuple[float, float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def singular(self) -> bool:
        return self.rank < self.targets

    def text(self) -> str:
        head = (
            f"merged {self.layers} K/V layers for {self.targets} target tokens against {self.regularization_rows} caption tokens "
            f"in {self.seconds:.1f} s; residual on targets max {self.target_residual_max:.2e} (mean {self.target_residual_mean:.2e}), "
            f"change on captions max {self.regularization_change_max:.2e} (mean {self.regularization_change_mean:.2e})"
        )
        return "\n".join([head, *self.notes])


def concept_deltas(model, shapes: dict, concept: Concept, index: int, bases: dict[str, torch.Tensor], report: MergeReport):
    """``{param: ΔW}`` of the concept's K/V layers (others are reported and left out)."""
    try:
        resolved = resolve(concept.deltas, shapes, None, component_architecture(model))
    except ShiftMismatchError as exc:
        raise ValueError(f"concept {index} {concept.label} does not fit this model: {exc}") from None
    deltas: dict[str, torch.Tensor] = {}
    other = 0
    for file_key, target in resolved.model.items():
        if target.param not in bases:
            other += 1
            continue
        tensor = concept.deltas.tensors[file_key]
        if target.kind == "elementwise":
            deltas[target.param] = tensor.to(torch.float64)
        else:
            base = bases[target.param]
            decomposition = default_cache().get_or_compute(base, content_hash(base))
            update = spectral_update(decomposition, base, tensor, dtype=torch.float64)
            if update is not None:
                deltas[target.param] = update
    if other:
        report.notes.append(
            f"concept {index} {concept.label} also changes {other} layers that are not cross-attention K/V; "
            "only its K/V changes are merged (closed form covers K/V only)"
        )
    if resolved.skipped_clip:
        report.notes.append(f"concept {index} {concept.label}: {len(resolved.skipped_clip)} text-encoder tensors are not part of a merge")
    if not deltas:
        report.notes.append(f"concept {index} {concept.label} changes no cross-attention K/V layer; it constrains the merge to the base")
    return deltas


def merge_concepts(model, clip, concepts: list[Concept], captions: list[str], progress=None):
    """``(merged model clone, {param: W − W₀}, MergeReport)``; inputs are never modified."""
    started = time.perf_counter()
    check_concepts(concepts)
    if clip is None:
        raise ValueError("clip: connect the CLIP that encodes your prompts (it gives the text features of the merge)")
    report = MergeReport()
    shapes = {k: tuple(v.shape) for k, v in model.model_state_dict().items()}
    keys = sorted(k for k in shapes if k.startswith("diffusion_model.") and k.endswith(KV_SUFFIXES) and len(shapes[k]) == 2)
    if not keys:
        raise ValueError("the MODEL has no cross-attention K/V layers (attn2.to_k / to_v); the merge needs a UNet such as SD1.x or SDXL")
    key_patches = model.get_key_patches()
    bases = {}
    for key in keys:
        weight, convert = key_patches[key][0]
        bases[key] = convert(weight, inplace=False).to(torch.float32)
    width = shapes[keys[0]][1]
    regularization = regularization_features(clip, captions)
    if regularization.shape[1] != width:
        raise ValueError(
            f"the CLIP gives text features of width {regularization.shape[1]}, the MODEL's cross-attention reads {width}; "
            "connect the CLIP of the same checkpoint"
        )
    targets, owners, all_deltas = [], [], []
    for index, concept in enumerate(concepts, start=1):
        rows = target_features(clip, concept)
        targets.append(rows)
        owners.append(rows.shape[0])
        all_deltas.append(concept_deltas(model, shapes, concept, index, bases, report))
    target_rows = torch.cat(targets)
    system = merge.build_system(regularization, target_rows)
    report.targets, report.rank = target_rows.shape[0], system.rank
    report.regularization_rows, report.regularization_rank, report.width = regularization.shape[0], system.regularization_rank, width
    if system.singular:
        report.notes.append(
            f"singular system: the concepts' target tokens give linearly dependent text features (rank {system.rank} of "
            f"{target_rows.shape[0]}), so no model matches every concept exactly; solved by least squares instead"
        )
    if system.regularization_rank < width:
        missing = width - system.regularization_rank
        advice = (
            "use more captions (about 200) to keep the base model's behaviour everywhere"
            if len(captions) < ENOUGH_CAPTIONS
            else f"the {plural(missing, 'direction')} they miss are kept near the base only by the merge's ridge term; "
            "more varied captions would cover them"
        )
        report.notes.append(
            f"the {plural(len(captions), 'regularisation caption')} span {system.regularization_rank} of {width} "
            f"text-feature directions; {advice}"
        )
    patches: dict[str, torch.Tensor] = {}
    residuals, changes = [], []
    for done, key in enumerate(keys, start=1):
        base = bases[key].to(torch.float64)
        outputs = []
        for rows, deltas in zip(targets, all_deltas, strict=True):
            weight = base + deltas[key] if key in deltas else base
            outputs.append(weight @ rows.T)
        result = merge.merge_layer(system, base, torch.cat(outputs, dim=1))
        patches[key] = (result.weight - base).to(torch.float32)
        residuals.append(result.target_residual)
        changes.append(result.regularization_change)
        report.per_layer[key] = (result.target_residual, result.regularization_change)
        if progress is not None:
            progress(done, len(keys))
    report.layers = len(keys)
    report.target_residual_max, report.target_residual_mean = max(residuals), sum(residuals) / len(residuals)
    report.regularization_change_max, report.regularization_change_mean = max(changes), sum(changes) / len(changes)
    merged = model.clone()
    merged.add_patches({key: ("diff", (delta,)) for key, delta in patches.items()}, 1.0)
    report.seconds = time.perf_counter() - started
    return merged, patches, report


def merge_to_file(model, clip, concepts: list[Concept], captions: list[str], filename_prefix: str, node_id=None):
    """``(merged MODEL, deltas, report text)``; the deltas also go to models/loras when ``filename_prefix`` is set."""
    target = free_paths(filename_prefix, [LORA_FOLDER], False)[LORA_FOLDER] if filename_prefix.strip() else None
    merged, patches, report = merge_concepts(model, clip, concepts, captions, progress=NodeProgress(node_id, 1))
    tensors = {key[: -len(".weight")] + ".diff": delta for key, delta in patches.items()}
    metadata = {
        "svdiff.architecture": type(model.model.model_config).__name__,
        "svdiff.method": "custom-diffusion-merge",
        "svdiff.concepts": json.dumps([{"deltas": c.deltas.name, "token": c.token, "prompts": c.prompts} for c in concepts]),
        "svdiff.trigger_words": ", ".join(c.token for c in concepts),
    }
    shift = SpectralShift(tensors, metadata, {}, name=target.stem if target else "merged")
    text = report.text()
    if target is not None:
        shift = save_shift(shift, target)
        text += f"\nsaved models/loras/{target.name}"
    log.info("SVDiff %s", text)
    return merged, shift, text
