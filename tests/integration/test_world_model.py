"""The toy world's base model (devtools/world/base.py), loaded and sampled the way stock nodes do.

Independent references: ComfyUI's own 12-layer text encoder (for the 1-layer encoder the
model was trained with), and the evaluator, trained on rendered ground truth only (for
the VAE and for prompt following). Prompt following is compared with the same pictures
read against *other* prompts, so a model that ignored its prompt would fail.
"""

from __future__ import annotations

import random

import pytest
import torch

from devtools.world import base

pytestmark = pytest.mark.skipif(not base.shipped(), reason="world base model not built (python -m devtools.world base)")


@pytest.fixture(scope="module")
def world(comfy):
    from devtools.world import generate

    return generate.load(base.world_checkpoint())


def test_the_world_checkpoint_is_an_sd15_checkpoint_for_the_stock_loader(world):
    import comfy.taesd.taesd

    model, clip, vae = world
    assert type(model.model.model_config).__name__ == "SD15"
    assert isinstance(vae.first_stage_model, comfy.taesd.taesd.TAESD)
    params = sum(p.numel() for p in model.model.diffusion_model.parameters())
    assert 15e6 < params < 25e6, params
    assert base.UNET_FILE.stat().st_size + base.VAE_FILE.stat().st_size <= 25 * 2**20


def test_the_one_layer_encoder_equals_comfyuis_twelve_layer_encode(world):
    """Training used base.encode_captions (layer 0 only); sampling uses the checkpoint's CLIP."""
    import torch

    _, clip, _ = world
    captions = [
        "a photo of a large red dotted star on the left on a dark background",
        "a photo of a blue cross on the left and a green ring on the right, on a light background",
        "",
    ]
    fast = base.encode_captions(base.world_clip(), captions)
    for caption, mine in zip(captions, fast, strict=True):
        theirs = clip.encode_from_tokens_scheduled(clip.tokenize(caption))[0][0][0].float()
        assert torch.allclose(theirs, mine, atol=2e-3), (caption, (theirs - mine).abs().max())


def test_the_vae_keeps_what_the_evaluator_reads(world):
    """Render → VAEEncode → VAEDecode. Measured on 200 single-object scenes (README): shape
    0.64, colour 0.84, background 1.00 (clean renders: 1.00 each). The 8×8 latent is the base
    model's ceiling: its generations score the same."""
    from PIL import Image

    from devtools.world import evaluator, render
    from devtools.world.scenes import random_scene

    _, _, vae = world
    judge = evaluator.load()
    rng = random.Random(777)
    scenes = [random_scene(rng, two_objects=0.0) for _ in range(40)]
    pictures = [render(s, base.IMAGE_SIZE, seed=900 + i) for i, s in enumerate(scenes)]
    pixels = torch.stack([evaluator.to_tensor([p])[0] for p in pictures]).permute(0, 2, 3, 1)
    with torch.no_grad():
        latents = vae.encode(pixels)
        decoded = vae.decode(latents).clamp(0, 1)
    assert latents.shape[-2:] == (base.LATENT_SIZE, base.LATENT_SIZE)
    again = [Image.fromarray(d.mul(255).round().byte().numpy()) for d in decoded]
    ok = [evaluator.score(judge, p, s).correct for p, s in zip(again, scenes, strict=True)]
    for name, floor in (("shape", 0.45), ("colour", 0.7), ("background", 0.95)):
        share = sum(c[name] for c in ok) / len(ok)
        assert share >= floor, (name, share)


def test_the_base_model_draws_what_the_prompt_asks(world):
    from devtools.world import evaluator, generate

    model, clip, vae = world
    scenes = generate.prompt_scenes(24, seed=4242, two_objects=0.0)
    pictures = generate.generate(model, clip, vae, [s.caption() for s in scenes], list(range(24)))
    judge = evaluator.load()
    asked = [evaluator.score(judge, p, s).correct for p, s in zip(pictures, scenes, strict=True)]
    # the same pictures against the prompt of another picture: what ignoring prompts would score
    other = [evaluator.score(judge, p, scenes[(i + 7) % 24]).correct for i, p in enumerate(pictures)]
    # measured on 200 prompts (README): shape 0.64, colour 0.85; 24 prompts scatter by ±0.1
    for name, floor, margin in (("shape", 0.45, 0.25), ("colour", 0.7, 0.4)):
        hit = sum(c[name] for c in asked) / 24
        chance = sum(c[name] for c in other) / 24
        assert hit >= floor and hit >= chance + margin, (name, hit, chance)


# The fidelity benchmark's "SVDiff (UNet), no prior" run (600 steps, lr 1e-2: 0.57 of 40
# prompts drawn as hearts, the base model 0.00); these are its first 12 prompts and seeds.
CONCEPT_STEPS = 600
CONCEPT_LR = 1e-2


def test_a_trained_shift_teaches_the_base_model_the_held_out_concept(world):
    """Five pictures of a heart (a shape the base model never saw) named "sks circle": after
    training, recontextualised prompts draw hearts, which the base model does not."""
    from comfyui_svdiff.svdiff.comfy.patching import apply_shift
    from comfyui_svdiff.svdiff.comfy.training.examples import Example
    from comfyui_svdiff.svdiff.comfy.training.run import TrainRequest, train
    from comfyui_svdiff.svdiff.training.config import TrainConfig
    from devtools.world import concepts, evaluator, generate, render

    model, clip, vae = world
    judge = evaluator.load()
    scenes = concepts.instance_scenes(5, seed=7)
    pixels = torch.stack([evaluator.to_tensor([render(s, base.IMAGE_SIZE, seed=300 + i)])[0] for i, s in enumerate(scenes)])
    with torch.no_grad():  # the VAE's parameters require grad: no graph into the examples
        latents = vae.encode(pixels.permute(0, 2, 3, 1))
    examples = [Example(latents[i : i + 1].clone(), concepts.concept_caption(s.caption())) for i, s in enumerate(scenes)]
    config = TrainConfig(steps=CONCEPT_STEPS, lr_spectral=CONCEPT_LR, prior_weight=0.0, seed=7, flip=False)
    result = train(TrainRequest(model, config, examples, clip=clip, architecture="SD15"))
    shifted, shifted_clip, _ = apply_shift(model, clip, result.shift, 1.0, 1.0)

    asked = concepts.prompt_scenes(12, seed=100)
    prompts = [concepts.concept_caption(s.caption()) for s in asked]
    seeds = [1000 + i for i in range(12)]

    def hearts(m, c):
        return sum(evaluator.predict(judge, generate.generate(m, c, vae, prompts, seeds))["shape"][i] == "heart" for i in range(12)) / 12

    before, after = hearts(model, clip), hearts(shifted, shifted_clip)
    assert after >= 0.33 and after >= before + 0.25, (before, after)


def test_the_shipped_demo_files_do_what_the_workflows_say(world):
    """The trained files Install Demo Files puts in place (devtools/world/demo/), read by the
    evaluator on fixed prompts and seeds: the heart shift draws hearts for "sks circle", which
    the base model never does, and still does with the stripes LoRA stacked on it."""
    import comfy.sd
    import comfy.utils

    from comfyui_svdiff.svdiff.comfy.patching import apply_shift
    from comfyui_svdiff.svdiff.fileformat import read_shift
    from devtools.world import concepts, demo_files, evaluator, generate

    model, clip, vae = world
    judge = evaluator.load()
    seeds = [2000 + i for i in range(12)]

    def read(m, c, prompts, attribute):
        return evaluator.predict(judge, generate.generate(m, c, vae, prompts, seeds))[attribute]

    prompts = [concepts.concept_caption(s.caption()) for s in concepts.prompt_scenes(12, seed=500)]
    shifted, shifted_clip, _ = apply_shift(model, clip, read_shift(demo_files.HERE / "demo_heart.safetensors"), 1.0, 1.0)
    before = read(model, clip, prompts, "shape").count("heart") / 12
    after = read(shifted, shifted_clip, prompts, "shape").count("heart") / 12
    assert after >= 0.33 and after >= before + 0.25, (before, after)

    # Stacked with the stripes LoRA (as the main job does), the heart stays.
    lora = comfy.utils.load_torch_file(str(demo_files.HERE / "demo_stripes_lora.safetensors"), safe_load=True)
    stacked, stacked_clip = comfy.sd.load_lora_for_models(shifted, shifted_clip, lora, 0.6, 0.6)
    kept = read(stacked, stacked_clip, prompts, "shape").count("heart") / 12
    assert kept >= 0.33 and kept >= before + 0.25, (before, after, kept)
