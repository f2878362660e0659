"""Cross-attention capture for the attention regularisers (unmix, eq. 10) and their report.

The maps are computed explicitly (``svdiff.training.attention``) inside ComfyUI ``attn2``
replace patches, so sampling-time attention code and hooks stay ComfyUI's own.
"""

from __future__ import annotations

import torch

from ...training import attention as attention_math
from ...training.config import AttentionConfig
from .examples import AttentionTargets, Example
from .guider import batched_conditioning, run_inside


def attention_blocks(diffusion_model) -> list[tuple[str, int, int]]:
    """The (block name, number, transformer index) of every cross-attention of a UNet,
    as ComfyUI keys its ``attn2`` replace patches."""
    keys = []
    stages = (
        ("input", diffusion_model.input_blocks),
        ("middle", [diffusion_model.middle_block]),
        ("output", diffusion_model.output_blocks),
    )
    for name, blocks in stages:
        for number, block in enumerate(blocks):
            if block is None:  # a UNet built without a middle block
                continue
            for module in block.modules():
                for index, transformer in enumerate(getattr(module, "transformer_blocks", [])):
                    if getattr(transformer, "attn2", None) is not None:
                        keys.append((name, number, index))
    return keys


class AttentionRecorder:
    """Computes the UNet's cross-attention explicitly and keeps each layer's
    head-averaged probabilities ``(B, HW, T)`` with its ``(h, w)`` grid.

    Installed as ComfyUI ``attn2`` replace patches (they receive the projected q, k, v).
    Only records while ``active``: gradient checkpointing replays the forward during
    the backward pass, and those replays must not add maps.
    """

    def __init__(self):
        self.maps: list[tuple[torch.Tensor, tuple[int, int]]] = []
        self.active = False

    def __call__(self, q, k, v, extra_options):
        out, probs = attention_math.attend(q, k, v, extra_options["n_heads"])
        if self.active:
            shape = extra_options["activations_shape"]
            self.maps.append((probs, (int(shape[-2]), int(shape[-1]))))
        return out

    def install(self, patcher) -> int:
        diffusion_model = patcher.model.diffusion_model
        if type(diffusion_model).__name__ != "UNetModel":
            raise ValueError(
                f"the attention regularisers need a UNet with cross-attention (SD1.x, SD2.x, SDXL); "
                f"this model is {type(diffusion_model).__name__}: disconnect the attention input"
            )
        existing = patcher.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2")
        if existing:
            raise ValueError(
                "the MODEL already replaces its cross-attention (an attention-patching node is upstream); "
                "train on the plain model, or disconnect the attention input"
            )
        keys = attention_blocks(diffusion_model)
        for name, number, index in keys:
            patcher.set_model_attn2_replace(self, name, number, index)
        return len(keys)


def attention_penalty(maps, rows: list[AttentionTargets | None], config: AttentionConfig) -> torch.Tensor | None:
    """Weighted unmix + subject losses of the rows that have targets, averaged over layers."""
    terms = []
    for row, targets in enumerate(rows):
        if targets is None:
            continue
        per_layer = []
        for probs, grid in maps:
            attn = probs[row]
            value = attn.new_zeros(())
            if targets.regions and config.unmix_weight > 0:
                value = value + config.unmix_weight * attention_math.unmix_loss(attn, grid, targets.regions)
            if targets.special and targets.class_positions and config.subject_weight > 0:
                value = value + config.subject_weight * attention_math.subject_loss(
                    attn, grid, targets.special, targets.class_positions, config.threshold
                )
            per_layer.append(value)
        terms.append(torch.stack(per_layer).mean())
    return torch.stack(terms).mean() if terms else None


def outside_attention(
    model, conditioning: dict[str, list], examples: list[Example], percents=(0.25, 0.5, 0.75), seed: int = 0, relative: bool = True
) -> list[list[float]]:
    """How much of each subject token's attention lands outside its region.

    For every example with regions, per region: the fraction of the token's attention
    mass outside the region (:func:`attention.outside_mass`, as a fraction or, with
    ``relative=False``, per pixel), averaged over the UNet's
    cross-attention layers and the noise levels at ``percents`` of the schedule.
    ``conditioning`` maps each example's caption to its CONDITIONING. ``model`` is not modified.
    """
    patcher = model.clone()
    recorder = AttentionRecorder()
    recorder.install(patcher)
    captions = sorted(conditioning)
    rows = {caption: i for i, caption in enumerate(captions)}
    results: list[list[float]] = []

    def body(model_wrap, extra_args):
        inner = model_wrap.inner_model
        conds = model_wrap.conds["positive"]
        device = patcher.load_device
        generator = torch.Generator().manual_seed(seed)
        options = dict(extra_args["model_options"].get("transformer_options", {}))
        for example in examples:
            if example.attention is None or not example.attention.regions:
                continue
            x0 = inner.process_latent_in(example.latent.to(device, torch.float32))
            noise = torch.randn(x0.shape, generator=generator).to(device)
            totals = [0.0] * len(example.attention.regions)
            for percent in percents:
                sigma = torch.tensor([float(inner.model_sampling.percent_to_sigma(percent))], device=device)
                x_t = inner.model_sampling.noise_scaling(sigma, noise, x0)
                recorder.maps.clear()
                recorder.active = True
                with torch.no_grad():
                    inner.apply_model(
                        x_t, sigma, transformer_options=dict(options), **batched_conditioning(conds, [rows[example.caption]], x_t, sigma)
                    )
                recorder.active = False
                for i, (positions, mask) in enumerate(example.attention.regions):
                    values = [
                        float(attention_math.outside_mass(probs[0], grid, positions, mask, relative)) for probs, grid in recorder.maps
                    ]
                    totals[i] += sum(values) / len(values) / len(percents)
            results.append(totals)

    run_inside(patcher, [conditioning[c][0] for c in captions], body, examples[0].latent, seed)
    return results
