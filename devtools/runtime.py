"""Running ComfyUI's coroutines from synchronous code, and capturing what it logs.

Helpers of the in-process harness (:mod:`devtools.harness`, :mod:`devtools.handle`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable
from typing import Any


def run_in_thread(fn: Callable[[], Any], timeout: float | None = None, name: str = "devtools") -> tuple[threading.Thread, dict]:
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


def run_coro(factory: Callable[[], Any]) -> Any:
    """``asyncio.run(factory())`` in a helper thread; re-raises its exception."""
    t, holder = run_in_thread(lambda: asyncio.run(factory()))
    if "exc" in holder:
        raise holder["exc"]
    return holder.get("result")


class LogCapture(logging.Handler):
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


def json_roundtrip(obj: Any) -> Any:
    """What a client receives from ``web.json_response`` (tuples become lists)."""
    return json.loads(json.dumps(obj, default=str))
