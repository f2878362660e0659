"""Multi-subject nodes: Cut-Mix-Unmix datasets, attention regularisers, negative-prior guidance."""

from __future__ import annotations

import logging
import math

import torch
from comfy_api.latest import io, ui

from ..svdiff.comfy.guidance import NegativePriorGuider
from ..svdiff.training import cutmix
from ..svdiff.training.config import AttentionConfig
from ..svdiff.training.data import pil_to_tensor
from .common import CATEGORY, AttentionType, DatasetType

log = logging.getLogger("svdiff")
MAX_SUBJECTS = 4


def _subject(index: int, dataset, phrase: str, class_dataset) -> cutmix.Subject:
    name = f"subject {index}"
    if not hasattr(dataset, "items"):
        raise ValueError(f"subject_{index} is a Cut-Mix-Unmix dataset; connect a single-subject dataset (images of one concept)")
    items = dataset.expanded()
    subject = cutmix.Subject(
        name, [item.image for item in items], [item.caption for item in items], " ".join(phrase.split()), dataset.trigger
    )
    if class_dataset is not None:
        if not hasattr(class_dataset, "items"):
            raise ValueError(f"class_{index} is a Cut-Mix-Unmix dataset; connect class images of one class")
        subject.class_images = [item.image for item in class_dataset.expanded()]
        subject.class_captions = [item.caption for item in class_dataset.expanded()]
    if dataset.resolution != getattr(class_dataset, "resolution", dataset.resolution):
        raise ValueError(
            f"class_{index} has resolution {class_dataset.resolution} but subject_{index} has {dataset.resolution}; "
            "give every dataset node the same resolution"
        )
    return subject


class SVDiffCutMixUnmix(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        subjects = [DatasetType.Input(f"subject_{i}", optional=i > 1) for i in range(1, MAX_SUBJECTS + 1)]
        classes = [
            DatasetType.Input(f"class_{i}", optional=True, tooltip=f"Prior (class) images of subject {i}, e.g. photos of other dogs.")
            for i in range(1, MAX_SUBJECTS + 1)
        ]
        return io.Schema(
            node_id="SVDiffCutMixUnmix",
            display_name="Cut-Mix-Unmix Dataset (SVDiff)",
            category=f"{CATEGORY}/training",
            is_output_node=True,  # shows its preview grid
            description=(
                "Learn 2-4 subjects together (paper §3.3): collages of two subjects side by side with captions that name both and a "
                "region mask each; each training sample is a collage with probability p, else one subject drawn at random."
            ),
            inputs=[
                *subjects,
                io.String.Input(
                    "phrases",
                    default="sks dog\nzwx sculpture",
                    multiline=True,
                    tooltip="One line per connected subject: its trigger word and class word(s), as in the collage captions.",
                ),
                io.Float.Input(
                    "probability",
                    default=0.6,
                    min=0.0,
                    max=1.0,
                    step=0.05,
                    tooltip="Chance that a training sample is a collage (paper: 0.6).",
                ),
                io.Combo.Input("layout", options=list(cutmix.LAYOUT_CHOICES), default="left_right"),
                io.Float.Input(
                    "split_min", default=0.5, min=0.1, max=0.9, step=0.05, tooltip="Share of the first region; min < max splits at random."
                ),
                io.Float.Input("split_max", default=0.5, min=0.1, max=0.9, step=0.05),
                io.String.Input(
                    "prompt_templates",
                    default=cutmix.DEFAULT_TEMPLATES,
                    multiline=True,
                    tooltip="One per line, with {left}/{right}, {top}/{bottom} (layout-specific) or {a}/{b} (any layout, random order).",
                ),
                io.Int.Input("collages", default=32, min=1, max=4096, tooltip="Collages built (and VAE-encoded once by the trainer)."),
                io.Boolean.Input("random_flip", default=True, tooltip="Mirror each piece of a collage at random."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1),
                *classes,
            ],
            outputs=[
                DatasetType.Output(display_name="dataset"),
                io.Image.Output(display_name="collages"),
                io.Mask.Output(display_name="first_region"),
            ],
        )

    @classmethod
    def execute(cls, phrases, probability, layout, split_min, split_max, prompt_templates, collages, random_flip, seed, **optional):
        datasets = [(i, optional.get(f"subject_{i}")) for i in range(1, MAX_SUBJECTS + 1)]
        connected = [(i, d) for i, d in datasets if d is not None]
        if len(connected) < 2:
            raise ValueError("Cut-Mix-Unmix needs at least two subjects: connect a dataset to subject_2")
        lines = [line for line in phrases.splitlines() if line.strip()]
        if len(lines) != len(connected):
            raise ValueError(
                f"phrases has {len(lines)} lines for {len(connected)} connected subjects; write one line per subject, e.g. 'sks dog'"
            )
        resolutions = {d.resolution for _, d in connected if hasattr(d, "resolution")}
        if len(resolutions) > 1:
            raise ValueError(
                f"the subjects' datasets have different resolutions ({', '.join(map(str, sorted(resolutions)))}); "
                "give every dataset node the same resolution"
            )
        subjects = [_subject(i, d, line, optional.get(f"class_{i}")) for (i, d), line in zip(connected, lines, strict=True)]
        dataset = cutmix.build_dataset(
            subjects, connected[0][1].resolution, collages, probability, layout, (split_min, split_max), prompt_templates, random_flip, seed
        )
        images = torch.stack([c.image for c in dataset.collages])
        masks = torch.stack([c.masks[0] for c in dataset.collages])
        grid = pil_to_tensor(cutmix.preview_grid(dataset.collages))[None]
        priors = f", {len(dataset.prior_collages)} prior collages" if dataset.prior_collages else ""
        text = f"{len(subjects)} subjects, {len(dataset.collages)} collages{priors}, p = {probability:g}"
        return io.NodeOutput(dataset, images, masks, ui={"text": (text,), **ui.PreviewImage(grid, cls=cls).as_dict()})


class SVDiffAttentionRegularization(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SVDiffAttentionRegularization",
            display_name="Attention Regularization (SVDiff)",
            category=f"{CATEGORY}/training",
            description=(
                "Cross-attention losses for SVDiffTrain. unmix: a subject's trigger word should not attend to the other subject's "
                "half of a Cut-Mix-Unmix collage (paper Fig. 3b). subject: the trigger word should attend no wider than its class "
                "word (appendix D.1, eq. 10). UNet models (SD1.x, SD2.x, SDXL) only."
            ),
            inputs=[
                io.Float.Input("unmix_weight", default=1.0, min=0.0, max=1000.0, step=0.01),
                io.Float.Input("subject_weight", default=0.0, min=0.0, max=1000.0, step=0.01),
                io.Float.Input(
                    "threshold", default=0.5, min=0.01, max=0.99, step=0.01, tooltip="Subject mask: class-word attention ≥ this × its peak."
                ),
                io.String.Input(
                    "class_word", default="", tooltip="For single-subject datasets: the class word of the captions (e.g. 'dog')."
                ),
            ],
            outputs=[AttentionType.Output(display_name="attention")],
        )

    @classmethod
    def execute(cls, unmix_weight, subject_weight, threshold, class_word):
        return io.NodeOutput(AttentionConfig(unmix_weight, subject_weight, threshold, class_word.strip()))


class SVDiffNegativePriorGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SVDiffNegativePriorGuider",
            display_name="Negative-Prior Guider (SVDiff)",
            category=f"{CATEGORY}/sampling",
            description=(
                "Classifier-free guidance whose unconditional prediction is β·ε(negative) + (1−β)·ε(prior_negative) (paper appendix C.3, "
                "eqs. 8-9). Use the prior prompts as prior_negative (e.g. 'photo of a dog and a sculpture') to remove Cut-Mix-Unmix "
                "stitching; combine several with Conditioning (Combine) to average them."
            ),
            inputs=[
                io.Model.Input("model"),
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative", tooltip="The null prompt ∅ (an empty prompt, or your usual negative)."),
                io.Conditioning.Input("prior_negative", tooltip="c_neg: the prior-preservation prompts."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01, tooltip="s of eq. 8."),
                io.Float.Input("beta", default=0.5, min=0.0, max=1.0, step=0.05, tooltip="β of eq. 9 (paper: 0 < β < 1; 1 = plain CFG)."),
            ],
            outputs=[io.Guider.Output()],
        )

    @classmethod
    def execute(cls, model, positive, negative, prior_negative, cfg, beta):
        for name, value in (("cfg", cfg), ("beta", beta)):
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} is {value}; set a finite number")
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta is {beta}; it must be between 0 and 1 (1 ignores prior_negative, 0 ignores negative)")
        guider = NegativePriorGuider(model)
        guider.set_conds(positive, negative, prior_negative)
        guider.set_cfg(cfg, beta)
        return io.NodeOutput(guider)


NODES = [SVDiffCutMixUnmix, SVDiffAttentionRegularization, SVDiffNegativePriorGuider]
