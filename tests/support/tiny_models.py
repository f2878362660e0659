"""Tiny, deterministic ComfyUI models built in code, for tests, demos and benchmarks.

Why this exists
---------------
SVDiff works on real ComfyUI objects (``ModelPatcher``, ``comfy.sd.CLIP``,
``comfy.sd.VAE``) and records the real model-config class name
(``type(model.model.model_config).__name__``).  Real checkpoints cannot be
downloaded in CI and are far too big for CPU tests, so this module builds the
*same ComfyUI classes* with tiny widths and fills every parameter from a seed.
Nothing of ComfyUI is copied: every object is created through ComfyUI's own
constructors (``comfy.supported_models.<Class>``, ``comfy.model_base``,
``comfy.sd.CLIP`` with ``"<te>_model_config"`` overrides, ``comfy.sd.VAE``).

All ``comfy`` imports are done lazily inside functions, so importing this
module never needs ComfyUI.  Callers put the ComfyUI root directory on
``sys.path`` (or pass it to :func:`prepare_comfy_cpu`) before building models.

CPU setup (must happen BEFORE ``comfy.model_management`` is imported)
----------------------------------------------------------------------
``comfy/model_management.py`` probes the device at import time
(``total_vram = get_total_memory(get_torch_device())``, line 239 in v0.8.0)
and, unless ``args.cpu`` is set (line 142), ``get_torch_device()`` calls
``torch.cuda.current_device()`` (line 189), which raises on a machine without
an NVIDIA driver.  ``comfy.cli_args`` does not parse ``sys.argv`` unless
``comfy.options.enable_args_parsing()`` was called, so the documented way is::

    import sys; sys.path.insert(0, COMFYUI_PATH)
    import comfy.cli_args
    comfy.cli_args.args.cpu = True          # == ComfyUI's --cpu flag
    import comfy.model_management           # now picks CPUState.CPU

:func:`prepare_comfy_cpu` does exactly that, idempotently.  If
``comfy.model_management`` had already been imported (only possible on a
machine with a working GPU), it additionally switches the module globals
``cpu_state = CPUState.CPU`` and ``vram_state = VRAMState.DISABLED``, which is
what the import-time ``--cpu`` code path would have set.

dtype handling (mirrors ComfyUI's CPU behaviour)
-------------------------------------------------
On CPU ``model_management.unet_manual_cast(fp16|bf16, cpu)`` returns
``torch.float32``; ComfyUI then stores weights in fp16/bf16 and uses
``comfy.ops.manual_cast`` layers that upcast each weight to fp32 at compute
time (``model_config.set_inference_dtype(weight_dtype, manual_cast_dtype)`` ->
``comfy.ops.pick_operations``).  :func:`build_model` does the same, so fp16 and
bf16 models run on CPU.  (Note: ComfyUI's own loader would *upcast* an fp16
checkpoint to fp32 on CPU unless ``model_options={"dtype": ...}`` is given,
because ``unet_dtype()`` never picks fp16/bf16 for a CPU device.)

Architectures
-------------
``"SD15"``  -> ``comfy.supported_models.SD15``  + clip_l             (eps)
``"SD21v"`` -> ``comfy.supported_models.SD20``  + clip_h             (v-prediction)
``"SDXL"``  -> ``comfy.supported_models.SDXL``  + clip_l + clip_g    (eps, adm)
``"Flux"``  -> ``comfy.supported_models.Flux``  + clip_l + t5xxl     (flow, Flux-dev
style with guidance embedding, 16 latent channels)

Single-file checkpoints
-----------------------
The in-code models are not detectable by ``comfy.model_detection`` (SD15
requires model_channels=320 and context_dim=768) and the loader rebuilds
text encoders at full size from ComfyUI's json configs, so
:func:`write_tiny_checkpoint` writes a separate, larger file: the smallest SD15
layout the stock loader accepts is ~266 MiB in fp16 (CLIP-L is 246 MiB of it).

Run ``python tests/support/tiny_models.py [--comfyui PATH]`` for a sanity run.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import logging
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch

__all__ = [
    "ARCHS",
    "CONFIG_CLASS",
    "build_clip",
    "build_model",
    "build_vae",
    "check_finite",
    "deterministic_init_",
    "encode_prompt",
    "encoded_picture",
    "latent_channels",
    "load_checkpoint_checked",
    "make_test_lora",
    "prepare_comfy_cpu",
    "sample_tiny",
    "sanity_check",
    "tiny_config",
    "write_tiny_checkpoint",
]

ARCHS = ("SD15", "SD21v", "SDXL", "Flux")

#: arch name -> name of the real ``comfy.supported_models`` class used.
CONFIG_CLASS = {"SD15": "SD15", "SD21v": "SD20", "SDXL": "SDXL", "Flux": "Flux"}

#: text encoders (ComfyUI ``model_name``) used by each arch, in key-layout order.
_TEXT_ENCODERS = {
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
_UNET_DEFAULTS: dict[str, dict[str, Any]] = {
    "SD15": {
        "model_channels": 32,
        "channel_mult": [1, 2],
        "num_res_blocks": 1,
        "transformer_depth": [1, 1],
        "transformer_depth_middle": 1,
        "num_heads": 4,
        "num_head_channels": -1,
    },
    "SD21v": {
        "model_channels": 32,
        "channel_mult": [1, 2],
        "num_res_blocks": 1,
        "transformer_depth": [1, 1],
        "transformer_depth_middle": 1,
        "num_heads": -1,
        "num_head_channels": 16,
    },
    # SDXL: depth 2 at the second level mimics SDXL's multi-block transformers.
    "SDXL": {
        "model_channels": 32,
        "channel_mult": [1, 2],
        "num_res_blocks": 1,
        "transformer_depth": [1, 2],
        "transformer_depth_middle": 1,
        "num_heads": -1,
        "num_head_channels": 16,
    },
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
_SDXL_SIZE_COND_DIM = 6 * 256


# --------------------------------------------------------------------------
# ComfyUI bootstrap
# --------------------------------------------------------------------------


def prepare_comfy_cpu(comfyui_root: str | os.PathLike | None = None) -> None:
    """Make ComfyUI importable and force its CPU mode (the ``--cpu`` flag).

    Must run before anything imports ``comfy.model_management``; on a
    CUDA-less machine that import otherwise crashes.  Safe to call repeatedly.
    ``comfyui_root`` (or ``$COMFYUI_PATH``) is put on ``sys.path`` if given.
    """
    root = comfyui_root if comfyui_root is not None else os.environ.get("COMFYUI_PATH")
    if root is not None:
        root = os.path.abspath(os.path.expanduser(str(root)))
        if root not in sys.path:
            sys.path.insert(0, root)

    already_imported = "comfy.model_management" in sys.modules
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.model_management as mm

    if already_imported and mm.cpu_state != mm.CPUState.CPU:
        # Same globals the import-time ``if args.cpu:`` branch would set.
        mm.cpu_state = mm.CPUState.CPU
        mm.vram_state = mm.VRAMState.DISABLED


# --------------------------------------------------------------------------
# Deterministic initialisation
# --------------------------------------------------------------------------


def _param_seed(seed: int, namespace: str, name: str) -> int:
    """Derive an independent seed per parameter.

    Seeding per name (instead of one generator walked in module order) means
    a parameter's values depend only on (seed, namespace, name, shape): adding
    a layer or changing another width does not reshuffle everything else.
    """
    h = hashlib.sha256(f"{int(seed)}|{namespace}|{name}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def _is_norm(module: torch.nn.Module, pname: str) -> bool:
    cls = type(module).__name__.lower()
    return "norm" in cls or "norm" in pname.lower() or pname == "scale"


@torch.no_grad()
def deterministic_init_(
    module: torch.nn.Module, seed: int = 0, namespace: str = ""
) -> torch.nn.Module:
    """Fill every >=1-D parameter of ``module`` from ``seed``, in place.

    ComfyUI's ops (``comfy.ops.disable_weight_init``/``manual_cast``) skip
    ``reset_parameters`` and some modules allocate with ``torch.empty`` (e.g.
    Flux ``RMSNorm.scale``, T5 ``T5LayerNorm.weight``), so freshly built models
    contain garbage.  Scheme:

    * weights with >= 2 dims (Linear, Conv, Embedding): N(0, 1/fan_in), which
      keeps activations O(1) and gives a full-rank, Marchenko-Pastur-like
      spectrum (what SVDiff's SVD needs to be non-degenerate);
    * norm scales: 1 + N(0, 0.02);
    * biases and any other 1-D parameter: N(0, 0.02);
    * 0-D parameters (CLIP ``logit_scale``, TAESD ``vae_scale``/``vae_shift``)
      are constants set by their constructors and are left alone.

    Values are drawn in float32 on CPU and then cast, so a given seed yields
    the same numbers for every storage dtype and the result is bit-identical
    across builds.
    """
    for mod_name, mod in module.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            if p.ndim == 0:
                continue
            full = f"{mod_name}.{pname}" if mod_name else pname
            g = torch.Generator(device="cpu").manual_seed(
                _param_seed(seed, namespace, full)
            )
            noise = torch.randn(tuple(p.shape), generator=g, dtype=torch.float32)
            if p.ndim >= 2:
                fan_in = math.prod(p.shape[1:])
                val = noise / math.sqrt(fan_in)
            elif "bias" in pname:
                val = noise * 0.02
            elif _is_norm(mod, pname):
                val = 1.0 + noise * 0.02
            else:
                val = noise * 0.02
            p.copy_(val.to(device=p.device, dtype=p.dtype))
    return module


def check_finite(
    module: torch.nn.Module, what: str = "module", limit: float = 1e4
) -> None:
    """Raise if any parameter/buffer is NaN/inf or absurdly large.

    Uninitialised ``torch.empty`` memory usually shows up as NaN or as huge
    magnitudes, so this doubles as a "nothing was left uninitialised" check.
    """
    for kind, items in (
        ("parameter", module.named_parameters()),
        ("buffer", module.named_buffers()),
    ):
        for name, t in items:
            if not t.is_floating_point() or t.numel() == 0:
                continue
            tf = t.detach().float()
            if not torch.isfinite(tf).all():
                raise AssertionError(f"{what}: {kind} {name} has non-finite values")
            if kind == "parameter" and tf.abs().max().item() > limit:
                raise AssertionError(
                    f"{what}: {kind} {name} has |x| > {limit} (uninitialised?)"
                )


def _quiet_rng():
    """Keep the caller's global CPU RNG stream untouched while building.

    Some ComfyUI submodules are plain ``torch.nn`` layers whose default init
    draws from the global generator; we overwrite those values anyway, so the
    only effect would be shifting the random numbers a test draws afterwards.
    """
    return torch.random.fork_rng(devices=[])


# --------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------


def _validate_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")


def _te_configs(arch: str, widths: dict | None) -> dict[str, dict[str, Any]]:
    widths = widths or {}
    out = {}
    for te in _TEXT_ENCODERS[arch]:
        cfg = dict(_TE_DEFAULTS[te])
        cfg.update(widths.get(te, {}))
        out[te] = cfg
    return out


def _ldm_unet_config(
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
        transformer_depth_output = [
            d for d in transformer_depth for _ in range(num_res_blocks + 1)
        ]
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
    _validate_arch(arch)
    widths = dict(widths or {})
    te = _te_configs(arch, widths)
    for name in _TEXT_ENCODERS[arch]:
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
        if (
            unet["hidden_size"] % unet["num_heads"]
            or sum(unet["axes_dim"]) != unet["hidden_size"] // unet["num_heads"]
        ):
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
        linear, adm = True, te["clip_g"]["hidden_size"] + _SDXL_SIZE_COND_DIM
    unet = _ldm_unet_config(
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
    _validate_arch(arch)
    return 16 if arch == "Flux" else 4


# --------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------


def _model_config(arch: str, unet_config: dict, dtype: torch.dtype):
    """Instantiate the real supported_models class and set its dtypes."""
    import comfy.model_management as mm
    import comfy.supported_models as sm

    cls = getattr(sm, CONFIG_CLASS[arch])
    model_config = cls(unet_config)
    # BASE.__init__ re-applies the class's unet_extra_config (e.g. SDXL's
    # num_head_channels=64, which would give 0 heads at 32 channels), so put
    # our head layout back on top.  SD20's attn_precision=fp32 is kept.
    for k in ("num_heads", "num_head_channels"):
        if k in unet_config:
            model_config.unet_config[k] = unet_config[k]
    load_device = mm.get_torch_device()
    manual_cast = mm.unet_manual_cast(
        dtype, load_device, model_config.supported_inference_dtypes
    )
    model_config.set_inference_dtype(dtype, manual_cast)
    return model_config


def _build_base_model(arch: str, unet_config: dict, dtype: torch.dtype, seed: int):
    import comfy.model_base as mb

    model_config = _model_config(arch, unet_config, dtype)
    with _quiet_rng():
        if arch == "SD21v":
            # SD20.model_type() only reports V_PREDICTION by looking at the
            # statistics of output_blocks.11...norm1.bias in a real state dict
            # (supported_models.py:97-102); there is no such block here, so
            # construct the same BaseModel get_model() would, with the type.
            model = mb.BaseModel(
                model_config,
                model_type=mb.ModelType.V_PREDICTION,
                device=torch.device("cpu"),
            )
        else:
            model = model_config.get_model({}, "", device=torch.device("cpu"))
    deterministic_init_(model, seed, f"{arch}/unet")
    model.eval()
    return model


def build_clip(
    arch: str,
    seed: int = 0,
    widths: dict | None = None,
    dtype: torch.dtype = torch.float32,
    te_configs: dict | None = None,
):
    """Build the real ``comfy.sd.CLIP`` of ``arch`` with tiny text encoders.

    Uses ComfyUI's ``"<model_name>_model_config"`` model_options hook
    (sd1_clip.py:105) so the encoder classes, key layout
    (``clip_l.transformer.text_model.encoder.layers.0...``) and the shipped
    tokenizers are the real ones.  ``te_configs`` (name -> overrides) replaces
    the tiny defaults; pass ``{}`` per encoder to get ComfyUI's full size.
    ``dtype`` defaults to fp32 (ComfyUI would pick fp16 for text encoders).
    """
    prepare_comfy_cpu()
    import comfy.sd

    _validate_arch(arch)
    if te_configs is None:
        te_configs = _te_configs(arch, widths)
    model_config = _model_config(
        arch, tiny_config(arch, widths)["unet_config"], torch.float32
    )
    options: dict[str, Any] = {"dtype": dtype}
    for name, cfg in te_configs.items():
        if cfg:
            options[f"{name}_model_config"] = dict(cfg)
    with _quiet_rng():
        clip = comfy.sd.CLIP(
            model_config.clip_target(),
            embedding_directory=None,
            tokenizer_data={},
            parameters=0,
            model_options=options,
        )
    deterministic_init_(clip.cond_stage_model, seed, f"{arch}/clip")
    return clip


def build_model(
    arch: str,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    widths: dict | None = None,
    clip_dtype: torch.dtype = torch.float32,
):
    """Build ``(model_patcher, clip)`` for ``arch`` from ComfyUI's own classes.

    ``dtype`` is the storage dtype of the diffusion-model weights (fp32, fp16
    or bf16); on CPU fp16/bf16 run through ComfyUI's manual-cast ops with fp32
    compute, as ComfyUI itself does.  ``widths`` overrides the tiny sizes (see
    :func:`tiny_config`); ``clip_dtype`` is the text encoders' storage dtype.
    Same ``seed`` -> bit-identical weights, in this and any other process.
    """
    prepare_comfy_cpu()
    import comfy.model_management as mm
    import comfy.model_patcher

    _validate_arch(arch)
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(
            f"dtype must be torch.float32, torch.float16 or torch.bfloat16, got {dtype}"
        )
    cfg = tiny_config(arch, widths)
    model = _build_base_model(arch, cfg["unet_config"], dtype, seed)
    patcher = comfy.model_patcher.ModelPatcher(
        model,
        load_device=mm.get_torch_device(),
        offload_device=mm.unet_offload_device(),
    )
    clip = build_clip(arch, seed, dtype=clip_dtype, te_configs=cfg["text_encoders"])
    return patcher, clip


def smooth_in_time_(model, min_period: float = 2000.0, output_scale: float = 1.0) -> None:
    """Make a tiny model's prediction vary smoothly with the noise level, in place.

    A randomly initialised UNet/DiT sees its timestep through a sinusoidal embedding
    whose fastest components turn by a radian per timestep, so its outputs at two
    neighbouring sampler steps are unrelated, unlike a trained model's. Tests of
    integrators (DDIM inversion) need the trained-model property; this zeroes the
    first time-MLP's columns for embedding frequencies with a period shorter than
    ``min_period`` timesteps (ComfyUI's layout: ``cat([cos(t·f), sin(t·f)])`` with
    ``f_j = 10000^(-j/half)``; Flux multiplies t ∈ [0, 1] by 1000 first).
    ``output_scale`` multiplies the last layer, which scales the prediction's
    dependence on x (its Lipschitz constant) the same way.
    """
    import math

    diffusion = model.model.diffusion_model
    layer = None
    if hasattr(diffusion, "time_embed"):
        layer = diffusion.time_embed[0]
    elif hasattr(diffusion, "time_in"):
        layer = diffusion.time_in.in_layer
    if layer is None:
        raise ValueError(f"{type(diffusion).__name__} has no known time embedding")
    half = layer.weight.shape[1] // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)
    fast = (2 * math.pi / freqs) < min_period
    out = diffusion.out[-1] if hasattr(diffusion, "out") else diffusion.final_layer.linear
    with torch.no_grad():
        layer.weight[:, :half][:, fast] = 0
        layer.weight[:, half:][:, fast] = 0
        out.weight.mul_(output_scale)
        if out.bias is not None:
            out.bias.mul_(output_scale)


def _vae_ddconfig(
    latent_channels: int, ch: int, ch_mult: Iterable[int], num_res_blocks: int
) -> dict:
    return {
        "double_z": True,
        "z_channels": latent_channels,
        "resolution": 256,
        "in_channels": 3,
        "out_ch": 3,
        "ch": ch,
        "ch_mult": list(ch_mult),
        "num_res_blocks": num_res_blocks,
        "attn_resolutions": [],
        "dropout": 0.0,
    }


def build_vae(
    seed: int = 0,
    latent_channels: int = 4,
    ch: int = 32,
    ch_mult: Iterable[int] = (1, 2, 2, 2),
    num_res_blocks: int = 1,
    dtype: torch.dtype | None = torch.float32,
):
    """Tiny ``comfy.sd.VAE`` (AutoencoderKL, 8x down-sampling).

    Goes through ``VAE(sd=..., config=...)``, ComfyUI's explicit-config path
    (sd.py ``AutoencoderKL(**config['params'])``), because the state-dict
    auto-detection path hard-codes ch=128/ch_mult=[1,2,4,4].  ``ch`` must be a
    multiple of 32 (the Encoder/Decoder GroupNorm uses 32 groups).  Use
    ``latent_channels=16`` for Flux.  64x64 RGB -> 1x4x8x8 latent.
    """
    prepare_comfy_cpu()
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL

    if ch % 32:
        raise ValueError("VAE ch must be a multiple of 32 (GroupNorm with 32 groups)")
    params = {
        "embed_dim": latent_channels,
        "ddconfig": _vae_ddconfig(latent_channels, ch, ch_mult, num_res_blocks),
    }
    with _quiet_rng():
        ae = AutoencoderKL(**copy.deepcopy(params))
    deterministic_init_(ae, seed, "vae")
    sd = ae.state_dict()
    with _quiet_rng():
        vae = comfy.sd.VAE(sd=sd, config={"params": params}, dtype=dtype)
    return vae


def encoded_picture(arch: str, size: int = 128, seed: int = 0) -> dict:
    """A LATENT of a picture (colour gradients and a disc) through a tiny VAE of ``arch``'s
    latent size: VAE-encoded content, with the structure and statistics that brings,
    rather than unit-variance noise."""
    import numpy as np

    y, x = np.mgrid[0:size, 0:size] / size
    disc = ((x - 0.55) ** 2 + (y - 0.45) ** 2 < 0.08).astype(float)
    pixels = np.stack([0.5 + 0.4 * np.sin(6 * x + seed), 0.5 + 0.4 * np.cos(5 * y), 0.2 + 0.6 * disc], -1)
    vae = build_vae(seed=0, latent_channels=latent_channels(arch))
    return {"samples": vae.encode(torch.tensor(pixels, dtype=torch.float32)[None])}


def _build_taesd_sd(seed: int, latent_channels: int = 4) -> dict[str, torch.Tensor]:
    """State dict of a randomly initialised TAESD (ComfyUI's tiny VAE class)."""
    from comfy.taesd import taesd

    with _quiet_rng():
        m = taesd.TAESD(latent_channels=latent_channels)
    deterministic_init_(m, seed, "vae")
    return m.state_dict()


# --------------------------------------------------------------------------
# Conditioning / LoRA helpers
# --------------------------------------------------------------------------


def encode_prompt(clip, text: str):
    """CLIPTextEncode equivalent: ``[[cond, {"pooled_output": ...}]]``."""
    tokens = clip.tokenize(text)
    return clip.encode_from_tokens_scheduled(tokens)


def _default_lora_target(key: str) -> bool:
    return any(
        s in key
        for s in (
            "attn",
            "proj_in",
            "proj_out",
            ".ff.",
            "mlp",
            "linear",
            "self_attn",
            "fc1",
            "fc2",
            "DenseReluDense",
            ".SelfAttention.",
        )
    )


def make_test_lora(
    model=None,
    clip=None,
    rank: int = 4,
    seed: int = 0,
    scale: float = 0.5,
    target: Callable[[str], bool] | None = None,
) -> dict[str, torch.Tensor]:
    """Random kohya-style LoRA dict for ``model`` (ModelPatcher) and/or ``clip``.

    Key names come from ComfyUI's own maps (``comfy.lora.model_lora_keys_unet``
    / ``model_lora_keys_clip``), preferring ``lora_unet_*`` / ``lora_te*_``
    names, so ``comfy.sd.load_lora_for_models`` resolves every entry.
    ``target(weight_key)`` selects weights (default: attention/MLP/proj).
    """
    prepare_comfy_cpu()
    import comfy.lora

    target = target or _default_lora_target
    out: dict[str, torch.Tensor] = {}

    def add(
        key_map: dict[str, str],
        sd: dict[str, torch.Tensor],
        prefixes: tuple[str, ...],
        ns: str,
    ):
        # ComfyUI maps many LoRA spellings onto one weight; pick one name per
        # weight, preferring the kohya prefixes (most common in the wild).
        def preference(lora_key: str):
            rank_ = next(
                (i for i, p in enumerate(prefixes) if lora_key.startswith(p)),
                len(prefixes),
            )
            return (rank_, lora_key)

        inverse: dict[str, str] = {}
        for lora_key, weight_key in key_map.items():
            if not isinstance(weight_key, str):
                continue  # tuple targets (sliced/fused weights) are not used here
            prev = inverse.get(weight_key)
            if prev is None or preference(lora_key) < preference(prev):
                inverse[weight_key] = lora_key
        for weight_key in sorted(inverse):
            w = sd.get(weight_key)
            if w is None or w.ndim < 2 or not target(weight_key):
                continue
            lk = inverse[weight_key]
            g = torch.Generator().manual_seed(_param_seed(seed, ns, weight_key))
            out_f, in_f = w.shape[0], w.shape[1]
            k = tuple(w.shape[2:])
            down = torch.randn((rank, in_f) + k, generator=g) / math.sqrt(
                in_f * math.prod(k)
            )
            up = torch.randn((out_f, rank) + (1,) * len(k), generator=g) * (
                scale / math.sqrt(rank)
            )
            out[f"{lk}.lora_down.weight"] = down
            out[f"{lk}.lora_up.weight"] = up
            out[f"{lk}.alpha"] = torch.tensor(float(rank))

    if model is not None:
        km = comfy.lora.model_lora_keys_unet(model.model, {})
        add(km, model.model.state_dict(), ("lora_unet_",), "lora_unet")
    if clip is not None:
        km = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})
        add(
            km,
            clip.cond_stage_model.state_dict(),
            ("lora_te_", "lora_te1_", "lora_te2_", "text_encoders."),
            "lora_te",
        )
    return out


# --------------------------------------------------------------------------
# Single-file checkpoints for CheckpointLoaderSimple
# --------------------------------------------------------------------------

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
    prepare_comfy_cpu()
    import comfy.utils

    if arch not in _CKPT_UNET:
        raise ValueError(
            f"write_tiny_checkpoint supports {sorted(_CKPT_UNET)}, not {arch!r}"
        )
    if arch in _LARGE_CHECKPOINTS and not allow_large:
        raise ValueError(
            f"a loadable {arch} checkpoint is several GiB; pass allow_large=True"
        )
    if vae not in ("taesd", "kl"):
        raise ValueError("vae must be 'taesd' or 'kl'")
    spec = dict(_CKPT_UNET[arch])
    input_depths = spec.pop("_input_depths", None)
    unet_config = _ldm_unet_config(**spec)
    if input_depths is not None:
        unet_config["transformer_depth"] = list(input_depths)
    model = _build_base_model(arch, unet_config, storage_dtype, seed)
    # {} per encoder = no override -> ComfyUI's full json config, as the loader.
    clip = build_clip(
        arch,
        seed,
        dtype=storage_dtype,
        te_configs={te: {} for te in _TEXT_ENCODERS[arch]},
    )
    if vae == "taesd":
        vae_sd = _build_taesd_sd(seed)
    else:
        from comfy.ldm.models.autoencoder import AutoencoderKL

        with _quiet_rng():
            ae = AutoencoderKL(
                embed_dim=4, ddconfig=_vae_ddconfig(4, 128, [1, 2, 4, 4], 2)
            )
        deterministic_init_(ae, seed, "vae")
        vae_sd = ae.state_dict()

    sd = _checkpoint_state_dict(model, clip.get_sd(), vae_sd)
    out = {}
    for k, t in sd.items():
        t = t.detach()
        if t.is_floating_point():
            t = t.to(storage_dtype)
        out[k] = t.contiguous()
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    comfy.utils.save_torch_file(
        out, path, metadata={"tiny_models": f"{arch}/seed={seed}/vae={vae}"}
    )
    params = sum(t.numel() for t in out.values())
    del model, clip, sd
    return {
        "path": path,
        "bytes": os.path.getsize(path),
        "num_tensors": len(out),
        "params": params,
    }


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
            keys = [
                k
                for k in re.findall(r"'([^']+)'", msg)
                if not k.endswith(_BENIGN_CLIP_KEYS)
            ]
            if not keys:
                continue
        problems.append(msg)
    return model, clip, vae, problems


# --------------------------------------------------------------------------
# Sanity run
# --------------------------------------------------------------------------


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def sample_tiny(
    model,
    positive,
    negative,
    arch: str,
    seed: int = 0,
    steps: int = 3,
    size: int = 8,
    cfg: float = 2.0,
) -> torch.Tensor:
    """KSampler equivalent on a ``1 x C x size x size`` empty latent (euler)."""
    import comfy.sample

    latent = torch.zeros(1, latent_channels(arch), size, size)
    noise = comfy.sample.prepare_noise(latent, seed)
    scheduler = "simple" if arch == "Flux" else "normal"
    return comfy.sample.sample(
        model,
        noise,
        steps,
        cfg,
        "euler",
        scheduler,
        positive,
        negative,
        latent,
        seed=seed,
        disable_pbar=True,
    )


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module, what: str) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    if sa.keys() != sb.keys() or not all(torch.equal(sa[k], sb[k]) for k in sa):
        raise AssertionError(f"{what}: two builds with the same seed differ")


def _check_conditioning(arch: str, model, cond) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoded prompt must fit the UNet exactly as CLIPTextEncode output would."""
    uc = model.model.model_config.unet_config
    ctx, pooled = cond[0][0], cond[0][1]["pooled_output"]
    want = uc.get("context_dim", uc.get("context_in_dim"))
    assert ctx.shape[-1] == want, f"{arch}: context {tuple(ctx.shape)} vs UNet {want}"
    if arch == "SDXL":
        assert pooled.shape[-1] + _SDXL_SIZE_COND_DIM == uc["adm_in_channels"]
    if arch == "Flux":
        assert pooled.shape[-1] == uc["vec_in_dim"]
    assert torch.isfinite(ctx).all() and torch.isfinite(pooled).all()
    return ctx, pooled


def _check_lora(
    arch: str, model, clip, neg, reference: torch.Tensor
) -> tuple[int, int]:
    """A LoRA through comfy.sd.load_lora_for_models must patch and change the output."""
    import comfy.sd

    lora = make_test_lora(model, clip, seed=0)
    m_l, c_l = comfy.sd.load_lora_for_models(model, clip, lora, 1.0, 1.0)
    n_model, n_clip = len(m_l.patches), len(c_l.patcher.patches)
    n_expected = sum(1 for k in lora if k.endswith(".lora_up.weight"))
    assert n_model > 0 and n_clip > 0 and n_model + n_clip == n_expected, (
        n_model,
        n_clip,
        n_expected,
    )
    if arch != "Flux":
        assert "diffusion_model.input_blocks.1.1.proj_in.weight" in m_l.patches
    out = sample_tiny(m_l, encode_prompt(c_l, "a photo of a tiny cat"), neg, arch)
    assert torch.isfinite(out).all(), f"{arch}: non-finite samples with LoRA"
    assert not torch.equal(out, reference), f"{arch}: LoRA had no effect"
    return n_model, n_clip


def _check_build(arch: str, dtype: torch.dtype) -> dict[str, Any]:
    t0 = time.perf_counter()
    model, clip = build_model(arch, seed=0, dtype=dtype)
    t_build = time.perf_counter() - t0
    dm = model.model.diffusion_model
    assert type(model.model.model_config).__name__ == CONFIG_CLASS[arch]
    assert next(dm.parameters()).dtype == dtype
    check_finite(model.model, f"{arch} unet")
    check_finite(clip.cond_stage_model, f"{arch} clip")

    t0 = time.perf_counter()
    pos = encode_prompt(clip, "a photo of a tiny cat")
    neg = encode_prompt(clip, "")
    t_enc = time.perf_counter() - t0
    ctx, pooled = _check_conditioning(arch, model, pos)

    t0 = time.perf_counter()
    out = sample_tiny(model, pos, neg, arch)
    t_sample = time.perf_counter() - t0
    assert torch.isfinite(out).all(), f"{arch} {dtype}: non-finite samples"
    entry = {
        "build_s": t_build,
        "encode_s": t_enc,
        "sample3_s": t_sample,
        "unet_params": _count(dm),
        "clip_params": _count(clip.cond_stage_model),
        "context": tuple(ctx.shape),
        "pooled": tuple(pooled.shape),
    }
    if dtype == torch.float32:
        model2, clip2 = build_model(arch, seed=0, dtype=dtype)
        _assert_same_weights(model.model, model2.model, f"{arch} unet")
        _assert_same_weights(
            clip.cond_stage_model, clip2.cond_stage_model, f"{arch} clip"
        )
        other, _ = build_model(arch, seed=1, dtype=dtype)
        k = (
            "diffusion_model.out.2.weight"
            if arch != "Flux"
            else "diffusion_model.img_in.weight"
        )
        assert not torch.equal(
            model.model.state_dict()[k], other.model.state_dict()[k]
        ), "seed ignored"
        entry["lora_patches"] = _check_lora(arch, model, clip, neg, out)
    return entry


def _check_vae(latent_ch: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    vae = build_vae(seed=0, latent_channels=latent_ch)
    t_build = time.perf_counter() - t0
    img = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    lat = vae.encode(img)
    dec = vae.decode(lat)
    t_rt = time.perf_counter() - t0
    assert tuple(lat.shape) == (1, latent_ch, 8, 8), lat.shape
    assert tuple(dec.shape)[-3:] == (64, 64, 3), dec.shape
    assert torch.isfinite(lat).all() and torch.isfinite(dec).all()
    _assert_same_weights(
        vae.first_stage_model,
        build_vae(seed=0, latent_channels=latent_ch).first_stage_model,
        "vae",
    )
    return {
        "build_s": t_build,
        "roundtrip_s": t_rt,
        "params": _count(vae.first_stage_model),
        "latent": tuple(lat.shape),
    }


def _check_checkpoint(path: str, vae_kind: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    info = write_tiny_checkpoint(path, "SD15", seed=0, vae=vae_kind)
    t_write = time.perf_counter() - t0
    t0 = time.perf_counter()
    model, clip, vae, problems = load_checkpoint_checked(path)
    t_load = time.perf_counter() - t0
    name = type(model.model.model_config).__name__
    assert name == "SD15", f"checkpoint detected as {name}"
    assert not problems, problems
    assert clip is not None and vae is not None and vae.first_stage_model is not None
    out = sample_tiny(
        model,
        encode_prompt(clip, "a photo of a tiny cat"),
        encode_prompt(clip, ""),
        "SD15",
        steps=1,
    )
    img = vae.decode(out)
    assert torch.isfinite(out).all() and torch.isfinite(img).all()
    return {**info, "write_s": t_write, "load_s": t_load, "detected": name}


def sanity_check(
    archs: Iterable[str] = ARCHS,
    dtypes: Iterable[torch.dtype] = (torch.float32, torch.float16, torch.bfloat16),
    checkpoint_dir: str | None = None,
    report_line: Callable[[str], None] | None = print,
) -> dict[Any, dict[str, Any]]:
    """Build, encode, sample, LoRA-patch and round-trip everything; raise on failure.

    fp32 builds additionally check bit-identical rebuilds, seed sensitivity and
    a LoRA through ``comfy.sd.load_lora_for_models``.  With ``checkpoint_dir``
    the single-file SD15 checkpoints are written and loaded by the stock
    loader.  ``report_line`` receives one human-readable line per check.
    """
    prepare_comfy_cpu()
    say = report_line or (lambda line: None)
    report: dict[Any, dict[str, Any]] = {}
    for arch in archs:
        for dtype in dtypes:
            e = report[(arch, _dtype_name(dtype))] = _check_build(arch, dtype)
            parts = [
                f"{arch:6s} {_dtype_name(dtype):8s}",
                f"build {e['build_s'] * 1e3:4.0f} ms",
                f"encode {e['encode_s'] * 1e3:4.1f} ms",
                f"sample(3 steps) {e['sample3_s'] * 1e3:4.0f} ms",
                f"unet {e['unet_params'] / 1e6:.3f}M",
                f"clip {e['clip_params'] / 1e6:.3f}M",
                f"ctx {e['context']} pooled {e['pooled']}",
            ]
            if "lora_patches" in e:
                parts.append(f"lora patches unet/clip {e['lora_patches']}")
            say("  ".join(parts))
    for lc in (4, 16):
        e = report[("VAE", lc)] = _check_vae(lc)
        parts = [
            f"VAE z={lc:<2d}       ",
            f"build {e['build_s'] * 1e3:4.0f} ms",
            f"encode+decode 64x64 {e['roundtrip_s'] * 1e3:4.1f} ms",
            f"params {e['params'] / 1e6:.3f}M",
            f"latent {e['latent']}",
        ]
        say("  ".join(parts))
    if checkpoint_dir is not None:
        for vae_kind in ("taesd", "kl"):
            path = os.path.join(checkpoint_dir, f"tiny_sd15_{vae_kind}.safetensors")
            e = report[("checkpoint", vae_kind)] = _check_checkpoint(path, vae_kind)
            parts = [
                f"ckpt SD15 vae={vae_kind:5s}",
                f"{e['bytes'] / 2**20:6.1f} MiB",
                f"{e['params'] / 1e6:.1f}M params",
                f"write {e['write_s']:.2f} s",
                f"load {e['load_s']:.2f} s",
                f"detected {e['detected']}, clean load",
            ]
            say("  ".join(parts))
    return report


if __name__ == "__main__":
    import argparse
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--comfyui",
        default=os.environ.get("COMFYUI_PATH", os.path.expanduser("~/ComfyUI")),
        help="ComfyUI root directory (default: $COMFYUI_PATH or ~/ComfyUI)",
    )
    ap.add_argument("--archs", nargs="*", default=list(ARCHS), choices=ARCHS)
    ap.add_argument(
        "--no-checkpoint",
        action="store_true",
        help="skip the single-file checkpoint round trip",
    )
    ns = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    t0 = time.perf_counter()
    prepare_comfy_cpu(ns.comfyui)
    import comfy.sd  # noqa: F401  (timed: the first comfy import dominates start-up)

    print(f"import comfy.sd in CPU mode: {time.perf_counter() - t0:.2f} s")
    with tempfile.TemporaryDirectory() as d:
        sanity_check(ns.archs, checkpoint_dir=None if ns.no_checkpoint else d)
    print("OK")
