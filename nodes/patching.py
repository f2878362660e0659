"""Nodes that load, apply, combine, select, save, inspect and export spectral shifts.

Node IDs are public (saved in users' workflows) and never change.
"""

from __future__ import annotations

from comfy_api.latest import io, ui

from ..svdiff.comfy.export import write_lora
from ..svdiff.comfy.folders import (
    LORA_FOLDER,
    SHIFT_FOLDER,
    file_fingerprint,
    free_paths,
    load_shift_file,
    relative_name,
    save_shift,
    shift_files,
)
from ..svdiff.comfy.patching import MODES, apply_shift
from ..svdiff.comfy.progress import NodeProgress
from ..svdiff.inspection import cosine_plot, describe, magnitude_plot, to_image_tensor
from ..svdiff.layers import layer_selector
from ..svdiff.shift import SpectralShift, combine, select
from ..svdiff.targets import ShiftMismatchError
from .common import CATEGORY, SpectralShiftType, log, require_finite


def _strength_inputs():
    return [
        io.Float.Input(
            "strength_model",
            default=1.0,
            min=-10.0,
            max=10.0,
            step=0.01,
            tooltip="Scale s of the shift on the diffusion model, inside the ReLU: ReLU(σ + s·δ) (paper appendix E.3). 0 leaves the model untouched.",
        ),
        io.Float.Input(
            "strength_clip",
            default=1.0,
            min=-10.0,
            max=10.0,
            step=0.01,
            tooltip="Scale of the shift on the text encoder(s). Ignored when no CLIP is connected.",
        ),
    ]


def _mode_input():
    return io.Combo.Input(
        "mode",
        options=list(MODES),
        default="patch",
        optional=True,
        tooltip=(
            "patch: add the change to the weights, like Load LoRA (fastest for sampling). "
            "bypass: leave the weights untouched and correct each layer's output as it runs, like Load LoRA (Bypass); "
            "for quantized models (fp8, GGUF) whose weights cannot be patched. Both give the same result."
        ),
    )


def _apply(model, clip, shift: SpectralShift, strength_model: float, strength_clip: float, node_id: str | None, input_name: str, mode: str):
    strength_model = require_finite("strength_model", strength_model)
    strength_clip = require_finite("strength_clip", strength_clip)
    total = len(shift.tensors)
    try:
        new_model, new_clip, report = apply_shift(
            model, clip, shift, strength_model, strength_clip, progress=NodeProgress(node_id, total), mode=mode
        )
    except ShiftMismatchError as exc:
        raise ShiftMismatchError(f"{input_name}: {exc}") from None
    log.info("SVDiff applied %s", report.summary())
    return new_model, new_clip, report


class SVDiffLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SVDiffLoader",
            display_name="Load Spectral Shift (SVDiff)",
            category=CATEGORY,
            description="Load a spectral-shift file from models/spectral_shifts and apply it to a MODEL and CLIP, like a LoRA. Chains with LoRAs and other shifts in any order.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to patch."),
                io.Clip.Input("clip", optional=True, tooltip="The CLIP to patch (optional; text-encoder shifts are skipped without it)."),
                io.Combo.Input(
                    "shift_name",
                    options=shift_files(),
                    tooltip="A .safetensors spectral-shift file in models/spectral_shifts (or an svdiff-pytorch spectral_shifts.safetensors).",
                ),
                *_strength_inputs(),
                _mode_input(),
            ],
            outputs=[io.Model.Output(), io.Clip.Output()],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def fingerprint_inputs(cls, model, shift_name, strength_model, strength_clip, clip=None, mode="patch"):
        return file_fingerprint(SHIFT_FOLDER, shift_name)

    @classmethod
    def execute(cls, model, shift_name, strength_model, strength_clip, clip=None, mode="patch"):
        shift = load_shift_file(shift_name)
        new_model, new_clip, report = _apply(model, clip, shift, strength_model, strength_clip, cls.hidden.unique_id, "shift_name", mode)
        return io.NodeOutput(new_model, new_clip, ui=ui.PreviewText(report.summary()))


class SVDiffLoadShift(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SVDiffLoadShift",
            display_name="Load Spectral Shift File (SVDiff)",
            category=CATEGORY,
            description="Load a spectral-shift file as a SPECTRAL_SHIFT, to combine, select, inspect, save or apply.",
            inputs=[io.Combo.Input("shift_name", options=shift_files(), tooltip="A .safetensors file in models/spectral_shifts.")],
            outputs=[SpectralShiftType.Output(display_name="shift")],
        )

    @classmethod
    def fingerprint_inputs(cls, shift_name):
        return file_fingerprint(SHIFT_FOLDER, shift_name)

    @classmethod
    def execute(cls, shift_name):
        return io.NodeOutput(load_shift_file(shift_name))


class SVDiffApply(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SVDiffApply",
            display_name="Apply Spectral Shift (SVDiff)",
            category=CATEGORY,
            description="Patch a MODEL and CLIP with a SPECTRAL_SHIFT. Shifts applied by chained nodes combine inside one ReLU: ReLU(σ + s₁δ₁ + s₂δ₂) (paper eqs. 4–5).",
            inputs=[
                io.Model.Input("model"),
                io.Clip.Input("clip", optional=True),
                SpectralShiftType.Input("shift"),
                *_strength_inputs(),
                _mode_input(),
            ],
            outputs=[io.Model.Output(), io.Clip.Output()],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, shift, strength_model, strength_clip, clip=None, mode="patch"):
        new_model, new_clip, report = _apply(model, clip, shift, strength_model, strength_clip, cls.hidden.unique_id, "shift", mode)
        return io.NodeOutput(new_model, new_clip, ui=ui.PreviewText(report.summary()))


class SVDiffCombine(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SVDiffCombine",
            display_name="Combine Spectral Shifts (SVDiff)",
            category=CATEGORY,
            description=(
                "Per layer weight_a·δa + weight_b·δb. Add: 1 and 1 (eq. 4). Interpolate: α and 1−α (eq. 5). "
                "Scale: leave shift_b empty. Rank-limited shifts are zero-padded."
            ),
            inputs=[
                SpectralShiftType.Input("shift_a"),
                io.Float.Input("weight_a", default=1.0, min=-10.0, max=10.0, step=0.01),
                SpectralShiftType.Input("shift_b", optional=True),
                io.Float.Input("weight_b", default=1.0, min=-10.0, max=10.0, step=0.01),
            ],
            outputs=[SpectralShiftType.Output(display_name="shift")],
        )

    @classmethod
    def execute(cls, shift_a, weight_a, weight_b, shift_b=None):
        weight_a = require_finite("weight_a", weight_a)
        weight_b = require_finite("weight_b", weight_b)
        return io.NodeOutput(combine(shift_a, weight_a, shift_b, weight_b))


class SVDiffSelectLayers(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SVDiffSelectLayers",
            display_name="Select Shift Layers (SVDiff)",
            category=CATEGORY,
            description=(
                "Keep or drop layers of a shift by UNet block or name. With Combine this is the paper's per-layer "
                "style mixing (Fig. 12): take some blocks from one shift and the rest from another."
            ),
            inputs=[
                SpectralShiftType.Input("shift"),
                io.Combo.Input(
                    "mode",
                    options=["keep", "drop"],
                    default="keep",
                    tooltip="keep: only the chosen layers remain. drop: the chosen layers are removed.",
                ),
                io.String.Input(
                    "input_blocks",
                    default="all",
                    tooltip=(
                        "Down blocks (ComfyUI's input_blocks.N): 'all', 'none', indices such as '0-3, 7', or resolution levels "
                        "such as 'L1' or 'L0-1' (L0 = full latent resolution, e.g. 64×64 at 512 px for SD1.5; each level halves it). "
                        "Level ℓ is blocks 1+3ℓ, 2+3ℓ and the downsampler 3+3ℓ (L0 also 0, conv_in). SD1.x/2.x: L0-L3, SDXL: L0-L2."
                    ),
                ),
                io.Boolean.Input("middle_block", default=True, tooltip="The mid block (ComfyUI's middle_block)."),
                io.String.Input(
                    "output_blocks",
                    default="all",
                    tooltip=(
                        "Up blocks (ComfyUI's output_blocks.N, lowest resolution first): 'all', 'none', indices such as '0-2', "
                        "or levels such as 'L0' (full resolution: SD1.x/2.x blocks 9-11, SDXL 6-8)."
                    ),
                ),
                io.Boolean.Input(
                    "other_unet", default=True, tooltip="UNet layers outside the blocks: time/label embeddings and the output layers."
                ),
                io.Boolean.Input("text_encoder", default=True, tooltip="All text-encoder layers."),
                io.String.Input(
                    "name_patterns",
                    default="",
                    multiline=True,
                    tooltip="Also choose keys by name, comma or newline separated: a substring ('attn2'), a glob ('*.attn2.to_k.*') or a regex ('re:attn2\\.to_[kv]').",
                ),
            ],
            outputs=[SpectralShiftType.Output(display_name="shift")],
        )

    @classmethod
    def execute(cls, shift, mode, input_blocks, middle_block, output_blocks, other_unet, text_encoder, name_patterns):
        chosen = layer_selector(shift, input_blocks, middle_block, output_blocks, other_unet, text_encoder, name_patterns)
        keep = chosen if mode == "keep" else (lambda key: not chosen(key))
        description = f"{mode} input={input_blocks!r} middle={middle_block} output={output_blocks!r} other={other_unet} te={text_encoder} names={name_patterns!r}"
        result = select(shift, keep, description)
        if not result.tensors:
            raise ValueError(
                f"SVDiffSelectLayers: the selection leaves no layers of '{shift.name}' ({mode} {description}); "
                "widen the block ranges or patterns"
            )
        text = f"{len(result.tensors)} of {len(shift.tensors)} tensors kept"
        return io.NodeOutput(result, ui=ui.PreviewText(text))


class SVDiffSave(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SVDiffSave",
            display_name="Save Spectral Shift (SVDiff)",
            category=CATEGORY,
            description="Save a shift to models/spectral_shifts (format v1, atomic write, never overwrites unless asked).",
            is_output_node=True,
            inputs=[
                SpectralShiftType.Input("shift"),
                io.String.Input(
                    "filename_prefix",
                    default="svdiff/shift",
                    tooltip="Name relative to models/spectral_shifts; a number is appended if the file exists.",
                ),
                io.Combo.Input(
                    "precision",
                    options=["fp16", "fp32"],
                    default="fp16",
                    tooltip="fp16 halves the file; the round-trip error of δ is below 5e-4 relative (see README), far below what changes an image.",
                ),
                io.Boolean.Input(
                    "overwrite", default=False, tooltip="Replace an existing file of exactly this name instead of numbering a new one."
                ),
                io.String.Input("trigger_words", default="", optional=True, tooltip="Stored in the metadata and shown by loaders."),
                io.String.Input("description", default="", optional=True, multiline=True),
            ],
            outputs=[io.String.Output(display_name="filename")],
        )

    @classmethod
    def execute(cls, shift, filename_prefix, precision, overwrite, trigger_words="", description=""):
        target = free_paths(filename_prefix, [SHIFT_FOLDER], overwrite, "spectral-shift file")[SHIFT_FOLDER]
        metadata = {"svdiff.trigger_words": trigger_words.strip(), "svdiff.description": description.strip()}
        extra = {k: v for k, v in metadata.items() if v}
        save_shift(shift, target, precision=precision, overwrite=overwrite, keep_name=True, metadata=extra)
        relative = relative_name(SHIFT_FOLDER, target)
        size_kib = target.stat().st_size / 1024
        text = f"saved {relative} ({size_kib:,.1f} KiB, {precision})"
        log.info("SVDiff %s", text)
        return io.NodeOutput(relative, ui=ui.PreviewText(text))


class SVDiffInspect(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SVDiffInspect",
            display_name="Inspect Spectral Shift (SVDiff)",
            category=CATEGORY,
            description="Summary of a shift and a plot of mean |δ| per block; with a second shift, cosine similarity per layer (paper appendix E.2, Fig. 15).",
            is_output_node=True,
            inputs=[SpectralShiftType.Input("shift"), SpectralShiftType.Input("shift_b", optional=True)],
            outputs=[io.String.Output(display_name="summary"), io.Image.Output(display_name="plot")],
        )

    @classmethod
    def execute(cls, shift, shift_b=None):
        text = describe(shift, shift_b)
        plots = [magnitude_plot(shift)]
        if shift_b is not None:
            plots.append(cosine_plot(shift, shift_b))
        images = to_image_tensor(plots)
        return io.NodeOutput(text, images, ui={"text": (text,), **ui.PreviewImage(images, cls=cls).as_dict()})


class SVDiffExportLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SVDiffExportLoRA",
            display_name="Export Shift as LoRA (SVDiff)",
            category=CATEGORY,
            description=(
                "Write an ordinary LoRA (lora_up/lora_down, ComfyUI key names) to models/loras for tools that do not know SVDiff. "
                "Exact when the rank covers every changed singular value; otherwise the best rank-k approximation of each ΔW, with the error reported."
            ),
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="The base model the shift is for (its weights define ΔW)."),
                io.Clip.Input("clip", optional=True),
                SpectralShiftType.Input("shift"),
                io.Int.Input(
                    "rank",
                    default=64,
                    min=1,
                    max=4096,
                    tooltip="LoRA rank per layer. A spectral shift of a layer with r singular values is exact at rank r.",
                ),
                *_strength_inputs(),
                io.String.Input(
                    "filename_prefix",
                    default="svdiff/exported_lora",
                    tooltip="Name relative to models/loras; a number is appended if the file exists.",
                ),
                io.Combo.Input("precision", options=["fp16", "fp32"], default="fp16"),
            ],
            outputs=[io.String.Output(display_name="report")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, shift, rank, strength_model, strength_clip, filename_prefix, precision, clip=None):
        strength_model = require_finite("strength_model", strength_model)
        strength_clip = require_finite("strength_clip", strength_clip)
        target = free_paths(filename_prefix, [LORA_FOLDER], False, "LoRA file")[LORA_FOLDER]
        progress = NodeProgress(cls.hidden.unique_id, len(shift.tensors))
        report = write_lora(target, model, clip, shift, rank, strength_model, strength_clip, precision, progress)
        text = f"saved {relative_name(LORA_FOLDER, target)} in models/loras\n{report.summary(rank)}"
        log.info("SVDiff export: %s", text)
        return io.NodeOutput(text, ui=ui.PreviewText(text))


NODES = [
    SVDiffLoader,
    SVDiffLoadShift,
    SVDiffApply,
    SVDiffCombine,
    SVDiffSelectLayers,
    SVDiffSave,
    SVDiffInspect,
    SVDiffExportLoRA,
]
