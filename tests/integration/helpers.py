"""Float64 references and weight access shared by the integration tests."""

from __future__ import annotations

import torch

from comfyui_svdiff.svdiff.shift import SpectralShift, parse_key
from devtools import tiny_models


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


def clamping_pair(model) -> tuple[SpectralShift, SpectralShift]:
    """Two shifts whose sum differs from two separately clamped updates.

    δ₁ removes σ₁ entirely and δ₂ gives half of it back: one ReLU (eqs. 4, 5) keeps σ₁ at
    0.5·σ₁ in effect, two clamped updates would not.
    """
    first = random_shift(model, None, seed=1, clamp_some=False, name="a")
    second = random_shift(model, None, seed=2, clamp_some=False, name="b")
    for key in first.tensors:
        if key.endswith(".delta"):
            first.tensors[key][0] = -50.0
            second.tensors[key][0] = 20.0
    return first, second


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


def noiseless_sampler(model, positive, negative, latent, noise_seed: int, steps: int = 2) -> dict:
    """KSamplerAdvanced without added noise: the result depends on the weights only, and
    ``noise_seed`` (unused) makes a prompt new to ComfyUI's cache so it runs again."""
    inputs = {"model": list(model), "positive": list(positive), "negative": list(negative), "latent_image": list(latent)}
    inputs.update(
        add_noise="disable", noise_seed=noise_seed, steps=steps, cfg=1.0, sampler_name="euler", scheduler="normal",
        start_at_step=0, end_at_step=10000, return_with_leftover_noise="disable",
    )  # fmt: skip
    return {"class_type": "KSamplerAdvanced", "inputs": inputs}


def write_image_folder(folder, count: int = 2, seed: int = 0, caption: str = "photo of a sks dog", size=(64, 64)):
    """``count`` random RGB images with one caption file each."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(caption)
    return folder


def train_prompt(ckpt, folder, **overrides):
    inputs = {
        "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "dataset": ["2", 0],
        "steps": 3, "learning_rate": 1e-3, "learning_rate_1d": 1e-6, "layers": "UNet-CA-KV", "name_patterns": "", "rank": 0,
        "prior_weight": 1.0, "class_prompt": "photo of a dog", "num_class_images": 2, "batch_size": 1, "grad_accumulation": 1,
        "optimizer": "AdamW", "warmup_steps": 0, "max_grad_norm": 1.0, "random_flip": True, "gradient_checkpointing": False,
        "seed": 4, "save_every": 2, "filename_prefix": "tests/dog", "resume_from": "[none]", "save_on_cancel": True,
        "preview_every": 2, "preview_prompt": "", "train_text_encoder": False, "learning_rate_text": 1e-4,
    }  # fmt: skip
    inputs.update(overrides)
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {
            "class_type": "SVDiffDatasetFromFolder",
            "inputs": {
                "folder": folder,
                "resolution": 64,
                "default_caption": "sks dog",
                "trigger_word": "sks",
                "caption_extension": ".txt",
            },
        },
        "3": {"class_type": "SVDiffTrain", "inputs": inputs},
    }


def edit_prompt(ckpt, *, alpha=0.0, eta=0.5, denoise=1.0, latent_from="4", steps=4, noise_latent=("5", 0)):
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "photo of a crown with a blue diamond"}},
        "3": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0x3366AA}},
        "4": {"class_type": "VAEEncode", "inputs": {"pixels": ["3", 0], "vae": ["1", 2]}},
        "5": {
            "class_type": "SVDiffDDIMInversion",
            "inputs": {
                "model": ["1", 0],
                "positive": ["2", 0],
                "latent": [latent_from, 0],
                "sigmas": ["6", 0],
                "cfg": 1.0,
                "refine_iterations": 1,
            },
        },
        "6": {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "normal", "steps": steps, "denoise": denoise}},
        "7": {"class_type": "SVDiffInvertedNoise", "inputs": {"inverted_latent": list(noise_latent), "noise_seed": 1, "alpha": alpha}},
        "8": {"class_type": "SVDiffDDIMSampler", "inputs": {"eta": eta, "s_noise": 1.0}},
        "9": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "photo of a crown"}},
        "10": {"class_type": "CFGGuider", "inputs": {"model": ["1", 0], "positive": ["9", 0], "negative": ["9", 0], "cfg": 1.0}},
        "11": {
            "class_type": "SamplerCustomAdvanced",
            "inputs": {"noise": ["7", 0], "guider": ["10", 0], "sampler": ["8", 0], "sigmas": ["6", 0], "latent_image": ["4", 0]},
        },
        "12": {"class_type": "VAEDecode", "inputs": {"samples": ["11", 0], "vae": ["1", 2]}},
        "13": {"class_type": "PreviewImage", "inputs": {"images": ["12", 0]}},
    }


def cd_train_prompt(ckpt, folders, **overrides):
    inputs = {
        "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "dataset": ["2", 0], "regularization": ["3", 0],
        "deltas": "K/V weights (Custom Diffusion)", "steps": 3, "learning_rate": 1e-3, "learning_rate_spectral": 1e-3,
        "modifier_token": "<new1>", "initializer_token": "42170", "learning_rate_token": 1e-2, "augmentation": "auto",
        "augment_variants": 2, "prior_weight": 1.0, "class_prompt": "", "num_class_images": 0, "batch_size": 1,
        "random_flip": True, "seed": 3, "filename_prefix": "cd_test", "overwrite": False,
    }  # fmt: skip
    inputs.update(overrides)

    def folder(name, trigger):
        inputs = {"folder": name, "resolution": 64, "default_caption": "", "trigger_word": trigger, "caption_extension": ".txt"}
        return {"class_type": "SVDiffDatasetFromFolder", "inputs": inputs}

    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": folder(folders[0], "<new1>"),
        "3": folder(folders[1], ""),
        "4": {"class_type": "SVDiffTrainCustomDiffusion", "inputs": inputs},
    }


CANARY_TEXT = "canary: a lighthouse on a cliff at dusk"


def canary_prompt(ckpt: str, index: int, tag: str) -> dict:
    """Sampling without noise from the shared checkpoint: a pure function of its weights.

    ``noise_seed`` changes nothing (add_noise is off) but makes every canary a new
    prompt, so the sampler and the text encoder run again on the cached MODEL/CLIP."""
    return {
        "c1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "c2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["c1", 1], "text": CANARY_TEXT}},
        "c3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "c4": noiseless_sampler(["c1", 0], ["c2", 0], ["c2", 0], ["c3", 0], noise_seed=index),
        "c5": {"class_type": "SaveLatent", "inputs": {"samples": ["c4", 0], "filename_prefix": f"canary/{tag}_{index:03}"}},
    }


def canary_latent(server, ckpt: str, index: int, tag: str) -> torch.Tensor:
    """Run :func:`canary_prompt` through a real server and read its latent from disk."""
    from safetensors.torch import load_file

    from devtools.server import error_of

    entry = server.run(canary_prompt(ckpt, index, tag), timeout=300)
    assert error_of(entry) is None, error_of(entry)
    (path,) = (server.output_dir / "canary").glob(f"{tag}_{index:03}_*.latent")
    return load_file(str(path))["latent_tensor"]


SKS, DOG = "photo of a sks dog", "photo of a dog"
"""The captions of :func:`tiny_examples` (instance) and of prior examples."""


def tiny_examples(arch, count=3, seed=0, size=8, caption=SKS):
    from comfyui_svdiff.svdiff.comfy.training.examples import Example

    c = tiny_models.latent_channels(arch)
    g = torch.Generator().manual_seed(seed)
    return [Example(torch.randn(1, c, size, size, generator=g), caption, torch.randn(1, c, size, size, generator=g)) for _ in range(count)]


def train_tiny(model, clip, config, instance=None, prior=None, **kwargs):
    """A run on random latents captioned :data:`SKS` (prior: :data:`DOG`); ``kwargs`` are TrainRequest fields."""
    from comfyui_svdiff.svdiff.comfy.training.run import TrainRequest, train

    arch = type(model.model.model_config).__name__
    conditioning = {caption: tiny_models.encode_prompt(clip, caption) for caption in (SKS, DOG)}
    instance = instance if instance is not None else tiny_examples("Flux" if arch == "Flux" else "SD15")
    return train(TrainRequest(model, config, instance, prior or [], conditioning=conditioning, architecture=arch, **kwargs))


def observable_state(patcher) -> dict:
    """Everything about a MODEL's or CLIP's patcher and its modules that another node could see.

    Weights (values, dtype, device, ``requires_grad``), module training modes, hooks,
    instance-level ``forward`` replacements, ComfyUI weight wrappers
    (``weight_function``/``bias_function``), and the patcher's patches, object patches,
    weight-wrapper patches and injections. Compared before and after an operation that
    must leave its input alone.
    """
    model = patcher.model
    modules = dict(model.named_modules())

    def own_forward(module) -> bool:
        forward = vars(module).get("forward")  # ComfyUI's unpatch may leave the bound class forward
        return forward is None or (getattr(forward, "__self__", None) is module and forward.__func__ is type(module).forward)

    return {
        "weights": {n: (p.detach().clone(), p.dtype, p.device, p.requires_grad) for n, p in model.named_parameters()},
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
        "training": {n: m.training for n, m in modules.items()},
        "hooks": {
            n: tuple(len(getattr(m, h, {})) for h in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"))
            for n, m in modules.items()
        },
        "forwards": sorted(n for n, m in modules.items() if not own_forward(m)),
        "wrappers": {
            n: (len(getattr(m, "weight_function", []) or []), len(getattr(m, "bias_function", []) or [])) for n, m in modules.items()
        },
        "patches": {k: list(v) for k, v in patcher.patches.items()},
        "object_patches": dict(patcher.object_patches),
        "weight_wrapper_patches": {k: list(v) for k, v in getattr(patcher, "weight_wrapper_patches", {}).items()},
        "injections": {k: list(v) for k, v in getattr(patcher, "injections", {}).items()},
    }


def assert_same_state(before: dict, after: dict, what: str = "") -> None:
    """``observable_state`` before == after, naming the first difference."""
    for part in before:
        if part in ("weights", "buffers"):
            assert before[part].keys() == after[part].keys(), f"{what}{part}: names changed"
            for name, old in before[part].items():
                new = after[part][name]
                if part == "weights":
                    assert old[1:] == new[1:], f"{what}{name}: (dtype, device, requires_grad) {old[1:]} -> {new[1:]}"
                    old, new = old[0], new[0]
                # bit for bit (uninitialised weights, such as a missing text_projection, may hold NaN)
                assert torch.equal(_bits(old), _bits(new)), f"{what}{name}: values changed"
        else:
            assert before[part] == after[part], f"{what}{part} changed"


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
