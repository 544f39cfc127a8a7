"""Errors a user can meet. Each message names the cause and the fix."""

import numbers

import numpy as np


class ExplaindError(Exception):
    """Base class of every error raised on purpose by explaind."""


class UnsupportedError(ExplaindError):
    """The run uses something the decomposition cannot reproduce exactly."""


class HistoryError(ExplaindError):
    """A training history is missing, truncated, corrupted or does not match the model."""


class InputError(ExplaindError, ValueError):
    """Arguments of a call are inconsistent (shapes, output selection, dims to keep...); a
    ValueError too, as Python's own bad arguments are."""


class ReconstructionError(ExplaindError):
    """A measured residual of the decomposition exceeds the tolerance the user set. `cube` holds
    what was computed (None where nothing was), so that reading it needs no second run."""

    def __init__(self, message: str, cube=None):
        super().__init__(message)
        self.cube = cube


# What makes recorded updates differ from the modelled optimizer, as both checks name it.
UPDATE_MISS_CAUSES = (
    "the model passed computes another function than the one trained (another activation or "
    "forward), or the loop did what the history does not record (optimizer.zero_grad() forgotten, "
    "inputs passed to rec.batch() other than those the model was trained on (the raw images where the "
    "loop trained on augmented ones), dropout or other randomness in training, a changed loss, gradient "
    "clipping not done by rec.clip_grad_norm_, mixed precision (torch.autocast) switched on after the "
    "first steps, gradient accumulation over micro-batches of unequal size whose mean losses were "
    "averaged, an optimizer option explaind does not model)"
)


# One process's error told to the others (a data-parallel Recorder's refusal, the failed part of
# explain_distributed) as plain data, and raised again there.


def described(error: BaseException) -> list[str]:
    """An exception as JSON-able data for another process: its class's module and name, its message."""
    return [type(error).__module__, type(error).__name__, str(error)]


def error_class(description: list[str]) -> type[Exception]:
    """The class to raise a described error again with: explaind's own (of this module), so that
    a caller catches it as it would have here, RuntimeError for any other exception."""
    module, name, _ = description
    kind = globals().get(name) if module == __name__ else None
    return kind if isinstance(kind, type) and issubclass(kind, ExplaindError) else RuntimeError


# Argument checks shared by the public calls: bool is an int to Python, and True must not pass
# for a count or a tolerance.


def is_whole(value) -> bool:
    """An integer (Python or numpy), not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def is_number(value) -> bool:
    """A real number, not a bool (NaN included: compare it to refuse it)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
