"""Every ComfyUI path that copies, rebuilds or streams adapters keeps the decomposition.

ComfyUI hands patches around in several ways: clones share patch lists, hook patches
are re-applied per step, lowvram loads compute the patched weight on every forward, and
since v0.21 ``prefetch_prepared_value`` rebuilds each adapter as
``type(v)(v.loaded_keys, weights)`` (dynamic VRAM, lowvram streaming); a deep-copying
clone reloads the model from its file. None of them may decompose a weight again or hash
one: counted here at the cache's own entry points while those paths run on the CPU, and
the result of each path compared with the plain full load.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from comfyui_svdiff.svdiff import cache as cache_module
from comfyui_svdiff.svdiff.comfy.patching import apply_shift
from comfyui_svdiff.svdiff.fileformat import write_shift
from devtools import tiny_models
from integration.helpers import random_shift


@pytest.fixture
def counted(comfy_handle, monkeypatch):
    """How often the cache looked a weight's hash up, hashed its bytes, or decomposed it."""
    from comfyui_svdiff.svdiff.comfy import adapter  # after ComfyUI is importable

    counts = {"lookup": 0, "hash": 0, "decompose": 0}
    real = {name: getattr(cache_module, name) for name in ("content_hash", "_full_digest", "decompose")}

    def counting(name, key):
        def call(tensor):
            counts[key] += 1
            return real[name](tensor)

        return call

    lookup = counting("content_hash", "lookup")
    monkeypatch.setattr(cache_module, "content_hash", lookup)
    monkeypatch.setattr(adapter, "content_hash", lookup)
    monkeypatch.setattr(cache_module, "_full_digest", counting("_full_digest", "hash"))
    monkeypatch.setattr(cache_module, "decompose", counting("decompose", "decompose"))
    return counts


def reset(counts) -> None:
    for key in counts:
        counts[key] = 0


def untouched(counts) -> bool:
    return counts == {"lookup": 0, "hash": 0, "decompose": 0}


def _denoise(patcher, cond, lowvram: int = 0) -> torch.Tensor:
    """The UNet on a fixed input, loaded by ``patch_model`` (lowvram when asked)."""
    import comfy.model_management as mm

    mm.unload_all_models()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    patcher.patch_model(device_to=torch.device("cpu"), lowvram_model_memory=lowvram)
    try:
        with torch.no_grad():
            return patcher.model.apply_model(x, torch.tensor([2.0]), c_crossattn=cond).clone()
    finally:
        patcher.unpatch_model(device_to=torch.device("cpu"))


def _cond(clip):
    return tiny_models.encode_prompt(clip, "a photo of a sks dog")[0][0]


def _patched(build, seed: int):
    """A tiny SD1.5 MODEL with a full shift as weight patches, its weights, its shifted keys."""
    model, _ = build("SD15")
    patched, _, _ = apply_shift(model, None, random_shift(model, None, seed=seed), 0.9, 0.0)
    keys = [k for k, patches in patched.patches.items() if any(getattr(p[1], "name", "") == "svdiff" for p in patches)]
    assert len(keys) > 30
    return patched, patched.model.state_dict(), keys


def test_clones_lowvram_and_bypass_never_decompose_again(build, counted):
    model, clip = build("SD15")
    cond = _cond(clip)
    shift = random_shift(model, None, seed=31)
    patched, _, report = apply_shift(model, None, shift, 1.0, 0.0)
    bypass, _, _ = apply_shift(model, None, shift, 1.0, 0.0, mode="bypass")
    assert report.model_layers > 30
    reset(counted)
    full = _denoise(patched, cond)
    runs = {
        "full load again": _denoise(patched, cond),
        "clone": _denoise(patched.clone(), cond),
        "clone of a clone, lowvram": _denoise(patched.clone().clone(), cond, lowvram=1),
        "bypass": _denoise(bypass, cond),
        "bypass clone, lowvram": _denoise(bypass.clone(), cond, lowvram=1),
        "bypass again": _denoise(bypass, cond),
    }
    for name, out in runs.items():
        assert torch.allclose(out, full, rtol=1e-4, atol=1e-5 * float(full.abs().max())), name
    assert untouched(counted), counted


def test_lowvram_patch_sees_each_weight_patched_through_its_loaded_adapter(build, counted):
    """In lowvram mode ComfyUI computes W + ΔW per forward (LowVramPatch): still no hashing."""
    import comfy.model_patcher

    patched, state, keys = _patched(build, seed=32)
    reset(counted)
    for key in keys:
        patch = comfy.model_patcher.LowVramPatch(key, patched.patches)
        once, twice = patch(state[key].clone()), patch(state[key].clone())
        assert torch.equal(once, twice) and not torch.equal(once, state[key])
    assert untouched(counted), counted


def test_prefetch_rebuilt_adapters_keep_their_decomposition(build, counted):
    """``prefetch_prepared_value`` (v0.21+) rebuilds adapters into a gathered buffer."""
    import comfy.lora
    import comfy.model_patcher

    if not hasattr(comfy.lora, "prefetch_prepared_value"):
        pytest.skip("this ComfyUI has no prefetch_prepared_value (added in v0.21)")
    patched, state, keys = _patched(build, seed=33)
    reset(counted)
    for key in keys:
        patch = comfy.model_patcher.LowVramPatch(key, patched.patches)
        buffer = torch.empty(patch.memory_required(), dtype=torch.uint8)
        prepared = patch.prepare(buffer, None, copy=True)
        rebuilt = prepared[0][1]
        original = patched.patches[key][0][1]
        assert rebuilt is not original and type(rebuilt) is type(original)
        assert rebuilt.decomposition is original.decomposition
        expected = comfy.lora.calculate_weight(patched.patches[key], state[key].clone(), key)
        assert torch.equal(patch(state[key].clone()), expected)
    assert untouched(counted), counted


def test_deep_copying_clone_reuses_the_decomposition(comfy_handle, tiny_checkpoint, counted):
    """``clone(force_deepcopy=True)`` (the Train LoRA node's; v0.11+) reloads the model from its file."""
    import comfy.sd

    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(
        str(comfy_handle.model_dir("checkpoints") / tiny_checkpoint), output_vae=False, output_clipvision=False
    )
    if "force_deepcopy" not in inspect.signature(model.clone).parameters:
        pytest.skip("this ComfyUI's ModelPatcher.clone has no force_deepcopy (added in v0.11)")
    shift = random_shift(model, None, seed=34)
    patched, _, _ = apply_shift(model, None, shift, 1.0, 0.0)
    cond = _cond(clip)
    full = _denoise(patched, cond)
    reset(counted)
    deep = patched.clone(force_deepcopy=True)
    assert deep.model is not patched.model
    assert torch.allclose(_denoise(deep, cond), full, rtol=1e-4, atol=1e-5 * float(full.abs().max()))
    assert untouched(counted), counted


def test_hook_patches_decompose_once(build, counted, tmp_path):
    """A shift file as a ComfyUI hook ("Create Hook LoRA").

    ComfyUI makes the hook's adapters anew from the file's tensors on every sampling run
    (``WeightHook.add_hook_patches``), so each run looks each weight's hash up once (a
    memo hit after the first); its bytes are hashed and decomposed on the first run only,
    and nothing happens per forward.
    """
    import comfy.hooks
    import comfy.utils

    model, clip = build("SD15")
    shift = random_shift(model, None, seed=35)
    path = write_shift(tmp_path / "hooked.safetensors", shift, precision="fp32")
    hooks = comfy.hooks.create_hook_lora(comfy.utils.load_torch_file(str(path), safe_load=True), 0.8, 0.0)
    cond = tiny_models.encode_prompt(clip, "a photo of a sks dog")
    hooked = comfy.hooks.set_hooks_for_conditioning(cond, hooks)
    spectral = sum(1 for k in shift.tensors if k.endswith(".delta"))
    cache_module.default_cache().clear_memory()
    reset(counted)
    first = tiny_models.sample_tiny(model, hooked, hooked, "SD15", seed=2, steps=3, cfg=1.0)
    assert counted["lookup"] == spectral and counted["decompose"] <= spectral and counted["hash"] <= spectral, counted
    reset(counted)
    again = tiny_models.sample_tiny(model, hooked, hooked, "SD15", seed=2, steps=3, cfg=1.0)
    assert counted == {"lookup": spectral, "hash": 0, "decompose": 0}, counted
    assert torch.equal(first, again)
    reference = tiny_models.sample_tiny(apply_shift(model, None, shift, 0.8, 0.0)[0], cond, cond, "SD15", seed=2, steps=3, cfg=1.0)
    assert torch.allclose(first, reference, rtol=1e-4, atol=1e-4 * float(reference.abs().max()))


def test_dynamic_vram_patcher_keeps_the_decomposition(comfy_handle, tiny_checkpoint, counted):
    """ModelPatcherDynamic (v0.16+, default on NVIDIA GPUs) streams weights and patches per forward."""
    import comfy.model_patcher

    if not hasattr(comfy.model_patcher, "ModelPatcherDynamic"):
        pytest.skip("this ComfyUI has no ModelPatcherDynamic (added in v0.16)")
    if not torch.cuda.is_available():
        pytest.skip("CUDA-only: ModelPatcherDynamic replaces itself with a plain ModelPatcher on the CPU; run on an NVIDIA GPU")
    import comfy.sd

    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(
        str(comfy_handle.model_dir("checkpoints") / tiny_checkpoint), output_vae=False, output_clipvision=False
    )
    assert isinstance(model, comfy.model_patcher.ModelPatcherDynamic)
    shift = random_shift(model, None, seed=36)
    patched, _, _ = apply_shift(model, None, shift, 1.0, 0.0)
    cond = tiny_models.encode_prompt(clip, "a photo of a sks dog")
    reset(counted)
    first = tiny_models.sample_tiny(patched, cond, cond, "SD15", seed=2, steps=2, cfg=1.0)
    again = tiny_models.sample_tiny(patched.clone(), cond, cond, "SD15", seed=2, steps=2, cfg=1.0)
    assert torch.allclose(first, again) and untouched(counted), counted
