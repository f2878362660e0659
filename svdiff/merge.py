"""Closed-form merge of fine-tuned cross-attention K/V weights (Custom Diffusion, §3.4).

For one K or V projection with base weight ``W₀ (o × d)``, text features of the
regularisation captions ``C_reg (N × d)`` and of the concepts' target tokens
``C (s × d)`` with the outputs each concept's fine-tuned weight gives them,
``V (o × s)`` (column j = ``W_n c_j`` for the concept n that owns row j):

    minimise ‖(W − W₀) C_regᵀ‖_F  subject to  W Cᵀ = V.

With ``R = C_regᵀ C_reg`` the Lagrangian gives ``(W − W₀) R = Λ C``, so

    W = W₀ + (V − W₀ Cᵀ) E⁻¹ D,   D = C R⁻¹ (s × d),   E = D Cᵀ = C R⁻¹ Cᵀ (s × s).

``D`` and ``E`` depend on the text features only, so they are factorised once and
every layer costs two thin products. ``R`` gets a ridge of ``RIDGE · tr(R)/d`` so a
short caption list (fewer token features than d) still has a unique answer: the
smallest change ‖W − W₀‖ in the directions the captions do not cover.

When the targets are linearly dependent (two concepts whose target tokens give the
same features, or more target tokens than d) ``E`` is singular and no W meets every
constraint. ``E⁻¹`` is then the pseudo-inverse over the eigenvalues above
``RCOND · λ_max``: the result meets the constraints in the least-squares sense
(per output row) and, among those solutions, changes the regularisation outputs
least. :class:`MergeSystem` says which case it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

RIDGE = 1e-8
RCOND = 1e-7
"""Eigenvalues of E below this fraction of the largest count as zero (the features
come from float32 or lower-precision text encoders: about 7 significant digits)."""


@dataclass
class MergeSystem:
    """The text-feature side of the merge, shared by every K/V layer (float64)."""

    projector: torch.Tensor
    """``M = E⁻¹ D`` (s × d): ``W = W₀ + (V − W₀ Cᵀ) M``."""
    targets: torch.Tensor
    """``C`` (s × d)."""
    gram: torch.Tensor
    """``R = C_regᵀ C_reg`` (d × d), without the ridge."""
    rank: int
    """Rank of E; ``< len(C)`` means the system is singular (least squares)."""
    regularization_rank: int
    """How many of the d feature directions the regularisation captions span."""

    @property
    def singular(self) -> bool:
        return self.rank < self.targets.shape[0]


def build_system(regularization: torch.Tensor, targets: torch.Tensor) -> MergeSystem:
    """Factorise the text-feature side once (see the module docstring)."""
    if regularization.ndim != 2 or regularization.shape[0] == 0:
        raise ValueError("the regularisation caption list gave no text features; give at least one caption (about 200 is typical)")
    if targets.ndim != 2 or targets.shape[0] == 0:
        raise ValueError("no target tokens: every concept needs at least one target prompt containing its token")
    if regularization.shape[1] != targets.shape[1]:
        raise ValueError(f"text features of width {regularization.shape[1]} and {targets.shape[1]}: encode everything with one CLIP")
    reg = regularization.to(torch.float64)
    c = targets.to(torch.float64)
    d = reg.shape[1]
    gram = reg.T @ reg
    scale = float(torch.trace(gram)) / d
    if not scale > 0:
        raise ValueError("the regularisation captions' text features are all zero; check the CLIP")
    eigen_r = torch.linalg.eigvalsh(gram)
    regularization_rank = int((eigen_r > RCOND * float(eigen_r.max())).sum())
    factor = torch.linalg.cholesky(gram + (RIDGE * scale) * torch.eye(d, dtype=torch.float64))
    solved = torch.cholesky_solve(c.T, factor).T  # D = C R⁻¹
    e = solved @ c.T
    e = 0.5 * (e + e.T)
    values, vectors = torch.linalg.eigh(e)
    keep = values > RCOND * float(values.max().clamp_min(0.0))
    if not bool(keep.any()):
        raise ValueError("the target tokens' text features are all zero; check the concepts' prompts and the CLIP")
    inverse = (vectors[:, keep] / values[keep]) @ vectors[:, keep].T
    return MergeSystem(inverse @ solved, c, gram, int(keep.sum()), regularization_rank)


@dataclass
class LayerMerge:
    weight: torch.Tensor
    """The merged weight (o × d), float64."""
    target_residual: float
    """‖W Cᵀ − V‖_F / ‖V‖_F."""
    regularization_change: float
    """‖(W − W₀) C_regᵀ‖_F / ‖W₀ C_regᵀ‖_F."""


def merge_layer(system: MergeSystem, base: torch.Tensor, outputs: torch.Tensor) -> LayerMerge:
    """Merged weight of one layer: ``base`` W₀ (o × d), ``outputs`` V (o × s)."""
    w0 = base.detach().to(torch.float64)
    v = outputs.detach().to(torch.float64)
    if v.shape != (w0.shape[0], system.targets.shape[0]):
        raise ValueError(f"outputs of shape {tuple(v.shape)} for a {tuple(w0.shape)} weight and {system.targets.shape[0]} targets")
    change = (v - w0 @ system.targets.T) @ system.projector
    weight = w0 + change
    residual = torch.linalg.norm(weight @ system.targets.T - v) / torch.linalg.norm(v).clamp_min(1e-300)
    moved = torch.sum((change @ system.gram) * change)
    reference = torch.sum((w0 @ system.gram) * w0)
    return LayerMerge(weight, float(residual), float((moved.clamp_min(0) / reference.clamp_min(1e-300)).sqrt()))
