"""Random kohya-style LoRAs whose keys come from ComfyUI's own LoRA key maps."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .cpu import prepare_comfy_cpu
from .weights import param_seed


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
            g = torch.Generator().manual_seed(param_seed(seed, ns, weight_key))
            out_f, in_f = w.shape[0], w.shape[1]
            k = tuple(w.shape[2:])
            down = torch.randn((rank, in_f) + k, generator=g) / math.sqrt(in_f * math.prod(k))
            up = torch.randn((out_f, rank) + (1,) * len(k), generator=g) * (scale / math.sqrt(rank))
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
