"""Where explain and reconstruct spend their time, by phase.

Each phase runs inside a `torch.profiler.record_function` range called "explaind.<phase>", so a
profiler trace (Chrome, TensorBoard) of any call shows its phases, on the user's own model too;
and inside `with timed() as seconds:` each phase's wall-clock seconds are summed, each without
the phases nested in it (a kink search inside a Jacobian integral counts as search only, and
the call's own phase, EXPLAIN or RECONSTRUCT, keeps what no other phase took), so the phases
of the calls in the block sum to their time. Outside a profiler and a timed block a phase costs
about 6 µs, a few times a step. Nothing here changes a result, so the pipeline's stages do not
list this module among their deps (as with errors.py).
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from contextvars import ContextVar
from time import perf_counter
from typing import Iterator

from torch.profiler import record_function

PREFIX = "explaind."
EXPLAIN = PREFIX + "explain"  # the call itself: what no phase below takes (bookkeeping, checks)
RECONSTRUCT = PREFIX + "reconstruct"
KINK_SEARCH = PREFIX + "kink_search"
PER_ROW_JACOBIANS = PREFIX + "jacobians.per_row"  # each row (input, node) at its own point
SHARED_NODE_JACOBIANS = PREFIX + "jacobians.shared_node"  # a chunk of inputs at one node
MIXED_KERNEL = PREFIX + "mixed_kernel"  # φ·v along the tangents by mixed mode, without J (explaind.mixed)
FORWARD_MODE = PREFIX + "forward_mode"  # φ·v by jvps along the path (reconstruction, few tangents)
SAMPLE_GRADIENTS = PREFIX + "sample_gradients"  # per-sample and batch gradients of the training loss
CONTRACTION = PREFIX + "contraction"  # the kernel rows against the per-sample gradients or momenta


class _Clock:
    """The seconds of a timed block, and the time of the phases running now that their nested
    phases took (to be left out of their own)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.nested: list[float] = []

    def run(self, name: str, function, args, kwargs):
        self.nested.append(0.0)
        start = perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            took = perf_counter() - start
            self.seconds[name] = self.seconds.get(name, 0.0) + took - self.nested.pop()
            if self.nested:
                self.nested[-1] += took


_clock: ContextVar[_Clock | None] = ContextVar("explaind_phase_clock", default=None)


@contextmanager
def timed() -> Iterator[dict[str, float]]:
    """Wall-clock seconds of each phase of the calls made inside the block, by phase name: the
    dict fills as they run. On a GPU this is host time: the device's work shows where the host
    waits for it."""
    clock = _Clock()
    token = _clock.set(clock)
    try:
        yield clock.seconds
    finally:
        _clock.reset(token)


def phase(name: str):
    """Run the decorated function as the phase `name` (see the module's docstring)."""

    def decorate(function):
        @functools.wraps(function)
        def wrapped(*args, **kwargs):
            clock = _clock.get()
            with record_function(name):
                if clock is None:
                    return function(*args, **kwargs)
                return clock.run(name, function, args, kwargs)

        return wrapped

    return decorate
