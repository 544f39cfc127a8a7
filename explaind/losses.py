"""Training losses as per-sample functions, and the weight each sample gets in a batch.

The decomposition needs the loss of *one* sample (to take per-sample gradients) and the
weight w_{s,k} with which that sample enters the batch gradient: 1/|b_s| for a mean-reduced
loss, 1 for a sum-reduced one.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .errors import InputError

PerSampleLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# name -> loss of a batch without reduction, shape [batch]
BUILTIN_LOSSES: dict[str, PerSampleLoss] = {
    # on raw logits or on log-probabilities alike: log_softmax is idempotent on log-probabilities
    "cross_entropy": lambda out, y: F.cross_entropy(out, y, reduction="none"),
    # the model's output is already log-probabilities
    "nll": lambda out, y: F.nll_loss(out, y, reduction="none"),
    "mse": lambda out, y: ((out - y) ** 2).flatten(1).sum(1),
}

REDUCTIONS = ("mean", "sum")


def resolve_loss(loss: str | PerSampleLoss) -> tuple[str, PerSampleLoss]:
    """Return (name, per-sample function) for a built-in name or a user callable."""
    if callable(loss):
        name = getattr(loss, "__qualname__", type(loss).__name__)
        return f"custom:{getattr(loss, '__module__', '?')}.{name}", loss
    if loss not in BUILTIN_LOSSES:
        raise InputError(
            f"unknown loss {loss!r}: use one of {sorted(BUILTIN_LOSSES)} or pass a callable "
            "loss(output, target) -> per-sample losses of shape [batch]"
        )
    return loss, BUILTIN_LOSSES[loss]


def check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise InputError(f"unknown reduction {reduction!r}: use 'mean' or 'sum', as in your loss call")
    return reduction


def sample_weights(reduction: str, batch_size: int, dtype: torch.dtype, device) -> torch.Tensor:
    """w_{s,k}: how much each row of a batch counts in the batch gradient."""
    value = 1.0 / batch_size if reduction == "mean" else 1.0
    return torch.full((batch_size,), value, dtype=dtype, device=device)
