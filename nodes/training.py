"""Training nodes: datasets and SVDiffTrain."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import folder_paths
import torch
from comfy_api.latest import io, ui

from ..svdiff import fileformat
from ..svdiff.apply import apply_shift, check_fits
from ..svdiff.cache import content_hash, default_cache
from ..svdiff.inspection import line_chart, to_image_tensor
from ..svdiff.shift import SpectralShift
from ..svdiff.training import attention as attention_math
from ..svdiff.training import data as training_data
from ..svdiff.training.config import OPTIMIZERS, AttentionConfig, TrainConfig
from ..svdiff.training.cutmix import MultiSubjectDataset, multi_subject_plan
from ..svdiff.training.subsets import CUSTOM, SUBSETS
from . import routes
from .common import (
    CATEGORY,
    SHIFT_FOLDER,
    AttentionType,
    DatasetType,
    SpectralShiftType,
    numbered,
    require_finite,
    safe_output_path,
    shift_files,
    shift_path,
)

log = logging.getLogger("svdiff")
NO_RESUME = "[none]"


# ----------------------------------------------------------------------------------
# Datasets


def _resolve_folder(text: str) -> Path:
    """An absolute folder, or one relative to ComfyUI's input folder."""
    text = text.strip()
    if not text:
        raise ValueError("folder is empty; give a folder of training images (absolute, or relative to ComfyUI's input folder)")
    path = Path(text).expanduser()
    return path if path.is_absolute() else Path(folder_paths.get_input_directory()) / path


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
                io.String.Input("folder", default="svdiff/sks_dog", tooltip="Absolute path, or relative to ComfyUI's input folder."),
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
        path = _resolve_folder(folder)
        if not path.is_dir():
            return f"missing:{path}"
        return ";".join(f"{p}:{p.stat().st_mtime_ns}" for p in sorted(path.rglob("*")) if p.is_file())

    @classmethod
    def execute(cls, folder, resolution, default_caption, trigger_word, caption_extension):
        dataset = training_data.load_folder(_resolve_folder(folder), resolution, default_caption, caption_extension, trigger_word)
        images = torch.stack([item.image for item in dataset.items])
        text = f"{len(dataset.items)} images, {len(dataset.expanded())} with repeats, {len(dataset.captions())} captions"
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
        return io.NodeOutput(dataset, ui=ui.PreviewText(f"{len(dataset.items)} images"))


# ----------------------------------------------------------------------------------
# Training


def _encode_pixels(vae, image: torch.Tensor, flip: bool):
    """VAE latent of an (H, W, C) image and, with ``flip``, of its mirror image."""
    pixels = image[None, ..., :3]
    return vae.encode(pixels), (vae.encode(torch.flip(pixels, dims=[2])) if flip else None)


def _encode_images(vae, dataset: training_data.Dataset, flip: bool):
    """(latent, mirrored latent, caption) of each (repeated) image."""
    return [(*_encode_pixels(vae, item.image, flip), item.caption) for item in dataset.expanded()]


def _encode_captions(clip, captions: list[str]) -> list:
    conditioning = []
    for caption in captions:
        tokens = clip.tokenize(caption)
        conditioning.extend(clip.encode_from_tokens_scheduled(tokens))
    return conditioning


def _model_fingerprint(model) -> str:
    """Cheap identity of a base model: hashes of a few of its weights (memoised)."""
    state = model.model_state_dict()
    keys = sorted(k for k in state if k.startswith("diffusion_model.") and state[k].ndim >= 2)
    picked = [keys[0], keys[len(keys) // 2], keys[-1]] if keys else []
    return hashlib.sha256("".join(content_hash(state[k]) for k in picked).encode()).hexdigest()[:16]


def _generate_prior(model, clip, prompt: str, count: int, resolution: int, seed: int, node_id) -> list[torch.Tensor]:
    """Class images from the base model (DreamBooth practice), cached on disk as latents."""
    import comfy.sample
    import comfy.utils

    key = hashlib.sha256(json.dumps([_model_fingerprint(model), prompt, count, resolution, seed, 25, 7.0]).encode()).hexdigest()[:24]
    path = default_cache().directory / "priors" / f"{key}.safetensors"
    if path.is_file():
        from safetensors.torch import load_file

        latents = load_file(str(path))["latents"]
        log.info("SVDiff: %d prior latents for '%s' from cache", latents.shape[0], prompt)
        return [latents[i : i + 1] for i in range(latents.shape[0])]
    log.info("SVDiff: generating %d prior images for '%s'", count, prompt)
    positive = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))
    negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    channels = model.get_model_object("latent_format").latent_channels
    latents = []
    bar = comfy.utils.ProgressBar(count, node_id=node_id)
    for i in range(count):
        empty = torch.zeros(1, channels, resolution // 8, resolution // 8)
        noise = comfy.sample.prepare_noise(empty, seed + i)
        sample = comfy.sample.sample(model, noise, 25, 7.0, "euler", "normal", positive, negative, empty, seed=seed + i, disable_pbar=True)
        latents.append(sample.cpu())
        bar.update_absolute(i + 1, count)
    stacked = torch.cat(latents)
    fileformat.atomic_save(path, {"latents": stacked.contiguous()}, {"prompt": prompt}, overwrite=True)
    return latents


def _prior_examples(model, clip, vae, class_dataset, class_images, class_prompt, num_class_images, resolution, seed, node_id):
    if class_dataset is not None:
        return _encode_images(vae, class_dataset, flip=False)
    if class_images is not None:
        if not class_prompt.strip():
            raise ValueError("class_images is connected but class_prompt is empty; write the class of the subject, e.g. 'photo of a dog'")
        dataset = training_data.from_images(class_images, [class_prompt.strip()], resolution)
        return _encode_images(vae, dataset, flip=False)
    if num_class_images > 0:
        if not class_prompt.strip():
            raise ValueError("class_prompt is empty; write the class of your subject (e.g. 'photo of a dog') or set prior_weight to 0")
        latents = _generate_prior(model, clip, class_prompt.strip(), num_class_images, resolution, seed, node_id)
        return [(lat, None, class_prompt.strip()) for lat in latents]
    raise ValueError(
        "prior_weight is above 0 but there is no prior data: connect class_images or class_dataset, "
        "or set class_prompt and num_class_images to generate them, or set prior_weight to 0"
    )


def _single_subject_examples(dataset, clip, vae, attention: AttentionConfig | None, flip: bool) -> list:
    """(latent, mirrored latent, caption, attention targets) of each (repeated) image."""
    from ..svdiff import comfy_training

    targets = {}
    if attention is not None:
        if attention.unmix_weight > 0:
            raise ValueError(
                "unmix_weight needs a Cut-Mix-Unmix dataset (collages of two subjects); connect SVDiffCutMixUnmix, or set unmix_weight to 0"
            )
        if not dataset.trigger or not attention.class_word:
            raise ValueError(
                "subject_weight (eq. 10) needs the dataset's trigger_word and the attention node's class_word (e.g. 'sks' and 'dog'); "
                "set both, or set subject_weight to 0"
            )
        for caption in dataset.captions():
            targets[caption] = comfy_training.AttentionTargets(
                special=comfy_training.token_positions(clip, caption, dataset.trigger),
                class_positions=comfy_training.token_positions(clip, caption, attention.class_word),
            )
    return [(lat, mirrored, caption, targets.get(caption)) for lat, mirrored, caption in _encode_images(vae, dataset, flip)]


def _multi_subject_examples(dataset, model, clip, vae, attention, flip, prior_weight, num_class_images, seed, node_id):
    """Examples and the training plan of a Cut-Mix-Unmix dataset.

    Instance rows: each subject's images (mirrored at random like single-subject
    data), then the collages (never mirrored: their captions say left and right).
    Prior rows: each subject's class images, then the prior collages.
    """
    from ..svdiff import comfy_training

    if prior_weight > 0 and not dataset.has_class_images():
        if num_class_images <= 0:
            raise ValueError(
                "prior_weight is above 0 but the Cut-Mix-Unmix subjects have no class images: connect class_1, class_2, … on the "
                "Cut-Mix-Unmix node, or set num_class_images to generate them, or set prior_weight to 0"
            )
        images, captions = [], []
        for subject in dataset.subjects:
            prompt = f"photo of a {subject.class_phrase}"
            latents = _generate_prior(model, clip, prompt, num_class_images, dataset.resolution, seed, node_id)
            with torch.inference_mode():
                images.append([vae.decode(lat)[0, ..., :3].float().cpu() for lat in latents])
            captions.append([prompt] * num_class_images)
        dataset = dataset.with_class_images(images, captions)
    unmix = attention is not None and attention.unmix_weight > 0
    subject_reg = attention is not None and attention.subject_weight > 0
    instance, single_rows, collage_rows = [], [], []
    for subject in dataset.subjects:
        rows = []
        for image, caption in zip(subject.images, subject.captions, strict=True):
            targets = None
            if subject_reg:
                targets = comfy_training.AttentionTargets(
                    special=comfy_training.token_positions(clip, caption, subject.token),
                    class_positions=comfy_training.token_positions(clip, caption, subject.class_phrase),
                )
            rows.append(len(instance))
            instance.append((*_encode_pixels(vae, image, flip), caption, targets))
        single_rows.append(rows)
    for collage in dataset.collages:
        targets = None
        if unmix:
            latent_grid = (dataset.resolution // 8, dataset.resolution // 8)
            regions = [
                (comfy_training.token_positions(clip, collage.caption, dataset.subjects[s].token), attention_math.pooled(mask, latent_grid))
                for s, mask in zip(collage.subjects, collage.masks, strict=True)
            ]
            targets = comfy_training.AttentionTargets(regions=regions)
        collage_rows.append(len(instance))
        instance.append((_encode_pixels(vae, collage.image, False)[0], None, collage.caption, targets))
    prior, prior_single, prior_collage = [], [], []
    if prior_weight > 0:
        for subject in dataset.subjects:
            rows = []
            for image, caption in zip(subject.class_images, subject.class_captions, strict=True):
                rows.append(len(prior))
                prior.append((_encode_pixels(vae, image, False)[0], None, caption, None))
            prior_single.append(rows)
        for collage in dataset.prior_collages:
            prior_collage.append(len(prior))
            prior.append((_encode_pixels(vae, collage.image, False)[0], None, collage.caption, None))
    plan = multi_subject_plan(dataset.probability, single_rows, collage_rows, prior_single, prior_collage)
    return instance, prior, plan


def _save(shift: SpectralShift, prefix: str, state: dict[str, torch.Tensor] | None, overwrite: bool = False) -> Path:
    target = safe_output_path(SHIFT_FOLDER, prefix, "spectral-shift file")
    if not overwrite:
        target = numbered(target)
    shift.name = target.stem
    shift.metadata["svdiff.name"] = target.stem
    fileformat.write_shift(target, shift, precision="fp16", overwrite=overwrite)
    if state:
        steps = str(shift.training_summary().get("steps", ""))
        fileformat.atomic_save(
            target.with_suffix(".svdiffstate"),
            {k: v.contiguous().cpu() for k, v in state.items()},
            {"svdiff.state_for": target.name, "svdiff.steps": steps},
            overwrite=True,
        )
    return target


def _load_state(path: Path, shift: SpectralShift) -> dict[str, torch.Tensor] | None:
    """The training state saved beside ``path``, if it belongs to that file's step."""
    sidecar = path.with_suffix(".svdiffstate")
    if not sidecar.is_file():
        return None
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(sidecar), framework="pt") as f:
        steps = (f.metadata() or {}).get("svdiff.steps")
    expected = str(shift.training_summary().get("steps", ""))
    if steps is not None and steps != expected:
        log.warning("resume_from: %s is the state of step %s, the file is at step %s: not used", sidecar.name, steps, expected)
        return None
    return load_file(str(sidecar))


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
        import comfy.model_management
        import comfy.utils

        from ..svdiff import comfy_training

        for name, value in (
            ("learning_rate", learning_rate),
            ("learning_rate_1d", learning_rate_1d),
            ("prior_weight", prior_weight),
            ("max_grad_norm", max_grad_norm),
        ):
            require_finite(name, value)
        try:
            config = TrainConfig(
                steps=steps, batch_size=batch_size, grad_accumulation=grad_accumulation, lr_spectral=learning_rate, lr_1d=learning_rate_1d,
                optimizer=optimizer, warmup_steps=warmup_steps, max_grad_norm=max_grad_norm, prior_weight=prior_weight, subset=layers,
                patterns=name_patterns, rank=rank, seed=seed, flip=random_flip, train_text_encoder=train_text_encoder, lr_text=learning_rate_text,
            )  # fmt: skip
        except ValueError as exc:  # name the node's inputs, not the config fields
            message = str(exc)
            for field, label in (
                ("lr_spectral", "learning_rate"),
                ("lr_1d", "learning_rate_1d"),
                ("lr_text", "learning_rate_text"),
                ("subset", "layers"),
            ):
                message = message.replace(field, label)
            raise ValueError(message) from None
        safe_output_path(SHIFT_FOLDER, filename_prefix, "spectral-shift file")  # refuse a bad prefix before hours of training
        node_id = cls.hidden.unique_id
        resume = None
        state = None
        if resume_from != NO_RESUME:
            resume_path = shift_path(resume_from)
            try:
                resume = fileformat.read_shift(resume_path)
                check_fits(model, clip, resume)
            except ValueError as exc:  # ShiftFileError, ShiftMismatchError
                raise ValueError(f"resume_from: {exc}") from None
            state = _load_state(resume_path, resume)

        plan = None
        if isinstance(dataset, MultiSubjectDataset):
            instance_raw, prior_raw, plan = _multi_subject_examples(
                dataset, model, clip, vae, attention, random_flip, prior_weight, num_class_images, seed, node_id
            )
        else:
            instance_raw = _single_subject_examples(dataset, clip, vae, attention, random_flip)
            prior_raw = []
            if prior_weight > 0:
                prior_raw = [
                    (lat, flipped, caption, None)
                    for lat, flipped, caption in _prior_examples(
                        model, clip, vae, class_dataset, class_images, class_prompt, num_class_images, dataset.resolution, seed, node_id
                    )
                ]
        captions = sorted({caption for _, _, caption, _ in instance_raw})
        all_captions = sorted(set(captions) | {caption for _, _, caption, _ in prior_raw})
        positive = _encode_captions(clip, all_captions)
        index = {caption: i for i, caption in enumerate(all_captions)}
        instance = [comfy_training.Example(lat, index[c], flipped, targets) for lat, flipped, c, targets in instance_raw]
        prior = [comfy_training.Example(lat, index[c], flipped, targets) for lat, flipped, c, targets in prior_raw]

        architecture = type(model.model.model_config).__name__
        trigger = dataset.trigger
        summary_extra = {
            "captions": all_captions[:50],
            "class_prompt": class_prompt,
            "trigger_words": [word.strip() for word in trigger.split(",") if word.strip()],
            "images": len(instance),
        }
        metadata = {"svdiff.trigger_words": trigger} if trigger else {}
        bar = comfy.utils.ProgressBar(steps, node_id=node_id)
        stream = routes.LossStream(node_id, steps)
        stream.start()
        losses_seen: list[float] = []
        saved: list[str] = []
        started = time.perf_counter()

        def finish_metadata(shift: SpectralShift, step: int, losses: list[float]) -> SpectralShift:
            shift.metadata["svdiff.training"] = json.dumps(comfy_training.learning_summary(config, step, losses, summary_extra))
            return shift

        latest: dict = {}
        preview = _Previewer(clip, vae, preview_prompt.strip() or captions[0], dataset.resolution, seed, model) if preview_every else None

        def on_step(step, loss, context):
            losses_seen.append(loss)
            stream.add(step, loss)
            latest.update(step=step, context=context)
            comfy.model_management.throw_exception_if_processing_interrupted()
            image = preview(context, step) if preview is not None and step % preview_every == 0 else None
            bar.update_absolute(step, steps, preview=image)
            if step % max(1, steps // 20) == 0 or step == steps:
                log.info("SVDiff train step %d/%d loss %.5f (%.1f s)", step, steps, loss, time.perf_counter() - started)
            if save_every and step % save_every == 0 and step < steps:
                path = _save(finish_metadata(context.snapshot(), step, losses_seen), f"{filename_prefix}_step{step:06d}", context.state())
                saved.append(path.name)

        log.info("SVDiff: training %s", _describe_subset(model, config))
        try:
            result = comfy_training.train(
                model, positive, instance, prior, config, resume=resume, optimizer_state=state, on_step=on_step,
                progress=comfy_training_progress(node_id), architecture=architecture, metadata=metadata,
                gradient_checkpointing=gradient_checkpointing, clip=clip, captions=all_captions, plan=plan, attention=attention,
            )  # fmt: skip
        except comfy.model_management.InterruptProcessingException:
            if save_on_cancel and "context" in latest:
                shift = finish_metadata(latest["context"].snapshot(), latest["step"], losses_seen)
                path = _save(shift, f"{filename_prefix}_cancelled", latest["context"].state())
                log.warning("SVDiff: training cancelled at step %d; saved %s", latest["step"], path.name)
            raise
        finally:  # train() itself restores the shared model, whatever happened
            stream.flush(latest.get("step", 0))

        stream.done(result.steps)
        shift = finish_metadata(result.shift, result.steps, result.losses)
        path = _save(shift, filename_prefix, result.optimizer_state)
        new_model, new_clip, _ = apply_shift(model, clip, shift, 1.0, 1.0)
        curve = line_chart(result.losses, f"SVDiff training loss ({result.steps} steps)", smooth=max(1, len(result.losses) // 50))
        curve_tensor = to_image_tensor([curve])
        size_kb = path.stat().st_size / 1000
        text = (
            f"trained {result.layers} layers ({result.parameters:,} values) for {result.steps} steps in {result.seconds:.0f} s; "
            f"final loss {result.losses[-1]:.4f}; saved {path.name} ({size_kb:,.0f} KB)"
        )
        log.info("SVDiff %s", text)
        loss_map = {"loss": list(result.losses)}
        # The node's curve after the run (and after a page reload, from /history).
        curve_ui = {"svdiff_loss": [routes.finite_or_none(x) for x in result.losses[-routes.MAX_UI_LOSSES :]]}
        return io.NodeOutput(
            new_model,
            new_clip,
            shift,
            loss_map,
            curve_tensor,
            ui={"text": (text,), **curve_ui},  # the curve is drawn on the node by web/svdiff.js
        )


def _describe_subset(model, config: TrainConfig) -> str:
    """Parameter count and file size of the chosen layers, before training starts."""
    from ..svdiff.spectral import spectrum_length
    from ..svdiff.training.subsets import select_parameters

    shapes = {k: tuple(v.shape) for k, v in model.model_state_dict().items()}
    keys = select_parameters(shapes, config.subset, config.patterns)
    values = 0
    for key in keys:
        shape = shapes[key]
        if len(shape) >= 2:
            r = spectrum_length(shape)
            values += min(r, config.rank) if config.rank else r
        else:
            values += shape[0]
    header = 110 * len(keys)  # safetensors header bytes per tensor, roughly
    return f"{len(keys)} layers, {values:,} values, about {(values * 2 + header) / 1000:,.0f} KB as fp16 ({config.subset})"


class _Previewer:
    """A few-step sample with the shift so far, decoded for the progress bar."""

    def __init__(self, clip, vae, prompt, resolution, seed, model):
        self.positive = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))
        self.negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
        channels = model.get_model_object("latent_format").latent_channels
        self.latent = torch.zeros(1, channels, resolution // 8, resolution // 8)
        self.vae, self.seed = vae, seed

    def __call__(self, context, step):
        from PIL import Image

        samples = context.sample(self.positive, self.negative, self.latent, steps=8, seed=self.seed)
        with torch.inference_mode():  # the VAE's weights are ComfyUI inference tensors
            pixels = self.vae.decode(samples)[0]
        if pixels.ndim == 4:
            pixels = pixels[0]
        image = Image.fromarray((pixels.clamp(0, 1).cpu().numpy() * 255).astype("uint8"))
        return ("JPEG", image, 512)


def comfy_training_progress(node_id):
    import comfy.utils

    bar = {}

    def progress(done, total):
        if "bar" not in bar:
            bar["bar"] = comfy.utils.ProgressBar(total, node_id=node_id)
        bar["bar"].update_absolute(done, total)

    return progress


NODES = [SVDiffDatasetFromFolder, SVDiffDatasetFromImages, SVDiffTrain]
