"""The exact decomposition: sums to the change, agrees with an independent brute force.

Runs are tiny smooth models (MLP, CNN, 1-layer attention) recorded by tests/engine_cases.py;
tests/brute_force.py is a separate slow implementation of docs/method.md §1 (materialised Jacobians,
the optimizer unrolled by hand) that the engine's cubes are compared against elementwise.
"""

from __future__ import annotations

import re
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import xarray as xr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import explaind as ex
import explaind.history as history_module
from explaind import engine
from explaind.engine import check_residual
from explaind.functional import FlatModel
from brute_force import reference_for_run
from engine_cases import DEVICE, MLP, OPTIMIZERS, Case, build_optimizer, make_data, optimizer_spec, train

ORDER = ("step", "component", "train", "test", "output")

# Test 1's matrix: every model × every optimizer variant, with schedules, shuffled mini-batches
# (last batch short), two parameter groups, mean / sum reductions and a custom per-sample loss.
CASES = {
    "mlp-sgd": Case("mlp", "sgd", schedule="lambda"),
    "mlp-sgd_momentum": Case("mlp", "sgd_momentum", schedule="step", groups=2),
    "mlp-sgd_nesterov": Case("mlp", "sgd_nesterov", reduction="sum", lr_scale=0.25, schedule="lambda",
                             widths=(5, 4), act="gelu"),
    "mlp-adam": Case("mlp", "adam", schedule="lambda", groups=2, act="softplus"),
    "mlp-adamw": Case("mlp", "adamw", loss="custom", schedule="step", groups=2),
    "cnn-sgd": Case("cnn", "sgd", reduction="sum", lr_scale=0.25, schedule="step"),
    "cnn-sgd_momentum": Case("cnn", "sgd_momentum", schedule="lambda", groups=2),
    "cnn-sgd_nesterov": Case("cnn", "sgd_nesterov", schedule="step", groups=2),
    "cnn-adam": Case("cnn", "adam", reduction="sum", schedule="step"),
    "cnn-adamw": Case("cnn", "adamw", schedule="lambda", groups=2),
    "transformer-sgd": Case("transformer", "sgd", schedule="lambda", groups=2),
    "transformer-sgd_momentum": Case("transformer", "sgd_momentum", reduction="sum", lr_scale=0.25,
                                     schedule="lambda"),
    "transformer-sgd_nesterov": Case("transformer", "sgd_nesterov", loss="custom", schedule="step"),
    "transformer-adam": Case("transformer", "adam", schedule="step", groups=2),
    "transformer-adamw": Case("transformer", "adamw", reduction="sum", schedule="lambda", groups=2),
    # gradient-norm clipping recorded by rec.clip_grad_norm_ (every step clipped, or some)
    "mlp-adamw-clipped": Case("mlp", "adamw", loss="custom", schedule="step", groups=2, clip=0.5),
    "cnn-sgd_nesterov-clipped": Case("cnn", "sgd_nesterov", schedule="step", groups=2, clip=0.5),
    "transformer-adam-clipped": Case("transformer", "adam", schedule="step", groups=2, clip=1.0),
}

# Test 2's brute-force cases: one tiny MLP run per optimizer kind.
BRUTE = {
    opt: Case("mlp", opt, steps=5, batch=3, n_train=7, widths=(5,), schedule="lambda" if i % 2 else "step",
              groups=2 if opt in ("sgd_momentum", "adam", "adamw") else 1,
              reduction="sum" if opt == "sgd_nesterov" else "mean",
              lr_scale=0.3 if opt == "sgd_nesterov" else 1.0, seed=10 + i)
    for i, opt in enumerate(OPTIMIZERS)
}


class Runs:
    """Records each case once per test session, in a temporary directory."""

    def __init__(self, root: Path):
        self.root = root
        self.cache: dict = {}

    def get(self, case: Case, check_every: int = 1):
        if case not in self.cache:
            self.cache[case] = train(case, self.root / f"run{len(self.cache)}", check_every=check_every)
        return self.cache[case]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("engine_runs"))


@pytest.fixture(scope="module")
def references():
    cache: dict = {}

    def get(run, **kwargs):
        key = (run.case, tuple(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = reference_for_run(run, **kwargs)
        return cache[key]

    return get


# --------------------------------------------------------------------------- helpers


def full_cube(cube: xr.Dataset) -> np.ndarray:
    return cube["attribution"].transpose(*ORDER).values


def assert_self_consistent(cube: xr.Dataset, rtol: float) -> None:
    """The cube's own sums: Σ attribution + Σ regularization (+ Σ carried) = final − initial −
    residual.

    Measured relative to the largest change in float64; in float32 relative to the largest
    mass Σ|terms| that the sums add up (cancellation between samples amplifies rounding).
    """
    att = cube["attribution"].astype(np.float64)
    reg = cube["regularization"].astype(np.float64)
    att_dims = [d for d in att.dims if d not in ("test", "output")]
    reg_dims = [d for d in reg.dims if d not in ("test", "output")]
    summed = att.sum(att_dims) + reg.sum(reg_dims)
    if "carried" in cube:
        summed = summed + cube["carried"].astype(np.float64).sum(reg_dims)
    expected = (cube["final"].astype(np.float64) - cube["initial"].astype(np.float64)
                - cube["residual"].astype(np.float64))
    if "test" not in att.dims:
        expected = expected.sum("test")
    if "output" not in att.dims:
        expected = expected.sum("output")
    scale = float(np.abs(cube["final"] - cube["initial"]).max())
    assert scale > 0
    if cube["attribution"].dtype == np.float32:
        scale = max(scale, float((abs(att).sum(att_dims) + abs(reg).sum(reg_dims)).max()))
    err = float(np.abs(summed - expected).max()) / scale
    assert err <= rtol, f"cube sums miss final − initial − residual by {err:.2e} of the change"


def assert_close(actual: np.ndarray, expected: np.ndarray, rtol: float = 1e-12, what: str = "") -> None:
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    scale = max(np.abs(expected).max(), 1e-300)
    err = np.abs(actual - expected).max() / scale
    assert err <= rtol, f"{what}: max error {err:.2e} of the largest entry ({scale:.2e})"


def train_positions(cube: xr.Dataset, ref) -> np.ndarray:
    """Positions in the reference's k axis of the cube's train coordinate (sorted dataset ids)."""
    assert cube["train"].values.tolist() == ref.train_ids.tolist()
    return np.arange(len(ref.train_ids))


# --------------------------------------------------------------------------- 1. sums to the change


@pytest.mark.parametrize("name", list(CASES))
def test_decomposition_is_exact_float64(runs, name):
    run = runs.get(CASES[name])
    for convention in ("update", "gradient"):
        cube = run.explain(convention=convention, tolerance=1e-9)  # 4 Gauss–Legendre nodes
        assert cube.attrs["step_convention"] == convention
        assert cube.attrs["relative_residual"] <= 1e-9, cube.attrs["relative_residual"]
        assert cube.attrs["max_update_residual"] <= 1e-12, cube.attrs["max_update_residual"]
        assert cube.attrs["max_abs_residual_from_updates"] <= 1e-12 * cube.attrs["max_abs_change"]
        assert cube.attrs["max_abs_change"] > 1e-2  # the run moved the outputs noticeably
        assert cube["attribution"].dims == ORDER
        assert cube.sizes["step"] == run.case.steps
        assert_self_consistent(cube, 1e-12)
        # initial / final are the model's log-probabilities before and after training
        with torch.no_grad():
            final = F.log_softmax(run.model(run.test_x), -1).numpy()
        np.testing.assert_allclose(cube["final"].values, final, rtol=0, atol=1e-13)
        # every training sample seen, labelled by its dataset index
        seen = sorted({int(i) for b in run.batches for i in b[0]})
        assert cube["train"].values.tolist() == seen
    if run.case.clip is not None:  # the clipping changed the run
        assert min(rec.gradient_scale for rec in ex.History(run.path).steps()) < 0.9


@pytest.mark.parametrize("name", ["mlp-adam", "cnn-sgd_momentum", "transformer-adamw"])
def test_verify_updates_and_reconstruct(runs, name):
    run = runs.get(CASES[name])
    residuals = ex.verify_updates(run.path, run.model)
    assert len(residuals) == run.case.steps and residuals.max() <= 1e-12
    rec = ex.reconstruct(run.path, run.model, run.test_x, quadrature=6, progress=False)
    assert rec.attrs["relative_residual"] <= 1e-9
    cube = run.explain(quadrature=6, keep=("test", "output"))
    np.testing.assert_allclose(rec["final"].values, cube["final"].values, rtol=0, atol=1e-14)
    np.testing.assert_allclose(rec["residual"].values, cube["residual"].values, rtol=0, atol=1e-12)


@pytest.mark.parametrize("opt", ["sgd_momentum", "adamw"])
def test_the_residual_splits_into_the_updates_share_and_the_path_integrals(tmp_path, opt):
    """Gradient clipping at one step is not modelled: the modelled update misses the recorded
    one, and so the decomposition misses part of the change. residual_from_updates books that miss, and the
    rest of the residual equals what the forward-mode reconstruction of the recorded updates
    misses (an independent computation of the path integral's error), for both conventions,
    with and without a train dim."""
    case = Case("mlp", opt, steps=4)
    model = case.fresh_model()
    x, y, test_x, _ = make_data("mlp", 8, 3, 0)
    _, specs = optimizer_spec(opt, 1)
    optimizer = build_optimizer(model, OPTIMIZERS[opt][0], specs)
    with ex.Recorder(tmp_path / "h", model, optimizer, check_every=50) as rec:
        for step in range(case.steps):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            if step == 2:  # unmodelled, and unchecked at record time (check_every=50: step 0 only)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
            rec.batch(torch.arange(len(x)), x, y)
            optimizer.step()
    path_error = ex.reconstruct(tmp_path / "h", model, test_x, quadrature=6, progress=False)["residual"].values
    shares = []
    for convention in ("update", "gradient"):
        for keep in (ORDER, ("component", "test", "output"), ("train", "output")):
            cube = ex.explain(tmp_path / "h", model, test_x, keep=keep, convention=convention, quadrature=6,
                              tolerance=None, progress=False)
            change = float(np.abs(cube["final"] - cube["initial"]).max())
            residual, from_updates = cube["residual"].values, cube["residual_from_updates"].values
            assert np.abs(residual).max() > 1e-3 * change  # clipping changed the outputs' path
            np.testing.assert_allclose(residual - from_updates, path_error, rtol=0, atol=1e-12 * change)
            assert cube.attrs["max_abs_residual_from_updates"] == np.abs(from_updates).max()
            assert cube.attrs["max_abs_path_residual"] == np.abs(residual - from_updates).max()
            # the momentum carries the clipped gradient on into step 3
            update_residual = cube["update_residual"].values
            assert update_residual[2:].min() > 1e-3 and update_residual[:2].max() <= 1e-12
            shares.append(from_updates)
    for other in shares[1:]:
        np.testing.assert_allclose(other, shares[0], rtol=0, atol=1e-12 * change)
    # with a tolerance, explain stops at the clipped step rather than after the whole run
    with pytest.raises(ex.ReconstructionError, match=r"(?s)step 2's update residual is .*gradient clipping.*stops at "
                                                     r"the first step so far off") as error:
        ex.explain(tmp_path / "h", model, test_x, keep=("test",), quadrature=6, tolerance=1e-6, progress=False)
    assert error.value.cube is None
    # the whole cube's check names the updates' share of the miss
    cube = ex.explain(tmp_path / "h", model, test_x, keep=("test",), quadrature=6, tolerance=None, progress=False)
    with pytest.raises(ex.ReconstructionError, match="is missed through the recorded updates"):
        check_residual(cube, 1e-6)
    # the fix the error names: without a train dim, the recorded updates themselves are split
    trusted = ex.explain(tmp_path / "h", model, test_x, keep=("test",), quadrature=6, tolerance=1e-6,
                         check_updates=False, progress=False)
    assert trusted.attrs["max_abs_residual_from_updates"] == 0.0
    np.testing.assert_allclose(trusted["residual"].values, path_error, rtol=0, atol=1e-12 * change)


def test_history_matches_the_loop(runs):
    """The recorded θ_s and batches are exactly those of the training loop."""
    run = runs.get(CASES["mlp-adamw"])
    hist = ex.History(run.path)
    assert hist.n_steps == run.case.steps and hist.optimizer == "adamw" and hist.reduction == "mean"
    for s in range(hist.n_steps + 1):
        assert torch.equal(hist.layout.flatten(hist.params(s)), run.thetas[s])
    for rec, (idx, x, y) in zip(hist.steps(), run.batches):
        assert torch.equal(rec.indices, idx) and torch.equal(rec.inputs, x) and torch.equal(rec.targets, y)
        assert [g["lr"] for g in rec.groups] == run.lrs[rec.step]
    backwards = [rec.step for rec in hist.steps(reverse=True)]
    assert backwards == list(range(hist.n_steps - 1, -1, -1))
    window = list(hist.steps(2, 4, reverse=True))
    assert [rec.step for rec in window] == [3, 2]
    assert torch.equal(hist.layout.flatten(window[1].before), run.thetas[2])
    assert list(hist.steps(hist.n_steps)) == []
    # a negative start read the manifest from its end; bounds past the run, a float, a bool
    for start, stop in [(-2, None), (0, hist.n_steps + 1), (3, 2), (1.0, 2), (True, 2)]:
        with pytest.raises(ex.InputError, match=re.escape(f"steps(start={start!r}, stop={stop!r}) must be whole "
                                                          f"numbers with 0 ≤ start ≤ stop ≤ {hist.n_steps}")):
            next(hist.steps(start, stop))


# --------------------------------------------------------------------------- 2. against the brute force


@pytest.mark.parametrize("opt", list(BRUTE))
def test_full_cube_matches_brute_force(runs, references, opt):
    run = runs.get(BRUTE[opt])
    ref = references(run)
    # the hand-unrolled optimizer reproduces PyTorch's trajectory
    thetas = torch.stack(run.thetas)
    assert_close(ref.thetas.numpy(), thetas.numpy(), 1e-13, "trajectory")
    for convention in ("update", "gradient"):
        cube = run.explain(convention=convention, quadrature=8)
        a, r = ref.cube(convention)
        a = a[:, :, train_positions(cube, ref)]
        scale = max(np.abs(a).max(), np.abs(r).max())
        assert cube["component"].values.tolist() == ref.names
        assert np.abs(full_cube(cube) - a).max() <= 1e-12 * scale, convention
        assert np.abs(cube["regularization"].transpose("step", "component", "test", "output").values - r).max() \
            <= 1e-12 * scale, convention
        assert_close(cube["initial"].values, ref.initial.numpy(), 1e-14, "initial")
        assert_close(cube["final"].values, ref.final.numpy(), 1e-14, "final")
    # the two conventions differ per step (momentum carries gradients forwards) but not in total
    if opt != "sgd":
        up, gr = ref.cube("update")[0], ref.cube("gradient")[0]
        assert np.abs(up - gr).max() > 1e-6 * np.abs(up).max()
        assert_close(up.sum(0), gr.sum(0), 1e-12, "step-summed conventions")


# a max_norm per brute-force case that clips some of its steps and leaves others (asserted below)
CLIP = {"sgd": 0.6, "sgd_momentum": 1.0, "sgd_nesterov": 2.5, "adam": 1.0, "adamw": 0.6}


@pytest.mark.parametrize("opt", list(BRUTE))
def test_clipped_runs_match_brute_force(runs, references, opt):
    """rec.clip_grad_norm_ scales step s's gradient by c_s = min(1, max_norm / (‖ḡ_s‖ + 1e-6)); the
    brute force takes c_s from its own gradients, as torch documents it, not from the history."""
    run = runs.get(BRUTE[opt].with_(clip=CLIP[opt]))
    scales = [rec.gradient_scale for rec in ex.History(run.path).steps()]
    assert min(scales) < 0.9 and max(scales) == 1.0, scales
    ref = references(run)
    assert_close(ref.thetas.numpy(), torch.stack(run.thetas).numpy(), 1e-13, "trajectory")
    assert ex.verify_updates(run.path, run.model).max() <= 1e-12
    for convention in ("update", "gradient"):
        cube = run.explain(convention=convention, quadrature=8, tolerance=1e-9)
        a, r = ref.cube(convention)
        scale = max(np.abs(a).max(), np.abs(r).max())
        assert np.abs(full_cube(cube) - a[:, :, train_positions(cube, ref)]).max() <= 1e-12 * scale, convention
        assert np.abs(cube["regularization"].transpose("step", "component", "test", "output").values - r).max() \
            <= 1e-12 * scale, convention
        assert cube.attrs["max_update_residual"] <= 1e-12


def test_brute_force_logit_target(runs, references):
    run = runs.get(BRUTE["adamw"])
    ref = references(run, target="logit")
    cube = run.explain(target="logit", quadrature=4)
    assert cube.attrs["units"] == "logit"
    a, r = ref.cube("update")
    assert_close(full_cube(cube), a[:, :, train_positions(cube, ref)], 1e-12, "logit cube")
    with torch.no_grad():
        assert_close(cube["final"].values, run.model(run.test_x).numpy(), 1e-14, "final logits")


@pytest.mark.parametrize("convention", ["update", "gradient"])
def test_output_selections_match_brute_force(runs, references, convention):
    run = runs.get(BRUTE["adam"])
    ref = references(run)
    a, r = ref.cube(convention)
    n_test = len(run.test_x)
    rows = np.arange(n_test)

    true = run.explain(outputs="true", convention=convention, quadrature=4)
    assert true["output"].values.tolist() == ["true"]
    assert true["output_class"].values.tolist() == run.test_y.tolist()
    assert_close(full_cube(true)[..., 0], a[:, :, :, rows, run.test_y.numpy()], 1e-12, "true")
    assert_close(true["initial"].values[:, 0], ref.initial.numpy()[rows, run.test_y.numpy()], 1e-14, "true init")

    predicted = run.explain(outputs="predicted", convention=convention, quadrature=4)
    classes = ref.final.numpy().argmax(-1)
    assert predicted["output_class"].values.tolist() == classes.tolist()
    assert_close(full_cube(predicted)[..., 0], a[:, :, :, rows, classes], 1e-12, "predicted")
    assert_close(predicted["regularization"].values[..., 0], r[:, :, rows, classes], 1e-12, "predicted reg")

    chosen = run.explain(outputs=[2, 0], convention=convention, quadrature=4)
    assert chosen["output"].values.tolist() == [2, 0]
    assert_close(full_cube(chosen), a[..., [2, 0]], 1e-12, "list")
    change = (ref.final - ref.initial).numpy()[:, [2, 0]]
    residual = change - a[..., [2, 0]].sum((0, 1, 2)) - r[..., [2, 0]].sum((0, 1))
    assert np.abs(chosen["residual"].values - residual).max() <= 1e-12 * np.abs(change).max()


def test_a_module_prefix_ends_at_a_dot():
    """"mlp" names the module mlp and what it holds, not the module mlp_out beside it."""
    from explaind.components import group_tensors

    names = ["mlp.fc.weight", "mlp.fc.bias", "mlp_out.weight", "mlp_outer.weight"]
    grouped = group_tensors(names, {"a": ["mlp"], "b": ["mlp_out."], "c": ["mlp_outer.weight"]})
    assert grouped == {"a": ["mlp.fc.weight", "mlp.fc.bias"], "b": ["mlp_out.weight"], "c": ["mlp_outer.weight"]}
    with pytest.raises(ex.InputError, match="'mlp_out.weight' is in no component"):
        group_tensors(names, {"a": ["mlp"], "c": ["mlp_outer.weight"]})


def test_component_groupings_match_brute_force(runs, references):
    run = runs.get(BRUTE["sgd_momentum"])
    ref = references(run)
    names = ref.names  # hidden.0.weight, hidden.0.bias, out.weight, out.bias
    cases = {  # spec -> the grouping it means
        "module": ("module", {"hidden.0": ["hidden.0.weight", "hidden.0.bias"], "out": ["out.weight", "out.bias"]}),
        # tensor names, listed out of model order
        "dict": ({"weights": ["out.weight", "hidden.0.weight"], "biases": ["hidden.0.bias", "out.bias"]},
                 {"weights": ["hidden.0.weight", "out.weight"], "biases": ["hidden.0.bias", "out.bias"]}),
        # module prefixes
        "prefix": ({"first": ["hidden"], "second": ["out"]},
                   {"first": ["hidden.0.weight", "hidden.0.bias"], "second": ["out.weight", "out.bias"]}),
        "callable": (lambda n: "head" if n.startswith("out") else "body",
                     {"body": [n for n in names if not n.startswith("out")],
                      "head": [n for n in names if n.startswith("out")]}),
    }
    for convention, keys in (("update", list(cases)), ("gradient", ["module", "callable"])):
        for key in keys:
            spec, grouping = cases[key]
            cube = run.explain(components=spec, convention=convention, quadrature=4)
            labels = cube["component"].values.tolist()
            assert sorted(labels) == sorted(grouping), key
            assert cube.attrs["components"] == labels
            ordered = {c: grouping[c] for c in labels}
            a, r = ref.cube(convention, ordered)
            assert_close(full_cube(cube), a[:, :, train_positions(cube, ref)], 1e-12, key)
            assert_close(cube["regularization"].values, r, 1e-12, key + " reg")
            # the flat parameter layout follows the component order
            assert cube.attrs["tensor_names"] == [n for c in labels for n in names if n in grouping[c]]


def test_step_bins_match_brute_force(runs, references):
    run = runs.get(BRUTE["sgd_nesterov"])  # 5 steps
    ref = references(run)
    for convention in ("update", "gradient"):
        a, r = ref.cube(convention)
        bin_cases = ((2, None), ([0, 1, 4, 5], [0, 1, 4, 5]), (5, [0, 1, 2, 3, 4, 5]), (1, [0, 5]))
        for bins, edges in bin_cases if convention == "update" else bin_cases[:2]:
            cube = run.explain(step_bins=bins, convention=convention, quadrature=4)
            start = cube["step"].values
            stop = cube["step_stop"].values
            assert start[0] == 0 and stop[-1] == 5 and np.all(start[1:] == stop[:-1])
            if edges is not None:
                assert start.tolist() == edges[:-1] and stop.tolist() == edges[1:]
            expected_a = np.stack([a[b:e].sum(0) for b, e in zip(start, stop)])
            expected_r = np.stack([r[b:e].sum(0) for b, e in zip(start, stop)])
            assert_close(full_cube(cube), expected_a, 1e-12, f"bins {bins}")
            assert_close(cube["regularization"].values, expected_r, 1e-12, f"bins {bins} reg")


@pytest.mark.parametrize("backwards", [False, True], ids=["forward", "backward"])
@pytest.mark.parametrize("opt", ["sgd_momentum", "sgd_nesterov", "adamw"])
def test_both_update_passes_match_brute_force(runs, references, monkeypatch, opt, backwards):
    """The update convention has two passes: a per-sample momentum buffer carried forwards, or
    one carried effect per kept step bin walked backwards. explain() picks one by its memory and
    speed (walks_backwards); each must give the brute-force cube, also for a window of steps
    (earlier momentum replayed)."""
    monkeypatch.setattr(ex.engine, "walks_backwards",
                        lambda req, rows, train: backwards or req.convention == "gradient")
    run = runs.get(BRUTE[opt])  # 5 steps
    a, r = references(run).cube("update")  # [step, component, train, test, output]
    for bins, keep in ((None, ORDER), ([0, 1, 4, 5], ("step", "train", "test")), (2, ("step", "component", "train"))):
        cube = run.explain(step_bins=bins, keep=keep, quadrature=4)
        edges = zip(cube["step"].values, cube["step_stop"].values)
        binned = np.stack([a[b:e].sum(0) for b, e in edges])
        drop = tuple(i for i, d in enumerate(ORDER) if d not in keep and d != "step")
        assert_close(cube["attribution"].values, binned.sum(drop), 1e-12, f"{keep} bins {bins}")
        edges = zip(cube["step"].values, cube["step_stop"].values)
        binned_r = np.stack([r[b:e].sum(0) for b, e in edges])
        drop_r = tuple(i for i, d in enumerate(ORDER[:2] + ORDER[3:]) if d not in keep and d != "step")
        assert_close(cube["regularization"].values, binned_r.sum(drop_r), 1e-12, f"{keep} bins {bins} reg")
        assert_self_consistent(cube, 1e-12)
    window = run.explain(steps=(2, 5), keep=("train", "test", "output"), quadrature=4)
    assert_close(window["attribution"].values, a[2:5].sum((0, 1)), 1e-12, "steps 2-5")
    assert_close(window["regularization"].values, r[2:5].sum((0, 1)), 1e-12, "steps 2-5 reg")
    assert_self_consistent(window, 1e-12)


@pytest.mark.parametrize("backwards", [False, True], ids=["forward", "backward"])
@pytest.mark.parametrize("opt", ["sgd_momentum", "sgd_nesterov", "adam", "adamw"])
def test_a_bounded_replay_splits_its_steps_and_carries_the_rest(runs, references, monkeypatch, opt, backwards):
    """steps=(3, 5) with replay=1: the gradients of steps 2-4 are split by sample; what steps 0
    and 1 pass on by momentum (and coupled decay) is `carried`, each as the brute force unrolls
    it, and the modelled updates (solved momentum included) still match the recorded ones."""
    monkeypatch.setattr(ex.engine, "walks_backwards",
                        lambda req, rows, train: backwards or req.convention == "gradient")
    run = runs.get(BRUTE[opt])  # 5 steps
    a, r, c = references(run).window(3, 5, first=2)
    cube = run.explain(steps=(3, 5), replay=1, keep=("component", "train", "test", "output"), quadrature=4)
    assert cube.attrs["replay_start"] == 2
    assert_close(cube["attribution"].transpose("component", "train", "test", "output").values, a, 1e-12, "split")
    assert_close(cube["regularization"].values, r, 1e-12, "decay")
    assert_close(cube["carried"].values, c, 1e-12, "carried")
    assert np.abs(c).max() > 1e-3 * np.abs(a).sum(1).max()  # the carried share is not negligible
    assert_self_consistent(cube, 1e-12)
    assert cube["update_residual"].values[3:5].max() <= 1e-12
    # replaying from step 0 leaves nothing carried: the cube of an unbounded replay
    whole = run.explain(steps=(3, 5), replay=3, keep=("train", "test", "output"), quadrature=4)
    assert "carried" not in whole and whole.attrs["replay_start"] == 0
    a0, _, _ = references(run).window(3, 5, first=0)
    assert_close(whole["attribution"].values, a0.sum(0), 1e-12, "replay from 0")


def test_a_replay_starts_after_a_step_that_moved(runs):
    """The momentum carried into a replay is solved from the update before it, which a step with
    learning rate 0 does not reveal: the replay then starts earlier. Without a train dim, or with
    a negative length, a fraction or True (it was taken as 1), replay= is refused."""
    run = runs.get(BRUTE["adamw"])
    history = ex.History(run.path)
    assert ex.engine._replay_start(history, 4, 1, ("train",)) == 3
    history.manifest[2]["groups"] = [dict(g, lr=0.0) for g in history.manifest[2]["groups"]]
    assert ex.engine._replay_start(history, 4, 1, ("train",)) == 2
    history.manifest[1]["groups"] = [dict(g, lr=0.0) for g in history.manifest[1]["groups"]]
    assert ex.engine._replay_start(history, 4, 1, ("train",)) == 1
    with pytest.raises(ex.InputError, match="drop replay="):
        run.explain(steps=(3, 5), replay=1, keep=("test", "output"))
    for replay in (-1, 2.5, True):
        with pytest.raises(ex.InputError, match=rf"replay={replay!r} must be a whole number"):
            run.explain(steps=(3, 5), replay=replay)
    # options that would be ignored (they were, silently): a replay without a window, the bins of
    # a dim summed over, a dim kept twice
    for options, words in ((dict(replay=1), "(?s)without steps= every step.*pass steps="),
                           (dict(keep=("train", "test"), step_bins=2), "(?s)bins the step dim.*add 'step' to keep"),
                           (dict(keep=("train", "train")), r"names \['train'\] more than once")):
        with pytest.raises(ex.InputError, match=words):
            run.explain(**options)


def test_update_pass_is_chosen_by_size(runs, monkeypatch):
    """Without a train dim the forward buffer is one row: it is taken; with many training
    samples and few kept rows the backward pass is, where its effects go through the batch by
    forward mode or hold BACKWARD_MEMORY_RATIO times less than the buffer, else (contracted with the
    materialised gradients as the forward walk does, and slower) only where a budget leaves the
    forward walk no room (Request.forward_for_speed off)."""
    run = runs.get(BRUTE["adamw"])  # 7 training samples in batches of 3, 4 test inputs
    request = ex.engine.build_request(
        run.path, run.model, run.test_x, None, keep=("train",), outputs="all", target="log_prob",
        quadrature=2, rule="gauss", breakpoints=False, convention="update", components="tensor",
        step_bins=None, parameter_scores=False, steps=None, dtype=torch.float64, device="cpu",
        test_chunk=None, train_chunk=None, loss=None)
    # forward mode does not pay over 3 samples: one effect is contracted with the materialised
    # gradients, and 7 samples < 8 × 1 effect: the forward walk, the faster
    assert ex.engine.contracts_sample_gradients(request, 1)
    assert not ex.engine.walks_backwards(request, rows=1, train=7)
    monkeypatch.setattr(ex.engine, "BACKWARD_MEMORY_RATIO", 4)
    assert ex.engine.walks_backwards(request, rows=1, train=7)  # 7 > 4 × 1
    monkeypatch.setattr(ex.engine, "BACKWARD_MEMORY_RATIO", 8)
    estimate = ex.engine.forward_mode_pays
    monkeypatch.setattr(ex.engine, "forward_mode_pays", lambda *args: True)  # the effect by forward mode
    assert ex.engine.walks_backwards(request, rows=1, train=7)
    monkeypatch.setattr(ex.engine, "forward_mode_pays", estimate)
    request.forward_for_speed = False  # the smaller walk, whichever is faster
    assert ex.engine.walks_backwards(request, rows=1, train=7)
    assert not ex.engine.walks_backwards(request, rows=8, train=7)
    request.keep = ("step", "train")  # every step its own bin: 5 carried effects per row
    assert not ex.engine.walks_backwards(request, rows=2, train=7)
    request.parameter_scores = True  # stepwise |ψ| needs the forward order
    request.keep = ("train",)
    assert not ex.engine.walks_backwards(request, rows=1, train=7)


@pytest.mark.parametrize("keep", [("train", "test"), ("step",), ("component", "output"), ("step", "train"),
                                  ("test",), ("output", "step", "train")])
def test_keep_subsets_match_brute_force(runs, references, keep):
    run = runs.get(BRUTE["adamw"])
    ref = references(run)
    for convention in ("update", "gradient") if "train" in keep else ("update",):
        a, r = ref.cube(convention)
        cube = run.explain(keep=keep, convention=convention, quadrature=4)
        kept = [d for d in ORDER if d in keep]
        assert cube["attribution"].dims == tuple(kept)
        drop = tuple(i for i, d in enumerate(ORDER) if d not in keep)
        assert_close(cube["attribution"].values, a.sum(drop), 1e-12, f"keep {keep}")
        reg_dims = [d for d in ORDER if d != "train"]
        drop_r = tuple(i for i, d in enumerate(reg_dims) if d not in keep)
        assert_close(cube["regularization"].values, r.sum(drop_r), 1e-12, f"keep {keep} reg")
        assert cube.attrs["relative_residual"] <= 1e-9
        assert_self_consistent(cube, 1e-12)


@pytest.mark.parametrize("keep", [("train", "test"), ("output", "step", "train"), ("test",), ("component", "output")])
def test_test_chunks_of_another_size_than_the_outputs_sum_the_right_rows(runs, references, keep):
    """A pass's rows are ordered test input by test input, each with its outputs; the dims not
    kept are summed out of them. The brute-force runs have as many test inputs as outputs (3 and
    3), where rows summed along the wrong axis add up the same; chunks of 2 inputs and 1 input
    against 3 outputs do not (the backward walk, the forward pass and forward mode)."""
    run = runs.get(BRUTE["adamw"])
    ref = references(run)
    for convention in ("update", "gradient") if "train" in keep else ("update",):
        a, r = ref.cube(convention)
        cube = run.explain(keep=keep, convention=convention, quadrature=4, test_chunk=2)
        drop = tuple(i for i, d in enumerate(ORDER) if d not in keep)
        assert_close(cube["attribution"].values, a.sum(drop), 1e-12, f"keep {keep} {convention}")
        drop_r = tuple(i for i, d in enumerate(d for d in ORDER if d != "train") if d not in keep)
        assert_close(cube["regularization"].values, r.sum(drop_r), 1e-12, f"keep {keep} {convention} reg")


@pytest.mark.parametrize("convention", ["update", "gradient"])
@pytest.mark.parametrize("clip", [None, CLIP["sgd_momentum"]], ids=["unclipped", "clipped"])
def test_chunks_match_brute_force(runs, references, convention, clip):
    """Every train chunk scales its samples' gradients by the recorded clipping factor."""
    run = runs.get(BRUTE["sgd_momentum"].with_(clip=clip))
    ref = references(run)
    a, r = ref.cube(convention)
    cube = run.explain(convention=convention, quadrature=4, test_chunk=2, train_chunk=3, parameter_scores=True)
    assert_close(full_cube(cube), a[:, :, train_positions(cube, ref)], 1e-12, "chunked")
    assert_close(cube["regularization"].values, r, 1e-12, "chunked reg")
    whole = run.explain(convention=convention, quadrature=4, parameter_scores=True)
    for key in ("parameter_score", "parameter_score_signed", "parameter_score_stepwise_abs"):
        assert_close(cube[key].values, whole[key].values, 1e-12, key)
    change = np.abs(whole["final"] - whole["initial"]).max().item()
    assert np.abs(cube["residual"] - whole["residual"]).max().item() <= 1e-12 * change


@pytest.mark.parametrize("outputs", ["true", "predicted"])
def test_each_test_chunk_explains_its_own_inputs_selected_output(runs, references, outputs):
    """outputs='true' / 'predicted' choose one output per input; a pass over a chunk of test
    inputs must take the choices of its own inputs, by either convention."""
    run = runs.get(BRUTE["adam"])  # true classes [1, 0, 1]
    ref = references(run)
    classes = run.test_y.numpy() if outputs == "true" else ref.final.numpy().argmax(-1)
    rows = np.arange(len(run.test_x))
    for convention in ("update", "gradient"):
        a, r = ref.cube(convention)
        cube = run.explain(outputs=outputs, convention=convention, test_chunk=1, quadrature=4, tolerance=None)
        assert cube["output_class"].values.tolist() == classes.tolist()
        assert_close(full_cube(cube)[..., 0], a[:, :, :, rows, classes], 1e-12, f"{outputs} {convention}")
        assert_close(cube["regularization"].values[..., 0], r[:, :, rows, classes], 1e-12,
                     f"{outputs} {convention} reg")


@pytest.mark.parametrize("opt", ["sgd_momentum", "adamw"])  # mean-reduced: each sample weighs 1/|b_s|
def test_sample_effects_by_forward_mode_match_brute_force(runs, references, monkeypatch, opt):
    """A backward walk pushes a few carried effects through a step's batch by forward mode (one
    jvp each) and contracts more with materialised per-sample gradients. The brute-force batches
    of 3 are too small for forward mode to pay; where forward_mode_pays says it does, every walk
    takes it, and each sample's jvp must carry the sample's weight in the batch gradient. With
    every dim kept the walk's total (what the residual is taken against) is the sum of those
    dots, where the contracting walk takes it from the batch gradient: the residuals agree."""
    monkeypatch.setattr(ex.engine, "forward_mode_pays", lambda *args: True)
    run = runs.get(BRUTE[opt])
    ref = references(run)
    a, r = ref.cube("gradient")
    cube = run.explain(convention="gradient", quadrature=8)  # one effect per row and component
    assert_close(full_cube(cube), a[:, :, train_positions(cube, ref)], 1e-12, "gradient convention")
    assert_close(cube["regularization"].transpose("step", "component", "test", "output").values, r, 1e-12, "reg")
    monkeypatch.setattr(ex.engine, "forward_mode_pays", lambda *args: False)
    contracted = run.explain(convention="gradient", quadrature=8)
    change = float(abs(cube["final"] - cube["initial"]).max())
    np.testing.assert_allclose(cube["residual"].values, contracted["residual"].values, rtol=0, atol=1e-13 * change)
    monkeypatch.setattr(ex.engine, "forward_mode_pays", lambda *args: True)
    a, _ = ref.cube("update")
    walked = run.explain(keep=("train", "test"), quadrature=8)  # 3 carried effects < 7 samples: walks backwards
    assert_close(walked["attribution"].transpose("train", "test").values, a.sum((0, 1, 4)), 1e-12, "update convention")


@pytest.mark.parametrize("opt", ["sgd_momentum", "adam", "adamw"])
def test_parameter_scores_match_brute_force(runs, references, opt):
    run = runs.get(BRUTE[opt])
    ref = references(run)
    # per input, summed over inputs and outputs, per input and output
    for convention, keep in (("update", ("test",)), ("gradient", ()), ("update", ("test", "output"))):
        # a grouping that reorders the tensors: the output layer's first
        cube = run.explain(convention=convention, quadrature=4, parameter_scores=True,
                           components={"head": ["out"], "body": ["hidden"]}, keep=keep)
        # the parameter dim is the flat layout in component order: map it to named_parameters order
        names = cube.attrs["tensor_names"]
        components = cube.attrs["components"]
        assert sorted(components) == ["body", "head"]
        grouping = {"head": ["out.weight", "out.bias"], "body": ["hidden.0.weight", "hidden.0.bias"]}
        assert names == [n for c in components for n in grouping[c]]
        numel = {n: p.numel() for n, p in run.model.named_parameters()}
        offsets = dict(zip(ref.names, np.cumsum([0] + [numel[n] for n in ref.names])[:-1]))
        order = np.concatenate([np.arange(offsets[n], offsets[n] + numel[n]) for n in names])
        assert len(order) == cube.sizes["parameter"] == sum(numel.values())
        tensor_id = cube["parameter_tensor"].values
        assert [names[i] for i in tensor_id] == [n for n in names for _ in range(numel[n])]
        expected = ref.parameter_scores(convention, keep)
        for key, values in expected.items():
            assert cube[key].dims == (*keep, "parameter")
            assert_close(cube[key].values, values[..., order], 1e-12, f"{key} ({convention}, {keep})")
        # the paper's importance is the absolute value after summing: never above the stepwise one
        assert np.all(cube["parameter_score"].values <= cube["parameter_score_stepwise_abs"].values * (1 + 1e-12))
        assert "parameter_score_stepwise_abs" in cube.attrs["parameter_score_definitions"]
        # the signed score summed over parameters is the sample share of the total change
        a, _ = ref.cube(convention)
        assert_close(np.array(cube["parameter_score_signed"].values.sum()), np.array(a.sum()), 1e-12, "signed total")


# --------------------------------------------------------------------------- 3. property-based


OPT_HYPER = {
    "sgd": st.fixed_dictionaries({"lr": st.floats(0.01, 0.3), "weight_decay": st.sampled_from([0.0, 0.05])}),
    "sgd_momentum": st.fixed_dictionaries({
        "lr": st.floats(0.01, 0.15), "momentum": st.floats(0.1, 0.95), "dampening": st.floats(0.0, 0.9),
        "weight_decay": st.floats(0.0, 0.1)}),
    "sgd_nesterov": st.fixed_dictionaries({
        "lr": st.floats(0.01, 0.15), "momentum": st.floats(0.1, 0.95), "weight_decay": st.floats(0.0, 0.1)}),
    "adam": st.fixed_dictionaries({
        "lr": st.floats(0.001, 0.05), "betas": st.tuples(st.floats(0.5, 0.95), st.floats(0.8, 0.999)),
        "eps": st.sampled_from([1e-8, 1e-6, 1e-3]), "weight_decay": st.floats(0.0, 0.1),
        "amsgrad": st.booleans()}),
    "adamw": st.fixed_dictionaries({
        "lr": st.floats(0.001, 0.05), "betas": st.tuples(st.floats(0.5, 0.95), st.floats(0.8, 0.999)),
        "eps": st.sampled_from([1e-8, 1e-6]), "weight_decay": st.floats(0.0, 1.0), "amsgrad": st.booleans()}),
}


@st.composite
def random_cases(draw):
    opt = draw(st.sampled_from(list(OPT_HYPER)))
    hyper = draw(OPT_HYPER[opt])
    reduction = draw(st.sampled_from(["mean", "sum"]))
    n_train = draw(st.integers(3, 10))
    batch = draw(st.integers(1, n_train))
    if reduction == "sum" and opt.startswith("sgd"):
        hyper["lr"] /= batch  # keep the steps short enough for the quadrature
    return Case(
        "mlp", opt, reduction=reduction, schedule=draw(st.sampled_from([None, "step", "lambda"])),
        groups=draw(st.integers(1, 2)), steps=draw(st.integers(1, 6)), batch=batch, n_train=n_train,
        n_test=draw(st.integers(1, 3)), seed=draw(st.integers(0, 1000)),
        widths=tuple(draw(st.lists(st.integers(2, 6), min_size=1, max_size=2))),
        act=draw(st.sampled_from(["tanh", "gelu", "softplus"])),
        lr_scale=hyper.pop("lr") / OPTIMIZERS[opt][1]["lr"],
        overrides=tuple(sorted(hyper.items())),
        clip=draw(st.sampled_from([None, 0.3, 1.0])),
    )


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=random_cases(), convention=st.sampled_from(["update", "gradient"]))
def test_random_runs_decompose_exactly(case, convention):
    with tempfile.TemporaryDirectory() as tmp:
        run = train(case, Path(tmp) / "h", check_every=1)
        cube = run.explain(convention=convention, quadrature=8, tolerance=1e-9)  # 6 left 1.4e-9 on a long tanh step
        assert cube.attrs["relative_residual"] <= 1e-9, (case, cube.attrs["relative_residual"])
        assert cube.attrs["max_update_residual"] <= 1e-12, (case, cube.attrs["max_update_residual"])
        assert_self_consistent(cube, 1e-12)


# --------------------------------------------------------------------------- 4. float32


@pytest.mark.parametrize("name", list(CASES))
def test_decomposition_float32(runs, name):
    run = runs.get(CASES[name].with_(dtype=torch.float32), check_every=50)
    assert ex.History(run.path).dtype == torch.float32
    cube = run.explain(dtype=torch.float32, quadrature=4)
    assert cube["attribution"].dtype == np.float32
    assert cube.attrs["relative_residual"] <= 1e-5, cube.attrs["relative_residual"]
    assert cube.attrs["max_update_residual"] <= 1e-4, cube.attrs["max_update_residual"]
    assert_self_consistent(cube, 1e-6)


# --------------------------------------------------------------------------- ReLU kinks


def test_relu_kinks_are_integrated_exactly(runs):
    """Steps that cross ReLU kinks: exact with breakpoints, visibly not without them."""
    run = runs.get(Case("mlp", "adamw", act="relu", steps=6, lr_scale=3.0))
    for convention in ("update", "gradient"):
        cube = run.explain(convention=convention, breakpoints=True, tolerance=1e-9)
        assert cube.attrs["relative_residual"] <= 1e-9
        assert cube.attrs["max_update_residual"] <= 1e-12
        assert cube.attrs["kinks_located"] > 0
        assert_self_consistent(cube, 1e-12)
    smooth_rule = run.explain(breakpoints=False, tolerance=None)
    assert smooth_rule.attrs["relative_residual"] > 1e-6


def test_prelu_slopes_match_brute_force(runs, references):
    """torch's prelu backward breaks its shapes under a vmap over rows of reverse mode with a
    batched slope (the route of every cube with a train dim raised a RuntimeError): nn.PReLU's
    trained slopes are attributed like any weight, as the brute force does with torch's prelu."""
    run = runs.get(Case("prelu", "sgd_nesterov"))
    ref = references(run)
    cube = run.explain(quadrature=8)
    a, r = ref.cube("update")
    scale = max(np.abs(a).max(), np.abs(r).max())
    assert "slope.weight" in cube["component"].values.tolist()
    assert np.abs(full_cube(cube) - a[:, :, train_positions(cube, ref)]).max() <= 1e-12 * scale
    assert cube.attrs["relative_residual"] <= 1e-12


def test_embedding_bags_are_explained_by_forward_mode_too(runs, references):
    """torch's embedding_bag has no forward-mode derivative, so the kink search (the default) and
    cubes without a train dim were refused; nn.EmbeddingBag of same-length bags is now looked up
    and reduced by ops that have one, equal to the brute force of torch's own module."""
    run = runs.get(Case("bag", "adamw"))
    ref = references(run)
    a, r = ref.cube("update")
    scale = max(np.abs(a).max(), np.abs(r).max())
    full = run.explain(quadrature=8)
    assert np.abs(full_cube(full) - a[:, :, train_positions(full, ref)]).max() <= 1e-12 * scale
    per_test = run.explain(keep="test", quadrature=8)
    assert np.abs(per_test["attribution"].values - a.sum((0, 1, 2, 4))).max() <= 1e-12 * scale
    assert full.attrs["relative_residual"] <= 1e-12 and per_test.attrs["relative_residual"] <= 1e-12


@pytest.mark.parametrize("breakpoints", [True, False])
def test_cubes_without_train_dim_by_forward_mode_equal_the_jacobian_route(runs, breakpoints):
    """Without a train dim (and no parameter scores) the engine contracts G_s with a few vectors
    by forward mode; with parameter scores it builds G_s. Same cube, kinks located or not."""
    run = runs.get(Case("mlp", "adamw", act="relu", steps=6, lr_scale=3.0))
    for keep in (("step", "component", "test", "output"), ("component",), ("step", "output")):
        common = dict(keep=keep, step_bins=3 if "step" in keep else None, breakpoints=breakpoints, quadrature=3,
                      tolerance=None)
        by_directions = run.explain(**common)
        by_jacobian = run.explain(parameter_scores=True, **common)
        for name in ("attribution", "regularization"):
            assert_close(by_directions[name].values, by_jacobian[name].values, 1e-12, f"{keep} {name}")
        change = float(np.abs(by_jacobian["final"] - by_jacobian["initial"]).max())
        assert np.abs(by_directions["residual"] - by_jacobian["residual"]).max().item() <= 1e-12 * change
        if breakpoints:
            assert by_directions.attrs["kinks_located"] == by_jacobian.attrs["kinks_located"] > 0


@pytest.mark.parametrize("opt", ["sgd_nesterov", "adam", "adamw"])
def test_recorded_updates_give_the_checked_cube(runs, opt):
    """check_updates=False: without a train dim no gradient is recomputed, the recorded update is
    split into weight decay and the rest. Same cube as the checked route; no update residual."""
    run = runs.get(BRUTE[opt])
    for keep, scores in ((("step", "component", "test", "output"), False), (("component", "test"), True)):
        bins = 2 if "step" in keep else None
        checked = run.explain(keep=keep, step_bins=bins, quadrature=4, parameter_scores=scores, tolerance=1e-9)
        trusted = run.explain(keep=keep, step_bins=bins, quadrature=4, parameter_scores=scores, tolerance=1e-9,
                              check_updates=False)
        for name in ("attribution", "regularization") + (("parameter_score_signed",) if scores else ()):
            assert_close(trusted[name].values, checked[name].values, 1e-11, f"{opt} {keep} {name}")
        assert np.isnan(trusted["update_residual"].values).all()
        assert float(checked["update_residual"].max()) <= 1e-12
        assert_self_consistent(trusted, 1e-12)


# --------------------------------------------------------------------------- frozen tensors and buffers


class PartlyFrozen(nn.Module):
    """A frozen random projection and a buffer, both changed from their initial values."""

    def __init__(self):
        super().__init__()
        self.fixed = nn.Linear(4, 4).requires_grad_(False)
        self.head = nn.Linear(4, 3)
        self.register_buffer("scale", torch.linspace(0.5, 2.0, 4))

    def forward(self, x):
        return self.head(torch.tanh(self.fixed(x) * self.scale))


def test_the_train_dim_is_labelled_with_each_samples_class(tmp_path, monkeypatch):
    """DESIGN §3: the train dim's labels as extra coords. Mini-batches of dataset indices 100 … 111
    in a random order: train_label is each index's class, looked up here. A history whose label for
    a sample changes between steps (recorded by an explaind that did not refuse that yet) and a
    regression run have none."""
    torch.manual_seed(0)
    model = MLP(3, (4,), 3).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(12, 3, dtype=torch.float64), torch.arange(12) % 3
    order = torch.Generator().manual_seed(1)

    def record(path, relabel=False):
        with ex.Recorder(path, model, optimizer) as rec:
            for step in range(4):
                rows = torch.randperm(12, generator=order)[:5]
                targets = (y[rows] + step) % 3 if relabel else y[rows]
                optimizer.zero_grad()
                F.cross_entropy(model(x[rows]), targets).backward()
                rec.batch(rows + 100, x[rows], targets)
                optimizer.step()
        return ex.explain(path, model, x[:2], progress=False, tolerance=None)

    cube = record(tmp_path / "h")
    assert len(cube["train"]) >= 8
    np.testing.assert_array_equal(cube["train_label"].values, y[cube["train"].values - 100].numpy())
    assert ex.History(tmp_path / "h").train_labels().tolist() == cube["train_label"].values.tolist()
    assert "train_label" not in ex.explain(tmp_path / "h", model, x[:2], keep=("test", "output"), progress=False).coords
    monkeypatch.setattr(history_module, "_target_conflict", lambda *args: None)  # an older explaind's Recorder
    assert "train_label" not in record(tmp_path / "relabelled", relabel=True).coords
    with ex.Recorder(tmp_path / "mse", model, optimizer, loss="mse") as rec:
        optimizer.zero_grad()
        ((model(x) - 1.0) ** 2).sum(1).mean().backward()
        rec.batch(torch.arange(12), x, torch.ones(12, 3, dtype=torch.float64))
        optimizer.step()
    assert ex.History(tmp_path / "mse").train_labels() is None


def test_recorded_frozen_tensors_and_buffers_are_used(tmp_path):
    """explain() explains the recorded run even if handed a freshly initialised model."""
    torch.manual_seed(0)
    model = PartlyFrozen().double()
    x, y, tx, _ = make_data("mlp", 8, 3, 0)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.3, momentum=0.5)
    with ex.Recorder(tmp_path / "h", model, optimizer, check_every=1) as rec:
        for _ in range(3):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            rec.batch(torch.arange(8), x, y)
            optimizer.step()
    with torch.no_grad():
        trained = F.log_softmax(model(tx), -1).numpy()
    torch.manual_seed(1)
    fresh = PartlyFrozen().double()
    fresh.scale.neg_()  # its buffer unlike the recorded one too (a fresh one would hold the same)
    cube = ex.explain(tmp_path / "h", fresh, tx, progress=False, tolerance=None)
    assert np.abs(cube["final"].values - trained).max() <= 1e-13, "frozen tensors were not taken from the history"
    assert cube.attrs["relative_residual"] <= 1e-9


class TiedLM(nn.Module):
    """A language-model shape: the output layer is the embedding itself (tied, as GPT-2 ties
    them), LayerNorm, PyTorch's own attention, a ReLU convolution and a max over positions."""

    def __init__(self, vocab: int = 7, d: int = 6, padding_idx: int | None = None):
        super().__init__()
        self.embed = nn.Embedding(vocab, d, padding_idx=padding_idx)
        self.norm = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.conv = nn.Conv1d(d, d, 3, padding=1)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        h = self.embed(tokens)
        n = self.norm(h)
        h = h + self.attn(n, n, n, need_weights=False)[0]
        h = F.relu(self.conv(h.transpose(1, 2))).transpose(1, 2)
        return self.head(h.amax(1))


@pytest.mark.parametrize("padding_idx", [None, 0])
def test_tied_weights_are_one_tensor_that_both_uses_move(tmp_path, padding_idx):
    """A tensor used twice (input embedding and output layer) is recorded once, and its
    attribution carries both uses: the cube sums, to float64 quadrature level, to the change of
    the outputs of the user's own module before and after training, computed here by torch.
    With a padding row, torch's backward gives the row no gradient from its lookups, but the
    tied output layer and the decay move it, and the lookups see it move: J counts them."""
    torch.manual_seed(0)
    model = TiedLM(padding_idx=padding_idx).double()
    padding_row = model.embed.weight[0].detach().clone()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 7, (24, 5), generator=g), torch.randint(0, 7, (24,), generator=g)
    test_x = torch.randint(0, 7, (4, 5), generator=g)
    with torch.no_grad():
        before = F.log_softmax(model(test_x), -1)
    decayed = [p for name, p in model.named_parameters() if name.endswith("weight")]
    rest = [p for name, p in model.named_parameters() if not name.endswith("weight")]
    optimizer = torch.optim.AdamW([{"params": decayed, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                                  lr=5e-3)
    with ex.Recorder(tmp_path / "h", model, optimizer, check_every=1) as rec:
        for rows in torch.randperm(24, generator=g).split(6) * 2:
            optimizer.zero_grad()
            F.cross_entropy(model(x[rows]), y[rows]).backward()
            rec.batch(rows, x[rows], y[rows])
            optimizer.step()
    with torch.no_grad():
        change = (F.log_softmax(model(test_x), -1) - before).numpy()
    names = list(ex.History(tmp_path / "h").layout.names)
    assert "embed.weight" in names and "head.weight" not in names
    assert bool((test_x == 0).any()) and (model.embed.weight[0] - padding_row).abs().max() > 1e-3
    cube = ex.explain(tmp_path / "h", model.eval(), test_x, keep=("component", "train", "test", "output"), quadrature=8,
                      progress=False)
    assert cube.attrs["kinks_located"] > 0 and cube.attrs["max_update_residual"] <= 1e-12
    summed = (cube["attribution"].sum(("component", "train")) + cube["regularization"].sum("component")).values
    assert np.abs(summed - change).max() <= 1e-9 * np.abs(change).max()
    assert np.abs(cube["attribution"].sel(component="embed.weight")).max() > 0


class Regression(nn.Module):
    """One value per input: [batch] (as regression models often return) or [batch, 1]."""

    def __init__(self, column: bool):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1))
        self.column = column

    def forward(self, x):
        out = self.body(x)
        return out if self.column else out.squeeze(1)


def test_one_value_per_input_is_one_output(tmp_path):
    """A model returning [batch], trained with the built-in mse on targets [batch], is explained
    as one output per input: exact in float64, and the same cube as the model returning
    [batch, 1] trained on targets [batch, 1]."""
    x, _, tx, _ = make_data("mlp", 8, 3, 0)
    values = torch.sin(x.sum(1))
    cubes = []
    for column in (False, True):
        torch.manual_seed(0)
        model = Regression(column).double()
        y = values[:, None] if column else values
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
        with ex.Recorder(tmp_path / f"h{column}", model, optimizer, loss="mse", check_every=1) as rec:
            for _ in range(4):
                optimizer.zero_grad()
                F.mse_loss(model(x), y).backward()
                rec.batch(torch.arange(8), x, y)
                optimizer.step()
        cubes.append(ex.explain(tmp_path / f"h{column}", model, tx, progress=False, target="logit",
                                quadrature=4, tolerance=1e-9))
    flat, column = cubes
    assert flat["attribution"].sizes["output"] == 1
    assert flat.attrs["relative_residual"] <= 1e-9 and flat.attrs["max_update_residual"] <= 1e-12
    assert_self_consistent(flat, 1e-12)
    for name in ("attribution", "regularization", "initial", "final", "residual"):
        np.testing.assert_array_equal(flat[name].values, column[name].values)


def test_a_regression_is_explained_in_its_own_outputs_by_default(tmp_path):
    """A run recorded with MSE on three outputs: explain and reconstruct, given no target, explain
    the outputs the loss reads (as target="logit" does), not their log-softmax; initial and final
    are the model's own outputs at θ_0 and θ_N."""
    x, _, tx, _ = make_data("mlp", 8, 3, 0)
    y = torch.stack([x.sum(1), x[:, 0], -x[:, 1]], 1).sin()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    with torch.no_grad():
        before = model(tx)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with ex.Recorder(tmp_path / "h", model, optimizer, loss="mse") as rec:
        for _ in range(4):
            optimizer.zero_grad()
            ((model(x) - y) ** 2).sum(1).mean().backward()
            rec.batch(torch.arange(8), x, y)
            optimizer.step()
    with torch.no_grad():
        after = model(tx)
    cube = ex.explain(tmp_path / "h", model, tx, keep=("test", "output"), progress=False, tolerance=1e-9)
    assert cube.attrs["target"] == "logit" and cube.attrs["units"] == "logit"
    np.testing.assert_array_equal(cube["initial"].values, before.numpy())
    np.testing.assert_array_equal(cube["final"].values, after.numpy())
    xr.testing.assert_equal(cube, ex.explain(tmp_path / "h", model, tx, keep=("test", "output"), progress=False,
                                             target="logit"))
    rec = ex.reconstruct(tmp_path / "h", model, tx, progress=False)
    np.testing.assert_allclose(rec["final"].values, after.numpy(), rtol=0, atol=1e-15)
    assert rec.attrs["target"] == "logit"


def test_a_compiled_module_records_under_its_own_names_and_explains_either_way(tmp_path):
    """torch.compile wraps a module under "_orig_mod.": the history keeps the module's own names,
    so the compiled module (as trained) and the plain one (as loaded later) explain it alike,
    and exactly (float64, tanh MLP: the residual is the quadrature's)."""
    torch.manual_seed(0)
    plain = Case("mlp").fresh_model()
    compiled = torch.compile(plain, backend="eager")  # eager: no compiler needed, the same wrapper
    optimizer = torch.optim.AdamW(compiled.parameters(), lr=0.05)
    x, y, test_x, _ = make_data("mlp", 16, 3, 0)
    with ex.Recorder(tmp_path / "h", compiled, optimizer, check_every=1) as rec:
        for _ in range(3):
            optimizer.zero_grad()
            F.cross_entropy(compiled(x), y).backward()
            rec.batch(torch.arange(len(x)), x, y)
            optimizer.step()
    assert list(ex.History(tmp_path / "h").layout.names) == [name for name, _ in plain.named_parameters()]
    cubes = [ex.explain(tmp_path / "h", model, test_x, keep=("train", "test"), quadrature=6, progress=False)
             for model in (compiled, plain)]
    xr.testing.assert_equal(cubes[0].attribution, cubes[1].attribution)
    assert cubes[1].attrs["relative_residual"] <= 1e-9


def test_explain_leaves_the_users_module_alone(runs):
    """explain() calls a private copy of the module's structure, never the module it is handed:
    torch.func.functional_call swaps tensors into the module it calls, so calling the user's
    own would show θ_s to any other thread using it meanwhile. Two explains of one module in two
    threads therefore give the cube of one."""
    run = runs.get(BRUTE["adamw"])
    model = run.model
    originals = [(p, p.detach().clone()) for p in model.parameters()]
    calls = {"own module": 0, "copy": 0}

    def count(module, args, output):
        calls["own module" if module is model else "copy"] += 1

    handle = model.register_forward_hook(count)
    try:
        alone = run.explain(quadrature=3, tolerance=1e-9)
    finally:
        handle.remove()
    assert calls["own module"] == 0 and calls["copy"] > 0, calls
    assert [p for p, _ in originals] == list(model.parameters())
    assert all(torch.equal(p, value) for p, value in originals)

    cubes = [None, None]

    def explain_into(i):
        cubes[i] = run.explain(quadrature=3, tolerance=1e-9)

    threads = [threading.Thread(target=explain_into, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for cube in cubes:
        for name in ("attribution", "regularization", "final", "residual"):
            np.testing.assert_array_equal(cube[name].values, alone[name].values)

    # a module that cannot be deep-copied is called itself, after a warning that says so
    model.lock = threading.Lock()
    try:
        with pytest.warns(UserWarning, match="could not copy the module .*another thread"):
            borrowed = run.explain(quadrature=3, tolerance=1e-9)
    finally:
        del model.lock
    np.testing.assert_array_equal(borrowed["attribution"].values, alone["attribution"].values)


# Every route of explain, by the options that choose it (the kink search with and without a
# tolerance, both conventions and update passes, forward mode, parameter scores, a window).
ROUTES = [dict(), dict(convention="gradient"), dict(parameter_scores=True), dict(keep=("step", "component", "test")),
          dict(breakpoints=False), dict(kink_tolerance=1e-6), dict(steps=(2, 5), replay=1),
          dict(outputs="predicted", keep=("train", "test")), dict(check_updates=False, keep=("step",))]


@pytest.mark.parametrize("case", [Case("mlp", "adamw", act="relu", steps=6, lr_scale=3.0), CASES["cnn-sgd_nesterov"],
                                  CASES["transformer-adam"]], ids=["relu-mlp", "cnn", "transformer"])
def test_no_tensor_is_made_on_torchs_default_device(runs, case):
    """explain, reconstruct, verify_updates and plan make each tensor on the compute device or on
    the host, never on torch's default device: with that set to 'meta' (tensors without data),
    one made there stops the call when it meets the compute device's tensors, as a CPU-made one
    stops it on a GPU (the kink search's empty argmax indices did, in the first GPU run). Every
    route then gives the cube it gives without the setting (bit for bit on the CPU; on a GPU to
    rounding, where index_add_ with repeated indices, as the kinked inputs' pieces take, sums in
    no fixed order)."""
    run = runs.get(case)
    same = np.testing.assert_array_equal if DEVICE == "cpu" else \
        lambda a, b, err_msg="": np.testing.assert_allclose(a, b, rtol=1e-12, atol=0, err_msg=err_msg)
    for route in ROUTES:
        expected = run.explain(tolerance=None, **route)
        with torch.device("meta"):
            cube = run.explain(tolerance=None, **route)
        for name in ("attribution", "regularization", "residual"):
            same(cube[name].values, expected[name].values, err_msg=f"{route} {name}")
    rebuilt = ex.reconstruct(run.path, run.model, run.test_x, device=DEVICE, progress=False)
    with torch.device("meta"):
        rebuilt_meta = ex.reconstruct(run.path, run.model, run.test_x, device=DEVICE, progress=False)
        planned = ex.plan(run.path, run.model, run.test_x, run.test_y, device=DEVICE)
        residuals_meta = ex.verify_updates(run.path, run.model, device=DEVICE)
    same(rebuilt_meta["reconstructed"].values, rebuilt["reconstructed"].values)
    same(residuals_meta, ex.verify_updates(run.path, run.model, device=DEVICE))
    assert str(planned) == str(ex.plan(run.path, run.model, run.test_x, run.test_y, device=DEVICE))


# --------------------------------------------------------------------------- 7. the store


def test_save_and_open_cube_round_trip(runs, tmp_path):
    run = runs.get(BRUTE["adamw"])
    cube = run.explain(quadrature=4, outputs="true", parameter_scores=True)
    path = ex.save_cube(cube, tmp_path / "cube.zarr")
    assert not list(Path(path).rglob("*.pkl")) and not list(Path(path).rglob("*.pickle"))
    opened = ex.open_cube(path)
    try:
        # lazily opened: nothing is read until values are used
        assert not opened["attribution"].variable._in_memory
        assert set(opened.data_vars) == set(cube.data_vars)
        for name in cube.data_vars:
            assert opened[name].dims == cube[name].dims
            np.testing.assert_array_equal(opened[name].values, cube[name].values)
        for name in cube.coords:
            np.testing.assert_array_equal(opened[name].values, cube[name].values)
        assert set(opened.attrs) == set(cube.attrs)
        for key, value in cube.attrs.items():
            stored = opened.attrs[key]
            if isinstance(value, (list, tuple)):
                assert list(stored) == list(value), key
            else:
                assert stored == value, key
    finally:
        opened.close()
    # refuses to overwrite, replaces on request
    with pytest.raises(FileExistsError, match="overwrite=True"):
        ex.save_cube(cube, path)
    other = run.explain(quadrature=4, keep=("step", "test"))
    ex.save_cube(other, path, overwrite=True)
    reopened = ex.open_cube(path)
    try:
        assert reopened["attribution"].dims == ("step", "test")
        np.testing.assert_array_equal(reopened["attribution"].values, other["attribution"].values)
    finally:
        reopened.close()


@pytest.mark.parametrize("keep", [("train", "test", "output"), ("step", "test", "output")])
def test_a_window_checks_only_its_own_updates(runs, keep):
    """steps=(start, stop) checks the updates of the window alone, by either pass (the backward
    pass checks them in a forward replay of its own): the same values as a whole-run check there,
    NaN (not checked) elsewhere. AdamW's rounding leaves every float64 check above zero."""
    run = runs.get(Case("mlp", "adamw", act="relu", steps=6, lr_scale=3.0))
    common = dict(keep=keep, quadrature=2, breakpoints=False, tolerance=None)
    whole = run.explain(**common)["update_residual"].values
    window = run.explain(steps=(1, 3), **common)["update_residual"].values
    assert whole.all() and whole.max() <= 1e-12
    np.testing.assert_array_equal(window[1:3], whole[1:3])
    assert np.isnan(window[[0, 3, 4, 5]]).all()


def record_in_order(path: Path, ids: torch.Tensor, opt: str = "sgd_momentum", steps: int = 3, batch: int = 4):
    """A run over unshuffled batches (rows 0–3, 4–7, …) whose samples have dataset ids `ids`."""
    case = Case("mlp", opt)
    model = case.fresh_model()
    x, y, tx, ty = make_data("mlp", len(ids), 2, 0)
    optimizer = build_optimizer(model, *optimizer_spec(opt, 1))
    with ex.Recorder(path, model, optimizer, loss="cross_entropy", check_every=1) as rec:
        for rows in torch.arange(len(ids)).split(batch)[:steps]:
            optimizer.zero_grad()
            F.cross_entropy(model(x[rows]), y[rows]).backward()
            rec.batch(ids[rows], x[rows], y[rows])
            optimizer.step()
    return model, tx, ty


@pytest.mark.parametrize("by_forward_mode", [True, False])
@pytest.mark.parametrize("keep", [("train", "test"), ("step", "train", "test")])
@pytest.mark.parametrize("convention", ["update", "gradient"])
def test_train_chunks_that_miss_a_batch_give_the_whole_cube(tmp_path, monkeypatch, convention, keep, by_forward_mode):
    """With batches in order, a chunk of 8 samples holds none of two steps' samples. One input
    and two step bins: the backward pass pushes its few effects through a batch by forward mode
    where forward_mode_pays says so, else contracts them with the materialised gradients."""
    monkeypatch.setattr(ex.engine, "forward_mode_pays", lambda *args: by_forward_mode)
    model, tx, ty = record_in_order(tmp_path / "h", torch.arange(24), batch=8)
    kwargs = dict(keep=keep, outputs="true", convention=convention, step_bins=2 if "step" in keep else None,
                  progress=False, tolerance=1e-9)
    whole = ex.explain(tmp_path / "h", model, tx[:1], ty[:1], **kwargs)
    chunked = ex.explain(tmp_path / "h", model, tx[:1], ty[:1], train_chunk=8, **kwargs)
    np.testing.assert_allclose(chunked["attribution"].values, whole["attribution"].values, rtol=0, atol=1e-14)
    assert chunked.attrs["relative_residual"] <= 1e-9


def test_huge_sparse_training_ids_are_columns_not_a_table(tmp_path):
    """Ids such as hashes (10¹² + …) are looked up, not used as offsets into a table of max id + 1."""
    ids = 10**12 + 7 * torch.arange(12).flip(0)
    model, tx, ty = record_in_order(tmp_path / "h", ids)
    cube = ex.explain(tmp_path / "h", model, tx, ty, keep=("train", "test"), outputs="true",
                      train_chunk=5, progress=False, tolerance=1e-9)
    assert cube["train"].values.tolist() == sorted(ids.tolist())
    label_of = dict(zip(ids.tolist(), make_data("mlp", len(ids), 2, 0)[1].tolist()))  # the recorded run's labels
    assert cube["train_label"].values.tolist() == [label_of[i] for i in sorted(ids.tolist())]
    dense = ex.explain(tmp_path / "h", model, tx, ty, keep=("train", "test"), outputs="true", progress=False)
    np.testing.assert_allclose(cube["attribution"].values, dense["attribution"].values, rtol=0, atol=1e-14)


def test_inputs_that_require_grad_are_explained_as_values(tmp_path):
    model, tx, ty = record_in_order(tmp_path / "h", torch.arange(8), steps=2)
    plain = ex.explain(tmp_path / "h", model, tx, ty, progress=False)
    tracked = ex.explain(tmp_path / "h", model, tx.clone().requires_grad_(), ty, progress=False)
    np.testing.assert_array_equal(tracked["attribution"].values, plain["attribution"].values)


@pytest.mark.parametrize("outputs, labels", [(1, [1]), (torch.tensor(2), [2]), (np.array([2, 0]), [2, 0])])
def test_a_single_output_index_is_a_list_of_one(tmp_path, outputs, labels):
    model, tx, ty = record_in_order(tmp_path / "h", torch.arange(8), steps=2)
    cube = ex.explain(tmp_path / "h", model, tx, ty, outputs=outputs, keep="output", progress=False)
    assert cube["attribution"].dims == ("output",)
    assert cube["output"].values.tolist() == labels


class Float32Norm(nn.Module):
    """A float64 MLP that rounds its input to float32 (a constant of the run, harmless) and, with
    `coarse`, normalises its hidden layer in float32 as Hugging Face's LlamaRMSNorm does."""

    def __init__(self, coarse: bool):
        super().__init__()
        self.coarse = coarse
        self.hidden, self.out = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = self.hidden(x.float().to(x.dtype))
        if self.coarse:
            wide = h.float()
            h = (wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)
        return self.out(torch.tanh(h))


def record_float32_norm(path, coarse: bool) -> tuple[nn.Module, torch.Tensor]:
    x, y, tx, _ = make_data("mlp", 12, 3, 0)
    torch.manual_seed(0)
    model = Float32Norm(coarse).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    with ex.Recorder(path, model, optimizer, check_every=1) as rec:
        for _ in range(4):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            rec.batch(torch.arange(len(x)), x, y)
            optimizer.step()
    return model, tx


def test_a_model_that_rounds_to_float32_inside_is_named_as_the_floor_of_the_residual(tmp_path):
    """float64 history, float32 inside the forward: no quadrature lowers the residual below that
    rounding, so explain and reconstruct name the line that rounds (warning, attribute, and the
    fix of a residual above the tolerance) rather than asking for more nodes."""
    model, tx = record_float32_norm(tmp_path / "h", coarse=True)
    site = r"torch\.Tensor\.float at test_engine\.py:\d+ \(forward\)"
    with pytest.warns(UserWarning, match=rf"from torch.float64 to a coarser dtype \({site}\)"):
        reconstructions = [ex.reconstruct(tmp_path / "h", model, tx, quadrature=q, progress=False) for q in (8, 16)]
    coarse, finer = (r.attrs["relative_residual"] for r in reconstructions)
    assert 1e-11 < finer and finer > coarse / 10  # more nodes barely help: rounding, not quadrature
    assert re.fullmatch(site, reconstructions[0].attrs["coarser_rounding"])
    with pytest.warns(UserWarning, match=site), pytest.raises(
            ex.ReconstructionError, match=rf"The model itself rounds to a coarser dtype than float64 \({site}\)"):
        ex.explain(tmp_path / "h", model, tx, keep=("train", "test"), quadrature=8, tolerance=1e-13,
                   progress=False)


def test_rounding_what_the_parameters_do_not_move_is_not_named(tmp_path):
    """The float32 rounding of the input is the same at every θ: the decomposition stays exact and
    nothing is said of it."""
    model, tx = record_float32_norm(tmp_path / "h", coarse=False)
    cube = ex.explain(tmp_path / "h", model, tx, keep=("train", "test"), quadrature=8, progress=False)
    assert cube.attrs["coarser_rounding"] == "" and cube.attrs["relative_residual"] <= 1e-12


@pytest.mark.parametrize("backwards", [False, True])
@pytest.mark.parametrize("train_chunk", [None, 5])
def test_steps_whose_gradients_are_taken_together_give_the_cube_taken_step_by_step(tmp_path, monkeypatch,
                                                                                   train_chunk, backwards):
    """Either walk takes the per-sample gradients of up to engine.GRADIENT_STEPS steps (3 here) by
    one call where every batch lies wholly in the train chunk with the same shape, step by step
    otherwise (ChunkPass._group_gradients): 7 AdamW steps of 4 random samples of 10, step 4 of 2.
    3 test inputs × 3 outputs with every step kept (63 effects, more than the 10 samples) walk
    forwards, so steps 0-2 are taken together and the rest alone; 1 input summed over the steps
    (3 effects) walks backwards, its effects contracted with the materialised gradients (forward
    mode does not pay for 3 rows · 4 tensors over 4 samples), so steps 3-1 are taken together. With train
    chunks of 5, no step is. Float64: the cube equals the one taken a step at a time to rounding."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(10, 4, dtype=torch.float64), torch.arange(10) % 3
    test_x = torch.randn(1 if backwards else 3, 4, dtype=torch.float64)
    keep = ("component", "train", "test", "output") if backwards else ex.DIMS
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    with ex.Recorder(tmp_path / "run", model, optimizer) as rec:
        for step in range(7):
            batch = torch.randperm(10)[:2 if step == 4 else 4]
            optimizer.zero_grad()
            F.cross_entropy(model(x[batch]), y[batch]).backward()
            rec.batch(batch, x[batch], y[batch])
            optimizer.step()
    taken = []  # per call, the steps of each per_sample_gradients call (0: one step, its θ [D])
    per_sample = FlatModel.per_sample_gradients
    monkeypatch.setattr(FlatModel, "per_sample_gradients",
                        lambda self, theta, *args: taken[-1].append(len(theta) if theta.dim() == 2 else 0)
                        or per_sample(self, theta, *args))
    monkeypatch.setattr(engine, "BACKWARD_MEMORY_RATIO", 1)  # 3 effects < 10 samples walk backwards
    walks = []
    walks_backwards = engine.walks_backwards
    monkeypatch.setattr(engine, "walks_backwards", lambda *args: walks.append(walks_backwards(*args)) or walks[-1])
    cubes = []
    for steps in (3, 1):
        monkeypatch.setattr(engine, "GRADIENT_STEPS", steps)
        taken.append([])
        cubes.append(ex.explain(tmp_path / "run", model, test_x, keep=keep, train_chunk=train_chunk, progress=False))
    assert set(walks) == {backwards}
    together, alone = taken
    assert alone == [0] * len(alone) and len(alone) >= 7
    grouped = [0, 0, 0, 3, 0] if backwards else [3, 0, 0, 0, 0]  # the backward walk's steps 6 … 0
    assert together == (grouped if train_chunk is None else alone)
    for name in ("attribution", "regularization", "residual", "update_residual"):
        np.testing.assert_allclose(cubes[0][name].values, cubes[1][name].values, rtol=1e-12, atol=1e-15)
