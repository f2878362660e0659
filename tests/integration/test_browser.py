"""The frontend extension in headless Chromium on a real ComfyUI server.

The SVDiff nodes are in the node library, every shipped workflow loads the way a
dropped file does (no missing nodes, nothing cramped or overlapping, saved back
unchanged), a short training run draws its loss curve on the node while it trains,
and the loader panel says what a shift file is and whether it fits the checkpoint.
No console errors. Screenshots go to artifacts/browser/.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from devtools.browser import ComfyPage, chromium_or_skip
from devtools.server import ServerDirs
from devtools.workflow_format import ui_to_api

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "artifacts" / "browser"
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
TRAIN_STEPS = 24
NODES = "(app.graph.nodes ?? app.graph._nodes)"
CHART = f"{NODES}.find((n) => n.type === 'SVDiffTrain').svdiffChart.element"
PANEL = f"{NODES}.find((n) => n.type === 'SVDiffLoader').svdiffInfo.element"


@pytest.fixture(scope="module")
def browser():
    with chromium_or_skip() as chromium:
        yield chromium


@pytest.fixture
def open_page(browser, comfy_server):
    pages = []

    def make(width=1600, height=1000):
        page = ComfyPage(browser, comfy_server.url, width, height).open()
        pages.append(page)
        return page

    yield make
    for page in pages:
        page.close()


def _prepare(comfy_server, server_object_info, comfy_handle, tiny_checkpoint, path: Path) -> dict:
    """Demo files the workflow names, in the server's folders (as the server test does)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from run_workflow import prepare_files

    workflow = json.loads(path.read_text())
    prompt = ui_to_api(workflow, server_object_info)
    prepare_files(ServerDirs(comfy_server), prompt, comfy_handle.model_dir("checkpoints") / tiny_checkpoint)
    return workflow


def test_node_library_lists_the_svdiff_nodes(open_page, server_object_info):
    page = open_page()
    page.command("Workspace.ToggleSidebarTab.node-library")
    search = page.page.get_by_placeholder("Search", exact=False).first
    search.fill("SVDiff")
    page.page.wait_for_timeout(1000)
    page.page.screenshot(path=str(ARTIFACTS / "node_library.png"))
    listed = page.page.evaluate("() => document.body.innerText")
    ours = {name: info["display_name"] for name, info in server_object_info.items() if name.startswith("SVDiff")}
    assert len(ours) == 22
    registered = page.page.evaluate("() => Object.keys(LiteGraph.registered_node_types).filter((k) => k.startsWith('SVDiff'))")
    assert sorted(registered) == sorted(ours)
    shown = [title for title in ours.values() if title in listed]
    assert len(shown) >= 5, f"the node library search for 'SVDiff' shows {shown}"
    assert page.console_errors() == []


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_loads_like_a_dropped_file(open_page, comfy_server, server_object_info, comfy_handle, tiny_checkpoint, path):
    workflow = _prepare(comfy_server, server_object_info, comfy_handle, tiny_checkpoint, path)
    page = open_page()
    page.page.evaluate(
        """async ([text, name]) => { await app.handleFile(new File([text], name, { type: "application/json" })); }""",
        [path.read_text(), path.name],
    )
    page.page.wait_for_function(f"() => (app.graph.nodes ?? app.graph._nodes).length === {len(workflow['nodes'])}", timeout=30_000)
    page.page.wait_for_timeout(1000)
    state = page.page.evaluate(
        """() => {
            const nodes = app.graph.nodes ?? app.graph._nodes;
            const missing = nodes.filter((n) => !LiteGraph.registered_node_types[n.type]).map((n) => n.type);
            const cramped = nodes.filter((n) => { const c = n.computeSize(); return c[0] > n.size[0] + 1 || c[1] > n.size[1] + 1; })
                .map((n) => `${n.type} ${n.size.map(Math.round)} < ${n.computeSize().map(Math.round)}`);
            const title = LiteGraph.NODE_TITLE_HEIGHT, overlaps = [];
            for (const a of nodes) for (const b of nodes) {
                if (a.id >= b.id) continue;
                const ax1 = a.pos[0] + a.size[0], ay1 = a.pos[1] + a.size[1], bx1 = b.pos[0] + b.size[0], by1 = b.pos[1] + b.size[1];
                if (a.pos[0] < bx1 && b.pos[0] < ax1 && a.pos[1] - title < by1 && b.pos[1] - title < ay1) overlaps.push(`${a.type}/${b.type}`);
            }
            const saved = app.graph.serialize();
            return { missing, cramped, overlaps, widgets: Object.fromEntries(saved.nodes.map((n) => [n.id, n.widgets_values ?? []])) };
        }"""
    )
    assert state["missing"] == [], state["missing"]
    assert state["cramped"] == [] and state["overlaps"] == [], (state["cramped"], state["overlaps"])
    # Opened framed: the first column is right of the sidebar, the top row below the menu bar.
    box = page.bounds()
    chrome = page.page.evaluate(
        """() => {
            const side = document.querySelector('.side-tool-bar-container')?.getBoundingClientRect();
            const canvas = app.canvas.canvas.getBoundingClientRect();
            return { sideRight: side ? side.right : 0, canvasTop: canvas.top };
        }"""
    )
    # (frontend 1.4x draws its tab bar and graph toolbar over the canvas's top 90 px)
    top = chrome["canvasTop"] + (90 if chrome["canvasTop"] < 20 else 8)
    assert box["x"] >= chrome["sideRight"] + 8 and box["y"] >= top, (box, chrome)
    # Saved back unchanged: the extension's panels add nothing to widgets_values.
    assert state["widgets"] == {str(n["id"]): n.get("widgets_values", []) for n in workflow["nodes"]}
    page.page.screenshot(path=str(ARTIFACTS / f"{path.stem}.png"))
    assert page.console_errors() == []


def test_training_draws_a_live_loss_curve(open_page, comfy_server, server_object_info, comfy_handle, tiny_checkpoint):
    path = ROOT / "workflows" / "SVDiff - Train a subject.json"
    workflow = _prepare(comfy_server, server_object_info, comfy_handle, tiny_checkpoint, path)
    page = open_page(height=1300)
    page.load(workflow, replace_checkpoint=tiny_checkpoint)
    train = dict(steps=TRAIN_STEPS, num_class_images=1, preview_every=0, save_every=0, filename_prefix="browser/live")
    assert page.set_widgets("SVDiffTrain", train) == 1
    page.set_widgets("SVDiffDatasetFromFolder", {"resolution": 64})
    page.set_widgets("EmptyLatentImage", {"width": 64, "height": 64})
    page.set_widgets("KSampler", {"steps": 2})
    # Record every state the curve goes through, then queue as the Run button does.
    page.page.evaluate(
        """async () => {
            const chart = (app.graph.nodes ?? app.graph._nodes).find((n) => n.type === "SVDiffTrain").svdiffChart.element;
            window.__svdiffSeen = [];
            new MutationObserver(() => window.__svdiffSeen.push([chart.dataset.state, Number(chart.dataset.points), chart.dataset.phase]))
                .observe(chart, { attributes: true });
            await app.queuePrompt(0, 1);
        }"""
    )
    page.page.wait_for_function(f"() => {CHART}.dataset.state === 'done'", timeout=600_000, polling=200)
    seen = page.page.evaluate("() => window.__svdiffSeen")
    live = [points for state, points, _ in seen if state == "training" and 0 < points < TRAIN_STEPS]
    assert live, f"the curve was not drawn while training: {seen}"
    assert [p for s, p, _ in seen if s == "training"] == sorted(p for s, p, _ in seen if s == "training")
    # Before the first step the node says what it is doing and how far it got.
    phases = [phase for state, _, phase in seen if state == "preparing"]
    assert any(p.startswith("encoding the images ") for p in phases), seen
    assert any(p.startswith("decomposing the layers ") for p in phases), seen

    # The curve holds exactly the losses the node reports in /history once the prompt is done.
    deadline = time.monotonic() + 600
    entry = None
    while time.monotonic() < deadline and entry is None:
        for item in comfy_server.get_json("/history").values():
            outputs = item.get("outputs", {})
            if any(out.get("svdiff_loss") and len(out["svdiff_loss"]) == TRAIN_STEPS for out in outputs.values()):
                if item["status"].get("completed"):
                    entry = item
        time.sleep(0.5)
    assert entry is not None, comfy_server.log_tail(3000)
    reported = next(out["svdiff_loss"] for out in entry["outputs"].values() if "svdiff_loss" in out)
    drawn = page.page.evaluate("() => (app.graph.nodes ?? app.graph._nodes).find((n) => n.type === 'SVDiffTrain').svdiffChart.losses")
    assert drawn == pytest.approx(reported, abs=1e-6)
    assert page.page.evaluate(f"() => {CHART}.dataset.points") == str(TRAIN_STEPS)
    page.center_on("SVDiffTrain")
    page.screenshot(ARTIFACTS / "loss_curve_on_node.png", "SVDiffTrain")
    page.page.screenshot(path=str(ARTIFACTS / "training_done.png"))
    assert page.console_errors() == []

    # After a page reload (nothing left in the page's memory) the workflow is opened again, as
    # from the queue, a tab or its file: the curve comes back from /history.
    page.reload()
    page.load(workflow, replace_checkpoint=tiny_checkpoint)
    page.page.wait_for_function(f"() => {CHART}.dataset.state === 'done'", timeout=60_000, polling=200)
    restored = page.page.evaluate("() => (app.graph.nodes ?? app.graph._nodes).find((n) => n.type === 'SVDiffTrain').svdiffChart.losses")
    assert restored == pytest.approx(reported, abs=1e-6)
    page.center_on("SVDiffTrain")
    page.screenshot(ARTIFACTS / "loss_curve_after_reload.png", "SVDiffTrain")
    assert page.console_errors() == []


def test_loader_panel_shows_the_file_and_whether_it_fits(server_shifts, open_page, comfy_server, server_object_info,
                                                        comfy_handle, tiny_checkpoint):  # fmt: skip
    path = ROOT / "workflows" / "SVDiff - Apply a shift + LoRA.json"
    workflow = _prepare(comfy_server, server_object_info, comfy_handle, tiny_checkpoint, path)
    page = open_page()
    page.load(workflow, replace_checkpoint=tiny_checkpoint)
    panel = PANEL

    def choose(name: str, expect_state: str) -> dict:
        page.set_widgets("SVDiffLoader", {"shift_name": name})
        page.page.wait_for_function(
            f"""() => {{ const p = {panel}; return p.dataset.state === '{expect_state}' && p.innerText.includes('{Path(name).name if expect_state == "error" else ""}'); }}""",
            timeout=30_000,
        )
        page.page.wait_for_timeout(300)
        return page.page.evaluate(f"() => ({{ ...{panel}.dataset, text: {panel}.innerText }})")

    fits = choose(server_shifts["sd15"], "ok")
    assert (fits["architecture"], fits["fit"], fits["checkpointArchitecture"]) == ("SD15", "fits", "SD15"), fits
    assert f"fit {tiny_checkpoint}" in fits["text"]
    from comfyui_svdiff.svdiff.fileformat import read_shift

    folder = comfy_server.models("spectral_shifts")
    assert read_shift(folder / server_shifts["sd15"]).layer_summary() in fits["text"]  # Inspect's words and numbers
    page.center_on("SVDiffLoader")
    page.screenshot(ARTIFACTS / "shift_info_fits.png", "SVDiffLoader")

    page.page.wait_for_timeout(300)
    other = choose(server_shifts["sdxl"], "ok")
    page.page.wait_for_function(f"() => {panel}.dataset.architecture === 'SDXL'", timeout=30_000)
    other = page.page.evaluate(f"() => ({{ ...{panel}.dataset, text: {panel}.innerText }})")
    assert (other["architecture"], other["fit"], other["checkpointArchitecture"]) == ("SDXL", "does_not_fit", "SD15"), other
    assert "made for SDXL, the model is SD15" in other["text"]
    # The same count of diffusion-model tensors that do not fit as the loader's error when it runs
    # (the run checks the CLIP too and names both parts).
    import re

    import comfy.sd

    from comfyui_svdiff.svdiff.comfy.patching import check_fits
    from comfyui_svdiff.svdiff.targets import ShiftMismatchError

    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(
        str(comfy_server.models("checkpoints") / tiny_checkpoint), output_vae=False, output_clipvision=False
    )
    with pytest.raises(ShiftMismatchError) as refused:
        check_fits(model, clip, read_shift(folder / server_shifts["sdxl"]))
    bad, total = re.search(r"\((\d+) of (\d+) diffusion-model, \d+ of \d+ text-encoder\)", str(refused.value)).groups()
    assert f"{bad} of {total} diffusion-model tensors do not fit" in other["text"], (str(refused.value)[:300], other["text"])
    page.center_on("SVDiffLoader")
    page.screenshot(ARTIFACTS / "shift_info_does_not_fit.png", "SVDiffLoader")

    broken = choose(server_shifts["broken"], "error")
    assert "get the file again" in broken["text"]
    assert page.console_errors() == []
