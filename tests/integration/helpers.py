"""Float64 references and weight access shared by the integration tests."""

from __future__ import annotations

import torch

from comfyui_svdiff.svdiff.shift import SpectralShift, parse_key


def patched_state_dict(patcher) -> dict[str, torch.Tensor]:
    """The weights ComfyUI computes when it loads ``patcher`` through its normal path.

    ``load_models_gpu`` (what samplers and text encoding call) first unloads any other
    clone of the same model, so this sees exactly this patcher's patches. Everything
    is unloaded again afterwards, restoring the unpatched weights.
    """
    import comfy.model_management as mm

    mm.load_models_gpu([patcher], force_full_load=True)
    try:
        return {k: v.detach().clone() for k, v in patcher.model.state_dict().items()}
    finally:
        mm.unload_all_models()


def random_shift(model, clip, seed=0, scale=0.05, clamp_some=True, rank=None, name="random") -> SpectralShift:
    """δ for every ≥2-D weight, elementwise deltas for every 1-D weight and bias."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    sources = [("diffusion_model.", model.model.state_dict(), "")]
    if clip is not None:
        sources.append(("", clip.cond_stage_model.state_dict(), "text_encoders."))
    for prefix, sd, file_prefix in sources:
        for key, w in sd.items():
            if prefix and not key.startswith(prefix):
                continue
            if not w.is_floating_point() or "position_ids" in key or w.ndim == 0:
                continue
            stem = file_prefix + key.rsplit(".", 1)[0]
            if key.endswith(".bias"):
                tensors[stem + ".diff_b"] = scale * 0.2 * torch.randn(w.shape, generator=g)
            elif w.ndim == 1 and not key.endswith(".weight"):
                # e.g. Flux RMSNorm ".scale": ComfyUI's generic "<param>.diff" form
                tensors[file_prefix + key + ".diff"] = scale * 0.2 * torch.randn(w.shape, generator=g)
            elif w.ndim == 1:
                tensors[stem + ".diff"] = scale * 0.2 * torch.randn(w.shape, generator=g)
            elif key.endswith(".weight"):
                r = min(w.shape[0], w[0].numel())
                k = r if rank is None else min(rank, r)
                delta = scale * torch.randn(k, generator=g)
                if clamp_some:
                    delta[0] = -1e3  # clamps σ₁ to zero: exercises the ReLU
                tensors[stem + ".delta"] = delta
    return SpectralShift(tensors, {"svdiff.architecture": type(model.model.model_config).__name__}, name=name)


def reference_weight(base: torch.Tensor, terms, diff_terms=()) -> torch.Tensor:
    """W₀ + U diag(ReLU(σ + Σ sᵢδᵢ) − σ) Vᵀ + Σ sⱼdⱼ in float64."""
    w = base.double()
    out = w.clone()
    if terms:
        matrix = w.reshape(w.shape[0], -1) if w.ndim > 1 else w[None]
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        total = torch.zeros_like(s)
        for strength, delta in terms:
            total[: delta.numel()] += strength * delta.double()
        update = u @ torch.diag(torch.relu(s + total) - s) @ vh
        out = out + update.reshape(w.shape)
    for strength, d in diff_terms:
        out = out + strength * d.double()
    return out


def expected_state(component_sd, file_prefix: str, shifts_and_strengths, lora_updates=None) -> dict[str, torch.Tensor]:
    """Reference for every parameter of one component touched by the shifts."""
    spectral: dict[str, list] = {}
    elementwise: dict[str, list] = {}
    for shift, strength in shifts_and_strengths:
        for key, tensor in shift.tensors.items():
            if not key.startswith(file_prefix):
                continue
            target = parse_key(key)
            param = target.param
            if param not in component_sd and param.endswith(".weight") and param[: -len(".weight")] in component_sd:
                param = param[: -len(".weight")]  # "<full name>.diff" form (Flux ".scale")
            bucket = spectral if target.kind == "spectral" else elementwise
            bucket.setdefault(param, []).append((strength, tensor))
    expected = {}
    for param in set(spectral) | set(elementwise) | set(lora_updates or {}):
        w = reference_weight(component_sd[param], spectral.get(param, []), elementwise.get(param, []))
        if lora_updates and param in lora_updates:
            w = w + lora_updates[param]
        expected[param] = w
    return expected


def assert_weights_close(got: dict, expected: dict, base: dict, rel=1e-4, what=""):
    """‖got − expected‖ ≤ rel · ‖expected − base‖ + half-precision rounding, per key."""
    assert expected, "nothing to compare"
    worst = (0.0, "")
    for key, exp in expected.items():
        g = got[key].double()
        change = float((exp - base[key].double()).norm())
        err = float((g - exp).norm())
        eps = torch.finfo(got[key].dtype).eps if got[key].is_floating_point() else 0
        budget = rel * change + 2 * eps * float(exp.norm()) + 1e-12
        worst = max(worst, (err / max(budget, 1e-30), key))
        assert err <= budget, f"{what}{key}: error {err:.3e} > budget {budget:.3e} (change {change:.3e})"
    return worst


def base_state(patcher):
    return {k: v.detach().clone() for k, v in patcher.model.state_dict().items()}


def ksampler(model, positive, negative, latent, seed=1, steps=1, cfg=1.0) -> dict:
    """An API-format KSampler node (euler, normal schedule, full denoise)."""
    inputs = {"model": list(model), "positive": list(positive), "negative": list(negative), "latent_image": list(latent)}
    inputs.update(seed=seed, steps=steps, cfg=cfg, sampler_name="euler", scheduler="normal", denoise=1.0)
    return {"class_type": "KSampler", "inputs": inputs}
