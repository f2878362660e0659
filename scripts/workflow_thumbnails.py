"""Screenshot every workflow in workflows/ as the ComfyUI frontend draws it: workflows/<name>.jpg.

    python scripts/workflow_thumbnails.py [--only NAME]

Starts a real ComfyUI server (temporary base directory, this checkout as a custom node,
the world checkpoint under each workflow's checkpoint name, demo shifts/LoRAs/images),
opens each workflow in headless Chromium and saves the graph area. The template browser
shows these as thumbnails (it asks for <name>.jpg beside <name>.json); the README shows
them as pictures of the workflows. Needs Debian's chromium and `pip install playwright`.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for devtools/

from headless import ROOT, demo_checkpoint, start_comfy  # noqa: E402
from run_workflow import prepare_files  # noqa: E402

from devtools.browser import ComfyPage, launch, prepare_user_dir  # noqa: E402
from devtools.locate import find_comfyui  # noqa: E402
from devtools.server import ComfyServer, ServerDirs, copy_or_link  # noqa: E402
from devtools.workflow_format import ui_to_api  # noqa: E402

MAX_WIDTH = 1400
MARGIN = 24


def place_trained_demo_files(server) -> None:
    """The world model's trained shifts, LoRA and K/V deltas (what Install Demo Files puts in
    place), so the panels describe them; prepare_files makes only what is still missing."""
    from comfyui_svdiff.svdiff.comfy.demo import DEMO_KV, DEMO_LORAS, DEMO_SHIFTS, SHIPPED, copy_model_file

    files = [(name, "spectral_shifts", name) for name in DEMO_SHIFTS] + [(name, "loras", name) for name in DEMO_LORAS + DEMO_KV]
    files += [(name.replace(".safetensors", ".token.safetensors"), "embeddings", name) for name in DEMO_KV]
    for source, folder, name in files:
        target = server.models(folder) / name
        if not target.exists():
            copy_model_file(SHIPPED / source, target)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="one workflow name (file stem)")
    args = parser.parse_args()
    workflows = sorted((ROOT / "workflows").glob("*.json"))
    if args.only:
        workflows = [p for p in workflows if p.stem == args.only]
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="svdiff-thumbs-") as tmp:
        base = Path(tmp) / "server"
        prepare_user_dir(base)
        server = ComfyServer(find_comfyui(), base)
        handle = start_comfy(base_dir=Path(tmp) / "inprocess")
        checkpoint = demo_checkpoint()
        place_trained_demo_files(server)
        for path in workflows:
            workflow = json.loads(path.read_text())
            prompt = ui_to_api(workflow, handle.object_info())
            for entry in prompt.values():
                if entry["class_type"] == "CheckpointLoaderSimple":
                    copy_or_link(checkpoint, server.models("checkpoints") / entry["inputs"]["ckpt_name"])
            prepare_files(ServerDirs(server), prompt, checkpoint)
        server.start()
        try:
            with sync_playwright() as playwright:
                browser = launch(playwright)
                for path in workflows:
                    page = ComfyPage(browser, server.url, width=2200, height=1150).open()
                    page.load(json.loads(path.read_text()))
                    page.command("Workspace.ToggleFocusMode")
                    page.page.wait_for_timeout(400)
                    page.command("Comfy.Canvas.FitView")
                    page.page.wait_for_timeout(1500)  # the info panels ask the server
                    picture = Image.open(io.BytesIO(page.screenshot(None, margin=MARGIN))).convert("RGB")
                    if picture.width > MAX_WIDTH:
                        picture = picture.resize((MAX_WIDTH, round(picture.height * MAX_WIDTH / picture.width)), Image.LANCZOS)
                    target = path.with_suffix(".jpg")
                    picture.save(target, quality=85, optimize=True)
                    errors = page.console_errors()
                    print(
                        f"wrote {target.relative_to(ROOT)} ({picture.width}×{picture.height})" + (f"; console: {errors}" if errors else "")
                    )
                    page.close()
                browser.close()
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
