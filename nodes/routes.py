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
"""

from __future__ import annotations

import asyncio
import logging
import os
from functools import lru_cache

import folder_paths

from ..svdiff import file_info
from ..svdiff.comfy.folders import SHIFT_FOLDER
from ..svdiff.fileformat import ShiftFileError

log = logging.getLogger("svdiff")

ROUTE = "/svdiff/shift_info"
CHECKPOINT_FOLDERS = ("checkpoints", "diffusion_models")
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
