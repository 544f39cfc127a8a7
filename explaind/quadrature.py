"""Quadrature rules for the path integral φ_s = ∫₀¹ J(θ_s + tΔθ_s) dt."""

from __future__ import annotations

import numpy as np

from .errors import InputError, is_whole

RULES = ("gauss", "midpoint")
# Each node is one Jacobian pass per step. numpy's Gauss–Legendre rule also slows down and loses
# accuracy past this (its weights' second moment is off by 1.5e-13 at 1,000 nodes; 3,000 take 7 s).
MAX_NODES = 1000


def nodes(n: int, rule: str = "gauss") -> tuple[np.ndarray, np.ndarray]:
    """Nodes t ∈ (0, 1) and weights (summing to 1) of an n-point rule on [0, 1].

    Gauss–Legendre integrates polynomials of degree 2n−1 exactly; the midpoint rule (the prior
    implementation's choice) only degree 1, so it needs far more nodes for the same error.
    """
    if not is_whole(n) or n < 1:
        raise InputError(f"the number of quadrature nodes must be a positive integer, got {n!r}")
    if n > MAX_NODES:
        raise InputError(
            f"quadrature={n} nodes: at most {MAX_NODES} (each node is one Jacobian pass per step). Fix: "
            "locate the kinks (breakpoints=True; kink_tolerance bounds the error) and keep a few "
            "Gauss–Legendre nodes, which integrate each smooth piece to degree 2n−1")
    if rule == "gauss":
        x, w = np.polynomial.legendre.leggauss(int(n))
        return (x + 1) / 2, w / 2
    if rule == "midpoint":
        return (np.arange(n) + 0.5) / n, np.full(n, 1.0 / n)
    raise InputError(f"unknown quadrature rule {rule!r}: use one of {RULES}")
