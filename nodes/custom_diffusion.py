"""Custom Diffusion nodes: K/V training with a modifier token, and the closed-form concept merge."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import folder_paths
import torch
from comfy_api.latest import io

from ..svdiff import comfy_merge, fileformat
from ..svdiff.apply import apply_shift
from ..svdiff.shift import SpectralShift
from ..svdiff.training import augment
from ..svdiff.training.config import TrainConfig
from . import routes
from .common import (
    CATEGORY,
    SHIFT_FOLDER,
    DatasetType,
    NodeProgress,
    SpectralShiftType,
    file_fingerprint,
    numbered,
    require_finite,
    safe_output_path,
)
from .training import _encode_captions, _encode_images, _encode_pixels, _prior_examples, comfy_training_progress

log = logging.getLogger("svdiff")

ConceptsType = io.Custom("SVDIFF_CONCEPTS")
LORA_FOLDER = "loras"
EMBEDDING_FOLDER = "embeddings"

DELTAS = {
    "K/V weights (Custom Diffusion)": ("full", "UNet-CA-KV", LORA_FOLDER),
    "K/V spectral shifts (SVDiff)": ("spectral", "UNet-CA-KV", SHIFT_FOLDER),
    "all-layer spectral shifts (SVDiff)": ("spectral", "UNet", SHIFT_FOLDER),
}
AUGMENT = ("auto", "on", "off")


def _free_stem(prefix: str, folders: list[str], overwrite: bool) -> tuple[str, dict[str, Path]]:
    """One file name free in every folder (``name``, ``name_00001``, …) and its paths."""
    paths = {folder: safe_output_path(folder, prefix, "file") for folder in folders}
    first, *others = paths.values()
    if not overwrite:
        first = numbered(first, *others)
        paths = {folder: path.with_name(first.name) for folder, path in paths.items()}
    return first.stem, paths


def _embedding_name(path: Path) -> str:
    root = Path(folder_paths.get_folder_paths(EMBEDDING_FOLDER)[0])
    return path.relative_to(root).with_suffix("").as_posix()


def _augmented_examples(vae, dataset, variants: int, seed: int, flip: bool):
    """``variants`` draws of the Custom Diffusion policy per (repeated) image, each encoded once."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for item in dataset.expanded():
        for _ in range(variants):
            image = item.image
            if flip and bool(torch.rand((), generator=generator) < 0.5):
                image = torch.flip(image, dims=[1])
            aug = augment.draw(generator, dataset.resolution)
            pixels, mask = augment.apply(image, aug)
            rows.append((_encode_pixels(vae, pixels, False)[0], aug.prefix + item.caption, mask))
    return rows


class SVDiffTrainCustomDiffusion(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SVDiffTrainCustomDiffusion",
            display_name="Train Custom Diffusion (SVDiff)",
            category=f"{CATEGORY}/training",
            is_output_node=True,
            description=(
                "Custom Diffusion (Kumari et al. 2023): train the cross-attention K/V weights and a modifier token V* "
                "(saved as a ComfyUI embedding: write embedding:<name> in prompts), with the reference's scale augmentation "
                "and real or generated regularisation images. Or train SVDiff spectral shifts on the same data to compare."
            ),
            inputs=[
                io.Model.Input("model"),
                io.Clip.Input("clip"),
                io.Vae.Input("vae"),
                DatasetType.Input("dataset", tooltip="Captions contain the modifier token, e.g. 'photo of a <new1> cat'."),
                io.Combo.Input("deltas", options=list(DELTAS), default=next(iter(DELTAS)), tooltip="What is trained besides the token."),
                io.Int.Input("steps", default=250, min=1, max=1000000, tooltip="Paper: 250 for one concept (batch 8)."),
                io.Float.Input(
                    "learning_rate",
                    default=1e-5,
                    min=0.0,
                    max=1.0,
                    step=1e-6,
                    tooltip="K/V weights (reference: 1e-5 per image of the batch).",
                ),
                io.Float.Input(
                    "learning_rate_spectral", default=1e-3, min=0.0, max=1.0, step=1e-5, tooltip="Spectral shifts (SVDiff: 1e-3)."
                ),
                io.String.Input("modifier_token", default="<new1>", tooltip="The placeholder word of the captions; empty = no new token."),
                io.String.Input(
                    "initializer_token",
                    default="42170",
                    tooltip="Token id or single-token word V* starts from (42170: the reference's 'ktn').",
                ),
                io.Float.Input("learning_rate_token", default=1e-5, min=0.0, max=1.0, step=1e-6),
                io.Combo.Input(
                    "augmentation", options=list(AUGMENT), default="auto", tooltip="auto: on for K/V weights, off for spectral shifts."
                ),
                io.Int.Input(
                    "augment_variants",
                    default=8,
                    min=1,
                    max=256,
                    tooltip="Augmented copies drawn per image before training, each VAE-encoded once.",
                ),
                io.Float.Input(
                    "prior_weight", default=1.0, min=0.0, max=100.0, step=0.05, tooltip="Weight of the regularisation loss; 0 = none."
                ),
                io.String.Input(
                    "class_prompt", default="", tooltip="Caption of generated or connected class images, e.g. 'photo of a cat'."
                ),
                io.Int.Input(
                    "num_class_images",
                    default=0,
                    min=0,
                    max=1000,
                    tooltip="Class images to generate when no regularisation images are connected.",
                ),
                io.Int.Input("batch_size", default=1, min=1, max=64),
                io.Boolean.Input("random_flip", default=True),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1),
                io.String.Input(
                    "filename_prefix",
                    default="cd_concept",
                    tooltip="K/V weights go to models/loras, shifts to models/spectral_shifts, the token to models/embeddings (same name).",
                ),
                io.Boolean.Input("overwrite", default=False, tooltip="Replace files of the same name (otherwise a number is added)."),
                DatasetType.Input(
                    "regularization", optional=True, tooltip="Real images with their own captions (Training Images from Folder)."
                ),
                io.Image.Input("class_images", optional=True),
            ],
            outputs=[
                io.Model.Output(display_name="model"),
                io.Clip.Output(display_name="clip"),
                SpectralShiftType.Output(display_name="deltas"),
                io.String.Output(display_name="token"),
                io.Custom("LOSS_MAP").Output(display_name="loss"),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, clip, vae, dataset, deltas, steps, learning_rate, learning_rate_spectral, modifier_token, initializer_token,
                learning_rate_token, augmentation, augment_variants, prior_weight, class_prompt, num_class_images, batch_size, random_flip,
                seed, filename_prefix, overwrite, regularization=None, class_images=None):  # fmt: skip
        from ..svdiff import comfy_training
        from ..svdiff.training.cutmix import MultiSubjectDataset

        for name, value in (("learning_rate", learning_rate), ("learning_rate_spectral", learning_rate_spectral),
                            ("learning_rate_token", learning_rate_token), ("prior_weight", prior_weight)):  # fmt: skip
            require_finite(name, value)
        if deltas not in DELTAS:
            raise ValueError(f"deltas '{deltas}' is unknown; choose one of {', '.join(DELTAS)}")
        if isinstance(dataset, MultiSubjectDataset):
            raise ValueError(
                "dataset: Custom Diffusion trains from plain image folders; use 'Train Spectral Shift' for Cut-Mix-Unmix datasets"
            )
        method, subset, folder = DELTAS[deltas]
        token = modifier_token.strip()
        try:
            config = TrainConfig(
                steps=steps, batch_size=batch_size, lr_spectral=learning_rate_spectral, lr_full=learning_rate, lr_token=learning_rate_token,
                prior_weight=prior_weight, subset=subset, seed=seed, flip=random_flip, method=method, modifier_token=token,
                initializer_token=initializer_token.strip() or "42170",
            )  # fmt: skip
        except ValueError as exc:
            message = str(exc)
            for field, label in (
                ("lr_full", "learning_rate"),
                ("lr_spectral", "learning_rate_spectral"),
                ("lr_token", "learning_rate_token"),
            ):
                message = message.replace(field, label)
            raise ValueError(message) from None
        folders = [folder, EMBEDDING_FOLDER] if token else [folder]
        _free_stem(filename_prefix, folders, overwrite)  # refuse a bad prefix before training
        if token and not any(token in item.caption for item in dataset.items):
            raise ValueError(
                f"no caption of the dataset contains the modifier token '{token}'; write it into the captions "
                f"(e.g. 'photo of a {token} cat'), or clear modifier_token"
            )
        augmenting = augmentation == "on" or (augmentation == "auto" and method == "full")
        node_id = cls.hidden.unique_id
        if augmenting:
            instance_raw = [
                (lat, None, caption, mask) for lat, caption, mask in _augmented_examples(vae, dataset, augment_variants, seed, random_flip)
            ]
        else:
            instance_raw = [(lat, flipped, caption, None) for lat, flipped, caption in _encode_images(vae, dataset, random_flip)]
        prior_raw = []
        if prior_weight > 0:
            prior_raw = _prior_examples(
                model, clip, vae, regularization, class_images, class_prompt, num_class_images, dataset.resolution, seed, node_id
            )
        all_captions = sorted({c for _, _, c, _ in instance_raw} | {c for _, _, c in prior_raw})
        positive = _encode_captions(clip, all_captions)
        index = {caption: i for i, caption in enumerate(all_captions)}
        instance = [comfy_training.Example(lat, index[c], flipped, None, mask) for lat, flipped, c, mask in instance_raw]
        prior = [comfy_training.Example(lat, index[c], flipped) for lat, flipped, c in prior_raw]

        architecture = type(model.model.model_config).__name__
        metadata = {"svdiff.method": "custom-diffusion" if method == "full" else "svdiff", "svdiff.deltas": deltas}
        if token:
            metadata |= {"svdiff.modifier_token": token, "svdiff.initializer_token": config.initializer_token}
        bar = NodeProgress(steps, node_id)
        stream = routes.LossStream(node_id, steps)
        stream.start()
        latest = {}

        def on_step(step, loss, context):
            stream.add(step, loss)
            latest["step"] = step
            bar(step, steps)
            if step % max(1, steps // 20) == 0 or step == steps:
                log.info("SVDiff Custom Diffusion step %d/%d loss %.5f", step, steps, loss)

        try:
            result = comfy_training.train(
                model, positive, instance, prior, config, on_step=on_step, progress=comfy_training_progress(node_id),
                architecture=architecture, metadata=metadata, clip=clip, captions=all_captions,
            )  # fmt: skip
        finally:  # train() itself restores the shared model, whatever happened
            stream.flush(latest.get("step", 0))
        stream.done(result.steps)

        stem, paths = _free_stem(filename_prefix, folders, overwrite)
        summary = comfy_training.learning_summary(
            config, result.steps, result.losses, {"captions": all_captions[:50], "images": len(instance)}
        )
        shift = result.shift
        shift.name = stem
        shift.metadata |= {"svdiff.name": stem, "svdiff.training": json.dumps(summary)}
        embedding_name = _embedding_name(paths[EMBEDDING_FOLDER]) if token else ""
        if token:
            shift.metadata["svdiff.trigger_words"] = f"embedding:{embedding_name}"
            shift.metadata["svdiff.embedding"] = embedding_name
        fileformat.write_shift(paths[folder], shift, precision="fp16", overwrite=overwrite)
        if token:
            meta = {
                "svdiff.modifier_token": token,
                "svdiff.initializer_token": config.initializer_token,
                "svdiff.deltas_file": f"{folder}/{paths[folder].name}",
                "svdiff.architecture": architecture,
                "svdiff.steps": str(result.steps),
            }
            try:
                fileformat.atomic_save(paths[EMBEDDING_FOLDER], result.embedding, meta, overwrite=overwrite)
            except BaseException:
                paths[folder].unlink(missing_ok=True)  # both files or neither
                raise
        new_model, _, _ = apply_shift(model, None, shift, 1.0, 0.0)
        used = f"embedding:{embedding_name}" if token else ""
        files = f"models/{folder}/{paths[folder].name}" + (f" and models/embeddings/{paths[EMBEDDING_FOLDER].name}" if token else "")
        text = (
            f"trained {result.layers} layers ({result.parameters:,} values) for {result.steps} steps in {result.seconds:.0f} s; "
            f"final loss {result.losses[-1]:.4f}; saved {files}"
            + (f". In prompts write '{used}' where the captions had '{token}'" if token else "")
            + (f"; {len(instance)} augmented examples" if augmenting else "")
        )
        log.info("SVDiff %s", text)
        curve_ui = {"svdiff_loss": [routes.finite_or_none(x) for x in result.losses[-routes.MAX_UI_LOSSES :]]}
        return io.NodeOutput(new_model, clip, shift, used, {"loss": list(result.losses)}, ui={"text": (text,), **curve_ui})


def _lora_files() -> list[str]:
    return folder_paths.get_filename_list(LORA_FOLDER)


class SVDiffLoadKVDeltas(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SVDiffLoadKVDeltas",
            display_name="Load K/V Deltas (SVDiff)",
            category=f"{CATEGORY}/custom diffusion",
            description="Read a Custom Diffusion K/V delta file (ComfyUI .diff keys, in models/loras) as deltas to merge, inspect or apply.",
            inputs=[io.Combo.Input("deltas_name", options=_lora_files(), tooltip="A .safetensors file in models/loras with .diff keys.")],
            outputs=[SpectralShiftType.Output(display_name="deltas")],
        )

    @classmethod
    def fingerprint_inputs(cls, deltas_name):
        return file_fingerprint(LORA_FOLDER, deltas_name)

    @classmethod
    def execute(cls, deltas_name):
        from .patching import load_shift_file

        return io.NodeOutput(load_shift_file(deltas_name, LORA_FOLDER, "deltas_name"))


class SVDiffConcept(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SVDiffConcept",
            display_name="Concept for Merge (SVDiff)",
            category=f"{CATEGORY}/custom diffusion",
            description=(
                "One fine-tuned concept for 'Merge Concepts': its deltas (K/V weights or spectral shifts), the token that names it "
                "(embedding:<name> of its modifier token, or its trigger word) and the prompts whose features must keep its behaviour."
            ),
            inputs=[
                SpectralShiftType.Input("deltas"),
                io.String.Input(
                    "token",
                    default="embedding:cd_concept",
                    tooltip="embedding:<name> of the concept's modifier token, or its trigger word.",
                ),
                io.String.Input("class_word", default="cat", tooltip="Replaces {class} in the prompts."),
                io.String.Input(
                    "prompts",
                    default="{token} {class}\na photo of {token} {class}",
                    multiline=True,
                    tooltip="One per line; {token} and {class} are filled in (reference: '<new1> cat', 'a photo of <new1> cat').",
                ),
                ConceptsType.Input("concepts", optional=True, tooltip="Concepts from another Concept node, to list several."),
            ],
            outputs=[ConceptsType.Output(display_name="concepts")],
        )

    @classmethod
    def execute(cls, deltas, token, class_word, prompts, concepts=None):
        token = token.strip()
        if not token:
            raise ValueError("token is empty; write embedding:<name> of the concept's modifier token, or its trigger word")
        lines = [line.strip().replace("{token}", token).replace("{class}", class_word.strip()) for line in prompts.splitlines()]
        lines = [line for line in lines if line]
        if not lines:
            raise ValueError("prompts is empty; write at least one prompt with {token}, e.g. '{token} cat'")
        missing = [line for line in lines if token not in line]
        if missing:
            raise ValueError(f"the prompt '{missing[0]}' does not contain the token '{token}'; every target prompt must name the concept")
        return io.NodeOutput([*(concepts or []), comfy_merge.Concept(deltas, token, lines)])


class SVDiffMergeConcepts(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SVDiffMergeConcepts",
            display_name="Merge Concepts (SVDiff)",
            category=f"{CATEGORY}/custom diffusion",
            is_output_node=True,
            description=(
                "Custom Diffusion's closed-form merge: one set of cross-attention K/V weights that gives every concept's target prompts "
                "that concept's fine-tuned K/V outputs, and changes the outputs for everyday captions as little as possible."
            ),
            inputs=[
                io.Model.Input("model"),
                io.Clip.Input("clip"),
                ConceptsType.Input("concepts"),
                io.Boolean.Input("builtin_captions", default=True, tooltip="Use the ~200 everyday captions shipped with SVDiff."),
                io.String.Input("extra_captions", default="", multiline=True, tooltip="More regularisation captions, one per line."),
                io.String.Input(
                    "filename_prefix", default="", tooltip="Save the merged K/V deltas to models/loras under this name; empty = don't save."
                ),
            ],
            outputs=[
                io.Model.Output(display_name="model"),
                SpectralShiftType.Output(display_name="deltas"),
                io.String.Output(display_name="report"),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, clip, concepts, builtin_captions, extra_captions, filename_prefix):
        captions = (comfy_merge.builtin_captions() if builtin_captions else []) + [
            line.strip() for line in extra_captions.splitlines() if line.strip()
        ]
        if not captions:
            raise ValueError("regularization captions: the list is empty; turn on builtin_captions or write captions in extra_captions")
        target = None
        if filename_prefix.strip():
            target = _free_stem(filename_prefix, [LORA_FOLDER], False)[1][LORA_FOLDER]
        progress = NodeProgress(1, cls.hidden.unique_id)
        merged, patches, report = comfy_merge.merge_concepts(model, clip, concepts, captions, progress=progress)
        architecture = type(model.model.model_config).__name__
        tensors = {key[: -len(".weight")] + ".diff": delta for key, delta in patches.items()}
        metadata = {
            "svdiff.architecture": architecture,
            "svdiff.method": "custom-diffusion-merge",
            "svdiff.concepts": json.dumps([{"deltas": c.deltas.name, "token": c.token, "prompts": c.prompts} for c in concepts]),
            "svdiff.trigger_words": ", ".join(c.token for c in concepts),
        }
        shift = SpectralShift(tensors, metadata, {}, name=target.stem if target else "merged")
        text = report.text()
        if target is not None:
            fileformat.write_shift(target, shift, precision="fp16")
            text += f"\nsaved models/loras/{target.name}"
        log.info("SVDiff %s", text)
        return io.NodeOutput(merged, shift, text, ui={"text": (text,)})


NODES = [SVDiffTrainCustomDiffusion, SVDiffLoadKVDeltas, SVDiffConcept, SVDiffMergeConcepts]
