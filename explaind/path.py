"""The path integral φ_s(x) = ∫₀¹ J(x; θ_s + tΔθ_s) dt, exact for piecewise-smooth models.

Gauss–Legendre quadrature converges extremely fast on smooth integrands, but ReLU and
max-pooling make J jump wherever a unit's input crosses zero (or an argmax switches) along
the segment, and any fixed rule then converges only like 1/Q. So for each input we first
locate those kinks by repeated sectioning on the forward pass's kink pattern (a forward pass is far
cheaper than a Jacobian), then apply Q Gauss–Legendre nodes on each smooth piece.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .functional import FlatModel
from .quadrature import nodes


@dataclass
class KinkStats:
    """What the kink search found, reported in the cube's attributes."""

    kinks: int = 0  # kinks located (summed over steps and inputs)
    unresolved: int = 0  # (step, input) segments with more kinks than the cap: plain quadrature
    segments: int = 0

    def as_attrs(self) -> dict:
        return {"kinks_located": self.kinks, "kink_segments_unresolved": self.unresolved}


@dataclass
class PathIntegral:
    flat: FlatModel
    quadrature: int = 4
    rule: str = "gauss"
    breakpoints: bool = True
    max_kinks: int = 16  # per input and step; beyond it the segment is integrated plainly
    stats: KinkStats = field(default_factory=KinkStats)

    # Parts an interval is cut into per round of the kink search. Each part costs a forward
    # pass with its own parameter vector, so halving (the fewest passes) wins over the
    # fewer rounds of finer cuts on CPU.
    SECTIONS = 2
    # elements of the per-node gradients held at once while computing φ (2^26: 512 MB in float64)
    max_elements: int = 2**26

    def __post_init__(self):
        t, w = nodes(self.quadrature, self.rule)
        self.t_nodes = torch.tensor(t, dtype=self.flat.dtype, device=self.flat.device)
        self.t_weights = torch.tensor(w, dtype=self.flat.dtype, device=self.flat.device)
        # The search runs in float64 whatever the working dtype: along a short segment a
        # float32 θ + tΔ takes few distinct values, and its rounding makes patterns flicker.
        self.search = FlatModel(self.flat.model, self.flat.layout, torch.float64, self.flat.device)
        # it stops at this width: the misplaced sliver of J is then below rounding
        self.resolution = 2.0**-40

    # ----------------------------------------------------------------- kinks

    def kinks(self, theta: torch.Tensor, delta: torch.Tensor, x: torch.Tensor) -> list[list[float]]:
        """Sorted kink positions t ∈ (0, 1) per input (empty for a smooth segment).

        Every interval whose end patterns differ is cut into `SECTIONS` parts per round
        (one batched forward pass for all intervals), keeping the parts whose end patterns
        differ, until they are narrower than the resolution.
        """
        n = len(x)
        found: list[list[float]] = [[] for _ in range(n)]
        self.stats.segments += n
        if not self.breakpoints:
            return found
        dev, dt = self.flat.device, torch.float64
        theta, delta, x = theta.to(dt), delta.to(dt), self.search.cast_inputs(x)
        ends = torch.cat([torch.zeros(n), torch.ones(n)]).to(dev, dt)
        pattern = self.search.kink_pattern(theta, delta, torch.cat([x, x]), ends)
        if pattern.shape[1] == 0:  # the model has no piecewise-linear op: smooth everywhere
            self.breakpoints = False
            return found
        rows = torch.nonzero((pattern[:n] != pattern[n:]).any(1)).flatten()
        a, b = torch.zeros(len(rows), dtype=dt, device=dev), torch.ones(len(rows), dtype=dt, device=dev)
        pa, pb = pattern[:n][rows], pattern[n:][rows]
        fractions = torch.arange(1, self.SECTIONS, dtype=dt, device=dev) / self.SECTIONS
        while len(rows):
            inner = a[:, None] + (b - a)[:, None] * fractions  # [K, S−1]
            k, s = inner.shape
            pm = self.search.kink_pattern(theta, delta, x[rows].repeat_interleave(s, 0), inner.flatten())
            patterns = torch.cat([pa[:, None], pm.view(k, s, -1), pb[:, None]], 1)  # [K, S+1, P]
            cuts = torch.cat([a[:, None], inner, b[:, None]], 1)
            changed = (patterns[:, 1:] != patterns[:, :-1]).any(-1)  # [K, S]
            interval, part = torch.nonzero(changed, as_tuple=True)
            rows = rows[interval]
            a, b = cuts[interval, part], cuts[interval, part + 1]
            pa, pb = patterns[interval, part], patterns[interval, part + 1]
            narrow = b - a <= self.resolution
            for i, t in zip(rows[narrow].tolist(), ((a + b) / 2)[narrow].tolist()):
                found[i].append(t)
            rows, a, b, pa, pb = rows[~narrow], a[~narrow], b[~narrow], pa[~narrow], pb[~narrow]
            # an input with very many kinks is not worth resolving: integrate it plainly
            crowded = torch.bincount(rows, minlength=n) > self.max_kinks
            if crowded.any():
                for i in torch.nonzero(crowded).flatten().tolist():
                    found[i] = None  # type: ignore[call-overload]
                keep = ~crowded[rows]
                rows, a, b, pa, pb = rows[keep], a[keep], b[keep], pa[keep], pb[keep]
        self.stats.unresolved += sum(f is None for f in found)
        found = [[] if f is None else sorted(f) for f in found]
        self.stats.kinks += sum(len(f) for f in found)
        return found

    def nodes_per_input(self, theta, delta, x) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Quadrature nodes and weights per input, Q per smooth piece: [T, R] each, and the
        number of nodes each input uses (the rest are padding with zero weight)."""
        pieces = []
        for kinks in self.kinks(theta, delta, x):
            edges = torch.tensor([0.0, *kinks, 1.0], dtype=self.flat.dtype, device=self.flat.device)
            width = edges[1:] - edges[:-1]
            pieces.append(((edges[:-1, None] + width[:, None] * self.t_nodes).flatten(),
                           (width[:, None] * self.t_weights).flatten()))
        counts = torch.tensor([len(ti) for ti, _ in pieces])
        t = torch.full((len(x), int(counts.max())), 0.5, dtype=self.flat.dtype, device=self.flat.device)
        w = torch.zeros_like(t)
        for i, (ti, wi) in enumerate(pieces):
            t[i, : len(ti)], w[i, : len(wi)] = ti, wi
        return t, w, counts

    # ----------------------------------------------------------------- integrals

    def jacobian(self, theta, delta, x, select, target: str, n_outputs: int) -> torch.Tensor:
        """φ_s for every input and selected output: [T, O, D].

        Inputs without kinks share the Q nodes (one batched Jacobian per node); the others
        are sorted by their number of nodes and done in groups that pad little and keep the
        per-node gradients autograd holds below `max_elements`.
        """
        t, w, counts = self.nodes_per_input(theta, delta, x)
        dim = len(theta)
        phi = torch.zeros(len(x), n_outputs, dim, dtype=self.flat.dtype, device=self.flat.device)
        smooth = torch.nonzero(counts == self.quadrature).flatten().to(x.device)
        groups = smooth.split(max(1, self.max_elements // (n_outputs * dim * self.quadrature)))
        for group in groups if len(smooth) else ():
            sel = None if select is None else select[group]
            for tq, wq in zip(self.t_nodes.tolist(), self.t_weights.tolist()):
                phi[group] += wq * self.flat.jacobian(theta + tq * delta, x[group], sel, target)
        kinked = torch.nonzero(counts > self.quadrature).flatten()
        kinked = kinked[counts[kinked].argsort()]
        start = 0
        while start < len(kinked):
            nodes = int(counts[kinked[start]])
            size = max(1, self.max_elements // (n_outputs * dim * nodes))
            group = kinked[start : start + size]
            nodes = int(counts[group].max())
            g = group.to(x.device)
            sel = None if select is None else select[g]
            phi[g] = self.flat.path_jacobian(theta, delta, x[g], t[g, :nodes], w[g, :nodes], sel, target)
            start += len(group)
        return phi

    def change(self, theta, delta, x, target: str) -> torch.Tensor:
        """φ_s(x)·Δθ_s for every input and all outputs, by forward mode: [T, O]."""
        t, w, _ = self.nodes_per_input(theta, delta, x)
        rows = torch.arange(len(x), device=t.device).repeat_interleave(t.shape[1])
        along = self.flat.directional_along(theta, delta, x[rows], t.flatten(), target)
        return (along.view(len(x), t.shape[1], -1) * w[:, :, None]).sum(1)
