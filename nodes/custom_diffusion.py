"""Custom Diffusion nodes: K/V training with a modifier token, and the closed-form concept merge."""

from __future__ import annotations

import folder_paths
from comfy_api.latest import io

from ..svdiff.comfy import merge as comfy_merge
from ..svdiff.comfy.folders import LORA_FOLDER, SHIFT_FOLDER, file_fingerprint, load_shift_file
from ..svdiff.comfy.training import jobs
from ..svdiff.training.config import TrainConfig
from .common import CATEGORY, DatasetType, SpectralShiftType, require_finite

ConceptsType = io.Custom("SVDIFF_CONCEPTS")

DELTAS = {
    "K/V weights (Custom Diffusion)": ("full", "UNet-CA-KV", LORA_FOLDER),
    "K/V spectral shifts (SVDiff)": ("spectral", "UNet-CA-KV", SHIFT_FOLDER),
    "all-layer spectral shifts (SVDiff)": ("spectral", "UNet", SHIFT_FOLDER),
}
AUGMENT = ("auto", "on", "off")
CONFIG_INPUTS = {"lr_full": "learning_rate", "lr_spectral": "learning_rate_spectral", "lr_token": "learning_rate_token",
                 "flip": "random_flip"}  # fmt: skip
"""The training options' names as this node's inputs (for messages)."""


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
        for name, value in (("learning_rate", learning_rate), ("learning_rate_spectral", learning_rate_spectral),
                            ("learning_rate_token", learning_rate_token), ("prior_weight", prior_weight)):  # fmt: skip
            require_finite(name, value)
        if deltas not in DELTAS:
            raise ValueError(f"deltas '{deltas}' is unknown; choose one of {', '.join(DELTAS)}")
        method, subset, folder = DELTAS[deltas]
        config = TrainConfig(
            steps=steps, batch_size=batch_size, lr_spectral=learning_rate_spectral, lr_full=learning_rate, lr_token=learning_rate_token,
            prior_weight=prior_weight, subset=subset, seed=seed, flip=random_flip, method=method, modifier_token=modifier_token.strip(),
            initializer_token=initializer_token.strip() or "42170", labels=CONFIG_INPUTS,
        )  # fmt: skip
        trained = jobs.train_custom_diffusion(
            node_id=cls.hidden.unique_id, model=model, clip=clip, vae=vae, dataset=dataset, config=config, folder=folder, deltas=deltas,
            augmenting=augmentation == "on" or (augmentation == "auto" and method == "full"), augment_variants=augment_variants,
            class_prompt=class_prompt, num_class_images=num_class_images, filename_prefix=filename_prefix, overwrite=overwrite,
            regularization=regularization, class_images=class_images,
        )  # fmt: skip
        losses = {"loss": list(trained.result.losses)}
        return io.NodeOutput(trained.model, trained.clip, trained.shift, trained.token, losses, ui=trained.ui)


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
        merged, shift, text = comfy_merge.merge_to_file(model, clip, concepts, captions, filename_prefix, cls.hidden.unique_id)
        return io.NodeOutput(merged, shift, text, ui={"text": (text,)})


NODES = [SVDiffTrainCustomDiffusion, SVDiffLoadKVDeltas, SVDiffConcept, SVDiffMergeConcepts]
