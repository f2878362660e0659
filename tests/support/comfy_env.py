"""Test-side bridge to a real, headless ComfyUI (v0.8.0 … v0.33.0): setup, prompts, object_info.

Used by the pytest integration tier and by the headless "run a workflow" CLI. It
drives ComfyUI's *own* machinery (``nodes.load_custom_node``, ``execution.validate_prompt``,
``execution.PromptExecutor``) exactly the way ``main.py``/``server.py`` do, but without
the aiohttp server, the websocket or the prompt queue. Nothing of ComfyUI is copied;
where ComfyUI logic has to be mirrored (``/object_info``, the frontend's UI -> API
conversion) the original is cited by file:line so it can be re-checked on upgrades.
Line numbers refer to ComfyUI v0.8.0 and comfyui-frontend-package 1.35.9 unless a
docstring names v0.33.0.

Public API (all module-level functions use one process-wide :class:`ComfyHandle`)::

    find_comfyui() -> Path | None
    setup_comfyui(base_dir=None, *, cpu=True, api_nodes=False) -> ComfyHandle
    load_extension(path) -> str                       # sys.modules name ComfyUI gave it
    validate(prompt, *, partial_execution_targets=None) -> ValidationResult
    run_prompt(prompt, *, client_id=..., timeout=300, fresh_executor=False, ...) -> PromptResult
    object_info(node_types=None) -> dict              # same JSON as GET /object_info
    ui_to_api(workflow, object_info) -> dict          # UI-format workflow -> API prompt

ComfyUI quirks this module takes care of (details in the docstrings below):

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

import asyncio
import atexit
import copy
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("comfy_env")

ENV_VAR = "COMFYUI_PATH"
#: Several ComfyUI roots, for a runner that tests against each (``.ci/run``).
LIST_ENV_VAR = "COMFYUI_PATHS"
#: Files whose presence marks a directory as a ComfyUI root.
ROOT_MARKERS = ("comfy/model_patcher.py", "nodes.py", "execution.py", "folder_paths.py")
#: Default client id used by :func:`run_prompt` (see the module docstring for why).
DEFAULT_CLIENT_ID = "comfy_env"
#: ComfyUI top-level module names that must come from the ComfyUI root. ``nodes`` and
#: ``utils`` are generic: this repository itself has a ``nodes/`` package.
_COMFY_TOPLEVEL = ("nodes", "execution", "folder_paths", "comfy", "comfy_execution", "comfy_api", "utils")
#: Seconds :meth:`ComfyHandle.run_prompt` waits after interrupting a prompt that timed out.
INTERRUPT_GRACE_S = 10.0
#: The sub-directories ComfyUI keeps under ``--base-directory``.
BASE_SUBDIRS = ("models", "input", "output", "temp", "user", "custom_nodes")


# ---------------------------------------------------------------------------------
# Locating ComfyUI
# ---------------------------------------------------------------------------------


def is_comfyui_root(path: str | os.PathLike | None) -> bool:
    """True if ``path`` looks like a ComfyUI checkout (``comfy/model_patcher.py`` etc.)."""
    if not path:
        return False
    p = Path(path).expanduser()
    return all((p / marker).is_file() for marker in ROOT_MARKERS)


def _repo_root_candidates() -> list[Path]:
    """This checkout's root, as imported and with symlinks resolved.

    A developer often symlinks the checkout into ``<ComfyUI>/custom_nodes/``; the
    unresolved path (how Python found this file) then still sits inside ComfyUI, the
    resolved one does not. Both are tried, unresolved first.
    """
    here = Path(os.path.abspath(__file__))
    roots = [here.parents[2], Path(os.path.realpath(here)).parents[2]]
    out: list[Path] = []
    for r in roots:
        if r not in out:
            out.append(r)
    return out


def comfyui_version(root: str | os.PathLike) -> str | None:
    """The ``__version__`` in ``<root>/comfyui_version.py`` (without importing it)."""
    try:
        text = (Path(root) / "comfyui_version.py").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("__version__"):
            return line.split("=", 1)[1].strip().strip("\"'")
    return None


def _version_key(root: Path) -> tuple:
    version = comfyui_version(root) or "0"
    return tuple(int(part) if part.isdigit() else 0 for part in version.split("."))


def find_comfyuis() -> list[Path]:
    """Every ComfyUI the tests can run against, newest first.

    ``$COMFYUI_PATHS`` (``os.pathsep``-separated) when set; else ``$COMFYUI_PATH``, a
    ComfyUI containing this checkout, and every ``~/ComfyUI*`` folder that is a ComfyUI
    root (``.ci/run`` runs the integration tier once per entry).
    """
    listed = os.environ.get(LIST_ENV_VAR)
    if listed:
        candidates = [Path(p).expanduser() for p in listed.split(os.pathsep) if p]
        missing = [str(p) for p in candidates if not is_comfyui_root(p)]
        if missing:
            log.warning("%s names folders that are not ComfyUI roots: %s", LIST_ENV_VAR, ", ".join(missing))
    else:
        candidates = [Path(os.environ[ENV_VAR]).expanduser()] if os.environ.get(ENV_VAR) else []
        candidates += [ancestor for repo_root in _repo_root_candidates() for ancestor in repo_root.parents]
        candidates += sorted(Path.home().glob("ComfyUI*"))
    roots: list[Path] = []
    for candidate in candidates:
        if is_comfyui_root(candidate) and candidate.resolve() not in roots:
            roots.append(candidate.resolve())
    return sorted(roots, key=_version_key, reverse=True)


def find_comfyui() -> Path | None:
    """The ComfyUI root directory this process runs against, or None.

    Order: ``$COMFYUI_PATH``; else a ComfyUI containing this checkout (the repo may be
    installed as ``<ComfyUI>/custom_nodes/<name>/``, so every ancestor of the repo root
    is checked); else the newest ``~/ComfyUI*`` (by ``comfyui_version.py``). A directory
    counts only if it has ``comfy/model_patcher.py``, ``nodes.py``, ``execution.py`` and
    ``folder_paths.py``.

    An explicitly set but invalid ``COMFYUI_PATH`` returns None (with a warning)
    instead of silently testing against some other ComfyUI.
    """
    env = os.environ.get(ENV_VAR)
    if env:
        if is_comfyui_root(env):
            return Path(env).expanduser().resolve()
        log.warning("%s=%r is not a ComfyUI root (no comfy/model_patcher.py); not searching elsewhere", ENV_VAR, env)
        return None
    for repo_root in _repo_root_candidates():
        for ancestor in repo_root.parents:
            if is_comfyui_root(ancestor):
                return ancestor.resolve()
    homes = sorted((p for p in Path.home().glob("ComfyUI*") if is_comfyui_root(p)), key=_version_key, reverse=True)
    return homes[0].resolve() if homes else None


# ---------------------------------------------------------------------------------
# The server stand-in
# ---------------------------------------------------------------------------------


@dataclass
class Message:
    """One message the executor sent "to the websocket".

    ``event`` is a string (``"executing"``, ``"executed"``, ``"progress"``,
    ``"execution_error"`` ...) or an int from ``protocol.BinaryEventTypes`` for binary
    messages (previews, progress text); ``sid`` is the client id it was addressed to
    (None = broadcast).
    """

    event: str | int
    data: Any
    sid: str | None = None

    def __iter__(self):  # allows ``for event, data, sid in messages``
        return iter((self.event, self.data, self.sid))


class RecordingServer:
    """Minimal stand-in for ``server.PromptServer`` that records instead of sending.

    What ComfyUI touches on the server object during execution (v0.8.0):

    * ``client_id`` / ``last_node_id`` / ``last_prompt_id`` attributes, set by
      ``PromptExecutor.execute_async`` (execution.py:680-683, 745), ``execute``
      (execution.py:470) and ``main.prompt_worker`` (main.py:223);
    * ``send_sync(event, data, sid)`` (execution.py:421, 471, 511, 539, 642;
      comfy_execution/progress.py:185, 226; main.py:241, 299);
    * ``sockets_metadata`` for feature-flag lookups (comfy_execution/progress.py:211,
      comfy_api/feature_flags.py:42);
    * ``send_progress_text`` via ``PromptServer.instance`` (comfy_extras/nodes_images.py:522,
      server.py:1214);
    * custom-node packages commonly decorate ``PromptServer.instance.routes`` at import
      time, so ``routes`` is an aiohttp ``RouteTableDef`` whose routes are never served.

    Messages are appended to :attr:`messages` (thread-safe); nothing is ever sent.
    """

    def __init__(self) -> None:
        self.client_id: str | None = None
        self.last_node_id: str | None = None
        self.last_prompt_id: str | None = None
        self.sockets_metadata: dict[str, dict[str, Any]] = {}
        self.supports = ["custom_nodes_from_web"]
        self.number = 0
        self.on_prompt_handlers: list[Callable] = []
        self.messages: list[Message] = []
        self._lock = threading.Lock()
        try:
            from aiohttp import web

            self.routes = web.RouteTableDef()
        except Exception:  # pragma: no cover - aiohttp is a ComfyUI requirement
            self.routes = None

    # -- what the executor calls ------------------------------------------------------
    def send_sync(self, event, data, sid=None) -> None:
        with self._lock:
            self.messages.append(Message(event, data, sid))

    async def send(self, event, data, sid=None) -> None:
        self.send_sync(event, data, sid)

    async def send_json(self, event, data, sid=None) -> None:
        self.send_sync(event, data, sid)

    def send_progress_text(self, text, node_id, sid=None) -> None:
        if isinstance(text, (bytes, bytearray)):
            text = bytes(text).decode("utf-8", "replace")
        self.send_sync("progress_text", {"node_id": node_id, "text": text}, sid)

    def queue_updated(self) -> None:
        pass

    def add_on_prompt_handler(self, handler: Callable) -> None:
        self.on_prompt_handlers.append(handler)

    # -- helpers ------------------------------------------------------------------------
    def mark(self) -> int:
        with self._lock:
            return len(self.messages)

    def since(self, mark: int) -> list[Message]:
        with self._lock:
            return list(self.messages[mark:])

    def clear(self) -> None:
        with self._lock:
            self.messages.clear()


# ---------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------


def format_validation_error(error: Any, node_errors: Mapping[str, Any] | None) -> str:
    """The text of the frontend's "Prompt execution failed" dialog.

    Mirrors ``PromptExecutionError.toString()`` of the frontend (comfyui-frontend-package
    1.35.9, assets/index-*.js): ``<error.message>: <error.details>`` followed, per node
    with errors, by ``\\n<class_type>:`` and ``\\n    - <message>: <details>`` lines.
    """
    if isinstance(error, str):
        text = error
    elif error:
        text = f"{error.get('message', '')}: {error.get('details', '')}"
    else:
        text = ""
    for info in (node_errors or {}).values():
        text += f"\n{info.get('class_type', '')}:"
        for e in info.get("errors", []):
            text += f"\n    - {e.get('message', '')}: {e.get('details', '')}"
    return text


@dataclass
class ValidationResult:
    """What ``execution.validate_prompt`` returned (execution.py:999-1108).

    ``valid`` is False only if *no* output node survived validation; like the server
    (server.py:878-897) a prompt with some good outputs is still run, and the errors of
    the others are reported in ``node_errors``. ``error`` is the top-level error dict
    (``type``/``message``/``details``/``extra_info``, the ``"error"`` field of a 400 reply
    to POST /prompt); ``node_errors`` maps node id -> ``{"errors": [...],
    "dependent_outputs": [...], "class_type": ...}`` (the ``"node_errors"`` field).
    """

    prompt_id: str
    valid: bool
    error: dict | None
    outputs: list[str]
    node_errors: dict[str, dict]

    @property
    def validation_errors(self) -> dict[str, list[dict]]:
        """node id -> list of error dicts (``type``, ``message``, ``details``, ``extra_info``)."""
        return {nid: list(info.get("errors", [])) for nid, info in self.node_errors.items()}

    @property
    def error_message(self) -> str | None:
        """The dialog text the UI shows, or None if there is nothing to show."""
        if self.valid and not self.node_errors:
            return None
        return format_validation_error(self.error, self.node_errors)

    def messages_for(self, node_id: str) -> list[str]:
        """``"<message>: <details>"`` for each validation error of one node."""
        return [f"{e.get('message')}: {e.get('details')}" for e in self.validation_errors.get(str(node_id), [])]


class PromptFailed(AssertionError):
    """Raised by :meth:`PromptResult.raise_for_error`; the text is what the UI shows."""


class PromptTimeout(TimeoutError):
    """A prompt ran past its timeout. ``result`` is set if the interrupt took effect."""

    def __init__(self, message: str, result: PromptResult | None = None):
        super().__init__(message)
        self.result = result


@dataclass
class PromptResult:
    """Everything a UI user (or /history) would learn about one prompt.

    ``status`` is ``"invalid"`` (rejected by validation, nothing ran), ``"success"``,
    ``"error"`` (a node raised) or ``"interrupted"``. ``outputs`` is the ``outputs`` of
    the /history entry (node id -> the node's ``ui`` dict, e.g. ``{"images": [...]}``),
    ``meta`` its ``meta``. ``status_messages`` are the executor's own
    ``(event, data)`` pairs (the /history ``status.messages``); ``messages`` everything
    the executor sent to the (fake) websocket during this prompt, including
    ``executing``, ``executed``, ``progress``, ``progress_state``.
    """

    prompt_id: str
    prompt: dict
    validation: ValidationResult
    status: str
    outputs: dict[str, dict] = field(default_factory=dict)
    meta: dict[str, dict] = field(default_factory=dict)
    messages: list[Message] = field(default_factory=list)
    status_messages: list[tuple[str, dict]] = field(default_factory=list)
    execution_error: dict | None = None
    client_id: str | None = None
    extra_data: dict = field(default_factory=dict)
    number: int = 0
    duration_s: float = 0.0

    # -- status --------------------------------------------------------------------------
    @property
    def success(self) -> bool:
        """Validated, ran to the end, and no ``execution_error`` was sent.

        (An ``ExecutionBlocker("msg")`` output makes the executor send an
        ``execution_error`` ("Execution Blocked: msg", attributed to the *consuming* node)
        without failing the prompt, execution.py:497-514; the UI shows that as an error
        dialog, so it counts as failure here. Note that in v0.8.0 a V3
        ``io.NodeOutput(block_execution="msg")`` without positional outputs is dropped
        (execution.py:374-379: ``r.result`` is None) and consumers get None; return
        ``io.NodeOutput(ExecutionBlocker("msg"))`` instead.)
        """
        return self.status == "success" and self.execution_error is None

    @property
    def valid(self) -> bool:
        return self.validation.valid

    @property
    def error(self) -> dict | None:
        """Top-level validation error dict (POST /prompt ``"error"``), if any."""
        return self.validation.error

    @property
    def node_errors(self) -> dict[str, dict]:
        return self.validation.node_errors

    @property
    def validation_errors(self) -> dict[str, list[dict]]:
        """node id -> list of error dicts with ``message``/``details`` (as the UI gets them)."""
        return self.validation.validation_errors

    # -- execution error -------------------------------------------------------------
    @property
    def exception_message(self) -> str | None:
        """``exception_message`` of the ``execution_error`` message, trailing newline removed.

        ComfyUI formats it as ``f"{ex}\\n{tips}"`` (execution.py:610), so the raw value in
        :attr:`execution_error` ends in ``"\\n"`` when there are no tips.
        """
        if not self.execution_error:
            return None
        return str(self.execution_error.get("exception_message", "")).rstrip("\n")

    @property
    def exception_type(self) -> str | None:
        return self.execution_error.get("exception_type") if self.execution_error else None

    @property
    def error_node_id(self) -> str | None:
        return self.execution_error.get("node_id") if self.execution_error else None

    @property
    def error_node_type(self) -> str | None:
        return self.execution_error.get("node_type") if self.execution_error else None

    @property
    def error_message(self) -> str | None:
        """The main text of the error dialog the UI would show, or None.

        Invalid prompt: :func:`format_validation_error` text. Node raised: the
        ``exception_message`` (the frontend's execution-error dialog shows it under the
        node type as title, see ``showExecutionErrorDialog`` in the frontend bundle).
        """
        if self.status == "invalid":
            return self.validation.error_message
        if self.execution_error:
            return self.exception_message
        return None

    @property
    def error_title(self) -> str | None:
        if self.status == "invalid":
            return (self.error or {}).get("message")
        if self.execution_error:
            return self.error_node_type or self.exception_type
        return None

    def raise_for_error(self) -> PromptResult:
        """Raise :class:`PromptFailed` (an AssertionError) unless :attr:`success`."""
        if not self.success:
            where = f" in node {self.error_node_id} ({self.error_node_type})" if self.execution_error else ""
            raise PromptFailed(f"prompt {self.status}{where}: {self.error_message}")
        return self

    # -- what ran ----------------------------------------------------------------------
    def events(self, event: str | int | None = None) -> list[Message]:
        return [m for m in self.messages if event is None or m.event == event]

    @property
    def executed(self) -> list[str]:
        """Node ids that were actually executed (``executing`` messages; needs a client id)."""
        return [m.data["node"] for m in self.messages if m.event == "executing" and m.data.get("node") is not None]

    @property
    def cached(self) -> list[str]:
        """Node ids served from the executor cache (the ``execution_cached`` message)."""
        for event, data in self.status_messages:
            if event == "execution_cached":
                return list(data.get("nodes", []))
        return []

    def output(self, node_id: str | int) -> dict:
        """The ``ui`` dict of one node (empty dict if it produced none)."""
        return self.outputs.get(str(node_id), {})

    def output_files(self, node_id: str | int | None = None) -> list[Path]:
        """Paths of files listed in ``images``/``audio``/``video``... ui outputs."""
        import folder_paths

        paths: list[Path] = []
        items = [self.output(node_id)] if node_id is not None else list(self.outputs.values())
        for ui in items:
            for entries in ui.values():
                if not isinstance(entries, list):
                    continue
                for e in entries:
                    if isinstance(e, dict) and "filename" in e:
                        base = folder_paths.get_directory_by_type(e.get("type", "output")) or folder_paths.get_output_directory()
                        paths.append(Path(base) / e.get("subfolder", "") / e["filename"])
        return paths

    @property
    def history(self) -> dict:
        """The /history/<prompt_id> entry (minus sensitive extra data), cf. execution.py:1145-1165."""
        return {
            "prompt": [self.number, self.prompt_id, self.prompt, self.extra_data, list(self.validation.outputs)],
            "outputs": self.outputs,
            "meta": self.meta,
            "status": {
                "status_str": "success" if self.status == "success" else "error",
                "completed": self.status == "success",
                "messages": [list(m) for m in self.status_messages],
            },
        }


class ExtensionLoadError(RuntimeError):
    """``nodes.load_custom_node`` returned False; the message has ComfyUI's log output."""


# ---------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------


def _run_in_thread(fn: Callable[[], Any], timeout: float | None = None, name: str = "comfy_env") -> tuple[threading.Thread, dict]:
    """Run ``fn`` in a daemon thread, wait up to ``timeout``; returns (thread, holder).

    ``holder`` gets ``"result"`` or ``"exc"``. ComfyUI's own prompt worker is a thread
    too (main.py:370); running there also keeps ``asyncio.run`` usable when the caller
    is inside an event loop (e.g. an async test).
    """
    holder: dict[str, Any] = {}

    def target():
        try:
            holder["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            holder["exc"] = exc

    t = threading.Thread(target=target, name=name, daemon=True)
    t.start()
    t.join(timeout)
    return t, holder


def _run_coro(factory: Callable[[], Any]) -> Any:
    """``asyncio.run(factory())`` in a helper thread; re-raises its exception."""
    t, holder = _run_in_thread(lambda: asyncio.run(factory()))
    if "exc" in holder:
        raise holder["exc"]
    return holder.get("result")


class _LogCapture(logging.Handler):
    """Collects formatted records (ComfyUI reports load failures only through logging)."""

    def __init__(self, level=logging.WARNING):
        super().__init__(level)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record):
        try:
            self.lines.append(self.format(record))
        except Exception:  # pragma: no cover
            pass

    def __enter__(self):
        root = logging.getLogger()
        self._old_level = root.level
        if root.level > self.level:  # records below the root level never reach handlers
            root.setLevel(self.level)
        root.addHandler(self)
        return self

    def __exit__(self, *exc):
        root = logging.getLogger()
        root.removeHandler(self)
        root.setLevel(self._old_level)


def _json_roundtrip(obj: Any) -> Any:
    """What a client receives from ``web.json_response`` (tuples become lists)."""
    return json.loads(json.dumps(obj, default=str))


# ---------------------------------------------------------------------------------
# The handle
# ---------------------------------------------------------------------------------


class ComfyHandle:
    """A configured, headless ComfyUI in this process (create with :func:`setup_comfyui`)."""

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
    @property
    def models_dir(self) -> Path:
        import folder_paths

        return Path(folder_paths.models_dir)

    @property
    def input_dir(self) -> Path:
        import folder_paths

        return Path(folder_paths.get_input_directory())

    @property
    def output_dir(self) -> Path:
        import folder_paths

        return Path(folder_paths.get_output_directory())

    @property
    def temp_dir(self) -> Path:
        import folder_paths

        return Path(folder_paths.get_temp_directory())

    @property
    def user_dir(self) -> Path:
        import folder_paths

        return Path(folder_paths.get_user_directory())

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
        """Point every ``folder_paths`` directory at ``base_dir`` (see :func:`_point_folder_paths`)."""
        base = Path(base_dir).resolve()
        _point_folder_paths(base)
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
        with _LogCapture() as cap:
            ok = _run_coro(lambda: nodes.load_custom_node(p, ignore=set(self.builtin_node_names), module_parent="custom_nodes"))
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
        for node_cls in _run_coro(entry):
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
                    out[name] = _node_info(name)
                except Exception:
                    log.exception("object_info: error while retrieving information for node %r", name)
        return _json_roundtrip(out)

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
        return _run_coro(lambda: self._validate_async(pid, prompt, partial_execution_targets))

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
        :func:`setup_comfyui`). ``fresh_executor=True`` gives a new executor first
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

            t, holder = _run_in_thread(go, timeout, name=f"comfy_env-prompt-{number}")
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


# ---------------------------------------------------------------------------------
# setup
# ---------------------------------------------------------------------------------

_HANDLE: ComfyHandle | None = None
_SETUP_LOCK = threading.RLock()


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


def get_handle() -> ComfyHandle | None:
    """The process-wide handle, or None before :func:`setup_comfyui`."""
    return _HANDLE


def _put_root_first(root: Path) -> None:
    """ComfyUI's root must be ``sys.path[0]``: ``nodes``/``utils`` are generic names.

    When pytest or ``python -m`` run from this repository, ``''``/the repo root is on
    ``sys.path`` and ``import nodes`` would find this repo's ``nodes/`` package instead
    of ComfyUI's ``nodes.py``.
    """
    s = str(root)
    while s in sys.path:
        sys.path.remove(s)
    sys.path.insert(0, s)
    for name in _COMFY_TOPLEVEL:
        mod = sys.modules.get(name)
        if mod is None:
            continue
        f = getattr(mod, "__file__", None) or next(iter(getattr(mod, "__path__", []) or []), None)
        if f and not os.path.realpath(f).startswith(os.path.realpath(s) + os.sep):
            raise RuntimeError(
                f"module {name!r} is already imported from {f}, not from ComfyUI at {s}; "
                "import comfy_env / call setup_comfyui() before anything imports it"
            )


def _configure_args(cpu: bool, base: Path) -> None:
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
      re-pointed by :func:`_point_folder_paths` instead.
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


def _point_folder_paths(base: Path) -> None:
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


def _install_progress_hook(server: RecordingServer) -> None:
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


def _register_prompt_server(server: RecordingServer) -> None:
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


def setup_comfyui(
    base_dir: str | os.PathLike | None = None,
    *,
    comfyui_root: str | os.PathLike | None = None,
    cpu: bool = True,
    api_nodes: bool = False,
) -> ComfyHandle:
    """Configure and initialise ComfyUI in this process (idempotent); return the handle.

    1. ``comfyui_root`` or :func:`find_comfyui` goes to ``sys.path[0]``.
    2. ``comfy.cli_args.args``: no argv parsing, ``cpu=True``, ``base_directory`` (see
       :func:`_configure_args`), then ``comfy.model_management`` is imported (CPU).
    3. ``folder_paths`` points at ``base_dir`` (default: a fresh temp dir removed at
       exit) - :func:`_point_folder_paths`.
    4. Built-in nodes: ``nodes.init_public_apis()``, ``nodes.init_builtin_extra_nodes()``
       and, if ``api_nodes``, ``nodes.init_builtin_api_nodes()`` - the parts of
       ``nodes.init_extra_nodes`` (nodes.py:2426-2462) minus scanning
       ``custom_nodes/``, wrapped in ``hook_breaker_ac10a0.save/restore_functions`` as in
       main.py:357-362. Files that fail to import (no ``torchaudio`` -> audio nodes; no
       ``requests`` -> ``server`` -> ``nodes_images.py``) are logged and listed in
       ``handle.import_failed``, exactly as ComfyUI tolerates them.
    5. A :class:`RecordingServer`, the progress hook of ``main.py`` and one
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
        base = Path(base_dir).resolve() if base_dir is not None else Path(tempfile.mkdtemp(prefix="comfy_env_"))
        base.mkdir(parents=True, exist_ok=True)

        _put_root_first(root)
        _configure_args(cpu, base)
        import comfy.model_management  # noqa: F401  - device is probed here (CPU)
        import folder_paths

        _point_folder_paths(base)

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
        _register_prompt_server(handle.server)

        async def init_nodes():
            await nodes.init_public_apis()
            failed = list(await nodes.init_builtin_extra_nodes())
            if api_nodes:
                failed += list(await nodes.init_builtin_api_nodes())
            return failed

        hook_breaker_ac10a0.save_functions()
        try:
            handle.import_failed = _run_coro(init_nodes)
        finally:
            hook_breaker_ac10a0.restore_functions()
        if handle.import_failed:
            log.warning("ComfyUI built-in node files that failed to import (missing optional deps): %s", ", ".join(handle.import_failed))
        handle.builtin_node_names = frozenset(nodes.NODE_CLASS_MAPPINGS)
        _install_progress_hook(handle.server)
        handle.reset_executor()
        _put_root_first(root)  # re-check nothing shadowed ComfyUI's modules meanwhile
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


def _node_info(node_class: str) -> dict:
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


# ---------------------------------------------------------------------------------
# UI workflow -> API prompt
# ---------------------------------------------------------------------------------

MODE_NEVER = 2  # "muted": LGraphEventMode.NEVER
MODE_BYPASS = 4  # LGraphEventMode.BYPASS
#: Frontend-only nodes that never reach the backend (``isVirtualNode``).
VIRTUAL_NODE_TYPES = frozenset({"Reroute", "PrimitiveNode", "Note", "MarkdownNote"})
#: Input types the frontend turns into widgets (``ComfyWidgets`` + ``dynamicWidgets``).
WIDGET_TYPES = frozenset(
    {
        "INT",
        "FLOAT",
        "BOOLEAN",
        "STRING",
        "COMBO",
        "MARKDOWN",
        "IMAGEUPLOAD",
        "COLOR",
        "IMAGECOMPARE",
        "CHART",
        "GALLERIA",
        "TEXTAREA",
        "COMFY_DYNAMICCOMBO_V3",
        "AUDIO_UI",
        "AUDIOUPLOAD",
        "WEBCAM",
    }
)
_MEDIA_UPLOAD_KEYS = ("image_upload", "video_upload", "animated_image_upload")
_AUDIO_UI_NODES = frozenset({"LoadAudio", "SaveAudio", "PreviewAudio", "SaveAudioMP3", "SaveAudioOpus"})


class WorkflowConversionError(ValueError):
    """The UI workflow cannot be converted (unknown node type, broken link, ...)."""


def _spec_type_opts(spec: Any) -> tuple[str, dict]:
    if not isinstance(spec, (list, tuple)) or not spec:
        return str(spec), {}
    t = spec[0]
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if isinstance(t, (list, tuple)):
        return "COMBO", opts
    return str(t), opts


def widget_slots(node_def: Mapping) -> list[tuple[str, str]]:
    """The frontend's widget list for a node type: ``[(input_name, kind), ...]``.

    ``widgets_values`` in a saved workflow is positional over *all* widgets, including
    ones that are never sent to the backend. Reconstructed from the frontend (1.35.9):

    * inputs are ordered required-by-``input_order``, optional-by-``input_order``, then
      anything else (``getOrderedInputSpecs``); an input gets a widget if its type (or
      ``widgetType``) is a widget type and it is not ``forceInput`` (``addInputWidget``);
    * an INT gets a ``control_after_generate`` combo right after it if its option
      ``control_after_generate`` is true, or unset and the name is ``seed``/``noise_seed``
      (``useIntWidget``); FLOAT only if the option is true (``useFloatWidget``); a COMBO
      with the option gets the control *and* a ``control_filter_list`` widget
      (``addValueControlWidgets``), preceded by a refresh button for ``remote`` combos
      with ``refresh_button``;
    * the first required combo with ``image_upload``/``video_upload``/
      ``animated_image_upload`` gets an extra required ``upload`` input (extension
      "Comfy.UploadImage"), not in ``input_order`` so it comes last; audio nodes get
      ``audioUI`` (+ ``upload`` when ``audio_upload``) the same way.

    Kinds: ``"value"`` (sent to the backend) and ``"control"``, ``"filter"``,
    ``"button"``, ``"upload"``, ``"ui"`` (UI-only, skipped).
    """
    inputs = node_def.get("input") or {}
    required = dict(inputs.get("required") or {})
    optional = dict(inputs.get("optional") or {})
    order = node_def.get("input_order") or {}
    extra: list[tuple[str, Any]] = []
    name = node_def.get("name")
    if name in _AUDIO_UI_NODES:
        extra.append(("audioUI", ["AUDIO_UI", {}]))
    audio_spec = required.get("audio")
    if audio_spec is not None and _spec_type_opts(audio_spec)[1].get("audio_upload") is True:
        extra.append(("upload", ["AUDIOUPLOAD", {}]))
    else:
        for inp_name, spec in required.items():
            t, o = _spec_type_opts(spec)
            if t == "COMBO" and any(o.get(k) is True for k in _MEDIA_UPLOAD_KEYS):
                extra.append(("upload", ["IMAGEUPLOAD", {**o, "imageInputName": inp_name}]))
                break

    ordered: list[tuple[str, Any]] = []
    if order:
        ordered += [(n, required[n]) for n in order.get("required", []) if n in required]
        ordered += [(n, optional[n]) for n in order.get("optional", []) if n in optional]
        seen = {n for n, _ in ordered}
        ordered += [(n, s) for n, s in list(required.items()) + list(optional.items()) if n not in seen]
    else:
        ordered = list(required.items()) + list(optional.items())
    ordered += extra

    slots: list[tuple[str, str]] = []
    for inp_name, spec in ordered:
        t, o = _spec_type_opts(spec)
        wtype = o.get("widgetType") or t
        if wtype not in WIDGET_TYPES or o.get("forceInput"):
            continue
        if wtype in ("IMAGEUPLOAD", "AUDIOUPLOAD"):
            slots.append((inp_name, "upload"))
            continue
        if wtype == "AUDIO_UI":
            slots.append((inp_name, "ui"))
            continue
        slots.append((inp_name, "value"))
        ctrl = o.get("control_after_generate")
        if wtype == "INT":
            if ctrl is None:
                ctrl = inp_name in ("seed", "noise_seed")
            if ctrl:
                slots.append((inp_name, "control"))
        elif wtype == "FLOAT" and ctrl:
            slots.append((inp_name, "control"))
        elif wtype == "COMBO":
            remote = o.get("remote")
            if isinstance(remote, dict) and remote.get("refresh_button"):
                slots.append((inp_name, "button"))
            if ctrl:
                slots.append((inp_name, "control"))
                slots.append((inp_name, "filter"))
    return slots


_NO_DEFAULT = object()


def _widget_default(node_def: Mapping, name: str) -> Any:
    """The value a freshly created widget has (``default``, else the frontend's fallback:
    0 for INT/FLOAT (useIntWidget/useFloatWidget), False, "", the first combo option)."""
    inputs = node_def.get("input") or {}
    spec = (inputs.get("required") or {}).get(name, (inputs.get("optional") or {}).get(name))
    if spec is None:
        return _NO_DEFAULT
    t, o = _spec_type_opts(spec)
    if "default" in o:
        return o["default"]
    if t in ("INT", "FLOAT"):
        return 0
    if t == "BOOLEAN":
        return False
    if t in ("STRING", "TEXTAREA", "MARKDOWN"):
        return ""
    if t == "COMBO":
        options = spec[0] if isinstance(spec[0], (list, tuple)) else o.get("options") or []
        return options[0] if options else _NO_DEFAULT
    return _NO_DEFAULT


def _valid_connection(a: Any, b: Any) -> bool:
    """LiteGraph's ``isValidConnection``: ``*``/empty match anything; comma lists intersect."""
    a = 0 if a in ("", "*") else a
    b = 0 if b in ("", "*") else b
    if not a or not b or a == b:
        return True
    a, b = str(a).lower(), str(b).lower()
    if "," not in a and "," not in b:
        return a == b
    return any(_valid_connection(x, y) for x in a.split(",") for y in b.split(","))


@dataclass
class _Graph:
    nodes: dict[Any, dict]
    links: dict[Any, dict]
    prefix: tuple[str, ...]
    instance: _Rec | None  # the subgraph node this graph is the inside of


@dataclass
class _Rec:
    exec_id: str
    node: dict
    graph: _Graph
    inner: _Graph | None = None  # set for subgraph instances

    @property
    def mode(self) -> int:
        return int(self.node.get("mode") or 0)

    @property
    def inputs(self) -> list[dict]:
        return self.node.get("inputs") or []

    @property
    def outputs(self) -> list[dict]:
        return self.node.get("outputs") or []


def _link_dict(link: Any) -> dict:
    if isinstance(link, dict):
        return link
    lid, oid, oslot, tid, tslot, typ = (list(link) + [None] * 6)[:6]
    return {"id": lid, "origin_id": oid, "origin_slot": oslot, "target_id": tid, "target_slot": tslot, "type": typ}


def ui_to_api(workflow: Mapping, object_info: Mapping[str, Mapping]) -> dict:
    """Convert a UI-format workflow (what the frontend saves) to an API prompt.

    Follows the frontend's ``graphToPrompt`` + ``ExecutableNodeDTO`` (1.35.9):

    * muted (mode 2) and bypassed (mode 4) nodes and virtual nodes (Reroute,
      PrimitiveNode, Note, MarkdownNote, subgraph instances) are not emitted;
    * widget values come from ``widgets_values`` mapped through :func:`widget_slots`
      (the ``control_after_generate`` value after ``seed``/``noise_seed`` etc. is
      skipped); list values are wrapped as ``{"__value__": [...]}``;
    * linked inputs (also widgets converted to inputs) become ``[origin_id, slot]``;
      links are followed through Reroutes, through bypassed nodes (same slot if the
      types fit, else the first input of the wanted type) and into/out of subgraphs,
      whose inner nodes get ids ``"<subgraph node id>:<inner id>"``;
    * a PrimitiveNode's value is written into the widgets it feeds (``applyToGraph``);
    * finally inputs linked to nodes that are not in the prompt (muted) are dropped.

    ``object_info`` is the /object_info JSON (:func:`object_info`). Raises
    :class:`WorkflowConversionError` for node types it does not know. Not handled:
    legacy "group nodes" and V3 dynamic inputs (DynamicCombo/Autogrow) beyond their
    first widget.
    """
    if not isinstance(workflow, Mapping) or not isinstance(workflow.get("nodes"), list):
        if isinstance(workflow, Mapping) and workflow and all(isinstance(v, Mapping) and "class_type" in v for v in workflow.values()):
            raise WorkflowConversionError("this is already an API-format prompt")
        raise WorkflowConversionError("not a UI-format workflow (no 'nodes' list)")
    subgraph_defs = {sg["id"]: sg for sg in (workflow.get("definitions") or {}).get("subgraphs") or []}
    recs: dict[str, _Rec] = {}

    def build(nodes_list: list[dict], links_list: list, prefix: tuple[str, ...], instance: _Rec | None, depth=0) -> _Graph:
        if depth > 32:
            raise WorkflowConversionError("subgraphs nested too deeply (cycle?)")
        g = _Graph({n["id"]: n for n in nodes_list}, {}, prefix, instance)
        for link in links_list or []:
            d = _link_dict(link)
            g.links[d["id"]] = d
        for n in nodes_list:
            exec_id = ":".join(prefix + (str(n["id"]),))
            rec = _Rec(exec_id, n, g)
            recs[exec_id] = rec
            sg = subgraph_defs.get(n.get("type"))
            if sg is not None:
                rec.inner = build(sg.get("nodes") or [], sg.get("links") or [], prefix + (str(n["id"]),), rec, depth + 1)
        return g

    build(list(workflow.get("nodes") or []), list(workflow.get("links") or []), (), None)

    def rec_of(g: _Graph, node_id: Any) -> _Rec:
        key = ":".join(g.prefix + (str(node_id),))
        if key not in recs:
            raise WorkflowConversionError(f"link to missing node {node_id} (in graph {':'.join(g.prefix) or 'root'})")
        return recs[key]

    def is_virtual(rec: _Rec) -> bool:
        return rec.inner is not None or rec.node.get("type") in VIRTUAL_NODE_TYPES

    # ---- link resolution (ExecutableNodeDTO.resolveInput / resolveOutput) -----------
    def resolve_input(rec: _Rec, slot: int, seen: set, want: Any = None):
        key = (rec.exec_id, "I", slot)
        if key in seen:
            raise WorkflowConversionError(f"circular link while resolving input {slot} of node {rec.exec_id}")
        seen.add(key)
        if slot >= len(rec.inputs):
            raise WorkflowConversionError(f"node {rec.exec_id} has no input slot {slot}")
        inp = rec.inputs[slot]
        link_id = inp.get("link")
        if link_id is None:
            return None
        link = rec.graph.links.get(link_id)
        if link is None:
            raise WorkflowConversionError(f"node {rec.exec_id} input {inp.get('name')!r}: link {link_id} not found")
        inst = rec.graph.instance
        if inst is not None and link["origin_id"] == -10:  # the subgraph's input node
            return resolve_subgraph_input(inst, link["origin_slot"], seen)
        origin = rec_of(rec.graph, link["origin_id"])
        return resolve_output(origin, link["origin_slot"], want if want is not None else inp.get("type"), seen)

    def resolve_subgraph_input(inst: _Rec, k: int, seen: set):
        """Input ``k`` of the subgraph definition, seen from the instance ``inst``.

        Saved workflows drop unlinked widget inputs from ``inputs`` (the frontend's
        ``compressWidgetInputSlots``), so the instance input is found by name. Unlinked,
        its value is the instance's promoted widget (``getWidgetFromSlot``): one widget
        per definition input that feeds an inner widget, in definition order, values in
        the instance's ``widgets_values``. Without one, the inner widget keeps its value.
        """
        sg = subgraph_defs[inst.node["type"]]
        sg_inputs = sg.get("inputs") or []
        if k >= len(sg_inputs):
            raise WorkflowConversionError(f"subgraph node {inst.exec_id} has no input {k}")
        name = sg_inputs[k].get("name")
        for idx, inp in enumerate(inst.inputs):
            if inp.get("name") == name and inp.get("link") is not None:
                return resolve_input(inst, idx, seen)
        inner = inst.inner

        def feeds_widget(sg_input: dict) -> bool:
            for lid in sg_input.get("linkIds") or []:
                lk = inner.links.get(lid)
                if lk is None or lk.get("target_id") not in inner.nodes:
                    continue
                tins = inner.nodes[lk["target_id"]].get("inputs") or []
                ts = lk.get("target_slot", -1)
                if 0 <= ts < len(tins) and tins[ts].get("widget"):
                    return True
            return False

        wv = inst.node.get("widgets_values")
        if isinstance(wv, dict):
            return ("value", wv[name]) if name in wv else None
        if not isinstance(wv, list):
            return None
        # Newer frontends store the promoted widgets' order in properties.proxyWidgets:
        # [["-1", <subgraph input>], [<inner node id>, <widget>], ...]; the values of the
        # "-1" ones (the instance's own widgets) are its widgets_values, in that order.
        proxies = (inst.node.get("properties") or {}).get("proxyWidgets")
        names_with_widget = [i.get("name") for i in sg_inputs if feeds_widget(i)]
        if isinstance(proxies, list) and proxies:
            if len(wv) == len(proxies):
                order = [p[1] if isinstance(p, list) and str(p[0]) == "-1" else None for p in proxies]
            else:
                order = [p[1] for p in proxies if isinstance(p, list) and str(p[0]) == "-1" and p[1] in names_with_widget]
        else:
            order = names_with_widget
        if name in order:
            idx = order.index(name)
            if idx < len(wv) and wv[idx] is not None:
                return ("value", wv[idx])
        return None

    def bypass_slot(rec: _Rec, o: int, want: Any) -> int:
        ins, outs = rec.inputs, rec.outputs
        if want in ("*", "", None):
            return (o if len(ins) > o else 0) if ins else -1
        a = ins[o] if o < len(ins) else None
        r = outs[o].get("type") if o < len(outs) else None
        if a is not None and _valid_connection(a.get("type"), r) and _valid_connection(a.get("type"), want):
            return o
        for i, x in enumerate(ins):
            if x.get("type") == want:
                return i
        for i, x in enumerate(ins):
            if _valid_connection(x.get("type"), r) and _valid_connection(x.get("type"), want):
                return i
        return -1

    def resolve_output(rec: _Rec, slot: int, want: Any, seen: set):
        key = (rec.exec_id, "O", slot)
        if key in seen:
            raise WorkflowConversionError(f"circular link while resolving output {slot} of node {rec.exec_id}")
        seen.add(key)
        if rec.mode == MODE_BYPASS:
            k = bypass_slot(rec, slot, want)
            if k == -1:
                return None
            return resolve_input(rec, k, seen)
        if rec.inner is not None:  # subgraph instance: follow its output inside
            sg = subgraph_defs[rec.node["type"]]
            outs = sg.get("outputs") or []
            if slot >= len(outs):
                raise WorkflowConversionError(f"subgraph node {rec.exec_id} has no output {slot}")
            for lid in outs[slot].get("linkIds") or []:
                link = rec.inner.links.get(lid)
                if link is not None and link.get("target_id") == -20:
                    return resolve_output(rec_of(rec.inner, link["origin_id"]), link["origin_slot"], want, seen)
            return None
        if is_virtual(rec):  # Reroute: pass through its input; PrimitiveNode/Note: nothing
            if slot < len(rec.inputs) and rec.inputs[slot].get("link") is not None:
                return resolve_input(rec, slot, seen, want)
            return None
        return ("link", rec.exec_id, slot)

    # ---- PrimitiveNode.applyToGraph: push values into the widgets they feed ---------
    overrides: dict[tuple[str, str], Any] = {}

    def push_primitive(rec: _Rec, value: Any, out_links: Iterable, depth=0):
        for lid in out_links or []:
            link = rec.graph.links.get(lid)
            if link is None or depth > 64:
                continue
            target = rec_of(rec.graph, link["target_id"])
            if target.node.get("type") == "Reroute":
                for o in target.outputs:
                    push_primitive(target, value, o.get("links"), depth + 1)
                continue
            ts = link["target_slot"]
            if ts < len(target.inputs):
                w = (target.inputs[ts].get("widget") or {}).get("name")
                if w:
                    overrides[(target.exec_id, w)] = value

    for rec in list(recs.values()):
        if rec.node.get("type") == "PrimitiveNode" and rec.outputs:
            wv = rec.node.get("widgets_values")
            if isinstance(wv, list) and wv:
                push_primitive(rec, wv[0], rec.outputs[0].get("links"))

    # ---- emit ---------------------------------------------------------------------
    unknown = sorted(
        {
            (r.exec_id, r.node.get("type"))
            for r in recs.values()
            if not is_virtual(r) and r.mode not in (MODE_NEVER, MODE_BYPASS) and r.node.get("type") not in object_info
        },
        key=str,
    )
    if unknown:
        raise WorkflowConversionError(
            "node types not in object_info (missing custom nodes?): " + ", ".join(f"#{i} {t}" for i, t in unknown)
        )

    prompt: dict[str, dict] = {}
    for rec in recs.values():
        if is_virtual(rec) or rec.mode in (MODE_NEVER, MODE_BYPASS):
            continue
        ctype = rec.node["type"]
        node_def = object_info[ctype]
        inputs: dict[str, Any] = {}

        def put_value(name: str, value: Any, inputs: dict[str, Any] = inputs) -> None:
            # graphToPrompt: a list widget value is sent as {"__value__": [...]} so it is
            # not mistaken for a link (unwrapped again in execution.py:864-869)
            inputs[name] = {"__value__": value} if isinstance(value, list) else value

        wv = rec.node.get("widgets_values")
        if isinstance(wv, dict):
            for name, value in wv.items():
                put_value(name, value)
        elif isinstance(wv, list):
            slots = widget_slots(node_def)
            if len(wv) != len(slots):
                log.debug("node %s (%s): %d widget values for %d widgets %s", rec.exec_id, ctype, len(wv), len(slots), slots)
            for (name, kind), value in zip(slots, wv, strict=False):
                if kind == "value":
                    put_value(name, value)
            # Workflows saved before a node gained a widget have fewer values; the
            # frontend keeps such widgets at their default and sends that.
            for name, kind in slots[len(wv) :]:
                if kind == "value" and name not in inputs:
                    default = _widget_default(node_def, name)
                    if default is not _NO_DEFAULT:
                        put_value(name, default)
        for (eid, name), value in overrides.items():
            if eid == rec.exec_id:
                put_value(name, value)
        for slot, inp in enumerate(rec.inputs):
            res = resolve_input(rec, slot, set())
            if res is None:
                continue
            name = (inp.get("widget") or {}).get("name") or inp["name"]
            if res[0] == "value":
                put_value(name, res[1])
            else:
                inputs[name] = [res[1], int(res[2])]
        title = rec.node.get("title") or node_def.get("display_name") or ctype
        prompt[rec.exec_id] = {"inputs": inputs, "class_type": ctype, "_meta": {"title": title}}

    for entry in prompt.values():  # graphToPrompt: drop links to nodes not in the prompt
        for k, v in list(entry["inputs"].items()):
            if isinstance(v, list) and len(v) == 2 and v[0] not in prompt:
                del entry["inputs"][k]
    return prompt


# ---------------------------------------------------------------------------------
# Self-check: python tests/support/comfy_env.py
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
        for root in find_comfyuis():
            print(f"{comfyui_version(root) or 'unknown'}\t{root}")  # noqa: T201 - CLI output
        return 0
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
