"""Run an example workflow headlessly (the main job) and say where its outputs went.

    python scripts/run_workflow.py [WORKFLOW] [--checkpoint FILE] [--out DIR] [--quick]

WORKFLOW is a workflow file or a shipped workflow's id (``train_subject``; a mistyped
one is answered with the list). Without ``--checkpoint`` the workflow runs as shipped on
the world model (``svdiff_world_sd15.safetensors``: an SD1.5-layout model trained from
scratch on pictures of coloured shapes, assembled once from the shipped weights and
cached) with its trained demo files (the Install Demo Files node's): a minute or two on
a CPU. ``--quick`` shrinks steps and training to seconds. With ``--checkpoint`` (any
SD1.x/SD2.x/SDXL file), the shift and LoRA files the workflow names ``demo_*`` are made
for that checkpoint instead (random, marked as demo in their metadata). Any other
missing file is an error that says where to put it. Everything the workflow writes
lands under ``--out`` (default ``out/<id>``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from headless import ROOT, demo_checkpoint, start_comfy

WORKFLOWS = ROOT / "workflows"
DEFAULT_WORKFLOW = "apply_and_stack_lora"
FILE_INPUTS = {
    "SVDiffLoader": ("shift_name", "spectral_shifts"),
    "SVDiffLoadShift": ("shift_name", "spectral_shifts"),
    "LoraLoader": ("lora_name", "loras"),
    "LoraLoaderModelOnly": ("lora_name", "loras"),
    "SVDiffLoadKVDeltas": ("deltas_name", "loras"),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "workflow", nargs="?", default=DEFAULT_WORKFLOW, help="a UI- or API-format workflow file, or a shipped workflow's id"
    )
    parser.add_argument(
        "--checkpoint", type=Path, help="an SD1.x/SD2.x/SDXL .safetensors checkpoint (default: the world model and its trained demo files)"
    )
    parser.add_argument("--out", type=Path, help="output folder (default: out/<workflow id>)")
    parser.add_argument("--quick", action="store_true", help="seconds instead of minutes: 4 sampler steps, 8 training steps")
    parser.add_argument("--steps", type=int, help="override the sampler steps")
    parser.add_argument("--size", type=int, help="override the image size in pixels")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    args.workflow = find_workflow(args.workflow)
    out = fresh_output_folder(args.out, args.workflow, workflow_id(args.workflow))
    started = time.perf_counter()
    # ComfyUI logs a traceback for every optional node pack it cannot import (audio
    # nodes without torchaudio, ...); those do not concern this run.
    logging.getLogger().setLevel(logging.ERROR)
    handle = start_comfy(base_dir=out / "comfyui")
    logging.getLogger().setLevel(logging.WARNING)
    from devtools.workflow_format import ui_to_api

    workflow = json.loads(args.workflow.read_text())
    prompt = ui_to_api(workflow, handle.object_info()) if "nodes" in workflow else workflow

    demo = args.checkpoint is None
    checkpoint = demo_checkpoint() if demo else args.checkpoint.resolve()
    if not checkpoint.is_file():
        raise SystemExit(f"--checkpoint {checkpoint}: no such file")
    link = handle.model_dir("checkpoints") / checkpoint.name
    if not link.exists():
        os.symlink(checkpoint, link)
    for entry in prompt.values():
        if entry["class_type"] in ("CheckpointLoaderSimple", "CheckpointLoader"):
            entry["inputs"]["ckpt_name"] = checkpoint.name
    if args.quick or args.steps or args.size:
        shrink(prompt, steps=args.steps or (4 if args.quick else None), size=args.size, training=args.quick)
    if demo:
        install_world_files(handle)
    prepare_files(handle, prompt, checkpoint)

    print(f"running {args.workflow.name} on {'the world model' if demo else checkpoint.name} …", flush=True)
    result = handle.run_prompt(prompt, timeout=3600)
    if not result.success:
        print(f"\nthe workflow failed:\n{result.error_message}", file=sys.stderr)
        return 1
    report(handle, result, out, time.perf_counter() - started)
    return 0


MARKER = ".svdiff-run-output"
"""Marks a folder this script made, so a later run may empty it."""


def workflow_id(path: Path) -> str:
    """A shipped workflow's id (``extra.svdiff_id``), else the file's stem."""
    try:
        return json.loads(path.read_text()).get("extra", {}).get("svdiff_id") or path.stem
    except (OSError, ValueError, AttributeError):
        return path.stem


def shipped_workflows() -> dict[str, Path]:
    return {workflow_id(path): path for path in sorted(WORKFLOWS.glob("*.json"))}


def find_workflow(text: str) -> Path:
    """A workflow file, or a shipped workflow by id or file name; else exit with the list."""
    path = Path(text).expanduser()
    if path.is_file():
        return path
    shipped = shipped_workflows()
    key = path.name.removesuffix(".json")
    for candidate in (key, key.removeprefix("svdiff_")):  # ids; "svdiff_<id>" were the file names before 0.4
        if candidate in shipped:
            return shipped[candidate]
    by_stem = {p.stem.lower(): p for p in shipped.values()}
    if key.lower() in by_stem:
        return by_stem[key.lower()]
    names = "\n  ".join(f"{wid:<22} {p.name}" for wid, p in shipped.items())
    raise SystemExit(f"workflow '{text}' not found; give a workflow file, or one of the shipped workflows (id, file):\n  {names}")


def fresh_output_folder(requested: Path | None, workflow: Path, name: str | None = None) -> Path:
    """An empty output folder for this run: the default ``out/<id>`` or ``--out``, emptied
    when an earlier run of this script made it; another non-empty folder is refused."""
    out = (requested or ROOT / "out" / (name or workflow.stem)).resolve()
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists() and requested is not None:
            raise SystemExit(f"--out {out} is not empty and was not made by this script; choose a new or empty folder")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by scripts/run_workflow.py; emptied by its next run\n")
    return out


def shrink(prompt: dict, steps: int | None, size: int | None, training: bool) -> None:
    """Smaller images, fewer sampler steps and a short training run (for the tiny model)."""
    for entry in prompt.values():
        inputs = entry["inputs"]
        if steps and entry["class_type"] in ("KSampler", "KSamplerAdvanced"):
            inputs["steps"] = steps
        if steps and entry["class_type"] == "BasicScheduler":
            inputs["steps"] = steps
        if size and entry["class_type"] in ("EmptyLatentImage", "ImageScale"):
            inputs["width"] = inputs["height"] = size
        if size and entry["class_type"] in ("SVDiffDatasetFromFolder", "SVDiffDatasetFromImages"):
            inputs["resolution"] = size
        if training and entry["class_type"] == "SVDiffCutMixUnmix":
            inputs["collages"] = min(inputs["collages"], 4)
        if training and entry["class_type"] == "SVDiffTrainCustomDiffusion":
            inputs.update(
                steps=2 * (steps or 4),
                num_class_images=min(inputs.get("num_class_images", 0), 2),
                augment_variants=min(inputs["augment_variants"], 2),
            )
        if training and entry["class_type"] == "SVDiffTrain":  # seconds, not hours
            inputs.update(
                steps=2 * (steps or 4), num_class_images=min(inputs.get("num_class_images", 0), 2), save_every=0, preview_every=steps or 4
            )


def install_world_files(handle) -> None:
    """The world model's trained demo files and pictures, as the Install Demo Files node puts them."""
    from comfyui_svdiff.svdiff.comfy.demo import install_demo_files

    for placed in install_demo_files():
        if placed.status == "written":
            print(
                f"put demo file {placed.path.relative_to(handle.base_dir) if placed.path.is_relative_to(handle.base_dir) else placed.path}"
            )


def prepare_files(handle, prompt: dict, checkpoint: Path) -> None:
    """Create the demo shift/LoRA files and image folders the workflow names; refuse other missing files."""
    from comfyui_svdiff.svdiff.comfy.demo import (
        load_demo_checkpoint,
        write_demo_images,
        write_demo_kv,
        write_demo_lora,
        write_demo_photo,
        write_demo_shift,
    )

    needed: dict[Path, tuple[str, str]] = {}  # one demo file per path, whichever nodes name it
    for entry in prompt.values():
        if entry["class_type"] == "SVDiffDatasetFromFolder":
            folder = handle.input_dir / entry["inputs"]["folder"]
            if not folder.exists():
                if not Path(entry["inputs"]["folder"]).name.startswith("demo_"):
                    raise SystemExit(f"SVDiffDatasetFromFolder: folder '{folder}' does not exist; put your training images there")
                write_demo_images(folder)
                print(f"created demo training images in input/{entry['inputs']['folder']}")
        if entry["class_type"] == "LoadImage":
            image = handle.input_dir / entry["inputs"]["image"]
            if not image.exists():
                if not image.name.startswith("demo_"):
                    raise SystemExit(f"LoadImage: '{image}' does not exist; put your photo in ComfyUI's input folder")
                write_demo_photo(image)
                print(f"created demo photo input/{entry['inputs']['image']}")
        spec = FILE_INPUTS.get(entry["class_type"])
        if spec is None:
            continue
        name, folder = spec
        filename = entry["inputs"].get(name)
        if isinstance(filename, str) and not (handle.model_dir(folder) / filename).exists():
            if not Path(filename).name.startswith("demo_"):
                raise SystemExit(f"{entry['class_type']}: '{filename}' is not in {handle.model_dir(folder)}; put it there and run again")
            needed.setdefault(handle.model_dir(folder) / filename, (folder, entry["class_type"]))
    if not needed:
        return
    model, clip = load_demo_checkpoint(checkpoint)
    for seed, (path, (folder, kind)) in enumerate(sorted(needed.items()), start=1):
        filename = path.relative_to(handle.model_dir(folder)).as_posix()
        if kind == "SVDiffLoadKVDeltas":
            write_demo_kv(path, handle.model_dir("embeddings") / filename, model, clip, seed)
        elif folder == "spectral_shifts":
            write_demo_shift(path, model, clip, seed)
        else:
            write_demo_lora(path, model, clip, seed)
        print(f"created demo file models/{folder}/{filename}")


def report(handle, result, out: Path, seconds: float) -> None:
    print(f"\ndone in {seconds:.1f} s; outputs under {out}:")
    for node_id, ui in sorted(result.outputs.items()):
        for text in ui.get("text", []):
            lines = str(text).splitlines()[:4]
            print(f"  node {node_id}: " + "\n    ".join(lines))
    for path in result.output_files():
        print(f"  image/latent: {path}")
    models = handle.models_dir
    for folder in ("spectral_shifts", "loras"):
        for path in sorted((models / folder).rglob("*.safetensors")):
            if not path.name.startswith("demo_"):
                print(f"  {folder}: {path}")
    images = [path for path in result.output_files() if path.suffix == ".png"]
    if images:
        gallery = out / "images"
        gallery.mkdir(exist_ok=True)
        for path in images:
            shutil.copy2(path, gallery / path.name)
        print(f"  (images copied to {gallery})")


if __name__ == "__main__":
    sys.exit(main())
