"""The handle on a configured, headless ComfyUI in this process: directories, extensions, prompts.

:class:`ComfyHandle` is made by :func:`devtools.harness.setup_comfyui`. It drives
ComfyUI's *own* machinery (``nodes.load_custom_node``, ``execution.validate_prompt``,
``execution.PromptExecutor``) the way ``main.py``/``server.py`` do, without the aiohttp
server, the websocket or the prompt queue (see :mod:`devtools.harness` for the quirks).
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from devtools.comfy_main import executor_cache_args, node_info, point_folder_paths
from devtools.recording import RecordingServer
from devtools.results import ExtensionLoadError, PromptResult, PromptTimeout, ValidationResult
from devtools.runtime import LogCapture, json_roundtrip, run_coro, run_in_thread

log = logging.getLogger(__name__)

#: Default client id used by :meth:`ComfyHandle.run_prompt` (see :mod:`devtools.harness` for why).
DEFAULT_CLIENT_ID = "devtools"
#: Seconds :meth:`ComfyHandle.run_prompt` waits after interrupting a prompt that timed out.
INTERRUPT_GRACE_S = 10.0


def _folder_paths_dir(get: Callable[[Any], str]) -> property:
    """A read-only property: the directory ``get(folder_paths)`` names, as a Path (read on each access)."""

    def directory(self) -> Path:
        import folder_paths

        return Path(get(folder_paths))

    return property(directory)


class ComfyHandle:
    """A configured, headless ComfyUI in this process (create with :func:`devtools.harness.setup_comfyui`)."""

    def __init__(self, root: Path, base_dir: Path, owns_base_dir: bool, cpu: bool):
        self.root = root
        self.base_dir = base_dir
        self.owns_base_dir = owns_base_dir
        self.cpu = cpu
        self.version: str | None = None
        self.server = RecordingServer()
        self.executor = None  # execution.PromptExecutor
        self.cache_type = None  # execution.CacheType
        self.import_failed: list[str] = []
        self.builtin_node_names: frozenset[str] = frozenset()
        self.extensions: dict[str, str] = {}  # abs path -> sys.modules name
        self.extension_nodes: dict[str, list[str]] = {}  # abs path -> node ids it added
        self.setup_seconds = 0.0
        self._run_lock = threading.Lock()
        self._stuck: threading.Thread | None = None
        self._number = 0

    # -- directories -------------------------------------------------------------------
    models_dir = _folder_paths_dir(lambda fp: fp.models_dir)
    input_dir = _folder_paths_dir(lambda fp: fp.get_input_directory())
    output_dir = _folder_paths_dir(lambda fp: fp.get_output_directory())
    temp_dir = _folder_paths_dir(lambda fp: fp.get_temp_directory())
    user_dir = _folder_paths_dir(lambda fp: fp.get_user_directory())

    def model_dir(self, folder_name: str) -> Path:
        """First (default) directory of a model folder, e.g. ``"loras"``; created if missing.

        This is where ComfyUI itself saves (``folder_paths.get_folder_paths(name)[0]``) and
        where a file must go to show up in ``folder_paths.get_filename_list(name)``.
        """
        import folder_paths

        d = Path(folder_paths.get_folder_paths(folder_name)[0])
        d.mkdir(parents=True, exist_ok=True)
        return d

    def refresh_model_lists(self) -> None:
        """Forget ``folder_paths``' cached file lists.

        ``get_filename_list`` caches per folder and revalidates with directory mtimes
        (folder_paths.py:392-426): a file added to an already listed directory is seen
        as soon as that directory's mtime changes, which on filesystems with coarse mtime
        resolution (1-2 s) can miss a file written right after a listing. Clearing
        ``folder_paths.filename_list_cache`` is the only invalidation ComfyUI has.
        :meth:`validate` and :meth:`run_prompt` call this first.
        """
        import folder_paths

        folder_paths.filename_list_cache.clear()

    def set_base_dir(self, base_dir: str | os.PathLike) -> Path:
        """Point every ``folder_paths`` directory at ``base_dir`` (see :func:`devtools.comfy_main.point_folder_paths`)."""
        base = Path(base_dir).resolve()
        point_folder_paths(base)
        if self.owns_base_dir and self.base_dir != base:
            shutil.rmtree(self.base_dir, ignore_errors=True)
            self.owns_base_dir = False
        self.base_dir = base
        return base

    # -- extensions ---------------------------------------------------------------------
    def load_extension(self, path: str | os.PathLike, *, reload: bool = False) -> str:
        """Load a custom-node package/file exactly as ComfyUI does; return its module name.

        Calls ``nodes.load_custom_node(path, ignore=<built-in node ids>,
        module_parent="custom_nodes")`` like ``init_external_custom_nodes``
        (nodes.py:2230-2262), so a V3 package's ``comfy_entrypoint`` is awaited, its
        ``get_node_list()`` registered into ``nodes.NODE_CLASS_MAPPINGS`` and built-in
        nodes cannot be overridden. ComfyUI names the module after the *full path* of a
        package directory with dots replaced by ``_x_`` (nodes.py:2142), e.g.
        ``"/tmp/my_ext"``; submodules are ``"/tmp/my_ext.sub"``. A file ``x.py`` is
        named after its path without extension.

        ``load_custom_node`` never raises: it logs and returns False
        (nodes.py:2219-2228). That is turned into :class:`ExtensionLoadError` carrying
        the captured log lines. Loading the same path again is a no-op unless
        ``reload=True``.
        """
        import nodes

        p = os.path.abspath(os.fspath(path))
        if not os.path.exists(p):
            raise FileNotFoundError(p)
        if p in self.extensions and not reload:
            return self.extensions[p]
        before = set(nodes.NODE_CLASS_MAPPINGS)
        with LogCapture() as cap:
            ok = run_coro(lambda: nodes.load_custom_node(p, ignore=set(self.builtin_node_names), module_parent="custom_nodes"))
        if not ok:
            detail = "\n".join(cap.lines) or "(no log output)"
            raise ExtensionLoadError(f"ComfyUI could not load custom node {p}:\n{detail}")
        if os.path.isfile(p):
            name = os.path.splitext(p)[0]
        else:
            name = p.replace(".", "_x_")
        self.extensions[p] = name
        added = sorted(set(nodes.NODE_CLASS_MAPPINGS) - before)
        self.extension_nodes[p] = added
        for line in cap.lines:
            log.info("while loading %s: %s", p, line)
        return name

    # -- node schemas -----------------------------------------------------------------
    def register_module(self, module) -> list[str]:
        """Register an already-imported V3 extension package, without re-importing it.

        ``nodes.load_custom_node`` executes the package again under a name derived
        from its path, so tests that imported it as ``comfyui_svdiff`` would hold a
        second copy of every module (caches, registries). This does the V3 part of
        that loader (nodes.py:2177-2219) on the given module: WEB_DIRECTORY,
        ``await comfy_entrypoint()``, ``get_node_list()`` into NODE_CLASS_MAPPINGS.
        The real loader is exercised by the end-to-end server tests.
        """
        import nodes

        name = module.__name__
        if name in self.extensions.values():
            return self.extension_nodes[name]
        module_dir = os.path.dirname(os.path.abspath(module.__file__))
        web = getattr(module, "WEB_DIRECTORY", None)
        if web is not None and os.path.isdir(os.path.join(module_dir, web)):
            nodes.EXTENSION_WEB_DIRS[name] = os.path.abspath(os.path.join(module_dir, web))

        async def entry():
            extension = await module.comfy_entrypoint()
            return await extension.get_node_list()

        added = []
        for node_cls in run_coro(entry):
            schema = node_cls.GET_SCHEMA()
            if schema.node_id in self.builtin_node_names:
                continue
            nodes.NODE_CLASS_MAPPINGS[schema.node_id] = node_cls
            node_cls.RELATIVE_PYTHON_MODULE = f"custom_nodes.{name}"
            if schema.display_name is not None:
                nodes.NODE_DISPLAY_NAME_MAPPINGS[schema.node_id] = schema.display_name
            added.append(schema.node_id)
        self.extensions[name] = name
        self.extension_nodes[name] = added
        return added

    def object_info(self, node_types: Iterable[str] | None = None) -> dict[str, dict]:
        """The JSON GET /object_info returns (server.py:649-694), as plain Python data.

        Built the same way: V3 nodes via ``GET_NODE_INFO_V1()``, V1 nodes from
        ``INPUT_TYPES``/``RETURN_TYPES``/... with the same defaults, all inside
        ``folder_paths.cache_helper`` so file lists are scanned once. A node whose info
        raises is logged and left out, as the server does.
        """
        import folder_paths

        import nodes

        names = list(nodes.NODE_CLASS_MAPPINGS) if node_types is None else list(node_types)
        self.refresh_model_lists()
        out: dict[str, dict] = {}
        with folder_paths.cache_helper:
            for name in names:
                try:
                    out[name] = node_info(name)
                except Exception:
                    log.exception("object_info: error while retrieving information for node %r", name)
        return json_roundtrip(out)

    # -- prompts ------------------------------------------------------------------------
    def reset_executor(self, cache_type: Any = None) -> None:
        """A fresh ``PromptExecutor`` (empty caches), optionally with another cache type.

        ``cache_type`` is an ``execution.CacheType`` or its name (``"CLASSIC"``,
        ``"LRU"``, ``"RAM_PRESSURE"``, ``"NONE"``). The default is CLASSIC, what
        ``main.py`` uses without ``--cache-*`` flags (main.py:198-208).
        """
        import execution

        if cache_type is not None:
            if isinstance(cache_type, str):
                cache_type = execution.CacheType[cache_type.upper()]
            self.cache_type = cache_type
        elif self.cache_type is None:
            self.cache_type = execution.CacheType.CLASSIC
        self.executor = execution.PromptExecutor(self.server, cache_type=self.cache_type, cache_args=executor_cache_args(self.cache_type))

    def validate(
        self, prompt: Mapping, *, partial_execution_targets: list[str] | None = None, prompt_id: str | None = None
    ) -> ValidationResult:
        """Run ``execution.validate_prompt`` only (on a deep copy: it coerces values in place)."""
        self.refresh_model_lists()
        pid = prompt_id or str(uuid.uuid4())
        prompt = copy.deepcopy(dict(prompt))
        return run_coro(lambda: self._validate_async(pid, prompt, partial_execution_targets))

    async def _validate_async(self, pid: str, prompt: dict, targets) -> ValidationResult:
        import execution

        valid, error, outputs, node_errors = await execution.validate_prompt(pid, prompt, targets)
        return ValidationResult(pid, bool(valid), error, list(outputs), dict(node_errors))

    def run_prompt(
        self,
        prompt: Mapping,
        *,
        client_id: str | None = DEFAULT_CLIENT_ID,
        timeout: float | None = 300.0,
        fresh_executor: bool = False,
        prompt_id: str | None = None,
        extra_data: Mapping | None = None,
        partial_execution_targets: list[str] | None = None,
        unload_models: bool = False,
    ) -> PromptResult:
        """Validate and execute one API-format prompt, like POST /prompt + the prompt worker.

        Steps (server.py:854-897, main.py:198-241): deep-copy the prompt, await
        ``execution.validate_prompt``; if no output survived return a result with
        ``status="invalid"``; else ``PromptExecutor.execute_async(prompt, prompt_id,
        extra_data, good_outputs)`` with ``extra_data["client_id"] = client_id``, then the
        final ``executing {node: None}`` message the worker sends. Runs in a worker
        thread (as ComfyUI does), one prompt at a time.

        Caching: the handle keeps one executor, so like a running ComfyUI the second
        prompt re-uses cached outputs of nodes whose inputs did not change (see
        :func:`devtools.harness.setup_comfyui`). ``fresh_executor=True`` gives a new executor first
        (the server's "free memory" path, main.py:261-263). ``client_id=None`` mimics an
        API client without websocket: no messages, and cached nodes' outputs go missing
        from :attr:`PromptResult.outputs` (execution.py:418-423).

        ``timeout`` (seconds, None = wait forever): on expiry ComfyUI's interrupt flag is
        set (checked before each node and on every progress-bar update) and
        :class:`PromptTimeout` is raised, with ``.result`` if the prompt ended within
        ``INTERRUPT_GRACE_S`` after that. A node that never checks the flag keeps running in its thread;
        further prompts are refused until it ends.
        """
        import nodes

        with self._run_lock:
            if self._stuck is not None and self._stuck.is_alive():
                raise RuntimeError("a previous prompt is still running after its timeout; cannot start another")
            self._stuck = None
            if fresh_executor or self.executor is None:
                self.reset_executor()
            self.refresh_model_lists()
            self._number += 1
            number = self._number
            pid = prompt_id or str(uuid.uuid4())
            work = copy.deepcopy(dict(prompt))
            extra = dict(extra_data or {})

            def go():
                return asyncio.run(self._run_async(work, pid, extra, client_id, partial_execution_targets, number))

            t, holder = run_in_thread(go, timeout, name=f"devtools-prompt-{number}")
            if t.is_alive():
                nodes.interrupt_processing(True)
                t.join(INTERRUPT_GRACE_S)
                if t.is_alive():
                    self._stuck = t
                    raise PromptTimeout(f"prompt {pid} still running after {timeout}s (+{INTERRUPT_GRACE_S}s after interrupt)")
                raise PromptTimeout(f"prompt {pid} interrupted after {timeout}s", holder.get("result"))
            if "exc" in holder:
                raise holder["exc"]
            result: PromptResult = holder["result"]
            if unload_models:
                import comfy.model_management

                comfy.model_management.unload_all_models()
            return result

    async def _run_async(self, prompt: dict, pid: str, extra: dict, client_id, targets, number: int) -> PromptResult:
        import execution

        t0 = time.perf_counter()
        mark = self.server.mark()
        valid, error, outputs, node_errors = await execution.validate_prompt(pid, prompt, targets)
        vres = ValidationResult(pid, bool(valid), error, list(outputs), dict(node_errors))
        if client_id is not None:
            extra["client_id"] = client_id
        extra.setdefault("create_time", int(time.time() * 1000))
        if not vres.valid:
            return PromptResult(
                pid,
                prompt,
                vres,
                "invalid",
                messages=self.server.since(mark),
                client_id=client_id,
                extra_data=extra,
                number=number,
                duration_s=time.perf_counter() - t0,
            )

        import hook_breaker_ac10a0

        ex = self.executor
        self.server.last_prompt_id = pid
        try:
            await ex.execute_async(prompt, pid, extra, vres.outputs)
        finally:
            if client_id is not None:
                self.server.send_sync("executing", {"node": None, "prompt_id": pid}, client_id)
            hook_breaker_ac10a0.restore_functions()  # main.py:273 does this after each prompt's gc
        status_messages = [(e, d) for e, d in ex.status_messages]
        events = [e for e, _ in status_messages]
        if "execution_success" in events:
            status = "success"
        elif "execution_interrupted" in events:
            status = "interrupted"
        else:
            status = "error"
        messages = self.server.since(mark)
        exec_error = next((d for e, d in status_messages if e == "execution_error"), None)
        if exec_error is None:  # ExecutionBlocker errors bypass add_message (execution.py:511)
            exec_error = next((m.data for m in messages if m.event == "execution_error"), None)
        history = getattr(ex, "history_result", None) or {}
        return PromptResult(
            pid,
            prompt,
            vres,
            status,
            outputs=dict(history.get("outputs", {})),
            meta=dict(history.get("meta", {})),
            messages=messages,
            status_messages=status_messages,
            execution_error=exec_error,
            client_id=client_id,
            extra_data=extra,
            number=number,
            duration_s=time.perf_counter() - t0,
        )

    def interrupt(self) -> None:
        """Set ComfyUI's interrupt flag (what POST /interrupt does)."""
        import nodes

        nodes.interrupt_processing(True)
