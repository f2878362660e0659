"""Decompose once: content hashes and a two-level decomposition cache.

Entries are keyed by the SHA-256 of a weight's bytes, dtype and shape, so a cache
entry can never be served for weights that changed (another checkpoint of the same
architecture, a merged LoRA): different bytes, different key.

* Hashing a full SD1.5 UNet costs ~2 s, so hashes are memoised per storage
  location and revalidated on every use by a hash of a strided sample of the values.
* Memory: decompositions are held by the patches that use them; a small LRU of
  recently used ones (``SVDIFF_CACHE_RAM_MB``, default 2048) keeps them across
  prompts when the patched model itself was dropped.
* Disk: one safetensors file per weight under ``SVDIFF_CACHE_DIR`` (default
  ``$XDG_CACHE_HOME/comfyui-svdiff`` or ``~/.cache/comfyui-svdiff``), capped at
  ``SVDIFF_CACHE_DISK_MB`` (default 8192, oldest-used evicted; 0 disables it).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import weakref
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .spectral import Decomposition, decompose

log = logging.getLogger("svdiff")

CACHE_LAYOUT = "v1"  # bump when the stored decomposition changes meaning


def _env_mb(name: str, default: int) -> int:
    try:
        return max(0, int(os.environ.get(name, default)))
    except ValueError:
        log.warning("%s=%r is not a whole number of MB; using %d", name, os.environ.get(name), default)
        return default


def default_cache_dir() -> Path:
    if os.environ.get("SVDIFF_CACHE_DIR"):
        return Path(os.environ["SVDIFF_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "comfyui-svdiff"


# ----------------------------------------------------------------------------------
# Content hashes


SAMPLE_ELEMENTS = 16384
MEMO_ENTRIES = 16384


def _sample_digest(tensor: torch.Tensor) -> bytes:
    """Hash of ~16k evenly strided elements: microseconds, and different whenever a
    weight was rewritten (a fine-tune, a merged LoRA, in-place writes through
    ``.data`` that bump no version counter) in all but contrived cases."""
    flat = tensor.detach().reshape(-1)
    step = max(1, flat.numel() // SAMPLE_ELEMENTS)
    sample = flat[::step].to("cpu").contiguous()
    return hashlib.sha256(memoryview(sample.view(torch.uint8).numpy())).digest()


class _HashMemo:
    """Full content hashes, remembered per storage location.

    Keyed by where the data lives (device, pointer, dtype, shape, strides), not by
    the Python object: ComfyUI wraps restored weights in new ``Parameter`` objects
    on every unpatch, but they keep pointing at the same storage. A hit is only
    served when a sample of the values still hashes the same, so memory reused for
    other weights, or weights changed in place, are hashed afresh.
    """

    def __init__(self) -> None:
        self._memo: OrderedDict[tuple, tuple[bytes, str]] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _key(tensor: torch.Tensor) -> tuple:
        return (str(tensor.device), tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()))

    def get(self, tensor: torch.Tensor) -> str | None:
        key = self._key(tensor)
        with self._lock:
            entry = self._memo.get(key)
            if entry is not None:
                self._memo.move_to_end(key)
        if entry is None or _sample_digest(tensor) != entry[0]:
            return None
        return entry[1]

    def put(self, tensor: torch.Tensor, digest: str) -> None:
        entry = (_sample_digest(tensor), digest)
        with self._lock:
            self._memo[self._key(tensor)] = entry
            while len(self._memo) > MEMO_ENTRIES:
                self._memo.popitem(last=False)


_hash_memo = _HashMemo()


def content_hash(tensor: torch.Tensor) -> str:
    """SHA-256 hex of the tensor's dtype, shape and bytes (memoised per tensor)."""
    digest = _hash_memo.get(tensor)
    if digest is None:
        digest = _full_digest(tensor)
        _hash_memo.put(tensor, digest)
    return digest


def _full_digest(tensor: torch.Tensor) -> str:
    data = tensor.detach()
    if data.device.type != "cpu":
        data = data.to("cpu")
    data = data.contiguous()
    h = hashlib.sha256()
    h.update(f"{data.dtype}|{tuple(data.shape)}|".encode())
    if data.numel():
        # Viewing as bytes works for every dtype, including bfloat16 and float8.
        h.update(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


# ----------------------------------------------------------------------------------
# Decomposition cache


class DecompositionCache:
    """In-memory LRU plus an optional on-disk store, both keyed by content hash."""

    def __init__(self, directory: Path | None = None, ram_mb: int | None = None, disk_mb: int | None = None) -> None:
        self.directory = directory if directory is not None else default_cache_dir()
        self.ram_bytes = (ram_mb if ram_mb is not None else _env_mb("SVDIFF_CACHE_RAM_MB", 2048)) * 2**20
        self.disk_bytes = (disk_mb if disk_mb is not None else _env_mb("SVDIFF_CACHE_DISK_MB", 8192)) * 2**20
        self._ram: OrderedDict[str, Decomposition] = OrderedDict()
        self._ram_used = 0
        self._live: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self._lock = threading.RLock()
        self._disk_used: int | None = None  # bytes, measured on the first write
        self.stats = {"ram_hits": 0, "disk_hits": 0, "computed": 0}

    # -- public -------------------------------------------------------------------

    def get_or_compute(self, weight: torch.Tensor, digest: str | None = None) -> Decomposition:
        """The decomposition of ``weight``, from memory, disk, or computed now.

        Always built outside inference mode: ComfyUI runs nodes under
        ``torch.inference_mode``, and inference tensors could not later be used by
        training (autograd refuses to save them).
        """
        with torch.inference_mode(False):
            return self._get_or_compute(weight, digest)

    def _get_or_compute(self, weight: torch.Tensor, digest: str | None) -> Decomposition:
        digest = digest or content_hash(weight)
        cached = self._from_ram(digest)
        if cached is not None:
            return cached
        cached = self._from_disk(digest)
        if cached is not None:
            self.stats["disk_hits"] += 1
            self._remember(digest, cached)
            return cached
        decomposition = decompose(weight)
        self.stats["computed"] += 1
        self._remember(digest, decomposition)
        self._to_disk(digest, decomposition)
        return decomposition

    def clear_memory(self) -> None:
        with self._lock:
            self._ram.clear()
            self._ram_used = 0
            self._live = weakref.WeakValueDictionary()

    # -- memory -------------------------------------------------------------------

    def _from_ram(self, digest: str) -> Decomposition | None:
        with self._lock:
            found = self._ram.get(digest)
            if found is not None:
                self._ram.move_to_end(digest)
            else:
                found = self._live.get(digest)
            if found is not None:
                self.stats["ram_hits"] += 1
            return found

    def _remember(self, digest: str, decomposition: Decomposition) -> None:
        with self._lock:
            self._live[digest] = decomposition
            size = decomposition.nbytes()
            if size > self.ram_bytes:
                return
            if digest not in self._ram:
                self._ram[digest] = decomposition
                self._ram_used += size
            while self._ram_used > self.ram_bytes and self._ram:
                _, evicted = self._ram.popitem(last=False)
                self._ram_used -= evicted.nbytes()

    # -- disk ---------------------------------------------------------------------

    def _path(self, digest: str) -> Path:
        return self.directory / digest[:2] / f"{digest}-{CACHE_LAYOUT}.safetensors"

    def _from_disk(self, digest: str) -> Decomposition | None:
        if self.disk_bytes == 0:
            return None
        path = self._path(digest)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                basis = f.get_tensor("basis")
                sigma = f.get_tensor("sigma")
                tail = f.get_tensor("tail") if "tail" in f.keys() else None
            side = meta["side"]
            shape = tuple(int(x) for x in meta["shape"].split("x"))
            decomposition = Decomposition(side, basis, sigma, shape, tail)  # type: ignore[arg-type]
            os.utime(path)  # mark as recently used for eviction
            return decomposition
        except (SafetensorError, OSError, KeyError, ValueError, RuntimeError) as exc:
            log.warning("ignoring unreadable decomposition cache entry %s (%s)", path.name, exc)
            try:
                path.unlink()
            except OSError:
                pass
            return None

    def _to_disk(self, digest: str, decomposition: Decomposition) -> None:
        if self.disk_bytes == 0 or decomposition.nbytes() > self.disk_bytes:
            return
        path = self._path(digest)
        tensors = {"basis": decomposition.basis.cpu(), "sigma": decomposition.sigma.cpu()}
        if decomposition.tail is not None:
            tensors["tail"] = decomposition.tail.cpu()
        meta = {"side": decomposition.side, "shape": "x".join(str(s) for s in decomposition.shape)}
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(tmp), metadata=meta)
            os.replace(tmp, path)
            written = path.stat().st_size
        except OSError as exc:
            log.warning("decomposition cache not written to %s (%s); continuing without it", self.directory, exc)
            try:
                tmp.unlink()
            except OSError:
                pass
            return
        with self._lock:
            if self._disk_used is None:
                self._disk_used = sum(size for _, size, _ in self._disk_files())
            else:
                self._disk_used += written
            if self._disk_used > self.disk_bytes:
                self._evict_disk()

    def _disk_files(self) -> list[tuple[float, int, Path]]:
        files = []
        for p in self.directory.glob(f"*/*-{CACHE_LAYOUT}.safetensors"):
            try:
                st = p.stat()
            except OSError:
                continue
            files.append((st.st_mtime, st.st_size, p))
        return files

    def _evict_disk(self) -> None:
        """Delete least recently used entries down to 90 % of the cap."""
        files = self._disk_files()
        total = sum(size for _, size, _ in files)
        for _, size, p in sorted(files):
            if total <= 0.9 * self.disk_bytes:
                break
            try:
                p.unlink()
            except OSError:
                continue
            total -= size
        self._disk_used = total


_default_cache: DecompositionCache | None = None
_default_lock = threading.Lock()


def default_cache() -> DecompositionCache:
    """The process-wide cache (created on first use, so env vars set before apply)."""
    global _default_cache
    with _default_lock:
        if _default_cache is None:
            _default_cache = DecompositionCache()
        return _default_cache


def set_default_cache(cache: DecompositionCache | None) -> None:
    """Replace the process-wide cache (tests point it at a temporary folder)."""
    global _default_cache
    with _default_lock:
        _default_cache = cache
