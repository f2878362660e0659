"""SVDiff spectral shifts: the math, the file format and the caches.

Pure torch + safetensors; nothing here imports ComfyUI except
:mod:`svdiff.comfy_bridge`, which the functions that need it import lazily.
"""

from .fileformat import ShiftFileError, read_shift, write_shift
from .shift import SpectralShift, combine, parse_key, select
from .spectral import Decomposition, decompose, spectral_update
from .targets import ShiftMismatchError, resolve

__all__ = [
    "Decomposition",
    "ShiftFileError",
    "ShiftMismatchError",
    "SpectralShift",
    "combine",
    "decompose",
    "parse_key",
    "read_shift",
    "resolve",
    "select",
    "spectral_update",
    "write_shift",
]
