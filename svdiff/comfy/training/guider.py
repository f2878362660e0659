"""Running code inside a ComfyUI guider, and the conditioning of a training batch.

Training and the attention report run as a "sampler" inside ``CFGGuider.sample``, so
model loading, conditioning preparation, hooks and model wrappers are ComfyUI's own.
"""

from __future__ import annotations

from collections.abc import Callable

import comfy.sampler_helpers
import comfy.samplers
import torch


class FullLoadGuider(comfy.samplers.CFGGuider):
    """Loads the model fully (training cannot offload) and keeps the positive conds only."""

    def outer_sample(
        self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None, disable_pbar=False, seed=None, latent_shapes=None
    ):
        self.inner_model, self.conds, self.loaded_models = comfy.sampler_helpers.prepare_sampling(
            self.model_patcher, noise.shape, self.conds, self.model_options, force_full_load=True
        )
        device = self.model_patcher.load_device
        try:
            self.model_patcher.pre_run()
            self.inner_sample(
                noise.to(device), latent_image.to(device), device, sampler, sigmas.to(device), denoise_mask, callback, disable_pbar, seed
            )
        finally:
            self.model_patcher.cleanup()
        comfy.sampler_helpers.cleanup_models(self.conds, self.loaded_models)
        del self.inner_model
        del self.loaded_models
        return latent_image


class RunInside(comfy.samplers.Sampler):
    def __init__(self, body: Callable):
        self.body = body

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None, disable_pbar=False):
        self.body(model_wrap, extra_args)
        return latent_image


def fresh_conditioning(clip, tokens: list, model, indices: list[int], x: torch.Tensor, sigma: torch.Tensor) -> dict:
    """Conditioning of a batch with the captions re-encoded by the text encoder being trained."""
    encoded = {}
    for index in sorted(set(indices)):
        cond = clip.encode_from_tokens_scheduled(tokens[index], show_pbar=False)
        encoded[index] = comfy.sampler_helpers.convert_cond(cond)
    parts = []
    for row, index in enumerate(indices):
        conds = comfy.samplers.encode_model_conds(model.extra_conds, [dict(encoded[index][0])], x[row : row + 1], x.device, "positive")
        parts.append(comfy.samplers.get_area_and_mult(conds[0], x[row : row + 1], sigma[row : row + 1]).conditioning)
    return comfy.samplers.cond_cat(parts)


def batched_conditioning(conds: list, indices: list[int], x: torch.Tensor, sigma: torch.Tensor) -> dict:
    """Per-example conditioning for a batch, concatenated the way ComfyUI batches chunks."""
    parts = []
    for row, index in enumerate(indices):
        area = comfy.samplers.get_area_and_mult(conds[index], x[row : row + 1], sigma[row : row + 1])
        parts.append(area.conditioning)
    return comfy.samplers.cond_cat(parts)


def run_inside(patcher, positive: list, body: Callable, like: torch.Tensor, seed: int) -> None:
    """``body(model_wrap, extra_args)`` inside a fully loaded guider over ``patcher`` with
    the CONDITIONING ``positive``; ``like`` is a latent of the size trained on."""
    guider = FullLoadGuider(patcher)
    guider.inner_set_conds({"positive": positive})
    zeros = torch.zeros((1, *like.shape[1:]))
    guider.sample(zeros, zeros, RunInside(body), torch.ones(2), seed=seed)
