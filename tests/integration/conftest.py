"""Fixtures for tests that run inside a real ComfyUI (tiny models built in code)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from devtools import tiny_models
from devtools.harness import setup_comfyui
from devtools.locate import find_comfyui

ROOT = Path(__file__).resolve().parents[2]

if find_comfyui() is not None:
    # The ComfyUI layer (svdiff/comfy/) imports ComfyUI at module level and test modules
    # import it at their top, so ComfyUI is set up (CPU) before they are collected; the
    # session fixture below re-points it at its temporary base folder.
    setup_comfyui()


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


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory, comfy_handle, tiny_checkpoint):
    """A real ComfyUI server process (127.0.0.1, temporary base directory) with this
    checkout linked into its custom_nodes/ and the tiny checkpoint in its models/."""
    from devtools.browser import prepare_user_dir
    from devtools.server import ComfyServer, copy_or_link

    base = tmp_path_factory.mktemp("server-base")
    server = ComfyServer(find_comfyui(), base)
    prepare_user_dir(base)
    copy_or_link(comfy_handle.model_dir("checkpoints") / tiny_checkpoint, server.models("checkpoints") / tiny_checkpoint)
    server.svdiff_cache = tmp_path_factory.mktemp("server-svdiff-cache")
    server.start(env={"SVDIFF_CACHE_DIR": str(server.svdiff_cache)})
    sys.__stderr__.write(f"\n[comfy_server] ComfyUI started at {server.url} in {server.startup_seconds:.1f} s\n")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def server_object_info(comfy_server):
    return comfy_server.object_info()


@pytest.fixture(scope="session")
def server_shifts(comfy_server, comfy_handle, tiny_checkpoint):
    """A shift made for the tiny SD15 checkpoint, one made for a tiny SDXL model, a broken file."""
    import comfy.sd

    from comfyui_svdiff.svdiff.comfy.demo import write_demo_shift

    folder = comfy_server.models("spectral_shifts") / "info"
    folder.mkdir(parents=True, exist_ok=True)
    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(
        str(comfy_handle.model_dir("checkpoints") / tiny_checkpoint), output_vae=False, output_clipvision=False
    )
    write_demo_shift(folder / "sd15.safetensors", model, clip, seed=1)
    xl_model, xl_clip = tiny_models.build_model("SDXL", seed=0)
    write_demo_shift(folder / "sdxl.safetensors", xl_model, xl_clip, seed=2)
    (folder / "broken.safetensors").write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"a": 1')
    (comfy_server.base_dir / "secret.safetensors").write_bytes(b"not for the route")
    return {"sd15": "info/sd15.safetensors", "sdxl": "info/sdxl.safetensors", "broken": "info/broken.safetensors"}
