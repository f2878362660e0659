"""Make ComfyUI importable and force its CPU mode before tiny models are built.

See the "CPU setup" section of :mod:`devtools.tiny_models` for why this must run
before anything imports ``comfy.model_management``.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading

_HOSTED = threading.local()


@contextlib.contextmanager
def inside_running_comfyui():
    """Build models in a ComfyUI that is already set up (a server on its own device):
    :func:`prepare_comfy_cpu` leaves the device settings as they are meanwhile."""
    depth = getattr(_HOSTED, "depth", 0)
    _HOSTED.depth = depth + 1
    try:
        yield
    finally:
        _HOSTED.depth = depth


def prepare_comfy_cpu(comfyui_root: str | os.PathLike | None = None) -> None:
    """Make ComfyUI importable and force its CPU mode (the ``--cpu`` flag).

    Must run before anything imports ``comfy.model_management``; on a
    CUDA-less machine that import otherwise crashes.  Safe to call repeatedly.
    ``comfyui_root`` (or ``$COMFYUI_PATH``) is put on ``sys.path`` if given.
    """
    if getattr(_HOSTED, "depth", 0):
        return
    root = comfyui_root if comfyui_root is not None else os.environ.get("COMFYUI_PATH")
    if root is not None:
        root = os.path.abspath(os.path.expanduser(str(root)))
        if root not in sys.path:
            sys.path.insert(0, root)

    already_imported = "comfy.model_management" in sys.modules
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.model_management as mm

    if already_imported and mm.cpu_state != mm.CPUState.CPU:
        # Same globals the import-time ``if args.cpu:`` branch would set.
        mm.cpu_state = mm.CPUState.CPU
        mm.vram_state = mm.VRAMState.DISABLED
