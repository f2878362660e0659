"""ComfyUI progress bars for long work, honouring the UI's cancel button."""

from __future__ import annotations

import comfy.model_management
import comfy.utils


class NodeProgress:
    """``progress(done, total)``: a node's progress bar, made on first use (its total
    is known only then), that raises ComfyUI's interrupt when the user cancels."""

    def __init__(self, node_id: str | None = None, total: int | None = None):
        self.node_id = node_id
        self.bar = None if total is None else comfy.utils.ProgressBar(max(total, 1), node_id=node_id)

    def __call__(self, done: int, total: int, preview=None) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        if self.bar is None:
            self.bar = comfy.utils.ProgressBar(max(total, 1), node_id=self.node_id)
        self.bar.update_absolute(done, max(total, 1), preview=preview)
