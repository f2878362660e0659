"""Training step time and peak memory: SVDiffTrain vs ComfyUI's Train LoRA vs a naive SVDiff.

SD1.5-shaped UNet with random weights, 32×32 latents, batch 1, fp32, this CPU; each
variant runs in its own process (peak resident memory is per process), same data and
noise levels; the median of the measured steps after one warm-up step:

* C — floor: the frozen model's forward + backward to the input, nothing trainable;
* A — ComfyUI's "Train LoRA" path: its own adapters, rank 8 on every weight (and its
  bias/1-D diffs), as its node sets them up;
* B — a naive SVDiff step: every forward rebuilds ``U diag(ReLU(σ+δ)) Vᵀ`` from a kept
  U, σ, V of every layer (what public implementations do);
* S — SVDiffTrain on the full-UNet subset (all 2-D/4-D shifts + 1-D deltas).

Goals (issue 3): S ≤ 2.5× C in step time, ≤ 1.5× C in peak memory.

    python benchmarks/bench_train.py [--steps 3] [--variants C A B S]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from common import header, random_unet, setup_comfy

LATENT = (1, 4, 32, 32)


def batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(LATENT, generator=g), torch.randn(LATENT, generator=g), torch.randn(1, 77, 768, generator=g) * 0.5


def timed_steps(step, steps: int) -> list[float]:
    times = []
    for i in range(steps + 1):  # the first one warms up
        start = time.perf_counter()
        step(i)
        if i:
            times.append(time.perf_counter() - start)
    return times


def optimizer_steps(patcher, optimizer, steps: int) -> list[float]:
    """Timed training steps (forward, MSE, backward, optimizer step) of a fully loaded patcher."""
    import comfy.model_management as mm

    mm.load_models_gpu([patcher], memory_required=1e20, force_full_load=True)
    inner = patcher.model

    def step(i):
        x0, noise, context = batch(i)
        sigma = torch.tensor([float(inner.model_sampling.percent_to_sigma(0.3 + 0.1 * (i % 5)))])
        x_t = inner.model_sampling.noise_scaling(sigma, noise, x0)
        out = inner.apply_model(x_t, sigma, c_crossattn=context)
        ((out - x0) ** 2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()

    return timed_steps(step, steps)


def variant_c(model, steps):
    import comfy.model_management as mm

    from comfyui_svdiff.svdiff.comfy.training.autograd import make_autograd_ready

    make_autograd_ready(model.model)
    mm.load_models_gpu([model], force_full_load=True)
    inner = model.model

    def step(i):
        x0, noise, context = batch(i)
        sigma = torch.tensor([float(inner.model_sampling.percent_to_sigma(0.3 + 0.1 * (i % 5)))])
        x_t = inner.model_sampling.noise_scaling(sigma, noise, x0).requires_grad_(True)
        out = inner.apply_model(x_t, sigma, c_crossattn=context)
        ((out - x0) ** 2).mean().backward()

    return timed_steps(step, steps)


def variant_a(model, steps):
    """ComfyUI's LoRA training setup (comfy_extras/nodes_train.py) on every weight."""
    from comfy_extras.nodes_train import _setup_lora_adapters

    from comfyui_svdiff.svdiff.comfy.training.autograd import make_autograd_ready

    patcher = model.clone()
    make_autograd_ready(patcher.model)
    patcher.model.requires_grad_(False)
    lora_sd, _ = _setup_lora_adapters(patcher, {}, "LoRA", torch.float32, 8)
    return optimizer_steps(patcher, torch.optim.AdamW(lora_sd.values(), lr=1e-4), steps)


class _NaiveSpectral(torch.nn.Module):
    """W' = U diag(ReLU(σ + δ)) Vᵀ rebuilt on every call, U, σ, V kept (reference B)."""

    def __init__(self, weight):
        super().__init__()
        matrix = weight.detach().float().reshape(weight.shape[0], -1)
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        self.u, self.s, self.vh = u, s, vh
        self.delta = torch.nn.Parameter(torch.zeros_like(s))
        self.shape = weight.shape

    def __call__(self, w):
        return ((self.u * torch.relu(self.s + self.delta)) @ self.vh).reshape(self.shape).to(w.dtype)

    def move_to(self, device):
        return 0


def variant_b(model, steps):

    from comfyui_svdiff.svdiff.comfy.training.autograd import make_autograd_ready

    patcher = model.clone()
    make_autograd_ready(patcher.model)
    params = []
    for key, w in patcher.model.state_dict().items():
        if key.startswith("diffusion_model.") and key.endswith(".weight") and w.ndim >= 2:
            module = _NaiveSpectral(w)
            patcher.add_weight_wrapper(key, module)
            params.append(module.delta)
    return optimizer_steps(patcher, torch.optim.AdamW(params, lr=1e-3), steps)


def variant_s(model, steps, checkpointing=False):
    """SVDiffTrain's own loop (svdiff.comfy.training.run.train), full-UNet subset."""
    from comfyui_svdiff.svdiff.comfy.training.examples import Example
    from comfyui_svdiff.svdiff.comfy.training.run import TrainRequest, train
    from comfyui_svdiff.svdiff.training.config import TrainConfig

    x0, _, context = batch(0)
    conditioning = {"": [[context, {}]]}
    stamps = []
    config = TrainConfig(steps=steps + 1, prior_weight=0.0, flip=False, seed=0)
    start = time.perf_counter()

    def on_step(step, loss, snapshot):
        stamps.append(time.perf_counter())

    train(TrainRequest(model, config, [Example(x0, "")], conditioning=conditioning, on_step=on_step, gradient_checkpointing=checkpointing))
    return [b - a for a, b in zip(stamps[:-1], stamps[1:], strict=True)] if len(stamps) > 1 else [stamps[0] - start]


VARIANTS = {"C": variant_c, "A": variant_a, "B": variant_b, "S": variant_s, "S+ckpt": lambda m, s: variant_s(m, s, True)}


def child(name: str, steps: int) -> None:
    setup_comfy()
    from comfyui_svdiff.svdiff.comfy import adapter as weight_adapter

    weight_adapter.register()
    torch.manual_seed(0)
    with torch.inference_mode():  # as in ComfyUI: weights created while a prompt runs
        model = random_unet("SD15", torch.float32)
    baseline_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.inference_mode(False):
        times = VARIANTS[name](model, steps)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"variant": name, "times": times, "peak_kib": peak, "model_kib": baseline_rss}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=["C", "S", "A", "B"])
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.steps)
        return
    print(header("Training step: SVDiffTrain vs ComfyUI Train LoRA vs naive SVDiff (SD1.5 shape, 32×32 latent, fp32)"))
    results = {}
    for name in args.variants:
        run = subprocess.run([sys.executable, __file__, "--child", name, "--steps", str(args.steps)], capture_output=True, text=True)
        line = [x for x in run.stdout.splitlines() if x.startswith("{")]
        if run.returncode or not line:
            print(f"variant {name} failed:\n{run.stderr[-3000:]}")
            continue
        results[name] = json.loads(line[-1])
    floor = results.get("C")
    print("| variant | median s/step | steps measured | peak RSS GiB | vs C time | vs C memory |\n|---|---|---|---|---|---|")
    for name, r in results.items():
        median = statistics.median(r["times"])
        peak = r["peak_kib"] / 2**20
        rel_t = median / statistics.median(floor["times"]) if floor else float("nan")
        rel_m = r["peak_kib"] / floor["peak_kib"] if floor else float("nan")
        print(f"| {name} | {median:.2f} | {len(r['times'])} | {peak:.2f} | {rel_t:.2f}× | {rel_m:.2f}× |")
    print("\nGoals for S: ≤ 2.5× C time, ≤ 1.5× C memory.")


if __name__ == "__main__":
    main()
