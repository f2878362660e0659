"""SVDiff spectral shifts: the math, the file format and the caches.

Pure torch + safetensors: nothing in this package imports ComfyUI except its
sub-package :mod:`svdiff.comfy`, the extension's one ComfyUI layer (a test checks both).
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
