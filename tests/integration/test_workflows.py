"""The main job's command works as the README says; every workflow is listed.

Every shipped workflow is run through a real server in test_server.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))


def test_every_workflow_is_listed_in_the_readme():
    listed = (ROOT / "workflows" / "README.md").read_text()
    assert WORKFLOWS
    for path in WORKFLOWS:
        assert f"({path.name})" in listed, path.name


def test_main_job_command(tmp_path):
    """`python scripts/run_workflow.py` as a user runs it, in a fresh process."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "SVDIFF_CACHE_DIR": str(tmp_path / "svd")}
    out = tmp_path / "out"
    (out / "images").mkdir(parents=True)  # what an earlier run left
    (out / ".svdiff-run-output").write_text("")
    (out / "images" / "old_run.png").write_bytes(b"old")
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "run_workflow.py"), "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"outputs under {out}" in run.stdout
    images = list((out / "images").glob("*.png"))
    assert any("dog_with_style" in p.name for p in images), run.stdout
    assert not (out / "images" / "old_run.png").exists()  # a clean output folder per run
    created = [line for line in run.stdout.splitlines() if line.startswith("created ")]
    assert created and len(created) == len(set(created)), run.stdout  # each demo file made (and said) once


def test_main_job_names_the_shipped_workflows_for_an_unknown_one(tmp_path):
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "run_workflow.py"), "does_not_exist", "--out", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode != 0
    assert "workflow 'does_not_exist' not found" in run.stderr and "svdiff_apply_and_stack_lora.json" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "x").exists()  # nothing created for a run that did not start


def test_comfyui_own_custom_node_loader_registers_the_extension(tmp_path):
    """ComfyUI's nodes.load_custom_node on the checkout (the real install path), in a
    fresh process so its second copy of the package stays out of this one."""
    code = (
        "import sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"  # the repository root, for devtools/
        "from devtools.harness import setup_comfyui\n"
        f"h = setup_comfyui(base_dir={str(tmp_path)!r})\n"
        f"h.load_extension({str(ROOT)!r})\n"
        "import nodes, folder_paths, comfy.weight_adapter as wa\n"
        "ids = sorted(k for k in nodes.NODE_CLASS_MAPPINGS if k.startswith('SVDiff'))\n"
        "print('IDS', ','.join(ids))\n"
        "print('ADAPTER', [a.name for a in wa.adapters].count('svdiff'))\n"
        "print('FOLDER', sorted(folder_paths.folder_names_and_paths['spectral_shifts'][1]))\n"
        "print('WEB', any(p.endswith('web') for p in nodes.EXTENSION_WEB_DIRS.values()))\n"
        "import os\n"
        "print('CREATED', os.path.isdir(os.path.join(folder_paths.models_dir, 'spectral_shifts')))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    expected = ",".join(
        sorted(
            "SVDiffApply SVDiffCombine SVDiffExportLoRA SVDiffInspect SVDiffLoadShift SVDiffLoader SVDiffSave SVDiffSelectLayers "
            "SVDiffDatasetFromFolder SVDiffDatasetFromImages SVDiffTrain "
            "SVDiffDDIMInversion SVDiffInvertedNoise SVDiffDDIMSampler "
            "SVDiffCutMixUnmix SVDiffAttentionRegularization SVDiffNegativePriorGuider "
            "SVDiffTrainCustomDiffusion SVDiffLoadKVDeltas SVDiffConcept SVDiffMergeConcepts".split()
        )
    )
    assert f"IDS {expected}" in run.stdout
    assert "ADAPTER 1" in run.stdout
    assert "FOLDER ['.safetensors']" in run.stdout
    assert "WEB True" in run.stdout
    assert "CREATED True" in run.stdout  # models/spectral_shifts exists once ComfyUI has started, for users to put files in
