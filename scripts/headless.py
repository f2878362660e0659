"""Headless ComfyUI with this extension, and the cached world (demo) checkpoint.

Shared by ``run_workflow.py`` (the main job), ``install_demo.py`` and ``build_workflows.py``.
The demo files themselves are written by the extension (``svdiff/comfy/demo.py``), the
same code the "Install Demo Files" node runs.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository root, for devtools/ (test tooling shared with tests/ and benchmarks/)

log = logging.getLogger("svdiff.demo")

from devtools.extension import import_extension  # noqa: E402


def start_comfy(base_dir: Path | None = None):
    """A CPU-only, in-process ComfyUI (no web server) with the SVDiff nodes registered."""
    from devtools.harness import setup_comfyui
    from devtools.locate import find_comfyui

    if find_comfyui() is None:
        raise SystemExit(
            "ComfyUI not found: set COMFYUI_PATH to a ComfyUI checkout (tested: v0.8.0, v0.33.0), or install this extension under ComfyUI/custom_nodes/"
        )
    handle = setup_comfyui(base_dir=base_dir)
    handle.register_module(import_extension())
    return handle


def demo_checkpoint() -> Path:
    """The world checkpoint the workflows name (``svdiff_world_sd15.safetensors``), assembled
    once from the shipped weights and cached (``~/.cache/comfyui-svdiff/world``, ≈30 s).
    Needs ComfyUI set up (:func:`start_comfy`)."""
    from devtools.world import base

    return base.world_checkpoint()
