"""Two similar held-out subjects trained together: without Cut-Mix-Unmix, with it, and with the unmix regulariser.

    python benchmarks/bench_multisubject.py [--steps 600] [--weights 10 100 1000] [--prompts 24]

On the toy world's base model (``devtools/world``), the heart ("sks circle") and the diamond
("zwx square"), 5 pictures each (the demo folders), one shift per row, every row trained
through the extension's own nodes (Training Images from Folder, Cut-Mix-Unmix Dataset,
Attention Regularization, Train Spectral Shift) with the same steps, learning rate and seed:

* **joint, no Cut-Mix-Unmix**: one folder holding both subjects' pictures, each with its own caption;
* **Cut-Mix-Unmix** (p = 0.6, left/right halves), unmix weight 0;
* **Cut-Mix-Unmix + unmix** at each ``--weights`` value (eq. 10).

Each shift is asked for both subjects in one picture, "a photo of a red sks circle on the
left and a red zwx square on the right, on a <background> background", and the mirrored
prompt, over fixed seeds; the evaluator (trained on rendered ground truth only) reads each
half. **Both right**: the left half shows the subject asked for on the left and the right
half the one asked for on the right. **Leak**: a half shows the other subject (the two
mixed up or drawn twice). Not part of the test run; results go to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, header

SHAPES = {"sks circle": "heart", "zwx square": "diamond"}
BACKGROUNDS = ("dark", "light", "gradient", "striped")


def train_inputs(steps: int, lr: float, prefix: str) -> dict:
    from devtools.world import build_demo

    inputs = build_demo.shift_inputs("", "", prefix)
    inputs.update(steps=steps, learning_rate=lr, prior_weight=0.0, num_class_images=0, class_prompt="")
    return inputs


def cut_mix(prompt: dict, collages: int) -> None:
    prompt["4"] = {
        "class_type": "SVDiffCutMixUnmix",
        "inputs": {
            "phrases": "sks circle\nzwx square",
            "probability": 0.6,
            "layout": "left_right",
            "split_min": 0.5,
            "split_max": 0.5,
            "prompt_templates": "a photo of a red {left} on the left and a red {right} on the right, on a dark background",
            "collages": collages,
            "random_flip": False,
            "seed": 0,
            "subject_1": ["2", 0],
            "subject_2": ["3", 0],
        },
    }


def row_prompt(kind: str, weight: float, steps: int, lr: float, collages: int, prefix: str) -> dict:
    from devtools.world import build_demo

    prompt = {"1": build_demo.loader()}
    train = {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], **train_inputs(steps, lr, prefix)}
    if kind == "joint":
        prompt["2"] = build_demo.dataset("both_subjects", "sks circle")
        prompt["2"]["inputs"]["trigger_word"] = ""  # two subjects' captions, two trigger words
        train["dataset"] = ["2", 0]
    else:
        prompt["2"] = build_demo.dataset("demo_sks_circle", "sks circle")
        prompt["3"] = build_demo.dataset("demo_zwx_square", "zwx square")
        cut_mix(prompt, collages)
        train["dataset"] = ["4", 0]
        if weight > 0:
            prompt["5"] = {
                "class_type": "SVDiffAttentionRegularization",
                "inputs": {"unmix_weight": weight, "subject_weight": 0.0, "threshold": 0.5, "class_word": ""},
            }
            train["attention"] = ["5", 0]
    prompt["6"] = {"class_type": "SVDiffTrain", "inputs": train}
    return prompt


def pair_prompts(count: int) -> list[tuple[str, str, str, str]]:
    """(prompt, left subject, right subject, background), half of them mirrored."""
    out = []
    for i in range(count):
        left, right = ("sks circle", "zwx square") if i % 2 == 0 else ("zwx square", "sks circle")
        bg = BACKGROUNDS[(i // 2) % len(BACKGROUNDS)]
        out.append((f"a photo of a red {left} on the left and a red {right} on the right, on a {bg} background", left, right, bg))
    return out


def measure(model, clip, vae, judge, prompts, seed: int = 4000) -> dict:
    from devtools.world import evaluator, generate

    pictures = generate.generate(model, clip, vae, [p[0] for p in prompts], [seed + i for i in range(len(prompts))])
    both = leak = 0
    for picture, (_, left, right, _) in zip(pictures, prompts, strict=True):
        halves = evaluator.predict(judge, [evaluator.half(picture, "left"), evaluator.half(picture, "right")])["shape"]
        both += halves[0] == SHAPES[left] and halves[1] == SHAPES[right]
        leak += halves[0] == SHAPES[right] or halves[1] == SHAPES[left]
    return {"both right": both / len(prompts), "leak": leak / len(prompts), "pictures": pictures}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--weights", type=float, nargs="*", default=[10.0, 100.0, 1000.0])
    parser.add_argument("--collages", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--grid", default=str(ROOT / "benchmarks" / "multisubject_grid.png"))
    parser.add_argument("--json")
    args = parser.parse_args()
    print(header("Two subjects on the toy world (bench_multisubject.py)"), flush=True)

    from devtools.extension import import_extension
    from devtools.harness import setup_comfyui
    from devtools.world import base, demo_files, evaluator, generate

    work = Path(tempfile.mkdtemp(prefix="svdiff-multi-"))
    handle = setup_comfyui(base_dir=work / "comfyui")
    handle.register_module(import_extension())
    from comfyui_svdiff.svdiff.comfy.patching import apply_shift
    from comfyui_svdiff.svdiff.fileformat import read_shift

    checkpoint = base.world_checkpoint()
    (handle.model_dir("checkpoints") / checkpoint.name).symlink_to(checkpoint)
    items = []
    for folder in demo_files.SUBJECTS:
        demo_files.write_subject_folder(handle.input_dir / folder)
        items += demo_files.subject_pictures(folder)
    demo_files.write_folder(handle.input_dir / "both_subjects", items)

    model, clip, vae = generate.load(checkpoint)
    judge = evaluator.load()
    prompts = pair_prompts(args.prompts)
    rows = [("base model (no training)", None)]
    rows += [("joint, no Cut-Mix-Unmix", ("joint", 0.0)), ("Cut-Mix-Unmix, unmix 0", ("cmu", 0.0))]
    rows += [(f"Cut-Mix-Unmix + unmix {w:g}", ("cmu", w)) for w in args.weights]
    results = []
    for label, spec in rows:
        started = time.perf_counter()
        if spec is None:
            m, c = model, clip
        else:
            prefix = f"bench/{spec[0]}_{spec[1]:g}"
            result = handle.run_prompt(row_prompt(*spec, args.steps, args.lr, args.collages, prefix), timeout=7200)
            if not result.success:
                print(f"{label} failed: {result.error_message}", file=sys.stderr, flush=True)
                continue
            shift = read_shift(handle.model_dir("spectral_shifts") / f"{prefix}.safetensors")
            m, c, _ = apply_shift(model, clip, shift, 1.0, 1.0)
        trained = time.perf_counter() - started
        out = measure(m, c, vae, judge, prompts)
        results.append({"method": label, "both right": out["both right"], "leak": out["leak"], "seconds": round(trained)})
        print(f"{label}: both right {out['both right']:.2f}, leak {out['leak']:.2f}, {trained:.0f} s", flush=True)
        results[-1]["pictures"] = out["pictures"][:8]

    print(
        f"\nTwo subjects (heart as 'sks circle', diamond as 'zwx square'), 5 pictures each, {args.steps} steps, lr {args.lr:g}, "
        f"no prior, {args.collages} collages; {args.prompts} two-subject prompts (half mirrored, 4 backgrounds), euler 20, CFG 5.\n"
    )
    print("| method | both subjects right, right halves | leak (a half shows the other subject) | training |")
    print("|---|---|---|---|")
    for r in results:
        print(f"| {r['method']} | {r['both right']:.2f} | {r['leak']:.2f} | {r['seconds']} s |")
    if args.grid:
        sheet = generate.grid([p for r in results for p in r["pictures"]], columns=8)
        sheet.save(args.grid)
        print(f"\nGrid: {Path(args.grid).name} — one row per method in the table's order; the first 8 prompts.")
    if args.json:
        Path(args.json).write_text(json.dumps([{k: v for k, v in r.items() if k != "pictures"} for r in results], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
