"""The main job's command works as the README says; every workflow is listed.

Every shipped workflow is run through a real server in test_server.py."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))


def test_every_workflow_is_listed_in_the_readme():
    listed = (ROOT / "workflows" / "README.md").read_text()
    main = (ROOT / "README.md").read_text()
    assert len(WORKFLOWS) == 8
    for path in WORKFLOWS:
        assert f"({quote(path.name)})" in listed, path.name
        assert f"(workflows/{quote(path.name)})" in main, path.name
        assert (path.with_suffix(".jpg")).is_file(), f"{path.name} has no thumbnail"


NOTE_LINE = re.compile(r"^- (?P<node>.+) > (?P<widget>\w+): (?P<shipped>\S+) -> (?P<gpu>\S+)$")


def _note(workflow: dict) -> str:
    notes = [n for n in workflow["nodes"] if n["type"] == "Note"]
    assert len(notes) == 1, "each workflow opens with one note"
    return notes[0]["widgets_values"][0]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_the_note_states_the_shipped_settings_and_the_readme_lists_them(path, comfy_handle):
    """The note's "as shipped" values are the workflow's own (read through the frontend's
    widget mapping), every loader names the demo checkpoint, and the README's table has
    each change the note lists."""
    from devtools.workflow_format import ui_to_api

    workflow = json.loads(path.read_text())
    info = comfy_handle.object_info()
    prompt = ui_to_api(workflow, info)
    titles = {}
    for n in workflow["nodes"]:
        if n["type"] != "Note":
            titles.setdefault(n.get("title") or info[n["type"]].get("display_name") or n["type"], []).append(str(n["id"]))
    changes = [m.groupdict() for m in map(NOTE_LINE.match, _note(workflow).splitlines()) if m]
    loaders = [e for e in prompt.values() if e["class_type"] == "CheckpointLoaderSimple"]
    for entry in loaders:
        assert entry["inputs"]["ckpt_name"] == "svdiff_world_sd15.safetensors"
    if loaders and any(e["class_type"] in ("KSampler", "SVDiffTrain", "SamplerCustomAdvanced") for e in prompt.values()):
        assert changes, "a workflow that samples or trains says what to raise on a GPU"
        assert "choose your checkpoint in Load Checkpoint" in _note(workflow)
    table = (ROOT / "README.md").read_text()
    for change in changes:
        ids = titles[change["node"]]
        assert len(ids) == 1, f"'{change['node']}' names {len(ids)} nodes"
        assert str(prompt[ids[0]]["inputs"][change["widget"]]) == change["shipped"], change
        assert change["gpu"] != change["shipped"], change  # a change, not a restatement
        row = f"| {path.stem} | {change['node']} > {change['widget']} | {change['shipped']} | {change['gpu']} |"
        assert row in table, row


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
    pictures = [p for p in images if "heart_with_lora" in p.name]
    assert pictures, run.stdout
    assert not (out / "images" / "old_run.png").exists()  # a clean output folder per run
    put = [line for line in run.stdout.splitlines() if line.startswith("put demo file ")]
    assert put and len(put) == len(set(put)), run.stdout  # each demo file placed (and said) once
    # The pictures show what the prompt asks for, read by the evaluator trained on the world's
    # ground truth: the shift's heart ("sks circle"), blue, on a dark background, with the LoRA stacked.
    from PIL import Image

    from devtools.world import evaluator

    reading = evaluator.predict(evaluator.load(), [Image.open(p).convert("RGB") for p in pictures])
    assert len(pictures) == 4 and reading["shape"].count("heart") >= 3, reading
    assert set(reading["colour"]) == {"blue"} and set(reading["background"]) == {"dark"}, reading


def test_main_job_names_the_shipped_workflows_for_an_unknown_one(tmp_path):
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "run_workflow.py"), "does_not_exist", "--out", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode != 0
    assert "workflow 'does_not_exist' not found" in run.stderr, run.stderr
    assert "apply_and_stack_lora" in run.stderr and "SVDiff - Apply a shift + LoRA.json" in run.stderr, run.stderr
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
            "SVDiffTrainCustomDiffusion SVDiffLoadKVDeltas SVDiffConcept SVDiffMergeConcepts SVDiffInstallDemo".split()
        )
    )
    assert f"IDS {expected}" in run.stdout
    assert "ADAPTER 1" in run.stdout
    assert "FOLDER ['.safetensors']" in run.stdout
    assert "WEB True" in run.stdout
    assert "CREATED True" in run.stdout  # models/spectral_shifts exists once ComfyUI has started, for users to put files in


def _run_install(base: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "install_demo.py"), "--base-directory", str(base)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def test_install_demo_command_puts_every_named_file_in_place_once(tmp_path):
    """`python scripts/install_demo.py` in a fresh process: every file the shipped workflows
    name lands in ComfyUI's folders, readable by others like ComfyUI's outputs; a second run
    writes nothing and changes nothing."""
    from safetensors import safe_open

    base = tmp_path / "comfy"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    first = _run_install(base, env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "9 written, 0 already in place." in first.stdout, first.stdout
    # What the workflows name, read from the workflow files themselves.
    named = set()
    for path in WORKFLOWS:
        for n in json.loads(path.read_text())["nodes"]:
            values = [v for v in n.get("widgets_values", []) if isinstance(v, str)]
            folder = {
                "CheckpointLoaderSimple": "models/checkpoints",
                "SVDiffLoader": "models/spectral_shifts",
                "SVDiffLoadShift": "models/spectral_shifts",
                "LoraLoader": "models/loras",
                "SVDiffLoadKVDeltas": "models/loras",
                "SVDiffDatasetFromFolder": "input",
                "LoadImage": "input",
            }.get(n["type"])
            if folder:
                named.add(f"{folder}/{values[0]}")
    assert len(named) == 8, sorted(named)
    for name in named:
        assert (base / name).exists(), f"{name} is named by a workflow but was not installed"
    assert (base / "models/embeddings/demo_kv_diamond.safetensors").is_file()  # the token the merge prompt uses
    with safe_open(str(base / "models/checkpoints/svdiff_world_sd15.safetensors"), "pt") as f:
        assert "svdiff.demo" in f.metadata()
    modes = {p.stat().st_mode & 0o777 for p in base.rglob("*.safetensors")}
    umask = os.umask(0)
    os.umask(umask)
    assert modes == {0o666 & ~umask}, modes
    before = {p: p.stat().st_mtime_ns for p in base.rglob("*") if p.is_file()}

    again = _run_install(base, env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "0 written, 9 already in place." in again.stdout, again.stdout
    assert {p: p.stat().st_mtime_ns for p in base.rglob("*") if p.is_file()} == before


def test_install_demo_leaves_a_users_file_alone(tmp_path, comfy_handle):
    """A file of the user's that has a demo file's name is kept, and said so; a foreign file
    named like the demo checkpoint stops the installer before it writes anything."""
    from comfyui_svdiff.svdiff.comfy.demo import install_demo_files
    from devtools.harness import setup_comfyui

    original = comfy_handle.base_dir
    base = tmp_path / "base"
    setup_comfyui(base_dir=base)
    try:
        checkpoint = base / "models" / "checkpoints" / "svdiff_world_sd15.safetensors"
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        checkpoint.write_bytes(b"not a checkpoint")
        with pytest.raises(ValueError, match="is not the SVDiff demo checkpoint; rename or move it"):
            install_demo_files()
        assert sorted(p.name for p in base.rglob("*") if p.is_file()) == ["svdiff_world_sd15.safetensors"]

        checkpoint.unlink()
        mine = base / "models" / "loras" / "demo_stripes_lora.safetensors"
        mine.parent.mkdir(parents=True, exist_ok=True)
        mine.write_bytes(b"my own LoRA")
        placed = {p.path.name: p.status for p in install_demo_files()}
        assert placed["demo_stripes_lora.safetensors"] == "kept: not a demo file"
        assert mine.read_bytes() == b"my own LoRA"
        assert placed["svdiff_world_sd15.safetensors"] == "written" and placed["demo_heart.safetensors"] == "written"
    finally:
        setup_comfyui(base_dir=original)
