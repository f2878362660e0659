"""A spectral shift applied to a layer's activations instead of its weight.

For a layer ``y = W x + b`` with ``W: (m, n)`` (a conv kernel read as ``c_out × c_in·kh·kw``)
and ``ΔW = U diag(g) Vᵀ``, ``g = ReLU(σ + δ) − σ`` (paper eq. 2), the shifted output
``y + ΔW x`` can be had without building ``W + ΔW``:

* **output side** (m ≤ n): ``ΔW x = U diag(g/σ) Uᵀ (y − b)``. Only the layer's own output
  is needed, not its weight, which is what ComfyUI's bypass mode (quantized weights) asks
  for. For a convolution it is exact whatever its stride, padding or dilation: every
  output pixel is ``W p`` for its input patch ``p`` (zeros where padded), and the
  correction is a map of the *output channels* applied pixel by pixel, so
  ``U diag(g/σ) Uᵀ (W p) = ΔW p`` at each pixel.
* **input side** (m > n, Linear or 1×1 conv): ``W' x = W (x + V diag(g/σ) Vᵀ x)``: the input
  is corrected and the layer runs once on it. For a 1×1 conv the map acts on input
  channels pixel by pixel, which commutes with stride and with zero padding.
* **explicit** (m > n, a k×k conv such as a UNet's ``conv_in``, 320 × 4·3·3, where the
  input cannot be corrected channel by channel): ``ΔW x = (W V) diag(g/σ) Vᵀ x`` with
  ``W V`` computed once from the weight; ``Vᵀ x`` is a conv with the kernel ``Vᵀ``.
* **weight side**: ``ΔW`` itself, added to the weight (training's choice for small
  layers that see many tokens).

Directions of the decomposition's tail (σ < 1 % σ_max) use their explicit other-side
vectors, ``U_t diag(g_t) V_tᵀ``, in every form (no division by a small σ).

Everything here is a pure function of tensors in one dtype and device; the training
layers (``training/layers.py``, differentiable in δ) and ComfyUI's bypass adapters
(frozen δ) build an :class:`ActivationShift` and call the same three functions.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .spectral import Decomposition, Side, spectral_gain


@dataclass
class ConvGeometry:
    """What F.conv{1,2,3}d needs besides the weight (groups must be 1)."""

    dims: int  # 1, 2 or 3
    kernel: tuple[int, ...]
    stride: tuple[int, ...] | int
    padding: tuple[int, ...] | int | str
    dilation: tuple[int, ...] | int

    @property
    def pointwise(self) -> bool:
        return all(k == 1 for k in self.kernel)

    def conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        fn = (F.conv1d, F.conv2d, F.conv3d)[self.dims - 1]
        return fn(x, weight, bias, self.stride, self.padding, self.dilation)

    def channel_map(self, x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
        """Apply ``matrix: (out, in)`` to the channel dimension (a 1×1 convolution)."""
        fn = (F.conv1d, F.conv2d, F.conv3d)[self.dims - 1]
        return fn(x, matrix.reshape(*matrix.shape, *([1] * self.dims)))

    def channels(self, values: torch.Tensor) -> torch.Tensor:
        """A per-channel vector shaped to broadcast over ``(B, C, *spatial)``."""
        return values.reshape(1, -1, *([1] * self.dims))

    @classmethod
    def of(cls, module: torch.nn.Module) -> ConvGeometry | None:
        """The geometry of a Conv module, None for Linear; other layers are refused."""
        if isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
            if module.groups != 1:
                raise ValueError(f"grouped convolution {type(module).__name__} (groups={module.groups}) cannot take a spectral shift")
            return cls(len(module.kernel_size), tuple(module.kernel_size), module.stride, module.padding, module.dilation)
        if isinstance(module, torch.nn.Linear):
            return None
        raise ValueError(f"{type(module).__name__} layers cannot take a spectral shift in activation space (only Linear and Conv)")


@dataclass(frozen=True)
class ActivationShift:
    """ΔW of one layer as the factors the activation forms need.

    side "left" (m ≤ n): ``ΔW = H diag(c) Hᵀ W + N diag(g_t) Fᵀ`` with ``H: (m, h)`` the
    head of U, ``N: (m, t)`` its tail and ``F = V_t: (n, t)``.
    side "right" (m > n): ``ΔW = W H diag(c) Hᵀ + F diag(g_t) Nᵀ`` with ``H: (n, h)`` the
    head of V, ``N: (n, t)`` its tail and ``F = U_t: (m, t)``.
    ``c = g/σ`` over the head. Columns whose gain is zero may be left out.
    """

    side: Side
    head: torch.Tensor
    coefficient: torch.Tensor
    near: torch.Tensor
    far: torch.Tensor
    gain_tail: torch.Tensor
    weight_shape: tuple[int, ...]
    outer: torch.Tensor | None = None  # side "right" only: W H, (m, h), for explicit_correction

    @classmethod
    def from_decomposition(
        cls,
        decomposition: Decomposition,
        delta: torch.Tensor,
        weight_shape: tuple[int, ...],
        dtype: torch.dtype,
        device,
        outer: torch.Tensor | None = None,
    ) -> ActivationShift | None:
        """The active directions of ``δ`` (gains in float64, then cast); None if g = 0.

        ``outer`` is ``W H`` over the whole head (m × head), for :func:`explicit_correction`.
        """
        gain = spectral_gain(decomposition.sigma, delta)
        split = decomposition.head
        active = torch.nonzero(gain[:split]).flatten()
        tail_active = torch.nonzero(gain[split:]).flatten()
        if active.numel() == 0 and tail_active.numel() == 0:
            return None
        basis = decomposition.basis
        tail = decomposition.tail
        if tail is None:  # left: V_t is (n, t); right: U_t is (m, t)
            m, n = decomposition.shape
            tail = basis.new_zeros(n if decomposition.side == "left" else m, 0)

        def cast(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype).contiguous()

        return cls(
            side=decomposition.side,
            head=cast(basis[:, active]),
            coefficient=cast(gain[active] / decomposition.sigma[active]),
            near=cast(basis[:, split + tail_active]),
            far=cast(tail[:, tail_active]),
            gain_tail=cast(gain[split + tail_active]),
            weight_shape=tuple(weight_shape),
            outer=None if outer is None else cast(outer[:, active]),
        )

    def with_outer(self, outer: torch.Tensor) -> ActivationShift:
        return dataclasses.replace(self, outer=outer)

    def nbytes(self) -> int:
        tensors = (self.head, self.coefficient, self.near, self.far, self.gain_tail, self.outer)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def output_correction(shift: ActivationShift, y: torch.Tensor, x: torch.Tensor, geometry: ConvGeometry | None) -> torch.Tensor:
    """``ΔW x`` from the layer's bias-free output ``y = W x`` (side "left")."""
    head, c = shift.head, shift.coefficient
    if geometry is None:
        correction = ((y @ head) * c) @ head.T
    else:
        z = geometry.channel_map(y, head.T)
        correction = geometry.channel_map(z * geometry.channels(c), head)
    if shift.gain_tail.numel():
        if geometry is None:
            correction = correction + ((x @ shift.far) * shift.gain_tail) @ shift.near.T
        else:
            kernel = shift.far.T.reshape(shift.far.shape[1], *shift.weight_shape[1:])
            t = geometry.conv(x, kernel) * geometry.channels(shift.gain_tail)
            correction = correction + geometry.channel_map(t, shift.near)
    return correction


def input_correction(shift: ActivationShift, x: torch.Tensor, geometry: ConvGeometry | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(x + H diag(c) Hᵀ x, tail output term)`` (side "right", Linear or 1×1 conv).

    The layer run on the first value, plus the second, is ``W' x + b``.
    """
    head, c = shift.head, shift.coefficient
    if geometry is None:
        shifted = x + ((x @ head) * c) @ head.T
    else:
        z = geometry.channel_map(x, head.T)
        shifted = x + geometry.channel_map(z * geometry.channels(c), head)
    extra = None
    if shift.gain_tail.numel():
        if geometry is None:
            extra = ((x @ shift.near) * shift.gain_tail) @ shift.far.T
        else:  # the layer's own stride and padding: this term bypasses the layer
            kernel = shift.near.T.reshape(shift.near.shape[1], *shift.weight_shape[1:])
            t = geometry.conv(x, kernel) * geometry.channels(shift.gain_tail)
            extra = geometry.channel_map(t, shift.far)
    return shifted, extra


def weight_correction(shift: ActivationShift, weight: torch.Tensor) -> torch.Tensor:
    """``ΔW`` in ``weight``'s layout (needs the unpatched weight itself)."""
    matrix = weight.reshape(weight.shape[0], -1)
    head, c = shift.head, shift.coefficient
    if shift.side == "left":
        update = (head * c) @ (head.T @ matrix)
    else:
        update = (matrix @ head) @ (head * c).T
    if shift.gain_tail.numel():
        near = shift.near * shift.gain_tail
        update = update + (near @ shift.far.T if shift.side == "left" else shift.far @ near.T)
    return update.reshape(weight.shape)


def explicit_correction(shift: ActivationShift, x: torch.Tensor, geometry: ConvGeometry | None) -> torch.Tensor:
    """``ΔW x = (W H) diag(c) Hᵀ x + F diag(g_t) Nᵀ x`` (side "right", needs ``shift.outer``).

    The form for a k×k conv whose input side is the short one: ``Hᵀ x`` is a conv with
    the kernel ``Hᵀ`` (one output channel per direction), then a map of those channels.
    Exact for any stride, padding and dilation, since it is the conv of the kernel
    ``(W H) diag(c) Hᵀ``, factored.
    """

    def through(v: torch.Tensor, scale: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        if geometry is None:
            return ((x @ v) * scale) @ u.T
        t = geometry.conv(x, v.T.reshape(v.shape[1], *shift.weight_shape[1:])) * geometry.channels(scale)
        return geometry.channel_map(t, u)

    correction = through(shift.head, shift.coefficient, shift.outer)
    if shift.gain_tail.numel():
        correction = correction + through(shift.near, shift.gain_tail, shift.far)
    return correction
