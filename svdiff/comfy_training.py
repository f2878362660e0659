"""Training spectral shifts inside ComfyUI: the second (and last) ComfyUI bridge.

Imported lazily by the training node only. It installs the trainable layers of
``svdiff.training.layers`` on a *clone* of the MODEL through ComfyUI's own patch
mechanisms — object patches for the layers' ``forward`` (spectral shifts) and weight
wrappers (elementwise 1-D deltas) — so ComfyUI loads, unloads and restores them like
any other patch, and runs the optimisation loop inside a ComfyUI guider, which loads
the model and prepares the conditioning exactly as sampling does.

Loss (paper eq. 3): MSE between the model's *native* prediction and its target (ε
for eps models, v for v-prediction, the velocity for flow models) at uniformly drawn
noise levels, plus λ times the same loss on prior data. ComfyUI's ``apply_model``
returns the denoised x̂₀, which every model type computes as ``A(σ, x_t) + B(σ)·out``;
inverting that affine map gives the native output and target without knowing the
model type: ``out = (x̂₀ − A)/B``, ``target = (x₀ − A)/B``.
"""

from __future__ import annotations

import copy
import logging
import math
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import comfy.model_management
import comfy.samplers
import comfy.utils
import torch
import torch.utils.checkpoint

from .cache import content_hash, default_cache
from .comfy_bridge import bypassed_weights
from .fileformat import HASH_CHARS
from .shift import SpectralShift
from .training import attention as attention_math
from .training.config import AttentionConfig, TrainConfig
from .training.layers import ConvGeometry, ShiftedLayer, shifted_call
from .training.loop import Trainer
from .training.subsets import select_parameters

log = logging.getLogger("svdiff")


# ----------------------------------------------------------------------------------
# Making ComfyUI's weights usable by autograd


def make_autograd_ready(module: torch.nn.Module) -> int:
    """Replace inference tensors among ``module``'s parameters and buffers by equal
    normal tensors; returns how many were replaced.

    ComfyUI executes nodes under ``torch.inference_mode``, so weights loaded during a
    prompt are inference tensors, which autograd refuses to save for the backward
    pass even when they need no gradient. The values are unchanged, so the model
    behaves identically afterwards.
    """
    replaced = 0
    for owner in module.modules():
        for name, param in list(owner.named_parameters(recurse=False)):
            if param.is_inference():
                setattr(owner, name, torch.nn.Parameter(param.detach().clone(), requires_grad=False))
                replaced += 1
        for name, buffer in list(owner.named_buffers(recurse=False)):
            if buffer is not None and buffer.is_inference():
                owner._buffers[name] = buffer.clone()
                replaced += 1
    return replaced


def _normal_tensors(value):
    """Deep copy of a conditioning structure with every tensor a normal (cloned) tensor."""
    if torch.is_tensor(value):
        return value.clone() if value.is_inference() else value
    if isinstance(value, dict):
        return {k: _normal_tensors(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_normal_tensors(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_normal_tensors(v) for v in value)
    if hasattr(value, "cond") and torch.is_tensor(getattr(value, "cond", None)):
        clone = copy.copy(value)
        clone.cond = _normal_tensors(value.cond)
        return clone
    return value


def _rope_reference(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotary embedding with plain torch ops (autograd-capable).

    ``freqs[..., i, j]`` holds the 2×2 rotation of each channel pair; ComfyUI's Flux
    code applies it through comfy_kitchen's fused kernel, which has no backward.
    """
    pairs = x.to(freqs.dtype).reshape(*x.shape[:-1], -1, 1, 2)
    rotated = freqs[..., 0] * pairs[..., 0] + freqs[..., 1] * pairs[..., 1]
    return rotated.reshape(*x.shape).type_as(x)


class _DifferentiablePaths:
    """Within the block, ComfyUI's models take their differentiable code paths.

    ComfyUI ≥ v0.14 has a switch for that, ``comfy.model_management.in_training`` (its
    Train LoRA node sets it; Flux-style RoPE, LTX and others read it), which is set here.
    Older releases have no switch, and their Flux code applies RoPE through
    comfy_kitchen's fused kernel, which has no backward: there the two RoPE functions are
    replaced by :func:`_rope_reference` for the block.
    """

    def __enter__(self):
        self.module = None
        if hasattr(comfy.model_management, "in_training"):
            self.was_training = comfy.model_management.in_training
            comfy.model_management.in_training = True
            return self
        try:
            import comfy.ldm.flux.math as flux_math
        except ImportError:
            return self
        self.module = flux_math
        self.saved = (flux_math.apply_rope, flux_math.apply_rope1)
        flux_math.apply_rope1 = _rope_reference
        flux_math.apply_rope = lambda q, k, freqs: (_rope_reference(q, freqs), _rope_reference(k, freqs))
        return self

    def __exit__(self, *exc):
        if self.module is not None:
            self.module.apply_rope, self.module.apply_rope1 = self.saved
        elif hasattr(comfy.model_management, "in_training"):
            comfy.model_management.in_training = self.was_training
        return False


# ----------------------------------------------------------------------------------
# Installing trainable layers on a patcher


class ElementwiseDelta(torch.nn.Module):
    """Weight wrapper ``w ↦ w + d`` for a 1-D weight or a bias (ComfyUI weight_function)."""

    def __init__(self, delta: torch.nn.Parameter):
        super().__init__()
        self.delta = delta

    def __call__(self, weight):
        return weight + self.delta.to(weight.dtype)

    def passive_memory_usage(self):
        return self.delta.numel() * self.delta.element_size()

    def move_to(self, device):
        self.delta.data = self.delta.data.to(device)
        return self.passive_memory_usage()


def _weight_and_bias(module: torch.nn.Module, x: torch.Tensor):
    if hasattr(module, "comfy_cast_weights"):
        import comfy.ops

        return comfy.ops.cast_bias_weight(module, x)
    bias = None if module.bias is None else module.bias.to(x.dtype)
    return module.weight.to(x.dtype), bias


def install_layers(patcher, layers: dict[str, ShiftedLayer], elementwise: dict[str, torch.nn.Parameter]) -> None:
    """Object-patch each shifted layer's forward; weight-wrap each elementwise delta."""
    for key, layer in layers.items():
        path = key[: -len(".weight")]
        module = comfy.utils.get_attr(patcher.model, path)
        geometry = ConvGeometry.of(module)
        frozen = type(module).forward.__get__(module)

        def forward(x, *args, _layer=layer, _frozen=frozen, _module=module, _geometry=geometry, **kwargs):
            return shifted_call(_layer, x, lambda inp: _frozen(inp, *args, **kwargs), lambda inp: _weight_and_bias(_module, inp), _geometry)

        patcher.add_object_patch(f"{path}.forward", forward)
    for key, delta in elementwise.items():
        patcher.add_weight_wrapper(key, ElementwiseDelta(delta))


def _checkpointed(forward):
    """Gradient checkpointing that replays with the arguments as they were.

    ComfyUI mutates ``transformer_options`` (a dict argument) during the forward pass;
    a plain checkpoint would replay with the mutated dict, so dict arguments are
    copied both for the first pass and for the replay.
    """

    def run(*args, **kwargs):
        args = tuple(dict(a) if isinstance(a, dict) else a for a in args)
        kwargs = {k: dict(v) if isinstance(v, dict) else v for k, v in kwargs.items()}

        def replay(*a):
            return forward(
                *(dict(x) if isinstance(x, dict) else x for x in a), **{k: dict(v) if isinstance(v, dict) else v for k, v in kwargs.items()}
            )

        return torch.utils.checkpoint.checkpoint(replay, *args, use_reentrant=False)

    return run


def install_norm_input_copies(patcher, root: str = "diffusion_model") -> int:
    """Let normalisation layers keep a private copy of their input for the backward pass.

    Transformer models in ComfyUI (Flux's blocks: ``img += …``; the CLIP text
    encoders: ``x += …``) add residuals in place into the tensor a preceding norm
    saved for its backward, which autograd rejects. The SD UNets do not.
    """
    count = 0
    base = comfy.utils.get_attr(patcher.model, root) if root else patcher.model
    for name, module in base.named_modules():
        if "Norm" not in type(module).__name__ or not name:
            continue
        original = type(module).forward.__get__(module)

        def forward(x, *args, _original=original, **kwargs):
            return _original(x.clone() if torch.is_grad_enabled() and x.requires_grad else x, *args, **kwargs)

        patcher.add_object_patch(f"{root}.{name}.forward" if root else f"{name}.forward", forward)
        count += 1
    return count


def install_checkpointing(patcher) -> int:
    """Checkpoint the highest non-container modules of the diffusion model."""
    count = 0

    def visit(module: torch.nn.Module, path: str) -> None:
        nonlocal count
        for name, child in module.named_children():
            child_path = f"{path}.{name}"
            if isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential, torch.nn.ModuleDict)):
                visit(child, child_path)
            else:
                key = f"{child_path}.forward"
                # A shifted layer can itself be a top-level child (conv_in, time_embed):
                # checkpoint its shifted forward, not the frozen one.
                inner = patcher.object_patches.get(key) or type(child).forward.__get__(child)
                patcher.add_object_patch(key, _checkpointed(inner))
                count += 1

    visit(patcher.model.diffusion_model, "diffusion_model")
    return count


# ----------------------------------------------------------------------------------
# The training run


@dataclass
class AttentionTargets:
    """What the attention regularisers need of one example (token positions in its caption)."""

    regions: list[tuple[list[int], torch.Tensor]] = field(default_factory=list)
    """Collages: each subject's special-token positions and its (h, w) latent-resolution mask."""
    special: list[int] = field(default_factory=list)
    """Single-subject examples: the special token's positions …"""
    class_positions: list[int] = field(default_factory=list)
    """… and the class word's, whose thresholded attention is the subject mask (eq. 10)."""


@dataclass
class Example:
    """One training example: a (process_latent_in-ed later) latent and its caption index."""

    latent: torch.Tensor  # (1, C, H, W), VAE latent as ComfyUI's VAEEncode returns it
    cond_index: int
    flipped: torch.Tensor | None = None  # latent of the mirrored image, if flips are on
    attention: AttentionTargets | None = None
    mask: torch.Tensor | None = None  # (H, W) latent-resolution loss mask (augmentation), None = all


Plan = Callable[[torch.Generator, int], tuple[list[int], list[int]]]
"""Which instance and prior examples a micro-batch of ``count`` draws."""


def uniform_plan(n_instance: int, n_prior: int) -> Plan:
    """Instance and prior examples drawn independently, uniformly (without replacement within a batch)."""

    def plan(generator: torch.Generator, count: int) -> tuple[list[int], list[int]]:
        order = torch.randperm(n_instance, generator=generator).tolist()
        instance = [order[i % n_instance] for i in range(count)]
        prior = []
        if n_prior:
            order = torch.randperm(n_prior, generator=generator).tolist()
            prior = [order[i % n_prior] for i in range(count)]
        return instance, prior

    return plan


# ----------------------------------------------------------------------------------
# Cross-attention capture


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


@dataclass
class TrainingResult:
    shift: SpectralShift
    losses: list[float]
    optimizer_state: dict[str, torch.Tensor]
    steps: int
    seconds: float
    parameters: int
    layers: int
    notes: list[str] = field(default_factory=list)
    embedding: dict[str, torch.Tensor] = field(default_factory=dict)
    """The modifier token's trained vectors as a ComfyUI embedding: ``{"clip_l": (1, d), …}``."""


@dataclass
class StepContext:
    """What ``on_step`` callbacks get: the shift so far and a way to sample with it."""

    snapshot: Callable[[], SpectralShift]
    patcher: object
    state: Callable[[], dict[str, torch.Tensor]]
    """The training state so far (float32 values, optimizer moments), for a resumable checkpoint."""

    def sample(self, positive, negative, latent: torch.Tensor, steps: int, seed: int, cfg: float = 5.0) -> torch.Tensor:
        """Sample with the model as it is being trained (the shifted layers active)."""
        import comfy.sample

        noise = comfy.sample.prepare_noise(latent, seed)
        with torch.no_grad():
            try:
                return comfy.sample.sample(
                    self.patcher, noise, steps, cfg, "euler", "normal", positive, negative, latent, seed=seed, disable_pbar=True
                )
            finally:
                self.patcher.pre_run()  # sampling's cleanup detaches the patcher from the model


class _Guider(comfy.samplers.CFGGuider):
    """Loads the model fully (training cannot offload) and keeps the positive conds only."""

    def outer_sample(
        self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None, disable_pbar=False, seed=None, latent_shapes=None
    ):
        import comfy.sampler_helpers

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


class _RunInside(comfy.samplers.Sampler):
    def __init__(self, body: Callable):
        self.body = body

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None, disable_pbar=False):
        self.body(model_wrap, extra_args)
        return latent_image


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


def train(
    model,
    positive: list,
    instance: list[Example],
    prior: list[Example],
    config: TrainConfig,
    resume: SpectralShift | None = None,
    optimizer_state: dict[str, torch.Tensor] | None = None,
    on_step: Callable[[int, float, StepContext], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
    architecture: str | None = None,
    metadata: dict[str, str] | None = None,
    gradient_checkpointing: bool = False,
    clip=None,
    captions: list[str] | None = None,
    plan: Plan | None = None,
    attention: AttentionConfig | None = None,
) -> TrainingResult:
    """Train a spectral shift on ``model`` (never modified) and return it (see :func:`_train`)."""
    # Everything trainable must be created outside ComfyUI's inference mode.
    shared = SharedModules([model.model] + ([clip.patcher.model] if clip is not None else []))
    with torch.inference_mode(False):
        try:
            shared.freeze()
            return _train(
                model, positive, instance, prior, config, resume, optimizer_state, on_step, progress, architecture, metadata,
                gradient_checkpointing, clip, captions, plan, attention,
            )  # fmt: skip
        except BaseException as exc:
            # Free the trainable tensors, optimizer state and decompositions that the
            # finished frames of the traceback hold, even if the caller (ComfyUI's
            # executor, a log handler) keeps the exception.
            traceback.clear_frames(exc.__traceback__)
            raise
        finally:
            release_training_hooks(model, clip)
            shared.restore()


class SharedModules:
    """The flags of the modules a MODEL or CLIP shares with its clones, put back after training.

    Training freezes every base parameter (``requires_grad`` False: autograd then needs
    gradients only for the shifts) and :func:`make_autograd_ready` replaces inference
    tensors by equal normal ones. Parameters are remembered by owner and name, not
    identity, so the flags return to the replacements; module training modes too.
    """

    def __init__(self, roots: list[torch.nn.Module]):
        self.flags = [
            (owner, name, p.requires_grad)
            for root in roots
            for owner in root.modules()
            for name, p in owner.named_parameters(recurse=False)
        ]
        self.modes = [(module, module.training) for root in roots for module in root.modules()]

    def freeze(self) -> None:
        for owner, name, _ in self.flags:
            param = getattr(owner, name)
            if not param.is_inference():  # those are replaced before training (make_autograd_ready)
                param.requires_grad_(False)

    def restore(self) -> None:
        for owner, name, flag in self.flags:
            param = getattr(owner, name)
            if param.requires_grad != flag and not param.is_inference():
                param.requires_grad_(flag)
        for module, training in self.modes:
            if module.training != training:
                module.train(training)


def release_training_hooks(model, clip=None) -> None:
    """Restore the shared modules after training, whatever happened.

    The training clone may still be loaded (its layer wrappers set as object patches on
    the model's modules), and ComfyUI's unpatch keeps a fully loaded model's weight
    wrappers in ``weight_function`` until the next load; both hold trainable tensors.
    """
    comfy.model_management.unload_all_models()
    roots = [model.model] + ([clip.patcher.model] if clip is not None else [])
    for root in roots:
        for module in root.modules():
            for attribute in ("weight_function", "bias_function"):
                wrappers = getattr(module, attribute, None)
                if wrappers:
                    setattr(module, attribute, [w for w in wrappers if not isinstance(w, ElementwiseDelta)])


def _train(
    model,
    positive: list,
    instance: list[Example],
    prior: list[Example],
    config: TrainConfig,
    resume: SpectralShift | None,
    optimizer_state: dict[str, torch.Tensor] | None,
    on_step: Callable[[int, float, StepContext], None] | None,
    progress: Callable[[int, int], None] | None,
    architecture: str | None,
    metadata: dict[str, str] | None,
    gradient_checkpointing: bool,
    clip,
    captions: list[str] | None,
    plan: Plan | None,
    attention: AttentionConfig | None,
) -> TrainingResult:
    """Train a spectral shift on ``model`` (never modified) and return it.

    ``positive`` is a ComfyUI CONDITIONING list with one entry per caption;
    ``Example.cond_index`` points into it. ``on_step(step, loss, context)`` runs after
    every optimizer step (see :class:`StepContext`); raising there stops the run.
    With ``config.train_text_encoder``, ``clip`` (never modified either) is trained too
    and ``captions[i]`` is re-encoded with gradients for every example of caption i.
    ``plan`` picks each micro-batch's examples (default :func:`uniform_plan`); with
    ``attention``, examples with :class:`AttentionTargets` add the regularisers.
    """
    started = time.perf_counter()
    if not instance:
        raise ValueError("the dataset is empty: give at least one image")
    shapes = {k: tuple(v.shape) for k, v in model.model_state_dict().items()}
    if config.method == "full":
        keys = select_parameters(shapes, "UNet-CA-KV")
        if not keys:
            raise ValueError("full K/V training needs cross-attention (attn2.to_k / to_v) layers; this model has none")
    else:
        keys = select_parameters(shapes, config.subset, config.patterns)
    if not keys:
        raise ValueError(
            f"layers '{config.subset}' with name_patterns '{config.patterns}' matches no weight of this model; choose another "
            "subset or fix name_patterns (substrings, globs or re:regex of layer names such as 'attn2.to_k')"
        )
    patched = [k for k in keys if model.patches.get(k)] or bypassed_weights(model, keys)
    if patched:
        raise ValueError(
            f"the MODEL already carries patches (LoRAs or shifts, as weight patches or in bypass mode) on {len(patched)} of the "
            f"layers to train, e.g. '{patched[0]}'; train on the base model and stack the LoRA or shift afterwards"
        )

    key_patches = model.get_key_patches()
    cache = default_cache()
    layers: dict[str, ShiftedLayer] = {}
    elementwise: dict[str, torch.nn.Parameter] = {}
    base_hashes: dict[str, str] = {}
    base = None
    spectral_keys = [k for k in keys if len(shapes[k]) >= 2] if config.method == "spectral" else []
    for i, key in enumerate(spectral_keys):
        base, convert = key_patches[key][0]
        base = convert(base, inplace=False)
        digest = content_hash(base)
        base_hashes[key] = digest[:HASH_CHARS]
        init = None if resume is None else resume.tensors.get(key[: -len(".weight")] + ".delta")
        layers[key] = ShiftedLayer(cache.get_or_compute(base, digest), shapes[key], rank=config.rank or None, init=init)
        if progress is not None:
            progress(i + 1, len(spectral_keys))
    for key in keys:
        if len(shapes[key]) == 1:
            base, convert = key_patches[key][0]
            base_hashes[key] = content_hash(convert(base, inplace=False))[:HASH_CHARS]
            start = torch.zeros(shapes[key], dtype=torch.float32)
            if resume is not None and (key[: -len(".weight")] + ".diff") in resume.tensors:
                start = resume.tensors[key[: -len(".weight")] + ".diff"].float().clone()
            elementwise[key] = torch.nn.Parameter(start)
    full: dict[str, torch.nn.Parameter] = {}
    if config.method == "full":
        for key in keys:
            base, convert = key_patches[key][0]
            base_hashes[key] = content_hash(convert(base, inplace=False))[:HASH_CHARS]
            full[key] = torch.nn.Parameter(torch.zeros(shapes[key], dtype=torch.float32))
    text_layers: dict[str, ShiftedLayer] = {}
    if config.train_text_encoder:
        text_layers = _text_encoder_layers(clip, captions, config, base_hashes, cache, resume)
    modifier = ModifierToken(clip, config.modifier_token, config.initializer_token, captions) if config.modifier_token else None
    # Drop every reference to the weights before they are replaced by autograd-ready
    # copies, or the old ones would stay alive and double the model's memory.
    del key_patches, base

    patcher = model.clone()
    text_clip = clip.clone() if text_layers or modifier is not None else None
    comfy.model_management.unload_all_models()
    with torch.inference_mode(False):
        make_autograd_ready(patcher.model)
        if text_clip is not None:
            make_autograd_ready(text_clip.patcher.model)
            for layer in text_layers.values():
                layer.to(text_clip.patcher.load_device)
            install_layers(text_clip.patcher, text_layers, {})
            install_norm_input_copies(text_clip.patcher, root="")
            if modifier is not None:
                modifier.to(text_clip.patcher.load_device)
                tokens = [modifier.tokens(text_clip, caption) for caption in captions]
            else:
                tokens = [text_clip.tokenize(caption) for caption in captions]
        for layer in layers.values():
            layer.to(patcher.load_device)
        for key in elementwise:
            elementwise[key].data = elementwise[key].data.to(patcher.load_device)
        for key in full:
            full[key].data = full[key].data.to(patcher.load_device)
        install_layers(patcher, {**layers}, {**elementwise, **full})
        if type(patcher.model.diffusion_model).__name__ != "UNetModel":
            install_norm_input_copies(patcher)
        recorder = None
        if attention is not None and attention.active():
            recorder = AttentionRecorder()
            recorder.install(patcher)
        if gradient_checkpointing:
            install_checkpointing(patcher)
        names = {id(layer.delta): key for key, layer in layers.items()} | {id(p): key for key, p in elementwise.items()}
        names |= {id(layer.delta): "text_encoders." + key for key, layer in text_layers.items()}
        names |= {id(p): key for key, p in full.items()}
        if modifier is not None:
            names |= {id(p): f"modifier.{key}" for key, p in modifier.vectors.items()}

        def snapshot() -> SpectralShift:
            return _as_shift(layers, {**elementwise, **full}, base_hashes, architecture, metadata, text_layers)

        guider = _Guider(patcher)
        guider.inner_set_conds({"positive": positive})
        trainer_box: dict = {}

        def body(model_wrap, extra_args):
            inner = model_wrap.inner_model
            conds = _normal_tensors(model_wrap.conds["positive"])
            device = patcher.load_device

            def prepare(examples):
                out = []
                for ex in examples:
                    lat = inner.process_latent_in(ex.latent.to(device, torch.float32)).clone()
                    flip = None if ex.flipped is None else inner.process_latent_in(ex.flipped.to(device, torch.float32)).clone()
                    mask = None if ex.mask is None else ex.mask.to(device, torch.float32).reshape(1, 1, *ex.mask.shape[-2:])
                    out.append((lat, flip, ex.cond_index, ex.attention, mask))
                return out

            data = prepare(instance)
            prior_data = prepare(prior) if config.prior_weight > 0 else []
            draw_plan = plan or uniform_plan(len(data), len(prior_data))
            transformer_options = extra_args["model_options"].get("transformer_options", {})

            def loss_fn(step, micro, generator):
                instance_rows, prior_rows = draw_plan(generator, config.batch_size)
                batch = _pick(data, instance_rows, generator, config.flip)
                parts = [batch]
                if prior_data:
                    parts.append(_pick(prior_data, prior_rows, generator, False))
                x0 = torch.cat([lat for part in parts for lat, _, _, _ in part])
                cond_idx = [i for part in parts for _, i, _, _ in part]
                masks = [mask for part in parts for _, _, _, mask in part]
                weight = None
                if any(mask is not None for mask in masks):
                    ones = x0.new_ones((1, 1, *x0.shape[-2:]))
                    weight = torch.cat([ones if mask is None else mask for mask in masks])
                noise = torch.randn(x0.shape, generator=generator).to(device)
                percent = torch.rand(x0.shape[0], generator=generator)
                sigma = torch.tensor([float(inner.model_sampling.percent_to_sigma(float(p))) for p in percent], device=device)
                x_t = inner.model_sampling.noise_scaling(sigma, noise, x0)
                if text_clip is not None:
                    c = _fresh_conditioning(text_clip, tokens, inner, cond_idx, x_t, sigma)
                else:
                    c = _batched_conditioning(conds, cond_idx, x_t, sigma)
                options = dict(transformer_options)
                options["cond_or_uncond"] = [0] * x0.shape[0]
                options["sigmas"] = sigma
                if recorder is not None:
                    recorder.maps.clear()
                    recorder.active = True
                try:
                    denoised = inner.apply_model(x_t, sigma, transformer_options=options, **c)
                finally:
                    if recorder is not None:
                        recorder.active = False
                per_example = native_mse(inner, x_t, sigma, denoised, x0, weight)
                n = len(parts[0])
                loss = per_example[:n].mean()
                if prior_data:
                    loss = loss + config.prior_weight * per_example[n:].mean()
                if recorder is not None:
                    penalty = attention_penalty(recorder.maps, [targets for _, _, targets, _ in batch], attention)
                    recorder.maps.clear()
                    if penalty is not None:
                        loss = loss + penalty
                return loss

            groups = {
                "spectral": [layer.delta for layer in layers.values()],
                "1d": list(elementwise.values()),
                "text": [layer.delta for layer in text_layers.values()],
                "full": list(full.values()),
                "token": [] if modifier is None else list(modifier.vectors.values()),
            }
            trainer = Trainer(config, groups, loss_fn)
            if resume is not None:
                trainer.step = int(resume.training_summary().get("steps", 0))
                trainer.losses = list(resume.training_summary().get("losses", []))[-10000:]
                _resume_state(trainer, resume, optimizer_state, names)
            trainer_box["trainer"] = trainer
            context = StepContext(snapshot, patcher, lambda: trainer.state_tensors(names))
            trainer.run(on_step=None if on_step is None else (lambda s, loss: on_step(s, loss, context)))

        example = instance[0].latent
        zeros = torch.zeros((1, *example.shape[1:]))
        with _DifferentiablePaths():
            guider.sample(zeros, zeros, _RunInside(body), torch.ones(2), seed=config.seed)
        trainer = trainer_box["trainer"]
        state = trainer.state_tensors(names)
    shift = snapshot()
    parameters = sum(p.numel() for p in trainer.parameters)
    return TrainingResult(
        shift,
        trainer.losses,
        state,
        trainer.step,
        time.perf_counter() - started,
        parameters,
        len(layers) + len(elementwise) + len(full),
        embedding={} if modifier is None else modifier.embedding(),
    )


def _resume_state(trainer: Trainer, resume: SpectralShift, state: dict[str, torch.Tensor] | None, names: dict[int, str]) -> None:
    """Continue from the saved float32 values and optimizer moments, or say what is missing.

    The shift file stores δ rounded to its precision (fp16 by default): without the
    state beside it the run continues from that rounded δ with a fresh optimizer, close
    to but not the same as an uninterrupted run.
    """
    moments = values = 0
    if state:
        moments, values = trainer.load_state_tensors(state, names)
    total = len(trainer.parameters)
    if values == total and moments == total:
        return
    if not state:
        missing = "no training state (.svdiffstate) beside it"
    elif values < total:
        missing = f"a training state without the full-precision values of {total - values} of {total} parameters (an older file)"
    else:
        missing = f"a training state without optimizer moments for {total - moments} of {total} parameters"
    log.warning(
        "resume_from '%s' has %s: training continues from the values rounded as stored in the file (%s)%s, so it will not "
        "equal an uninterrupted run exactly",
        resume.name,
        missing,
        resume.metadata.get("svdiff.precision", "fp16"),
        " with a fresh optimizer" if moments < total else "",
    )


def outside_attention(
    model, positive: list, examples: list[Example], percents=(0.25, 0.5, 0.75), seed: int = 0, relative: bool = True
) -> list[list[float]]:
    """How much of each subject token's attention lands outside its region.

    For every example with regions, per region: the fraction of the token's attention
    mass outside the region (:func:`attention.outside_mass`, as a fraction or, with
    ``relative=False``, per pixel), averaged over the UNet's
    cross-attention layers and the noise levels at ``percents`` of the schedule.
    ``model`` is not modified.
    """
    patcher = model.clone()
    recorder = AttentionRecorder()
    recorder.install(patcher)
    guider = _Guider(patcher)
    guider.inner_set_conds({"positive": positive})
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
                        x_t, sigma, transformer_options=dict(options), **_batched_conditioning(conds, [example.cond_index], x_t, sigma)
                    )
                recorder.active = False
                for i, (positions, mask) in enumerate(example.attention.regions):
                    values = [
                        float(attention_math.outside_mass(probs[0], grid, positions, mask, relative)) for probs, grid in recorder.maps
                    ]
                    totals[i] += sum(values) / len(values) / len(percents)
            results.append(totals)

    zeros = torch.zeros((1, *examples[0].latent.shape[1:]))
    guider.sample(zeros, zeros, _RunInside(body), torch.ones(2), seed=seed)
    return results


def _pick(data: list, rows: list[int], generator: torch.Generator, flip: bool) -> list:
    """The examples at ``rows`` as (latent, caption index, attention targets, mask), each
    mirrored with probability ½ when flips are on and it has a mirrored latent."""
    out = []
    for row in rows:
        lat, flipped, index, targets, mask = data[row]
        use_flip = flip and flipped is not None and bool(torch.rand((), generator=generator) < 0.5)
        out.append((flipped if use_flip else lat, index, targets, mask))
    return out


def _word_ids(clip, word: str) -> dict[str, list[int]]:
    """Token ids of ``word`` per tokenizer (start/end/padding tokens removed)."""
    tokens = clip.tokenize(word)
    empty = clip.tokenize("")
    out = {}
    for key in tokens:
        piece = [t[0] for t in tokens[key][0]]
        blank = [t[0] for t in empty[key][0]]
        start = 1 if piece and blank and piece[0] == blank[0] and len(blank) > 1 else 0
        end_token = blank[start] if len(blank) > start else None
        stop = next((i for i in range(start, len(piece)) if piece[i] == end_token), len(piece))
        out[key] = [int(t) for t in piece[start:stop]]
    return out


PLACEHOLDERS = ("sks", "bnp", "pll", "olis")
"""Rare single-token words that mark the modifier's place while a caption is tokenized."""


class ModifierToken:
    """Custom Diffusion's modifier token V*: a placeholder word of the captions trained
    as a new token embedding, one vector per CLIP text encoder (SDXL: clip_l and clip_g).

    The vector starts from the initializer's row of the token table: a token id (the
    reference code uses 42170, the word piece "ktn") or a word that is a single token.
    Captions are tokenized with the placeholder replaced by a rare single-token word
    they do not contain; the vector then takes that token's place in the token list,
    which ComfyUI's text encoders accept as an embedding, exactly as they accept
    ``embedding:name`` — so the vectors saved as an embedding file give the same text
    features at inference.
    """

    def __init__(self, clip, word: str, initializer: str, captions: list[str] | None):
        if clip is None:
            raise ValueError("modifier_token needs the CLIP; connect it, or clear modifier_token")
        self.word, self.initializer = word, initializer.strip()
        probe = clip.tokenize("a")
        self.vectors: dict[str, torch.nn.Parameter] = {}
        if self.initializer.isascii() and self.initializer.isdigit():
            init_ids = {key: int(self.initializer) for key in probe}
        else:
            init_ids = {}
            for key, found in _word_ids(clip, self.initializer).items():
                if len(found) != 1:
                    raise ValueError(
                        f"initializer_token '{self.initializer}' is {len(found)} tokens for the '{key}' text encoder; "
                        "choose a word that is a single rare token (e.g. 'sks'), or a token id such as 42170"
                    )
                init_ids[key] = found[0]
        for key, token_id in init_ids.items():
            module = getattr(clip.cond_stage_model, f"clip_{key}", None)
            embeddings = getattr(getattr(module, "transformer", None), "get_input_embeddings", None)
            if embeddings is None:
                raise ValueError(
                    f"the '{key}' text encoder has no token-embedding table this node can extend; "
                    "modifier tokens work with the CLIP text encoders of SD1.x, SD2.x and SDXL — clear modifier_token"
                )
            table = embeddings().weight
            if not 0 <= token_id < table.shape[0]:
                raise ValueError(f"initializer_token {token_id} is not a token id of the '{key}' text encoder (0 … {table.shape[0] - 1})")
            self.vectors[key] = torch.nn.Parameter(table[token_id].detach().float().clone())
        self.placeholders = []
        for candidate in PLACEHOLDERS:
            ids = _word_ids(clip, candidate)
            if all(len(found) == 1 for found in ids.values()):
                self.placeholders.append((candidate, {key: found[0] for key, found in ids.items()}))
        captions = captions or []
        if not any(word in caption for caption in captions):
            raise ValueError(
                f"no training caption contains the modifier token '{word}'; write it into the captions "
                f"(e.g. 'photo of a {word} cat') or clear modifier_token"
            )
        for caption in captions:
            self.tokens(clip, caption)  # refuses captions where the token does not stand alone

    def to(self, device) -> None:
        for vector in self.vectors.values():
            vector.data = vector.data.to(device)

    def tokens(self, clip, caption: str) -> dict:
        """``clip.tokenize(caption)`` with the trainable vectors in the placeholder's place."""
        count = caption.count(self.word)
        if count == 0:
            return clip.tokenize(caption)
        words = caption.lower().split()
        placeholder, ids = next(((w, ids) for w, ids in self.placeholders if w not in words), (None, None))
        if placeholder is None:
            raise ValueError(f"the caption '{caption}' uses every placeholder word SVDiff could mark the modifier token with; reword it")
        tokens = clip.tokenize(caption.replace(self.word, f" {placeholder} "))
        out = {}
        for key, chunks in tokens.items():
            token_id = ids.get(key)
            found = sum(1 for chunk in chunks for t in chunk if not torch.is_tensor(t[0]) and t[0] == token_id)
            if token_id is None or found != count:
                raise ValueError(f"in the caption '{caption}' the modifier token '{self.word}' must stand alone as a word")
            vector = self.vectors[key]
            out[key] = [[(vector, *t[1:]) if (not torch.is_tensor(t[0]) and t[0] == token_id) else t for t in chunk] for chunk in chunks]
        return out

    def embedding(self) -> dict[str, torch.Tensor]:
        """The vectors as a ComfyUI embedding file's tensors (``clip_l``, ``clip_g``, … of shape (1, d))."""
        return {f"clip_{key}": vector.detach().float().cpu()[None].clone() for key, vector in self.vectors.items()}


TEXT_SKIP = ("embedding", "position_ids")


def _text_encoder_layers(clip, captions, config: TrainConfig, base_hashes: dict, cache, resume=None) -> dict[str, ShiftedLayer]:
    """Spectral shifts on every Linear of the text encoder(s) (embeddings excluded:
    a 49408-row vocabulary matrix would cost more per step than the whole UNet)."""
    if clip is None:
        raise ValueError("train_text_encoder is on but no CLIP was given; connect the CLIP or turn it off")
    if not captions:
        raise ValueError("train_text_encoder needs the training captions")
    patcher = clip.patcher
    shapes = {k: tuple(v.shape) for k, v in patcher.model_state_dict().items()}
    keys = sorted(k for k, shape in shapes.items() if k.endswith(".weight") and len(shape) == 2 and not any(s in k for s in TEXT_SKIP))
    patched = [k for k in keys if patcher.patches.get(k)] or bypassed_weights(patcher, keys)
    if patched:
        raise ValueError(
            f"the CLIP already carries patches on {len(patched)} layers to train, e.g. '{patched[0]}'; train on the base CLIP and stack afterwards"
        )
    key_patches = patcher.get_key_patches()
    layers = {}
    for key in keys:
        base, convert = key_patches[key][0]
        base = convert(base, inplace=False)
        digest = content_hash(base)
        base_hashes[key] = digest[:HASH_CHARS]  # CLIP parameter keys never collide with diffusion_model.*
        init = None if resume is None else resume.tensors.get("text_encoders." + key[: -len(".weight")] + ".delta")
        layers[key] = ShiftedLayer(cache.get_or_compute(base, digest), shapes[key], rank=config.rank or None, init=init)
    return layers


def _fresh_conditioning(clip, tokens: list, model, indices: list[int], x: torch.Tensor, sigma: torch.Tensor) -> dict:
    """Conditioning of a batch with the captions re-encoded by the text encoder being trained."""
    import comfy.sampler_helpers

    encoded = {}
    for index in sorted(set(indices)):
        cond = clip.encode_from_tokens_scheduled(tokens[index], show_pbar=False)
        encoded[index] = comfy.sampler_helpers.convert_cond(cond)
    parts = []
    for row, index in enumerate(indices):
        conds = comfy.samplers.encode_model_conds(model.extra_conds, [dict(encoded[index][0])], x[row : row + 1], x.device, "positive")
        parts.append(comfy.samplers.get_area_and_mult(conds[0], x[row : row + 1], sigma[row : row + 1]).conditioning)
    return comfy.samplers.cond_cat(parts)


def _batched_conditioning(conds: list, indices: list[int], x: torch.Tensor, sigma: torch.Tensor) -> dict:
    """Per-example conditioning for a batch, concatenated the way ComfyUI batches chunks."""
    parts = []
    for row, index in enumerate(indices):
        area = comfy.samplers.get_area_and_mult(conds[index], x[row : row + 1], sigma[row : row + 1])
        parts.append(area.conditioning)
    return comfy.samplers.cond_cat(parts)


def _as_shift(layers, elementwise, base_hashes, architecture, metadata, text_layers=None) -> SpectralShift:
    tensors = {}
    for key, layer in layers.items():
        tensors[key[: -len(".weight")] + ".delta"] = layer.delta.detach().float().cpu().clone()
    for key, layer in (text_layers or {}).items():
        delta = layer.delta.detach().float().cpu().clone()
        # Layers off the path to the UNet (the pooled projection on SD1.x, the layers
        # after the hidden layer a model reads) get no gradient; leave them out.
        if bool(delta.any()):
            tensors["text_encoders." + key[: -len(".weight")] + ".delta"] = delta
    for key, delta in elementwise.items():
        tensors[key[: -len(".weight")] + ".diff"] = delta.detach().float().cpu().clone()
    hashes = dict(base_hashes)
    meta = dict(metadata or {})
    meta["svdiff.architecture"] = architecture or "unknown"
    return SpectralShift(tensors, meta, hashes, name=meta.get("svdiff.name", "trained"))


def learning_summary(config: TrainConfig, steps: int, losses: list[float], extra: dict) -> dict:
    summary = {**config.summary(), "steps": steps, **extra}
    tail = [round(x, 6) for x in losses if math.isfinite(x)]
    summary["losses"] = tail[-2000:]
    return summary


def token_positions(clip, caption: str, word: str) -> list[int]:
    """Positions of ``word``'s tokens in ``caption`` as the UNet's context sees them
    (77 per chunk, start/end tokens included), every occurrence."""
    tokens = clip.tokenize(caption)
    key = "l" if "l" in tokens else sorted(tokens)[0]  # SDXL's two CLIP tokenizers split alike
    flat = [int(t[0]) for chunk in tokens[key] for t in chunk]
    piece = [int(t[0]) for t in clip.tokenize(word)[key][0]]
    empty = [int(t[0]) for t in clip.tokenize("")[key][0]]
    start = 1 if piece and empty and piece[0] == empty[0] and len(empty) > 1 else 0
    end_token = empty[start] if len(empty) > start else None
    stop = next((i for i in range(start, len(piece)) if piece[i] == end_token), len(piece))
    positions = attention_math.find_subsequence(flat, piece[start:stop])
    if not positions:
        raise ValueError(f"the caption '{caption}' does not contain the word '{word}'; add it to the caption")
    return positions
