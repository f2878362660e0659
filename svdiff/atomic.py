"""Atomic, never-clobbering safetensors writes with the permissions ComfyUI's outputs get.

A file is written to a hidden temporary in its folder, fsynced, given the mode ``open()``
would give it under the process umask, then published with ``os.link`` (refuses an
existing name) or, when overwriting is asked for, ``os.replace``. A killed writer leaves
only its temporary, which the next save into that folder removes.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import tempfile
import threading
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

log = logging.getLogger("svdiff")


def atomic_save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], overwrite: bool = False) -> Path:
    """safetensors ``save_file`` into a temporary file, fsync, then publish.

    Publishing uses ``os.link`` (fails if the target exists, so two writers never
    clobber each other) unless ``overwrite``, which uses ``os.replace``. The target is
    therefore always the old file or the complete new one; a process killed while
    writing leaves only its hidden temporary (``.<name>.<pid>.<random>.tmp``), which
    the next save into that folder removes.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not overwrite:
        raise FileExistsError(f"'{path.name}' already exists; choose another name or enable overwrite")
    sweep_stale_temporaries(path.parent)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.chmod(tmp, new_file_mode())  # mkstemp's file is owner-only; publish what open() would give
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise FileExistsError(f"'{path.name}' already exists; choose another name or enable overwrite") from None
            except OSError:
                # Filesystems without hard links: the exists() check above is the guard.
                if path.exists():
                    raise FileExistsError(f"'{path.name}' already exists; choose another name") from None
                os.replace(tmp, path)
        _fsync_dir(path.parent)
    except (OSError, SafetensorError) as exc:
        code = _os_error_code(exc)
        if code in (errno.ENOSPC, errno.EDQUOT):
            message = f"no space left on the device to write '{path.name}' in {path.parent}; free some disk space and run again"
            raise SaveError(message, code) from exc
        if code == errno.EFBIG:
            raise SaveError(f"'{path.name}' is larger than this system allows a file to be (ulimit -f); raise the limit", code) from exc
        raise
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


_UMASK_LOCK = threading.Lock()


def new_file_mode() -> int:
    """The mode ``open()`` gives a new file in this process: 0o666 less the umask
    (0o644 under the usual 022), as ComfyUI's own outputs get."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:  # Linux: read without changing it
            for line in status:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


class SaveError(OSError):
    """A save that the system refused (disk full, file too large); the message says what to do."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.errno = code


def _os_error_code(exc: Exception) -> int | None:
    """errno of an OSError, or of the I/O error inside a SafetensorError ("... (os error 28)")."""
    if isinstance(exc, OSError):
        return exc.errno
    match = re.search(r"os error (\d+)", str(exc))
    return int(match.group(1)) if match else None


TEMP_SUFFIX = ".tmp"
STALE_TEMP_SECONDS = 60.0
_TEMP_NAME = re.compile(r"^\..+\.(\d+)\.[A-Za-z0-9_]+\.tmp$")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def sweep_stale_temporaries(directory: Path) -> list[Path]:
    """Remove temporaries left by killed writers: the writer's process is gone and the
    file is older than ``STALE_TEMP_SECONDS`` (a guard for writers in another PID
    namespace sharing the folder). Returns what was removed."""
    removed = []
    now = time.time()
    try:
        candidates = list(directory.glob(".*" + TEMP_SUFFIX))
    except OSError:
        return removed
    for temp in candidates:
        match = _TEMP_NAME.match(temp.name)
        if match is None or int(match.group(1)) == os.getpid() or _process_alive(int(match.group(1))):
            continue
        try:
            if now - temp.stat().st_mtime < STALE_TEMP_SECONDS:
                continue
            temp.unlink()
            removed.append(temp)
        except OSError:
            continue
    if removed:
        log.info("removed %d temporary file(s) left by interrupted saves in %s", len(removed), directory)
    return removed


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
