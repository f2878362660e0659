"""Test-side bridge to a real, headless ComfyUI (v0.8.0 … v0.33.0): setup, prompts, object_info.

Used by the pytest integration tier, the headless scripts and the benchmarks. It
drives ComfyUI's *own* machinery (``nodes.load_custom_node``, ``execution.validate_prompt``,
``execution.PromptExecutor``) exactly the way ``main.py``/``server.py`` do, but without
the aiohttp server, the websocket or the prompt queue. Nothing of ComfyUI is copied;
where ComfyUI logic has to be mirrored (``/object_info``, the frontend's UI -> API
conversion) the original is cited by file:line so it can be re-checked on upgrades.
Line numbers refer to ComfyUI v0.8.0 and comfyui-frontend-package 1.35.9 unless a
docstring names v0.33.0.

Public API (all module-level functions use one process-wide :class:`~devtools.handle.ComfyHandle`)::

    setup_comfyui(base_dir=None, *, cpu=True, api_nodes=False) -> ComfyHandle
    load_extension(path) -> str                       # sys.modules name ComfyUI gave it
    validate(prompt, *, partial_execution_targets=None) -> ValidationResult
    run_prompt(prompt, *, client_id=..., timeout=300, fresh_executor=False, ...) -> PromptResult
    object_info(node_types=None) -> dict              # same JSON as GET /object_info

Elsewhere in :mod:`devtools`: ``locate.find_comfyui()`` (which ComfyUI),
``workflow_format.ui_to_api(workflow, object_info)`` (UI-format workflow -> API prompt),
``handle`` (:class:`~devtools.handle.ComfyHandle`), ``results`` (``PromptResult``,
``ValidationResult``), ``recording`` (the stand-in server), ``comfy_main`` (the pieces
of ``main.py``/``server.py`` done in process). Self-check: ``python -m devtools.harness``.

ComfyUI quirks the harness takes care of (details in the docstrings of :mod:`devtools.comfy_main`
and :mod:`devtools.handle`):

* ``comfy.cli_args`` parses ``sys.argv`` only if ``comfy.options.enable_args_parsing()``
  ran first (cli_args.py:235-238); ``main.py`` does that (main.py:1-2), we must not,
  or pytest's argv would be parsed and ``argparse`` would exit.
* ``--cpu`` is nothing but ``args.cpu = True`` read once when ``comfy.model_management``
  is imported (model_management.py:142, 412-413); it must be set before that import.
* ``folder_paths`` computes every default directory at import time from
  ``args.base_directory`` (folder_paths.py:17-58) and caches file lists by directory mtime
  (folder_paths.py:392-426).
* ``nodes.init_extra_nodes`` and ``nodes.load_custom_node`` are coroutines in v0.8.0
  (nodes.py:2135, 2426), and so are ``execution.validate_prompt`` (execution.py:999) and
  ``PromptExecutor.execute_async`` (execution.py:675).
* Messages are only sent to the server object when a ``client_id`` is set
  (execution.py:419, 469, 538, 641) and, worse, the UI outputs of *cached* nodes are
  only put into the history when a ``client_id`` is set (execution.py:418-423). So
  :func:`run_prompt` always uses a client id unless told otherwise.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from devtools import locate
from devtools.comfy_main import configure_args, install_progress_hook, point_folder_paths, put_root_first, register_prompt_server
from devtools.handle import ComfyHandle
from devtools.locate import ENV_VAR, find_comfyui, is_comfyui_root
from devtools.results import PromptResult, ValidationResult
from devtools.runtime import run_coro
from devtools.workflow_format import ui_to_api

log = logging.getLogger(__name__)

_HANDLE: ComfyHandle | None = None
_SETUP_LOCK = threading.RLock()


def get_handle() -> ComfyHandle | None:
    """The process-wide handle, or None before :func:`setup_comfyui`."""
    return _HANDLE


def setup_comfyui(
    base_dir: str | os.PathLike | None = None,
    *,
    comfyui_root: str | os.PathLike | None = None,
    cpu: bool = True,
    api_nodes: bool = False,
) -> ComfyHandle:
    """Configure and initialise ComfyUI in this process (idempotent); return the handle.

    1. ``comfyui_root`` or :func:`devtools.locate.find_comfyui` goes to ``sys.path[0]``.
    2. ``comfy.cli_args.args``: no argv parsing, ``cpu=True``, ``base_directory`` (see
       :func:`devtools.comfy_main.configure_args`), then ``comfy.model_management`` is imported (CPU).
    3. ``folder_paths`` points at ``base_dir`` (default: a fresh temp dir removed at
       exit) - :func:`devtools.comfy_main.point_folder_paths`.
    4. Built-in nodes: ``nodes.init_public_apis()``, ``nodes.init_builtin_extra_nodes()``
       and, if ``api_nodes``, ``nodes.init_builtin_api_nodes()`` - the parts of
       ``nodes.init_extra_nodes`` (nodes.py:2426-2462) minus scanning
       ``custom_nodes/``, wrapped in ``hook_breaker_ac10a0.save/restore_functions`` as in
       main.py:357-362. Files that fail to import (no ``torchaudio`` -> audio nodes; no
       ``requests`` -> ``server`` -> ``nodes_images.py``) are logged and listed in
       ``handle.import_failed``, exactly as ComfyUI tolerates them.
    5. A :class:`devtools.recording.RecordingServer`, the progress hook of ``main.py`` and one
       ``execution.PromptExecutor`` with ``CacheType.CLASSIC`` (the server default).

    Executor caching (execution.py:105-138, 675-747): the executor's caches survive
    between prompts. With CLASSIC, a node whose class, constant inputs, upstream
    signatures and ``IS_CHANGED``/``fingerprint_inputs`` are unchanged is not executed
    again - it is listed in the ``execution_cached`` message and its stored ui output is
    re-sent (output nodes like SaveImage included, so they do not save again). Outputs
    of nodes absent from the new prompt are evicted; a node that raised is not cached,
    so it runs again next time. Use ``run_prompt(..., fresh_executor=True)`` or
    ``handle.reset_executor("NONE")`` when a test needs every node to execute.

    Calling again returns the same handle; a different ``base_dir`` re-points
    ``folder_paths`` there (handy with pytest's ``tmp_path``). ``cpu``/``api_nodes``
    cannot change after the first call.
    """
    global _HANDLE
    with _SETUP_LOCK:
        if _HANDLE is not None:
            if base_dir is not None and Path(base_dir).resolve() != _HANDLE.base_dir:
                _HANDLE.set_base_dir(base_dir)
            return _HANDLE

        t0 = time.perf_counter()
        root = Path(comfyui_root).expanduser().resolve() if comfyui_root else find_comfyui()
        if root is None or not is_comfyui_root(root):
            raise RuntimeError(f"no ComfyUI found (set {ENV_VAR} to a ComfyUI v0.8.0 checkout); got {root}")
        owns = base_dir is None
        base = Path(base_dir).resolve() if base_dir is not None else Path(tempfile.mkdtemp(prefix="devtools_comfy_"))
        base.mkdir(parents=True, exist_ok=True)

        put_root_first(root)
        configure_args(cpu, base)
        import comfy.model_management  # noqa: F401  - device is probed here (CPU)
        import folder_paths

        point_folder_paths(base)

        import comfy.utils  # noqa: F401
        import execution  # noqa: F401
        import hook_breaker_ac10a0

        import nodes

        handle = ComfyHandle(root, base, owns, cpu)
        try:
            import comfyui_version

            handle.version = comfyui_version.__version__
        except Exception:
            handle.version = None
        register_prompt_server(handle.server)

        async def init_nodes():
            await nodes.init_public_apis()
            failed = list(await nodes.init_builtin_extra_nodes())
            if api_nodes:
                failed += list(await nodes.init_builtin_api_nodes())
            return failed

        hook_breaker_ac10a0.save_functions()
        try:
            handle.import_failed = run_coro(init_nodes)
        finally:
            hook_breaker_ac10a0.restore_functions()
        if handle.import_failed:
            log.warning("ComfyUI built-in node files that failed to import (missing optional deps): %s", ", ".join(handle.import_failed))
        handle.builtin_node_names = frozenset(nodes.NODE_CLASS_MAPPINGS)
        install_progress_hook(handle.server)
        handle.reset_executor()
        put_root_first(root)  # re-check nothing shadowed ComfyUI's modules meanwhile
        handle.setup_seconds = time.perf_counter() - t0
        log.info(
            "ComfyUI %s at %s ready in %.1fs (base %s, %d node types)",
            handle.version,
            root,
            handle.setup_seconds,
            base,
            len(nodes.NODE_CLASS_MAPPINGS),
        )
        if owns:
            atexit.register(shutil.rmtree, str(base), True)
        _HANDLE = handle
        assert folder_paths.base_path == str(base)
        return handle


def _require() -> ComfyHandle:
    if _HANDLE is None:
        raise RuntimeError("call setup_comfyui() first")
    return _HANDLE


# -- module-level conveniences --------------------------------------------------------


def load_extension(path: str | os.PathLike, *, reload: bool = False) -> str:
    """:meth:`ComfyHandle.load_extension` on the process-wide handle (sets it up if needed)."""
    return (setup_comfyui() if _HANDLE is None else _HANDLE).load_extension(path, reload=reload)


def run_prompt(prompt: Mapping, **kwargs) -> PromptResult:
    """:meth:`ComfyHandle.run_prompt` on the process-wide handle."""
    return _require().run_prompt(prompt, **kwargs)


def validate(prompt: Mapping, **kwargs) -> ValidationResult:
    """:meth:`ComfyHandle.validate` on the process-wide handle."""
    return _require().validate(prompt, **kwargs)


def object_info(node_types: Iterable[str] | None = None) -> dict[str, dict]:
    """:meth:`ComfyHandle.object_info` on the process-wide handle."""
    return _require().object_info(node_types)


# ---------------------------------------------------------------------------------
# Self-check: python -m devtools.harness
# ---------------------------------------------------------------------------------


def _main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Set up a headless ComfyUI and report what was found.")
    ap.add_argument("--extension", action="append", default=[], help="custom-node directory to load")
    ap.add_argument("--object-info", metavar="OUT.json", help="write /object_info JSON here")
    ap.add_argument("--convert", metavar="WORKFLOW.json", help="print the API prompt for a UI workflow")
    ap.add_argument("--list", action="store_true", help="print '<version>\\t<root>' for every ComfyUI found (newest first) and exit")
    ns = ap.parse_args(argv)
    if ns.list:
        return locate.main(["--list"])
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print("ComfyUI:", find_comfyui())  # noqa: T201 - CLI output
    h = setup_comfyui()
    print(f"version {h.version}, setup {h.setup_seconds:.1f}s, base {h.base_dir}, failed imports: {h.import_failed}")  # noqa: T201 - CLI output
    for ext in ns.extension:
        name = h.load_extension(ext)
        print(f"loaded {ext} as {name!r}: {h.extension_nodes[os.path.abspath(ext)]}")  # noqa: T201 - CLI output
    if ns.object_info or ns.convert:
        info = h.object_info()
        if ns.object_info:
            Path(ns.object_info).write_text(json.dumps(info, indent=1))
        if ns.convert:
            print(json.dumps(ui_to_api(json.loads(Path(ns.convert).read_text()), info), indent=2))  # noqa: T201 - CLI output
    return 0


if __name__ == "__main__":
    sys.exit(_main())
