"""Spectral-shift math: decomposition and the additive weight update.

Everything here is a pure function of tensors. Notation follows the SVDiff paper
(§3.2, eq. 2): a weight reshaped to a matrix ``W: (m, n)`` has the thin SVD
``W = U diag(σ) Vᵀ`` with ``r = min(m, n)`` singular values, and a spectral shift
``δ`` turns it into ``U diag(ReLU(σ + δ)) Vᵀ``.

We never rebuild the shifted weight. We add

    ΔW = U diag(g) Vᵀ,    g = ReLU(σ + δ) − σ

to the weight as it stands. ``g`` is exactly zero where ``δ`` is zero (σ ≥ 0), so a
zero shift leaves the weight bit-identical, and because ΔW is computed from the
*unpatched* weight the update commutes with LoRAs on the same weight.

Only one singular basis is kept. With ``m ≤ n``, ``Vᵀ = diag(1/σ) Uᵀ W``, so

    ΔW = U diag(g / σ) Uᵀ W           (left basis U: (m, m))

and with ``m > n`` symmetrically ``ΔW = W V diag(g / σ) Vᵀ`` (right basis V: (n, n)).
The basis is square, ``r × r``, which is what makes the cache small: for a
1280 × 11520 conv kernel it is 1280², not the 1280 × 11520 a stored V would cost.
The basis comes from the eigen-decomposition of the Gram matrix ``W Wᵀ`` (or
``Wᵀ W``), formed and solved in float64: an order of magnitude faster than an SVD
of a wide matrix, and more accurate than a float32 SVD (see benchmarks/).

Dividing by σ amplifies float32 rounding by σ_max/σᵢ, so the small-σ tail (σᵢ below
``TAIL_FRACTION · σ_max``) keeps its other-side singular vectors explicitly, computed in
float64: ``ΔW = B_h diag(g/σ) B_hᵀ W + B_t diag(g) T_tᵀ`` (left side). For random and
trained weights that tail is a few percent of r. Weights whose spectrum reaches
numerical zero (where W does not determine the singular vectors at all) take both
bases from a float64 SVD: their whole spectrum is "tail".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Side = Literal["left", "right"]

# Singular values below TAIL_FRACTION · σ_max keep explicit other-side vectors: the
# division by σ would amplify float32 rounding of the projection by σ_max/σᵢ > 100.
TAIL_FRACTION = 1e-2
# Below RANK_TOLERANCE · σ_max a singular value is numerically zero: the float64 Gram
# matrix resolves σ² to ~1e-16 σ_max², i.e. σ to ~1e-8 σ_max.
RANK_TOLERANCE = 1e-7


def as_matrix(weight: torch.Tensor) -> torch.Tensor:
    """View a weight as the matrix the paper decomposes.

    Conv kernels ``(c_out, c_in, kh, kw)`` become ``(c_out, c_in·kh·kw)`` (paper §3.2,
    after FSGAN); Linear weights stay ``(out, in)``; a 1-D weight of length C is read
    as the ``1 × C`` matrix whose single singular value is its norm (what
    svdiff-pytorch does for norm layers).
    """
    if weight.ndim == 0:
        raise ValueError("a scalar weight has no spectrum")
    if weight.ndim == 1:
        return weight.reshape(1, -1)
    return weight.reshape(weight.shape[0], -1)


def matrix_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:
    """``(m, n)`` of :func:`as_matrix` for a weight of ``shape``."""
    shape = tuple(shape)
    if len(shape) == 0:
        raise ValueError("a scalar weight has no spectrum")
    if len(shape) == 1:
        return 1, shape[0]
    n = 1
    for s in shape[1:]:
        n *= s
    return shape[0], n


def spectrum_length(shape: torch.Size | tuple[int, ...]) -> int:
    """Number of singular values ``r = min(m, n)`` of a weight of ``shape``."""
    return min(matrix_shape(shape))


@dataclass(frozen=True)
class Decomposition:
    """One singular basis of a weight matrix, its singular values, and a tail.

    side "left" (m ≤ n): ``basis = U: (m, m)``; ``tail = V[:, r−t:]: (n, t)``.
    side "right" (m > n): ``basis = V: (n, n)``; ``tail = U[:, r−t:]: (m, t)``.
    ``sigma: (r,)`` float64, descending; ``basis`` and ``tail`` float32. The last t
    singular directions (σᵢ < TAIL_FRACTION · σ_max) use ``tail`` instead of a
    division by σ.
    """

    side: Side
    basis: torch.Tensor
    sigma: torch.Tensor
    shape: tuple[int, int]
    tail: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.sigma.shape[0]

    @property
    def head(self) -> int:
        """Number of leading directions handled through the basis alone."""
        return self.rank - (0 if self.tail is None else self.tail.shape[1])

    def nbytes(self) -> int:
        total = self.basis.numel() * self.basis.element_size()
        total += self.sigma.numel() * self.sigma.element_size()
        if self.tail is not None:
            total += self.tail.numel() * self.tail.element_size()
        return total


def decompose(weight: torch.Tensor) -> Decomposition:
    """Decompose a weight (any dtype, any device) into a :class:`Decomposition`.

    The Gram matrix of the short side is formed and eigen-decomposed in float64;
    ``σ = sqrt(λ)``. Cost for ``W: (m, n)``, m ≤ n: one ``m × n × m`` GEMM plus an
    ``m × m`` symmetric eigensolve (and a thin GEMM for the tail).
    """
    matrix = as_matrix(weight.detach()).to(torch.float64)
    m, n = matrix.shape
    left = m <= n
    gram = matrix @ matrix.T if left else matrix.T @ matrix
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)
    # eigh returns ascending eigenvalues; singular values are listed descending.
    sigma = eigenvalues.flip(0).clamp_min(0.0).sqrt()
    basis = eigenvectors.flip(1)
    sigma_max = float(sigma[0]) if sigma.numel() else 0.0
    if sigma_max == 0.0 or float(sigma[-1]) <= RANK_TOLERANCE * sigma_max:
        return _decompose_full(matrix)
    head = int((sigma >= TAIL_FRACTION * sigma_max).sum())
    tail = None
    if head < sigma.shape[0]:
        tail_basis = basis[:, head:]
        # Other-side vectors of the tail: V = Wᵀ U / σ (left) or U = W V / σ (right).
        other = (matrix.T @ tail_basis if left else matrix @ tail_basis) / sigma[head:]
        tail = other.to(torch.float32).contiguous()
    return Decomposition(
        side="left" if left else "right",
        basis=basis.to(torch.float32).contiguous(),
        sigma=sigma.contiguous(),
        shape=(m, n),
        tail=tail,
    )


def _decompose_full(matrix: torch.Tensor) -> Decomposition:
    """Both bases from a float64 SVD, for (numerically) rank-deficient weights.

    Every direction is "tail", so no division by a vanishing σ ever happens.
    """
    m, n = matrix.shape
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    left = m <= n
    basis, other = (u, vh.T) if left else (vh.T, u)
    return Decomposition(
        side="left" if left else "right",
        basis=basis.to(torch.float32).contiguous(),
        sigma=s.contiguous(),
        shape=(m, n),
        tail=other.to(torch.float32).contiguous(),
    )


def pad_shift(delta: torch.Tensor, rank: int) -> torch.Tensor:
    """Zero-pad a (possibly rank-limited) shift to length ``rank``.

    A δ of length k < r shifts only the k largest singular values (paper appendix
    E.1). A δ longer than r is an error the caller reports with context.
    """
    if delta.ndim != 1:
        raise ValueError(f"a spectral shift is a vector; got shape {tuple(delta.shape)}")
    k = delta.shape[0]
    if k > rank:
        raise ValueError(f"shift of length {k} exceeds the {rank} singular values of the weight")
    if k == rank:
        return delta
    return torch.cat([delta, delta.new_zeros(rank - k)])


def spectral_gain(sigma: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``g = ReLU(σ + δ) − σ`` in float64 (δ zero-padded to len(σ)).

    Computed in float64 because for small δ the difference cancels most bits of σ.
    """
    sigma = sigma.to(torch.float64)
    delta = pad_shift(delta.to(device=sigma.device, dtype=torch.float64), sigma.shape[0])
    return torch.relu(sigma + delta) - sigma


def shifted_sigma(sigma: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``ReLU(σ + δ)``: the singular values after the shift (eq. 2)."""
    return sigma.to(torch.float64) + spectral_gain(sigma, delta)


# Columns (left side) or rows (right side) per block of the in-place projector
# product: large enough for GEMM efficiency, small enough to stay in cache.
IN_PLACE_BLOCK = 2048


def spectral_update(
    decomposition: Decomposition,
    weight: torch.Tensor,
    delta: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    in_place: bool = False,
) -> torch.Tensor | None:
    """``ΔW = U diag(ReLU(σ + δ) − σ) Vᵀ`` for the unpatched ``weight``.

    ``weight`` is the weight the decomposition was taken from, in its own layout and
    any dtype/device; the result has the same shape, on the same device, in
    ``dtype`` (float32 by default: in half precision the projection ``Uᵀ W`` would
    lose the small singular directions). Returns ``None`` when ``g`` is all zero, so
    callers can skip the add and keep the weight bit-identical.

    With ``in_place`` (``weight`` contiguous and already in ``dtype``), ``weight``
    itself becomes ``W + ΔW`` and is returned: the additions ride on the GEMMs
    (β = 1) and no full-size temporary is allocated — what patching a copy of a
    weight needs.

    Cost, m ≤ n, with k the number of non-zero entries of g in the head and t in
    the tail: ``min(4kmn, 2m²k + 2m²n) + 2tmn`` flops.
    """
    gain = spectral_gain(decomposition.sigma, delta)
    head = decomposition.head
    active = torch.nonzero(gain[:head]).flatten()
    tail_active = torch.nonzero(gain[head:]).flatten()
    if active.numel() == 0 and tail_active.numel() == 0:
        return None
    if in_place and (weight.dtype != dtype or not weight.is_contiguous()):
        raise ValueError("in-place spectral update needs a contiguous weight in the compute dtype")
    matrix = as_matrix(weight.detach()).to(dtype)
    device = matrix.device
    m, n = decomposition.shape
    if tuple(matrix.shape) != (m, n):
        raise ValueError(f"weight of matrix shape {tuple(matrix.shape)} does not match its decomposition {(m, n)}")
    left = decomposition.side == "left"
    basis = decomposition.basis.to(device=device, dtype=dtype)
    out = matrix if in_place else None

    def accumulate(a: torch.Tensor, b: torch.Tensor) -> None:
        nonlocal out
        if out is None:
            out = a @ b
        else:
            out.addmm_(a, b)

    if active.numel():
        coefficient = (gain[active] / decomposition.sigma[active]).to(device=device, dtype=dtype)
        k = active.numel()
        r = basis.shape[0]
        long_side = n if left else m
        # Full-rank shifts (the common case) skip the gather of basis columns.
        selected = basis if k == r else basis[:, active]
        if 2 * r * r * (k + long_side) <= 4 * k * r * long_side:
            # Projector P = B diag(c) Bᵀ (r × r) first, then one GEMM with W.
            projector = (selected * coefficient) @ selected.T
            if in_place:
                _project_in_place(matrix, projector, left)
            else:
                out = projector @ matrix if left else matrix @ projector
        elif left:
            accumulate(selected * coefficient, selected.T @ matrix)
        else:
            accumulate(matrix @ selected, (selected * coefficient).T)

    if tail_active.numel():
        far = decomposition.tail.to(device=device, dtype=dtype)
        if tail_active.numel() == far.shape[1]:  # whole tail shifted: views, no gathers
            g = gain[head:].to(device=device, dtype=dtype)
            near = basis[:, head:] * g
        else:
            g = gain[head + tail_active].to(device=device, dtype=dtype)
            near = basis[:, head + tail_active] * g
            far = far[:, tail_active]
        accumulate(*((near, far.T) if left else (far, near.T)))
    return weight if in_place else out.reshape(weight.shape)


def _project_in_place(matrix: torch.Tensor, projector: torch.Tensor, left: bool) -> None:
    """``W ← W + P W`` (left) or ``W ← W + W P`` (right), block by block.

    Each block of columns (rows) only depends on itself, so updating blocks in place
    is exact and needs one block-sized temporary instead of a full copy of W.
    """
    size = matrix.shape[1] if left else matrix.shape[0]
    for start in range(0, size, IN_PLACE_BLOCK):
        if left:
            block = matrix[:, start : start + IN_PLACE_BLOCK]
            block.add_(projector @ block)
        else:
            block = matrix[start : start + IN_PLACE_BLOCK]
            block.add_(block @ projector)
