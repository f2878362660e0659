"""Reading and writing spectral-shift files (format v1, .safetensors only).

Never unpickles: a file that is not safetensors is refused with a message that says
what it is. Writes are atomic (temporary file in the same folder, fsync, then a
no-clobber link or rename, ``svdiff/atomic.py``), so a crash leaves the old file or none.

Also imports the files written by the popular unofficial svdiff-pytorch
(``spectral_shifts.safetensors`` with diffusers module names + ``.delta``, and a
sibling ``spectral_shifts_te.safetensors`` for the text encoder).
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from . import diffusers_names
from .atomic import atomic_save
from .shift import MODEL_PREFIX, SPECTRAL_SUFFIX, SpectralShift, parse_key

log = logging.getLogger("svdiff")

FORMAT_VERSION = 1
HASH_CHARS = 8
UNKNOWN_HASH = "-" * HASH_CHARS
# safetensors refuses headers above 100 MB. A shift's header (tensor list + metadata)
# is a few tens of KB for a full SDXL shift; anything above this is not a shift, or
# carries bloated metadata that every listing and inspection would have to parse.
MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_SHIFT_HEADER_BYTES = 16 * 1024 * 1024
# Largest magnitude stored as float16 without overflow (float16 max is 65504).
FP16_SAFE_MAX = 60000.0
SVDIFF_PYTORCH_TE_FILE = "spectral_shifts_te.safetensors"


class ShiftFileError(ValueError):
    """A shift file that cannot be used; the message names the file and the fix."""


# ----------------------------------------------------------------------------------
# Reading


def read_shift(path: str | os.PathLike) -> SpectralShift:
    """Load a v1 or svdiff-pytorch file into a :class:`SpectralShift` (float32)."""
    path = Path(path)
    name = path.name
    metadata, keys = _read_header(path)
    fmt = metadata.get("svdiff.format")
    if fmt is not None:
        if fmt != str(FORMAT_VERSION):
            if fmt.isascii() and fmt.isdigit() and int(fmt) > FORMAT_VERSION:
                raise ShiftFileError(
                    f"'{name}' uses spectral-shift format {fmt}, newer than this extension reads ({FORMAT_VERSION}); update ComfyUI-SVDiff"
                )
            raise ShiftFileError(f"'{name}' declares an unknown spectral-shift format '{fmt[:40]}'")
        return _read_v1(path, metadata, keys)
    if keys and all(_is_ours(k) for k in keys):
        log.warning("'%s' has no svdiff.format metadata; reading it as format %d", name, FORMAT_VERSION)
        return _read_v1(path, metadata, keys)
    if keys and all(k.endswith(SPECTRAL_SUFFIX) or k.startswith("modifier_tokens.") for k in keys):
        return _read_svdiff_pytorch(path, metadata, keys)
    raise ShiftFileError(_foreign_file_message(name, keys))


def _is_ours(key: str) -> bool:
    try:
        parse_key(key)
    except ValueError:
        return False
    return True


def _foreign_file_message(name: str, keys: list[str]) -> str:
    if not keys:
        return f"'{name}' contains no tensors; it is not a spectral-shift file"
    sample = keys[0]
    if any(".lora_up." in k or ".lora_down." in k or "lora_A" in k or "lora_B" in k for k in keys):
        return f"'{name}' is a LoRA (e.g. key '{sample}'), not a spectral shift; load it with a LoRA loader"
    return (
        f"'{name}' is not a spectral-shift file: key '{sample}' is neither a v1 key "
        f"(diffusion_model.* / text_encoders.* ending in .delta, .diff or .diff_b) nor an svdiff-pytorch .delta key"
    )


def _read_header(path: Path) -> tuple[dict[str, str], list[str]]:
    """Validate the container before safetensors parses it; return metadata and keys."""
    name = path.name
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            start = f.read(9)
    except OSError as exc:
        raise ShiftFileError(f"cannot read '{name}': {exc.strerror or exc}") from exc
    if size == 0:
        raise ShiftFileError(f"'{name}' is empty (0 bytes); the download or save was interrupted — get the file again")
    head = start[:8]
    # safetensors: an 8-byte little-endian header length, then the JSON header "{".
    # Check that signature first: a header length of 128 + 256·k starts with 0x80,
    # the same byte as a pickle.
    looks_safetensors = len(start) == 9 and start[8:9] == b"{"
    if not looks_safetensors and (start[:2] == b"PK" or (start[:1] == b"\x80" and start[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"))):
        raise ShiftFileError(
            f"'{name}' is a pickled PyTorch file; SVDiff never unpickles files. "
            "Convert it to .safetensors in an environment you trust, or ask its author for a .safetensors file"
        )
    if len(head) < 8:
        raise ShiftFileError(f"'{name}' is truncated ({size} bytes); it is not a complete .safetensors file")
    (header_len,) = struct.unpack("<Q", head)
    if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
        raise ShiftFileError(
            f"'{name}' is truncated or not a .safetensors file (its header claims {header_len} bytes, "
            f"the file has {size}); get the file again"
        )
    if header_len > MAX_SHIFT_HEADER_BYTES:
        raise ShiftFileError(
            f"'{name}' has a {header_len / 2**20:.1f} MB header (tensor list and metadata); spectral-shift files have "
            f"a few hundred KB at most ({MAX_SHIFT_HEADER_BYTES // 2**20} MB allowed). It is not a shift file or its "
            "metadata was bloated; get a clean copy of the file"
        )
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            keys = list(f.keys())
    except (SafetensorError, OSError, ValueError, UnicodeDecodeError) as exc:
        if "not fully covered" in str(exc):
            raise ShiftFileError(f"'{name}' is truncated: its tensor data ends early; get the file again") from exc
        raise ShiftFileError(f"'{name}' is not a valid .safetensors file ({_short(exc)}); get the file again") from exc
    return metadata, keys


def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:200]


def _load_tensors(path: Path, keys: list[str]) -> dict[str, torch.Tensor]:
    name = path.name
    tensors = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in keys:
                tensors[key] = f.get_tensor(key)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ShiftFileError(f"'{name}' could not be read ({_short(exc)}); get the file again") from exc
    for key, t in tensors.items():
        if not t.is_floating_point():
            raise ShiftFileError(f"'{name}': tensor '{key}' has dtype {t.dtype}; shifts must be floating point")
        tensors[key] = t.to(torch.float32)
    return tensors


def check_tensors(name: str, tensors: dict[str, torch.Tensor]) -> None:
    """Shape and finiteness checks that do not need a model."""
    if not tensors:
        raise ShiftFileError(f"'{name}' contains no spectral shifts")
    for key, t in tensors.items():
        target = parse_key(key)
        if target.kind == "spectral" and (t.ndim != 1 or t.numel() == 0):
            raise ShiftFileError(f"'{name}': '{key}' must be a non-empty vector of singular-value shifts, got shape {tuple(t.shape)}")
        if not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise ShiftFileError(f"'{name}': '{key}' contains {bad} NaN/Inf values; the file is corrupt or training diverged")


def _read_v1(path: Path, metadata: dict[str, str], keys: list[str]) -> SpectralShift:
    name = path.name
    unknown = [k for k in keys if not _is_ours(k)]
    if unknown:
        raise ShiftFileError(
            f"'{name}': unexpected key '{unknown[0]}' ({len(unknown)} in all); v1 keys are "
            "diffusion_model.* or text_encoders.* ending in .delta, .diff or .diff_b"
        )
    tensors = _load_tensors(path, keys)
    check_tensors(name, tensors)
    hashes = decode_base_hashes(metadata.get("svdiff.base_hashes", ""), tensors)
    return SpectralShift(tensors, metadata, hashes, name=path.stem)


def _read_svdiff_pytorch(path: Path, metadata: dict[str, str], keys: list[str]) -> SpectralShift:
    """svdiff-pytorch: diffusers module names; one scalar δ per norm layer; TE file beside."""
    try:
        return _import_svdiff_pytorch(path, metadata, keys)
    except diffusers_names.UnknownModuleError as exc:
        raise ShiftFileError(str(exc)) from None


def _import_svdiff_pytorch(path: Path, metadata: dict[str, str], keys: list[str]) -> SpectralShift:
    name = path.name
    skipped = [k for k in keys if k.startswith("modifier_tokens.")]
    tensors: dict[str, torch.Tensor] = {}
    raw = _load_tensors(path, [k for k in keys if k not in skipped])
    te_path = path.with_name(SVDIFF_PYTORCH_TE_FILE)
    is_te_file = path.name == SVDIFF_PYTORCH_TE_FILE
    for key, t in raw.items():
        module = key[: -len(SPECTRAL_SUFFIX)]
        if is_te_file:
            tensors[diffusers_names.text_encoder_key(module)] = t
        else:
            tensors[MODEL_PREFIX + diffusers_names.unet_module_to_ldm(module, name) + SPECTRAL_SUFFIX] = t
    if not is_te_file and te_path.is_file():
        te_meta, te_keys = _read_header(te_path)
        te_skipped = [k for k in te_keys if k.startswith("modifier_tokens.")]
        skipped += te_skipped
        te_raw = _load_tensors(te_path, [k for k in te_keys if k not in te_skipped and k.endswith(SPECTRAL_SUFFIX)])
        for key, t in te_raw.items():
            tensors[diffusers_names.text_encoder_key(key[: -len(SPECTRAL_SUFFIX)])] = t
    if skipped:
        log.warning(
            "'%s': %d modifier-token embeddings (%s) are not applied by the importer; "
            "use the token in a prompt only with its embedding loaded separately",
            name,
            len(skipped),
            ", ".join(skipped[:3]),
        )
    check_tensors(name, tensors)
    meta = {
        "svdiff.format": str(FORMAT_VERSION),
        "svdiff.architecture": "SD1/SD2 (svdiff-pytorch import)",
        "svdiff.source": "svdiff-pytorch",
        "svdiff.imported_from": name,
    }
    return SpectralShift(tensors, meta, {}, name=path.parent.name if path.stem == "spectral_shifts" else path.stem)


# ----------------------------------------------------------------------------------
# Base-weight hashes: one short content hash per target parameter, stored compactly
# as a concatenation in sorted parameter order (a JSON map would cost ~40 KB for a
# full SD1.5 shift, more than 5 % of the file).


def ordered_params(tensors) -> list[str]:
    return sorted({parse_key(k).param for k in tensors})


def encode_base_hashes(shift: SpectralShift) -> str:
    params = ordered_params(shift.tensors)
    return "".join((shift.base_hashes.get(p) or UNKNOWN_HASH)[:HASH_CHARS].ljust(HASH_CHARS, "-") for p in params)


def decode_base_hashes(encoded: str, tensors) -> dict[str, str]:
    params = ordered_params(tensors)
    if len(encoded) != HASH_CHARS * len(params):
        return {}
    hashes = {}
    for i, param in enumerate(params):
        chunk = encoded[i * HASH_CHARS : (i + 1) * HASH_CHARS]
        if chunk != UNKNOWN_HASH:
            hashes[param] = chunk
    return hashes


def base_fingerprint(shift: SpectralShift) -> str:
    """One short hash of all per-parameter base hashes, for display."""
    if not shift.base_hashes:
        return "unknown"
    return hashlib.sha256(encode_base_hashes(shift).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------
# Writing


def serialize(shift: SpectralShift, precision: str = "fp16") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata exactly as they are written."""
    if precision not in ("fp16", "fp32"):
        raise ValueError(f"precision must be 'fp16' or 'fp32', got '{precision}'")
    check_tensors(shift.name, shift.tensors)
    tensors = {}
    for key in sorted(shift.tensors):
        t = shift.tensors[key].detach().to("cpu", torch.float32)
        if precision == "fp16" and float(t.abs().max()) <= FP16_SAFE_MAX:
            t = t.to(torch.float16)
        tensors[key] = t.contiguous()
    metadata = {k: v for k, v in shift.metadata.items() if isinstance(v, str)}
    metadata["svdiff.format"] = str(FORMAT_VERSION)
    metadata.setdefault("svdiff.architecture", "unknown")
    metadata["svdiff.base_hashes"] = encode_base_hashes(shift)
    metadata["svdiff.base_fingerprint"] = base_fingerprint(shift)
    metadata["svdiff.precision"] = precision
    return tensors, metadata


def write_shift(path: str | os.PathLike, shift: SpectralShift, precision: str = "fp16", overwrite: bool = False) -> Path:
    """Write atomically; refuse to replace an existing file unless ``overwrite``."""
    path = Path(path)
    tensors, metadata = serialize(shift, precision)
    return atomic_save(path, tensors, metadata, overwrite=overwrite)
