"""Errors a user can meet. Each message names the cause and the fix."""


class ExplaindError(Exception):
    """Base class of every error raised on purpose by explaind."""


class UnsupportedError(ExplaindError):
    """The run uses something the decomposition cannot reproduce exactly."""


class HistoryError(ExplaindError):
    """A training history is missing, truncated, corrupted or does not match the model."""


class InputError(ExplaindError):
    """Arguments of a call are inconsistent (shapes, output selection, dims to keep...)."""


class ReconstructionError(ExplaindError):
    """A measured residual of the decomposition exceeds the tolerance the user set."""
