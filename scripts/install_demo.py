"""Put the demo files the example workflows use into a ComfyUI's models/ and input/ folders.

    python scripts/install_demo.py [--comfyui DIR] [--base-directory DIR]

The same as the "Install Demo Files (SVDiff)" node: the world model
(svdiff_world_sd15.safetensors, ~290 MB: a small SD1.5-layout model trained on pictures
of coloured shapes, 64x64), two shifts, a LoRA and K/V deltas with their token trained
on it, subject pictures and a photo to edit.
Idempotent: files already in place are left alone. Run it with that ComfyUI's Python
environment; the ComfyUI is the one this extension is installed in, else COMFYUI_PATH,
else the newest ~/ComfyUI*.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from headless import start_comfy  # also puts the repository root on sys.path, for devtools/


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfyui", type=Path, help="the ComfyUI folder (default: the one this extension is installed in)")
    parser.add_argument(
        "--base-directory", type=Path, help="ComfyUI's --base-directory, when the server runs with one (default: the ComfyUI folder)"
    )
    args = parser.parse_args()
    if args.comfyui is not None:
        os.environ["COMFYUI_PATH"] = str(args.comfyui.expanduser().resolve())
    from devtools.locate import find_comfyui

    root = find_comfyui()
    if root is None:
        raise SystemExit("ComfyUI not found: give --comfyui DIR (a ComfyUI folder; tested: v0.8.0, v0.33.0)")
    base = (args.base_directory or root).expanduser().resolve()
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    start_comfy(base_dir=base)  # ComfyUI's folders under base, as the server sees them
    from comfyui_svdiff.svdiff.comfy.demo import install_demo_files

    print(f"demo files for the SVDiff workflows, in {base} …", flush=True)
    try:
        placed = install_demo_files()
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    for item in placed:
        print(f"  {item.status}: {item.path.relative_to(base) if item.path.is_relative_to(base) else item.path}")
    written = sum(p.status == "written" for p in placed)
    print(f"{written} written, {len(placed) - written} already in place.")
    print("Start ComfyUI (or press R in the browser), then Workflow → Browse Templates → Extensions → ComfyUI-SVDiff.")
    print("The world model draws 64x64 coloured shapes; pick your own checkpoint for real pictures.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
