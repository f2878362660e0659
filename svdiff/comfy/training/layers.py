"""The trainable layers of a run and how they sit on a ComfyUI patcher.

Spectral shifts replace a layer's ``forward`` through an object patch; elementwise and
full-weight deltas are weight wrappers, so ComfyUI loads, unloads and restores them like
any other patch. :class:`TrainableLayers` makes them from the base weights (decompositions
cached) and turns them back into a :class:`SpectralShift`.
"""

from __future__ import annotations

import comfy.model_management
import comfy.utils
import torch

from ...activation import ConvGeometry
from ...cache import content_hash, default_cache
from ...fileformat import HASH_CHARS
from ...shift import SpectralShift
from ...training.config import TrainConfig
from ...training.layers import ShiftedLayer, shifted_call
from ...training.subsets import select_parameters
from ..bypass import bypassed_weights


class ElementwiseDelta(torch.nn.Module):
    """Weight wrapper ``w ↦ w + d`` for a 1-D weight or a bias (ComfyUI weight_function)."""

    def __init__(self, delta: torch.nn.Parameter):
        super().__init__()
        self.delta = delta

    def __call__(self, weight):
        return weight + self.delta.to(weight.dtype)

    def passive_memory_usage(self):
        return self.delta.numel() * self.delta.element_size()

    def move_to(self, device):
        self.delta.data = self.delta.data.to(device)
        return self.passive_memory_usage()


def _weight_and_bias(module: torch.nn.Module, x: torch.Tensor):
    if hasattr(module, "comfy_cast_weights"):
        import comfy.ops

        return comfy.ops.cast_bias_weight(module, x)
    bias = None if module.bias is None else module.bias.to(x.dtype)
    return module.weight.to(x.dtype), bias


def install_layers(patcher, layers: dict[str, ShiftedLayer], elementwise: dict[str, torch.nn.Parameter]) -> None:
    """Object-patch each shifted layer's forward; weight-wrap each elementwise delta."""
    for key, layer in layers.items():
        path = key[: -len(".weight")]
        module = comfy.utils.get_attr(patcher.model, path)
        geometry = ConvGeometry.of(module)
        frozen = type(module).forward.__get__(module)

        def forward(x, *args, _layer=layer, _frozen=frozen, _module=module, _geometry=geometry, **kwargs):
            return shifted_call(_layer, x, lambda inp: _frozen(inp, *args, **kwargs), lambda inp: _weight_and_bias(_module, inp), _geometry)

        patcher.add_object_patch(f"{path}.forward", forward)
    for key, delta in elementwise.items():
        patcher.add_weight_wrapper(key, ElementwiseDelta(delta))


def release_training_hooks(model, clip=None) -> None:
    """Restore the shared modules after training, whatever happened.

    The training clone may still be loaded (its layer wrappers set as object patches on
    the model's modules), and ComfyUI's unpatch keeps a fully loaded model's weight
    wrappers in ``weight_function`` until the next load; both hold trainable tensors.
    """
    comfy.model_management.unload_all_models()
    roots = [model.model] + ([clip.patcher.model] if clip is not None else [])
    for root in roots:
        for module in root.modules():
            for attribute in ("weight_function", "bias_function"):
                wrappers = getattr(module, attribute, None)
                if wrappers:
                    setattr(module, attribute, [w for w in wrappers if not isinstance(w, ElementwiseDelta)])


TEXT_SKIP = ("embedding", "position_ids")
"""Text-encoder weights never shifted: a 49408-row vocabulary matrix would cost more per
step than the whole UNet, and position ids are not weights."""


class TrainableLayers:
    """What a run trains, by kind: spectral shifts of the diffusion model's 2-D/4-D
    weights, elementwise deltas of its 1-D weights, full K/V deltas (Custom Diffusion)
    and spectral shifts of the text encoder's Linear layers, with the hashes of the base
    weights they were made on. ``resume`` (a shift file) gives the starting values."""

    def __init__(self, model, config: TrainConfig, clip=None, resume: SpectralShift | None = None, progress=None):
        shapes = {k: tuple(v.shape) for k, v in model.model_state_dict().items()}
        if config.method == "full":
            keys = select_parameters(shapes, "UNet-CA-KV")
            if not keys:
                raise ValueError("full K/V training needs cross-attention (attn2.to_k / to_v) layers; this model has none")
        else:
            keys = select_parameters(shapes, config.subset, config.patterns)
        if not keys:
            raise ValueError(
                f"layers '{config.subset}' with name_patterns '{config.patterns}' matches no weight of this model; choose another "
                "subset or fix name_patterns (substrings, globs or re:regex of layer names such as 'attn2.to_k')"
            )
        _refuse_patched(model, keys, "the MODEL already carries patches (LoRAs or shifts, as weight patches or in bypass mode)",
                        "train on the base model and stack the LoRA or shift afterwards")  # fmt: skip
        self.base_hashes: dict[str, str] = {}
        self.spectral: dict[str, ShiftedLayer] = {}
        self.elementwise: dict[str, torch.nn.Parameter] = {}
        self.full: dict[str, torch.nn.Parameter] = {}
        self.text: dict[str, ShiftedLayer] = {}
        bases = _Bases(model, self.base_hashes)
        spectral_keys = [k for k in keys if len(shapes[k]) >= 2] if config.method == "spectral" else []
        for i, key in enumerate(spectral_keys):
            self.spectral[key] = bases.shifted_layer(key, shapes[key], config.rank, _resumed(resume, key, ".delta"))
            if progress is not None:
                progress(i + 1, len(spectral_keys))
        for key in keys:
            if len(shapes[key]) == 1:
                bases.hash(key)
                start = _resumed(resume, key, ".diff")
                start = torch.zeros(shapes[key], dtype=torch.float32) if start is None else start.float().clone()
                self.elementwise[key] = torch.nn.Parameter(start)
        if config.method == "full":
            for key in keys:
                bases.hash(key)
                self.full[key] = torch.nn.Parameter(torch.zeros(shapes[key], dtype=torch.float32))
        if config.train_text_encoder:
            if clip is None:
                raise ValueError("train_text_encoder is on but no CLIP was given; connect the CLIP or turn it off")
            self.text = _text_encoder_layers(clip, config, self.base_hashes, resume)

    @property
    def count(self) -> int:
        """Diffusion-model layers trained (what the nodes report)."""
        return len(self.spectral) + len(self.elementwise) + len(self.full)

    def install(self, patcher, text_patcher=None) -> None:
        """Move the trainable tensors to the patchers' devices and patch them in."""
        for layer in self.spectral.values():
            layer.to(patcher.load_device)
        for delta in (*self.elementwise.values(), *self.full.values()):
            delta.data = delta.data.to(patcher.load_device)
        install_layers(patcher, self.spectral, {**self.elementwise, **self.full})
        if text_patcher is not None and self.text:
            for layer in self.text.values():
                layer.to(text_patcher.load_device)
            install_layers(text_patcher, self.text, {})

    def groups(self) -> dict[str, list[torch.nn.Parameter]]:
        """The optimizer's parameter groups (each has its own learning rate)."""
        return {
            "spectral": [layer.delta for layer in self.spectral.values()],
            "1d": list(self.elementwise.values()),
            "text": [layer.delta for layer in self.text.values()],
            "full": list(self.full.values()),
        }

    def names(self) -> dict[int, str]:
        """Parameter identity → the name its training state is saved under."""
        names = {id(layer.delta): key for key, layer in self.spectral.items()}
        names |= {id(p): key for key, p in self.elementwise.items()}
        names |= {id(layer.delta): "text_encoders." + key for key, layer in self.text.items()}
        names |= {id(p): key for key, p in self.full.items()}
        return names

    def snapshot(self, architecture: str | None, metadata: dict[str, str] | None) -> SpectralShift:
        """The values so far as a shift (float32 on the CPU)."""
        tensors = {}
        for key, layer in self.spectral.items():
            tensors[_stem(key) + ".delta"] = layer.delta.detach().float().cpu().clone()
        for key, layer in self.text.items():
            delta = layer.delta.detach().float().cpu().clone()
            # Layers off the path to the UNet (the pooled projection on SD1.x, the layers
            # after the hidden layer a model reads) get no gradient; leave them out.
            if bool(delta.any()):
                tensors["text_encoders." + _stem(key) + ".delta"] = delta
        for key, delta in {**self.elementwise, **self.full}.items():
            tensors[_stem(key) + ".diff"] = delta.detach().float().cpu().clone()
        meta = dict(metadata or {})
        meta["svdiff.architecture"] = architecture or "unknown"
        return SpectralShift(tensors, meta, dict(self.base_hashes), name=meta.get("svdiff.name", "trained"))


def _stem(key: str) -> str:
    return key[: -len(".weight")]


def _resumed(resume: SpectralShift | None, key: str, suffix: str) -> torch.Tensor | None:
    return None if resume is None else resume.tensors.get(_stem(key) + suffix)


class _Bases:
    """The unpatched weights of a patcher, hashed (and decomposed) one at a time, so that
    no reference to them outlives the trainable layers' creation."""

    def __init__(self, patcher, hashes: dict[str, str]):
        self.key_patches = patcher.get_key_patches()
        self.hashes = hashes
        self.cache = default_cache()

    def hash(self, key: str) -> tuple[torch.Tensor, str]:
        base, convert = self.key_patches[key][0]
        base = convert(base, inplace=False)
        digest = content_hash(base)
        self.hashes[key] = digest[:HASH_CHARS]  # CLIP parameter keys never collide with diffusion_model.*
        return base, digest

    def shifted_layer(self, key: str, shape: tuple[int, ...], rank: int, init: torch.Tensor | None) -> ShiftedLayer:
        base, digest = self.hash(key)
        return ShiftedLayer(self.cache.get_or_compute(base, digest), shape, rank=rank or None, init=init)


def _refuse_patched(patcher, keys: list[str], what: str, fix: str) -> None:
    patched = [k for k in keys if patcher.patches.get(k)] or bypassed_weights(patcher, keys)
    if patched:
        raise ValueError(f"{what} on {len(patched)} of the layers to train, e.g. '{patched[0]}'; {fix}")


def _text_encoder_layers(clip, config: TrainConfig, base_hashes: dict, resume=None) -> dict[str, ShiftedLayer]:
    """Spectral shifts on every Linear of the text encoder(s), embeddings excluded."""
    patcher = clip.patcher
    shapes = {k: tuple(v.shape) for k, v in patcher.model_state_dict().items()}
    keys = sorted(k for k, shape in shapes.items() if k.endswith(".weight") and len(shape) == 2 and not any(s in k for s in TEXT_SKIP))
    _refuse_patched(patcher, keys, "the CLIP already carries patches", "train on the base CLIP and stack afterwards")
    bases = _Bases(patcher, base_hashes)
    return {key: bases.shifted_layer(key, shapes[key], config.rank, _resumed(resume, "text_encoders." + key, ".delta")) for key in keys}
