"""Pruning with parameter-wise scores, and the criteria ExPLAIND's scores are compared with.

The protocol (docs/method.md §3): split the held-out inputs at random into a part that computes the
scores and a part that evaluates; keep the highest-scoring fraction of the prunable weights
under one global threshold (or, as a second protocol, the same fraction of every component);
never prune the protected components (the output layer); do not retrain. A pruned model is the
trained one with the other weights set to zero, compared with the unpruned model on the
evaluation part: accuracy, argmax agreement and KL(unpruned ‖ pruned).

Every score is a flat vector over the history's parameter layout (`History.layout`); higher
means more important. The scores that are sums over inputs (all but magnitude and random) are
computed once per *group* of inputs that belong to the same splits' score parts, so that every
split's scores are sums of group scores and each input is explained once (`input_groups`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import torch
import xarray as xr
from torch.func import vjp, vmap
from tqdm.auto import tqdm

from .components import ComponentSpec, group_tensors
from .cube import per_parameter
from .errors import InputError
from .functional import FlatModel, ParamLayout
from .history import History

CRITERIA = {
    "explaind": "ExPLAIND, Σ_x Σ_out |Σ_step Σ_train ψ| (the paper's importance: |·| after summing)",
    "explaind_abs": "ExPLAIND, Σ_x Σ_out Σ_step |Σ_train ψ| (|·| before summing over steps)",
    "random": "uniform random scores (a fresh draw per split)",
    "magnitude": "|θ| of the trained model",
    "gradient_weight": "|θ ⊙ ∇L|, L the mean loss of the score inputs (SNIP-style gradient × weight)",
    "taylor": "Σ_x |θ ⊙ ∇ℓ(x)| (first-order Taylor estimate of each input's loss change, per input)",
    "lca": "−Σ_step ∇L(θ_s) ⊙ Δθ_s (loss-change allocation, Lan et al. 2019; trapezoid rule)",
}
# Scores summed over the inputs of a split; "gradient" is the summed loss gradient behind
# gradient_weight, whose |·| can only be taken once a split's groups are added up.
ADDITIVE = ("explaind", "explaind_abs", "taylor", "gradient", "lca")
EXPLAIND_VARIABLES = {"explaind": "parameter_score", "explaind_abs": "parameter_score_stepwise_abs"}
METRICS = ("accuracy", "agreement", "kl")


# --------------------------------------------------------------------------- splits


def split_inputs(n_inputs: int, n_splits: int, score_inputs: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(score part, evaluation part) index arrays of `n_splits` random splits of the held-out set."""
    if n_splits < 1:
        raise InputError(f"splits={n_splits}: need at least one split of the held-out inputs")
    if not 0 < score_inputs < n_inputs:
        raise InputError(
            f"score_inputs={score_inputs} must lie in 1 … {n_inputs - 1}: the {n_inputs} held-out "
            "inputs are split into a score part of that size and an evaluation part (the rest)"
        )
    rng = np.random.default_rng(seed)
    splits = []
    for _ in range(n_splits):
        order = rng.permutation(n_inputs)
        splits.append((np.sort(order[:score_inputs]), np.sort(order[score_inputs:])))
    return splits


def input_groups(splits: Sequence[tuple[np.ndarray, np.ndarray]], n_inputs: int) -> tuple[list[np.ndarray], np.ndarray]:
    """The inputs grouped by the score parts they belong to, and which groups each split sums.

    Returns the groups (index arrays; inputs in no score part are left out) and a boolean
    [splits, groups] membership matrix: split i's score part is the union of its groups.
    """
    member = np.zeros((len(splits), n_inputs), dtype=bool)
    for i, (score, _) in enumerate(splits):
        member[i, score] = True
    used = np.flatnonzero(member.any(0))
    patterns, group_of = np.unique(member[:, used].T, axis=0, return_inverse=True)
    groups = [used[group_of.reshape(-1) == g] for g in range(len(patterns))]
    return groups, patterns.T.copy()


# --------------------------------------------------------------------------- criteria


def cube_scores(cube: xr.Dataset, layout: ParamLayout) -> dict[str, torch.Tensor]:
    """ExPLAIND's parameter-wise scores of an explain(..., parameter_scores=True) cube, summed over
    the test / output dims it keeps and moved from the cube's order (component by component) to
    `layout`'s: {"explaind", "explaind_abs"}."""
    scores = per_parameter(cube)
    names = list(cube.attrs["tensor_names"])
    if sorted(names) != sorted(layout.names):
        raise InputError(f"the cube's parameters {names} are not the layout's {list(layout.names)}: "
                         "pass the layout of the history the cube was explained from")
    sizes = dict(zip(layout.names, layout.sizes))
    out = {}
    for criterion, variable in EXPLAIND_VARIABLES.items():
        values = torch.as_tensor(np.asarray(scores[variable].values))
        pieces = dict(zip(names, values.split([sizes[n] for n in names])))
        out[criterion] = torch.cat([pieces[n].reshape(-1) for n in layout.names])
    return out


def gradient_scores(flat: FlatModel, theta: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor,
                    loss, chunk: int = 64) -> dict[str, torch.Tensor]:
    """For one group of inputs: Σ_x |θ ⊙ ∇ℓ(x)| ("taylor") and Σ_x ∇ℓ(x) ("gradient")."""
    if not len(inputs) or len(inputs) != len(targets):
        raise InputError(f"gradient scores need at least one input and one target per input, got {len(inputs)} "
                         f"inputs and {len(targets)} targets: pass a non-empty group of inputs with their targets")
    taylor = torch.zeros_like(theta)
    gradient = torch.zeros_like(theta)
    for x, y in zip(inputs.split(chunk), targets.split(chunk)):
        per_input = flat.per_sample_gradients(theta, flat.cast_inputs(x), y.to(flat.device), loss)
        taylor += (per_input * theta).abs().sum(0)
        gradient += per_input.sum(0)
    return {"taylor": taylor, "gradient": gradient}


def summed_loss_gradients(flat: FlatModel, theta: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor,
                          weights: torch.Tensor, loss) -> torch.Tensor:
    """∇_θ Σ_u weights[g, u] ℓ(x_u) for every row g of weights [G, U]: [G, D], one forward pass."""
    x, y = flat.cast_inputs(inputs), targets.to(flat.device)
    _, pullback = vjp(lambda th: loss(flat.raw(th, x), y), theta)
    return vmap(pullback)(weights.to(flat.device, flat.dtype))[0]


def loss_change_allocation(history: History, flat: FlatModel, inputs: torch.Tensor, targets: torch.Tensor,
                           weights: torch.Tensor, loss, progress: bool = True) -> torch.Tensor:
    """Loss-change allocation (Lan et al. 2019) of G losses L_g = Σ_u weights[g, u] ℓ(x_u): each
    parameter's part Σ_s ∫₀¹ ∂_j L_g(θ_s + tΔθ_s) dt · Δθ_{s,j} of the change of L_g over the
    recorded run, [G, D]. The integral uses the trapezoid rule, so each recorded θ_s costs one
    gradient. Negative: the parameter's moves lowered the loss."""
    def gradients(s: int) -> tuple[torch.Tensor, torch.Tensor]:
        theta = flat.layout.flatten(history.params(s)).to(flat.device, flat.dtype)
        return theta, summed_loss_gradients(flat, theta, inputs, targets, weights, loss)

    theta, gradient = gradients(0)
    total = torch.zeros_like(gradient)
    for s in tqdm(range(1, history.n_steps + 1), desc="loss-change allocation", disable=not progress, leave=False):
        theta_next, gradient_next = gradients(s)
        total += 0.5 * (gradient + gradient_next) * (theta_next - theta)
        theta, gradient = theta_next, gradient_next
    return total


def split_scores(group_scores: dict[str, torch.Tensor], member: np.ndarray, theta: torch.Tensor,
                 generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Every criterion's scores for one split, from the per-group sums ([groups, D] each) and the
    split's row of the membership matrix."""
    chosen = torch.as_tensor(member, dtype=torch.bool)
    summed = {name: values[chosen].sum(0) for name, values in group_scores.items()}
    scores = {
        "explaind": summed["explaind"],
        "explaind_abs": summed["explaind_abs"],
        "random": torch.rand(theta.shape, generator=generator, dtype=theta.dtype, device="cpu"),
        "magnitude": theta.abs(),
        "gradient_weight": (theta * summed["gradient"]).abs(),
        "taylor": summed["taylor"],
        "lca": -summed["lca"],
    }
    return {name: scores[name] for name in CRITERIA}


# --------------------------------------------------------------------------- masks


def prunable_mask(layout: ParamLayout, components: ComponentSpec, protected: Sequence[str]) -> torch.Tensor:
    """[D] True where a coordinate may be pruned (outside the protected components). components:
    any form explain() takes (tensor names or module prefixes per component, a function, ...), or
    a mapping that names only some tensors (the rest are prunable)."""
    components = group_tensors(layout.names, components, complete=False)
    unknown = sorted(set(protected) - set(components))
    if unknown:
        raise InputError(f"protected components {unknown} do not exist; the components are {list(components)}")
    blocked = {name for c in protected for name in components[c]}
    return torch.cat([torch.full((size,), name not in blocked, device="cpu")
                      for name, size in zip(layout.names, layout.sizes)])


def component_coordinates(layout: ParamLayout, components: ComponentSpec) -> dict[str, torch.Tensor]:
    """Each component's coordinates in the flat vector (components: as for prunable_mask)."""
    components = group_tensors(layout.names, components, complete=False)
    slices = layout.slices()
    return {c: torch.cat([torch.arange(slices[n].start, slices[n].stop, device="cpu") for n in names])
            for c, names in components.items()}


def keep_mask(scores: torch.Tensor, fraction: float, prunable: torch.Tensor,
              groups: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """[D] True for the coordinates a pruned model keeps: every protected one, and the highest-scoring
    `fraction` of the prunable ones, under one global threshold (groups=None) or the same
    fraction of each group of coordinates (a threshold per component). Ties keep the lower index."""
    if not 0.0 < fraction <= 1.0:
        raise InputError(f"fraction kept {fraction} must lie in (0, 1]")
    if scores.shape != prunable.shape:
        raise InputError(f"scores of shape {tuple(scores.shape)} for a prunable mask of shape {tuple(prunable.shape)}: "
                         "pass one score per coordinate of the flat parameter vector (the history's layout)")
    if bool(torch.isnan(scores).any()):
        raise InputError("the scores contain NaN: a criterion failed; check its inputs")
    keep = ~prunable
    pools = [prunable.nonzero().squeeze(1)] if groups is None else [g[prunable[g]] for g in groups]
    for pool in pools:
        order = torch.argsort(scores[pool], descending=True, stable=True)
        keep[pool[order[: round(fraction * len(pool))]]] = True
    return keep


# --------------------------------------------------------------------------- evaluation


def compare_outputs(pruned: torch.Tensor, reference: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Accuracy, argmax agreement with the reference and mean KL(reference ‖ pruned) of log-probabilities."""
    targets = targets.to(pruned.device)
    prediction = pruned.argmax(-1)
    return {
        "accuracy": float((prediction == targets).double().mean()),
        "agreement": float((prediction == reference.argmax(-1)).double().mean()),
        "kl": float((reference.exp() * (reference - pruned)).sum(-1).mean()),
    }


def pruning_curves(flat: FlatModel, theta: torch.Tensor, scores: dict[str, torch.Tensor], fractions: Sequence[float],
                   prunable: torch.Tensor, components: dict[str, torch.Tensor], inputs: torch.Tensor,
                   targets: torch.Tensor) -> pd.DataFrame:
    """Accuracy, agreement and KL of the pruned models on (inputs, targets), one row per protocol,
    criterion and fraction kept."""
    reference = flat.outputs(theta, inputs, "log_prob")
    groups = {"global": None, "layerwise": list(components.values())}
    rows = []
    for protocol, pools in groups.items():
        for criterion, values in scores.items():
            for fraction in fractions:
                keep = keep_mask(values, fraction, prunable, pools).to(theta.device)
                pruned = flat.outputs(theta * keep, inputs, "log_prob")
                rows.append({"protocol": protocol, "criterion": criterion, "fraction": float(fraction),
                             **compare_outputs(pruned, reference, targets)})
    return pd.DataFrame(rows)


def fraction_grid(low: float, high: float, points: int) -> np.ndarray:
    """Log-spaced fractions of the prunable weights kept, low … high."""
    if not 0.0 < low < high <= 1.0 or points < 2:
        raise InputError(f"fractions need 0 < min_fraction < max_fraction <= 1 and at least 2 points, got "
                         f"{low}, {high}, {points}")
    return np.geomspace(low, high, points)


def curve_area(fractions: np.ndarray, values: np.ndarray) -> float:
    """The area under a curve over log10(fraction), divided by the axis' length: the curve's mean
    height on the log-spaced grid (trapezoid rule)."""
    x = np.log10(np.asarray(fractions, dtype=float))
    y = np.asarray(values, dtype=float)
    return float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2 / (x[-1] - x[0]))


def area_table(curves: pd.DataFrame) -> pd.DataFrame:
    """The area under each metric's curve, per split, protocol and criterion (curves need a
    `split` column)."""
    rows = []
    for (split, protocol, criterion), curve in curves.groupby(["split", "protocol", "criterion"], sort=False):
        curve = curve.sort_values("fraction")
        rows.append({"split": split, "protocol": protocol, "criterion": criterion,
                     **{m: curve_area(curve["fraction"], curve[m]) for m in METRICS}})
    return pd.DataFrame(rows)


def verdicts(areas: pd.DataFrame, reference: str = "explaind") -> pd.DataFrame:
    """`reference` against every other criterion, per protocol and metric, paired over splits.

    `better_by` is the mean over splits of how much the reference's area is better (higher
    accuracy / agreement, lower KL). Verdict: "wins" if it is better on every split, "loses" if
    worse on every split, otherwise "ties" (splits_better and splits_worse count both; an area
    equal to the other's is neither).
    """
    rows = []
    for protocol, table in areas.groupby("protocol", sort=False):
        own = table[table["criterion"] == reference].set_index("split")
        if own.empty:  # compared with nothing, the reference would "win" every row
            raise InputError(f"reference={reference!r} has no areas under protocol {protocol!r}: choose one of the "
                             f"criteria there, {table['criterion'].unique().tolist()}")
        for criterion, other in table[table["criterion"] != reference].groupby("criterion", sort=False):
            other = other.set_index("split").loc[own.index]
            for metric in METRICS:
                sign = -1.0 if metric == "kl" else 1.0
                better = sign * (own[metric] - other[metric])
                verdict = "wins" if (better > 0).all() else "loses" if (better < 0).all() else "ties"
                rows.append({"protocol": protocol, "metric": metric, "against": criterion,
                             # skipna=False: a NaN area must not vanish from the means
                             "reference": float(own[metric].mean(skipna=False)),
                             "other": float(other[metric].mean(skipna=False)),
                             "better_by": float(better.mean(skipna=False)),
                             "spread": float(better.std(ddof=1, skipna=False)) if len(better) > 1 else 0.0,
                             "splits_better": int((better > 0).sum()), "splits_worse": int((better < 0).sum()),
                             "splits": len(better), "verdict": verdict})
    return pd.DataFrame(rows)
