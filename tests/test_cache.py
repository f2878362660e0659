"""Decomposition cache: content keys, memory and disk levels, staleness, eviction."""

from __future__ import annotations

import hashlib

import torch
from test_spectral import make_weight

from comfyui_svdiff.svdiff.cache import DecompositionCache, content_hash
from comfyui_svdiff.svdiff.spectral import decompose


def test_content_hash_is_sha256_of_dtype_shape_and_bytes():
    w = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    expected = hashlib.sha256(b"torch.float32|(2, 3)|" + w.numpy().tobytes()).hexdigest()
    assert content_hash(w) == expected
    assert content_hash(w.to(torch.bfloat16)) != content_hash(w.to(torch.float16))


def test_content_hash_memo_sees_in_place_changes():
    w = make_weight((8, 12), torch.float32)
    before = content_hash(w)
    assert content_hash(w) == before  # memoised
    w.add_(1e-3)  # e.g. a LoRA merged into the weights in place
    assert content_hash(w) != before
    with torch.no_grad():
        w.data.mul_(2.0)  # through .data (no autograd version bump on the parent view)
    after_data = content_hash(w)
    assert after_data == hashlib.sha256(f"{w.dtype}|{tuple(w.shape)}|".encode() + w.numpy().tobytes()).hexdigest()


def test_memory_hit_disk_hit_and_recompute(tmp_path):
    w = make_weight((16, 24), torch.float16)
    cache = DecompositionCache(tmp_path, ram_mb=64, disk_mb=64)
    first = cache.get_or_compute(w)
    assert cache.stats == {"ram_hits": 0, "disk_hits": 0, "computed": 1}
    assert cache.get_or_compute(w) is first
    assert cache.stats["ram_hits"] == 1
    # A new process: empty memory, same disk.
    fresh = DecompositionCache(tmp_path, ram_mb=64, disk_mb=64)
    loaded = fresh.get_or_compute(w.clone())
    assert fresh.stats["disk_hits"] == 1 and fresh.stats["computed"] == 0
    assert loaded.side == first.side and loaded.shape == first.shape
    assert torch.equal(loaded.basis, first.basis) and torch.equal(loaded.sigma, first.sigma)


def test_changed_weights_never_get_a_stale_entry(tmp_path):
    cache = DecompositionCache(tmp_path, ram_mb=64, disk_mb=64)
    w = make_weight((16, 24), torch.float32)
    old = cache.get_or_compute(w)
    other = w.clone()
    other[0, 0] += 1e-4  # "same architecture, different checkpoint"
    new = cache.get_or_compute(other)
    assert cache.stats["computed"] == 2
    torch.testing.assert_close(new.sigma, decompose(other).sigma, rtol=0, atol=0)
    assert not torch.equal(new.sigma, old.sigma)


def test_corrupt_disk_entry_is_ignored_and_replaced(tmp_path):
    w = make_weight((8, 8), torch.float32)
    DecompositionCache(tmp_path, ram_mb=64, disk_mb=64).get_or_compute(w)
    (entry,) = list(tmp_path.glob("*/*.safetensors"))
    entry.write_bytes(b"garbage")
    fresh = DecompositionCache(tmp_path, ram_mb=64, disk_mb=64)
    d = fresh.get_or_compute(w.clone())
    assert fresh.stats["computed"] == 1
    torch.testing.assert_close(d.sigma, decompose(w).sigma, rtol=0, atol=0)


def test_disk_cap_evicts_least_recently_used(tmp_path):
    cache = DecompositionCache(tmp_path, ram_mb=0, disk_mb=1)  # 1 MiB
    weights = [make_weight((200, 300), torch.float32, seed=i) for i in range(8)]  # ~160 KB each on disk
    for w in weights:
        cache.get_or_compute(w)
    total = sum(p.stat().st_size for p in tmp_path.glob("*/*.safetensors"))
    assert total <= 2**20
    assert cache.get_or_compute(weights[-1]) is not None and cache.stats["disk_hits"] == 1


def test_disabled_disk_cache_writes_nothing(tmp_path):
    cache = DecompositionCache(tmp_path / "c", ram_mb=64, disk_mb=0)
    cache.get_or_compute(make_weight((8, 8), torch.float32))
    assert not (tmp_path / "c").exists()


def test_inference_tensors_can_be_hashed_and_memoised():
    """ComfyUI runs nodes under torch.inference_mode: weights made there have no version counter."""
    with torch.inference_mode():
        w = make_weight((8, 12), torch.float32) * 1.0
    first = content_hash(w)
    assert content_hash(w) == first
    with torch.inference_mode():
        w.mul_(2.0)
    assert content_hash(w) != first
