"""What an explain() request will cost, before it runs: memory, disk and time.

`plan(...)` takes the arguments of `explain` and returns a `Plan`: the chunk sizes the memory
planner picks for the budget, the peak bytes of one pass on the compute device and on the host,
the history's size on disk and the cube's in memory, and, from a short calibration on steps
spread over the run, a time estimate. `explain(..., progress=True)` prints the same summary
(without the calibration) before it starts; `python -m explaind plan` prints it for a recorded
paper run.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from .cube import checked_test_ids
from .engine import (ChunkPass, KeptPieces, build_request, check_reverse_mode, format_bytes,
                     kept_pieces, kept_sizes, momentum_shown, pass_bytes, plan_chunks, request_options,
                     rounded_up, theta_at, walks_backwards)
from .errors import InputError, is_whole
from .path import KinkStats
from .verify import check_tolerance


@dataclass
class Plan:
    """The cost of one explain() request (bytes and seconds are estimates)."""

    n_steps: int
    n_params: int
    n_test: int
    n_outputs: int
    n_train: int
    keep: tuple[str, ...]
    convention: str
    direction: str  # of the first pass: "forward" (per-sample momentum buffer) or "backward" (carried effects)
    test_chunk: int
    train_chunk: int
    batch_chunk: int  # samples of a recorded batch per backward pass
    passes: int  # streams over the history: one per (test chunk, train chunk)
    device: str
    device_bytes: int  # peak of one pass on the compute device
    host_bytes: int  # step records in flight (prefetch), the merged cube and a later pass's results, on the host
    history_bytes: int  # the recorded history on disk, read once per pass
    cube_bytes: int  # the attribution array and any parameter scores, uncompressed
    max_kinks: int  # the kinks per input and step the search resolves
    # of an explained step in a test chunk's first pass, which also checks the updates and books
    # the totals, calibrated on steps spread over the explained range (_calibration_blocks)
    seconds_per_step: float | None = None
    # of an explained step in a later train chunk's pass (None: one train chunk)
    seconds_per_later_step: float | None = None
    # of a step before steps=(start, stop) that only replays the momentum (None: there is none)
    seconds_per_replayed_step: float | None = None
    # the part of device_bytes reserved for the kink search (0: none), and what memory_budget
    # leaves it beyond the pass (None: no budget, so no bound)
    search_reserve: int = 0
    # the memory_budget that runs the request in one pass (None: it runs in one), with the kink
    # search's reserve once more beyond it, as the planner leaves it (engine.plan_chunks)
    one_pass_budget: int | None = None
    search_bytes: int | None = None
    # of what the kink search finds, the bytes a test chunk's first pass keeps for its later train
    # chunks, taken from what memory_budget leaves beside the pass (None: no budget, so no bound)
    pieces_bytes: int | None = None
    # per test chunk: explained steps x (seconds_per_step + later train chunks x
    # seconds_per_later_step) + train chunks x replayed steps x seconds_per_replayed_step
    seconds: float | None = None
    # (segments left unresolved, segments searched) by the kink search in the calibration's runs:
    # steps that cross more kinks than max_kinks are integrated plainly (None: nothing searched)
    calibrated_kinks: tuple[int, int] | None = None
    # the update steps explained (start ≤ s < stop; None: all of them) and the first whose
    # gradients are replayed for the momentum they pass into the window (explain's steps=, replay=)
    step_range: tuple[int, int] | None = None
    replay_start: int = 0
    # why mixed mode (explaind.mixed) cannot take the forward walk's steps of this model, which
    # then all take the per-row Jacobians ("": it can, where its estimate says it pays, or the
    # request does not walk forwards per training sample)
    mixed_refusal: str = ""

    def __str__(self) -> str:
        return self.report()

    def report(self) -> str:
        """The plan in lines, in the words of explain()'s arguments (the command line words them as
        its options)."""
        estimate = "not calibrated (explaind.plan(..., calibrate_steps=6) estimates it)" if self.seconds is None else (
            f"{_duration(self.seconds)} ({self.seconds_per_step * 1e3:.1f} ms per step of a first pass"
            + ("" if self.seconds_per_later_step is None else
               f", {self.seconds_per_later_step * 1e3:.1f} ms of a later train chunk's")
            + ("" if self.seconds_per_replayed_step is None else
               f", {self.seconds_per_replayed_step * 1e3:.1f} ms per replayed step") + ")")
        return "\n".join([
            f"explain: {self.n_test} inputs x {self.n_outputs} outputs, {self.n_train} training samples, "
            f"{self._steps()}, {self.n_params:,} parameters; keeps {', '.join(self.keep) or 'nothing'}",
            f"  passes     {self.passes} ({self.direction}, {self.convention} convention; test chunk "
            f"{self.test_chunk}, train chunk {self.train_chunk}, batch chunk {self.batch_chunk})",
            f"  {self.device:<10} {format_bytes(self.device_bytes)} per pass{self._search()}",
            f"  host       {format_bytes(self.host_bytes)}",
            f"  disk       {format_bytes(self.history_bytes)} of history, read {self.passes} time(s); "
            f"cube {format_bytes(self.cube_bytes)} uncompressed",
            f"  time       {estimate}",
        ] + self._one_pass() + self._unresolved() + self._mixed())

    def _steps(self) -> str:
        """The steps explained: a window of the run (and the steps before it that only replay the
        momentum) is named, so that the parts of explain_resumable's split by steps read apart."""
        if self.step_range is None or tuple(self.step_range) == (0, self.n_steps):
            return f"{self.n_steps} steps"
        start, stop = self.step_range
        replayed = f" (after replaying the momentum of steps {self.replay_start}–{start})" \
            if start > self.replay_start else ""
        return f"steps {start}–{stop} of {self.n_steps}{replayed}"

    def _one_pass(self) -> list[str]:
        if self.one_pass_budget is None:
            return []
        return [f"  one pass   memory_budget={self.one_pass_budget:.3g} ({format_bytes(self.one_pass_budget)}) would run it in "
                f"1 pass instead of {self.passes}, each of which streams the history"]

    def _unresolved(self) -> list[str]:
        if not self.calibrated_kinks or not self.calibrated_kinks[0]:
            return []
        unresolved, searched = self.calibrated_kinks
        return [f"  kinks      {unresolved} of the {searched} (step, input) segments the calibration searched crossed "
                f"more kinks than max_kinks={self.max_kinks} (or stayed above kink_tolerance): the explain integrates "
                "such segments plainly, which can miss its tolerance; raise max_kinks"]

    def _mixed(self) -> list[str]:
        if not self.mixed_refusal:
            return []
        return [f"  mixed mode not used: {self.mixed_refusal}. Every step takes the per-row Jacobians, slower where "
                'many outputs are explained per input (docs/library.md, "Two passes, one cube")']

    def _search(self) -> str:
        if not self.search_reserve:
            return ""
        rest = "more, unbounded (no memory_budget)" if self.search_bytes is None else \
            f"up to {format_bytes(self.search_bytes)} more when it needs to (the rest of memory_budget)"
        return f", of which {format_bytes(self.search_reserve)} for the kink search; the search may take {rest}" \
            + self._kept()

    def _kept(self) -> str:
        if self.train_chunk >= self.n_train:
            return ""
        if self.pieces_bytes is None:
            return "; a test chunk's first pass keeps what it finds for its later train chunks"
        if not self.pieces_bytes:
            return "; later train chunks search again, as memory_budget leaves nothing beside the pass to keep it"
        return (f"; a test chunk's first pass keeps up to {format_bytes(self.pieces_bytes)} of what it finds for its "
                "later train chunks, which search the steps beyond that again")


def plan(history, model, inputs, targets=None, *, calibrate_steps: int = 0,
         memory_budget: float | None = 4 * 2**30, **options) -> Plan:
    """The Plan of `explain(history, model, inputs, targets, memory_budget=..., **options)`.

    calibrate_steps > 0 times that many explained steps (at most those there are; 6 is a good
    choice; 1 times a pass's first step alone, which costs more than the rest), in up to three
    runs of at least two consecutive steps at the start, middle and end of the explained range
    (a step's cost follows the schedule and the kinks its segment crosses), each run twice (the
    first warms up): as a test chunk's first pass, which also checks the updates and books the
    totals, and, with several train chunks, as a later one.
    With steps=(start, stop), the steps before start that only replay the momentum are timed
    apart, since they cost a fraction of an explained step. 0: no time estimate.
    """
    if not is_whole(calibrate_steps) or calibrate_steps < 0:
        raise InputError(f"calibrate_steps={calibrate_steps!r} must be a whole number of steps ≥ 0 (0: no time estimate)")
    request = build_request(history, model, inputs, targets, **request_options("plan", options))
    # what explain refuses before computing, refused here too (not costed as if it would run)
    checked_test_ids(options.get("test_ids"), len(request.inputs))
    check_tolerance("tolerance", options.get("tolerance"), "no check")
    check_reverse_mode(request)
    plan_chunks(request, memory_budget)
    result = describe(request)
    if calibrate_steps > 0:
        test_passes = math.ceil(result.n_test / result.test_chunk)
        later_chunks = result.passes // test_passes - 1
        kinks = KinkStats()  # what the calibration's searches find, each calibrated segment once
        first, later, replayed = _calibrate(request, int(calibrate_steps), later_chunks > 0, kinks)
        if kinks.searched:
            result.calibrated_kinks = (kinks.unresolved, kinks.searched)
        result.seconds_per_step, result.seconds_per_later_step, result.seconds_per_replayed_step = first, later, replayed
        start, stop = request.step_range
        replay = (start - request.replay_start) * (replayed or 0.0)
        result.seconds = test_passes * ((stop - start) * (first + later_chunks * (later or 0.0))
                                        + (1 + later_chunks) * replay)
    return result


def describe(request) -> Plan:
    """The Plan of a built request whose chunks are planned (no calibration)."""
    history = request.history
    n_test, n_train = len(request.inputs), len(request.train_index)
    test_chunk = request.test_chunk  # plan_chunks caps both at the data
    train_chunk = request.train_chunk if request.keeps("train") else n_train  # samples are chunked only when kept
    test_passes = math.ceil(n_test / test_chunk)
    train_passes = math.ceil(n_train / train_chunk)
    rows, _, _, train = kept_sizes(request, test_chunk, train_chunk)
    cube_bytes = _results_bytes(request, n_test, n_train)
    if request.parameter_scores:  # and the D int32 tensor ids of parameter_tensor
        cube_bytes += request.flat.layout.dim * np.dtype(np.int32).itemsize
    # a pass's results reach the host while the merged arrays are held (cube.MergedParts); one
    # pass's are the merged arrays
    part_bytes = 0 if test_passes * train_passes == 1 else _results_bytes(request, test_chunk, train_chunk)
    step_bytes = max(line["bytes"] for line in history.manifest)
    direction = "backward" if walks_backwards(request, rows, train) else "forward"
    return Plan(
        n_steps=history.n_steps, n_params=request.flat.layout.dim, n_test=n_test,
        n_outputs=request.n_outputs, n_train=n_train, keep=request.keep, convention=request.convention,
        direction=direction, mixed_refusal=_mixed_refusal(request) if direction == "forward" else "",
        test_chunk=test_chunk, train_chunk=train_chunk, batch_chunk=request.batch_chunk,
        passes=test_passes * train_passes, device=str(request.flat.device),
        device_bytes=pass_bytes(request, test_chunk, train_chunk, request.batch_chunk),
        search_reserve=request.path.search_reserve(request.inputs, test_chunk),
        search_bytes=request.path.search_bytes, pieces_bytes=request.pieces_bytes,
        host_bytes=2 * step_bytes + cube_bytes + part_bytes,
        history_bytes=sum(line["bytes"] for line in history.manifest), cube_bytes=cube_bytes,
        max_kinks=request.path.max_kinks, step_range=request.step_range, replay_start=request.replay_start,
        one_pass_budget=None if test_passes * train_passes == 1 else int(rounded_up(
            pass_bytes(request, n_test, n_train, history.max_batch())
            + request.path.search_reserve(request.inputs, n_test))),
    )


def _results_bytes(request, n_test: int, n_train: int) -> int:
    """The bytes of the attribution over n_test inputs and n_train samples, as kept, and of the
    parameter scores (cube.PARAMETER_SCORES: 3 x [kept rows, D])."""
    rows, n_bins, n_comp, train = kept_sizes(request, n_test, n_train)
    size = torch.finfo(request.flat.dtype).bits // 8
    scores = 3 * rows * request.flat.layout.dim if request.parameter_scores else 0
    return (rows * n_bins * n_comp * train + scores) * size


def _mixed_refusal(request) -> str:
    """Why mixed mode cannot take the request's steps ("": it can), where the forward walk would
    take them by it (per training sample, no parameter scores): its ops found and checked on the
    first test inputs at the first explained step, as the first pass finds and checks them (both
    kept for the passes, per input shape)."""
    if not request.keeps("train") or request.parameter_scores:
        return ""
    mixed = request.path.mixed
    theta = theta_at(request, request.step_range[0])
    x = request.flat.cast_inputs(request.inputs[:request.test_chunk])
    calls = mixed.calls(theta, x)
    if calls is not None:
        mixed.exact(calls, theta, x, request.target)
    return mixed.refusal[tuple(x.shape[1:])]


def _calibrate(request, steps: int, later_chunks: bool,
               kinks: KinkStats) -> tuple[float, float | None, float | None]:
    """Seconds per explained step of a test chunk's first pass and (later_chunks) of a later
    train chunk's pass, over `steps` steps spread over the explained range, and per step that
    only replays the momentum (None: the request has none), each timed on a second run (the
    first one pays for warm-up: allocation, vmap tracing, file cache). Adds to `kinks` what the
    kink search found on the calibrated steps (a later train chunk takes the pieces the first
    one found, as explain's do)."""
    shown = momentum_shown(request.history)
    blocks = _calibration_blocks(request, steps, shown)
    timed = sum(stop - first for first, stop, _ in blocks)
    kept = kept_pieces(request, later_chunks)

    def per_step(first_chunk: bool) -> float:
        return sum(_timed(request, (first, stop), replay, first_chunk, kinks if first_chunk else None, kept)
                   for first, stop, replay in blocks) / timed

    first, later = per_step(True), per_step(False) if later_chunks else None
    start = request.step_range[0]
    if start == request.replay_start:
        return first, later, None
    # one explained step (stop ≥ start + 1) after `replay` steps that only replay the momentum,
    # less the same step without them; that one solves its momentum from update replay − 1,
    # which must show it (not so after a learning rate of 0): else less the mean explained step
    replay = min(steps, start)
    with_replay = _timed(request, (replay, replay + 1), 0, True)
    alone = _timed(request, (replay, replay + 1), replay, True) if _solvable(request, replay, shown) else first
    return first, later, max(0.0, with_replay - alone) / replay


def _calibration_blocks(request, steps: int, shown) -> list[tuple[int, int, int]]:
    """Up to three runs of consecutive explained steps, `steps` in all (at most those there
    are), at the start, middle and end of the explained range, as (first, stop, replay start).
    Each replays from its own first step, moved up to where the momentum can be solved from
    the update before it (`shown`: engine.momentum_shown's); where none can be, from the
    request's replay start, whose steps its time then includes."""
    start, stop = request.step_range
    steps = min(steps, stop - start)
    runs = max(1, min(3, steps // 2))  # a pass's first step costs more (a fresh pass's allocations)
    sizes = [steps // runs + (i < steps % runs) for i in range(runs)]
    if sum(sizes) + max(sizes) * (runs - 1) > stop - start:  # no room for gaps between them: one run
        sizes = [steps]
    blocks = []
    for i, size in enumerate(sizes):
        first = start + (stop - start - size) * i // max(1, len(sizes) - 1)
        solvable = [s for s in range(first, stop - size + 1) if _solvable(request, s, shown)]
        blocks.append((solvable[0], solvable[0] + size, solvable[0]) if solvable else
                      (first, first + size, request.replay_start))
    return blocks


def _solvable(request, step: int, shown) -> bool:
    """Whether a replay can start at `step`: the momentum there is solved from the update
    before it, which must show it (`shown`: engine.momentum_shown's)."""
    return step in (0, request.replay_start) or shown(step - 1)


def _timed(request, step_range: tuple[int, int], replay_start: int, first_chunk: bool,
           kinks: KinkStats | None = None, kept: KeptPieces | None = None) -> float:
    """Seconds of a second run of a pass over steps replay_start … step_range[1] − 1, explaining
    those from step_range[0] on, for the first test and train chunks (first_chunk: as a test
    chunk's first pass, which also checks the updates and books the totals); adds what that
    run's kink search found to `kinks` (None: not counted). kept: the kink search's pieces, kept
    by a first pass and taken by a later one (ChunkPass's)."""
    short = dataclasses.replace(request, step_range=step_range, replay_start=replay_start)
    tests = slice(0, min(request.test_chunk, len(request.inputs)))
    trains = slice(0, min(request.train_chunk, len(request.train_index)))
    elapsed = []
    for _ in range(2):
        request.path.stats = KinkStats()
        started = time.perf_counter()
        ChunkPass(short, tests, trains, first_train_chunk=first_chunk, kept=kept).run("calibrate")
        elapsed.append(time.perf_counter() - started)
    if kinks is not None:
        kinks.add(request.path.stats)
    return elapsed[-1]


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
