"""Faults inside training, cache freshness and determinism, in ComfyUI's executor.

* An exception raised inside a training step (injected into the loss) reaches the
  caller; afterwards every trainable tensor and the trainer are freed (weak references
  die), the input model's weights, patches and object patches are bit-identical, and
  training the same model again gives the same shift as a fresh model does.
* The decomposition cache never serves a stale entry: after applying a shift to one
  checkpoint, the same shift on another checkpoint of the same architecture, and on
  the first one after a LoRA was merged into its weights in place, matches a float64
  SVD of the weights as they are now.
* Same seed on CPU: the training node saves bit-identical shifts and sampling with
  them gives bit-identical latents.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from safetensors.torch import load_file

from comfyui_svdiff.svdiff.comfy.patching import apply_shift
from comfyui_svdiff.svdiff.fileformat import read_shift
from comfyui_svdiff.svdiff.training.config import TrainConfig
from integration.helpers import (
    assert_weights_close,
    base_state,
    expected_state,
    ksampler,
    patched_state_dict,
    random_shift,
    train_prompt,
    train_tiny,
    write_image_folder,
)

pytestmark = pytest.mark.integration


# ----------------------------------------------------------------------------------
# An exception inside a training step


def _state(patcher):
    return {k: list(v) for k, v in patcher.patches.items()}, dict(patcher.object_patches)


def _inject_fault(monkeypatch, at_call: int = 3) -> list[weakref.ref]:
    """Make the loss raise on its ``at_call``-th call; return weak references to every
    trainer created afterwards and to its trainable tensors."""
    from comfyui_svdiff.svdiff.comfy.training import loss, run

    alive: list[weakref.ref] = []

    class RecordingTrainer(run.Trainer):
        def __post_init__(self):
            super().__post_init__()
            alive.append(weakref.ref(self))
            alive.extend(weakref.ref(p) for p in self.parameters)

    calls = {"n": 0}
    real_mse = loss.native_mse

    def failing_mse(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at_call:
            raise RuntimeError(f"injected fault in training step {at_call}")
        return real_mse(*args, **kwargs)

    monkeypatch.setattr(run, "Trainer", RecordingTrainer)
    monkeypatch.setattr(loss, "native_mse", failing_mse)
    return alive


def test_an_exception_in_a_training_step_frees_memory_and_leaves_the_model_as_it_was(build, monkeypatch):
    from comfyui_svdiff.svdiff.comfy.training import loss

    model, clip = build("SD15")
    weights = base_state(model)
    patches = _state(model)
    real_mse = loss.native_mse
    alive = _inject_fault(monkeypatch)
    config = TrainConfig(steps=10, lr_spectral=1e-2, prior_weight=0.0, seed=3)
    with pytest.raises(RuntimeError, match="injected fault in training step 3"):
        train_tiny(model, clip, config)
    gc.collect()
    assert len(alive) > 10, "the trainer was not created"
    assert [r for r in alive if r() is not None] == [], "trainable tensors outlived the failed training"

    # The model is as it was: weights bit-identical, no patch or object patch added.
    assert _state(model) == patches
    for module in model.model.modules():  # no layer wrapper or weight wrapper left on the shared modules
        # (ComfyUI's unpatch may leave the module's own bound forward as an instance attribute)
        forward = vars(module).get("forward")
        assert forward is None or (getattr(forward, "__self__", None) is module and forward.__func__ is type(module).forward), module
        assert not getattr(module, "weight_function", None), module
    for key, value in model.model.state_dict().items():
        assert torch.equal(value, weights[key]), key

    # ...and trains again exactly like a model that never failed.
    monkeypatch.setattr(loss, "native_mse", real_mse)
    short = TrainConfig(steps=2, lr_spectral=1e-2, prior_weight=0.0, seed=3)
    again = train_tiny(model, clip, short).shift
    fresh_model, fresh_clip = build("SD15")
    fresh = train_tiny(fresh_model, fresh_clip, short).shift
    assert again.tensors.keys() == fresh.tensors.keys()
    assert all(torch.equal(again.tensors[k], fresh.tensors[k]) for k in again.tensors)


def test_a_training_node_that_fails_reports_it_frees_memory_and_saves_nothing(comfy_handle, tiny_checkpoint, train_folder, monkeypatch):
    from comfyui_svdiff.svdiff.comfy import loss_stream

    monkeypatch.setattr(loss_stream, "prompt_server", lambda: comfy_handle.server)
    alive = _inject_fault(monkeypatch)
    prompt = train_prompt(
        tiny_checkpoint, train_folder, steps=10, prior_weight=0.0, num_class_images=0, save_every=0, preview_every=0,
        filename_prefix="faults/failing",
    )  # fmt: skip
    result = comfy_handle.run_prompt(prompt, fresh_executor=True, timeout=600)
    assert not result.success and result.error_node_type == "SVDiffTrain"
    assert "injected fault in training step 3" in result.exception_message
    gc.collect()
    assert len(alive) > 1 and [r for r in alive if r() is not None] == []  # the trainer and its tensors
    assert not list((comfy_handle.model_dir("spectral_shifts") / "faults").glob("failing*"))


# ----------------------------------------------------------------------------------
# The decomposition cache after the base weights change


def _applies_exactly(model, shift) -> None:
    base = base_state(model)
    new_model, _, report = apply_shift(model, None, shift, 1.0, 0.0)
    got = patched_state_dict(new_model)
    assert_weights_close(got, expected_state(base, "diffusion_model.", [(shift, 1.0)]), base)
    return report


def test_the_decomposition_cache_never_serves_a_stale_entry(build):
    from comfyui_svdiff.svdiff.cache import default_cache

    model_a, _ = build("SD15", seed=0)
    shift = random_shift(model_a, None, seed=4, clamp_some=False, scale=0.05)
    spectral = sum(1 for k in shift.tensors if k.endswith(".delta"))
    _applies_exactly(model_a, shift)
    again = _applies_exactly(model_a, shift)
    assert again.decomposed == 0  # unchanged weights: every decomposition from the cache

    # Another checkpoint of the same architecture (a seed no other test builds): every
    # weight decomposed afresh.
    model_b, _ = build("SD15", seed=4242)
    assert _applies_exactly(model_b, shift).decomposed == spectral

    # A LoRA merged into model A in place (same storage, as ComfyUI's patch_model writes it).
    g = torch.Generator().manual_seed(9)
    merged = 0
    with torch.no_grad():
        for key, weight in model_a.model.state_dict().items():
            stem = key[: -len(".weight")] if key.endswith(".weight") else None
            if stem is None or f"{stem}.delta" not in shift.tensors:
                continue
            rows, cols = weight.shape[0], weight[0].numel()
            up, down = torch.randn(rows, 2, generator=g), torch.randn(2, cols, generator=g)
            weight.add_((0.05 * up @ down).reshape(weight.shape).to(weight.dtype))
            merged += 1
    assert merged == spectral
    before = default_cache().stats["computed"]
    assert _applies_exactly(model_a, shift).decomposed == spectral
    assert default_cache().stats["computed"] - before == spectral


# ----------------------------------------------------------------------------------
# Determinism through the nodes


@pytest.fixture(scope="module")
def train_folder(comfy_handle):
    write_image_folder(comfy_handle.input_dir / "svdiff_determinism", seed=3)
    return "svdiff_determinism"


def _train_and_sample(comfy_handle, ckpt, folder, seed, prefix):
    prompt = train_prompt(
        ckpt, folder, steps=3, seed=seed, prior_weight=0.0, num_class_images=0, save_every=0, preview_every=0, filename_prefix=prefix
    )
    prompt["4"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["3", 1], "text": "photo of a sks dog"}}
    prompt["5"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    prompt["6"] = ksampler(["3", 0], ["4", 0], ["4", 0], ["5", 0], seed=seed, steps=2, cfg=1.0)
    prompt["7"] = {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": prefix}}
    result = comfy_handle.run_prompt(prompt, fresh_executor=True, timeout=900)
    assert result.success, result.error_message
    (latent,) = [p for p in result.output_files() if p.suffix == ".latent"]
    shift = read_shift(comfy_handle.model_dir("spectral_shifts") / f"{prefix}.safetensors")
    return shift, load_file(str(latent))["latent_tensor"]


def test_same_seed_gives_bit_identical_shifts_and_images(comfy_handle, tiny_checkpoint, train_folder, monkeypatch):
    from comfyui_svdiff.svdiff.comfy import loss_stream

    monkeypatch.setattr(loss_stream, "prompt_server", lambda: comfy_handle.server)
    shift_1, image_1 = _train_and_sample(comfy_handle, tiny_checkpoint, train_folder, 7, "determinism/one")
    shift_2, image_2 = _train_and_sample(comfy_handle, tiny_checkpoint, train_folder, 7, "determinism/two")
    assert shift_1.tensors.keys() == shift_2.tensors.keys()
    assert all(torch.equal(shift_1.tensors[k], shift_2.tensors[k]) for k in shift_1.tensors)
    assert torch.equal(image_1, image_2)
    shift_3, image_3 = _train_and_sample(comfy_handle, tiny_checkpoint, train_folder, 8, "determinism/three")
    assert any(not torch.equal(shift_1.tensors[k], shift_3.tensors[k]) for k in shift_1.tensors)
    assert not torch.equal(image_1, image_3)
