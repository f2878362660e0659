"""A real ComfyUI server (``main.py --cpu``) with this extension installed as a custom node.

The server runs in its own process on 127.0.0.1 with a temporary base directory
(models, custom_nodes, input, output, user); the checkout is linked into its
``custom_nodes/`` exactly as a user installs it. Only the HTTP API is used:
``/object_info``, ``POST /prompt``, ``/history``, ``/view`` and the extension's routes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INSTALL_NAME = "comfyui-svdiff"


class ServerError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    def __init__(self, comfy_root: Path, base_dir: Path, python: str = sys.executable):
        self.comfy_root = Path(comfy_root)
        self.base_dir = Path(base_dir)
        self.python = python
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.log_path = self.base_dir / "server.log"
        self.startup_seconds = 0.0

    # -- lifecycle ----------------------------------------------------------------------
    def install_extension(self) -> Path:
        custom_nodes = self.base_dir / "custom_nodes"
        custom_nodes.mkdir(parents=True, exist_ok=True)
        link = custom_nodes / INSTALL_NAME
        if not link.exists():
            link.symlink_to(ROOT, target_is_directory=True)
        return link

    def models(self, folder: str) -> Path:
        path = self.base_dir / "models" / folder
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def input_dir(self) -> Path:
        return self.base_dir / "input"

    @property
    def output_dir(self) -> Path:
        return self.base_dir / "output"

    def start(self, timeout: float = 300.0, env: dict | None = None) -> ComfyServer:
        self.install_extension()
        self.base_dir.mkdir(parents=True, exist_ok=True)
        command = [
            self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
            "--base-directory", str(self.base_dir), "--disable-auto-launch", "--preview-method", "none",
        ]  # fmt: skip
        run_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self._log = open(self.log_path, "w")
        started = time.perf_counter()
        self.process = subprocess.Popen(
            command, cwd=self.comfy_root, stdout=self._log, stderr=subprocess.STDOUT, env=run_env, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"ComfyUI exited with {self.process.returncode} while starting:\n{self.log_tail()}")
            try:
                self.get_json("/system_stats", timeout=2)
                self.startup_seconds = time.perf_counter() - started
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.5)
        self.stop()
        raise ServerError(f"ComfyUI did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=20)
        self._log.close()
        self.process = None

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    # -- HTTP -----------------------------------------------------------------------------
    def request(self, path: str, data: dict | None = None, timeout: float = 30.0) -> tuple[int, bytes]:
        body = json.dumps(data).encode() if data is not None else None
        req = urllib.request.Request(self.url + path, data=body, headers={"Content-Type": "application/json"} if body else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def get_json(self, path: str, timeout: float = 30.0):
        status, body = self.request(path, timeout=timeout)
        if status != 200:
            raise ServerError(f"GET {path}: HTTP {status}: {body[:500]!r}")
        return json.loads(body)

    def object_info(self) -> dict:
        return self.get_json("/object_info", timeout=120)

    def submit(self, prompt: dict, client_id: str = "svdiff-tests") -> tuple[int, dict]:
        """POST /prompt as the UI does: (HTTP status, answer); 400 carries the validation errors."""
        status, body = self.request("/prompt", {"prompt": prompt, "client_id": client_id})
        return status, json.loads(body)

    def queue(self, prompt: dict, client_id: str = "svdiff-tests") -> str:
        status, answer = self.submit(prompt, client_id)
        if status != 200:
            raise ServerError(f"POST /prompt refused the prompt (HTTP {status}): {json.dumps(answer)[:3000]}")
        return answer["prompt_id"]

    def interrupt(self) -> None:
        """The UI's cancel button (POST /interrupt)."""
        status, body = self.request("/interrupt", {})
        if status != 200:
            raise ServerError(f"POST /interrupt: HTTP {status}: {body[:300]!r}")

    def running(self) -> list[str]:
        """Ids of the prompts the server is executing now (GET /queue)."""
        return [item[1] for item in self.get_json("/queue")["queue_running"]]

    def wait(self, prompt_id: str, timeout: float = 600.0) -> dict:
        """The /history entry of a finished prompt (raises if it does not finish)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get_json(f"/history/{prompt_id}")
            if prompt_id in history:  # ComfyUI adds the entry when the prompt has finished (or failed)
                return history[prompt_id]
            if not self.alive():
                raise ServerError(f"the server died while running {prompt_id}:\n{self.log_tail()}")
            time.sleep(0.1)
        raise ServerError(f"prompt {prompt_id} did not finish within {timeout:.0f} s:\n{self.log_tail()}")

    def run(self, prompt: dict, timeout: float = 600.0) -> dict:
        return self.wait(self.queue(prompt), timeout)

    def view(self, image: dict) -> bytes:
        query = urllib.parse.urlencode({k: image[k] for k in ("filename", "subfolder", "type")})
        status, body = self.request(f"/view?{query}")
        if status != 200:
            raise ServerError(f"/view {query}: HTTP {status}")
        return body


class ServerDirs:
    """The directories of a :class:`~devtools.server.ComfyServer` in the shape
    ``scripts/run_workflow.prepare_files`` expects (``model_dir``, ``input_dir``)."""

    def __init__(self, server):
        self.server = server

    def model_dir(self, folder: str):
        return self.server.models(folder)

    @property
    def input_dir(self):
        self.server.input_dir.mkdir(parents=True, exist_ok=True)
        return self.server.input_dir


def error_of(entry: dict) -> str | None:
    """The execution error of a /history entry, in one line, or None."""
    status = entry.get("status", {})
    if status.get("status_str") == "success":
        return None
    for message, data in status.get("messages", []):
        if message == "execution_error":
            return f"{data.get('node_type')} ({data.get('node_id')}): {data.get('exception_message', '').strip()}"
    return f"status {status.get('status_str')}"


def copy_or_link(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        return
    try:
        target.symlink_to(source)
    except OSError:
        shutil.copy2(source, target)
