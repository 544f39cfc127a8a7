"""The path integral and its kink search, against hand-derived integrals and brute force.

φ = ∫₀¹ J(θ + tΔ) dt is checked three independent ways: closed-form integrals of a model
whose ReLU input is a quadratic in t, the path identity φ·Δ = f(θ + Δ) − f(θ) (forward
evaluations only), and materialised float64 Jacobians integrated piece by piece between kinks
that a dense scan of the pre-activations finds.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import xarray as xr
from torch import nn

import explaind as ex
from explaind import engine
from explaind.cube import residual_attrs
from explaind.functional import FlatModel, ParamLayout, layout_of
from explaind.path import PathIntegral, _Intervals
from explaind.quadrature import nodes
from explaind.verify import _reconstructions, residual_to_gap, restricted, with_refined
from engine_cases import Case, train

DT = torch.float64


class Product(nn.Module):
    """logits ±relu(w·v·x + c): along Δw = −2, Δv = −1.6 from w = v = 1, the ReLU input of
    x = 1 is the quadratic z(t) = (1 − 2t)(1 − 1.6t) + c."""

    def __init__(self, c: float):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1, dtype=DT))
        self.v = nn.Parameter(torch.ones(1, dtype=DT))
        self.out = nn.Parameter(torch.tensor([1.0, -1.0], dtype=DT))
        self.c = c

    def forward(self, x):
        return F.relu(self.w * self.v * x + self.c) * self.out


def flat_of(model: nn.Module) -> tuple[FlatModel, torch.Tensor]:
    layout = layout_of(model)
    theta = layout.flatten({n: p.detach() for n, p in model.named_parameters()})
    return FlatModel(model, layout, DT, "cpu"), theta


def record_full_batch(path, model: nn.Module, optimizer, x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
    """Record `steps` full-batch cross-entropy steps on (x, y), its rows dataset indices 0 … n − 1."""
    with ex.Recorder(path, model, optimizer) as rec:
        for _ in range(steps):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            rec.batch(torch.arange(len(x)), x, y)
            optimizer.step()


PRODUCT_DELTA = torch.tensor([-2.0, -1.6, 0.0, 0.0], dtype=DT)  # (w, v, out)


def integral(poly, pieces) -> float:
    """∫ of a numpy polynomial over a list of (start, stop) pieces."""
    anti = np.polynomial.Polynomial(poly).integ()
    return sum(anti(b) - anti(a) for a, b in pieces)


@pytest.mark.parametrize("n", [1, 3, 7])
def test_the_quadrature_rules_integrate_monomials_as_derived_by_hand(n):
    """On [0, 1], n Gauss–Legendre nodes integrate t^k exactly up to k = 2n − 1 and miss t^2n by
    (n!)^4 / ((2n + 1) ((2n)!)^2); the midpoint rule puts its nodes at (i + ½)/n with weights 1/n
    and integrates t² to 1/3 − 1/(12 n²)."""
    from math import factorial

    t, w = nodes(n, "gauss")
    for k in range(2 * n):
        assert float(w @ t**k) == pytest.approx(1 / (k + 1), rel=1e-13, abs=1e-15)
    missed = factorial(n) ** 4 / ((2 * n + 1) * factorial(2 * n) ** 2)
    assert 1 / (2 * n + 1) - float(w @ t ** (2 * n)) == pytest.approx(missed, rel=1e-9)
    t, w = nodes(n, "midpoint")
    np.testing.assert_allclose(t, (np.arange(n) + 0.5) / n, rtol=0, atol=1e-15)
    np.testing.assert_allclose(w, np.full(n, 1 / n), rtol=1e-15)
    assert float(w @ t**2) == pytest.approx(1 / 3 - 1 / (12 * n**2), rel=1e-13)


@pytest.mark.parametrize("n", [2.5, True, 0, -3])
def test_nodes_refuses_a_count_that_is_not_a_positive_integer(n):
    """2.5 nodes are not rounded to 2, nor True read as 1."""
    with pytest.raises(ex.InputError) as refused:
        nodes(n)
    assert str(refused.value) == f"the number of quadrature nodes must be a positive integer, got {n!r}"


def test_nodes_refuses_an_unknown_rule():
    with pytest.raises(ex.InputError) as refused:
        nodes(3, "simpson")
    assert str(refused.value) == "unknown quadrature rule 'simpson': use one of ('gauss', 'midpoint')"


def test_a_relu_input_that_crosses_zero_twice_in_one_step():
    """z(0) = 0.9 and z(1) = 0.5 are both positive; z < 0 on (0.375, 0.75)."""
    flat, theta = flat_of(Product(c=-0.1))
    x = torch.ones(1, 1, dtype=DT)
    path = PathIntegral(flat, quadrature=2)
    (kinks,) = path.kinks(theta, PRODUCT_DELTA, x)
    np.testing.assert_allclose(kinks, [0.375, 0.75], rtol=0, atol=1e-12)

    # φ by hand: on the pieces where z > 0, ∂f₀/∂w = v(t), ∂f₀/∂v = w(t), ∂f₀/∂out₀ = z(t)
    on = [(0.0, 0.375), (0.75, 1.0)]
    z = [0.9, -3.6, 3.2]  # (1 − 2t)(1 − 1.6t) − 0.1
    row = [integral([1, -1.6], on), integral([1, -2], on), integral(z, on), 0.0]
    expected = torch.tensor([row, [-row[0], -row[1], 0.0, row[2]]], dtype=DT)
    phi = path.jacobian(theta, PRODUCT_DELTA, x, None, "logit", 2)[0]
    torch.testing.assert_close(phi, expected, rtol=0, atol=1e-14)

    # without the kinks the same two nodes miss the dip
    plain = PathIntegral(flat, quadrature=2, breakpoints=False)
    miss = (plain.jacobian(theta, PRODUCT_DELTA, x, None, "logit", 2)[0] - expected).abs().max()
    assert miss > 1e-2


AWAY_THETA = torch.tensor([0.01, -0.6, 1.0, -1.0], dtype=DT)  # (w, v, out)
AWAY_DELTA = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=DT)


def test_a_relu_input_heading_away_from_zero_before_it_crosses():
    """z(t) = (0.01 + t)(t − 0.6) starts just below 0 and falls before it rises through 0 at
    t = 0.6: Newton from the secant's root leaves the segment at its start, and a search that
    took that end for the root cut slivers there until it ran out of rounds, dropping the kink."""
    flat, _ = flat_of(Product(c=0.0))
    x = torch.ones(1, 1, dtype=DT)
    path = PathIntegral(flat, quadrature=2)
    (kinks,) = path.kinks(AWAY_THETA, AWAY_DELTA, x)
    np.testing.assert_allclose(kinks, [0.6], rtol=0, atol=1e-12)
    assert path.stats.unresolved == 0

    on = [(0.6, 1.0)]  # z > 0 there: ∂f₀/∂w = v(t), ∂f₀/∂v = w(t), ∂f₀/∂out₀ = z(t)
    row = [integral([-0.6, 1], on), integral([0.01, 1], on), integral([-0.006, -0.59, 1], on), 0.0]
    expected = torch.tensor([row, [-row[0], -row[1], 0.0, row[2]]], dtype=DT)
    phi = path.jacobian(AWAY_THETA, AWAY_DELTA, x, None, "logit", 2)[0]
    torch.testing.assert_close(phi, expected, rtol=0, atol=1e-14)


class ClampedProduct(Product):
    """Product's ReLU written with another clamp-like op."""

    def __init__(self, relu):
        super().__init__(c=0.0)
        self.relu = relu

    def forward(self, x):
        return self.relu(self.w * self.v * x + self.c) * self.out


@pytest.mark.parametrize("relu", [
    lambda z: z.clamp_min(0), lambda z: torch.clamp_min(z, min=0.0), lambda z: -(-z).clamp_max(0),
    lambda z: z.clone().clamp_(min=0), lambda z: z.clone().clip_(0, None),
    lambda z: torch.maximum(z, torch.zeros_like(z)), lambda z: torch.max(torch.zeros_like(z), z),
    lambda z: -(-z).minimum(torch.zeros_like(z)), lambda z: torch.fmax(z, z.new_zeros(1)),
    lambda z: F.threshold(z, 0.0, 0.0), lambda z: nn.Threshold(0.5, 0.5)(z + 0.5) - 0.5,
    lambda z: torch.threshold(z, 0.0, 0.0),
    lambda z: torch.where(z > 0, z, 0.0), lambda z: z * (0 < z), lambda z: z.masked_fill(z.le(0), 0.0),
    lambda z: torch.where(torch.lt(z, torch.zeros_like(z)), torch.zeros_like(z), z),
    lambda z: (z + z * z.sign()) / 2, lambda z: torch.where(z.signbit(), 0.0, z),
], ids=["clamp_min", "torch.clamp_min", "clamp_max", "clamp_", "clip_", "maximum", "max of two tensors",
        "minimum", "fmax with a broadcast zero", "F.threshold", "nn.Threshold at 0.5", "torch.threshold",
        "where z > 0", "times a mask", "masked_fill", "where of two tensors compared", "sign", "signbit"])
@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # vmap over an in-place clamp_
def test_clamp_like_ops_are_kinks_too(relu):
    """These ops were not seen as kinks: the model counted as smooth, and its crossing was not cut.
    φ is the hand-derived one of test_a_relu_input_heading_away_from_zero_before_it_crosses."""
    flat, _ = flat_of(ClampedProduct(relu))
    x = torch.ones(1, 1, dtype=DT)
    path = PathIntegral(flat, quadrature=2)
    (kinks,) = path.kinks(AWAY_THETA, AWAY_DELTA, x)
    np.testing.assert_allclose(kinks, [0.6], rtol=0, atol=1e-12)
    on = [(0.6, 1.0)]
    row = [integral([-0.6, 1], on), integral([0.01, 1], on), integral([-0.006, -0.59, 1], on), 0.0]
    expected = torch.tensor([row, [-row[0], -row[1], 0.0, row[2]]], dtype=DT)
    torch.testing.assert_close(path.jacobian(AWAY_THETA, AWAY_DELTA, x, None, "logit", 2)[0], expected,
                               rtol=0, atol=1e-14)


class Activated(nn.Module):
    """logits ±act(a·x + b): along Δa = 2, Δb = 7 from a = 1, b = −6, the input of x = 1 runs
    z(t) = −5 + 9t, through a kink at z = k where t = (k + 5) / 9 (off centre: on a path symmetric
    about 0 plain Gauss–Legendre integrates hardswish' = ½ + an odd function exactly)."""

    def __init__(self, act):
        super().__init__()
        self.a = nn.Parameter(torch.tensor([1.0], dtype=DT))
        self.b = nn.Parameter(torch.tensor([-6.0], dtype=DT))
        self.out = nn.Parameter(torch.tensor([1.0, -1.0], dtype=DT))
        self.act = act

    def forward(self, x):
        return self.act(self.a * x + self.b) * self.out


ACTIVATED_DELTA = torch.tensor([2.0, 7.0, 0.0, 0.0], dtype=DT)  # (a, b, out)


@pytest.mark.parametrize("act, kinks, rounding", [
    (F.hardswish, [-3, 3], 1e-13), (lambda z: F.softshrink(z, 1.5), [-1.5, 1.5], 1e-13),
    (nn.Softshrink(), [-0.5, 0.5], 1e-13), (lambda z: F.elu(z, alpha=0.5), [0], 1e-13), (nn.CELU(2.0), [0], 1e-13),
    (F.selu, [0], 1e-13), (lambda z: F.hardswish(z.clone(), inplace=True), [-3, 3], 1e-13),
    (nn.Hardsigmoid(), [-3, 3], 1e-7),  # torch differentiates it with 1/6 in float32: 3e-8 off
    (lambda z: F.leaky_relu(z, 0.1), [0], 1e-13), (torch.abs, [0], 1e-13),
    (lambda z: F.relu6(2 * z), [0, 3], 1e-13), (nn.Hardtanh(-2.0, 2.0), [-2, 2], 1e-13),
    (nn.Softsign(), [0], 1e-7),  # z / (1 + |z|) in Python, named as a whole; 1 / (1 + |z|)² converges slowly
    (nn.RReLU(0.1, 0.3).eval(), [0], 1e-13),  # torch's rrelu has no vmap rule: a leaky ReLU of slope 0.2
    (lambda z: torch.linalg.vector_norm(z, ord=1, dim=-1, keepdim=True), [0], 1e-13),  # L1 norms: |z|
    (lambda z: z.norm(p=1, dim=1, keepdim=True), [0], 1e-13),
    (lambda z: F.pairwise_distance(z, -z, p=1, eps=0.0, keepdim=True), [0], 1e-13),
    (torch.absolute, [0], 1e-13), (lambda z: z.clone().abs_(), [0], 1e-13),  # abs by its other names
], ids=["hardswish", "softshrink 1.5", "nn.Softshrink", "elu 0.5", "nn.CELU 2", "selu", "hardswish in place",
        "nn.Hardsigmoid", "leaky_relu 0.1", "abs", "relu6 of 2z", "nn.Hardtanh ±2", "nn.Softsign", "nn.RReLU eval",
        "vector_norm ord=1", "Tensor.norm p=1", "pairwise_distance p=1", "absolute", "abs_"])
def test_piecewise_activations_are_kinks_at_their_breaks(act, kinks, rounding):
    """Each break is located where z(t) reaches it, and the integral between them is then exact: φ·Δ
    equals the change of the outputs (forward passes) to rounding, where plain quadrature misses."""
    flat, theta = flat_of(Activated(act))
    x = torch.ones(1, 1, dtype=DT)
    path = PathIntegral(flat, quadrature=12)
    (located,) = path.kinks(theta, ACTIVATED_DELTA, x)
    np.testing.assert_allclose(located, [(k + 5) / 9 for k in kinks], rtol=0, atol=1e-12)
    change = flat.explained(theta + ACTIVATED_DELTA, x, "logit") - flat.explained(theta, x, "logit")

    def miss(integral: PathIntegral) -> float:
        phi = integral.jacobian(theta, ACTIVATED_DELTA, x, None, "logit", 2)
        return float((phi @ ACTIVATED_DELTA - change).abs().max() / change.abs().max())

    assert miss(path) < rounding
    assert miss(PathIntegral(flat, quadrature=12, breakpoints=False)) > 1e-6


def test_a_jump_is_located_though_no_integral_spans_it():
    """hardshrink is 0 on [−λ, λ] and the identity outside: its jumps are located like kinks."""
    flat, theta = flat_of(Activated(lambda z: F.hardshrink(z, 2.0)))
    (located,) = PathIntegral(flat, quadrature=2).kinks(theta, ACTIVATED_DELTA, torch.ones(1, 1, dtype=DT))
    np.testing.assert_allclose(located, [3 / 9, 7 / 9], rtol=0, atol=1e-12)


# torch's vmap has no batching rule for quantile: it warns, and loops
QUANTILE_UNBATCHED = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")


class ArgmaxProduct(nn.Module):
    """f = max(a ⊙ x over its last dim) · out, the max written as a reduction: along
    Δa = (−0.3, 0.7) from a = (0.3, 0) the two entries of x = (1, 1) tie at t = 0.3."""

    def __init__(self, reduce):
        super().__init__()
        self.a = nn.Parameter(torch.tensor([0.3, 0.0], dtype=DT))
        self.out = nn.Parameter(torch.tensor([1.0, -1.0], dtype=DT))
        self.reduce = reduce

    def forward(self, x):
        return self.reduce(self.a * x)[:, None] * self.out


@QUANTILE_UNBATCHED
@pytest.mark.parametrize("reduce", [
    lambda z: torch.amax(z, dim=-1), lambda z: z.max(dim=1).values, lambda z: torch.amax(z[:, None, :], dim=(1, 2)),
    lambda z: -torch.amin(-z, dim=-1), lambda z: -(-z).min(1).values,
    lambda z: z.sort(dim=1).values[:, -1], lambda z: torch.sort(z, descending=True).values[:, 0],
    lambda z: z.topk(1).values[:, 0], lambda z: z.topk(2).values[:, 0],
    lambda z: torch.kthvalue(z, 2, dim=1).values,
    lambda z: -(-z).median(dim=-1).values, lambda z: z.gather(1, z.argmax(1, keepdim=True))[:, 0],
    lambda z: z.gather(1, (-z).argmin(dim=1)[:, None])[:, 0], lambda z: z.gather(1, z.argsort(1)[:, 1:])[:, 0],
    lambda z: z.quantile(1.0, dim=1),
    lambda z: torch.nanquantile(z, torch.tensor([0.0, 1.0], dtype=DT), dim=-1, interpolation="higher")[1],
    lambda z: z.cummax(1).values[:, -1], lambda z: -torch.cummin(-z, dim=-1).values[:, -1],
    lambda z: torch.linalg.vector_norm(z, ord=float("inf"), dim=1), lambda z: torch.norm(z, float("inf"), dim=-1),
    lambda z: 1 - torch.linalg.vector_norm(1 - z, ord=-float("inf"), dim=1),  # the min of |1 - z| = 1 - max z
], ids=["amax", "max(dim)", "amax over two dims", "amin", "min(dim)", "sort", "sort descending", "topk",
        "topk 2 (its k no dim)", "kthvalue", "median", "gather at argmax", "gather at argmin", "argsort", "quantile",
        "nanquantile", "cummax", "cummin", "vector_norm ord=inf", "torch.norm inf", "vector_norm ord=-inf"])
def test_an_argmax_switch_of_a_max_reduction_is_a_kink(reduce):
    """A global max-pool written as amax (the paper's ResNet-9 ends in one) switches like a
    max-pool, and was integrated as if smooth (the tiny ResNet missed by 0.027); so does one
    written with an op that orders its input (sort, topk, argmax, ...)."""
    flat, theta = flat_of(ArgmaxProduct(reduce))
    delta = torch.tensor([-0.3, 0.7, 0.0, 0.0], dtype=DT)
    x = torch.ones(1, 2, dtype=DT)
    path = PathIntegral(flat, quadrature=2)
    (kinks,) = path.kinks(theta, delta, x)
    np.testing.assert_allclose(kinks, [0.3], rtol=0, atol=1e-12)
    # by hand: a₀ leads up to t = 0.3, a₁ after; ∫ max = ∫₀^0.3 (0.3 − 0.3t) dt + ∫_0.3^1 0.7t dt
    peak = integral([0.3, -0.3], [(0.0, 0.3)]) + integral([0.0, 0.7], [(0.3, 1.0)])
    expected = torch.tensor([[0.3, 0.7, peak, 0.0], [-0.3, -0.7, 0.0, peak]], dtype=DT)
    phi = path.jacobian(theta, delta, x, None, "logit", 2)[0]
    # an argmax switch is bisected down to 2⁻⁴⁰ of the step (no distance to interpolate)
    torch.testing.assert_close(phi, expected, rtol=0, atol=1e-12)


def test_an_argmax_switch_still_open_after_the_last_round_is_cut_in_its_middle():
    """An argmax switch predicts no root: out of rounds, its interval is cut in the middle, and
    the segment counts as unresolved (its switch is at t = 0.3, see the test above)."""
    flat, theta = flat_of(ArgmaxProduct(lambda z: torch.amax(z, dim=-1)))
    path = PathIntegral(flat, quadrature=2, max_rounds=1)
    (kinks,) = path.kinks(theta, torch.tensor([-0.3, 0.7, 0.0, 0.0], dtype=DT), torch.ones(1, 2, dtype=DT))
    assert kinks == [0.5] and path.stats.unresolved == 1


class MaxPooled(nn.Module):
    """f = max_pool1d(a ⊙ x, 2) with `pool`: along Δa = (−0.5, 0.4, −0.3, 0.4) from
    a = (0.5, 0.2, 0.3, 0.1), the first window's entries of x = (1, 1, 1, 1) tie where
    0.5 − 0.5t = 0.2 + 0.4t (t = 1/3), the second's where 0.3 − 0.3t = 0.1 + 0.4t (t = 2/7)."""

    def __init__(self, pool):
        super().__init__()
        self.a = nn.Parameter(torch.tensor([0.5, 0.2, 0.3, 0.1], dtype=DT))
        self.pool = pool

    def forward(self, x):
        return self.pool((self.a * x)[:, None, :]).flatten(1)


@pytest.mark.parametrize("pool", [
    lambda h: F.max_pool1d(h, 2), lambda h: F.max_pool1d(h, 2, return_indices=True)[0],
    lambda h: nn.MaxPool1d(2, return_indices=True)(h)[0], lambda h: F.adaptive_max_pool1d(h, 2),
], ids=["max_pool1d", "max_pool1d returning indices", "nn.MaxPool1d returning indices", "adaptive_max_pool1d"])
def test_a_max_pools_argmax_switch_is_a_kink(pool):
    """A max-pool asked for its indices (return_indices=True, as an unpooling model asks) stopped the
    kink search with an AttributeError (it looked for max_pool1d_with_indices_with_indices). Each
    window's switch is located at its tie, and the pieces integrate to the change of the outputs."""
    flat, theta = flat_of(MaxPooled(pool))
    delta = torch.tensor([-0.5, 0.4, -0.3, 0.4], dtype=DT)
    x = torch.ones(2, 4, dtype=DT)
    path = PathIntegral(flat, quadrature=2)
    for kinks in path.kinks(theta, delta, x):
        np.testing.assert_allclose(kinks, [2 / 7, 1 / 3], rtol=0, atol=1e-12)
    change = flat.explained(theta + delta, x, "logit") - flat.explained(theta, x, "logit")
    torch.testing.assert_close(path.change(theta, delta, x, "logit"), change, rtol=0, atol=1e-12)
    assert (PathIntegral(flat, quadrature=2, breakpoints=False).change(theta, delta, x, "logit") - change).abs().max() > 1e-3


class PooledReLUs(nn.Module):
    """f = max_pool1d(relu(z), 2) of z = (0.3 − t, 0.5 − 2t) along the test's Δ (z = a·x + b,
    x = 1): unit 1 leads up to t = 0.2 where the units tie, unit 0 then until it crosses 0 at
    t = 0.3, and f = 0 after (unit 1 crossed 0 at t = 0.25, while unit 0 led)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor([0.1, 0.2], dtype=DT))
        self.b = nn.Parameter(torch.tensor([0.2, 0.3], dtype=DT))

    def forward(self, x):
        return F.max_pool1d(F.relu(self.a * x + self.b)[:, None, :], 2).flatten(1)


def test_a_unit_that_leads_a_max_pool_only_inside_the_step_is_searched():
    """Near θ the pool's gradient reaches only unit 1, its argmax: unit 0's crossing at t = 0.3,
    where f stops falling, must still be searched (every unit counts once a model max-pools)."""
    flat, theta = flat_of(PooledReLUs())
    delta = torch.tensor([-0.4, -0.8, -0.6, -1.2], dtype=DT)  # (a, b): z = (0.3 − t, 0.5 − 2t)
    x = torch.ones(1, 2, dtype=DT)
    path = PathIntegral(flat, quadrature=2)
    (kinks,) = path.kinks(theta, delta, x)
    np.testing.assert_allclose(kinks, [0.2, 0.25, 0.3], rtol=0, atol=1e-12)
    # by hand: ∂f/∂(a₁, b₁) = x = 1 on [0, 0.2], ∂f/∂(a₀, b₀) = 1 on [0.2, 0.3], 0 after
    phi = path.jacobian(theta, delta, x, None, "logit", 1)[0]
    torch.testing.assert_close(phi, torch.tensor([[0.1, 0.2, 0.1, 0.2]], dtype=DT), rtol=0, atol=1e-12)


class MaxOfWeights(nn.Module):
    """Reductions that are no pooling of an input: a max over a weight's rows (a kink shared by
    every input), a learned temperature's clamp_min, and the shift of a hand-written stable
    softmax (keepdim=True), whose kink cancels in its output."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([[0.3, 0.0], [0.1, 0.5]], dtype=DT))
        self.t = nn.Parameter(torch.tensor([1.0], dtype=DT))

    def forward(self, x):
        logits = x @ (self.w - self.w.amax(dim=1, keepdim=True)).T / self.t.clamp_min(0.1)
        return logits - logits.max(dim=1, keepdim=True).values


def test_reductions_that_pool_no_input_are_no_kinks_and_explain_as_before(tmp_path):
    """These raised a shape error in the kink pattern, or searched kinks that cancel."""
    model = MaxOfWeights()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = torch.randn(6, 2, dtype=DT, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1] * 3)
    record_full_batch(tmp_path / "h", model, optimizer, x, y, steps=3)
    cube = ex.reconstruct(tmp_path / "h", model, x, quadrature=8, progress=False)
    assert cube.attrs["kinks_located"] == 0 and cube.attrs["relative_residual"] <= 1e-9


class SharedKinks(nn.Module):
    """Kinks of parameters alone, on every input's path: a [1] temperature's clamp_min (0.6 → 0.4
    along the test's Δ: clamped from t = 0.5) and, with `pool`, a max over a weight's rows (row 0
    goes (0.3, 0) → (0, 0.7): its entries tie at t = 0.3) or over all its entries (w₀₁ = 0.7t
    passes w₁₁ = 0.5 at t = 5/7). The lower median of w's four entries (0.3 − 0.3t, 0.7t, 0.1,
    0.5) is w₁₀ = 0.1 until w₀₁ passes it at t = 1/7, then w₀₁ until it passes w₀₀ at t = 0.3,
    then w₀₀ until it falls below 0.1 at t = 2/3."""

    def __init__(self, pool=None):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([[0.3, 0.0], [0.1, 0.5]], dtype=DT))
        self.t = nn.Parameter(torch.tensor([0.6], dtype=DT))
        self.pool = pool

    def forward(self, x):
        logits = x @ self.w.T / self.t.clamp_min(0.5)
        return logits + self.pool(self.w) if self.pool else logits


@QUANTILE_UNBATCHED
@pytest.mark.parametrize("pool, expected", [
    (None, [0.5]), (lambda w: w.amax(dim=1), [0.3, 0.5]), (lambda w: w.flatten().gather(0, w.argmax().reshape(1)), [0.5, 5 / 7]),
    (lambda w: w.median(), [1 / 7, 0.3, 0.5, 2 / 3]),
    # the median of the four entries that are not NaN (of all five, the kinks would be 0.3 and 5/7)
    (lambda w: torch.cat([w.flatten(), torch.tensor([torch.nan], dtype=DT)]).nanmedian(), [1 / 7, 0.3, 0.5, 2 / 3]),
    (lambda w: torch.quantile(w, 0.75, dim=1), [0.3, 0.5]),  # row 0's min + ¾ (max − min)
    (lambda w: torch.quantile(w, 0.75, 1), [0.3, 0.5]),  # its dim given positionally
    # halfway between the lower median (above) and the upper one: w₀₀ until w₀₁ passes it at t = 0.3,
    # then w₀₁ until it passes w₁₁ = 0.5 at t = 5/7
    (lambda w: w.quantile(0.5), [1 / 7, 0.3, 0.5, 2 / 3, 5 / 7]),
], ids=["clamp", "clamp and amax", "clamp and a flat argmax", "clamp and median", "clamp and nanmedian",
        "clamp and a quantile of rows", "clamp and a quantile of rows, its dim positional",
        "clamp and the quantile 0.5 of all entries"])
def test_kinks_of_parameters_alone_are_kinks_of_every_input(pool, expected):
    """These were skipped (a reduction of a parameter) or, for a [1] parameter, taken for one
    input's and crashed the search on the next batch's size. The change of each output along
    the segment, from two forward passes, is what the located pieces integrate to."""
    flat, theta = flat_of(SharedKinks(pool))
    delta = torch.tensor([-0.3, 0.7, 0.0, 0.0, -0.2], dtype=DT)  # (w, t)
    x = torch.randn(3, 2, dtype=DT, generator=torch.Generator().manual_seed(0))
    path = PathIntegral(flat, quadrature=8)
    for kinks in path.kinks(theta, delta, x):
        np.testing.assert_allclose(kinks, expected, rtol=0, atol=1e-12)
    change = flat.explained(theta + delta, x, "logit") - flat.explained(theta, x, "logit")
    torch.testing.assert_close(path.change(theta, delta, x, "logit"), change, rtol=0, atol=1e-12)
    plain = PathIntegral(flat, quadrature=8, breakpoints=False)
    assert (plain.change(theta, delta, x, "logit") - change).abs().max() > 1e-3


class ReLUPool(nn.Module):
    """A linear layer, ReLU, a max-pool of pairs and an output layer: both kinds of kink."""

    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(3, 6, dtype=DT)
        self.out = nn.Linear(3, 2, dtype=DT)

    def forward(self, x):
        return self.out(F.max_pool1d(F.relu(self.hidden(x))[:, None, :], 2).flatten(1))


def test_the_kink_pattern_of_several_segments_at_one_point_equals_each_segments_own_pass():
    """A pass over the inputs at each of S segments' points, vmapped over the segments (how the
    kink search takes the ends of a window's segments), equals each segment's pass alone and the
    per-row passes, row s·n + i being input i on segment s: the distances, their derivatives
    along the segment, the max-pool's indices and the outputs; and so does the derivative along
    each segment (the kink tolerance's plain integrals)."""
    torch.manual_seed(0)
    flat, start = flat_of(ReLUPool())
    g = torch.Generator().manual_seed(3)
    theta = start + 0.3 * torch.randn(3, len(start), dtype=DT, generator=g)
    delta = torch.randn(3, len(start), dtype=DT, generator=g)
    x = torch.randn(4, 3, dtype=DT, generator=g)
    rows = torch.arange(12)
    for t in (0.0, 0.4, 1.0):
        together = flat.kink_pattern(theta, delta, x, t, "log_prob")
        alone = [torch.cat(parts) for parts in zip(*(flat.kink_pattern(th, d, x, t, "log_prob")
                                                      for th, d in zip(theta, delta)))]
        per_row = flat.kink_pattern(theta[rows // 4], delta[rows // 4], x[rows % 4], torch.full((12,), t, dtype=DT),
                                    "log_prob")
        assert [v.shape for v in together] == [(12, 6), (12, 6), (12, 3), (12, 2)]
        for mine, each, row in zip(together, alone, per_row):
            torch.testing.assert_close(mine, each, rtol=0, atol=1e-14)
            torch.testing.assert_close(mine, row, rtol=0, atol=1e-14)
        assert len(torch.unique(together[2][:, 0])) == 2  # the pool's argmax differs between rows
        points = theta + t * delta
        torch.testing.assert_close(flat.directional(points, delta, x, "log_prob"),
                                   torch.cat([flat.directional(p, d, x, "log_prob") for p, d in zip(points, delta)]),
                                   rtol=0, atol=1e-14)
        by_row = flat.directional_along(theta[rows // 4], delta[rows // 4], x[rows % 4], torch.full((12,), t, dtype=DT),
                                        "log_prob")
        torch.testing.assert_close(flat.directional(points, delta, x, "log_prob"), by_row, rtol=0, atol=1e-14)


class IndexAndMaskOps(nn.Module):
    """max / min of integer and boolean tensors (a padding id mapped to 1, a mask), and a 0-d
    scale's max: no kink along θ, and they must run as the model wrote them."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4, dtype=DT)
        self.scale = nn.Parameter(torch.tensor(0.7, dtype=DT))

    def forward(self, ids):
        ids = torch.maximum(ids, torch.ones_like(ids))
        keep = torch.minimum(ids > 2, ids < 8)
        return (F.relu(self.emb(ids)) * keep[..., None]).sum(1) * self.scale.amax(dim=0)


def test_max_and_min_of_indices_masks_and_scalars_run_and_keep_the_relus_kinks():
    """These crashed the kink search: a maximum of ids made float by the relevance pass, a
    difference of booleans, a modulo by the 0 dims of a 0-d tensor. The pieces still integrate
    to the change from forward passes."""
    model = IndexAndMaskOps()
    flat, theta = flat_of(model)
    delta = torch.randn(theta.shape, dtype=DT, generator=torch.Generator().manual_seed(1))
    x = torch.randint(0, 10, (3, 5), generator=torch.Generator().manual_seed(2))
    path = PathIntegral(flat, quadrature=4)
    assert flat.kink_pattern(theta, delta, x, 0.0)[0].shape == (3, 5 * 4)  # the ReLU's units: no comparison of ids
    assert sum(map(len, path.kinks(theta, delta, x))) > 0
    change = flat.explained(theta + delta, x, "logit") - flat.explained(theta, x, "logit")
    torch.testing.assert_close(path.change(theta, delta, x, "logit"), change, rtol=0, atol=1e-12)


class ClampedWeights(nn.Module):
    """An input-convex layer's weights kept nonnegative, W.clamp(min=0): a kink of parameters
    alone wherever an entry of W crosses 0, the same on every input's path; with `relu`, each
    input's own kinks on top."""

    def __init__(self, relu: bool):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3, dtype=DT, generator=torch.Generator().manual_seed(1)))
        self.relu = relu

    def forward(self, x):
        z = x @ self.w.clamp(min=0).T
        return F.relu(z - 0.5) if self.relu else z


def test_kinks_of_parameters_alone_are_searched_once_whatever_the_batch(monkeypatch):
    """They were searched again for every input (a clamp of a whole weight matrix cost the
    search that matrix's size per input). By hand, entry w of W crosses 0 at t = −w / Δw; the
    passes that probe inside the segments take as many rows for 20 inputs as for one."""
    flat, theta = flat_of(ClampedWeights(relu=False))
    delta = 2 * torch.randn(12, dtype=DT, generator=torch.Generator().manual_seed(2))
    crossings = -theta / delta
    by_hand = sorted(crossings[(crossings > 0) & (crossings < 1)].tolist())
    assert len(by_hand) >= 3
    x = torch.rand(20, 3, dtype=DT, generator=torch.Generator().manual_seed(0))
    probed = []
    for n in (1, 20):
        path, rows = PathIntegral(flat, quadrature=4), []

        def counted(th, d, x_, t, *args, pattern=path.search.kink_pattern, rows=rows):
            if isinstance(t, torch.Tensor):  # a probe pass: each row its own point
                rows.append(len(x_))
            return pattern(th, d, x_, t, *args)

        monkeypatch.setattr(path.search, "kink_pattern", counted)
        for kinks in path.kinks(theta, delta, x[:n]):
            np.testing.assert_allclose(kinks, by_hand, rtol=0, atol=1e-12)
        probed.append(sum(rows))
    assert probed[0] == probed[1] > 0


def test_kinks_of_parameters_alone_and_of_each_input_make_the_path_exact():
    """Every input's pieces hold the shared kinks and its own: the located pieces integrate to
    the change of each output, which plain quadrature misses."""
    flat, theta = flat_of(ClampedWeights(relu=True))
    delta = 2 * torch.randn(12, dtype=DT, generator=torch.Generator().manual_seed(2))
    crossings = -theta / delta
    shared = crossings[(crossings > 0) & (crossings < 1)].tolist()
    x = torch.rand(6, 3, dtype=DT, generator=torch.Generator().manual_seed(0))
    path = PathIntegral(flat, quadrature=4)
    kinks = path.kinks(theta, delta, x)
    for found in kinks:
        assert all(min(abs(k - t) for k in found) < 1e-12 for t in shared)
    assert sum(len(found) for found in kinks) > len(x) * len(shared)  # and some of their own
    change = flat.explained(theta + delta, x, "logit") - flat.explained(theta, x, "logit")
    torch.testing.assert_close(path.change(theta, delta, x, "logit"), change, rtol=0, atol=1e-12)
    plain = PathIntegral(flat, quadrature=4, breakpoints=False)
    assert (plain.change(theta, delta, x, "logit") - change).abs().max() > 1e-3


def four_clamped_segments() -> tuple[FlatModel, torch.Tensor, torch.Tensor, torch.Tensor]:
    """ClampedWeights with ReLU, four random segments θ_s + tΔ_s of its 12 parameters ([4, 12]
    each) and 6 inputs."""
    flat, _ = flat_of(ClampedWeights(relu=True))
    generator = torch.Generator().manual_seed(3)
    theta = torch.randn(4, 12, dtype=DT, generator=generator)
    delta = 2 * torch.randn(4, 12, dtype=DT, generator=generator)
    return flat, theta, delta, torch.rand(6, 3, dtype=DT, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("max_kinks", [16, 4, 2, 0])
def test_one_search_over_several_steps_finds_each_steps_kinks(max_kinks):
    """locate_steps searches the segments of several steps at once, each pass taking rows of all
    of them. It finds what a search of each segment alone finds: the kinks of parameters alone
    (by hand, entry w of W crosses 0 at t = −w / Δw, on every input of its segment) and each
    input's own, the same inputs crowded out by max_kinks (those of parameters alone crowd a
    whole segment out), and counts the same."""
    flat, theta, delta, x = four_clamped_segments()
    together = PathIntegral(flat, quadrature=4, max_kinks=max_kinks)
    found = together.locate_steps(theta, delta, x)
    alone = PathIntegral(flat, quadrature=4, max_kinks=max_kinks)
    for s, (rows, t) in enumerate(found):
        by_itself = alone._locate(theta[s], delta[s], x)
        assert rows.tolist() == by_itself[0].tolist()
        np.testing.assert_allclose(t, by_itself[1], rtol=0, atol=1e-12)
        crossings = -theta[s] / delta[s]
        shared = crossings[(crossings > 0) & (crossings < 1)]
        for i in rows.unique().tolist():
            own = t[rows == i]
            assert all(float((own - c).abs().min()) < 1e-12 for c in shared)
    assert together.stats == alone.stats
    kinks_by_segment = [len(rows) for rows, _ in found]
    if max_kinks == 16:
        assert min(kinks_by_segment) > 0 and together.stats.unresolved == 0
    else:
        assert together.stats.unresolved > 0
    if max_kinks == 2:  # a segment crowded by its kinks of parameters alone, and another one not
        assert 0 in kinks_by_segment and max(kinks_by_segment) > 0


def test_kinks_of_parameters_alone_found_in_other_rounds_stay_with_their_segment():
    """One search over two segments of ClampedWeights without ReLU, whose kinks are those of
    parameters alone, entry w of W crossing 0 at t = −w / Δw: six on segment 0 (0.1, …, 0.6) and
    one on segment 1 (0.45). A round brackets at most roots_per_round = 4 crossings per interval,
    so segment 0's last two are placed a round after segment 1's, and every input of each segment
    gets its own segment's kinks, not the other's."""
    flat, _ = flat_of(ClampedWeights(relu=False))
    theta, delta = torch.ones(2, 12, dtype=DT), torch.zeros(2, 12, dtype=DT)
    theta[0, :6], delta[0, :6] = -torch.arange(1, 7, dtype=DT) / 10, 1.0
    theta[1, 7], delta[1, 7] = -0.45, 1.0
    x = torch.rand(3, 3, dtype=DT, generator=torch.Generator().manual_seed(0))
    path = PathIntegral(flat, quadrature=4)
    (rows_0, t_0), (rows_1, t_1) = path.locate_steps(theta, delta, x)
    assert rows_0.tolist() == [i for i in range(3) for _ in range(6)] and rows_1.tolist() == [0, 1, 2]
    np.testing.assert_allclose(t_0, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6] * 3, rtol=0, atol=1e-12)
    np.testing.assert_allclose(t_1, [0.45] * 3, rtol=0, atol=1e-12)
    assert path.stats.kinks == 21 and path.stats.unresolved == 0


@pytest.mark.parametrize("kink_tolerance", [0.0, 1e-9])
def test_a_round_analysed_in_blocks_finds_what_the_whole_round_finds(kink_tolerance, monkeypatch):
    """On the CPU a round's intervals are analysed in blocks that stay in cache (_analyse):
    blocks of one interval find the same pieces, bit for bit, and the same counts as one block
    per round, in the certified search and the tolerance search."""
    flat, theta, delta, x = four_clamped_segments()
    blocks, analyse = [], PathIntegral._analyse_block
    monkeypatch.setattr(PathIntegral, "_analyse_block", lambda self, iv: blocks.append(len(iv)) or analyse(self, iv))
    found, sizes = {}, {}
    for elements in (1, 2**62):
        blocks.clear()
        search = PathIntegral(flat, quadrature=4, kink_tolerance=kink_tolerance, analysis_elements=elements)
        found[elements], sizes[elements] = (search.search_steps(theta, delta, x, "logit"), search.stats), list(blocks)
    assert set(sizes[1]) == {1} and len(sizes[1]) == sum(sizes[2**62]) > len(sizes[2**62])
    one_each, whole = found[1], found[2**62]
    assert one_each[1] == whole[1] and whole[1].kinks > 0
    for ((owner, lo, hi), _), ((owner_whole, lo_whole, hi_whole), _) in zip(one_each[0], whole[0]):
        assert torch.equal(owner, owner_whole) and torch.equal(lo, lo_whole) and torch.equal(hi, hi_whole)


@pytest.mark.parametrize("kink_tolerance", [0.0, 1e-9, 1e3])
def test_a_tolerance_search_over_several_steps_finds_each_steps_pieces(kink_tolerance):
    """search_steps takes the segments of several steps in one search, with or without a kink
    tolerance (whose search starts from each path's plain integral and cuts only the pieces that
    miss; 1e3: none does): the pieces and plain integrals of a search per segment, and the same
    counts."""
    flat, theta, delta, x = four_clamped_segments()
    together = PathIntegral(flat, quadrature=4, kink_tolerance=kink_tolerance)
    alone = PathIntegral(flat, quadrature=4, kink_tolerance=kink_tolerance)
    for s, ((owner, lo, hi), plain) in enumerate(together.search_steps(theta, delta, x, "logit")):
        (owner_alone, lo_alone, hi_alone), plain_alone = alone.search_steps(theta[s:s + 1], delta[s:s + 1], x,
                                                                            "logit")[0]
        assert owner.tolist() == owner_alone.tolist() and (len(owner) > 0) == (kink_tolerance < 1)
        np.testing.assert_allclose(torch.stack([lo, hi]), torch.stack([lo_alone, hi_alone]), rtol=0, atol=1e-12)
        if kink_tolerance:
            np.testing.assert_allclose(plain, plain_alone, rtol=0, atol=1e-12)
            # the plain integral misses the change of every path searched, by more than the tolerance
            change = flat.explained(theta[s] + delta[s], x, "logit") - flat.explained(theta[s], x, "logit")
            missed = (change - plain).abs().amax(1) > kink_tolerance
            assert owner.unique().tolist() == torch.nonzero(missed)[:, 0].tolist()
        else:
            assert plain is None and plain_alone is None
    assert together.stats == alone.stats


@pytest.mark.parametrize("kink_tolerance", [0.0, 1e-9])
@pytest.mark.parametrize("convention", ["update", "gradient"])
@pytest.mark.parametrize("keep", [("train", "test", "output"), ("test", "output")])
def test_explain_searching_steps_in_windows_equals_searching_each_step(tmp_path, monkeypatch, convention, keep,
                                                                       kink_tolerance):
    """explain searches the kinks of a window of steps in one search (both step conventions; a
    cube with or without a train dim; with or without a kink tolerance): the same kinks and the
    same cube as a search per step."""
    run = train(Case("mlp", "adamw", act="relu", steps=5, lr_scale=3.0, n_test=6), tmp_path / "h")
    options = dict(keep=keep, convention=convention, kink_tolerance=kink_tolerance, tolerance=None)
    windows, search = [], PathIntegral.search_steps
    monkeypatch.setattr(PathIntegral, "search_steps", lambda self, th, *a: windows.append(len(th))
                        or search(self, th, *a))
    searched_together = run.explain(**options)
    assert set(windows) == {run.case.steps}
    cubes = {}
    for size, sizes in ((2, [2, 2, 1]), (1, [1] * 5)):  # windows of 2 steps and a last one of 1; a search per step
        windows.clear()
        monkeypatch.setattr(PathIntegral, "window", lambda self, *args, size=size: size)
        cubes[size] = run.explain(**options)
        assert windows == sizes
    for cube in (searched_together, cubes[2]):
        for name in ("kinks_located", "kink_segments_searched", "kink_segments_unresolved"):
            assert cube.attrs[name] == cubes[1].attrs[name]
        scale = float(abs(cubes[1]["attribution"]).max())
        np.testing.assert_allclose(cube["attribution"].values, cubes[1]["attribution"].values, rtol=0,
                                   atol=1e-13 * scale)
    assert searched_together.attrs["kinks_located"] > 0


@pytest.mark.parametrize("kink_tolerance", [0.0, 1e-9])
@pytest.mark.parametrize("batch_size", [6, 4], ids=["one batch", "two batches"])
def test_reconstruct_searching_steps_in_windows_equals_searching_each_step(tmp_path, monkeypatch, kink_tolerance,
                                                                          batch_size):
    """reconstruct searches the kinks of a window of steps in one search per batch of inputs
    (with or without a kink tolerance): the same kinks, reconstruction and step misses as a
    search per step; a plain path alongside (no kink tolerance) takes no search and the same
    numbers."""
    run = train(Case("mlp", "adamw", act="relu", steps=5, lr_scale=3.0, n_test=6), tmp_path / "h")
    windows, search = [], PathIntegral.search_steps
    monkeypatch.setattr(PathIntegral, "search_steps", lambda self, th, *a: windows.append(len(th))
                        or search(self, th, *a))
    settings = [(3, "gauss", True), (3, "gauss", False)][:1 if kink_tolerance else 2]

    def reconstructions():
        return _reconstructions("reconstruct", run.path, run.model, run.test_x, settings, target="log_prob", dtype=DT,
                                device="cpu", batch_size=batch_size, progress=False, kink_tolerance=kink_tolerance)

    batches = -(-6 // batch_size)
    together = reconstructions()
    assert windows == [run.case.steps] * batches
    windows.clear()
    monkeypatch.setattr(PathIntegral, "window", lambda self, *args: 1)
    alone = reconstructions()
    assert windows == [1] * run.case.steps * batches
    assert together[0].attrs["kinks_located"] > 0
    for name in ("kinks_located", "kink_segments_searched", "kink_segments_unresolved"):
        assert together[0].attrs[name] == alone[0].attrs[name]
    scale = float(abs(alone[0]["reconstructed"]).max())
    for name in ("reconstructed", "step_miss"):
        np.testing.assert_allclose(together[0][name].values, alone[0][name].values, rtol=0, atol=1e-13 * scale)
        for plain, plain_alone in zip(together[1:], alone[1:]):
            np.testing.assert_array_equal(plain[name].values, plain_alone[name].values)
    assert together[0].attrs["relative_residual"] <= 1e-6


def test_an_empty_batch_is_refused_and_leaves_the_model_usable():
    flat, theta = flat_of(SharedKinks())
    delta = torch.tensor([-0.3, 0.7, 0.0, 0.0, -0.2], dtype=DT)
    x = torch.randn(3, 2, dtype=DT, generator=torch.Generator().manual_seed(0))
    path = PathIntegral(flat, quadrature=8)
    with pytest.raises(ex.InputError, match="batch is empty"):
        path.kinks(theta, delta, x[:0])
    assert path.kinks(theta, delta, x) == [[pytest.approx(0.5, abs=1e-12)]] * 3


class SequenceFirst(nn.Module):
    """Inputs [B, 2] scaled per position by a, laid out batch-first [B, L] or, as
    nn.TransformerEncoderLayer takes them without batch_first, position-first [L, B], their ReLU
    taken as they are or with both dims folded into one ([B·L]; [L·B], the inputs interleaved):
    outputs Σ_l ReLU(a_l x_bl − 1) and max_l a_l x_bl (with `sort`, the last of a sort along the
    positions, whose indices keep the batch's dim)."""

    def __init__(self, position_first: bool, fold: bool = False, sort: bool = False):
        super().__init__()
        self.a = nn.Parameter(torch.tensor([0.5, 0.2], dtype=DT))
        self.position_first = position_first
        self.fold = fold
        self.sort = sort

    def forward(self, x):
        h, positions = (self.a[:, None] * x.T, 0) if self.position_first else (self.a * x, 1)
        units = F.relu(h.reshape(-1) - 1).reshape(h.shape) if self.fold else F.relu(h - 1)
        peak = h.sort(positions).values.select(positions, -1) if self.sort else h.amax(positions)
        return torch.stack([units.sum(positions), peak], 1)


@pytest.mark.parametrize("position_first, fold, sort", [
    (False, False, False), (True, False, False), (False, True, False), (True, True, False), (True, False, True),
], ids=["batch first", "position first", "batch first, folded", "position first, folded", "position first, sorted"])
def test_each_input_keeps_its_own_kinks_whatever_dim_holds_the_batch(position_first, fold, sort):
    """Position-first activations were laid out per input by a reshape of [L, B] (rows of
    other inputs' units mixed), and their max over positions, which reduces dim 0, was taken
    for a max over the batch and skipped; folded into [L·B], each input's ReLUs were read off
    its neighbour's entries. By hand, along a(t) = (0.5 + t, 0.2 + 1.5t): input b's ReLUs switch
    where a_l(t) x_bl = 1, its max where a_0(t) x_b0 = a_1(t) x_b1."""
    flat, theta = flat_of(SequenceFirst(position_first, fold, sort))
    delta = torch.tensor([1.0, 1.5], dtype=DT)
    x = 1 + torch.rand(5, 2, dtype=DT, generator=torch.Generator().manual_seed(0))
    path = PathIntegral(flat, quadrature=8)
    for kinks, (x0, x1) in zip(path.kinks(theta, delta, x), x.tolist()):
        by_hand = [1 / x0 - 0.5, (1 / x1 - 0.2) / 1.5, (0.5 * x0 - 0.2 * x1) / (1.5 * x1 - x0)]
        np.testing.assert_allclose(kinks, sorted(t for t in by_hand if 0 < t < 1), rtol=0, atol=1e-11)
    change = flat.explained(theta + delta, x, "logit") - flat.explained(theta, x, "logit")
    torch.testing.assert_close(path.change(theta, delta, x, "logit"), change, rtol=0, atol=1e-12)


@pytest.mark.parametrize("position_first, fold, sort", [
    (False, False, False), (True, False, False), (False, True, False), (True, True, False), (True, False, True),
], ids=["batch first", "position first", "batch first, folded", "position first, folded", "position first, sorted"])
def test_each_row_of_the_kink_pattern_holds_its_own_inputs_units(position_first, fold, sort):
    """By hand: row b's ReLU distances are a_l x_bl − 1 for l = 0, 1, moving at Δa_l x_bl along
    the segment, and its max's index is argmax_l a_l x_bl (a sort's indices argsort_l a_l x_bl),
    whichever way the batch is laid out."""
    flat, theta = flat_of(SequenceFirst(position_first, fold, sort))
    delta = torch.tensor([1.0, 1.5], dtype=DT)
    x = 1 + torch.rand(5, 2, dtype=DT, generator=torch.Generator().manual_seed(0))
    z, dz, indices, _ = flat.kink_pattern(theta, delta, x, 0.0)
    a = torch.tensor([0.5, 0.2], dtype=DT)
    torch.testing.assert_close(z, a * x - 1, rtol=0, atol=1e-15)
    torch.testing.assert_close(dz, delta * x, rtol=0, atol=1e-15)
    order = (a * x).argsort(1) if sort else (a * x).argmax(1, keepdim=True)
    torch.testing.assert_close(indices, order, rtol=0, atol=0)


def test_copies_of_one_input_read_a_fold_in_its_order():
    """A batch of copies of one input was taken to read alike in either order, and read its
    position-first ReLUs folded into [L·B] in turn: copy 0's row held position 0 twice, copy 2's
    position 1 twice. Copies of x = (0.5, 1.5), whose unit 1 alone crosses 0, at t = 0.7 / 2.25
    (a(t) = (0.5 + t, 0.2 + 1.5t)), gave copy 0 no kink (φ·Δ missed the change by 0.425) and copy 2
    a second one near t = 1. Copies alike along the fold too ((1, 2.5): a_l x_l = 0.5 at both) read
    alike either way, and leave the order to the next batch."""
    a, delta = torch.tensor([0.5, 0.2], dtype=DT), torch.tensor([1.0, 1.5], dtype=DT)
    copies = torch.tensor([[0.5, 1.5]] * 3, dtype=DT)
    flat, theta = flat_of(SequenceFirst(position_first=True, fold=True))
    path = PathIntegral(flat, quadrature=2)
    assert path.kinks(theta, delta, copies) == [[pytest.approx(0.7 / 2.25, abs=1e-12)]] * 3
    change = flat.explained(theta + delta, copies, "logit") - flat.explained(theta, copies, "logit")
    torch.testing.assert_close(path.change(theta, delta, copies, "logit"), change, rtol=0, atol=1e-12)

    x = 1 + torch.rand(5, 2, dtype=DT, generator=torch.Generator().manual_seed(0))
    for first in (copies, torch.tensor([[1.0, 2.5]] * 3, dtype=DT)):
        flat, theta = flat_of(SequenceFirst(position_first=True, fold=True))
        for batch in (first, x):
            z = flat.kink_pattern(theta, delta, batch, 0.0)[0]
            torch.testing.assert_close(z, a * batch - 1, rtol=0, atol=1e-15)


class TokensSequenceFirst(nn.Module):
    """Token ids [B, L] → embeddings [L, B, E] → a ReLU layer → mean over positions → logits;
    with `fold`, the ReLU layer takes its input folded length-major into [L·B, E], as a
    sequence-first model flattens its tokens."""

    def __init__(self, fold: bool):
        super().__init__()
        self.emb = nn.Embedding(7, 4, dtype=DT)
        self.hidden = nn.Linear(4, 8, dtype=DT)
        self.out = nn.Linear(8, 3, dtype=DT)
        self.fold = fold

    def forward(self, ids):
        h = self.emb(ids).transpose(0, 1)
        length, batch, width = h.shape
        if self.fold:
            return self.out(F.relu(self.hidden(h.reshape(length * batch, width))).reshape(length, batch, -1).mean(0))
        return self.out(F.relu(self.hidden(h)).mean(0))


def test_a_batch_folded_length_major_explains_as_unfolded(tmp_path):
    """Its units were read off other inputs' (29 kinks located here and 2 segments left
    unresolved; benchmarks/folded_batch.py). The same history explained through the folded and
    the unfolded forward passes now locates the same kinks and gives the same cube."""
    torch.manual_seed(0)
    model = TokensSequenceFirst(fold=True)
    x, y = torch.randint(0, 7, (12, 4)), torch.randint(0, 3, (12,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    record_full_batch(tmp_path / "h", model, optimizer, x, y, steps=4)
    folded, unfolded = (ex.explain(tmp_path / "h", TokensSequenceFirst(fold), x[:6], keep=("step", "test"),
                                   quadrature=4, progress=False) for fold in (True, False))
    assert folded.attrs["kinks_located"] == unfolded.attrs["kinks_located"] > 0
    assert folded.attrs["kink_segments_unresolved"] == 0 and folded.attrs["relative_residual"] <= 1e-9
    xr.testing.assert_allclose(folded.attribution, unfolded.attribution, rtol=0, atol=1e-12)


class Pairwise(nn.Module):
    """A ReLU of every pair of inputs' products, [B, B]: no one dim runs over the inputs."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.5], dtype=DT))

    def forward(self, x):
        return F.relu(self.w * x @ x.T).sum(1, keepdim=True)


def test_a_kink_op_that_couples_the_inputs_is_refused_naming_the_fix():
    flat, theta = flat_of(Pairwise())
    with pytest.raises(ex.UnsupportedError, match=r"(?s)shaped \[2, 2\] for 2 inputs and \[3, 3\].*breakpoints=False"):
        PathIntegral(flat, quadrature=2).kinks(theta, -2 * theta, torch.ones(2, 1, dtype=DT))


class Scrambled(nn.Module):
    """Inputs [B, 4] scaled per entry by a, as [B, 2, 2] with the batch moved between the
    pairs and all folded into one dim before the ReLU: an input's 4 entries lie in 2 pairs a
    batch apart, neither one after another nor interleaved one by one."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor([0.5, 0.2, 0.7, 0.3], dtype=DT))

    def forward(self, x):
        h = (self.a * x).reshape(len(x), 2, 2).transpose(0, 1)
        return F.relu(h.reshape(-1) - 1).reshape(h.shape).transpose(0, 1).sum((1, 2))[:, None]


class FoldedBranching(nn.Module):
    """Position-first ReLUs folded into [L·B], and a second ReLU when any input's first entry
    exceeds 1.5: one input alone may make fewer calls than the batch."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor([0.5, 0.2], dtype=DT))

    def forward(self, x):
        h = (self.a * x).T
        z = F.relu(h.reshape(-1) - 1).reshape(h.shape).sum(0)
        return (F.relu(z - 0.1) if (x[:, 0] > 1.5).any() else z)[:, None]


def test_a_fold_whose_inputs_alone_branch_otherwise_is_refused_naming_the_fix():
    """Its order is told from passes on each input alone: input (1.2, 1.9) makes 2 calls (ReLU,
    comparison) where the batch makes 3. That stopped later, in vmap's refusal of data-dependent
    control flow, which names no fix."""
    flat, theta = flat_of(FoldedBranching())
    x = torch.tensor([[2.0, 1.7], [1.2, 1.9], [1.6, 1.8]], dtype=DT)
    with pytest.raises(ex.UnsupportedError, match="(?s)made 2 calls.*made 3.*breakpoints=False"):
        PathIntegral(flat, quadrature=2).kinks(theta, theta, x)


class WithWeight(nn.Module):
    """A ReLU of the inputs' values and the weight side by side ([B + 1]): no dim of B's size."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.5], dtype=DT))

    def forward(self, x):
        return F.relu(torch.cat([self.w * x[:, 0], self.w]))[:len(x), None]


def test_a_fold_of_the_inputs_in_another_order_is_refused_naming_the_fix():
    """Read per input in either order, its kinks were other inputs' (nothing refused it)."""
    flat, theta = flat_of(Scrambled())
    x = 1 + torch.rand(3, 4, dtype=DT, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ex.UnsupportedError, match=r"(?s)shaped \[12\] for 3 inputs whose dim 0 folds them with "
                                                   r"another dim \(4 entries each\).*before it is folded.*breakpoints=False"):
        PathIntegral(flat, quadrature=2).kinks(theta, theta, x)


def test_a_kink_op_whose_tensor_grows_by_other_than_whole_inputs_is_refused_naming_the_fix():
    flat, theta = flat_of(WithWeight())
    with pytest.raises(ex.UnsupportedError, match=r"(?s)shaped \[3\] for 2 inputs and \[4\] for 3: its dim 0 grows with the "
                                                   r"inputs but also holds entries of no input.*breakpoints=False"):
        PathIntegral(flat, quadrature=2).kinks(theta, -2 * theta, torch.ones(2, 1, dtype=DT))


class Branching(nn.Module):
    """A ReLU applied once or twice, by the sign of a weight: which kinks a pass meets depends on θ."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.5], dtype=DT))

    def forward(self, x):
        z = F.relu(x * self.w)
        return F.relu(z - 0.1) if self.w > 0 else z


class BranchingAtZero(Branching):
    """The second ReLU applied where the weight is at most 0, as at the θ = 0 of the sizing passes."""

    def forward(self, x):
        z = F.relu(x * self.w)
        return F.relu(z - 0.1) if self.w <= 0 else z


def test_a_model_whose_kink_ops_depend_on_its_parameters_is_refused_naming_the_fix():
    flat, theta = flat_of(Branching())
    # ReLU, the comparison w > 0, ReLU against ReLU, comparison
    with pytest.raises(ex.UnsupportedError, match="(?s)made 3 calls.*made 2.*breakpoints=False"):
        PathIntegral(flat, quadrature=2).kinks(theta, -2 * theta, torch.ones(2, 1, dtype=DT))
    # fewer calls at θ (ReLU, comparison) than at the sizing passes' θ = 0 (ReLU, comparison, ReLU)
    flat, theta = flat_of(BranchingAtZero())
    with pytest.raises(ex.UnsupportedError, match="(?s)made 2 calls.*made 3.*breakpoints=False"):
        PathIntegral(flat, quadrature=2).kinks(theta, -2 * theta, torch.ones(2, 1, dtype=DT))


@pytest.mark.parametrize("za, ga, zb, gb", [
    (-1e-4, -0.02, 0.0173, 0.055),  # below 0 and heading down before it rises through 0
    (1e-4, 0.02, -0.0173, -0.055),  # the mirror image: above 0 and heading up first
    (0.0173, 0.055, -1e-4, 0.02),  # falls through 0, turning up again just before the end
    (0.0, 1.0, 1.0, 1.0),  # the root is the start itself
    (-1.0, 3.0, 1.0, 0.3),  # Newton needs all its steps from the secant's root (after 1: 1e-2 off, after 3: 1e-9)
])
def test_each_predicted_root_is_the_interpolants_first_root_in_the_interval(za, ga, zb, gb):
    """Newton from the secant's root left the interval at an end and stayed there (a root
    predicted at the end that was none); the cubic interpolant's own roots, from numpy, say
    where it is."""
    from explaind.path import _first_roots, _hermite

    value = lambda v: torch.tensor([[v]], dtype=DT)
    none = torch.zeros(1, 0, dtype=torch.long)
    interval = _Intervals(torch.tensor([0]), value(0.0)[0], value(1.0)[0],
                          (value(za), value(ga), none, value(0.0)), (value(zb), value(gb), none, value(0.0)))
    coefficients = [float(c) for c in _hermite(interval)]
    roots = np.roots(coefficients[::-1])
    inside = sorted(r.real for r in roots if abs(r.imag) < 1e-12 and 0 <= r.real < 1)
    predicted = _first_roots(interval, _hermite(interval), 2)[0]
    assert predicted[0].item() == pytest.approx(inside[0], abs=1e-12) and predicted[1].item() == np.inf


def test_the_certified_coverage_is_where_the_taylor_bounds_from_both_ends_reach_zero():
    """A unit on one side at both ends is certified as far as v + v′u − Ku²/2 ≥ 0 from each end,
    K = curvature_safety × its interpolant's largest |z''|. By hand, on an interval [0.25, 0.75]
    (its u-slopes half the t-slopes): z(u) = 1 − u − u² + 2u³ (z = 1 at both ends, z′ = −1 and 3
    in u), z'' = −2 + 12u, so K = 2 × 10 = 20; from the start 1 − u − 10u² ≥ 0 up to
    (−1 + √41)/20, from the end 1 − 3w − 10w² ≥ 0 up to w = 0.2. A straight unit reaches zero
    at v/|v′| (here beyond the interval), one crossing zero is left to the crossing search: the
    curved unit is the least certain."""
    from explaind.path import _dip_gap, _hermite

    # columns: the curved unit, a straight one falling from 1 to 0.5, one crossing zero
    za, zb = torch.tensor([[1.0, 1.0, -0.5]], dtype=DT), torch.tensor([[1.0, 0.5, 0.5]], dtype=DT)
    u_slopes = torch.tensor([[-1.0, -0.5, 1.0]], dtype=DT), torch.tensor([[3.0, -0.5, 1.0]], dtype=DT)
    none = torch.zeros(1, 0, dtype=torch.long)
    interval = _Intervals(torch.tensor([0]), torch.tensor([0.25], dtype=DT), torch.tensor([0.75], dtype=DT),
                          (za, u_slopes[0] / 0.5, none, za[:, :1]), (zb, u_slopes[1] / 0.5, none, zb[:, :1]))
    coverage, gap = _dip_gap(interval, _hermite(interval), safety=2.0)
    from_start, from_end = (41**0.5 - 1) / 20, 0.2
    assert 1 - from_start - 10 * from_start**2 == pytest.approx(0, abs=1e-15)  # the bound's root, as derived
    assert coverage.item() == pytest.approx(from_start + from_end, abs=1e-14)
    assert gap.item() == pytest.approx((from_start + 1 - from_end) / 2, abs=1e-14)  # the uncertified middle


def test_a_round_places_as_many_sign_changes_as_it_predicts_roots():
    """_distances_only: an interval whose crossings are sign changes of at most `most` distances
    is placed by its predicted roots (most = roots_per_round); one more, or an argmax switch,
    is bracketed instead."""
    from explaind.path import _distances_only

    za = torch.tensor([[-1.0, -1.0, 1.0, 1.0]], dtype=DT)
    zb = torch.tensor([[1.0, 1.0, -1.0, 1.0]], dtype=DT)  # three of the four change sign
    same, switched = torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1, dtype=torch.long)
    out = torch.zeros(1, 1, dtype=DT)

    def interval(end_index):
        return _Intervals(torch.tensor([0]), torch.zeros(1, dtype=DT), torch.ones(1, dtype=DT),
                          (za, za, same, out), (zb, zb, end_index, out))

    assert [bool(_distances_only(interval(same), most)) for most in (2, 3, 4)] == [False, True, True]
    assert not _distances_only(interval(switched), 4)


def test_a_pieces_miss_is_that_of_its_worst_output():
    """kink_tolerance bounds the miss of every explained output: a piece whose integrals miss
    the change of its ends' outputs (1, 2, 3) by 0, 0 and 0.6 misses by 0.6, not their mean 0.2."""
    flat, _ = flat_of(ArgmaxProduct(lambda z: torch.amax(z, dim=-1)))
    none, z = torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, 0, dtype=DT)
    ends = torch.zeros(1, 3, dtype=DT), torch.tensor([[1.0, 2.0, 3.0]], dtype=DT)
    piece = _Intervals(torch.tensor([0]), torch.zeros(1, dtype=DT), torch.ones(1, dtype=DT),
                       (z, z, none, ends[0]), (z, z, none, ends[1]))
    integrals = torch.tensor([[1.0, 2.0, 2.4]], dtype=DT)
    miss = PathIntegral(flat, kink_tolerance=0.3)._misses(None, piece, "logit", integrals)
    torch.testing.assert_close(miss, torch.tensor([0.6], dtype=DT), rtol=0, atol=1e-15)


class TwoUnits(nn.Module):
    """Two ReLU units along AWAY_DELTA with Δb = 1: z₁ = (0.01 + t)(t − 0.6) (Product's, c = 0)
    and z₂ = t − 0.3, both crossing 0 inside the segment."""

    def __init__(self):
        super().__init__()
        self.w, self.v, self.b = (nn.Parameter(torch.tensor([value], dtype=DT)) for value in (0.01, -0.6, -0.3))
        self.out = nn.Parameter(torch.tensor([1.0, -1.0], dtype=DT))

    def forward(self, x):
        return (F.relu(self.w * self.v * x) + F.relu(self.b * x)) * self.out


@pytest.mark.parametrize("max_rounds, unresolved", [(1, 1), (64, 0)])
def test_crossings_still_open_after_the_last_round_are_cut_at_their_predicted_roots(max_rounds, unresolved):
    """With one round the search cannot certify the crossings; it cuts the segment where the
    interpolants predict them (here exactly: both are quadratics) and counts the segment as
    unresolved, rather than dropping the input's kinks or passing it as smooth."""
    flat, theta = flat_of(TwoUnits())
    delta = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0], dtype=DT)  # (w, v, b, out)
    x = torch.ones(1, 1, dtype=DT)
    path = PathIntegral(flat, quadrature=2, max_rounds=max_rounds)
    (kinks,) = path.kinks(theta, delta, x)
    np.testing.assert_allclose(kinks, [0.3, 0.6], rtol=0, atol=1e-12)
    assert path.stats.unresolved == unresolved

    # φ by hand: ∂f₀/∂w = v(t)·[z₁ > 0], ∂f₀/∂v = w(t)·[z₁ > 0], ∂f₀/∂b = [z₂ > 0], ∂f₀/∂out₀ = relu(z₁) + relu(z₂)
    on1, on2 = [(0.6, 1.0)], [(0.3, 1.0)]
    out = integral([-0.006, -0.59, 1], on1) + integral([-0.3, 1], on2)
    row = [integral([-0.6, 1], on1), integral([0.01, 1], on1), integral([1], on2), out, 0.0]
    expected = torch.tensor([row, [-row[0], -row[1], -row[2], 0.0, out]], dtype=DT)
    phi = path.jacobian(theta, delta, x, None, "logit", 2)[0]
    torch.testing.assert_close(phi, expected, rtol=0, atol=1e-12)


def test_a_dip_still_uncertified_after_the_last_round_is_counted_unresolved():
    """A unit that dips below 0 and back within the segment shows no crossing at its ends; with one
    round the search cannot find it, and the segment says so rather than passing as smooth."""
    flat, theta = flat_of(Product(c=-0.1))
    path = PathIntegral(flat, quadrature=2, max_rounds=1)
    assert path.kinks(theta, PRODUCT_DELTA, torch.ones(1, 1, dtype=DT)) == [[]]
    assert path.stats.unresolved == 1


def test_the_error_control_certifies_the_change_not_its_shares():
    """The documented limit of kink_tolerance: a unit that switches off and back on within a
    step, between the plain nodes, leaves the plain φ·Δ exact (the dip changes z by
    z(0.75) − z(0.375) = 0), so the segment is not searched, and φ's per-parameter entries keep
    the dip's error. The certified search (kink_tolerance 0) finds it."""
    flat, theta = flat_of(Product(c=-0.1))
    x = torch.ones(1, 1, dtype=DT)
    on = [(0.0, 0.375), (0.75, 1.0)]
    row = [integral([1, -1.6], on), integral([1, -2], on), integral([0.9, -3.6, 3.2], on), 0.0]
    expected = torch.tensor([row, [-row[0], -row[1], 0.0, row[2]]], dtype=DT)
    controlled = PathIntegral(flat, quadrature=2, kink_tolerance=1e-14)
    phi = controlled.jacobian(theta, PRODUCT_DELTA, x, None, "logit", 2)[0]
    assert controlled.stats.searched == 0
    torch.testing.assert_close(phi @ PRODUCT_DELTA, expected @ PRODUCT_DELTA, rtol=0, atol=1e-14)
    assert (phi - expected).abs().max() > 1e-2
    certified = PathIntegral(flat, quadrature=2)
    torch.testing.assert_close(certified.jacobian(theta, PRODUCT_DELTA, x, None, "logit", 2)[0], expected,
                               rtol=0, atol=1e-14)


def test_a_dip_that_stays_positive_is_no_kink():
    """z = (1 − 2t)(1 − 1.6t) + 0.02 comes within 0.0075 of zero and turns back."""
    flat, theta = flat_of(Product(c=0.02))
    x = torch.ones(1, 1, dtype=DT)
    path = PathIntegral(flat, quadrature=2)
    assert path.kinks(theta, PRODUCT_DELTA, x) == [[]]
    phi = path.jacobian(theta, PRODUCT_DELTA, x, None, "logit", 2)[0]
    whole = [(0.0, 1.0)]
    expected = [integral([1, -1.6], whole), integral([1, -2], whole), integral([1.02, -3.6, 3.2], whole)]
    torch.testing.assert_close(phi[0, :3], torch.tensor(expected, dtype=DT), rtol=0, atol=1e-14)


class ReluUnits(nn.Module):
    """logits ±Σ relu(b·x) of a unit per bias b: along Δb from b, the units of x = 1 run
    z = b + tΔb."""

    def __init__(self, *b: float):
        super().__init__()
        self.b = nn.Parameter(torch.tensor(b, dtype=DT))
        self.out = nn.Parameter(torch.tensor([1.0, -1.0], dtype=DT))

    def forward(self, x):
        return F.relu(self.b * x).sum(1, keepdim=True) * self.out


def test_units_crossing_at_the_same_point_make_one_kink():
    """Two units switching at t = 0.3 are one kink of the path (one end of two pieces), not two
    with an empty piece between them: the kinks are 0.3 and 0.7, counted 2, and the pieces
    [0, 0.3], [0.3, 0.7], [0.7, 1]. They integrate f₀ = relu(t − 0.3) + relu(2t − 0.6) +
    relu(t − 0.7) to its change f₀(1) − f₀(0) = 0.7 + 1.4 + 0.3 = 2.4."""
    flat, theta = flat_of(ReluUnits(-0.3, -0.6, -0.7))
    delta = torch.tensor([1.0, 2.0, 1.0, 0.0, 0.0], dtype=DT)  # (b, out): z = (t − 0.3, 2t − 0.6, t − 0.7)
    x = torch.ones(1, 1, dtype=DT)
    path = PathIntegral(flat, quadrature=2)
    (kinks,) = path.kinks(theta, delta, x)
    np.testing.assert_allclose(kinks, [0.3, 0.7], rtol=0, atol=1e-12)
    assert path.stats.kinks == 2 and path.stats.unresolved == 0
    (owner, lo, hi), _ = path.search_steps(theta[None], delta[None], x, "logit")[0]
    assert owner.tolist() == [0, 0, 0]
    np.testing.assert_allclose(torch.stack([lo, hi], 1), [[0.0, 0.3], [0.3, 0.7], [0.7, 1.0]], rtol=0, atol=1e-12)
    torch.testing.assert_close(path.change(theta, delta, x, "logit"), torch.tensor([[2.4, -2.4]], dtype=DT),
                               rtol=0, atol=1e-14)


def test_a_tolerance_search_cuts_a_segment_into_up_to_four_times_max_kinks_pieces():
    """Five units z = t − k/10 (k = 1, …, 5) are more sign changes than a round places at their
    roots (roots_per_round = 4): the first cut brackets the first four, leaving 9 pieces, the
    last still missing the kink at 0.5. With max_kinks = 3 the search may still cut it (its cap
    is 4 · max_kinks = 12 pieces): 9 cuts, 10 pieces, and φ·Δ is f₀(1) − f₀(0) = Σ (1 − k/10) = 3.5
    within the tolerance per piece, where the 4 plain nodes miss by more than 10⁻³."""
    flat, theta = flat_of(ReluUnits(-0.1, -0.2, -0.3, -0.4, -0.5))
    delta = torch.tensor([1.0] * 5 + [0.0, 0.0], dtype=DT)  # (b, out)
    x = torch.ones(1, 1, dtype=DT)
    path = PathIntegral(flat, quadrature=4, kink_tolerance=1e-12, max_kinks=3)
    change = path.change(theta, delta, x, "logit")
    assert path.stats.unresolved == 0 and path.stats.kinks == 9
    torch.testing.assert_close(change, torch.tensor([[3.5, -3.5]], dtype=DT), rtol=0, atol=10e-12)
    plain = PathIntegral(flat, quadrature=4, breakpoints=False).change(theta, delta, x, "logit")
    assert (plain - torch.tensor([[3.5, -3.5]], dtype=DT)).abs().max() > 1e-3


class Quartic(nn.Module):
    """logits ±relu(a·u·v·w·x): along Δ = (1, 0.01, 0.01, 0.01) from (a, u, v, w) = (−0.3, 1, 1, 1)
    the input of x = 1 is z(t) = (t − 0.3)(1 + 0.01t)³, a quartic crossing 0 at t = 0.3 only."""

    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.tensor([-0.3, 1.0, 1.0, 1.0], dtype=DT))
        self.out = nn.Parameter(torch.tensor([1.0, -1.0], dtype=DT))

    def forward(self, x):
        return F.relu(self.p.prod() * x) * self.out


def test_a_crossing_predicted_within_half_a_bracket_is_placed_in_the_next_round():
    """The cubic interpolant of z(t) = (t − 0.3)(1 + 0.01t)³ on [0, 1] misses it by
    10⁻⁶ · t²(1 − t)² (its t⁴ term), so it predicts the root 0.0441 · 10⁻⁶ / z′(0.3) ≈ 4.4·10⁻⁸
    beyond 0.3: within the bracket's half-width 2⁻²² ≈ 2.4·10⁻⁷ around the prediction, on
    either side. So two rounds place the kink (the first brackets it, the second's bracket is
    narrow enough for the interpolant), at 0.3 to rounding, leaving nothing unresolved."""
    from explaind.path import _first_roots, _hermite

    flat, theta = flat_of(Quartic())
    delta = torch.tensor([1.0, 0.01, 0.01, 0.01, 0.0, 0.0], dtype=DT)  # (a, u, v, w, out)
    x = torch.ones(1, 1, dtype=DT)
    z = lambda t: (t - 0.3) * (1 + 0.01 * t) ** 3
    dz = lambda t: (1 + 0.01 * t) ** 3 + 0.03 * (t - 0.3) * (1 + 0.01 * t) ** 2
    value = lambda v: torch.tensor([[v]], dtype=DT)
    none = torch.zeros(1, 0, dtype=torch.long)
    whole = _Intervals(torch.tensor([0]), value(0.0)[0], value(1.0)[0], (value(z(0.0)), value(dz(0.0)), none, none),
                       (value(z(1.0)), value(dz(1.0)), none, none))
    predicted = float(_first_roots(whole, _hermite(whole), 1)[0, 0])
    assert predicted - 0.3 == pytest.approx(0.0441e-6 / dz(0.3), rel=1e-3)
    path = PathIntegral(flat, quadrature=2, max_rounds=2)
    (kinks,) = path.kinks(theta, delta, x)
    np.testing.assert_allclose(kinks, [0.3], rtol=0, atol=1e-14)
    assert path.stats.unresolved == 0


class LastPosition(nn.Module):
    """A ReLU layer over 3 positions of which only the last is read out (like the Transformer)."""

    def __init__(self, zero_readout: bool = False):
        super().__init__()
        torch.manual_seed(3)
        self.hidden = nn.Linear(2, 5).to(DT)
        self.readout = nn.Linear(5, 3).to(DT)
        if zero_readout:
            nn.init.zeros_(self.readout.weight)

    def forward(self, x):  # [B, 3, 2]
        return self.readout(F.relu(self.hidden(x))[:, -1])


def scanned_kinks(z_of_t, samples: int = 20001) -> list[float]:
    """Sign changes of every column of z(t) by a dense scan, then bisection (independent of
    the library's search; misses only pairs closer than the scan's spacing)."""
    grid = torch.linspace(0, 1, samples, dtype=DT)
    values = torch.stack([z_of_t(float(t)) for t in grid])  # [samples, units]
    found = []
    for step, unit in torch.nonzero((values[1:] > 0) != (values[:-1] > 0)).tolist():
        lo, hi = float(grid[step]), float(grid[step + 1])
        for _ in range(60):
            mid = (lo + hi) / 2
            if (z_of_t(mid)[unit] > 0) == (values[step, unit] > 0):
                lo = mid
            else:
                hi = mid
        found.append((lo + hi) / 2)
    return sorted(found)


def brute_force_phi(model, theta, delta, x1, kinks, nodes: int = 8) -> torch.Tensor:
    """Σ over pieces of Gauss–Legendre with materialised float64 Jacobians: [O, D]."""
    flat, _ = flat_of(model)
    t, w = np.polynomial.legendre.leggauss(nodes)
    t, w = (t + 1) / 2, w / 2
    edges = [0.0, *kinks, 1.0]
    phi = 0
    for a, b in zip(edges[:-1], edges[1:]):
        for tq, wq in zip(t, w):
            point = theta + (a + (b - a) * tq) * delta
            jac = torch.autograd.functional.jacobian(lambda th: flat.explained(th, x1[None], "log_prob")[0], point)
            phi = phi + (b - a) * wq * jac
    return phi


@pytest.mark.parametrize("zero_readout", [False, True])
def test_only_kinks_that_move_the_output_are_located(zero_readout):
    """Units at unread positions are skipped; the read ones are found even when the readout
    weights are still zero at θ (they are not zero inside the step)."""
    model = LastPosition(zero_readout)
    flat, theta = flat_of(model)
    delta = 0.8 * torch.randn(len(theta), generator=torch.Generator().manual_seed(5), dtype=DT)
    x = torch.randn(4, 3, 2, generator=torch.Generator().manual_seed(6), dtype=DT)
    path = PathIntegral(flat, quadrature=8)  # the brute force's rule, on each piece
    found = path.kinks(theta, delta, x)
    hidden = flat.layout.slices()
    w_sl, b_sl = hidden["hidden.weight"], hidden["hidden.bias"]

    def last_position_inputs(i):
        def z(t):
            th = theta + t * delta
            return x[i, -1] @ th[w_sl].view(5, 2).T + th[b_sl]
        return z

    all_positions = 0
    for i in range(len(x)):
        expected = scanned_kinks(last_position_inputs(i))
        np.testing.assert_allclose(found[i], expected, rtol=0, atol=1e-9)
        all_positions += len(scanned_kinks(lambda t, i=i: (x[i] @ (theta + t * delta)[w_sl].view(5, 2).T).flatten()
                                           + (theta + t * delta)[b_sl].repeat(3)))
    assert sum(map(len, found)) > 0 and all_positions > sum(map(len, found))

    phi = path.jacobian(theta, delta, x, None, "log_prob", 3)
    for i in range(len(x)):
        reference = brute_force_phi(model, theta, delta, x[i], found[i])
        torch.testing.assert_close(phi[i], reference, rtol=0, atol=1e-12 * float(reference.abs().max()))


def test_jacobian_of_selected_outputs_matches_brute_force_on_a_kinked_mlp():
    """A two-layer ReLU MLP (the second layer's inputs are curved in t), one output per input."""
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4)).to(DT)
    flat, theta = flat_of(model)
    delta = 0.6 * torch.randn(len(theta), generator=torch.Generator().manual_seed(12), dtype=DT)
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(13), dtype=DT)
    select = torch.tensor([[0], [3], [1], [2], [0]])
    path = PathIntegral(flat, quadrature=8)  # the brute force's rule, on each piece
    found = path.kinks(theta, delta, x)

    def pre_activations(i):
        def z(t):
            th = flat.layout.unflatten(theta + t * delta)
            first = x[i] @ th["0.weight"].T + th["0.bias"]
            return torch.cat([first, F.relu(first) @ th["2.weight"].T + th["2.bias"]])
        return z

    for i in range(len(x)):
        np.testing.assert_allclose(found[i], scanned_kinks(pre_activations(i)), rtol=0, atol=1e-9)
    assert sum(map(len, found)) >= 5
    phi = path.jacobian(theta, delta, x, select, "log_prob", 1)
    for i in range(len(x)):
        reference = brute_force_phi(model, theta, delta, x[i], found[i])[select[i]]
        torch.testing.assert_close(phi[i], reference, rtol=0, atol=1e-12 * float(reference.abs().max()))
        # the path identity, from forward evaluations alone
        with torch.no_grad():
            change = (flat.explained(theta + delta, x[i:i + 1], "log_prob")
                      - flat.explained(theta, x[i:i + 1], "log_prob"))[0, select[i]]
        torch.testing.assert_close(phi[i] @ delta, change, rtol=0, atol=1e-13)


@pytest.mark.parametrize("select", [None, [[0, 3], [3, 1], [1, 1], [2, 0], [0, 2]]], ids=["all outputs", "selected"])
def test_smooth_inputs_join_the_kinked_inputs_per_row_passes_with_the_same_jacobian(monkeypatch, select):
    """Inputs 1 and 4 have no kink on this step, the others one or two: their plain nodes join
    the per-row pass of the kinked inputs' pieces (one pass, no pass per node), or with
    join_elements=0 take a pass per node; both equal the brute force."""
    torch.manual_seed(12)
    model = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4)).to(DT)
    flat, theta = flat_of(model)
    delta = 0.05 * torch.randn(len(theta), generator=torch.Generator().manual_seed(13), dtype=DT)
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(14), dtype=DT)
    select = None if select is None else torch.tensor(select)
    found = PathIntegral(flat, quadrature=3).kinks(theta, delta, x)
    assert [len(kinks) for kinks in found] == [1, 0, 1, 2, 0]
    passes = []
    for method in ("add_jacobian", "add_node_jacobians"):
        original = getattr(FlatModel, method)
        monkeypatch.setattr(FlatModel, method, lambda self, out, rows, *args, method=method, original=original:
                            passes.append((method, rows.tolist())) or original(self, out, rows, *args))
    n_out = 4 if select is None else 2
    joined = PathIntegral(flat, quadrature=3).jacobian(theta, delta, x, select, "log_prob", n_out)
    # 3 nodes on each of the kinked inputs' 2, 2 and 3 pieces and on the smooth ones, by input
    assert passes == [("add_node_jacobians", [0] * 6 + [1] * 3 + [2] * 6 + [3] * 9 + [4] * 3)]
    passes.clear()
    apart = PathIntegral(flat, quadrature=3, join_elements=0).jacobian(theta, delta, x, select, "log_prob", n_out)
    assert passes == [("add_jacobian", [1, 4])] * 3 + [("add_node_jacobians", [0] * 6 + [2] * 6 + [3] * 9)]
    torch.testing.assert_close(joined, apart, rtol=0, atol=1e-15)
    for i in range(len(x)):
        reference = brute_force_phi(model, theta, delta, x[i], found[i], nodes=3)
        reference = reference if select is None else reference[select[i]]
        torch.testing.assert_close(joined[i], reference, rtol=0, atol=1e-14 * float(reference.abs().max()))


def test_reconstruct_batch_size_bounds_rows_of_every_pass(tmp_path, monkeypatch):
    """batch_size caps inputs × points on the segment, not inputs: no pass holds more rows,
    and the reconstruction is the same as in one batch."""
    run = train(Case("mlp", "adamw", act="relu", steps=3, lr_scale=3.0, n_test=6), tmp_path / "h")
    whole = ex.reconstruct(run.path, run.model, run.test_x, progress=False)
    assert whole.attrs["kinks_located"] > 0
    seen = []
    for name in ("directional_along", "kink_pattern"):
        original = getattr(FlatModel, name)

        def spy(self, theta, delta, x, t, *args, _original=original):
            seen.append(len(x))
            return _original(self, theta, delta, x, t, *args)

        monkeypatch.setattr(FlatModel, name, spy)
    split = ex.reconstruct(run.path, run.model, run.test_x, batch_size=5, progress=False)
    assert max(seen) <= 5 and len(seen) > 2 * run.case.steps
    np.testing.assert_allclose(split["reconstructed"].values, whole["reconstructed"].values, rtol=0, atol=1e-14)
    assert split.attrs["kinks_located"] == whole.attrs["kinks_located"]
    assert split.attrs["relative_residual"] <= 1e-9


@pytest.mark.parametrize("kink_tolerance", [0.0, 1e-9])
def test_a_budget_with_nothing_beyond_the_search_reserve_searches_one_interval_at_a_time(
        tmp_path, monkeypatch, kink_tolerance):
    """With memory_budget exactly what the plan reserves, the kink search holds one interval per
    round and one row per pattern pass, searching the inputs one after another, and the
    Jacobians on kinked segments come in passes of the rows the pass counts for one plain node
    (2·O·D per input: 1 row of ~4·O·D for the chunk's 2 inputs) and those the search's bytes
    hold (its reserve, 9,168 bytes, holds 1 row of 4·3·51·8 + 1,296 = 6,192 bytes), 16 rows at
    once without a budget. Nothing beyond the reserve leaves no room for waiting intervals' patterns:
    all but the newest group shed them, and they are computed again at their turn. The kinks and
    the cube are those found unbounded."""
    run = train(Case("mlp", "adamw", act="relu", steps=4, lr_scale=3.0, n_test=6), tmp_path / "h")
    options = dict(keep=("train", "test", "output"), kink_tolerance=kink_tolerance, tolerance=None)
    whole = run.explain(memory_budget=None, **options)
    assert whole.attrs["kinks_located"] > 0
    reserve = ex.plan(run.path, run.model, run.test_x, run.test_y, test_chunk=2, **options).device_bytes
    groups, rows = [], []
    split, pattern = PathIntegral._split, FlatModel.kink_pattern
    monkeypatch.setattr(PathIntegral, "_split", lambda self, seg, iv, *a: groups.append(len(iv))
                        or split(self, seg, iv, *a))
    monkeypatch.setattr(FlatModel, "kink_pattern", lambda self, th, de, x, t, *a: rows.append(
        (len(x), isinstance(t, torch.Tensor))) or pattern(self, th, de, x, t, *a))
    jacobian_rows, node_jacobians = [], FlatModel.add_node_jacobians
    monkeypatch.setattr(FlatModel, "add_node_jacobians", lambda self, out, owner, *a: jacobian_rows.append(
        len(owner)) or node_jacobians(self, out, owner, *a))
    restored, with_ends = [], PathIntegral._with_ends
    monkeypatch.setattr(PathIntegral, "_with_ends", lambda self, seg, iv, *a: restored.append(len(iv))
                        or with_ends(self, seg, iv, *a))
    bounded = run.explain(memory_budget=reserve, test_chunk=2, **options)
    assert set(groups) == {1} and len(groups) > run.case.steps
    assert set(restored) == {1} and len(restored) < len(groups)  # one interval a round; the newest kept theirs
    assert max(n for n, per_row in rows if per_row) == 1
    assert max(jacobian_rows) == 1 + 1
    for name in ("kinks_located", "kink_segments_searched", "kink_segments_unresolved"):
        assert bounded.attrs[name] == whole.attrs[name]
    scale = float(abs(whole["attribution"]).max())
    np.testing.assert_allclose(bounded["attribution"].values, whole["attribution"].values, rtol=0, atol=1e-13 * scale)


def test_a_cube_without_a_train_dim_takes_the_kinked_rows_in_passes_the_budget_holds(tmp_path, monkeypatch):
    """Without a train dim the kinked segments' rows go through forward-mode passes. Under a
    budget of what the plan reserves, a pass takes the chunk's 2 inputs and as many more rows as
    the search's reserve (9,168 bytes, as above) holds: a row holds its 51 parameters and a pass
    with 4 tangents, 16 + 4 · 18 elements (FlatModel.forward_mode_sizes) and an eighth more, so
    8 · (51 + 99) = 1,200 bytes, and 7 fit: 9 rows, where all 16 went at once whatever the
    budget. The cube is the one computed unbounded."""
    run = train(Case("mlp", "adamw", act="relu", steps=4, lr_scale=3.0, n_test=6), tmp_path / "h")
    options = dict(keep=("test", "output"), tolerance=None)
    rows, directional_rows = [], FlatModel.directional_rows
    monkeypatch.setattr(FlatModel, "directional_rows", lambda self, th, de, x, *a: rows.append(len(x))
                        or directional_rows(self, th, de, x, *a))
    whole = run.explain(memory_budget=None, **options)
    assert whole.attrs["kinks_located"] > 0 and max(rows) == 16
    reserve = ex.plan(run.path, run.model, run.test_x, run.test_y, test_chunk=2, **options).device_bytes
    rows.clear()
    bounded = run.explain(memory_budget=reserve, test_chunk=2, **options)
    assert max(rows) == 9
    assert bounded.attrs["kinks_located"] == whole.attrs["kinks_located"]
    scale = float(abs(whole["attribution"]).max())
    np.testing.assert_allclose(bounded["attribution"].values, whole["attribution"].values, rtol=0, atol=1e-13 * scale)


@pytest.mark.parametrize("kink_tolerance", [0.0, 1e-9])
def test_the_kink_counts_are_those_of_the_segments_not_of_the_passes(tmp_path, kink_tolerance):
    """With 4 train chunks each test chunk's segments are searched in 4 passes; the cube counts
    them once (it counted each 4 times)."""
    run = train(Case("mlp", "adamw", act="relu", steps=4, lr_scale=3.0, n_test=6), tmp_path / "h")
    options = dict(keep=("train", "test"), kink_tolerance=kink_tolerance, tolerance=None)
    whole, chunked = run.explain(**options), run.explain(train_chunk=3, **options)
    assert whole.attrs["kinks_located"] > 0
    for name in ("kinks_located", "kink_segments_searched", "kink_segments_unresolved"):
        assert chunked.attrs[name] == whole.attrs[name]


def _counting_searches(monkeypatch) -> list[int]:
    """The steps of each kink search explain runs (PathIntegral.search_steps), noted as it runs."""
    searched, search = [], PathIntegral.search_steps
    monkeypatch.setattr(PathIntegral, "search_steps", lambda self, th, *a: searched.append(len(th))
                        or search(self, th, *a))
    return searched


def _assert_identical(cube: xr.Dataset, other: xr.Dataset) -> None:
    assert sorted(cube.data_vars) == sorted(other.data_vars) and cube.attrs.keys() == other.attrs.keys()
    for name in cube.data_vars:
        np.testing.assert_array_equal(cube[name].values, other[name].values, err_msg=name)
    for name, value in cube.attrs.items():
        np.testing.assert_array_equal(value, other.attrs[name], err_msg=name)


@pytest.mark.parametrize("kink_tolerance", [0.0, 1e-9])
@pytest.mark.parametrize("convention, keep", [
    ("update", ("train", "test", "output")),  # walks forwards (a momentum buffer of 3 samples: fewer than 9 rows)
    ("update", ("train",)),  # walks backwards with one carried effect (BACKWARD_MEMORY_RATIO 1), but forwards in
                              # the last chunk of 1 sample
    ("gradient", ("train", "test")),  # walks backwards
])
def test_later_train_chunks_take_the_pieces_their_first_train_chunk_found(tmp_path, monkeypatch, convention, keep,
                                                                          kink_tolerance):
    """The pieces of a step's segment depend on the test inputs, not on the training samples: a
    test chunk's later train chunks take what its first one found, so each explained step is
    searched once per test chunk (2 test chunks of 3 inputs, 4 train chunks of up to 3 samples:
    it was searched once per pass). The cube is bit for bit the one whose later passes search
    again (nothing kept), and its kink counts are those of one pass over all samples."""
    monkeypatch.setattr(engine, "BACKWARD_MEMORY_RATIO", 1)
    run = train(Case("mlp", "adamw", act="relu", steps=5, lr_scale=3.0, n_test=6), tmp_path / "h")
    options = dict(keep=keep, convention=convention, kink_tolerance=kink_tolerance, tolerance=None, test_chunk=3)
    searched = _counting_searches(monkeypatch)
    kept = run.explain(train_chunk=3, **options)
    assert sum(searched) == 2 * run.case.steps
    searched.clear()
    monkeypatch.setattr(engine.KeptPieces, "keep", lambda self, step, pieces: None)
    again = run.explain(train_chunk=3, **options)
    assert sum(searched) == 2 * 4 * run.case.steps
    _assert_identical(kept, again)
    whole = run.explain(**options)
    assert whole.attrs["kinks_located"] > 0
    for name in ("kinks_located", "kink_segments_searched", "kink_segments_unresolved"):
        assert kept.attrs[name] == whole.attrs[name]
    scale = float(abs(whole["attribution"]).max())
    np.testing.assert_allclose(kept["attribution"].values, whole["attribution"].values, rtol=0, atol=1e-13 * scale)


@pytest.mark.parametrize("limit", [0, 200])
def test_later_train_chunks_search_again_the_steps_whose_pieces_were_not_kept(tmp_path, monkeypatch, limit):
    """Pieces are kept while they fit within the bytes the plan leaves them (engine.kept_pieces_bytes,
    here 0: none kept, or 200: with a kink tolerance each step's pieces hold at least the plain
    integral of 3 inputs x 3 outputs, 72 bytes, so at most 2 of the 5 steps fit); a later train
    chunk searches the steps left out again, each once, and the cube is the same bit for bit."""
    run = train(Case("mlp", "adamw", act="relu", steps=5, lr_scale=3.0, n_test=6), tmp_path / "h")
    monkeypatch.setattr(engine, "kept_pieces_bytes", lambda *args: limit)
    options = dict(keep=("train", "test"), kink_tolerance=1e-9, tolerance=None, test_chunk=3, train_chunk=3,
                   memory_budget=2**30)
    stores, init = [], engine.KeptPieces.__init__
    monkeypatch.setattr(engine.KeptPieces, "__init__", lambda self, bound: stores.append(self) or init(self, bound))
    searched = _counting_searches(monkeypatch)
    kept = run.explain(**options)
    assert [store.limit for store in stores] == ([limit] * 2 if limit else [])  # one per test chunk
    assert all(store.bytes <= limit and len(store.by_step) <= limit // 72 for store in stores)
    assert not limit or any(store.by_step for store in stores)
    steps, kept_steps = run.case.steps, [len(store.by_step) for store in stores] or [0, 0]
    assert sum(searched) == sum(steps + 3 * (steps - k) for k in kept_steps)
    searched.clear()
    monkeypatch.setattr(engine.KeptPieces, "keep", lambda self, step, pieces: None)
    again = run.explain(**options)
    assert sum(searched) == 2 * 4 * steps
    _assert_identical(kept, again)


# --- error-controlled kink search (kink_tolerance > 0) ------------------------------------------

KINKED = Case("mlp", "adamw", act="relu", steps=6, lr_scale=3.0, n_test=8)


@pytest.fixture(scope="module")
def kinked_run(tmp_path_factory):
    return train(KINKED, tmp_path_factory.mktemp("kinked") / "h")


def test_a_model_without_kinks_is_found_smooth_on_its_first_segment(tmp_path, monkeypatch):
    """Unbounded, the search takes a window of up to max_window steps at once; a model with no
    kink-making op (tanh) is found smooth on one segment rather than on a window's patterns (a
    trial's GELU MLP: 1.2 s of kink search before, with memory_budget=None only)."""
    run = train(Case("mlp", "adamw", steps=6), tmp_path / "h")
    windows, locate = [], PathIntegral.locate_steps
    monkeypatch.setattr(PathIntegral, "locate_steps", lambda self, theta, *a: windows.append(len(theta))
                        or locate(self, theta, *a))
    cube = run.explain(keep=("test", "output"), memory_budget=None)
    assert windows[0] == 1 and cube.attrs["kink_segments_searched"] == 0
    assert cube.attrs["relative_residual"] <= 1e-9


def test_a_planned_test_chunk_leaves_the_kink_search_its_reserve_again(kinked_run):
    """Fitted to the budget alone, a pass left the search a few KiB beyond its reserve, and it took
    its rows one at a time (a trial: 103 s of search against 1.1 s with 11 MiB to spare): the
    planner halves the test chunk until the search has its reserve once more beyond the pass."""
    run = kinked_run
    options = dict(keep=("train", "test"))
    whole = ex.plan(run.path, run.model, run.test_x, memory_budget=None, **options)
    assert whole.test_chunk == len(run.test_x) and whole.search_reserve > 0
    budget = whole.device_bytes + whole.search_reserve // 2  # holds the whole pass, not the search's room
    tight = ex.plan(run.path, run.model, run.test_x, memory_budget=budget, **options)
    assert tight.test_chunk < len(run.test_x) and tight.search_bytes >= tight.search_reserve > 0
    asked = ex.plan(run.path, run.model, run.test_x, memory_budget=budget, test_chunk=len(run.test_x), **options)
    assert asked.test_chunk == len(run.test_x)  # a chunk asked for is kept


def test_error_controlled_search_is_exact_and_searches_only_segments_that_miss(kinked_run):
    """With a kink tolerance, the run still reconstructs to rounding (the residual is f(θ_N) from a
    forward pass against the integral), like the certified search, but only the segments whose
    plain integral misses are searched."""
    run = kinked_run
    settings = dict(quadrature=4, progress=False)
    plain = ex.reconstruct(run.path, run.model, run.test_x, breakpoints=False, **settings)
    certified = ex.reconstruct(run.path, run.model, run.test_x, **settings)
    controlled = ex.reconstruct(run.path, run.model, run.test_x, kink_tolerance=1e-13, **settings)
    assert plain.attrs["relative_residual"] > 1e-4  # kinks that matter
    assert controlled.attrs["relative_residual"] <= 1e-9
    segments = KINKED.steps * KINKED.n_test
    assert 0 < controlled.attrs["kink_segments_searched"] < segments
    assert controlled.attrs["kink_segments_unresolved"] == 0
    scale = float(np.abs(certified["final"] - certified["initial"]).max())
    np.testing.assert_allclose(controlled["reconstructed"].values, certified["reconstructed"].values,
                               rtol=0, atol=1e-9 * scale)


def test_the_error_controlled_search_cuts_each_kink_once(kinked_run):
    """Sign changes are cut at their predicted roots, not bracketed: where only the kinks make
    segments miss, the error-controlled search places exactly the certified search's kinks (a
    bracket would place two cuts per kink and leave a sliver piece with its own nodes)."""
    run = kinked_run
    certified = ex.reconstruct(run.path, run.model, run.test_x, quadrature=4, progress=False)
    controlled = ex.reconstruct(run.path, run.model, run.test_x, quadrature=4, kink_tolerance=1e-9, progress=False)
    assert controlled.attrs["kinks_located"] == certified.attrs["kinks_located"] > 0
    assert controlled.attrs["relative_residual"] <= 1e-9


def test_a_root_at_a_pieces_end_is_bracketed_not_cut_in_place():
    """A piece whose crossing lies at its own start, where the distance rounded to the wrong
    side, has a root predicted ~1e-18 inside: a cut there would leave the piece as it was, round
    after round, until the piece cap accepted it whatever it missed (a Transformer segment missed
    by 0.38 so). Such a root is bracketed within the settle width; one well inside is cut exactly
    where the interpolant predicts it."""
    flat, _ = flat_of(Product(0.0))
    path = PathIntegral(flat, kink_tolerance=1e-3)
    a, b = torch.tensor([0.25, 0.25], dtype=DT), torch.tensor([0.75, 0.75], dtype=DT)
    z_start = torch.tensor([[1e-18], [0.3]], dtype=DT)  # one linear distance z(u) = z_start − u
    slope = torch.full((2, 1), -1 / 0.5, dtype=DT)  # dz/dt over the width 0.5
    idx, out = torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, 1, dtype=DT)
    pieces = _Intervals(torch.arange(2), a, b, (z_start, slope, idx, out), (z_start - 1, slope, idx, out))
    cuts = path._cuts(pieces)
    at_end, inside = (c[torch.isfinite(c)] for c in cuts)
    assert inside.tolist() == pytest.approx([0.3], abs=1e-15)
    width = 0.5 * (at_end.max() - at_end.min())
    assert len(at_end) == 2 and at_end.min() >= 2**-20 / 16 and width * 2 <= path.settle_width


def test_a_loose_kink_tolerance_is_plain_quadrature(kinked_run):
    """Segments within the tolerance keep the plain rule: a tolerance above every miss searches
    nothing and gives plain quadrature's numbers."""
    run = kinked_run
    plain = ex.reconstruct(run.path, run.model, run.test_x, quadrature=3, breakpoints=False, progress=False)
    loose = ex.reconstruct(run.path, run.model, run.test_x, quadrature=3, kink_tolerance=1e6, progress=False)
    assert loose.attrs["kink_segments_searched"] == 0 and loose.attrs["kinks_located"] == 0
    np.testing.assert_allclose(loose["reconstructed"].values, plain["reconstructed"].values, rtol=0, atol=1e-13)


def plain_misses(run, quadrature: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Per step and input, over outputs, by forward passes at both ends of each step: the largest
    |exact change| and the largest |exact change − plain quadrature's integral|, [steps, inputs]."""
    flat = FlatModel(run.model, layout_of(run.model), DT, "cpu")
    changes, misses = [], []
    x = run.test_x.to(DT)
    plain = PathIntegral(flat, quadrature=quadrature, breakpoints=False)
    for rec in ex.History(run.path).steps():
        theta = flat.layout.flatten(rec.before).to(DT)
        delta = flat.layout.flatten(rec.after).to(DT) - theta
        with torch.no_grad():
            change = flat.explained(theta + delta, x, "log_prob") - flat.explained(theta, x, "log_prob")
        changes.append(change.abs().amax(1))
        misses.append((change - plain.change(theta, delta, x, "log_prob")).abs().amax(1))
    return torch.stack(changes), torch.stack(misses)


def test_a_tolerance_between_the_misses_searches_only_the_worst_segments(kinked_run):
    """Each segment's miss is measured against forward evaluations: the segments searched are
    exactly those whose plain integral misses by more than the tolerance."""
    run = kinked_run
    _, misses = plain_misses(run)
    tolerance = float(misses.median())
    controlled = ex.reconstruct(run.path, run.model, run.test_x, quadrature=3, kink_tolerance=tolerance,
                                progress=False)
    assert controlled.attrs["kink_segments_searched"] == int((misses > tolerance).sum()) > 0


def test_explain_with_a_kink_tolerance_sums_to_the_same_integral(kinked_run):
    """The engine cuts each segment where reconstruct() does: per-sample, per-component
    attributions sum to the same reconstruction, exact to rounding, and equal the certified
    search's attributions to its tolerance."""
    run = kinked_run
    common = dict(quadrature=4, keep=("train", "test", "component", "output"), components="tensor",
                  progress=False)
    controlled = ex.explain(run.path, run.model, run.test_x, kink_tolerance=1e-13, **common)
    certified = ex.explain(run.path, run.model, run.test_x, **common)
    reference = ex.reconstruct(run.path, run.model, run.test_x, quadrature=4, kink_tolerance=1e-13, progress=False)
    explained = controlled["attribution"].sum(["train", "component"]) + controlled["regularization"].sum("component")
    scale = float(np.abs(reference["final"] - reference["initial"]).max())
    np.testing.assert_allclose(explained.values, (reference["reconstructed"] - reference["initial"]).values,
                               rtol=0, atol=1e-11 * scale)
    assert controlled.attrs["relative_residual"] <= 1e-9 and controlled.attrs["kink_tolerance"] == 1e-13
    np.testing.assert_allclose(controlled["attribution"].values, certified["attribution"].values,
                               rtol=0, atol=1e-9 * scale)


def test_parameter_scores_with_a_kink_tolerance_equal_the_certified_ones(kinked_run):
    """The influence stage's setting (parameter scores, kinks located only where a step misses):
    the per-parameter scores equal the certified search's, and their signed sum is the change
    less its weight-decay part."""
    run = kinked_run
    common = dict(quadrature=4, keep=(), outputs="all", parameter_scores=True, progress=False)
    controlled = ex.explain(run.path, run.model, run.test_x, kink_tolerance=1e-13, **common)
    certified = ex.explain(run.path, run.model, run.test_x, **common)
    plain = ex.explain(run.path, run.model, run.test_x, breakpoints=False, tolerance=None, **common)
    change = float((certified["final"] - certified["initial"]).sum())
    scale = float(np.abs(certified["parameter_score"]).max())
    for name in ("parameter_score", "parameter_score_signed", "parameter_score_stepwise_abs"):
        np.testing.assert_allclose(controlled[name].values, certified[name].values, rtol=0, atol=1e-9 * scale)
    decay = float(controlled["regularization"].sum())
    assert float(controlled["parameter_score_signed"].sum()) + decay == pytest.approx(change, rel=1e-9)
    # without the kinks the same scores miss: the test would notice a search that did nothing
    assert np.abs(plain["parameter_score"].values - certified["parameter_score"].values).max() > 1e-4 * scale


def test_a_kink_tolerance_that_cannot_apply_is_refused(kinked_run):
    run = kinked_run
    with pytest.raises(ex.InputError, match="kink_tolerance"):
        ex.reconstruct(run.path, run.model, run.test_x, kink_tolerance=-1.0, progress=False)
    # without breakpoints no kink is located, whatever the tolerance: said, not silently ignored
    with pytest.raises(ex.InputError, match="breakpoints=True"):
        ex.explain(run.path, run.model, run.test_x, breakpoints=False, kink_tolerance=1e-3, progress=False)


def test_the_reconstruction_says_which_steps_miss(kinked_run):
    """step_miss and step_change are each step's miss and change, measured by hand; with the
    kinks located no step misses by more than the smooth pieces' quadrature error."""
    run = kinked_run
    changes, misses = plain_misses(run)
    plain = ex.reconstruct(run.path, run.model, run.test_x, quadrature=3, breakpoints=False, progress=False)
    np.testing.assert_allclose(plain["step_change"].values, changes.numpy(), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(plain["step_miss"].values, misses.numpy(), rtol=1e-9, atol=1e-15)
    assert float(plain["step_miss"].max()) > 1e-4  # kinks that matter
    # the misses of the steps add up to the residual (the largest miss of an input bounds its share)
    assert float(np.abs(plain["residual"]).max("output").max()) <= float(plain["step_miss"].sum("step").max()) + 1e-14
    located = ex.reconstruct(run.path, run.model, run.test_x, quadrature=4, progress=False)
    assert float(located["step_miss"].max()) <= 1e-9 * float(changes.max())
    assert restricted(plain, range(3))["step_miss"].shape == (KINKED.steps, 3)


def test_a_restricted_reconstruction_is_that_of_its_inputs_alone(kinked_run):
    run = kinked_run
    whole = ex.reconstruct(run.path, run.model, run.test_x, quadrature=3, breakpoints=False, progress=False)
    alone = ex.reconstruct(run.path, run.model, run.test_x[:3], quadrature=3, breakpoints=False, progress=False)
    part = restricted(whole, range(3))
    for name in ("initial", "final", "reconstructed", "residual"):
        np.testing.assert_allclose(part[name].values, alone[name].values, rtol=0, atol=1e-13)
    for key in ("max_abs_residual", "max_abs_change", "relative_residual"):
        assert part.attrs[key] == pytest.approx(alone.attrs[key], rel=1e-10), key
    assert part.attrs["relative_residual"] != whole.attrs["relative_residual"]


def test_residual_attrs_by_hand():
    attrs = residual_attrs(np.array([[1.0, -3.0], [0.5, 0.0]]), np.array([[2.0, -6.0], [4.0, 1.0]]))
    assert attrs == {"max_abs_residual": 3.0, "max_abs_change": 6.0, "relative_residual": 0.5}
    assert residual_attrs(np.array([0.0]), np.array([0.0]))["relative_residual"] == 0.0  # nothing changed


def test_residual_to_gap_by_hand():
    """Per input, the largest share of a gap to the model's top output that the residual closes."""
    final = np.array([[0.0, -1.0, -3.0], [-2.0, -0.5, -0.5], [-1.0, -0.2, -4.0]])
    residual = np.array([[0.5, -0.1, 2.0], [1.0, 0.0, 0.0], [-1.0, 0.3, 0.0]])
    rec = xr.Dataset({"final": (("test", "output"), final), "residual": (("test", "output"), residual)})
    # input 0: top 0, gaps 1 and 3, closed |0.5 + 0.1| and |0.5 - 2|; input 1: a tie; input 2: top 1,
    # gaps 0.8 and 3.8, closed |0.3 + 1| and |0.3|
    np.testing.assert_allclose(residual_to_gap(rec), [max(0.6 / 1, 1.5 / 3), np.inf, 1.3 / 0.8], rtol=1e-15)


def test_refined_inputs_replace_theirs_and_decide_the_argmax(kinked_run):
    """with_refined takes the refined inputs' reconstruction as if reconstructed so from the start."""
    run = kinked_run
    plain = ex.reconstruct(run.path, run.model, run.test_x, quadrature=1, breakpoints=False, progress=False)
    located = ex.reconstruct(run.path, run.model, run.test_x, quadrature=3, progress=False)
    share = residual_to_gap(plain)
    tests = np.argsort(-share)[:3]
    refined = ex.reconstruct(run.path, run.model, run.test_x[tests], quadrature=3, progress=False)
    mixed = with_refined(plain, refined, tests)
    rest = np.setdiff1d(np.arange(len(run.test_x)), tests)
    for name in ("reconstructed", "residual", "step_miss"):
        np.testing.assert_allclose(mixed[name].isel(test=tests).values, located[name].isel(test=tests).values,
                                   rtol=0, atol=1e-12)
        np.testing.assert_array_equal(mixed[name].isel(test=rest).values, plain[name].isel(test=rest).values)
    assert residual_to_gap(mixed)[tests].max() < 1e-6 < share[tests].max()
    assert mixed.attrs["refined_tests"] == tests.tolist()
    assert mixed.attrs["max_abs_residual"] == pytest.approx(float(np.abs(mixed["residual"]).max()), rel=1e-15)
    with pytest.raises(ex.InputError, match="3 inputs for 2 positions"):
        with_refined(plain, refined, tests[:2])
    other = refined.assign_attrs(history_sha256="0" * 64)
    with pytest.raises(ex.InputError, match="another history"):
        with_refined(plain, other, tests)
    with pytest.raises(ex.InputError, match="in another order"):
        with_refined(plain, refined, tests[::-1])
    with pytest.raises(ex.InputError, match="other inputs"):
        with_refined(plain, refined, rest[:3])
    # float32 and float64 reconstructions of the same inputs mix: their outputs agree to float32 rounding
    coarse = ex.reconstruct(run.path, run.model, run.test_x, quadrature=1, breakpoints=False, dtype=torch.float32,
                            progress=False)
    assert with_refined(coarse, refined, tests).attrs["refined_tests"] == tests.tolist()


def test_max_kinks_bounds_the_kinks_resolved_per_segment(kinked_run):
    run = kinked_run
    common = dict(quadrature=3, progress=False)
    resolved = ex.reconstruct(run.path, run.model, run.test_x, **common)
    capped = ex.reconstruct(run.path, run.model, run.test_x, max_kinks=0, **common)
    assert resolved.attrs["kink_segments_unresolved"] == 0 < capped.attrs["kink_segments_unresolved"]
    assert capped.attrs["relative_residual"] > 1e3 * resolved.attrs["relative_residual"]


def test_plan_says_when_its_calibration_meets_more_kinks_than_max_kinks(kinked_run):
    """The calibration's steps run the kink search: segments it leaves unresolved warn before the
    explain, whose tolerance they would miss at its end."""
    run = kinked_run
    capped = ex.plan(run.path, run.model, run.test_x, keep=("test", "output"), max_kinks=0, calibrate_steps=6)
    unresolved, searched = capped.calibrated_kinks
    assert 0 < unresolved <= searched
    assert f"{unresolved} of the {searched} (step, input) segments the calibration searched" in str(capped)
    assert "more kinks than max_kinks=0" in str(capped) and "raise max_kinks" in str(capped)
    enough = ex.plan(run.path, run.model, run.test_x, keep=("test", "output"), calibrate_steps=6)
    assert enough.calibrated_kinks[0] == 0 < enough.calibrated_kinks[1] and "raise max_kinks" not in str(enough)
    # every calibrated (step, input) segment counted once: not once per timed run or train chunk
    n_segments = 6 * len(run.test_x)
    chunked = ex.plan(run.path, run.model, run.test_x, keep=("train", "test", "output"), train_chunk=2,
                      calibrate_steps=6)
    assert chunked.seconds_per_later_step is not None
    assert enough.calibrated_kinks[1] == chunked.calibrated_kinks[1] == n_segments
    plain = ex.plan(run.path, run.model, run.test_x, keep=("test", "output"), breakpoints=False, calibrate_steps=6)
    assert plain.calibrated_kinks is None


def test_explain_takes_max_kinks_and_its_error_names_the_unresolved_segments(kinked_run):
    """explain's cap on the kinks resolved per segment is reconstruct's: capped at 0, the same
    segments are integrated plainly (the same residual to rounding), and the error above the
    tolerance says so and names the fix instead of more nodes."""
    run = kinked_run
    capped = run.explain(keep=("test", "output"), quadrature=3, max_kinks=0, tolerance=None)
    reconstructed = ex.reconstruct(run.path, run.model, run.test_x, quadrature=3, max_kinks=0, progress=False)
    assert capped.attrs["max_kinks"] == 0
    assert capped.attrs["kink_segments_unresolved"] == reconstructed.attrs["kink_segments_unresolved"] > 0
    np.testing.assert_allclose(capped["residual"].values, reconstructed["residual"].values, rtol=0, atol=1e-12)
    assert run.explain(keep=("test", "output"), quadrature=3).attrs["kink_segments_unresolved"] == 0
    unresolved = capped.attrs["kink_segments_unresolved"]
    # capped at 0 it locates no kink: the cube is plain quadrature's, which the error says
    assert capped.attrs["kinks_located"] == 0
    plain = run.explain(keep=("test", "output"), quadrature=3, breakpoints=False, tolerance=None)
    np.testing.assert_allclose(capped["attribution"].values, plain["attribution"].values, rtol=1e-13, atol=0)
    with pytest.raises(ex.ReconstructionError, match=rf"(?s)left {unresolved} \(step, input\) segment.*max_kinks=0.*"
                                                      r"Raise max_kinks \(try max_kinks=16\) until .*kink_segments_unresolved is 0.*"
                                                      r"located no kink at all.*breakpoints=False gives"):
        run.explain(keep=("test", "output"), quadrature=3, max_kinks=0, tolerance=1e-6)
    with pytest.raises(ex.ReconstructionError, match=r"(?s)raise quadrature=.*or set breakpoints=True") as error:
        run.explain(keep=("test", "output"), quadrature=1, breakpoints=False, tolerance=1e-6)
    assert "float64" not in str(error.value)
    with pytest.raises(ex.ReconstructionError, match=r"(?s)raise quadrature=.*or set breakpoints=True.*"
                                                      r"the float32 rounding .* dtype=torch.float64"):
        run.explain(keep=("test", "output"), quadrature=1, breakpoints=False, dtype=torch.float32, tolerance=1e-6)
    with pytest.raises(ex.ReconstructionError, match=r"(?s)lower kink_tolerance=0.5 \(0 locates every kink\)"):
        run.explain(keep=("test", "output"), quadrature=1, kink_tolerance=0.5, tolerance=1e-6)  # no segment searched
    for bad in (-1, 1.5, True):
        with pytest.raises(ex.InputError, match=rf"max_kinks={bad!r} must be a whole number ≥ 0"):
            run.explain(max_kinks=bad)


def test_few_inputs_take_one_per_row_pass_with_the_same_integral(kinked_run, monkeypatch):
    """φ·Δ of one or two inputs goes through one per-row pass over all nodes instead of a pass
    per node: the same numbers as the shared-node passes of a larger batch."""
    run = kinked_run
    flat = FlatModel(run.model, layout_of(run.model), DT, "cpu")
    rec = next(iter(ex.History(run.path).steps()))
    theta = flat.layout.flatten(rec.before).to(DT)
    delta = flat.layout.flatten(rec.after).to(DT) - theta
    x = run.test_x.to(DT)
    path = PathIntegral(flat, quadrature=5, breakpoints=False)
    batched = path.change(theta, delta, x, "log_prob")
    calls = []
    original = FlatModel.directional_along
    monkeypatch.setattr(FlatModel, "directional_along",
                        lambda self, *args: calls.append(len(args[2])) or original(self, *args))
    few = path.change(theta, delta, x[:2], "log_prob")
    assert calls == [2 * 5]
    torch.testing.assert_close(few, batched[:2], rtol=0, atol=1e-14)


def test_a_relu_after_a_frozen_layer_has_no_kinks_to_search(tmp_path):
    """The ReLU's input does not depend on θ when the layer before it is frozen: nothing to
    search there, and the kinks of a later ReLU are still located (here none is left)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    model[0].requires_grad_(False)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x, y = torch.randn(6, 4, dtype=DT), torch.randint(0, 3, (6,))
    record_full_batch(tmp_path / "h", model, optimizer, x[:4], y[:4], steps=3)
    cube = ex.explain(tmp_path / "h", model, x[4:], y[4:], progress=False)
    assert cube.attrs["kinks_located"] == 0
    assert cube.attrs["max_abs_residual"] <= 1e-12 * cube.attrs["max_abs_change"]


def rows_for(shapes: tuple[tuple[int, ...], ...], index: list[int], alpha: float):
    """A layout of `shapes`, random out [4, 2, D], rows [R, 2, *shape] per tensor, and out with
    alpha × row r added at index[r] by a loop."""
    layout = ParamLayout(tuple("abc"[:len(shapes)]), shapes)
    g = torch.Generator().manual_seed(0)
    out = torch.randn(4, 2, layout.dim, dtype=DT, generator=g)
    rows = {name: torch.randn(len(index), 2, *shape, dtype=DT, generator=g)
            for name, shape in zip(layout.names, shapes)}
    expected = out.clone()
    for r, at in enumerate(index):
        expected[at] += alpha * layout.flatten({name: t[r] for name, t in rows.items()})
    return layout, out, rows, expected


@pytest.mark.parametrize("owner", [[0, 0, 1, 1, 1, 3], [2, 2, 0, 0, 2], [3, 3, 3], [1, 2, 3], [2, 0, 1], []])
def test_layout_add_runs_equals_a_loop_over_rows(owner):
    """Rows of one owner in a run are summed before they are added; owners repeated apart, and
    rows each of their own owner (by index_add), land where the owner says."""
    layout, out, rows, expected = rows_for(((7, 6), (3,), ()), owner, 1.0)
    layout.add_runs(out, torch.tensor(owner, dtype=torch.long), rows)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("index", [[0, 1, 2, 3], [1, 2], [3, 0, 1, 3, 2], [2, 2, 2], [3, 2, 1, 0], []])
@pytest.mark.parametrize("wide", [False, True], ids=["by index_add_", "run by run"])
def test_layout_index_add_equals_a_loop_over_rows(index, wide):
    """The rows of the integrand land where the index says, repeated places summed, whether
    added run by run into narrowed views (rows of 2 × 4,200 elements) or by index_add_ (rows
    of 2 × 6, except a single run)."""
    layout, out, rows, expected = rows_for(((70, 60), (3,)) if wide else ((2, 3), (3,)), index, 0.5)
    layout.index_add(out, torch.tensor(index, dtype=torch.long), rows, alpha=0.5)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-15)


def test_layout_flatten_scales_each_batch_entry_as_it_writes_it():
    """flatten with a scale [S, B] equals each entry's parts laid end to end by hand, times its
    scale, for contiguous and permuted (strided) tensors alike; a tensor whose batch dims are
    not the scale's is refused, not broadcast."""
    layout = ParamLayout(("a", "b", "c"), ((3, 2), (4,), ()))
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(2, 3, 5, 2, dtype=DT, generator=g).permute(0, 2, 1, 3),  # [2, 5, 3, 2], strided
               "b": torch.randn(2, 5, 4, dtype=DT, generator=g), "c": torch.randn(2, 5, dtype=DT, generator=g)}
    scale = torch.randn(2, 5, dtype=DT, generator=g)
    flat = layout.flatten(tensors, scale)
    for s in range(2):
        for k in range(5):
            by_hand = torch.cat([tensors["a"][s, k].reshape(-1), tensors["b"][s, k], tensors["c"][s, k][None]])
            torch.testing.assert_close(flat[s, k], scale[s, k] * by_hand, rtol=0, atol=0)
    torch.testing.assert_close(layout.flatten(tensors), flat / scale[..., None], rtol=1e-15, atol=0)
    with pytest.raises(ValueError, match=r"b is \(5, 4\), not \(2, 5, 4\)"):
        layout.flatten({**tensors, "b": tensors["b"][0]}, scale)


class BatchRounded(nn.Module):
    """Inputs [B, 2] of about 1e6, scaled per position by a and folded batch-first into [B·L]
    before a ReLU at 1e6; the batch's pass rounds unlike one input's, as a batched kernel sums in
    another order: its values carry a relative 1e-12 per input of the batch."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor([0.5, 0.2], dtype=DT))

    def forward(self, x):
        h = self.a * x * (1 + 1e-12 * len(x))
        return F.relu(h.reshape(-1) - 1e6).reshape(h.shape).sum(1, keepdim=True)


def test_a_fold_read_to_the_batchs_rounding_keeps_each_inputs_kinks():
    """The batch's pass and each input's differ by rounding (4e-12 of values near 1e6: above the
    dtype's eps, and above 1.5e-8 in absolute terms, within half the digits of the values): the
    fold is read in turn, and the kinks are where a_l(t) x_bl = 1e6 by hand, along
    a(t) = (0.5 + t, 0.2 + 1.5t)."""
    flat, theta = flat_of(BatchRounded())
    delta = torch.tensor([1.0, 1.5], dtype=DT)
    x = 1e6 * (1 + torch.rand(4, 2, dtype=DT, generator=torch.Generator().manual_seed(0)))
    for kinks, (x0, x1) in zip(PathIntegral(flat, quadrature=2).kinks(theta, delta, x), x.tolist()):
        by_hand = [1e6 / x0 - 0.5, (1e6 / x1 - 0.2) / 1.5]
        np.testing.assert_allclose(kinks, sorted(t for t in by_hand if 0 < t < 1), rtol=0, atol=1e-9)


def test_a_fold_misread_in_a_quarter_of_its_entries_either_way_is_refused():
    """Scrambled's two inputs agree in every a_l x_l = 0.5 but their last (0.1 and 0.9): read in
    turn, entries 3 and 5 of its 8 differ from the passes on each input alone, interleaved entries
    5 and 6: 1/4 either way, far above a tie's rounding, is refused (not read in the nearer order)."""
    flat, theta = flat_of(Scrambled())
    a = theta.clone()
    x = torch.tensor([[0.5, 0.5, 0.5, 0.1], [0.5, 0.5, 0.5, 0.9]], dtype=DT) / a
    with pytest.raises(ex.UnsupportedError, match=r"(?s)shaped \[8\] for 2 inputs whose dim 0 folds them with "
                                                   r"another dim \(4 entries each\).*breakpoints=False"):
        PathIntegral(flat, quadrature=2).kinks(theta, theta, x)


@pytest.mark.parametrize("position_first", [False, True], ids=["batch first", "position first"])
def test_distinct_inputs_that_read_a_fold_alike_either_way_leave_its_order_to_a_later_batch(position_first):
    """Inputs (1, 2.5) and (1, 4) make a_l x_bl = (0.5, 0.5) and (0.5, 0.8): folded in either order
    [0.5, 0.5, 0.5, 0.8], so they tell nothing of the order, though they differ. The first order
    (in turn) was kept for every later batch, whose position-first inputs' rows then held other
    inputs' units (8 of the next batch's 10 distances off, by up to 0.52). Each batch's distances
    are a_l x_bl − 1 by hand."""
    a, delta = torch.tensor([0.5, 0.2], dtype=DT), torch.tensor([1.0, 1.5], dtype=DT)
    flat, theta = flat_of(SequenceFirst(position_first, fold=True))
    alike = torch.tensor([[1.0, 2.5], [1.0, 4.0]], dtype=DT)
    x = 1 + torch.rand(5, 2, dtype=DT, generator=torch.Generator().manual_seed(0))
    for batch in (alike, x):
        z = flat.kink_pattern(theta, delta, batch, 0.0)[0]
        torch.testing.assert_close(z, a * batch - 1, rtol=0, atol=1e-15)
