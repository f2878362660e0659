"""Files survive crashes and full disks: real kills, a real full filesystem, real size limits.

* A writer process is SIGKILLed at random moments while it saves shift files over an
  existing file and under new names: every file that exists afterwards reads back
  bit-identical to one of the shifts written (the old one or the new one), never a
  corrupt mixture; the only debris is the hidden temporary of the interrupted save,
  which the next save removes.
* A save onto a full filesystem (a 256 KB tmpfs) or past the process's file-size limit
  (``RLIMIT_FSIZE``) is refused with a message that says what to do, and leaves
  neither a partial file nor a temporary; an existing file of that name is untouched.
"""

from __future__ import annotations

import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from comfyui_svdiff.svdiff import atomic
from comfyui_svdiff.svdiff.atomic import SaveError
from comfyui_svdiff.svdiff.fileformat import read_shift, write_shift
from comfyui_svdiff.svdiff.shift import SpectralShift

KILLS = 16
VALUES = 1 << 21  # two tensors of 8 MB in fp32: a save takes long enough to be killed inside

# A zygote process imports torch once and forks one writer per kill. The writers are
# forked from a process that never started torch's thread pool (forking the test
# process itself, whose pool is running, can deadlock the child).
ZYGOTE = """
import os, signal, sys
sys.path[:0] = [{root!r}, {tests!r}]  # devtools/, and this test module
from devtools.extension import import_extension
import_extension()
from comfyui_svdiff.svdiff.fileformat import write_shift
from test_file_safety import numpy_shift
signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # writers are reaped automatically
shifts = [numpy_shift(1), numpy_shift(2)]
print("ready", flush=True)
for line in sys.stdin:
    folder = line.strip()
    pid = os.fork()
    if pid == 0:
        i = 0
        while True:  # save forever, alternating over one name and adding new names
            write_shift(os.path.join(folder, "over.safetensors"), shifts[i % 2], precision="fp32", overwrite=True)
            write_shift(os.path.join(folder, f"new_{{i:04}}.safetensors"), shifts[i % 2], precision="fp32")
            i += 1
    print(pid, flush=True)
"""


def numpy_shift(seed: int, values: int = VALUES) -> SpectralShift:
    """Built without torch kernels (see ZYGOTE), the same in every process."""
    import numpy as np

    rng = np.random.default_rng(seed)
    tensors = {
        f"diffusion_model.input_blocks.{i}.0.proj.delta": torch.from_numpy(rng.standard_normal(values, dtype=np.float32)) for i in range(2)
    }
    return SpectralShift(tensors, {"svdiff.architecture": "SD15", "svdiff.description": f"shift {seed}"}, name=f"s{seed}")


def same(a: SpectralShift, b: SpectralShift) -> bool:
    return a.tensors.keys() == b.tensors.keys() and all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


def temporaries(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*" + atomic.TEMP_SUFFIX))


def _wait_gone(pid: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.01)
    raise AssertionError(f"writer {pid} did not die")


def test_a_writer_killed_mid_save_leaves_old_or_new_files_never_corrupt_ones(tmp_path):
    shifts = [numpy_shift(1), numpy_shift(2)]
    tests = str(Path(__file__).resolve().parent)
    zygote = subprocess.Popen(
        [sys.executable, "-c", ZYGOTE.format(root=str(Path(tests).parent), tests=tests)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert zygote.stdout.readline().strip() == "ready"
        rng = random.Random(0)
        mid_write = 0
        for kill in range(KILLS):
            folder = tmp_path / f"run{kill}"
            folder.mkdir()
            if kill % 2:  # half the runs start with an old file in place
                write_shift(folder / "over.safetensors", shifts[1], precision="fp32")
            zygote.stdin.write(f"{folder}\n")
            zygote.stdin.flush()
            pid = int(zygote.stdout.readline())
            time.sleep(rng.uniform(0.1, 0.45))
            os.kill(pid, signal.SIGKILL)
            _wait_gone(pid)

            published = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
            assert published, f"run {kill}: the writer saved nothing before the kill"
            for path in published:
                assert any(same(read_shift(path), s) for s in shifts), f"run {kill}: {path.name} is neither shift"
            if kill % 2:
                assert (folder / "over.safetensors").exists(), f"run {kill}: the old file disappeared"
            leftovers = temporaries(folder)
            assert len(leftovers) <= 1, leftovers  # only the save in flight
            mid_write += len(leftovers)

            # The next save into the folder removes the dead writer's temporary (once it is stale).
            for temp in leftovers:
                old = time.time() - atomic.STALE_TEMP_SECONDS - 5
                os.utime(temp, (old, old))
            write_shift(folder / "after.safetensors", shifts[0], precision="fp32")
            assert temporaries(folder) == []
    finally:
        zygote.kill()
        zygote.wait(timeout=30)
    # The kills did land inside saves (not only between them), or the test proved nothing.
    sys.__stderr__.write(f"\n[file safety] {mid_write} of {KILLS} kills interrupted a save in flight\n")
    assert mid_write >= KILLS // 3, f"only {mid_write} of {KILLS} kills interrupted a save"


def test_a_live_writers_temporary_is_never_swept(tmp_path):
    live = tmp_path / f".x.safetensors.{os.getppid()}.abc123.tmp"  # the parent process is alive
    live.write_bytes(b"in progress")
    fresh_dead = tmp_path / ".y.safetensors.999999999.abc123.tmp"  # dead pid, but just written
    fresh_dead.write_bytes(b"maybe another namespace")
    old = time.time() - 3600
    os.utime(live, (old, old))
    assert atomic.sweep_stale_temporaries(tmp_path) == []
    os.utime(fresh_dead, (old, old))
    assert atomic.sweep_stale_temporaries(tmp_path) == [fresh_dead]
    assert live.exists() and not fresh_dead.exists()


@pytest.fixture
def full_filesystem(tmp_path):
    """A 256 KB tmpfs (needs the right to mount, as root in CI); unmounted afterwards."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip()}); the RLIMIT_FSIZE test covers the refusal")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_disk_full_gives_a_clear_message_and_leaves_nothing(full_filesystem):
    small = numpy_shift(3, values=4096)  # ~32 KB: fits
    target = write_shift(full_filesystem / "keep.safetensors", small, precision="fp32")
    before = target.read_bytes()
    with pytest.raises(SaveError, match=r"no space left on the device to write 'keep.safetensors' .* free some disk space"):
        write_shift(target, numpy_shift(4, values=1 << 16), precision="fp32", overwrite=True)
    with pytest.raises(SaveError, match="no space left"):
        write_shift(full_filesystem / "new.safetensors", numpy_shift(4, values=1 << 16), precision="fp32")
    assert target.read_bytes() == before
    assert sorted(p.name for p in full_filesystem.iterdir()) == ["keep.safetensors"]


CHILD = """
import resource, signal, sys
sys.path.insert(0, {root!r})  # the repository root, for devtools/
from devtools.extension import import_extension
import_extension()
import torch
from comfyui_svdiff.svdiff.atomic import SaveError
from comfyui_svdiff.svdiff.fileformat import write_shift
from comfyui_svdiff.svdiff.shift import SpectralShift
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
shift = SpectralShift({{"diffusion_model.a.delta": torch.ones(1 << 16)}})
try:
    write_shift({target!r}, shift, precision="fp32")
except SaveError as exc:
    print("REFUSED:", exc)
"""


def test_file_size_limit_gives_a_clear_message_and_leaves_nothing(tmp_path):
    root = str(Path(__file__).resolve().parents[1])
    target = tmp_path / "limited.safetensors"
    done = subprocess.run([sys.executable, "-c", CHILD.format(root=root, target=str(target))], capture_output=True, text=True, timeout=120)
    assert "REFUSED: 'limited.safetensors' is larger than this system allows" in done.stdout, done.stdout + done.stderr
    assert list(tmp_path.iterdir()) == []
    assert resource.getrlimit(resource.RLIMIT_FSIZE)  # the limit was the child's only


def test_load_save_load_is_bit_identical_in_both_precisions(tmp_path):
    g = torch.Generator().manual_seed(5)
    shift = SpectralShift(
        {"diffusion_model.a.delta": torch.randn(300, generator=g), "diffusion_model.b.diff": torch.randn(7, generator=g) * 1e-3},
        {"svdiff.architecture": "SD15", "svdiff.trigger_words": "sks", "svdiff.description": "café ✓"},
        name="rt",
    )
    for precision in ("fp16", "fp32"):
        first = read_shift(write_shift(tmp_path / f"a_{precision}.safetensors", shift, precision=precision))
        second = read_shift(write_shift(tmp_path / f"b_{precision}.safetensors", first, precision=precision))
        assert same(first, second), precision
        assert first.metadata == second.metadata


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_saved_files_get_the_mode_open_gives_under_the_umask(tmp_path, umask):
    """Shift files (and every atomic save: states, LoRAs, embeddings) get the permissions a
    plain ``open()`` gives a new file, as ComfyUI's own outputs do: 0644 under umask 022,
    not mkstemp's owner-only 0600."""
    import stat

    previous = os.umask(umask)
    try:
        reference = tmp_path / "reference.bin"
        with open(reference, "wb") as f:
            f.write(b"x")
        shift = SpectralShift({"diffusion_model.a.delta": torch.zeros(3)}, {}, name="m")
        saved = write_shift(tmp_path / "saved.safetensors", shift)
        state = atomic.atomic_save(tmp_path / "saved.svdiffstate", {"a": torch.ones(2)}, {}, overwrite=True)
    finally:
        os.umask(previous)
    expected = stat.S_IMODE(reference.stat().st_mode)
    assert expected == 0o666 & ~umask
    assert stat.S_IMODE(saved.stat().st_mode) == expected
    assert stat.S_IMODE(state.stat().st_mode) == expected
