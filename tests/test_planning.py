"""The cost plan of an explain() request: chunk sizes, memory, disk and time, before computing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import explaind as ex
from engine_cases import Case, train
from explaind import engine


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
    monkeypatch.setattr(engine._Pass, "_forward", lambda self, records: passes.append("forward") or list(records))
    monkeypatch.setattr(engine._Pass, "_backward", lambda self, records: passes.append("backward") or list(records))
    cube = run.explain(keep=("train", "test", "output"), quadrature=2, test_chunk=3, train_chunk=4, tolerance=None)
    assert len(passes) == plan.passes and passes[0] == plan.direction  # chunks may differ: last ones are smaller
    assert cube["attribution"].values.nbytes == plan.cube_bytes


def test_the_pass_direction_follows_the_kept_sizes(run):
    one_row = ex.plan(run.path, run.model, run.test_x, run.test_y, keep=("train",), outputs="true")
    every_row = ex.plan(run.path, run.model, run.test_x, run.test_y, keep=("train", "test", "output"))
    assert one_row.direction == "backward"  # 1 carried row < 10 training samples
    assert every_row.direction == "forward"  # 12 rows > 10 samples: the momentum buffer is smaller
    assert every_row.device_bytes > one_row.device_bytes


def test_calibration_extrapolates_to_every_step_of_every_pass(run):
    plan = ex.plan(run.path, run.model, run.test_x, run.test_y, keep=("train", "test"), test_chunk=2,
                   calibrate_steps=3)
    assert plan.seconds_per_step > 0
    assert plan.seconds == pytest.approx(plan.seconds_per_step * plan.passes * plan.n_steps)
    assert "ms per step" in str(plan)


def test_a_request_over_budget_is_refused_with_the_fixes(run):
    with pytest.raises(ex.InputError, match="(?s)memory_budget.*outputs='true'.*step_bins.*gradient"):
        ex.plan(run.path, run.model, run.test_x, run.test_y, memory_budget=1000)


def test_plan_refuses_arguments_explain_does_not_take(run):
    with pytest.raises(TypeError, match="quadratur"):
        ex.plan(run.path, run.model, run.test_x, run.test_y, quadratur=3)


def test_forward_mode_sample_effects_equal_per_sample_gradients(run):
    """The backward pass's two routes to effect · ∇ℓ_k agree (float64, 1e-12)."""
    history = ex.History(run.path)
    flat = engine.FlatModel(run.model, history.layout, torch.float64, "cpu", history.constants())
    theta = flat.layout.flatten(history.params(2))
    rec = next(history.steps(2, 3))
    _, loss = engine.resolve_loss("cross_entropy")
    tangents = torch.randn(3, flat.layout.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
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


def test_explain_prints_its_plan_before_computing(run, capsys):
    run.explain(keep=("test",), quadrature=2, progress=True, tolerance=None)
    printed = capsys.readouterr()
    assert "passes" in printed.out + printed.err and "history" in printed.out + printed.err


def test_plan_counts_the_parameter_scores(run):
    options = dict(keep=("test", "output"), parameter_scores=True, quadrature=2)
    plan = ex.plan(run.path, run.model, run.test_x, run.test_y, **options)
    cube = run.explain(tolerance=None, **options)
    scores = sum(cube[name].values.nbytes for name in ("parameter_score", "parameter_score_signed",
                                                         "parameter_score_stepwise_abs"))
    assert plan.cube_bytes == cube["attribution"].values.nbytes + scores + cube["parameter_tensor"].values.nbytes
    assert plan.host_bytes >= 2 * plan.cube_bytes
