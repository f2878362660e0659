"""Cut-Mix-Unmix (paper §3.3, appendix C.2): multi-subject training data.

A collage puts two subjects side by side — left/right or top/bottom, split at a
fixed or random ratio — with a caption that names both ("photo of a sks dog on the
left and a zwx sculpture on the right") and one region mask per subject, used by the
unmix regulariser (:mod:`.attention`). Prior (class) collages are composed the same
way from the subjects' class images, with the class phrases in the same template.

Geometry: each piece is the centre crop of a square training image to its region's
aspect, at the training scale (never squeezed), so a subject keeps the size it has in
the single-subject examples. The cut is snapped to a multiple of 8 px, so every
mask is exact on the VAE's latent grid.

Sampling (paper §4.2): each training sample is a collage with probability ``p``
(default 0.6; two subjects drawn without replacement), otherwise one concept drawn
uniformly and one of its images.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

LAYOUTS = ("left_right", "up_down")
LAYOUT_CHOICES = ("left_right", "up_down", "both")
SNAP = 8  # px: one latent pixel of the SD/SDXL VAEs
PLACEHOLDER_PAIRS = {("left", "right"): "left_right", ("top", "bottom"): "up_down", ("a", "b"): None}
DEFAULT_TEMPLATES = (
    "photo of a {left} on the left and a {right} on the right\n"
    "photo of a {top} on the top and a {bottom} on the bottom\n"
    "photo of a {a} and a {b}"
)
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


@dataclass
class Template:
    text: str
    pair: tuple[str, str]
    layout: str | None
    """The layout the template describes; None for an order-free template ({a}, {b})."""

    def fill(self, first: str, second: str, swap: bool) -> str:
        """Caption with ``first`` in the left/top region, ``second`` in the other.

        ``swap`` orders an order-free template's mentions (paper: "photo of a [V2]
        sculpture and a [V1] dog").
        """
        if self.layout is None and swap:
            first, second = second, first
        return self.text.replace("{" + self.pair[0] + "}", first).replace("{" + self.pair[1] + "}", second)


def parse_templates(text: str) -> list[Template]:
    """One template per line, each with exactly one placeholder pair:
    ``{left}``/``{right}``, ``{top}``/``{bottom}`` or ``{a}``/``{b}``."""
    templates = []
    for number, line in enumerate((raw.strip() for raw in text.splitlines()), start=1):
        if not line:
            continue
        names = _PLACEHOLDER.findall(line)
        pair = next((p for p in PLACEHOLDER_PAIRS if sorted(names) == sorted(p)), None)
        if pair is None:
            found = ", ".join("{" + n + "}" for n in names) or "none"
            raise ValueError(
                f"prompt_templates line {number} ('{line}') has placeholders {found}; each line needs exactly one pair: "
                "{left} and {right}, {top} and {bottom}, or {a} and {b}"
            )
        templates.append(Template(line, pair, PLACEHOLDER_PAIRS[pair]))
    if not templates:
        raise ValueError("prompt_templates is empty; write e.g. 'photo of a {left} on the left and a {right} on the right'")
    return templates


@dataclass
class Subject:
    """One personal concept: its images and the words that name it."""

    name: str  # "subject 1", for messages
    images: list[torch.Tensor]  # (R, R, 3) in [0, 1]
    captions: list[str]  # one per image, each containing ``token``
    phrase: str  # "sks dog"
    token: str  # "sks": the special token whose attention the unmix loss shapes
    class_images: list[torch.Tensor] = field(default_factory=list)
    class_captions: list[str] = field(default_factory=list)

    @property
    def class_phrase(self) -> str:
        """The phrase without its special token: "sks dog" → "dog"."""
        return " ".join(word for word in self.phrase.split() if word != self.token)


def check_subject(subject: Subject, resolution: int) -> None:
    if not subject.images:
        raise ValueError(f"{subject.name} has no images; connect a dataset with at least one image")
    if not subject.token:
        raise ValueError(
            f"{subject.name} has no special token: set trigger_word on its dataset node (the rare word that names it, e.g. 'sks')"
        )
    if not re.search(rf"(?<!\S){re.escape(subject.token)}(?!\S)", subject.phrase):
        raise ValueError(
            f"the phrase of {subject.name} ('{subject.phrase}') does not contain its trigger word '{subject.token}'; "
            f"write it like '{subject.token} dog'"
        )
    if not subject.class_phrase:
        raise ValueError(f"the phrase of {subject.name} ('{subject.phrase}') has no class word; write it like '{subject.token} dog'")
    missing = [caption for caption in subject.captions if subject.token not in caption]
    if missing:
        raise ValueError(f"a caption of {subject.name} ('{missing[0]}') does not contain its trigger word '{subject.token}'")
    for images, what in ((subject.images, "images"), (subject.class_images, "class images")):
        for image in images:
            if tuple(image.shape[:2]) != (resolution, resolution):
                raise ValueError(
                    f"{subject.name}'s {what} are {image.shape[1]}×{image.shape[0]} px but the collages are {resolution}×{resolution}; "
                    "give every dataset node the same resolution"
                )


@dataclass
class Collage:
    image: torch.Tensor  # (R, R, 3)
    caption: str
    subjects: tuple[int, int]  # subject indices: (left or top, right or bottom)
    masks: torch.Tensor  # (2, R, R) in {0, 1}: the region of each, in the same order
    layout: str
    cut: int  # px from the left (left_right) or top (up_down)


def region_masks(resolution: int, layout: str, cut: int) -> torch.Tensor:
    """(2, R, R) masks of the first (left/top) and second region."""
    first = torch.zeros(resolution, resolution)
    if layout == "left_right":
        first[:, :cut] = 1
    elif layout == "up_down":
        first[:cut, :] = 1
    else:
        raise ValueError(f"layout '{layout}' is unknown; use one of {', '.join(LAYOUTS)}")
    return torch.stack([first, 1 - first])


def center_crop(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    top = (image.shape[0] - height) // 2
    left = (image.shape[1] - width) // 2
    return image[top : top + height, left : left + width]


def compose(first: torch.Tensor, second: torch.Tensor, layout: str, cut: int) -> torch.Tensor:
    """Collage of two square (R, R, C) images: ``first`` left/top of the cut."""
    size = first.shape[0]
    if layout == "left_right":
        return torch.cat([center_crop(first, size, cut), center_crop(second, size, size - cut)], dim=1)
    if layout == "up_down":
        return torch.cat([center_crop(first, cut, size), center_crop(second, size - cut, size)], dim=0)
    raise ValueError(f"layout '{layout}' is unknown; use one of {', '.join(LAYOUTS)}")


def snapped_cut(resolution: int, ratio: float) -> int:
    """The cut at ``ratio`` of the side, on the latent grid, never an empty region."""
    cut = round(resolution * ratio / SNAP) * SNAP
    return min(max(cut, SNAP), resolution - SNAP)


@dataclass
class CollagePlan:
    """Everything random about one collage except which images fill it."""

    subjects: tuple[int, int]
    layout: str
    cut: int
    template: Template
    swap: bool
    flips: tuple[bool, bool]


def plan_collages(
    count: int,
    n_subjects: int,
    resolution: int,
    layout: str,
    ratio_range: tuple[float, float],
    templates: list[Template],
    flip: bool,
    generator: torch.Generator,
) -> list[CollagePlan]:
    layouts = LAYOUTS if layout == "both" else (layout,)
    for name in layouts:
        if not [t for t in templates if t.layout in (name, None)]:
            pair = "{left} and {right}" if name == "left_right" else "{top} and {bottom}"
            raise ValueError(f"no prompt template fits the {name} layout; add a line with {pair}, or one with {{a}} and {{b}}")
    low, high = ratio_range
    plans = []
    for _ in range(count):
        order = torch.randperm(n_subjects, generator=generator)[:2].tolist()  # two subjects, without replacement
        chosen = layouts[int(torch.randint(len(layouts), (), generator=generator))]
        ratio = low + (high - low) * float(torch.rand((), generator=generator))
        fitting = [t for t in templates if t.layout in (chosen, None)]
        template = fitting[int(torch.randint(len(fitting), (), generator=generator))]
        swap = bool(torch.rand((), generator=generator) < 0.5)
        flips = tuple(flip and bool(torch.rand((), generator=generator) < 0.5) for _ in range(2))
        plans.append(CollagePlan((order[0], order[1]), chosen, snapped_cut(resolution, ratio), template, swap, flips))
    return plans


def render(plan: CollagePlan, images: tuple[torch.Tensor, torch.Tensor], names: tuple[str, str]) -> Collage:
    pieces = [torch.flip(image, dims=[1]) if flipped else image for image, flipped in zip(images, plan.flips, strict=True)]
    image = compose(pieces[0], pieces[1], plan.layout, plan.cut)
    caption = plan.template.fill(names[0], names[1], plan.swap)
    return Collage(image, caption, plan.subjects, region_masks(image.shape[0], plan.layout, plan.cut), plan.layout, plan.cut)


@dataclass
class MultiSubjectDataset:
    """What SVDiffCutMixUnmix passes to SVDiffTrain (ComfyUI type SVDIFF_DATASET)."""

    subjects: list[Subject]
    collages: list[Collage]
    prior_collages: list[Collage]
    """Empty, or one per collage: the same plan filled with class images and class phrases."""
    probability: float
    resolution: int
    plans: list[CollagePlan]
    seed: int

    @property
    def trigger(self) -> str:
        return ", ".join(subject.token for subject in self.subjects)

    def has_class_images(self) -> bool:
        return all(subject.class_images for subject in self.subjects)

    def with_class_images(self, images: list[list[torch.Tensor]], captions: list[list[str]]) -> MultiSubjectDataset:
        """A copy whose subjects have these class images, and the prior collages to match."""
        subjects = [
            Subject(s.name, s.images, s.captions, s.phrase, s.token, list(imgs), list(caps))
            for s, imgs, caps in zip(self.subjects, images, captions, strict=True)
        ]
        out = MultiSubjectDataset(subjects, self.collages, [], self.probability, self.resolution, self.plans, self.seed)
        out.prior_collages = prior_collages(subjects, self.plans, torch.Generator().manual_seed(self.seed + 1))
        return out


def build_dataset(
    subjects: list[Subject],
    resolution: int,
    count: int,
    probability: float,
    layout: str = "left_right",
    ratio_range: tuple[float, float] = (0.5, 0.5),
    templates: str = DEFAULT_TEMPLATES,
    flip: bool = True,
    seed: int = 0,
) -> MultiSubjectDataset:
    """Validate the subjects and build ``count`` collages (and prior collages when every
    subject has class images)."""
    if len(subjects) < 2:
        raise ValueError(f"Cut-Mix-Unmix needs at least two subjects, got {len(subjects)}: connect subject_2")
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"probability is {probability}; it must be between 0 and 1 (the paper uses 0.6)")
    if layout not in LAYOUT_CHOICES:
        raise ValueError(f"layout '{layout}' is unknown; use one of {', '.join(LAYOUT_CHOICES)}")
    low, high = ratio_range
    if not 0.1 <= low <= high <= 0.9:
        raise ValueError(f"the split ratio range is {low}–{high}; use 0.1 ≤ min ≤ max ≤ 0.9 (0.5–0.5 is a 1:1 split)")
    if count < 1:
        raise ValueError(f"collages is {count}; build at least one")
    for subject in subjects:
        check_subject(subject, resolution)
    tokens = [s.token for s in subjects]
    duplicated = sorted({t for t in tokens if tokens.count(t) > 1})
    if duplicated:
        raise ValueError(f"two subjects share the trigger word '{duplicated[0]}'; give every subject its own rare word")
    with_class = [bool(s.class_images) for s in subjects]
    if any(with_class) and not all(with_class):
        missing = next(s.name for s in subjects if not s.class_images)
        raise ValueError(f"{missing} has no class images while others do; connect class images for every subject, or for none")
    generator = torch.Generator().manual_seed(seed)
    plans = plan_collages(count, len(subjects), resolution, layout, ratio_range, parse_templates(templates), flip, generator)
    collages = fill_plans(subjects, plans, generator, prior=False)
    dataset = MultiSubjectDataset(subjects, collages, [], probability, resolution, plans, seed)
    if all(with_class):
        dataset.prior_collages = prior_collages(subjects, plans, torch.Generator().manual_seed(seed + 1))
    return dataset


def fill_plans(subjects: list[Subject], plans: list[CollagePlan], generator: torch.Generator, prior: bool) -> list[Collage]:
    """Render each plan with a random image of each of its two subjects (their class
    images and class phrases when ``prior``)."""
    out = []
    for plan in plans:
        pair = [subjects[i] for i in plan.subjects]
        pools = [s.class_images if prior else s.images for s in pair]
        images = tuple(pool[int(torch.randint(len(pool), (), generator=generator))] for pool in pools)
        out.append(render(plan, images, tuple(s.class_phrase if prior else s.phrase for s in pair)))
    return out


def prior_collages(subjects: list[Subject], plans: list[CollagePlan], generator: torch.Generator) -> list[Collage]:
    return fill_plans(subjects, plans, generator, prior=True)


# ----------------------------------------------------------------------------------
# Sampling


@dataclass(frozen=True)
class Draw:
    kind: str  # "collage" or "single"
    index: int  # collage index, or subject index


def draw_kinds(count: int, probability: float, n_subjects: int, n_collages: int, generator: torch.Generator) -> list[Draw]:
    """Per sample: a collage with ``probability``, else one concept drawn uniformly."""
    draws = []
    for _ in range(count):
        if n_collages and float(torch.rand((), generator=generator)) < probability:
            draws.append(Draw("collage", int(torch.randint(n_collages, (), generator=generator))))
        else:
            draws.append(Draw("single", int(torch.randint(n_subjects, (), generator=generator))))
    return draws


def preview_grid(collages: list[Collage], columns: int = 4, limit: int = 16, outline: bool = True):
    """A PIL grid of collages, each with its caption under it and its cut drawn in."""
    from PIL import Image, ImageDraw

    from .data import tensor_to_pil

    shown = collages[:limit]
    size = shown[0].image.shape[0]
    tile = min(size, 256)
    band = 28
    columns = min(columns, len(shown))
    rows = (len(shown) + columns - 1) // columns
    grid = Image.new("RGB", (columns * tile, rows * (tile + band)), (24, 24, 24))
    draw = ImageDraw.Draw(grid)
    for i, collage in enumerate(shown):
        x, y = (i % columns) * tile, (i // columns) * (tile + band)
        grid.paste(tensor_to_pil(collage.image).resize((tile, tile)), (x, y))
        if outline:
            c = collage.cut * tile // size
            line = [(x + c, y), (x + c, y + tile - 1)] if collage.layout == "left_right" else [(x, y + c), (x + tile - 1, y + c)]
            draw.line(line, fill=(255, 64, 64), width=1)
        text = collage.caption if len(collage.caption) <= tile // 6 else collage.caption[: tile // 6 - 1] + "…"
        draw.text((x + 3, y + tile + 6), text, fill=(230, 230, 230))
    return grid


def multi_subject_plan(
    probability: float,
    single_rows: list[list[int]],
    collage_rows: list[int],
    prior_single_rows: list[list[int]] | None = None,
    prior_collage_rows: list[int] | None = None,
):
    """A training plan over a flat list of examples: ``single_rows[s]`` are subject s's
    examples, ``collage_rows[k]`` collage k's. Prior examples mirror the draw: collage k
    takes its paired prior collage, subject s one of its class images (when given).

    Returns ``plan(generator, count) -> (instance rows, prior rows)``.
    """
    prior_single_rows = prior_single_rows or []
    prior_collage_rows = prior_collage_rows or []
    any_prior = [row for rows in prior_single_rows for row in rows] + list(prior_collage_rows)

    def plan(generator: torch.Generator, count: int) -> tuple[list[int], list[int]]:
        instance, prior = [], []
        for draw in draw_kinds(count, probability, len(single_rows), len(collage_rows), generator):
            if draw.kind == "collage":
                instance.append(collage_rows[draw.index])
                paired = prior_collage_rows[draw.index] if draw.index < len(prior_collage_rows) else None
            else:
                rows = single_rows[draw.index]
                instance.append(rows[int(torch.randint(len(rows), (), generator=generator))])
                own = prior_single_rows[draw.index] if draw.index < len(prior_single_rows) else []
                paired = own[int(torch.randint(len(own), (), generator=generator))] if own else None
            if paired is None and any_prior:
                paired = any_prior[int(torch.randint(len(any_prior), (), generator=generator))]
            if paired is not None:
                prior.append(paired)
        return instance, prior

    return plan
