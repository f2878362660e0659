"""Tiny, deterministic ComfyUI models built in code, for tests, demos and benchmarks.

Why this exists
---------------
SVDiff works on real ComfyUI objects (``ModelPatcher``, ``comfy.sd.CLIP``,
``comfy.sd.VAE``) and records the real model-config class name
(``type(model.model.model_config).__name__``).  Real checkpoints cannot be
downloaded in CI and are far too big for CPU tests, so this package builds the
*same ComfyUI classes* with tiny widths and fills every parameter from a seed.
Nothing of ComfyUI is copied: every object is created through ComfyUI's own
constructors (``comfy.supported_models.<Class>``, ``comfy.model_base``,
``comfy.sd.CLIP`` with ``"<te>_model_config"`` overrides, ``comfy.sd.VAE``).

All ``comfy`` imports are done lazily inside functions, so importing this
package never needs ComfyUI.  Callers put the ComfyUI root directory on
``sys.path`` (or pass it to :func:`prepare_comfy_cpu`) before building models.

CPU setup (must happen BEFORE ``comfy.model_management`` is imported)
----------------------------------------------------------------------
``comfy/model_management.py`` probes the device at import time
(``total_vram = get_total_memory(get_torch_device())``, line 239 in v0.8.0)
and, unless ``args.cpu`` is set (line 142), ``get_torch_device()`` calls
``torch.cuda.current_device()`` (line 189), which raises on a machine without
an NVIDIA driver.  ``comfy.cli_args`` does not parse ``sys.argv`` unless
``comfy.options.enable_args_parsing()`` was called, so the documented way is::

    import sys; sys.path.insert(0, COMFYUI_PATH)
    import comfy.cli_args
    comfy.cli_args.args.cpu = True          # == ComfyUI's --cpu flag
    import comfy.model_management           # now picks CPUState.CPU

:func:`prepare_comfy_cpu` does exactly that, idempotently.  If
``comfy.model_management`` had already been imported (only possible on a
machine with a working GPU), it additionally switches the module globals
``cpu_state = CPUState.CPU`` and ``vram_state = VRAMState.DISABLED``, which is
what the import-time ``--cpu`` code path would have set.

dtype handling (mirrors ComfyUI's CPU behaviour)
-------------------------------------------------
On CPU ``model_management.unet_manual_cast(fp16|bf16, cpu)`` returns
``torch.float32``; ComfyUI then stores weights in fp16/bf16 and uses
``comfy.ops.manual_cast`` layers that upcast each weight to fp32 at compute
time (``model_config.set_inference_dtype(weight_dtype, manual_cast_dtype)`` ->
``comfy.ops.pick_operations``).  :func:`build_model` does the same, so fp16 and
bf16 models run on CPU.  (Note: ComfyUI's own loader would *upcast* an fp16
checkpoint to fp32 on CPU unless ``model_options={"dtype": ...}`` is given,
because ``unet_dtype()`` never picks fp16/bf16 for a CPU device.)

Architectures
-------------
``"SD15"``  -> ``comfy.supported_models.SD15``  + clip_l             (eps)
``"SD21v"`` -> ``comfy.supported_models.SD20``  + clip_h             (v-prediction)
``"SDXL"``  -> ``comfy.supported_models.SDXL``  + clip_l + clip_g    (eps, adm)
``"Flux"``  -> ``comfy.supported_models.Flux``  + clip_l + t5xxl     (flow, Flux-dev
style with guidance embedding, 16 latent channels)

Single-file checkpoints
-----------------------
The in-code models are not detectable by ``comfy.model_detection`` (SD15
requires model_channels=320 and context_dim=768) and the loader rebuilds
text encoders at full size from ComfyUI's json configs, so
:func:`write_tiny_checkpoint` writes a separate, larger file: the smallest SD15
layout the stock loader accepts is ~266 MiB in fp16 (CLIP-L is 246 MiB of it).

Layout: :mod:`~devtools.tiny_models.configs` (architectures, widths,
:func:`tiny_config`), :mod:`~devtools.tiny_models.cpu` (:func:`prepare_comfy_cpu`),
:mod:`~devtools.tiny_models.weights` (seeded initialisation),
:mod:`~devtools.tiny_models.builders` (diffusion model, CLIP, VAE),
:mod:`~devtools.tiny_models.sampling` (encode, sample), :mod:`~devtools.tiny_models.lora`,
:mod:`~devtools.tiny_models.checkpoints` (single-file checkpoints) and
:mod:`~devtools.tiny_models.sanity`. Everything public is importable from this package.

Run ``python -m devtools.tiny_models [--comfyui PATH]`` for a sanity run.
"""

from .builders import build_clip, build_model, build_vae, encoded_picture, smooth_in_time_
from .checkpoints import load_checkpoint_checked, tiny_checkpoint_tensors, write_tiny_checkpoint
from .configs import ARCHS, CONFIG_CLASS, latent_channels, tiny_config
from .cpu import inside_running_comfyui, prepare_comfy_cpu
from .lora import make_test_lora
from .sampling import encode_prompt, sample_tiny
from .sanity import sanity_check
from .weights import check_finite, deterministic_init_

__all__ = [
    "ARCHS",
    "CONFIG_CLASS",
    "build_clip",
    "build_model",
    "build_vae",
    "check_finite",
    "deterministic_init_",
    "encode_prompt",
    "encoded_picture",
    "inside_running_comfyui",
    "latent_channels",
    "load_checkpoint_checked",
    "make_test_lora",
    "prepare_comfy_cpu",
    "sample_tiny",
    "sanity_check",
    "smooth_in_time_",
    "tiny_checkpoint_tensors",
    "tiny_config",
    "write_tiny_checkpoint",
]
