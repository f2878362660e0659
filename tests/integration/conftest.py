"""Fixtures for tests that run inside a real ComfyUI (tiny models built in code)."""

from __future__ import annotations

import pytest

from support import tiny_models
from support.comfy_env import find_comfyui


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    """ComfyUI on the CPU with the extension's weight adapter registered.

    The decomposition cache is pointed at a temporary folder so tests never read
    or write the user's ~/.cache.
    """
    root = find_comfyui()
    if root is None:
        pytest.skip("integration tier skipped: no ComfyUI found")
    tiny_models.prepare_comfy_cpu(root)
    from comfyui_svdiff.svdiff import cache, comfy_bridge

    assert comfy_bridge.register()
    cache.set_default_cache(cache.DecompositionCache(tmp_path_factory.mktemp("svdiff-cache"), ram_mb=512, disk_mb=512))
    import comfy.sd  # noqa: F401

    return root


@pytest.fixture
def build(comfy):
    """``build(arch, seed=0, **kw) -> (model, clip)`` of a tiny model."""

    def make(arch="SD15", seed=0, **kwargs):
        return tiny_models.build_model(arch, seed=seed, **kwargs)

    return make
