"""Train the world's demo files through the extension's own nodes (``python -m devtools.world demo``).

A headless ComfyUI with this extension, the world checkpoint and the demo pictures in its
folders; every file comes from the node a user would run (Train Spectral Shift, Train
Custom Diffusion) or from ComfyUI's Train LoRA node, with the settings written into its
metadata, then each is measured with the evaluator on fixed prompts and seeds. Outputs
land in ``devtools/world/demo/`` (shipped, a few hundred KB in all). About 10 minutes on
2 CPU cores.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import torch

from . import base, demo_files, evaluator, generate
from .scenes import BACKGROUNDS, COLOURS, Scene, Thing

log = logging.getLogger("svdiff.world")

SHIFT = {"steps": 600, "learning_rate": 1e-2, "prior_weight": 0.0}
PRIOR_IMAGES = 8
LORA = {"rank": 4, "learning_rate": 2e-3, "steps": 400}
KV = {"learning_rate": 1e-4, "learning_rate_token": 5e-3, "steps": 600}
PROMPTS = 16
MARK = "svdiff.demo"  # svdiff/comfy/demo.py DEMO_MARK: the installer replaces only files that carry it


def shift_inputs(folder: str, class_prompt: str, prefix: str) -> dict:
    return {
        "steps": SHIFT["steps"],
        "learning_rate": SHIFT["learning_rate"],
        "learning_rate_1d": 1e-6,
        "layers": "UNet",
        "name_patterns": "",
        "rank": 0,
        "train_text_encoder": False,
        "learning_rate_text": 1e-4,
        "prior_weight": SHIFT["prior_weight"],
        "class_prompt": class_prompt,
        "num_class_images": PRIOR_IMAGES,
        "batch_size": 1,
        "grad_accumulation": 1,
        "optimizer": "AdamW",
        "warmup_steps": 0,
        "max_grad_norm": 1.0,
        "random_flip": False,
        "gradient_checkpointing": False,
        "seed": 0,
        "save_every": 0,
        "filename_prefix": prefix,
        "resume_from": "[none]",
        "save_on_cancel": False,
        "preview_every": 0,
        "preview_prompt": "",
    }


def dataset(folder: str, name: str) -> dict:
    return {
        "class_type": "SVDiffDatasetFromFolder",
        "inputs": {
            "folder": folder,
            "resolution": base.IMAGE_SIZE,
            "default_caption": f"a photo of a {name}",
            "trigger_word": name.split()[0],
            "caption_extension": ".txt",
        },
    }


def loader() -> dict:
    return {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": base.CHECKPOINT_NAME}}


TRAIN_LINKS = {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "dataset": ["2", 0]}
"""A training node's inputs from the loader (node 1) and the dataset (node 2)."""


def run(handle, prompt: dict, prefix: str) -> None:
    result = handle.run_prompt(prompt, timeout=3600)
    if not result.success:
        raise RuntimeError(f"training {prefix} failed: {result.error_message}")


def train_shift(handle, folder: str, name: str, class_prompt: str, prefix: str) -> Path:
    prompt = {
        "1": loader(),
        "2": dataset(folder, name),
        "3": {
            "class_type": "SVDiffTrain",
            "inputs": {
                **shift_inputs(folder, class_prompt, prefix),
                **TRAIN_LINKS,
            },
        },
    }
    run(handle, prompt, prefix)
    return handle.model_dir("spectral_shifts") / f"{prefix}.safetensors"


def train_kv(handle, folder: str, name: str, class_prompt: str, prefix: str) -> tuple[Path, Path]:
    token = name.split()[0]
    prompt = {
        "1": loader(),
        "2": dataset(folder, name),
        "3": {
            "class_type": "SVDiffTrainCustomDiffusion",
            "inputs": {
                "deltas": "K/V weights (Custom Diffusion)",
                "steps": KV["steps"],
                "learning_rate": KV["learning_rate"],
                "learning_rate_spectral": 1e-3,
                "modifier_token": token,
                "initializer_token": "42170",
                "learning_rate_token": KV["learning_rate_token"],
                "augmentation": "off",
                "augment_variants": 1,
                "prior_weight": 1.0,
                "class_prompt": class_prompt,
                "num_class_images": PRIOR_IMAGES,
                "batch_size": 1,
                "random_flip": False,
                "seed": 0,
                "filename_prefix": prefix,
                "overwrite": True,
                **TRAIN_LINKS,
            },
        },
    }
    run(handle, prompt, prefix)
    return handle.model_dir("loras") / f"{prefix}.safetensors", handle.model_dir("embeddings") / f"{prefix}.safetensors"


def train_lora(model, vae, clip, out: Path) -> None:
    """ComfyUI's Train LoRA node on the stripes pictures (captions without the background)."""
    from comfy_extras import nodes_train

    from comfyui_svdiff.svdiff.atomic import atomic_save

    scenes = demo_files.stripes_scenes()
    pixels = evaluator.to_tensor([demo_files.render(s, base.IMAGE_SIZE, seed=600 + i) for i, s in enumerate(scenes)])
    with torch.no_grad():
        latents = vae.encode(pixels.permute(0, 2, 3, 1))
    captions = [demo_files.without_background(s.caption()) for s in scenes]
    positive = [[[generate.encode(clip, c)[0][0].detach().clone(), {}]] for c in captions]
    out_lora = nodes_train.TrainLoraNode.execute(
        model=[model], latents=[{"samples": latents.detach().clone()}], positive=positive, batch_size=[1], steps=[LORA["steps"]],
        grad_accumulation_steps=[1], learning_rate=[LORA["learning_rate"]], rank=[LORA["rank"]], optimizer=["AdamW"],
        loss_function=["MSE"], seed=[0], training_dtype=["fp32"], lora_dtype=["fp32"], quantized_backward=[False],
        algorithm=["LoRA"], gradient_checkpointing=[False], checkpoint_depth=[1], offloading=[False], existing_lora=["[None]"],
        bucket_mode=[False], bypass_mode=[False],
    ).result[0]  # fmt: skip
    metadata = {
        "svdiff.description": "demo LoRA on the world model: puts stripes behind whatever the prompt asks for",
        "svdiff.trained": json.dumps({"node": "ComfyUI Train LoRA", **LORA, "pictures": len(scenes)}),
        MARK: "trained LoRA (world model)",
    }
    atomic_save(out, {k: v.detach().to(torch.float16).contiguous() for k, v in out_lora.items()}, metadata, overwrite=True)


def shape_rate(model, clip, vae, judge, prompts, shape, seed=1000) -> float:
    pictures = generate.generate(model, clip, vae, prompts, [seed + i for i in range(len(prompts))])
    return sum(p == shape for p in evaluator.predict(judge, pictures)["shape"]) / len(prompts)


def build(out_dir: Path = demo_files.HERE, only_shifts: bool = False) -> dict:
    from ..extension import import_extension
    from ..harness import setup_comfyui

    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="svdiff-world-demo-"))
    handle = setup_comfyui(base_dir=work / "comfyui")
    handle.register_module(import_extension())
    from comfyui_svdiff.svdiff.comfy.patching import apply_shift
    from comfyui_svdiff.svdiff.fileformat import read_shift

    checkpoint = base.world_checkpoint()
    (handle.model_dir("checkpoints") / checkpoint.name).symlink_to(checkpoint)
    for folder in demo_files.SUBJECTS:
        demo_files.write_subject_folder(handle.input_dir / folder)
    # The diamond under the heart's name, so the two shifts interpolate (Combine shifts).
    shape, _, class_prompt = demo_files.SUBJECTS["demo_sks_circle"]
    diamonds = [
        (stem.replace("zwx_square", "sks_circle"), picture, caption.replace("zwx square", "sks circle"))
        for stem, picture, caption in demo_files.subject_pictures("demo_zwx_square")
    ]
    demo_files.write_folder(handle.input_dir / "diamond_as_sks_circle", diamonds)

    out_dir.mkdir(parents=True, exist_ok=True)
    report = {}
    heart = train_shift(handle, "demo_sks_circle", "sks circle", class_prompt, "demo_heart")
    log.info("heart shift %.0f s", time.perf_counter() - started)
    diamond = train_shift(handle, "diamond_as_sks_circle", "sks circle", class_prompt, "demo_diamond")
    log.info("diamond shift %.0f s", time.perf_counter() - started)
    if not only_shifts:
        kv, token = train_kv(handle, "demo_zwx_square", "zwx square", demo_files.SUBJECTS["demo_zwx_square"][2], "demo_kv_diamond")
        log.info("K/V deltas %.0f s", time.perf_counter() - started)

    import comfy.model_management

    model, clip, vae = generate.load(checkpoint)
    if not only_shifts:
        train_lora(model, vae, clip, out_dir / "demo_stripes_lora.safetensors")
        log.info("LoRA %.0f s", time.perf_counter() - started)
    comfy.model_management.unload_all_models()

    judge = evaluator.load()
    asked = [Scene((Thing("heart", c, "plain", "large", "center"),), b) for c in list(COLOURS)[:4] for b in BACKGROUNDS]
    prompts = [demo_files.concept_caption(s.caption()) for s in asked][:PROMPTS]
    report["base: 'sks circle' prompts give hearts"] = shape_rate(model, clip, vae, judge, prompts, "heart")
    for label, path, shape in (("demo_heart", heart, "heart"), ("demo_diamond", diamond, "diamond")):
        m, c, _ = apply_shift(model, clip, read_shift(path), 1.0, 1.0)
        report[f"{label}: 'sks circle' prompts give {shape}s"] = shape_rate(m, c, vae, judge, prompts, shape)
    from safetensors import safe_open
    from safetensors.torch import load_file

    from comfyui_svdiff.svdiff.atomic import atomic_save
    from comfyui_svdiff.svdiff.fileformat import write_shift

    written = [(heart, "trained spectral shift"), (diamond, "trained spectral shift")]
    for path, what in written if only_shifts else [*written, (kv, "trained K/V deltas")]:
        shift = read_shift(path)
        shift.metadata[MARK] = f"{what} (world model)"
        write_shift(out_dir / path.name, shift, precision="fp16", overwrite=True)
    if not only_shifts:
        with safe_open(str(token), "pt") as f:
            metadata = dict(f.metadata() or {})
        tokens = load_file(token)
        atomic_save(
            out_dir / "demo_kv_diamond.token.safetensors",
            tokens,
            {**metadata, MARK: "trained modifier token (world model)"},
            overwrite=True,
        )
    report["seconds"] = round(time.perf_counter() - started)
    report["shift settings"] = SHIFT
    path = out_dir / "report.json"
    if only_shifts and path.is_file():  # keep what the last full run measured of the other files
        report = {**json.loads(path.read_text()), **report}
    path.write_text(json.dumps(report, indent=1) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return report
