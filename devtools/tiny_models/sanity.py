"""Sanity run of every tiny builder: build, encode, sample, LoRA-patch, round-trip.

:func:`sanity_check` raises on the first failure; ``python -m devtools.tiny_models``
runs it from the command line.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch

from .builders import build_model, build_vae
from .checkpoints import load_checkpoint_checked, write_tiny_checkpoint
from .configs import ARCHS, CONFIG_CLASS, SDXL_SIZE_COND_DIM
from .cpu import prepare_comfy_cpu
from .lora import make_test_lora
from .sampling import encode_prompt, sample_tiny
from .weights import check_finite


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


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
        assert pooled.shape[-1] + SDXL_SIZE_COND_DIM == uc["adm_in_channels"]
    if arch == "Flux":
        assert pooled.shape[-1] == uc["vec_in_dim"]
    assert torch.isfinite(ctx).all() and torch.isfinite(pooled).all()
    return ctx, pooled


def _check_lora(arch: str, model, clip, neg, reference: torch.Tensor) -> tuple[int, int]:
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
        _assert_same_weights(clip.cond_stage_model, clip2.cond_stage_model, f"{arch} clip")
        other, _ = build_model(arch, seed=1, dtype=dtype)
        k = "diffusion_model.out.2.weight" if arch != "Flux" else "diffusion_model.img_in.weight"
        assert not torch.equal(model.model.state_dict()[k], other.model.state_dict()[k]), "seed ignored"
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
