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
vectors, ``U_t diag(g_t) V_tᵀ``, in every form (no division by a small σ). The forms
themselves are in ``svdiff/activation.py``, shared with ComfyUI's bypass mode; this
module adds the trainable δ and the choice between them.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from ..activation import ActivationShift, ConvGeometry, input_correction, output_correction, weight_correction
from ..spectral import Decomposition

Strategy = Literal["output", "input", "weight"]

__all__ = ["ConvGeometry", "ShiftedLayer", "Strategy", "shifted_call"]


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

    def factors(self, dtype: torch.dtype) -> ActivationShift:
        """The current ΔW as :class:`ActivationShift` factors in ``dtype``; differentiable in δ."""
        c, g_tail = self.gains()
        return ActivationShift(
            side=self.side,
            head=self.basis[:, : self.head].to(dtype),
            coefficient=c.to(dtype),
            near=self.basis[:, self.head :].to(dtype),
            far=self.tail.to(dtype),
            gain_tail=g_tail.to(dtype),
            weight_shape=self.weight_shape,
        )

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """ΔW in ``weight``'s layout and dtype, differentiable in δ (weight strategy)."""
        return weight_correction(self.factors(weight.dtype), weight)

    def correct_output(self, y: torch.Tensor, x: torch.Tensor, geometry: ConvGeometry | None) -> torch.Tensor:
        """``ΔW x`` from the frozen bias-free output ``y = W x`` (m ≤ n)."""
        return output_correction(self.factors(y.dtype), y, x, geometry)

    def correct_input(self, x: torch.Tensor, geometry: ConvGeometry | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(x + V diag(g/σ) Vᵀ x, tail output term)`` for m > n (Linear / 1×1 conv)."""
        return input_correction(self.factors(x.dtype), x, geometry)


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
    plain = y if bias is None else y - (bias if geometry is None else geometry.channels(bias))
    return y + layer.correct_output(plain, x, geometry)


def _positions(x: torch.Tensor, geometry: ConvGeometry) -> int:
    spatial = 1
    for s in x.shape[2:]:
        spatial *= s
    return x.shape[0] * spatial
