"""The path integral φ_s(x) = ∫₀¹ J(x; θ_s + tΔθ_s) dt, piece by piece between the kinks of piecewise-smooth models.

Gauss–Legendre quadrature converges extremely fast on smooth integrands, but ReLU and
max-pooling make J jump wherever a unit's input crosses zero (or an argmax switches) along
the segment, and any fixed rule then converges only like 1/Q. So for each input we first
locate those kinks with forward-mode passes (far cheaper than a Jacobian), then apply Q
Gauss–Legendre nodes on each smooth piece.

The kink search. Each ReLU-type unit's input z(t) is smooth along the segment; forward mode
gives z and dz/dt at any point, for all inputs' units in one pass. An interval [a, b] of the
segment is split further while
- some unit has opposite signs at its ends (a crossing): each interval brackets the first
  few roots that the cubic Hermite interpolants of (z, dz/dt) at its ends predict, tightly
  enough that the next round, on brackets 2^-20 of the segment wide, places every crossing
  by its cubic interpolant (error ~width⁴); or
- some unit may dip across zero and back inside (both ends on one side): it is certified not
  to when z stays on its side under Taylor bounds from both ends, |z''| ≤ `curvature_safety`
  × the largest |z''| of its cubic interpolant on the interval. That is the stated tolerance:
  a second derivative that varies by more than that factor within one interval can hide a
  pair of crossings; every split of an interval shrinks the curvature such a pair needs.
Max-pool argmax switches are found where the end indices differ, by thirds down to 2^-40 (a
switch and switch-back of an argmax inside one interval is not detected). Only units the
explained output depends on are searched (FlatModel.kink_relevance): the kinks of the others
leave J unchanged. Units of parameters alone (a clamp of a weight) switch at the same t on
every input's path: they are searched once per batch of inputs, on its first.

Error-controlled search (`kink_tolerance` > 0). Most segments of a long run cross no kink,
and certifying that for every unit costs far more than the integral. With a tolerance, each
segment is first integrated plainly and checked against the exact change f(θ + Δ) − f(θ) of
its explained outputs; only segments that miss by more than the tolerance are searched, and
a piece is accepted as soon as its own integral matches its ends' change within the
tolerance (a hidden dip that moves no output is harmless). A piece that misses is cut at the
crossings its ends reveal (at the roots the cubic interpolants predict; see _cuts), or else
inside its least certain unit's gap. So each segment's φ·Δ misses f(θ + Δ) − f(θ) by at most
the tolerance per piece, measured rather than bounded. What it certifies is that change, not
φ itself: a unit that switches and switches back between the plain nodes leaves φ·Δ as it
would be without the switch (the unit's input is zero at both kinks), so that segment passes
unsearched while the shares of the change among samples and components (φ·v for v ≠ Δ) keep
the dip's error. The certified search (tolerance 0) finds such ReLU dips; the error control
catches any piece whose change is missed, whatever the search overlooked there (e.g. max-pool
switches placed wrongly by the thirds).

Memory. Each interval keeps the pattern at both of its ends (every searched unit's z and dz/dt),
and a pattern pass holds each row's parameters and activations, so an unbounded search grows
with intervals × units. With `search_bytes` set (explain sets it to what memory_budget leaves
beyond the pass, which reserves search_reserve), a round takes only as many intervals, and a
pass as many rows, as those bytes hold: the first inputs are searched to the end before the
others (depth first), so what waits is other inputs' intervals; waiting intervals beyond half
of those bytes shed their end patterns, computed again at their turn. The kinks found are the
same; only the number of passes changes.

Several steps at once. A pass of the search costs far more in fixed overhead (a forward-mode
pass through the model: ~3 ms on the reference workload's Transformer) than per row (~0.05 ms),
and one step's search takes few rows a round. So explain hands the search the segments of a
window of steps (search_steps; `window` says how many): row r of the search is an input on one
step's segment, and each pass takes the rows of every step in the window, each with its own θ
and Δ. What it finds is what a search per step finds; its rounds are those of the deepest.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field, fields

import torch

from .errors import InputError, is_number, is_whole
from .functional import FlatModel, ForwardModeSizes, checked_output
from .mixed import Call, MixedMode
from .phases import FORWARD_MODE, KINK_SEARCH, MIXED_KERNEL, phase
from .quadrature import nodes


@dataclass
class KinkStats:
    """What the kink search found, reported in the cube's attributes."""

    kinks: int = 0  # kinks located, or with a kink tolerance: cuts placed (summed over steps and inputs)
    unresolved: int = 0  # (step, input) segments left above the cap or tolerance (see PathIntegral)
    searched: int = 0  # segments whose kinks were searched (with a kink tolerance: those that missed it)

    def add(self, other: KinkStats) -> None:
        for count in fields(self):
            setattr(self, count.name, getattr(self, count.name) + getattr(other, count.name))

    def as_attrs(self) -> dict:
        return {"kinks_located": self.kinks, "kink_segments_unresolved": self.unresolved,
                "kink_segments_searched": self.searched}


@dataclass
class _Intervals:
    """Intervals [a, b] of the segments of some inputs (`rows`), with the kink pattern at both
    ends: distances z, their derivatives dz/dt, argmax indices, explained outputs. Intervals
    waiting for their turn may have shed their patterns (start = end = None) to stay within
    the search's bytes; they are computed again when the intervals are searched."""

    rows: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    start: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None
    end: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None
    miss: torch.Tensor | None = None  # with a kink tolerance: how far each piece's integral misses
    shed_bytes: int = 0  # with the patterns shed: the bytes one end's pattern takes

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, keep: torch.Tensor | slice) -> "_Intervals":
        ends = (None, None) if self.start is None else \
            (tuple(v[keep] for v in self.start), tuple(v[keep] for v in self.end))
        return _Intervals(self.rows[keep], self.a[keep], self.b[keep], *ends,
                          None if self.miss is None else self.miss[keep], self.shed_bytes)

    def shed(self) -> "_Intervals":
        """The same intervals without their patterns."""
        return _Intervals(self.rows, self.a, self.b, None, None, self.miss, self.pattern_bytes())

    def pattern_bytes(self) -> int:
        """Bytes of one end's pattern of one interval."""
        if self.start is None:
            return self.shed_bytes
        return sum(v[0].numel() * v.element_size() for v in self.start) if len(self) else 0

    def held_bytes(self) -> int:
        """Bytes of the patterns this group holds."""
        return 0 if self.start is None else 2 * self.pattern_bytes() * len(self)

    def crossing(self) -> torch.Tensor:
        """Intervals whose ends lie on different pieces: [K] bool."""
        (za, _, ia, _), (zb, _, ib, _) = self.start, self.end
        return ((za > 0) != (zb > 0)).any(1) | (ia != ib).any(1)


@dataclass
class _Segments:
    """The segments θ_s + tΔ_s (float64, [S, D] each) of one or more steps, searched along the
    paths of the same inputs x [n]: row r of a search is input r % n on segment r // n (with one
    segment, row r is input r)."""

    theta: torch.Tensor
    delta: torch.Tensor
    x: torch.Tensor

    @property
    def rows(self) -> int:
        return len(self.theta) * len(self.x)

    def of(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """θ, Δ and the input of each row: the one segment's [D] (each row a point along it) or
        the rows' own [R, D]."""
        if len(self.theta) == 1:
            return self.theta[0], self.delta[0], self.x[rows]
        on = rows // len(self.x)
        return self.theta[on], self.delta[on], self.x[rows % len(self.x)]


@dataclass
class PathIntegral:
    flat: FlatModel
    quadrature: int = 4
    rule: str = "gauss"
    breakpoints: bool = True
    # 0: locate and certify every kink of every segment; > 0: search only the segments whose
    # plain integral misses the change of an explained output by more than this (module doc)
    kink_tolerance: float = 0.0
    max_kinks: int = 16  # per input and step; beyond it the segment is integrated plainly
    stats: KinkStats = field(default_factory=KinkStats)

    # elements of the per-node gradients held at once while computing φ (2^26: 512 MB in float64)
    max_elements: int = 2**26
    # rows (input × point on the segment) of one pass with per-row parameters; None: unbounded
    max_rows: int | None = None
    # bytes the kink search may hold at once beyond search_reserve (None: unbounded); explain
    # sets it from memory_budget
    search_bytes: int | None = None
    # at most this many inputs, and inputs x nodes, take φ·Δ with all plain nodes in one per-row
    # pass (see _integral)
    few_inputs: int = 2
    few_rows: int = 32
    # when a segment has kinked inputs, its smooth inputs whose Jacobians (O·D each) hold at most
    # this many elements in all take their plain nodes as rows of the kinked inputs' per-row
    # passes: a node's own pass costs ~3 ms whatever its size, a row in a per-row pass 1.3-1.5×
    # what an input costs in a node's pass (measured, float32 on 2 cores: the reference Transformer
    # 0.3 against 0.2 ms an input, ResNet-9 width 16 on 8×8 images 1.4 against 1.0 ms, width 64 on
    # 32×32 images 40 against 31 ms)
    join_elements: int = 2**21
    # the kink search's tolerance: |z''| ≤ this × its cubic interpolant's on an interval
    curvature_safety: float = 2.0
    max_rounds: int = 64
    # interval × unit entries of one block of a round's analysis on the CPU (_analyse): 1 MiB
    # per float64 temporary, within a core's L2 cache
    analysis_elements: int = 2**17
    roots_per_round: int = 4  # crossings per interval bracketed at once
    # steps whose kinks one search locates at once (see window), and the bytes of the float64
    # parameters that one of its passes gives its rows of several steps (θ, Δ, the point and its
    # tangent: 32·D a row). Measured on the reference workload (D = 10,016): a pass took 0.055 ms
    # a row for 200 rows, 0.088 ms for 500, against ~3 ms for a pass of any size
    max_window: int = 64
    window_row_bytes: int = 2**26

    def __post_init__(self):
        if not is_whole(self.max_kinks) or self.max_kinks < 0:
            raise InputError(f"max_kinks={self.max_kinks!r} must be a whole number ≥ 0 (kinks per input and step "
                             "that the search resolves)")
        if not (is_number(self.kink_tolerance) and self.kink_tolerance >= 0):  # NaN too: it would search nothing
            raise InputError(f"kink_tolerance={self.kink_tolerance!r}: use 0 (locate every kink) or a "
                             "positive error per step and output")
        if not isinstance(self.breakpoints, bool):
            raise InputError(f"breakpoints={self.breakpoints!r} must be True (locate the kinks) or False "
                             "(plain quadrature)")
        if self.kink_tolerance > 0 and not self.breakpoints:
            raise InputError(f"kink_tolerance={self.kink_tolerance} chooses which steps' kinks are located, but "
                             "breakpoints=False locates none: set breakpoints=True, or kink_tolerance=0 for "
                             "plain quadrature")
        t, w = nodes(self.quadrature, self.rule)
        self.t_nodes = torch.tensor(t, dtype=self.flat.dtype, device=self.flat.device)
        self.t_weights = torch.tensor(w, dtype=self.flat.dtype, device=self.flat.device)
        self.t_search = torch.tensor(t, dtype=torch.float64, device=self.flat.device)
        self.w_search = torch.tensor(w, dtype=torch.float64, device=self.flat.device)
        # The search runs in float64 whatever the working dtype: along a short segment a
        # float32 θ + tΔ takes few distinct values, and its rounding makes patterns flicker.
        self.search = self.flat.in_dtype(torch.float64)
        # it stops at this width: the misplaced sliver of J is then below rounding
        self.resolution = 2.0**-40
        # a crossing of a distance in an interval this short (relative to the segment) is
        # placed by its cubic interpolant, whose error there is ~width⁴, far below resolution
        self.settle_width = 2.0**-20
        self._relevance: dict[int, tuple[weakref.ref, torch.Tensor | None]] = {}
        self._output_counts: dict[tuple[int, ...], int] = {}  # per input shape (see _zeros)
        self._kink_sizes: dict[tuple[int, ...], tuple[int, int, int]] = {}  # per input shape (see _sizes)
        self._forward_sizes: dict[tuple[int, ...], ForwardModeSizes] = {}  # per input shape (see _directional_rows)
        self.smooth = False  # found so on the first segment searched: the model has no kinks at all
        self.mixed = MixedMode(self.flat)

    def model_output(self, theta: torch.Tensor, x: torch.Tensor, target: str) -> torch.Tensor:
        """The explained output of x[:1] at θ, with a model that cannot compute in float64 (a
        kernel without it, as the grouped_mm of Hugging Face's mixture-of-experts layers on the
        CPU) refused before any work where the dtype, or the kink search, needs float64."""
        fixes = ["dtype=torch.float32"] if self.flat.dtype == torch.float64 else []
        if self.breakpoints:
            fixes.append("breakpoints=False (the kink search computes in float64 whatever the dtype, as float32 "
                         "rounding makes the patterns it compares flicker; without it the quadrature converges "
                         "only like 1/Q where the model has kinks: raise quadrature=...)")
        fix = f"Fix: pass {' and '.join(fixes)}"
        output = checked_output(self.flat, theta, x, target, fix)
        if self.breakpoints and self.flat.dtype != torch.float64:
            checked_output(self.search, theta, x, target, fix)
        return output

    @property
    def searches(self) -> bool:
        """Whether kinks are located: asked for (breakpoints, as the cube records it) and the
        model has some."""
        return self.breakpoints and not self.smooth

    # ----------------------------------------------------------------- kinks

    def kinks(self, theta: torch.Tensor, delta: torch.Tensor, x: torch.Tensor) -> list[list[float]]:
        """Sorted kink positions t ∈ (0, 1) per input (empty for a smooth segment)."""
        rows, t = self._locate(theta, delta, x)
        found: list[list[float]] = [[] for _ in range(len(x))]
        for i, ti in zip(rows.tolist(), t.tolist()):
            found[i].append(ti)
        return found

    def _locate(self, theta, delta, x) -> tuple[torch.Tensor, torch.Tensor]:
        """The kinks of every input's segment as (input index [K], position [K]), sorted."""
        return self.locate_steps(theta[None], delta[None], x)[0]

    def window(self, x: torch.Tensor, steps: int, held: int = 0) -> int:
        """How many steps' segments one search should take (search_steps): each of its passes
        then carries rows of all of them, so a pass's fixed cost (~3 ms on the reference
        workload) is paid per round of the window, not per round of each step. At most
        max_window and `steps`, and as many as fit within window_row_bytes (within a quarter of
        search_bytes under a memory budget) with what each step of the window holds: its
        float64 θ and Δ, its rows' end patterns (and plain integrals) and the caller's `held`
        bytes. 1 with no kinks to search, nor in a model with no kink-making op, whose first
        segment finds it smooth (a window of them cost a GELU MLP 1.2 s of patterns first)."""
        if not self.searches or self._costs(x) == (0, 0):
            return 1
        per_step = 16 * self.flat.layout.dim + 2 * len(x) * self._costs(x)[0] + held
        limit = self.window_row_bytes if self.search_bytes is None else self.search_bytes // 4
        return max(1, min(steps, self.max_window, limit // per_step))

    @phase(KINK_SEARCH)
    def locate_steps(self, theta: torch.Tensor, delta: torch.Tensor, x: torch.Tensor
                     ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The kinks of every input's path along each of S segments θ_s + tΔ_s (θ, Δ: [S, D]),
        per segment as (input index [K], position [K]), sorted: one search for all of them."""
        n, steps = len(x), len(theta)
        if not self.searches:
            return [_no_kinks(theta)] * steps
        seg = _Segments(theta.to(torch.float64), delta.to(torch.float64), self.search.cast_inputs(x))
        start = self._ends(seg, 0.0, None)
        if start[0].shape[1] + start[2].shape[1] == 0:  # no piecewise-linear op: smooth everywhere
            self.smooth = True
            return [_no_kinks(theta)] * steps
        self.stats.searched += steps * n
        relevant = self._relevant(seg.theta[0], x, seg.x)
        end = self._ends(seg, 1.0, None)
        rows, t = self._refine_own_and_shared(seg, start, end, relevant)
        order = torch.argsort(rows.double() * 2 + t)
        rows, t = rows[order], t[order]
        fresh = torch.ones_like(rows, dtype=torch.bool)  # units crossing at the same point: one kink
        fresh[1:] = (rows[1:] != rows[:-1]) | (t[1:] != t[:-1])
        self.stats.kinks += int(fresh.sum())
        rows, t = rows[fresh].cpu(), t[fresh].cpu()
        counts = torch.bincount(rows // n, minlength=steps).tolist()
        return [(r % n, ts) for r, ts in zip(rows.split(counts), t.split(counts))]

    def search_steps(self, theta: torch.Tensor, delta: torch.Tensor, x: torch.Tensor, target: str) -> list[tuple]:
        """What the integral of each of S segments θ_s + tΔ_s (θ, Δ: [S, D]) needs from the
        search, by one search for all of them: the smooth pieces of the inputs' paths with more
        than one, (input index, lo, hi) [K] each, and with a kink tolerance the float64 plain
        integral φ·Δ of every input [n, O] (None without)."""
        if self.kink_tolerance > 0:
            return self._searched(theta, delta, x, target)
        return [(_pieces(rows, t, len(x)), None) for rows, t in self.locate_steps(theta, delta, x)]

    def search_window(self, theta: torch.Tensor, delta: torch.Tensor, x: torch.Tensor, target: str) -> list:
        """search_steps for a window of S segments (θ, Δ: [S, D]) when there are kinks to
        search (a window of one too, so that its caller can keep what it found); else S Nones,
        for the plain rule."""
        if not self.searches:
            return [None] * len(theta)
        return self.search_steps(theta, delta, x, target)

    def _ends(self, seg: _Segments, t: float, columns, target: str = "logit") -> tuple[torch.Tensor, ...]:
        """The pattern's `columns` of every row at t of its segment: one pass with the segment's
        parameters; for several, passes over all inputs at each segment's point, vmapped over as
        many segments as window_row_bytes holds (their parameters are held once per segment, not
        once per row: the reference workload's 50 segments of 10 inputs, both ends 18 ms against 78 ms),
        or per-row passes where one segment's inputs are more rows than a pass may take."""
        if len(seg.theta) == 1:
            return _columns(self.search.kink_pattern(seg.theta[0], seg.delta[0], seg.x, t, target), columns)
        passes = self._segment_passes(seg)
        if passes is None:
            at = torch.full((seg.rows,), t, dtype=torch.float64, device=seg.theta.device)
            return self._pattern_rows(seg, torch.arange(seg.rows, device=seg.theta.device), at, columns, target)
        parts = [self.search.kink_pattern(seg.theta[part], seg.delta[part], seg.x, t, target) for part in passes]
        return _columns(tuple(torch.cat(part) for part in zip(*parts)), columns)

    def _segment_passes(self, seg: _Segments) -> list[slice] | None:
        """seg's segments in groups, each taken by one pass over all inputs at each segment's
        point (vmapped over the segments): as many as window_row_bytes holds the parameters of
        and a pass may take rows; None where one segment's inputs are more rows than that."""
        n, rows = len(seg.x), self._search_rows(seg.x)
        if rows is not None and rows < n:
            return None
        size = max(1, min(self._points_held(seg), (rows or seg.rows) // n))
        return [slice(start, start + size) for start in range(0, len(seg.theta), size)]

    def _refine_own_and_shared(self, seg: _Segments, start, end, relevant) -> tuple[torch.Tensor, torch.Tensor]:
        """The kinks of every row (input on a segment), (row [K], position [K]), from its
        pattern at both ends: those of its own units, and those of parameters alone (see
        FlatModel.shared_columns), which lie on every input's path along a segment at the same t
        and so are searched once per segment, on its first input, whatever the batch's size.

        An input with more than `max_kinks` kinks in all is not worth resolving: its segment is
        integrated plainly (counted as unresolved). So is an input left with an open interval
        after `max_rounds`, which keeps its kinks (see _refine)."""
        n = len(seg.x)
        everyone = torch.arange(seg.rows, device=seg.theta.device)
        shared, shared_indices = self.search.shared_columns(seg.x)
        own = None if relevant is None else (relevant, None)
        searched, budget = everyone, self.max_kinks
        common_rows, common_t = everyone[:0], seg.theta.new_zeros(0)
        unresolved = torch.zeros(seg.rows, dtype=torch.bool, device=everyone.device)
        if shared.any() or shared_indices.any():
            own = (~shared if relevant is None else relevant & ~shared, ~shared_indices)
            common = (shared if relevant is None else relevant & shared, shared_indices)
            firsts = everyone[::n]
            common_rows, common_t, crowded, unsettled = self._refine(seg, _whole(start, end, firsts, common), common,
                                                                     self.max_kinks)
            # a segment with more than max_kinks of them is integrated plainly on every input's
            # path; one with an interval of them still open counts as unresolved on every one
            unresolved = (crowded | unsettled)[firsts].repeat_interleave(n)
            searched = everyone[~crowded[firsts].repeat_interleave(n)]
            distinct = torch.unique(common_rows.double() * 2 + common_t)  # a row's t ∈ (0, 1)
            per_segment = torch.bincount(torch.div(distinct, 2, rounding_mode="floor").long() // n,
                                         minlength=len(seg.theta))
            budget = self.max_kinks - per_segment.repeat_interleave(n)
        rows, t, crowded, unsettled = self._refine(seg, _whole(start, end, searched, own), own, budget)
        self.stats.unresolved += int((unresolved | crowded | unsettled).sum())
        extra_rows, extra_t = _spread(common_rows, common_t, searched[~crowded[searched]], seg)
        return torch.cat([rows, extra_rows]), torch.cat([t, extra_t])

    def _refine(self, seg: _Segments, intervals: _Intervals, columns,
                max_kinks: int | torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Split intervals until each one is certified smooth or pins its kinks down: the kinks
        (row, position) of the rows with at most `max_kinks` (one for all, or per row), and
        which rows have more (crowded) or an interval still open after `max_rounds`, which keeps
        its kinks (unsettled), [seg.rows] each. Only the pattern's `columns` are followed (see
        _columns)."""
        n = seg.rows
        rows, t = [intervals.rows[:0]], [intervals.a[:0]]
        crowded = torch.zeros(n, dtype=torch.bool, device=intervals.rows.device)
        unsettled = torch.zeros_like(crowded)  # an input with an interval still open after the last round

        def search(intervals: _Intervals, depth: int) -> _Intervals | None:
            width = intervals.b - intervals.a
            crossing, roots, distances_only, coverage, gap = self._analyse(intervals)
            narrow = width <= self.resolution
            # so short that the cubic interpolants place each crossing far below the resolution
            settled = crossing & (width <= self.settle_width) & distances_only
            pinned = crossing & narrow & ~settled
            placed = settled[:, None] & torch.isfinite(roots)
            rows.extend([intervals.rows[pinned], intervals.rows[:, None].expand_as(roots)[placed]])
            t.extend([((intervals.a + intervals.b) / 2)[pinned], (intervals.a[:, None] + roots * width[:, None])[placed]])
            open_ = ~narrow & ~settled & (crossing | (coverage < 1))
            pending = torch.cat([*rows, intervals.rows[open_ & crossing]])
            crowded.logical_or_(torch.bincount(pending, minlength=n) > max_kinks)
            open_ &= ~crowded[intervals.rows]
            if depth == self.max_rounds - 1:
                # out of rounds: an interval still crossing is cut at its interpolant's roots (the
                # middle where it predicts none), so the input keeps its other kinks; every input
                # with an open interval counts as unresolved
                last = open_ & crossing
                first = roots[last, :1]
                at = torch.cat([torch.where(torch.isfinite(first), first, 0.5), roots[last, 1:]], 1)
                cut = torch.isfinite(at)
                rows.append(intervals.rows[last, None].expand_as(at)[cut])
                t.append((intervals.a[last, None] + at * width[last, None])[cut])
                unsettled[intervals.rows[open_]] = True
                return None
            if not open_.any():
                return None
            searched = intervals.take(open_)
            probes = self._probes(searched, crossing[open_], roots[open_], gap[open_])
            return self._split(seg, searched, probes, columns)

        self._depth_first(intervals, search, lambda iv: self._with_ends(seg, iv, columns, "logit"))
        rows, t = torch.cat(rows), torch.cat(t)
        keep = ~crowded[rows]
        return rows[keep], t[keep], crowded, unsettled

    def _depth_first(self, intervals: _Intervals, search, restore) -> None:
        """Run search(group, round) on `intervals` and then on the pieces it returns (None: no
        more), newest pieces first, in groups that keep the search within `search_bytes`.

        A group over the limit is parted at an input (the intervals are ordered by input, and
        each input's search is its own): its first inputs are searched to the end before the
        others' next round, so what waits are other inputs' intervals, never a pile of one
        input's rounds. An input whose intervals alone exceed the limit is parted among them.
        Without a limit, or within it, each round takes every open interval at once.

        Depth first, each round leaves the pieces of its other intervals waiting; under a limit
        the oldest waiting groups shed their patterns beyond half of it (_shed), and restore(group)
        computes them again when the group's turn comes."""
        waiting = [(intervals, 0)]
        while waiting:
            group, depth = waiting.pop()
            most = self._group_limit(group, waiting)
            if len(group) > most:
                inputs_end = torch.cumsum(torch.unique_consecutive(group.rows, return_counts=True)[1], 0)
                fits = inputs_end[inputs_end <= most]
                cut = int(fits[-1]) if len(fits) else int(most)
                waiting += [(group.take(slice(cut, None)), depth), (group.take(slice(0, cut)), depth)]
                continue
            if group.start is None:
                group = restore(group)
            pieces = search(group, depth)
            if pieces is not None and len(pieces):
                waiting.append((pieces, depth + 1))
                self._shed(waiting)

    def _shed(self, waiting: list[tuple[_Intervals, int]]) -> None:
        """Drop the patterns of the oldest waiting groups (not the newest, searched next) while
        the waiting patterns exceed half of what search_bytes leaves a round (see _group_limit):
        a deep search leaves up to 8 pieces per round waiting (measured: 43 intervals, 23 MiB
        of patterns, on a ResNet9 with 6 MiB of search_bytes before they were shed)."""
        if self.search_bytes is None:
            return
        allowed = (self.search_bytes - self.search_bytes // 4) // 2
        held = sum(g.held_bytes() for g, _ in waiting)
        for i, (group, depth) in enumerate(waiting[:-1]):
            if held <= allowed:
                return
            held -= group.held_bytes()
            waiting[i] = (group.shed(), depth)

    def _with_ends(self, seg: _Segments, iv: _Intervals, columns, target: str) -> _Intervals:
        """Shed intervals with the patterns at their ends computed again."""
        k = len(iv)
        both = self._pattern_rows(seg, iv.rows.repeat(2), torch.cat([iv.a, iv.b]), columns, target)
        return _Intervals(iv.rows, iv.a, iv.b, tuple(v[:k] for v in both), tuple(v[k:] for v in both), iv.miss)

    # ----------------------------------------------------------------- memory

    # what a round of the search holds per interval, in patterns of one end: both ends, the
    # ~15 [intervals, units] temporaries of classifying it, its ≤ 8 probes, the table of
    # patterns the pieces gather from and the ≤ 9 pieces' ends (see _split)
    round_patterns = 40

    def _costs(self, x: torch.Tensor) -> tuple[int, int]:
        """(bytes of one row's kink pattern, bytes one row of a pattern pass holds while it
        runs), once per input shape. The pattern is float64 distances z and dz/dt, int64 argmax
        indices and float64 outputs; the pass holds the row's parameters and tangent and its
        forward and tangent activations: ~3.5× the pattern on a ResNet9 (4× is taken)."""
        distances, indices, outputs = self._sizes(x)
        if distances + indices == 0:  # smooth
            return 0, 0
        one = 8 * (2 * distances + indices + outputs)
        return one, 4 * one + 2 * 8 * self.flat.layout.dim

    def _sizes(self, x: torch.Tensor) -> tuple[int, int, int]:
        """FlatModel.kink_sizes of inputs shaped like x's, once per input shape."""
        shape = tuple(x.shape[1:])
        if shape not in self._kink_sizes:
            self._kink_sizes[shape] = self.search.kink_sizes(x)
        return self._kink_sizes[shape]

    def pieces_bytes(self, x: torch.Tensor, n: int) -> int:
        """Bytes of what search_steps finds on one segment for n inputs shaped like x's, as
        explain sizes them for keeping (engine.KeptPieces): an input's up to max_kinks + 1 smooth
        pieces (input index, lo, hi: 24 bytes each); with a kink tolerance, up to 4 · max_kinks
        cut ones and the ≤ 2 · roots_per_round + 1 of one more cut, and its float64 plain integral
        of the explained outputs. Measured on the reference workload: 28-30 bytes per step and input
        (at most 118); on a ResNet9 of width 4, 123 (certified) and 694-1,577 (with a tolerance)."""
        if not self.searches or self._costs(x) == (0, 0):
            return 0
        if self.kink_tolerance == 0:
            return n * 24 * (self.max_kinks + 1)
        return n * (24 * (4 * self.max_kinks + 2 * self.roots_per_round + 1) + 8 * self._sizes(x)[2])

    def search_reserve(self, x: torch.Tensor, n: int) -> int:
        """Bytes the kink search holds at least for n inputs shaped like x's: every input's
        patterns at both ends of its segment and the pass computing them, and one interval's
        round. search_bytes comes on top of it."""
        if not self.searches:
            return 0
        pattern, row = self._costs(x)
        return n * (2 * pattern + row) + row + self.round_patterns * pattern

    def _search_rows(self, x: torch.Tensor) -> int | None:
        """The most rows of one pattern pass of the search: max_rows, and the reserved row plus
        a quarter of search_bytes (None: no bound)."""
        if self.search_bytes is None:
            return self.max_rows
        rows = 1 + self.search_bytes // 4 // max(1, self._costs(x)[1])
        return min(rows, self.max_rows or rows)

    def _pass_rows(self, seg: _Segments) -> int | None:
        """The most rows of one pass of the search along seg: _search_rows, and those whose own
        parameters fit window_row_bytes when the rows lie on several segments."""
        rows = self._search_rows(seg.x)
        if len(seg.theta) == 1:
            return rows
        fit = self._points_held(seg)
        return min(rows or fit, fit)

    def _points_held(self, seg: _Segments) -> int:
        """How many points' parameters one pass along several of seg's segments holds within
        window_row_bytes: 32 bytes a parameter (θ, Δ, the point and its tangent, in float64)."""
        return max(1, self.window_row_bytes // (32 * seg.theta.shape[1]))

    def _group_limit(self, group: _Intervals, waiting) -> int | float:
        """How many intervals of `group` one round may take: the reserved one, and as many
        more as the rest of search_bytes holds beside the intervals waiting for their turn."""
        if self.search_bytes is None:
            return float("inf")
        held = sum(g.held_bytes() for g, _ in waiting)
        free = max(0, self.search_bytes - self.search_bytes // 4 - held)
        return 1 + free // max(1, self.round_patterns * group.pattern_bytes())

    def _relevant(self, theta, x, xs) -> torch.Tensor | None:
        """The distances the explained output depends on, computed once per input batch.

        Measured at a random point near θ: a dependence that only vanishes at θ (a weight
        that is still zero) is not structural and must not hide a unit."""
        cached = self._relevance.get(id(x))
        if cached is not None and cached[0]() is x:
            return cached[1]
        noise = torch.randn(len(theta), generator=torch.Generator().manual_seed(0), dtype=torch.float64, device="cpu")
        point = theta + noise.to(theta.device) * (1e-3 * float(theta.abs().max().clamp_min(1.0)))
        mask = self.search.kink_relevance(point, xs, "logit")
        self._relevance = {key: v for key, v in self._relevance.items() if v[0]() is not None}
        self._relevance[id(x)] = (weakref.ref(x), mask)
        return mask

    def _analyse(self, iv: _Intervals) -> tuple[torch.Tensor, ...]:
        """What a round reads from each interval's end patterns: whether it crosses [K], the first
        roots its cubic interpolants predict [K, roots_per_round] (in u, inf: none), whether all
        its crossings are sign changes of distances that one round places [K], and its least
        certain unit's certified coverage and gap [K] each (_dip_gap).

        Each takes ~15 [K, units] float64 temporaries. On the CPU they are computed in blocks of
        intervals that keep a temporary within a core's cache (analysis_elements): whole rounds
        of a window's intervals took 8× as long (3,249 intervals of 1,536 units: 2.0 s against
        0.24 s in blocks of 64, bit for bit the same). On other devices a round is one block."""
        units = max(1, iv.start[0].shape[1] + iv.start[2].shape[1])
        size = max(1, self.analysis_elements // units) if iv.a.device.type == "cpu" else max(1, len(iv))
        parts = [self._analyse_block(iv.take(slice(i, i + size))) for i in range(0, max(1, len(iv)), size)]
        return tuple(torch.cat(values) for values in zip(*parts))

    def _analyse_block(self, iv: _Intervals) -> tuple[torch.Tensor, ...]:
        curves = _hermite(iv)
        return (iv.crossing(), _first_roots(iv, curves, self.roots_per_round),
                _distances_only(iv, self.roots_per_round), *_dip_gap(iv, curves, self.curvature_safety))

    def _probes(self, iv: _Intervals, crossing: torch.Tensor, root: torch.Tensor, gap: torch.Tensor) -> torch.Tensor:
        """Points to probe in each interval, as fractions u ∈ (0, 1) of it: [K, 2·roots] (NaN:
        unused). A crossing interval gets a tight bracket around each of its first predicted
        roots (thirds for an argmax switch alone); an uncertified one a point in its least
        certain unit's gap and one in its larger part."""
        k, n = len(iv), 2 * self.roots_per_round
        half = self._half_bracket(iv)[:, None]
        bracket = torch.stack([torch.maximum(root - half, half / 2), torch.minimum(root + half, 1 - half / 2)], 2)
        bracket = torch.where(torch.isfinite(root)[:, :, None], bracket, torch.nan).flatten(1)
        fill = torch.full((k, n - 2), torch.nan, dtype=root.dtype, device=root.device)
        thirds = torch.cat([torch.tensor([1 / 3, 2 / 3], dtype=root.dtype, device=root.device).expand(k, 2), fill], 1)
        inside = gap.clamp(1 / 8, 7 / 8)
        other = torch.where(inside < 0.5, (inside + 1) / 2, inside / 2)
        dips = torch.cat([torch.stack([inside, other], 1), fill], 1)
        located = torch.where(torch.isfinite(root[:, :1]), bracket, thirds)
        return torch.where(crossing[:, None], located, dips)

    def _split(self, seg: _Segments, iv: _Intervals, probes: torch.Tensor, columns,
               target: str = "logit") -> _Intervals:
        """Evaluate the pattern at the probes and cut each interval there."""
        k = len(iv)
        ends = torch.tensor([0.0, 1.0], dtype=probes.dtype, device=probes.device).expand(k, 2)
        u = torch.sort(torch.cat([ends, probes], 1), 1).values  # unused (NaN) probes sort last
        u = torch.nan_to_num(u, nan=1.0)  # … and become copies of the end
        inner = (u > 0) & (u < 1)
        width = (iv.b - iv.a)[:, None]
        at = iv.a[:, None] + u * width
        at[:, -1] = iv.b  # exactly, not a + 1·(b − a)
        row, col = torch.nonzero(inner, as_tuple=True)
        probed = self._pattern_rows(seg, iv.rows[row], at[row, col], columns, target)
        # each point of u names a pattern in [starts; ends; probes]: the first point is the
        # interval's start, an inner one its probe, any other (u = 1) its end. The pieces
        # gather theirs from that table, so no [K, points, units] copy of the patterns is made.
        index = (k + torch.arange(k, device=u.device))[:, None].repeat(1, u.shape[1])
        index[:, 0] = torch.arange(k, device=u.device)
        index[row, col] = 2 * k + torch.arange(len(row), device=u.device)
        table = [torch.cat(parts) for parts in zip(iv.start, iv.end, probed)]
        del probed
        keep = u[:, 1:] > u[:, :-1]  # pieces of zero width (unused probes) are dropped
        rows = iv.rows[:, None].expand(-1, keep.shape[1])[keep]
        first, last = index[:, :-1][keep], index[:, 1:][keep]
        return _Intervals(rows, at[:, :-1][keep], at[:, 1:][keep],
                          tuple(v[first] for v in table), tuple(v[last] for v in table))

    def _pattern_rows(self, seg: _Segments, rows, t, columns, target: str = "logit"):
        """The kink pattern's `columns` of rows[r] at t[r] of its segment, in passes of at most
        max_rows (and of window_row_bytes when the rows lie on several segments)."""
        size = self._pass_rows(seg) or len(rows)
        parts = [self.search.kink_pattern(*seg.of(r), tr, target) for r, tr in zip(rows.split(size), t.split(size))]
        return _columns(tuple(torch.cat(p) for p in zip(*parts)), columns)

    # ----------------------------------------------------------- error control

    @phase(KINK_SEARCH)
    def _searched(self, theta, delta, x, target: str) -> list[tuple]:
        """With a kink tolerance, per segment θ_s + tΔ_s (θ, Δ: [S, D]): the pieces of the
        inputs' paths whose plain integral misses, as (input index, lo, hi) [K] each, and the
        plain integral φ·Δ of every input [n, O] (float64). The other paths are one smooth piece
        for this purpose. One search for all the segments' paths that miss (see window)."""
        steps, n, tol = len(theta), len(x), self.kink_tolerance
        seg = _Segments(theta.to(torch.float64), delta.to(torch.float64), self.search.cast_inputs(x))
        relevant = self._relevant(seg.theta[0], x, seg.x)
        columns = None if relevant is None else (relevant, None)
        plain, missed, ends = self._plain_check(seg, columns, target)
        rows = torch.nonzero(missed > tol)[:, 0]
        self.stats.searched += len(rows)
        if not len(rows):
            return [((rows, plain.new_zeros(0), plain.new_zeros(0)), part) for part in plain.split(n)]
        ends = [self._pattern_rows(seg, rows, torch.full_like(plain[rows, 0], t), columns, target) if both is None
                else tuple(v[rows] for v in both) for t, both in zip((0.0, 1.0), ends)]
        intervals = _Intervals(rows, plain.new_zeros(len(rows)), plain.new_ones(len(rows)), *ends, miss=missed[rows])
        done, unresolved = [], []

        def search(intervals: _Intervals, depth: int) -> _Intervals | None:
            if depth == self.max_rounds:  # out of rounds: the last pieces are accepted as they are
                done.append((intervals.rows, intervals.a, intervals.b))
                unresolved.append(intervals.rows[intervals.miss > tol])
                return None
            pieces = torch.bincount(torch.cat([*(d[0] for d in done), intervals.rows]), minlength=seg.rows)
            ok = intervals.miss <= tol
            # too narrow to cut, or too many pieces already: accepted as they are
            stop = ~ok & ((intervals.b - intervals.a <= self.resolution) | (pieces[intervals.rows] > 4 * self.max_kinks))
            unresolved.append(intervals.rows[stop])
            ok |= stop
            done.append((intervals.rows[ok], intervals.a[ok], intervals.b[ok]))
            missing = intervals.take(~ok)
            if not len(missing):
                return None
            cut = self._split(seg, missing, self._cuts(missing), columns, target)
            cut.miss = self._misses(seg, cut, target)
            return cut

        self._depth_first(intervals, search, lambda iv: self._with_ends(seg, iv, columns, target))
        owner, lo, hi = (torch.cat(v) for v in zip(*done))
        order = torch.argsort(owner.double() * 2 + lo)
        self.stats.kinks += len(owner) - len(rows)
        self.stats.unresolved += len(torch.unique(torch.cat(unresolved)))
        owner, lo, hi = owner[order], lo[order], hi[order]
        counts = torch.bincount(owner // n, minlength=steps).tolist()
        return [((o % n, a, b), part) for o, a, b, part
                in zip(owner.split(counts), lo.split(counts), hi.split(counts), plain.split(n))]

    def _plain_check(self, seg: _Segments, columns, target: str) -> tuple:
        """Every path's plain integral φ·Δ [S·n, O] (float64; row s·n + i: input i on segment s),
        how far it misses the change of the explained outputs [S·n], and every path's patterns at
        both ends, or (None, None). One segment goes through passes with its parameters over
        chunks of inputs; several through passes at each segment's point, vmapped over the
        segments (_segment_passes: their patterns at the ends give the change and are kept for
        the search), or per-row passes where a segment's inputs are more rows than a pass takes."""
        with torch.no_grad():
            if len(seg.theta) > 1:
                start, end = (self._ends(seg, t, columns, target) for t in (0.0, 1.0))
                lo = torch.zeros(seg.rows, dtype=torch.float64, device=seg.theta.device)
                whole = _Intervals(torch.arange(seg.rows, device=lo.device), lo, lo + 1, start, end)
                passes = self._segment_passes(seg)
                plain = self._integrals(seg, whole, target) if passes is None else \
                    torch.cat([self._plain_integral(seg.theta[part], seg.delta[part], seg.x, target) for part in passes])
                return plain, self._misses(seg, whole, target, plain), (start, end)
            plain, missed = [], []
            th, de = seg.theta[0], seg.delta[0]
            for c in seg.x.split(self.max_rows or len(seg.x)):
                change = self.search.explained(th + de, c, target) - self.search.explained(th, c, target)
                integral = self._plain_integral(th, de, c, target)
                plain.append(integral)
                missed.append((change - integral).abs().amax(1))
            return torch.cat(plain), torch.cat(missed), (None, None)

    def _cuts(self, iv: _Intervals) -> torch.Tensor:
        """Where to cut pieces that miss, as fractions u ∈ (0, 1) of each: [K, 2·roots] (NaN:
        unused). Sign changes of distances are cut at the roots their cubic interpolants
        predict, not bracketed as the certified search does: a piece whose integral then
        matches its change needs no tighter placement (a bracket would leave a sliver piece per
        kink, each with its own Q nodes), and one that still misses has the crossing near an end,
        where the next round's interpolant places it far better. A root predicted within a
        bracket's half-width of an end is bracketed instead: a cut there would leave the piece
        almost as it was (a crossing at the end itself, whose distance rounds to the wrong side,
        is predicted ~1e-18 inside and would be cut again every round). Other crossings (an
        argmax switch, more sign changes than one round places) are probed as in the certified
        search; a piece that shows no crossing is cut in its least certain unit's gap."""
        crossing, roots, distances_only, _, gap = self._analyse(iv)
        probes = self._probes(iv, crossing, roots, gap)
        half = self._half_bracket(iv)[:, None]
        clear = ~torch.isfinite(roots) | ((roots >= half) & (roots <= 1 - half))
        at_roots = crossing & distances_only & clear.all(1)
        placed = torch.cat([torch.where(torch.isfinite(roots), roots, torch.nan), torch.full_like(roots, torch.nan)], 1)
        return torch.where(at_roots[:, None], placed, probes)

    def _half_bracket(self, iv: _Intervals) -> torch.Tensor:
        """Half the width of the bracket around a predicted root, as a fraction of each interval:
        [K]. The bracket spans at most half the settle width, so the next round places the root."""
        return torch.clamp(self.settle_width / 4 / (iv.b - iv.a), max=2.0**-4)

    def _misses(self, seg: _Segments, iv: _Intervals, target: str, integrals=None) -> torch.Tensor:
        """How far each piece's Q-node integral (given, or computed here) misses the change of
        its ends' outputs: [K]."""
        integrals = self._integrals(seg, iv, target) if integrals is None else integrals
        return (iv.end[3] - iv.start[3] - integrals).abs().amax(1)

    def _plain_integral(self, theta: torch.Tensor, delta: torch.Tensor, x: torch.Tensor, target: str) -> torch.Tensor:
        """The plain Q-node integral φ·Δ of every input on one segment (θ, Δ: [D]), [n, O], or on
        each of S segments (θ, Δ: [S, D]), [S·n, O] with row s·n + i for input i on segment s: a
        pass over the inputs at each node, vmapped over the segments (on the reference workload
        with `kink_tolerance`, 19–26 ms, and the check that uses it 41–59 ms of a call against
        100–109 ms by per-row passes)."""
        return sum(w * self.search.directional(theta + t * delta, delta, x, target)
                   for t, w in zip(self.t_search, self.w_search))

    def _integrals(self, seg: _Segments, iv: _Intervals, target: str) -> torch.Tensor:
        """Each piece's Q-node integral φ·Δ of the explained outputs: [K, O]."""
        width = (iv.b - iv.a)[:, None]
        t = (iv.a[:, None] + width * self.t_search).flatten()
        w = (width * self.w_search).flatten()
        rows = iv.rows.repeat_interleave(len(self.t_search))
        size = self._pass_rows(seg) or len(t)
        along = torch.cat([self.search.directional_along(*seg.of(r), tr, target)
                           for r, tr in zip(rows.split(size), t.split(size))]) * w[:, None]
        return along.view(len(iv), len(self.t_search), -1).sum(1)

    # ----------------------------------------------------------------- nodes

    def _nodes(self, theta, delta, x, target: str, pieces=None):
        """Quadrature rows of the inputs whose segment has more than one smooth piece: (input
        index, node t, weight), [R] each, Q nodes on each piece (the other inputs take the plain
        rule's shared nodes, see _integral); and the float64 plain integral φ·Δ of every input
        when the kink tolerance computed it (else None). `pieces`: what search_steps found for
        the segment already, else None."""
        dev, dt = self.flat.device, self.flat.dtype
        (owner, lo, hi), plain = self.search_steps(theta[None], delta[None], x, target)[0] if pieces is None else pieces
        owner, lo, hi = owner.to(dev), lo.to(dev, dt), hi.to(dev, dt)
        width = hi - lo
        t = (lo[:, None] + width[:, None] * self.t_nodes).flatten()
        w = (width[:, None] * self.t_weights).flatten()
        return owner.repeat_interleave(len(self.t_nodes)), t, w, plain

    # ----------------------------------------------------------------- integrals

    def _integral(self, theta, delta, x, target: str, out: torch.Tensor, size: int | None, plain_at, rows_at,
                  change: bool = False, pieces=None, joining: int = 0) -> torch.Tensor:
        """Add Σ_r w_r · (integrand at node r) of every input into out [n, ...] (zeros) and return it.

        Inputs whose segment is one smooth piece (all of them when no kinks are located) share
        the plain rule's nodes: plain_at(out, inputs, t, w) adds w × the integrand at t of a
        chunk of inputs, one pass with one set of parameters (large matrix products). The others
        take per-row nodes on their pieces: rows_at(out, rows, t, w) adds each row's weighted
        integrand into out at its input, each row with its own input and point. Both add in
        place, so no result is assembled from parts afterwards. size: the most rows
        of one pass (None: no bound). change: the integrand is φ·Δ of all outputs, so the kink
        tolerance's check has already computed the plain part, and for a very few inputs and
        nodes one per-row pass over all nodes beats a pass per node, whose fixed cost they do
        not amortise (measured: 5× faster for 1 input and 10 nodes of the default Transformer,
        1.2× for 2 inputs of the CNN; 2× slower for the CNN's 4 inputs or 40 rows). pieces: what
        search_steps found for the segment (and counted), or None: searched here. joining: when
        some inputs take per-row nodes, up to this many smooth ones take their plain nodes as
        rows of the same passes instead of passes of their own."""
        n = len(x)
        if not self.searches and pieces is None:
            everyone, nodes = torch.arange(n, device=x.device), len(self.t_nodes)
            if change and n <= self.few_inputs and n * nodes <= self.few_rows:
                self._add_rows(out, everyone.repeat_interleave(nodes), self.t_nodes.repeat(n),
                               self.t_weights.repeat(n), size, rows_at)
            else:
                self._plain(out, everyone, size, plain_at)
            return out
        owner, t, w, checked = self._nodes(theta, delta, x, target, pieces)
        smooth = _smooth_inputs(owner.to(x.device), n)
        if change and checked is not None:
            out[smooth] = checked[smooth.to(checked.device)].to(out)
        elif len(owner) and len(smooth) <= joining:  # their nodes join the kinked rows' passes (see jacobian)
            owner, t, w = _joined(owner, t, w, smooth.to(owner.device), self.t_nodes, self.t_weights)
        else:
            self._plain(out, smooth, size, plain_at)
        self._add_rows(out, owner, t, w, size, rows_at)
        return out

    @staticmethod
    def _add_rows(out: torch.Tensor, owner, t, w, size: int | None, rows_at) -> None:
        """Add the weighted integrand of the rows (owner, t, w) into out, in passes of at most
        `size` rows (None: one)."""
        if not len(t):
            return
        for c in torch.arange(len(t), device=t.device).split(size or len(t)):
            rows_at(out, owner[c], t[c], w[c])

    def jacobian(self, theta, delta, x, select, target: str, n_outputs: int, pieces=None) -> torch.Tensor:
        """φ_s for every input and selected output: [T, O, D]; `pieces`: what search_steps found
        for the segment (None: searched here).

        All (input, node) rows go through batched reverse passes, in groups that keep the
        per-node gradients below `max_elements`. Under a memory budget, a pass on kinked
        segments (after the search) takes the rows that the pass's bytes count for one plain
        node's Jacobians (2·O·D per input, so half the inputs at ~4·O·D a row) and as many more
        as the kink search's bytes hold.
        """
        dim = len(theta)
        size = max(1, self.max_elements // (n_outputs * dim))
        if self.max_rows:
            size = min(size, self.max_rows)
        if self.search_bytes is not None and self.searches:
            per_row = 4 * n_outputs * dim * self.flat.dtype.itemsize + self._costs(x)[1]
            allowance = (self.search_reserve(x, len(x)) + self.search_bytes) // per_row
            size = min(size, max(1, len(x) // 2) + allowance)

        def sel(i):
            return None if select is None else select[i.to(select.device)]

        out = torch.zeros(len(x), n_outputs, dim, dtype=self.flat.dtype, device=self.flat.device)
        return self._integral(
            theta, delta, x, target, out, size,
            lambda out, i, t, w: self.flat.add_jacobian(out, i, theta + t * delta, x[i], sel(i), target, w),
            lambda out, i, t, w: self.flat.add_node_jacobians(out, i, theta, delta, x[i.to(x.device)], t, w, sel(i),
                                                              target),
            pieces=pieces, joining=self.join_elements // (n_outputs * dim))

    def rows(self, n_inputs: int, pieces) -> int:
        """How many (input, node) rows the integral of a segment takes for n inputs: Q per smooth
        piece; `pieces`: what search_steps found (None: one piece each)."""
        if pieces is None:
            return n_inputs * len(self.t_nodes)
        owner = pieces[0][0]
        return len(self.t_nodes) * (len(owner) + n_inputs - len(torch.unique(owner)))

    @phase(MIXED_KERNEL)
    def kernel(self, theta, delta, x, select, target: str, n_outputs: int, tangents: torch.Tensor,
               parts: list[slice], calls: list[Call], pieces: list) -> torch.Tensor:
        """φ_s restricted to each part of θ times the tangents [V, D] of its segment, for S segments
        θ_s + tΔ_s (θ, Δ: [S, D]; tangents [S, V, D]), every input and selected output, by mixed
        mode (explaind.mixed; `calls`: MixedMode.calls'): [S, parts, T, O, V], as jacobian's
        φ_s[..., part] @ tangents[s][:, part]ᵀ. Every row (segment, input, node), plain nodes
        included, takes a per-row pass, in passes of at most max_elements over what a row holds
        (MixedMode.row_elements), a pass taking rows of several segments. `pieces`: each segment's
        as for jacobian."""
        size = max(1, self.max_elements // self.mixed.row_elements(calls, n_outputs, tangents.shape[1]))
        if self.max_rows:
            size = min(size, self.max_rows)
        rows = [self._segment_rows(th, d, x, target, p) for th, d, p in zip(theta, delta, pieces)]
        step = torch.cat([torch.full_like(owner, s) for s, (owner, _, _) in enumerate(rows)])
        owner, t, w = (torch.cat(column) for column in zip(*rows))
        out = torch.zeros(len(theta), len(parts), len(x), n_outputs, tangents.shape[1], dtype=self.flat.dtype,
                          device=self.flat.device)
        for c in torch.arange(len(t), device=t.device).split(size):
            i = owner[c].to(self.flat.device)
            sel = None if select is None else select[i.to(select.device)]
            self.mixed.add_kernel(out, step[c].to(self.flat.device), i, theta, delta, x[i.to(x.device)], t[c], w[c],
                                  sel, target, tangents, parts, calls)
        return out

    def _segment_rows(self, theta, delta, x, target: str, pieces):
        """Every (input, node t, weight) row of a segment's integral, ordered by input: Q nodes per
        smooth piece, the plain rule's for an input whose path is one piece. `pieces` as for
        jacobian."""
        if not self.searches and pieces is None:
            owner, t, w = (torch.zeros(0, dtype=torch.long, device=self.flat.device), self.t_nodes[:0],
                           self.t_weights[:0])
        else:
            owner, t, w, _ = self._nodes(theta, delta, x, target, pieces)
        return _joined(owner, t, w, _smooth_inputs(owner, len(x)), self.t_nodes, self.t_weights)

    @phase(FORWARD_MODE)
    def change(self, theta, delta, x, target: str, pieces=None) -> torch.Tensor:
        """φ_s(x)·Δθ_s for every input and all outputs, by forward mode: [T, O]; `pieces`: what
        search_steps found for the segment (None: searched here)."""
        out = self._zeros(theta, x, target)
        return self._integral(
            theta, delta, x, target, out, self.max_rows,
            lambda out, i, t, w: out.index_add_(0, i, self.flat.directional(theta + t * delta, delta, x[i], target),
                                                alpha=w),
            lambda out, i, t, w: out.index_add_(
                0, i, self.flat.directional_along(theta, delta, x[i.to(x.device)], t, target) * w[:, None]),
            change=True, pieces=pieces)

    @phase(FORWARD_MODE)
    def directional(self, theta, delta, x, tangents, target: str, select=None, pieces=None) -> torch.Tensor:
        """φ_s(x)·v for every input, selected output and tangent v [V, D], by forward mode:
        [T, O, V]. Far cheaper than the Jacobian when only a few contractions are needed.
        `pieces` as for jacobian."""
        out = self._zeros(theta, x, target, len(tangents))
        self._integral(
            theta, delta, x, target, out, self._directional_rows(x, len(tangents)),
            lambda out, i, t, w: out.index_add_(
                0, i, self.flat.directional_many(theta + t * delta, tangents, x[i], target).permute(1, 2, 0), alpha=w),
            lambda out, i, t, w: out.index_add_(
                0, i, (self.flat.directional_rows(theta, delta, x[i.to(x.device)], t, tangents, target)
                       * w[:, None, None]).transpose(1, 2)),
            pieces=pieces)
        if select is not None:
            out = out.gather(1, select.to(out.device)[:, :, None].expand(-1, -1, out.shape[2]))
        return out

    def _directional_rows(self, x: torch.Tensor, n_tangents: int) -> int | None:
        """The most rows of one forward-mode pass of `directional`: max_rows, and under a memory
        budget the chunk's inputs (the plan costs a pass over them) and as many more as the kink
        search's bytes hold, which it has given back once the pieces are found. A row holds its
        parameters and the pass's activations with an eighth more for scratch, as planned."""
        if self.search_bytes is None or not self.searches:
            return self.max_rows
        shape = tuple(x.shape[1:])
        if shape not in self._forward_sizes:
            self._forward_sizes[shape] = self.flat.forward_mode_sizes(x)
        sizes = self._forward_sizes[shape]
        per_row = self.flat.dtype.itemsize * (self.flat.layout.dim + sizes.elements(1, n_tangents))
        rows = len(x) + (self.search_reserve(x, len(x)) + self.search_bytes) // per_row
        return min(rows, self.max_rows or rows)

    def _zeros(self, theta, x, target: str, *trailing: int) -> torch.Tensor:
        """Zeros [T, O, *trailing] for integrands over all O outputs. O comes from one input's
        forward pass, once per input shape: these integrals run at every step."""
        shape = tuple(x.shape[1:])
        if shape not in self._output_counts:
            with torch.no_grad():
                self._output_counts[shape] = self.flat.explained(theta.to(self.flat.dtype), x[:1], target).shape[1]
        return torch.zeros(len(x), self._output_counts[shape], *trailing, dtype=self.flat.dtype,
                           device=self.flat.device)

    def _plain(self, out: torch.Tensor, rows: torch.Tensor, size: int | None, at) -> None:
        """Add Σ_r w_r · integrand(t_r) of the inputs `rows` into out, with the plain rule's
        nodes, which are the same for every input: each node is one pass over a chunk of at
        most `size` inputs (None: all) with one set of parameters."""
        if not len(rows):
            return
        for chunk in rows.split(size or len(rows)):
            for t, w in zip(self.t_nodes, self.t_weights.tolist()):
                at(out, chunk, t, w)


def _no_kinks(theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """No kink: (input index [0], position [0]) on θ's device."""
    return torch.zeros(0, dtype=torch.long, device=theta.device), theta.new_zeros(0, dtype=torch.float64)


def _smooth_inputs(owner: torch.Tensor, n: int) -> torch.Tensor:
    """The inputs of 0 … n − 1 that own no per-row node (their path is one smooth piece), on
    owner's device."""
    pieced = torch.zeros(n, dtype=torch.bool, device=owner.device)
    pieced[owner] = True
    return torch.arange(n, device=owner.device)[~pieced]


def _joined(owner, t, w, inputs: torch.Tensor, t_nodes: torch.Tensor, t_weights: torch.Tensor):
    """The rows (owner, t, w) with the plain nodes of `inputs` added, in order of owner (so that
    a pass sums each owner's rows as one run)."""
    nodes = len(t_nodes)
    owner = torch.cat([owner, inputs.repeat_interleave(nodes)])
    order = torch.sort(owner, stable=True).indices
    return owner[order], torch.cat([t, t_nodes.repeat(len(inputs))])[order], \
        torch.cat([w, t_weights.repeat(len(inputs))])[order]


def _pieces(rows: torch.Tensor, kinks: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The smooth pieces (input index, lo, hi) [K] of the inputs with kinks, from the sorted
    kinks (input index, position) of n inputs."""
    pieces = torch.bincount(rows, minlength=n) + 1
    first = torch.cumsum(pieces, 0) - pieces  # each input's first piece
    lo = kinks.new_zeros(int(pieces.sum()))
    hi = torch.ones_like(lo)
    rank = torch.arange(len(rows), device=rows.device) - (torch.cumsum(pieces - 1, 0) - (pieces - 1))[rows]
    lo[first[rows] + rank + 1] = kinks
    hi[first[rows] + rank] = kinks
    owner = torch.repeat_interleave(torch.arange(n, device=rows.device), pieces)
    kinked = pieces[owner] > 1
    return owner[kinked], lo[kinked], hi[kinked]


def _columns(pattern, columns: tuple[torch.Tensor | None, torch.Tensor | None] | None):
    """The columns (distances [P] bool, argmax indices [P'] bool; None: all) of a pattern
    (z, dz/dt, indices, outputs) that a search follows."""
    if columns is None:
        return pattern
    (z, dz, idx, out), (distances, indices) = pattern, columns
    if distances is not None:
        z, dz = z[:, distances], dz[:, distances]
    return z, dz, idx if indices is None else idx[:, indices], out


def _whole(start, end, rows: torch.Tensor, columns) -> _Intervals:
    """The whole segments [0, 1] of `rows`, with the `columns` of their patterns at both ends."""
    k = len(rows)
    return _Intervals(rows, torch.zeros(k, dtype=torch.float64, device=rows.device),
                      torch.ones(k, dtype=torch.float64, device=rows.device),
                      _columns(tuple(v[rows] for v in start), columns), _columns(tuple(v[rows] for v in end), columns))


def _spread(common_rows: torch.Tensor, common_t: torch.Tensor, rows: torch.Tensor, seg: _Segments
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """The kinks of parameters alone, found on each segment's first row (common_rows, common_t),
    given to every one of `rows` on that segment: (row [K], position [K])."""
    n = len(seg.x)
    order = torch.argsort(common_rows, stable=True)
    per_segment = torch.bincount(common_rows[order] // n, minlength=len(seg.theta))
    segment = rows // n
    repeats = per_segment[segment]
    first = (torch.cumsum(per_segment, 0) - per_segment)[segment].repeat_interleave(repeats)
    rank = torch.arange(int(repeats.sum()), device=rows.device)
    rank -= (torch.cumsum(repeats, 0) - repeats).repeat_interleave(repeats)
    return rows.repeat_interleave(repeats), common_t[order][first + rank]


def _hermite(iv: _Intervals) -> tuple[torch.Tensor, ...]:
    """Coefficients c0…c3 of each unit's cubic Hermite interpolant in u = (t − a)/(b − a)."""
    (za, dza, _, _), (zb, dzb, _, _) = iv.start, iv.end
    width = (iv.b - iv.a)[:, None]
    ga, gb = dza * width, dzb * width
    return za, ga, 3 * (zb - za) - 2 * ga - gb, 2 * (za - zb) + ga + gb


def _first_roots(iv: _Intervals, curves: tuple[torch.Tensor, ...], count: int) -> torch.Tensor:
    """The first `count` roots in (0, 1) that the cubic interpolants (curves: _hermite's) of
    the units with a sign change predict, ascending: [K, count] (inf: none). Newton from the
    secant's root, on those units alone: few of an interval's units change sign, and Newton over
    all of them took 5.6× as long (64 intervals of 3,072 units, 1.6% changing: 14 ms against
    2.5 ms, bit for bit the same roots)."""
    za, zb = iv.start[0], iv.end[0]
    at = ((za > 0) != (zb > 0)).nonzero(as_tuple=True)
    c0, c1, c2, c3 = (c[at] for c in curves)
    a, b = za[at], zb[at]
    u = a / (a - b)
    for _ in range(4):
        value = c0 + u * (c1 + u * (c2 + u * c3))
        slope = c1 + u * (2 * c2 + 3 * u * c3)
        step = torch.where(slope != 0, value / torch.where(slope != 0, slope, 1.0), 0.0)
        u = (u - step).clamp(0, 1)
    # Newton left the interval (a unit heading away first), unless that end is the root itself
    stuck = ((u == 0) & (a != 0)) | ((u == 1) & (b != 0))
    if stuck.any():
        u[stuck] = _bisect_root(c0[stuck], c1[stuck], c2[stuck], c3[stuck])
    roots = torch.full((len(za), max(za.shape[1], count)), torch.inf, dtype=za.dtype, device=za.device)
    roots[at] = u
    return torch.topk(roots, count, dim=1, largest=False).values


def _bisect_root(c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor) -> torch.Tensor:
    """A root in (0, 1) of cubics c0 + c1·u + c2·u² + c3·u³ whose values at 0 and 1 differ in
    sign, by bisection to the last bit of u: [K]."""
    lo, hi = torch.zeros_like(c0), torch.ones_like(c0)
    positive_at_lo = c0 > 0  # the sides as a crossing counts them: > 0, and ≤ 0
    for _ in range(60):
        mid = (lo + hi) / 2
        with_lo = (c0 + mid * (c1 + mid * (c2 + mid * c3)) > 0) == positive_at_lo
        lo, hi = torch.where(with_lo, mid, lo), torch.where(with_lo, hi, mid)
    return (lo + hi) / 2


def _distances_only(iv: _Intervals, most: int) -> torch.Tensor:
    """Intervals whose crossings are all sign changes of distances, at most `most`: [K]."""
    (za, _, ia, _), (zb, _, ib, _) = iv.start, iv.end
    flips = ((za > 0) != (zb > 0)).sum(1)
    return (ia == ib).all(1) & (flips <= most)


def _dip_gap(iv: _Intervals, curves: tuple[torch.Tensor, ...], safety: float) -> tuple[torch.Tensor, torch.Tensor]:
    """For the least certain unit of each interval: how much of it the Taylor bounds from both
    ends certify (≥ 1: all of it), and the middle of the uncertified gap, in u: [K] each
    (curves: the units' cubic interpolants, _hermite's).

    Along u a unit on the side s at both ends has v = s·z ≥ 0 there; with |v''| ≤ K it stays
    ≥ 0 up to the reach of v₀ + v₀′u − Ku²/2 from the start, and likewise from the end. Units
    whose ends differ in sign are left to the crossing search.
    """
    c0, c1, c2, c3 = curves
    za, zb = iv.start[0], iv.end[0]
    side = torch.where(za > 0, 1.0, -1.0).to(za.dtype)
    curvature = safety * torch.maximum((2 * c2).abs(), (2 * c2 + 6 * c3).abs())
    from_start = _reach(side * c0, side * c1, curvature)
    from_end = _reach(side * zb, -side * (c1 + 2 * c2 + 3 * c3), curvature)
    coverage = torch.where((za > 0) == (zb > 0), from_start + from_end, torch.inf)
    if not coverage.shape[1]:
        return torch.full_like(iv.a, torch.inf), torch.full_like(iv.a, 0.5)
    worst, unit = coverage.min(1)
    pick = unit[:, None]
    a, e = from_start.gather(1, pick)[:, 0], from_end.gather(1, pick)[:, 0]
    gap = torch.where(torch.isfinite(worst), (a.clamp(max=1) + 1 - e.clamp(max=1)) / 2, 0.5)
    return worst, gap


def _reach(v: torch.Tensor, slope: torch.Tensor, curvature: torch.Tensor) -> torch.Tensor:
    """How far u ≥ 0 the bound v + slope·u − curvature·u²/2 stays ≥ 0 (v ≥ 0)."""
    v = v.clamp(min=0)
    safe = torch.where(curvature > 0, curvature, 1.0)
    bent = (slope + torch.sqrt(slope * slope + 2 * curvature * v)) / safe
    straight = torch.where(slope < 0, v / torch.where(slope < 0, -slope, 1.0), torch.inf)
    return torch.where(curvature > 0, bent, straight)
