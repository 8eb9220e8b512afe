"""Typed errors a user can cause. Each message names the value, the allowed range and the fix."""

from __future__ import annotations


class Gpt2OnnxError(Exception):
    """Base class of every error this package raises on purpose."""


class InvalidParameterError(Gpt2OnnxError, ValueError):
    """A generation or export parameter is outside its allowed range.

    ``param`` names the offending field so the HTTP server can report it.
    """

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class PromptTooLongError(InvalidParameterError):
    """The prompt (plus the tokens asked for) does not fit in the model's context."""


class ModelFolderError(Gpt2OnnxError):
    """A model folder is missing, incomplete, corrupt, or does not match its manifest."""


class ProviderUnavailableError(Gpt2OnnxError):
    """An execution provider was asked for that this onnxruntime build does not have."""


class UnsupportedConfigError(Gpt2OnnxError):
    """The checkpoint's configuration uses a feature the exporter cannot reproduce exactly."""


class ValidationError(Gpt2OnnxError):
    """The exported graph does not match the PyTorch reference within the stated thresholds."""
