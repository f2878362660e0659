"""A training run: :func:`train` takes one :class:`TrainRequest` and returns the shift.

The trainable layers (``layers.py``) go on a *clone* of the MODEL (and of the CLIP when
the text encoder or a modifier token is trained) through ComfyUI's own patch mechanisms,
and the optimisation loop (``svdiff.training.loop``) runs inside a ComfyUI guider
(``guider.py``), which loads the model and prepares the conditioning exactly as
sampling does. The loss is ``loss.DiffusionLoss``. Neither input is modified.
"""

from __future__ import annotations

import logging
import math
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import comfy.model_management
import comfy.sample
import torch

from ...shift import SpectralShift
from ...training.config import AttentionConfig, TrainConfig
from ...training.loop import Trainer
from .attention import AttentionRecorder
from .autograd import DifferentiablePaths, SharedModules, install_checkpointing, install_norm_input_copies, make_autograd_ready
from .examples import Example, Plan
from .guider import run_inside
from .layers import TrainableLayers, release_training_hooks
from .loss import CaptionConditioning, DiffusionLoss
from .modifier import ModifierToken

log = logging.getLogger("svdiff")


@dataclass
class TrainRequest:
    """Everything one run needs. Field names follow the training nodes' inputs."""

    model: Any
    config: TrainConfig
    examples: list[Example]
    """The instance (subject) examples."""
    prior: list[Example] = field(default_factory=list)
    """Prior-preservation examples (used when ``config.prior_weight`` > 0)."""
    clip: Any = None
    """Needed to train the text encoder or a modifier token, and to encode captions without ``conditioning``."""
    conditioning: dict[str, list] | None = None
    """Each caption's CONDITIONING (as CLIPTextEncode gives it); None: encoded with ``clip``."""
    attention: AttentionConfig | None = None
    plan: Plan | None = None
    """Which examples each micro-batch draws (default: uniform; Cut-Mix-Unmix has its own)."""
    resume: SpectralShift | None = None
    resume_state: dict[str, torch.Tensor] | None = None
    """The .svdiffstate beside ``resume``: float32 values and optimizer moments."""
    architecture: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    gradient_checkpointing: bool = False
    on_step: Callable[[int, float, StepContext], None] | None = None
    """Runs after every optimizer step; raising there stops the run."""
    progress: Callable[[int, int], None] | None = None
    """Progress of preparing the layers (decompositions)."""

    @property
    def captions(self) -> list[str]:
        """Every caption of the examples, sorted: the rows of the run's CONDITIONING."""
        return sorted({example.caption for example in self.examples + self.prior})

    def positive(self, captions: list[str]) -> list:
        """One CONDITIONING entry per caption, in ``captions`` order."""
        if self.conditioning is None:
            if self.clip is None:
                raise ValueError("no CLIP to encode the captions with; connect the CLIP")
            return [self.clip.encode_from_tokens_scheduled(self.clip.tokenize(c))[0] for c in captions]
        missing = [c for c in captions if c not in self.conditioning]
        if missing:
            raise ValueError(f"no conditioning for the caption '{missing[0]}'")
        return [self.conditioning[c][0] for c in captions]


@dataclass
class TrainingResult:
    shift: SpectralShift
    losses: list[float]
    optimizer_state: dict[str, torch.Tensor]
    steps: int
    seconds: float
    parameters: int
    layers: int
    first_step: int = 0
    """The step this run started from (a resumed shift's steps; 0 for a fresh run)."""
    embedding: dict[str, torch.Tensor] = field(default_factory=dict)
    """The modifier token's trained vectors as a ComfyUI embedding: ``{"clip_l": (1, d), …}``."""


@dataclass
class StepContext:
    """What ``on_step`` callbacks get: the shift so far and a way to sample with it."""

    snapshot: Callable[[], SpectralShift]
    patcher: object
    state: Callable[[], dict[str, torch.Tensor]]
    """The training state so far (float32 values, optimizer moments), for a resumable checkpoint."""

    def sample(self, positive, negative, latent: torch.Tensor, steps: int, seed: int, cfg: float = 5.0) -> torch.Tensor:
        """Sample with the model as it is being trained (the shifted layers active)."""
        noise = comfy.sample.prepare_noise(latent, seed)
        with torch.no_grad():
            try:
                return comfy.sample.sample(
                    self.patcher, noise, steps, cfg, "euler", "normal", positive, negative, latent, seed=seed, disable_pbar=True
                )
            finally:
                self.patcher.pre_run()  # sampling's cleanup detaches the patcher from the model


def train(request: TrainRequest) -> TrainingResult:
    """Train on ``request.model`` (never modified) and return the shift.

    The modules a MODEL or CLIP shares with its clones are frozen for the run and put
    back whatever happens (:class:`SharedModules`, :func:`release_training_hooks`).
    """
    model, clip = request.model, request.clip
    shared = SharedModules([model.model] + ([clip.patcher.model] if clip is not None else []))
    # Everything trainable must be created outside ComfyUI's inference mode.
    with torch.inference_mode(False):
        try:
            shared.freeze()
            return _train(request)
        except BaseException as exc:
            # Free the trainable tensors, optimizer state and decompositions that the
            # finished frames of the traceback hold, even if the caller (ComfyUI's
            # executor, a log handler) keeps the exception.
            traceback.clear_frames(exc.__traceback__)
            raise
        finally:
            release_training_hooks(model, clip)
            shared.restore()


def _train(request: TrainRequest) -> TrainingResult:
    started = time.perf_counter()
    model, clip, config = request.model, request.clip, request.config
    if not request.examples:
        raise ValueError("the dataset is empty: give at least one image")
    captions = request.captions
    positive = request.positive(captions)
    layers = TrainableLayers(model, config, clip, request.resume, request.progress)
    modifier = ModifierToken(clip, config.modifier_token, config.initializer_token, captions) if config.modifier_token else None

    patcher = model.clone()
    text_clip = clip.clone() if layers.text or modifier is not None else None
    comfy.model_management.unload_all_models()
    make_autograd_ready(patcher.model)
    conditioning = CaptionConditioning(captions)
    if text_clip is not None:
        make_autograd_ready(text_clip.patcher.model)
    layers.install(patcher, text_clip.patcher if text_clip is not None else None)
    if text_clip is not None:
        install_norm_input_copies(text_clip.patcher, root="")
        if modifier is not None:
            modifier.to(text_clip.patcher.load_device)
            tokens = [modifier.tokens(text_clip, caption) for caption in captions]
        else:
            tokens = [text_clip.tokenize(caption) for caption in captions]
        conditioning = CaptionConditioning(captions, text_clip, tokens)
    if type(patcher.model.diffusion_model).__name__ != "UNetModel":
        install_norm_input_copies(patcher)
    recorder = None
    if request.attention is not None and request.attention.active():
        recorder = AttentionRecorder()
        recorder.install(patcher)
    if request.gradient_checkpointing:
        install_checkpointing(patcher)

    names = layers.names()
    groups = {**layers.groups(), "token": []}
    if modifier is not None:
        names |= {id(p): f"modifier.{key}" for key, p in modifier.vectors.items()}
        groups["token"] = list(modifier.vectors.values())
    loss = DiffusionLoss(config, request.examples, request.prior, conditioning, request.plan, recorder, request.attention)
    trainer = Trainer(config, groups, loss)
    if request.resume is not None:
        summary = request.resume.training_summary()
        trainer.step = int(summary.get("steps", 0))
        trainer.losses = list(summary.get("losses", []))[-10000:]
        _resume_state(trainer, request.resume, request.resume_state, names)
    first_step = trainer.step

    def snapshot() -> SpectralShift:
        return layers.snapshot(request.architecture, request.metadata)

    context = StepContext(snapshot, patcher, lambda: trainer.state_tensors(names))
    on_step = None if request.on_step is None else (lambda step, value: request.on_step(step, value, context))

    def body(model_wrap, extra_args):
        loss.bind(model_wrap, extra_args, patcher.load_device)
        trainer.run(on_step=on_step)

    with DifferentiablePaths():
        run_inside(patcher, positive, body, request.examples[0].latent, config.seed)
    return TrainingResult(
        snapshot(),
        trainer.losses,
        trainer.state_tensors(names),
        trainer.step,
        time.perf_counter() - started,
        sum(p.numel() for p in trainer.parameters),
        layers.count,
        first_step=first_step,
        embedding={} if modifier is None else modifier.embedding(),
    )


def _resume_state(trainer: Trainer, resume: SpectralShift, state: dict[str, torch.Tensor] | None, names: dict[int, str]) -> None:
    """Continue from the saved float32 values and optimizer moments, or say what is missing.

    The shift file stores δ rounded to its precision (fp16 by default): without the
    state beside it the run continues from that rounded δ with a fresh optimizer, close
    to but not the same as an uninterrupted run.
    """
    moments = values = 0
    if state:
        moments, values = trainer.load_state_tensors(state, names)
    total = len(trainer.parameters)
    if values == total and moments == total:
        return
    if not state:
        missing = "no training state (.svdiffstate) beside it"
    elif values < total:
        missing = f"a training state without the full-precision values of {total - values} of {total} parameters (an older file)"
    else:
        missing = f"a training state without optimizer moments for {total - moments} of {total} parameters"
    log.warning(
        "resume_from '%s' has %s: training continues from the values rounded as stored in the file (%s)%s, so it will not "
        "equal an uninterrupted run exactly",
        resume.name,
        missing,
        resume.metadata.get("svdiff.precision", "fp16"),
        " with a fresh optimizer" if moments < total else "",
    )


def learning_summary(config: TrainConfig, steps: int, losses: list[float], extra: dict) -> dict:
    summary = {**config.summary(), "steps": steps, **extra}
    tail = [round(x, 6) for x in losses if math.isfinite(x)]
    summary["losses"] = tail[-2000:]
    return summary
