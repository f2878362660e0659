"""Train the toy world's base model from scratch: the VAE, then the UNet (2 CPU cores, < 60 min).

    python -m devtools.world base [--unet-steps N] [--vae-steps N] [--scenes N]

1. VAE (ComfyUI's TAESD class): pictures from the whole world (the VAE, like SD's, has
   seen every kind of object; only the UNet and the text encoder never see the held-out
   concepts), 32² crops aligned to the latent grid, L1 + MSE, latents kept inside the
   decoder's ±3 clamp and perturbed by N(0, 0.1²) so that the decoder forgives a
   diffusion model's small errors.
2. Dataset: ``scenes`` base-training scenes (held-out shapes and combinations excluded),
   encoded once; latents normalised to zero mean and unit variance (the checkpoint's
   ``vae_scale``/``vae_shift`` carry the normalisation); each distinct caption encoded
   once through :func:`~devtools.world.base.encode_captions`.
3. UNet: ε-prediction on ComfyUI's SD1.x schedule (scaled-linear β 0.00085-0.012, 1000
   steps), min-SNR-5 weighting, 10 % empty captions (classifier-free guidance), AdamW
   with warm-up and cosine decay, EMA of the weights (the EMA is what is shipped).

Everything is seeded; the same torch build on the same machine gives the same files.
"""

from __future__ import annotations

import logging
import math
import random
import time

import numpy as np
import torch
import torch.nn.functional as F

from . import base
from .render import render
from .scenes import evaluator_scene, random_scene

log = logging.getLogger("svdiff.world")


def pictures(scenes, seed: int) -> torch.Tensor:
    """(N, 3, 64, 64) float in [0, 1]."""
    arrays = np.stack([np.asarray(render(s, base.IMAGE_SIZE, seed=seed + i)) for i, s in enumerate(scenes)])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).float().div_(255)


def train_vae(steps: int, batch: int = 32, seed: int = 1, progress=None) -> torch.nn.Module:
    rng = random.Random(seed)
    images = pictures([evaluator_scene(rng) for _ in range(6000)], seed=100_000)
    vae = base.new_taesd()
    params = list(vae.taesd_encoder.parameters()) + list(vae.taesd_decoder.parameters())
    opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps)))
    )
    gen = torch.Generator().manual_seed(seed)
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(images), (batch,), generator=gen)
        ox, oy = (8 * torch.randint(0, 5, (2,), generator=gen)).tolist()
        x = images[idx, :, oy : oy + 32, ox : ox + 32]
        if step % 2:
            x = x.flip(-1)
        z = vae.taesd_encoder(x)
        y = vae.taesd_decoder(z + 0.1 * torch.randn(z.shape, generator=gen))
        loss = F.l1_loss(y, x) + F.mse_loss(y, x) + 0.01 * F.relu(z.abs() - 2.5).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress:
            progress("vae", step, steps, loss.item())
    return vae.eval()


@torch.no_grad()
def encode(vae, images: torch.Tensor, batch: int = 128) -> torch.Tensor:
    return torch.cat([vae.taesd_encoder(images[i : i + batch]) for i in range(0, len(images), batch)])


def sd15_alphas_cumprod() -> torch.Tensor:
    """ComfyUI's ModelSamplingDiscrete schedule for SD1.x (linear in √β, 0.00085 → 0.012)."""
    from comfy.ldm.modules.diffusionmodules.util import make_beta_schedule

    betas = torch.as_tensor(make_beta_schedule("linear", 1000, linear_start=0.00085, linear_end=0.012), dtype=torch.float64)
    return torch.cumprod(1 - betas, 0).float()


def train_unet(latents, context, caption_index, empty, steps: int, batch: int = 32, lr: float = 4e-4, seed: int = 2, progress=None):
    unet = base.new_unet(seed)
    ema = [p.detach().clone() for p in unet.parameters()]
    params = list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    warmup = max(1, steps // 20)

    def lr_at(step):
        if step < warmup:
            return step / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    alphas = sd15_alphas_cumprod()
    snr = alphas / (1 - alphas)
    weight = torch.clamp(snr, max=5.0) / snr
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(latents), generator=gen)
    cursor = 0
    losses = []
    for step in range(1, steps + 1):
        if cursor + batch > len(order):
            order, cursor = torch.randperm(len(latents), generator=gen), 0
        idx = order[cursor : cursor + batch]
        cursor += batch
        x0 = latents[idx]
        ctx = context[caption_index[idx]].float()
        drop = torch.rand(batch, generator=gen) < 0.1
        ctx[drop] = empty
        t = torch.randint(0, 1000, (batch,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        pred = unet(xt, t.float(), ctx)
        loss = ((pred - noise).pow(2).mean((1, 2, 3)) * weight[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema, params, strict=True):
                e.lerp_(p.detach(), 1 - decay)
        losses.append(loss.item())
        if progress:
            progress("unet", step, steps, sum(losses[-50:]) / len(losses[-50:]))
    with torch.no_grad():
        for e, p in zip(ema, params, strict=True):
            p.copy_(e)
    return unet.eval(), losses


def build(unet_steps: int = 2400, vae_steps: int = 1200, scenes: int = 16000, progress=None) -> dict[str, str]:
    """Train both networks and write :data:`base.UNET_FILE` and :data:`base.VAE_FILE`."""
    from safetensors.torch import save_file

    from ..tiny_models.cpu import prepare_comfy_cpu

    prepare_comfy_cpu()
    torch.manual_seed(0)
    started = time.perf_counter()
    vae = train_vae(vae_steps, progress=progress)
    t_vae = time.perf_counter() - started

    rng = random.Random(3)
    data = [random_scene(rng) for _ in range(scenes)]
    raw = encode(vae, pictures(data, seed=0))
    mean, std = raw.mean().item(), raw.std().item()
    latents = (raw - mean) / std
    with torch.no_grad():
        vae.vae_scale.fill_(base.SD15_SCALE_FACTOR * std)
        vae.vae_shift.fill_(-mean / (base.SD15_SCALE_FACTOR * std))
    captions = sorted({s.caption() for s in data})
    where = {c: i for i, c in enumerate(captions)}
    clip = base.world_clip()
    context = base.encode_captions(clip, captions + [""]).to(torch.float16)
    empty = context[-1].float()
    caption_index = torch.tensor([where[s.caption()] for s in data])
    t_data = time.perf_counter() - started - t_vae
    log.info("dataset: %d scenes, %d captions, latent mean %.3f std %.3f (%.0f s)", scenes, len(captions), mean, std, t_data)

    unet, losses = train_unet(latents, context, caption_index, empty, unet_steps, progress=progress)
    total = time.perf_counter() - started
    metadata = {
        "svdiff.world": "base",
        "world.unet_steps": str(unet_steps),
        "world.vae_steps": str(vae_steps),
        "world.scenes": str(scenes),
        "world.captions": str(len(captions)),
        "world.final_loss": f"{sum(losses[-100:]) / 100:.4f}",
        "world.build_seconds": f"{total:.0f}",
        "world.torch": torch.__version__,
    }
    save_file(base.quantize(unet.state_dict()), base.UNET_FILE, metadata=metadata)
    vae_sd = {k: v.detach().to(torch.float16).contiguous() for k, v in vae.state_dict().items()}
    save_file(vae_sd, base.VAE_FILE, metadata={"svdiff.world": "vae", "world.vae_steps": str(vae_steps)})
    log.info("wrote %s and %s in %.0f s (VAE %.0f s)", base.UNET_FILE.name, base.VAE_FILE.name, total, t_vae)
    return metadata
