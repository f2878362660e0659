"""Cold decomposition of every 2-D/4-D UNet weight: ours vs plain per-layer SVD.

Goal (issue 2): total time ≤ 0.25× of ``torch.linalg.svd(W, full_matrices=False)`` in
float32 over every 2-D / 4-D weight of an SD1.5- and an SDXL-shaped UNet.

Random N(0, 1/fan_in) weights per unique shape; each unique shape is timed (median of
repeats, after a warm-up) and multiplied by how often it occurs. Both methods see the
same tensors in the same process. Also reports the accuracy of our σ against the
float32 SVD's, and the cache size (bytes kept per weight).

    python benchmarks/bench_decompose.py [--arch SD15 SDXL] [--repeat 3]
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch

from common import header, setup_comfy, timed, unet_state_shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=["SD15", "SDXL"])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    setup_comfy()
    from comfyui_svdiff.svdiff.spectral import as_matrix, decompose

    print(header("Cold decomposition vs per-layer torch.linalg.svd (float32)"))
    for arch in args.arch:
        shapes = [s for s in unet_state_shapes(arch).values() if len(s) >= 2]
        counts = Counter(shapes)
        total_ours = total_svd = 0.0
        cache_bytes = weight_bytes = 0
        worst_sigma = 0.0
        rows = []
        g = torch.Generator().manual_seed(0)
        for shape, count in sorted(counts.items(), key=lambda kv: -kv[1] * as_matrix(torch.empty(kv[0], device="meta")).numel()):
            w = torch.randn(shape, generator=g) / (torch.tensor(shape[1:]).prod().item() ** 0.5)
            big = as_matrix(w).numel() > 4_000_000
            repeat = 1 if big else args.repeat
            t_ours = timed(lambda w=w: decompose(w), repeat=repeat, warmup=0 if big else 1)
            t_svd = timed(lambda w=w: torch.linalg.svd(as_matrix(w), full_matrices=False), repeat=repeat, warmup=0 if big else 1)
            d = decompose(w)
            s_ref = torch.linalg.svdvals(as_matrix(w).double())
            worst_sigma = max(worst_sigma, float(((d.sigma - s_ref).abs() / s_ref[0]).max()))
            total_ours += count * t_ours
            total_svd += count * t_svd
            cache_bytes += count * d.nbytes()
            weight_bytes += count * w.numel() * 2  # fp16 checkpoint
            rows.append((shape, count, t_ours, t_svd))
        print(f"### {arch}: {sum(counts.values())} weights, {len(counts)} distinct shapes\n")
        print("| shape | count | ours (s) | svd (s) | ratio |\n|---|---|---|---|---|")
        for shape, count, t_ours, t_svd in rows[:12]:
            print(f"| {'×'.join(map(str, shape))} | {count} | {t_ours:.4f} | {t_svd:.4f} | {t_ours / t_svd:.3f} |")
        print(f"| … {len(rows) - 12} more shapes | | | | |" if len(rows) > 12 else "")
        print(
            f"\n**{arch} total: ours {total_ours:.1f} s, svd {total_svd:.1f} s, ratio {total_ours / total_svd:.3f}** "
            f"(goal ≤ 0.25). Max |σ − σ_svd64| / σ_max = {worst_sigma:.1e}. "
            f"Cache: {cache_bytes / 2**20:,.0f} MiB fp32 for {weight_bytes / 2**20:,.0f} MiB of fp16 weights.\n"
        )


if __name__ == "__main__":
    main()
