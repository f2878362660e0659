"""What the training nodes do around a run: their data, resume, previews, checkpoints, files.

``train_shift`` is SVDiffTrain and ``train_custom_diffusion`` is Train Custom Diffusion,
each one call from its node. Both stream the losses to the browser, check the output
name before any work, and write their files only once the run succeeded (SVDiffTrain
also saves step checkpoints and, when cancelled, what was trained so far).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

import comfy.model_management
import torch
from PIL import Image

from ...atomic import atomic_save
from ...fileformat import read_shift
from ...inspection import line_chart, to_image_tensor
from ...shift import SpectralShift
from ...spectral import spectrum_length
from ...training.checkpoint import read_state
from ...training.config import AttentionConfig, TrainConfig
from ...training.cutmix import MultiSubjectDataset
from ...training.subsets import select_parameters
from ..folders import EMBEDDING_FOLDER, SHIFT_FOLDER, free_paths, relative_name, save_shift, shift_path
from ..loss_stream import LossStream, curve_ui
from ..patching import apply_shift, check_fits
from ..progress import NodeProgress
from .examples import augmented_examples, dataset_examples, multi_subject_examples, single_subject_examples
from .priors import attach_class_images, prior_examples
from .run import StepContext, TrainingResult, TrainRequest, learning_summary, train

log = logging.getLogger("svdiff")

NO_RESUME = "[none]"


@dataclass
class Trained:
    """What a training node returns and shows."""

    model: object
    clip: object
    shift: SpectralShift
    result: TrainingResult
    text: str
    token: str = ""

    @property
    def ui(self) -> dict:
        return {"text": (self.text,), **curve_ui(self.result.losses)}  # the curve is drawn on the node by web/svdiff.js


def _report(result: TrainingResult, saved: str) -> str:
    steps = f"{result.steps - result.first_step} steps"
    if result.first_step:
        steps += f" (steps {result.first_step + 1}–{result.steps}, resumed)"
    return (
        f"trained {result.layers} layers ({result.parameters:,} values) for {steps} in {result.seconds:.0f} s; "
        f"final loss {result.losses[-1]:.4f}; saved {saved}"
    )


class Phases:
    """The work before the first step (prior images, VAE encoding, decompositions) on
    ComfyUI's progress bar and on the node, where the loss curve will be; one stream of
    ``svdiff.train`` messages for the whole node run."""

    def __init__(self, node_id, steps: int):
        self.node_id = node_id
        self.stream = LossStream(node_id, steps)

    def __call__(self, text: str):
        """``progress(done, total)`` for one phase, e.g. ``phases("encoding the images")``."""
        bar = NodeProgress(self.node_id)

        def progress(done: int, total: int) -> None:
            bar(done, total)
            self.stream.phase(text, done, total)

        return progress


def _run(request: TrainRequest, phases: Phases, label: str, observe=None) -> TrainingResult:
    """:func:`train` with a progress bar, the loss stream and a log line every 5 %.

    ``observe(step, loss, context, losses)`` may return a preview image for the bar;
    ``losses`` are this run's so far.
    """
    steps = request.config.steps
    request.progress = phases("decomposing the layers")
    bar = NodeProgress(phases.node_id, steps)
    stream = phases.stream  # "start" goes with the first step: until then the node shows the phases
    losses: list[float] = []
    started = time.perf_counter()
    step_seen = 0

    def on_step(step: int, loss: float, context: StepContext) -> None:
        nonlocal step_seen
        if not losses:
            stream.start()
        losses.append(loss)
        stream.add(step, loss)
        step_seen = step
        comfy.model_management.throw_exception_if_processing_interrupted()
        preview = observe(step, loss, context, losses) if observe is not None else None
        bar(step, steps, preview)
        if step % max(1, steps // 20) == 0 or step == steps:
            log.info("SVDiff %s step %d/%d loss %.5f (%.1f s)", label, step, steps, loss, time.perf_counter() - started)

    request.on_step = on_step
    try:
        result = train(request)
    finally:  # train() itself restores the shared model, whatever happened
        stream.flush(step_seen)
    stream.done(result.steps)
    return result


# ----------------------------------------------------------------------------------
# SVDiffTrain


def describe_layers(model, config: TrainConfig) -> str:
    """Parameter count and file size of the chosen layers, before training starts."""
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


class Previewer:
    """A few-step sample with the shift so far, decoded for the progress bar."""

    def __init__(self, clip, vae, prompt, resolution, seed, model):
        self.positive = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))
        self.negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
        channels = model.get_model_object("latent_format").latent_channels
        self.latent = torch.zeros(1, channels, resolution // 8, resolution // 8)
        self.vae, self.seed = vae, seed

    def __call__(self, context: StepContext):
        samples = context.sample(self.positive, self.negative, self.latent, steps=8, seed=self.seed)
        with torch.inference_mode():  # the VAE's weights are ComfyUI inference tensors
            pixels = self.vae.decode(samples)[0]
        if pixels.ndim == 4:
            pixels = pixels[0]
        image = Image.fromarray((pixels.clamp(0, 1).cpu().numpy() * 255).astype("uint8"))
        return ("JPEG", image, 512)


def _resume(resume_from: str, model, clip):
    """(shift, state) to continue from, or (None, None)."""
    if resume_from == NO_RESUME:
        return None, None
    path = shift_path(resume_from, "resume_from")
    try:
        resume = read_shift(path)
        check_fits(model, clip, resume)
    except ValueError as exc:  # ShiftFileError, ShiftMismatchError
        raise ValueError(f"resume_from: {exc}") from None
    return resume, read_state(path, resume)


def _save(shift: SpectralShift, prefix: str, state) -> tuple:
    target = free_paths(prefix, [SHIFT_FOLDER], False, "spectral-shift file")[SHIFT_FOLDER]
    return target, save_shift(shift, target, state=state)


def train_shift(
    *, node_id, model, clip, vae, dataset, config: TrainConfig, class_prompt: str, num_class_images: int, gradient_checkpointing: bool,
    save_every: int, filename_prefix: str, resume_from: str, save_on_cancel: bool, preview_every: int, preview_prompt: str,
    class_images=None, class_dataset=None, attention: AttentionConfig | None = None,
) -> Trained:  # fmt: skip
    """SVDiffTrain: train, save to models/spectral_shifts, return the patched model."""
    free_paths(filename_prefix, [SHIFT_FOLDER], False, "spectral-shift file")  # refuse a bad prefix before hours of training
    resume, state = _resume(resume_from, model, clip)
    phases = Phases(node_id, config.steps)
    plan = None
    if isinstance(dataset, MultiSubjectDataset):
        if config.prior_weight > 0:
            dataset = attach_class_images(dataset, model, clip, vae, num_class_images, config.seed, phases("generating prior images"))
        instance, prior, plan = multi_subject_examples(
            dataset, clip, vae, attention, config.flip, config.prior_weight > 0, phases("encoding the images")
        )
    else:
        instance = single_subject_examples(dataset, clip, vae, attention, config.flip, phases("encoding the images"))
        prior = []
        if config.prior_weight > 0:
            prior = prior_examples(
                model, clip, vae, class_dataset, class_images, class_prompt, num_class_images, dataset.resolution, config.seed, phases
            )
    request = TrainRequest(
        model, config, instance, prior, clip=clip, attention=attention, plan=plan, resume=resume, resume_state=state,
        architecture=type(model.model.model_config).__name__, gradient_checkpointing=gradient_checkpointing,
        metadata={"svdiff.trigger_words": dataset.trigger} if dataset.trigger else {},
    )  # fmt: skip
    extra = {
        "captions": request.captions[:50],
        "class_prompt": class_prompt,
        "trigger_words": [word.strip() for word in dataset.trigger.split(",") if word.strip()],
        "images": len(instance),
    }

    def finished(shift: SpectralShift, step: int, losses: list[float]) -> SpectralShift:
        shift.metadata["svdiff.training"] = json.dumps(learning_summary(config, step, losses, extra))
        return shift

    first_caption = sorted({e.caption for e in instance})[0]
    preview = (
        Previewer(clip, vae, preview_prompt.strip() or first_caption, dataset.resolution, config.seed, model) if preview_every else None
    )
    latest: dict = {}

    def observe(step, loss, context, losses):
        latest.update(step=step, context=context, losses=losses)
        if save_every and step % save_every == 0 and step < config.steps:
            _save(finished(context.snapshot(), step, losses), f"{filename_prefix}_step{step:06d}", context.state())
        return preview(context) if preview is not None and step % preview_every == 0 else None

    log.info("SVDiff: training %s", describe_layers(model, config))
    try:
        result = _run(request, phases, "train", observe)
    except comfy.model_management.InterruptProcessingException:
        if save_on_cancel and "context" in latest:
            context = latest["context"]
            target, _ = _save(
                finished(context.snapshot(), latest["step"], latest["losses"]), f"{filename_prefix}_cancelled", context.state()
            )
            log.warning("SVDiff: training cancelled at step %d; saved %s", latest["step"], target.name)
        raise
    target, shift = _save(finished(result.shift, result.steps, result.losses), filename_prefix, result.optimizer_state)
    new_model, new_clip, _ = apply_shift(model, clip, shift, 1.0, 1.0)
    text = _report(result, f"{target.name} ({target.stat().st_size / 1000:,.0f} KB)")
    log.info("SVDiff %s", text)
    return Trained(new_model, new_clip, shift, result, text)


def loss_curve(result: TrainingResult) -> torch.Tensor:
    """The loss history as an IMAGE."""
    curve = line_chart(result.losses, f"SVDiff training loss ({result.steps} steps)", smooth=max(1, len(result.losses) // 50))
    return to_image_tensor([curve])


# ----------------------------------------------------------------------------------
# Train Custom Diffusion


def train_custom_diffusion(
    *, node_id, model, clip, vae, dataset, config: TrainConfig, folder: str, deltas: str, augmenting: bool, augment_variants: int,
    class_prompt: str, num_class_images: int, filename_prefix: str, overwrite: bool, regularization=None, class_images=None,
) -> Trained:  # fmt: skip
    """Train Custom Diffusion: K/V deltas (or shifts) and a modifier token, saved together or not at all."""
    if isinstance(dataset, MultiSubjectDataset):
        raise ValueError("dataset: Custom Diffusion trains from plain image folders; use 'Train Spectral Shift' for Cut-Mix-Unmix datasets")
    token = config.modifier_token
    folders = [folder, EMBEDDING_FOLDER] if token else [folder]
    free_paths(filename_prefix, folders, overwrite)  # refuse a bad prefix before training
    if token and not any(token in item.caption for item in dataset.items):
        raise ValueError(
            f"no caption of the dataset contains the modifier token '{token}'; write it into the captions "
            f"(e.g. 'photo of a {token} cat'), or clear modifier_token"
        )
    phases = Phases(node_id, config.steps)
    if augmenting:
        instance = augmented_examples(vae, dataset, augment_variants, config.seed, config.flip, phases("encoding augmented images"))
    else:
        instance = dataset_examples(vae, dataset, config.flip, progress=phases("encoding the images"))
    prior = []
    if config.prior_weight > 0:
        prior = prior_examples(
            model, clip, vae, regularization, class_images, class_prompt, num_class_images, dataset.resolution, config.seed, phases
        )
    architecture = type(model.model.model_config).__name__
    metadata = {"svdiff.method": "custom-diffusion" if config.method == "full" else "svdiff", "svdiff.deltas": deltas}
    if token:
        metadata |= {"svdiff.modifier_token": token, "svdiff.initializer_token": config.initializer_token}
    request = TrainRequest(model, config, instance, prior, clip=clip, architecture=architecture, metadata=metadata)
    result = _run(request, phases, "Custom Diffusion")

    paths = free_paths(filename_prefix, folders, overwrite)
    summary = learning_summary(config, result.steps, result.losses, {"captions": request.captions[:50], "images": len(instance)})
    shift = result.shift
    shift.metadata["svdiff.training"] = json.dumps(summary)
    used = ""
    if token:
        used = "embedding:" + relative_name(EMBEDDING_FOLDER, paths[EMBEDDING_FOLDER].with_suffix(""))
        shift.metadata |= {"svdiff.trigger_words": used, "svdiff.embedding": used[len("embedding:") :]}
    shift = save_shift(shift, paths[folder], overwrite=overwrite)
    if token:
        meta = {
            "svdiff.modifier_token": token,
            "svdiff.initializer_token": config.initializer_token,
            "svdiff.deltas_file": f"{folder}/{paths[folder].name}",
            "svdiff.architecture": architecture,
            "svdiff.steps": str(result.steps),
        }
        try:
            atomic_save(paths[EMBEDDING_FOLDER], result.embedding, meta, overwrite=overwrite)
        except BaseException:
            paths[folder].unlink(missing_ok=True)  # both files or neither
            raise
    new_model, _, _ = apply_shift(model, None, shift, 1.0, 0.0)
    files = f"models/{folder}/{paths[folder].name}" + (f" and models/embeddings/{paths[EMBEDDING_FOLDER].name}" if token else "")
    text = (
        _report(result, files)
        + (f". In prompts write '{used}' where the captions had '{token}'" if token else "")
        + (f"; {len(instance)} augmented examples" if augmenting else "")
    )
    log.info("SVDiff %s", text)
    return Trained(new_model, clip, shift, result, text, used)
