"""diffusers module names → ComfyUI (LDM) parameter names, for importing svdiff-pytorch.

svdiff-pytorch trains a diffusers ``UNet2DConditionModel`` of Stable Diffusion 1.x/2.x
and saves ``<module path>.delta``. Both SD1.x and SD2.x share one block layout:
four levels of two ResNet blocks, attention on the first three levels down and the
last three up. The mapping below is that layout written out (the integration tests
check it against ComfyUI's own ``comfy.utils.unet_to_diffusers``).
"""

from __future__ import annotations

import re

from .shift import CLIP_PREFIX, SPECTRAL_SUFFIX

NUM_RES_BLOCKS = 2
LEVELS = 4
# Up level 0 (lowest resolution) has no attention; 1..3 do (SD1.x/SD2.x).
UP_LEVELS_WITH_ATTENTION = {1, 2, 3}

_RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_TOP_LEVEL = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


class UnknownModuleError(ValueError):
    pass


def _resnet(prefix: str, rest: str, module: str, source: str) -> str:
    part = _RESNET_PARTS.get(rest)
    if part is None:
        raise UnknownModuleError(f"'{source}': unknown ResNet part '{rest}' in '{module}'")
    return f"{prefix}.{part}"


def unet_module_to_ldm(module: str, source: str = "file") -> str:
    """``down_blocks.0.resnets.1.conv1`` → ``input_blocks.2.0.in_layers.2`` (no ``.weight``)."""
    if module in _TOP_LEVEL:
        return _TOP_LEVEL[module]
    m = re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", module)
    if m:
        level, kind, j, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
        block = 1 + level * (NUM_RES_BLOCKS + 1) + j
        if kind == "resnets":
            return _resnet(f"input_blocks.{block}.0", rest, module, source)
        return f"input_blocks.{block}.1.{rest}"
    m = re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", module)
    if m:
        return f"input_blocks.{(int(m.group(1)) + 1) * (NUM_RES_BLOCKS + 1)}.0.op"
    m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", module)
    if m:
        kind, j, rest = m.group(1), int(m.group(2)), m.group(3)
        if kind == "attentions":
            return f"middle_block.1.{rest}"
        return _resnet(f"middle_block.{2 * j}", rest, module, source)
    m = re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", module)
    if m:
        level, kind, j, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
        block = level * (NUM_RES_BLOCKS + 1) + j
        if kind == "resnets":
            return _resnet(f"output_blocks.{block}.0", rest, module, source)
        return f"output_blocks.{block}.1.{rest}"
    m = re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", module)
    if m:
        level = int(m.group(1))
        block = level * (NUM_RES_BLOCKS + 1) + NUM_RES_BLOCKS
        index = 2 if level in UP_LEVELS_WITH_ATTENTION else 1
        return f"output_blocks.{block}.{index}.conv"
    raise UnknownModuleError(
        f"'{source}': '{module}' is not a module of a Stable Diffusion 1.x/2.x UNet; only SD1.x/SD2.x svdiff-pytorch files can be imported"
    )


def text_encoder_key(module: str) -> str:
    """svdiff-pytorch text-encoder module → v1 key (SD1.x layout, ``clip_l``).

    For SD2.x the CLIP is ``clip_h``; :func:`svdiff.targets.resolve` retargets
    imported keys when the model has no ``clip_l``.
    """
    module = module.removeprefix("text_encoder.")
    if not module.startswith("text_model."):
        module = "text_model." + module
    return f"{CLIP_PREFIX}clip_l.transformer.{module}{SPECTRAL_SUFFIX}"
