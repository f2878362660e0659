"""The spectral-shift weight adapters for ComfyUI: weight patches and bypass mode.

Imported lazily (only inside ComfyUI). ``SpectralShiftAdapter`` is a
``comfy.weight_adapter.WeightAdapterBase``: ComfyUI's model patcher applies it on full
loads and on every lowvram forward next to LoRAs (:meth:`calculate_weight`), and its
bypass mode (ComfyUI ≥ v0.11: "Load LoRA (Bypass)", quantized models) runs it as a
forward hook that never touches the weight (:meth:`bypass_forward`, ``svdiff/activation.py``).
``SpectralShiftTrain`` is the trainable counterpart for ComfyUI's "Train LoRA" node,
with and without ``bypass_mode``. ``register()`` adds the adapter to ComfyUI's registry
so a shift file in models/loras loads through the stock LoRA loaders; on a ComfyUI
without the registry it logs a warning and the SVDiff nodes keep working.

ComfyUI rebuilds adapters it streams to the GPU as ``type(v)(v.loaded_keys, weights)``
(``comfy/lora.py`` ``prefetch_prepared_value``, v0.21+: dynamic VRAM and lowvram) and
copies or deep-copies patch lists with every clone. So everything an adapter needs
lives in ``weights = (terms, state)``: the δ tensors, which ComfyUI may move, and a
:class:`SharedState` object it passes through untouched, which carries the
decomposition. A rebuilt or copied adapter therefore never decomposes or hashes again.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..activation import ActivationShift
from ..cache import content_hash, default_cache
from ..shift import SPECTRAL_SUFFIX
from ..spectral import Decomposition, spectral_update
from ..training.layers import ShiftedLayer
from .bypass import Layer, bypass_call, bypass_term, dequantized, resolve_layer

log = logging.getLogger("svdiff")

try:
    from comfy.weight_adapter import WeightAdapterBase
except ImportError:  # ComfyUI before the weight-adapter registry (2025-04)
    WeightAdapterBase = object  # type: ignore[assignment,misc]
    _HAVE_REGISTRY = False
else:
    _HAVE_REGISTRY = True

try:
    from comfy.weight_adapter import WeightAdapterTrainBase as _TrainBase
except ImportError:  # ComfyUI before the trainable-adapter base class
    _TrainBase = torch.nn.Module  # type: ignore[assignment,misc]

ALGORITHM = "SVDiff"  # the name in ComfyUI's "Train LoRA" node

Terms = tuple[tuple[float, torch.Tensor], ...]


@dataclass(eq=False)
class SharedState:
    """What every copy of one adapter shares (ComfyUI passes unknown objects through).

    ``decomposition``: of the unpatched base weight, set by the apply nodes, or on first
    use for an adapter the stock loader made. ``outer``: ``W · V_head`` for a k×k conv
    whose input side is the short one (bypass only; see ``activation.explicit_correction``).
    ``forms``: the bypass factors on the compute device, one entry, freed on eject.
    """

    decomposition: Decomposition | None = None
    key: str = "?"  # the file key (or weight) the shift is for, for messages
    outer: torch.Tensor | None = None
    forms: dict = field(default_factory=dict)

    def __deepcopy__(self, memo):
        # ComfyUI deep-copies hook patches before each use (comfy/hooks.py); a copy of
        # this state would forget a decomposition made on first use and hash again.
        return self


class SpectralShiftAdapter(WeightAdapterBase):
    """ΔW = U diag(ReLU(σ + Σ sᵢδᵢ) − σ) Vᵀ on one weight (paper eqs. 2, 4, 5).

    ``terms`` are ``(strength, δ)`` pairs that share one ReLU: chaining two apply
    nodes merges them into a single adapter instead of adding two clamped updates.
    The patch strength ComfyUI passes to :meth:`calculate_weight` (or the bypass hook's
    ``multiplier``) scales all of them inside the ReLU (appendix E.3).

    The update is computed from the *unpatched* weight. The apply nodes keep this
    adapter first in the weight's patch list, so the ``weight`` ComfyUI hands in is
    the unpatched one; in ComfyUI's hook path the original weight is passed
    explicitly. In bypass mode the hook is kept innermost for the same reason.
    """

    name = "svdiff"
    multiplier = 1.0  # set by ComfyUI's bypass hook (v0.11+) to the loader's strength

    def __init__(self, loaded_keys: set[str], weights: tuple[Terms, SharedState]):
        terms, state = weights
        self.loaded_keys = loaded_keys
        self.weights = (tuple(terms), state)

    @classmethod
    def create(
        cls, loaded_keys: set[str], terms: Terms, decomposition: Decomposition | None = None, key: str = "?"
    ) -> SpectralShiftAdapter:
        return cls(loaded_keys, (terms, SharedState(decomposition, key)))

    @property
    def terms(self) -> Terms:
        return self.weights[0]

    @property
    def state(self) -> SharedState:
        return self.weights[1]

    @property
    def decomposition(self) -> Decomposition | None:
        return self.state.decomposition

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
        return cls.create(loaded_keys, ((1.0, delta.to(torch.float32)),), key=key)

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
            total[: delta.shape[0]] += s * delta.to(device="cpu", dtype=torch.float64)
        return total * strength

    def calculate_shape(self, key):
        """A spectral shift never changes a weight's shape (ComfyUI ≥ v0.38 asks in lowvram loads)."""
        return None

    def _decomposition_of(self, weight: torch.Tensor, stored: torch.Tensor | None = None) -> Decomposition:
        """The decomposition, made from ``weight`` on first use for stock-loaded shifts.

        ``stored`` is the tensor ``weight`` was copied from, if any: its hash is
        memoised by storage, a fresh copy's would be computed in full each time.
        """
        state = self.state
        if state.decomposition is None:
            digest = content_hash(stored) if stored is not None else None
            state.decomposition = default_cache().get_or_compute(weight, digest)
        return state.decomposition

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
        base, stored = weight, None
        if original_weight is not None and key in original_weight:
            # Hook path (comfy/model_patcher.py patch_hook_weight_to_device): the
            # running weight may already carry other patches; use the original.
            stored, convert = original_weight[key][0]
            base = convert(stored.to(device=weight.device, dtype=torch.float32, copy=True), inplace=True)
        decomposition = self._decomposition_of(base, stored)
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

    # -- bypass mode ----------------------------------------------------------------------

    def bypass_forward(self, org_forward: Callable, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``W' x + b`` without touching ``W`` (see ``svdiff/activation.py`` for the forms)."""
        return self.forward_through(resolve_layer(org_forward), org_forward, x, *args, **kwargs)

    def forward_through(self, layer: Layer, org_forward: Callable, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        layer.require_activation_form(f"the spectral shift on '{self.state.key}'")
        form = self._form(layer, x)
        if form is None:
            return org_forward(x, *args, **kwargs)
        return bypass_call(form, layer, org_forward, x, args, kwargs)

    def h(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """``ΔW x`` for ComfyUI's default bypass, ``g(f(x) + h(x, f(x)))``.

        :meth:`bypass_forward` replaces that default (it also covers the input-side
        form, which needs the layer run on a corrected input); ``h`` serves callers that
        add the term themselves and needs the layer last seen by this adapter.
        """
        module = self._last_module() if self._last_module is not None else None
        if module is None:
            raise RuntimeError("SVDiff bypass: h() needs the layer; run the adapter through bypass_forward first")
        layer = Layer(module, type(module).forward.__get__(module))
        form = self._form(layer, x)
        if form is None:
            return torch.zeros_like(base_out)
        return bypass_term(form, layer, x, base_out)

    _last_module: weakref.ref | None = None

    def _form(self, layer: Layer, x: torch.Tensor) -> ActivationShift | None:
        self._last_module = weakref.ref(layer.module)
        state = self.state
        key = (x.device, x.dtype, float(self.multiplier))
        if key not in state.forms:
            decomposition = state.decomposition or self._decomposition_of(layer.base_weight())
            outer = None
            if decomposition.side == "right" and layer.geometry is not None and not layer.geometry.pointwise:
                if state.outer is None:
                    state.outer = layer.base_weight().reshape(decomposition.shape[0], -1) @ decomposition.basis[:, : decomposition.head]
                outer = state.outer
            form = ActivationShift.from_decomposition(
                decomposition, self.total_shift(self.multiplier), layer.weight_shape, x.dtype, x.device, outer=outer
            )
            state.forms.clear()  # one device copy at a time
            state.forms[key] = form
        return state.forms[key]

    def release_device_copies(self) -> None:
        self.state.forms.clear()


class SpectralShiftTrain(_TrainBase):
    """Weight wrapper ``w ↦ w + ΔW(δ)`` trained by ComfyUI's "Train LoRA" node.

    Its only parameter is called ``delta``, so the node's saved LoRA dict has the
    keys of format v1 (``<layer>.delta``, next to its ``.diff``/``.diff_b``) and loads
    with SVDiffLoader or the stock loader. The decomposition is made from the weight
    given at creation, or from the first weight passed in (when continuing a file).
    With the node's ``bypass_mode`` the same δ trains through :meth:`bypass_forward`.
    """

    def __init__(self, delta: torch.Tensor | None, weight: torch.Tensor | None):
        torch.nn.Module.__init__(self)
        self.layer = None
        self.outer = None
        if weight is not None:
            self._build(weight)
        if delta is None:
            delta = torch.zeros(self.layer.rank)
        self.delta = torch.nn.Parameter(delta.detach().clone().float())

    def _build(self, weight: torch.Tensor) -> None:
        weight = dequantized(weight.detach())
        decomposition = default_cache().get_or_compute(weight)
        layer = ShiftedLayer(decomposition, tuple(weight.shape))
        del layer.delta  # this module's own parameter is used instead
        object.__setattr__(self, "layer", layer)
        if decomposition.side == "right" and weight.ndim > 2 and any(s != 1 for s in weight.shape[2:]):
            outer = weight.reshape(weight.shape[0], -1).float() @ decomposition.basis[:, : decomposition.head]
            object.__setattr__(self, "outer", outer)

    def _ready(self, like: torch.Tensor):
        if self.layer is None:
            self._build(like)
        layer = self.layer
        if layer.basis.device != like.device:
            layer.to(like.device)
        layer.delta = self.delta
        return layer

    def __call__(self, weight):
        layer = self._ready(weight)
        return weight + layer.delta_weight(weight).to(weight.dtype)

    def bypass_forward(self, org_forward: Callable, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        layer = resolve_layer(org_forward)
        layer.require_activation_form("the spectral shift being trained")
        if self.layer is None:
            self._build(layer.base_weight())
        shifted = self._ready(x)
        form = shifted.factors(x.dtype)
        if self.outer is not None:
            form = form.with_outer(self.outer.to(device=x.device, dtype=x.dtype))
        return bypass_call(form, layer, org_forward, x, args, kwargs)

    def h(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("SpectralShiftTrain runs through bypass_forward (the input-side form needs the layer itself)")

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
