"""The one place svdiff/ touches ComfyUI: the spectral-shift weight adapter.

Imported lazily (only inside ComfyUI). ``SpectralShiftAdapter`` is a
``comfy.weight_adapter.WeightAdapterBase``, so ComfyUI's model patcher applies it on
full loads and on every lowvram forward, next to LoRAs, and ``register()`` adds it
to ComfyUI's adapter list so a shift file in models/loras also loads through the
stock "Load LoRA" node. Registration fails soft: on a ComfyUI without the adapter
registry it logs a warning and the SVDiff nodes keep working.
"""

from __future__ import annotations

import logging

import torch

from .cache import default_cache
from .shift import SPECTRAL_SUFFIX
from .spectral import Decomposition, spectral_update

log = logging.getLogger("svdiff")

try:
    from comfy.weight_adapter import WeightAdapterBase
except ImportError:  # ComfyUI before the weight-adapter registry (2025-04)
    WeightAdapterBase = object  # type: ignore[assignment,misc]
    _HAVE_REGISTRY = False
else:
    _HAVE_REGISTRY = True

ALGORITHM = "SVDiff"  # the name in ComfyUI's "Train LoRA" node


class SpectralShiftAdapter(WeightAdapterBase):
    """ΔW = U diag(ReLU(σ + Σ sᵢδᵢ) − σ) Vᵀ on one weight (paper eqs. 2, 4, 5).

    ``terms`` are ``(strength, δ)`` pairs that share one ReLU: chaining two apply
    nodes merges them into a single adapter instead of adding two clamped updates.
    The patch strength ComfyUI passes to :meth:`calculate_weight` scales all of them
    inside the ReLU (appendix E.3).

    The update is computed from the *unpatched* weight. The apply nodes keep this
    adapter first in the weight's patch list, so the ``weight`` ComfyUI hands in is
    the unpatched one; in ComfyUI's hook path the original weight is passed
    explicitly. ``decomposition`` is filled in by the apply nodes; when the stock
    LoRA loader created the adapter it is looked up by content hash instead.
    """

    name = "svdiff"

    def __init__(self, loaded_keys: set[str], terms: tuple[tuple[float, torch.Tensor], ...], decomposition: Decomposition | None = None):
        self.loaded_keys = loaded_keys
        self.terms = terms
        self.decomposition = decomposition
        self.weights = terms  # WeightAdapterBase declares this attribute

    @classmethod
    def load(
        cls,
        x: str,
        lora: dict[str, torch.Tensor],
        alpha: float | None,
        dora_scale: torch.Tensor | None,
        loaded_keys: set[str] | None = None,
    ):
        """Recognise ``<x>.delta`` in a file handed to ComfyUI's LoRA loader."""
        key = f"{x}{SPECTRAL_SUFFIX}"
        if key not in lora:
            return None
        if loaded_keys is None:
            loaded_keys = set()
        loaded_keys.add(key)
        delta = lora[key]
        if delta.ndim != 1 or not delta.is_floating_point():
            log.warning("ignoring '%s': a spectral shift is a float vector, got %s %s", key, delta.dtype, tuple(delta.shape))
            return None
        return cls(loaded_keys, ((1.0, delta.to(torch.float32)),))

    @classmethod
    def create_train(cls, weight, rank=1, alpha=1.0):
        """A fresh trainable shift for ComfyUI's "Train LoRA" node (algorithm "SVDiff").

        ComfyUI's ``rank`` (a LoRA rank) does not apply: every singular value is
        trained; SVDiffTrain has a separate rank limit.
        """
        return SpectralShiftTrain(None, weight=weight)

    def to_train(self):
        """Continue training a loaded shift in ComfyUI's "Train LoRA" node."""
        return SpectralShiftTrain(self.total_shift().float(), weight=None)

    def total_shift(self, strength: float = 1.0) -> torch.Tensor:
        """``strength · Σ sᵢ δᵢ`` with rank-limited terms zero-padded."""
        length = max(delta.shape[0] for _, delta in self.terms)
        total = torch.zeros(length, dtype=torch.float64)
        for s, delta in self.terms:
            total[: delta.shape[0]] += s * delta.to(torch.float64)
        return total * strength

    def merged_with(self, terms: tuple[tuple[float, torch.Tensor], ...], decomposition: Decomposition | None) -> SpectralShiftAdapter:
        return SpectralShiftAdapter(set(self.loaded_keys), self.terms + terms, self.decomposition or decomposition)

    def calculate_weight(
        self,
        weight,
        key,
        strength,
        strength_model,
        offset,
        function,
        intermediate_dtype=torch.float32,
        original_weight=None,
    ):
        base = weight
        if original_weight is not None and key in original_weight:
            # Hook path (comfy/model_patcher.py patch_hook_weight_to_device): the
            # running weight may already carry other patches; use the original.
            stored, convert = original_weight[key][0]
            base = convert(stored.to(device=weight.device, dtype=torch.float32, copy=True), inplace=True)
        decomposition = self.decomposition
        if decomposition is None:
            decomposition = default_cache().get_or_compute(base)
        delta = self.total_shift(strength)
        if function is None:
            function = _identity
        if base is weight and weight.dtype == torch.float32 and weight.is_contiguous() and _is_identity(function, weight):
            # Usual case (our patch is first, full-precision compute): ComfyUI hands
            # us its own copy of the weight, which becomes W + ΔW in place.
            spectral_update(decomposition, weight, delta, in_place=True)
            return weight
        update = spectral_update(decomposition, base, delta)
        if update is None:
            return weight
        weight += function(update.to(weight.dtype))
        return weight


class SpectralShiftTrain(torch.nn.Module):
    """Weight wrapper ``w ↦ w + ΔW(δ)`` trained by ComfyUI's "Train LoRA" node.

    Its only parameter is called ``delta``, so the node's saved LoRA dict has the
    keys of format v1 (``<layer>.delta``, next to its ``.diff``/``.diff_b``) and loads
    with SVDiffLoader or the stock loader. The decomposition is made from the weight
    given at creation, or from the first weight passed in (when continuing a file).
    """

    def __init__(self, delta: torch.Tensor | None, weight: torch.Tensor | None):
        super().__init__()
        self.layer = None
        if weight is not None:
            self._build(weight)
        if delta is None:
            delta = torch.zeros(self.layer.rank)
        self.delta = torch.nn.Parameter(delta.detach().clone().float())

    def _build(self, weight: torch.Tensor) -> None:
        from .training.layers import ShiftedLayer

        decomposition = default_cache().get_or_compute(weight.detach())
        layer = ShiftedLayer(decomposition, tuple(weight.shape))
        del layer.delta  # this module's own parameter is used instead
        object.__setattr__(self, "layer", layer)

    def __call__(self, weight):
        if self.layer is None:
            self._build(weight)
        layer = self.layer
        if layer.basis.device != weight.device:
            layer.to(weight.device)
        layer.delta = self.delta
        return weight + layer.delta_weight(weight).to(weight.dtype)

    def passive_memory_usage(self):
        total = self.delta.numel() * self.delta.element_size()
        if self.layer is not None:
            total += sum(b.numel() * b.element_size() for b in self.layer.buffers())
        return total

    def move_to(self, device):
        self.to(device)
        if self.layer is not None:
            self.layer.to(device)
        return self.passive_memory_usage()


def _identity(x):
    return x


def _is_identity(function, like: torch.Tensor) -> bool:
    """ComfyUI hands patches an identity lambda when they carry no function."""
    probe = like.new_zeros(())
    return function(probe) is probe


def is_spectral_patch(patch: tuple) -> bool:
    """Whether an entry of ``ModelPatcher.patches[key]`` is one of our adapters.

    Compared by adapter name, not class identity: the extension can be imported
    twice under different module names (ComfyUI's loader and a test), and an
    adapter made by one copy must still merge with the other.
    """
    adapter = patch[1]
    return getattr(adapter, "name", None) == SpectralShiftAdapter.name and hasattr(adapter, "terms")


def register() -> bool:
    """Add the adapter to ComfyUI's registry (idempotent). False if unsupported."""
    if not _HAVE_REGISTRY:
        log.warning("this ComfyUI has no weight-adapter registry; the stock LoRA loader will not read shift files")
        return False
    try:
        import comfy.weight_adapter as registry

        registry.adapters[:] = [a for a in registry.adapters if getattr(a, "name", None) != SpectralShiftAdapter.name]
        registry.adapters.append(SpectralShiftAdapter)
        registry.adapter_maps[ALGORITHM] = SpectralShiftAdapter
    except (ImportError, AttributeError, TypeError) as exc:
        log.warning("could not register the SVDiff weight adapter with ComfyUI (%s)", exc)
        return False
    return True
