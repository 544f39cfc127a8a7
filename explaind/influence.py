"""Influence scores: reductions of an attribution cube (docs/method.md §2).

Every score is a sum of the atomic quantity ψ(s, j, k, x) over some of its indices; the cube
already holds those sums for the dims the user kept, so these functions only choose which dims
to sum and how to normalise. Each one says in its docstring which aggregation it is.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from .cube import takes_cube
from .errors import InputError, is_whole

COSINE_OVER = ("train", "component")


def _require(cube: xr.Dataset, *dims: str) -> xr.DataArray:
    attribution = cube["attribution"]
    missing = [d for d in dims if d not in attribution.dims]
    if missing:
        dims_word = "dim" if len(missing) == 1 else "dims"
        raise InputError(
            f"this cube has no {' or '.join(repr(d) for d in missing)} {dims_word} (summed while explaining): "
            f"explain again with keep=(..., {', '.join(repr(d) for d in missing)})"
        )
    return attribution


def _sum_except(array: xr.DataArray, keep: tuple[str, ...]) -> xr.DataArray:
    # skipna=False: a NaN in the cube must show in every score it enters, not count as 0
    return array.sum([d for d in array.dims if d not in keep], skipna=False)


@takes_cube
def data_scores(cube: xr.Dataset) -> xr.DataArray:
    """Training sample → test prediction: Σ_step Σ_component ψ (train × test [× output])."""
    attribution = _require(cube, "train", "test")
    return _sum_except(attribution, ("train", "test", "output"))


@takes_cube
def step_scores(cube: xr.Dataset, include_decay: bool = True) -> xr.DataArray:
    """Which steps moved each prediction: Σ_train Σ_component ψ, plus the decay term, plus what
    momentum carried into a window from before its replay (`carried`, in a cube explained with
    steps=... and replay=...), so that the scores of a window still add up to its change."""
    if not isinstance(include_decay, (bool, np.bool_)):  # "no" or 0.0 would read as a truth value
        raise InputError(f"include_decay={include_decay!r} must be True or False")
    attribution = _require(cube, "step")
    keep = ("step", "test", "output")
    scores = _sum_except(attribution, keep)
    if include_decay:
        scores = scores + _sum_except(cube["regularization"], keep)
    if "carried" in cube:
        scores = scores + _sum_except(cube["carried"], keep)
    return scores


@takes_cube
def component_scores(cube: xr.Dataset) -> xr.DataArray:
    """Per component (and step, if kept): Σ_train ψ, signed."""
    attribution = _require(cube, "component")
    return _sum_except(attribution, ("step", "component", "test", "output"))


@takes_cube
def component_shares(cube: xr.Dataset, absolute: bool = True) -> xr.DataArray:
    """Each component's share of a step bin's change, summed over test inputs and outputs.

    absolute=True: |score| / Σ_components |score| (shares in [0, 1], no cancellation between
    components); False: score / Σ_components |score| (signed, still bounded by 1 in size).
    """
    scores = component_scores(cube)
    scores = _sum_except(scores, ("step", "component"))
    denominator = abs(scores).sum("component", skipna=False)
    return (abs(scores) if absolute else scores) / denominator.where(denominator > 0)


@takes_cube
def decay_share(cube: xr.Dataset) -> xr.DataArray:
    """Relative weight of weight decay per step bin: |R| / (|A| + |R|), where A and R are the
    signed changes of each explained output (summed over train and components), and the
    magnitudes are summed over test inputs and outputs."""
    keep = ("step",) if "step" in cube["regularization"].dims else ()

    def magnitude(array: xr.DataArray) -> xr.DataArray:
        return _sum_except(abs(_sum_except(array, keep + ("test", "output"))), keep)

    decay = magnitude(cube["regularization"])
    return decay / (decay + magnitude(cube["attribution"]))


@takes_cube
def top_training_samples(cube: xr.Dataset, test, k: int = 8, output=None) -> dict[str, xr.DataArray]:
    """The k most helpful (largest positive) and most harmful (most negative) training samples
    for one input and one explained output (`output`, or the only one the cube keeps or explained).
    Only positive scores are helpful and only negative ones harmful, so either list holds fewer
    than k samples when fewer scores have that sign. Samples of equal score are listed in the
    cube's train order (ascending dataset index)."""
    if not is_whole(k) or k < 0:
        raise InputError(f"k={k!r} must be a whole number ≥ 0 of samples to list")
    scores = _one_output(cube, data_scores(cube).sel(test=_test_label(cube, test)), output)
    if bool(np.isnan(scores.values).any()):
        raise InputError(f"the data scores of test input {test!r} contain NaN: the cube holds non-finite "
                         "attributions; explain again from a finite run")
    # stable sorts, one per list: numpy's default sort orders ties at random beyond 16 entries
    helpful = np.argsort(-scores.values, kind="stable")[:int(k)]
    harmful = np.argsort(scores.values, kind="stable")[:int(k)]
    return {"helpful": scores.isel(train=helpful[scores.values[helpful] > 0]),
            "harmful": scores.isel(train=harmful[scores.values[harmful] < 0])}


def _one_output(cube: xr.Dataset, scores: xr.DataArray, output) -> xr.DataArray:
    """The scores of one explained output: `output`, or the only one the cube keeps or explained."""
    if "output" not in scores.dims:
        explained = cube["output"].values.tolist() if "output" in cube.coords else []
        if len(explained) > 1:  # its attributions were summed over several outputs while explaining
            raise InputError(
                f"this cube sums the attributions of its {len(explained)} explained outputs (its keep= had no "
                "'output'), and no one output's scores can be read off that sum. Fix: explain again with "
                "keep=(..., 'output') and pass output=..., or explain one output per input "
                "(outputs='true', 'predicted' or one index)")
        if output is not None and explained and output not in explained:
            raise InputError(f"output={output!r} is not the cube's explained output: it explains {explained[0]!r}. "
                             f"Fix: pass output={explained[0]!r}, or leave output out")
        return scores
    labels = scores["output"].values.tolist()
    if output is None and len(labels) > 1:
        raise InputError(f"the cube keeps several outputs: pass output=... to choose one of {labels}")
    if output is not None and output not in labels:
        raise InputError(f"output={output!r} is not in the cube: choose one of {labels}")
    return scores.isel(output=labels.index(labels[0] if output is None else output))


def _test_label(cube: xr.Dataset, test):
    """`test` checked to be one label of the cube's test dim."""
    labels = cube["test"].values.tolist()
    # 0.0 == 0 and True == 1 would pick the input labelled 0 or 1: a label is taken as it is stored
    if np.ndim(test) != 0 or test not in labels or type(test) in (bool, float) and not any(
            type(label) is type(test) for label in labels):
        shown = labels if len(labels) <= 10 else labels[:10] + ["…"]
        raise InputError(f"test={test!r} is not one label of the cube's test inputs: pass a single one of {shown}")
    return test


@takes_cube
def cosine_similarity(cube: xr.Dataset, over: str = "train", output=None) -> xr.DataArray:
    """Cosine similarity of the test inputs' score vectors over `over` (train or component), for
    one explained output (`output`, or the only one the cube keeps: summing the scores of
    several outputs would let them cancel). An input whose vector is zero has no direction: NaN."""
    if over not in COSINE_OVER:
        raise InputError(f"over={over!r}: the score vectors run over one of {list(COSINE_OVER)}")
    attribution = _require(cube, over, "test")
    scores = _one_output(cube, _sum_except(attribution, (over, "test", "output")), output)
    vectors = scores.transpose("test", over).values
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    unit = vectors / np.where(norms > 0, norms, np.nan)
    test = cube["test"].values
    return xr.DataArray(unit @ unit.T, dims=("test", "test_other"),
                        coords={"test": test, "test_other": test})
