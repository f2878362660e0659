"""Bypass mode: spectral shifts as forward hooks that never touch a weight.

ComfyUI ≥ v0.11 runs adapters in bypass mode ("Load LoRA (Bypass)", quantized models)
through ``bypass_forward``. This module finds the bare layer behind a chain of hooks
(:class:`Layer`), computes ``ΔW x`` in the cheapest exact form of ``svdiff/activation.py``
(:func:`bypass_call`, :func:`bypass_term`), and holds this extension's own injection
(:class:`ShiftInjection`), which the apply nodes place first so its hooks see the bare
layer whatever bypass LoRAs are added after it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import comfy.utils
import torch

from ..activation import ActivationShift, ConvGeometry, explicit_correction, input_correction, output_correction

log = logging.getLogger("svdiff")

BYPASS_KEY = "svdiff_bypass"
"""Prefix of the injection key of this extension's bypass hooks (a new suffix per apply)."""


class Layer:
    """The module a bypass hook wraps and its own (innermost) forward.

    ComfyUI's ``BypassForwardHook`` and this extension's hook both keep the forward they
    replaced in ``original_forward`` and the module in ``module``; following that chain
    from the forward a hook was handed leads to the layer's own forward, whatever other
    bypass adapters sit in between.
    """

    def __init__(self, module: torch.nn.Module, forward: Callable):
        self.module = module
        self.forward = forward
        self.supported = has_activation_form(module)
        self.geometry = ConvGeometry.of(module) if self.supported else None

    def require_activation_form(self, what: str) -> None:
        if not self.supported:
            raise ValueError(
                f"{what}: a {type(self.module).__name__} layer cannot take a spectral shift in bypass mode (only Linear and Conv "
                "layers can); load the file in patch mode (Load LoRA, or Load Spectral Shift with mode 'patch', whose bypass "
                "mode keeps such layers as weight patches)"
            )

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return tuple(self.module.weight.shape)

    def base_weight(self) -> torch.Tensor:
        """The stored weight as a float tensor (dequantized), without other patches."""
        weight = self.module.weight
        if weight.is_meta:
            raise RuntimeError(f"SVDiff bypass: the weight of {type(self.module).__name__} is not materialised")
        return dequantized(weight.detach()).float()

    def bias(self, like: torch.Tensor) -> torch.Tensor | None:
        """The bias the layer adds, as ComfyUI's cast computes it (with its patches)."""
        bias = getattr(self.module, "bias", None)
        if bias is None:
            return None
        if bias.is_meta:
            import comfy.ops

            return comfy.ops.cast_bias_weight(self.module, like)[1]
        functions = getattr(self.module, "bias_function", ())
        # A copy when patches follow: ComfyUI's lowvram patch functions work in place.
        bias = bias.to(device=like.device, dtype=like.dtype, copy=bool(functions))
        for f in functions:
            bias = f(bias)
        return bias

    def is_innermost(self, forward: Callable) -> bool:
        return forward == self.forward


def has_activation_form(module: torch.nn.Module) -> bool:
    """Whether bypass mode can shift ``module`` (Linear and ungrouped Conv layers)."""
    try:
        ConvGeometry.of(module)
    except ValueError:
        return False
    return True


def resolve_layer(forward: Callable, module: torch.nn.Module | None = None) -> Layer:
    """The :class:`Layer` behind ``forward`` (a module's bound forward or a bypass hook's).

    ``module``, when the caller knows it, covers a chain that ends in something other
    than a bound method (another custom node's object patch of ``forward``): that
    forward is then taken as the layer's own.
    """
    for _ in range(64):
        owner = getattr(forward, "__self__", None)
        if isinstance(owner, torch.nn.Module):
            return Layer(owner, forward)
        inner = getattr(owner, "original_forward", None)
        if inner is None:
            break
        forward = inner
    if module is not None:
        return Layer(module, forward)
    raise RuntimeError(f"SVDiff bypass: cannot find the layer behind {forward!r}")


def bypass_call(form: ActivationShift, layer: Layer, org_forward: Callable, x: torch.Tensor, args, kwargs) -> torch.Tensor:
    """``org_forward(x) + ΔW x``, computed in the cheapest exact form.

    ``org_forward`` may already include other bypass adapters (e.g. a LoRA loaded in
    bypass mode before this shift); ΔW is then still taken against the bare layer.
    """
    geometry = layer.geometry
    if form.side == "left" or form.outer is not None:
        y = org_forward(x, *args, **kwargs)
        base = y if layer.is_innermost(org_forward) else layer.forward(x, *args, **kwargs)
        return y + bypass_term(form, layer, x, base)
    shifted, extra = input_correction(form, x, geometry)
    if layer.is_innermost(org_forward):
        y = org_forward(shifted, *args, **kwargs)
    else:
        y = org_forward(x, *args, **kwargs) + (layer.forward(shifted, *args, **kwargs) - layer.forward(x, *args, **kwargs))
    return y if extra is None else y + extra


def bypass_term(form: ActivationShift, layer: Layer, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
    """``ΔW x`` given the bare layer's output ``base_out = W x + b``."""
    geometry = layer.geometry
    if form.outer is not None:
        return explicit_correction(form, x, geometry)
    if form.side == "left":
        bias = layer.bias(base_out)
        plain = base_out if bias is None else base_out - (bias if geometry is None else geometry.channels(bias))
        return output_correction(form, plain, x, geometry)
    shifted, extra = input_correction(form, x, geometry)
    term = layer.forward(shifted - x)
    bias = layer.bias(term)
    if bias is not None:
        term = term - (bias if geometry is None else geometry.channels(bias))
    return term if extra is None else term + extra


# ----------------------------------------------------------------------------------
# Installing shifts on a patcher (the apply nodes)


def bypass_injection(patcher) -> ShiftInjection | None:
    """This extension's bypass injection on ``patcher``, if any."""
    for key, injections in getattr(patcher, "injections", {}).items():
        if key.startswith(BYPASS_KEY):
            return injections[0]
    return None


def bypassed_weights(patcher, keys) -> list[str]:
    """Those of ``keys`` that a bypass adapter on ``patcher`` hooks (all, for ComfyUI's own
    bypass loaders, whose injection does not say which layers it hooks)."""
    injections = getattr(patcher, "injections", {})
    if any(not k.startswith(BYPASS_KEY) and "bypass" in k for k in injections):
        return list(keys)
    ours = bypass_injection(patcher)
    return [k for k in keys if ours is not None and k in ours.adapters]


class ShiftInjection:
    """A ComfyUI ``PatcherInjection`` (duck-typed) hooking the forwards of shifted layers.

    Shared by every clone of the patcher it was made for (ComfyUI copies injection lists
    shallowly), so it holds no model state: the hooks of each injected model are kept
    per patcher and removed again by :meth:`eject`.
    """

    def __init__(self, adapters: dict):
        self.adapters = adapters
        self._hooks: dict[int, list[_ShiftHook]] = {}

    def inject(self, model_patcher) -> None:
        if id(model_patcher) in self._hooks:
            return
        hooks = []
        patched = []
        for param, adapter in self.adapters.items():
            module = comfy.utils.get_attr(model_patcher.model, param.rsplit(".", 1)[0])
            hooks.append(_ShiftHook(module, adapter))
            if model_patcher.patches.get(param):
                patched.append(param)
        for hook in hooks:
            hook.inject()
        self._hooks[id(model_patcher)] = hooks
        if patched:
            _warn_once(
                f"{len(patched)} weights with a spectral shift in bypass mode also carry weight patches (a LoRA loaded in patch "
                f"mode, e.g. on {patched[0]}): the shift treats them as part of the base weight. For exact stacking load those "
                "LoRAs in bypass mode too, or the shift in patch mode."
            )

    def eject(self, model_patcher) -> None:
        for hook in reversed(self._hooks.pop(id(model_patcher), [])):
            hook.eject()
        for adapter in self.adapters.values():
            adapter.release_device_copies()


class _ShiftHook:
    """Replaces one module's ``forward`` with the adapter's bypass forward."""

    def __init__(self, module: torch.nn.Module, adapter):
        self.module = module
        self.adapter = adapter
        self.original_forward = None
        self._had_own_forward = False

    def inject(self) -> None:
        if self.original_forward is not None:
            return
        self._had_own_forward = "forward" in self.module.__dict__
        self.original_forward = self.module.forward
        self.module.forward = self.forward

    def forward(self, x, *args, **kwargs):
        layer = resolve_layer(self.original_forward, self.module)
        return self.adapter.forward_through(layer, self.original_forward, x, *args, **kwargs)

    def eject(self) -> None:
        """Take this hook out of the module's forward chain, wherever it sits in it.

        ComfyUI ejects injections in the order it injected them, so an inner hook (ours,
        injected first) usually leaves while an outer one (a bypass LoRA) still wraps it:
        then the outer hook is re-pointed at our original forward instead.
        """
        if self.original_forward is None:
            return
        current = self.module.__dict__.get("forward")
        if current == self.forward:
            if self._had_own_forward:
                self.module.forward = self.original_forward
            else:
                del self.module.forward
        else:
            forward = current
            for _ in range(64):
                owner = getattr(forward, "__self__", None)
                inner = getattr(owner, "original_forward", None)
                if inner is None:
                    break
                if inner == self.forward:
                    owner.original_forward = self.original_forward
                    break
                forward = inner
        self.original_forward = None


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


def dequantized(weight: torch.Tensor) -> torch.Tensor:
    """A plain tensor for ComfyUI's quantized weights (``QuantizedTensor``, v0.4+)."""
    if type(weight) is not torch.Tensor and type(weight) is not torch.nn.Parameter and hasattr(weight, "dequantize"):
        return weight.dequantize()
    return weight
