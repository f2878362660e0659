"""Bypass mode: spectral shifts as forward hooks, against float64 references and the weight patch.

ComfyUI ≥ v0.11 loads adapters as forward hooks ("Load LoRA (Bypass)",
``LoraModelLoader(bypass=True)``, the Train LoRA node's ``bypass_mode``); the
extension's own loaders have a ``mode: bypass`` on every version. Per layer, the
hooked output is compared with ``(W + ΔW) x + b`` where ΔW comes from a float64
``torch.linalg.svd`` and the paper's formula; per model, the denoiser output in bypass
mode is compared with the weight patch's.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from comfyui_svdiff.svdiff.comfy.patching import apply_shift
from comfyui_svdiff.svdiff.fileformat import write_shift
from comfyui_svdiff.svdiff.spectral import decompose
from devtools import tiny_models
from integration.helpers import base_state, clamping_pair, patched_state_dict, random_shift

ARCHS = ["SD15", "SDXL", "Flux"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _has_stock_bypass() -> bool:
    import comfy.sd

    return hasattr(comfy.sd, "load_bypass_lora_for_models")


def needs_stock_bypass():
    if not _has_stock_bypass():
        pytest.skip("this ComfyUI has no bypass LoRA loader (comfy.sd.load_bypass_lora_for_models, added in v0.11)")


# ----------------------------------------------------------------------------------
# One layer


def _weight_with_tail(shape, seed: int) -> torch.Tensor:
    """A random weight whose last singular values are ~1e-3 σ_max (the explicit tail)."""
    g = torch.Generator().manual_seed(seed)
    matrix = torch.randn(shape[0], int(torch.tensor(shape[1:]).prod()), generator=g, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    s[-2:] = s[0] * torch.tensor([2e-3, 5e-4], dtype=torch.float64)
    return ((u * s) @ vh).reshape(shape).float()


def _reference(module: torch.nn.Module, delta: torch.Tensor, strength: float, x: torch.Tensor) -> torch.Tensor:
    """``(W + U diag(ReLU(σ + sδ) − σ) Vᵀ) x + b`` in float64."""
    w = module.weight.detach().double()
    matrix = w.reshape(w.shape[0], -1)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    d = torch.zeros_like(s)
    d[: delta.shape[0]] = strength * delta.double()
    shifted = (matrix + (u * (torch.relu(s + d) - s)) @ vh).reshape(w.shape)
    bias = None if module.bias is None else module.bias.detach().double()
    if isinstance(module, torch.nn.Linear):
        return F.linear(x.double(), shifted, bias)
    return F.conv2d(x.double(), shifted, bias, module.stride, module.padding, module.dilation)


LAYERS = {
    "linear, m < n": (lambda: torch.nn.Linear(24, 16), (5, 24)),
    "linear, m > n": (lambda: torch.nn.Linear(8, 20), (3, 2, 8)),
    "3x3 conv, stride 2, padding 1": (lambda: torch.nn.Conv2d(8, 6, 3, stride=2, padding=1), (2, 8, 9, 9)),
    "3x3 conv, dilation 2, padding 2": (lambda: torch.nn.Conv2d(4, 12, 3, padding=2, dilation=2), (1, 4, 8, 8)),
    "3x3 conv, m > n (like conv_in)": (lambda: torch.nn.Conv2d(2, 24, 3, padding=1), (2, 2, 7, 7)),
    "1x1 conv, m > n, stride 2": (lambda: torch.nn.Conv2d(6, 16, 1, stride=2), (2, 6, 8, 8)),
}


def _layer(name: str, seed: int = 0):
    make, x_shape = LAYERS[name]
    torch.manual_seed(seed)
    module = make()
    with torch.no_grad():
        module.weight.copy_(_weight_with_tail(tuple(module.weight.shape), seed))
    x = torch.randn(x_shape, generator=torch.Generator().manual_seed(seed + 1))
    r = min(module.weight.shape[0], module.weight[0].numel())
    delta = 0.3 * torch.randn(r, generator=torch.Generator().manual_seed(seed + 2))
    delta[0] = -1e3  # the ReLU clamps σ₁ to zero
    delta[-1] = 0.4  # a tail direction moves
    return module, x, delta


class _InnerHook:
    """Stands for another bypass adapter hooked *inside* ours (e.g. a LoRA loaded first)."""

    def __init__(self, module, extra):
        self.module, self.extra = module, extra
        self.original_forward = module.forward
        module.forward = self.forward

    def forward(self, x, *args, **kwargs):
        return self.original_forward(x, *args, **kwargs) + self.extra(x)


@pytest.mark.parametrize("name", list(LAYERS))
def test_bypass_hook_equals_the_float64_shifted_layer(comfy_handle, name):
    from comfyui_svdiff.svdiff.comfy.adapter import SpectralShiftAdapter
    from comfyui_svdiff.svdiff.comfy.bypass import _ShiftHook

    module, x, delta = _layer(name)
    decomposition = decompose(module.weight.detach())
    assert decomposition.tail is not None  # the explicit small-σ directions are exercised
    weight_before = module.weight.detach().clone()
    expected = _reference(module, delta, 0.8, x)
    adapter = SpectralShiftAdapter.create({"w"}, ((0.8, delta),), decomposition)
    hook = _ShiftHook(module, adapter)
    hook.inject()
    with torch.no_grad():
        got = module(x)
    assert rel(got, expected) < 2e-6, name
    assert torch.equal(module.weight, weight_before)  # the weight is never touched
    # h(x, f(x)) is the same ΔW x
    with torch.no_grad():
        plain = type(module).forward(module, x)
        assert rel(plain + adapter.h(x, plain), expected) < 2e-6
    hook.eject()
    assert "forward" not in module.__dict__

    # With another bypass adapter inside ours, ΔW is still taken against the bare layer.
    def extra(t):  # some other function of the input, added inside ours
        return 0.1 * type(module).forward(module, t.flip(-1))

    inner = _InnerHook(module, extra)
    hook.inject()
    with torch.no_grad():
        got = module(x)
        wanted = expected + extra(x).double()
    assert rel(got, wanted) < 2e-6, name
    hook.eject()
    module.forward = inner.original_forward


@pytest.mark.parametrize("name", list(LAYERS))
def test_train_lora_adapter_trains_the_same_in_bypass_and_weight_mode(comfy_handle, name):
    """SpectralShiftTrain: bypass forward and weight wrapper give one output and one gradient."""
    from comfyui_svdiff.svdiff.comfy.adapter import SpectralShiftTrain

    module, x, delta = _layer(name)
    outputs, grads = [], []
    for bypass in (False, True):
        train = SpectralShiftTrain(None, weight=module.weight.detach())
        with torch.no_grad():
            train.delta.copy_(delta)
        if bypass:
            y = train.bypass_forward(module.forward, x)
        else:
            w = train(module.weight.detach())
            b = module.bias.detach()
            y = (
                F.linear(x, w, b)
                if isinstance(module, torch.nn.Linear)
                else F.conv2d(x, w, b, module.stride, module.padding, module.dilation)
            )
        (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
        outputs.append(y.detach())
        grads.append(train.delta.grad.clone())
    assert rel(outputs[1], outputs[0]) < 2e-6
    assert rel(outputs[0], _reference(module, delta, 1.0, x)) < 2e-6
    assert rel(grads[1], grads[0]) < 1e-5 and grads[0].abs().sum() > 0


# ----------------------------------------------------------------------------------
# Whole models


def _sample(model, clip, arch: str, seed: int = 3) -> torch.Tensor:
    """One euler step from pure noise at cfg 1: the denoiser's x̂₀ for a fixed input."""
    cond = tiny_models.encode_prompt(clip, "a photo of a sks dog")
    return tiny_models.sample_tiny(model, cond, cond, arch, seed=seed, steps=1, cfg=1.0)


def _model_weights_are_base(patcher, base: dict) -> None:
    """Every ≥2-D weight as it is while loaded equals the unpatched one bit for bit."""
    loaded = patched_state_dict(patcher)
    spectral = [k for k, v in base.items() if v.ndim >= 2 and "embedding" not in k]
    assert spectral and all(torch.equal(loaded[k], base[k]) for k in spectral)


@pytest.mark.parametrize("arch", ARCHS)
def test_bypass_mode_gives_the_weight_patch_output(build, arch):
    model, clip = build(arch)
    shift = random_shift(model, clip, seed=11)
    base = _sample(model, clip, arch)
    patch_m, patch_c, _ = apply_shift(model, clip, shift, 0.7, 0.9, mode="patch")
    patched = _sample(patch_m, patch_c, arch)
    bypass_m, bypass_c, report = apply_shift(model, clip, shift, 0.7, 0.9, mode="bypass")
    assert report.mode == "bypass" and "bypass mode" in report.summary()
    got = _sample(bypass_m, bypass_c, arch)
    assert rel(patched, base) > 1e-2  # the shift does something
    assert rel(got, patched) < 1e-4
    _model_weights_are_base(bypass_m, base_state(model))
    # embeddings (token ids in, no activation form) stay weight patches; everything else is hooked
    embeddings = [f"{n}.weight" for n, m in clip.cond_stage_model.named_modules() if isinstance(m, torch.nn.Embedding)]
    kept = [k for k in embeddings if any(getattr(p[1], "name", "") == "svdiff" for p in bypass_c.patcher.patches.get(k, []))]
    assert embeddings and kept == [k for k in embeddings if f"text_encoders.{k[:-7]}.delta" in shift.tensors]
    # strength 0 returns the input model itself
    assert apply_shift(model, clip, shift, 0.0, 0.0, mode="bypass")[:2] == (model, clip)


@pytest.mark.parametrize("arch", ["SD15", "SDXL"])
def test_chained_shifts_in_either_mode_share_one_relu(build, arch):
    """Patch then bypass, bypass then bypass: the same as two chained weight patches (eqs. 4, 5)."""
    model, clip = build(arch)
    first, second = clamping_pair(model)
    reference = _sample(apply_shift(apply_shift(model, None, first, 0.8, 0.0)[0], None, second, 1.5, 0.0)[0], clip, arch)
    for first_mode, second_mode in [("patch", "bypass"), ("bypass", "bypass"), ("bypass", "patch")]:
        m1, _, _ = apply_shift(model, None, first, 0.8, 0.0, mode=first_mode)
        m2, _, _ = apply_shift(m1, None, second, 1.5, 0.0, mode=second_mode)
        assert rel(_sample(m2, clip, arch), reference) < 1e-4, (first_mode, second_mode)
        adapters = [p[1] for patches in m2.patches.values() for p in patches if getattr(p[1], "name", "") == "svdiff"]
        hooked = [k for k in m2.injections if k.startswith("svdiff_bypass")]
        if second_mode == "bypass":
            assert not adapters and len(hooked) == 1
        else:
            assert adapters and not hooked


def _lora_file(shift, clip, tmp_path) -> dict:
    """A shift as ComfyUI's LoRA loaders read it from a file (no embedding keys: see below)."""
    import comfy.utils

    embeddings = {f"text_encoders.{n}." for n, m in clip.cond_stage_model.named_modules() if isinstance(m, torch.nn.Embedding)}
    shift.tensors = {k: v for k, v in shift.tensors.items() if not any(k.startswith(e) for e in embeddings)}
    path = write_shift(tmp_path / f"{shift.name}.safetensors", shift, precision="fp32")
    return comfy.utils.load_torch_file(str(path), safe_load=True)


@pytest.mark.parametrize("arch", ARCHS)
def test_stock_bypass_loaders_apply_a_shift_file(build, arch, tmp_path):
    """ "Load LoRA (Bypass)" and LoraModelLoader(bypass=True) give SVDiffLoader's weight-patch output.

    Token and position embeddings have no bypass form (their input is token ids): the
    extension's own bypass mode keeps them as weight patches, the stock loaders would
    refuse them, so the file here has none.
    """
    needs_stock_bypass()
    import comfy.sd
    from comfy_extras.nodes_train import LoraModelLoader

    model, clip = build(arch)
    shift = random_shift(model, clip, seed=12)
    lora = _lora_file(shift, clip, tmp_path)
    base = _sample(model, clip, arch)
    reference = _sample(*apply_shift(model, clip, shift, 0.7, 1.1)[:2], arch)
    stock_m, stock_c = comfy.sd.load_bypass_lora_for_models(model, clip, lora, 0.7, 1.1)
    assert "bypass_lora" in stock_m.injections
    assert rel(_sample(stock_m, stock_c, arch), reference) < 1e-4
    model_only = {k: v for k, v in lora.items() if k.startswith("diffusion_model.")}
    node_m = LoraModelLoader.execute(model, model_only, 0.7, bypass=True).result[0]
    reference_m = _sample(apply_shift(model, None, shift, 0.7, 0.0)[0], clip, arch)
    assert rel(_sample(node_m, clip, arch), reference_m) < 1e-4
    zero_m, zero_c = comfy.sd.load_bypass_lora_for_models(model, clip, lora, 0.0, 0.0)
    assert torch.equal(_sample(zero_m, zero_c, arch), base)


@pytest.mark.parametrize("arch", ARCHS)
def test_bypass_shift_stacks_with_a_bypass_lora_in_either_order(build, arch):
    needs_stock_bypass()
    import comfy.sd

    model, clip = build(arch)
    shift = random_shift(model, None, seed=13)
    lora = tiny_models.make_test_lora(model=model, clip=None, rank=4, seed=5, scale=0.5)
    shifted = apply_shift(model, None, shift, 0.6, 0.0)[0]
    reference = _sample(comfy.sd.load_lora_for_models(shifted, None, lora, 0.9, 0.0)[0], clip, arch)
    assert rel(reference, _sample(shifted, clip, arch)) > 1e-2  # the LoRA does something on top
    lora_first = comfy.sd.load_bypass_lora_for_models(model, None, lora, 0.9, 0.0)[0]
    lora_first = apply_shift(lora_first, None, shift, 0.6, 0.0, mode="bypass")[0]
    shift_first = apply_shift(model, None, shift, 0.6, 0.0, mode="bypass")[0]
    shift_first = comfy.sd.load_bypass_lora_for_models(shift_first, None, lora, 0.9, 0.0)[0]
    for stacked, order in [(lora_first, "LoRA, then shift"), (shift_first, "shift, then LoRA")]:
        assert rel(_sample(stacked, clip, arch), reference) < 1e-4, order


def test_stock_bypass_loader_refuses_an_embedding_shift_with_a_message(build, tmp_path):
    needs_stock_bypass()
    import comfy.sd
    import comfy.utils

    model, clip = build("SD15")
    shift = random_shift(model, clip, seed=14)
    path = write_shift(tmp_path / "with_embeddings.safetensors", shift, precision="fp32")
    lora = comfy.utils.load_torch_file(str(path), safe_load=True)
    _, stock_clip = comfy.sd.load_bypass_lora_for_models(model, clip, lora, 1.0, 1.0)
    with pytest.raises(ValueError, match=r"on 'text_encoders\.clip_l\..*embedding.*': a Embedding layer .* load the file in patch mode"):
        tiny_models.encode_prompt(stock_clip, "a photo")
    tiny_models.encode_prompt(clip, "a photo")  # the base CLIP still works afterwards
