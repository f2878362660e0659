"""A spectral shift's ΔW as LoRA factors (``lora_up`` / ``lora_down``), exactly or at a rank.

``ΔW = U diag(g) Vᵀ`` with ``g = ReLU(σ + δ) − σ`` is already a singular value
decomposition of ΔW (singular values |gᵢ|, left vectors uᵢ, right vectors
sign(gᵢ)·vᵢ). So the best rank-k approximation (Eckart–Young) keeps the k entries of
largest |g|, no further SVD is needed, and the Frobenius error is exactly
``sqrt(Σ_dropped gᵢ²)``. When k covers every non-zero gᵢ the LoRA is exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .spectral import Decomposition, as_matrix, spectral_gain


@dataclass
class LayerExport:
    up: torch.Tensor  # (m, k) or (m, k, 1, 1) for conv kernels
    down: torch.Tensor  # (k, n) or (k, c_in, kh, kw)
    dropped_energy: float  # Σ g² over the singular values left out
    total_energy: float  # Σ g²
    nonzero: int

    @property
    def relative_error(self) -> float:
        """‖ΔW − up·down‖_F / ‖ΔW‖_F (exactly 0 when nothing was dropped)."""
        if self.total_energy == 0.0:
            return 0.0
        return (self.dropped_energy / self.total_energy) ** 0.5


def layer_factors(decomposition: Decomposition, weight: torch.Tensor, delta: torch.Tensor, rank: int) -> LayerExport | None:
    """Rank-``rank`` LoRA factors of one layer's ΔW; ``None`` if ΔW = 0."""
    gain = spectral_gain(decomposition.sigma, delta)
    nonzero = int(torch.count_nonzero(gain))
    if nonzero == 0:
        return None
    k = min(rank, nonzero)
    ranking = torch.argsort(gain.abs(), descending=True)
    order, dropped = ranking[:k], ranking[k:]
    g = gain[order]
    left, right_t = _singular_vectors(decomposition, as_matrix(weight.detach()).to(torch.float64), order)
    root = g.abs().sqrt()
    up = left * (root * torch.sign(g))
    down = root[:, None] * right_t
    if weight.ndim > 2:
        up = up.reshape(up.shape[0], k, *([1] * (weight.ndim - 2)))
        down = down.reshape(k, *weight.shape[1:])
    return LayerExport(up.float(), down.float(), float((gain[dropped] ** 2).sum()), float((gain**2).sum()), nonzero)


def _singular_vectors(decomposition: Decomposition, matrix: torch.Tensor, order: torch.Tensor):
    """``(U[:, order], V[:, order]ᵀ)`` in float64 from a one-sided decomposition.

    Head directions get their other-side vector by projection (V = Wᵀ U σ⁻¹, or
    U = W V σ⁻¹); tail directions have it stored.
    """
    left = decomposition.side == "left"
    near = decomposition.basis.to(torch.float64)[:, order]
    far = torch.empty((matrix.shape[1] if left else matrix.shape[0], order.numel()), dtype=torch.float64)
    in_tail = order >= decomposition.head
    in_head = ~in_tail
    if bool(in_head.any()):
        projected = matrix.T @ near[:, in_head] if left else matrix @ near[:, in_head]
        far[:, in_head] = projected / decomposition.sigma.to(torch.float64)[order[in_head]]
    if bool(in_tail.any()):
        far[:, in_tail] = decomposition.tail.to(torch.float64)[:, order[in_tail] - decomposition.head]
    return (near, far.T) if left else (far, near.T)


@dataclass
class ExportReport:
    layers: int = 0
    exact_layers: int = 0
    elementwise: int = 0
    worst_error: float = 0.0
    worst_layer: str = ""
    total_error: float = 0.0  # ‖ΔW − ΔŴ‖_F / ‖ΔW‖_F over all layers together
    per_layer: dict[str, float] = field(default_factory=dict)

    def summary(self, rank: int) -> str:
        lines = [
            f"rank {rank}: {self.layers} layers as LoRA ({self.exact_layers} exact), {self.elementwise} elementwise deltas as .diff",
            f"relative Frobenius error over all layers: {self.total_error:.3e}",
        ]
        if self.worst_layer:
            lines.append(f"worst layer: {self.worst_layer} ({self.worst_error:.3e})")
        return "\n".join(lines)
