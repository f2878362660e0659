"""Training examples: one :class:`Example` type from the VAE encoder to the loss.

The dataset nodes give images and captions (``svdiff.training.data``, Cut-Mix-Unmix
``svdiff.training.cutmix``); here they become VAE latents with their caption, an optional
mirrored latent, attention targets and a loss mask, and a plan of which examples a
micro-batch draws.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ...training import attention as attention_math
from ...training import augment
from ...training.config import AttentionConfig
from ...training.cutmix import multi_subject_plan
from ..tokens import token_positions


@dataclass
class AttentionTargets:
    """What the attention regularisers need of one example (token positions in its caption)."""

    regions: list[tuple[list[int], torch.Tensor]] = field(default_factory=list)
    """Collages: each subject's special-token positions and its (h, w) latent-resolution mask."""
    special: list[int] = field(default_factory=list)
    """Single-subject examples: the special token's positions …"""
    class_positions: list[int] = field(default_factory=list)
    """… and the class word's, whose thresholded attention is the subject mask (eq. 10)."""


@dataclass
class Example:
    """One training example."""

    latent: torch.Tensor
    """(1, C, H, W): the VAE latent as ComfyUI's VAEEncode returns it (in model space once the run prepared it)."""
    caption: str
    flipped: torch.Tensor | None = None
    """Latent of the mirrored image, drawn instead of ``latent`` half of the time when flips are on."""
    attention: AttentionTargets | None = None
    mask: torch.Tensor | None = None
    """(H, W) latent-resolution loss mask (augmentation); None = everywhere."""

    def drawn(self, generator: torch.Generator, flip: bool) -> Example:
        """This example as one micro-batch draws it: mirrored with probability ½ when flips
        are on and it has a mirrored latent (the draw happens only then)."""
        if flip and self.flipped is not None and bool(torch.rand((), generator=generator) < 0.5):
            return dataclasses.replace(self, latent=self.flipped, flipped=None)
        return self


Plan = Callable[[torch.Generator, int], tuple[list[int], list[int]]]
"""Which instance and prior examples a micro-batch of ``count`` draws."""


def uniform_plan(n_instance: int, n_prior: int) -> Plan:
    """Instance and prior examples drawn independently, uniformly (without replacement within a batch)."""

    def plan(generator: torch.Generator, count: int) -> tuple[list[int], list[int]]:
        order = torch.randperm(n_instance, generator=generator).tolist()
        instance = [order[i % n_instance] for i in range(count)]
        prior = []
        if n_prior:
            order = torch.randperm(n_prior, generator=generator).tolist()
            prior = [order[i % n_prior] for i in range(count)]
        return instance, prior

    return plan


# ----------------------------------------------------------------------------------
# From datasets


def encode(vae, image: torch.Tensor, caption: str, flip: bool = False, **extra) -> Example:
    """The example of an (H, W, C) image: its latent and, with ``flip``, its mirror image's."""
    pixels = image[None, ..., :3]
    latent = vae.encode(pixels)
    return Example(latent, caption, vae.encode(torch.flip(pixels, dims=[2])) if flip else None, **extra)


def dataset_examples(vae, dataset, flip: bool, targets: dict[str, AttentionTargets] | None = None, progress=None) -> list[Example]:
    """Each (repeated) image of a single-subject dataset, with its caption's attention targets;
    ``progress(done, total)`` after each image encoded."""
    targets = targets or {}
    items = dataset.expanded()
    examples = []
    for item in items:
        examples.append(encode(vae, item.image, item.caption, flip, attention=targets.get(item.caption)))
        if progress is not None:
            progress(len(examples), len(items))
    return examples


def subject_targets(clip, caption: str, token: str, class_word: str) -> AttentionTargets:
    """Eq. 10's targets: the positions of the special token and of the class word."""
    return AttentionTargets(special=token_positions(clip, caption, token), class_positions=token_positions(clip, caption, class_word))


def single_subject_examples(dataset, clip, vae, attention: AttentionConfig | None, flip: bool, progress=None) -> list[Example]:
    """The examples of a single-subject dataset, with eq. 10's targets when ``attention`` asks for them."""
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
        targets = {caption: subject_targets(clip, caption, dataset.trigger, attention.class_word) for caption in dataset.captions()}
    return dataset_examples(vae, dataset, flip, targets, progress)


def multi_subject_examples(dataset, clip, vae, attention: AttentionConfig | None, flip: bool, with_prior: bool, progress=None):
    """``(instance, prior, plan)`` of a Cut-Mix-Unmix dataset (class images already attached).

    Instance rows: each subject's images (mirrored at random like single-subject data),
    then the collages (never mirrored: their captions say left and right). Prior rows:
    each subject's class images, then the prior collages.
    """
    total = sum(len(s.images) for s in dataset.subjects) + len(dataset.collages)
    if with_prior:
        total += sum(len(s.class_images) for s in dataset.subjects) + len(dataset.prior_collages)
    done = 0

    def encoded(example: Example) -> Example:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)
        return example

    unmix = attention is not None and attention.unmix_weight > 0
    subject_reg = attention is not None and attention.subject_weight > 0
    instance, single_rows, collage_rows = [], [], []
    for subject in dataset.subjects:
        rows = []
        for image, caption in zip(subject.images, subject.captions, strict=True):
            targets = subject_targets(clip, caption, subject.token, subject.class_phrase) if subject_reg else None
            rows.append(len(instance))
            instance.append(encoded(encode(vae, image, caption, flip, attention=targets)))
        single_rows.append(rows)
    grid = (dataset.resolution // 8, dataset.resolution // 8)
    for collage in dataset.collages:
        targets = None
        if unmix:
            regions = [
                (token_positions(clip, collage.caption, dataset.subjects[s].token), attention_math.pooled(mask, grid))
                for s, mask in zip(collage.subjects, collage.masks, strict=True)
            ]
            targets = AttentionTargets(regions=regions)
        collage_rows.append(len(instance))
        instance.append(encoded(encode(vae, collage.image, collage.caption, attention=targets)))
    prior, prior_single, prior_collage = [], [], []
    if with_prior:
        for subject in dataset.subjects:
            rows = []
            for image, caption in zip(subject.class_images, subject.class_captions, strict=True):
                rows.append(len(prior))
                prior.append(encoded(encode(vae, image, caption)))
            prior_single.append(rows)
        for collage in dataset.prior_collages:
            prior_collage.append(len(prior))
            prior.append(encoded(encode(vae, collage.image, collage.caption)))
    plan = multi_subject_plan(dataset.probability, single_rows, collage_rows, prior_single, prior_collage)
    return instance, prior, plan


def augmented_examples(vae, dataset, variants: int, seed: int, flip: bool, progress=None) -> list[Example]:
    """``variants`` draws of the Custom Diffusion policy per (repeated) image, each encoded once."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    items = dataset.expanded()
    for item in items:
        for _ in range(variants):
            image = item.image
            if flip and bool(torch.rand((), generator=generator) < 0.5):
                image = torch.flip(image, dims=[1])
            aug = augment.draw(generator, dataset.resolution)
            pixels, mask = augment.apply(image, aug)
            rows.append(encode(vae, pixels, aug.prefix + item.caption, mask=mask))
            if progress is not None:
                progress(len(rows), len(items) * variants)
    return rows
