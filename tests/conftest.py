"""Test tiers and how the extension is imported.

The repository root is imported as the package ``comfyui_svdiff`` (the name it has
when installed under ComfyUI's custom_nodes/), so core tests and integration tests
share one copy of every module. Integration tests (everything under tests/integration)
need a real ComfyUI (tested: v0.8.0 and v0.33.0), found through COMFYUI_PATH, else the
ComfyUI containing this checkout, else the newest ~/ComfyUI*; without one they are
skipped and the run says so loudly. Checks that need an NVIDIA GPU skip with a reason
starting "CUDA-only", listed at the end of the run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository root, for devtools/ (test tooling shared with scripts/ and benchmarks/)

from devtools.extension import import_extension  # noqa: E402
from devtools.locate import comfyui_version, find_comfyui  # noqa: E402

import_extension()

COMFYUI = find_comfyui()


def pytest_configure(config):
    config.addinivalue_line("markers", "integration: needs a real ComfyUI (COMFYUI_PATH or ~/ComfyUI)")


def pytest_report_header(config):
    if COMFYUI is None:
        return "ComfyUI: NOT FOUND — integration tier skipped (set COMFYUI_PATH to a ComfyUI checkout)"
    return f"ComfyUI: using v{comfyui_version(COMFYUI)} at {COMFYUI}"


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    integration = ROOT / "tests" / "integration"
    for item in items:
        if integration in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.integration)
    if COMFYUI is not None:
        return
    skip = pytest.mark.skip(reason="integration tier skipped: no ComfyUI found (set COMFYUI_PATH)")
    for item in items:
        if "integration" in item.keywords:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if COMFYUI is None:
        terminalreporter.write_line("")
        terminalreporter.write_line("!" * 78, red=True, bold=True)
        terminalreporter.write_line(
            "!! integration tier skipped: no ComfyUI found (COMFYUI_PATH, custom_nodes parent, ~/ComfyUI)", red=True, bold=True
        )
        terminalreporter.write_line("!" * 78, red=True, bold=True)
    else:
        terminalreporter.write_line(f"integration tier ran against ComfyUI v{comfyui_version(COMFYUI)} at {COMFYUI}")
    cuda_only = [r for r in terminalreporter.stats.get("skipped", []) if "CUDA-only" in str(r.longrepr)]
    if cuda_only:
        terminalreporter.write_line(
            f"!! {len(cuda_only)} CUDA-only check(s) skipped: no NVIDIA GPU here ({', '.join(r.nodeid.split('::')[-1] for r in cuda_only)})",
            yellow=True,
            bold=True,
        )
