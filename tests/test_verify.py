"""verify_updates (docs/method.md §1, check 1) against the rounding the stored parameters allow."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import explaind as ex
from explaind.quadrature import nodes
from explaind.verify import reconstruct, restricted, with_refined
from engine_cases import Case, make_data


def record(path, steps: int = 12, clip_from: int | None = None) -> torch.nn.Module:
    """A float64 AdamW run whose StepLR shrinks the learning rate tenfold every 2 steps (1e-2
    to 1e-7); from step `clip_from` on the gradients are clipped, which the run does not declare."""
    model = Case("mlp").fresh_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, 2)
    x, y, _, _ = make_data("mlp", 16, 0, 0)
    with ex.Recorder(path, model, optimizer, check_every=10**6) as rec:
        for s in range(steps):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            if clip_from is not None and s >= clip_from:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
            rec.batch(torch.arange(len(x)), x, y)
            optimizer.step()
            schedule.step()
    return model


def test_a_decayed_learning_rate_is_not_mistaken_for_a_mismatch(tmp_path):
    """At lr 1e-7 the rounding of the stored θ_{s+1} alone is ~1e-9 of the update: above the
    fixed float64 tolerance (1e-10), within 4 ε max |θ| / max |Δθ_s|, both divided by AdamW's
    preconditioner P = 1/(√(v/(1 − β2^t)) + ε), computed here from the history's own records."""
    model = record(tmp_path / "h")
    residuals = ex.verify_updates(tmp_path / "h", model)
    history = ex.History(tmp_path / "h")
    floors = []
    for rec, residual in zip(history.steps(), residuals):
        theta, after = (history.layout.flatten(p).double() for p in (rec.before, rec.after))
        group = rec.groups[0]
        beta2 = group["betas"][1]
        v = history.layout.flatten(rec.second_moment).double()
        precond = 1 / ((v / (1 - beta2 ** group["t"])).sqrt() + group["eps"])
        largest = (torch.maximum(theta.abs(), after.abs()) / precond).max()
        floors.append(float(4 * torch.finfo(torch.float64).eps * largest / ((after - theta) / precond).abs().max()))
        assert residual <= floors[-1]
    assert residuals[:2].max() < 1e-13 and residuals[-1] > 1e-10
    assert floors[-1] > 1e4 * floors[0]  # it grows as the schedule shrinks the updates

    # the cube stores both, from the pass over the steps and from the replay of a window's momentum
    x, y, _, _ = make_data("mlp", 16, 0, 0)
    whole = ex.explain(tmp_path / "h", model, x[:2], y[:2], keep=("step",), progress=False, tolerance=None)
    window = ex.explain(tmp_path / "h", model, x[:2], y[:2], keep=("train",), steps=(4, 12), progress=False,
                        tolerance=None)
    np.testing.assert_allclose(whole["update_rounding_floor"].values, floors, rtol=1e-9)
    np.testing.assert_allclose(whole["update_residual"].values, residuals, rtol=1e-6, atol=1e-15)
    np.testing.assert_allclose(window["update_rounding_floor"].values, [np.nan] * 4 + floors[4:], rtol=1e-9)
    for keep, steps in ((("step",), None), (("step",), (4, 12)), (("train",), (4, 12))):  # both passes, windows
        unchecked = ex.explain(tmp_path / "h", model, x[:2], y[:2], keep=keep, steps=steps, progress=False,
                               check_updates=False, tolerance=None)
        for name in ("update_residual", "update_rounding_floor"):  # not checked anywhere: no step is 0
            assert np.isnan(unchecked[name].values).all(), (keep, steps, name)


def test_a_step_at_learning_rate_0_moves_nothing_and_allows_any_miss(tmp_path):
    """A warm-up from 0: step 0 moves no parameter, so its update residual is 0 and its floor
    inf (it was 4ε max|θ| over the smallest float, ~1e290); the other steps' are finite."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    x, y, _, _ = make_data("mlp", 8, 0, 0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: s / 3)
    with ex.Recorder(tmp_path / "h", model, optimizer, scheduler=scheduler) as rec:
        for _ in range(3):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            rec.batch(torch.arange(len(x)), x, y)
            optimizer.step()
            scheduler.step()
    cube = ex.explain(tmp_path / "h", model, x[:2], progress=False)
    floor, residual = cube["update_rounding_floor"].values, cube["update_residual"].values
    assert floor[0] == np.inf and residual[0] == 0 and np.isfinite(floor[1:]).all() and residual[1:].max() < 1e-12
    checked = ex.verify_updates(tmp_path / "h", model)
    assert checked[0] == 0 and checked[1:].max() < 1e-12


def test_a_real_mismatch_at_a_small_learning_rate_still_fails(tmp_path):
    """Undeclared clipping at lr 1e-6 misses far more than the rounding allows."""
    model = record(tmp_path / "h", clip_from=9)
    with pytest.raises(ex.ReconstructionError, match="step 9's recorded update.*rounding of the stored parameters"):
        ex.verify_updates(tmp_path / "h", model)


def test_a_mismatch_is_named_where_it_starts(tmp_path):
    """Clipped from step 4 on: the error names step 4, counts the failing steps and names the one
    furthest above its bound, which the cube's update_residual confirms."""
    model = record(tmp_path / "h", steps=8, clip_from=4)
    cube = ex.explain(tmp_path / "h", model, make_data("mlp", 16, 0, 0)[0][:1], keep=(), progress=False,
                      tolerance=None, breakpoints=False)
    allowed = np.maximum(1e-10, cube["update_rounding_floor"].values)
    above = cube["update_residual"].values / allowed
    assert above[:4].max() <= 1 and above[4:].min() > 1
    worst = int(above.argmax())
    with pytest.raises(ex.ReconstructionError, match=rf"step 4's recorded update.*the first of 4 of 8 steps that do; "
                                                     rf"the furthest above, step {worst}'s"):
        ex.verify_updates(tmp_path / "h", model)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("verify") / "h"
    model = record(path, steps=2)
    return path, model, make_data("mlp", 16, 0, 0)[0][:3]


def test_reconstruct_refuses_zero_inputs(short_run):
    path, model, x = short_run
    with pytest.raises(ex.InputError, match=r"shape \(0, .*at least one input"):
        reconstruct(path, model, x[:0], progress=False)


def test_restricted_and_with_refined_refuse_tests_they_cannot_select(short_run):
    path, model, x = short_run
    rec = reconstruct(path, model, x, progress=False)
    for tests in ([], [99]):
        with pytest.raises(ex.InputError, match=r"non-empty list of the reconstruction's test labels.*\[0, 1, 2\]"):
            restricted(rec, tests)
    with pytest.raises(ex.InputError, match=r"tests=\[5\] must be a list of positions 0 … 2"):
        with_refined(rec, restricted(rec, [0]), [5])


def record_raised_gradient(path, raise_by: float) -> torch.nn.Module:
    """Two float64 SGD steps; step 0's first gradient entry is raised by `raise_by` (undeclared)."""
    model = Case("mlp").fresh_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y, _, _ = make_data("mlp", 16, 0, 0)
    with ex.Recorder(path, model, optimizer, check_every=10**6) as rec:
        for s in range(2):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            if s == 0:
                next(model.parameters()).grad.view(-1)[0] += raise_by
            rec.batch(torch.arange(len(x)), x, y)
            optimizer.step()
    return model


def test_tolerance_zero_allows_only_the_rounding_and_nonsense_tolerances_are_refused(tmp_path):
    """README: a step fails when it misses by more than `tolerance` and by more than the rounding
    allows. A gradient entry raised by 1e-12 at step 0 of a float64 SGD run (undeclared) misses by
    ~1e-11 of the update: within the default (1e-10), beyond the rounding floor, so tolerance=0
    must catch it (it used to be read as "unset"); a NaN tolerance used to pass every step."""
    model = record_raised_gradient(tmp_path / "h", 1e-12)
    residuals = ex.verify_updates(tmp_path / "h", model)
    history = ex.History(tmp_path / "h")
    theta = [history.layout.flatten(history.params(s)).double() for s in (0, 1)]
    change = (theta[1] - theta[0]).abs().max()
    floor = float(4 * torch.finfo(torch.float64).eps * max(theta[0].abs().max(), theta[1].abs().max()) / change)
    assert float(residuals[0]) == pytest.approx(0.1 * 1e-12 / float(change), rel=0.05)
    assert floor < residuals[0] < 1e-10 and residuals[1] < floor
    with pytest.raises(ex.ReconstructionError, match=rf"step 0's recorded update .* \(tolerance 0e\+00; the rounding "
                                                     rf"of the stored parameters allows {floor:.0e} there\)"):
        ex.verify_updates(tmp_path / "h", model, tolerance=0)
    # the bound is the floor itself, not a multiple of it: 1.5 floors are refused, 0.7 of one passes
    for times in (1.5, 0.7):
        model = record_raised_gradient(tmp_path / f"h{times}", 1e-12 * times * floor / residuals[0])
        if times > 1:
            with pytest.raises(ex.ReconstructionError, match="step 0's recorded update"):
                ex.verify_updates(tmp_path / f"h{times}", model, tolerance=0)
        else:
            assert ex.verify_updates(tmp_path / f"h{times}", model, tolerance=0)[0] < floor
    for bad in (float("nan"), -1e-3, "1e-3", True):
        with pytest.raises(ex.InputError, match=rf"tolerance={bad!r} must be a number ≥ 0 \(None: 1e-10"):
            ex.verify_updates(tmp_path / "h", model, tolerance=bad)
    with pytest.raises(ex.InputError, match=r"dtype=torch.float16 is not supported"):
        ex.verify_updates(tmp_path / "h", model, dtype=torch.float16)


def test_explain_stops_only_at_a_miss_beyond_both_bounds(tmp_path):
    """explain(tolerance=...) stops at a step whose update misses by more than 1e-3 of the update
    and by more than 100 rounding floors, both. A gradient entry raised by 1e-10 (within the
    Recorder's gradient check) misses by 4e-10, far above 100 floors and far below 1e-3: the run
    is explained, its miss kept in update_residual."""
    model = record_raised_gradient(tmp_path / "h", 1e-10)
    cube = ex.explain(tmp_path / "h", model, make_data("mlp", 16, 3, 0)[2], keep=("test", "output"), progress=False)
    residual, floor = cube["update_residual"].values[0], cube["update_rounding_floor"].values[0]
    assert 100 * floor < residual < 1e-6 and cube.attrs["relative_residual"] <= 1e-4


def test_reconstruct_refuses_settings_it_would_mislabel_or_crash_on(short_run):
    """An unknown target was computed as logits and labelled with the unknown name; float16 ran
    silently; batch_size 0 and True nodes failed inside torch or were taken as 1."""
    path, model, x = short_run
    for kwargs, message in [
        (dict(target="prob"), r"unknown target 'prob': use one of \('log_prob', 'logit'\)"),
        (dict(dtype=torch.float16), r"dtype=torch.float16 is not supported: pass torch.float64"),
        (dict(batch_size=0), r"batch_size=0 must be a whole number ≥ 1"),
        (dict(max_kinks=-1), r"max_kinks=-1 must be a whole number ≥ 0"),
        (dict(quadrature=True), r"positive integer, got True"),
    ]:
        with pytest.raises(ex.InputError, match=message):
            reconstruct(path, model, x, progress=False, **kwargs)
    for rule in ("gauss", "midpoint"):
        with pytest.raises(ex.InputError, match=r"positive integer, got True"):
            nodes(True, rule)


def test_with_refined_refuses_masks_fractions_repeats_and_another_target(short_run):
    path, model, x = short_run
    rec = reconstruct(path, model, x, quadrature=1, progress=False)
    refined = reconstruct(path, model, x[[0, 2]], quadrature=6, progress=False)
    mixed = with_refined(rec, refined, np.array([0, 2]))
    np.testing.assert_array_equal(mixed["residual"].values[[0, 2]], refined["residual"].values)
    np.testing.assert_array_equal(mixed["residual"].values[1], rec["residual"].values[1])
    positions = r"must be a list of positions 0 … 2 of the reconstruction's inputs, integers, each once"
    # a mask read as positions 1, 0, 1; 2.7 truncated to 2 (and accepted)
    for tests in (np.array([True, False, True]), [0.0, 2.7]):
        with pytest.raises(ex.InputError, match=positions + r".*np.flatnonzero\(mask\)"):
            with_refined(rec, refined, tests)
    with pytest.raises(ex.InputError, match=r"tests=\[0, 0\] " + positions):
        with_refined(rec, reconstruct(path, model, x[[0, 0]], progress=False), [0, 0])
    logits = reconstruct(path, model, x[[0, 2]], target="logit", progress=False)
    with pytest.raises(ex.InputError, match=r"explains target='logit', the reconstruction target='log_prob'"):
        with_refined(rec, logits, [0, 2])


@pytest.mark.parametrize("momenta, dampening, nesterov", [
    ((0.9, 0.45, 0.0, 0.0, 0.9, 0.9), 0.3, False),  # a cyclic schedule reaching 0: the buffer waits
    ((0.0, 0.0, 0.9, 0.9, 0.9, 0.9), 0.5, False),  # momentum from step 2: its first step is undampened
    ((0.9,) * 6, 0.2, True),  # nesterov with dampening, set after construction (torch runs it)
])
def test_sgd_momentum_changed_mid_run_is_modelled_as_torch_steps(tmp_path, momenta, dampening, nesterov):
    """PyTorch's SGD leaves its momentum buffer untouched at a step with momentum 0 and creates
    it, copying the direction undampened, at the first step with momentum ≠ 0: the recorded
    θ (torch's own steps) must be reproduced to rounding, and the explained change add up."""
    model, test_x, test_y = record_momentum_schedule(tmp_path / "h", momenta, dampening, nesterov)
    residuals = ex.verify_updates(tmp_path / "h", model, tolerance=None)
    assert residuals.max() <= 1e-12
    cube = ex.explain(tmp_path / "h", model, test_x, test_y, keep=("step", "train"), progress=False)
    assert cube.attrs["relative_residual"] <= 1e-9


def record_momentum_schedule(path, momenta, dampening: float = 0.0, nesterov: bool = False):
    """An SGD run whose momentum follows `momenta` step by step: (model, test inputs, targets)."""
    model = Case("mlp").fresh_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    optimizer.param_groups[0].update(dampening=dampening, nesterov=nesterov)
    x, y, test_x, test_y = make_data("mlp", 12, 3, 0)
    with ex.Recorder(path, model, optimizer, check_every=1) as rec:
        for s, momentum in enumerate(momenta):
            optimizer.param_groups[0]["momentum"] = momentum
            optimizer.zero_grad()
            rows = torch.arange(4 * (s % 3), 4 * (s % 3) + 4)
            F.cross_entropy(model(x[rows]), y[rows]).backward()
            rec.batch(rows, x[rows], y[rows])
            optimizer.step()
    return model, test_x, test_y


def test_a_window_after_steps_without_momentum_replays_from_where_the_buffer_shows(tmp_path):
    """Steps 2 and 3 ran with momentum 0, so their updates do not show the buffer that step 4
    continues: a replay from step 3 or 4 starts at step 2, after the last update that shows it."""
    model, test_x, test_y = record_momentum_schedule(tmp_path / "h", (0.9, 0.9, 0.0, 0.0, 0.9, 0.9))
    for replay in (0, 1):  # the buffer solved from step 3's update was 0: relative residual 0.50
        window = ex.explain(tmp_path / "h", model, test_x, test_y, keep=("step", "train"), steps=(4, 6),
                            replay=replay, progress=False, tolerance=None)
        assert window.attrs["replay_start"] == 2 and window.attrs["relative_residual"] <= 1e-9


def test_analyses_that_trust_the_updates_check_each_history_once(tmp_path, monkeypatch):
    """The influence and grokking analyses explain with check_updates=False (no gradient
    recomputed): they check the history's updates first, once per history and process, and a
    history whose updates miss is refused there, again at every call (a gradient raised by 3e-11
    at step 0: within the Recorder's gradient check, beyond verify's 1e-10 of the update)."""
    from explaind import grokking, verify

    good, bad = record_raised_gradient(tmp_path / "good", 0.0), record_raised_gradient(tmp_path / "bad", 3e-11)
    calls = []
    check = verify.verify_updates
    monkeypatch.setattr(verify, "verify_updates", lambda history, *args, **kw: calls.append(1) or check(history, *args, **kw))
    monkeypatch.setattr(verify, "_CHECKED", set())
    for _ in range(2):
        verify.check_updates_once(ex.History(tmp_path / "good"), good)
    assert len(calls) == 1
    x = make_data("mlp", 16, 0, 0)[0][:2]
    for _ in range(2):  # refused before it explains anything, each time
        with pytest.raises(ex.ReconstructionError, match="step 0's recorded update"):
            grokking.component_attribution(ex.History(tmp_path / "bad"), bad, {"x": (x, torch.zeros(2, dtype=torch.long))},
                                           np.array([0, 2]))
    assert len(calls) == 3


def test_analyses_that_trust_the_updates_check_a_custom_loss_history_with_its_loss(tmp_path, monkeypatch):
    """A history recorded with a custom loss reached the grokking analyses, which pass their explain
    options on, but their update check took no loss and refused it ("pass the same per-sample
    function as loss=...") though the call had passed it. The check takes it, and a check passed
    with one loss does not stand for another: twice the loss doubles every gradient, a miss of
    the update's whole size."""
    from explaind import grokking, verify

    def loss(out, target):
        return F.cross_entropy(out, target, reduction="none")

    def doubled(out, target):
        return 2 * F.cross_entropy(out, target, reduction="none")

    model = Case("mlp").fresh_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y, _, _ = make_data("mlp", 16, 0, 0)
    with ex.Recorder(tmp_path / "h", model, optimizer, loss=loss, check_every=10**6) as rec:
        for _ in range(3):
            optimizer.zero_grad()
            loss(model(x), y).mean().backward()
            rec.batch(torch.arange(len(x)), x, y)
            optimizer.step()
    monkeypatch.setattr(verify, "_CHECKED", set())
    history = ex.History(tmp_path / "h")
    cube = grokking.data_attribution(history, model, x[:2], y[:2], [(0, 3)], loss=loss, progress=False)
    direct = ex.explain(history, model, x[:2], y[:2], keep=("train", "test"), outputs="true", loss=loss,
                        progress=False)
    np.testing.assert_allclose(cube["attribution"].sel(step=0).values, direct["attribution"].values, rtol=1e-12)
    with pytest.raises(ex.ReconstructionError, match=r"step 0's recorded update differs .* by 1\.00e\+00 of its size"):
        verify.check_updates_once(history, model, loss=doubled)
