"""Export a spectral shift on a MODEL / CLIP as an ordinary LoRA file's tensors.

The factors come from ``svdiff/lora.py`` (exact, or the best rank-k approximation with
its error); this module resolves and decomposes through the apply path's ``prepare``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..atomic import atomic_save
from ..lora import ExportReport, layer_factors
from ..shift import CLIP_PREFIX, SpectralShift
from ..spectral import spectral_update
from .patching import ApplyReport, prepare


def _lora_stem(component: str, param: str) -> str:
    """LoRA key prefix ComfyUI maps back to ``param`` (its generic key format)."""
    stem = param.rsplit(".", 1)[0]
    return CLIP_PREFIX + stem if component == "clip" else stem


def export_lora(
    model, clip, shift: SpectralShift, rank: int, strength_model: float = 1.0, strength_clip: float = 1.0, progress=None, cache=None
):
    """``(tensors, report)`` of a LoRA equivalent to applying ``shift`` at the strengths.

    Spectral layers become ``<stem>.lora_up.weight`` / ``.lora_down.weight`` /
    ``.alpha`` (alpha = rank used, so ComfyUI's scale alpha/rank is 1); elementwise
    deltas, and svdiff-pytorch's per-norm scalars (exact as elementwise deltas),
    become ``<stem>.diff`` / ``.diff_b``, which ComfyUI's LoRA loader applies as-is.
    """
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    prepared = prepare(model, clip, shift, strength_model, strength_clip, ApplyReport(shift.name), progress, cache)
    tensors: dict[str, torch.Tensor] = {}
    report = ExportReport()
    dropped_sum = total_sum = 0.0
    for part in prepared:
        for key, target in part.targets.items():
            stem = _lora_stem(part.component, target.param)
            delta = shift.tensors[key].to(torch.float64) * part.strength
            base = part.bases[target.param]
            if target.kind == "spectral" and base.ndim >= 2:
                layer = layer_factors(part.decompositions[key], base, delta, rank)
                if layer is None:
                    continue
                k = layer.down.shape[0]
                tensors[f"{stem}.lora_up.weight"] = layer.up
                tensors[f"{stem}.lora_down.weight"] = layer.down
                tensors[f"{stem}.alpha"] = torch.tensor(float(k))
                report.layers += 1
                report.exact_layers += int(k >= layer.nonzero)
                dropped_sum += layer.dropped_energy
                total_sum += layer.total_energy
                report.per_layer[stem] = layer.relative_error
                if layer.relative_error > report.worst_error:
                    report.worst_error, report.worst_layer = layer.relative_error, stem
                continue
            if target.kind == "spectral":  # 1-D weight: the 1 × C view's update is elementwise
                update = spectral_update(part.decompositions[key], base, delta)
                if update is None:
                    continue
            else:
                update = delta.float()
            suffix = ".diff_b" if target.param.endswith(".bias") else ".diff"
            name = stem + suffix
            tensors[name] = tensors[name] + update.float() if name in tensors else update.float()
            report.elementwise += 1
    if total_sum > 0:
        report.total_error = (dropped_sum / total_sum) ** 0.5
    return tensors, report


def write_lora(target: Path, model, clip, shift: SpectralShift, rank: int, strength_model: float, strength_clip: float,
               precision: str = "fp16", progress=None) -> ExportReport:  # fmt: skip
    """:func:`export_lora` written to ``target`` (safetensors, with the errors in its metadata)."""
    tensors, report = export_lora(model, clip, shift, rank, strength_model, strength_clip, progress=progress)
    if not tensors:
        raise ValueError(f"'{shift.name}' changes no weight at these strengths; nothing to export")
    dtype = {"fp16": torch.float16, "fp32": torch.float32}[precision]
    out = {k: v.to(dtype).contiguous() if v.ndim else v.float() for k, v in tensors.items()}
    metadata = {
        "svdiff.exported_from": shift.name,
        "svdiff.architecture": shift.architecture,
        "svdiff.export_rank": str(rank),
        "svdiff.export_error": f"{report.total_error:.6e}",
        "svdiff.export_per_layer_error": json.dumps({k: round(v, 6) for k, v in report.per_layer.items()}),
    }
    atomic_save(target, out, metadata)
    return report
