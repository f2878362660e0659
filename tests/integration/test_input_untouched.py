"""Training leaves its input MODEL and CLIP exactly as they were, whether it succeeds or fails.

Compared before and after (``helpers.observable_state``): weight values, dtypes, devices
and ``requires_grad`` flags, module training modes, hooks, forward replacements, weight
wrappers, patches, object patches and injections, for the training that SVDiffTrain and
Train Custom Diffusion run (``svdiff.comfy.training.run.train``, with the text encoder and a
modifier token where they use them) and for ComfyUI's own Train LoRA node with
algorithm "SVDiff".
"""

from __future__ import annotations

import pytest

from comfyui_svdiff.svdiff.training.config import TrainConfig
from devtools import tiny_models
from integration.helpers import assert_same_state, observable_state, tiny_examples
from integration.test_reliability import _inject_fault

SVDIFF_TRAIN = TrainConfig(steps=2, lr_spectral=1e-2, lr_1d=1e-3, prior_weight=0.0, seed=3, train_text_encoder=True, subset="UNet")
CUSTOM_DIFFUSION = TrainConfig(
    steps=2, lr_full=1e-4, lr_token=1e-3, prior_weight=0.0, seed=3, method="full", modifier_token="<new1>", subset="UNet-CA-KV"
)
CONFIGS = {"SVDiffTrain (UNet + text encoder)": SVDIFF_TRAIN, "Train Custom Diffusion (K/V + modifier token)": CUSTOM_DIFFUSION}


def _mixed_flags(*roots) -> None:
    """Every other parameter requiring gradients, every third module in training mode.

    ComfyUI's loaders give ``requires_grad`` False and eval mode throughout; models
    built or modified elsewhere need not, and training must put back whatever it found.
    """
    import torch

    with torch.inference_mode():  # the weights are inference tensors, as loaded by a node
        for root in roots:
            for i, p in enumerate(root.parameters()):
                p.requires_grad_(i % 2 == 0)
            for i, m in enumerate(root.modules()):
                m.train(i % 3 == 0)


def _captions(config):
    return ["photo of a <new1> dog"] if config.modifier_token else ["photo of a sks dog"]


def _loaded(comfy_handle, tiny_checkpoint):
    """The tiny checkpoint as CheckpointLoaderSimple gives it: loaded under ComfyUI's inference mode."""
    import comfy.sd
    import torch

    with torch.inference_mode():
        model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(
            str(comfy_handle.model_dir("checkpoints") / tiny_checkpoint), output_vae=False, output_clipvision=False
        )
    return model, clip


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("fails", [False, True], ids=["succeeds", "fails at step 2"])
def test_training_leaves_the_input_model_and_clip_untouched(comfy_handle, tiny_checkpoint, monkeypatch, name, fails):
    import torch

    config = CONFIGS[name]
    model, clip = _loaded(comfy_handle, tiny_checkpoint)
    _mixed_flags(model.model, clip.patcher.model)
    before_model, before_clip = observable_state(model), observable_state(clip.patcher)
    if fails:
        _inject_fault(monkeypatch, at_call=2)
    from comfyui_svdiff.svdiff.comfy.training.run import TrainRequest
    from comfyui_svdiff.svdiff.comfy.training.run import train as train_request

    captions = _captions(config)
    with torch.inference_mode():  # how ComfyUI runs a node
        conditioning = {captions[0]: tiny_models.encode_prompt(clip, captions[0])}

        def train():
            examples = tiny_examples("SD15", count=2, caption=captions[0])
            return train_request(TrainRequest(model, config, examples, clip=clip, conditioning=conditioning, architecture="SD15"))

        if fails:
            with pytest.raises(RuntimeError, match="injected fault"):
                train()
        else:
            assert train().steps == 2
    assert_same_state(before_model, observable_state(model), "MODEL ")
    assert_same_state(before_clip, observable_state(clip.patcher), "CLIP ")


def test_comfyui_train_lora_node_leaves_the_input_model_untouched(comfy_handle, tiny_checkpoint):
    """ComfyUI's Train LoRA node with algorithm "SVDiff", patch and bypass mode."""
    import inspect

    import torch
    from comfy_extras.nodes_train import TrainLoraNode

    model, clip = _loaded(comfy_handle, tiny_checkpoint)
    _mixed_flags(model.model)
    if "force_deepcopy" not in inspect.signature(model.clone).parameters:
        pytest.skip(
            "this ComfyUI's Train LoRA node (v0.8.0: comfy_extras/nodes_train.py:950-965) trains on model.clone(), which "
            "shares the modules, and sets requires_grad_(False) on them itself; later releases train on "
            "clone(force_deepcopy=True)"
        )
    info = comfy_handle.object_info(["TrainLoraNode"])["TrainLoraNode"]
    values = {name: spec[1].get("default") for name, spec in info["input"]["required"].items() if len(spec) > 1}
    values |= {"steps": 2, "learning_rate": 1e-2, "training_dtype": "fp32", "lora_dtype": "fp32", "algorithm": "SVDiff"}
    values |= {"gradient_checkpointing": False, "existing_lora": "[None]", "batch_size": 1}
    latents = {"samples": torch.zeros(1, 4, 8, 8)}
    positive = tiny_models.encode_prompt(clip, "photo of a sks dog")
    before = observable_state(model)
    for bypass in (False, True):
        inputs = {k: [v] for k, v in values.items() if k not in ("model", "latents", "positive")} | {"bypass_mode": [bypass]}
        with torch.inference_mode():
            out = TrainLoraNode.execute(model=[model], latents=[latents], positive=[positive], **inputs)
        lora = out.result[0]
        assert any(k.endswith(".delta") for k in lora)
        assert_same_state(before, observable_state(model), f"bypass_mode={bypass}: ")
