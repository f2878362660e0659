"""Trainable shifted layers against float64 references: outputs and δ-gradients.

The reference builds ``W' = U diag(ReLU(σ + δ)) Vᵀ`` from a float64 SVD and runs the
plain layer with it; autograd through that gives the reference gradient of δ. Every
strategy (output side, input side, weight space) must match it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_spectral import make_weight

from comfyui_svdiff.svdiff.spectral import decompose
from comfyui_svdiff.svdiff.training.layers import ConvGeometry, ShiftedLayer, shifted_call

CASES = {
    # name: (weight shape, input shape, geometry kwargs or None, strategies)
    "linear left": ((24, 40), (3, 5, 40), None, ["output", "weight"]),
    "linear right": ((40, 24), (3, 5, 24), None, ["input", "weight"]),
    "conv3x3 left": ((12, 6, 3, 3), (2, 6, 7, 7), dict(dims=2, kernel=(3, 3), stride=1, padding=1, dilation=1), ["output", "weight"]),
    "conv3x3 strided": ((12, 6, 3, 3), (2, 6, 8, 8), dict(dims=2, kernel=(3, 3), stride=2, padding=1, dilation=1), ["output", "weight"]),
    "conv1x1 right": ((20, 8, 1, 1), (2, 8, 5, 5), dict(dims=2, kernel=(1, 1), stride=1, padding=0, dilation=1), ["input", "weight"]),
    "conv3x3 right": ((40, 4, 3, 3), (2, 4, 6, 6), dict(dims=2, kernel=(3, 3), stride=1, padding=1, dilation=1), ["weight"]),
}


def reference(weight, bias, x, delta, geometry):
    w = weight.double()
    matrix = w.reshape(w.shape[0], -1)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    d = delta.double().detach().requires_grad_(True)
    padded = torch.cat([d, d.new_zeros(s.numel() - d.numel())])
    patched = (u * torch.relu(s + padded)) @ vh
    patched = patched.reshape(w.shape)
    b = None if bias is None else bias.double()
    y = F.linear(x.double(), patched, b) if geometry is None else geometry.conv(x.double(), patched, b)
    return y, d


@pytest.mark.parametrize("spread", [1.0, 4.0], ids=["tame", "ill-conditioned"])
@pytest.mark.parametrize("rank", [None, 5], ids=["full", "rank5"])
@pytest.mark.parametrize("name", list(CASES))
def test_every_strategy_matches_the_reference(name, rank, spread):
    shape, x_shape, geo, strategies = CASES[name]
    geometry = ConvGeometry(**geo) if geo else None
    g = torch.Generator().manual_seed(0)
    weight = make_weight(shape, torch.float32, spread=spread)
    bias = 0.1 * torch.randn(shape[0], generator=g)
    x = torch.randn(x_shape, generator=g)
    decomposition = decompose(weight)
    if spread > 1:
        assert decomposition.head < decomposition.rank  # the tail path is exercised
    init = 0.3 * torch.randn(decomposition.rank, generator=g)
    init[1] = -50.0  # clamped by the ReLU: zero gradient there
    y_ref, d_ref = reference(weight, bias, x, init[: rank or decomposition.rank], geometry)
    upstream = torch.randn(y_ref.shape, generator=g, dtype=torch.float64)
    (y_ref * upstream).sum().backward()

    def frozen(inp):
        return F.linear(inp, weight, bias) if geometry is None else geometry.conv(inp, weight, bias)

    for strategy in strategies:
        layer = ShiftedLayer(decomposition, shape, rank=rank, init=init)
        layer.choose = lambda tokens, geometry, s=strategy: s
        y = shifted_call(layer, x, frozen, lambda inp: (weight, bias), geometry)
        scale = float(y_ref.detach().abs().max())
        torch.testing.assert_close(y.double(), y_ref, rtol=0, atol=2e-5 * scale, msg=lambda m, s=strategy: f"{s}: {m}")
        (y.double() * upstream).sum().backward()
        grad_scale = float(d_ref.grad.abs().max())
        torch.testing.assert_close(
            layer.delta.grad.double(), d_ref.grad, rtol=0, atol=1e-4 * grad_scale, msg=lambda m, s=strategy: f"{s} grad: {m}"
        )
        assert layer.delta.grad[1] == 0  # clamped direction


def test_strategy_choice_follows_token_count():
    """Small square layers seen by many tokens go to weight space; big ones stay on activations."""
    small = ShiftedLayer(decompose(make_weight((32, 32), torch.float32)), (32, 32))
    big = ShiftedLayer(decompose(make_weight((256, 256), torch.float32)), (256, 256))
    assert small.choose(4096, None) == "weight"
    assert big.choose(16, None) == "output"
    right_conv = ShiftedLayer(decompose(make_weight((40, 4, 3, 3), torch.float32)), (40, 4, 3, 3))
    assert right_conv.choose(1, ConvGeometry(2, (3, 3), 1, 1, 1)) == "weight"


def test_zero_shift_is_the_frozen_layer_exactly():
    weight = make_weight((24, 40), torch.float32)
    layer = ShiftedLayer(decompose(weight), (24, 40))
    x = torch.randn(4, 40)
    y = shifted_call(layer, x, lambda inp: F.linear(inp, weight), lambda inp: (weight, None), None)
    torch.testing.assert_close(y, F.linear(x, weight), rtol=0, atol=0)
