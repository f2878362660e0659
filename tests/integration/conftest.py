"""Fixtures for tests that run inside a real ComfyUI (tiny models built in code)."""

from __future__ import annotations

import sys

import pytest

from support import tiny_models
from support.comfy_env import find_comfyui, setup_comfyui


@pytest.fixture(scope="session")
def comfy_handle(tmp_path_factory):
    """A headless ComfyUI (CPU, temporary base folder) with this extension registered.

    The extension is the ``comfyui_svdiff`` package the tests import, registered
    without a second import, and its decomposition cache points at a temporary
    folder so tests never touch the user's ~/.cache.
    """
    if find_comfyui() is None:
        pytest.skip("integration tier skipped: no ComfyUI found")
    handle = setup_comfyui(base_dir=tmp_path_factory.mktemp("comfy-base"))
    from comfyui_svdiff.svdiff import cache

    cache.set_default_cache(cache.DecompositionCache(tmp_path_factory.mktemp("svdiff-cache"), ram_mb=512, disk_mb=512))
    handle.register_module(sys.modules["comfyui_svdiff"])
    import comfy.weight_adapter

    assert any(getattr(a, "name", None) == "svdiff" for a in comfy.weight_adapter.adapters)
    return handle


@pytest.fixture(scope="session")
def comfy(comfy_handle):
    return comfy_handle.root


@pytest.fixture
def build(comfy):
    """``build(arch, seed=0, **kw) -> (model, clip)`` of a tiny model."""

    def make(arch="SD15", seed=0, **kwargs):
        return tiny_models.build_model(arch, seed=seed, **kwargs)

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(comfy_handle):
    """A small SD1.5 checkpoint in models/checkpoints that CheckpointLoaderSimple loads."""
    path = comfy_handle.model_dir("checkpoints") / "tiny_sd15.safetensors"
    if not path.exists():
        tiny_models.write_tiny_checkpoint(path, arch="SD15", seed=0)
    return path.name
