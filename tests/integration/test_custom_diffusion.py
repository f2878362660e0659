"""Custom Diffusion on tiny models: K/V + modifier-token training, stock loaders, closed-form merge."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_svdiff.svdiff.fileformat import read_shift
from comfyui_svdiff.svdiff.shift import SpectralShift
from integration.helpers import cd_train_prompt, patched_state_dict

pytestmark = pytest.mark.integration

KV = (".attn2.to_k.weight", ".attn2.to_v.weight")


def _kv_keys(model) -> list[str]:
    return sorted(k for k in model.model_state_dict() if k.startswith("diffusion_model.") and k.endswith(KV))


def _load_checkpoint(comfy_handle, name):
    """The tiny checkpoint with a CLIP that knows models/embeddings, as CheckpointLoaderSimple loads it."""
    import nodes

    return nodes.CheckpointLoaderSimple().load_checkpoint(name)


@pytest.fixture(scope="module")
def cat_folders(comfy_handle):
    """Three "<new1> cat" images and two real regularisation images with their own captions."""
    rng = np.random.default_rng(3)
    concept = comfy_handle.input_dir / "cd_cat"
    regs = comfy_handle.input_dir / "cd_regs"
    for folder, count, caption in ((concept, 3, "photo of a <new1> cat"), (regs, 2, None)):
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
            (folder / f"{i}.txt").write_text(caption or f"a photo of a cat on a sofa number {i}")
    return "cd_cat", "cd_regs"


def test_custom_diffusion_training_saves_stock_loadable_kv_deltas_and_an_embedding(comfy_handle, tiny_checkpoint, cat_folders, monkeypatch):
    import comfy.sd
    import comfy.utils

    from comfyui_svdiff.svdiff.comfy import loss_stream

    monkeypatch.setattr(loss_stream, "prompt_server", lambda: comfy_handle.server)
    result = comfy_handle.run_prompt(cd_train_prompt(tiny_checkpoint, cat_folders), fresh_executor=True, timeout=900)
    assert result.success, result.error_message
    text = result.output("4")["text"][0]
    assert "embedding:cd_test" in text and "6 augmented examples" in text  # 3 images × 2 variants
    lora_path = comfy_handle.model_dir("loras") / "cd_test.safetensors"
    embedding_path = comfy_handle.model_dir("embeddings") / "cd_test.safetensors"
    deltas = read_shift(lora_path)
    model, clip, _ = _load_checkpoint(comfy_handle, tiny_checkpoint)
    kv = _kv_keys(model)
    # Only the cross-attention K/V weights, as full-weight deltas in ComfyUI's .diff form.
    assert sorted(deltas.tensors) == sorted(k[: -len(".weight")] + ".diff" for k in kv)
    shapes = {k: tuple(v.shape) for k, v in model.model_state_dict().items()}
    assert all(tuple(deltas.tensors[k[: -len(".weight")] + ".diff"].shape) == shapes[k] for k in kv)
    assert all(float(t.abs().max()) > 0 for t in deltas.tensors.values())
    assert deltas.metadata["svdiff.method"] == "custom-diffusion" and deltas.metadata["svdiff.embedding"] == "cd_test"
    summary = json.loads(deltas.metadata["svdiff.training"])
    # Real regularisation images with their own captions, augmented captions with the reference's words.
    assert any(c.startswith("a photo of a cat on a sofa") for c in summary["captions"])
    assert all(c.endswith("photo of a <new1> cat") for c in summary["captions"] if "<new1>" in c)

    # ComfyUI's stock LoRA loader applies the file: W₀ + Δ on K/V, nothing else.
    base = patched_state_dict(model)
    raw = comfy.utils.load_torch_file(str(lora_path), safe_load=True)
    loaded, _ = comfy.sd.load_lora_for_models(model, clip, raw, 1.0, 0.0)
    patched = patched_state_dict(loaded)
    for key, weight in base.items():
        if key in kv:
            expected = weight.double() + raw[key[: -len(".weight")] + ".diff"].double()
            assert torch.allclose(patched[key].double(), expected, atol=1e-6), key
        else:
            assert torch.equal(patched[key], weight), key

    # The embedding loads through ComfyUI's own mechanism in CLIPTextEncode, and gives what
    # the reference implementation does: the vector as a new row of the token table.
    from safetensors.torch import load_file

    import nodes

    vector = load_file(str(embedding_path))["clip_l"]
    table = clip.cond_stage_model.clip_l.transformer.get_input_embeddings().weight
    init_id = 48136  # "sks": the reference construction gives V* a row of the table
    assert vector.shape == (1, table.shape[1]) and not torch.allclose(vector[0], table[42170].float())  # it trained
    (cond_embedding,) = nodes.CLIPTextEncode().encode(clip, "photo of a embedding:cd_test cat")[0]
    reference_clip = clip.clone()
    with torch.no_grad():
        saved_row = table[init_id].clone()
        table[init_id] = vector[0].to(table.dtype)  # "sks" now means V*
        try:
            (cond_row,) = nodes.CLIPTextEncode().encode(reference_clip, "photo of a sks cat")[0]
        finally:
            table[init_id] = saved_row
    (cond_plain,) = nodes.CLIPTextEncode().encode(clip, "photo of a sks cat")[0]
    # The table row is stored in the CLIP's dtype; the embedding path keeps float32.
    tolerance = 1e-5 if table.dtype == torch.float32 else 4e-3
    assert torch.allclose(cond_embedding[0], cond_row[0], atol=tolerance)
    assert (cond_embedding[0] - cond_plain[0]).abs().max() > 10 * tolerance

    # Never overwrite silently: a second run numbers both files together.
    again = comfy_handle.run_prompt(cd_train_prompt(tiny_checkpoint, cat_folders, seed=4), fresh_executor=True, timeout=900)
    assert again.success, again.error_message
    assert (comfy_handle.model_dir("loras") / "cd_test_00001.safetensors").is_file()
    assert (comfy_handle.model_dir("embeddings") / "cd_test_00001.safetensors").is_file()
    assert "embedding:cd_test_00001" in again.output("4")["text"][0]


def test_spectral_deltas_on_the_same_data_for_comparison(comfy_handle, tiny_checkpoint, cat_folders, monkeypatch):
    from comfyui_svdiff.svdiff.comfy import loss_stream

    monkeypatch.setattr(loss_stream, "prompt_server", lambda: comfy_handle.server)
    prompt = cd_train_prompt(
        tiny_checkpoint, cat_folders, deltas="K/V spectral shifts (SVDiff)", filename_prefix="cd_spectral", modifier_token=""
    )
    result = comfy_handle.run_prompt(prompt, fresh_executor=True, timeout=900)
    assert result.success, result.error_message
    text = result.output("4")["text"][0]
    assert "augmented" not in text  # auto: off for spectral shifts
    shift = read_shift(comfy_handle.model_dir("spectral_shifts") / "cd_spectral.safetensors")
    assert shift.tensors and all(k.endswith(".delta") and (".attn2.to_k." in k or ".attn2.to_v." in k) for k in shift.tensors)
    assert not (comfy_handle.model_dir("embeddings") / "cd_spectral.safetensors").exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"modifier_token": "<new2>"}, "no caption of the dataset contains the modifier token '<new2>'"),
        ({"initializer_token": "photograph of"}, "initializer_token 'photograph of' must be one word"),
        ({"learning_rate": 0.0}, "learning_rate is 0.0"),
        ({"filename_prefix": "../escape"}, "filename_prefix '../escape' is not a valid name"),
    ],
)
def test_training_refusals_name_the_input(comfy_handle, tiny_checkpoint, cat_folders, overrides, message):
    result = comfy_handle.run_prompt(cd_train_prompt(tiny_checkpoint, cat_folders, **overrides), fresh_executor=True, timeout=300)
    assert not result.success
    assert message in (result.error_message or ""), result.error_message


def test_masked_loss_ignores_the_canvas(build):
    from comfyui_svdiff.svdiff.comfy.training.loss import native_mse

    model, _ = build("SD15")
    inner = model.model
    g = torch.Generator().manual_seed(0)
    x0, x_t, denoised = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    sigma = torch.tensor([1.0, 3.0])
    mask = torch.zeros(2, 1, 8, 8)
    mask[0, :, 2:5, 1:6] = 1
    mask[1] = 1
    loss = native_mse(inner, x_t, sigma, denoised, x0, mask)
    outside = denoised.clone()
    outside[0, :, 0] += 5.0  # row 0 is outside example 0's mask
    assert torch.equal(native_mse(inner, x_t, sigma, outside, x0, mask), loss)
    # By hand, in float64: eps models predict ε = (x_t − x̂₀)/σ.
    err = (
        (x_t.double() - denoised.double()) / sigma.double()[:, None, None, None]
        - (x_t.double() - x0.double()) / sigma.double()[:, None, None, None]
    ) ** 2
    expected0 = err[0][:, 2:5, 1:6].mean()
    assert float(loss[0]) == pytest.approx(float(expected0), rel=1e-5)
    assert float(loss[1]) == pytest.approx(float(err[1].mean()), rel=1e-5)


# ----------------------------------------------------------------------------------
# Closed-form merge


def _write_embedding(comfy_handle, name, clip, seed, vector=None):
    from safetensors.torch import save_file

    table = clip.cond_stage_model.clip_l.transformer.get_input_embeddings().weight
    if vector is None:
        vector = table[int(torch.randint(1000, 40000, (1,), generator=torch.Generator().manual_seed(seed)))].float().clone()
        vector = vector + 0.5 * vector.std() * torch.randn(vector.shape, generator=torch.Generator().manual_seed(seed))
    path = comfy_handle.model_dir("embeddings") / f"{name}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"clip_l": vector[None].contiguous()}, str(path))
    return vector


def _random_kv_deltas(model, seed, scale=0.3, name="concept") -> SpectralShift:
    g = torch.Generator().manual_seed(seed)
    state = model.model_state_dict()
    tensors = {}
    for key in _kv_keys(model):
        w = state[key].float()
        tensors[key[: -len(".weight")] + ".diff"] = scale * float(w.std()) * torch.randn(w.shape, generator=g)
    return SpectralShift(tensors, {"svdiff.architecture": type(model.model.model_config).__name__}, name=name)


@pytest.fixture(scope="module")
def merge_setup(comfy_handle, tiny_checkpoint):
    model, clip, _ = _load_checkpoint(comfy_handle, tiny_checkpoint)
    _write_embedding(comfy_handle, "t_cat", clip, 1)
    _write_embedding(comfy_handle, "t_dog", clip, 2)
    return model, clip


def _concepts(model):
    from comfyui_svdiff.svdiff.comfy.merge import Concept

    cat = Concept(_random_kv_deltas(model, 1, name="cat"), "embedding:t_cat", ["embedding:t_cat cat", "a photo of embedding:t_cat cat"])
    dog = Concept(_random_kv_deltas(model, 2, name="dog"), "embedding:t_dog", ["embedding:t_dog dog", "a photo of embedding:t_dog dog"])
    return [cat, dog]


def _full_features(clip, prompt, start):
    """Rows start … end token of the prompt's ordinary 77-token conditioning (CLIPTextEncode's)."""
    import nodes

    (cond,) = nodes.CLIPTextEncode().encode(clip, prompt)[0]
    flat = [t[0] for t in clip.tokenize(prompt)["l"][0]]
    end = next(i for i in range(1, len(flat)) if not torch.is_tensor(flat[i]) and flat[i] == 49407)
    return cond[0][0, start : end + 1].double()


def test_merged_kv_outputs_match_each_concept_and_stay_close_to_the_base(merge_setup):
    from comfyui_svdiff.svdiff.comfy import merge as comfy_merge

    model, clip = merge_setup
    concepts = _concepts(model)
    captions = comfy_merge.builtin_captions()
    assert 190 <= len(captions) <= 220 and len(set(captions)) == len(captions)
    merged, patches, report = comfy_merge.merge_concepts(model, clip, concepts, captions)
    assert not report.singular and report.layers == len(_kv_keys(model)) == len(patches)
    base = patched_state_dict(model)
    weights = patched_state_dict(merged)
    # The model's input is untouched: a clone carries the patch.
    assert not model.patches
    worst = 0.0
    for concept in concepts:
        for prompt in concept.prompts:
            start = next(i for i, t in enumerate(clip.tokenize(prompt)["l"][0]) if torch.is_tensor(t[0]))
            c = _full_features(clip, prompt, start)
            for key in _kv_keys(model):
                tuned = base[key].double() + concept.deltas.tensors[key[: -len(".weight")] + ".diff"].double()
                want = tuned @ c.T
                got = weights[key].double() @ c.T
                worst = max(worst, float(torch.linalg.norm(got - want) / torch.linalg.norm(want)))
    # Matches the fine-tuned outputs to the reported residual (float32 weights in the model).
    assert worst <= report.target_residual_max + 1e-5 and worst < 1e-4, (worst, report.target_residual_max)
    # Everyday captions: the merged layers move their outputs far less than either concept does.
    held_out = ["a red umbrella on a rainy street", "two people playing chess in a park", "a bowl of oranges on a table"]
    reg = torch.cat([_full_features(clip, text, 1) for text in held_out])
    for key in _kv_keys(model):
        w0 = base[key].double()
        merged_change = torch.linalg.norm((weights[key].double() - w0) @ reg.T)
        for concept in concepts:
            own = torch.linalg.norm(concept.deltas.tensors[key[: -len(".weight")] + ".diff"].double() @ reg.T)
            assert merged_change < 0.5 * own, (key, float(merged_change), float(own))
    assert report.regularization_change_max < 0.05


def test_batched_caption_features_equal_the_full_encoding(merge_setup):
    from comfyui_svdiff.svdiff.comfy import merge as comfy_merge

    _, clip = merge_setup
    texts = ["a dog", "a cup of coffee next to an open book on a table", "embedding:t_cat cat"]
    got = comfy_merge.text_features(clip, texts, [1, 1, 1])
    for text, rows in zip(texts, got, strict=True):
        assert torch.allclose(rows, _full_features(clip, text, 1), atol=1e-5)


def test_merge_refusals_and_the_singular_fallback(comfy_handle, merge_setup, build):
    from comfyui_svdiff.svdiff.comfy import merge as comfy_merge

    model, clip = merge_setup
    cat, dog = _concepts(model)
    captions = comfy_merge.builtin_captions()
    same = comfy_merge.Concept(dog.deltas, "embedding:t_cat", ["embedding:t_cat dog"])
    with pytest.raises(ValueError, match="both use the modifier token 'embedding:t_cat'"):
        comfy_merge.merge_concepts(model, clip, [cat, same], captions)
    with pytest.raises(ValueError, match="regularization captions: the list is empty"):
        comfy_merge.merge_concepts(model, clip, [cat, dog], [])
    sdxl, _ = build("SDXL")
    wrong = comfy_merge.Concept(_random_kv_deltas(sdxl, 5, name="xl"), "embedding:t_dog", ["embedding:t_dog dog"])
    with pytest.raises(ValueError, match=r"concept 2 'xl' \(embedding:t_dog\) does not fit this model"):
        comfy_merge.merge_concepts(model, clip, [cat, wrong], captions)
    # Two names, one vector: identical target features with different wanted outputs.
    vector = _write_embedding(comfy_handle, "t_twin_a", clip, 9)
    _write_embedding(comfy_handle, "t_twin_b", clip, 9, vector=vector)
    twins = [
        comfy_merge.Concept(_random_kv_deltas(model, 11, name="a"), "embedding:t_twin_a", ["embedding:t_twin_a cat"]),
        comfy_merge.Concept(_random_kv_deltas(model, 12, name="b"), "embedding:t_twin_b", ["embedding:t_twin_b cat"]),
    ]
    merged, _, report = comfy_merge.merge_concepts(model, clip, twins, captions)
    assert report.singular and report.rank < report.targets
    assert "singular system" in report.text() and "least squares" in report.text()
    assert report.target_residual_max > 1e-3  # they cannot both be met, and the report says by how much


def test_merge_nodes_through_the_executor(comfy_handle, tiny_checkpoint, merge_setup):
    import comfy.sd
    import comfy.utils

    from comfyui_svdiff.svdiff.comfy import merge as comfy_merge
    from comfyui_svdiff.svdiff.fileformat import write_shift

    model, clip = merge_setup
    cat, dog = _concepts(model)
    # A share of the shipped captions keeps this test of the node chain short (the math
    # with all of them is checked above; a merge with no captions is in the bad-input matrix).
    captions = comfy_merge.builtin_captions()[::10]
    for concept in (cat, dog):
        write_shift(
            comfy_handle.model_dir("loras") / f"kv_{concept.deltas.name}.safetensors", concept.deltas, precision="fp32", overwrite=True
        )
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny_checkpoint}},
        "2": {"class_type": "SVDiffLoadKVDeltas", "inputs": {"deltas_name": "kv_cat.safetensors"}},
        "3": {"class_type": "SVDiffLoadKVDeltas", "inputs": {"deltas_name": "kv_dog.safetensors"}},
        "4": {"class_type": "SVDiffConcept", "inputs": {"deltas": ["2", 0], "token": "embedding:t_cat", "class_word": "cat", "prompts": "{token} {class}\na photo of {token} {class}"}},
        "5": {"class_type": "SVDiffConcept", "inputs": {"deltas": ["3", 0], "token": "embedding:t_dog", "class_word": "dog", "prompts": "{token} {class}\na photo of {token} {class}", "concepts": ["4", 0]}},
        "6": {"class_type": "SVDiffMergeConcepts", "inputs": {"model": ["1", 0], "clip": ["1", 1], "concepts": ["5", 0], "builtin_captions": False, "extra_captions": "\n".join(captions), "filename_prefix": "merged_pets"}},
    }  # fmt: skip
    result = comfy_handle.run_prompt(prompt, fresh_executor=True, timeout=600)
    assert result.success, result.error_message
    text = result.output("6")["text"][0]
    assert "merged" in text and "saved models/loras/merged_pets.safetensors" in text
    _, patches, _ = comfy_merge.merge_concepts(model, clip, [cat, dog], captions)
    raw = comfy.utils.load_torch_file(str(comfy_handle.model_dir("loras") / "merged_pets.safetensors"), safe_load=True)
    loaded, _ = comfy.sd.load_lora_for_models(model, None, raw, 1.0, 0.0)
    weights = patched_state_dict(loaded)
    base = patched_state_dict(model)
    for key, delta in patches.items():
        assert torch.allclose(weights[key].float() - base[key].float(), delta, atol=2e-3 * float(delta.abs().max()) + 1e-6), key


@pytest.mark.parametrize("count", [3, 160])
def test_merge_report_advice_fits_the_caption_count(merge_setup, count):
    """Captions that span too few text-feature directions (the same one repeated): with few of
    them the report asks for more; with as many as the builtin list it says what the gap means."""
    from comfyui_svdiff.svdiff.comfy import merge as comfy_merge

    model, clip = merge_setup
    _, _, report = comfy_merge.merge_concepts(model, clip, _concepts(model), ["a photo of a dog"] * count)
    note = next(n for n in report.notes if "text-feature directions" in n)
    assert f"the {count} regularisation captions span {report.regularization_rank} of {report.width}" in note
    assert report.regularization_rank < report.width
    assert ("use more captions" in note) == (count < comfy_merge.ENOUGH_CAPTIONS), note
