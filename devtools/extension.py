"""Import this repository as the package ``comfyui_svdiff``.

That is its name when installed as ComfyUI/custom_nodes/comfyui_svdiff; tests,
scripts and benchmarks all import it under this one name so a process never holds
two copies of a module (and of its caches and registries).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "comfyui_svdiff"


def import_extension():
    """The repository as ``comfyui_svdiff`` (idempotent); needs no ComfyUI."""
    if PACKAGE in sys.modules:
        return sys.modules[PACKAGE]
    spec = importlib.util.spec_from_file_location(PACKAGE, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = module
    spec.loader.exec_module(module)
    return module
