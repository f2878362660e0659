"""Guidance for Cut-Mix-Unmix models: CFG against a mixture of the null and the prior prompts."""

from __future__ import annotations

import comfy.samplers
import node_helpers


class NegativePriorGuider(comfy.samplers.CFGGuider):
    """CFG whose unconditional prediction is β·ε(∅) + (1−β)·ε(c_neg) (paper eqs. 8–9).

    ComfyUI's models return x̂₀ = A(σ, x) + B(σ)·ε̂, affine in the prediction, and both
    mixtures have weights summing to 1, so mixing the x̂₀ is the same as mixing ε̂ —
    for v-prediction and flow models too.
    """

    def set_conds(self, positive, negative, prior_negative):
        prior_negative = node_helpers.conditioning_set_values(prior_negative, {"prompt_type": "negative"})
        self.inner_set_conds({"positive": positive, "negative": negative, "prior_negative": prior_negative})

    def set_cfg(self, cfg, beta):
        self.cfg, self.beta = cfg, beta

    def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006 (ComfyUI's signature)
        conds = [self.conds.get("positive"), self.conds.get("negative"), self.conds.get("prior_negative")]
        out = comfy.samplers.calc_cond_batch(self.inner_model, conds, x, timestep, model_options)
        for fn in model_options.get("sampler_pre_cfg_function", []):
            args = {"conds": conds, "conds_out": out, "cond_scale": self.cfg, "timestep": timestep,
                    "input": x, "sigma": timestep, "model": self.inner_model, "model_options": model_options}  # fmt: skip
            out = fn(args)
        cond, empty, prior = out
        uncond = self.beta * empty + (1.0 - self.beta) * prior  # eq. 9
        # eq. 8, through ComfyUI's cfg function so sampler_cfg/post-cfg hooks still apply
        return comfy.samplers.cfg_function(self.inner_model, cond, uncond, self.cfg, x, timestep, model_options, conds[0], conds[1])
