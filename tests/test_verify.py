"""verify_updates (DESIGN §2, check 1) against the rounding the stored parameters allow."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import explaind as ex
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
    fixed float64 tolerance (1e-10), within 4 ε max |θ| / max |Δθ_s|, computed here from the
    history's own parameters."""
    model = record(tmp_path / "h")
    residuals = ex.verify_updates(tmp_path / "h", model)
    history = ex.History(tmp_path / "h")
    theta = [history.flat_params(s).double() for s in range(history.n_steps + 1)]
    for s, residual in enumerate(residuals):
        largest = max(theta[s].abs().max(), theta[s + 1].abs().max())
        floor = 4 * torch.finfo(torch.float64).eps * largest / (theta[s + 1] - theta[s]).abs().max()
        assert residual <= floor
    assert residuals[:2].max() < 1e-13 and residuals[-1] > 1e-10


def test_a_real_mismatch_at_a_small_learning_rate_still_fails(tmp_path):
    """Undeclared clipping at lr 1e-6 misses far more than the rounding allows."""
    model = record(tmp_path / "h", clip_from=9)
    with pytest.raises(ex.ReconstructionError, match="step 9's recorded update.*rounding of the stored parameters"):
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
