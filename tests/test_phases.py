"""explaind.phases: the seconds of each phase of the calls in a timed block, each without the
phases nested in it."""

from __future__ import annotations

import time

import pytest

from explaind import phases
from explaind.phases import (CONTRACTION, EXPLAIN, FORWARD_MODE, KINK_SEARCH, PER_ROW_JACOBIANS, RECONSTRUCT,
                             SAMPLE_GRADIENTS, SHARED_NODE_JACOBIANS, phase, timed)
from explaind.verify import reconstruct
from engine_cases import Case, train


def test_each_phase_counts_without_the_phases_nested_in_it(monkeypatch):
    """On a clock the test moves: explain takes 1 + 2 s of its own around two searches of 3 s,
    the second of which fails; calls outside the block count for nothing."""
    now = [0.0]
    monkeypatch.setattr(phases, "perf_counter", lambda: now[0])

    @phase(KINK_SEARCH)
    def search(fail: bool) -> None:
        now[0] += 3.0
        if fail:
            raise ValueError("a search that fails")

    @phase(EXPLAIN)
    def explain() -> None:
        now[0] += 1.0
        search(False)
        now[0] += 2.0
        with pytest.raises(ValueError):
            search(True)

    explain()
    with timed() as seconds:
        explain()
        assert seconds == {EXPLAIN: 3.0, KINK_SEARCH: 6.0}
    explain()
    assert seconds == {EXPLAIN: 3.0, KINK_SEARCH: 6.0}


@pytest.mark.parametrize("call", ["explain", "reconstruct"])
def test_a_timed_call_splits_into_its_phases(tmp_path, call):
    """A ReLU MLP's run, explained with its kinks located (3, on some steps only, so both kinds of
    Jacobian pass run): every phase of the call shows, each took some time, and together they
    took no longer than the call."""
    run = train(Case("mlp", "adamw", act="relu", steps=6, lr_scale=3.0), tmp_path / "h")
    start = time.perf_counter()
    with timed() as seconds:
        if call == "explain":
            cube = run.explain(keep=("component", "train", "test", "output"))
        else:
            cube = reconstruct(run.path, run.model, run.test_x, progress=False)
    wall = time.perf_counter() - start
    assert cube.attrs["kinks_located"] == 3
    if call == "explain":
        own = {EXPLAIN, KINK_SEARCH, PER_ROW_JACOBIANS, SHARED_NODE_JACOBIANS, SAMPLE_GRADIENTS, CONTRACTION}
    else:
        own = {RECONSTRUCT, KINK_SEARCH, FORWARD_MODE}
    assert set(seconds) == own
    assert all(took > 0 for took in seconds.values())
    assert sum(seconds.values()) <= wall


def test_a_phase_two_levels_down_leaves_its_time_out_of_each_phase_above_it(monkeypatch):
    """On a clock the test moves: explain (1 s of its own) around a Jacobian pass (2 s of its own)
    around a search (3 s): each phase counts only its own time, and the call's 6 s are their sum
    (explain is not left 4 s, as if the search's time were taken out of the Jacobians' alone)."""
    now = [0.0]
    monkeypatch.setattr(phases, "perf_counter", lambda: now[0])

    @phase(KINK_SEARCH)
    def search() -> None:
        now[0] += 3.0

    @phase(PER_ROW_JACOBIANS)
    def jacobians() -> None:
        now[0] += 2.0
        search()

    @phase(EXPLAIN)
    def explain() -> None:
        now[0] += 1.0
        jacobians()

    with timed() as seconds:
        explain()
    assert seconds == {EXPLAIN: 1.0, PER_ROW_JACOBIANS: 2.0, KINK_SEARCH: 3.0}


def test_a_timed_block_inside_another_takes_its_own_calls_and_the_outer_one_goes_on(monkeypatch):
    """The calls inside an inner timed block count in its dict alone; after it, the outer block's
    dict takes the calls again (and a call after both counts in neither)."""
    now = [0.0]
    monkeypatch.setattr(phases, "perf_counter", lambda: now[0])

    @phase(KINK_SEARCH)
    def search(took: float) -> None:
        now[0] += took

    with timed() as outer:
        search(1.0)
        with timed() as inner:
            search(2.0)
        search(4.0)
    search(8.0)
    assert (outer, inner) == ({KINK_SEARCH: 5.0}, {KINK_SEARCH: 2.0})
