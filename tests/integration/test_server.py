"""End to end through a real ComfyUI server process: the extension installed as a custom
node, every shipped workflow converted with the server's /object_info and run through
POST /prompt, results read back from /history, /view and the files on disk; the
extension's JSON route and the template gallery."""

from __future__ import annotations

import io
import json
import sys
import urllib.parse
from pathlib import Path

import pytest
from PIL import Image
from safetensors import safe_open

from devtools.server import INSTALL_NAME, ServerDirs, error_of
from devtools.workflow_format import ui_to_api

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
SIZE = 64
STEPS = 2


def _scripts():
    sys.path.insert(0, str(ROOT / "scripts"))
    import run_workflow

    return run_workflow


def _prompt_for(path: Path, object_info: dict, checkpoint: str) -> dict:
    prompt = ui_to_api(json.loads(path.read_text()), object_info)
    for entry in prompt.values():
        if entry["class_type"] == "CheckpointLoaderSimple":
            entry["inputs"]["ckpt_name"] = checkpoint
    _scripts().shrink(prompt, steps=STEPS, size=SIZE, training=True)
    return prompt


def _expected_files(prompt: dict) -> list[tuple[str, str, dict]]:
    """(folder under the base directory, glob, the node's inputs) the prompt must write."""
    expected = []
    for entry in prompt.values():
        kind, inputs = entry["class_type"], entry["inputs"]
        if kind in ("SVDiffSave", "SVDiffTrain"):
            expected.append(("models/spectral_shifts", f"{inputs['filename_prefix']}.safetensors", entry))
        elif kind == "SVDiffTrainCustomDiffusion":
            expected.append(("models/loras", f"{inputs['filename_prefix']}.safetensors", entry))
            if inputs["modifier_token"]:
                expected.append(("models/embeddings", f"{inputs['filename_prefix']}.safetensors", entry))
        elif kind == "SVDiffExportLoRA":
            expected.append(("models/loras", f"{inputs['filename_prefix']}*.safetensors", entry))
        elif kind == "SaveImage":
            expected.append(("output", f"{inputs['filename_prefix']}_*.png", entry))
    return expected


def _files(base: Path) -> set[Path]:
    return {p.relative_to(base) for p in base.rglob("*") if p.is_file() and "custom_nodes" not in p.parts}


def test_server_loads_the_extension(comfy_server, server_object_info):
    ids = {name for name in server_object_info if name.startswith("SVDiff")}
    assert len(ids) == 22, sorted(ids)
    scripts = comfy_server.get_json("/extensions")
    ours = [s for s in scripts if s.startswith(f"/extensions/{INSTALL_NAME}/")]
    assert ours == [f"/extensions/{INSTALL_NAME}/svdiff.js"], scripts
    status, body = comfy_server.request(ours[0])
    assert status == 200 and b"registerExtension" in body
    assert "spectral_shifts" in comfy_server.get_json("/models")
    # on_load ran once: ComfyUI ≥ v0.14 awaits it after comfy_entrypoint(), which calls it too
    log = comfy_server.log_path.read_text(errors="replace")
    assert log.count("SVDiff loaded:") == 1, log[-3000:]
    assert "weight adapter True, routes True" in log


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_runs_through_the_server(comfy_server, server_object_info, tiny_checkpoint, comfy_handle, path):
    from comfyui_svdiff.svdiff.fileformat import read_shift

    prompt = _prompt_for(path, server_object_info, tiny_checkpoint)
    _scripts().prepare_files(ServerDirs(comfy_server), prompt, comfy_handle.model_dir("checkpoints") / tiny_checkpoint)
    before = _files(comfy_server.base_dir)
    entry = comfy_server.run(prompt, timeout=900)
    assert error_of(entry) is None, f"{error_of(entry)}\n{comfy_server.log_tail(3000)}"
    assert comfy_server.alive()

    # Every output node of the prompt reported, and every image it reports is served.
    output_nodes = {i for i, e in prompt.items() if server_object_info[e["class_type"]].get("output_node")}
    assert output_nodes and output_nodes <= set(entry["outputs"]), (output_nodes, set(entry["outputs"]))
    for node_id, output in entry["outputs"].items():
        for image in output.get("images", []):
            with Image.open(io.BytesIO(comfy_server.view(image))) as picture:
                picture.load()
            if prompt[node_id]["class_type"] == "SaveImage":
                assert picture.size == (SIZE, SIZE)

    # The files the save nodes promise exist and are what they claim; no temporaries are left.
    new = _files(comfy_server.base_dir) - before
    assert not [p for p in new if p.name.startswith(".") or p.suffix in (".tmp", ".part")], new
    for folder, pattern, node in _expected_files(prompt):
        found = [comfy_server.base_dir / p for p in new if p.match(f"{folder}/{pattern}")]
        assert found, f"{node['class_type']} wrote no {folder}/{pattern}; new files: {sorted(map(str, new))}"
        for file in found:
            if folder == "models/spectral_shifts":
                shift = read_shift(file)
                if node["class_type"] == "SVDiffTrain":
                    assert json.loads(shift.metadata["svdiff.training"])["steps"] == node["inputs"]["steps"]
            elif folder == "models/loras" and node["class_type"] == "SVDiffTrainCustomDiffusion":
                deltas = read_shift(file)  # Custom Diffusion K/V weights in ComfyUI's stock .diff form
                assert deltas.tensors and all(k.endswith((".attn2.to_k.diff", ".attn2.to_v.diff")) for k in deltas.tensors)
                assert json.loads(deltas.metadata["svdiff.training"])["steps"] == node["inputs"]["steps"]
            elif folder == "models/embeddings":
                with safe_open(str(file), "pt") as f:
                    assert "clip_l" in f.keys()
            elif folder == "models/loras":
                with safe_open(str(file), "pt") as f:
                    assert any(".lora_up." in k or "lora_B" in k for k in f.keys())


def test_workflow_templates_are_served(comfy_server):
    """The template browser's listing and URLs (frontend 1.35.9: /api/workflow_templates/<module>/<name>.json|.jpg),
    and the label it shows for the extension's folder (/i18n, from locales/en/main.json)."""
    listing = comfy_server.get_json("/workflow_templates")
    assert sorted(listing[INSTALL_NAME]) == sorted(p.stem for p in WORKFLOWS)
    for path in WORKFLOWS:
        status, body = comfy_server.request(f"/api/workflow_templates/{INSTALL_NAME}/{urllib.parse.quote(path.name)}")
        assert status == 200 and json.loads(body)["nodes"]
        status, body = comfy_server.request(f"/api/workflow_templates/{INSTALL_NAME}/{urllib.parse.quote(path.stem)}.jpg")
        assert status == 200, f"{path.stem}.jpg: the template browser shows no thumbnail"
        with Image.open(io.BytesIO(body)) as thumbnail:
            assert thumbnail.format == "JPEG" and min(thumbnail.size) >= 200
    labels = comfy_server.get_json("/i18n")["en"]["templateWorkflows"]["category"]
    assert labels[INSTALL_NAME] == "ComfyUI-SVDiff"


# ---------------------------------------------------------------------------------------
# GET /svdiff/shift_info


@pytest.fixture(scope="module")
def info_files(server_shifts):
    return server_shifts


def _info(server, prefix="/api", **query):
    status, body = server.request(f"{prefix}/svdiff/shift_info?{urllib.parse.urlencode(query)}")
    return status, json.loads(body)


def test_shift_info_says_what_the_file_is_and_whether_it_fits(comfy_server, info_files, tiny_checkpoint):
    from comfyui_svdiff.svdiff.fileformat import read_shift

    status, body = _info(comfy_server, name=info_files["sd15"], checkpoint=tiny_checkpoint)
    assert status == 200, body
    shift = read_shift(comfy_server.models("spectral_shifts") / info_files["sd15"])
    info = body["info"]
    assert info["architecture"] == "SD15" and info["file"] == "sd15.safetensors"
    assert info["model_layers"] == len(shift.keys_for("model")) and info["text_encoder_layers"] == len(shift.keys_for("clip"))
    assert info["values"] == shift.num_values()
    assert info["bytes"] == (comfy_server.models("spectral_shifts") / info_files["sd15"]).stat().st_size
    assert body["fit"]["status"] == "fits" and body["fit"]["architecture"] == "SD15", body["fit"]

    # The SDXL shift on the SD15 checkpoint: does not fit, in the loaders' words.
    status, body = _info(comfy_server, prefix="", name=info_files["sdxl"], checkpoint=tiny_checkpoint)
    assert status == 200 and body["info"]["architecture"] == "SDXL"
    assert body["fit"]["status"] == "does_not_fit" and "does not fit this model" in body["fit"]["message"]
    assert "made for SDXL, the model is SD15" in body["fit"]["message"]

    # No checkpoint named: no verdict; an unknown checkpoint: said so.
    assert _info(comfy_server, name=info_files["sd15"])[1]["fit"] is None
    assert _info(comfy_server, name=info_files["sd15"], checkpoint="nope.safetensors")[1]["fit"]["status"] == "unknown"


def test_shift_info_reports_a_broken_file(comfy_server, info_files):
    status, body = _info(comfy_server, name=info_files["broken"])
    assert status == 200 and "broken.safetensors" in body["error"] and "get the file again" in body["error"]


@pytest.mark.parametrize(
    "name",
    [
        "../secret.safetensors",
        "../../server.log",
        "info/../../../secret.safetensors",
        "/etc/passwd",
        "%2e%2e/secret.safetensors",
        "..\\secret.safetensors",
        "",
        "info",
    ],
)
def test_shift_info_reads_only_listed_files(comfy_server, info_files, name):
    status, body = _info(comfy_server, name=name)
    assert status == 404 and "models/spectral_shifts" in body["error"] and "info" not in body


def test_shift_info_confines_the_checkpoint_too(comfy_server, info_files):
    status, body = _info(comfy_server, name=info_files["sd15"], checkpoint="../secret.safetensors")
    assert status == 200 and body["fit"]["status"] == "unknown" and "not in models/checkpoints" in body["fit"]["message"]
    status, body = _info(comfy_server, name=info_files["sd15"], checkpoint="x.safetensors", checkpoint_folder="../..")
    assert status == 400 and "checkpoint_folder must be one of" in body["error"]
