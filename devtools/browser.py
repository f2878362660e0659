"""Headless Chromium (Debian's ``chromium``) on a real ComfyUI server, through Playwright's library.

Shared by the browser test and ``scripts/workflow_thumbnails.py``. The console is
recorded; :meth:`ComfyPage.console_errors` returns every error except the stock
frontend's requests that fail in a sandbox: optional user files a fresh install does
not have, and hosts outside 127.0.0.1 (no network).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from urllib.parse import urlparse

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# The favicon Chromium asks for, and optional per-user files the stock frontend 1.35.9
# asks for on every start: a fresh install answers 404, which Chromium logs as console
# errors that are not ours.
STOCK_OPTIONAL_FILES = ("/favicon.ico", "/user.css", "/api/userdata/user.css", "/api/userdata/comfy.templates.json")
# Logged by the stock frontend 1.48.7 (ComfyUI v0.33.0) on every start, with no custom
# node installed (its own code reads ``app.rootGraph`` before the graph exists).
STOCK_CONSOLE_ERRORS = ("ComfyApp graph accessed before initialization",)
# A fresh user folder: no first-run template dialog, no minimap over the graph, node
# text drawn at every zoom (thumbnails), no canvas statistics.
USER_SETTINGS = {
    "Comfy.TutorialCompleted": True,
    "Comfy.Minimap.Visible": False,
    "Comfy.Graph.CanvasInfo": False,
    "LiteGraph.Canvas.MinFontSizeForLOD": 0,
}


def find_chromium() -> str | None:
    for candidate in (os.environ.get("CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def prepare_user_dir(base_dir: Path) -> None:
    """The server's user folder as a returning user has it (settings, empty workflow folders)."""
    user = base_dir / "user" / "default"
    for folder in ("workflows", "subgraphs"):
        (user / folder).mkdir(parents=True, exist_ok=True)
    settings = user / "comfy.settings.json"
    if not settings.exists():
        settings.write_text(json.dumps(USER_SETTINGS))


class ComfyPage:
    """One browser tab on the ComfyUI frontend."""

    def __init__(self, browser, url: str, width: int = 1600, height: int = 1000):
        self.url = url
        self.page = browser.new_page(viewport={"width": width, "height": height})
        self.console: list[tuple[str, str, str]] = []  # (type, text, resource url)
        self.page.on("console", lambda m: self.console.append((m.type, m.text, (m.location or {}).get("url", ""))))
        self.page.on("pageerror", lambda e: self.console.append(("pageerror", str(e), "")))

    def open(self, timeout_ms: int = 90_000) -> ComfyPage:
        self.page.goto(self.url + "/")
        return self._ready(timeout_ms)

    def reload(self, timeout_ms: int = 90_000) -> ComfyPage:
        """Reload the tab as a user presses F5 (the frontend restores the open workflow)."""
        self.page.reload()
        return self._ready(timeout_ms)

    def _ready(self, timeout_ms: int) -> ComfyPage:
        self.page.wait_for_function(
            "() => window.app?.graph && window.LiteGraph?.registered_node_types?.SVDiffTrain && window.app.extensionManager",
            timeout=timeout_ms,
        )
        return self

    def load(self, workflow: dict, replace_checkpoint: str | None = None) -> None:
        self.page.evaluate(
            """async ([workflow, checkpoint]) => {
                if (checkpoint) for (const n of workflow.nodes) if (n.type === "CheckpointLoaderSimple") n.widgets_values[0] = checkpoint;
                await app.loadGraphData(workflow);
            }""",
            [workflow, replace_checkpoint],
        )

    def command(self, name: str) -> None:
        self.page.evaluate("async (name) => { await app.extensionManager.command.execute(name); }", name)

    def set_widgets(self, node_type: str, values: dict) -> int:
        """Set widget values on every node of ``node_type``; returns how many nodes."""
        return self.page.evaluate(
            """([type, values]) => {
                const nodes = (app.graph.nodes ?? app.graph._nodes).filter((n) => n.type === type);
                for (const node of nodes) for (const [name, value] of Object.entries(values)) {
                    const widget = node.widgets.find((w) => w.name === name);
                    if (!widget) throw new Error(`${type} has no widget ${name}`);
                    widget.value = value;
                    widget.callback?.(value);
                }
                app.graph.setDirtyCanvas(true, true);
                return nodes.length;
            }""",
            [node_type, values],
        )

    def bounds(self, node_type: str | None = None) -> dict:
        """The screen rectangle around all nodes, or the first node of ``node_type`` (title bars included)."""
        return self.page.evaluate(
            """(type) => {
                const all = app.graph.nodes ?? app.graph._nodes;
                const nodes = type ? [all.find((n) => n.type === type)] : all;
                const ds = app.canvas.ds, rect = app.canvas.canvas.getBoundingClientRect(), title = LiteGraph.NODE_TITLE_HEIGHT;
                let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
                for (const n of nodes) {
                    x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - title);
                    x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
                }
                const s = ds.scale, ox = ds.offset[0], oy = ds.offset[1];
                return { x: rect.left + (x0 + ox) * s, y: rect.top + (y0 + oy) * s, width: (x1 - x0) * s, height: (y1 - y0) * s };
            }""",
            node_type,
        )

    def screenshot(self, path, node_type: str | None = None, margin: int = 12) -> bytes:
        """A picture of the graph, or of the first node of ``node_type``, as drawn on the canvas."""
        box = self.bounds(node_type)
        clip = {
            "x": max(0, box["x"] - margin),
            "y": max(0, box["y"] - margin),
            "width": box["width"] + 2 * margin,
            "height": box["height"] + 2 * margin,
        }
        return self.page.screenshot(path=str(path) if path else None, clip=clip)

    def center_on(self, node_type: str, scale: float = 1.0) -> None:
        """Zoom to ``scale`` with the node in the top-left part of the view."""
        self.page.evaluate(
            """([type, scale]) => {
                const n = (app.graph.nodes ?? app.graph._nodes).find((n) => n.type === type);
                app.canvas.ds.scale = scale;
                app.canvas.ds.offset[0] = -n.pos[0] + 80 / scale;
                app.canvas.ds.offset[1] = -n.pos[1] + 120 / scale;
                app.canvas.setDirty(true, true);
            }""",
            [node_type, scale],
        )
        self.page.wait_for_timeout(500)

    def console_errors(self) -> list[str]:
        errors = []
        for kind, text, url in self.console:
            if kind not in ("error", "pageerror") or text in STOCK_CONSOLE_ERRORS:
                continue
            if text.startswith("Failed to load resource") and url:
                parsed = urlparse(url)
                if parsed.hostname not in ("127.0.0.1", "localhost") or parsed.path in STOCK_OPTIONAL_FILES:
                    continue
            errors.append(f"{kind}: {text} {url}".strip())
        return errors

    def close(self) -> None:
        self.page.close()


def launch(playwright):
    executable = find_chromium()
    if executable is None:
        raise RuntimeError("Chromium not found: apt-get install chromium (or set CHROMIUM to its path)")
    return playwright.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS, headless=True)


@contextlib.contextmanager
def chromium_or_skip():
    """A launched headless Chromium for a pytest fixture; without Playwright or Chromium the
    test is skipped, or fails where ``SVDIFF_REQUIRE_BROWSER=1`` (``.ci/run`` sets it)."""
    import pytest

    required = os.environ.get("SVDIFF_REQUIRE_BROWSER") == "1"
    try:
        from playwright import sync_api
    except ImportError:
        (pytest.fail if required else pytest.skip)("browser tests need Playwright's library: pip install playwright")
    if find_chromium() is None:
        (pytest.fail if required else pytest.skip)("browser tests need Chromium: apt-get install chromium")
    with sync_api.sync_playwright() as playwright:
        browser = launch(playwright)
        try:
            yield browser
        finally:
            browser.close()
