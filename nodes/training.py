"""Training nodes: datasets and SVDiffTrain."""

from __future__ import annotations

import torch
from comfy_api.latest import io, ui

from ..svdiff.comfy.folders import input_folder, shift_files
from ..svdiff.comfy.training import jobs
from ..svdiff.shift import plural
from ..svdiff.training import data as training_data
from ..svdiff.training.config import OPTIMIZERS, TrainConfig
from ..svdiff.training.subsets import CUSTOM, SUBSETS
from .common import CATEGORY, AttentionType, DatasetType, SpectralShiftType, require_finite

CONFIG_INPUTS = {"lr_spectral": "learning_rate", "lr_1d": "learning_rate_1d", "lr_text": "learning_rate_text", "subset": "layers",
                 "patterns": "name_patterns", "flip": "random_flip"}  # fmt: skip
"""The training options' names as this node's inputs (for messages)."""
NO_RESUME = jobs.NO_RESUME


# ----------------------------------------------------------------------------------
# Datasets


class SVDiffDatasetFromFolder(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SVDiffDatasetFromFolder",
            display_name="Training Images from Folder (SVDiff)",
            category=f"{CATEGORY}/training",
            is_output_node=True,  # shows the image/caption counts on its own
            description=(
                "Images with kohya-style captions: '<image>.txt' beside each image; sub-folders named '<repeats>_<class words>' "
                "(e.g. '10_sks dog') repeat their images. Images are scaled so the shorter side is the resolution, then center-cropped."
            ),
            inputs=[
                io.String.Input(
                    "folder",
                    default="svdiff/sks_dog",
                    tooltip="A folder inside ComfyUI's input folder, e.g. svdiff/sks_dog (absolute paths and .. are refused).",
                ),
                io.Int.Input("resolution", default=512, min=64, max=4096, step=64),
                io.String.Input(
                    "default_caption", default="photo of a sks dog", tooltip="For images with no caption file and no class words."
                ),
                io.String.Input("trigger_word", default="sks", tooltip="Every caption must contain it (leave empty to skip the check)."),
                io.String.Input("caption_extension", default=".txt"),
            ],
            outputs=[DatasetType.Output(display_name="dataset"), io.Image.Output(display_name="images")],
        )

    @classmethod
    def fingerprint_inputs(cls, folder, **kwargs):
        try:
            path = input_folder(folder)
        except ValueError:
            return f"refused:{folder}"  # execute() says why
        if not path.is_dir():
            return f"missing:{path}"
        return ";".join(f"{p}:{p.stat().st_mtime_ns}" for p in sorted(path.rglob("*")) if p.is_file())

    @classmethod
    def execute(cls, folder, resolution, default_caption, trigger_word, caption_extension):
        dataset = training_data.load_folder(input_folder(folder), resolution, default_caption, caption_extension, trigger_word)
        images = torch.stack([item.image for item in dataset.items])
        text = (
            f"{plural(len(dataset.items), 'image')}, {len(dataset.expanded())} with repeats, {plural(len(dataset.captions()), 'caption')}"
        )
        return io.NodeOutput(dataset, images, ui=ui.PreviewText(text))


class SVDiffDatasetFromImages(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SVDiffDatasetFromImages",
            display_name="Training Images from IMAGE (SVDiff)",
            category=f"{CATEGORY}/training",
            description=(
                "A dataset from IMAGE batches and captions: one caption (a template with {trigger}) for all images, or one per image "
                "(one per line, or a list such as the texts of ComfyUI's 'Load Image and Text Dataset from Folder')."
            ),
            is_input_list=True,  # accepts the image and text lists of ComfyUI's dataset nodes
            is_output_node=True,
            inputs=[
                io.Image.Input("images"),
                io.String.Input(
                    "captions",
                    default="photo of a {trigger} dog",
                    multiline=True,
                    tooltip="One line for all images, or one line per image. {trigger} is replaced by the trigger word.",
                ),
                io.String.Input("trigger_word", default="sks"),
                io.Int.Input("resolution", default=512, min=64, max=4096, step=64),
            ],
            outputs=[DatasetType.Output(display_name="dataset")],
        )

    @classmethod
    def execute(cls, images, captions, trigger_word, resolution):
        trigger = trigger_word[0].strip()
        if len(captions) == 1:  # a widget: one line for all, or one line per image
            texts = [line for line in captions[0].splitlines() if line.strip()]
        else:  # a list from a dataset node: one entry per image, empty ones reported by name
            texts = list(captions)
        lines = [line.replace("{trigger}", trigger) for line in texts]
        if not lines:
            raise ValueError("captions is empty; write a caption such as 'photo of a {trigger} dog'")
        dataset = training_data.from_images(list(images), lines, resolution[0], trigger)
        return io.NodeOutput(dataset, ui=ui.PreviewText(plural(len(dataset.items), "image")))


# ----------------------------------------------------------------------------------
# Training


class SVDiffTrain(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SVDiffTrain",
            display_name="Train Spectral Shift (SVDiff)",
            category=f"{CATEGORY}/training",
            description=(
                "Fine-tune only the singular values of the chosen layers (paper eq. 3): MSE on the model's native target at uniform noise levels, "
                "plus λ·prior-preservation loss. Returns the model patched with the result, the shift, and the loss history."
            ),
            is_output_node=True,
            inputs=[
                io.Model.Input("model"),
                io.Clip.Input("clip"),
                io.Vae.Input("vae", tooltip="Encodes the training images (and decodes previews)."),
                DatasetType.Input("dataset"),
                io.Int.Input("steps", default=500, min=1, max=100000, tooltip="Optimizer steps (paper: 500-1000 with prior preservation)."),
                io.Float.Input("learning_rate", default=1e-3, min=0.0, max=1.0, step=1e-5, tooltip="Spectral shifts (paper: 1e-3)."),
                io.Float.Input(
                    "learning_rate_1d",
                    default=1e-6,
                    min=0.0,
                    max=1.0,
                    step=1e-7,
                    tooltip="Elementwise 1-D deltas (paper: 1e-6; larger adapts faster).",
                ),
                io.Combo.Input("layers", options=[*SUBSETS, CUSTOM], default="UNet", tooltip="A subset of the paper's Table 1."),
                io.String.Input("name_patterns", default="", tooltip="Extra layers by name: substring, glob or re:regex, comma separated."),
                io.Int.Input(
                    "rank",
                    default=0,
                    min=0,
                    max=4096,
                    tooltip="Shift only the top-k singular values of each layer (appendix E.1); 0 = all.",
                ),
                io.Boolean.Input(
                    "train_text_encoder", default=False, tooltip="Also shift the text encoder's linear layers (embeddings excluded)."
                ),
                io.Float.Input(
                    "learning_rate_text", default=1e-4, min=0.0, max=1.0, step=1e-5, tooltip="Learning rate of the text-encoder shifts."
                ),
                io.Float.Input(
                    "prior_weight", default=1.0, min=0.0, max=100.0, step=0.05, tooltip="λ of eq. 3; 0 disables prior preservation."
                ),
                io.String.Input(
                    "class_prompt", default="", tooltip="e.g. 'photo of a dog': caption of the prior images (and prompt to generate them)."
                ),
                io.Int.Input(
                    "num_class_images",
                    default=0,
                    min=0,
                    max=1000,
                    tooltip="Prior images to generate with the base model when none are connected (cached).",
                ),
                io.Int.Input("batch_size", default=1, min=1, max=64),
                io.Int.Input("grad_accumulation", default=1, min=1, max=1024),
                io.Combo.Input("optimizer", options=list(OPTIMIZERS), default="AdamW"),
                io.Int.Input("warmup_steps", default=0, min=0, max=100000),
                io.Float.Input("max_grad_norm", default=1.0, min=0.0, max=1000.0, step=0.1, tooltip="Gradient clipping; 0 disables it."),
                io.Boolean.Input("random_flip", default=True),
                io.Boolean.Input("gradient_checkpointing", default=False, tooltip="Less memory, about one extra forward pass per step."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip="Same seed, same data, same CPU: bit-identical shifts."),
                io.Int.Input(
                    "save_every",
                    default=0,
                    min=0,
                    max=100000,
                    tooltip="Save a checkpoint (with optimizer state) every N steps; 0 = only at the end.",
                ),
                io.String.Input("filename_prefix", default="svdiff/trained", tooltip="Relative to models/spectral_shifts."),
                io.Combo.Input(
                    "resume_from",
                    options=[NO_RESUME, *shift_files()],
                    default=NO_RESUME,
                    tooltip="Continue a saved shift (and its optimizer state) up to 'steps' in total.",
                ),
                io.Boolean.Input(
                    "save_on_cancel",
                    default=True,
                    tooltip="When the run is cancelled, save what was trained so far as '<prefix>_cancelled'.",
                ),
                io.Int.Input(
                    "preview_every",
                    default=0,
                    min=0,
                    max=100000,
                    tooltip="Sample a preview image with the shift so far every N steps (shown on the node); 0 = off.",
                ),
                io.String.Input("preview_prompt", default="", tooltip="Prompt of the previews; empty = the first training caption."),
                io.Image.Input("class_images", optional=True),
                DatasetType.Input("class_dataset", optional=True),
                AttentionType.Input(
                    "attention",
                    optional=True,
                    tooltip="Cross-attention regularisers (unmix, eq. 10) from 'Attention Regularization (SVDiff)'.",
                ),
            ],
            outputs=[
                io.Model.Output(display_name="model"),
                io.Clip.Output(display_name="clip"),
                SpectralShiftType.Output(display_name="shift"),
                io.Custom("LOSS_MAP").Output(display_name="loss"),
                io.Image.Output(display_name="loss_curve"),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, clip, vae, dataset, steps, learning_rate, learning_rate_1d, layers, name_patterns, rank, train_text_encoder, learning_rate_text, prior_weight, class_prompt,
                num_class_images, batch_size, grad_accumulation, optimizer, warmup_steps, max_grad_norm, random_flip, gradient_checkpointing, seed,
                save_every, filename_prefix, resume_from, save_on_cancel, preview_every, preview_prompt, class_images=None, class_dataset=None, attention=None):  # fmt: skip
        for name, value in (("learning_rate", learning_rate), ("learning_rate_1d", learning_rate_1d), ("prior_weight", prior_weight),
                            ("max_grad_norm", max_grad_norm)):  # fmt: skip
            require_finite(name, value)
        config = TrainConfig(
            steps=steps, batch_size=batch_size, grad_accumulation=grad_accumulation, lr_spectral=learning_rate, lr_1d=learning_rate_1d,
            optimizer=optimizer, warmup_steps=warmup_steps, max_grad_norm=max_grad_norm, prior_weight=prior_weight, subset=layers,
            patterns=name_patterns, rank=rank, seed=seed, flip=random_flip, train_text_encoder=train_text_encoder, lr_text=learning_rate_text,
            labels=CONFIG_INPUTS,
        )  # fmt: skip
        trained = jobs.train_shift(
            node_id=cls.hidden.unique_id, model=model, clip=clip, vae=vae, dataset=dataset, config=config, class_prompt=class_prompt,
            num_class_images=num_class_images, gradient_checkpointing=gradient_checkpointing, save_every=save_every,
            filename_prefix=filename_prefix, resume_from=resume_from, save_on_cancel=save_on_cancel, preview_every=preview_every,
            preview_prompt=preview_prompt, class_images=class_images, class_dataset=class_dataset, attention=attention,
        )  # fmt: skip
        losses = {"loss": list(trained.result.losses)}
        return io.NodeOutput(trained.model, trained.clip, trained.shift, losses, jobs.loss_curve(trained.result), ui=trained.ui)


NODES = [SVDiffDatasetFromFolder, SVDiffDatasetFromImages, SVDiffTrain]
