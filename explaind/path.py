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

    # elements of the per-node gradients held at once while computing φ (2^26: 512 MB in float64)
    max_elements: int = 2**26

    def __post_init__(self):
        t, w = nodes(self.quadrature, self.rule)
        self.t_nodes = torch.tensor(t, dtype=self.flat.dtype, device=self.flat.device)
        self.t_weights = torch.tensor(w, dtype=self.flat.dtype, device=self.flat.device)
        # The search runs in float64 whatever the working dtype: along a short segment a
        # float32 θ + tΔ takes few distinct values, and its rounding makes patterns flicker.
        self.search = FlatModel(self.flat.model, self.flat.layout, torch.float64, self.flat.device,
                                self.flat.constants)
        # it stops at this width: the misplaced sliver of J is then below rounding
        self.resolution = 2.0**-40

    # ----------------------------------------------------------------- kinks

    def kinks(self, theta: torch.Tensor, delta: torch.Tensor, x: torch.Tensor) -> list[list[float]]:
        """Sorted kink positions t ∈ (0, 1) per input (empty for a smooth segment).

        A kink lies wherever the pattern (signs of the distances, argmax indices) changes.
        Each round, every interval whose end patterns differ is probed at two points just
        either side of the earliest crossing that the distances predict by linear
        interpolation (the middle, for argmax changes); the parts whose end patterns differ
        are kept. Distances are nearly linear on a short step, so a kink is usually pinned to
        the resolution in a few rounds; every round is one batched forward pass.
        """
        n = len(x)
        found: list[list[float]] = [[] for _ in range(n)]
        self.stats.segments += n
        if not self.breakpoints:
            return found
        dev, dt = self.flat.device, torch.float64
        theta, delta, x = theta.to(dt), delta.to(dt), self.search.cast_inputs(x)
        ends = torch.cat([torch.zeros(n), torch.ones(n)]).to(dev, dt)
        dist, idx = self.search.kink_pattern(theta, delta, torch.cat([x, x]), ends)
        if dist.shape[1] + idx.shape[1] == 0:  # no piecewise-linear op: smooth everywhere
            self.breakpoints = False
            return found
        rows = torch.nonzero(_differs(dist[:n], idx[:n], dist[n:], idx[n:])).flatten()
        a, b = torch.zeros(len(rows), dtype=dt, device=dev), torch.ones(len(rows), dtype=dt, device=dev)
        da, ia, db, ib = dist[:n][rows], idx[:n][rows], dist[n:][rows], idx[n:][rows]
        while len(rows):
            probes = self._probes(a, b, da, db)  # [K, 2]
            k = len(rows)
            dm, im = self.search.kink_pattern(theta, delta, x[rows].repeat_interleave(2, 0), probes.flatten())
            cuts = torch.cat([a[:, None], probes, b[:, None]], 1)  # [K, 4]
            dists = torch.cat([da[:, None], dm.view(k, 2, -1), db[:, None]], 1)
            idxs = torch.cat([ia[:, None], im.view(k, 2, -1), ib[:, None]], 1)
            changed = _differs(dists[:, :-1], idxs[:, :-1], dists[:, 1:], idxs[:, 1:])  # [K, 3]
            interval, part = torch.nonzero(changed, as_tuple=True)
            rows = rows[interval]
            a, b = cuts[interval, part], cuts[interval, part + 1]
            da, ia = dists[interval, part], idxs[interval, part]
            db, ib = dists[interval, part + 1], idxs[interval, part + 1]
            narrow = b - a <= self.resolution
            for i, t in zip(rows[narrow].tolist(), ((a + b) / 2)[narrow].tolist()):
                found[i].append(t)
            keep = ~narrow
            # an input with very many kinks is not worth resolving: integrate it plainly
            crowded = torch.bincount(rows[keep], minlength=n) > self.max_kinks
            for i in torch.nonzero(crowded).flatten().tolist():
                found[i] = None  # type: ignore[call-overload]
            keep &= ~crowded[rows]
            rows, a, b, da, ia, db, ib = (v[keep] for v in (rows, a, b, da, ia, db, ib))
        self.stats.unresolved += sum(f is None for f in found)
        found = [[] if f is None else sorted(set(f)) for f in found]
        self.stats.kinks += sum(len(f) for f in found)
        return found

    def _probes(self, a, b, da, db) -> torch.Tensor:
        """Two points per interval bracketing its earliest predicted crossing: [K, 2]."""
        flips = (da > 0) != (db > 0)
        fraction = torch.where(flips, da / (da - db), torch.inf).min(1).values if da.shape[1] else None
        if fraction is None:
            fraction = torch.full_like(a, 0.5)
        fraction = torch.where(torch.isfinite(fraction), fraction, 0.5).clamp(0, 1)
        width = b - a
        centre = a + width * fraction
        # the bracket: wide enough to catch the crossing despite curvature, narrow enough to
        # shrink the interval ~2^10-fold a round
        half = torch.clamp(width * 2.0**-11, min=self.resolution / 4)
        low = torch.maximum(centre - half, a + self.resolution / 8)
        high = torch.minimum(centre + half, b - self.resolution / 8)
        return torch.stack([low, torch.maximum(high, low)], 1)

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
        are grouped by their number of nodes, in groups that keep the per-node gradients
        autograd holds below `max_elements`.
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
        # inputs with the same number of nodes go together: no padding, no wasted backward
        for nodes in torch.unique(counts[counts > self.quadrature]).tolist():
            same = torch.nonzero(counts == nodes).flatten()
            for group in same.split(max(1, self.max_elements // (n_outputs * dim * nodes))):
                g = group.to(x.device)
                sel = None if select is None else select[g]
                phi[g] = self.flat.path_jacobian(theta, delta, x[g], t[g, :nodes], w[g, :nodes], sel, target)
        return phi

    def change(self, theta, delta, x, target: str) -> torch.Tensor:
        """φ_s(x)·Δθ_s for every input and all outputs, by forward mode: [T, O]."""
        t, w, _ = self.nodes_per_input(theta, delta, x)
        rows = torch.arange(len(x), device=t.device).repeat_interleave(t.shape[1])
        along = self.flat.directional_along(theta, delta, x[rows], t.flatten(), target)
        return (along.view(len(x), t.shape[1], -1) * w[:, :, None]).sum(1)


def _differs(dist_a, idx_a, dist_b, idx_b) -> torch.Tensor:
    """Whether two patterns lie on different pieces (along the last dim)."""
    return ((dist_a > 0) != (dist_b > 0)).any(-1) | (idx_a != idx_b).any(-1)
