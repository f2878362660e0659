"""Tiny model configurations: architectures, text-encoder and diffusion-model widths.

Declarative data plus :func:`tiny_config`, which turns it (and caller overrides) into
the exact UNet/DiT kwargs and text-encoder overrides ComfyUI's own classes take.
Needs neither ComfyUI nor torch.
"""

from __future__ import annotations

from typing import Any

ARCHS = ("SD15", "SD21v", "SDXL", "Flux")

#: arch name -> name of the real ``comfy.supported_models`` class used.
CONFIG_CLASS = {"SD15": "SD15", "SD21v": "SD20", "SDXL": "SDXL", "Flux": "Flux"}

#: text encoders (ComfyUI ``model_name``) used by each arch, in key-layout order.
TEXT_ENCODERS = {
    "SD15": ("clip_l",),
    "SD21v": ("clip_h",),
    "SDXL": ("clip_l", "clip_g"),
    "Flux": ("clip_l", "t5xxl"),
}

# Tiny text-encoder configs.  They are merged over ComfyUI's json configs
# (sd1_clip_config.json, sd2_clip_config.json, clip_config_bigg.json,
# t5_config_xxl.json), so vocab size (49408 / 32128), max positions (77),
# activations and eos ids stay real and the shipped tokenizers keep working.
# CLIP needs >= 3 layers: SD2/SDXL encoders use layer_idx=-2 and
# sd1_clip.SDClipModel asserts abs(layer_idx) < num_layers (sd1_clip.py:142).
# The encoder widths all differ, so a wrong wiring fails with a shape error
# instead of silently working.
_TE_DEFAULTS: dict[str, dict[str, Any]] = {
    "clip_l": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 2,
        "num_hidden_layers": 3,
        "projection_dim": 32,
    },
    "clip_h": {
        "hidden_size": 48,
        "intermediate_size": 96,
        "num_attention_heads": 3,
        "num_hidden_layers": 3,
        "projection_dim": 48,
    },
    "clip_g": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_hidden_layers": 3,
        "projection_dim": 64,
    },
    "t5xxl": {"d_model": 40, "d_ff": 80, "d_kv": 20, "num_heads": 2, "num_layers": 2},
}

# Tiny diffusion-model widths.  Two levels with one res block each and a
# transformer at every level keeps ComfyUI's LDM key layout recognisable
# (``input_blocks.1.1.proj_in``, ``output_blocks.3.1.transformer_blocks.0``,
# ``middle_block.1``) while staying around 1M parameters.
_LDM_TWO_LEVELS: dict[str, Any] = {
    "model_channels": 32,
    "channel_mult": [1, 2],
    "num_res_blocks": 1,
    "transformer_depth": [1, 1],
    "transformer_depth_middle": 1,
}
_UNET_DEFAULTS: dict[str, dict[str, Any]] = {
    "SD15": {**_LDM_TWO_LEVELS, "num_heads": 4, "num_head_channels": -1},
    "SD21v": {**_LDM_TWO_LEVELS, "num_heads": -1, "num_head_channels": 16},
    # SDXL: depth 2 at the second level mimics SDXL's multi-block transformers.
    "SDXL": {**_LDM_TWO_LEVELS, "transformer_depth": [1, 2], "num_heads": -1, "num_head_channels": 16},
}
_FLUX_DEFAULTS: dict[str, Any] = {
    "hidden_size": 64,
    "num_heads": 2,
    "axes_dim": [8, 12, 12],
    "mlp_ratio": 4.0,
    "depth": 1,
    "depth_single_blocks": 1,
    "theta": 10000,
}

# SDXL's adm vector = pooled clip_g output + 6 size/crop embeddings of width 256
# (model_base.SDXL.encode_adm uses Timestep(256) six times).
SDXL_SIZE_COND_DIM = 6 * 256


def validate_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")


def text_encoder_configs(arch: str, widths: dict | None) -> dict[str, dict[str, Any]]:
    widths = widths or {}
    out = {}
    for te in TEXT_ENCODERS[arch]:
        cfg = dict(_TE_DEFAULTS[te])
        cfg.update(widths.get(te, {}))
        out[te] = cfg
    return out


def ldm_unet_config(
    model_channels: int,
    channel_mult: list[int],
    num_res_blocks: int,
    transformer_depth: list[int],
    transformer_depth_middle: int,
    transformer_depth_output: list[int] | None,
    context_dim: int,
    use_linear_in_transformer: bool,
    adm_in_channels: int | None,
    num_heads: int,
    num_head_channels: int,
) -> dict[str, Any]:
    """Complete UNetModel kwargs in the exact shape ``model_detection`` emits.

    ``transformer_depth`` is given per level and expanded to one entry per
    input res block (what openaimodel.UNetModel pops); the output list has
    num_res_blocks + 1 entries per level, ordered by level ascending (the
    UNet pops it from the end while walking levels in reverse).
    """
    levels = len(channel_mult)
    if len(transformer_depth) != levels:
        raise ValueError("transformer_depth needs one entry per level of channel_mult")
    td_in = [d for d in transformer_depth for _ in range(num_res_blocks)]
    if transformer_depth_output is None:
        transformer_depth_output = [d for d in transformer_depth for _ in range(num_res_blocks + 1)]
    cfg = {
        "use_checkpoint": False,
        "image_size": 32,
        "use_spatial_transformer": True,
        "legacy": False,
        "adm_in_channels": adm_in_channels,
        "in_channels": 4,
        "out_channels": 4,
        "model_channels": model_channels,
        "num_res_blocks": [num_res_blocks] * levels,
        "transformer_depth": td_in,
        "transformer_depth_output": list(transformer_depth_output),
        "channel_mult": list(channel_mult),
        "transformer_depth_middle": transformer_depth_middle,
        "use_linear_in_transformer": use_linear_in_transformer,
        "context_dim": context_dim,
        "use_temporal_resblock": False,
        "use_temporal_attention": False,
        "num_heads": num_heads,
        "num_head_channels": num_head_channels,
    }
    if adm_in_channels is not None:
        cfg["num_classes"] = "sequential"
    return cfg


def tiny_config(arch: str, widths: dict | None = None) -> dict[str, Any]:
    """Resolve the tiny configuration for ``arch``.

    Returns ``{"unet_config": {...}, "text_encoders": {te_name: cfg_overrides}}``.

    ``widths`` may override: text-encoder entries by name (``"clip_l"``,
    ``"clip_g"``, ``"clip_h"``, ``"t5xxl"``: dicts merged over the defaults),
    for SD archs ``model_channels``, ``channel_mult``, ``num_res_blocks``
    (int), ``transformer_depth`` (per level), ``transformer_depth_middle``,
    ``transformer_depth_output`` (full list), ``num_heads``,
    ``num_head_channels``; for Flux ``hidden_size``, ``num_heads``,
    ``axes_dim``, ``mlp_ratio``, ``depth``, ``depth_single_blocks``,
    ``theta``.  Derived sizes (context_dim, adm_in_channels, vec_in_dim,
    context_in_dim) always follow the text encoders so conditioning fits.
    """
    validate_arch(arch)
    widths = dict(widths or {})
    te = text_encoder_configs(arch, widths)
    for name in TEXT_ENCODERS[arch]:
        widths.pop(name, None)

    if arch == "Flux":
        allowed = set(_FLUX_DEFAULTS)
        bad = set(widths) - allowed
        if bad:
            raise ValueError(f"unknown widths for {arch}: {sorted(bad)}")
        f = {**_FLUX_DEFAULTS, **widths}
        unet = {
            "image_model": "flux",
            "in_channels": 16,
            "out_channels": 16,
            "patch_size": 2,
            "vec_in_dim": te["clip_l"]["hidden_size"],  # clip_l pooled (unprojected)
            "context_in_dim": te["t5xxl"]["d_model"],  # t5 hidden states
            "hidden_size": f["hidden_size"],
            "mlp_ratio": f["mlp_ratio"],
            "num_heads": f["num_heads"],
            "depth": f["depth"],
            "depth_single_blocks": f["depth_single_blocks"],
            "axes_dim": list(f["axes_dim"]),
            "theta": f["theta"],
            "qkv_bias": True,
            "guidance_embed": True,
            "txt_ids_dims": [],
            "yak_mlp": False,
            "txt_norm": False,
        }
        if unet["hidden_size"] % unet["num_heads"] or sum(unet["axes_dim"]) != unet["hidden_size"] // unet["num_heads"]:
            raise ValueError("Flux needs sum(axes_dim) == hidden_size // num_heads")
        return {"unet_config": unet, "text_encoders": te}

    allowed = set(_UNET_DEFAULTS[arch]) | {"transformer_depth_output"}
    bad = set(widths) - allowed
    if bad:
        raise ValueError(f"unknown widths for {arch}: {sorted(bad)}")
    u = {**_UNET_DEFAULTS[arch], "transformer_depth_output": None, **widths}
    if arch == "SD15":
        context_dim, linear, adm = te["clip_l"]["hidden_size"], False, None
    elif arch == "SD21v":
        context_dim, linear, adm = te["clip_h"]["hidden_size"], True, None
    else:
        # SDXL: clip_l and clip_g hidden states are concatenated; adm = pooled g + sizes
        context_dim = te["clip_l"]["hidden_size"] + te["clip_g"]["hidden_size"]
        linear, adm = True, te["clip_g"]["hidden_size"] + SDXL_SIZE_COND_DIM
    unet = ldm_unet_config(
        u["model_channels"],
        u["channel_mult"],
        u["num_res_blocks"],
        u["transformer_depth"],
        u["transformer_depth_middle"],
        u["transformer_depth_output"],
        context_dim,
        linear,
        adm,
        u["num_heads"],
        u["num_head_channels"],
    )
    return {"unet_config": unet, "text_encoders": te}


def latent_channels(arch: str) -> int:
    """Latent channels the diffusion model of ``arch`` expects (4 or 16)."""
    validate_arch(arch)
    return 16 if arch == "Flux" else 4
