"""The two checks that make "exact" a measured fact (docs/method.md §1).

1. update reconstruction, in parameter space, at every step: the modelled optimizer applied
   to the recorded batch reproduces the recorded Δθ_s (independent of quadrature), measured in
   the gradient's units (see `update_check`);
2. output reconstruction of *all* outputs of many inputs: f(θ_N) − f(θ_0) against
   Σ_s φ_s·Δθ_s, by forward-mode JVPs along each segment (no per-sample split needed).
"""

from __future__ import annotations

import os
from itertools import islice
from typing import Callable

import numpy as np
import torch
import xarray as xr
from tqdm.auto import tqdm

from .cube import residual_attrs
from .errors import UPDATE_MISS_CAUSES, InputError, ReconstructionError, is_number, is_whole
from .functional import FlatModel, checked_output, resolve_target
from .history import History, StepRecord, open_history
from .losses import another_loss_note
from .optimizers import AggregateUpdate, StepCoefficients, group_index, sgd_buffers_started, step_coefficients
from .path import PathIntegral
from .phases import RECONSTRUCT, phase


def update_check(k: StepCoefficients, theta: torch.Tensor, delta: torch.Tensor, modelled: torch.Tensor,
                 eps: float) -> tuple[float, float]:
    """docs/method.md §1 check 1 at one step: how far the modelled update −η(Σ_k u_k + r) = −η m misses
    the recorded Δθ_s, max_j |Δθ_j + η_j m_j| / P_j, and the miss that storing θ allows,
    4 ε max_j max(|θ_j|, |θ_j + Δθ_j|) / P_j, both over the step, max_j |Δθ_j| / P_j.

    Dividing by the preconditioner P (1 for SGD; 1/(√(v̂_t / (1 − β2^t)) + ε) for Adam and AdamW)
    puts the miss in the gradient's units. Adam divides each gradient coordinate by its own size, so a coordinate
    whose gradient is zero but for float32 rounding (the key bias of attention, which softmax
    ignores) moves by rounding noise scaled up to the learning rate: no recomputation reproduces
    that noise, and it moves no output. Divided by P it is the rounding it came from.

    The floor: θ_{s+1} is rounded to the history's dtype (AdamW rounds it twice, after the decay
    and after the step), so the recorded Δθ_s carries errors up to ~ε |θ| however exactly the
    update is modelled. Relative to a small update (a learning rate decayed by orders of
    magnitude) that exceeds any fixed tolerance; a step that moved nothing (learning rate 0)
    allows any miss: its floor is inf."""
    moved = (delta / k.precond).abs().max()
    size = moved.clamp_min(torch.finfo(delta.dtype).tiny)
    miss = ((delta + k.eta * modelled) / k.precond).abs().max()
    largest = (torch.maximum(theta.abs(), (theta + delta).abs()) / k.precond).max()
    relative = torch.stack([miss, torch.where(moved > 0, 4 * eps * largest, torch.inf)]) / size
    residual, floor = relative.tolist()  # one device sync
    return residual, floor


class StepReader:
    """A history's step records as the computations take them, on the model's device and in its
    dtype: θ_s and θ_{s+1} flattened, the step's optimizer coefficients, and its batch."""

    def __init__(self, history: History, flat: FlatModel, buffers_started: list[list[bool]] | None = None):
        self.history, self.flat = history, flat
        self.group_index = group_index(history, flat)
        self.buffers_started = sgd_buffers_started(history) if buffers_started is None else buffers_started
        # torch's optimizers compute in float32 on float16 and bfloat16 parameters too (decoupled_decay_rate)
        self.scalar_precision = torch.promote_types(history.dtype, torch.float32)

    def thetas(self, rec: StepRecord) -> tuple[torch.Tensor, torch.Tensor]:
        flatten, flat = self.flat.layout.flatten, self.flat
        return flatten(rec.before).to(flat.device, flat.dtype), flatten(rec.after).to(flat.device, flat.dtype)

    def coefficients(self, rec: StepRecord) -> StepCoefficients:
        moment = None if rec.second_moment is None else self.flat.layout.flatten(rec.second_moment).to(self.flat.device)
        return step_coefficients(self.history.optimizer, rec.groups, self.group_index, moment,
                                 self.buffers_started[rec.step], self.flat.dtype, self.scalar_precision)

    def batch(self, rec: StepRecord) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The step's sample weights, inputs and targets."""
        flat = self.flat
        return (self.history.sample_weights(rec, flat.dtype, flat.device), flat.cast_inputs(rec.inputs),
                rec.targets.to(flat.device))


def rounding_eps(history: History, flat: FlatModel) -> float:
    """ε of the coarser of the stored θ and the computation."""
    return max(torch.finfo(history.dtype).eps, torch.finfo(flat.dtype).eps)


def update_residuals(history: History, flat: FlatModel, loss, steps: tuple[int, int] | None = None,
                     replay_start: int = 0, momentum: torch.Tensor | None = None,
                     batch_rows: int | None = None, each: Callable[[int, float, float], None] | None = None,
                     steps_at_once: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Per step: the relative miss of the modelled update η_s(Σ_k u_{s,k} + r_s) on the recorded
    −Δθ_s, and the miss the rounding of the stored θ allows (`update_check`).

    steps: (start, stop) checks only those updates (NaN elsewhere); the momentum of the steps
    before start is replayed from step `replay_start` on, which starts from `momentum` (the
    buffer m_{replay_start − 1}; None: zero, from step 0). each(step, residual, floor) sees every
    checked step as it is checked (and may raise to stop there). steps_at_once: the most
    consecutive steps whose batch gradients one call takes (_group_batch_gradients)."""
    residuals, floors = np.full(history.n_steps, np.nan), np.full(history.n_steps, np.nan)
    aggregate = AggregateUpdate()
    aggregate.momentum = None if momentum is None else momentum.clone()
    reader = StepReader(history, flat)
    eps = rounding_eps(history, flat)
    start, stop = steps or (0, history.n_steps)
    records = iter(history.steps(replay_start, stop))
    while group := list(islice(records, steps_at_once)):
        for rec, theta, delta, gradient in _group_batch_gradients(group, reader, flat, loss, batch_rows):
            k = reader.coefficients(rec)
            modelled = aggregate.step(k, gradient, theta)
            if rec.step >= start:
                residuals[rec.step], floors[rec.step] = update_check(k, theta, delta, modelled, eps)
                if each is not None:
                    each(rec.step, residuals[rec.step], floors[rec.step])
    return residuals, floors


def _group_batch_gradients(group: list[StepRecord], reader: StepReader, flat: FlatModel, loss, batch_rows: int | None):
    """Each step of the group with θ_s, Δθ_s and its batch gradient: the group's gradients by one
    call (FlatModel.batch_gradient vmapped over the steps, whose fixed costs then count once)
    where its batches have the same shape, step by step otherwise."""
    thetas = [reader.thetas(rec) for rec in group]
    batches = [reader.batch(rec) for rec in group]
    if len(group) > 1 and len({(x.shape, y.shape) for _, x, y in batches}) == 1:
        weights, x, y = (torch.stack(parts) for parts in zip(*batches))
        gradients = flat.batch_gradient(torch.stack([theta for theta, _ in thetas]), x, y, weights, loss, batch_rows)
    else:
        gradients = [flat.batch_gradient(theta, x, y, weights, loss, batch_rows)
                     for (theta, _), (weights, x, y) in zip(thetas, batches)]
    for rec, (theta, theta_next), gradient in zip(group, thetas, gradients):
        yield rec, theta, theta_next - theta, gradient


def verify_updates(
    history: History | str | os.PathLike,
    model: torch.nn.Module,
    *,
    loss=None,
    dtype: torch.dtype = torch.float64,
    device="cpu",
    tolerance: float | None = None,
) -> np.ndarray:
    """Check 1 for a whole history: the per-step relative update residuals.

    Raises ReconstructionError if one exceeds both `tolerance` (default: 1e-10 for a float64
    history, 1e-4 for float32, whose own rounding of θ_{s+1} − θ_s is that large) and what
    the rounding of the stored θ allows at that step (4 ε max |θ| / max |Δθ_s|, both divided by
    the preconditioner as in `update_check`; it grows as a schedule shrinks the updates).
    """
    from .engine import check_dtype

    check_dtype(dtype)
    check_tolerance("tolerance", tolerance, "1e-10 for a float64 history, 1e-4 for float32")
    history = open_history(history, model, "verify_updates")
    flat = FlatModel(model, history.layout, dtype, device, history.constants())
    first = next(history.steps(0, 1))
    checked_output(flat, flat.layout.flatten(first.before), first.inputs, None, "Fix: pass dtype=torch.float32")
    residuals, floors = update_residuals(history, flat, history.per_sample_loss(loss))
    if tolerance is None:
        tolerance = 1e-10 if history.dtype == torch.float64 else 1e-4
    allowed = np.maximum(tolerance, floors)
    failed = np.flatnonzero(residuals > allowed)
    if len(failed):  # where it starts (what went wrong there), and how far it goes
        first, worst = int(failed[0]), int(failed[(residuals[failed] / allowed[failed]).argmax()])
        worse = "" if worst == first else f"; the furthest above, step {worst}'s, by {residuals[worst]:.2e}"
        raise ReconstructionError(
            f"step {first}'s recorded update differs from the modelled {history.optimizer} update "
            f"by {residuals[first]:.2e} of its size (tolerance {tolerance:.0e}; the rounding of the "
            f"stored parameters allows {floors[first]:.0e} there), the first of {len(failed)} of "
            f"{len(residuals)} steps that do{worse}. The run does not follow the recorded optimizer: "
            f"{UPDATE_MISS_CAUSES}.{another_loss_note(history.loss, loss)}"
        )
    return residuals


# (history fingerprint, device, loss) of the histories whose updates this process has checked
_CHECKED: set[tuple] = set()


def check_updates_once(history: History, model: torch.nn.Module, device="cpu", loss=None) -> None:
    """verify_updates (in float64), once per history, loss and process: for analyses that explain
    one history several times with check_updates=False, which recomputes no gradient and so trusts
    the recorded updates. A pipeline stage run alone (`dvc repro influence@cnn`) then does not
    rely on the verify stage having checked the same history. loss: a custom loss the history
    was recorded with, as explain() takes it (the updates checked with one say nothing of another)."""
    key = (history.fingerprint(), str(device), loss)
    if key not in _CHECKED:
        verify_updates(history, model, loss=loss, device=device)
        _CHECKED.add(key)


@phase(RECONSTRUCT)
def reconstruct(
    history: History | str | os.PathLike,
    model: torch.nn.Module,
    inputs: torch.Tensor,
    *,
    quadrature: int = 4,
    rule: str = "gauss",
    breakpoints: bool = True,
    kink_tolerance: float = 0.0,
    target: str | None = None,
    output_fn: Callable | None = None,
    dtype: torch.dtype = torch.float64,
    device="cpu",
    batch_size: int = 4096,
    max_kinks: int = 16,
    progress: bool = True,
) -> xr.Dataset:
    """Check 2 for all outputs of many inputs: f(θ_0) + Σ_s ∫ J(θ_s + tΔθ_s)·Δθ_s dt.

    Costs `quadrature` forward-mode passes per step and smooth piece (see explain() for
    `breakpoints` and `kink_tolerance`; a segment with more than `max_kinks` kinks is
    integrated plainly, and counted in the `kink_segments_unresolved` attribute; as there, the
    kinks of a window of steps are located by one search), and one forward pass per step;
    returns initial, final, reconstructed and residual over (test, output), with the relative
    residual in the attributes, and where it arises, over (step, test): `step_miss`, the largest
    |f(θ_{s+1}) − f(θ_s) − φ_s·Δθ_s| over outputs, and `step_change`, the largest
    |f(θ_{s+1}) − f(θ_s)|.
    batch_size bounds the rows of one pass: inputs, or (input, point on the segment) pairs
    where each row carries its own parameters (quadrature nodes, kink search probes).
    output_fn: what is explained of the model's output, as in explain().
    """
    return _reconstructions("reconstruct", history, model, inputs, [(quadrature, rule, breakpoints)], target=target,
                            output_fn=output_fn, dtype=dtype, device=device, batch_size=batch_size,
                            progress=progress, kink_tolerance=kink_tolerance, max_kinks=max_kinks)[0]


def check_tolerance(name: str, value, none_means: str) -> None:
    """Refuse a tolerance that is not None or a number ≥ 0: 0 is a tolerance, not "unset", NaN
    would pass every check, and a string would fail only after all the compute."""
    if value is not None and not (is_number(value) and value >= 0):
        raise InputError(f"{name}={value!r} must be a number ≥ 0 (None: {none_means})")


def _reconstructions(caller: str, history, model, inputs, settings: list[tuple[int, str, bool]], *, target: str | None,
                     dtype: torch.dtype, device, batch_size: int, progress: bool,
                     kink_tolerance: float = 0.0, max_kinks: int = 16,
                     output_fn: Callable | None = None) -> list[xr.Dataset]:
    """reconstruct() for several (nodes, rule, breakpoints) settings in one pass over the history
    (reading and checking the steps costs as much as a cheap integral), for the public call `caller`."""
    from .engine import checked_test_inputs, check_dtype  # engine imports this module

    check_dtype(dtype)
    if not is_whole(batch_size) or batch_size < 1:  # max_kinks: checked by PathIntegral
        raise InputError(f"batch_size={batch_size!r} must be a whole number ≥ 1")
    history = open_history(history, model, caller)
    target = resolve_target(target, history.loss)
    flat = FlatModel(model, history.layout, dtype, device, history.constants(), output_fn)
    paths = [PathIntegral(flat, q, rule, kinks, kink_tolerance, max_kinks=max_kinks, max_rows=batch_size)
             for q, rule, kinks in settings]
    inputs = checked_test_inputs(history, flat, inputs)
    batches = [flat.cast_inputs(b) for b in inputs.split(batch_size)]

    @torch.no_grad()
    def outputs(theta):  # of the batches already on the device: the inputs are not copied there each step
        return torch.cat([flat.explained(theta, x, target) for x in batches])

    reader = StepReader(history, flat)
    theta0 = flat.layout.flatten(history.params(0)).to(flat.device, dtype)
    # the paths share one model and one search dtype: the one that searches kinks (if any) needs the most
    max(paths, key=lambda path: path.breakpoints).model_output(theta0, inputs, target)
    initial = outputs(theta0)
    coarser_rounding = flat.coarser_rounding(theta0, inputs, target)
    changes = [torch.zeros_like(initial) for _ in paths]
    # per step and input, over outputs: how far the integral misses the step's exact change
    misses = [torch.zeros(history.n_steps, len(inputs), dtype=torch.float64, device="cpu") for _ in paths]
    step_change = torch.zeros(history.n_steps, len(inputs), dtype=torch.float64, device="cpu")
    before = initial
    records = iter(tqdm(history.steps(), total=history.n_steps, desc="reconstruct", disable=not progress,
                        leave=False))
    # the kinks of a window of steps are searched at once, as explain() does (PathIntegral.window)
    size = max(path.window(batches[0], history.n_steps, 2 * flat.layout.dim * dtype.itemsize) for path in paths)
    while window := list(islice(records, size)):
        thetas, nexts = zip(*map(reader.thetas, window))
        deltas = [theta_next - theta for theta, theta_next in zip(thetas, nexts)]
        segments = torch.stack(thetas), torch.stack(deltas)
        # per path and batch, each step's pieces (None: no kinks searched, the plain rule)
        pieces = [[path.search_window(*segments, x, target) for x in batches] for path in paths]
        for j, (rec, theta, theta_next, delta) in enumerate(zip(window, thetas, nexts, deltas)):
            reached = outputs(theta_next)  # the stored θ_{s+1}: θ_s + Δθ_s may round off it
            exact = reached - before
            step_change[rec.step] = exact.abs().amax(1).cpu()
            for path, found, change, miss in zip(paths, pieces, changes, misses):
                step = torch.cat([path.change(theta, delta, x, target, per_batch[j])
                                  for x, per_batch in zip(batches, found)])
                change += step
                miss[rec.step] = (exact - step).abs().amax(1).cpu()
            before = reached
    final = before  # f(θ_N): the last step's θ_after is the history's final parameters
    described = {"target": target, "output_fn": flat.output_fn_name, "dtype": str(dtype).removeprefix("torch."),
                 "coarser_rounding": coarser_rounding}
    return [_reconstruction(initial, final, change, miss, step_change, history.fingerprint(),
                            {"quadrature_rule": rule, "quadrature_nodes": q, "breakpoints": int(kinks),
                             "kink_tolerance": float(kink_tolerance), **path.stats.as_attrs(), **described})
            for (q, rule, kinks), path, change, miss in zip(settings, paths, changes, misses)]


def _reconstruction(initial: torch.Tensor, final: torch.Tensor, change: torch.Tensor, miss: torch.Tensor,
                    step_change: torch.Tensor, history_sha256: str, attrs: dict) -> xr.Dataset:
    """One setting's reconstruction f(θ_0) + Σ_s (its integral of step s), against f(θ_N); `attrs`
    describe how it was computed."""
    initial, final, reconstructed = initial.cpu().numpy(), final.cpu().numpy(), (initial + change).cpu().numpy()
    residual = final - reconstructed
    dims = ("test", "output")
    return xr.Dataset(
        {
            "initial": (dims, initial),
            "final": (dims, final),
            "reconstructed": (dims, reconstructed),
            "residual": (dims, residual),
            "step_miss": (("step", "test"), miss.numpy()),
            "step_change": (("step", "test"), step_change.numpy()),
        },
        coords={"test": np.arange(initial.shape[0]), "output": np.arange(initial.shape[1]),
                "step": np.arange(miss.shape[0])},
        attrs={**attrs, **residual_attrs(residual, final - initial), "history_sha256": history_sha256},
    )


def restricted(reconstruction: xr.Dataset, tests) -> xr.Dataset:
    """The reconstruction of some of its inputs (labels `tests`), with the residual attributes
    recomputed over them: what reconstruct() of those inputs alone returns, up to rounding."""
    tests = np.atleast_1d(tests).tolist()
    labels = reconstruction["test"].values.tolist()
    known = set(labels)
    missing = [t for t in tests if t not in known]
    if not tests or missing:
        shown = labels if len(labels) <= 10 else labels[:10] + ["…"]
        raise InputError(f"tests must be a non-empty list of the reconstruction's test labels, got {tests[:10]} "
                         f"(not labels: {missing[:10]}): choose among {shown}")
    out = reconstruction.sel(test=tests)
    out.attrs = {**reconstruction.attrs, **residual_attrs(out["residual"], out["final"] - out["initial"])}
    return out


def residual_to_gap(reconstruction: xr.Dataset) -> np.ndarray:
    """Per input, how near the residual comes to changing the argmax: the largest share
    |r_top − r_o| / (f_top − f_o) of a gap between the trained model's top output and another
    output o that the residual closes. Below 1 the reconstruction's argmax is the model's
    whatever the residual's signs; from 1 on, the integral is too coarse to decide it (a tie
    counts as infinite)."""
    final, residual = reconstruction["final"].values, reconstruction["residual"].values
    rows = np.arange(len(final))
    top = final.argmax(1)
    gap = final[rows, top, None] - final
    closed = np.abs(residual[rows, top, None] - residual)
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(gap > 0, closed / gap, np.inf)
    share[rows, top] = 0.0
    return share.max(1)


def with_refined(reconstruction: xr.Dataset, refined: xr.Dataset, tests) -> xr.Dataset:
    """The reconstruction with the inputs at positions `tests` taken from `refined`, a finer
    reconstruction of those inputs alone from the same history; the residual attributes are
    recomputed, and `refined_tests` lists the positions."""
    tests = np.asarray(tests)
    n = reconstruction.sizes["test"]
    # a float is no position (it would be truncated), and a boolean mask would read as positions 0 and 1
    if (tests.ndim != 1 or (tests.size and tests.dtype.kind not in "iu") or ((tests < 0) | (tests >= n)).any()
            or len(np.unique(tests)) != len(tests)):
        raise InputError(f"tests={tests.tolist()} must be a list of positions 0 … {n - 1} of the reconstruction's "
                         "inputs, integers, each once: pass the positions of the refined inputs "
                         "(np.flatnonzero(mask) for a boolean mask)")
    tests = tests.astype(np.int64)
    if refined.attrs["history_sha256"] != reconstruction.attrs["history_sha256"]:
        raise InputError("the refined reconstruction comes from another history than the reconstruction: "
                         "reconstruct the refined inputs from the same history")
    if refined.attrs["target"] != reconstruction.attrs["target"]:
        raise InputError(f"the refined reconstruction explains target={refined.attrs['target']!r}, the reconstruction "
                         f"target={reconstruction.attrs['target']!r}: reconstruct the refined inputs with the same target")
    if refined.sizes["test"] != len(tests):
        raise InputError(f"the refined reconstruction holds {refined.sizes['test']} inputs for {len(tests)} "
                         "positions in tests: reconstruct exactly the inputs at those positions, in their order")
    _check_same_inputs(reconstruction, refined, tests)
    out = reconstruction.copy(deep=True)
    for name in ("reconstructed", "residual", "step_miss"):
        out[name].loc[{"test": out["test"].values[tests]}] = refined[name].values
    out.attrs.update(**residual_attrs(out["residual"], out["final"] - out["initial"]), refined_tests=tests.tolist())
    return out


def _check_same_inputs(reconstruction: xr.Dataset, refined: xr.Dataset, tests: np.ndarray) -> None:
    """The refined inputs must be those at `tests`, in that order. The inputs themselves are not
    stored, but their outputs before and after training are, and those of the same input agree
    to rounding (forward passes in batches of other sizes); another input's do not."""
    if refined.sizes["output"] != reconstruction.sizes["output"]:
        raise InputError(f"the refined reconstruction has {refined.sizes['output']} outputs, the reconstruction "
                         f"{reconstruction.sizes['output']}: reconstruct the same model's outputs")
    eps = max(np.finfo(ds.attrs["dtype"]).eps for ds in (reconstruction, refined))
    scale = max(1.0, float(np.abs(reconstruction["final"].values).max()))
    for name in ("initial", "final"):
        gap = float(np.abs(reconstruction[name].values[tests] - refined[name].values).max())
        if gap > 1e3 * eps * scale:
            raise InputError(f"the refined reconstruction's {name} outputs differ from those at positions tests "
                             f"by up to {gap:.3g}: it explains other inputs, or the same in another order; "
                             "reconstruct exactly the inputs at those positions, in their order")


def replication_metrics(reconstruction: xr.Dataset) -> dict[str, float]:
    """The paper's replication table for a reconstruction of log-probabilities (docs/method.md §3):
    argmax agreement of model and reconstruction, KL(model ‖ reconstruction) averaged over
    inputs (the reconstruction renormalised with a softmax), and the residual sizes."""
    if reconstruction.attrs.get("target") != "log_prob":
        raise InputError("replication metrics compare distributions: reconstruct with target='log_prob'")
    final = torch.as_tensor(reconstruction["final"].values)
    rebuilt = torch.log_softmax(torch.as_tensor(reconstruction["reconstructed"].values), dim=-1)
    kl = (final.exp() * (final - rebuilt)).sum(-1)
    residual = np.abs(reconstruction["residual"].values)
    return {
        "agreement": float((final.argmax(-1) == rebuilt.argmax(-1)).double().mean()),
        "kl": float(kl.mean()),
        "max_abs_residual": float(residual.max()),
        "mean_abs_residual": float(residual.mean()),
        "relative_residual": float(reconstruction.attrs["relative_residual"]),
    }


def quadrature_sensitivity(
    history: History | str | os.PathLike,
    model: torch.nn.Module,
    inputs: torch.Tensor,
    *,
    nodes_list: tuple[int, ...] = (1, 2, 3, 4, 6, 10, 30, 100),
    rules: tuple[str, ...] = ("gauss", "midpoint"),
    breakpoints: tuple[bool, ...] = (True, False),
    output_fn: Callable | None = None,
    dtype: torch.dtype = torch.float64,
    device="cpu",
    progress: bool = True,
):
    """Residual of the output reconstruction against the number of quadrature nodes, for each
    rule, with and without locating kinks: a pandas DataFrame, one row per setting (output_fn:
    as in explain())."""
    import pandas as pd

    settings = [(q, r, b) for r in rules for b in breakpoints for q in nodes_list]
    recs = _reconstructions("quadrature_sensitivity", history, model, inputs, settings, target="log_prob",
                            output_fn=output_fn, dtype=dtype, device=device, batch_size=4096, progress=progress)
    return pd.DataFrame([{"rule": rule, "nodes": q, "breakpoints": kinks, **replication_metrics(rec),
                          "kinks_located": rec.attrs["kinks_located"]} for (q, rule, kinks), rec in zip(settings, recs)])
