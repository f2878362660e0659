"""The spectral-shift kernels against float64 SVD references (paper §3.2, eq. 2; E.1).

Every reference is computed independently with ``torch.linalg.svd`` in float64 and
the paper's formula ``U diag(ReLU(σ + δ)) Vᵀ``; the code under test uses a Gram
eigen-decomposition and the additive form, so agreement is a real check.
"""

from __future__ import annotations

import pytest
import torch

from comfyui_svdiff.svdiff.spectral import (
    as_matrix,
    decompose,
    pad_shift,
    shifted_sigma,
    spectral_gain,
    spectral_update,
)

# Tolerance on ‖ΔW − ΔW_ref‖ / ‖ΔW_ref‖ per weight dtype: float32 is limited by the
# float32 projection, half types by rounding the weight itself (the reference is
# computed from the same rounded weight, so this is the update's own error).
TOLERANCE = {torch.float32: 5e-5, torch.float16: 5e-5, torch.bfloat16: 5e-5}

SHAPES = {
    "linear wide": (48, 80),
    "linear tall": (96, 40),
    "linear square": (64, 64),
    "conv 1x1": (32, 24, 1, 1),
    "conv 3x3": (40, 16, 3, 3),
    "conv 3x3 tall": (72, 4, 3, 3),
}


def reference_update(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """U diag(ReLU(σ + δ)) Vᵀ − W in float64 from a full SVD (eq. 2)."""
    matrix = weight.double().reshape(weight.shape[0], -1) if weight.ndim > 1 else weight.double()[None]
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    padded = torch.zeros_like(s)
    padded[: delta.numel()] = delta.double()
    shifted = u @ torch.diag(torch.relu(s + padded)) @ vh
    return (shifted - matrix).reshape(weight.shape)


def make_weight(shape, dtype, seed=0, spread=3.0):
    """A weight with distinct singular values spread over ``spread`` decades."""
    g = torch.Generator().manual_seed(seed)
    m = shape[0]
    n = 1
    for s in shape[1:]:
        n *= s
    r = min(m, n)
    q1, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
    sigma = torch.logspace(0, -spread, r, dtype=torch.float64) * (1 + 0.1 * torch.rand(r, generator=g, dtype=torch.float64))
    sigma, _ = sigma.sort(descending=True)
    return ((q1 * sigma) @ q2.T).reshape(shape).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(SHAPES))
def test_update_matches_float64_svd(name, dtype):
    shape = SHAPES[name]
    weight = make_weight(shape, dtype)
    r = min(as_matrix(weight).shape)
    g = torch.Generator().manual_seed(1)
    delta = 0.3 * torch.randn(r, generator=g)
    expected = reference_update(weight, delta)
    got = spectral_update(decompose(weight), weight, delta)
    assert got.shape == weight.shape and got.dtype == torch.float32
    error = float((got.double() - expected).norm() / expected.norm())
    assert error < TOLERANCE[dtype], f"{name} {dtype}: relative error {error:.2e}"


@pytest.mark.parametrize("name", ["linear wide", "linear tall", "conv 3x3"])
def test_patched_weight_has_the_shifted_singular_values(name):
    """W + ΔW has singular values ReLU(σ + δ), re-sorted (eq. 2)."""
    weight = make_weight(SHAPES[name], torch.float32, spread=1.0)
    decomposition = decompose(weight)
    delta = torch.linspace(-0.5, 0.5, decomposition.rank)
    patched = weight.double() + spectral_update(decomposition, weight, delta).double()
    measured = torch.linalg.svdvals(as_matrix(patched))
    reference_sigma = torch.linalg.svdvals(as_matrix(weight.double()))
    expected = torch.relu(reference_sigma + delta.double()).sort(descending=True).values
    torch.testing.assert_close(measured, expected, rtol=0, atol=1e-5)


def test_relu_clamps_negative_singular_values_to_zero():
    weight = make_weight((24, 40), torch.float32, spread=1.0)
    decomposition = decompose(weight)
    reference_sigma = torch.linalg.svdvals(weight.double())
    delta = torch.zeros(24)
    delta[:5] = -10.0  # far below σ: those directions vanish, not flip sign
    patched = weight.double() + spectral_update(decomposition, weight, delta).double()
    measured = torch.linalg.svdvals(patched)
    torch.testing.assert_close(measured[:19], reference_sigma[5:], rtol=0, atol=1e-5)
    assert float(measured[19:].abs().max()) < 1e-5
    # And the gain formula itself: g = ReLU(σ + δ) − σ = −σ exactly where clamped.
    gain = spectral_gain(decomposition.sigma, delta)
    torch.testing.assert_close(gain[:5], -decomposition.sigma[:5], rtol=0, atol=0)


def test_zero_shift_is_exact_and_reported_as_no_update():
    weight = make_weight((32, 48), torch.float16)
    assert spectral_update(decompose(weight), weight, torch.zeros(32)) is None


def test_rank_limited_shift_moves_only_the_top_k_singular_values():
    """Appendix E.1: δ of length k < r shifts σ₁..σ_k and leaves the rest."""
    weight = make_weight((40, 56), torch.float32, spread=1.0)
    k = 6
    delta = torch.full((k,), 0.25)
    expected = reference_update(weight, delta)
    got = spectral_update(decompose(weight), weight, delta)
    assert float((got.double() - expected).norm() / expected.norm()) < 2e-5
    measured = torch.linalg.svdvals(weight.double() + got.double())
    original = torch.linalg.svdvals(weight.double())
    torch.testing.assert_close(measured[:k], original[:k] + 0.25, rtol=0, atol=1e-5)
    torch.testing.assert_close(measured[k:], original[k:], rtol=0, atol=1e-5)


def test_rank_limited_path_equals_full_path():
    """The k-column product and the r × r projector give the same ΔW."""
    weight = make_weight((64, 96), torch.float32)
    decomposition = decompose(weight)
    few = torch.zeros(64)
    few[:3] = torch.tensor([0.2, -0.1, 0.05])
    low = spectral_update(decomposition, weight, few[:3])  # takes the rank-k branch
    full = spectral_update(decomposition, weight, few)  # zeros → same active set
    torch.testing.assert_close(low, full, rtol=0, atol=1e-6)


def test_shift_longer_than_the_spectrum_is_refused():
    with pytest.raises(ValueError, match="exceeds the 8 singular values"):
        pad_shift(torch.zeros(9), 8)


def test_one_dimensional_weight_is_a_norm_rescale():
    """A 1-D weight as the 1 × C matrix: σ = ‖w‖, so w' = w · ReLU(‖w‖ + δ)/‖w‖."""
    w = torch.randn(37, generator=torch.Generator().manual_seed(3)) + 1.0
    delta = torch.tensor([0.7])
    got = spectral_update(decompose(w), w, delta)
    norm = w.double().norm()
    expected = w.double() * (torch.relu(norm + 0.7) / norm) - w.double()
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-7)


def test_rank_deficient_weight_keeps_both_bases():
    """Zero singular values: V is not determined by W, so the full SVD is kept."""
    g = torch.Generator().manual_seed(5)
    low_rank = (torch.randn(30, 4, generator=g) @ torch.randn(4, 50, generator=g)).double()
    decomposition = decompose(low_rank)
    assert decomposition.head == 0 and decomposition.tail.shape == (50, 30)
    delta = torch.zeros(30)
    delta[:4] = 0.5  # shifting the non-zero part is well defined
    expected = reference_update(low_rank, delta)
    got = spectral_update(decomposition, low_rank, delta)
    assert float((got.double() - expected).norm() / expected.norm()) < 1e-6


def test_decomposition_is_square_and_orthonormal():
    for shape in [(48, 80), (96, 40), (40, 16, 3, 3)]:
        weight = make_weight(shape, torch.float32)
        d = decompose(weight)
        r = min(as_matrix(weight).shape)
        assert d.basis.shape == (r, r)
        assert d.side == ("left" if as_matrix(weight).shape[0] <= as_matrix(weight).shape[1] else "right")
        identity = d.basis.double().T @ d.basis.double()
        torch.testing.assert_close(identity, torch.eye(r, dtype=torch.float64), rtol=0, atol=1e-6)
        torch.testing.assert_close(d.sigma, torch.linalg.svdvals(as_matrix(weight).double()), rtol=1e-9, atol=1e-12)


def test_shifted_sigma_is_relu_of_sum():
    sigma = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(shifted_sigma(sigma, torch.tensor([1.0, -3.0])), torch.tensor([4.0, 0.0, 1.0], dtype=torch.float64))


def test_update_runs_on_the_weight_device_and_returns_float32_for_half_weights():
    weight = make_weight((16, 24), torch.bfloat16)
    update = spectral_update(decompose(weight), weight, torch.ones(16) * 0.1)
    assert update.dtype == torch.float32 and update.device == weight.device


@pytest.mark.parametrize("shape", [(64, 64), (64, 100), (100, 64)])
def test_ill_conditioned_weights_keep_float32_accuracy(shape):
    """σ spread over 5 decades: dividing by σ would amplify rounding ~1e5×; the
    explicit tail keeps ΔW at float32 accuracy."""
    weight = make_weight(shape, torch.float32, spread=5.0)
    decomposition = decompose(weight)
    assert 0 < decomposition.head < decomposition.rank  # some directions in the tail
    delta = 0.05 * torch.randn(decomposition.rank, generator=torch.Generator().manual_seed(4))
    expected = reference_update(weight, delta)
    got = spectral_update(decomposition, weight, delta)
    assert float((got.double() - expected).norm() / expected.norm()) < 1e-5


@pytest.mark.parametrize("shape", [(48, 80), (96, 40), (40, 16, 3, 3), (8, 5000), (5000, 8)])
def test_in_place_update_equals_weight_plus_update(shape):
    """Blocked in-place patching (blocks of 2048 columns/rows) is exact."""
    weight = make_weight(shape, torch.float32, spread=5.0)
    d = decompose(weight)
    for delta in (0.1 * torch.randn(d.rank, generator=torch.Generator().manual_seed(6)), torch.full((3,), 0.2)):
        expected = weight + spectral_update(d, weight, delta)
        target = weight.clone()
        assert spectral_update(d, target, delta, in_place=True) is target
        torch.testing.assert_close(target, expected, rtol=0, atol=1e-6)
    untouched = weight.clone()
    assert spectral_update(d, untouched, torch.zeros(2), in_place=True) is None
    assert torch.equal(untouched, weight)
