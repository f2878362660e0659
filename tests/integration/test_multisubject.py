"""Multi-subject training in ComfyUI: unmix regulariser, joint training, the negative-prior guider."""

from __future__ import annotations

import sys

import pytest
import torch

from comfyui_svdiff.svdiff.comfy.patching import apply_shift
from comfyui_svdiff.svdiff.comfy.tokens import token_positions
from comfyui_svdiff.svdiff.comfy.training.attention import outside_attention
from comfyui_svdiff.svdiff.comfy.training.examples import AttentionTargets, Example
from comfyui_svdiff.svdiff.comfy.training.run import TrainRequest, train
from comfyui_svdiff.svdiff.training import cutmix
from comfyui_svdiff.svdiff.training.config import AttentionConfig, TrainConfig
from devtools import tiny_models

pytestmark = pytest.mark.integration

CAPTIONS = ["photo of a sks dog on the left and a zwx cat on the right", "photo of a zwx cat on the left and a sks dog on the right"]
LOOKS = {"sks": torch.tensor([1.5, -1.0, 0.5, -0.5]), "zwx": torch.tensor([-1.5, 1.0, -0.5, 0.5])}


def collage_examples(clip, count=4, size=8, seed=0):
    """Latent collages whose halves differ in content (each subject its own colour
    offset), with region masks and token positions, alternating the subjects' sides."""
    g = torch.Generator().manual_seed(seed)
    cut = size // 2
    masks = cutmix.region_masks(size, "left_right", cut)
    examples = []
    for k in range(count):
        caption = k % 2
        order = ("sks", "zwx") if caption == 0 else ("zwx", "sks")
        latent = 0.5 * torch.randn(1, 4, size, size, generator=g)
        latent[..., :cut] += LOOKS[order[0]].view(1, 4, 1, 1)
        latent[..., cut:] += LOOKS[order[1]].view(1, 4, 1, 1)
        regions = [(token_positions(clip, CAPTIONS[caption], order[i]), masks[i]) for i in range(2)]
        examples.append(Example(latent, CAPTIONS[caption], None, AttentionTargets(regions=regions)))
    return examples


def per_token(values):
    """Average over collages of each token's number (collage k names sks first when k is even)."""
    out = {"sks": [], "zwx": []}
    for k, row in enumerate(values):
        for name, value in zip(("sks", "zwx") if k % 2 == 0 else ("zwx", "sks"), row, strict=True):
            out[name].append(value)
    return {name: sum(v) / len(v) for name, v in out.items()}


def test_token_positions_follow_comfyui_tokenizer(build):
    _, clip = build("SD15")
    tokens = [t[0] for t in clip.tokenize(CAPTIONS[0])["l"][0]]
    sks = token_positions(clip, CAPTIONS[0], "sks")
    zwx = token_positions(clip, CAPTIONS[0], "zwx")
    dog_cat = token_positions(clip, "photo of a dog and a dog", "dog")
    assert sks == [4]  # <start> photo of a sks …
    assert len(zwx) == 2 and zwx[1] == zwx[0] + 1  # "zwx" is two BPE pieces
    assert [tokens[i] for i in zwx] == [t[0] for t in clip.tokenize("zwx")["l"][0][1:3]]
    assert len(dog_cat) == 2
    with pytest.raises(ValueError, match="does not contain the word 'panda'"):
        token_positions(clip, CAPTIONS[0], "panda")


def test_unmix_regulariser_moves_each_token_attention_into_its_region(build):
    """Same data, seed and steps with and without the unmix loss: with it, each special
    token's attention outside its own half is lower (as a fraction and as mass)."""
    model, clip = build("SD15")
    positive = {caption: tiny_models.encode_prompt(clip, caption) for caption in CAPTIONS}
    examples = collage_examples(clip)
    percents = (0.7, 0.85, 0.95)  # noise levels where the halves' content is visible to the queries
    report = {}
    for label, attention in (("without", None), ("with", AttentionConfig(unmix_weight=1e4))):
        config = TrainConfig(steps=40, lr_spectral=0.05, prior_weight=0.0, flip=False, seed=1, max_grad_norm=0)
        result = train(TrainRequest(model, config, examples, conditioning=positive, architecture="SD15", attention=attention))
        trained, _, _ = apply_shift(model, None, result.shift, 1.0, 1.0)
        report[label] = (
            per_token(outside_attention(trained, positive, examples, percents)),
            per_token(outside_attention(trained, positive, examples, percents, relative=False)),
        )
    before = per_token(outside_attention(model, positive, examples, percents))
    sys.__stderr__.write(  # ComfyUI's logger owns sys.stdout; these are the numbers the README reports
        f"\nattention outside own region (fraction): before {before}; after 40 steps without unmix {report['without'][0]}, "
        f"with unmix {report['with'][0]}\n"
    )
    for token in ("sks", "zwx"):
        assert report["with"][0][token] < report["without"][0][token] - 0.01, (token, report)
        assert report["with"][1][token] < report["without"][1][token], (token, report)


@pytest.mark.parametrize("arch", ["SD15", "SDXL"])
def test_attention_losses_train_the_same_with_gradient_checkpointing(build, arch):
    model, clip = build(arch)
    positive = {caption: tiny_models.encode_prompt(clip, caption) for caption in CAPTIONS}
    examples = collage_examples(clip, count=2)
    single = Example(
        torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5)),
        CAPTIONS[0],
        None,
        AttentionTargets(
            special=token_positions(clip, CAPTIONS[0], "sks"),
            class_positions=token_positions(clip, CAPTIONS[0], "dog"),
        ),
    )
    attention = AttentionConfig(unmix_weight=100.0, subject_weight=100.0)
    config = TrainConfig(steps=3, lr_spectral=1e-2, prior_weight=0.0, flip=False, seed=2, subset="UNet-CA")
    plain = train(TrainRequest(model, config, [*examples, single], conditioning=positive, architecture=arch, attention=attention))
    checkpointed = train(
        TrainRequest(
            model, config, [*examples, single], conditioning=positive, architecture=arch, attention=attention, gradient_checkpointing=True
        )
    )
    no_reg = train(TrainRequest(model, config, [*examples, single], conditioning=positive, architecture=arch))
    assert plain.losses != no_reg.losses  # the regulariser is part of the loss
    for key, value in plain.shift.tensors.items():
        torch.testing.assert_close(checkpointed.shift.tensors[key], value, rtol=1e-4, atol=1e-6)


def test_attention_regularisers_refuse_models_without_cross_attention(build):
    model, clip = build("Flux")
    positive = {"photo of a sks dog": tiny_models.encode_prompt(clip, "photo of a sks dog")}
    example = Example(torch.randn(1, 16, 8, 8), "photo of a sks dog")
    config = TrainConfig(steps=1, prior_weight=0.0)
    with pytest.raises(ValueError, match="need a UNet with cross-attention"):
        train(TrainRequest(model, config, [example], conditioning=positive, attention=AttentionConfig(unmix_weight=1.0)))


def test_negative_prior_guider_is_eqs_8_and_9_on_a_model_whose_predictions_are_known(build):
    """ε̂ = s·ε(c) + (1−s)·[β·ε(∅) + (1−β)·ε(c_neg)], one Euler step to σ = 0 returns x̂₀ of it."""
    import comfy.samplers

    from comfyui_svdiff.nodes.multisubject import NegativePriorGuider

    model, clip = build("SD15")
    model = model.clone()

    def eps_of(x, context):  # a known prediction that depends on the prompt
        return 0.3 * x + context.mean(dim=(1, 2)).view(-1, 1, 1, 1)

    def wrapper(apply_model, args):
        x, sigma = args["input"], args["timestep"].view(-1, 1, 1, 1)
        return x - sigma * eps_of(x, args["c"]["c_crossattn"])

    model.set_model_unet_function_wrapper(wrapper)
    conds = {
        name: tiny_models.encode_prompt(clip, text)
        for name, text in (("c", "a sks dog and a zwx cat"), ("empty", ""), ("neg", "a dog and a cat"))
    }
    sigma, s, beta = 2.0, 6.0, 0.3
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sampler = comfy.samplers.sampler_object("euler")
    guider = NegativePriorGuider(model)
    guider.set_conds(conds["c"], conds["empty"], conds["neg"])
    guider.set_cfg(s, beta)
    got = model.model.process_latent_in(guider.sample(noise, torch.zeros_like(noise), sampler, torch.tensor([sigma, 0.0]), seed=0))

    x = (sigma * noise).double()
    eps = {name: eps_of(x, cond[0][0].double()) for name, cond in conds.items()}
    guided = s * eps["c"] + (1 - s) * (beta * eps["empty"] + (1 - beta) * eps["neg"])
    torch.testing.assert_close(got.double(), x - sigma * guided, rtol=1e-4, atol=1e-4)

    # β = 1 is ComfyUI's own CFG.
    guider.set_cfg(s, 1.0)
    plain = comfy.samplers.CFGGuider(model)
    plain.set_conds(conds["c"], conds["empty"])
    plain.set_cfg(s)
    sigmas = torch.tensor([sigma, 0.0])
    torch.testing.assert_close(
        guider.sample(noise, torch.zeros_like(noise), sampler, sigmas, seed=0),
        plain.sample(noise, torch.zeros_like(noise), sampler, sigmas, seed=0),
    )


# ----------------------------------------------------------------------------------
# Through ComfyUI's executor


def multi_prompt(ckpt, **overrides):
    def dataset(color, trigger, noun):
        return {
            "class_type": "SVDiffDatasetFromImages",
            "inputs": {"images": [color, 0], "captions": f"photo of a {{trigger}} {noun}", "trigger_word": trigger, "resolution": 64},
        }

    cut_mix = {
        "subject_1": ["4", 0], "subject_2": ["5", 0], "phrases": "sks dog\nzwx sculpture", "probability": 0.6, "layout": "both",
        "split_min": 0.3, "split_max": 0.7, "prompt_templates": cutmix.DEFAULT_TEMPLATES, "collages": 4, "random_flip": True, "seed": 0,
    }  # fmt: skip
    train = {
        "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "dataset": ["6", 0], "attention": ["7", 0],
        "steps": 3, "learning_rate": 1e-3, "learning_rate_1d": 1e-6, "layers": "UNet-CA", "name_patterns": "", "rank": 0,
        "prior_weight": 1.0, "class_prompt": "", "num_class_images": 1, "batch_size": 2, "grad_accumulation": 1,
        "optimizer": "AdamW", "warmup_steps": 0, "max_grad_norm": 1.0, "random_flip": True, "gradient_checkpointing": True,
        "seed": 4, "save_every": 0, "filename_prefix": "tests/pair", "resume_from": "[none]", "save_on_cancel": True,
        "preview_every": 0, "preview_prompt": "", "train_text_encoder": False, "learning_rate_text": 1e-4,
    }  # fmt: skip
    regulariser = {"unmix_weight": 100.0, "subject_weight": 10.0, "threshold": 0.5, "class_word": ""}
    for key, value in overrides.items():
        node, name = key.split(".")
        {"cut_mix": cut_mix, "train": train, "attention": regulariser}[node][name] = value
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 2, "color": 0xB06030}},
        "3": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 80, "batch_size": 1, "color": 0x3060B0}},
        "4": dataset("2", "sks", "dog"),
        "5": dataset("3", "zwx", "sculpture"),
        "6": {"class_type": "SVDiffCutMixUnmix", "inputs": cut_mix},
        "7": {"class_type": "SVDiffAttentionRegularization", "inputs": regulariser},
        "8": {"class_type": "SVDiffTrain", "inputs": train},
    }


def test_cut_mix_unmix_trains_two_subjects_in_comfyui(comfy_handle, tiny_checkpoint):
    import json

    from comfyui_svdiff.svdiff.fileformat import read_shift

    result = comfy_handle.run_prompt(multi_prompt(tiny_checkpoint), fresh_executor=True, timeout=900)
    assert result.success, result.error_message
    assert result.output("6")["text"][0] == "2 subjects, 4 collages, p = 0.6" and result.output("6")["images"]
    text = result.output("8")["text"][0]
    assert "for 3 steps" in text
    (path,) = (comfy_handle.model_dir("spectral_shifts") / "tests").glob("pair*.safetensors")
    summary = json.loads(read_shift(path).metadata["svdiff.training"])
    assert summary["trigger_words"] == ["sks", "zwx"]
    captions = summary["captions"]
    assert any("sks dog" in c and "zwx sculpture" in c for c in captions)  # collages were trained
    # The generated class images ("photo of a <class words>") and the prior collages built from them.
    assert {"photo of a dog", "photo of a sculpture"} <= set(captions)
    assert any("dog" in c and "sculpture" in c and "sks" not in c and "zwx" not in c for c in captions)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"cut_mix.subject_2": None}, "needs at least two subjects: connect a dataset to subject_2"),
        ({"cut_mix.phrases": "sks dog"}, "phrases has 1 lines for 2 connected subjects"),
        ({"cut_mix.phrases": "sks dog\nqqq sculpture"}, "does not contain its trigger word 'zwx'"),
        ({"cut_mix.phrases": "sks dog\nzwx"}, "has no class word"),
        ({"cut_mix.prompt_templates": "photo of {left} and {bottom}"}, "prompt_templates line 1"),
        ({"attention.unmix_weight": 0.0, "attention.subject_weight": 0.0}, "both unmix_weight and subject_weight are 0"),
        ({"train.prior_weight": 1.0, "train.num_class_images": 0}, "the Cut-Mix-Unmix subjects have no class images"),
    ],
)
def test_bad_multi_subject_inputs_are_named(comfy_handle, tiny_checkpoint, overrides, message):
    prompt = multi_prompt(tiny_checkpoint, **{k: v for k, v in overrides.items() if v is not None})
    for key, value in overrides.items():
        if value is None:
            node, name = key.split(".")
            del prompt["6"]["inputs"][name]
    result = comfy_handle.run_prompt(prompt, fresh_executor=True, timeout=900)
    assert not result.success
    assert message in (result.exception_message or result.error_message), result.error_message


def test_different_resolutions_and_out_of_range_probability_are_refused(comfy_handle, tiny_checkpoint):
    prompt = multi_prompt(tiny_checkpoint)
    prompt["5"]["inputs"]["resolution"] = 128
    result = comfy_handle.run_prompt(prompt, fresh_executor=True)
    assert "different resolutions (64, 128)" in result.exception_message
    prompt = multi_prompt(tiny_checkpoint, **{"cut_mix.probability": 1.5})
    result = comfy_handle.run_prompt(prompt, fresh_executor=True)
    assert any("probability" in m and "bigger than max of 1.0" in m for m in result.validation.messages_for("6")), result.node_errors
    assert "6" not in result.outputs
    single = multi_prompt(tiny_checkpoint, **{"train.dataset": ["4", 0], "train.prior_weight": 0.0})
    result = comfy_handle.run_prompt(single, fresh_executor=True)
    assert "unmix_weight needs a Cut-Mix-Unmix dataset" in result.exception_message
