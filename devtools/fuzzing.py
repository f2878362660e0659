"""Fuzz targets for the shift-file reader and the metadata parser (hypothesis).

One property, :func:`check_file_bytes`: whatever bytes sit behind a ``.safetensors``
name, the loaders either refuse them with :class:`ShiftFileError` (a message naming
the file), or accept them and then every consumer of the file copes: the info
panel's summary is strict JSON (no NaN, only the documented types), the training
summary, history and the Inspect node's text parse, the fit check answers, and the
shift saves and loads back bit-identical. Anything else (another exception, a crash, a hang) is a bug.

Three input families, all derived from real files the extension writes:

* ``mutated_files``: byte-level mutations (flips, overwrites, inserts, deletions,
  truncation) of valid v1 and svdiff-pytorch files, biased towards the header;
* ``structured_files``: well-formed containers with random headers (dtypes, shapes,
  offsets, key names of every accepted and rejected form, random metadata);
* ``metadata_files``: valid tensors with random values for every ``svdiff.*``
  metadata field (JSON of any shape and depth, text, invalid numbers).

Used by ``scripts/fuzz_shift_files.py`` (the long run) and a short smoke test in CI.
"""

from __future__ import annotations

import json
import math
import struct
from functools import lru_cache
from pathlib import Path

import torch
from hypothesis import strategies as st
from safetensors.torch import save

from comfyui_svdiff.svdiff import file_info, fileformat, inspection
from comfyui_svdiff.svdiff.fileformat import ShiftFileError, read_shift, write_shift
from comfyui_svdiff.svdiff.shift import SpectralShift
from comfyui_svdiff.svdiff.targets import ShiftMismatchError, resolve

MODEL_SHAPES = {
    "diffusion_model.input_blocks.1.1.proj_in.weight": (32, 32, 1, 1),
    "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (32, 24),
    "diffusion_model.input_blocks.1.1.norm.weight": (32,),
    "diffusion_model.input_blocks.1.1.norm.bias": (32,),
}
CLIP_SHAPES = {"clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": (24, 24)}
KEYS = [
    "diffusion_model.input_blocks.1.1.proj_in.delta",
    "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.delta",
    "diffusion_model.input_blocks.1.1.norm.diff",
    "diffusion_model.input_blocks.1.1.norm.diff_b",
    "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.delta",
    "down_blocks.0.attentions.0.proj_in.delta",  # svdiff-pytorch (diffusers names)
    "lora_unet_down_blocks_0.lora_up.weight",
    "diffusion_model..delta",
    "text_encoders.",
    "",
]
DTYPES = ["F16", "F32", "F64", "BF16", "I32", "I64", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "XYZ", ""]
META_KEYS = [
    "svdiff.format", "svdiff.training", "svdiff.history", "svdiff.base_hashes", "svdiff.architecture", "svdiff.trigger_words",
    "svdiff.description", "svdiff.precision", "svdiff.source", "svdiff.base_fingerprint", "other",
]  # fmt: skip
SUMMARY_TYPES = {
    "file": str, "bytes": int, "architecture": str, "source": str, "trigger_words": list, "steps": (int, type(None)),
    "rank": (int, type(None)), "model_layers": int, "text_encoder_layers": int, "spectral": int, "elementwise": int,
    "values": int, "blocks": list, "losses": list, "history": list, "description": str,
}  # fmt: skip


# ----------------------------------------------------------------------------------
# The property


def check_file_bytes(data: bytes, workdir: Path) -> str:
    """'refused' or 'accepted'; raises AssertionError (or whatever escaped) on a bug."""
    path = workdir / "fuzz.safetensors"
    path.write_bytes(data)
    stale = workdir / fileformat.SVDIFF_PYTORCH_TE_FILE
    if stale.exists():
        stale.unlink()
    try:
        shift, info = file_info.describe(path)
    except ShiftFileError as exc:
        message = str(exc)
        assert "fuzz.safetensors" in message, f"the refusal does not name the file: {message!r}"
        return "refused"
    # The info panel's answer is strict JSON with the documented field types.
    json.dumps(info, allow_nan=False)
    for key, kind in SUMMARY_TYPES.items():
        assert isinstance(info[key], kind), (key, info[key])
    assert all(isinstance(x, str) for x in info["trigger_words"] + info["history"] + info["blocks"])
    assert all(isinstance(x, float) and math.isfinite(x) for x in info["losses"])
    assert isinstance(shift.training_summary(), dict) and isinstance(shift.history(), list)
    assert isinstance(inspection.describe(shift), str)  # the Inspect node's text
    fileformat.base_fingerprint(shift)
    try:
        resolve(shift, MODEL_SHAPES, CLIP_SHAPES, "SD15")
    except ShiftMismatchError as exc:
        assert "does not fit this model" in str(exc)
    # Whatever was accepted saves and loads back bit-identical.
    back = write_shift(workdir / "back.safetensors", shift, precision="fp32", overwrite=True)
    again = read_shift(back)
    assert again.tensors.keys() == shift.tensors.keys()
    assert all(torch.equal(again.tensors[k], shift.tensors[k]) for k in shift.tensors)
    return "accepted"


# ----------------------------------------------------------------------------------
# Seeds: real files


def _container(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@lru_cache(maxsize=1)
def seed_files() -> tuple[bytes, ...]:
    g = torch.Generator().manual_seed(0)
    training = {"trigger_words": ["sks"], "steps": 500, "rank": 4, "losses": [0.5, 0.25, 0.125]}
    v1 = SpectralShift(
        {
            KEYS[0]: torch.randn(32, generator=g) * 0.01,
            KEYS[1]: torch.randn(24, generator=g) * 0.01,
            KEYS[2]: torch.randn(32, generator=g) * 1e-3,
            KEYS[3]: torch.randn(32, generator=g) * 1e-3,
            KEYS[4]: torch.randn(24, generator=g) * 0.01,
        },
        {"svdiff.architecture": "SD15", "svdiff.training": json.dumps(training), "svdiff.history": json.dumps(["trained"])},
        {"diffusion_model.input_blocks.1.1.proj_in.weight": "0123abcd"},
        name="seed",
    )
    tensors16, meta16 = fileformat.serialize(v1, "fp16")
    tensors32, meta32 = fileformat.serialize(v1, "fp32")
    pytorch = save({"down_blocks.0.attentions.0.proj_in.delta": torch.randn(32, generator=g)})
    return (save(tensors16, meta16), save(tensors32, meta32), pytorch, save({KEYS[0]: torch.zeros(4)}))


# ----------------------------------------------------------------------------------
# Strategies


@st.composite
def mutated_files(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(seed_files())))
    header_end = 8 + struct.unpack("<Q", bytes(data[:8]))[0]
    for _ in range(draw(st.integers(1, 6))):
        if not data:
            break
        in_header = draw(st.booleans())
        pos = draw(st.integers(0, max(0, (header_end if in_header else len(data)) - 1)))
        pos = min(pos, len(data) - 1)
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "length"]))
        if op == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[pos] = draw(st.sampled_from([0, 0x22, 0x2C, 0x5B, 0x5D, 0x7B, 0x7D, 0x80, 0xFF, draw(st.integers(0, 255))]))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 16))]
        elif op == "truncate":
            del data[pos:]
        else:  # rewrite the header length
            value = draw(st.one_of(st.integers(0, 2**64 - 1), st.integers(max(0, header_end - 16), header_end + 16)))
            data[:8] = struct.pack("<Q", value)
    return bytes(data)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20,
)


def _metadata_value():
    return st.one_of(
        st.text(max_size=40),
        json_values.map(json.dumps),
        st.integers(1, 50_000).map(lambda n: "[" * n + "]" * n),  # deeper than the JSON parser's recursion limit
        st.sampled_from(["NaN", "Infinity", "-1e999", "1e999", '{"losses": [1e999, NaN, -Infinity]}', '{"steps": 1e308}']),
        st.fixed_dictionaries(
            {},
            optional={
                "trigger_words": json_values,
                "steps": json_values,
                "rank": json_values,
                "losses": st.one_of(json_values, st.lists(st.floats(), max_size=5)),
            },
        ).map(lambda d: json.dumps(d)),
    )


@st.composite
def metadata_files(draw) -> bytes:
    g = torch.Generator().manual_seed(draw(st.integers(0, 1000)))
    keys = draw(st.lists(st.sampled_from(KEYS[:5]), min_size=1, max_size=5, unique=True))
    tensors = {k: torch.randn(32 if "proj_in" in k or "norm" in k else 24, generator=g) for k in keys}
    metadata = draw(st.dictionaries(st.sampled_from(META_KEYS), _metadata_value(), max_size=8))
    return save(tensors, metadata)


@st.composite
def structured_files(draw) -> bytes:
    header: dict = {}
    offset = 0
    for _ in range(draw(st.integers(0, 4))):
        key = draw(st.one_of(st.sampled_from(KEYS), st.text(max_size=30)))
        shape = draw(st.lists(st.integers(0, 70), max_size=3))
        dtype = draw(st.sampled_from(DTYPES))
        size = 4 * math.prod(shape) if draw(st.booleans()) else draw(st.integers(0, 200))
        start = offset if draw(st.booleans()) else draw(st.integers(0, 300))
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [start, start + size]}
        offset = max(offset, start + size)
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.one_of(st.dictionaries(st.sampled_from(META_KEYS), _metadata_value(), max_size=5), json_values))
    data = draw(st.binary(min_size=0, max_size=64)) if draw(st.booleans()) else bytes(offset)
    raw = _container(header, data)
    if draw(st.integers(0, 9)) == 0:  # invalid UTF-8 inside the header text
        at = draw(st.integers(8, max(8, len(raw) - 1)))
        raw = raw[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00"])) + raw[at + 1 :]
    return raw


any_file = st.one_of(mutated_files(), structured_files(), metadata_files())
