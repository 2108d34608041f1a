"""The inference core's one root exception and its subclasses.

Every message says what went wrong and what to do about it.
"""

from __future__ import annotations


class InferenceError(Exception):
    """Root of every error the inference core raises on purpose."""


class ModelError(InferenceError):
    """A model or its manifest cannot be found, loaded or run."""


class BackendUnavailableError(ModelError):
    """The chosen detector runtime is not installed on this machine."""


class InputError(InferenceError):
    """An image or video given for batch inference cannot be read."""
