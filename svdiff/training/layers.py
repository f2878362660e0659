"""Trainable spectral shifts of one layer, applied where they are cheapest.

A layer ``y = W x + b`` with ``W: (m, n)`` (a conv kernel read as ``c_out × c_in·kh·kw``)
and a shift δ gets ``W' = W + ΔW``, ``ΔW = U diag(g) Vᵀ``, ``g = ReLU(σ + δ) − σ``
(paper eq. 2). Training never rebuilds ``U diag(ReLU(σ+δ)) Vᵀ``; it uses whichever of
three exact forms costs least for the layer and the current token count T:

* **output side** (m ≤ n, Linear or any Conv): ``ΔW x = U diag(g/σ) Uᵀ (W x)`` — the
  frozen output ``y₀ = W x`` is reused, and the correction is two thin products in
  the output channel space: ≈ 4·T·m·r flops forward.
* **input side** (m > n, Linear or 1×1 Conv): ``W' x = W (x + V diag(g/σ) Vᵀ x)`` —
  the input is corrected before the frozen layer runs.
* **weight space**: ``W'`` is built (``ΔW = U diag(g/σ) Uᵀ W``, or its mirror) and the
  layer runs once with it; costs ≈ 2·r²·(r + n) plus a weight gradient, cheaper
  only for small layers that see many tokens, and the only choice for a k×k conv
  whose input side is the short one.

Directions in the decomposition's tail (σ < 1 % σ_max) use their explicit other-side
vectors, ``U_t diag(g_t) V_tᵀ``, in every form (no division by a small σ).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from ..spectral import Decomposition

Strategy = Literal["output", "input", "weight"]


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


class ShiftedLayer(torch.nn.Module):
    """δ for one weight (float32 master copy) and the frozen decomposition tensors.

    ``delta`` may be shorter than the spectrum (rank limit, appendix E.1). The
    decomposition tensors are buffers in float32, moved with the module.
    """

    def __init__(
        self, decomposition: Decomposition, weight_shape: tuple[int, ...], rank: int | None = None, init: torch.Tensor | None = None
    ):
        super().__init__()
        r = decomposition.rank
        k = r if rank is None else min(rank, r)
        delta = torch.zeros(k, dtype=torch.float32)
        if init is not None:
            n = min(k, init.numel())
            delta[:n] = init.detach().float().flatten()[:n]
        self.delta = torch.nn.Parameter(delta)
        self.side = decomposition.side
        self.head = decomposition.head
        self.rank = r
        self.weight_shape = tuple(weight_shape)
        self.register_buffer("basis", decomposition.basis.float(), persistent=False)
        self.register_buffer("sigma", decomposition.sigma.float(), persistent=False)
        tail = decomposition.tail if decomposition.tail is not None else torch.zeros(0, 0)
        self.register_buffer("tail", tail.float(), persistent=False)

    @property
    def m(self) -> int:
        return self.weight_shape[0]

    @property
    def n(self) -> int:
        n = 1
        for s in self.weight_shape[1:]:
            n *= s
        return n

    def gains(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(g/σ over the head, g over the tail)``; differentiable in δ.

        ``g = ReLU(σ + δ) − σ``; its gradient is 1 where σ + δ > 0 and 0 where the
        ReLU clamps, as in the paper's formulation.
        """
        delta = self.delta
        if delta.shape[0] < self.rank:
            delta = torch.cat([delta, delta.new_zeros(self.rank - delta.shape[0])])
        g = torch.relu(self.sigma + delta) - self.sigma
        return g[: self.head] / self.sigma[: self.head], g[self.head :]

    # -- strategies ---------------------------------------------------------------------

    def choose(self, tokens: int, geometry: ConvGeometry | None) -> Strategy:
        """The cheapest exact form for ``tokens`` positions (forward + backward flops)."""
        m, n, r = self.m, self.n, self.rank
        if self.side == "left":
            activation = 10 * tokens * m * r
        elif geometry is None or geometry.pointwise:
            activation = 10 * tokens * n * r
        else:
            return "weight"  # a k×k conv cannot be corrected on its input channels
        weight = 4 * r * m * n + 2 * r**3 + 2 * tokens * m * n
        if weight < activation:
            return "weight"
        return "output" if self.side == "left" else "input"

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """ΔW in ``weight``'s layout and dtype, differentiable in δ (weight strategy)."""
        c, g_tail = self.gains()
        dtype = weight.dtype
        matrix = weight.reshape(weight.shape[0], -1)
        basis = self.basis.to(dtype)
        head = basis[:, : self.head]
        if self.side == "left":
            update = (head * c.to(dtype)) @ (head.T @ matrix)
        else:
            update = (matrix @ head) @ (head * c.to(dtype)).T
        if g_tail.numel():
            near = basis[:, self.head :] * g_tail.to(dtype)
            far = self.tail.to(dtype)
            update = update + (near @ far.T if self.side == "left" else far @ near.T)
        return update.reshape(weight.shape)

    def correct_output(self, y: torch.Tensor, x: torch.Tensor, geometry: ConvGeometry | None) -> torch.Tensor:
        """``ΔW x`` from the frozen bias-free output ``y = W x`` (m ≤ n)."""
        c, g_tail = self.gains()
        dtype = y.dtype
        head = self.basis[:, : self.head].to(dtype)
        if geometry is None:
            correction = ((y @ head) * c.to(dtype)) @ head.T
        else:
            z = geometry.channel_map(y, head.T)
            correction = geometry.channel_map(z * _channels(c.to(dtype), geometry), head)
        if g_tail.numel():
            near = self.basis[:, self.head :].to(dtype)
            far = self.tail.to(dtype)  # V_t: (n, t)
            if geometry is None:
                t = (x @ far) * g_tail.to(dtype)
                correction = correction + t @ near.T
            else:
                kernel = far.T.reshape(far.shape[1], *self.weight_shape[1:])
                t = geometry.conv(x, kernel) * _channels(g_tail.to(dtype), geometry)
                correction = correction + geometry.channel_map(t, near)
        return correction

    def correct_input(self, x: torch.Tensor, geometry: ConvGeometry | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(x + V diag(g/σ) Vᵀ x, tail output term)`` for m > n (Linear / 1×1 conv)."""
        c, g_tail = self.gains()
        dtype = x.dtype
        head = self.basis[:, : self.head].to(dtype)
        if geometry is None:
            shifted = x + ((x @ head) * c.to(dtype)) @ head.T
        else:
            z = geometry.channel_map(x, head.T)
            shifted = x + geometry.channel_map(z * _channels(c.to(dtype), geometry), head)
        extra = None
        if g_tail.numel():
            near = self.basis[:, self.head :].to(dtype)  # V_t: (n, t)
            far = self.tail.to(dtype)  # U_t: (m, t)
            if geometry is None:
                extra = ((x @ near) * g_tail.to(dtype)) @ far.T
            else:
                t = geometry.channel_map(x, near.T) * _channels(g_tail.to(dtype), geometry)
                extra = geometry.channel_map(t, far)
        return shifted, extra


def _channels(values: torch.Tensor, geometry: ConvGeometry) -> torch.Tensor:
    return values.reshape(1, -1, *([1] * geometry.dims))


def shifted_call(layer: ShiftedLayer, x: torch.Tensor, frozen, weight_and_bias, geometry: ConvGeometry | None) -> torch.Tensor:
    """Forward of a frozen layer with its shift applied.

    ``frozen(x)`` runs the original module; ``weight_and_bias(x)`` returns the weight
    and bias the module would use for ``x`` (cast to its compute dtype).
    """
    tokens = x.numel() // x.shape[-1] if geometry is None else _positions(x, geometry)
    strategy = layer.choose(tokens, geometry)
    if strategy == "input":
        shifted, extra = layer.correct_input(x, geometry)
        y = frozen(shifted)
        return y if extra is None else y + extra
    weight, bias = weight_and_bias(x)
    if strategy == "weight":
        patched = weight + layer.delta_weight(weight)
        # The weight gradient needs x, which autograd saves; the model may later
        # modify x in place (Flux adds residuals in place), so save a private copy.
        x = x.clone()
        return F.linear(x, patched, bias) if geometry is None else geometry.conv(x, patched, bias)
    y = frozen(x)
    plain = y if bias is None else y - (bias if geometry is None else _channels(bias, geometry))
    return y + layer.correct_output(plain, x, geometry)


def _positions(x: torch.Tensor, geometry: ConvGeometry) -> int:
    spatial = 1
    for s in x.shape[2:]:
        spatial *= s
    return x.shape[0] * spatial
