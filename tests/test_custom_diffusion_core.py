"""Custom Diffusion without ComfyUI: the augmentation policy and the closed-form merge."""

from __future__ import annotations

import math

import pytest
import torch

from comfyui_svdiff.svdiff import merge
from comfyui_svdiff.svdiff.training import augment

# ----------------------------------------------------------------------------------
# Augmentation: the reference policy, checked over many draws


def _within(count: int, total: int, p: float, sigmas: float = 5.0) -> bool:
    """``count`` successes of ``total`` Bernoulli(p) draws, within ``sigmas`` standard deviations."""
    return abs(count - total * p) <= sigmas * math.sqrt(total * p * (1 - p))


def test_augmentation_distribution_matches_the_reference_policy():
    size, draws = 64, 30000
    generator = torch.Generator().manual_seed(0)
    samples = [augment.draw(generator, size) for _ in range(draws)]
    shrunk = [a for a in samples if a.shrunk]
    enlarged = [a for a in samples if not a.shrunk]
    assert _within(len(shrunk), draws, 2 / 3)

    # Shrink: every integer side in [S//3, S] equally likely.
    sides = list(range(size // 3, size + 1))
    assert {a.scale for a in shrunk} == set(sides)
    for side in sides:
        assert _within(sum(a.scale == side for a in shrunk), len(shrunk), 1 / len(sides)), side
    # Enlarge: every integer side in [int(1.2 S), int(1.4 S)) equally likely.
    sides = list(range(int(1.2 * size), int(1.4 * size)))
    assert {a.scale for a in enlarged} == set(sides)
    for side in sides:
        assert _within(sum(a.scale == side for a in enlarged), len(enlarged), 1 / len(sides)), side

    # Positions uniform over every place the image fits.
    for a in samples:
        room = abs(a.scale - size)
        assert 0 <= a.top <= room and 0 <= a.left <= room
    tops = [a.top for a in shrunk if a.scale == size // 2]
    assert _within(sum(t <= (size - size // 2) // 2 for t in tops), len(tops), ((size - size // 2) // 2 + 1) / (size - size // 2 + 1))

    # Prompt words: "a far away"/"very small" below 0.6 S, none from 0.6 S to S, "zoomed in"/"close up" above S.
    far = [a for a in shrunk if a.scale < 0.6 * size]
    assert {a.prefix for a in far} == set(augment.FAR)
    assert _within(sum(a.prefix == augment.FAR[0] for a in far), len(far), 0.5)
    assert all(a.prefix == "" for a in shrunk if a.scale >= 0.6 * size)
    assert {a.prefix for a in enlarged} == set(augment.NEAR)
    assert _within(sum(a.prefix == augment.NEAR[0] for a in enlarged), len(enlarged), 0.5)


def test_same_seed_same_draws():
    a = [augment.draw(torch.Generator().manual_seed(5), 512) for _ in range(3)]
    b = [augment.draw(torch.Generator().manual_seed(5), 512) for _ in range(3)]
    assert a == b


@pytest.mark.parametrize("seed", range(40))
def test_shrunk_image_is_pasted_on_grey_and_the_mask_covers_only_the_paste(seed):
    size = 128
    generator = torch.Generator().manual_seed(seed)
    aug = augment.draw(generator, size)
    colour = torch.tensor([0.9, 0.2, 0.1])
    image = colour.expand(size, size, 3).clone()
    out, mask = augment.apply(image, aug)
    assert out.shape == (size, size, 3) and mask.shape == (size // 8, size // 8)
    if not aug.shrunk:
        assert torch.allclose(out, image, atol=1e-6)  # a crop of a flat image is the flat image
        assert bool((mask == 1).all())
        return
    inside = torch.zeros(size, size, dtype=torch.bool)
    inside[aug.top : aug.top + aug.scale, aug.left : aug.left + aug.scale] = True
    assert torch.allclose(out[inside], colour.expand(int(inside.sum()), 3), atol=1e-6)
    assert bool((out[~inside] == 0.5).all())
    # Every latent pixel the loss sees covers pasted pixels only, and none touches the
    # paste's border; the loss sees something whenever the paste spans 5 latent pixels.
    for i, j in torch.nonzero(mask).tolist():
        assert bool(inside[8 * i : 8 * i + 8, 8 * j : 8 * j + 8].all())
        assert 8 * i > aug.top and 8 * (i + 1) < aug.top + aug.scale
        assert 8 * j > aug.left and 8 * (j + 1) < aug.left + aug.scale
    if aug.scale >= 5 * 8:
        assert int(mask.sum()) > 0
    assert set(mask.unique().tolist()) <= {0.0, 1.0}


def test_enlarged_image_is_a_crop_of_the_zoomed_image():
    size = 64
    aug = augment.Augmentation(size, scale=80, top=7, left=11, prefix="zoomed in ")
    ramp = (torch.arange(size, dtype=torch.float32) + 0.5) / size  # value = horizontal position
    image = ramp[None, :, None].expand(size, size, 3).clone()
    out, mask = augment.apply(image, aug)
    # Pixel x of the crop shows the source position (x + left + 0.5) · S / scale.
    expected = ((torch.arange(size) + aug.left + 0.5) * size / aug.scale) / size
    interior = slice(2, size - 2)
    assert torch.allclose(out[10, interior, 0], expected[interior], atol=1.5 / size)
    assert bool((mask == 1).all())


def test_augmentation_refuses_a_size_it_cannot_mask():
    with pytest.raises(ValueError, match="multiple of 8"):
        augment.draw(torch.Generator(), 100)


# ----------------------------------------------------------------------------------
# Closed-form merge against the KKT system solved directly


def _kkt_reference(w0, reg, c, v):
    """Row by row: minimise (w − w0)ᵀ R (w − w0) s.t. C w = v, via the (d + s) KKT system."""
    r = reg.T @ reg
    d, s = r.shape[0], c.shape[0]
    kkt = torch.zeros(d + s, d + s, dtype=torch.float64)
    kkt[:d, :d] = r
    kkt[:d, d:] = c.T
    kkt[d:, :d] = c
    rows = []
    for i in range(w0.shape[0]):
        rhs = torch.cat([r @ w0[i], v[i]])
        rows.append(torch.linalg.solve(kkt, rhs)[:d])
    return torch.stack(rows)


def _problem(seed=0, d=16, o=12, n=200, s=5):
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(o, d, generator=g, dtype=torch.float64)
    reg = torch.randn(n, d, generator=g, dtype=torch.float64)
    c = torch.randn(s, d, generator=g, dtype=torch.float64)
    v = (w0 + 0.3 * torch.randn(o, d, generator=g, dtype=torch.float64)) @ c.T  # a fine-tuned weight's outputs
    return w0, reg, c, v


def test_merge_equals_the_kkt_solution_and_meets_the_constraints():
    w0, reg, c, v = _problem()
    system = merge.build_system(reg, c)
    result = merge.merge_layer(system, w0, v)
    reference = _kkt_reference(w0, reg, c, v)
    assert torch.allclose(result.weight, reference, rtol=0, atol=1e-8 * float(reference.abs().max()))
    assert not system.singular and system.rank == 5 and system.regularization_rank == 16
    assert result.target_residual < 1e-10
    assert float(torch.linalg.norm(result.weight @ c.T - v) / torch.linalg.norm(v)) == pytest.approx(result.target_residual, abs=1e-12)
    change = torch.linalg.norm((result.weight - w0) @ reg.T) / torch.linalg.norm(w0 @ reg.T)
    assert result.regularization_change == pytest.approx(float(change), rel=1e-9)
    # Any other weight meeting the constraints moves the regularisation outputs more.
    g = torch.Generator().manual_seed(1)
    null = torch.linalg.svd(c, full_matrices=True).Vh[c.shape[0] :]  # directions with C z = 0
    other = result.weight + 0.01 * torch.randn(w0.shape[0], null.shape[0], generator=g, dtype=torch.float64) @ null
    assert torch.allclose(other @ c.T, v, atol=1e-9)
    assert torch.linalg.norm((other - w0) @ reg.T) > torch.linalg.norm((result.weight - w0) @ reg.T)


def test_a_short_caption_list_still_meets_the_constraints():
    w0, reg, c, v = _problem(seed=2)
    system = merge.build_system(reg[:3], c)  # 3 feature rows span 3 of 16 directions
    assert system.regularization_rank == 3
    result = merge.merge_layer(system, w0, v)
    assert result.target_residual < 1e-9
    assert result.regularization_change >= 0


def test_dependent_targets_fall_back_to_least_squares():
    w0, reg, c, v = _problem(seed=3)
    c2 = torch.cat([c, c[1:2]])  # the same features claimed by a second concept …
    v2 = torch.cat([v, v[:, 1:2] + 1.0], dim=1)  # … with other outputs: no W meets both
    system = merge.build_system(reg, c2)
    assert system.singular and system.rank == 5
    result = merge.merge_layer(system, w0, v2)
    got = result.weight @ c2.T
    assert torch.allclose(got[:, [0, 2, 3, 4]], v2[:, [0, 2, 3, 4]], atol=1e-8)  # the independent ones exactly
    assert torch.allclose(got[:, 1], v[:, 1] + 0.5, atol=1e-8)  # the conflict: the least-squares middle
    assert torch.allclose(got[:, 5], v[:, 1] + 0.5, atol=1e-8)
    expected = math.sqrt(2 * 0.5**2 * w0.shape[0]) / float(torch.linalg.norm(v2))
    assert result.target_residual == pytest.approx(expected, rel=1e-6)


def test_merge_refuses_empty_inputs():
    w0, reg, c, v = _problem()
    with pytest.raises(ValueError, match="regularisation caption"):
        merge.build_system(reg[:0], c)
    with pytest.raises(ValueError, match="target"):
        merge.build_system(reg, c[:0])
    with pytest.raises(ValueError, match="outputs of shape"):
        merge.merge_layer(merge.build_system(reg, c), w0, v[:, :2])
