"""ComfyUI's model folders for this extension: where shift files are listed and written.

Every path a workflow names stays inside a ComfyUI model folder (:func:`safe_output_path`),
a file is never overwritten unless asked (:func:`numbered`), and a shift is written with
its training state in one place (:func:`save_shift`).
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path

import folder_paths
import torch

from ..fileformat import ShiftFileError, read_shift, write_shift
from ..shift import SpectralShift
from ..training.checkpoint import write_state

log = logging.getLogger("svdiff")

SHIFT_FOLDER = "spectral_shifts"
LORA_FOLDER = "loras"
EMBEDDING_FOLDER = "embeddings"


def register_model_folder() -> None:
    """models/spectral_shifts, listing .safetensors only (never pickles).

    extra_model_paths.yaml may already have created the entry (with no extension
    filter) before this extension loads; keep its paths, add ours, set the filter.
    The folder itself is created, so users find where to put shift files.
    """
    default = os.path.join(folder_paths.models_dir, SHIFT_FOLDER)
    try:
        os.makedirs(default, exist_ok=True)
    except OSError as exc:  # a read-only models folder: the other paths still work
        log.warning("SVDiff: could not create %s (%s)", default, exc)
    if SHIFT_FOLDER in folder_paths.folder_names_and_paths:
        paths, _ = folder_paths.folder_names_and_paths[SHIFT_FOLDER]
        if default not in paths:
            paths.insert(0, default)
        folder_paths.folder_names_and_paths[SHIFT_FOLDER] = (paths, {".safetensors"})
    else:
        folder_paths.folder_names_and_paths[SHIFT_FOLDER] = ([default], {".safetensors"})


def shift_files() -> list[str]:
    return folder_paths.get_filename_list(SHIFT_FOLDER)


def model_file(folder: str, name: str, input_name: str) -> Path:
    """Full path of a file ComfyUI lists in ``folder``, or a ValueError that says where to put it."""
    path = folder_paths.get_full_path(folder, name)
    if path is None:
        folders = ", ".join(folder_paths.get_folder_paths(folder))
        raise ValueError(f"{input_name}: '{name}' was not found in {folders}; put the file there and refresh")
    return Path(path)


def shift_path(name: str, input_name: str = "shift_name") -> Path:
    """Full path of a listed shift file, or a ValueError that says where to put it."""
    return model_file(SHIFT_FOLDER, name, input_name)


def file_fingerprint(folder: str, name: str) -> str:
    """Re-run loader nodes when the file on disk changes under the same name."""
    path = folder_paths.get_full_path(folder, name)
    if path is None:
        return f"missing:{name}"
    stat = Path(path).stat()
    return f"{path}:{stat.st_size}:{stat.st_mtime_ns}"


def _relative_parts(text: str) -> list[str] | None:
    """The components of a name relative to a folder, or None when it could leave it or
    is no name at all: empty, absolute (``/``, ``~``, a drive letter), ``..``, a NUL."""
    cleaned = text.strip().replace("\\", "/")
    parts = [p for p in cleaned.split("/") if p not in ("", ".")]
    if not parts or cleaned.startswith(("/", "~")) or ":" in cleaned or ".." in parts or "\x00" in cleaned:
        return None
    return parts


def _stays_inside(root: Path, path: Path) -> bool:
    """Whether ``path`` is still inside ``root`` once symlinks are followed."""
    root_real = os.path.realpath(root)
    return os.path.commonpath([root_real, os.path.realpath(path)]) == root_real


def safe_output_path(folder: str, prefix: str, what: str, input_name: str = "filename_prefix") -> Path:
    """``<first folder of ``folder``>/<prefix>.safetensors``, confined to that folder.

    Refuses absolute paths, ``..`` components, hidden names and symlinks that lead
    outside, so a workflow can never write anywhere but the model folder.
    """
    root = Path(folder_paths.get_folder_paths(folder)[0])
    parts = _relative_parts(prefix.strip().removesuffix(".safetensors"))
    if parts is None or any(p.startswith(".") for p in parts):
        raise ValueError(
            f"{input_name} '{prefix}' is not a valid name for a {what}: use a relative name such as "
            f"'my_concept' or 'subjects/my_concept' (no '..', no absolute path, no hidden names)"
        )
    candidate = root.joinpath(*parts[:-1], parts[-1] + ".safetensors")
    if not _stays_inside(root, candidate.parent):
        raise ValueError(f"{input_name} '{prefix}' leads outside {root} (through a symlink); choose another name")
    return candidate


def numbered(path: Path, *companions: Path) -> Path:
    """``path`` if free, else ``name_00001.safetensors`` … (never overwrite silently).

    ``companions`` are files of the same name in other folders written together with
    ``path`` (a K/V file and its embedding): the name chosen is free in all of them.
    """

    def taken(name: str) -> bool:
        return any(p.with_name(name).exists() for p in (path, *companions))

    if not taken(path.name):
        return path
    stem = path.name[: -len(".safetensors")]
    for counter in range(1, 100000):
        candidate = path.with_name(f"{stem}_{counter:05}.safetensors")
        if not taken(candidate.name):
            return candidate
    raise ValueError(f"too many files named '{stem}_*' in {path.parent}; choose another name")


def input_folder(text: str, input_name: str = "folder") -> Path:
    """A folder inside ComfyUI's input folder, named relative to it.

    Absolute paths, ``..`` and symlinks that lead outside are refused, as ComfyUI's own
    loaders confine names to its folders: a server started with ``--listen`` must not
    let a client read images from anywhere on the host.
    """
    root = Path(folder_paths.get_input_directory())
    if not text.strip():
        raise ValueError(
            f"{input_name} is empty; put the training images in a folder inside {root} and write its name, e.g. 'svdiff/sks_dog'"
        )
    parts = _relative_parts(text)
    if parts is None:
        raise ValueError(
            f"{input_name} '{text}' is not a folder inside ComfyUI's input folder: put the images in a folder there "
            f"({root}/<name>) and write its name, e.g. 'svdiff/sks_dog'"
        )
    candidate = root.joinpath(*parts)
    if not _stays_inside(root, candidate):
        raise ValueError(f"{input_name} '{text}' leads outside ComfyUI's input folder (through a symlink); copy the images into {root}")
    return candidate


def free_paths(prefix: str, folders: list[str], overwrite: bool, what: str = "file") -> dict[str, Path]:
    """One file name for ``prefix`` free in every folder (``name``, ``name_00001``, …) and its paths.

    Also the check of a prefix before a long run: it raises on a name that would leave a folder.
    """
    paths = {folder: safe_output_path(folder, prefix, what) for folder in folders}
    first, *others = paths.values()
    if not overwrite:
        first = numbered(first, *others)
        paths = {folder: path.with_name(first.name) for folder, path in paths.items()}
    return paths


def relative_name(folder: str, path: Path) -> str:
    """``path`` relative to the first directory of ``folder`` (how ComfyUI lists files)."""
    return path.relative_to(Path(folder_paths.get_folder_paths(folder)[0])).as_posix()


def save_shift(
    shift: SpectralShift,
    target: Path,
    precision: str = "fp16",
    overwrite: bool = False,
    state: dict[str, torch.Tensor] | None = None,
    keep_name: bool = False,
    metadata: dict[str, str] | None = None,
) -> SpectralShift:
    """Write ``shift`` to ``target`` (a path from :func:`free_paths`) and return what was written.

    The copy written is named after the file (its ``svdiff.name`` too, unless ``keep_name``
    and it has one), with ``metadata`` added. ``state``, the float32 values and optimizer moments of a training run,
    goes beside it as ``.svdiffstate`` so the run can be resumed exactly.
    """
    saved = SpectralShift(dict(shift.tensors), {**shift.metadata, **(metadata or {})}, dict(shift.base_hashes), target.stem)
    if keep_name:
        saved.metadata.setdefault("svdiff.name", target.stem)
    else:
        saved.metadata["svdiff.name"] = target.stem
    write_shift(target, saved, precision=precision, overwrite=overwrite)
    if state:
        write_state(target, state, saved)
    return saved


# Loading (with a small cache keyed by path, size and mtime)

_loaded: OrderedDict[tuple[str, int, int], SpectralShift] = OrderedDict()
_loaded_lock = threading.Lock()
_LOADED_MAX = 8


def load_shift_file(name: str, folder: str = SHIFT_FOLDER, input_name: str = "shift_name") -> SpectralShift:
    """A listed file of ``folder`` read as a shift, memoised while the file is unchanged."""
    path = model_file(folder, name, input_name)
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    with _loaded_lock:
        if key in _loaded:
            _loaded.move_to_end(key)
            return _loaded[key]
    try:
        shift = read_shift(path)
    except ShiftFileError as exc:
        raise ShiftFileError(f"{input_name}: {exc}") from None
    shift.name = Path(name).stem if shift.name == path.stem else shift.name
    with _loaded_lock:
        _loaded[key] = shift
        while len(_loaded) > _LOADED_MAX:
            _loaded.popitem(last=False)
    return shift
