"""Training pieces that need no ComfyUI: options, the loop, layer subsets, datasets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_svdiff.svdiff.training import data
from comfyui_svdiff.svdiff.training.config import TrainConfig, learning_rate_factor
from comfyui_svdiff.svdiff.training.loop import Trainer, step_generator
from comfyui_svdiff.svdiff.training.subsets import SUBSETS, select_parameters

# ----------------------------------------------------------------------------------
# Options


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"steps": 0}, "steps is 0"),
        ({"lr_spectral": 0.0}, "lr_spectral is 0.0; learning rates must be positive"),
        ({"lr_1d": -1e-6}, "lr_1d is -1e-06"),
        ({"lr_text": float("nan")}, "lr_text is nan"),
        ({"batch_size": 0}, "batch_size is 0"),
        ({"optimizer": "Lion"}, "optimizer 'Lion' is not supported"),
        ({"prior_weight": -1.0}, "prior_weight is -1.0"),
        ({"rank": -2}, "rank is -2"),
        ({"subset": "UNet-XL"}, "subset 'UNet-XL' is unknown"),
        ({"subset": "custom patterns only", "patterns": " "}, "name_patterns is empty"),
    ],
)
def test_bad_options_are_refused_with_the_input_named(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TrainConfig(**kwargs)


def test_warmup_is_linear_then_constant():
    assert [learning_rate_factor(s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert learning_rate_factor(0, 0) == 1.0


# ----------------------------------------------------------------------------------
# The loop, on a quadratic whose optimum is known


def _quadratic_trainer(config, target):
    x = torch.nn.Parameter(torch.zeros(3))
    y = torch.nn.Parameter(torch.zeros(2))

    def loss_fn(step, micro, generator):
        noise = 0.0 * torch.randn(1, generator=generator)
        return ((x - target) ** 2).sum() + ((y - 1.0) ** 2).sum() + noise.sum()

    return Trainer(config, {"spectral": [x], "1d": [y], "text": []}, loss_fn), x, y


def test_loop_optimises_each_group_with_its_learning_rate():
    target = torch.tensor([1.0, -2.0, 0.5])
    config = TrainConfig(steps=400, lr_spectral=5e-2, lr_1d=1e-6, max_grad_norm=0, prior_weight=0)
    trainer, x, y = _quadratic_trainer(config, target)
    trainer.run()
    torch.testing.assert_close(x.detach(), target, rtol=0, atol=1e-2)
    assert float(y.detach().abs().max()) < 1e-3  # lr 1e-6 barely moves
    assert trainer.step == 400 and len(trainer.losses) == 400 and trainer.losses[-1] < trainer.losses[0]


def test_accumulation_averages_micro_batches_and_clipping_bounds_the_step():
    calls = []
    p = torch.nn.Parameter(torch.zeros(1))

    def loss_fn(step, micro, generator):
        calls.append((step, micro))
        return (p - 10.0 * (micro + 1)).pow(2).sum()

    config = TrainConfig(steps=1, grad_accumulation=2, lr_spectral=1.0, optimizer="Adam", max_grad_norm=0.5, prior_weight=0)
    trainer = Trainer(config, {"spectral": [p], "1d": [], "text": []}, loss_fn)
    captured = {}
    original_step = trainer.optimizer.step

    def capture(*args, **kwargs):
        captured["grad"] = p.grad.clone()
        return original_step(*args, **kwargs)

    trainer.optimizer.step = capture
    trainer.run()
    assert calls == [(0, 0), (0, 1)]
    # mean gradient of (p−10)² and (p−20)² at 0 is −30; clipped to norm 0.5
    torch.testing.assert_close(captured["grad"], torch.tensor([-0.5]))
    assert trainer.losses[0] == pytest.approx((100 + 400) / 2)


def test_non_finite_loss_stops_with_a_clear_message():
    p = torch.nn.Parameter(torch.zeros(1))
    trainer = Trainer(TrainConfig(steps=3, prior_weight=0), {"spectral": [p], "1d": [], "text": []}, lambda s, m, g: p.sum() * float("nan"))
    with pytest.raises(FloatingPointError, match="lower the learning rates"):
        trainer.run()


def test_step_streams_are_reproducible_and_distinct():
    a = torch.randn(4, generator=step_generator(7, 3, 0))
    assert torch.equal(a, torch.randn(4, generator=step_generator(7, 3, 0)))
    assert not torch.equal(a, torch.randn(4, generator=step_generator(7, 4, 0)))
    assert not torch.equal(a, torch.randn(4, generator=step_generator(7, 3, 1)))


def test_resume_from_the_state_equals_the_uninterrupted_run_bit_for_bit():
    """3 steps, state saved, a fresh trainer from the fp16-rounded values + state, 2 more == 5 straight."""
    target = torch.tensor([1.0, -2.0, 0.5])
    config = TrainConfig(steps=5, lr_spectral=1e-1, lr_1d=1e-2, prior_weight=0, seed=3)
    straight, xs, ys = _quadratic_trainer(config, target)
    straight.run()
    first, x, y = _quadratic_trainer(config, target)
    first.run(until=3)
    state = first.state_tensors({id(x): "x", id(y): "y"})
    assert {"x.value", "x.exp_avg", "x.exp_avg_sq", "x.step", "y.value", "y.exp_avg"} <= set(state)
    resumed, x2, y2 = _quadratic_trainer(config, target)
    with torch.no_grad():  # what an fp16 shift file holds
        x2.copy_(x.half().float())
        y2.copy_(y.half().float())
    assert not torch.equal(x2, x)  # the rounding matters here
    resumed.step = 3
    assert resumed.load_state_tensors(state, {id(x2): "x", id(y2): "y"}) == (2, 2)
    resumed.run()
    assert torch.equal(x2, xs) and torch.equal(y2, ys)
    # Without the float32 values, the rounded start shows in the result.
    rounded, x3, y3 = _quadratic_trainer(config, target)
    with torch.no_grad():
        x3.copy_(x.half().float())
    rounded.step = 3
    rounded.load_state_tensors({k: v for k, v in state.items() if not k.endswith(".value")}, {id(x3): "x", id(y3): "y"})
    rounded.run()
    assert not torch.equal(x3, xs)


# ----------------------------------------------------------------------------------
# Subsets (paper Table 1) on the layout of an SD1.5 UNet


def _sd15_like_shapes():
    shapes = {}
    for block, channels in [("input_blocks.1", 320), ("middle_block", 1280), ("output_blocks.11", 320)]:
        p = f"diffusion_model.{block}.1.transformer_blocks.0"
        for attn in ("attn1", "attn2"):
            shapes[f"{p}.{attn}.to_q.weight"] = (channels, channels)
            shapes[f"{p}.{attn}.to_k.weight"] = (channels, 768 if attn == "attn2" else channels)
            shapes[f"{p}.{attn}.to_v.weight"] = (channels, 768 if attn == "attn2" else channels)
            shapes[f"{p}.{attn}.to_out.0.weight"] = (channels, channels)
            shapes[f"{p}.{attn}.to_out.0.bias"] = (channels,)
        shapes[f"{p}.norm2.weight"] = (channels,)
        shapes[f"diffusion_model.{block}.0.in_layers.2.weight"] = (channels, channels, 3, 3)
        shapes[f"diffusion_model.{block}.0.in_layers.0.weight"] = (channels,)
    shapes["diffusion_model.time_embed.0.weight"] = (1280, 320)
    shapes["diffusion_model.out.2.weight"] = (4, 320, 3, 3)
    return shapes


def test_table_1_subsets():
    shapes = _sd15_like_shapes()
    pick = lambda subset: select_parameters(shapes, subset)  # noqa: E731
    assert len(SUBSETS) == 12
    assert all(k.endswith(".weight") for k in pick("UNet")) and len(pick("UNet")) == len([k for k in shapes if k.endswith(".weight")])
    assert pick("UNet-CA-KV") == sorted(k for k in shapes if ".attn2.to_k." in k or ".attn2.to_v." in k)
    assert all(".attn2." in k and len(shapes[k]) == 2 for k in pick("UNet-CA")) and len(pick("UNet-CA")) == 12
    assert all(len(shapes[k]) == 1 for k in pick("UNet-1D")) and all(len(shapes[k]) == 4 for k in pick("UNet-4D"))
    assert all(len(shapes[k]) == 2 for k in pick("UNet-2D"))
    assert all(".output_blocks." in k for k in pick("Up-Blocks")) and all(".input_blocks." in k for k in pick("Down-Blocks"))
    assert all(".middle_block." in k for k in pick("Mid-Block"))
    assert pick("Mid-CA") == sorted(k for k in shapes if ".middle_block." in k and ".attn2." in k and k.endswith(".weight"))
    assert all(".output_blocks." in k and ".attn2." in k for k in pick("Up-CA"))
    assert all(".input_blocks." in k and ".attn2." in k for k in pick("Down-CA"))
    # patterns add layers (biases only when named); "custom patterns only" uses nothing else
    assert "diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_out.0.bias" in select_parameters(
        shapes, "UNet-CA", "to_out.0.bias"
    )
    assert select_parameters(shapes, "custom patterns only", "time_embed") == ["diffusion_model.time_embed.0.weight"]
    with pytest.raises(ValueError, match="unknown layer subset"):
        select_parameters(shapes, "Everything")


# ----------------------------------------------------------------------------------
# Datasets


def _save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_folder_with_captions_repeats_and_odd_images(tmp_path):
    rng = np.random.default_rng(0)
    _save(tmp_path / "10_sks dog" / "a.png", rng.integers(0, 255, (80, 120, 3), dtype=np.uint8))
    (tmp_path / "10_sks dog" / "a.txt").write_text("photo of a sks dog on grass\n")
    _save(tmp_path / "10_sks dog" / "b.png", rng.integers(0, 255, (96, 64), dtype=np.uint8))  # grayscale (mode L)
    rgba = rng.integers(0, 255, (64, 64, 4), dtype=np.uint8)
    rgba[..., 3] = 0  # fully transparent: must become white
    _save(tmp_path / "c.png", rgba)
    sixteen = rng.integers(0, 65535, (70, 70)).astype(np.uint16)
    image16 = Image.fromarray(sixteen)
    assert image16.mode.startswith("I;16")
    image16.save(tmp_path / "d.png")
    dataset = data.load_folder(tmp_path, 64, default_caption="photo of a sks dog", trigger="sks")
    by_source = {item.source: item for item in dataset.items}
    assert by_source["10_sks dog/a.png"].caption == "photo of a sks dog on grass" and by_source["10_sks dog/a.png"].repeats == 10
    assert by_source["10_sks dog/b.png"].caption == "sks dog" and by_source["10_sks dog/b.png"].repeats == 10
    assert by_source["c.png"].caption == "photo of a sks dog" and by_source["c.png"].repeats == 1
    assert len(dataset.expanded()) == 22
    for item in dataset.items:
        assert item.image.shape == (64, 64, 3) and item.image.dtype == torch.float32
        assert 0.0 <= float(item.image.min()) and float(item.image.max()) <= 1.0
    assert torch.equal(by_source["c.png"].image, torch.ones(64, 64, 3))
    gray = by_source["10_sks dog/b.png"].image
    assert torch.equal(gray[..., 0], gray[..., 1]) and torch.equal(gray[..., 1], gray[..., 2])


def test_center_crop_keeps_the_middle(tmp_path):
    array = np.zeros((64, 192, 3), dtype=np.uint8)
    array[:, 64:128] = 255  # a white square in the middle of a wide image
    _save(tmp_path / "wide.png", array)
    (tmp_path / "wide.txt").write_text("x")
    (item,) = data.load_folder(tmp_path, 64).items
    assert float(item.image.mean()) > 0.99


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: _save(p / "tiny.png", np.zeros((1, 1, 3), np.uint8)), "is 1×1; training needs at least 64 px"),
        (lambda p: (p / "broken.png").write_bytes(b"not an image"), "cannot be read"),
        (lambda p: None, "contains no images"),
        (lambda p: _save(p / "nocap.png", np.zeros((64, 64, 3), np.uint8)), "has no caption"),
    ],
)
def test_bad_folders(tmp_path, make, message):
    make(tmp_path)
    default = "" if "caption" in message else "photo of a sks dog"
    with pytest.raises(ValueError, match=message):
        data.load_folder(tmp_path, 64, default_caption=default)


def test_trigger_word_and_caption_counts_are_checked():
    images = torch.rand(2, 64, 64, 3)
    with pytest.raises(ValueError, match="do not contain the trigger word 'sks'"):
        data.from_images(images, ["photo of a dog"], 64, trigger="sks")
    with pytest.raises(ValueError, match="3 captions for 2 images"):
        data.from_images(images, ["a", "b", "c"], 64)
    with pytest.raises(ValueError, match="resolution is 100"):
        data.from_images(images, ["a"], 100)
    rgba = torch.rand(1, 80, 64, 4)
    dataset = data.from_images(rgba, ["photo of a sks dog"], 64, trigger="sks")
    assert dataset.items[0].image.shape == (64, 64, 3)
    with pytest.raises(ValueError, match="is 1×1"):
        data.from_images(torch.rand(1, 1, 1, 3), ["a"], 64)
