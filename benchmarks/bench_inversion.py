"""DDIM inversion quality: invert, reconstruct with the same prompt and η = 0, report the
relative latent error for ε-, v-prediction and flow tiny models, by steps and by
fixed-point refinement iterations (issue: "≤ 0.5 % at 50 steps on a tiny eps model").

The tiny models are made smooth in time with a damped output layer
(tests/support/tiny_models.smooth_in_time_), as the tests do: random weights are far
rougher than a trained denoiser. Run: python benchmarks/bench_inversion.py
"""

from __future__ import annotations

import sys
import time

from common import header, setup_comfy


def main() -> None:
    setup_comfy()
    import comfy.samplers
    import torch

    from comfyui_svdiff.svdiff import comfy_editing
    from support import tiny_models

    scales = {"SD15": 0.18215, "SD21v": 0.18215, "Flux": 0.3611}
    schedulers = {"SD15": "normal", "SD21v": "normal", "Flux": "simple"}
    archs = sys.argv[1:] or ["SD15", "SD21v", "Flux"]
    print(header("DDIM inversion: reconstruction error (relative, VAE-space latent)"))
    print("| model | steps | refine 0 | refine 1 | refine 3 | model calls (refine 3) | seconds (refine 3) |")
    print("|---|---|---|---|---|---|---|")
    for arch in archs:
        model, clip = tiny_models.build_model(arch, seed=0)
        tiny_models.smooth_in_time_(model, output_scale=0.3)
        positive = tiny_models.encode_prompt(clip, "photo of a crown with a blue diamond")
        c = tiny_models.latent_channels(arch)
        latent = {"samples": torch.randn(1, c, 8, 8, generator=torch.Generator().manual_seed(1)) / scales[arch]}
        sampling = model.get_model_object("model_sampling")
        for steps in (10, 25, 50, 100):
            sigmas = comfy.samplers.calculate_sigmas(sampling, schedulers[arch], steps)
            row = []
            for refine in (0, 1, 3):
                start = time.perf_counter()
                out, inverted = comfy_editing.round_trip(model, positive, latent, sigmas, refine)
                seconds = time.perf_counter() - start
                row.append((float((out - latent["samples"]).norm() / latent["samples"].norm()), inverted.model_calls, seconds))
            label = {"SD15": "SD1.5 (ε)", "SD21v": "SD2.1 (v)", "Flux": "Flux (flow)"}[arch]
            errors = " | ".join(f"{e * 100:.3g} %" for e, _, _ in row)
            print(f"| {label} | {steps} | {errors} | {row[2][1]} | {row[2][2]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
