"""What one prompt run in the in-process harness produced: validation, outputs, messages, errors.

:class:`ValidationResult` is what ``execution.validate_prompt`` returned,
:class:`PromptResult` everything a UI user (or /history) would learn about a prompt;
both are built by :class:`devtools.handle.ComfyHandle`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devtools.recording import Message


def format_validation_error(error: Any, node_errors: Mapping[str, Any] | None) -> str:
    """The text of the frontend's "Prompt execution failed" dialog.

    Mirrors ``PromptExecutionError.toString()`` of the frontend (comfyui-frontend-package
    1.35.9, assets/index-*.js): ``<error.message>: <error.details>`` followed, per node
    with errors, by ``\\n<class_type>:`` and ``\\n    - <message>: <details>`` lines.
    """
    if isinstance(error, str):
        text = error
    elif error:
        text = f"{error.get('message', '')}: {error.get('details', '')}"
    else:
        text = ""
    for info in (node_errors or {}).values():
        text += f"\n{info.get('class_type', '')}:"
        for e in info.get("errors", []):
            text += f"\n    - {e.get('message', '')}: {e.get('details', '')}"
    return text


@dataclass
class ValidationResult:
    """What ``execution.validate_prompt`` returned (execution.py:999-1108).

    ``valid`` is False only if *no* output node survived validation; like the server
    (server.py:878-897) a prompt with some good outputs is still run, and the errors of
    the others are reported in ``node_errors``. ``error`` is the top-level error dict
    (``type``/``message``/``details``/``extra_info``, the ``"error"`` field of a 400 reply
    to POST /prompt); ``node_errors`` maps node id -> ``{"errors": [...],
    "dependent_outputs": [...], "class_type": ...}`` (the ``"node_errors"`` field).
    """

    prompt_id: str
    valid: bool
    error: dict | None
    outputs: list[str]
    node_errors: dict[str, dict]

    @property
    def validation_errors(self) -> dict[str, list[dict]]:
        """node id -> list of error dicts (``type``, ``message``, ``details``, ``extra_info``)."""
        return {nid: list(info.get("errors", [])) for nid, info in self.node_errors.items()}

    @property
    def error_message(self) -> str | None:
        """The dialog text the UI shows, or None if there is nothing to show."""
        if self.valid and not self.node_errors:
            return None
        return format_validation_error(self.error, self.node_errors)

    def messages_for(self, node_id: str) -> list[str]:
        """``"<message>: <details>"`` for each validation error of one node."""
        return [f"{e.get('message')}: {e.get('details')}" for e in self.validation_errors.get(str(node_id), [])]


class PromptFailed(AssertionError):
    """Raised by :meth:`PromptResult.raise_for_error`; the text is what the UI shows."""


class PromptTimeout(TimeoutError):
    """A prompt ran past its timeout. ``result`` is set if the interrupt took effect."""

    def __init__(self, message: str, result: PromptResult | None = None):
        super().__init__(message)
        self.result = result


@dataclass
class PromptResult:
    """Everything a UI user (or /history) would learn about one prompt.

    ``status`` is ``"invalid"`` (rejected by validation, nothing ran), ``"success"``,
    ``"error"`` (a node raised) or ``"interrupted"``. ``outputs`` is the ``outputs`` of
    the /history entry (node id -> the node's ``ui`` dict, e.g. ``{"images": [...]}``),
    ``meta`` its ``meta``. ``status_messages`` are the executor's own
    ``(event, data)`` pairs (the /history ``status.messages``); ``messages`` everything
    the executor sent to the (fake) websocket during this prompt, including
    ``executing``, ``executed``, ``progress``, ``progress_state``.
    """

    prompt_id: str
    prompt: dict
    validation: ValidationResult
    status: str
    outputs: dict[str, dict] = field(default_factory=dict)
    meta: dict[str, dict] = field(default_factory=dict)
    messages: list[Message] = field(default_factory=list)
    status_messages: list[tuple[str, dict]] = field(default_factory=list)
    execution_error: dict | None = None
    client_id: str | None = None
    extra_data: dict = field(default_factory=dict)
    number: int = 0
    duration_s: float = 0.0

    # -- status --------------------------------------------------------------------------
    @property
    def success(self) -> bool:
        """Validated, ran to the end, and no ``execution_error`` was sent.

        (An ``ExecutionBlocker("msg")`` output makes the executor send an
        ``execution_error`` ("Execution Blocked: msg", attributed to the *consuming* node)
        without failing the prompt, execution.py:497-514; the UI shows that as an error
        dialog, so it counts as failure here. Note that in v0.8.0 a V3
        ``io.NodeOutput(block_execution="msg")`` without positional outputs is dropped
        (execution.py:374-379: ``r.result`` is None) and consumers get None; return
        ``io.NodeOutput(ExecutionBlocker("msg"))`` instead.)
        """
        return self.status == "success" and self.execution_error is None

    @property
    def valid(self) -> bool:
        return self.validation.valid

    @property
    def error(self) -> dict | None:
        """Top-level validation error dict (POST /prompt ``"error"``), if any."""
        return self.validation.error

    @property
    def node_errors(self) -> dict[str, dict]:
        return self.validation.node_errors

    @property
    def validation_errors(self) -> dict[str, list[dict]]:
        """node id -> list of error dicts with ``message``/``details`` (as the UI gets them)."""
        return self.validation.validation_errors

    # -- execution error -------------------------------------------------------------
    @property
    def exception_message(self) -> str | None:
        """``exception_message`` of the ``execution_error`` message, trailing newline removed.

        ComfyUI formats it as ``f"{ex}\\n{tips}"`` (execution.py:610), so the raw value in
        :attr:`execution_error` ends in ``"\\n"`` when there are no tips.
        """
        if not self.execution_error:
            return None
        return str(self.execution_error.get("exception_message", "")).rstrip("\n")

    @property
    def exception_type(self) -> str | None:
        return self.execution_error.get("exception_type") if self.execution_error else None

    @property
    def error_node_id(self) -> str | None:
        return self.execution_error.get("node_id") if self.execution_error else None

    @property
    def error_node_type(self) -> str | None:
        return self.execution_error.get("node_type") if self.execution_error else None

    @property
    def error_message(self) -> str | None:
        """The main text of the error dialog the UI would show, or None.

        Invalid prompt: :func:`format_validation_error` text. Node raised: the
        ``exception_message`` (the frontend's execution-error dialog shows it under the
        node type as title, see ``showExecutionErrorDialog`` in the frontend bundle).
        """
        if self.status == "invalid":
            return self.validation.error_message
        if self.execution_error:
            return self.exception_message
        return None

    @property
    def error_title(self) -> str | None:
        if self.status == "invalid":
            return (self.error or {}).get("message")
        if self.execution_error:
            return self.error_node_type or self.exception_type
        return None

    def raise_for_error(self) -> PromptResult:
        """Raise :class:`PromptFailed` (an AssertionError) unless :attr:`success`."""
        if not self.success:
            where = f" in node {self.error_node_id} ({self.error_node_type})" if self.execution_error else ""
            raise PromptFailed(f"prompt {self.status}{where}: {self.error_message}")
        return self

    # -- what ran ----------------------------------------------------------------------
    def events(self, event: str | int | None = None) -> list[Message]:
        return [m for m in self.messages if event is None or m.event == event]

    @property
    def executed(self) -> list[str]:
        """Node ids that were actually executed (``executing`` messages; needs a client id)."""
        return [m.data["node"] for m in self.messages if m.event == "executing" and m.data.get("node") is not None]

    @property
    def cached(self) -> list[str]:
        """Node ids served from the executor cache (the ``execution_cached`` message)."""
        for event, data in self.status_messages:
            if event == "execution_cached":
                return list(data.get("nodes", []))
        return []

    def output(self, node_id: str | int) -> dict:
        """The ``ui`` dict of one node (empty dict if it produced none)."""
        return self.outputs.get(str(node_id), {})

    def output_files(self, node_id: str | int | None = None) -> list[Path]:
        """Paths of files listed in ``images``/``audio``/``video``... ui outputs."""
        import folder_paths

        paths: list[Path] = []
        items = [self.output(node_id)] if node_id is not None else list(self.outputs.values())
        for ui in items:
            for entries in ui.values():
                if not isinstance(entries, list):
                    continue
                for e in entries:
                    if isinstance(e, dict) and "filename" in e:
                        base = folder_paths.get_directory_by_type(e.get("type", "output")) or folder_paths.get_output_directory()
                        paths.append(Path(base) / e.get("subfolder", "") / e["filename"])
        return paths

    @property
    def history(self) -> dict:
        """The /history/<prompt_id> entry (minus sensitive extra data), cf. execution.py:1145-1165."""
        return {
            "prompt": [self.number, self.prompt_id, self.prompt, self.extra_data, list(self.validation.outputs)],
            "outputs": self.outputs,
            "meta": self.meta,
            "status": {
                "status_str": "success" if self.status == "success" else "error",
                "completed": self.status == "success",
                "messages": [list(m) for m in self.status_messages],
            },
        }


class ExtensionLoadError(RuntimeError):
    """``nodes.load_custom_node`` returned False; the message has ComfyUI's log output."""
