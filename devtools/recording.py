"""A stand-in for ComfyUI's ``server.PromptServer`` that records what the executor sends.

Used by the in-process harness (:mod:`devtools.harness`): ComfyUI's executor talks to
a server object during a prompt; this one keeps every message instead of sending it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


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
