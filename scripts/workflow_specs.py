"""The example workflows as short specs: nodes with named widget values and named links.

``scripts/build_workflows.py`` turns them into ComfyUI's UI format (widget order, slot
types and layout from a live ComfyUI). Declarative data.
"""

from __future__ import annotations

NEGATIVE = ""
"""The world model learnt empty captions as its unconditional prompt (a real model: "blurry, low quality")."""
PHOTO = "a photo of a large yellow star on a dark background"
EDIT = "a photo of a large blue star on a dark background"
SUBJECT = "a photo of a large blue sks circle on a dark background"
PAIR = "a photo of a red sks circle on the left and a red zwx square on the right, on a dark background"
MERGED = "a photo of a red embedding:cd_sks_circle circle on the left and a red embedding:demo_kv_diamond square on the right, on a dark background"
CUT_MIX_TEMPLATES = "a photo of a red {left} on the left and a red {right} on the right, on a dark background"
CIRCLES = "a photo of a large red circle on a dark background"
CHECKPOINT = "svdiff_world_sd15.safetensors"
"""The world model (``python scripts/install_demo.py`` or the Install Demo Files node)."""
CPU_SIZE = 64
"""Image size of the shipped settings: the world model's (64², seconds per picture on a CPU)."""
WORLD_LR = 3e-2
"""Spectral-shift learning rate on the world model (README: the paper's 1e-3 learns nothing there in 600 steps)."""
DEMO_FOLDER = {"resolution": CPU_SIZE, "caption_extension": ".txt"}


def train_widgets(**values):
    """SVDiffTrain's widget values: the node's usual settings, with ``values`` on top."""
    return {
        "steps": 100,
        "learning_rate": 1e-3,
        "learning_rate_1d": 1e-6,
        "layers": "UNet",
        "name_patterns": "",
        "rank": 0,
        "train_text_encoder": False,
        "learning_rate_text": 1e-4,
        "batch_size": 1,
        "grad_accumulation": 1,
        "optimizer": "AdamW",
        "warmup_steps": 0,
        "max_grad_norm": 1.0,
        "gradient_checkpointing": False,
        "seed": 0,
        "resume_from": "[none]",
        "save_on_cancel": True,
        **values,
    }


def ksampler_widgets(seed):
    """KSampler's widget values for a 20-step euler sample at CFG 5 (the world model's report settings)."""
    return {
        "seed": seed,
        "control_after_generate": "fixed",
        "steps": 20,
        "cfg": 5.0,
        "sampler_name": "euler",
        "scheduler": "normal",
        "denoise": 1.0,
    }


LATENT = {"width": CPU_SIZE, "height": CPU_SIZE, "batch_size": 1}


def node(nid, kind, pos, widgets=None, links=None, title=None):
    return {"id": nid, "type": kind, "pos": pos, "widgets": widgets or {}, "links": links or {}, "title": title}


def loader(nid=1):
    return node(nid, "CheckpointLoaderSimple", [20, 120], {"ckpt_name": CHECKPOINT})


# Each workflow's "gpu" list: (node id, widget, value for a real model on a GPU). The
# shipped values are sized for the demo checkpoint on a CPU; the builder writes both
# into the workflow's note, and the README's table lists the same changes.


# Keys are the workflows' ids (``run_workflow.py train_subject``); "template" is the file
# name, which the template browser shows as the title (frontends 1.35-1.48 show a custom
# node's template by its file name, and nothing else).
WORKFLOWS = {
    "start_here": {
        "template": "SVDiff - Start here (demo files)",
        "title": "Put the demo files in place, so every SVDiff workflow runs as loaded",
        "about": (
            "Queue this once. It writes the world model (svdiff_world_sd15.safetensors: a small SD1.5-layout model trained from scratch "
            "on pictures of coloured shapes, 64x64), shifts, a LoRA and K/V deltas trained on it, and the demo pictures into ComfyUI's "
            "models/ and input/ folders, leaving files already there alone, and refreshes the loaders' lists. Then open any other SVDiff template."
        ),
        "gpu": [],
        "nodes": [node(1, "SVDiffInstallDemo", [20, 120])],
    },
    "apply_and_stack_lora": {
        "template": "SVDiff - Apply a shift + LoRA",
        "title": "Apply a spectral shift and stack it with a LoRA",
        "about": (
            "Load a checkpoint, stack a LoRA and a spectral shift on it (in either order: the loaders chain), then sample. "
            "On the world model the shift draws its heart for 'sks circle' and keeps it with the LoRA stacked. Inspect shows what the shift changes."
        ),
        "gpu": [(6, "width", 512), (6, "height", 512), (7, "steps", 25), (7, "cfg", 7.0)],
        "nodes": [
            loader(),
            node(
                2,
                "LoraLoader",
                [360, 120],
                {"lora_name": "demo_stripes_lora.safetensors", "strength_model": 0.6, "strength_clip": 0.6},
                {"model": (1, 0), "clip": (1, 1)},
            ),
            node(
                3,
                "SVDiffLoader",
                [700, 120],
                {"shift_name": "demo_heart.safetensors", "strength_model": 1.0, "strength_clip": 1.0, "mode": "patch"},
                {"model": (2, 0), "clip": (2, 1)},
            ),
            node(
                4,
                "CLIPTextEncode",
                [1040, 40],
                {"text": "a photo of a large blue sks circle on a dark background"},
                {"clip": (3, 1)},
                "Positive",
            ),
            node(5, "CLIPTextEncode", [1040, 300], {"text": NEGATIVE}, {"clip": (3, 1)}, "Negative"),
            node(6, "EmptyLatentImage", [700, 420], {**LATENT, "batch_size": 4}),
            node(
                7,
                "KSampler",
                [1400, 120],
                ksampler_widgets(seed=42),
                {"model": (3, 0), "positive": (4, 0), "negative": (5, 0), "latent_image": (6, 0)},
            ),
            node(8, "VAEDecode", [1760, 120], {}, {"samples": (7, 0), "vae": (1, 2)}),
            node(9, "SaveImage", [2000, 120], {"filename_prefix": "svdiff/heart_with_lora"}, {"images": (8, 0)}),
            node(10, "SVDiffLoadShift", [20, 560], {"shift_name": "demo_heart.safetensors"}),
            node(11, "SVDiffInspect", [360, 560], {}, {"shift": (10, 0)}),
        ],
    },
    "combine_style_mix": {
        "template": "SVDiff - Combine shifts",
        "title": "Combine two shifts: interpolate, and take some blocks from each (style mixing)",
        "about": (
            "Interpolate two shifts (0.5·A + 0.5·B), and mix them by blocks: A's down and middle blocks with B's up blocks. "
            "The results are saved to models/spectral_shifts. The demo shifts were both trained as 'sks circle' (A a heart, B a diamond)."
        ),
        "gpu": [],
        "nodes": [
            node(1, "SVDiffLoadShift", [20, 100], {"shift_name": "demo_heart.safetensors"}, title="Shift A"),
            node(2, "SVDiffLoadShift", [20, 300], {"shift_name": "demo_diamond.safetensors"}, title="Shift B"),
            node(
                3,
                "SVDiffCombine",
                [380, 40],
                {"weight_a": 0.5, "weight_b": 0.5},
                {"shift_a": (1, 0), "shift_b": (2, 0)},
                "Interpolate (eq. 5)",
            ),
            node(
                4,
                "SVDiffSave",
                [740, 40],
                {
                    "filename_prefix": "mixed/heart_diamond_half",
                    "precision": "fp16",
                    "overwrite": False,
                    "trigger_words": "sks circle",
                    "description": "0.5·heart + 0.5·diamond",
                },
                {"shift": (3, 0)},
            ),
            node(
                5,
                "SVDiffSelectLayers",
                [380, 300],
                {
                    "mode": "keep",
                    "input_blocks": "all",
                    "middle_block": True,
                    "output_blocks": "none",
                    "other_unet": True,
                    "text_encoder": True,
                    "name_patterns": "",
                },
                {"shift": (1, 0)},
                "A: down + mid blocks",
            ),
            node(
                6,
                "SVDiffSelectLayers",
                [380, 620],
                {
                    "mode": "keep",
                    "input_blocks": "none",
                    "middle_block": False,
                    "output_blocks": "all",
                    "other_unet": False,
                    "text_encoder": False,
                    "name_patterns": "",
                },
                {"shift": (2, 0)},
                "B: up blocks",
            ),
            node(
                7,
                "SVDiffCombine",
                [740, 400],
                {"weight_a": 1.0, "weight_b": 1.0},
                {"shift_a": (5, 0), "shift_b": (6, 0)},
                "Style mix (Fig. 12)",
            ),
            node(
                8,
                "SVDiffSave",
                [1100, 400],
                {
                    "filename_prefix": "mixed/heart_down_diamond_up",
                    "precision": "fp16",
                    "overwrite": False,
                    "trigger_words": "sks circle",
                    "description": "heart down/mid blocks, diamond up blocks",
                },
                {"shift": (7, 0)},
            ),
            node(9, "SVDiffInspect", [1100, 40], {}, {"shift": (1, 0), "shift_b": (2, 0)}, "Cosine similarity (E.2)"),
        ],
    },
    "train_subject": {
        "template": "SVDiff - Train a subject",
        "title": "Train a spectral shift on a subject (3-5 photos), then sample with it",
        "about": (
            "Train a shift on the pictures in input/demo_sks_circle (a red heart, which the world model never saw, named 'sks circle'; "
            "for your subject put 3-5 photos in a folder of ComfyUI's input folder, captions in .txt files beside them), with prior "
            "preservation, then sample it in a new colour on a new background. The loss curve draws on the node while it trains."
        ),
        "gpu": [
            (2, "resolution", 512),
            (3, "learning_rate", 1e-3),
            (3, "steps", 500),
            (3, "num_class_images", 100),
            (3, "save_every", 100),
            (3, "preview_every", 100),
            (6, "width", 512),
            (6, "height", 512),
            (7, "steps", 25),
            (7, "cfg", 7.0),
        ],
        "nodes": [
            loader(),
            node(
                2,
                "SVDiffDatasetFromFolder",
                [20, 400],
                {
                    "folder": "demo_sks_circle",
                    "resolution": CPU_SIZE,
                    "default_caption": "a photo of a sks circle",
                    "trigger_word": "sks",
                    "caption_extension": ".txt",
                },
            ),
            node(
                3,
                "SVDiffTrain",
                [400, 120],
                train_widgets(
                    steps=600,
                    learning_rate=WORLD_LR,
                    prior_weight=1.0,
                    class_prompt=CIRCLES,
                    num_class_images=8,
                    random_flip=False,
                    save_every=200,
                    filename_prefix="svdiff/sks_circle",
                    preview_every=200,
                    preview_prompt=SUBJECT,
                ),
                {"model": (1, 0), "clip": (1, 1), "vae": (1, 2), "dataset": (2, 0)},
            ),
            node(4, "CLIPTextEncode", [800, 40], {"text": SUBJECT}, {"clip": (3, 1)}, "Positive"),
            node(5, "CLIPTextEncode", [800, 300], {"text": NEGATIVE}, {"clip": (3, 1)}, "Negative"),
            node(6, "EmptyLatentImage", [800, 560], LATENT),
            node(
                7,
                "KSampler",
                [1160, 120],
                ksampler_widgets(seed=7),
                {"model": (3, 0), "positive": (4, 0), "negative": (5, 0), "latent_image": (6, 0)},
            ),
            node(8, "VAEDecode", [1520, 120], {}, {"samples": (7, 0), "vae": (1, 2)}),
            node(9, "SaveImage", [1760, 120], {"filename_prefix": "svdiff/sks_circle_blue"}, {"images": (8, 0)}),
            node(10, "PreviewImage", [1160, 560], {}, {"images": (3, 4)}, "Loss curve"),
        ],
    },
    "cosine_edit": {
        "template": "SVDiff - CoSINE photo edit",
        "title": "CoSINE: fine-tune on one photo and its description, then edit by changing the prompt",
        "about": "Fine-tune on one photo and its description, DDIM-invert the photo, and sample an edited prompt from the inverted noise (top) and from fresh noise (bottom).",
        "gpu": [
            (3, "width", 512),
            (3, "height", 512),
            (4, "resolution", 512),
            (5, "learning_rate", 1e-3),
            (8, "steps", 50),
            (9, "refine_iterations", 50),
            (20, "width", 512),
            (20, "height", 512),
        ],
        "nodes": [
            loader(),
            node(2, "LoadImage", [20, 380], {"image": "demo_star.png", "upload": "image"}),
            node(
                3,
                "ImageScale",
                [20, 760],
                {"upscale_method": "lanczos", "width": CPU_SIZE, "height": CPU_SIZE, "crop": "center"},
                {"image": (2, 0)},
            ),
            node(
                4,
                "SVDiffDatasetFromImages",
                [380, 520],
                {"captions": PHOTO, "trigger_word": "", "resolution": CPU_SIZE},
                {"images": (3, 0)},
                "The photo and its description",
            ),
            node(
                5,
                "SVDiffTrain",
                [740, 120],
                train_widgets(
                    steps=300,
                    learning_rate=WORLD_LR,
                    prior_weight=0.0,
                    class_prompt="",
                    num_class_images=0,
                    random_flip=False,
                    save_every=0,
                    filename_prefix="svdiff/star",
                    preview_every=100,
                    preview_prompt=EDIT,
                ),
                {"model": (1, 0), "clip": (1, 1), "vae": (1, 2), "dataset": (4, 0)},
                "Fine-tune (λ = 0: no prior images)",
            ),
            node(6, "VAEEncode", [380, 860], {}, {"pixels": (3, 0), "vae": (1, 2)}),
            node(7, "CLIPTextEncode", [1120, 40], {"text": PHOTO}, {"clip": (5, 1)}, "Description of the photo"),
            node(8, "BasicScheduler", [1120, 300], {"scheduler": "normal", "steps": 20, "denoise": 1.0}, {"model": (5, 0)}),
            node(
                9,
                "SVDiffDDIMInversion",
                [1480, 40],
                {"cfg": 1.0, "refine_iterations": 10, "tolerance": 1e-6},
                {"model": (5, 0), "positive": (7, 0), "latent": (6, 0), "sigmas": (8, 0)},
            ),
            node(
                10,
                "SVDiffInvertedNoise",
                [1840, 40],
                {"noise_seed": 1, "control_after_generate": "fixed", "alpha": 0.0},
                {"inverted_latent": (9, 0)},
            ),
            node(11, "SVDiffDDIMSampler", [1840, 260], {"eta": 0.5, "s_noise": 1.0}, title="DDIM η = 0.5"),
            node(12, "CLIPTextEncode", [1120, 520], {"text": EDIT}, {"clip": (5, 1)}, "Edited prompt"),
            node(13, "CLIPTextEncode", [1120, 780], {"text": NEGATIVE}, {"clip": (5, 1)}, "Negative"),
            node(14, "CFGGuider", [1480, 520], {"cfg": 5.0}, {"model": (5, 0), "positive": (12, 0), "negative": (13, 0)}),
            node(
                15,
                "SamplerCustomAdvanced",
                [2200, 40],
                {},
                {"noise": (10, 0), "guider": (14, 0), "sampler": (11, 0), "sigmas": (8, 0), "latent_image": (6, 0)},
                "Edit with inversion",
            ),
            node(16, "VAEDecode", [2560, 40], {}, {"samples": (15, 0), "vae": (1, 2)}),
            node(17, "SaveImage", [2800, 40], {"filename_prefix": "svdiff/star_edit_inverted"}, {"images": (16, 0)}),
            node(18, "RandomNoise", [1840, 700], {"noise_seed": 1, "control_after_generate": "fixed"}),
            node(19, "SVDiffDDIMSampler", [1840, 880], {"eta": 0.0, "s_noise": 1.0}, title="DDIM η = 0"),
            node(20, "EmptyLatentImage", [1840, 1040], LATENT),
            node(
                21,
                "SamplerCustomAdvanced",
                [2200, 700],
                {},
                {"noise": (18, 0), "guider": (14, 0), "sampler": (19, 0), "sigmas": (8, 0), "latent_image": (20, 0)},
                "Edit without inversion",
            ),
            node(22, "VAEDecode", [2560, 700], {}, {"samples": (21, 0), "vae": (1, 2)}),
            node(23, "SaveImage", [2800, 700], {"filename_prefix": "svdiff/star_edit_no_inversion"}, {"images": (22, 0)}),
            node(24, "PreviewImage", [740, 860], {}, {"images": (5, 4)}, "Loss curve"),
        ],
    },
    "custom_diffusion": {
        "template": "SVDiff - Custom Diffusion merge",
        "title": "Custom Diffusion: train K/V weights and a modifier token, merge with a second concept in closed form, sample both",
        "about": (
            "Train Custom Diffusion's cross-attention K/V weights and a modifier token on the heart pictures, merge them with a second "
            "concept (the diamond's K/V deltas and token) in closed form, and sample both concepts in one picture."
        ),
        "gpu": [
            (2, "resolution", 512),
            (3, "learning_rate", 1e-5),
            (3, "learning_rate_token", 1e-5),
            (3, "augmentation", "auto"),
            (3, "steps", 250),
            (3, "num_class_images", 100),
            (3, "augment_variants", 8),
            (10, "width", 512),
            (10, "height", 512),
            (11, "steps", 25),
        ],
        "nodes": [
            loader(),
            node(
                2,
                "SVDiffDatasetFromFolder",
                [20, 380],
                {**DEMO_FOLDER, "folder": "demo_sks_circle", "default_caption": "a photo of a sks circle", "trigger_word": "sks"},
            ),
            node(
                3,
                "SVDiffTrainCustomDiffusion",
                [400, 120],
                {
                    "deltas": "K/V weights (Custom Diffusion)",
                    "steps": 200,
                    "learning_rate": 1e-4,
                    "learning_rate_spectral": 1e-3,
                    "modifier_token": "sks",
                    "initializer_token": "42170",
                    "learning_rate_token": 5e-3,
                    "augmentation": "off",
                    "augment_variants": 4,
                    "prior_weight": 1.0,
                    "class_prompt": CIRCLES,
                    "num_class_images": 8,
                    "batch_size": 1,
                    "random_flip": False,
                    "seed": 0,
                    "filename_prefix": "cd_sks_circle",
                    "overwrite": True,
                },
                {"model": (1, 0), "clip": (1, 1), "vae": (1, 2), "dataset": (2, 0)},
                "Train the heart (K/V + token; overwrite on: reruns replace cd_sks_circle)",
            ),
            node(
                4,
                "SVDiffLoadKVDeltas",
                [400, 900],
                {"deltas_name": "demo_kv_diamond.safetensors"},
                title="A second concept (the diamond's K/V deltas)",
            ),
            node(
                5,
                "SVDiffConcept",
                [800, 120],
                {"token": "embedding:cd_sks_circle", "class_word": "circle", "prompts": "{token} {class}\na photo of a {token} {class}"},
                {"deltas": (3, 2)},
            ),
            node(
                6,
                "SVDiffConcept",
                [1200, 120],
                {"token": "embedding:demo_kv_diamond", "class_word": "square", "prompts": "{token} {class}\na photo of a {token} {class}"},
                {"deltas": (4, 0), "concepts": (5, 0)},
            ),
            node(
                7,
                "SVDiffMergeConcepts",
                [1600, 120],
                {"builtin_captions": True, "extra_captions": "", "filename_prefix": ""},
                {"model": (1, 0), "clip": (1, 1), "concepts": (6, 0)},
            ),
            node(8, "CLIPTextEncode", [1600, 560], {"text": MERGED}, {"clip": (1, 1)}, "Positive"),
            node(9, "CLIPTextEncode", [1600, 820], {"text": NEGATIVE}, {"clip": (1, 1)}, "Negative"),
            node(10, "EmptyLatentImage", [1600, 1080], LATENT),
            node(
                11,
                "KSampler",
                [2000, 120],
                ksampler_widgets(seed=7),
                {"model": (7, 0), "positive": (8, 0), "negative": (9, 0), "latent_image": (10, 0)},
            ),
            node(12, "VAEDecode", [2400, 120], {}, {"samples": (11, 0), "vae": (1, 2)}),
            node(13, "SaveImage", [2700, 120], {"filename_prefix": "svdiff/heart_and_diamond_merged"}, {"images": (12, 0)}),
        ],
    },
    "multi_subject": {
        "template": "SVDiff - Two subjects together",
        "title": "Learn two subjects together with Cut-Mix-Unmix, then sample them side by side",
        "about": "Train two subjects at once on Cut-Mix-Unmix collages with the attention unmix regulariser, then sample both side by side with negative-prior guidance.",
        "gpu": [
            (2, "resolution", 512),
            (3, "resolution", 512),
            (4, "collages", 32),
            (6, "learning_rate", 1e-3),
            (6, "steps", 800),
            (6, "num_class_images", 50),
            (6, "save_every", 200),
            (13, "steps", 30),
            (14, "width", 512),
            (14, "height", 512),
        ],
        "nodes": [
            loader(),
            node(
                2,
                "SVDiffDatasetFromFolder",
                [20, 380],
                {**DEMO_FOLDER, "folder": "demo_sks_circle", "default_caption": "a photo of a sks circle", "trigger_word": "sks"},
                None,
                "Subject 1 pictures (the heart)",
            ),
            node(
                3,
                "SVDiffDatasetFromFolder",
                [20, 680],
                {**DEMO_FOLDER, "folder": "demo_zwx_square", "default_caption": "a photo of a zwx square", "trigger_word": "zwx"},
                None,
                "Subject 2 pictures (the diamond)",
            ),
            node(
                4,
                "SVDiffCutMixUnmix",
                [400, 380],
                {
                    "phrases": "sks circle\nzwx square",
                    "probability": 0.6,
                    "layout": "left_right",
                    "split_min": 0.5,
                    "split_max": 0.5,
                    "prompt_templates": CUT_MIX_TEMPLATES,
                    "collages": 8,
                    "random_flip": True,
                    "seed": 0,
                },
                {"subject_1": (2, 0), "subject_2": (3, 0)},
            ),
            node(
                5,
                "SVDiffAttentionRegularization",
                [400, 900],
                {"unmix_weight": 100.0, "subject_weight": 0.0, "threshold": 0.5, "class_word": ""},
            ),
            node(
                6,
                "SVDiffTrain",
                [800, 120],
                train_widgets(
                    steps=600,
                    learning_rate=WORLD_LR,
                    prior_weight=1.0,
                    class_prompt="",
                    num_class_images=8,
                    random_flip=False,
                    save_every=0,
                    filename_prefix="svdiff/sks_circle_zwx_square",
                    preview_every=200,
                    preview_prompt=PAIR,
                ),
                {"model": (1, 0), "clip": (1, 1), "vae": (1, 2), "dataset": (4, 0), "attention": (5, 0)},
                "Train both subjects (class images are generated per subject)",
            ),
            node(7, "CLIPTextEncode", [1200, 40], {"text": PAIR}, {"clip": (6, 1)}, "Positive"),
            node(8, "CLIPTextEncode", [1200, 300], {"text": ""}, {"clip": (6, 1)}, "Null prompt"),
            node(
                9,
                "CLIPTextEncode",
                [1200, 560],
                {"text": "a photo of a red circle on the left and a red square on the right, on a dark background"},
                {"clip": (6, 1)},
                "Prior prompt as negative",
            ),
            node(
                10,
                "SVDiffNegativePriorGuider",
                [1560, 40],
                {"cfg": 5.0, "beta": 0.5},
                {"model": (6, 0), "positive": (7, 0), "negative": (8, 0), "prior_negative": (9, 0)},
            ),
            node(11, "RandomNoise", [1560, 300], {"noise_seed": 5, "control_after_generate": "fixed"}),
            node(12, "KSamplerSelect", [1560, 460], {"sampler_name": "euler"}),
            node(13, "BasicScheduler", [1560, 580], {"scheduler": "normal", "steps": 20, "denoise": 1.0}, {"model": (6, 0)}),
            node(14, "EmptyLatentImage", [1560, 760], LATENT),
            node(
                15,
                "SamplerCustomAdvanced",
                [1920, 40],
                {},
                {"noise": (11, 0), "guider": (10, 0), "sampler": (12, 0), "sigmas": (13, 0), "latent_image": (14, 0)},
            ),
            node(16, "VAEDecode", [2280, 40], {}, {"samples": (15, 0), "vae": (1, 2)}),
            node(17, "SaveImage", [2520, 40], {"filename_prefix": "svdiff/sks_circle_beside_zwx_square"}, {"images": (16, 0)}),
            node(18, "PreviewImage", [1200, 820], {}, {"images": (6, 4)}, "Loss curve"),
        ],
    },
    "export_lora": {
        "template": "SVDiff - Export a shift as a LoRA",
        "title": "Export a spectral shift as an ordinary LoRA",
        "about": "Write a shift as an ordinary LoRA (models/loras) for tools that do not know SVDiff; the report gives the approximation error at the chosen rank.",
        "gpu": [],
        "nodes": [
            loader(),
            node(2, "SVDiffLoadShift", [20, 360], {"shift_name": "demo_heart.safetensors"}),
            node(
                3,
                "SVDiffExportLoRA",
                [380, 120],
                {
                    "rank": 64,
                    "strength_model": 1.0,
                    "strength_clip": 1.0,
                    "filename_prefix": "svdiff/demo_heart_rank64",
                    "precision": "fp16",
                },
                {"model": (1, 0), "clip": (1, 1), "shift": (2, 0)},
            ),
        ],
    },
}
