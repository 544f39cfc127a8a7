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
        if pattern.shape[1] == 0:
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

    def rows(self, theta, delta, x) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Quadrature rows: (input index, position t, weight), Q per smooth piece."""
        index, ts, ws = [], [], []
        for i, kinks in enumerate(self.kinks(theta, delta, x)):
            edges = torch.tensor([0.0, *kinks, 1.0], dtype=self.flat.dtype, device=self.flat.device)
            width = edges[1:] - edges[:-1]
            ts.append((edges[:-1, None] + width[:, None] * self.t_nodes).flatten())
            ws.append((width[:, None] * self.t_weights).flatten())
            index.append(torch.full((len(ts[-1]),), i, dtype=torch.long))
        return torch.cat(index).to(self.flat.device), torch.cat(ts), torch.cat(ws)

    # ----------------------------------------------------------------- integrals

    def jacobian(self, theta, delta, x, select, target: str) -> torch.Tensor:
        """φ_s for every input and selected output: [T, O, D]."""
        index, t, w = self.rows(theta, delta, x)
        if len(index) == len(x) * self.quadrature:  # no kinks: the nodes are shared
            phi = None
            for tq, wq in zip(self.t_nodes.tolist(), self.t_weights.tolist()):
                jac = self.flat.jacobian(theta + tq * delta, x, select, target)
                phi = jac.mul_(wq) if phi is None else phi.add_(jac, alpha=wq)
            return phi
        sel = None if select is None else select[index]
        jac = self.flat.jacobian_along(theta, delta, x[index], t, sel, target)
        phi = torch.zeros((len(x),) + jac.shape[1:], dtype=jac.dtype, device=jac.device)
        return phi.index_add_(0, index, jac * w[:, None, None])

    def change(self, theta, delta, x, target: str) -> torch.Tensor:
        """φ_s(x)·Δθ_s for every input and all outputs, by forward mode: [T, O]."""
        index, t, w = self.rows(theta, delta, x)
        along = self.flat.directional_along(theta, delta, x[index], t, target)
        out = torch.zeros((len(x), along.shape[1]), dtype=along.dtype, device=along.device)
        return out.index_add_(0, index, along * w[:, None])
