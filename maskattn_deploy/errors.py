"""Errors a user can fix. The CLI prints them as one line and exits non-zero."""

from __future__ import annotations


class UserError(Exception):
    """Bad input or environment; the message says what is wrong and how to fix it."""

    exit_code = 2


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
