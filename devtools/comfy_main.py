"""What ComfyUI's ``main.py`` and ``server.py`` do, done in this process.

The pieces of start-up and of the HTTP server the in-process harness
(:mod:`devtools.harness`) needs: ComfyUI's root first on ``sys.path``, the CLI
arguments set without parsing ``sys.argv``, ``folder_paths`` pointed at a base
directory, the progress hook, ``PromptServer.instance``, the executor's cache
arguments and one ``/object_info`` entry. Nothing of ComfyUI is copied; each mirrored
piece cites the original by file:line (ComfyUI v0.8.0 unless v0.33.0 is named).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from devtools.recording import RecordingServer

log = logging.getLogger(__name__)

#: ComfyUI top-level module names that must come from the ComfyUI root. ``nodes`` and
#: ``utils`` are generic: this repository itself has a ``nodes/`` package.
COMFY_TOPLEVEL = ("nodes", "execution", "folder_paths", "comfy", "comfy_execution", "comfy_api", "utils")
#: The sub-directories ComfyUI keeps under ``--base-directory``.
BASE_SUBDIRS = ("models", "input", "output", "temp", "user", "custom_nodes")


def put_root_first(root: Path) -> None:
    """ComfyUI's root must be ``sys.path[0]``: ``nodes``/``utils`` are generic names.

    When pytest or ``python -m`` run from this repository, ``''``/the repo root is on
    ``sys.path`` and ``import nodes`` would find this repo's ``nodes/`` package instead
    of ComfyUI's ``nodes.py``.
    """
    s = str(root)
    while s in sys.path:
        sys.path.remove(s)
    sys.path.insert(0, s)
    for name in COMFY_TOPLEVEL:
        mod = sys.modules.get(name)
        if mod is None:
            continue
        f = getattr(mod, "__file__", None) or next(iter(getattr(mod, "__path__", []) or []), None)
        if f and not os.path.realpath(f).startswith(os.path.realpath(s) + os.sep):
            raise RuntimeError(
                f"module {name!r} is already imported from {f}, not from ComfyUI at {s}; "
                "import devtools.harness / call setup_comfyui() before anything imports it"
            )


def configure_args(cpu: bool, base: Path) -> None:
    """Set ``comfy.cli_args.args`` before ComfyUI reads them.

    * ``comfy.options.args_parsing`` defaults to False, so importing ``comfy.cli_args``
      parses ``[]`` instead of ``sys.argv`` (cli_args.py:235-238). It is forced back to
      False if something turned it on but ``comfy.cli_args`` is not imported yet.
    * ``args.cpu = True`` is exactly what ``--cpu`` does; it is read at import time of
      ``comfy.model_management`` (model_management.py:142 -> ``cpu_state = CPU``,
      :412-413 -> ``vram_state = DISABLED``). Without it, importing model_management on
      a machine without CUDA driver fails in ``torch.cuda.current_device()``.
    * ``args.base_directory`` (``--base-directory``) is read when ``folder_paths`` is
      imported (folder_paths.py:17-20); if that already happened, directories are
      re-pointed by :func:`point_folder_paths` instead.
    """
    import comfy.options

    if "comfy.cli_args" not in sys.modules and comfy.options.args_parsing:
        log.warning("comfy.options.args_parsing was enabled; disabling it so sys.argv is not parsed")
        comfy.options.enable_args_parsing(False)
    import comfy.cli_args

    args = comfy.cli_args.args
    if cpu:
        args.cpu = True
    if "folder_paths" not in sys.modules:
        args.base_directory = str(base)

    if cpu and "comfy.model_management" in sys.modules:
        # Imported before us (only possible where CUDA works): switch what --cpu sets.
        import comfy.model_management as mm

        if mm.cpu_state != mm.CPUState.CPU:
            log.warning("comfy.model_management was imported before setup_comfyui(); forcing CPU state")
            mm.cpu_state = mm.CPUState.CPU
            mm.vram_state = mm.VRAMState.DISABLED


def point_folder_paths(base: Path) -> None:
    """Point ``folder_paths`` at ``base``: models/, input/, output/, temp/, user/, custom_nodes/.

    ``folder_paths`` has no single "set base" function. ``--base-directory`` works only
    before import (module globals ``base_path``, ``models_dir``, every
    ``folder_names_and_paths`` entry and the four directories are computed at import,
    folder_paths.py:17-58). So: every configured path under the old ``base_path`` is
    rewritten to the same relative place under ``base`` (this moves "checkpoints",
    "loras", ... and also folders an extension registered under ``models_dir``), the
    module globals are replaced, and the directories are set with
    ``set_output_directory`` / ``set_input_directory`` / ``set_temp_directory`` /
    ``set_user_directory`` (folder_paths.py:108-137). Then, as ``main.py``'s
    ``apply_custom_paths`` does (main.py:91-97), ``output/{checkpoints,clip,vae,
    diffusion_models,loras}`` are added as extra model folders. Finally the file-list
    cache is cleared. ``extra_model_paths.yaml`` of the ComfyUI checkout is *not* read,
    so tests never see the user's real models.
    """
    import folder_paths

    base = Path(base).resolve()
    for sub in BASE_SUBDIRS:
        (base / sub).mkdir(parents=True, exist_ok=True)
    old = os.path.abspath(folder_paths.base_path)
    new = str(base)
    if old != new:
        for paths, _exts in list(folder_paths.folder_names_and_paths.values()):
            moved = []
            for p in paths:
                ap = os.path.abspath(p)
                if ap == old or ap.startswith(old + os.sep):
                    p = os.path.join(new, os.path.relpath(ap, old))
                if p not in moved:
                    moved.append(p)
            paths[:] = moved
    folder_paths.base_path = new
    folder_paths.models_dir = os.path.join(new, "models")
    folder_paths.set_output_directory(os.path.join(new, "output"))
    folder_paths.set_input_directory(os.path.join(new, "input"))
    folder_paths.set_temp_directory(os.path.join(new, "temp"))
    folder_paths.set_user_directory(os.path.join(new, "user"))
    out = folder_paths.get_output_directory()
    for name in ("checkpoints", "clip", "vae", "diffusion_models", "loras"):
        folder_paths.add_model_folder_path(name, os.path.join(out, name))
    folder_paths.filename_list_cache.clear()


def install_progress_hook(server: RecordingServer) -> None:
    """Equivalent of ``main.hijack_progress`` (main.py:284-313).

    ``comfy.utils.ProgressBar`` calls a global hook on every update; ComfyUI's hook
    (a) raises ``InterruptProcessingException`` if an interrupt is pending (this is what
    makes sampling interruptible), (b) updates the progress registry, which emits
    ``progress_state`` messages, and (c) sends a ``progress`` message. Preview images
    are recorded as the binary ``UNENCODED_PREVIEW_IMAGE`` event only because no
    client advertises ``supports_preview_metadata``.
    """
    import comfy.model_management
    import comfy.utils
    from comfy_execution.progress import get_progress_state
    from comfy_execution.utils import get_executing_context

    try:
        from protocol import BinaryEventTypes

        unencoded_preview = BinaryEventTypes.UNENCODED_PREVIEW_IMAGE
    except Exception:  # pragma: no cover
        unencoded_preview = 2  # protocol.py:4 in v0.8.0

    def hook(value, total, preview_image, prompt_id=None, node_id=None):
        ctx = get_executing_context()
        if ctx is not None:
            prompt_id = prompt_id if prompt_id is not None else ctx.prompt_id
            node_id = node_id if node_id is not None else ctx.node_id
        comfy.model_management.throw_exception_if_processing_interrupted()
        prompt_id = prompt_id if prompt_id is not None else server.last_prompt_id
        node_id = node_id if node_id is not None else server.last_node_id
        get_progress_state().update_progress(node_id, value, total, preview_image)
        server.send_sync("progress", {"value": value, "max": total, "prompt_id": prompt_id, "node": node_id}, server.client_id)
        if preview_image is not None:
            server.send_sync(unencoded_preview, preview_image, server.client_id)

    comfy.utils.set_progress_bar_global_hook(hook)


def register_prompt_server(server: RecordingServer) -> None:
    """Make ``server.PromptServer.instance`` the recording server, if ``server`` imports.

    Some built-in nodes (comfy_extras/nodes_images.py:12, 522) and many custom nodes use
    ``PromptServer.instance``; custom nodes often register routes on it at import time.
    ``server.py`` imports the frontend manager, which needs ``requests``; if that fails
    the nodes depending on it fail to import exactly as in ComfyUI (logged, skipped).
    """
    try:
        import server as comfy_server
    except Exception as exc:
        log.info("ComfyUI's server module is not importable (%s); PromptServer.instance not set", exc)
        return
    if getattr(comfy_server.PromptServer, "instance", None) is None:
        comfy_server.PromptServer.instance = server


def executor_cache_args(cache_type: Any) -> dict:
    """The ``cache_args`` that ``main.py``'s ``prompt_worker`` gives ``PromptExecutor``.

    v0.8.0 passes ``{"lru": N, "ram": GB}`` (main.py:208; ``--cache-ram`` is one float).
    v0.33.0 reads ``"ram"`` and ``"ram_inactive"`` as numbers on every prompt
    (execution.py:745-746); ``--cache-ram`` takes up to two values there, and without
    them main.py derives both from the machine's RAM for the RAM-pressure cache and
    uses 0 otherwise (main.py:329-349).
    """
    import execution
    from comfy.cli_args import args

    lru = args.cache_lru or (100 if cache_type == execution.CacheType.LRU else 0)
    ram = args.cache_ram
    if not isinstance(ram, list):
        return {"lru": lru, "ram": ram}
    active = inactive = 0.0
    if cache_type == execution.CacheType.RAM_PRESSURE:
        import comfy.model_management

        total_gb = comfy.model_management.total_ram / 1024.0
        active, inactive = min(10.0, max(2.0, total_gb * 0.10)), min(128.0, total_gb)
    if len(ram) > 0:
        active = ram[0]
    if len(ram) > 1:
        inactive = ram[1]
    return {"lru": lru, "ram": active, "ram_inactive": inactive}


def node_info(node_class: str) -> dict:
    """One entry of /object_info, computed like ``node_info`` in server.py:649-682."""
    from comfy_api.internal import _ComfyNodeInternal

    import nodes

    cls = nodes.NODE_CLASS_MAPPINGS[node_class]
    if issubclass(cls, _ComfyNodeInternal):
        return cls.GET_NODE_INFO_V1()
    input_types = cls.INPUT_TYPES()
    info: dict[str, Any] = {
        "input": input_types,
        "input_order": {k: list(v.keys()) for k, v in cls.INPUT_TYPES().items()},
        "output": cls.RETURN_TYPES,
        "output_is_list": getattr(cls, "OUTPUT_IS_LIST", [False] * len(cls.RETURN_TYPES)),
        "output_name": getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES),
        "name": node_class,
        "display_name": nodes.NODE_DISPLAY_NAME_MAPPINGS.get(node_class, node_class),
        "description": getattr(cls, "DESCRIPTION", ""),
        "python_module": getattr(cls, "RELATIVE_PYTHON_MODULE", "nodes"),
        "category": getattr(cls, "CATEGORY", "sd"),
        "output_node": bool(getattr(cls, "OUTPUT_NODE", False) == True),  # noqa: E712 - server.py:664
    }
    if hasattr(cls, "OUTPUT_TOOLTIPS"):
        info["output_tooltips"] = cls.OUTPUT_TOOLTIPS
    if getattr(cls, "DEPRECATED", False):
        info["deprecated"] = True
    if getattr(cls, "EXPERIMENTAL", False):
        info["experimental"] = True
    if hasattr(cls, "API_NODE"):
        info["api_node"] = cls.API_NODE
    return info
