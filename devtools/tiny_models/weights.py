"""Deterministic, seed-derived parameter values for models built in code.

ComfyUI's ops skip ``reset_parameters``, so freshly built tiny models hold garbage;
:func:`deterministic_init_` fills them from a seed, per parameter name.
"""

from __future__ import annotations

import hashlib
import math

import torch


def param_seed(seed: int, namespace: str, name: str) -> int:
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
def deterministic_init_(module: torch.nn.Module, seed: int = 0, namespace: str = "") -> torch.nn.Module:
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
            g = torch.Generator(device="cpu").manual_seed(param_seed(seed, namespace, full))
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


def check_finite(module: torch.nn.Module, what: str = "module", limit: float = 1e4) -> None:
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
                raise AssertionError(f"{what}: {kind} {name} has |x| > {limit} (uninitialised?)")


def quiet_rng():
    """Keep the caller's global CPU RNG stream untouched while building.

    Some ComfyUI submodules are plain ``torch.nn`` layers whose default init
    draws from the global generator; we overwrite those values anyway, so the
    only effect would be shifting the random numbers a test draws afterwards.
    """
    return torch.random.fork_rng(devices=[])
