"""The errors a user sees as one sentence. Each is also the built-in error it refines (ValueError, OSError, ...), and
all share :class:`UserError`, so the CLI and the widgets catch them in one place and show the message as it is."""

from __future__ import annotations

__all__ = ["UserError", "InputError", "NonFiniteInputError", "ModelFileError", "ReadError", "TrainingDataError"]


class UserError(Exception):
    """Base of every error whose message is written for the user (one sentence that says what to do)."""


class InputError(UserError, ValueError):
    """The image cannot be segmented by this model as given (dimensions, axes, channels, values)."""


class NonFiniteInputError(InputError):
    """The image holds NaN or infinite values."""


class ModelFileError(UserError, RuntimeError):
    """A model file is missing, corrupt, truncated or does not match its card (the message names the file)."""


class ReadError(UserError, OSError):
    """The file cannot be read as an image."""


class TrainingDataError(UserError, ValueError):
    """The labels cannot be trained on (empty, one class, wrong shape, too little for a validation split)."""
