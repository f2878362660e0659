"""Human-readable summaries and plots of spectral shifts (PIL only).

* ``describe``: a text summary (architecture, layers, size, δ statistics, training
  summary, history).
* ``block_magnitudes`` + ``bar_chart``: mean |δ| per UNet block / text-encoder
  layer, to see where a shift acts.
* ``cosine_by_layer``: per-layer cosine similarity of two shifts, the statistic of
  the paper's appendix E.2 / Fig. 15 (averaged over layers there).
"""

from __future__ import annotations

import json
import math
import re
from collections import OrderedDict

import torch
from PIL import Image, ImageDraw, ImageFont

from .fileformat import base_fingerprint
from .shift import SpectralShift, parse_key, unet_block

_CLIP_LAYER = re.compile(r"^(\w+)\.transformer\.text_model\.encoder\.layers\.(\d+)\.")


def group_of(key: str) -> str:
    """Display group of a file key: ``in 4``, ``mid``, ``out 7``, ``clip_l 3``, ..."""
    target = parse_key(key)
    if target.component == "model":
        block = unet_block(target.param)
        if block is not None:
            name, index = block
            return {"input": f"in {index}", "middle": "mid", "output": f"out {index}"}[name]
        first = target.param.split(".")[1]
        return "final" if first == "out" else first
    match = _CLIP_LAYER.match(target.param)
    if match:
        return f"{match.group(1)} {match.group(2)}"
    return target.param.split(".")[0] + " other"


def _sort_key(group: str) -> tuple:
    order = {"time_embed": 0, "label_emb": 1, "in": 2, "mid": 3, "out": 4, "final": 5}
    head, _, tail = group.partition(" ")
    rank = order.get(head, 6 if not head.startswith("clip") else 7)
    return (rank, head, int(tail) if tail.isascii() and tail.isdigit() else -1, tail)


def block_magnitudes(shift: SpectralShift) -> OrderedDict[str, float]:
    """Mean |δ| over the spectral shifts of each display group, in network order."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for key, tensor in shift.tensors.items():
        if parse_key(key).kind != "spectral":
            continue
        group = group_of(key)
        sums[group] = sums.get(group, 0.0) + float(tensor.abs().sum())
        counts[group] = counts.get(group, 0) + tensor.numel()
    return OrderedDict((g, sums[g] / counts[g]) for g in sorted(sums, key=_sort_key))


def cosine_by_layer(a: SpectralShift, b: SpectralShift) -> OrderedDict[str, float]:
    """cos(δa, δb) for every spectral key in both shifts (shorter one zero-padded)."""
    out: OrderedDict[str, float] = OrderedDict()
    for key in sorted(set(a.tensors) & set(b.tensors), key=lambda k: (_sort_key(group_of(k)), k)):
        if parse_key(key).kind != "spectral":
            continue
        ta, tb = a.tensors[key].double(), b.tensors[key].double()
        n = max(ta.numel(), tb.numel())
        ta = torch.nn.functional.pad(ta, (0, n - ta.numel()))
        tb = torch.nn.functional.pad(tb, (0, n - tb.numel()))
        denominator = float(ta.norm() * tb.norm())
        out[key] = float(ta @ tb) / denominator if denominator > 0 else 0.0
    return out


def describe(shift: SpectralShift, other: SpectralShift | None = None) -> str:
    """The text panel of SVDiffInspect."""
    spectral = [k for k, t in shift.targets().items() if t.kind == "spectral"]
    values = shift.num_values()
    lines = [
        f"spectral shift: {shift.name}",
        f"architecture: {shift.architecture}    base fingerprint: {base_fingerprint(shift)}",
        f"layers: {shift.layer_summary()}",
        f"values: {values:,} (≈ {values * 2 / 1024:,.0f} KiB as fp16, {values * 4 / 1024:,.0f} KiB as fp32)",
    ]
    if spectral:
        all_delta = torch.cat([shift.tensors[k].flatten() for k in spectral])
        lines.append(
            f"δ: mean |δ| {float(all_delta.abs().mean()):.3e}, max |δ| {float(all_delta.abs().max()):.3e}, "
            f"{int((all_delta == 0).sum())} exact zeros"
        )
        norms = sorted(((float(shift.tensors[k].norm()), k) for k in spectral), reverse=True)[:5]
        lines.append("largest ‖δ‖: " + ", ".join(f"{k} ({n:.3g})" for n, k in norms))
    training = shift.training_summary()
    if training:
        lines.append("training: " + json.dumps(training, ensure_ascii=False)[:600])
    history = shift.history()
    if history:
        lines.append("history: " + " → ".join(history[-5:]))
    if other is not None:
        cosines = cosine_by_layer(shift, other)
        if cosines:
            mean = sum(cosines.values()) / len(cosines)
            lines.append(f"cosine similarity with '{other.name}': mean {mean:.3f} over {len(cosines)} shared layers (appendix E.2)")
        else:
            lines.append(f"'{other.name}' shares no spectral layers with '{shift.name}'")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------
# Plotting


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def bar_chart(
    values: OrderedDict[str, float],
    title: str,
    y_label: str,
    width: int = 900,
    height: int = 420,
    signed: bool = False,
    fixed_max: float | None = None,
) -> Image.Image:
    """A labelled bar chart; ``signed`` puts the zero line mid-height. Labels are ASCII
    (PIL's default font has no Greek letters)."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    title_font, label_font = _font(16), _font(11)
    left, right, top, bottom = 70, 20, 36, 90
    plot_w, plot_h = width - left - right, height - top - bottom
    draw.text((left, 8), f"{title}   [y: {y_label}]", fill="black", font=title_font)
    draw.line([(left, top), (left, top + plot_h)], fill="black")
    if not values:
        draw.text((left + 10, top + plot_h // 2), "nothing to plot", fill="gray", font=label_font)
        return image
    vmax = fixed_max or max(abs(v) for v in values.values()) or 1.0
    if signed:
        vmax = max(vmax, 1e-12)
        zero_y = top + plot_h / 2
        scale = (plot_h / 2) / vmax
    else:
        zero_y = top + plot_h
        scale = plot_h / vmax
    draw.line([(left, zero_y), (left + plot_w, zero_y)], fill="black")
    for fraction in (0.5, 1.0):
        y = zero_y - fraction * vmax * scale
        draw.line([(left - 4, y), (left, y)], fill="black")
        draw.text((4, y - 6), f"{fraction * vmax:.2g}", fill="black", font=label_font)
        if signed:
            y = zero_y + fraction * vmax * scale
            draw.text((4, y - 6), f"{-fraction * vmax:.2g}", fill="black", font=label_font)
    n = len(values)
    slot = plot_w / n
    bar = max(1.0, slot * 0.8)
    label_every = max(1, math.ceil(n / 60))
    for i, (label, value) in enumerate(values.items()):
        x0 = left + i * slot + (slot - bar) / 2
        y1 = zero_y - value * scale
        color = (70, 110, 200) if value >= 0 else (210, 90, 70)
        draw.rectangle([x0, min(zero_y, y1), x0 + bar, max(zero_y, y1)], fill=color)
        if i % label_every == 0:
            text = Image.new("L", (bottom - 8, 12), 255)
            ImageDraw.Draw(text).text((0, 0), label[:16], fill=0, font=label_font)
            rotated = text.rotate(90, expand=True)
            image.paste(
                Image.new("RGB", rotated.size, "black"), (int(x0 + bar / 2 - 6), top + plot_h + 4), Image.eval(rotated, lambda p: 255 - p)
            )
    return image


def magnitude_plot(shift: SpectralShift) -> Image.Image:
    return bar_chart(block_magnitudes(shift), f"mean |delta| per block: {shift.name}", "mean |delta|")


def cosine_plot(a: SpectralShift, b: SpectralShift) -> Image.Image:
    cosines = cosine_by_layer(a, b)
    grouped: dict[str, list[float]] = {}
    for key, value in cosines.items():
        grouped.setdefault(group_of(key), []).append(value)
    per_group = OrderedDict((g, sum(v) / len(v)) for g, v in grouped.items())
    mean = sum(cosines.values()) / len(cosines) if cosines else 0.0
    title = f"cosine similarity per block: {a.name} vs {b.name} (mean over layers {mean:.3f})"
    return bar_chart(per_group, title, "cos", signed=True, fixed_max=1.0)


def to_image_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL images (same size) → ComfyUI IMAGE tensor ``(B, H, W, 3)`` in [0, 1]."""
    arrays = [
        torch.frombuffer(bytearray(img.convert("RGB").tobytes()), dtype=torch.uint8).reshape(img.height, img.width, 3) for img in images
    ]
    return torch.stack(arrays).float() / 255.0


def line_chart(values: list[float], title: str, width: int = 900, height: int = 360, smooth: int = 0) -> Image.Image:
    """A line chart of ``values`` (e.g. the loss per step), with an optional moving average."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 70, 20, 36, 40
    plot_w, plot_h = width - left - right, height - top - bottom
    draw.text((left, 8), title, fill="black", font=_font(16))
    draw.line([(left, top), (left, top + plot_h), (left + plot_w, top + plot_h)], fill="black")
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) < 2:
        draw.text((left + 10, top + plot_h // 2), "not enough points yet", fill="gray", font=_font(11))
        return image
    low, high = min(finite), max(finite)
    span = (high - low) or 1.0

    def points(series):
        n = len(series)
        return [(left + i * plot_w / (n - 1), top + plot_h - (v - low) / span * plot_h) for i, v in enumerate(series) if math.isfinite(v)]

    draw.line(points(values), fill=(150, 170, 220), width=1)
    if smooth > 1 and len(values) > smooth:
        averaged = [sum(values[max(0, i - smooth + 1) : i + 1]) / len(values[max(0, i - smooth + 1) : i + 1]) for i in range(len(values))]
        draw.line(points(averaged), fill=(30, 60, 170), width=2)
    font = _font(11)
    for fraction in (0.0, 0.5, 1.0):
        y = top + plot_h - fraction * plot_h
        draw.text((4, y - 6), f"{low + fraction * span:.3g}", fill="black", font=font)
    draw.text((left, top + plot_h + 6), "step 1", fill="black", font=font)
    draw.text((left + plot_w - 60, top + plot_h + 6), f"step {len(values)}", fill="black", font=font)
    return image
