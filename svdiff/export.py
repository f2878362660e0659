"""Export a spectral shift as an ordinary LoRA (``lora_up`` / ``lora_down``).

``ΔW = U diag(g) Vᵀ`` with ``g = ReLU(σ + δ) − σ`` is already a singular value
decomposition of ΔW (singular values |gᵢ|, left vectors uᵢ, right vectors
sign(gᵢ)·vᵢ). So the best rank-k approximation (Eckart–Young) keeps the k entries of
largest |g|, no further SVD is needed, and the Frobenius error is exactly
``sqrt(Σ_dropped gᵢ²)``. When k covers every non-zero gᵢ the LoRA is exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .shift import CLIP_PREFIX, SpectralShift
from .spectral import Decomposition, as_matrix, spectral_gain, spectral_update


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


def _lora_stem(component: str, param: str) -> str:
    """LoRA key prefix ComfyUI maps back to ``param`` (its generic key format)."""
    stem = param.rsplit(".", 1)[0]
    return CLIP_PREFIX + stem if component == "clip" else stem


def export_lora(
    model, clip, shift: SpectralShift, rank: int, strength_model: float = 1.0, strength_clip: float = 1.0, progress=None, cache=None
):
    """``(tensors, report)`` of a LoRA equivalent to applying ``shift`` at the strengths.

    Spectral layers become ``<stem>.lora_up.weight`` / ``.lora_down.weight`` /
    ``.alpha`` (alpha = rank used, so ComfyUI's scale alpha/rank is 1); elementwise
    deltas, and svdiff-pytorch's per-norm scalars (exact as elementwise deltas),
    become ``<stem>.diff`` / ``.diff_b``, which ComfyUI's LoRA loader applies as-is.
    """
    from .apply import ApplyReport, prepare

    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    prepared = prepare(model, clip, shift, strength_model, strength_clip, ApplyReport(shift.name), progress, cache)
    tensors: dict[str, torch.Tensor] = {}
    report = ExportReport()
    dropped_sum = total_sum = 0.0
    for part in prepared:
        for key, target in part.targets.items():
            stem = _lora_stem(part.component, target.param)
            delta = shift.tensors[key].to(torch.float64) * part.strength
            base = part.bases[target.param]
            if target.kind == "spectral" and base.ndim >= 2:
                layer = layer_factors(part.decompositions[key], base, delta, rank)
                if layer is None:
                    continue
                k = layer.down.shape[0]
                tensors[f"{stem}.lora_up.weight"] = layer.up
                tensors[f"{stem}.lora_down.weight"] = layer.down
                tensors[f"{stem}.alpha"] = torch.tensor(float(k))
                report.layers += 1
                report.exact_layers += int(k >= layer.nonzero)
                dropped_sum += layer.dropped_energy
                total_sum += layer.total_energy
                report.per_layer[stem] = layer.relative_error
                if layer.relative_error > report.worst_error:
                    report.worst_error, report.worst_layer = layer.relative_error, stem
                continue
            if target.kind == "spectral":  # 1-D weight: the 1 × C view's update is elementwise
                update = spectral_update(part.decompositions[key], base, delta)
                if update is None:
                    continue
            else:
                update = delta.float()
            suffix = ".diff_b" if target.param.endswith(".bias") else ".diff"
            name = stem + suffix
            tensors[name] = tensors[name] + update.float() if name in tensors else update.float()
            report.elementwise += 1
    if total_sum > 0:
        report.total_error = (dropped_sum / total_sum) ** 0.5
    return tensors, report
