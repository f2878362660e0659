"""The node that puts the demo files in place, so the shipped workflows run from the UI."""

from __future__ import annotations

from comfy_api.latest import io

from ..svdiff.comfy.demo import DEMO_CHECKPOINT, install_demo_files
from ..svdiff.comfy.progress import NodeProgress
from .common import CATEGORY, log


class SVDiffInstallDemo(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SVDiffInstallDemo",
            display_name="Install Demo Files (SVDiff)",
            category=f"{CATEGORY}/demo",
            description=(
                f"Put the files the example workflows use in ComfyUI's folders: the world model ({DEMO_CHECKPOINT}, ~290 MB: "
                "a small SD1.5-layout model trained on pictures of coloured shapes, 64x64, seconds per picture on a CPU), "
                "shifts, a LoRA and K/V deltas with their token trained on it, subject pictures and a photo to edit. Files "
                "already there are left alone. The same as `python scripts/install_demo.py`."
            ),
            is_output_node=True,
            inputs=[],
            outputs=[io.String.Output(display_name="report")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs):
        return float("nan")  # always runs: it checks the folders each time (quick when all is there)

    @classmethod
    def execute(cls):
        placed = install_demo_files(progress=NodeProgress(cls.hidden.unique_id))
        written = sum(p.status == "written" for p in placed)
        lines = [
            f"{written} written, {len(placed) - written} already in place:",
            *(f"  {p.line()}" for p in placed),
            "The loaders' lists are refreshed; open a workflow from Workflow → Browse Templates → Extensions → ComfyUI-SVDiff.",
            f"{DEMO_CHECKPOINT} draws 64x64 coloured shapes (the workflows' prompts name them); choose your own checkpoint "
            "for real pictures and raise the settings each workflow's note lists.",
        ]
        text = "\n".join(lines)
        log.info("SVDiff demo files: %s", text)
        return io.NodeOutput(text, ui={"text": (text,)})


NODES = [SVDiffInstallDemo]
