"""ComfyUI-SVDiff: spectral-shift fine-tuning (SVDiff) as native ComfyUI weight patches.

ComfyUI loads this package as a custom node and calls :func:`comfy_entrypoint`
(V3 node API). Importing it outside ComfyUI must not fail (tests import the core
through it), so everything ComfyUI-specific is imported inside functions.
"""

from __future__ import annotations

import logging

WEB_DIRECTORY = "./web"

log = logging.getLogger("svdiff")


def _make_extension():
    from comfy_api.latest import ComfyExtension

    from .nodes import ALL_NODES, register_model_folder
    from .nodes.routes import register_routes
    from .svdiff.comfy import adapter as weight_adapter

    class SVDiffExtension(ComfyExtension):
        loaded = False

        async def on_load(self) -> None:
            # ComfyUI ≥ v0.14 awaits on_load() after comfy_entrypoint(); earlier
            # releases never call it, so comfy_entrypoint() does: the second call returns.
            if self.loaded:
                return
            self.loaded = True
            register_model_folder()
            adapter = weight_adapter.register()
            routes = register_routes()
            log.info("SVDiff loaded: models/spectral_shifts folder, weight adapter %s, routes %s", adapter, routes)

        async def get_node_list(self):
            return list(ALL_NODES)

    return SVDiffExtension()


async def comfy_entrypoint():
    """Called by ComfyUI's custom-node loader (comfy_api.latest)."""
    extension = _make_extension()
    await extension.on_load()
    return extension


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
