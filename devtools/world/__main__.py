"""Train the toy world's evaluator and report its accuracy on fresh scenes.

    python -m devtools.world [--steps N] [--out FILE]

Writes devtools/world/evaluator.safetensors (fp16, ~0.5 MB) with the accuracies in its
metadata. Deterministic for a given seed and torch build; about 20 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from pathlib import Path

import torch

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=evaluator.WEIGHTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    started = time.perf_counter()

    def progress(step, total, loss):
        if step % 100 == 0 or step == total:
            log.info("step %d/%d  loss %.3f  %.0f s", step, total, loss, time.perf_counter() - started)

    model = evaluator.train(steps=args.steps, progress=progress)
    table = accuracy(model)
    for name, value in table.items():
        log.info("%-18s %.3f", name, value)
    evaluator.save(model, args.out, {"world.accuracy": json.dumps(table), "world.steps": str(args.steps)})
    log.info("wrote %s in %.0f s", args.out, time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
