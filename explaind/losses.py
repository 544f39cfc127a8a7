"""Training losses as per-sample functions, and the weight each sample gets in a batch.

The decomposition needs the loss of *one* sample (to take per-sample gradients) and the
weight w_{s,k} with which that sample enters the batch gradient: 1 for a sum-reduced loss,
1/|b_s| for a mean-reduced one — except torch's mean of cross-entropy / NLL over class
indices, which divides by the batch's total class weight (class_weights, 1 each by default),
targets equal to ignore_index (-100) counting 0. A custom loss declared with class_weights is
taken to weight its own per-sample losses (torch's weight=, with label smoothing, say); its mean
divides by the batch's total class weight in the same way.

reduction="token_mean" is torch's mean over a batch's target entries when the targets hold a
class per position ([batch, length], a language model's next tokens) and the loss flattens
them into one batch: it divides by the batch's count of entries that are not ignore_index (their
total class weight, with class_weights), which changes from batch to batch with the padding, so
no mean of per-sample losses follows it. The declared per-sample loss is then each sequence's
sum over its positions, the ignored ones adding 0, and every sample weighs 1 / that count.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .errors import InputError

PerSampleLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _described(out) -> str:
    return f"outputs of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else f"a {type(out).__name__}"


IGNORE_INDEX = -100  # torch's default ignore_index: such a target adds no loss and no count to the mean

CLASS_WEIGHTED = ("cross_entropy", "nll")  # the built-in losses that take class_weights (torch's weight=)


def takes_class_weights(name: str) -> bool:
    """Whether a loss of this name takes class_weights: a built-in one of CLASS_WEIGHTED, or a
    custom one, whose mean they divide (resolve_loss)."""
    return name in CLASS_WEIGHTED or name.startswith("custom:")


def _classes(name: str, out, y: torch.Tensor, soft: bool, weight: torch.Tensor | None) -> None:
    """Refuse what the classification losses would fail on deep inside torch, or broadcast.
    soft: class probabilities [batch, classes] are targets too (cross-entropy)."""
    matrix = isinstance(out, torch.Tensor) and out.dim() == 2
    if not matrix or not (y.shape == out.shape[:1] or (soft and y.is_floating_point() and y.shape == out.shape)):
        targets = "targets [batch] (or class probabilities [batch, classes])" if soft else "targets [batch]"
        raise InputError(
            f"the built-in loss {name!r} takes outputs [batch, classes] and {targets}; the model "
            f"returned {_described(out)} for targets of shape {tuple(y.shape)}. Fix: pass "
            "loss=callable(output, target) returning per-sample losses [batch], the loss you train with (a "
            "module returning a tuple, a dict or logits at every position is then explained through "
            "output_fn=, e.g. explain(..., output_fn=lambda out: out[0]), which picks [batch, outputs])")
    if weight is not None and len(weight) != out.shape[1]:
        raise InputError(f"class_weights has {len(weight)} entries but the model returns {out.shape[1]} classes. "
                         "Fix: pass one weight per class, as torch's weight= of the loss you train with")


def _class_indices(y: torch.Tensor) -> torch.Tensor:
    """torch's class losses take int64 class indices only: widen int32, uint8, ... targets."""
    return y if y.is_floating_point() else y.long()


def _cross_entropy(out, y, weight=None):
    _classes("cross_entropy", out, y, soft=True, weight=weight)
    if y.is_floating_point() and y.dim() == 1:  # torch would fail deep inside: "expected ... Long"
        raise InputError(f"the built-in loss 'cross_entropy' got {y.dtype} targets [batch]: it takes class indices "
                         "(integers) or class probabilities [batch, classes]. Fix: pass the class indices as "
                         "integers (y.long()) to rec.batch and to the loss")
    weight = None if weight is None else weight.to(out.device, out.dtype)
    return F.cross_entropy(out, _class_indices(y), weight=weight, reduction="none")


def _nll(out, y, weight=None):
    _classes("nll", out, y, soft=False, weight=weight)
    if y.is_floating_point():
        raise InputError(f"the built-in loss 'nll' got {y.dtype} targets: it takes class indices (integers). Fix: "
                         "pass them as integers (y.long()) to rec.batch and to the loss")
    weight = None if weight is None else weight.to(out.device, out.dtype)
    return F.nll_loss(out, _class_indices(y), weight=weight, reduction="none")


def _squared_error(out, y):
    if not isinstance(out, torch.Tensor) or out.shape != y.shape:
        raise InputError(
            f"the built-in loss 'mse' takes outputs and targets of the same shape; the model returned "
            f"{_described(out)} for targets of shape {tuple(y.shape)}. Fix: give the targets the outputs' shape, "
            "or pass loss=callable(output, target) returning per-sample losses [batch]")
    return ((out - y) ** 2).reshape(len(out), -1).sum(1)


# name -> loss of a batch without reduction, shape [batch]
BUILTIN_LOSSES: dict[str, PerSampleLoss] = {
    # on raw logits or on log-probabilities alike: log_softmax is idempotent on log-probabilities
    "cross_entropy": _cross_entropy,
    "nll": _nll,  # the model's output is already log-probabilities
    "mse": _squared_error,
}

REDUCTIONS = ("mean", "sum", "token_mean")


def resolve_loss(loss: str | PerSampleLoss, class_weights: torch.Tensor | None = None) -> tuple[str, PerSampleLoss]:
    """Return (name, per-sample function) for a built-in name or a user callable; class_weights
    (see check_class_weights) weight a built-in cross_entropy / nll as torch's weight= does, and
    leave a custom loss as it is (it weights its own samples; sample_weights divides its mean)."""
    if callable(loss):
        name = getattr(loss, "__qualname__", type(loss).__name__)
        name = f"custom:{getattr(loss, '__module__', '?')}.{name}"
    elif loss not in BUILTIN_LOSSES:
        raise InputError(
            f"unknown loss {loss!r}: use one of {sorted(BUILTIN_LOSSES)} or pass a callable "
            "loss(output, target) -> per-sample losses of shape [batch]"
        )
    else:
        name = loss
    if class_weights is None or callable(loss):
        return name, loss if callable(loss) else BUILTIN_LOSSES[loss]
    if name not in CLASS_WEIGHTED:
        raise InputError(
            f"class_weights weight the built-in losses {CLASS_WEIGHTED} or a custom one, not {name!r}. Fix: put "
            "the weights in a per-sample loss, e.g. loss=lambda o, t: w[t] * your_loss(o, t), and declare "
            "class_weights=w with it where your mean divides by the batch's total weight (torch's weight=)")
    return name, functools.partial(BUILTIN_LOSSES[name], weight=class_weights)


def check_class_weights(class_weights) -> torch.Tensor | None:
    """The class weights as a float64 CPU vector (the history stores them as numbers), or None."""
    if class_weights is None:
        return None
    try:
        # float64 from the start: a list (as meta.json stores them) read as torch's default float32
        # would round 0.2 by 1e-8, which a float64 run's update check sees
        weights = torch.as_tensor(class_weights, dtype=torch.float64).detach().to("cpu")
    except (TypeError, ValueError, RuntimeError) as error:
        raise InputError(f"class_weights={class_weights!r} is no vector of numbers ({error}). Fix: pass one "
                         "weight per class, as torch's weight= of the loss you train with") from None
    if weights.dim() != 1 or len(weights) == 0 or not (weights.isfinite() & (weights >= 0)).all():
        raise InputError(f"class_weights must be a vector of finite weights ≥ 0, one per class; got "
                         f"{weights.tolist() if weights.numel() <= 8 else tuple(weights.shape)}. Fix: pass the "
                         "weight= of the loss you train with (a 1-D tensor of length the number of classes)")
    return weights


def recorded_loss(recorded: str, loss: str | PerSampleLoss | None,
                  class_weights: torch.Tensor | None = None) -> PerSampleLoss:
    """The per-sample loss of a history recorded with the loss named `recorded` (and its class
    weights): the built-in one of that name, or, for a custom loss (whose code the history
    cannot hold), `loss`."""
    if recorded.startswith("custom:"):
        if loss is None:
            raise InputError(
                f"the history was trained with a custom loss ({recorded}): pass the same "
                "per-sample function as loss=..."
            )
        if isinstance(loss, str):  # the Recorder names a built-in by its name, never custom:
            raise InputError(
                f"loss={loss!r} names a built-in loss, but the history was trained with a custom loss "
                f"({recorded}): pass the same per-sample function as loss=..."
            )
        return resolve_loss(loss)[1]
    if loss is not None and resolve_loss(loss)[0] != recorded:
        raise InputError(
            f"loss={loss!r} differs from the loss {recorded!r} the history was trained with: a "
            "run is explained with its own loss. Fix: leave loss= out (the recorded one is used)"
        )
    return resolve_loss(recorded, class_weights)[1]


def another_loss_note(recorded: str, given) -> str:
    """A custom loss given under another name than the one the history records, for the message of
    a missed update: only a hint, since one loss imported from elsewhere has another name too."""
    if given is None or isinstance(given, str) or not recorded.startswith("custom:"):
        return ""
    name = resolve_loss(given)[0]
    return "" if name == recorded else (f" Here the loss= given is {name}, where the history was recorded with "
                                         f"{recorded}: if that is another loss, pass the one trained with.")


def check_per_sample(name: str, loss: PerSampleLoss, losses, batch_size: int) -> None:
    """Refuse a loss that does not return one loss per sample: a reduced scalar or [batch, outputs]
    would break the per-sample gradients of the decomposition long after recording."""
    if not isinstance(losses, torch.Tensor) or tuple(losses.shape) != (batch_size,):
        reduction = getattr(loss, "reduction", None)  # a torch loss module says how it reduces
        fix = (f"build it with reduction='none' ({type(loss).__name__}(..., reduction='none'))"
               if reduction in REDUCTIONS else "pass a loss(output, target) with reduction='none' that sums over "
               "the outputs of a sample, e.g. lambda o, t: F.mse_loss(o, t, reduction='none').sum(1)")
        raise InputError(
            f"the loss {name} returned {_described(losses).replace('outputs', 'losses')} on a batch of "
            f"{batch_size}, not one loss per sample [{batch_size}]. Fix: {fix}")


def check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise InputError(f"unknown reduction {reduction!r}: use 'mean' or 'sum', as in your loss call, or "
                         "'token_mean' for torch's mean over the target entries of a batch whose targets hold a "
                         "class per position (a language model's, flattened into one batch)")
    return reduction


def sample_weights(reduction: str, loss: str, targets: torch.Tensor, class_weights: torch.Tensor | None,
                   dtype: torch.dtype, device, shards: Sequence[int] | None = None) -> torch.Tensor:
    """w_{s,k}: how much each row of a batch with these targets counts in the batch gradient
    (the module doc). `shards`: the rows of each process of a data-parallel step, in order, whose
    gradients are averaged: each reduces its own shard, and counts 1 / len(shards)."""
    if shards is not None:
        parts = targets.split(list(shards))
        return torch.cat([sample_weights(reduction, loss, part, class_weights, dtype, device)
                          for part in parts]) / len(shards)
    n = len(targets)
    if reduction == "sum":
        return torch.ones(n, dtype=dtype, device=device)
    total = float(n)
    weighted_mean = loss in CLASS_WEIGHTED or class_weights is not None  # a custom loss has them declared
    if reduction == "token_mean" and targets.is_floating_point():
        raise InputError(f"reduction='token_mean' counts a batch's class targets, but its targets are "
                         f"{targets.dtype}: pass class indices (ignore_index -100 for a position no loss reads), "
                         "or reduce with 'mean' or 'sum'")
    if reduction == "token_mean" or weighted_mean and targets.dim() == 1 and not targets.is_floating_point():
        targets = targets.long().cpu().reshape(-1)  # every entry a class: [batch] or [batch, positions]
        counted = targets != IGNORE_INDEX
        if class_weights is not None:
            beyond = counted & ((targets < 0) | (targets >= len(class_weights)))
            if beyond.any():
                raise InputError(f"class_weights has {len(class_weights)} entries but a target is "
                                 f"{int(targets[beyond][0])}. Fix: pass one weight per class, as torch's weight= "
                                 "of the loss you train with")
        each = (torch.ones(len(targets), dtype=torch.float64, device="cpu") if class_weights is None
                else class_weights[targets.clamp_min(0)])
        total = float(torch.where(counted, each, 0.0).sum())
    return torch.full((n,), 1.0 / total if total else float("nan"), dtype=dtype, device=device)
