"""Cut-Mix-Unmix collages, sampling plan and the attention regularisers (no ComfyUI)."""

from __future__ import annotations

import math

import pytest
import torch

from comfyui_svdiff.svdiff.training import attention as am
from comfyui_svdiff.svdiff.training import cutmix

R = 64


def solid(value: float, size: int = R) -> torch.Tensor:
    """A square image whose pixel (y, x) encodes its own coordinates, offset by ``value``."""
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return torch.stack([ys.float() / size, xs.float() / size, torch.full((size, size), value)], dim=-1)


def subjects(n=2, with_class=False):
    words = [("sks", "dog"), ("zwx", "sculpture"), ("qrt", "cat")]
    out = []
    for i in range(n):
        token, noun = words[i]
        s = cutmix.Subject(
            f"subject {i + 1}", [solid(0.3 * i + 0.05 * k) for k in range(3)], [f"photo of a {token} {noun}"] * 3, f"{token} {noun}", token
        )
        if with_class:
            s.class_images = [solid(0.5 + 0.1 * i)]
            s.class_captions = [f"photo of a {noun}"]
        out.append(s)
    return out


@pytest.mark.parametrize("layout", cutmix.LAYOUTS)
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.7])
def test_collage_geometry_masks_and_pieces_are_exact(layout, ratio):
    a, b = solid(0.0), solid(1.0)
    cut = cutmix.snapped_cut(R, ratio)
    assert cut % 8 == 0 and abs(cut - R * ratio) <= 4
    image = cutmix.compose(a, b, layout, cut)
    masks = cutmix.region_masks(R, layout, cut)
    assert image.shape == (R, R, 3)
    assert torch.equal(masks.sum(0), torch.ones(R, R)) and masks[0].sum() == cut * R
    # Region i shows only subject i, and its pixels are the centre crop of the original.
    assert torch.equal(image[..., 2][masks[0] > 0], torch.zeros(cut * R))
    assert torch.equal(image[..., 2][masks[1] > 0], torch.ones((R - cut) * R))
    if layout == "left_right":
        offset_a, offset_b = (R - cut) // 2, cut // 2
        assert torch.equal(image[:, :cut], a[:, offset_a : offset_a + cut])
        assert torch.equal(image[:, cut:], b[:, offset_b : offset_b + R - cut])
        assert torch.equal(masks[0][:, :cut], torch.ones(R, cut))
    else:
        offset_a, offset_b = (R - cut) // 2, cut // 2
        assert torch.equal(image[:cut], a[offset_a : offset_a + cut])
        assert torch.equal(image[cut:], b[offset_b : offset_b + R - cut])
        assert torch.equal(masks[0][:cut], torch.ones(cut, R))


def test_captions_follow_the_layout_and_name_both_subjects():
    data = cutmix.build_dataset(subjects(), R, 200, 0.6, layout="both", ratio_range=(0.3, 0.7), seed=3)
    seen_layouts, seen_cuts, seen_orders = set(), set(), set()
    for c in data.collages:
        first, second = (data.subjects[i].phrase for i in c.subjects)
        assert c.subjects[0] != c.subjects[1]
        if "on the left" in c.caption:
            assert c.layout == "left_right" and c.caption == f"photo of a {first} on the left and a {second} on the right"
        elif "on the top" in c.caption:
            assert c.layout == "up_down" and c.caption == f"photo of a {first} on the top and a {second} on the bottom"
        else:
            assert c.caption in (f"photo of a {first} and a {second}", f"photo of a {second} and a {first}")
            seen_orders.add(c.caption.index(first) < c.caption.index(second))
        # Each subject's mask covers exactly the pixels that came from its images.
        for subject, mask in zip(c.subjects, c.masks, strict=True):  # subject i's pixels carry 0.3·i … 0.3·i + 0.1
            own = c.image[..., 2][mask > 0]
            assert bool(((own >= 0.3 * subject - 1e-6) & (own <= 0.3 * subject + 0.1 + 1e-6)).all())
        seen_layouts.add(c.layout)
        seen_cuts.add(c.cut)
        assert 0.3 * R - 4 <= c.cut <= 0.7 * R + 4
    assert seen_layouts == {"left_right", "up_down"} and len(seen_cuts) > 2 and seen_orders == {True, False}


def test_prior_collages_share_each_collage_plan_with_class_phrases():
    data = cutmix.build_dataset(subjects(with_class=True), R, 20, 0.6, layout="left_right", seed=1)
    assert len(data.prior_collages) == len(data.collages)
    for c, p in zip(data.collages, data.prior_collages, strict=True):
        assert (p.layout, p.cut, p.subjects) == (c.layout, c.cut, c.subjects)
        assert torch.equal(p.masks, c.masks)
        expected = c.caption
        for s in data.subjects:
            expected = expected.replace(s.phrase, s.class_phrase)
        assert p.caption == expected and "sks" not in p.caption


def test_the_collage_probability_is_honoured_and_subjects_are_drawn_uniformly():
    n, p = 20000, 0.6
    g = torch.Generator().manual_seed(0)
    draws = cutmix.draw_kinds(n, p, 3, 10, g)
    collages = sum(d.kind == "collage" for d in draws)
    assert abs(collages / n - p) < 4 * math.sqrt(p * (1 - p) / n)  # 4 standard deviations
    singles = [d.index for d in draws if d.kind == "single"]
    for s in range(3):
        share = singles.count(s) / len(singles)
        assert abs(share - 1 / 3) < 4 * math.sqrt((1 / 3) * (2 / 3) / len(singles))
    assert all(d.kind == "single" for d in cutmix.draw_kinds(100, 0.0, 3, 10, g))
    assert all(d.kind == "collage" for d in cutmix.draw_kinds(100, 1.0, 3, 10, g))


def test_two_subjects_are_drawn_without_replacement_and_every_pair_occurs():
    data = cutmix.build_dataset(subjects(3), R, 300, 0.6, seed=0)
    pairs = {tuple(sorted(c.subjects)) for c in data.collages}
    assert pairs == {(0, 1), (0, 2), (1, 2)}


def test_plan_pairs_each_collage_with_its_prior_collage():
    single = [[0, 1], [2, 3]]
    collage_rows = [4, 5, 6]
    plan = cutmix.multi_subject_plan(0.5, single, collage_rows, [[10], [11]], [20, 21, 22])
    g = torch.Generator().manual_seed(1)
    for _ in range(200):
        instance, prior = plan(g, 2)
        for i, q in zip(instance, prior, strict=True):
            if i in collage_rows:
                assert q == 20 + collage_rows.index(i)
            else:
                assert q == (10 if i in single[0] else 11)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s[:1], "at least two subjects"),
        (lambda s: [s[0], cutmix.Subject("subject 2", [], [], "zwx sculpture", "zwx")], "subject 2 has no images"),
        (
            lambda s: [s[0], cutmix.Subject("subject 2", [solid(0, 128)], ["zwx x"], "zwx sculpture", "zwx")],
            "give every dataset node the same resolution",
        ),
        (
            lambda s: [s[0], cutmix.Subject("subject 2", [solid(0)], ["photo of a sculpture"], "zwx sculpture", "zwx")],
            "does not contain its trigger word 'zwx'",
        ),
        (lambda s: [s[0], cutmix.Subject("subject 2", [solid(0)], ["zwx"], "a sculpture", "zwx")], "does not contain its trigger word"),
        (lambda s: [s[0], cutmix.Subject("subject 2", [solid(0)], ["zwx"], "zwx", "zwx")], "has no class word"),
        (lambda s: [s[0], cutmix.Subject("subject 2", [solid(0)], ["sks"], "sks cat", "sks")], "share the trigger word 'sks'"),
        (lambda s: [s[0], cutmix.Subject("subject 2", [solid(0)], ["x"], "zwx cat", "")], "has no special token"),
    ],
)
def test_bad_subjects_are_named(change, message):
    with pytest.raises(ValueError, match=message):
        cutmix.build_dataset(change(subjects()), R, 4, 0.6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"probability": 1.5}, "between 0 and 1"),
        ({"probability": -0.1}, "between 0 and 1"),
        ({"ratio_range": (0.6, 0.4)}, "split ratio"),
        ({"templates": "photo of {left} and {b}"}, "line 1"),
        ({"templates": "photo of a {left} and a {right}", "layout": "up_down"}, "no prompt template fits the up_down layout"),
        ({"templates": "   "}, "prompt_templates is empty"),
        ({"layout": "diagonal"}, "layout 'diagonal'"),
    ],
)
def test_bad_settings_are_named(kwargs, message):
    settings = {"probability": 0.6, **kwargs}
    with pytest.raises(ValueError, match=message):
        cutmix.build_dataset(subjects(), R, 4, **settings)


def test_class_images_for_some_subjects_only_are_refused():
    s = subjects(with_class=True)
    s[1].class_images = []
    with pytest.raises(ValueError, match="subject 2 has no class images"):
        cutmix.build_dataset(s, R, 4, 0.6)


# ----------------------------------------------------------------------------------
# Attention maths


def test_attend_matches_a_float64_softmax_attention():
    g = torch.Generator().manual_seed(0)
    b, n, t, heads, d = 2, 6, 5, 3, 4
    q, k, v = (torch.randn(b, m, heads * d, generator=g) for m in (n, t, t))
    out, probs = am.attend(q, k, v, heads)
    ref_out = torch.zeros(b, n, heads * d, dtype=torch.float64)
    ref_probs = torch.zeros(b, n, t, dtype=torch.float64)
    for bi in range(b):
        for h in range(heads):
            qs, ks, vs = (x[bi, :, h * d : (h + 1) * d].double() for x in (q, k, v))
            p = torch.softmax(qs @ ks.T / math.sqrt(d), dim=-1)
            ref_out[bi, :, h * d : (h + 1) * d] = p @ vs
            ref_probs[bi] += p / heads
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(probs.double(), ref_probs, rtol=1e-5, atol=1e-6)


def test_unmix_loss_is_the_mean_squared_attention_outside_each_region():
    grid = (4, 4)
    g = torch.Generator().manual_seed(2)
    attn = torch.rand(16, 7, generator=g)
    masks = cutmix.region_masks(8, "left_right", 4)  # latent 8×8, pooled to 4×4
    regions = [([1, 2], masks[0]), ([4], masks[1])]
    got = am.unmix_loss(attn, grid, regions)
    a1 = (attn[:, 1] + attn[:, 2]).reshape(4, 4)
    a2 = attn[:, 4].reshape(4, 4)
    expected = ((a1[:, 2:] ** 2).sum() / 16 + (a2[:, :2] ** 2).sum() / 16) / 2
    torch.testing.assert_close(got, expected)


def test_pooled_mask_is_the_area_fraction_on_coarse_grids():
    mask = cutmix.region_masks(8, "left_right", 3)[0]  # 3 of 8 columns
    coarse = am.pooled(mask, (1, 2))
    torch.testing.assert_close(coarse, torch.tensor([[0.75, 0.0]]))


def test_subject_loss_is_eq_10_with_the_gradient_outside_the_class_mask_only():
    grid = (2, 3)
    attn = torch.tensor(
        [[0.1, 0.8], [0.2, 0.1], [0.3, 0.45], [0.4, 0.05], [0.5, 0.9], [0.6, 0.2]], requires_grad=True
    )  # column 0: special token, column 1: class word
    loss = am.subject_loss(attn, grid, [0], [1], threshold=0.5)
    mask = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0])  # class attention ≥ 0.45 = half its peak 0.9
    special = attn[:, 0].detach()
    expected = ((special - special * mask) ** 2).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    # d/dA^V of mean (A^V − sg(A^V M))² = 2/N · (A^V − A^V M): zero inside the mask, none on the class word
    torch.testing.assert_close(attn.grad[:, 0], 2 / 6 * (special - special * mask))
    assert torch.equal(attn.grad[:, 1], torch.zeros(6))


def test_token_positions_find_every_occurrence_of_a_multi_token_word():
    assert am.find_subsequence([49406, 5, 7, 8, 3, 7, 8, 49407], [7, 8]) == [2, 3, 5, 6]
    assert am.find_subsequence([1, 2, 3], [4]) == []
    assert am.find_subsequence([1, 2, 3], []) == []


def test_preview_grid_shows_every_collage_up_to_the_limit():
    data = cutmix.build_dataset(subjects(), R, 6, 0.6, seed=0)
    grid = cutmix.preview_grid(data.collages, columns=4)
    assert grid.size == (4 * R, 2 * (R + 28))
