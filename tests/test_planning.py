"""The cost plan of an explain() request: chunk sizes, memory, disk and time, before computing."""

from __future__ import annotations

import dataclasses
import math
import re
import threading
import warnings
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import jvp, vmap

import explaind as ex
from engine_cases import Case, train
from explaind import engine, planning
from explaind.functional import ActivationSizes, FlatModel, _OutputSizes, forward_mode_pays, layout_of
from explaind.losses import resolve_loss
from explaind.path import PathIntegral
from explaind.resumable import explain_resumable


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train(Case("mlp", "sgd_momentum", steps=5, n_train=10, n_test=4), tmp_path_factory.mktemp("plan") / "h")


def history_files_bytes(path) -> int:
    return sum(f.stat().st_size for f in (path / "steps").iterdir())


def test_plan_matches_what_explain_computes(run, monkeypatch):
    plan = ex.plan(run.path, run.model, run.test_x, run.test_y, keep=("train", "test", "output"),
                   quadrature=2, test_chunk=3, train_chunk=4)
    assert (plan.n_steps, plan.n_test, plan.n_train, plan.n_outputs) == (5, 4, 10, 3)
    assert plan.passes == math.ceil(4 / 3) * math.ceil(10 / 4)
    assert plan.history_bytes == history_files_bytes(run.path)
    assert plan.seconds is None and "not calibrated" in str(plan)
    passes = []
    monkeypatch.setattr(engine.ChunkPass, "_forward", lambda self, records: passes.append("forward") or list(records))
    monkeypatch.setattr(engine.ChunkPass, "_backward", lambda self, records: passes.append("backward") or list(records))
    cube = run.explain(keep=("train", "test", "output"), quadrature=2, test_chunk=3, train_chunk=4, tolerance=None)
    assert len(passes) == plan.passes and passes[0] == plan.direction  # chunks may differ: last ones are smaller
    assert cube["attribution"].values.nbytes == plan.cube_bytes
    # the host holds two step records (the one computed, the next one read), the cube and the results
    # of a pass over the first chunks, 3 inputs x 3 outputs x 4 samples in float64
    largest_step = max(f.stat().st_size for f in (run.path / "steps").iterdir())
    assert plan.cube_bytes == 4 * 3 * 10 * 8
    assert plan.host_bytes == 2 * largest_step + plan.cube_bytes + 3 * 3 * 4 * 8
    one = ex.plan(run.path, run.model, run.test_x, run.test_y, keep=("train", "test", "output"), quadrature=2)
    assert one.passes == 1 and one.host_bytes == 2 * largest_step + one.cube_bytes  # its results are the cube


def test_each_pass_is_merged_as_it_ends_and_one_pass_is_the_cube(run, monkeypatch):
    """Every pass's results were kept until the last pass had ended and then added into whole
    arrays, so the host held the cube twice (a 50 MB budget over a 326 MiB cube: 675 MiB beyond
    where the call started). Each pass's results are now freed before the next pass starts, and one
    pass's attribution is the cube's, not copied; the cubes are the same."""
    run_pass, held = engine.ChunkPass.run, []

    def run_and_hold(self, label):
        assert all(ref() is None for ref in held), "an earlier pass's results are still held"
        part = run_pass(self, label)
        held.append(weakref.ref(part["attribution"]))
        return part

    monkeypatch.setattr(engine.ChunkPass, "run", run_and_hold)
    options = dict(keep=("train", "test", "output"), quadrature=2, tolerance=None)
    chunked = run.explain(test_chunk=3, train_chunk=4, **options)
    assert len(held) == 2 * 3
    monkeypatch.setattr(engine.ChunkPass, "run", lambda self, label: held.append(run_pass(self, label)) or held[-1])
    whole = run.explain(**options)
    assert np.shares_memory(whole["attribution"].values, held[-1]["attribution"].numpy())
    np.testing.assert_allclose(chunked["attribution"].values, whole["attribution"].values, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("keep, test_chunk, direction", [
    (("train", "test", "output"), 1, "backward"),  # a chunk's 3 rows < 4 samples (all 12 rows > all 10)
    (("train", "test", "output"), None, "forward"),
    (("test", "output"), None, "forward"),  # no train dim: train_chunk=4 is not a chunk, one pass
])
def test_plan_counts_the_passes_and_direction_of_its_chunks(run, monkeypatch, keep, test_chunk, direction):
    """The passes explain runs and the way the first walks are the plan's: a pass walks by the
    rows and samples of its own chunks, and the samples are chunked only when the cube keeps them
    (with BACKWARD_MEMORY_RATIO 1: wherever a backward walk holds less)."""
    monkeypatch.setattr(engine, "BACKWARD_MEMORY_RATIO", 1)
    options = dict(keep=keep, quadrature=2, test_chunk=test_chunk, train_chunk=4)
    plan = ex.plan(run.path, run.model, run.test_x, run.test_y, **options)
    passes = []
    monkeypatch.setattr(engine.ChunkPass, "_forward", lambda self, records: passes.append("forward") or list(records))
    monkeypatch.setattr(engine.ChunkPass, "_backward", lambda self, records: passes.append("backward") or list(records))
    run.explain(tolerance=None, **options)
    assert (plan.passes, plan.direction) == (len(passes), direction)
    assert passes[0] == direction  # the last chunks are smaller and may walk the other way
    assert plan.passes == (1 if "train" not in keep else math.ceil(4 / (test_chunk or 4)) * math.ceil(10 / 4))


def test_the_pass_direction_follows_the_kept_sizes(run):
    one_row = ex.plan(run.path, run.model, run.test_x, run.test_y, keep=("train",), outputs="true")
    every_row = ex.plan(run.path, run.model, run.test_x, run.test_y, keep=("train", "test", "output"))
    assert one_row.direction == "backward"  # 1 carried row < 10 training samples
    assert every_row.direction == "forward"  # 12 rows > 10 samples: the momentum buffer is smaller
    assert every_row.device_bytes > one_row.device_bytes


def test_a_forward_walk_taken_for_speed_gives_way_to_a_budget_it_does_not_fit(run, monkeypatch):
    """The true class of the 4 inputs: 4 effects, fewer than the 10 samples but contracted with
    the materialised gradients (forward mode does not pay over 4 samples) and not 8 times fewer, so the
    pass walks forwards, the faster; a budget that holds the backward walk's pass but not the
    forward walk's runs the backward walk in one pass, as explain."""
    options = dict(keep=("train", "test"), outputs="true", breakpoints=False)
    fast = ex.plan(run.path, run.model, run.test_x, run.test_y, memory_budget=None, **options)
    monkeypatch.setattr(engine, "BACKWARD_MEMORY_RATIO", 1)
    small = ex.plan(run.path, run.model, run.test_x, run.test_y, memory_budget=None, **options)
    monkeypatch.undo()
    assert (fast.direction, small.direction) == ("forward", "backward")
    assert small.device_bytes < fast.device_bytes
    fitted = ex.plan(run.path, run.model, run.test_x, run.test_y, memory_budget=small.device_bytes, **options)
    assert (fitted.direction, fitted.passes, fitted.device_bytes) == ("backward", 1, small.device_bytes)
    walked = []
    monkeypatch.setattr(engine.ChunkPass, "_backward", lambda self, records: walked.append("backward") or list(records))
    monkeypatch.setattr(engine.ChunkPass, "_forward", lambda self, records: walked.append("forward") or list(records))
    run.explain(memory_budget=small.device_bytes, tolerance=None, **options)
    run.explain(memory_budget=None, tolerance=None, **options)
    assert walked == ["backward", "forward"]


def test_calibration_extrapolates_to_every_step_of_every_pass(run):
    plan = ex.plan(run.path, run.model, run.test_x, run.test_y, keep=("train", "test"), test_chunk=2,
                   calibrate_steps=3)
    assert plan.seconds_per_step > 0 and plan.seconds_per_later_step is None  # one train chunk
    assert plan.seconds == pytest.approx(plan.seconds_per_step * plan.passes * plan.n_steps)
    assert "ms per step of a first pass" in str(plan)


@pytest.fixture
def passes_by_step(monkeypatch):
    """Passes whose explained step s costs 10 ms x (1 + s), and 20 ms more in a test chunk's
    first pass, on a clock of their own; each pass is noted as (steps, replay start, first)."""
    clock, noted = [0.0], []

    def run(self, label):
        start, stop = self.req.step_range
        noted.append(((start, stop), self.req.replay_start, self.first_train_chunk))
        clock[0] += sum(0.01 * (1 + s) + 0.02 * self.first_train_chunk for s in range(start, stop))
        return {}

    monkeypatch.setattr(engine.ChunkPass, "run", run)
    monkeypatch.setattr(planning.time, "perf_counter", lambda: clock[0])
    return noted


@pytest.fixture(scope="module")
def long_run(tmp_path_factory):
    return train(Case("mlp", "sgd_momentum", steps=12, n_train=10, n_test=4), tmp_path_factory.mktemp("plan") / "h")


@pytest.mark.parametrize("calibrate, ranges", [
    (6, [(0, 2), (5, 7), (10, 12)]),  # three runs of 2 at the start, middle and end of the 12 steps
    (4, [(0, 2), (10, 12)]),
    (3, [(0, 3)]),  # runs take at least 2 steps
    (100, [(0, 12)]),  # every step
])
def test_calibration_spreads_its_steps_over_the_run_and_times_later_train_chunks_apart(long_run, passes_by_step,
                                                                                      calibrate, ranges):
    """A step's cost changes along a run (a schedule, the kinks its segment crosses), so the
    calibration times runs of steps spread over it, each replaying from its own first step; a
    later train chunk's pass skips the update checks and totals, and is timed apart. The
    estimate is then what the passes of explain cost on this clock: 2 test chunks x (12 steps
    of the first train chunk + 2 later chunks x 12 steps)."""
    run = long_run
    plan = ex.plan(run.path, run.model, run.test_x, run.test_y, keep=("train", "test"), test_chunk=2,
                   train_chunk=4, calibrate_steps=calibrate)
    assert plan.passes == 2 * 3
    timed = [(steps, replay) for steps, replay, _ in passes_by_step]
    assert timed == [(r, r[0]) for r in ranges for _ in range(2)] * 2  # each twice, as a first and a later pass
    assert [first for *_, first in passes_by_step] == [True] * 2 * len(ranges) + [False] * 2 * len(ranges)
    steps = [s for start, stop in ranges for s in range(start, stop)]
    mean_cost = 0.01 * (1 + np.mean(steps))
    assert plan.seconds_per_step == pytest.approx(mean_cost + 0.02, rel=1e-9)
    assert plan.seconds_per_later_step == pytest.approx(mean_cost, rel=1e-9)
    assert plan.seconds == pytest.approx(2 * 12 * (mean_cost + 0.02 + 2 * mean_cost), rel=1e-9)
    assert "of a later train chunk's" in str(plan)
    truth = 2 * 3 * sum(0.01 * (1 + s) for s in range(12)) + 2 * 12 * 0.02
    if len(ranges) == 3 or calibrate == 100:  # steps spread over the run: the run's cost on this clock
        assert plan.seconds == pytest.approx(truth, rel=1e-9)
    if calibrate == 3:  # the first steps only: the cheap ones
        assert plan.seconds < 0.5 * truth


@pytest.mark.parametrize("explained, calibrate, ranges", [
    (10, 6, [(0, 2), (4, 6), (8, 10)]),  # just room for gaps of a run's length between them
    (9, 6, [(0, 6)]),  # no room: one run
    (6, 4, [(0, 2), (4, 6)]),
    (5, 4, [(0, 4)]),
])
def test_calibration_runs_are_spread_while_there_is_room_between_them(long_run, passes_by_step, explained,
                                                                      calibrate, ranges):
    """Runs of the calibration are spread over the explained steps when gaps as long as a run fit
    between them (then as wide as they can be), else the steps are timed as one run."""
    run = long_run
    ex.plan(run.path, run.model, run.test_x, run.test_y, steps=(0, explained), calibrate_steps=calibrate)
    assert [steps for steps, _, _ in passes_by_step] == [r for r in ranges for _ in range(2)]


def test_a_request_over_budget_is_refused_with_the_fixes(run):
    with pytest.raises(ex.InputError, match="(?s)memory_budget.*outputs='true'.*step_bins.*gradient"):
        ex.plan(run.path, run.model, run.test_x, run.test_y, memory_budget=1000)
    # every chunk the planner may shrink is shrunk to one before it refuses; one asked for is kept
    with pytest.raises(ex.InputError, match="even with test_chunk=1, train_chunk=1, batch_chunk=1"):
        ex.plan(run.path, run.model, run.test_x, run.test_y, memory_budget=1000)
    with pytest.raises(ex.InputError, match="even with test_chunk=1, train_chunk=1, batch_chunk=3"):
        ex.plan(run.path, run.model, run.test_x, run.test_y, memory_budget=1000, batch_chunk=3)
    # only what shrinks this request is suggested: it sums over steps and explains one output
    with pytest.raises(ex.InputError) as summed:
        ex.plan(run.path, run.model, run.test_x, run.test_y, keep=("train", "test"), outputs="true",
                memory_budget=1000)
    said = str(summed.value)
    assert "step_bins" not in said and "outputs='true'" not in said and "convention='gradient'" in said, said


def test_a_refused_budget_names_the_least_budget_that_runs_the_request(run):
    """The refusal named the pass's bytes to three digits only ('needs about 299 KiB, over
    memory_budget=306176 bytes (299 KiB)'), so the budget it seemed to ask for was refused again;
    it names the least budget of three digits that runs the request, which plans."""
    args = (run.path, run.model, run.test_x, run.test_y)
    with pytest.raises(ex.InputError) as refused:
        ex.plan(*args, memory_budget=1000)
    least = float(re.search(r", or a budget of at least memory_budget=(\S+) \(", str(refused.value))[1])
    assert str(refused.value).endswith(f"memory_budget={least:.3g} ({engine.format_bytes(least)})")
    assert ex.plan(*args, memory_budget=least).device_bytes <= least
    below = least - 10 ** (math.floor(math.log10(least)) - 2)  # one in its third digit less
    with pytest.raises(ex.InputError, match=re.escape(f", or a budget of at least memory_budget={least:.3g} (")):
        ex.plan(*args, memory_budget=below)


def test_a_batch_whose_backward_pass_is_over_budget_is_split_and_gives_the_same_cube(tmp_path, monkeypatch):
    """A backward pass over a recorded batch holds the batch's activations, which no test or
    train chunk shrinks: the planner splits the batch into parts whose gradients add up (it
    did not, and a budget below one batch's backward pass was refused). Full batches of 10 of
    the MLP 4 → 6 → 3, test and train chunks asked for, float64; the cube with the batch split
    equals the one without. Each step's gradients are taken alone (GRADIENT_STEPS 1), so that the
    pass misses the budgets below by the backward passes alone, and a chunk of 2 inputs (6 rows,
    10 samples) walks backwards (BACKWARD_MEMORY_RATIO 1)."""
    monkeypatch.setattr(engine, "GRADIENT_STEPS", 1)
    monkeypatch.setattr(engine, "BACKWARD_MEMORY_RATIO", 1)
    case = train(Case("mlp", "adamw", steps=3, n_train=10, batch=10, n_test=4), tmp_path / "h")
    args = (case.path, case.model, case.test_x, case.test_y)
    options = dict(keep=("train", "test", "output"), breakpoints=False, quadrature=2, test_chunk=4, train_chunk=10)
    whole = ex.plan(*args, memory_budget=None, **options)
    assert (whole.test_chunk, whole.train_chunk, whole.batch_chunk) == (4, 10, 10)
    request = engine.build_request(*args, **engine.request_options("plan", options))
    # a budget that the pass misses by its batch's backward pass less that of 5 samples
    saved = engine._batch_backward_elements(request, 10) - engine._batch_backward_elements(request, 5)
    assert saved == 10 * 15 * 3 // 2 - 5 * 15 * 3 // 2  # 1.5 x the 15 activations per sample
    budget = whole.device_bytes - 8 * saved
    split = ex.plan(*args, memory_budget=budget, **options)
    assert (split.test_chunk, split.train_chunk, split.batch_chunk) == (4, 10, 5)
    assert split.device_bytes == budget
    cube = ex.explain(*args, memory_budget=budget, tolerance=None, progress=False, **options)
    reference = ex.explain(*args, memory_budget=None, tolerance=None, progress=False, **options)
    for name in ("attribution", "regularization", "residual", "update_residual"):
        np.testing.assert_allclose(cube[name].values, reference[name].values, rtol=1e-12, atol=1e-15)
    assert np.abs(cube["update_residual"].values).max() <= 1e-12
    # two test chunks asked for, split batches: the budget of one pass holds the whole batch's backward
    # pass, as the planner, halving the inputs before the batch here, needs it for one pass
    halves = dict(options, test_chunk=2)
    two = ex.plan(*args, memory_budget=ex.plan(*args, memory_budget=None, **halves).device_bytes - 8 * saved, **halves)
    assert (two.passes, two.batch_chunk) == (2, 5)
    assert two.one_pass_budget == planning.rounded_up(whole.device_bytes)
    chosen = {name: value for name, value in options.items() if not name.endswith("_chunk")}
    one = ex.plan(*args, memory_budget=two.one_pass_budget, **chosen)
    assert (one.passes, one.batch_chunk) == (1, 10)
    assert (ex.plan(*args, memory_budget=planning.rounded_up(whole.device_bytes - 8 * saved), **chosen).passes) > 1


def test_sums_and_products_over_parts_of_a_batch_equal_those_over_the_batch(run):
    """FlatModel's batch gradient, per-sample gradients and per-sample directional derivatives
    over parts of 3, 3, 3 and 1 of a batch of 10 equal one pass over all 10 (float64), and
    each per-sample gradient equals a backward pass over its sample alone; so do the per-sample
    gradients of two steps' batches at their own θ taken by one call, in parts of 3, and each
    sample's gradient scaled by its weight as it is written equals the gradient times the weight,
    and the weighted batch gradients of two steps by one call equal their sums."""
    history = ex.History(run.path)
    flat = engine.FlatModel(run.model, history.layout, torch.float64, "cpu", history.constants())
    theta = flat.layout.flatten(history.params(2))
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(10, 4, dtype=torch.float64, generator=generator), torch.arange(10) % 3
    weights = torch.rand(10, dtype=torch.float64, generator=generator)
    tangents = torch.randn(2, flat.layout.dim, dtype=torch.float64, generator=generator)
    _, loss = resolve_loss("cross_entropy")
    grads = flat.per_sample_gradients(theta, x, y, loss, 3)
    alone = torch.stack([flat.batch_gradient(theta, x[k:k + 1], y[k:k + 1], torch.ones(1, dtype=torch.float64), loss)
                         for k in range(10)])
    np.testing.assert_allclose(grads.numpy(), alone.numpy(), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(flat.batch_gradient(theta, x, y, weights, loss, 3).numpy(),
                               (weights @ alone).numpy(), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(flat.per_sample_directional(theta, x, y, loss, tangents, 3).numpy(),
                               (tangents @ alone.T).numpy(), rtol=1e-12, atol=1e-14)
    theta_0, x_0 = flat.layout.flatten(history.params(0)), torch.randn(10, 4, dtype=torch.float64, generator=generator)
    steps = flat.per_sample_gradients(torch.stack([theta_0, theta]), torch.stack([x_0, x]), torch.stack([y, y]), loss, 3)
    assert steps.shape == (2, 10, flat.layout.dim)
    np.testing.assert_allclose(steps[0].numpy(), flat.per_sample_gradients(theta_0, x_0, y, loss).numpy(),
                               rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(steps[1].numpy(), alone.numpy(), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(flat.per_sample_gradients(theta, x, y, loss, 3, weights).numpy(),
                               (weights[:, None] * alone).numpy(), rtol=1e-13, atol=1e-15)
    both = torch.stack([weights, 1 - weights])
    weighted = flat.per_sample_gradients(torch.stack([theta_0, theta]), torch.stack([x_0, x]), torch.stack([y, y]),
                                         loss, None, both)
    np.testing.assert_allclose(weighted.numpy(), (both[:, :, None] * steps).numpy(), rtol=1e-13, atol=1e-15)
    # the batch gradients of the two steps by one call, in parts of 3: each the weighted sum of its own
    batch = flat.batch_gradient(torch.stack([theta_0, theta]), torch.stack([x_0, x]), torch.stack([y, y]), both, loss, 3)
    np.testing.assert_allclose(batch.numpy(), torch.einsum("sb,sbd->sd", both, steps).numpy(), rtol=1e-13, atol=1e-15)


def test_inputs_are_cast_to_the_functions_dtype_and_token_ids_stay_integers():
    """FlatModel casts floating-point inputs to the dtype it computes in, whichever they come in
    (float32 inputs to a float64 function, float64 ones to its float32 twin), and leaves integer
    inputs (token ids) integers: its outputs are the module's on the inputs cast by hand."""
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    flat = FlatModel(model, layout_of(model), torch.float64, "cpu")
    theta = flat.layout.flatten(dict(model.named_parameters())).detach()
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))  # float32
    with torch.no_grad():
        by_hand = model(x.double())
        by_hand_float32 = model.float()(x)
    got = flat.outputs(theta, x, "logit")
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, by_hand, rtol=0, atol=1e-15)
    got = flat.in_dtype(torch.float32).outputs(theta.float(), x.double(), "logit")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, by_hand_float32, rtol=0, atol=1e-6)
    tokens = torch.tensor([[0, 3], [2, 1]])
    assert flat.cast_inputs(tokens).dtype == torch.long
    assert flat.cast_inputs(x).dtype == torch.float64


def test_a_twin_in_another_dtype_computes_with_its_constants_in_that_dtype():
    """in_dtype casts the frozen tensors and buffers with the function: the float32 twin of a
    float64 FlatModel with a frozen layer and batch-norm statistics computes the module's float32
    outputs, and the float64 twin of a float32 one the float64 outputs (the kink search, the check
    of a model that fails in float64 and the vocabulary check run in such twins)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double().eval()
    model[0].requires_grad_(False)
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    x = torch.randn(5, 4, dtype=torch.float64)
    for dtype, other, atol in ((torch.float64, torch.float32, 1e-6), (torch.float32, torch.float64, 1e-15)):
        model = model.to(dtype)
        twin = FlatModel(model, layout_of(model), dtype, "cpu").in_dtype(other)
        assert {t.dtype for t in twin.constants.values() if t.is_floating_point()} == {other}
        theta = twin.layout.flatten(dict(model.named_parameters())).detach().to(other)
        with torch.no_grad():
            by_hand = model.to(other)(x.to(other))
        torch.testing.assert_close(twin.outputs(theta, x, "logit"), by_hand, rtol=0, atol=atol)


def test_plan_refuses_arguments_explain_does_not_take(run):
    with pytest.raises(TypeError, match="quadratur"):
        ex.plan(run.path, run.model, run.test_x, run.test_y, quadratur=3)


def directional_case(run):
    """The float64 function of the run, θ_2, step 2's batch, its loss and 3 random tangents."""
    history = ex.History(run.path)
    flat = engine.FlatModel(run.model, history.layout, torch.float64, "cpu", history.constants())
    theta = flat.layout.flatten(history.params(2))
    rec = next(history.steps(2, 3))
    _, loss = resolve_loss("cross_entropy")
    tangents = torch.randn(3, flat.layout.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return flat, theta, rec, loss, tangents


def test_forward_mode_sample_effects_equal_per_sample_gradients(run):
    """The backward pass's two routes to effect · ∇ℓ_k agree (float64, 1e-12)."""
    flat, theta, rec, loss, tangents = directional_case(run)
    by_jvp = flat.per_sample_directional(theta, rec.inputs, rec.targets, loss, tangents)
    grads = flat.per_sample_gradients(theta, rec.inputs, rec.targets, loss)
    expected = tangents @ grads.T
    np.testing.assert_allclose(by_jvp.numpy(), expected.numpy(), rtol=1e-12, atol=1e-14)
    # and against a central finite difference of one sample's loss along one tangent
    k, r, h = 1, 2, 1e-6
    def sample_loss(th):
        return loss(flat.raw(th, rec.inputs[k:k + 1]), rec.targets[k:k + 1])[0].item()
    finite = (sample_loss(theta + h * tangents[r]) - sample_loss(theta - h * tangents[r])) / (2 * h)
    assert abs(by_jvp[r, k].item() - finite) <= 1e-7 * max(1.0, abs(finite))


def test_forward_mode_in_two_threads_at_once_gives_each_its_own_result(run):
    """torch.func.jvp keeps its nesting depth and forward AD's levels process-wide: two threads'
    jvps at once used to fail ("no level exists", "invalid index" — once in a full test run, when
    two explains ran side by side). Each thread's 150 forward-mode passes now equal one thread's."""
    flat, theta, rec, loss, tangents = directional_case(run)
    expected = flat.per_sample_directional(theta, rec.inputs, rec.targets, loss, tangents)
    failures, mismatches = [], []

    def repeat():
        try:
            for _ in range(150):
                got = flat.per_sample_directional(theta, rec.inputs, rec.targets, loss, tangents)
                if not torch.equal(got, expected):
                    mismatches.append(got)
        except RuntimeError as error:
            failures.append(str(error).splitlines()[0])

    threads = [threading.Thread(target=repeat) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == [] and len(mismatches) == 0


def test_explain_prints_its_plan_before_computing(run, capsys):
    """On stderr, beside its progress bars: the caller's stdout stays its own (it held the plan)."""
    run.explain(keep=("test",), quadrature=2, progress=True, tolerance=None)
    printed = capsys.readouterr()
    assert printed.out == ""
    assert "passes" in printed.err and "history" in printed.err
    assert "  time       not calibrated (explaind.plan(..., calibrate_steps=6) estimates it)\n" in printed.err
    assert "explain passes" not in printed.err  # one pass: its own bar is the whole call's
    run.explain(keep=("train", "test"), quadrature=2, progress=True, tolerance=None, train_chunk=3)
    printed = capsys.readouterr()
    assert "explain passes: 100%" in printed.err and "4/4" in printed.err  # 10 samples in chunks of 3: 4 passes


def test_a_plan_of_a_window_names_its_steps_and_those_it_replays(run, tmp_path, capsys):
    """A window's plan read '5 steps' as the whole run's did, so the parts of explain_resumable's
    split by steps printed the same summary one after another; each now names its steps."""
    args = (run.path, run.model, run.test_x, run.test_y)
    header = {steps: str(ex.plan(*args, steps=steps, replay=replay)).splitlines()[0]
              for steps, replay in (((0, 5), None), ((0, 2), None), ((2, 5), None), ((3, 5), 1))}
    assert ", 5 steps, " in header[0, 5]
    assert ", steps 0–2 of 5, " in header[0, 2]
    assert ", steps 2–5 of 5 (after replaying the momentum of steps 0–2), " in header[2, 5]
    assert ", steps 3–5 of 5 (after replaying the momentum of steps 2–3), " in header[3, 5]
    explain_resumable(*args, parts_dir=tmp_path / "parts", n_parts=2, keep=("test",), quadrature=2, tolerance=None)
    printed = [line for line in capsys.readouterr().err.splitlines() if line.startswith("explain: ")]
    assert [line.split(", ")[2] for line in printed] == ["steps 0–2 of 5"]  # the first part's plan only


def test_plan_counts_the_parameter_scores(run):
    options = dict(keep=("test", "output"), parameter_scores=True, quadrature=2)
    plan = ex.plan(run.path, run.model, run.test_x, run.test_y, **options)
    cube = run.explain(tolerance=None, **options)
    scores = sum(cube[name].values.nbytes for name in ("parameter_score", "parameter_score_signed",
                                                         "parameter_score_stepwise_abs"))
    assert plan.cube_bytes == cube["attribution"].values.nbytes + scores + cube["parameter_tensor"].values.nbytes
    assert plan.host_bytes >= plan.cube_bytes


@pytest.mark.parametrize("steps", [-1, 2.5, True, "3", None])
def test_plan_refuses_a_calibration_that_is_not_a_number_of_steps(run, steps):
    with pytest.raises(ex.InputError) as refused:
        ex.plan(run.path, run.model, run.test_x, run.test_y, calibrate_steps=steps)
    assert str(refused.value) == (f"calibrate_steps={steps!r} must be a whole number of steps ≥ 0 "
                                  "(0: no time estimate)")


def test_plan_refuses_the_test_ids_explain_refuses(run):
    message = "got test_ids of shape (2,) for 4 inputs: pass one id per input"
    with pytest.raises(ex.InputError) as planned:
        ex.plan(run.path, run.model, run.test_x, run.test_y, test_ids=[7, 8])
    with pytest.raises(ex.InputError) as explained:
        run.explain(test_ids=[7, 8])
    assert str(planned.value) == str(explained.value) == message


def test_chunks_larger_than_the_data_are_costed_at_the_data(run):
    """explain never holds more than the 4 inputs and 10 samples there are in a pass, nor a part of
    a batch beyond the 4 samples a recorded batch has."""
    asked = ex.plan(run.path, run.model, run.test_x, run.test_y, keep=("train", "test"),
                    test_chunk=100, train_chunk=1000, batch_chunk=10**6, memory_budget=None)
    whole = ex.plan(run.path, run.model, run.test_x, run.test_y, keep=("train", "test"), memory_budget=None)
    assert (asked.test_chunk, asked.train_chunk, asked.batch_chunk, asked.passes) == (4, 10, 4, 1)
    request = engine.build_request(run.path, run.model, run.test_x, run.test_y,
                                   **engine.request_options("plan", dict(keep=("train", "test"))))
    engine.plan_chunks(request, None)  # which sets the steps whose gradients are taken together
    assert asked.device_bytes == whole.device_bytes == engine.pass_bytes(request, 4, 10, 4)


def planned_chunks(run, monkeypatch, cost, budget, **options) -> tuple[int, int, int]:
    """The test, train and batch chunks plan_chunks picks for 4 inputs of 3 outputs, 10 samples and
    batches of 4 under `budget`, when a pass over (test, train, rows) costs cost(test, train, rows)."""
    request = engine.build_request(run.path, run.model, run.test_x, run.test_y,
                                   **engine.request_options("plan", dict(keep=("train", "test"), **options)))
    assert (request.n_outputs, len(request.train_index), request.history.max_batch()) == (3, 10, 4)
    monkeypatch.setattr(engine, "pass_bytes", lambda req, test, train, rows: cost(test, train, rows))
    monkeypatch.setattr(request.path, "search_reserve", lambda inputs, n_test: 0)
    engine.plan_chunks(request, budget)
    return request.test_chunk, request.train_chunk, request.batch_chunk


@pytest.mark.parametrize("budget, chunks", [
    (320, (4, 10, 2)),  # halving the batch saves 120 of 440 bytes (≥ a quarter): it goes first
    (200, (2, 10, 1)),  # 60 of 320 is less: the inputs' 12 rows ≥ 10 samples are halved, then the batch again
])
def test_the_planner_splits_a_batch_while_that_saves_a_quarter_of_the_pass(run, monkeypatch, budget, chunks):
    assert planned_chunks(run, monkeypatch, lambda test, train, rows: 60 * rows + 5 * test * train, budget) == chunks


@pytest.mark.parametrize("budget, chunks", [
    (100, (2, 10)),  # 4 inputs x 3 outputs = 12 rows ≥ 10 samples: the inputs are halved
    (50, (2, 5)),  # then 2 x 3 = 6 rows < 10 samples: the samples are
])
def test_the_planner_halves_the_side_with_more_rows_counting_every_output(run, monkeypatch, budget, chunks):
    # batch_chunk asked for: the planner shrinks only the inputs and the samples
    assert planned_chunks(run, monkeypatch, lambda test, train, rows: 5 * test * train, budget,
                          batch_chunk=4)[:2] == chunks


@pytest.fixture
def timed_pass(monkeypatch):
    """Passes that take 50 ms per explained step and 10 ms per step that only replays momentum,
    on a clock of their own (a loaded machine cannot stretch them): the clock, [seconds]."""
    clock = [0.0]

    def run(self, label):
        start, stop = self.req.step_range
        clock[0] += 0.05 * (stop - start) + 0.01 * (start - self.req.replay_start)
        return {}

    monkeypatch.setattr(engine.ChunkPass, "run", run)
    monkeypatch.setattr(planning.time, "perf_counter", lambda: clock[0])
    return clock


@pytest.mark.parametrize("steps, calibrate, explained, replayed", [
    (None, 3, 5, 0),
    (None, 100, 5, 0),  # more steps than the history: all of them
    ((3, 5), 2, 2, 3),  # steps 0 … 2 only replay the momentum
])
def test_calibration_times_replayed_steps_apart(run, timed_pass, steps, calibrate, explained, replayed):
    """The estimate is 50 ms x explained + 10 ms x replayed steps (not 50 ms x every step read)."""
    plan = ex.plan(run.path, run.model, run.test_x, run.test_y, steps=steps, calibrate_steps=calibrate)
    assert plan.passes == 1
    assert plan.seconds_per_step == pytest.approx(0.05, rel=1e-9)
    assert plan.seconds == pytest.approx(0.05 * explained + 0.01 * replayed, rel=1e-9)
    if replayed:
        assert plan.seconds_per_replayed_step == pytest.approx(0.01, rel=1e-9)
        assert "ms per replayed step" in str(plan)


def test_calibration_counts_the_replay_of_every_train_chunks_pass(run, timed_pass):
    """Each of the 3 train chunks' passes replays steps 0 … 2 before explaining steps 3 and 4, as
    explain's passes do on the same clock: 3 x (50 ms x 2 + 10 ms x 3)."""
    options = dict(keep=("train", "test"), train_chunk=4, steps=(3, 5))
    plan = ex.plan(run.path, run.model, run.test_x, run.test_y, calibrate_steps=2, **options)
    assert plan.passes == 3 and plan.seconds_per_replayed_step == pytest.approx(0.01, rel=1e-9)
    request = engine.build_request(run.path, run.model, run.test_x, run.test_y, **engine.request_options("plan", options))
    engine.plan_chunks(request, 4 * 2**30)
    started = timed_pass[0]
    engine._run_chunks(request, lambda tests, trains, part: None)
    assert plan.seconds == pytest.approx(timed_pass[0] - started, rel=1e-9) == pytest.approx(3 * (0.1 + 0.03))


def test_calibration_times_the_run_after_its_warm_up(run, monkeypatch):
    """Each pass is run twice and the second timed: the first pays for allocation and tracing
    (here 1 s more the first time a step range is run, on a clock of its own)."""
    clock, seen = [0.0], set()

    def run_pass(self, label):
        start, stop = self.req.step_range
        clock[0] += 0.05 * (stop - start) + (0.0 if (start, stop) in seen else 1.0)
        seen.add((start, stop))
        return {}

    monkeypatch.setattr(engine.ChunkPass, "run", run_pass)
    monkeypatch.setattr(planning.time, "perf_counter", lambda: clock[0])
    plan = ex.plan(run.path, run.model, run.test_x, run.test_y, calibrate_steps=4)
    assert plan.seconds_per_step == pytest.approx(0.05, rel=1e-9)
    assert plan.seconds == pytest.approx(0.05 * 5, rel=1e-9)


def scheduled_run(path, rate, steps: int):
    """An MLP trained by momentum SGD whose LambdaLR follows `rate`, two alternating batches of 4:
    (model, x, y)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    x = torch.randn(8, 3, dtype=torch.float64)
    y = (x[:, 0] > 0).long()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, rate)
    with ex.Recorder(path, model, optimizer, loss="cross_entropy", scheduler=scheduler) as rec:
        for s in range(steps):
            rows = torch.arange(4) + 4 * (s % 2)
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x[rows]), y[rows]).backward()
            rec.batch(rows, x[rows], y[rows])
            optimizer.step()
            scheduler.step()
    return model, x, y


def test_calibration_of_a_window_after_a_warm_up_from_learning_rate_0(tmp_path, timed_pass):
    """Momentum cannot be solved from the update of step 0 (lr 0), so the replay is not timed
    from step 1; the estimate stays 50 ms x 3 explained + 10 ms x 2 replayed steps."""
    model, x, y = scheduled_run(tmp_path / "h", lambda s: min(1.0, s / 2), 5)
    plan = ex.plan(tmp_path / "h", model, x[:2], y[:2], steps=(2, 5), calibrate_steps=1)
    assert plan.seconds == pytest.approx(0.05 * 3 + 0.01 * 2, rel=1e-9)


def test_calibration_replays_no_pass_from_a_step_whose_momentum_is_unsolvable(tmp_path, monkeypatch):
    """Real passes of the warm-up from learning rate 0: the explained step 2 is timed replaying
    from 2 and from the request's start 0, never from step 1, whose momentum step 0's update
    (lr 0) does not show; the step without replay is then timed as the explained one."""
    model, x, y = scheduled_run(tmp_path / "h", lambda s: min(1.0, s / 2), 5)
    noted, run_pass = [], engine.ChunkPass.run
    monkeypatch.setattr(engine.ChunkPass, "run", lambda self, label: noted.append(
        (self.req.step_range, self.req.replay_start)) or run_pass(self, label))
    plan = ex.plan(tmp_path / "h", model, x[:2], y[:2], steps=(2, 5), calibrate_steps=1)
    assert noted == [((2, 3), 2)] * 2 + [((1, 2), 0)] * 2
    assert plan.seconds_per_replayed_step >= 0 and plan.seconds > 0


@pytest.mark.parametrize("rate, blocks", [
    (lambda s: 0.0 if s == 4 else 1.0, [(0, 2, 0), (6, 8, 6), (10, 12, 10)]),  # the middle run moved past step 4
    (lambda s: 1.0 if s < 4 else 0.0, [(0, 2, 0), (5, 7, 0), (10, 12, 0)]),  # none after step 4: replayed from 0
])
def test_calibration_runs_start_where_the_momentum_can_be_solved(tmp_path, passes_by_step, rate, blocks):
    """A run of the calibration replays from its first step, whose momentum is solved from the
    update before it: not after a learning rate of 0, so the run moves up to a step that can
    be, or, where none can, replays from the request's start."""
    model, x, y = scheduled_run(tmp_path / "h", rate, 12)
    ex.plan(tmp_path / "h", model, x[:2], y[:2], calibrate_steps=6)
    assert [(*steps, replay) for steps, replay, _ in passes_by_step] == [b for b in blocks for _ in range(2)]


def test_chunks_asked_beyond_the_data_fit_the_budget_the_data_needs(run):
    """A chunk far beyond the data is run, and costed, at the data's size: the budget that fits
    every sample in one chunk fits it too (it was refused as needing 458 MiB)."""
    args = (run.path, run.model, run.test_x, run.test_y)
    fits = ex.plan(*args, keep=("train", "test"), memory_budget=None)
    huge = ex.plan(*args, keep=("train", "test"), train_chunk=10**6, test_chunk=10**6, memory_budget=fits.device_bytes)
    assert (huge.train_chunk, huge.test_chunk, huge.device_bytes) == (10, 4, fits.device_bytes)
    cube = run.explain(keep=("train", "test"), train_chunk=10**6, memory_budget=fits.device_bytes, tolerance=None)
    reference = run.explain(keep=("train", "test"), tolerance=None).attribution.values
    # equal to rounding: under the budget the path integral (breakpoints=True) takes its rows in
    # passes of another size, whose products some CPUs' BLAS kernels sum in another order
    assert abs(cube.attribution.values - reference).max() <= 1e-13 * abs(reference).max()


@pytest.mark.parametrize("tolerance", [float("nan"), -1e-4, "1e-4"])
def test_a_plan_refuses_a_tolerance_that_explain_refuses(run, tolerance):
    """explain refuses it before any pass; its plan costed it as if it would run."""
    for call in (ex.plan, ex.explain):
        with pytest.raises(ex.InputError, match=r"tolerance=.* must be a number ≥ 0 \(None: no check\)"):
            call(run.path, run.model, run.test_x, run.test_y, tolerance=tolerance)


@pytest.mark.parametrize("budget", [float("nan"), "1e9", 0, -5, True])
def test_memory_budgets_that_are_no_number_of_bytes_are_refused(run, budget):
    for call in (ex.plan, ex.explain):
        with pytest.raises(ex.InputError, match=r"memory_budget=.* must be a number of bytes > 0"):
            call(run.path, run.model, run.test_x, run.test_y, memory_budget=budget)


@pytest.fixture(scope="module")
def kinked_run(tmp_path_factory):
    return train(Case("mlp", "sgd_momentum", steps=4, n_train=8, act="relu", lr_scale=10.0), tmp_path_factory.mktemp("plan") / "h")


@pytest.mark.parametrize("keep", [("train", "test"), ("test", "output")])
def test_a_plan_split_by_its_budget_names_the_budget_of_one_pass(kinked_run, keep):
    """A tight budget can make a request of one pass hundreds (a trial: 600 passes, "4.2 h",
    against 1 pass and 23 s): the plan names the budget that runs it in one, and that budget does."""
    run = kinked_run
    whole = ex.plan(run.path, run.model, run.test_x, keep=keep, memory_budget=None)
    assert whole.passes == 1 and whole.one_pass_budget is None and "one pass" not in str(whole)
    half = ex.plan(run.path, run.model, run.test_x, keep=keep, memory_budget=None, test_chunk=len(run.test_x) // 2)
    tight = half.device_bytes + half.search_reserve
    split = ex.plan(run.path, run.model, run.test_x, keep=keep, memory_budget=tight)
    # more than the budget given, though it may be less than whole.device_bytes: a tight budget
    # takes each step's gradients alone (engine.GRADIENT_STEPS) before it splits a chunk
    assert split.passes > 1 and split.one_pass_budget > tight
    assert f"memory_budget={split.one_pass_budget:.3g}" in str(split) and f"instead of {split.passes}" in str(split)
    again = ex.plan(run.path, run.model, run.test_x, keep=keep, memory_budget=float(f"{split.one_pass_budget:.3g}"))
    assert again.passes == 1


def test_a_budget_rounds_up_to_three_significant_digits():
    """What the plan names as the budget of one pass: typed, it still holds the pass."""
    assert [planning.rounded_up(n) for n in (785000, 785001, 999, 1001, 57)] == [785000, 786000, 999, 1010, 57]
    assert f"{planning.rounded_up(785000 / 2**30):.3g}" == "0.000732"  # 0.000731084… GiB
    assert f"{planning.rounded_up(0.00125):.3g}" == "0.00125"


@pytest.mark.parametrize("budget", [float("inf"), 1e19, 1e300])
def test_a_budget_beyond_any_memory_is_no_limit(kinked_run, budget):
    """inf failed in int(), 1e19 in the kink search's row counts (beyond int64)."""
    cube = kinked_run.explain(keep=("train", "test"), memory_budget=budget)
    unbounded = kinked_run.explain(keep=("train", "test"), memory_budget=None)
    assert cube.attrs["kinks_located"] == unbounded.attrs["kinks_located"] > 0
    np.testing.assert_array_equal(cube.attribution.values, unbounded.attribution.values)


@pytest.mark.parametrize("tolerance", [float("nan"), "x", -1e-3, True])
def test_explain_refuses_a_tolerance_before_any_compute(run, tolerance, monkeypatch):
    monkeypatch.setattr(engine, "_run_chunks", lambda request: pytest.fail("computed before the refusal"))
    with pytest.raises(ex.InputError, match=r"tolerance=.* must be a number ≥ 0 \(None: no check\)"):
        run.explain(tolerance=tolerance)


def test_the_kink_search_is_costed_per_input(run, tmp_path):
    """A ReLU model's pass reserves the kink search's memory, counted by hand: per input its
    patterns at both ends of the segment (6 distances, their 6 derivatives and 3 outputs, in
    float64: 120 bytes) and its row of the pass computing them (4 patterns, and its 51
    parameters and their tangent: 1,296 bytes); plus one more row and one interval's round
    (40 patterns). The search may take what the budget leaves beyond the pass. A smooth model
    (tanh) has no search and reserves nothing."""
    args = (run.path, run.model, run.test_x, run.test_y)
    assert ex.plan(*args, memory_budget=None).device_bytes == ex.plan(*args, breakpoints=False,
                                                                      memory_budget=None).device_bytes
    relu = train(Case("mlp", "adamw", act="relu", steps=3, lr_scale=3.0, n_test=4), tmp_path / "h")
    args = (relu.path, relu.model, relu.test_x, relu.test_y)
    unbounded, plain = ex.plan(*args, memory_budget=None), ex.plan(*args, breakpoints=False, memory_budget=None)
    pattern, row = (6 + 6 + 3) * 8, 4 * 120 + 2 * 8 * 51
    reserve = 4 * (2 * pattern + row) + row + 40 * pattern
    assert unbounded.device_bytes - plain.device_bytes == unbounded.search_reserve == reserve
    assert "for the kink search; the search may take more, unbounded (no memory_budget)" in str(unbounded)
    budget = ex.plan(*args, memory_budget=unbounded.device_bytes + 2**20)
    assert budget.search_bytes == 2**20 and "the search may take up to 1 MiB more when it needs to (the rest of memory_budget)" in str(budget)


def test_the_kink_search_is_costed_for_the_outputs_output_fn_explains(tmp_path):
    """The ReLU model's search reserve above, with output_fn keeping 2 of its 3 outputs: a
    pattern of 6 distances, 6 derivatives and 2 outputs (112 bytes), counted by hand."""
    relu = train(Case("mlp", "adamw", act="relu", steps=3, lr_scale=3.0, n_test=4), tmp_path / "h")
    plan = ex.plan(relu.path, relu.model, relu.test_x, memory_budget=None, output_fn=lambda out: out[:, :2])
    pattern, row = (6 + 6 + 2) * 8, 4 * 112 + 2 * 8 * 51
    assert plan.search_reserve == 4 * (2 * pattern + row) + row + 40 * pattern


@pytest.mark.parametrize("kink_tolerance", [0.0, 1e-6])
def test_a_first_train_chunk_keeps_its_kink_pieces_within_what_the_budget_leaves(tmp_path, kink_tolerance):
    """With several train chunks, a test chunk's first pass keeps the kink search's pieces for the
    later ones, sized by hand: per step and input up to max_kinks + 1 = 17 pieces of 24 bytes
    (input index, lo, hi); with a kink tolerance up to 4 x 16 + 9 of them and the plain integral
    of 3 outputs (24 bytes); 3 steps of 4 inputs. They take at most a quarter of what the budget
    leaves beside the pass, and the search the rest. With one train chunk nothing is kept."""
    relu = train(Case("mlp", "adamw", act="relu", steps=3, lr_scale=3.0, n_test=4), tmp_path / "h")
    args = (relu.path, relu.model, relu.test_x, relu.test_y)
    options = dict(keep=("train", "test"), kink_tolerance=kink_tolerance)
    pieces = 3 * 4 * (24 * 17 if kink_tolerance == 0 else 24 * (4 * 16 + 9) + 24)
    one = ex.plan(*args, memory_budget=None, **options)
    unbounded = ex.plan(*args, memory_budget=None, train_chunk=4, **options)
    assert one.pieces_bytes is None and "pass keeps" not in str(one)
    assert unbounded.pieces_bytes is None and "a test chunk's first pass keeps what it finds for its later train " \
        "chunks" in str(unbounded)
    for spare, kept in ((2**20, pieces), (4 * pieces - 4, pieces - 1)):
        plan = ex.plan(*args, memory_budget=unbounded.device_bytes + spare, train_chunk=4, **options)
        assert (plan.pieces_bytes, plan.search_bytes) == (kept, spare - kept)
        assert f"keeps up to {engine.format_bytes(kept)} of what it finds" in str(plan)
    whole = ex.plan(*args, memory_budget=one.device_bytes + 2**20, **options)
    assert (whole.pieces_bytes, whole.search_bytes) == (0, 2**20) and "pass keeps" not in str(whole)


def test_the_calibration_times_a_later_train_chunk_with_the_pieces_the_first_found(tmp_path, monkeypatch):
    """As in explain, the calibration's later train chunk takes the kink search's pieces its first
    pass found: a run of 2 steps, timed twice as a first pass, is searched twice, and not as a
    later one (it was searched 4 times, so the later step's time held the search)."""
    relu = train(Case("mlp", "adamw", act="relu", steps=3, lr_scale=3.0, n_test=4), tmp_path / "h")
    searched, search = [], PathIntegral.search_steps
    monkeypatch.setattr(PathIntegral, "search_steps", lambda self, th, *a: searched.append(len(th))
                        or search(self, th, *a))
    plan = ex.plan(relu.path, relu.model, relu.test_x, relu.test_y, keep=("train", "test"), train_chunk=4,
                   calibrate_steps=2, memory_budget=None)
    assert plan.seconds_per_later_step is not None and searched == [2, 2]


def test_a_cube_without_a_train_dim_is_costed_as_the_forward_mode_pass_it_runs(run):
    """Without a train dim, φ is only taken along 2 × components + 2 tangents by forward mode;
    the pass holds no [rows, D] Jacobian (it was costed as if it did: 2.9 GiB planned against
    33 MiB measured for 400 inputs of an 85,002-parameter MLP). Counted by hand for the
    MLP 4 → 6 → 3 (51 parameters; a forward pass on one input makes 6 + 6 + 3 numbers), 4
    inputs × 3 outputs, 4 tensors kept as components: 10 tangents, float64."""
    request = engine.build_request(run.path, run.model, run.test_x, run.test_y, **engine.request_options("plan", 
        dict(keep=("component", "test", "output"), breakpoints=False)))
    assert request.activations == (6 + 6 + 3, 6, 4 * 6 + 6 * 3)  # all elements, the largest tensor, multiply-adds
    tangents, rows = 2 * 4 + 2, 4 * 3
    batch_backward = 4 * 15 * 3 // 2  # the batch gradient over a batch of 4
    forward = request.forward_mode  # measured (test_forward_mode_sizes_...), an eighth added
    elements = (tangents * 51 + 10 * 51 + 4 * (forward.base + tangents * forward.per_tangent) * 9 // 8
                + rows * tangents * 2 + 4 * rows * 2 + batch_backward)
    assert engine.pass_bytes(request, 4, 10, 4) == 8 * elements
    assert engine.pass_bytes(request, 4, 10, 2) == 8 * (elements - 2 * 15 * 3 // 2)  # a batch split in two
    with_train = ex.plan(run.path, run.model, run.test_x, run.test_y, keep=("component", "test", "output", "train"))
    assert with_train.device_bytes > 8 * elements


class ScoresOfAttention(nn.Module):
    """Self-attention of 2 heads over 5 positions of 4 features, queries scaled by a weight."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(4, dtype=torch.float64))

    def forward(self, x):  # [B, 2, 5, 4]
        return F.scaled_dot_product_attention(x * self.w, x, x).flatten(1)


def test_the_activations_count_what_ops_make_inside_composite_ones():
    """Attention's math kernel makes the [2, 5, 5] scores inside one call: the largest tensor is
    those 50 numbers, not the call's [2, 5, 4] result (the sizing missed them: a cube without a
    train dim of an encoder layer over 64 positions peaked 806 MiB against 469 MiB planned)."""
    model = ScoresOfAttention()
    flat = FlatModel(model, layout_of(model), torch.float64, "cpu")
    x = torch.randn(3, 2, 5, 4, dtype=torch.float64)
    total, largest, _ = flat.activation_sizes(x)
    assert largest == 2 * 5 * 5
    assert total >= 2 * (2 * 5 * 5) + 2 * 5 * 4 + 2 * 5 * 4  # scores, their softmax, scaled queries, result


def test_the_activations_count_a_passs_multiply_adds():
    """Linear(4, 6), Tanh, Linear(6, 3) on one input: 4 · 6 + 6 · 3 multiply-adds; a lookup makes
    its 2 · 3 numbers by none, and counts one an element it makes."""
    mlp = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    flat = FlatModel(mlp, layout_of(mlp), torch.float64, "cpu")
    assert flat.activation_sizes(torch.randn(5, 4, dtype=torch.float64)).multiply_adds == 4 * 6 + 6 * 3
    table = nn.Embedding(7, 3).double()
    flat = FlatModel(table, layout_of(table), torch.float64, "cpu")
    sizes = flat.activation_sizes(torch.randint(0, 7, (5, 2)))
    assert sizes.multiply_adds == sizes.total == 2 * 3


def test_forward_mode_pays_where_its_estimate_is_below_the_materialised_gradients():
    """By hand: per tangent and sample 8 · 1,000 elements + 2 · 2,000 multiply-adds = 12,000, so
    over 1,000 samples of a model of 10,000 parameters forward mode costs 5·10^8 + 1.2·10^7 T
    against 10^7 · (250 + T) for the materialised gradients: it pays below T = 1,000. Over 10
    samples its fixed cost alone is more than the gradients'; with 10^6 parameters the
    contraction costs more than a jvp per tangent, so it pays for any T."""
    sizes = ActivationSizes(total=1000, largest=10, multiply_adds=2000)
    assert forward_mode_pays(sizes, 10_000, 999, 1000)
    assert not forward_mode_pays(sizes, 10_000, 1000, 1000)
    assert not forward_mode_pays(sizes, 10_000, 1, 10)
    assert all(forward_mode_pays(sizes, 10**6, tangents, 1000) for tangents in (1, 1000, 10**6))


def test_the_peak_counts_only_the_tensors_alive_at_once():
    """Four ops make 10 numbers each and the one before is freed once the next is made: 40 made in
    all, the largest 10, at most 20 alive at once (the input, made before, is not counted)."""
    x = torch.ones(10, dtype=torch.float64)
    mode = _OutputSizes()
    with mode:
        b = x * 2
        c = b + 1
        del b
        d = c * 3
        del c
        e = d + 1  # noqa: F841 (alive to the end, with d)
    assert (mode.total, mode.largest, mode.peak, mode.live) == (40, 10, 20, 20)


def test_forward_mode_sizes_grow_by_the_same_part_for_every_tangent():
    """The plan takes a forward-mode pass with V tangents to hold base + V · per_tangent, read
    from passes with 3 and 4 tangents; passes with 5 and 8 hold exactly that (a ReLU MLP and an
    attention model, at θ = 0 as sized), and each tangent holds at least the output's tangent."""
    for model, x in ((nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3)).double(), torch.randn(2, 4)),
                     (ScoresOfAttention(), torch.randn(2, 2, 5, 4))):
        flat = FlatModel(model, layout_of(model), torch.float64, "cpu")
        x = x.double()
        base, per_tangent = flat.forward_mode_sizes(x)
        theta = torch.zeros(flat.layout.dim, dtype=torch.float64)
        for n in (5, 8):
            tangents, mode = torch.ones(n, flat.layout.dim, dtype=torch.float64), _OutputSizes()
            with torch.no_grad(), mode:
                vmap(lambda v: jvp(lambda th: flat.raw(th, x[:1]), (theta,), (v,))[1])(tangents)
            assert mode.peak == base + n * per_tangent
        assert per_tangent >= flat.raw(theta, x[:1]).numel()


def test_a_cube_with_a_train_dim_counts_the_activations_of_its_passes(run):
    """The per-sample gradients and the path Jacobians are reverse passes: their saved
    activations count (they did not: ResNet9 width 4 with batches of 256 images peaked 173 MiB
    above the start against 41 MiB planned). Counted by hand for the forward walk of the MLP
    4 → 6 → 3 (51 parameters; 15 activations per input, 6 the largest), 4 inputs × 3 outputs,
    10 training samples in batches of 4, float64."""
    request = engine.build_request(run.path, run.model, run.test_x, run.test_y, **engine.request_options("plan", 
        dict(keep=("train", "test", "output"), breakpoints=False)))
    d, rows, train, batch = 51, 4 * 3, 10, 4
    assert not engine.walks_backwards(request, rows, train)  # 12 rows > 10 samples
    elements = (10 * d + rows * d * 4 + train * d * 2  # step vectors, φ and copies, momentum buffer
                + batch * d * 3 + batch * 15 * 3 // 2  # per-sample gradients, a batch's backward pass
                + rows * train  # the cube
                + rows * d * 2 + 4 * 2 * (15 + 3 * 6))  # a node's Jacobians, the reverse pass over 4 inputs
    assert engine.pass_bytes(request, 4, 10, batch) == 8 * elements
    # the per-sample gradients [4, D] are held whole; the backward passes run over parts of 3
    assert engine.pass_bytes(request, 4, 10, 3) == 8 * (elements - batch * 15 * 3 // 2 + 3 * 15 * 3 // 2)


def test_a_backward_walk_by_forward_mode_counts_each_effects_tangents(tmp_path, monkeypatch):
    """A backward walk whose carried effects forward mode takes through the batch
    (forward_mode_pays) holds a primal and a tangent per effect of every activation, counted as 3
    of the largest, or its update check's group of batch gradients; else the materialised
    gradients. Full batches of 10."""
    case = train(Case("mlp", "sgd_momentum", steps=2, n_train=10, batch=10, n_test=4), tmp_path / "h")
    request = engine.build_request(case.path, case.model, case.test_x, case.test_y, **engine.request_options("plan", 
        dict(keep=("train",), outputs="true", breakpoints=False)))
    backward_pass = 10 * 15 * 3 // 2
    materialised = 10 * 51 * 3 + backward_pass
    assert not engine.forward_mode_pays(request.activations, 51, 1, 10)  # a model this small: never
    assert engine._sample_pass_elements(request, 1, 1, 10, 10) == materialised
    monkeypatch.setattr(engine, "forward_mode_pays", lambda sizes, dim, tangents, batch: tangents <= 2)
    assert engine._sample_pass_elements(request, 1, 1, 10, 10) == materialised  # more than the tangents
    request.__dict__["activations"] = request.activations._replace(largest=1000)  # a wide layer
    assert engine._sample_pass_elements(request, 1, 1, 10, 10) == (1 + 1) * 10 * 1000 * 3 + backward_pass
    assert engine._sample_pass_elements(request, 2, 1, 10, 10) == (2 + 1) * 10 * 1000 * 3 + backward_pass
    # the batch split in parts of 4: the tangents and the backward pass go through 4 samples at once
    assert engine._sample_pass_elements(request, 1, 1, 10, 4) == (1 + 1) * 4 * 1000 * 3 + 4 * 15 * 3 // 2
    assert engine._sample_pass_elements(request, 3, 1, 10, 10) == materialised  # 3 tangents: materialised
    # the update check before the walk takes the batch gradients of 4 steps by one call: where a
    # backward pass saves 1,000 numbers a sample, its 4 backward passes and gradients are the most
    request.__dict__["activations"] = request.activations._replace(total=1000, largest=1)
    request.gradient_steps = 4
    assert engine._sample_pass_elements(request, 1, 1, 10, 10) == 4 * (10 * 1000 * 3 // 2 + 51)


def test_sample_parts_split_a_batch_as_asked_and_refuse_parts_without_a_sample():
    """rows=0 was read as 1 (a backward pass per sample, without a word): the entries refuse a chunk
    below 1 (test_refusals), and so does the splitting itself, for the FlatModel methods' callers."""
    from explaind.functional import sample_parts

    assert sample_parts(5, 2) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert sample_parts(5, None) == sample_parts(5, 9) == [slice(0, 5)]
    assert sample_parts(0, None) == sample_parts(0, 3) == [slice(0, 0)]
    assert sample_parts(3, 1) == [slice(0, 1), slice(1, 2), slice(2, 3)]  # a backward pass per sample
    for rows in (0, -3):
        with pytest.raises(ex.InputError, match=rf"rows={rows} must be a whole number ≥ 1 \(None: the whole batch"):
            sample_parts(5, rows)


def test_a_budget_beyond_a_gpus_free_memory_plans_for_the_free_memory(run, monkeypatch):
    """On CUDA the chunks are planned for at most what the device has free (mem_get_info's free
    bytes and the blocks this process's allocator holds unused): a larger budget planned passes
    that stop out of memory once computing. No GPU here: the request's device is named cuda and
    torch.cuda's memory functions are faked, reporting half a one-pass plan free."""
    def planned(budget, device):
        request = engine.build_request(run.path, run.model, run.test_x, run.test_y,
                                       **engine.request_options("plan", {"keep": ("train", "test")}))
        engine.pass_bytes(request, 1, 1, 1)  # sizes the model's passes here, before its device is renamed
        request.flat.device = torch.device(device)
        engine.plan_chunks(request, budget)
        return request.test_chunk, request.train_chunk, request.batch_chunk, request.path.search_bytes

    one_pass = ex.plan(run.path, run.model, run.test_x, run.test_y, keep=("train", "test"), memory_budget=None)
    free, unused_cached = one_pass.device_bytes // 2 - 4096, 4096
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 10 * 2**20 + unused_cached)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 10 * 2**20)
    with pytest.warns(UserWarning, match=r"memory_budget=1e\+12 \(931 GiB\) is more than cuda has free "
                                         r"\(.*\): the chunks are planned for"):
        capped = planned(1e12, "cuda")
    assert capped == planned(free + unused_cached, "cpu") != planned(1e12, "cpu")
    with warnings.catch_warnings():  # a budget within the free memory is the budget
        warnings.simplefilter("error")
        assert planned(free, "cuda") == planned(free, "cpu")
    free = 1000  # less than any pass: a larger budget would not help
    with pytest.warns(UserWarning), pytest.raises(ex.InputError, match=r"one pass needs .* or more free memory on cuda "
                                                                 r"\(at least memory_budget=\S+ \(.+\)\)$"):
        planned(1e12, "cuda")
    # the budget was the limit
    with pytest.raises(ex.InputError, match=r"one pass needs .* or a budget of at least memory_budget="):
        planned(1000, "cpu")


@pytest.mark.parametrize("backwards", [False, True])
def test_steps_gradients_are_taken_together_only_where_the_budget_has_room_for_the_group(run, backwards, monkeypatch):
    """Either walk's per-sample gradients of engine.GRADIENT_STEPS steps at once hold a group's
    gradients and backward passes: a pass counts them (pass_bytes), a budget without room for them
    takes the steps one at a time before it splits any chunk, and a batch split into parts takes
    them one at a time too. All 3 outputs of the 4 inputs kept: 12 rows, more than the 10
    samples, so the pass walks forward; the true class alone: 4 rows walk backwards, their
    effects contracted with the materialised gradients (forward mode does not pay over 4 samples),
    with BACKWARD_MEMORY_RATIO 1."""
    monkeypatch.setattr(engine, "BACKWARD_MEMORY_RATIO", 1)
    keep, outputs = (("train", "test"), "true") if backwards else (("train", "test", "output"), "all")

    def planned(budget, **options):
        request = engine.build_request(run.path, run.model, run.test_x, run.test_y, **engine.request_options(
            "plan", dict(keep=keep, outputs=outputs, **options)))
        engine.plan_chunks(request, budget)
        return request

    together = planned(None)
    assert engine.walks_backwards(together, 4 if backwards else 12, 10) == backwards
    assert not backwards or engine.contracts_sample_gradients(together, 4)
    assert (together.gradient_steps, together.test_chunk, together.train_chunk, together.batch_chunk) == \
        (engine.GRADIENT_STEPS, 4, 10, 4)
    one_at_a_time = engine.pass_bytes(dataclasses.replace(together, gradient_steps=1), 4, 10, 4)
    # a step's gradients of its batch of 4, their copies, and its backward pass, in float64
    group = 4 * together.flat.layout.dim * 3 + engine._batch_backward_elements(together, 4)
    assert engine.pass_bytes(together, 4, 10, 4) - one_at_a_time == (engine.GRADIENT_STEPS - 1) * group * 8
    tight = planned(one_at_a_time)
    assert (tight.gradient_steps, tight.test_chunk, tight.train_chunk, tight.batch_chunk) == (1, 4, 10, 4)
    assert planned(None, batch_chunk=2).gradient_steps == 1
