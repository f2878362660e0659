"""Making ComfyUI's models trainable by autograd, and putting everything back afterwards.

ComfyUI runs nodes under ``torch.inference_mode`` and some of its kernels have no
backward; these helpers replace inference tensors, switch models to their
differentiable code paths, give norms a private input copy where residuals are added in
place, checkpoint the diffusion model's blocks, and restore the shared modules' flags.
"""

from __future__ import annotations

import copy

import comfy.model_management
import comfy.utils
import torch
import torch.utils.checkpoint


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


def normal_tensors(value):
    """Deep copy of a conditioning structure with every tensor a normal (cloned) tensor."""
    if torch.is_tensor(value):
        return value.clone() if value.is_inference() else value
    if isinstance(value, dict):
        return {k: normal_tensors(v) for k, v in value.items()}
    if isinstance(value, list):
        return [normal_tensors(v) for v in value]
    if isinstance(value, tuple):
        return tuple(normal_tensors(v) for v in value)
    if hasattr(value, "cond") and torch.is_tensor(getattr(value, "cond", None)):
        clone = copy.copy(value)
        clone.cond = normal_tensors(value.cond)
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


class DifferentiablePaths:
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
