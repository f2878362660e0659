"""The extension's server side of the UI: a read-only JSON route and the training loss stream.

``GET /svdiff/shift_info?name=<shift>[&checkpoint=<name>&checkpoint_folder=checkpoints|diffusion_models]``
(also under ``/api/``) answers the loader nodes' info panel: what the shift file is and,
when a checkpoint is named, whether its diffusion-model layers fit that checkpoint.

Confinement: a name is only resolved when ComfyUI's own file list for the folder
(``folder_paths.get_filename_list``, what the dropdowns offer) contains it, so the route
reads nothing the loader nodes could not already load; "../", absolute paths and names
outside the model folders are answered 404 without touching the file system. The route
never writes. A listed file that is not a usable shift is answered 200 with ``error``
(the panel shows the loader's message).

``svdiff.train`` websocket messages carry SVDiffTrain's losses to the node's live curve.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from functools import lru_cache

import folder_paths

from ..svdiff import file_info
from ..svdiff.fileformat import ShiftFileError
from .common import SHIFT_FOLDER

log = logging.getLogger("svdiff")

ROUTE = "/svdiff/shift_info"
CHECKPOINT_FOLDERS = ("checkpoints", "diffusion_models")
TRAIN_EVENT = "svdiff.train"
MAX_UI_LOSSES = 5000  # steps of the curve kept in the node's output (history)
_registered: set[int] = set()


def listed_path(folder: str, name: str) -> str | None:
    """The full path of ``name`` if ComfyUI lists it in ``folder``, else None."""
    if not name or folder not in folder_paths.folder_names_and_paths:
        return None
    if name not in folder_paths.get_filename_list(folder):
        return None
    return folder_paths.get_full_path(folder, name)


def checkpoint_architecture(shapes: dict[str, tuple[int, ...]]) -> str | None:
    """ComfyUI's model-config name (SD15, SDXL, Flux, ...) from a header's shapes, or None."""
    try:
        import comfy.model_detection as detection
        import torch

        prefixed = any(k.startswith(file_info.CHECKPOINT_MODEL_PREFIX) for k in shapes)
        prefix = file_info.CHECKPOINT_MODEL_PREFIX if prefixed else ""
        meta = {k: torch.empty(shape, dtype=torch.float16, device="meta") for k, shape in shapes.items()}
        config = detection.model_config_from_unet(meta, prefix)
    except Exception as exc:  # detection of unknown families raises anything; the panel just says "unknown"
        log.debug("SVDiff: architecture detection failed: %s", exc)
        return None
    return type(config).__name__ if config is not None else None


@lru_cache(maxsize=64)
def _checkpoint_architecture_cached(path: str, mtime: float, size: int) -> str | None:
    _, shapes = file_info.safetensors_shapes(path)
    return checkpoint_architecture(shapes)


@lru_cache(maxsize=64)
def _describe_cached(path: str, mtime: float, size: int):
    return file_info.describe(path)


def _stat_key(path: str) -> tuple[str, float, int]:
    stat = os.stat(path)
    return path, stat.st_mtime, stat.st_size


def shift_info(name: str, checkpoint: str = "", checkpoint_folder: str = "checkpoints") -> tuple[int, dict]:
    """(HTTP status, JSON body) for the route; blocking (file reads), run off the event loop."""
    path = listed_path(SHIFT_FOLDER, name)
    if path is None:
        return 404, {"error": f"no spectral shift named '{name}' in models/{SHIFT_FOLDER}; pick one from the loader's list"}
    try:
        shift, info = _describe_cached(*_stat_key(path))
    except ShiftFileError as exc:
        # A listed file that cannot be used is an answer, not a failed request (the
        # browser logs failed requests as console errors).
        return 200, {"error": str(exc), "file": name}
    body = {"info": info, "fit": None}
    if checkpoint:
        if checkpoint_folder not in CHECKPOINT_FOLDERS:
            return 400, {"error": f"checkpoint_folder must be one of {', '.join(CHECKPOINT_FOLDERS)}, not '{checkpoint_folder}'"}
        checkpoint_path = listed_path(checkpoint_folder, checkpoint)
        if checkpoint_path is None:
            body["fit"] = {"status": "unknown", "checkpoint": checkpoint, "message": f"'{checkpoint}' is not in models/{checkpoint_folder}"}
        else:
            try:
                architecture = _checkpoint_architecture_cached(*_stat_key(checkpoint_path))
                body["fit"] = file_info.fit(shift, checkpoint_path, architecture)
            except ShiftFileError as exc:
                body["fit"] = {"status": "unknown", "checkpoint": checkpoint, "message": str(exc)}
    return 200, body


def register_routes() -> bool:
    """Add the route to ComfyUI's server (once per server); False when there is no server."""
    try:
        from aiohttp import web
        from server import PromptServer
    except ImportError:
        return False
    server = getattr(PromptServer, "instance", None)
    routes = getattr(server, "routes", None)
    if routes is None or id(routes) in _registered:
        return False

    @routes.get(ROUTE)
    async def _shift_info(request):
        query = request.rel_url.query
        status, body = await asyncio.to_thread(
            shift_info, query.get("name", ""), query.get("checkpoint", ""), query.get("checkpoint_folder", "checkpoints")
        )
        return web.json_response(body, status=status)

    _registered.add(id(routes))
    return True


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
