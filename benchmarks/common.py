"""Shared setup for the benchmark scripts: full-size UNet shapes and models, machine info.

Benchmarks need ComfyUI (COMFYUI_PATH or ~/ComfyUI) for the real UNet classes; they
build SD1.5- and SDXL-shaped UNets with random weights (no checkpoint can be
downloaded here).
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository root, for devtools/ (test tooling shared with tests/ and scripts/)

import torch  # noqa: E402

# Complete LDM UNet configs as ComfyUI's model detection produces them.
UNET_CONFIGS = {
    "SD15": {
        "use_checkpoint": False,
        "image_size": 32,
        "out_channels": 4,
        "use_spatial_transformer": True,
        "legacy": False,
        "adm_in_channels": None,
        "in_channels": 4,
        "model_channels": 320,
        "num_res_blocks": [2, 2, 2, 2],
        "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
        "channel_mult": [1, 2, 4, 4],
        "transformer_depth_middle": 1,
        "use_linear_in_transformer": False,
        "context_dim": 768,
        "num_heads": 8,
        "num_head_channels": -1,
        "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    },
    "SDXL": {
        "use_checkpoint": False,
        "image_size": 32,
        "out_channels": 4,
        "use_spatial_transformer": True,
        "legacy": False,
        "num_classes": "sequential",
        "adm_in_channels": 2816,
        "in_channels": 4,
        "model_channels": 320,
        "num_res_blocks": [2, 2, 2],
        "transformer_depth": [0, 0, 2, 2, 10, 10],
        "channel_mult": [1, 2, 4],
        "transformer_depth_middle": 10,
        "use_linear_in_transformer": True,
        "context_dim": 2048,
        "num_head_channels": 64,
        "num_heads": -1,
        "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    },
}


def setup_comfy():
    from devtools.locate import find_comfyui
    from devtools.tiny_models import prepare_comfy_cpu

    root = find_comfyui()
    if root is None:
        raise SystemExit("benchmarks need ComfyUI: set COMFYUI_PATH")
    prepare_comfy_cpu(root)
    from devtools.extension import import_extension

    import_extension()
    return root


def unet_state_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of a full-size UNet (built on the meta device: no memory)."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    with torch.device("meta"):
        unet = UNetModel(**UNET_CONFIGS[arch], operations=comfy.ops.disable_weight_init, device="meta")
    return {k: tuple(v.shape) for k, v in unet.state_dict().items()}


def random_unet(arch: str, dtype=torch.float32, seed: int = 0):
    """A full-size UNet with N(0, 1/fan_in) weights, wrapped as a ComfyUI MODEL."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    config_cls = getattr(comfy.supported_models, arch)
    model_config = config_cls(dict(UNET_CONFIGS[arch]))
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({}, device=torch.device("cpu"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) / fan_in**0.5)
            elif name.endswith(".weight"):
                p.copy_(1 + 0.02 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    device = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


def timed(fn, repeat: int = 3, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads, Python {platform.python_version()}"
    )


def header(title: str) -> str:
    return f"## {title}\n\n{datetime.date.today().isoformat()} · {machine()}\n"
