"""The toy world's base text-to-image model: architecture, text encoder, files, checkpoint.

A Stable Diffusion 1.x checkpoint that ComfyUI's stock ``CheckpointLoaderSimple``
detects as SD15 and samples with stock nodes, sized for 64² pictures on a CPU:

* **UNet**: ComfyUI's ``UNetModel`` at the width detection pins for SD15
  (``model_channels=320``, ``context_dim=768``), one level (the 8×8 latent is not
  downsampled), one res block + transformer in, two out, no middle block: 18.7 M
  parameters. Trained from scratch (:mod:`devtools.world.train_base`).
* **VAE**: ComfyUI's TAESD class (``first_stage_model.taesd_*``), trained on the
  world's pictures, with ``vae_scale``/``vae_shift`` set so that the latents the
  UNet sees have zero mean and unit variance.
* **Text encoder**: the full CLIP-L layout the loader insists on, not trained but
  *designed* from a seed: token embeddings N(0, 1), position embeddings
  N(0, 0.5²), one random self-attention block (layer 0) and eleven layers whose
  residual branches are exactly zero, so they pass the stream through unchanged.
  The encoder is therefore token + position embedding, one causal attention that
  mixes each word with the words before it, and the final LayerNorm. That makes
  :func:`encode_captions` (layer 0 only) exactly ComfyUI's own 12-layer encode, at
  1/12 of the cost, which is what lets the base model train on 2 CPU cores.

Shipped in the repository (``base_unet.int8.safetensors``, ``base_vae.safetensors``):
the trained UNet, per-output-channel int8 (dequantised to fp16 in the checkpoint;
the reported accuracies are measured on the dequantised model), and the VAE in
fp16. :func:`world_checkpoint` assembles the 290 MB checkpoint (CLIP from its seed)
once and caches it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).parent
UNET_FILE = HERE / "base_unet.int8.safetensors"
VAE_FILE = HERE / "base_vae.safetensors"
CHECKPOINT_NAME = "svdiff_world_sd15.safetensors"
CLIP_SEED = 19
IMAGE_SIZE = 64
LATENT_SIZE = IMAGE_SIZE // 8
SD15_SCALE_FACTOR = 0.18215  # comfy.latent_formats.SD15.scale_factor

UNET = {
    "model_channels": 320,
    "channel_mult": [1],
    "num_res_blocks": 1,
    "transformer_depth": [1],
    "transformer_depth_middle": -2,
    "transformer_depth_output": [1, 1],
    "context_dim": 768,
    "use_linear_in_transformer": False,
    "adm_in_channels": None,
    "num_heads": 8,
    "num_head_channels": -1,
}


def unet_config() -> dict:
    from ..tiny_models.configs import ldm_unet_config

    return ldm_unet_config(**UNET)


def new_unet(seed: int = 0) -> torch.nn.Module:
    """ComfyUI's UNetModel at the world's widths, initialised as LDM does (zeroed outputs)."""
    import comfy.ops
    from comfy.ldm.modules.attention import SpatialTransformer
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock, UNetModel

    torch.manual_seed(seed)
    unet = UNetModel(**unet_config(), operations=comfy.ops.disable_weight_init)
    with torch.no_grad():
        for m in unet.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.Conv2d.reset_parameters(m)
            elif isinstance(m, torch.nn.Linear):
                torch.nn.Linear.reset_parameters(m)
            elif isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and m.weight is not None:
                m.weight.fill_(1.0)
                m.bias.zero_()
        zeroed = [unet.out[-1]]
        for m in unet.modules():
            if isinstance(m, ResBlock):
                zeroed.append(m.out_layers[-1])
            elif isinstance(m, SpatialTransformer):
                zeroed.append(m.proj_out)
        for m in zeroed:
            for p in m.parameters():
                p.zero_()
    return unet


def new_taesd() -> torch.nn.Module:
    from comfy.taesd.taesd import TAESD

    torch.manual_seed(0)
    vae = TAESD(latent_channels=4)
    with torch.no_grad():
        for m in vae.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.Conv2d.reset_parameters(m)
    return vae


# ---------------------------------------------------------------- text encoder

_TEXT = "clip_l.transformer.text_model."


def clip_state_dict() -> dict[str, torch.Tensor]:
    """The designed CLIP-L weights (fp16, ComfyUI's key names without the checkpoint prefix)."""
    import json

    from comfy import sd1_clip

    with open(Path(sd1_clip.__file__).with_name("sd1_clip_config.json")) as f:
        config = json.load(f)
    hidden, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    vocab, positions = config["vocab_size"], config["max_position_embeddings"]
    rng = np.random.default_rng(CLIP_SEED)

    def normal(shape, std):
        return torch.from_numpy(rng.standard_normal(shape, dtype=np.float32) * std)

    sd = {
        _TEXT + "embeddings.token_embedding.weight": normal((vocab, hidden), 1.0),
        _TEXT + "embeddings.position_embedding.weight": normal((positions, hidden), 0.5),
        _TEXT + "final_layer_norm.weight": torch.ones(hidden),
        _TEXT + "final_layer_norm.bias": torch.zeros(hidden),
        "clip_l.transformer.text_projection.weight": torch.eye(hidden),
        "clip_l.logit_scale": torch.tensor(4.6052),
    }
    for i in range(layers):
        p = f"{_TEXT}encoder.layers.{i}."
        for norm in ("layer_norm1", "layer_norm2"):
            sd[p + norm + ".weight"] = torch.ones(hidden)
            sd[p + norm + ".bias"] = torch.zeros(hidden)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            active = i == 0
            sd[p + f"self_attn.{proj}.weight"] = normal((hidden, hidden), hidden**-0.5) if active else torch.zeros(hidden, hidden)
            sd[p + f"self_attn.{proj}.bias"] = torch.zeros(hidden)
        sd[p + "mlp.fc1.weight"] = torch.zeros(inter, hidden)
        sd[p + "mlp.fc1.bias"] = torch.zeros(inter)
        sd[p + "mlp.fc2.weight"] = torch.zeros(hidden, inter)
        sd[p + "mlp.fc2.bias"] = torch.zeros(hidden)
    return {k: v.to(torch.float16) for k, v in sd.items()}


def world_clip():
    """ComfyUI's SD1.x CLIP object holding the designed weights (fp32)."""
    from ..tiny_models.builders import build_clip

    clip = build_clip("SD15", 0, dtype=torch.float32, te_configs={"clip_l": {}})
    missing, unexpected = clip.cond_stage_model.load_state_dict({k: v.float() for k, v in clip_state_dict().items()}, strict=True)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise RuntimeError(f"the designed CLIP does not fit ComfyUI's: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return clip


@torch.no_grad()
def encode_captions(clip, captions: list[str], batch: int = 64) -> torch.Tensor:
    """(N, 77, 768) conditioning, exactly as ComfyUI's CLIPTextEncode computes it for these
    weights, but through layer 0 only (layers 1-11 add exactly zero)."""
    model = clip.cond_stage_model.clip_l
    text_model = model.transformer.text_model
    ids = []
    for caption in captions:
        chunks = clip.tokenize(caption)["l"]
        if len(chunks) != 1:
            raise ValueError(f"caption longer than 75 tokens: {caption!r}")
        ids.append([t[0] for t in chunks[0]])
    ids_t = torch.tensor(ids)
    all_layers = text_model.encoder.layers
    out = []
    try:
        text_model.encoder.layers = all_layers[:1]
        for i in range(0, len(ids_t), batch):
            hidden = text_model(ids_t[i : i + batch], dtype=torch.float32)[0]
            out.append(hidden.float())
    finally:
        text_model.encoder.layers = all_layers
    return torch.cat(out)


# ---------------------------------------------------------------- shipped files


def quantize(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-output-channel symmetric int8 for every ≥2-D tensor; the rest in fp16."""
    out = {}
    for k, t in sd.items():
        t = t.detach().float()
        if t.ndim >= 2:
            rows = t.reshape(t.shape[0], -1)
            scale = rows.abs().amax(1).clamp_min(1e-12) / 127
            out[k] = torch.round(rows / scale[:, None]).clamp(-127, 127).to(torch.int8).reshape(t.shape)
            out[k + ".int8_scale"] = scale.to(torch.float32)
        else:
            out[k] = t.to(torch.float16)
    return out


def dequantize(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, t in sd.items():
        if k.endswith(".int8_scale"):
            continue
        if t.dtype == torch.int8:
            scale = sd[k + ".int8_scale"]
            out[k] = (t.float().reshape(t.shape[0], -1) * scale[:, None]).reshape(t.shape)
        else:
            out[k] = t.float()
    return out


def shipped() -> bool:
    return UNET_FILE.is_file() and VAE_FILE.is_file()


def _files_digest() -> str:
    h = hashlib.sha256()
    for path in (UNET_FILE, VAE_FILE):
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def load_unet() -> torch.nn.Module:
    from safetensors.torch import load_file

    unet = new_unet()
    unet.load_state_dict(dequantize(load_file(UNET_FILE)))
    return unet.eval()


def load_taesd() -> torch.nn.Module:
    from safetensors.torch import load_file

    vae = new_taesd()
    vae.load_state_dict({k: v.float() for k, v in load_file(VAE_FILE).items()})
    return vae.eval()


def checkpoint_tensors() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The single-file checkpoint: trained UNet and VAE, designed CLIP, ComfyUI's SD15 layout."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from ..tiny_models.builders import build_base_model
    from ..tiny_models.checkpoints import _checkpoint_state_dict

    model = build_base_model("SD15", unet_config(), torch.float16, 0)
    model.diffusion_model.load_state_dict({k: v.to(torch.float16) for k, v in dequantize(load_file(UNET_FILE)).items()})
    vae_sd = load_file(VAE_FILE)
    sd = _checkpoint_state_dict(model, clip_state_dict(), vae_sd)
    out = {k: (t.to(torch.float16) if t.is_floating_point() else t).contiguous() for k, t in sd.items()}
    with safe_open(UNET_FILE, "pt") as f:
        metadata = dict(f.metadata() or {})
    metadata.update({"svdiff.world": "base", "svdiff.world.files": _files_digest()})
    return out, metadata


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/comfyui-svdiff/world`` (default ``~/.cache/…``), beside the demo checkpoint's cache."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "comfyui-svdiff" / "world"


def world_checkpoint(directory: Path | None = None) -> Path:
    """Path of the assembled checkpoint, built once per version of the shipped files (≈30 s)."""
    from safetensors import safe_open

    from svdiff.atomic import atomic_save

    if not shipped():
        raise FileNotFoundError(f"{UNET_FILE.name} is missing: build it with `python -m devtools.world base`")
    path = Path(directory or cache_dir()) / CHECKPOINT_NAME
    digest = _files_digest()
    if path.is_file():
        with safe_open(path, "pt") as f:
            if (f.metadata() or {}).get("svdiff.world.files") == digest:
                return path
    tensors, metadata = checkpoint_tensors()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(path, tensors, metadata, overwrite=True)
    return path
