"""DDIM inversion quality: invert, sample back with the same prompt and η = 0, report the
relative latent error (VAE space) for ε-, v-prediction, SDXL and flow tiny models.

Two kinds of latent: a VAE-encoded picture (``tiny_models.encoded_picture``, 128² →
16², through a tiny VAE) and unit-variance noise in model space. Three settings: plain
DDIM inversion (the paper's; ``refine_iterations`` 0), a fixed 3 refinements per step,
and the node's default (refinement until the tolerance, at most 50 per step). The
tiny models are made smooth in time with a damped output layer
(``tiny_models.smooth_in_time_``, output scale 0.2 and, for comparison, 0.3), as the
tests do: random weights are far rougher than a trained denoiser.

    python benchmarks/bench_inversion.py [SD15 SD21v SDXL Flux]
"""

from __future__ import annotations

import sys
import time

from common import header, setup_comfy

LABELS = {"SD15": "SD1.5 (ε)", "SD21v": "SD2.1 (v)", "SDXL": "SDXL (ε)", "Flux": "Flux (flow)"}
SCALES = {"SD15": 0.18215, "SD21v": 0.18215, "SDXL": 0.13025, "Flux": 0.3611}


def main() -> None:
    setup_comfy()
    import comfy.samplers
    import torch

    from comfyui_svdiff.nodes.editing import DEFAULT_REFINE_CAP
    from comfyui_svdiff.svdiff import editing
    from comfyui_svdiff.svdiff.comfy import editing as comfy_editing
    from devtools import tiny_models

    archs = sys.argv[1:] or list(LABELS)
    print(header("DDIM inversion: reconstruction error at 50 steps (relative, VAE-space latent)"))
    print(
        f"Default: refinement until a step's update is ≤ {editing.DEFAULT_TOLERANCE:g} relative, at most {DEFAULT_REFINE_CAP} per step.\n"
    )
    print("| model | smoothing | latent | plain | refine 3 | default | model calls (default) | seconds (default) |")
    print("|---|---|---|---|---|---|---|---|")
    for arch in archs:
        for output_scale in (0.2, 0.3):
            model, clip = tiny_models.build_model(arch, seed=0)
            tiny_models.smooth_in_time_(model, output_scale=output_scale)
            positive = tiny_models.encode_prompt(clip, "photo of a crown with a blue diamond")
            c = tiny_models.latent_channels(arch)
            latents = {
                "encoded picture": tiny_models.encoded_picture(arch),
                "unit noise": {"samples": torch.randn(1, c, 16, 16, generator=torch.Generator().manual_seed(1)) / SCALES[arch]},
            }
            scheduler = "simple" if arch == "Flux" else "normal"
            sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, 50)
            for kind, latent in latents.items():
                row = []
                for refine in (0, 3, DEFAULT_REFINE_CAP):
                    start = time.perf_counter()
                    out, inverted = comfy_editing.round_trip(model, positive, latent, sigmas, refine)
                    seconds = time.perf_counter() - start
                    error = float((out - latent["samples"]).norm() / latent["samples"].norm())
                    row.append((error, inverted.model_calls, seconds))
                errors = " | ".join(f"{e * 100:.3g} %" for e, _, _ in row)
                print(f"| {LABELS[arch]} | {output_scale} | {kind} | {errors} | {row[2][1]} | {row[2][2]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
