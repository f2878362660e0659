"""Faults and concurrency through a real ComfyUI server.

* Cancelling from the UI (POST /interrupt) during training, during prior-image
  generation and during DDIM inversion: the prompt ends as interrupted, only complete
  files remain (training's ``<prefix>_cancelled`` snapshot, nothing from the other
  two), the shared checkpoint MODEL/CLIP give bit-identical results afterwards (no
  patch, wrapper or weight left behind) and the next prompt of the same kind runs.
* Prompts queued together on one cached base model with different shifts (and one
  prompt with two shifted branches) each get exactly the latent they get alone.
"""

from __future__ import annotations

import json
import time

import pytest
import torch
from safetensors.torch import load_file

from comfyui_svdiff.svdiff.fileformat import read_shift
from devtools.server import error_of
from integration.helpers import canary_latent, edit_prompt, noiseless_sampler, train_prompt, write_image_folder

pytestmark = pytest.mark.integration

TAG = "faults"


@pytest.fixture(scope="module")
def baseline(comfy_server, comfy_handle, tiny_checkpoint):
    import comfy.sd

    from comfyui_svdiff.svdiff.comfy.demo import write_demo_shift

    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(
        str(comfy_handle.model_dir("checkpoints") / tiny_checkpoint), output_vae=False, output_clipvision=False
    )
    folder = comfy_server.models("spectral_shifts")
    for name, seed in (("conc_a", 21), ("conc_b", 22)):
        write_demo_shift(folder / f"{name}.safetensors", model, clip, seed=seed)
    write_image_folder(comfy_server.input_dir / "faults_data", seed=1)
    return {"latent": canary_latent(comfy_server, tiny_checkpoint, 0, TAG), "next": [1]}


def _canary(server, ckpt, baseline) -> torch.Tensor:
    index = baseline["next"][-1]
    baseline["next"].append(index + 1)
    return canary_latent(server, ckpt, index, TAG)


def _interrupted(entry: dict) -> bool:
    return any(message == "execution_interrupted" for message, _ in entry.get("status", {}).get("messages", []))


def _cancel_after(server, prompt: dict, line: str, settle: float, timeout: float = 300.0) -> tuple[dict, str]:
    """Queue ``prompt``, wait until the server log shows ``line`` (the phase began),
    let it run ``settle`` seconds, press cancel; return the /history entry and the log
    written meanwhile."""
    start = len(server.log_path.read_text(errors="replace"))
    prompt_id = server.queue(prompt)
    deadline = time.monotonic() + timeout
    while line not in server.log_path.read_text(errors="replace")[start:]:
        assert time.monotonic() < deadline, f"'{line}' never appeared:\n{server.log_tail(3000)}"
        assert prompt_id not in server.get_json(f"/history/{prompt_id}"), f"the prompt ended before '{line}'"
        time.sleep(0.1)
    time.sleep(settle)
    assert server.running() == [prompt_id], "the phase ended before the cancel"
    server.interrupt()
    entry = server.wait(prompt_id, timeout=120)
    return entry, server.log_path.read_text(errors="replace")[start:]


def _temporaries(server) -> list:
    roots = [server.base_dir / "models", server.svdiff_cache]
    return [p for root in roots for p in root.rglob("*.tmp")]


def _train(ckpt, **overrides):
    defaults = {"prior_weight": 0.0, "num_class_images": 0, "save_every": 0, "preview_every": 0}
    return train_prompt(ckpt, "faults_data", **{**defaults, **overrides})


def test_cancel_during_training(comfy_server, tiny_checkpoint, baseline):
    server = comfy_server
    entry, log = _cancel_after(server, _train(tiny_checkpoint, steps=100000, filename_prefix="faults/long"), "SVDiff: training", 3.0)
    assert _interrupted(entry), entry["status"]
    assert "training cancelled at step" in log
    folder = server.models("spectral_shifts") / "faults"
    saved = read_shift(folder / "long_cancelled.safetensors")  # the snapshot is complete and valid
    assert (folder / "long_cancelled.svdiffstate").is_file()  # and resumable exactly
    assert 0 < json.loads(saved.metadata["svdiff.training"])["steps"] < 100000
    assert not (folder / "long.safetensors").exists() and not _temporaries(server)
    assert server.alive() and torch.equal(_canary(server, tiny_checkpoint, baseline), baseline["latent"])
    after = server.run(_train(tiny_checkpoint, steps=1, filename_prefix="faults/after"), timeout=600)
    assert error_of(after) is None, error_of(after)
    assert (folder / "after.safetensors").is_file()


def test_cancel_during_prior_generation(comfy_server, tiny_checkpoint, baseline):
    server = comfy_server
    prompt = _train(
        tiny_checkpoint, steps=1, prior_weight=1.0, num_class_images=1000, class_prompt="photo of a dog", filename_prefix="faults/prior"
    )
    priors = server.svdiff_cache / "priors"
    cached = set(priors.glob("*")) if priors.is_dir() else set()
    entry, log = _cancel_after(server, prompt, "generating 1000 prior images", 1.5)
    assert _interrupted(entry), entry["status"]
    assert "SVDiff: training" not in log  # cancelled before training began
    assert not list((server.models("spectral_shifts") / "faults").glob("prior*"))
    assert set(priors.glob("*")) == cached and not _temporaries(server)  # no partial prior cache entry
    assert server.alive() and torch.equal(_canary(server, tiny_checkpoint, baseline), baseline["latent"])
    small = _train(
        tiny_checkpoint, steps=1, prior_weight=1.0, num_class_images=1, class_prompt="photo of a dog", filename_prefix="faults/prior_ok"
    )
    done = server.run(small, timeout=600)
    assert error_of(done) is None, error_of(done)


def test_cancel_during_inversion(comfy_server, tiny_checkpoint, baseline):
    server = comfy_server
    prompt = edit_prompt(tiny_checkpoint, steps=3000)
    prompt["13"] = {"class_type": "SaveLatent", "inputs": {"samples": ["11", 0], "filename_prefix": "faults/edit"}}
    entry, log = _cancel_after(server, prompt, "DDIM inversion over 3000 steps", 1.0)
    assert _interrupted(entry), entry["status"]
    assert not list(server.output_dir.glob("faults/edit*"))
    assert server.alive() and torch.equal(_canary(server, tiny_checkpoint, baseline), baseline["latent"])
    prompt = edit_prompt(tiny_checkpoint, steps=3)
    prompt["13"] = {"class_type": "SaveLatent", "inputs": {"samples": ["11", 0], "filename_prefix": "faults/edit_ok"}}
    done = server.run(prompt, timeout=600)
    assert error_of(done) is None, error_of(done)


# ----------------------------------------------------------------------------------
# Concurrency


def _branch(prompt: dict, ckpt_node: str, shift: str | None, label: str, index: int, base: int) -> None:
    """Add ckpt → [SVDiffLoader] → encode → KSamplerAdvanced (no noise) → SaveLatent under ids base…"""
    model, clip = [ckpt_node, 0], [ckpt_node, 1]
    if shift is not None:
        prompt[str(base)] = {
            "class_type": "SVDiffLoader",
            # The diffusion model only: the text encoding is then shared (cached) by all prompts.
            "inputs": {"model": model, "clip": clip, "shift_name": shift, "strength_model": 1.0, "strength_clip": 0.0},
        }
        model, clip = [str(base), 0], [str(base), 1]
    prompt[str(base + 1)] = {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": "photo of a sks dog on a beach"}}
    prompt[str(base + 2)] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    prompt[str(base + 3)] = noiseless_sampler(model, [str(base + 1), 0], [str(base + 1), 0], [str(base + 2), 0], noise_seed=index)
    prompt[str(base + 4)] = {
        "class_type": "SaveLatent",
        "inputs": {"samples": [str(base + 3), 0], "filename_prefix": f"conc/{label}_{index:03}"},
    }


SHIFTS = {"a": "conc_a.safetensors", "b": "conc_b.safetensors", "base": None}


def _single(ckpt: str, label: str, index: int) -> dict:
    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}}}
    _branch(prompt, "1", SHIFTS[label], label, index, 10)
    return prompt


def _dual(ckpt: str, index: int) -> dict:
    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}}}
    _branch(prompt, "1", SHIFTS["a"], "dual_a", index, 10)
    _branch(prompt, "1", SHIFTS["b"], "dual_b", index, 20)
    return prompt


def _latent(server, label: str, index: int) -> torch.Tensor:
    (path,) = (server.output_dir / "conc").glob(f"{label}_{index:03}_*.latent")
    return load_file(str(path))["latent_tensor"]


def test_queued_prompts_with_different_shifts_never_see_each_others_patches(comfy_server, tiny_checkpoint, baseline):
    server = comfy_server
    reference = {}
    for label in SHIFTS:
        entry = server.run(_single(tiny_checkpoint, label, 0))
        assert error_of(entry) is None, error_of(entry)
        reference[label] = _latent(server, label, 0)
    assert not torch.equal(reference["a"], reference["b"])
    assert not torch.equal(reference["a"], reference["base"]) and not torch.equal(reference["b"], reference["base"])

    # Everything queued at once, interleaved: each prompt applies its shift to the one
    # cached base model while the previous prompt's patched clone may still be loaded.
    order = []
    for index in range(1, 3):
        for label in ("a", "b", "base", "dual"):
            prompt = _dual(tiny_checkpoint, index) if label == "dual" else _single(tiny_checkpoint, label, index)
            order.append((label, index, server.queue(prompt)))
    for label, index, prompt_id in order:
        entry = server.wait(prompt_id, timeout=600)
        assert error_of(entry) is None, (label, index, error_of(entry))
    for label, index, _ in order:
        if label == "dual":
            assert torch.equal(_latent(server, "dual_a", index), reference["a"]), index
            assert torch.equal(_latent(server, "dual_b", index), reference["b"]), index
        else:
            assert torch.equal(_latent(server, label, index), reference[label]), (label, index)
    assert torch.equal(_canary(server, tiny_checkpoint, baseline), baseline["latent"])
