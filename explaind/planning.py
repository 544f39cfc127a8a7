"""What an explain() request will cost, before it runs: memory, disk and time.

`plan(...)` takes the arguments of `explain` and returns a `Plan`: the chunk sizes the memory
planner picks for the budget, the peak bytes of one pass on the compute device and on the host,
the history's size on disk and the cube's in memory, and, from a short calibration over the
first steps, a time estimate. `explain(..., progress=True)` prints the same summary (without the
calibration) before it starts; `python -m explaind plan` prints it for a recorded paper run.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from .cube import test_labels
from .engine import ChunkPass, build_request, explain, kept_sizes, pass_bytes, plan_chunks, walks_backwards
from .errors import InputError, is_whole


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
    host_bytes: int  # step records in flight (prefetch) and the cube's accumulators on the host
    history_bytes: int  # the recorded history on disk, read once per pass
    cube_bytes: int  # the attribution array and any parameter scores, uncompressed
    seconds_per_step: float | None = None  # of an explained step, calibrated on the first steps of the first pass
    # of a step before steps=(start, stop) that only replays the momentum (None: there is none)
    seconds_per_replayed_step: float | None = None
    # the part of device_bytes reserved for the kink search (0: none), and what memory_budget
    # leaves it beyond the pass (None: no budget, so no bound)
    search_reserve: int = 0
    search_bytes: int | None = None
    seconds: float | None = None  # passes x (explained steps x seconds_per_step + replayed x seconds_per_replayed_step)

    def __str__(self) -> str:
        estimate = "not calibrated (plan(..., calibrate_steps=3))" if self.seconds is None else (
            f"{_duration(self.seconds)} ({self.seconds_per_step * 1e3:.1f} ms per step and pass"
            + ("" if self.seconds_per_replayed_step is None else
               f", {self.seconds_per_replayed_step * 1e3:.1f} ms per replayed step") + ")")
        return "\n".join([
            f"explain: {self.n_test} inputs x {self.n_outputs} outputs, {self.n_train} training samples, "
            f"{self.n_steps} steps, {self.n_params:,} parameters; keeps {', '.join(self.keep) or 'nothing'}",
            f"  passes     {self.passes} ({self.direction}, {self.convention} convention; test chunk "
            f"{self.test_chunk}, train chunk {self.train_chunk}, batch chunk {self.batch_chunk})",
            f"  {self.device:<10} {_size(self.device_bytes)} per pass{self._search()}",
            f"  host       {_size(self.host_bytes)}",
            f"  disk       {_size(self.history_bytes)} of history, read {self.passes} time(s); "
            f"cube {_size(self.cube_bytes)} uncompressed",
            f"  time       {estimate}",
        ])

    def _search(self) -> str:
        if not self.search_reserve:
            return ""
        rest = "unbounded (no memory_budget)" if self.search_bytes is None else \
            f"up to {_size(self.search_bytes)} more from memory_budget"
        return f", of which {_size(self.search_reserve)} for the kink search; it may take {rest}"


def plan(history, model, inputs, targets=None, *, calibrate_steps: int = 0,
         memory_budget: float | None = 4 * 2**30, **options) -> Plan:
    """The Plan of `explain(history, model, inputs, targets, memory_budget=..., **options)`.

    calibrate_steps > 0 runs that many steps of the first pass twice (the first run warms up;
    at most the history's steps) and extrapolates the second to every step of every pass; with
    steps=(start, stop), the steps before start that only replay the momentum are timed apart,
    since they cost a fraction of an explained step. 0: no time estimate.
    """
    if not is_whole(calibrate_steps) or calibrate_steps < 0:
        raise InputError(f"calibrate_steps={calibrate_steps!r} must be a whole number of steps ≥ 0 (0: no time estimate)")
    request = build_request(history, model, inputs, targets, **_request_options(options))
    test_labels(options.get("test_ids"), len(request.inputs))  # explain refuses bad ids before computing too
    plan_chunks(request, memory_budget)
    request.progress = False
    result = describe(request)
    if calibrate_steps > 0:
        result.seconds_per_step, result.seconds_per_replayed_step = _calibrate(request, int(calibrate_steps))
        start, stop = request.step_range
        replayed = (start - request.replay_start) * (result.seconds_per_replayed_step or 0.0)
        result.seconds = result.passes * ((stop - start) * result.seconds_per_step + replayed)
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
    kept = kept_sizes(request, n_test, n_train)
    size = torch.finfo(request.flat.dtype).bits // 8
    cube_bytes = kept[0] * kept[1] * kept[2] * kept[3] * size
    if request.parameter_scores:  # cube.PARAMETER_SCORES: 3 x [kept rows, D], and D int32 tensor ids
        d = request.flat.layout.dim
        cube_bytes += 3 * kept[0] * d * size + d * np.dtype(np.int32).itemsize
    step_bytes = max(line["bytes"] for line in history.manifest)
    return Plan(
        n_steps=history.n_steps, n_params=request.flat.layout.dim, n_test=n_test,
        n_outputs=request.n_outputs, n_train=n_train, keep=request.keep, convention=request.convention,
        direction="backward" if walks_backwards(request, rows, train) else "forward",
        test_chunk=test_chunk, train_chunk=train_chunk, batch_chunk=request.batch_chunk,
        passes=test_passes * train_passes, device=str(request.flat.device),
        device_bytes=pass_bytes(request, test_chunk, train_chunk, request.batch_chunk),
        search_reserve=request.path.search_reserve(request.inputs, test_chunk),
        search_bytes=request.path.search_bytes,
        host_bytes=2 * step_bytes + 2 * cube_bytes,
        history_bytes=sum(line["bytes"] for line in history.manifest), cube_bytes=cube_bytes,
    )


def _request_options(options: dict) -> dict:
    """explain()'s keyword defaults overridden by `options`, as the request builder takes them
    (the options that only matter after computing are dropped; unknown names are refused)."""
    parameters = inspect.signature(explain).parameters
    defaults = {k: v.default for k, v in parameters.items() if v.kind == v.KEYWORD_ONLY}
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise TypeError(f"plan() got arguments explain() does not take: {unknown}. Fix: pass explain()'s "
                        f"keyword arguments, e.g. {sorted(defaults)[:6]} ...")
    merged = {**defaults, **options}
    for after_compute in ("memory_budget", "tolerance", "test_ids", "progress"):
        merged.pop(after_compute)
    return merged


def _calibrate(request, steps: int) -> tuple[float, float | None]:
    """Seconds per explained step of the first pass over the first `steps` steps, and per step
    that only replays the momentum (None: the request has none), each timed on a second run
    (the first one pays for warm-up: allocation, vmap tracing, file cache)."""
    steps = min(steps, request.history.n_steps)
    explained = _timed(request, (0, steps)) / steps
    start = request.step_range[0]
    if start == request.replay_start:
        return explained, None
    # one explained step (stop ≥ start + 1) after `replay` steps that only replay the momentum,
    # less the same step without them; that one solves its momentum from update replay − 1,
    # which a learning rate of 0 (a warm-up) does not allow: then less the mean explained step
    replay = min(steps, start)
    with_replay = _timed(request, (replay, replay + 1))
    lr_zero = any(float(g["lr"]) == 0 for g in request.history.manifest[replay - 1]["groups"])
    alone = explained if lr_zero else _timed(request, (replay, replay + 1), replay)
    return explained, max(0.0, with_replay - alone) / replay


def _timed(request, step_range: tuple[int, int], replay_start: int = 0) -> float:
    """Seconds of a second run of the first pass over steps replay_start … step_range[1] − 1,
    explaining those from step_range[0] on."""
    short = dataclasses.replace(request, step_range=step_range, replay_start=replay_start)
    tests = slice(0, min(request.test_chunk, len(request.inputs)))
    trains = slice(0, min(request.train_chunk, len(request.train_index)))
    rows, _, _, train = kept_sizes(request, tests.stop, trains.stop)
    # the forward pass books totals and checks inline (cheap); the backward pass would check
    # every update of the history afterwards, which is not part of a step's cost
    first_chunk = not walks_backwards(request, rows, train)
    elapsed = []
    for _ in range(2):
        started = time.perf_counter()
        ChunkPass(short, tests, trains, first_train_chunk=first_chunk).run("calibrate")
        elapsed.append(time.perf_counter() - started)
    return elapsed[-1]


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
