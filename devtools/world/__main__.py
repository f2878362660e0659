"""The toy world's command line.

    python -m devtools.world evaluator [--steps N]   # train the evaluator (~20 min)
    python -m devtools.world base [--unet-steps N]   # train the base model (< 60 min, 2 cores)
    python -m devtools.world report [--count N]      # prompt following of the base model
    python -m devtools.world demo                    # the demo files the workflows use (~10 min)

``evaluator`` writes devtools/world/evaluator.safetensors, ``base`` writes
base_unet.int8.safetensors and base_vae.safetensors (the metadata holds the settings and
the measurements). ``report`` assembles the checkpoint (cached), samples it through
ComfyUI's own loader and sampler, and prints the evaluator's accuracy per attribute.
Deterministic for a given seed and torch build.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from pathlib import Path

from . import evaluator
from .render import render
from .scenes import evaluator_scene

log = logging.getLogger("svdiff.world")


def accuracy(model: evaluator.Evaluator, count: int = 400, seed: int = 10_000) -> dict[str, float]:
    """Share of fresh scenes (seeds the training never drew) read correctly, per attribute."""
    rng = random.Random(seed)
    hits: dict[str, list[bool]] = {}
    for i in range(count):
        scene = evaluator_scene(rng)
        reading = evaluator.score(model, render(scene, evaluator.SIZE, seed=seed + i), scene)
        for name, ok in reading.correct.items():
            key = name.split(".")[-1] if "." in name else name
            hits.setdefault(("pair " if "." in name else "") + key, []).append(ok)
    return {name: sum(values) / len(values) for name, values in sorted(hits.items())}


def _progress(started):
    def progress(phase, step, total, loss):
        if step % 100 == 0 or step == total:
            log.info("%s step %d/%d  loss %.4f  %.0f s", phase, step, total, loss, time.perf_counter() - started)

    return progress


def cmd_evaluator(args) -> int:
    started = time.perf_counter()
    model = evaluator.train(steps=args.steps, progress=lambda s, t, loss: _progress(started)("evaluator", s, t, loss))
    table = accuracy(model)
    for name, value in table.items():
        log.info("%-18s %.3f", name, value)
    evaluator.save(model, args.out, {"world.accuracy": json.dumps(table), "world.steps": str(args.steps)})
    log.info("wrote %s in %.0f s", args.out, time.perf_counter() - started)
    return 0


def cmd_base(args) -> int:
    from . import train_base

    started = time.perf_counter()
    train_base.build(unet_steps=args.unet_steps, vae_steps=args.vae_steps, scenes=args.scenes, progress=_progress(started))
    return 0


def cmd_report(args) -> int:
    from ..tiny_models.cpu import prepare_comfy_cpu
    from . import generate

    prepare_comfy_cpu()
    started = time.perf_counter()
    model, clip, vae = generate.load()
    results = {}
    for label, two, count in (("one object", 0.0, args.count), ("two objects", 1.0, args.count // 2)):
        scenes = generate.prompt_scenes(count, seed=args.seed, two_objects=two)
        acc = generate.prompt_accuracy(model, clip, vae, scenes, seed=args.seed, cfg=args.cfg)
        results[label] = {"prompts": acc.count, "all correct": acc.all_correct, **acc.per_attribute}
        log.info("%s (%d prompts): %s", label, acc.count, json.dumps({k: round(v, 3) for k, v in acc.per_attribute.items()}))
        if args.grid:
            path = Path(args.grid).with_name(Path(args.grid).stem + ("_pairs" if two else "") + ".png")
            generate.grid(acc.pictures[:40]).save(path)
            log.info("wrote %s", path)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    log.info("report in %.0f s", time.perf_counter() - started)
    return 0


def cmd_demo(args) -> int:
    from . import build_demo

    report = build_demo.build(only_shifts=args.only_shifts)
    for name, value in report.items():
        log.info("%-50s %s", name, value)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("evaluator", help="train the evaluator")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--out", type=Path, default=evaluator.WEIGHTS)
    p.set_defaults(run=cmd_evaluator)
    p = sub.add_parser("base", help="train the base model")
    p.add_argument("--unet-steps", type=int, default=2400)
    p.add_argument("--vae-steps", type=int, default=1200)
    p.add_argument("--scenes", type=int, default=16000)
    p.set_defaults(run=cmd_base)
    p = sub.add_parser("report", help="measure how well the base model follows prompts")
    p.add_argument("--count", type=int, default=200)
    p.add_argument("--seed", type=int, default=50_000)
    p.add_argument("--cfg", type=float, default=5.0)
    p.add_argument("--grid", help="save a picture grid here (PNG)")
    p.add_argument("--json", help="save the table here")
    p.set_defaults(run=cmd_report)
    p = sub.add_parser("demo", help="train the demo files (shifts, LoRA, K/V deltas) on the world model")
    p.add_argument("--only-shifts", action="store_true", help="retrain the two spectral shifts only")
    p.set_defaults(run=cmd_demo)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
