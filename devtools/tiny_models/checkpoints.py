"""Single-file checkpoints the stock CheckpointLoaderSimple accepts, and a checked load.

The in-code tiny models are not detectable by ``comfy.model_detection``, so
:func:`write_tiny_checkpoint` writes the smallest layout the loader still maps to
SD15 (or SDXL); :func:`load_checkpoint_checked` loads like CheckpointLoaderSimple and
reports what ComfyUI complained about.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
from typing import Any

import torch

from .builders import build_base_model, build_clip, build_taesd_sd, vae_ddconfig
from .configs import TEXT_ENCODERS, ldm_unet_config
from .cpu import prepare_comfy_cpu
from .weights import deterministic_init_, quiet_rng

# Smallest UNet that comfy.model_detection still maps to SD15: detection only
# constrains model_channels=320, context_dim=768 (so >= 1 transformer, to read
# context_dim from attn2.to_k), use_linear_in_transformer=False, no adm and
# in_channels=4 (8 would be SD15_instructpix2pix/Stable_Zero123).  One level,
# one res block, no middle block (detected as transformer_depth_middle=-2) and
# no output transformers.
_CKPT_UNET = {
    "SD15": {
        "model_channels": 320,
        "channel_mult": [1],
        "num_res_blocks": 1,
        "transformer_depth": [1],
        "transformer_depth_middle": -2,
        "transformer_depth_output": [0, 0],
        "context_dim": 768,
        "use_linear_in_transformer": False,
        "adm_in_channels": None,
        "num_heads": 8,
        "num_head_channels": -1,
    },
    # SDXL detection pins transformer_depth == [0, 0, 2, 2, 10, 10] (one entry
    # per *input res block*), model_channels=320, context_dim=2048, adm=2816,
    # but not channel_mult: one level of six res blocks at 320 channels
    # satisfies it with a 121M-param UNet instead of SDXL's 2.6B.  The file is
    # still ~1.75 GiB because CLIP-G (695M params) is fixed by the loader.
    "SDXL": {
        "model_channels": 320,
        "channel_mult": [1],
        "num_res_blocks": 6,
        "transformer_depth": [0],
        "transformer_depth_middle": -2,
        "transformer_depth_output": [0] * 7,
        "context_dim": 2048,
        "use_linear_in_transformer": True,
        "adm_in_channels": 2816,
        "num_heads": -1,
        "num_head_channels": 64,
        "_input_depths": [0, 0, 2, 2, 10, 10],
    },
}
_LARGE_CHECKPOINTS = {"SDXL"}


def _checkpoint_state_dict(model, clip_sd: dict, vae_sd: dict) -> dict:
    """``BaseModel.state_dict_for_saving`` on either signature.

    Up to v0.8.0 it read the UNet itself (``(clip_state_dict, vae_state_dict, ...)``);
    later releases take the UNet's state dict first (``ModelPatcher.state_dict_for_saving``
    passes it), so a positional CLIP state dict would be saved as the UNet.
    """
    params = inspect.signature(model.state_dict_for_saving).parameters
    if "unet_state_dict" in params:
        unet = model.diffusion_model.state_dict()
        return model.state_dict_for_saving(unet, clip_state_dict=clip_sd, vae_state_dict=vae_sd)
    return model.state_dict_for_saving(clip_state_dict=clip_sd, vae_state_dict=vae_sd)


def write_tiny_checkpoint(
    path: str | os.PathLike,
    arch: str = "SD15",
    seed: int = 0,
    vae: str = "taesd",
    storage_dtype: torch.dtype = torch.float16,
    allow_large: bool = False,
) -> dict[str, Any]:
    """Write a single-file LDM-layout ``.safetensors`` that ComfyUI's stock
    ``comfy.sd.load_checkpoint_guess_config`` detects as ``arch`` and loads
    without missing keys.

    ComfyUI fixes most sizes when loading a checkpoint, so this is far bigger
    than the in-code tiny models: the text encoder config comes from the json
    files (clip_l is always the full 123M-param CLIP-L), and detection pins
    model_channels/context_dim.  The VAE defaults to ComfyUI's TAESD class
    (``first_stage_model.taesd_*`` keys, ~2.4M params), which the loader
    detects (sd.py ``"taesd_decoder.1.weight" in sd``); ``vae="kl"`` stores the
    standard AutoencoderKL layout instead, whose auto-detected config is the
    full 84M-param SD VAE.  The layout is produced by ComfyUI's own
    ``BaseModel.state_dict_for_saving`` (the code ``CheckpointSave`` uses).

    ``"SD15"`` (~266 MiB) is the one meant for tests.  ``"SDXL"`` works but
    is ~1.75 GiB (CLIP-G alone is 695M params) and needs ``allow_large=True``.
    Returns a dict with ``path``, ``bytes``, ``num_tensors``, ``params``.
    """
    out, metadata = tiny_checkpoint_tensors(arch, seed, vae, storage_dtype, allow_large)
    import comfy.utils

    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    comfy.utils.save_torch_file(out, path, metadata=metadata)
    return {
        "path": path,
        "bytes": os.path.getsize(path),
        "num_tensors": len(out),
        "params": sum(t.numel() for t in out.values()),
    }


def tiny_checkpoint_tensors(
    arch: str = "SD15",
    seed: int = 0,
    vae: str = "taesd",
    storage_dtype: torch.dtype = torch.float16,
    allow_large: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata :func:`write_tiny_checkpoint` saves (for callers that
    write the file themselves, atomically)."""
    prepare_comfy_cpu()

    if arch not in _CKPT_UNET:
        raise ValueError(f"write_tiny_checkpoint supports {sorted(_CKPT_UNET)}, not {arch!r}")
    if arch in _LARGE_CHECKPOINTS and not allow_large:
        raise ValueError(f"a loadable {arch} checkpoint is several GiB; pass allow_large=True")
    if vae not in ("taesd", "kl"):
        raise ValueError("vae must be 'taesd' or 'kl'")
    spec = dict(_CKPT_UNET[arch])
    input_depths = spec.pop("_input_depths", None)
    unet_config = ldm_unet_config(**spec)
    if input_depths is not None:
        unet_config["transformer_depth"] = list(input_depths)
    model = build_base_model(arch, unet_config, storage_dtype, seed)
    # {} per encoder = no override -> ComfyUI's full json config, as the loader.
    clip = build_clip(
        arch,
        seed,
        dtype=storage_dtype,
        te_configs={te: {} for te in TEXT_ENCODERS[arch]},
    )
    if vae == "taesd":
        vae_sd = build_taesd_sd(seed)
    else:
        from comfy.ldm.models.autoencoder import AutoencoderKL

        with quiet_rng():
            ae = AutoencoderKL(embed_dim=4, ddconfig=vae_ddconfig(4, 128, [1, 2, 4, 4], 2))
        deterministic_init_(ae, seed, "vae")
        vae_sd = ae.state_dict()

    sd = _checkpoint_state_dict(model, clip.get_sd(), vae_sd)
    out = {}
    for k, t in sd.items():
        t = t.detach().cpu()
        if t.is_floating_point():
            t = t.to(storage_dtype)
        out[k] = t.contiguous()
    return out, {"tiny_models": f"{arch}/seed={seed}/vae={vae}"}


class _LogCollector(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


class _MinLevel(logging.Filter):
    """Keep pre-existing handlers as quiet as before while root is at DEBUG."""

    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record):
        return record.levelno >= self.level


# Key differences ComfyUI itself treats as harmless for a checkpoint CLIP:
# missing logit_scale/text_projection (sd.py:149 demotes them to DEBUG; SD1.x
# checkpoints never carry them) and the clip_l position_ids buffer that
# ComfyUI's own SDXL saver adds (supported_models.py, SDXL.
# process_clip_state_dict_for_saving) and real SDXL checkpoints contain.
_BENIGN_CLIP_KEYS = (
    ".logit_scale",
    ".transformer.text_projection.weight",
    ".embeddings.position_ids",
)


def load_checkpoint_checked(path: str | os.PathLike):
    """Load like CheckpointLoaderSimple and report what ComfyUI complained about.

    ComfyUI never raises on a bad checkpoint; it logs ``unet missing``,
    ``clip missing``, ``Missing VAE keys``, ``left over keys`` etc. (some only
    at DEBUG level).  This captures those records and returns
    ``(model_patcher, clip, vae, problems)``; ``problems`` is empty for a clean
    load.  The missing-key messages ComfyUI itself considers harmless are
    dropped.
    """
    prepare_comfy_cpu()
    import comfy.sd

    root = logging.getLogger()
    old_level = root.getEffectiveLevel()
    collector = _LogCollector()
    quiet = _MinLevel(old_level)
    for h in root.handlers:
        h.addFilter(quiet)
    root.addHandler(collector)
    root.setLevel(logging.DEBUG)
    try:
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
            os.fspath(path), output_vae=True, output_clip=True, embedding_directory=None
        )
    finally:
        root.setLevel(old_level)
        root.removeHandler(collector)
        for h in root.handlers:
            h.removeFilter(quiet)
    needles = (
        "missing",
        "unexpected",
        "left over",
        "leftover",
        "no match",
        "not a checkpoint",
        "not initalized",
        "no clip/text encoder",
    )
    problems = []
    for r in collector.records:
        msg = r.getMessage()
        low = msg.lower()
        if not any(n in low for n in needles):
            continue
        if low.startswith(("clip missing", "clip unexpected")):
            keys = [k for k in re.findall(r"'([^']+)'", msg) if not k.endswith(_BENIGN_CLIP_KEYS)]
            if not keys:
                continue
        problems.append(msg)
    return model, clip, vae, problems
