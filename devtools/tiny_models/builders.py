"""Tiny ComfyUI models built through ComfyUI's own classes: diffusion model, CLIP, VAE.

Every object is created by ComfyUI's constructors (``comfy.supported_models.<Class>``,
``comfy.model_base``, ``comfy.sd.CLIP``, ``comfy.sd.VAE``) with the widths of
:mod:`devtools.tiny_models.configs` and parameters from
:func:`devtools.tiny_models.weights.deterministic_init_`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch

from .configs import CONFIG_CLASS, latent_channels, text_encoder_configs, tiny_config, validate_arch
from .cpu import prepare_comfy_cpu
from .weights import deterministic_init_, quiet_rng


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
    manual_cast = mm.unet_manual_cast(dtype, load_device, model_config.supported_inference_dtypes)
    model_config.set_inference_dtype(dtype, manual_cast)
    return model_config


def build_base_model(arch: str, unet_config: dict, dtype: torch.dtype, seed: int):
    import comfy.model_base as mb

    model_config = _model_config(arch, unet_config, dtype)
    with quiet_rng():
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

    validate_arch(arch)
    if te_configs is None:
        te_configs = text_encoder_configs(arch, widths)
    model_config = _model_config(arch, tiny_config(arch, widths)["unet_config"], torch.float32)
    options: dict[str, Any] = {"dtype": dtype}
    for name, cfg in te_configs.items():
        if cfg:
            options[f"{name}_model_config"] = dict(cfg)
    with quiet_rng():
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

    validate_arch(arch)
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be torch.float32, torch.float16 or torch.bfloat16, got {dtype}")
    cfg = tiny_config(arch, widths)
    model = build_base_model(arch, cfg["unet_config"], dtype, seed)
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


def vae_ddconfig(latent_channels: int, ch: int, ch_mult: Iterable[int], num_res_blocks: int) -> dict:
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
        "ddconfig": vae_ddconfig(latent_channels, ch, ch_mult, num_res_blocks),
    }
    with quiet_rng():
        ae = AutoencoderKL(**copy.deepcopy(params))
    deterministic_init_(ae, seed, "vae")
    sd = ae.state_dict()
    with quiet_rng():
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


def build_taesd_sd(seed: int, latent_channels: int = 4) -> dict[str, torch.Tensor]:
    """State dict of a randomly initialised TAESD (ComfyUI's tiny VAE class)."""
    from comfy.taesd import taesd

    with quiet_rng():
        m = taesd.TAESD(latent_channels=latent_channels)
    deterministic_init_(m, seed, "vae")
    return m.state_dict()
