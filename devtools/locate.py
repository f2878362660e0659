"""Finding the ComfyUI installs the tests run against, and their versions.

Standard library only: ``.ci/run`` calls ``python3 -m devtools.locate --list`` with
the system Python, before any virtual environment exists, to learn which ComfyUIs
to prepare a venv for. Nothing here imports ComfyUI.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)

ENV_VAR = "COMFYUI_PATH"
#: Several ComfyUI roots, for a runner that tests against each (``.ci/run``).
LIST_ENV_VAR = "COMFYUI_PATHS"
#: Files whose presence marks a directory as a ComfyUI root.
ROOT_MARKERS = ("comfy/model_patcher.py", "nodes.py", "execution.py", "folder_paths.py")


def is_comfyui_root(path: str | os.PathLike | None) -> bool:
    """True if ``path`` looks like a ComfyUI checkout (``comfy/model_patcher.py`` etc.)."""
    if not path:
        return False
    p = Path(path).expanduser()
    return all((p / marker).is_file() for marker in ROOT_MARKERS)


def _repo_root_candidates() -> list[Path]:
    """This checkout's root, as imported and with symlinks resolved.

    A developer often symlinks the checkout into ``<ComfyUI>/custom_nodes/``; the
    unresolved path (how Python found this file) then still sits inside ComfyUI, the
    resolved one does not. Both are tried, unresolved first.
    """
    here = Path(os.path.abspath(__file__))
    roots = [here.parents[1], Path(os.path.realpath(here)).parents[1]]
    out: list[Path] = []
    for r in roots:
        if r not in out:
            out.append(r)
    return out


def comfyui_version(root: str | os.PathLike) -> str | None:
    """The ``__version__`` in ``<root>/comfyui_version.py`` (without importing it)."""
    try:
        text = (Path(root) / "comfyui_version.py").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("__version__"):
            return line.split("=", 1)[1].strip().strip("\"'")
    return None


def _version_key(root: Path) -> tuple:
    version = comfyui_version(root) or "0"
    return tuple(int(part) if part.isdigit() else 0 for part in version.split("."))


def find_comfyuis() -> list[Path]:
    """Every ComfyUI the tests can run against, newest first.

    ``$COMFYUI_PATHS`` (``os.pathsep``-separated) when set; else ``$COMFYUI_PATH``, a
    ComfyUI containing this checkout, and every ``~/ComfyUI*`` folder that is a ComfyUI
    root (``.ci/run`` runs the integration tier once per entry).
    """
    listed = os.environ.get(LIST_ENV_VAR)
    if listed:
        candidates = [Path(p).expanduser() for p in listed.split(os.pathsep) if p]
        missing = [str(p) for p in candidates if not is_comfyui_root(p)]
        if missing:
            log.warning("%s names folders that are not ComfyUI roots: %s", LIST_ENV_VAR, ", ".join(missing))
    else:
        candidates = [Path(os.environ[ENV_VAR]).expanduser()] if os.environ.get(ENV_VAR) else []
        candidates += [ancestor for repo_root in _repo_root_candidates() for ancestor in repo_root.parents]
        candidates += sorted(Path.home().glob("ComfyUI*"))
    roots: list[Path] = []
    for candidate in candidates:
        if is_comfyui_root(candidate) and candidate.resolve() not in roots:
            roots.append(candidate.resolve())
    return sorted(roots, key=_version_key, reverse=True)


def find_comfyui() -> Path | None:
    """The ComfyUI root directory this process runs against, or None.

    Order: ``$COMFYUI_PATH``; else a ComfyUI containing this checkout (the repo may be
    installed as ``<ComfyUI>/custom_nodes/<name>/``, so every ancestor of the repo root
    is checked); else the newest ``~/ComfyUI*`` (by ``comfyui_version.py``). A directory
    counts only if it has ``comfy/model_patcher.py``, ``nodes.py``, ``execution.py`` and
    ``folder_paths.py``.

    An explicitly set but invalid ``COMFYUI_PATH`` returns None (with a warning)
    instead of silently testing against some other ComfyUI.
    """
    env = os.environ.get(ENV_VAR)
    if env:
        if is_comfyui_root(env):
            return Path(env).expanduser().resolve()
        log.warning("%s=%r is not a ComfyUI root (no comfy/model_patcher.py); not searching elsewhere", ENV_VAR, env)
        return None
    for repo_root in _repo_root_candidates():
        for ancestor in repo_root.parents:
            if is_comfyui_root(ancestor):
                return ancestor.resolve()
    homes = sorted((p for p in Path.home().glob("ComfyUI*") if is_comfyui_root(p)), key=_version_key, reverse=True)
    return homes[0].resolve() if homes else None


def main(argv: list[str] | None = None) -> int:
    """``--list``: one ``<version>\\t<root>`` line per ComfyUI found, newest first."""
    ap = argparse.ArgumentParser(description="Report the ComfyUI installs the tests can run against.")
    ap.add_argument("--list", action="store_true", help="print '<version>\\t<root>' for every ComfyUI found (newest first) and exit")
    ns = ap.parse_args(argv)
    if ns.list:
        for root in find_comfyuis():
            print(f"{comfyui_version(root) or 'unknown'}\t{root}")  # noqa: T201 - CLI output
        return 0
    print("ComfyUI:", find_comfyui())  # noqa: T201 - CLI output
    return 0


if __name__ == "__main__":
    sys.exit(main())
