"""explaind: exact attribution of a trained network's predictions to training steps, model
components and training samples (the exact path kernel, for SGD, Adam and AdamW)."""

__version__ = "0.1.0"

from .cube import open_cube, save_cube
from .engine import DIMS, explain
from .errors import (
    ExplaindError,
    HistoryError,
    InputError,
    ReconstructionError,
    UnsupportedError,
)
from .history import History, Recorder
from .planning import Plan, plan
from .verify import reconstruct, verify_updates

__all__ = [
    "DIMS",
    "ExplaindError",
    "History",
    "HistoryError",
    "InputError",
    "Plan",
    "Recorder",
    "ReconstructionError",
    "UnsupportedError",
    "explain",
    "open_cube",
    "plan",
    "reconstruct",
    "save_cube",
    "verify_updates",
]
