"""The training loss (paper eq. 3) as a named object, and the native-prediction MSE.

MSE between the model's *native* prediction and its target (ε for eps models, v for
v-prediction, the velocity for flow models) at uniformly drawn noise levels, plus λ
times the same loss on prior data, plus the attention regularisers. ComfyUI's
``apply_model`` returns the denoised x̂₀, which every model type computes as
``A(σ, x_t) + B(σ)·out``; inverting that affine map gives the native output and target
without knowing the model type: ``out = (x̂₀ − A)/B``, ``target = (x₀ − A)/B``.
"""

from __future__ import annotations

import dataclasses

import torch

from ...training.config import AttentionConfig, TrainConfig
from .attention import AttentionRecorder, attention_penalty
from .autograd import normal_tensors
from .examples import Example, Plan, uniform_plan
from .guider import batched_conditioning, fresh_conditioning


def native_mse(
    model, x_t: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor, x0: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-example MSE of the native prediction (see module docstring).

    ``weight`` ``(B, 1, H, W)`` masks the loss: the mean over the positions where it is 1.
    """
    sampling = model.model_sampling
    with torch.no_grad():
        a = sampling.calculate_denoised(sigma, torch.zeros_like(x_t), x_t)
        b = sampling.calculate_denoised(sigma, torch.ones_like(x_t), x_t) - a
    prediction = (denoised - a) / b
    target = (x0 - a) / b
    error = (prediction - target) ** 2
    if weight is None:
        return error.flatten(1).mean(dim=1)
    weight = weight.to(error.dtype).expand_as(error)
    return (error * weight).flatten(1).sum(dim=1) / weight.flatten(1).sum(dim=1).clamp_min(1.0)


class CaptionConditioning:
    """The conditioning of a batch, looked up by caption: rows of the CONDITIONING the
    guider prepared, or, with a text encoder being trained, fresh encodings of ``tokens``."""

    def __init__(self, captions: list[str], clip=None, tokens: list | None = None):
        self.index = {caption: i for i, caption in enumerate(captions)}
        self.clip, self.tokens = clip, tokens
        self.conds: list = []

    def __call__(self, model, captions: list[str], x: torch.Tensor, sigma: torch.Tensor) -> dict:
        rows = [self.index[caption] for caption in captions]
        if self.clip is not None:
            return fresh_conditioning(self.clip, self.tokens, model, rows, x, sigma)
        return batched_conditioning(self.conds, rows, x, sigma)


class DiffusionLoss:
    """Loss of one micro-batch, ``loss(step, micro, generator)`` (the ``Trainer``'s loss function).

    Bound to the guider's model inside the run (:meth:`bind`): examples then move to
    model space on its device, and the CONDITIONING becomes the prepared one.
    """

    def __init__(
        self,
        config: TrainConfig,
        instance: list[Example],
        prior: list[Example],
        conditioning: CaptionConditioning,
        plan: Plan | None = None,
        recorder: AttentionRecorder | None = None,
        attention: AttentionConfig | None = None,
    ):
        self.config, self.conditioning, self.recorder, self.attention = config, conditioning, recorder, attention
        self.raw_instance, self.raw_prior = instance, (prior if config.prior_weight > 0 else [])
        self.plan = plan or uniform_plan(len(self.raw_instance), len(self.raw_prior))
        self.inner = None

    def bind(self, model_wrap, extra_args, device) -> None:
        """Use the guider's model, prepared CONDITIONING and options; examples go to model space on ``device``."""
        self.inner, self.device = model_wrap.inner_model, device
        self.conditioning.conds = normal_tensors(model_wrap.conds["positive"])
        self.transformer_options = extra_args["model_options"].get("transformer_options", {})
        self.instance = [self._in_model_space(e) for e in self.raw_instance]
        self.prior = [self._in_model_space(e) for e in self.raw_prior]

    def _in_model_space(self, example: Example) -> Example:
        inner, device, mask = self.inner, self.device, example.mask
        return dataclasses.replace(
            example,
            latent=inner.process_latent_in(example.latent.to(device, torch.float32)).clone(),
            flipped=None if example.flipped is None else inner.process_latent_in(example.flipped.to(device, torch.float32)).clone(),
            mask=None if mask is None else mask.to(device, torch.float32).reshape(1, 1, *mask.shape[-2:]),
        )

    def __call__(self, step: int, micro: int, generator: torch.Generator) -> torch.Tensor:
        config, inner, device = self.config, self.inner, self.device
        instance_rows, prior_rows = self.plan(generator, config.batch_size)
        batch = [self.instance[row].drawn(generator, config.flip) for row in instance_rows]
        examples = batch + ([self.prior[row] for row in prior_rows] if self.prior else [])
        x0 = torch.cat([e.latent for e in examples])
        weight = None
        if any(e.mask is not None for e in examples):
            ones = x0.new_ones((1, 1, *x0.shape[-2:]))
            weight = torch.cat([ones if e.mask is None else e.mask for e in examples])
        noise = torch.randn(x0.shape, generator=generator).to(device)
        percent = torch.rand(x0.shape[0], generator=generator)
        sigma = torch.tensor([float(inner.model_sampling.percent_to_sigma(float(p))) for p in percent], device=device)
        x_t = inner.model_sampling.noise_scaling(sigma, noise, x0)
        c = self.conditioning(inner, [e.caption for e in examples], x_t, sigma)
        options = dict(self.transformer_options)
        options["cond_or_uncond"] = [0] * x0.shape[0]
        options["sigmas"] = sigma
        recorder = self.recorder
        if recorder is not None:
            recorder.maps.clear()
            recorder.active = True
        try:
            denoised = inner.apply_model(x_t, sigma, transformer_options=options, **c)
        finally:
            if recorder is not None:
                recorder.active = False
        per_example = native_mse(inner, x_t, sigma, denoised, x0, weight)
        n = len(batch)
        loss = per_example[:n].mean()
        if self.prior:
            loss = loss + config.prior_weight * per_example[n:].mean()
        if recorder is not None:
            penalty = attention_penalty(recorder.maps, [e.attention for e in batch], self.attention)
            recorder.maps.clear()
            if penalty is not None:
                loss = loss + penalty
        return loss
