"""Subject fidelity, prompt fidelity and language drift on the toy world's base model.

A held-out concept — the heart, a shape the base model never saw — is learned from five
pictures as "sks circle" (the class word "circle", as DreamBooth's "sks dog"), by each
method with the same pictures, the same prior-preservation images (the base model's own
"circle" pictures, λ = 1), the same number of steps and the same seeds. Then, per method,
through ComfyUI's own sampler:

* subject fidelity: share of 40 recontextualised prompts ("a photo of a small blue sks
  circle on the left on a striped background") whose picture the evaluator reads as a heart;
* prompt fidelity: share of those prompts whose colour, background, size and position the
  evaluator reads as asked (mean over the four attributes);
* language drift: share of 24 class prompts ("… circle …") still drawn as circles
  (the base model's own rate is the reference);
* trainable parameters, file size, training time.

The evaluator (devtools/world/evaluator.py) was trained on rendered ground truth only.

    python benchmarks/bench_fidelity.py [--steps 200] [--methods ...] [--grid FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, replace

import torch

from common import ROOT, header, setup_comfy

RECONTEXT = 40
CLASS_PROMPTS = 24
INSTANCES = 5
PRIORS = 20
SEED = 7


@dataclass
class Outcome:
    name: str
    parameters: int
    file_bytes: int
    seconds: float
    subject: float
    prompt: float
    prompt_detail: dict
    class_kept: float
    pictures: list


def evaluate(name, model, clip, vae, judge, parameters, file_bytes) -> Outcome:
    from devtools.world import concepts, evaluator, generate

    recontext = concepts.prompt_scenes(RECONTEXT, 100)
    pictures = generate.generate(
        model, clip, vae, [concepts.concept_caption(s.caption()) for s in recontext], [1000 + i for i in range(RECONTEXT)]
    )
    readings = [evaluator.score(judge, p, s).correct for p, s in zip(pictures, recontext, strict=True)]
    subject = sum(r["shape"] for r in readings) / RECONTEXT
    detail = {k: sum(r[k] for r in readings) / RECONTEXT for k in ("colour", "background", "size", "position")}
    classes = concepts.prompt_scenes(CLASS_PROMPTS, 200, concepts.CLASS_SHAPE)
    class_pictures = generate.generate(model, clip, vae, [s.caption() for s in classes], [2000 + i for i in range(CLASS_PROMPTS)])
    kept = sum(evaluator.score(judge, p, s).correct["shape"] for p, s in zip(class_pictures, classes, strict=True)) / CLASS_PROMPTS
    return Outcome(name, parameters, file_bytes, 0.0, subject, sum(detail.values()) / 4, detail, kept, pictures[:8] + class_pictures[:4])


def svdiff_run(model, clip, instances, priors, steps, **config):
    from comfyui_svdiff.svdiff.comfy.training.run import TrainRequest, train
    from comfyui_svdiff.svdiff.training.config import TrainConfig

    cfg = TrainConfig(steps=steps, seed=SEED, flip=False, **config)
    result = train(TrainRequest(model, cfg, instances, priors, clip=clip, architecture="SD15"))
    return result


def shift_bytes(shift) -> int:
    from comfyui_svdiff.svdiff.fileformat import write_shift

    with tempfile.TemporaryDirectory() as d:
        return os.path.getsize(write_shift(os.path.join(d, "s.safetensors"), shift))


def dreambooth(model, instances, priors, conds, steps, lr, prior_weight):
    """Full fine-tuning of every UNet weight: the same ε-MSE, schedule, pairing with prior
    images and gradient clipping as the SVDiff run, on a copy of the diffusion model."""
    from devtools.world.train_base import sd15_alphas_cumprod

    inner = model.model
    unet = copy.deepcopy(inner.diffusion_model).float().train()
    for p in unet.parameters():
        p.requires_grad_(True)
    params = [p for p in unet.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    alphas = sd15_alphas_cumprod()
    gen = torch.Generator().manual_seed(SEED)
    for _ in range(steps):
        batch = [instances[int(torch.randint(len(instances), (), generator=gen))]]
        weights = [1.0]
        if prior_weight > 0 and priors:
            batch.append(priors[int(torch.randint(len(priors), (), generator=gen))])
            weights.append(prior_weight)
        total = 0.0
        for ex, w in zip(batch, weights, strict=True):
            x0 = inner.process_latent_in(ex.latent)
            t = torch.randint(0, 1000, (1,), generator=gen)
            noise = torch.randn(x0.shape, generator=gen)
            a = alphas[t].view(-1, 1, 1, 1)
            pred = unet(a.sqrt() * x0 + (1 - a).sqrt() * noise, t.float(), conds[ex.caption])
            total = total + w * (pred - noise).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    base = inner.diffusion_model.state_dict()
    deltas = {f"diffusion_model.{k}": ((v.detach() - base[k].float()).to(base[k].dtype),) for k, v in unet.state_dict().items()}
    patched = model.clone()
    patched.add_patches(deltas, 1.0)
    return patched, sum(p.numel() for p in params), sum(d[0].numel() * 2 for d in deltas.values())


def comfy_lora(model, instances, conds, steps, lr, rank):
    """ComfyUI's own Train LoRA node (comfy_extras/nodes_train.py), fp32, on the instance
    pictures and their captions (it has no prior preservation), applied with its Load LoRA
    Model node."""
    from comfy_extras import nodes_train

    latents = [{"samples": torch.cat([ex.latent for ex in instances])}]
    positive = [[[conds[ex.caption], {}]] for ex in instances]
    out = nodes_train.TrainLoraNode.execute(
        model=[model],
        latents=latents,
        positive=positive,
        batch_size=[1],
        steps=[steps],
        grad_accumulation_steps=[1],
        learning_rate=[lr],
        rank=[rank],
        optimizer=["AdamW"],
        loss_function=["MSE"],
        seed=[SEED],
        training_dtype=["fp32"],
        lora_dtype=["fp32"],
        quantized_backward=[False],
        algorithm=["LoRA"],
        gradient_checkpointing=[False],
        checkpoint_depth=[1],
        offloading=[False],
        existing_lora=["[None]"],
        bucket_mode=[False],
        bypass_mode=[False],
    )
    lora = out.result[0]
    patched = nodes_train.LoraModelLoader.execute(model, lora, 1.0).result[0]
    values = sum(t.numel() for t in lora.values())
    return patched, values, values * 2


def arithmetic(model, clip, vae, judge, instances_for, steps, lr):
    """Interpolate between two shifts learned under the same name: (1-α)·heart + α·diamond,
    each trained as "sks circle"; the evaluator's mean shape probabilities per α."""
    from comfyui_svdiff.svdiff.comfy.patching import apply_shift
    from comfyui_svdiff.svdiff.shift import combine
    from devtools.world import concepts, evaluator, generate

    shifts = {
        shape: svdiff_run(model, clip, instances_for(shape), [], steps, lr_spectral=lr, prior_weight=0.0).shift
        for shape in ("heart", "diamond")
    }
    asked = concepts.prompt_scenes(16, 400)
    prompts = [concepts.concept_caption(s.caption()) for s in asked]
    rows = []
    for alpha in (0.0, 0.25, 0.5, 0.75, 1.0):
        mixed = combine(shifts["heart"], 1 - alpha, shifts["diamond"], alpha)
        m, c, _ = apply_shift(model, clip, mixed, 1.0, 1.0)
        pictures = generate.generate(m, c, vae, prompts, [3000 + i for i in range(16)])
        with torch.no_grad():
            probs = judge(evaluator.to_tensor(pictures))["shape"].softmax(-1).mean(0)
        names = list(evaluator.ATTRIBUTES["shape"])
        rows.append((alpha, float(probs[names.index("heart")]), float(probs[names.index("diamond")]), pictures[:6]))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument(
        "--methods",
        nargs="*",
        default=["base", "svdiff", "svdiff_te", "svdiff_kv", "svdiff_noprior", "dreambooth", "dreambooth_noprior"],
    )
    parser.add_argument("--lr-svdiff", type=float, default=1e-3)
    parser.add_argument("--lr-dreambooth", type=float, default=5e-6)
    parser.add_argument("--lr-lora", type=float, default=5e-4)
    parser.add_argument("--grid", default=str(ROOT / "benchmarks" / "fidelity_grid.png"))
    parser.add_argument("--json")
    parser.add_argument("--arithmetic", action="store_true", help="also interpolate a heart shift into a diamond shift")
    args = parser.parse_args()
    setup_comfy()
    torch.manual_seed(0)
    import comfy.model_management

    from comfyui_svdiff.svdiff.comfy.patching import apply_shift
    from comfyui_svdiff.svdiff.comfy.training.examples import Example
    from devtools.world import base, concepts, evaluator, generate, render
    from devtools.world.scenes import Scene

    model, clip, vae = generate.load(base.world_checkpoint())
    judge = evaluator.load()
    instance_scenes = concepts.instance_scenes(INSTANCES, SEED)
    pixels = torch.stack([evaluator.to_tensor([render(s, base.IMAGE_SIZE, seed=300 + i)])[0] for i, s in enumerate(instance_scenes)])
    with torch.no_grad():
        latents = vae.encode(pixels.permute(0, 2, 3, 1))
    instances = [Example(latents[i : i + 1], concepts.concept_caption(s.caption())) for i, s in enumerate(instance_scenes)]
    prior_scenes = concepts.prompt_scenes(PRIORS, 300, concepts.CLASS_SHAPE)
    prior_latents = generate.sample_latents(model, clip, [s.caption() for s in prior_scenes], [5000 + i for i in range(PRIORS)])
    priors = [Example(x, s.caption()) for x, s in zip(prior_latents, prior_scenes, strict=True)]
    conds = {}  # caption -> text-encoder output, for the loops that do not go through TrainRequest
    for ex in instances + priors:  # plain tensors (not inference-mode ones) for autograd
        ex.latent = ex.latent.detach().clone()
        conds[ex.caption] = generate.encode(clip, ex.caption)[0][0].detach().clone()

    outcomes: list[Outcome] = []
    labels = {
        "svdiff": "SVDiff (UNet)",
        "svdiff_te": "SVDiff (UNet + text encoder)",
        "svdiff_kv": "SVDiff (cross-attn K/V only)",
        "svdiff_noprior": "SVDiff (UNet), no prior",
        "dreambooth": "DreamBooth (all UNet weights)",
        "dreambooth_noprior": "DreamBooth (all UNet weights), no prior",
        "lora4": "LoRA rank 4 (ComfyUI Train LoRA), no prior",
        "lora16": "LoRA rank 16 (ComfyUI Train LoRA), no prior",
    }
    for token in args.methods:
        method, _, lr_text = token.partition("@")
        comfy.model_management.unload_all_models()
        started = time.perf_counter()
        if method == "base":
            outcomes.append(evaluate("base model (no training)", model, clip, vae, judge, 0, 0))
            continue
        if method not in labels:
            raise SystemExit(f"unknown method {method}; use one of base, {', '.join(labels)} (optionally @learning_rate)")
        try:
            prior_weight = 0.0 if method.endswith("noprior") else 1.0
            if method.startswith("svdiff"):
                lr = float(lr_text or args.lr_svdiff)
                kwargs = {"lr_spectral": lr, "lr_text": lr, "prior_weight": prior_weight}
                if method == "svdiff_te":
                    kwargs["train_text_encoder"] = True
                if method == "svdiff_kv":
                    kwargs["subset"] = "UNet-CA-KV"
                result = svdiff_run(model, clip, instances, priors if prior_weight else [], args.steps, **kwargs)
                elapsed = time.perf_counter() - started
                new_model, new_clip, _ = apply_shift(model, clip, result.shift, 1.0, 1.0)
                out = evaluate(
                    f"{labels[method]}, lr {lr:g}", new_model, new_clip, vae, judge, result.parameters, shift_bytes(result.shift)
                )
            elif method.startswith("lora"):
                lr = float(lr_text or args.lr_lora)
                patched, n, nbytes = comfy_lora(model, instances, conds, args.steps, lr, int(method[4:]))
                elapsed = time.perf_counter() - started
                out = evaluate(f"{labels[method]}, lr {lr:g}", patched, clip, vae, judge, n, nbytes)
            else:
                lr = float(lr_text or args.lr_dreambooth)
                patched, n, nbytes = dreambooth(model, instances, priors, conds, args.steps, lr, prior_weight)
                elapsed = time.perf_counter() - started
                out = evaluate(f"{labels[method]}, lr {lr:g}", patched, clip, vae, judge, n, nbytes)
        except Exception as exc:  # one method failing must not lose the others' rows
            print(f"{token} failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            import traceback

            traceback.print_exc()
            continue
        out.seconds = elapsed
        outcomes.append(out)
        o = outcomes[-1]
        print(
            f"{o.name}: subject {o.subject:.2f} prompt {o.prompt:.2f} class kept {o.class_kept:.2f} ({o.seconds:.0f} s)",
            file=sys.stderr,
            flush=True,
        )

    print(header("Subject fidelity, prompt fidelity and drift on the toy world (bench_fidelity.py)"))
    print(
        f'Concept: the held-out heart as "sks circle", {INSTANCES} pictures, {args.steps} steps, batch 1 + 1 prior picture '
        f'(λ = 1, {PRIORS} base-model "circle" pictures), seeds fixed; {RECONTEXT} recontextualised prompts, '
        f"{CLASS_PROMPTS} class prompts; euler 20 steps, CFG 5; each row names its learning rate.\n"
    )
    print(
        "| method | subject fidelity | prompt fidelity (colour / background / size / position) | class prompts still circles | trainable parameters | file | training |"
    )
    print("|---|---|---|---|---|---|---|")
    for o in outcomes:
        d = o.prompt_detail
        size = f"{o.file_bytes / 1024:.0f} KB" if o.file_bytes < 2**20 else f"{o.file_bytes / 2**20:.1f} MB"
        print(
            f"| {o.name} | {o.subject:.2f} | {o.prompt:.2f} ({d['colour']:.2f} / {d['background']:.2f} / {d['size']:.2f} / {d['position']:.2f}) "
            f"| {o.class_kept:.2f} | {o.parameters:,} | {size if o.file_bytes else '—'} | {o.seconds:.0f} s |"
        )
    if args.grid:
        rows = [generate.grid(o.pictures, columns=12, scale=1) for o in outcomes]
        from PIL import Image

        sheet = Image.new("RGB", (rows[0].width, sum(r.height for r in rows)))
        y = 0
        for r in rows:
            sheet.paste(r, (0, y))
            y += r.height
        sheet.resize((sheet.width * 2, sheet.height * 2), Image.NEAREST).save(args.grid)
        print(
            f"\nGrid: `{os.path.relpath(args.grid, ROOT)}` — one row per method in the table's order; 8 recontextualised prompts, then 4 class prompts."
        )
    if args.arithmetic:

        def instances_for(shape):
            scenes = [Scene((replace(s.things[0], shape=shape),), s.background) for s in instance_scenes]
            px = torch.stack([evaluator.to_tensor([render(s, base.IMAGE_SIZE, seed=300 + i)])[0] for i, s in enumerate(scenes)])
            with torch.no_grad():
                lat = vae.encode(px.permute(0, 2, 3, 1))
            return [
                Example(lat[i : i + 1].clone(), concepts.concept_caption(s.caption().replace(shape, "heart"))) for i, s in enumerate(scenes)
            ]

        comfy.model_management.unload_all_models()
        rows = arithmetic(model, clip, vae, judge, instances_for, args.steps, args.lr_svdiff)
        print("\n### Spectral-shift interpolation\n")
        print(
            f"Two SVDiff (UNet) shifts, {args.steps} steps, lr {args.lr_svdiff:g}, no prior, each trained on 5 pictures named "
            '"sks circle": a red heart and a red diamond (same sizes, positions, backgrounds). '
            "`combine(heart, 1-α, diamond, α)`, 16 recontextualised prompts per α, same seeds; the evaluator's mean "
            "probability of each shape.\n"
        )
        print("| α | P(heart) | P(diamond) |\n|---|---|---|")
        for alpha, heart, diamond, _ in rows:
            print(f"| {alpha:.2f} | {heart:.2f} | {diamond:.2f} |")
        if args.grid:
            from PIL import Image

            strips = [generate.grid(r[3], columns=6, scale=1) for r in rows]
            sheet = Image.new("RGB", (strips[0].width, sum(x.height for x in strips)))
            for i, x in enumerate(strips):
                sheet.paste(x, (0, i * x.height))
            path = os.path.join(os.path.dirname(args.grid), "interpolation_grid.png")
            sheet.resize((sheet.width * 2, sheet.height * 2), Image.NEAREST).save(path)
            print(f"\nGrid: `{os.path.relpath(path, ROOT)}` — one row per α (0 at the top), same six prompts and seeds.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{k: v for k, v in o.__dict__.items() if k != "pictures"} for o in outcomes], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
