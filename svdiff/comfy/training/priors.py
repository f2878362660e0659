"""Prior-preservation data: class images given, or generated with the base model (cached)."""

from __future__ import annotations

import hashlib
import json
import logging

import comfy.sample
import torch
from safetensors.torch import load_file

from ...atomic import atomic_save
from ...cache import content_hash, default_cache
from ...training import data as training_data
from ..progress import NodeProgress
from .examples import Example, dataset_examples

log = logging.getLogger("svdiff")

PRIOR_STEPS, PRIOR_CFG = 25, 7.0


def model_fingerprint(model) -> str:
    """Cheap identity of a base model: hashes of a few of its weights (memoised)."""
    state = model.model_state_dict()
    keys = sorted(k for k in state if k.startswith("diffusion_model.") and state[k].ndim >= 2)
    picked = [keys[0], keys[len(keys) // 2], keys[-1]] if keys else []
    return hashlib.sha256("".join(content_hash(state[k]) for k in picked).encode()).hexdigest()[:16]


def generate_prior(model, clip, prompt: str, count: int, resolution: int, seed: int, progress=None) -> list[torch.Tensor]:
    """Class images from the base model (DreamBooth practice), cached on disk as latents.

    ``progress(done, total)`` after each image (default: the node's progress bar)."""
    settings = [model_fingerprint(model), prompt, count, resolution, seed, PRIOR_STEPS, PRIOR_CFG]
    key = hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:24]
    path = default_cache().directory / "priors" / f"{key}.safetensors"
    if path.is_file():
        latents = load_file(str(path))["latents"]
        log.info("SVDiff: %d prior latents for '%s' from cache", latents.shape[0], prompt)
        return [latents[i : i + 1] for i in range(latents.shape[0])]
    log.info("SVDiff: generating %d prior images for '%s'", count, prompt)
    positive = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))
    negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    channels = model.get_model_object("latent_format").latent_channels
    latents = []
    progress = progress or NodeProgress(None, count)
    for i in range(count):
        empty = torch.zeros(1, channels, resolution // 8, resolution // 8)
        noise = comfy.sample.prepare_noise(empty, seed + i)
        sample = comfy.sample.sample(
            model, noise, PRIOR_STEPS, PRIOR_CFG, "euler", "normal", positive, negative, empty, seed=seed + i, disable_pbar=True
        )
        latents.append(sample.cpu())
        progress(i + 1, count)
    atomic_save(path, {"latents": torch.cat(latents).contiguous()}, {"prompt": prompt}, overwrite=True)
    return latents


def prior_examples(model, clip, vae, class_dataset, class_images, class_prompt, num_class_images, resolution, seed, phases=None):
    """The prior examples from the first source given: a dataset, IMAGEs with ``class_prompt``, or generated ones.

    ``phases(text)`` gives the ``progress(done, total)`` of the work, named by what it is."""
    phases = phases or (lambda text: None)
    prompt = class_prompt.strip()
    if class_dataset is not None:
        return dataset_examples(vae, class_dataset, flip=False, progress=phases("encoding the prior images"))
    if class_images is not None:
        if not prompt:
            raise ValueError("class_images is connected but class_prompt is empty; write the class of the subject, e.g. 'photo of a dog'")
        dataset = training_data.from_images(class_images, [prompt], resolution)
        return dataset_examples(vae, dataset, flip=False, progress=phases("encoding the prior images"))
    if num_class_images > 0:
        if not prompt:
            raise ValueError("class_prompt is empty; write the class of your subject (e.g. 'photo of a dog') or set prior_weight to 0")
        latents = generate_prior(model, clip, prompt, num_class_images, resolution, seed, phases("generating prior images"))
        return [Example(lat, prompt) for lat in latents]
    raise ValueError(
        "prior_weight is above 0 but there is no prior data: connect class_images or class_dataset, "
        "or set class_prompt and num_class_images to generate them, or set prior_weight to 0"
    )


def attach_class_images(dataset, model, clip, vae, num_class_images: int, seed: int, progress=None):
    """A Cut-Mix-Unmix dataset with generated class images for subjects that have none."""
    if dataset.has_class_images():
        return dataset
    if num_class_images <= 0:
        raise ValueError(
            "prior_weight is above 0 but the Cut-Mix-Unmix subjects have no class images: connect class_1, class_2, … on the "
            "Cut-Mix-Unmix node, or set num_class_images to generate them, or set prior_weight to 0"
        )
    images, captions = [], []
    for subject in dataset.subjects:
        prompt = f"photo of a {subject.class_phrase}"
        latents = generate_prior(model, clip, prompt, num_class_images, dataset.resolution, seed, progress)
        with torch.inference_mode():
            images.append([vae.decode(lat)[0, ..., :3].float().cpu() for lat in latents])
        captions.append([prompt] * num_class_images)
    return dataset.with_class_images(images, captions)
