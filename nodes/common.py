"""Shared node glue: the SPECTRAL_SHIFT type, model folders, safe paths, progress."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import folder_paths
from comfy_api.latest import io

log = logging.getLogger("svdiff")

SHIFT_FOLDER = "spectral_shifts"
CATEGORY = "SVDiff"
SpectralShiftType = io.Custom("SPECTRAL_SHIFT")
DatasetType = io.Custom("SVDIFF_DATASET")
"""A single-subject ``Dataset`` or a Cut-Mix-Unmix ``MultiSubjectDataset``."""
AttentionType = io.Custom("SVDIFF_ATTENTION")


def register_model_folder() -> None:
    """models/spectral_shifts, listing .safetensors only (never pickles).

    extra_model_paths.yaml may already have created the entry (with no extension
    filter) before this extension loads; keep its paths, add ours, set the filter.
    """
    default = os.path.join(folder_paths.models_dir, SHIFT_FOLDER)
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


def shift_path(name: str) -> Path:
    """Full path of a listed shift file, or a ValueError that says where to put it."""
    return model_file(SHIFT_FOLDER, name, "shift_name")


def file_fingerprint(folder: str, name: str) -> str:
    """Re-run loader nodes when the file on disk changes under the same name."""
    path = folder_paths.get_full_path(folder, name)
    if path is None:
        return f"missing:{name}"
    stat = Path(path).stat()
    return f"{path}:{stat.st_size}:{stat.st_mtime_ns}"


def require_finite(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} is {value}; set a finite number (1.0 applies the shift as trained, 0 disables it)")
    return float(value)


def safe_output_path(folder: str, prefix: str, what: str, input_name: str = "filename_prefix") -> Path:
    """``<first folder of ``folder``>/<prefix>.safetensors``, confined to that folder.

    Refuses absolute paths, ``..`` components and symlinks that lead outside, so a
    workflow can never write anywhere but the model folder.
    """
    root = Path(folder_paths.get_folder_paths(folder)[0])
    cleaned = prefix.strip().replace("\\", "/")
    if cleaned.endswith(".safetensors"):
        cleaned = cleaned[: -len(".safetensors")]
    parts = [p for p in cleaned.split("/") if p not in ("", ".")]
    if (
        not parts
        or cleaned.startswith("/")
        or ".." in parts
        or ":" in cleaned
        or "\x00" in cleaned
        or any(p.startswith(".") for p in parts)
    ):
        raise ValueError(
            f"{input_name} '{prefix}' is not a valid name for a {what}: use a relative name such as "
            f"'my_concept' or 'subjects/my_concept' (no '..', no absolute path, no hidden names)"
        )
    candidate = root.joinpath(*parts[:-1], parts[-1] + ".safetensors")
    root_real = os.path.realpath(root)
    parent_real = os.path.realpath(candidate.parent)
    if os.path.commonpath([root_real, parent_real]) != root_real:
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


class NodeProgress:
    """ComfyUI progress bar that also honours the UI's cancel button."""

    def __init__(self, total: int, node_id: str | None = None):
        import comfy.utils

        self.bar = comfy.utils.ProgressBar(max(total, 1), node_id=node_id)

    def __call__(self, done: int, total: int) -> None:
        import comfy.model_management

        comfy.model_management.throw_exception_if_processing_interrupted()
        self.bar.update_absolute(done, max(total, 1))
