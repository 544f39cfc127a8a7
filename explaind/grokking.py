"""Grokking, explained (docs/method.md §3): the analyses of the `grokking` stage (notebook 06).

The stage reads the recorded Transformer run and measures what the paper eyeballed:

- phases: change points of the per-component attribution shares over (log-spaced) step bins,
  found by an optimal least-squares segmentation, then compared with accuracy milestones;
- data attribution by the task's structure: influence of training pairs that share an operand
  or the sum with the explained pair, by residue difference, and that profile's Fourier spectrum;
- the Fourier spectrum of the embedding and unembedding over residues, over training;
- the swap experiment: the final outer layers placed around an earlier checkpoint's pipeline;
- the retraining experiment: a fresh model with one group of layers copied from checkpoint t.

Component names are those of `explaind.models.TRANSFORMER_COMPONENTS`; the "pipeline" is
attention + the first MLP layer, the "outer layers" embedding, second MLP layer and unembedding.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Literal, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import xarray as xr
from torch.func import functional_call
from tqdm.auto import tqdm

from .components import group_tensors
from .cube import PER_HISTORY_STEP
from .engine import explain
from .errors import InputError, ReconstructionError
from .history import History
from .models import TRANSFORMER_COMPONENTS
from .parallel import run_all
from .quadrature import MAX_NODES
from .training import DTYPES, TransformerConfig, first_step, check_ranges, train_transformer
from .verify import check_updates_once

PIPELINE = ("attention", "mlp_in")
OUTER = ("embedding", "mlp_out", "unembedding")

# Swap experiment: the components taken from the final model; the rest stay those of step i.
SWAP_VARIANTS: dict[str, tuple[str, ...]] = {
    "outer layers": OUTER,
    "unembedding + mlp_out": ("unembedding", "mlp_out"),
    "embedding + mlp_out": ("embedding", "mlp_out"),
    "embedding + unembedding": ("embedding", "unembedding"),
    "all but attention": ("embedding", "mlp_in", "mlp_out", "unembedding"),
}

# Retraining experiment: the components copied from checkpoint t; the rest are re-initialised.
RETRAIN_VARIANTS: dict[str, tuple[str, ...]] = {
    "pipeline": PIPELINE,
    "outer": OUTER,
    "attention": ("attention",),
    "scratch": (),
}

# How a training pair relates to an explained pair (a, b): the task's structure.
RELATIONS = ("same pair", "same sum", "shared operand", "other")


@dataclass
class GrokkingConfig:
    """Section `grokking` of params.yaml: what the grokking stage measures, and how much of it.

    The defaults are a cheap setting for calling the analyses by hand, not a profile: params.yaml
    holds the CPU profile, which differs from them in the path integral (quadrature, breakpoints,
    kink_tolerance), the tolerance and the retraining experiment (retrain_seeds to reinit_std),
    and params_paper.yaml the full protocol."""

    val_inputs: int = 12  # validation pairs whose true-class change is split by step and component
    train_inputs: int = 4  # training pairs, likewise
    step_bins: int = 40  # log-spaced bins of update steps (memorisation takes tens of steps, grokking thousands)
    quadrature: int = 1  # Gauss-Legendre nodes per smooth piece of each step's path integral
    breakpoints: bool = False  # locate the ReLU kinks along each step first (exact, costs a kink search)
    # with breakpoints: 0 searches every step; > 0 only the steps whose plain integral misses by more
    kink_tolerance: float = 0.0
    tolerance: float = 0.3  # the largest accepted relative residual of a step bin, and of the data attribution
    phases: int = 3  # phases to detect (the paper describes three)
    min_phase_bins: int = 3  # the fewest step bins a phase may span
    data_inputs: int = 8  # validation pairs of the data attribution (train x test per phase)
    data_steps: int = 40  # update steps of each phase's data-attribution window; 0 = the whole phase
    data_window: Literal["start", "middle", "end"] = "middle"  # where each window lies in its phase
    data_replay: int = 40  # steps before a window whose gradients are split by sample too (-1: all);
    # what earlier steps pass into the window by momentum is reported whole (`carried`)
    checkpoint_every: int = 10  # step spacing of the swap experiment and the Fourier analysis
    key_frequencies: int = 4  # Fourier frequencies of the final embedding tracked over training
    retrain_seeds: int = 2  # seeds per retraining point (initialisation of the re-initialised layers)
    retrain_checkpoints: int = 2  # checkpoints t copied from, evenly spaced over the run
    retrain_variants: tuple[str, ...] = ("pipeline", "outer")  # groups copied from t (scratch runs always)
    retrain_max_steps: int = 300  # step cap of each retraining run
    retrain_target: float = 0.95  # the validation accuracy a retraining run must reach
    retrain_dtype: Literal["float32", "float64"] = "float32"  # precision of the retraining runs
    retrain_workers: int = 1  # processes running retraining runs side by side, one CPU thread each (0: one per core, on a GPU 1)
    reinit_std: float = 0.0  # std of the re-initialised layers' normal init; 0 = the model's own init

    def __post_init__(self):
        check_ranges("grokking", self, (
            ("val_inputs", self.val_inputs >= 1, "at least 1"),
            ("train_inputs", self.train_inputs >= 0, "at least 0"),
            ("step_bins", self.step_bins >= 1, "at least 1"),
            ("quadrature", 1 <= self.quadrature <= MAX_NODES,
             f"at least 1 and at most {MAX_NODES} (each node is one Jacobian pass per step)"),
            ("kink_tolerance", self.kink_tolerance >= 0, "at least 0"),
            ("tolerance", self.tolerance >= 0, "at least 0"),
            ("phases", self.phases >= 1 and self.phases * self.min_phase_bins <= self.step_bins,
             f"at least 1, and phases x min_phase_bins ({self.min_phase_bins}) at most step_bins ({self.step_bins}): "
             "lower phases or min_phase_bins, or raise step_bins"),
            ("min_phase_bins", self.min_phase_bins >= 1, "at least 1"),
            ("data_inputs", self.data_inputs >= 1, "at least 1"),
            ("data_steps", self.data_steps >= 0, "at least 0 (0: the whole phase)"),
            ("data_replay", self.data_replay >= -1, "at least -1 (-1: all earlier steps)"),
            ("checkpoint_every", self.checkpoint_every >= 1, "at least 1"),
            ("key_frequencies", self.key_frequencies >= 1, "at least 1"),
            ("retrain_seeds", self.retrain_seeds >= 1, "at least 1"),
            ("retrain_checkpoints", self.retrain_checkpoints >= 1, "at least 1"),
            ("retrain_variants", set(self.retrain_variants) <= set(RETRAIN_VARIANTS)
             and "pipeline" in self.retrain_variants
             and len(set(self.retrain_variants)) == len(self.retrain_variants),
             f"names from {list(RETRAIN_VARIANTS)}, each at most once (a repeat would run its jobs twice), "
             "pipeline among them (the paper's retraining claim concerns it)"),
            ("retrain_max_steps", self.retrain_max_steps >= 1, "at least 1"),
            ("retrain_target", 0 < self.retrain_target <= 1, "in (0, 1]"),
            ("retrain_workers", self.retrain_workers >= 0, "at least 0 (0: one per core, on a GPU 1)"),
            ("reinit_std", self.reinit_std >= 0, "at least 0 (0: the model's own init)"),
        ))

    def check_run(self, p: int, train_pairs: int, val_pairs: int, *, n_steps: int) -> None:
        """Refuse counts beyond what the trained run has (modulus p, its training and validation
        pairs, its `n_steps` update steps), which slicing would otherwise cap without a word, and
        phases that the run's step bins cannot hold: log_step_edges merges edges that round to the
        same step, so a short run gets fewer bins than step_bins (1,842 steps: 36 of 40), and
        detect_phases would refuse them only after the component attribution."""
        bins = len(log_step_edges(n_steps, self.step_bins)) - 1
        check_ranges("grokking", self, (
            ("phases", self.phases * self.min_phase_bins <= bins,
             f"such that phases x min_phase_bins ({self.phases} x {self.min_phase_bins}) is at most the {bins} "
             f"step bins that step_bins={self.step_bins} yields over the run's {n_steps} update steps (log-spaced "
             "edges that round to the same step merge): lower phases or min_phase_bins, or raise step_bins"),
            ("retrain_checkpoints", self.retrain_checkpoints <= n_steps,
             f"at most {n_steps} (the run's update steps after step 0)"),
            ("val_inputs", self.val_inputs <= val_pairs, f"at most {val_pairs} (the run's validation pairs)"),
            ("train_inputs", self.train_inputs <= train_pairs, f"at most {train_pairs} (the run's training pairs)"),
            ("data_inputs", self.data_inputs <= val_pairs, f"at most {val_pairs} (the run's validation pairs)"),
            ("key_frequencies", self.key_frequencies <= p // 2,
             f"at most {p // 2} (the non-constant frequencies of residues mod {p})"),
        ))


# --- components ---------------------------------------------------------------------------


def component_tensors(names: Sequence[str], components: Sequence[str]) -> list[str]:
    """The tensor names of the Transformer components `components`."""
    unknown = sorted(set(components) - set(TRANSFORMER_COMPONENTS))
    if unknown:
        raise InputError(f"unknown components {unknown}: use names from {list(TRANSFORMER_COMPONENTS)}")
    groups = group_tensors(names, TRANSFORMER_COMPONENTS)
    return [name for component in components for name in groups[component]]


def splice(base: Mapping[str, torch.Tensor], donor: Mapping[str, torch.Tensor],
           components: Sequence[str]) -> dict[str, torch.Tensor]:
    """A parameter dict: the tensors of `components` from `donor`, every other one from `base`."""
    taken = set(component_tensors(list(base), components))
    return {name: donor[name] if name in taken else value for name, value in base.items()}


# --- step bins and phases -----------------------------------------------------------------


def log_step_edges(n_steps: int, bins: int) -> np.ndarray:
    """Bin edges 0 = e_0 < … < e_n = n_steps, log-spaced from step 1 (at most `bins` bins)."""
    if bins < 1 or n_steps < 1:
        raise InputError(f"need at least one bin and one step, got step_bins={bins}, n_steps={n_steps}")
    inner = np.geomspace(1, n_steps, bins).round().astype(int)
    return np.unique(np.concatenate([[0], inner, [n_steps]]))


def segment(series: np.ndarray, n_segments: int, min_size: int = 1, weights: np.ndarray | None = None) -> list[int]:
    """Start indices of the optimal piecewise-constant segmentation of `series` [n, features].

    Minimises the total within-segment weighted sum of squared deviations from the segment's
    weighted mean, over all splits into `n_segments` contiguous segments of at least `min_size`
    rows (dynamic programming: exact, deterministic, ties to the earliest split). `weights`
    (default 1) weigh the rows, e.g. by the number of steps a bin spans. Returns [0, …, start_k].
    """
    x = np.asarray(series, dtype=float).reshape(len(series), -1)
    n = len(x)
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=float)
    if n_segments < 1 or min_size < 1 or n_segments * min_size > n:
        raise InputError(f"cannot split {n} step bins into {n_segments} phases of at least {min_size} bins: "
                         "lower phases / min_phase_bins or use more step_bins")
    if w.shape != (n,) or not np.all(w > 0):
        raise InputError(f"segment weights must be {n} positive numbers, one per row")
    if not np.isfinite(x).all():  # a NaN cost compares false everywhere and leaves empty segments
        raise InputError("the series to segment holds NaN or inf: fill them in (e.g. shares.fillna(0)) "
                         "or drop those rows")
    total_w = np.concatenate([[0.0], np.cumsum(w)])
    first = np.vstack([np.zeros(x.shape[1]), np.cumsum(x * w[:, None], 0)])
    second = np.concatenate([[0.0], np.cumsum(w * (x ** 2).sum(1))])

    def cost(i: int, j: int) -> float:  # rows i … j-1
        total = first[j] - first[i]
        return second[j] - second[i] - float(total @ total) / (total_w[j] - total_w[i])

    best = np.full((n_segments + 1, n + 1), np.inf)
    start = np.zeros((n_segments + 1, n + 1), dtype=int)
    best[0, 0] = 0.0
    for k in range(1, n_segments + 1):
        for j in range(k * min_size, n + 1):
            for i in range((k - 1) * min_size, j - min_size + 1):
                value = best[k - 1, i] + cost(i, j)
                if value < best[k, j] - 1e-12:
                    best[k, j], start[k, j] = value, i
    starts, j = [], n
    for k in range(n_segments, 0, -1):
        j = start[k, j]
        starts.append(j)
    return starts[::-1]


def detect_phases(shares: xr.DataArray, n_phases: int, min_bins: int = 1) -> pd.DataFrame:
    """Phases of training: the optimal segmentation (`segment`) of the per-bin component shares
    (step × component), every update step counting once (a bin weighs as many steps as it
    spans, so the many short early bins of a log-spaced binning do not dominate). One row per
    phase with its step range, its step-weighted mean shares and its leader."""
    if "step_stop" not in shares.coords:
        raise InputError("the shares need the step bins' `step_stop` coordinate: pass "
                         "influence.component_shares(cube) of a cube that keeps the step dim")
    shares = shares.transpose("step", "component").fillna(0.0)
    width = xr.DataArray(shares["step_stop"].values - shares["step"].values, dims="step")
    starts = segment(shares.values, n_phases, min_bins, width.values)
    stops = starts[1:] + [shares.sizes["step"]]
    rows = []
    for number, (i, j) in enumerate(zip(starts, stops), start=1):
        mean = shares.isel(step=slice(i, j)).weighted(width.isel(step=slice(i, j))).mean("step")
        rows.append({"phase": number, "start": int(shares["step"][i]), "stop": int(shares["step_stop"][j - 1]),
                     "bins": j - i, "leader": str(mean["component"].values[int(np.argmax(mean.values))]),
                     **{f"share_{c}": float(mean.sel(component=c)) for c in shares["component"].values}})
    return pd.DataFrame(rows)


def bin_leaders(shares: xr.DataArray) -> pd.Series:
    """The component with the largest share in each step bin (by bin start step)."""
    shares = shares.transpose("step", "component").fillna(0.0)
    return pd.Series(shares["component"].values[shares.values.argmax(1)], index=shares["step"].values)


def milestones(log: pd.DataFrame) -> dict[str, float]:
    """Accuracy milestones of a training log: 100% training, 50% and 95% validation accuracy."""
    return {"t_mem": first_step(log, "train_acc", 1.0), "t_val_50": first_step(log, "val_acc", 0.5),
            "t_val_95": first_step(log, "val_acc", 0.95)}


def loss_spikes(log: pd.DataFrame, factor: float = 10.0) -> list[int]:
    """Steps at which the training loss jumps by more than `factor` over the previous step
    (the "slingshot" spikes of adaptive optimizers late in training)."""
    ratio = log["train_loss"] / log["train_loss"].shift()
    return [int(s) for s in log.loc[ratio > factor, "step"]]


def nearest_boundaries(boundaries: Sequence[int], marks: Mapping[str, float]) -> pd.DataFrame:
    """For each milestone, the nearest detected phase boundary and the ratio between them
    (log steps: a boundary at 2x or 0.5x the milestone is one factor of 2 away)."""
    rows = []
    for name, step in marks.items():
        if not np.isfinite(step) or not len(boundaries):
            rows.append({"milestone": name, "step": step, "boundary": np.nan, "ratio": np.nan})
            continue
        candidates = np.asarray(boundaries, dtype=float)
        nearest = candidates[np.argmin(np.abs(np.log(np.maximum(candidates, 1)) - np.log(max(step, 1))))]
        rows.append({"milestone": name, "step": step, "boundary": nearest, "ratio": nearest / max(step, 1)})
    return pd.DataFrame(rows)


# --- attribution passes -------------------------------------------------------------------


def component_attribution(history: History, model: torch.nn.Module,
                          inputs: Mapping[str, tuple[torch.Tensor, torch.Tensor]], edges: np.ndarray,
                          **options) -> xr.Dataset:
    """The true-class change of every input split by step bin and Transformer component (no
    per-sample split: cheap), for named groups of inputs in one pass over the history; the test
    dim gets a `split` coordinate naming each input's group. `options` go to explain()."""
    x = torch.cat([pair[0] for pair in inputs.values()])
    y = torch.cat([pair[1] for pair in inputs.values()])
    split = np.repeat(list(inputs), [len(pair[1]) for pair in inputs.values()])
    # then trusting them needs no gradients
    check_updates_once(history, model, options.get("device", "cpu"), options.get("loss"))
    cube = explain(history, model, x, y, keep=("step", "component", "test"), outputs="true",
                   components=TRANSFORMER_COMPONENTS, step_bins=edges, check_updates=False, **options)
    return cube.assign_coords(split=("test", split))


def data_windows(phases: pd.DataFrame, data_steps: int, where: str = "middle") -> list[tuple[int, int]]:
    """One window of update steps per phase (rows with start / stop): `data_steps` steps at the
    phase's start, middle or end, or the whole phase when data_steps is 0 or exceeds it."""
    if where not in ("start", "middle", "end"):
        raise InputError(f"data_window={where!r}: use start, middle or end")
    windows = []
    for start, stop in zip(phases["start"], phases["stop"]):
        start, stop = int(start), int(stop)
        width = stop - start if data_steps <= 0 else min(data_steps, stop - start)
        first = {"start": start, "middle": start + (stop - start - width) // 2, "end": stop - width}[where]
        windows.append((first, first + width))
    return windows


def data_attribution(history: History, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                     windows: Sequence[tuple[int, int]], replay: int | None = None, **options) -> xr.Dataset:
    """Training pair × explained pair attribution of the true class, one step entry per window
    of update steps (start, stop). Each window is explained on its own, its gradients and those
    of the `replay` steps before it split by sample (None: every earlier step); what the steps
    before that carried into the window by momentum is `carried` (per input, not split). The
    per-sample split costs about as much per step as training on every pair separately, hence
    windows. Residual attributes are the worst window's."""
    if not len(windows):
        raise InputError("windows is empty: pass at least one (start, stop) window of update steps, "
                         "e.g. data_windows(phases, ...)")
    # the windows check none themselves
    check_updates_once(history, model, options.get("device", "cpu"), options.get("loss"))
    edges = [start for start, _ in windows] + [windows[-1][1]]
    tiles = edges[0] == 0 and edges[-1] == history.n_steps and all(
        stop == following for (_, stop), (following, _) in zip(windows, windows[1:]))
    if replay is None and tiles:  # whole phases: one pass with a step bin per phase
        cube = explain(history, model, x, y, keep=("step", "train", "test"), outputs="true", step_bins=edges,
                       check_updates=False, **options)
        return cube.assign(carried=xr.zeros_like(cube["regularization"])).drop_vars([*PER_HISTORY_STEP, "history_step"])
    parts = []
    for start, stop in windows:
        steps = None if (start, stop) == (0, history.n_steps) else (start, stop)
        cube = explain(history, model, x, y, keep=("train", "test"), outputs="true", steps=steps,
                       replay=replay if start > 0 else None, check_updates=False, **options)
        if "carried" not in cube:  # replayed from step 0: nothing carried
            cube["carried"] = xr.zeros_like(cube["regularization"])
        parts.append(cube.drop_vars([*PER_HISTORY_STEP, "history_step"]).expand_dims(step=[start])
                     .assign_coords(step_stop=("step", [stop])))
    merged = xr.concat(parts, dim="step", combine_attrs="drop_conflicts")
    worst = max(parts, key=lambda c: c.attrs["relative_residual"])
    merged.attrs.update({k: worst.attrs[k] for k in ("relative_residual", "max_abs_residual", "max_abs_change")})
    return merged


def bin_residuals(cube: xr.Dataset, history: History, model: torch.nn.Module, x: torch.Tensor,
                  y: torch.Tensor) -> xr.Dataset:
    """Per step bin and input: the exact change of the true-class log-probability over the bin
    (forward passes at the bin edges), the attributed change (Σ components + weight decay) and
    their difference. The cube's own residual is the sum over bins; this says where it arises."""
    edges = np.append(cube["step"].values, cube["step_stop"].values[-1])
    with torch.no_grad():
        at_edges = np.stack([functional_call(model, history.params(int(e)), (x,)).log_softmax(-1)
                             .gather(1, y[:, None]).squeeze(1).double().numpy() for e in edges])
    change = xr.DataArray(np.diff(at_edges, axis=0), dims=("step", "test"),
                          coords={"step": cube["step"].values, "test": cube["test"].values})
    # skipna=False: a NaN attribution must show as a NaN residual, not as a missing term
    attributed = (cube["attribution"].sum("component", skipna=False)
                  + cube["regularization"].sum("component", skipna=False)).transpose("step", "test")
    return xr.Dataset({"change": change, "attributed": attributed.drop_vars("output", errors="ignore"),
                       "residual": change - attributed.drop_vars("output", errors="ignore")})


def bin_errors(residuals: xr.Dataset) -> pd.DataFrame:
    """Per step bin (from `bin_residuals`): the largest exact change of an input, the largest
    residual, and their ratio, the bin's relative residual."""
    frame = pd.DataFrame({"step": residuals["step"].values,
                          "max_change": np.abs(residuals["change"]).max("test", skipna=False).values,
                          "max_residual": np.abs(residuals["residual"]).max("test", skipna=False).values})
    return frame.assign(relative=frame["max_residual"] / frame["max_change"])


def check_bins(errors: pd.DataFrame, tolerance: float) -> None:
    """Refuse step bins whose attribution misses more than `tolerance` of their change."""
    bad = errors[~(errors["relative"] <= tolerance)]
    if len(bad):
        worst = bad.loc[bad["relative"].fillna(np.inf).idxmax()]  # a NaN bin is the worst
        raise ReconstructionError(
            f"{len(bad)} step bin(s) miss more than tolerance {tolerance:g} of their change, worst the bin from step "
            f"{int(worst['step'])} ({worst['relative']:.3g}). Fix: raise quadrature or locate the kinks "
            "(breakpoints), compute in float64, or raise the tolerance")


# --- the weight-decay share of the updates ------------------------------------------------


def decay_share_of_updates(history: History, progress: bool = True) -> pd.DataFrame:
    """Per update step of an AdamW run: the norms of the decoupled weight-decay step ηλθ_s and
    of the rest of the update (Δθ_s + ηλθ_s), and decay's share |decay| / (|decay| + |rest|)."""
    if history.optimizer != "adamw":
        raise InputError(f"the decay share of the updates is defined here for AdamW runs; this history "
                         f"used {history.optimizer!r}. Use influence.decay_share on a cube instead")
    rows = []
    for rec in tqdm(history.steps(), total=history.n_steps, desc="decay share", disable=not progress, leave=False):
        decay, rest = 0.0, 0.0
        for name, before in rec.before.items():
            group = rec.groups[history.group_of[name]]
            step = group["lr"] * group["weight_decay"] * before.double()
            decay += float((step ** 2).sum())
            rest += float(((rec.after[name].double() - before.double() + step) ** 2).sum())
        decay, rest = np.sqrt(decay), np.sqrt(rest)
        rows.append((rec.step, decay, rest, decay / (decay + rest) if decay + rest > 0 else np.nan))
    return pd.DataFrame(rows, columns=["step", "decay_norm", "gradient_norm", "decay_share"])


@dataclass
class DecayTrend:
    """Weight decay's mean share of the updates early and late in a run (decay_trend)."""

    early_steps: int
    early: float
    late_steps: int
    late: float


def decay_trend(updates: pd.DataFrame, early: int = 10, late: int = 100) -> DecayTrend:
    """The mean decay share (decay_share_of_updates) of the first `early` and the last `late`
    update steps, each window cut to the run's length."""
    early, late = min(early, len(updates)), min(late, len(updates))
    share = updates["decay_share"]
    return DecayTrend(early, float(share.iloc[:early].mean()), late, float(share.iloc[-late:].mean()))


# --- Fourier analysis over residues -------------------------------------------------------


def fourier_power(values: np.ndarray | torch.Tensor) -> np.ndarray:
    """Share of the power of `values` [p, …] (a function of the residue 0 … p−1 along the first
    axis) at each frequency 0 … p // 2, frequencies k and p − k folded together; sums to 1."""
    values = np.asarray(values.detach().cpu() if torch.is_tensor(values) else values, dtype=float)
    values = values.reshape(len(values), -1)
    p = len(values)
    power = (np.abs(np.fft.rfft(values, axis=0)) ** 2).sum(1)
    power[1:(p + 1) // 2] *= 2  # the conjugate frequency p − k carries the same power
    total = power.sum()
    return power / total if total > 0 else power


def embedding_spectra(params: Mapping[str, torch.Tensor], p: int) -> dict[str, np.ndarray]:
    """Fourier power of the residue rows of the embedding and the unembedding."""
    return {"embedding": fourier_power(params["embed.weight"][:p]),
            "unembedding": fourier_power(params["unembed.weight"][:p])}


def key_frequencies(power: np.ndarray, count: int) -> list[int]:
    """The `count` non-constant frequencies with the most power, strongest first."""
    order = np.argsort(-power[1:], kind="stable") + 1
    return [int(k) for k in order[:count]]


def checkpoint_steps(n_steps: int, every: int) -> list[int]:
    """Steps 0, every, 2·every, …, and the final step."""
    if every < 1:
        raise InputError(f"checkpoint_every must be at least 1, got {every}")
    return sorted(set(range(0, n_steps + 1, every)) | {n_steps})


def spectra_over_training(history: History, steps: Sequence[int], p: int, progress: bool = True) -> xr.DataArray:
    """Fourier power of embedding and unembedding at the given checkpoints: step × matrix × frequency."""
    values = []
    for s in tqdm(steps, desc="Fourier spectra", disable=not progress, leave=False):
        spectra = embedding_spectra(history.params(s), p)
        values.append([spectra["embedding"], spectra["unembedding"]])
    return xr.DataArray(np.array(values), dims=("step", "matrix", "frequency"),
                        coords={"step": list(steps), "matrix": ["embedding", "unembedding"],
                                "frequency": np.arange(p // 2 + 1)})


def key_frequency_power(spectra: xr.DataArray, count: int) -> tuple[dict[str, list[int]], xr.DataArray]:
    """The `count` key frequencies of each matrix's last spectrum (spectra_over_training), and
    both matrices' power at the embedding's key frequencies over the checkpoints (step × matrix)."""
    final = spectra.isel(step=-1)
    keys = {str(m): key_frequencies(final.sel(matrix=m).values, count) for m in spectra["matrix"].values}
    return keys, spectra.sel(frequency=keys["embedding"]).sum("frequency")


# --- data attribution by the task's structure ---------------------------------------------


def residue_profile(scores: np.ndarray, train_targets: np.ndarray, test_targets: np.ndarray, p: int) -> np.ndarray:
    """Mean score [train, test] by residue difference Δ = (r_train − r_test) mod p: [p]
    (NaN where no pair has that difference)."""
    delta = (np.asarray(train_targets)[:, None] - np.asarray(test_targets)[None, :]) % p
    sums = np.bincount(delta.ravel(), weights=np.asarray(scores, dtype=float).ravel(), minlength=p)
    counts = np.bincount(delta.ravel(), minlength=p)
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def relations(train_pairs: np.ndarray, test_pairs: np.ndarray, p: int) -> np.ndarray:
    """[train, test] index into RELATIONS: how each training pair (a', b') relates to each
    explained pair (a, b). With the same sum, a shared operand forces the same pair."""
    train_pairs, test_pairs = np.asarray(train_pairs), np.asarray(test_pairs)
    a, b = train_pairs[:, 0, None], train_pairs[:, 1, None]
    c, d = test_pairs[None, :, 0], test_pairs[None, :, 1]
    same_pair = ((a == c) & (b == d)) | ((a == d) & (b == c))
    same_sum = (a + b) % p == (c + d) % p
    shared = (a == c) | (a == d) | (b == c) | (b == d)
    return np.select([same_pair, same_sum, shared], [0, 1, 2], default=3)


def influence_by_relation(scores: np.ndarray, relation: np.ndarray) -> pd.DataFrame:
    """Per relation: its fraction of the (train, test) pairs, the mean score, and its share of the
    positive, the negative and the absolute influence."""
    scores = np.asarray(scores, dtype=float)
    positive, negative, absolute = np.clip(scores, 0, None), np.clip(-scores, 0, None), np.abs(scores)
    rows = []
    for code, name in enumerate(RELATIONS):
        mask = relation == code
        rows.append({"relation": name, "pairs_fraction": mask.mean(),
                     "mean_score": scores[mask].mean() if mask.any() else np.nan,
                     "positive_share": positive[mask].sum() / max(positive.sum(), 1e-300),
                     "negative_share": negative[mask].sum() / max(negative.sum(), 1e-300),
                     "absolute_share": absolute[mask].sum() / max(absolute.sum(), 1e-300)})
    return pd.DataFrame(rows)


def carried_share(cube: xr.Dataset) -> np.ndarray:
    """Per window of a data_attribution cube: the largest share, over the explained inputs, of
    the change that earlier momentum carried into the window unsplit, |carried| /
    (Σ_train |attribution| + |carried|); 0 where every earlier step was replayed."""
    carried = np.abs(cube["carried"])
    return (carried / (np.abs(cube["attribution"]).sum("train") + carried)).max("test").values.ravel()


@dataclass
class DataStructure:
    """A data_attribution cube's windows grouped by the task's structure (data_structure)."""

    labels: list[str]  # one per window: "phase 2 (steps 40-60)"
    phases: np.ndarray  # the phase of each window
    carried_share: np.ndarray  # per window (carried_share)
    by_relation: pd.DataFrame  # influence_by_relation of each window, its label in column `bin`
    profiles: dict[str, np.ndarray]  # residue_profile of each window, by label
    spectra: dict[str, np.ndarray]  # the profiles' Fourier power, by label

    def same_sum(self) -> pd.DataFrame:
        """The rows of the training pairs that have the explained pair's sum, one per window."""
        return self.by_relation[self.by_relation["relation"] == "same sum"]

    def kernel_frequencies(self, count: int) -> dict[str, list[int]]:
        """The `count` strongest non-constant frequencies of each window's residue profile."""
        return {label: key_frequencies(power, count) for label, power in self.spectra.items()}


def data_structure(cube: xr.Dataset, train_pairs: np.ndarray, train_residues: np.ndarray,
                   test_pairs: np.ndarray, test_residues: np.ndarray, p: int, phases: pd.DataFrame) -> DataStructure:
    """Group each window of a data_attribution cube by the task's structure: relations of the
    training pairs to the explained ones, and the mean score by residue difference with its
    Fourier spectrum. `train_pairs` [n_train, 2] and `train_residues` cover the whole training
    set (the cube's `train` coordinate indexes them); `test_pairs` / `test_residues` are the
    explained pairs, in the cube's order."""
    index = cube["train"].values
    train_pairs, train_residues = np.asarray(train_pairs)[index], np.asarray(train_residues)[index]
    relation = relations(train_pairs, test_pairs, p)
    window_phases = phase_of(cube["step"].values, phases)
    labels, tables, profiles = [], [], {}
    for b, phase in enumerate(window_phases):
        scores = cube["attribution"].isel(step=b).transpose("train", "test").values
        label = f"phase {phase} (steps {int(cube['step'][b])}-{int(cube['step_stop'][b])})"
        labels.append(label)
        tables.append(influence_by_relation(scores, relation).assign(bin=label))
        profiles[label] = residue_profile(scores, train_residues, test_residues, p)
    return DataStructure(labels, window_phases, carried_share(cube), pd.concat(tables, ignore_index=True), profiles,
                         {label: fourier_power(np.nan_to_num(profile)) for label, profile in profiles.items()})


# --- the swap experiment ------------------------------------------------------------------


@torch.no_grad()
def accuracy(model: torch.nn.Module, params: Mapping[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> float:
    """Accuracy of `model` with the parameters `params` on (x, y)."""
    return float((functional_call(model, dict(params), (x,)).argmax(-1) == y).double().mean())


def swap_experiment(history: History, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                    steps: Sequence[int], variants: Mapping[str, Sequence[str]] = SWAP_VARIANTS,
                    progress: bool = True) -> pd.DataFrame:
    """Validation accuracy of the checkpoint θ_i at each step i, and of θ_i with the components
    of each variant taken from the final model: one row per (step, variant), with the gain."""
    final = history.params(history.n_steps)
    rows = []
    for s in tqdm(steps, desc="swap", disable=not progress, leave=False):
        checkpoint = history.params(s)
        original = accuracy(model, checkpoint, x, y)
        for variant, components in variants.items():
            swapped = accuracy(model, splice(checkpoint, final, components), x, y)
            rows.append({"step": s, "variant": variant, "original_acc": original,
                         "swapped_acc": swapped, "gain": swapped - original})
    return pd.DataFrame(rows)


# --- the retraining experiment ------------------------------------------------------------


def retraining_state(checkpoint: Mapping[str, torch.Tensor], copied: Sequence[str], seed: int,
                     reinit_std: float) -> dict[str, torch.Tensor]:
    """The parameters that replace a fresh model's seeded initialisation: the `copied` components
    from the checkpoint and, with reinit_std > 0, every other tensor drawn from N(0, reinit_std²)
    (the paper's re-initialisation); with reinit_std = 0 the others keep the model's own init."""
    taken = set(component_tensors(list(checkpoint), copied))
    state = {name: value for name, value in checkpoint.items() if name in taken}
    if reinit_std > 0:
        generator = torch.Generator().manual_seed(seed)
        for name, value in sorted(checkpoint.items()):  # draws in name order, whatever the dict's order
            if name not in taken:
                state[name] = torch.randn(value.shape, generator=generator, dtype=torch.float64) * reinit_std
    return state


def retrain(config: TransformerConfig, checkpoint: Mapping[str, torch.Tensor], variant: str, seed: int, *,
            max_steps: int, target: float, dtype: str, reinit_std: float, device="cpu") -> dict:
    """Retrain a fresh model (initialisation seed `seed`) whose `variant` components are copied
    from `checkpoint`, with the recorded run's optimizer, until training accuracy is 100% and
    validation accuracy reaches `target`, or `max_steps`. Returns the steps to the target."""
    if variant not in RETRAIN_VARIANTS:
        raise InputError(f"unknown retraining variant {variant!r}: use one of {list(RETRAIN_VARIANTS)}")
    if dtype not in DTYPES:
        raise InputError(f"retrain_dtype {dtype!r} is not supported: use one of {sorted(DTYPES)}")
    run_config = dataclasses.replace(config, seed=seed, max_steps=max_steps, stop_val_acc=target, dtype=dtype)
    state = retraining_state(checkpoint, RETRAIN_VARIANTS[variant], seed, reinit_std)
    result = train_transformer(run_config, device=device, progress=False, initial_state=state)
    reached = first_step(result.log, "val_acc", target)
    return {"variant": variant, "seed": seed, "steps_to_target": reached, "reached": bool(np.isfinite(reached)),
            "steps_run": int(result.log["step"].iloc[-1]), "final_val_acc": float(result.log["val_acc"].iloc[-1])}


def retraining_experiment(config: TransformerConfig, history: History, checkpoints: Sequence[int],
                          variants: Sequence[str], seeds: Sequence[int], *, max_steps: int, target: float,
                          dtype: str, reinit_std: float, device="cpu", workers: int = 1,
                          progress: bool = True) -> pd.DataFrame:
    """Every (variant, checkpoint t, seed) retraining run, plus training from scratch once per
    seed (checkpoint NaN): one row each, with the steps to `target` validation accuracy.

    workers > 1 runs that many side by side (explaind.parallel.run_all; 0: one process per core, on a GPU 1);
    each run is seeded on its own, so the rows do not depend on it."""
    unknown = sorted(set(variants) - set(RETRAIN_VARIANTS))
    if unknown:
        raise InputError(f"unknown retraining variants {unknown}: use names from {list(RETRAIN_VARIANTS)}")
    repeated = sorted({v for v in variants if list(variants).count(v) > 1})
    if repeated:
        raise InputError(f"retraining variants {repeated} are given more than once, which would run their jobs "
                         "twice and count every seed twice: name each once")
    points = [(v, t) for t in checkpoints for v in variants if v != "scratch"] + [("scratch", None)]
    copied_from = {t: history.params(0 if t is None else t) for _, t in points}  # scratch copies nothing
    common = dict(max_steps=max_steps, target=target, dtype=dtype, reinit_std=reinit_std, device=device)
    jobs = [(variant, t, seed) for variant, t in points for seed in seeds]
    calls = [functools.partial(retrain, config, copied_from[t], variant, seed, **common) for variant, t, seed in jobs]
    results = run_all(calls, workers, "retraining", progress, device)
    return pd.DataFrame([{"checkpoint": np.nan if t is None else t, **row} for (_, t, _), row in zip(jobs, results)])


def retraining_checkpoints(n_steps: int, count: int) -> list[int]:
    """`count` distinct checkpoints evenly spaced over the run, ending at the final step (step 0
    excluded: copying from the initialisation is training from scratch), so at most `n_steps`."""
    if count < 1:
        raise InputError(f"retrain_checkpoints must be at least 1, got {count}")
    if count > n_steps:  # rounding would repeat steps, or give step 0
        raise InputError(f"retrain_checkpoints={count} exceeds the run's {n_steps} update steps: there are only "
                         f"{n_steps} checkpoints after step 0. Fix: set retrain_checkpoints to at most {n_steps}")
    return sorted({int(round(v)) for v in np.linspace(0, n_steps, count + 1)[1:]})


# --- summaries: the numbers of the conclusion ---------------------------------------------


def phase_of(steps: Sequence[int], phases: pd.DataFrame) -> np.ndarray:
    """The phase number of each step (the last phase whose start is at or before it)."""
    starts = phases["start"].to_numpy()
    position = np.searchsorted(starts, np.asarray(steps), side="right") - 1
    if np.any(position < 0):  # index -1 would name the last phase
        raise InputError(f"steps {sorted(set(np.asarray(steps)[position < 0].tolist()))[:10]} come before the first "
                         f"phase, which starts at step {starts[0]}: pass steps of the phases' range")
    return phases["phase"].to_numpy()[position]


def swap_summary(swap: pd.DataFrame, target: float) -> pd.DataFrame:
    """Per swap variant: the largest accuracy gain and its step, the mean gain, and the first
    checkpoint step whose swapped model reaches `target` validation accuracy (NaN: none)."""
    rows = []
    for variant, frame in swap.groupby("variant", sort=False):
        best = frame.loc[frame["gain"].idxmax()]
        reached = frame.loc[frame["swapped_acc"] >= target, "step"]
        rows.append({"variant": variant, "max_gain": float(best["gain"]), "max_gain_step": int(best["step"]),
                     "mean_gain": float(frame["gain"].mean()),
                     "first_step_at_target": float(reached.min()) if len(reached) else np.nan})
    return pd.DataFrame(rows)


def retraining_summary(runs: pd.DataFrame) -> pd.DataFrame:
    """Per (variant, checkpoint): the fraction of seeds that reached the target, and the median
    steps to it over all seeds, a run that never reached it counting as infinitely slow (NaN
    when the median run did not reach it)."""
    rows = []
    for (variant, checkpoint), frame in runs.groupby(["variant", "checkpoint"], sort=False, dropna=False):
        steps = frame["steps_to_target"].fillna(np.inf).to_numpy()
        median = float(np.median(steps))
        rows.append({"variant": variant, "checkpoint": checkpoint, "seeds": len(frame),
                     "reached": float(frame["reached"].mean()),
                     "median_steps_to_target": median if np.isfinite(median) else np.nan})
    return pd.DataFrame(rows)


PAPER_PIPELINE_STEPS = 200  # docs/method.md §3: a fresh model given a grokked pipeline generalises within ~200 steps


def retraining_finding(summary: pd.DataFrame, max_steps: int) -> dict:
    """The paper's retraining claim checked on retraining_summary(): the pipeline copied from the
    last checkpoint reaches the target within PAPER_PIPELINE_STEPS steps (median over seeds)."""
    pipeline = summary[summary["variant"] == "pipeline"]
    if not len(pipeline):
        raise InputError("the paper's retraining claim concerns the pipeline: add it to retrain_variants")
    last = pipeline.loc[pipeline["checkpoint"].idxmax()]
    median = last["median_steps_to_target"]
    steps = f"median {median:.0f} steps" if np.isfinite(median) else f"median not reached within {max_steps} steps"
    return {"claim": f"a fresh model given a grokked pipeline generalises within ~{PAPER_PIPELINE_STEPS} steps",
            "ours": f"pipeline from step {last['checkpoint']:.0f}: {steps} ({last['reached']:.0%} of {last['seeds']} seeds reached)",
            "holds": bool(np.isfinite(median) and median <= PAPER_PIPELINE_STEPS)}


def phase_weighted(per_bin: xr.DataArray, phases: pd.DataFrame) -> dict:
    """A per-bin share's bins grouped by phase (the phases that have a bin with a share), each bin
    weighted by the steps it spans, as detect_phases weighs them; bins without a share (NaN: no
    change to share) are left out. `.mean()` / `.std()` of a group: the phase's mean and spread."""
    per_bin = per_bin[np.isfinite(per_bin.values)]
    width = per_bin["step_stop"] - per_bin["step"]
    phase = phase_of(per_bin["step"].values, phases)
    return {int(n): per_bin[phase == n].weighted(width[phase == n]) for n in np.unique(phase)}


def _phase_rise(per_bin: xr.DataArray, phases: pd.DataFrame) -> tuple[float, float, float, int, bool]:
    """A per-bin share's step-weighted mean over phase 2 and over phase 3 (`phase_weighted`),
    phase 2's bin-to-bin spread (weighted standard deviation), its bin count, and whether phase 3
    exceeds phase 2 by more than that spread: a rise within the noise is no finding, and neither
    is one whose noise is unknown (one bin)."""
    groups = phase_weighted(per_bin, phases)
    before, after = (float(groups[n].mean()) if n in groups else np.nan for n in (2, 3))
    bins = groups[2].obj.sizes["step"] if 2 in groups else 0
    spread = float(groups[2].std()) if bins > 1 else np.nan
    rises = bool(np.isfinite(spread) and after - before > spread)
    return before, after, spread, bins, rises


def paper_findings(phases: pd.DataFrame, shares: xr.DataArray, decay_share: xr.DataArray) -> pd.DataFrame:
    """The paper's three phases (docs/method.md §3) checked on detected phases: one row per claim with
    what we measured and whether it holds. `shares` (step bin × component) and `decay_share` (per
    step bin, the same bins) are those the phases were detected on; phases must number at least
    three. A share takes a larger part in phase 3 only if its step-weighted mean there exceeds
    phase 2's by more than phase 2's bins spread (`_phase_rise`)."""
    if len(phases) < 3:
        raise InputError(f"the paper's findings concern three phases, got {len(phases)}: set phases to 3 or more")
    for name, array, dims in (("shares", shares, {"step", "component"}), ("decay_share", decay_share, {"step"})):
        if not isinstance(array, xr.DataArray) or set(array.dims) != dims or "step_stop" not in array.coords:
            raise InputError(f"{name} must be an xarray.DataArray over {sorted(dims)} with the bins' `step_stop` "
                             f"coordinate, got {type(array).__name__}: pass influence."
                             f"{'component_shares' if name == 'shares' else 'decay_share'}(cube) of the binned cube")
    missing = sorted({*PIPELINE, *OUTER, "unembedding"} - set(shares["component"].values.tolist()))
    if missing:
        raise InputError(f"shares lack the components {missing}: pass the shares of a cube split by "
                         "TRANSFORMER_COMPONENTS (grokking.component_attribution)")
    if not all(np.array_equal(shares[c].values, decay_share[c].values) for c in ("step", "step_stop")):
        raise InputError("shares and decay_share cover different step bins: compute both from the same cube")
    leaders = bin_leaders(shares[shares.notnull().any("component")])  # a bin without a share has no leader
    second = leaders[phase_of(leaders.index, phases) == 2]
    pipeline_bins = second.isin(PIPELINE)
    switches = int((second[pipeline_bins] != second[pipeline_bins].shift()).sum() - 1) if pipeline_bins.any() else 0
    first = phases.iloc[0]
    claims = [
        {"claim": "phase 1 (memorisation) is led by the unembedding",
         "ours": f"led by {first['leader']} (unembedding share {first['share_unembedding']:.2f})",
         "holds": first["leader"] == "unembedding"},
        {"claim": "phase 2: attention and the first MLP layer alternate in leading",
         "ours": f"they lead {int(pipeline_bins.sum())} of {len(second)} bins, {switches} switches between them",
         "holds": bool(pipeline_bins.mean() > 0.5 and second.isin(["attention"]).any()
                       and second.isin(["mlp_in"]).any() and switches >= 1)}]
    outer = shares.sel(component=list(OUTER)).sum("component", skipna=False)
    for claim, name, per_bin in (("the outer layers take", "outer share", outer), ("weight decay takes", "decay share", decay_share)):
        before, after, spread, bins, rises = _phase_rise(per_bin, phases)
        noise = f"its bins spread ±{spread:.3f}" if np.isfinite(spread) else f"{bins} bin(s): its spread unknown"
        claims.append({"claim": f"phase 3: {claim} a larger share",
                       "ours": f"{name} {before:.3f} in phase 2 ({noise}), {after:.3f} in phase 3", "holds": rises})
    return pd.DataFrame(claims)


# --- what the notebook reports ------------------------------------------------------------


@dataclass
class GrokkingSummary:
    """What the stage measured, section by section: conclusion() says it in sentences, metrics()
    writes it for metrics.json."""

    label: str  # the run, as stages.load_run names it
    n_steps: int
    marks: dict[str, float]  # milestones()
    phases: pd.DataFrame  # detect_phases()
    nearest: pd.DataFrame  # nearest_boundaries()
    findings: pd.DataFrame  # paper_findings(), with retraining_finding() where the pipeline was retrained
    decay_share: xr.DataArray  # weight decay's share of the validation pairs' change per step bin
    component_residual: float  # the component attribution's relative residual
    bin_errors: pd.DataFrame  # bin_errors()
    net_change: float  # the largest |final - initial| true-class log-probability of an explained pair
    spikes: list[int]  # loss_spikes()
    updates: DecayTrend  # decay_trend()
    windows: list[tuple[int, int]]  # data_windows()
    data: DataStructure  # data_structure()
    data_residual: float  # the data attribution's relative residual (its worst window)
    kernel_frequencies: dict[str, list[int]]  # DataStructure.kernel_frequencies()
    keys: dict[str, list[int]]  # key_frequency_power()
    key_power: xr.DataArray  # key_frequency_power()
    swap: pd.DataFrame  # swap_summary()
    retraining: pd.DataFrame  # retraining_summary()
    target: float  # the validation accuracy of the swap and retraining experiments
    max_steps: int  # the retraining runs' step cap


def _steps(value: float | None, digits: int = 0) -> str:
    return "not reached" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def conclusion(s: GrokkingSummary) -> list[str]:
    """The stage's findings, one sentence per measurement, in the notebook's order."""
    lines = [f"Run: {s.label}, {s.n_steps} steps; memorised (100% training accuracy) at step {_steps(s.marks['t_mem'])}, "
             f"50% / 95% validation accuracy at steps {_steps(s.marks['t_val_50'])} / {_steps(s.marks['t_val_95'])}.",
             "Phases (rule of section 3): " + "; ".join(
                 f"phase {r.phase} steps {r.start}-{r.stop} led by {r.leader}" for r in s.phases.itertuples()) + ".",
             "Nearest boundary per milestone: " + "; ".join(
                 f"{r.milestone} {_steps(r.step)} -> {_steps(r.boundary)} (ratio {_steps(r.ratio, 2)})"
                 for r in s.nearest.itertuples()) + "."]
    lines += [f"Paper: {r.claim}. Ours: {r.ours}. {'Holds' if r.holds else 'Does NOT hold'}." for r in s.findings.itertuples()]
    same_sum = s.data.same_sum()
    lines.append("Data attribution: same-sum training pairs carry " + "; ".join(
        f"{r.positive_share:.1%} of the positive influence in {r.bin}" for r in same_sum.itertuples())
        + f" (they are {same_sum['pairs_fraction'].iloc[0]:.1%} of the pairs).")
    lines.append("Kernel's strongest residue frequencies per bin: " + "; ".join(
        f"{k}: {v}" for k, v in s.kernel_frequencies.items())
        + f"; the final embedding's key frequencies: {s.keys['embedding']}, unembedding: {s.keys['unembedding']}.")
    outer = s.swap.set_index("variant").loc["outer layers"]
    lines.append(f"Swap: the final outer layers around the step-i pipeline gain at most {outer['max_gain']:.1%} validation "
                 f"accuracy (at step {int(outer['max_gain_step'])}); the swapped model first reaches {s.target:.0%} at step "
                 f"{_steps(outer['first_step_at_target'])}, the original run at {_steps(s.marks['t_val_95'])}.")
    for r in s.retraining.itertuples():
        where = "from scratch" if r.variant == "scratch" else f"{r.variant} copied from step {r.checkpoint:.0f}"
        lines.append(f"Retraining {where}: steps to {s.target:.0%}, median {_steps(r.median_steps_to_target)} "
                     f"({r.reached:.0%} of {r.seeds} seeds within {s.max_steps} steps).")
    swing = s.bin_errors.loc[s.bin_errors["max_change"].idxmax()]
    lines.append(f"Beyond the paper: training-loss spikes (x10 within one step) at steps {s.spikes}; inside single step bins "
                 f"the true-class log-probability swings by up to {swing['max_change']:.1f} (bin from step "
                 f"{int(swing['step'])}), against a net change of at most {s.net_change:.1f} over the run; weight decay's "
                 f"share of the parameter updates goes from {s.updates.early:.3f} (first {s.updates.early_steps} steps) "
                 f"to {s.updates.late:.3f} (last {s.updates.late_steps}).")
    return lines


def metrics(s: GrokkingSummary) -> dict:
    """metrics.json: milestones, phases, the paper's claims, residuals, data attribution, Fourier,
    swap and retraining results."""
    data_phases = [f"phase_{n}" for n in s.data.phases]
    same_sum = s.data.same_sum()
    return {
        "steps": s.n_steps,
        "milestones": s.marks,
        "phases": {f"phase_{r.phase}": {"start": r.start, "stop": r.stop, "leader": r.leader} for r in s.phases.itertuples()},
        "boundary_to_milestone_ratio": {r.milestone: r.ratio for r in s.nearest.itertuples()},
        "paper_claims_hold": {r.claim: bool(r.holds) for r in s.findings.itertuples()},
        "mean_decay_share_per_phase": {f"phase_{n}": float(group.mean())  # step-weighted
                                       for n, group in phase_weighted(s.decay_share, s.phases).items()},
        "component_attribution_relative_residual": s.component_residual,
        "bin_relative_residual": {"median": float(s.bin_errors["relative"].median()),
                                  "max": float(s.bin_errors["relative"].max())},
        "loss_spikes": s.spikes,
        "data_attribution": {
            "windows": {phase: list(window) for phase, window in zip(data_phases, s.windows)},
            "relative_residual": s.data_residual,
            "carried_share": {phase: float(share) for phase, share in zip(data_phases, s.data.carried_share)},
            "same_sum_positive_share": dict(zip(data_phases, same_sum["positive_share"])),
            "same_sum_pairs_fraction": float(same_sum["pairs_fraction"].iloc[0]),
            "kernel_top_frequency": {phase: keys[0] for phase, keys in zip(data_phases, s.kernel_frequencies.values())}},
        "key_frequencies": s.keys,
        "key_frequency_power_final": {m: float(s.key_power.sel(matrix=m)[-1]) for m in ("embedding", "unembedding")},
        "swap": {r.variant: {"max_gain": r.max_gain, "max_gain_step": r.max_gain_step,
                             "first_step_at_target": r.first_step_at_target} for r in s.swap.itertuples()},
        "retraining": {r.variant + ("" if r.variant == "scratch" else f"@{r.checkpoint:.0f}"):
                       {"median_steps_to_target": r.median_steps_to_target, "reached": r.reached}
                       for r in s.retraining.itertuples()},
    }
