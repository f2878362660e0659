"""Patch vs bypass mode: one sample on a full-size SD1.5-shaped UNet, side by side.

Issue 15: "measure one 20-step sample at 512² on the SD1.5-shaped UNet, patch vs
bypass". A full-UNet shift (every 2-D/4-D weight, 1-D deltas of the norms) is applied
in each mode to the same random-weight UNet; each run is the node's work (apply, warm
decomposition cache) plus ComfyUI loading the model (where patch mode computes W + ΔW)
plus the sampler (euler, CFG 7: a batch of two per step, 64 × 64 latent). The base
model without a shift is sampled the same way as the reference, and the outputs of the
two modes are compared.

    python benchmarks/bench_bypass.py [--steps 20] [--size 512]
"""

from __future__ import annotations

import argparse
import time

import torch
from bench_patch import full_unet_shift

from common import header, random_unet, setup_comfy


def sample(model, steps: int, size: int, seed: int = 0) -> tuple[torch.Tensor, float, float]:
    """(latent, seconds to load the model, seconds to sample): ComfyUI's KSampler path."""
    import comfy.model_management as mm
    import comfy.sample

    mm.unload_all_models()
    g = torch.Generator().manual_seed(1)
    positive = [[torch.randn(1, 77, 768, generator=g), {}]]
    negative = [[torch.randn(1, 77, 768, generator=g), {}]]
    latent = torch.zeros(1, 4, size // 8, size // 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    start = time.perf_counter()
    mm.load_models_gpu([model])
    loaded = time.perf_counter() - start
    start = time.perf_counter()
    out = comfy.sample.sample(model, noise, steps, 7.0, "euler", "normal", positive, negative, latent, seed=seed, disable_pbar=True)
    sampled = time.perf_counter() - start
    mm.unload_all_models()
    return out, loaded, sampled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()
    setup_comfy()
    from comfyui_svdiff.svdiff.comfy import adapter as weight_adapter
    from comfyui_svdiff.svdiff.comfy import bypass
    from comfyui_svdiff.svdiff.comfy.patching import apply_shift

    weight_adapter.register()
    print(header(f"Patch vs bypass: one {args.steps}-step sample at {args.size}² on a full-size SD1.5-shaped UNet (fp32, CPU)"))
    model = random_unet("SD15", torch.float32)
    shift = full_unet_shift(model)
    apply_shift(model, None, shift, 1.0, 0.0)  # fill the decomposition cache: both modes start warm

    base, base_load, base_sample = sample(model, args.steps, args.size)
    rows = {}
    outputs = {}
    for mode in ("patch", "bypass"):
        start = time.perf_counter()
        patched, _, report = apply_shift(model, None, shift, 1.0, 0.0, mode=mode)
        applied = time.perf_counter() - start
        outputs[mode], loaded, sampled = sample(patched, args.steps, args.size)
        rows[mode] = (applied, loaded, sampled, report.model_layers)
        del patched

    # The factors bypass mode builds on the compute device on the first forward and keeps
    # while the model is loaded (freed when ComfyUI unloads it), as its adapters build them.
    import comfy.utils

    bypassed, _, _ = apply_shift(model, None, shift, 1.0, 0.0, mode="bypass")
    held = 0
    like = torch.empty(0)
    for param, adapter in bypass.bypass_injection(bypassed).adapters.items():
        module = comfy.utils.get_attr(model.model, param.rsplit(".", 1)[0])
        held += adapter._form(bypass.Layer(module, module.forward), like).nbytes()
        adapter.release_device_copies()
    weights = sum(p.numel() * p.element_size() for p in model.model.diffusion_model.parameters())

    effect = float((outputs["patch"] - base).norm() / base.norm())
    agreement = float((outputs["bypass"] - outputs["patch"]).norm() / (outputs["patch"] - base).norm())
    print("| run | apply (s) | load model (s) | sample (s) | total (s) | vs base sample |")
    print("|---|---|---|---|---|---|")
    base_total = base_load + base_sample
    print(f"| base model, no shift | – | {base_load:.1f} | {base_sample:.1f} | {base_total:.1f} | 1.00× |")
    totals = {}
    for mode, (applied, loaded, sampled, layers) in rows.items():
        totals[mode] = applied + loaded + sampled
        print(
            f"| {mode} mode ({layers} layers) | {applied:.2f} | {loaded:.1f} | {sampled:.1f} | {totals[mode]:.1f} | "
            f"{totals[mode] / base_total:.2f}× |"
        )
    # Bypass against patch mode's own sampling (both models carry the shift; the base run
    # shows the machine's run-to-run spread).
    per_step = (rows["bypass"][2] - rows["patch"][2]) / args.steps
    patch_once = rows["patch"][1] - base_load
    crossover = patch_once / per_step if per_step > 0 else float("inf")
    print(
        f"\nbypass / patch, whole run: **{totals['bypass'] / totals['patch']:.2f}×**. Patch mode pays "
        f"{patch_once:.1f} s once (W + ΔW for every weight when the model loads); bypass pays {per_step:.2f} s per step "
        f"more than patch mode's sampling (the corrections of {args.size // 8}² × 2 latent tokens per layer), so bypass is "
        f"faster below ≈ {crossover:.0f} steps for this size and batch. Bypass holds {held / 2**20:,.0f} MiB of factors while loaded "
        f"({held / weights:.0%} of the UNet's {weights / 2**20:,.0f} MiB of weights). "
        f"Outputs: the shift moves the sample by {effect:.1%} of its norm; bypass and patch differ by "
        f"{agreement:.1e} of that change.\n"
    )


if __name__ == "__main__":
    main()
