"""Errors a user can fix. The CLI prints them as one line and exits non-zero.

Library messages name Python parameters (``steps``, ``height``); an error lists the ones it
names in ``params``, and the CLI shows each as the command's flag (``--steps``), so Python
callers read the names they passed and command-line users the flags they typed. Every
whole-word occurrence of a listed name is replaced (not inside paths or other words), so a
message uses a listed name only where it means the parameter.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable


class UserError(Exception):
    """Bad input or environment; the message says what is wrong and how to fix it."""

    exit_code = 2

    def __init__(self, message: str, *, params: Iterable[str] = ()) -> None:
        super().__init__(message)
        self.params = tuple(params)

    def message_for(self, flag: Callable[[str], str | None]) -> str:
        """The message with each named parameter replaced by ``flag(param)`` (None: kept)."""
        text = str(self)
        for param in sorted(self.params, key=len, reverse=True):
            shown = flag(param)
            if shown is not None:
                text = re.sub(rf"(?<![\w\-/.=]){re.escape(param)}(?![\w\-/.=])", shown, text)
        return text


class CheckpointError(UserError):
    """A gate checkpoint is missing, corrupt, or was made for another model."""


class ModelLoadError(UserError):
    """A model could not be loaded from the given spec."""


class ExportError(UserError):
    """An export could not be written or failed validation."""


class BackendUnavailableError(UserError):
    """A runtime backend (TensorRT, ONNX Runtime CUDA...) is not usable on this machine."""


class InvalidValueError(UserError, ValueError):
    """A parameter value outside its allowed range; the message names the parameter.

    Also a ``ValueError``, so Python callers can catch it the usual way.
    """


class OutputBusyError(UserError):
    """Another process is writing the same output (export folder, run folder, cache entry)."""
