"""Training losses to the browser: ``svdiff.train`` websocket messages for the node's live
curve, and the curve kept in the node's output (shown again after a page reload)."""

from __future__ import annotations

import logging
import math
import time

log = logging.getLogger("svdiff")

TRAIN_EVENT = "svdiff.train"
MAX_UI_LOSSES = 5000  # steps of the curve kept in the node's output (history)


def prompt_server():
    """ComfyUI's running server (``PromptServer.instance``), or None (headless runs)."""
    try:
        from server import PromptServer
    except ImportError:
        return None
    return getattr(PromptServer, "instance", None)


def finite_or_none(value: float) -> float | None:
    """JSON has no NaN/inf (the browser's JSON.parse rejects them): a diverged step is null."""
    value = float(value)
    return value if math.isfinite(value) else None


class LossStream:
    """SVDiffTrain's losses to the browser as ``svdiff.train`` messages.

    Losses are batched so a fast GPU run sends at most ``1 / interval`` messages a
    second; no step is dropped. Without a server (headless runs, tests) nothing is sent.
    """

    def __init__(self, node_id: str | None, steps: int, interval: float = 0.1):
        self.server = prompt_server()
        self.node_id = node_id
        self.steps = steps
        self.interval = interval
        self.pending: list[float] = []
        self.first_step = 1
        self.last_sent = 0.0

    def _send(self, **data) -> None:
        if self.server is None or self.node_id is None:
            return
        payload = {"node": str(self.node_id), "prompt_id": getattr(self.server, "last_prompt_id", None), "steps": self.steps, **data}
        try:
            self.server.send_sync(TRAIN_EVENT, payload, getattr(self.server, "client_id", None))
        except Exception as exc:  # a closed socket must not stop training
            log.debug("SVDiff: loss message not sent: %s", exc)

    def phase(self, text: str, done: int, total: int) -> None:
        """What a run does before its first step (prior images, encoding, decompositions),
        shown on the node's curve until training starts; at most ``1 / interval`` a second."""
        now = time.monotonic()
        if now - self.last_sent >= self.interval or done >= total:
            self._send(event="phase", step=0, first_step=1, losses=[], text=text, done=done, total=total)
            self.last_sent = now

    def start(self) -> None:
        self.pending = []
        self._send(event="start", step=0, first_step=1, losses=[])

    def add(self, step: int, loss: float) -> None:
        if not self.pending:
            self.first_step = step
        self.pending.append(finite_or_none(loss))
        now = time.monotonic()
        if now - self.last_sent >= self.interval or step >= self.steps:
            self.flush(step)
            self.last_sent = now

    def flush(self, step: int) -> None:
        if self.pending:
            self._send(event="losses", step=step, first_step=self.first_step, losses=self.pending)
            self.pending = []

    def done(self, step: int) -> None:
        self.flush(step)
        self._send(event="done", step=step, first_step=step + 1, losses=[])


def curve_ui(losses: list[float]) -> dict:
    """The node output entry web/svdiff.js draws the finished curve from."""
    return {"svdiff_loss": [finite_or_none(x) for x in losses[-MAX_UI_LOSSES:]]}
