"""A new user's first hour, in headless Chromium on a fresh ComfyUI server.

Nothing is prepared but the extension itself: no checkpoint, no shift, no photo. The
user opens the template browser (Workflow → Browse Templates → Extensions →
ComfyUI-SVDiff), finds every shipped workflow there under its title with a thumbnail,
runs "Start here", which installs the demo files and refreshes the loaders' lists, then
opens every other workflow from the template browser and queues it exactly as shipped:
no missing-file or validation message, the run succeeds, its outputs appear on the
nodes. Screenshots go to artifacts/browser/first_hour_*.png.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from devtools.browser import ComfyPage, chromium_or_skip, prepare_user_dir
from devtools.locate import find_comfyui
from devtools.server import INSTALL_NAME, ComfyServer, error_of

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "artifacts" / "browser"
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
START_HERE = next(p for p in WORKFLOWS if json.loads(p.read_text())["extra"].get("svdiff_id") == "start_here")
CATEGORY = "ComfyUI-SVDiff"  # the label locales/en/main.json gives the folder name comfyui-svdiff
NODES = "(app.graph.nodes ?? app.graph._nodes)"
RUN_TIMEOUT = 1500  # as shipped a workflow takes up to ~2 min here; a loaded machine can take many times that


@pytest.fixture(scope="module")
def fresh_server(tmp_path_factory, comfy_handle):
    """A ComfyUI server as a new user has it: the extension cloned into custom_nodes/ and nothing else."""
    base = tmp_path_factory.mktemp("first-hour")
    prepare_user_dir(base)
    server = ComfyServer(find_comfyui(), base)
    server.start(env={"SVDIFF_CACHE_DIR": str(tmp_path_factory.mktemp("first-hour-cache"))})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def page(fresh_server):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with chromium_or_skip() as browser:
        tab = ComfyPage(browser, fresh_server.url, 1600, 1000).open()
        yield tab
        tab.close()


def _open_category(page: ComfyPage) -> None:
    page.command("Comfy.BrowseTemplates")
    page.page.get_by_text(CATEGORY, exact=True).first.click(timeout=30_000)
    page.page.wait_for_timeout(1500)


def _open_template(page: ComfyPage, path: Path) -> None:
    """As a user does: the template browser, the extension's category, the card."""
    _open_category(page)
    page.page.get_by_text(path.stem, exact=True).first.click(timeout=30_000)
    count = len(json.loads(path.read_text())["nodes"])
    page.page.wait_for_function(f"() => {NODES}.length === {count} && !document.querySelector('[role=dialog]')", timeout=30_000)
    page.page.wait_for_timeout(800)


def _dialogs(page: ComfyPage) -> list[str]:
    return page.page.evaluate(
        "() => [...document.querySelectorAll('[role=dialog], .p-dialog')].map((d) => d.innerText.trim()).filter(Boolean)"
    )


def _queue_and_wait(page: ComfyPage, server: ComfyServer, name: str) -> dict:
    """Queue as the Run button does; the new /history entry once it finished. Fails at once
    on a message the frontend shows instead (a validation error names the missing file)."""
    before = set(server.get_json("/history"))
    page.page.evaluate("async () => { await app.queuePrompt(0, 1); }")
    deadline = time.monotonic() + RUN_TIMEOUT
    while time.monotonic() < deadline:
        new = set(server.get_json("/history")) - before
        if new:
            return server.get_json("/history")[new.pop()]
        shown = _dialogs(page)
        if shown and not server.running():
            pytest.fail(f"{name}: the frontend says {shown}\n{server.log_tail(2000)}")
        time.sleep(1.0)
    pytest.fail(f"{name} did not finish within {RUN_TIMEOUT} s\n{server.log_tail(3000)}")


def test_template_browser_lists_every_workflow_with_title_and_thumbnail(page, fresh_server):
    _open_category(page)
    heading_and_cards = page.page.evaluate("() => document.querySelector('[role=dialog]').innerText")
    missing = [p.stem for p in WORKFLOWS if p.stem not in heading_and_cards]
    assert not missing, f"the template browser does not show {missing}"
    assert CATEGORY in heading_and_cards and INSTALL_NAME not in heading_and_cards  # the label, not the folder name
    # Each card's picture, found from its title (frontend 1.48 shows the thumbnails as blob: URLs).
    titles = [p.stem for p in WORKFLOWS]
    page.page.wait_for_function(
        """(titles) => titles.every((title) => {
            const label = [...document.querySelectorAll('[role=dialog] *')].find((e) => e.childElementCount === 0 && e.textContent.trim() === title);
            let card = label;
            while (card && !card.querySelector('img')) card = card.parentElement;
            const img = card?.querySelector('img');
            return img && img.complete && img.naturalWidth >= 200;
        })""",
        arg=titles,
        timeout=30_000,
    )
    page.page.screenshot(path=str(ARTIFACTS / "first_hour_template_browser.png"))
    page.page.keyboard.press("Escape")
    assert page.console_errors() == []


def test_start_here_installs_the_demo_files_and_refreshes_the_lists(page, fresh_server):
    assert not (fresh_server.base_dir / "models" / "checkpoints" / "svdiff_world_sd15.safetensors").exists()
    _open_template(page, START_HERE)
    assert _dialogs(page) == []
    entry = _queue_and_wait(page, fresh_server, START_HERE.stem)
    assert error_of(entry) is None, f"{error_of(entry)}\n{fresh_server.log_tail(3000)}"
    report = "\n".join(text for out in entry["outputs"].values() for text in out.get("text", []))
    assert "9 written, 0 already in place" in report, report
    # The extension asks the frontend to refresh its lists: a new loader offers the demo files.
    page.page.wait_for_function(
        """() => {
            const node = LiteGraph.createNode('CheckpointLoaderSimple');
            return node.widgets[0].options.values.includes('svdiff_world_sd15.safetensors');
        }""",
        timeout=30_000,
    )
    page.page.screenshot(path=str(ARTIFACTS / "first_hour_start_here.png"))
    assert page.console_errors() == []


@pytest.mark.parametrize("path", [p for p in WORKFLOWS if p != START_HERE], ids=lambda p: p.stem)
def test_every_workflow_runs_from_the_template_browser_as_shipped(page, fresh_server, path):
    if not (fresh_server.base_dir / "models" / "checkpoints" / "svdiff_world_sd15.safetensors").exists():
        pytest.fail("the Start here workflow did not install the demo files (see the test before)")
    _open_template(page, path)
    assert _dialogs(page) == [], "a message appeared when the workflow opened"
    started = time.perf_counter()
    entry = _queue_and_wait(page, fresh_server, path.stem)
    seconds = time.perf_counter() - started
    assert error_of(entry) is None, f"{error_of(entry)}\n{fresh_server.log_tail(3000)}"
    assert _dialogs(page) == [], "a message appeared while the workflow ran"
    # Outputs appear: every image-saving node reported images, and the page has them for the node.
    prompt = entry["prompt"][2]
    savers = [nid for nid, e in prompt.items() if e["class_type"] in ("SaveImage", "PreviewImage")]
    for nid in savers:
        assert entry["outputs"].get(nid, {}).get("images"), f"{prompt[nid]['class_type']} {nid} shows no image"
    if savers:
        page.page.wait_for_function(
            f"""() => {json.dumps(savers)}.every((id) => {{
                const out = app.nodeOutputs?.[id] ?? app.nodeOutputs?.[Number(id)];
                const node = app.graph.getNodeById(Number(id));
                return (out?.images?.length ?? 0) > 0 || (node?.imgs?.length ?? 0) > 0;
            }})""",
            timeout=30_000,
        )
    page.page.screenshot(path=str(ARTIFACTS / f"first_hour_{path.stem.removeprefix('SVDiff - ')}.png"))
    sys.__stderr__.write(f"\n[first hour] {path.stem}: ran from the UI in {seconds:.0f} s\n")
    assert page.console_errors() == []
