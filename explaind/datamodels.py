"""Data scores checked against retraining: the linear datamodeling score (LDS) and TracIn.

A data score τ(k, x) claims how much training sample k moved the output f(x). The linear
datamodeling score (Park et al. 2023, TRAK) tests that claim against retraining: train models
on random subsets S_r of the training set (same initialisation and schedule), record each
model's output f_r(x) on held-out inputs, and correlate, over the subsets and per input, the
actual outputs with the predictions Σ_{k∈S_r} τ(k, x) (Spearman rank correlation); the LDS is
the mean over inputs. Any score vector can be tested: ExPLAIND's data scores, TracIn computed
from the same recorded history, or random scores as the null.
"""

from __future__ import annotations

import functools
import os
from math import comb
from typing import Callable, Mapping

import numpy as np
import pandas as pd
import torch
import xarray as xr
from tqdm.auto import tqdm

from .cube import checked_test_ids
from .engine import checked_test_inputs, select_outputs, step_range
from .errors import InputError
from .functional import FlatModel, checked_output, forward_mode_pays
from .history import History, open_history
from .optimizers import group_index
from .parallel import run_all


def random_subsets(n_train: int, n_subsets: int, fraction: float, seed: int) -> torch.Tensor:
    """[R, M] boolean masks of R random subsets, each exactly round(fraction · M) training samples."""
    size = round(fraction * n_train)
    if n_subsets < 2 or not 0 < size < n_train:
        raise InputError(f"need at least 2 subsets of 1 … {n_train - 1} samples, got {n_subsets} subsets of "
                         f"fraction {fraction} ({size} of {n_train}): raise the number or change the fraction")
    generator = torch.Generator().manual_seed(seed)
    masks = torch.zeros(n_subsets, n_train, dtype=torch.bool)
    for row in masks:
        row[torch.randperm(n_train, generator=generator)[:size]] = True
    return masks


@torch.no_grad()
def true_class_log_probs(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(y | x) of a model returning log-probabilities (or logits): [N], in eval mode (dropout
    off, BatchNorm on its running statistics: each input's value must not depend on its batch).
    Each module's mode is restored after (a recorded loop may keep parts of its model in eval mode)."""
    modules = list(model.modules()) if isinstance(model, torch.nn.Module) else []  # a plain function has none
    modes = [m.training for m in modules]
    try:
        for m in modules:
            m.training = False
        first = next(model.parameters(), None) if modules else None  # retrained models live where they trained
        out = torch.log_softmax(model(inputs if first is None else inputs.to(first.device)), dim=-1)
    finally:
        for m, mode in zip(modules, modes):
            m.training = mode
    return out.gather(1, targets.reshape(-1, 1).to(out.device)).squeeze(1).cpu()


def subset_outputs(train: Callable[[torch.Tensor], torch.nn.Module], subsets: torch.Tensor, inputs: torch.Tensor,
                   targets: torch.Tensor, workers: int = 1, progress: bool = True,
                   device: str | torch.device = "cpu") -> torch.Tensor:
    """Retrain once per subset with `train(dataset indices) -> model` and record each model's
    log-probability of the true class on the inputs: [R, T]. workers > 1 retrains that many
    subsets side by side (explaind.parallel.run_all, 0 as it counts them on the `device` that
    `train` trains on: `train` must then be picklable)."""
    calls = [functools.partial(_subset_output, train, mask.nonzero().squeeze(1), inputs, targets) for mask in subsets]
    return torch.stack(run_all(calls, workers, "retraining on subsets", progress, device))


def _subset_output(train: Callable[[torch.Tensor], torch.nn.Module], indices: torch.Tensor, inputs: torch.Tensor,
                   targets: torch.Tensor) -> torch.Tensor:
    return true_class_log_probs(train(indices), inputs, targets)


def tracin_scores(history: History | str | os.PathLike, model: torch.nn.Module, inputs: torch.Tensor,
                  targets: torch.Tensor, *,
                  steps: tuple[int, int] | None = None, loss=None, output_fn: Callable | None = None,
                  dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu",
                  test_ids=None, progress: bool = True) -> xr.DataArray:
    """TracIn (Pruthi et al. 2020) from a recorded history, on the true-class log-probability.

    τ(k, x) = Σ_{s : k ∈ b_s} ⟨∇_θ log p(y_x | x; θ_s), −η_s w_{s,k} ∇_θ ℓ(z_k; θ_s)⟩: the first-order
    change of the output that plain gradient descent would book to sample k at every recorded
    step where it was in the batch (TracIn with every step as a checkpoint and the recorded
    batches; no momentum or Adam preconditioning, which is where it differs from ExPLAIND).
    w_{s,k} is the sample's weight in the step's gradient: the loss reduction's, times the
    recorded clipping factor c_s. Positive raises the output. Returns [train, test], train
    labelled by dataset index, test by `test_ids` (one per input; None: 0 … T − 1), as a cube of
    explain() labels them. history, loss and output_fn as in explain(): a History or its
    folder (checked against the model as explain checks it), the per-sample loss of a history
    recorded with a custom one, and what is explained of the model's output.
    """
    test_ids = checked_test_ids(test_ids, len(inputs))
    history = open_history(history, model, "tracin_scores")
    start, stop = step_range(steps, history.n_steps)
    flat = FlatModel(model, history.layout, dtype, device, history.constants(), output_fn)
    loss = history.per_sample_loss(loss)
    x, select = _checked_inputs(history, flat, inputs, targets)
    train_index = history.train_indices()  # sorted: a sample's column is found by binary search
    groups = group_index(history, flat)
    sizes = flat.activation_sizes(x)
    scores = torch.zeros(len(train_index), len(x), dtype=dtype, device=flat.device)
    for rec in tqdm(history.steps(start, stop), total=stop - start, desc="TracIn", disable=not progress, leave=False):
        theta = flat.layout.flatten(rec.before).to(flat.device, dtype)
        eta = torch.tensor([g["lr"] for g in rec.groups], dtype=dtype, device=flat.device)[groups]
        directions = flat.jacobian(theta, x, select, "log_prob")[:, 0] * eta  # η ∇ log p per input: [T, D]
        weights = history.sample_weights(rec, dtype, flat.device)
        batch_x, batch_y = flat.cast_inputs(rec.inputs), rec.targets.to(flat.device)
        if forward_mode_pays(sizes, flat.layout.dim, len(x), len(rec.indices)):  # few inputs: a jvp of the batch each
            products = flat.per_sample_directional(theta, batch_x, batch_y, loss, directions).T
        else:
            products = flat.per_sample_gradients(theta, batch_x, batch_y, loss) @ directions.T
        scores.index_add_(0, torch.searchsorted(train_index, rec.indices).to(flat.device), -weights[:, None] * products)  # [B, T]
    return xr.DataArray(scores.cpu().numpy(), dims=("train", "test"),
                        coords={"train": train_index.numpy(), "test": test_ids})


def _checked_inputs(history: History, flat: FlatModel, inputs, targets) -> tuple[torch.Tensor, torch.Tensor]:
    """The inputs cast for `flat` and their true classes [T, 1], checked as explain() checks them,
    before the pass over the history (a wrong shape or class would fail deep inside it)."""
    inputs = checked_test_inputs(history, flat, inputs)
    x = flat.cast_inputs(inputs)
    # one input's outputs: how many classes the model has
    n_outputs = checked_output(flat, flat.layout.flatten(history.params(0)), x, "log_prob",
                               "Fix: pass dtype=torch.float32").shape[-1]
    select, _ = select_outputs("true", targets, inputs, n_outputs, flat, None, "log_prob")
    return x, select.to(flat.device)


def subset_predictions(scores: np.ndarray, subsets: torch.Tensor) -> np.ndarray:
    """Σ_{k∈S_r} τ(k, x) for every subset r and input x: [R, T] from scores [M, T]."""
    return subsets.double().numpy() @ np.asarray(scores, dtype=float)


def ranks(values: np.ndarray) -> np.ndarray:
    """Ranks along axis 0 (1 … n), ties sharing their average rank."""
    values = np.asarray(values, dtype=float)
    out = np.empty_like(values)
    for j in range(values.shape[1]):
        _, inverse, counts = np.unique(values[:, j], return_inverse=True, return_counts=True)
        below = np.cumsum(counts) - counts  # values smaller than each distinct value
        out[:, j] = (below + (counts + 1) / 2)[inverse.reshape(-1)]
    return out


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman's rank correlation of a[:, j] with b[:, j] for every column j (NaN where a column
    is constant or holds a NaN: a missing value has no rank)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 2:
        raise InputError(f"spearman needs two [samples, columns] arrays of one shape, got {a.shape} and {b.shape}")
    ra, rb = ranks(a), ranks(b)
    ra -= ra.mean(0)
    rb -= rb.mean(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (ra * rb).sum(0) / np.sqrt((ra**2).sum(0) * (rb**2).sum(0))
    rho[np.isnan(a).any(0) | np.isnan(b).any(0)] = np.nan  # ranks() would place NaN above every number
    return rho


def lds(actual: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """The linear datamodeling score of every input: Spearman over subsets of actual vs predicted [R, T] -> [T]."""
    return spearman(actual, predicted)


def bootstrap_lds(actual: np.ndarray, predicted: Mapping[str, np.ndarray], resamples: int = 1000,
                  level: float = 0.95, seed: int = 0, progress: bool = True) -> pd.DataFrame:
    """Mean LDS of each method with a percentile bootstrap interval, resampling both the retrained
    models and the inputs (with replacement; the same resamples for every method, so the
    differences to the first method are paired). Rows: methods, then "<method>_minus_<first>".
    A resample whose LDS is undefined for every input (e.g. it drew one model only, so there is
    no ranking) is left out of the interval; with few retrainings that happens often."""
    if not 0 < level < 1 or resamples < 1:
        raise InputError(f"need 0 < level < 1 and resamples >= 1, got {level} and {resamples}")
    actual = np.asarray(actual, dtype=float)
    names = list(predicted)
    shapes = {name: np.shape(predicted[name]) for name in names if np.shape(predicted[name]) != actual.shape}
    if actual.ndim != 2 or shapes:
        raise InputError(f"bootstrap_lds needs [models, inputs] arrays of one shape: actual is {actual.shape}, "
                         f"predicted {shapes}; pass each method's subset_predictions of the same subsets and inputs")
    rng = np.random.default_rng(seed)
    draws = np.empty((resamples, len(names)))
    for b in tqdm(range(resamples), desc="bootstrap", disable=not progress, leave=False):
        models = rng.integers(0, actual.shape[0], actual.shape[0])
        inputs = rng.integers(0, actual.shape[1], actual.shape[1])
        for i, name in enumerate(names):
            draws[b, i] = defined_mean(lds(actual[models][:, inputs], np.asarray(predicted[name])[models][:, inputs]))
    estimates = np.array([defined_mean(lds(actual, predicted[name])) for name in names])
    rows = []
    for i, name in enumerate(names):
        rows.append({"method": name, "lds": estimates[i], **percentile_interval(draws[:, i], level)})
    for i, name in enumerate(names[1:], start=1):
        rows.append({"method": f"{name}_minus_{names[0]}", "lds": estimates[i] - estimates[0],
                     **percentile_interval(draws[:, i] - draws[:, 0], level)})
    return pd.DataFrame(rows)


def spearman_values(n: int) -> np.ndarray:
    """Every value Spearman's correlation over n pairs without ties can take, ascending:
    1 − 6Σd²/(n(n²−1)), where the sum of the squared rank differences Σd² takes every even value
    from 0 to (n³ − n)/3, except 4 when n = 3 (tests/test_datamodels.py enumerates the orders)."""
    if n < 2:
        raise InputError(f"a rank correlation needs at least 2 pairs, got {n}. Fix: pass n ≥ 2")
    sums = np.arange(0, (n**3 - n) // 3 + 1, 2)
    if n == 3:
        sums = sums[sums != 4]
    return 1 - 6 * sums[::-1] / (n * (n**2 - 1))


def two_subset_share(n: int) -> float:
    """Of bootstrap_lds's resamples of n retrained models (n draws with replacement), the share
    that hold exactly two distinct models, among those with more than one (one alone has no
    ranking and is left out): over two distinct models an input's Spearman is ±1 whatever the
    scores, so these resamples only say which of two models a method ranks higher."""
    if n < 2:
        raise InputError(f"a rank correlation needs at least 2 retrained models, got {n}. Fix: pass n ≥ 2 "
                         "(lds_subsets in params.yaml)")
    return comb(n, 2) * (2**n - 2) / (n**n - n)


def fewest_subsets(level: float) -> int:
    """The fewest retrained models whose two_subset_share fits in one tail, (1 − level)/2, of a
    bootstrap interval at `level`: with fewer, a bound of the interval is a pairwise comparison."""
    if not 0 < level < 1:
        raise InputError(f"need 0 < level < 1, got {level}. Fix: pass a confidence level such as 0.95")
    n = 2
    while two_subset_share(n) > (1 - level) / 2:
        n += 1
    return n


def defined_mean(values: np.ndarray) -> float:
    """Mean of the values that are not NaN; NaN (without numpy's empty-slice warning) if there are none."""
    defined = values[~np.isnan(values)]
    return float(defined.mean()) if defined.size else float("nan")


def percentile_interval(draws: np.ndarray, level: float) -> dict[str, float]:
    """The central `level` percentile interval of the draws that are not NaN (NaN bounds if there are none)."""
    defined = draws[~np.isnan(draws)]
    if not defined.size:
        return {"ci_low": float("nan"), "ci_high": float("nan")}
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(defined, [tail, 100 - tail])
    return {"ci_low": float(low), "ci_high": float(high)}


def aligned_scores(scores: xr.DataArray, n_train: int) -> np.ndarray:
    """Scores [train, test] labelled by dataset index, as a dense [n_train, test] array (training
    samples that were never in a batch score 0)."""
    if set(scores.dims) != {"train", "test"}:
        raise InputError(f"aligned_scores needs [train, test] scores, got dims {scores.dims}: select one output "
                         "first (scores.sel(output=...)) or explain with outputs='true'")
    dense = np.zeros((n_train, scores.sizes["test"]))
    dense[scores["train"].values] = scores.transpose("train", "test").values
    return dense

