"""The in-memory spectral shift: tensors keyed as in the file, plus metadata.

A shift is a flat mapping from file keys to tensors, exactly the tensors of a
format-v1 file (README, "File format"):

    diffusion_model.<P>.delta   δ for the diffusion-model weight  diffusion_model.<P>.weight
    text_encoders.<C>.delta     δ for the text-encoder weight     <C>.weight (CLIP state dict)
    <prefix>.diff               elementwise delta for a 1-D weight  <prefix>.weight
    <prefix>.diff_b             elementwise delta for a bias        <prefix>.bias

The prefixes are the ones ComfyUI already uses for generic LoRA keys, so a shift file
is also a valid input for ComfyUI's LoRA loader.

Combination rules (paper eqs. 4, 5 and appendix E.3) live here because they are
pure functions of δ: ``weight_a·δa + weight_b·δb`` per key, with shorter
(rank-limited) shifts zero-padded, so add, interpolate and scale are special cases.
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

import torch

MODEL_PREFIX = "diffusion_model."
CLIP_PREFIX = "text_encoders."
SPECTRAL_SUFFIX = ".delta"
WEIGHT_DIFF_SUFFIX = ".diff"
BIAS_DIFF_SUFFIX = ".diff_b"

Component = Literal["model", "clip"]
Kind = Literal["spectral", "elementwise"]


@dataclass(frozen=True)
class Target:
    """Where one tensor of a shift goes.

    ``param`` is the key in the component's state dict: ``diffusion_model.…`` for the
    MODEL, ``clip_l.transformer.…`` (etc.) for the CLIP's text encoders.
    """

    component: Component
    param: str
    kind: Kind


def parse_key(key: str) -> Target:
    """Map a file key to its :class:`Target`; ``ValueError`` names what is wrong."""
    if key.endswith(BIAS_DIFF_SUFFIX):
        stem, param_suffix, kind = key[: -len(BIAS_DIFF_SUFFIX)], ".bias", "elementwise"
    elif key.endswith(WEIGHT_DIFF_SUFFIX):
        stem, param_suffix, kind = key[: -len(WEIGHT_DIFF_SUFFIX)], ".weight", "elementwise"
    elif key.endswith(SPECTRAL_SUFFIX):
        stem, param_suffix, kind = key[: -len(SPECTRAL_SUFFIX)], ".weight", "spectral"
    else:
        raise ValueError(f"key '{key}' does not end in .delta, .diff or .diff_b")
    if stem.startswith(MODEL_PREFIX) and len(stem) > len(MODEL_PREFIX):
        return Target("model", stem + param_suffix, kind)
    if stem.startswith(CLIP_PREFIX) and len(stem) > len(CLIP_PREFIX):
        return Target("clip", stem[len(CLIP_PREFIX) :] + param_suffix, kind)
    raise ValueError(f"key '{key}' starts with neither '{MODEL_PREFIX}' nor '{CLIP_PREFIX}'")


def file_key(target: Target) -> str:
    """Inverse of :func:`parse_key`."""
    param = target.param
    if param.endswith(".bias"):
        if target.kind != "elementwise":
            raise ValueError(f"a bias takes an elementwise delta, not a spectral shift: {param}")
        stem, suffix = param[: -len(".bias")], BIAS_DIFF_SUFFIX
    elif param.endswith(".weight"):
        stem = param[: -len(".weight")]
        suffix = SPECTRAL_SUFFIX if target.kind == "spectral" else WEIGHT_DIFF_SUFFIX
    else:
        raise ValueError(f"parameter '{param}' is neither a .weight nor a .bias")
    if target.component == "clip":
        stem = CLIP_PREFIX + stem
    return stem + suffix


@dataclass
class SpectralShift:
    """A set of spectral shifts and elementwise deltas, with string metadata.

    ``tensors`` maps file keys to float32 tensors (1-D δ for ``.delta``; any shape for
    ``.diff``/``.diff_b``). ``metadata`` holds the ``svdiff.*`` strings of the file;
    ``base_hashes`` maps each target parameter key to a short content hash of the
    base weight the shift was made on (empty when unknown).
    """

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    base_hashes: dict[str, str] = field(default_factory=dict)
    name: str = "spectral shift"

    def __post_init__(self) -> None:
        for key in self.tensors:
            parse_key(key)

    def targets(self) -> dict[str, Target]:
        return {key: parse_key(key) for key in self.tensors}

    def keys_for(self, component: Component) -> list[str]:
        return [key for key, target in self.targets().items() if target.component == component]

    @property
    def architecture(self) -> str:
        return self.metadata.get("svdiff.architecture", "unknown")

    def num_values(self) -> int:
        return sum(t.numel() for t in self.tensors.values())

    def layer_counts(self) -> dict[str, int]:
        """How many tensors of each kind: spectral layers of the diffusion model and of the
        text encoder, elementwise deltas (any component). Every count shown anywhere
        (Inspect, the loader panel, apply reports) is this one."""
        targets = self.targets().values()
        return {
            "model_spectral": sum(1 for t in targets if t.kind == "spectral" and t.component == "model"),
            "clip_spectral": sum(1 for t in targets if t.kind == "spectral" and t.component == "clip"),
            "elementwise": sum(1 for t in targets if t.kind == "elementwise"),
        }

    def layer_summary(self) -> str:
        """:meth:`layer_counts` in words, e.g. "27 diffusion-model + 75 text-encoder spectral layers, 36 elementwise deltas"."""
        return layer_summary(**self.layer_counts())

    def training_summary(self) -> dict:
        """The ``svdiff.training`` JSON of later issues (trigger words, steps, ...)."""
        value = parse_json_metadata(self.metadata.get("svdiff.training"))
        return value if isinstance(value, dict) else {}

    def history(self) -> list[str]:
        """The operations that made this shift (``svdiff.history``), oldest first."""
        return _history(self.metadata)

    def with_tensors(self, tensors: dict[str, torch.Tensor], operation: str) -> SpectralShift:
        """A new shift with other tensors, the same metadata and an entry in its history."""
        metadata = dict(self.metadata)
        history = _history(metadata)
        history.append(operation)
        metadata["svdiff.history"] = json.dumps(history[-50:])
        hashes = {}
        for key in tensors:
            param = parse_key(key).param
            if param in self.base_hashes:
                hashes[param] = self.base_hashes[param]
        return SpectralShift(tensors, metadata, hashes, self.name)


def parse_json_metadata(raw: str | None):
    """A JSON metadata value, or None when it is missing or unusable.

    Metadata comes from files of any origin: malformed JSON, nesting deeper than the
    parser's recursion limit and non-text values all read as None, never as an error.
    """
    if not raw or not isinstance(raw, str):
        return None
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return None


def _history(metadata: dict[str, str]) -> list[str]:
    history = parse_json_metadata(metadata.get("svdiff.history"))
    return [h if isinstance(h, str) else json.dumps(h, allow_nan=True)[:200] for h in history] if isinstance(history, list) else []


def _pad_to(t: torch.Tensor, length: int) -> torch.Tensor:
    if t.shape[0] == length:
        return t
    return torch.cat([t, t.new_zeros(length - t.shape[0])])


def combine(a: SpectralShift, weight_a: float, b: SpectralShift | None = None, weight_b: float = 0.0) -> SpectralShift:
    """Per key ``weight_a·δa + weight_b·δb`` (eqs. 4, 5; scale is E.3).

    Keys present in only one shift keep that shift's tensor scaled by its weight.
    Rank-limited spectral shifts of different lengths are zero-padded to the
    longer one: a missing singular value has shift 0.
    """
    if b is None:
        tensors = {key: t * weight_a for key, t in a.tensors.items()}
        return a.with_tensors(tensors, f"scale {weight_a:g}")
    out: dict[str, torch.Tensor] = {}
    for key in sorted(set(a.tensors) | set(b.tensors)):
        ta, tb = a.tensors.get(key), b.tensors.get(key)
        if ta is None:
            out[key] = tb * weight_b
            continue
        if tb is None:
            out[key] = ta * weight_a
            continue
        if parse_key(key).kind == "spectral":
            length = max(ta.shape[0], tb.shape[0])
            ta, tb = _pad_to(ta, length), _pad_to(tb, length)
        elif ta.shape != tb.shape:
            raise ValueError(f"'{key}' has shape {tuple(ta.shape)} in '{a.name}' but {tuple(tb.shape)} in '{b.name}'")
        out[key] = ta * weight_a + tb * weight_b
    result = a.with_tensors(out, f"combine {weight_a:g}·[{a.name}] + {weight_b:g}·[{b.name}]")
    result.base_hashes = _merge_hashes(a, b, out)
    if a.architecture != b.architecture:
        result.metadata["svdiff.architecture"] = f"{a.architecture}+{b.architecture}"
    result.name = f"{a.name}+{b.name}"
    return result


def _merge_hashes(a: SpectralShift, b: SpectralShift, tensors: Iterable[str]) -> dict[str, str]:
    """Per-parameter base hashes of a combination; '' where the two disagree."""
    hashes = {}
    for key in tensors:
        param = parse_key(key).param
        ha, hb = a.base_hashes.get(param), b.base_hashes.get(param)
        if ha and hb and ha != hb:
            hashes[param] = ""
        elif ha or hb:
            hashes[param] = ha or hb
    return hashes


# ----------------------------------------------------------------------------------
# Layer selection: blocks of the SD UNet and name patterns.

_BLOCK = re.compile(r"^diffusion_model\.(input_blocks|middle_block|output_blocks)\.(\d+)\.")


def unet_block(param: str) -> tuple[str, int] | None:
    """``("input"|"middle"|"output", index)`` of a UNet parameter, else ``None``.

    These are ComfyUI's (LDM) block names: ``input_blocks.N`` are the down blocks,
    ``middle_block`` the mid block, ``output_blocks.N`` the up blocks.
    """
    match = _BLOCK.match(param)
    if match is None:
        return None
    group = {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}[match.group(1)]
    index = int(match.group(2)) if group != "middle" else 0
    return group, index


def pattern_matcher(patterns: str) -> Callable[[str], bool]:
    """A predicate from comma/newline-separated patterns.

    A pattern containing ``*``, ``?`` or ``[`` is a glob on the file key; one that
    starts with ``re:`` is a regular expression searched in the key; anything else
    matches as a substring. An empty list matches nothing.
    """
    compiled: list[Callable[[str], bool]] = []
    for raw in re.split(r"[,\n]", patterns):
        pattern = raw.strip()
        if not pattern:
            continue
        if pattern.startswith("re:"):
            try:
                regex = re.compile(pattern[3:])
            except re.error as exc:
                raise ValueError(
                    f"name_patterns: invalid regular expression '{pattern[3:]}' ({exc}); fix it, "
                    "or drop the 're:' prefix to match a plain substring"
                ) from exc
            compiled.append(lambda key, regex=regex: regex.search(key) is not None)
        elif any(ch in pattern for ch in "*?["):
            compiled.append(lambda key, pattern=pattern: fnmatch.fnmatchcase(key, pattern))
        else:
            compiled.append(lambda key, pattern=pattern: pattern in key)
    return lambda key: any(match(key) for match in compiled)


def select(shift: SpectralShift, keep: Callable[[str], bool], description: str) -> SpectralShift:
    """The shift restricted to the file keys for which ``keep(key)`` is true."""
    tensors = {key: t for key, t in shift.tensors.items() if keep(key)}
    return shift.with_tensors(tensors, f"select {description}")


def plural(count: int, word: str, words: str | None = None) -> str:
    """``"1 caption"``, ``"2 captions"``."""
    return f"{count:,} {word if count == 1 else (words or word + 's')}"


def layer_summary(model_spectral: int, clip_spectral: int, elementwise: int) -> str:
    """The words every count of a shift's tensors is shown in (see ``SpectralShift.layer_counts``)."""
    text = f"{model_spectral} diffusion-model + {clip_spectral} text-encoder spectral layers"
    return text + (f", {plural(elementwise, 'elementwise delta')}" if elementwise else "")
