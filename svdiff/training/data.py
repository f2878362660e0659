"""Training data: image sets with captions, loaded from folders or given as tensors.

Resize policy (documented in the README): each image is scaled so that its shorter
side equals the training resolution (Lanczos), then center-cropped to a square;
the resolution must be a multiple of 64 (VAE factor 8 × UNet depth). Images are RGB
in [0, 1]: grayscale is replicated, alpha is composited over white, 16-bit and
palette images are converted.

Folders follow kohya's convention: a caption file ``<image stem>.txt`` beside each
image, and sub-folders named ``<repeats>_<class words>`` repeat their images
(``10_sks dog``); an image without a caption file takes the folder's class words, or
the default caption.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
MIN_SIDE = 64
_REPEAT_FOLDER = re.compile(r"^(\d+)_(.*)$")


@dataclass
class TrainingImage:
    image: torch.Tensor  # (H, W, 3) float32 in [0, 1], already at the training resolution
    caption: str
    source: str
    repeats: int = 1


@dataclass
class Dataset:
    """What the dataset nodes pass to SVDiffTrain (ComfyUI type SVDIFF_DATASET)."""

    items: list[TrainingImage]
    resolution: int
    trigger: str = ""
    notes: list[str] = field(default_factory=list)

    def expanded(self) -> list[TrainingImage]:
        """Items repeated by their folder's repeat count."""
        return [item for item in self.items for _ in range(item.repeats)]

    def captions(self) -> list[str]:
        return sorted({item.caption for item in self.items})


def check_resolution(resolution: int) -> int:
    if resolution < MIN_SIDE or resolution % 64:
        raise ValueError(f"resolution is {resolution}; use a multiple of 64 of at least {MIN_SIDE} (512 for SD1.x, 1024 for SDXL)")
    return resolution


def to_rgb(image: Image.Image, name: str) -> Image.Image:
    """RGB from any PIL mode (alpha over white; 16-bit scaled down)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(array * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def square_crop(image: Image.Image, resolution: int, name: str) -> Image.Image:
    width, height = image.size
    if min(width, height) < MIN_SIDE:
        raise ValueError(
            f"image '{name}' is {width}×{height}; training needs at least {MIN_SIDE} px on the shorter side; remove it or replace it with a larger image"
        )
    scale = resolution / min(width, height)
    resized = image.resize((max(resolution, round(width * scale)), max(resolution, round(height * scale))), Image.LANCZOS)
    left = (resized.width - resolution) // 2
    top = (resized.height - resolution) // 2
    return resized.crop((left, top, left + resolution, top + resolution))


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)


def tensor_to_pil(image: torch.Tensor) -> Image.Image:
    """(H, W, C) float in [0, 1] → PIL (C = 1, 3 or 4)."""
    array = (image.detach().cpu().float().clamp(0, 1).numpy() * 255.0 + 0.5).astype(np.uint8)
    if array.shape[-1] == 1:
        array = array[..., 0]
    return Image.fromarray(array)


def load_folder(folder: Path, resolution: int, default_caption: str = "", caption_extension: str = ".txt", trigger: str = "") -> Dataset:
    """Images of ``folder`` and its ``N_class`` sub-folders, with their captions."""
    check_resolution(resolution)
    if not folder.is_dir():
        raise ValueError(f"folder '{folder}' does not exist or is not a folder")
    items: list[TrainingImage] = []
    notes: list[str] = []
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        repeats, class_words = 1, ""
        relative = path.relative_to(folder)
        for part in relative.parts[:-1]:
            match = _REPEAT_FOLDER.match(part)
            if match:
                repeats, class_words = int(match.group(1)), match.group(2).strip()
        caption_file = path.with_suffix(caption_extension)
        if caption_file.is_file():
            caption = caption_file.read_text(encoding="utf-8", errors="replace").strip()
        else:
            caption = class_words or default_caption
        if not caption:
            raise ValueError(
                f"image '{relative}' has no caption: add '{caption_file.name}', name its folder like '10_sks dog', or set default_caption"
            )
        try:
            with Image.open(path) as opened:
                opened.load()
                image = ImageOps.exif_transpose(opened)
                image = square_crop(to_rgb(image, str(relative)), resolution, str(relative))
        except (UnidentifiedImageError, OSError) as exc:
            raise ValueError(f"image '{relative}' cannot be read ({exc}); remove it or convert it to PNG/JPEG") from exc
        items.append(TrainingImage(pil_to_tensor(image), caption, str(relative), max(1, repeats)))
    if not items:
        raise ValueError(
            f"folder '{folder}' contains no images ({', '.join(sorted(IMAGE_SUFFIXES))}); add images to it or choose another folder"
        )
    dataset = Dataset(items, resolution, trigger.strip(), notes)
    check_trigger(dataset)
    return dataset


def from_images(images: torch.Tensor | list[torch.Tensor], captions: list[str], resolution: int, trigger: str = "") -> Dataset:
    """A dataset from ComfyUI IMAGE tensors ``(B, H, W, C)`` (a batch or a list) and captions.

    One caption for all images, or one per image.
    """
    check_resolution(resolution)
    batches = images if isinstance(images, list) else [images]
    frames = [frame for batch in batches for frame in (batch if batch.ndim == 4 else batch[None])]
    if not frames:
        raise ValueError("images: the batch is empty; connect at least one image")
    if len(captions) not in (1, len(frames)):
        raise ValueError(f"{len(captions)} captions for {len(frames)} images; give one caption for all, or one per image")
    items = []
    for i, frame in enumerate(frames):
        if frame.shape[-1] not in (1, 3, 4):
            raise ValueError(f"image {i} has {frame.shape[-1]} channels; expected 1 (gray), 3 (RGB) or 4 (RGBA)")
        pil = to_rgb(tensor_to_pil(frame), f"image {i}")
        pil = square_crop(pil, resolution, f"image {i}")
        caption = captions[0] if len(captions) == 1 else captions[i]
        if not caption.strip():
            raise ValueError(f"the caption of image {i} is empty")
        items.append(TrainingImage(pil_to_tensor(pil), caption.strip(), f"image {i}"))
    dataset = Dataset(items, resolution, trigger.strip())
    check_trigger(dataset)
    return dataset


def check_trigger(dataset: Dataset) -> None:
    if not dataset.trigger:
        return
    missing = [item.source for item in dataset.items if dataset.trigger not in item.caption]
    if missing:
        raise ValueError(
            f"{len(missing)} captions do not contain the trigger word '{dataset.trigger}' (e.g. '{missing[0]}'); "
            "add it to the captions, or clear trigger_word"
        )
