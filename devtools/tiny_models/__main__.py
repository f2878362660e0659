"""``python -m devtools.tiny_models [--comfyui PATH]``: the sanity run of every tiny builder."""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time

import devtools.tiny_models as tiny_models
from devtools.tiny_models.configs import ARCHS
from devtools.tiny_models.cpu import prepare_comfy_cpu
from devtools.tiny_models.sanity import sanity_check


def main() -> None:
    ap = argparse.ArgumentParser(description=tiny_models.__doc__.splitlines()[0])
    ap.add_argument(
        "--comfyui",
        default=os.environ.get("COMFYUI_PATH", os.path.expanduser("~/ComfyUI")),
        help="ComfyUI root directory (default: $COMFYUI_PATH or ~/ComfyUI)",
    )
    ap.add_argument("--archs", nargs="*", default=list(ARCHS), choices=ARCHS)
    ap.add_argument(
        "--no-checkpoint",
        action="store_true",
        help="skip the single-file checkpoint round trip",
    )
    ns = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    t0 = time.perf_counter()
    prepare_comfy_cpu(ns.comfyui)
    import comfy.sd  # noqa: F401  (timed: the first comfy import dominates start-up)

    print(f"import comfy.sd in CPU mode: {time.perf_counter() - t0:.2f} s")  # noqa: T201 - CLI output
    with tempfile.TemporaryDirectory() as d:
        sanity_check(ns.archs, checkpoint_dir=None if ns.no_checkpoint else d)
    print("OK")  # noqa: T201 - CLI output


if __name__ == "__main__":
    main()
