"""The stage `influence` (notebook 05): ExPLAIND's scores validated against established criteria.

Run once per trained model (`influence@cnn`, `influence@transformer`); `InfluenceConfig` is the
schema of the params.yaml section `influence.<model>`. Two studies, each a function here that the
notebook calls and plots:

- `pruning_study`: parameter-wise scores against six other criteria (explaind.pruning), on
  random splits of the held-out set into a score part and an evaluation part.
- `datamodel_study`: data scores against retraining on random subsets (explaind.datamodels):
  the linear datamodeling score of ExPLAIND, TracIn and random scores, with bootstrap intervals.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import pandas as pd
import torch
import xarray as xr

from . import datamodels, pruning
from .components import group_tensors
from .engine import explain
from .errors import ExplaindError, InputError
from .functional import FlatModel
from .influence import data_scores
from .quadrature import MAX_NODES
from .stages import Run, check_held_out, first
from .training import check_ranges, train_cnn, train_transformer
from .verify import check_updates_once


@dataclass
class InfluenceConfig:
    """Section `influence.<model>` of params.yaml: the pruning and datamodel studies."""

    model: Literal["cnn", "transformer"] = "cnn"  # set by the runner from the stage (influence@cnn)
    # --- pruning with parameter-wise scores
    splits: int = 5  # random splits of the held-out inputs into a score part and an evaluation part
    score_inputs: int = 8  # held-out inputs per split that compute the scores; the others evaluate
    min_fraction: float = 1.0e-3  # smallest fraction of the prunable weights kept
    max_fraction: float = 0.3  # largest fraction kept
    fractions: int = 10  # points of the log-spaced grid of fractions kept
    protected: tuple[str, ...] = ("linear",)  # components never pruned (the output layer)
    outputs: Literal["all", "true_class"] = "all"  # outputs summed in ExPLAIND's importance (the paper: all)
    quadrature: int = 1  # nodes per smooth piece of each step's path integral (parameter scores)
    breakpoints: bool = False  # locate the ReLU / max-pool kinks along each step first (every explain call)
    # with breakpoints: 0 searches every step; > 0 only the steps whose plain integral misses an
    # explained output by more (far cheaper over a long run: most steps cross no kink)
    kink_tolerance: float = 0.0
    tolerance: float = 1.0  # the largest accepted relative residual of an explain call
    # --- data scores against retraining (linear datamodeling score)
    lds_subsets: int = 16  # models retrained on random subsets of the training set
    lds_fraction: float = 0.5  # fraction of the training set in each subset
    lds_inputs: int = 16  # held-out inputs whose outputs are correlated (the first ones)
    lds_steps: int = 0  # 0: the whole schedule; k > 0 (full-batch runs): the first k steps only
    lds_quadrature: int = 2  # nodes of the data scores' path integral (compared with retrained outputs)
    retrain_workers: int = 1  # processes retraining subsets side by side, one CPU thread each (0: one per core, on a GPU 1)
    bootstrap: int = 1000  # bootstrap resamples of the confidence intervals
    confidence: float = 0.95  # level of the confidence intervals

    def __post_init__(self):
        nodes = f"at least 1 and at most {MAX_NODES} (each node is one Jacobian pass per step)"
        check_ranges(f"influence.{self.model}", self, (
            ("splits", self.splits >= 1, "at least 1"),
            ("score_inputs", self.score_inputs >= 1, "at least 1"),
            ("min_fraction", 0 < self.min_fraction <= self.max_fraction, "in (0, max_fraction]"),
            ("max_fraction", self.max_fraction <= 1, "at most 1"),
            ("fractions", self.fractions >= 1, "at least 1"),
            ("quadrature", 1 <= self.quadrature <= MAX_NODES, nodes),
            ("kink_tolerance", self.kink_tolerance >= 0, "at least 0"),
            ("tolerance", self.tolerance >= 0, "at least 0"),
            ("lds_subsets", self.lds_subsets >= 2, "at least 2 (a correlation over subsets)"),
            ("lds_fraction", 0 < self.lds_fraction < 1, "in (0, 1)"),
            ("lds_inputs", self.lds_inputs >= 1, "at least 1"),
            ("lds_steps", self.lds_steps >= 0, "at least 0 (0: the whole schedule)"),
            ("lds_quadrature", 1 <= self.lds_quadrature <= MAX_NODES, nodes),
            ("retrain_workers", self.retrain_workers >= 0, "at least 0 (0: one per core, on a GPU 1)"),
            ("bootstrap", self.bootstrap >= 1, "at least 1"),
            ("confidence", 0 < self.confidence < 1, "in (0, 1)"),
        ))

    def check_run(self, held_out: int) -> None:
        """Refuse counts beyond what the trained run has (its `held_out` inputs), which slicing would
        otherwise cap without a word (score_inputs: pruning.split_inputs refuses it)."""
        check_held_out(f"influence.{self.model}", self, held_out, ("lds_inputs",))


def explain_options(cfg: InfluenceConfig, run: Run, dtype: torch.dtype, device: str, progress: bool) -> dict:
    """The explain() arguments every call of the stage shares. The calls trust the recorded
    updates (no gradient is recomputed where no training sample is kept), once checked against
    the modelled optimizer here, once per process."""
    check_updates_once(run.history, run.model, device)
    return dict(components=run.components, breakpoints=cfg.breakpoints, kink_tolerance=cfg.kink_tolerance,
                dtype=dtype, device=device, tolerance=cfg.tolerance, check_updates=False, progress=progress)


# --- pruning ------------------------------------------------------------------------------


@dataclass
class PruningResult:
    """Curves per split, their areas, ExPLAIND's verdicts and what the study cost."""

    curves: pd.DataFrame  # split, protocol, criterion, fraction, accuracy, agreement, kl
    areas: pd.DataFrame  # split, protocol, criterion, accuracy, agreement, kl (areas under the curves)
    verdicts: pd.DataFrame  # explaind against every other criterion (pruning.verdicts)
    unpruned: pd.DataFrame  # split, accuracy of the unpruned model on the evaluation part
    groups: list[np.ndarray]  # the held-out inputs whose scores are summed together
    prunable: int  # prunable weights (outside the protected components)
    parameters: int  # all weights
    relative_residual: float  # the relative residual of the explain call
    timings: dict[str, float]


def group_scores(run: Run, flat: FlatModel, theta: torch.Tensor, groups: list[np.ndarray], cfg: InfluenceConfig,
                 dtype: torch.dtype, device: str, timings: dict, progress: bool) -> tuple[dict[str, torch.Tensor], float]:
    """The additive criteria's sums over each group of inputs ([groups, D] each), and the
    relative residual of the explain call (one for all groups: parameter scores per input)."""
    loss = run.history.per_sample_loss()
    union = np.concatenate(groups)
    started = time.perf_counter()
    outputs = "true" if cfg.outputs == "true_class" else "all"  # "true" would read as a YAML boolean
    cube = explain(run.history, run.model, run.test_x[union], run.test_y[union], keep=("test",), outputs=outputs,
                   parameter_scores=True, quadrature=cfg.quadrature, **explain_options(cfg, run, dtype, device, progress))
    timings["explain (parameter scores)"] = time.perf_counter() - started
    sums: dict[str, list[torch.Tensor]] = {name: [] for name in pruning.ADDITIVE if name != "lca"}
    positions = np.split(np.arange(len(union)), np.cumsum([len(g) for g in groups])[:-1])
    for index, rows in zip(groups, positions):
        x, y = run.test_x[index], run.test_y[index]
        for name, values in {**pruning.cube_scores(cube.isel(test=rows), flat.layout),
                             **pruning.gradient_scores(flat, theta, x, y, loss)}.items():
            sums[name].append(values.to(theta))
    started = time.perf_counter()
    weights = torch.zeros(len(groups), len(union), dtype=dtype)  # row g sums the losses of group g's inputs
    weights[np.repeat(np.arange(len(groups)), [len(g) for g in groups]), np.arange(len(union))] = 1.0
    lca = pruning.loss_change_allocation(run.history, flat, run.test_x[union], run.test_y[union], weights, loss, progress)
    timings["loss-change allocation"] = time.perf_counter() - started
    return ({**{name: torch.stack(values).cpu() for name, values in sums.items()}, "lca": lca.cpu()},
            float(cube.attrs["relative_residual"]))


def pruning_study(run: Run, cfg: InfluenceConfig, seed: int, dtype: torch.dtype, device: str = "cpu",
                  progress: bool = True) -> PruningResult:
    """Every criterion on every split, both protocols, on the held-out inputs of `run`."""
    cfg.check_run(held_out=len(run.test_x))  # the stage's first study: refuse the second's counts before any work
    history = run.history
    flat = FlatModel(run.model, history.layout, dtype, device, history.constants())
    theta = flat.layout.flatten(history.params(history.n_steps)).to(flat.device, dtype)
    components = group_tensors(history.layout.names, run.components)
    prunable = pruning.prunable_mask(flat.layout, components, cfg.protected)
    coordinates = pruning.component_coordinates(flat.layout, components)
    fractions = pruning.fraction_grid(cfg.min_fraction, cfg.max_fraction, cfg.fractions)
    splits = pruning.split_inputs(len(run.test_x), cfg.splits, cfg.score_inputs, seed)
    groups, member = pruning.input_groups(splits, len(run.test_x))
    timings: dict[str, float] = {}
    per_group, residual = group_scores(run, flat, theta, groups, cfg, dtype, device, timings, progress)

    started = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    curves, unpruned = [], []
    for i, (_, evaluation) in enumerate(splits):
        scores = pruning.split_scores(per_group, member[i], theta.cpu(), generator)
        x, y = run.test_x[evaluation], run.test_y[evaluation]
        curves.append(pruning.pruning_curves(flat, theta, scores, fractions, prunable, coordinates, x, y).assign(split=i))
        reference = flat.outputs(theta, x, "log_prob")
        unpruned.append({"split": i, **pruning.compare_outputs(reference, reference, y)})
    timings["pruning and evaluation"] = time.perf_counter() - started
    curves = pd.concat(curves, ignore_index=True)
    areas = pruning.area_table(curves)
    return PruningResult(curves, areas, pruning.verdicts(areas), pd.DataFrame(unpruned), groups,
                         int(prunable.sum()), int(prunable.numel()), residual, timings)


def area_summary(areas: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation over splits of every area, per protocol and criterion."""
    summary = areas.groupby(["protocol", "criterion"], sort=False)[list(pruning.METRICS)].agg(["mean", "std"])
    summary.columns = [f"{metric}_{stat}" for metric, stat in summary.columns]
    return summary.reset_index()


def wide_curves(curves: pd.DataFrame, protocol: str) -> pd.DataFrame:
    """One protocol's curves averaged over splits, one column per metric and criterion, for `dvc plots`."""
    mean = curves[curves["protocol"] == protocol].groupby(["fraction", "criterion"], sort=False)[list(pruning.METRICS)].mean()
    wide = mean.unstack("criterion")
    wide.columns = [f"{metric}_{criterion}" for metric, criterion in wide.columns]
    return wide.reset_index()


# --- data scores against retraining -------------------------------------------------------


@dataclass
class DatamodelResult:
    """The retrained models' outputs, every method's scores and predictions, and the LDS."""

    subsets: torch.Tensor  # [subsets, train] boolean
    actual: np.ndarray  # [subsets, inputs] log-probability of the true class after retraining
    scores: dict[str, np.ndarray]  # method -> [train, inputs]
    predicted: dict[str, np.ndarray]  # method -> [subsets, inputs]
    per_input: pd.DataFrame  # test, then the LDS of every method
    summary: pd.DataFrame  # method, lds, ci_low, ci_high (and "<method>_minus_explaind" differences)
    steps: tuple[int, int]  # the explained (and retrained) update steps
    relative_residual: float
    timings: dict[str, float]


def explained_steps(run: Run, cfg: InfluenceConfig) -> tuple[int, int]:
    """The update steps the datamodel study explains: all, or the first lds_steps of a full-batch run."""
    n_steps = run.history.n_steps
    if cfg.lds_steps == 0:
        return 0, n_steps
    if run.name != "transformer":
        raise InputError(f"lds_steps={cfg.lds_steps}: only full-batch runs (the transformer) can be truncated; a "
                         "mini-batch run on a subset has another step count. Fix: set lds_steps: 0")
    if not 0 < cfg.lds_steps <= n_steps:
        raise InputError(f"lds_steps={cfg.lds_steps} must lie in 1 … {n_steps} (the run's steps), or be 0 (all)")
    return 0, cfg.lds_steps


def retrainer(run: Run, steps: int, data_dir: str | Path, device: str) -> Callable[[torch.Tensor], torch.nn.Module]:
    """train(dataset indices) -> model: the run's own training config and seed, on a subset, for
    `steps` updates; picklable, so that worker processes can retrain."""
    if run.name == "cnn":
        return functools.partial(_cnn_on_subset, run.config, str(data_dir), device)
    return functools.partial(_transformer_on_subset, dataclasses.replace(run.config, max_steps=steps), device)


def _cnn_on_subset(config, data_dir: str, device: str, indices: torch.Tensor) -> torch.nn.Module:
    return train_cnn(config, data_dir, device=device, progress=False, train_indices=indices).model


def _transformer_on_subset(config, device: str, indices: torch.Tensor) -> torch.nn.Module:
    result = train_transformer(config, device=device, progress=False, train_indices=indices)
    if result.metrics["steps"] != config.max_steps:  # it stopped early: generalised on the subset
        raise ExplaindError(f"a retraining on {len(indices)} pairs stopped at step {result.metrics['steps']:.0f}, "
                            f"before the {config.max_steps} explained steps. Fix: lower lds_steps")
    return result.model


def datamodel_study(run: Run, cfg: InfluenceConfig, data_dir: str | Path, seed: int, dtype: torch.dtype,
                    device: str = "cpu", progress: bool = True) -> DatamodelResult:
    """The linear datamodeling score of ExPLAIND's data scores, TracIn and random scores."""
    cfg.check_run(held_out=len(run.test_x))
    steps = explained_steps(run, cfg)
    n_inputs = first(cfg.lds_inputs, len(run.test_x))
    x, y = run.test_x[:n_inputs], run.test_y[:n_inputs]
    n_train = len(run.train_y)
    timings: dict[str, float] = {}

    started = time.perf_counter()
    subsets = datamodels.random_subsets(n_train, cfg.lds_subsets, cfg.lds_fraction, seed)
    actual = datamodels.subset_outputs(retrainer(run, steps[1], data_dir, device), subsets, x, y,
                                      cfg.retrain_workers, progress, device).numpy()
    timings["retraining"] = time.perf_counter() - started

    started = time.perf_counter()
    truncated = steps if steps[1] < run.history.n_steps else None
    cube = explain(run.history, run.model, x, y, keep=("train", "test"), outputs="true", steps=truncated,
                   quadrature=cfg.lds_quadrature, **explain_options(cfg, run, dtype, device, progress))
    timings["explain (data scores)"] = time.perf_counter() - started
    started = time.perf_counter()
    tracin = datamodels.tracin_scores(run.history, run.model, x, y, steps=steps, dtype=dtype, device=device,
                                      progress=progress)
    timings["TracIn"] = time.perf_counter() - started

    scores = {
        "explaind": datamodels.aligned_scores(data_scores(cube), n_train),
        "tracin": datamodels.aligned_scores(tracin, n_train),
        "random": np.random.default_rng(seed).normal(size=(n_train, n_inputs)),
    }
    predicted = {name: datamodels.subset_predictions(values, subsets) for name, values in scores.items()}
    per_input = pd.DataFrame({"test": np.arange(n_inputs),
                              **{name: datamodels.lds(actual, values) for name, values in predicted.items()}})
    started = time.perf_counter()
    summary = datamodels.bootstrap_lds(actual, predicted, cfg.bootstrap, cfg.confidence, seed, progress)
    timings["bootstrap"] = time.perf_counter() - started
    return DatamodelResult(subsets, actual, scores, predicted, per_input, summary, steps,
                           float(cube.attrs["relative_residual"]), timings)


def datamodel_dataset(result: DatamodelResult) -> xr.Dataset:
    """The study's raw material as a labelled dataset (stored next to the notebook)."""
    methods = list(result.scores)
    return xr.Dataset(
        {
            "subsets": (("subset", "train"), result.subsets.numpy()),
            "actual": (("subset", "test"), result.actual),
            "scores": (("method", "train", "test"), np.stack([result.scores[m] for m in methods])),
            "predicted": (("method", "subset", "test"), np.stack([result.predicted[m] for m in methods])),
        },
        coords={"method": methods},
        attrs={"steps": list(result.steps), "units": "log-probability of the true class"},
    )


# --- what the notebook reports ------------------------------------------------------------

METRIC_NAMES = {"accuracy": "accuracy", "agreement": "agreement with the unpruned model",
                "kl": "KL to the unpruned model (lower is better)"}
VERDICT_WORDS = {"wins": "wins against", "ties": "ties with", "loses": "loses to"}


def pruning_findings(result: PruningResult) -> list[str]:
    """One sentence per protocol and metric: ExPLAIND's area under the curve (mean over splits),
    and the criteria it wins against, ties with and loses to (with their areas)."""
    lines = []
    for (protocol, metric), table in result.verdicts.groupby(["protocol", "metric"], sort=False):
        parts = []
        for verdict, words in VERDICT_WORDS.items():
            rows = table[table["verdict"] == verdict]
            if len(rows):
                parts.append(f"{words} " + ", ".join(
                    f"{r.against} ({r.other:.3g}; better on {r.splits_better}, worse on {r.splits_worse} of "
                    f"{r.splits} splits)" for r in rows.itertuples()))
        lines.append(f"{protocol} threshold, {METRIC_NAMES[metric]}: ExPLAIND {table['reference'].iloc[0]:.3g}; "
                     + "; ".join(parts))
    return lines


def datamodel_findings(result: DatamodelResult, cfg: InfluenceConfig) -> list[str]:
    """The LDS of every method with its interval, and whether ExPLAIND is better than each other method."""
    summary = result.summary.set_index("method")
    subsets, inputs = result.actual.shape
    lines = [f"LDS (mean over {inputs} held-out inputs of the Spearman correlation over {subsets} retrainings on "
             f"{cfg.lds_fraction:.0%} subsets, update steps {result.steps[0]}-{result.steps[1]}; "
             f"{cfg.confidence:.0%} bootstrap intervals over retrainings and inputs):"]
    for method in result.scores:
        row = summary.loc[method]
        lines.append(f"  {method}: {row['lds']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}]")
    informative, resolution = lds_resolution(subsets, inputs, cfg.confidence)
    for method in list(result.scores)[1:]:
        row = summary.loc[f"{method}_minus_explaind"]
        verdict = (f"not informative at {subsets} subsets" if not informative
                   else "ExPLAIND is better" if row["ci_high"] < 0 else "ExPLAIND is worse" if row["ci_low"] > 0
                   else "no difference resolved at this size")
        lines.append(f"  {method} - explaind: {row['lds']:+.3f} [{row['ci_low']:+.3f}, {row['ci_high']:+.3f}]: {verdict}")
    return lines + [resolution]


def lds_resolution(subsets: int, inputs: int, level: float) -> tuple[bool, str]:
    """Whether bootstrap intervals at `level` of an LDS over `subsets` retrained models can decide
    anything, and a sentence on what the LDS rests on: how finely an input's Spearman can fall,
    and the share of resamples where it is ±1 whatever the scores (datamodels.two_subset_share).
    When that share exceeds a tail of the interval, its bounds are pairwise comparisons."""
    values = datamodels.spearman_values(subsets)
    share, tail = datamodels.two_subset_share(subsets), (1 - level) / 2
    text = (f"the LDS rests on {subsets} retrained subsets and {inputs} held-out inputs. Over {subsets} subsets an "
            f"input's Spearman correlation takes {len(values)} distinct values (the closest "
            f"{np.diff(values).min():.3g} apart), and {f'{share:.1%}' if share >= 1e-3 else 'under 0.1%'} of the bootstrap resamples draw only two distinct "
            f"subsets, over which it is ±1 whatever the scores")
    if share <= tail:
        return True, f"Resolution: {text}, within the {tail:.1%} of each tail of the {level:.0%} intervals."
    return False, (f"Caveat: {text}, more than the {tail:.1%} of each tail of the {level:.0%} intervals, whose bounds "
                   f"are then single pairwise comparisons: the verdicts are not informative at this size "
                   f"(lds_subsets >= {datamodels.fewest_subsets(level)} brings that share within a tail).")


def influence_metrics(pruned: PruningResult, datamodel: DatamodelResult) -> dict:
    """metrics.json: areas under the pruning curves, ExPLAIND's verdict counts, the LDS with intervals."""
    summary = area_summary(pruned.areas)
    areas = {protocol: {row.criterion: {m: getattr(row, f"{m}_mean") for m in pruning.METRICS}
                        for row in table.itertuples()} for protocol, table in summary.groupby("protocol", sort=False)}
    counts = pruned.verdicts["verdict"].value_counts()
    return {
        "pruning": {
            "area": areas,
            "explaind_wins": int(counts.get("wins", 0)),
            "explaind_ties": int(counts.get("ties", 0)),
            "explaind_losses": int(counts.get("loses", 0)),
            "unpruned_accuracy": float(pruned.unpruned["accuracy"].mean()),
            "prunable_weights": pruned.prunable,
            "weights": pruned.parameters,
            "input_groups": len(pruned.groups),
            "explained_inputs": int(sum(len(g) for g in pruned.groups)),
            "relative_residual": pruned.relative_residual,
        },
        "lds": {
            **{row.method: {"mean": row.lds, "ci_low": row.ci_low, "ci_high": row.ci_high}
               for row in datamodel.summary.itertuples()},
            "retrainings": int(datamodel.actual.shape[0]),
            "inputs": int(datamodel.actual.shape[1]),
            "steps": int(datamodel.steps[1] - datamodel.steps[0]),
            "relative_residual": datamodel.relative_residual,
        },
    }
