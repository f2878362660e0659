"""Closed-form concept merge (SVDiffMergeConcepts) on SD1.5 shapes: goal ≤ 10 s on this CPU.

A full-size SD1.5 UNet (random weights, 32 cross-attention K/V layers) and a full-size
CLIP-L (random weights), two concepts with full K/V deltas, the ~200 shipped captions.
Measured in one process:

* the whole merge with the caption features not cached (first merge with a CLIP);
* the whole merge again (caption features cached, as for every later merge);
* the linear algebra alone (factorising the system + merging the 32 layers);
* the caption encoding alone (one batch of 77-token chunks through CLIP-L).

    python benchmarks/bench_merge.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from common import header, random_unet, setup_comfy


def main() -> None:
    setup_comfy()
    from comfyui_svdiff.svdiff import cache, merge
    from comfyui_svdiff.svdiff.comfy import merge as comfy_merge
    from comfyui_svdiff.svdiff.shift import SpectralShift
    from devtools import tiny_models

    cache.set_default_cache(cache.DecompositionCache(Path(tempfile.mkdtemp()), ram_mb=256, disk_mb=256))
    model = random_unet("SD15")
    clip = tiny_models.build_clip("SD15", te_configs={"clip_l": {}})  # ComfyUI's full CLIP-L
    state = model.model_state_dict()
    keys = sorted(k for k in state if k.endswith((".attn2.to_k.weight", ".attn2.to_v.weight")))

    def concept(seed, token, noun):
        g = torch.Generator().manual_seed(seed)
        tensors = {k[: -len(".weight")] + ".diff": 0.05 * float(state[k].std()) * torch.randn(state[k].shape, generator=g) for k in keys}
        deltas = SpectralShift(tensors, {"svdiff.architecture": "SD15"}, name=noun)
        return comfy_merge.Concept(deltas, token, [f"{token} {noun}", f"a photo of {token} {noun}"])

    concepts = [concept(1, "sks", "cat"), concept(2, "bnp", "dog")]
    captions = comfy_merge.builtin_captions()

    started = time.perf_counter()
    _, _, report = comfy_merge.merge_concepts(model, clip, concepts, captions)
    cold = time.perf_counter() - started
    started = time.perf_counter()
    comfy_merge.merge_concepts(model, clip, concepts, captions)
    warm = time.perf_counter() - started

    reg = comfy_merge.regularization_features(clip, captions)
    targets = torch.cat([comfy_merge.target_features(clip, c) for c in concepts])
    started = time.perf_counter()
    system = merge.build_system(reg, targets)
    for key in keys:
        base = state[key].double()
        merge.merge_layer(system, base, base @ targets.T)
    algebra = time.perf_counter() - started
    started = time.perf_counter()
    comfy_merge.text_features(clip, captions, [1] * len(captions))
    encode = time.perf_counter() - started

    print(header("Closed-form concept merge (`python benchmarks/bench_merge.py`)"))
    print("| SD1.5 shapes: 32 K/V layers, 2 concepts, full CLIP-L | seconds |")
    print("|---|---|")
    print(f"| whole merge, caption features not cached (first merge with this CLIP) | {cold:.1f} |")
    print(f"| whole merge, caption features cached (every later merge) | {warm:.1f} |")
    print(f"| linear algebra alone (factorise + 32 layers) | {algebra:.2f} |")
    print(f"| encoding the {len(captions)} captions alone | {encode:.1f} |")
    print()
    print(
        f"{report.targets} target tokens, {report.regularization_rows} caption tokens, feature width {report.width}; "
        f"residual on targets max {report.target_residual_max:.1e}, change on captions max {report.regularization_change_max:.1e}. "
        f"Goal ≤ 10 s: {'met' if warm <= 10 else 'not met'} with cached features, {'met' if cold <= 10 else 'not met'} on a first merge."
    )


if __name__ == "__main__":
    main()
