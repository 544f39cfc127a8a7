"""Mixed mode: the path kernel φ·v along many tangents v without materialising the Jacobian φ.

The per-row route takes J_r = ∂f/∂θ [outputs, D] of every row (an input at a node of its segment)
by reverse mode, sums an input's rows and contracts the sum with the tangents (the per-sample
updates). Mixed mode never builds J. Every call of a torch function that reads a trained tensor P
beside activations a (F.linear, einsum, embedding, an added bias, ...) is an op y = op(a, P),
affine in P. One reverse pass per row gives δ = ∂(explained outputs)/∂y for every output; the
op's change along a tangent V (restricted to P) is jvp(op(a, ·), P; V), and by the chain rule

    J_r · V = Σ_ops <δ_op, change_op(V)>.

Each op's term is taken the cheaper way round: forward (the change along all tangents at once,
a matmul when the op is F.linear or an einsum, then one batched product with δ) or reverse (the
op's share of J_r from δ, summed over an input's rows, then contracted with the tangents, as the
per-row route does for every tensor). Forward pays for an op read at few positions when many
outputs are explained; with one output per input the per-row route costs as little.

The δ pass takes one gradient per row of the explained outputs of `outputs` copies of the row's
input, output o read from copy o: its backward multiplies [outputs, ...] cotangents by each
weight as one matmul, where a reverse pass vmapped over the outputs copies each row's weights
once per output (measured on the reference Transformer: 6.5 ms against 8.3 ms for 36 rows).

A call that reads one trained tensor W and no other tensor (W.T, a view or a slice of W, chained)
makes a tensor that the calls after it read in W's place: their terms are taken through it by
jvp and vjp (Call.made). The products written out below for F.linear, F.embedding, einsum and an
added tensor serve only calls that read W itself.

What is found for a model is checked before use: every op that reads a trained tensor must return
one floating tensor whose dim 0 is the batch and read at least one tensor that runs over the
batch (`MixedMode.calls`), and the terms of all ops, taken either way round, must add up to a
forward-mode jvp of the explained outputs along a random tangent on two rows at two points of a
random segment, in float64 (`MixedMode.exact`; it also fails an op whose change depends on the
point, i.e. one not affine in its tensors, and one that mixes the inputs of a batch). A model
that fails is left to the per-row route.
"""

from __future__ import annotations

import string
from functools import cached_property
from itertools import chain
from math import prod
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch.func import grad, vjp, vmap
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten
from torch.utils.flop_counter import FlopCounterMode

from .functional import FlatModel, jvp, row_points

_SLOT = object()  # where a tensor stands in a recorded call's flattened arguments

# the most that the terms of all ops may miss a jvp of the explained outputs by, relative to its
# largest entry, in float64 (measured: 1e-16 to 1e-15 on the tests' models)
COMPLETENESS_TOLERANCE = 1e-9
# The cost estimate that chooses between mixed mode and the per-row route, in multiply-adds of a
# large matmul: a per-row pass writes each element of J at about this many (J of 36 rows × 25
# outputs × 10,016 parameters of the reference Transformer took 23 ms, its contraction 500 million
# multiply-adds 8 ms, float32 on one core), and each op's term in mixed mode costs about this many
# beyond its multiply-adds (a term of one row along the 203 tangents of a step of the reference
# workload: 0.20-0.26 ms for the embedding, the biases and the unembedding, two threads). At 5 · 10^7
# (0.9 ms, measured before the steps were batched) the estimate left 3 and 4 of its 10 inputs to the
# Jacobians, where mixed mode is faster: calls 1.18 s against 1.44 s and 1.23 s against 1.35 s
# (medians of 8, alternating)
JACOBIAN_ELEMENT = 100
OP_TERM = 10**7


class Call(NamedTuple):
    """A call of a torch function that reads trained tensors: its flattened arguments with each
    tensor's place marked, the trained tensor at some of those places, which of the others run
    over the batch, its output's shape for one input, its multiply-adds for one input (at least
    its output's size: an addition or a lookup counts one an element), and at the places where
    it reads a tensor made from a trained one alone (W.T, a view), how it is made from it."""

    func: Callable
    template: list
    spec: object
    params: dict[int, str]
    batched: tuple[bool, ...]
    shape: tuple[int, ...]
    macs: int
    made: dict[int, Callable]

    def __call__(self, others: list[torch.Tensor], tensors: dict[str, torch.Tensor]):
        """The call with these tensors in the places of its other tensors, in order, and the
        trained ones by name."""
        flat, rest = list(self.template), iter(others)
        for i, value in enumerate(flat):
            if value is _SLOT:
                flat[i] = self.made.get(i, _same)(tensors[self.params[i]]) if i in self.params else next(rest)
        args, kwargs = tree_unflatten(flat, self.spec)
        return self.func(*args, **kwargs)

    @property
    def outputs_per_input(self) -> int:
        return prod(self.shape[1:])

    def reads_itself(self, place: int) -> bool:
        """Whether the call reads its trained tensor at `place` as it is, not a tensor made from it:
        the forms whose terms are written out below read the tensor itself."""
        return place not in self.made


def _same(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


class _Made(NamedTuple):
    """A tensor made from one trained tensor alone (W.T, W.view(...), W[:, :k]): the trained
    tensor's name and how the tensor is made from it."""

    name: str
    make: Callable


def _template(flat: list) -> list:
    """A call's flattened arguments with each tensor's place marked."""
    return [_SLOT if isinstance(a, torch.Tensor) else a for a in flat]


def _maker(func: Callable, flat: list, spec, place: int, inner: Callable) -> Callable:
    """tensor -> the call's output with inner(tensor) at `place` of its flattened arguments."""
    def make(tensor: torch.Tensor) -> torch.Tensor:
        args, kwargs = tree_unflatten([inner(tensor) if i == place else a for i, a in enumerate(flat)], spec)
        return func(*args, **kwargs)

    return make


class _Reads(TorchFunctionMode):
    """The calls of torch functions that read trained tensors, in order: recorded with their
    outputs (`probes` None), or given probes, each floating output plus its probe, with the
    call's other tensors kept (the activations). A call whose output is no floating tensor gives
    no derivative (a shape, an argmax) and is passed over; `refused` names one whose output holds
    tensors but is not one. A call that reads one trained tensor and no other tensor (W.T, a view
    of W) makes a tensor that later calls read in W's place (`made`): it is no call of its own."""

    def __init__(self, params: dict[str, torch.Tensor], probes: list[torch.Tensor] | None = None):
        super().__init__()
        self.names = {id(t): name for name, t in params.items()}
        self.made: dict[int, _Made] = {}  # by the id of a tensor made from a trained one alone
        self.kept: list[torch.Tensor] = []  # the tensors of `made`, alive while their ids are keys
        self.probes = probes
        self.recorded: list[tuple] = []
        self.others: list[list[torch.Tensor]] = []
        self.refused = ""

    def _read(self, a) -> bool:
        return id(a) in self.names or id(a) in self.made

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not any(isinstance(a, (list, tuple, dict)) or self._read(a) for a in chain(args, kwargs.values())):
            return out  # no trained tensor among the arguments: spares most calls a tree_flatten (~30 µs)
        flat, spec = tree_flatten((args, kwargs))
        tensors = [i for i, a in enumerate(flat) if isinstance(a, torch.Tensor)]
        params = {i: self.names[id(flat[i])] if id(flat[i]) in self.names else self.made[id(flat[i])].name
                  for i in tensors if self._read(flat[i])}
        if not params:
            return out
        if not (isinstance(out, torch.Tensor) and out.is_floating_point()):
            if not isinstance(out, torch.Tensor) and any(isinstance(t, torch.Tensor) for t in tree_leaves(out)):
                self.refused = self.refused or f"{getattr(func, '__name__', func)} returns {type(out).__name__}"
            return out
        # the makers of the tensors made from trained ones that the call reads, by place
        made = {i: self.made[id(flat[i])].make for i in params if id(flat[i]) in self.made}
        if len(tensors) == 1:  # made from the trained tensor alone: read in its place by later calls
            (place, name), = params.items()
            if out is not flat[place]:  # (W.to(W.dtype) and W.contiguous() return W itself)
                self.made[id(out)] = _Made(name, _maker(func, _template(flat), spec, place, made.get(place, _same)))
                self.kept.append(out)
            return out
        others = [a for i, a in enumerate(flat) if isinstance(a, torch.Tensor) and i not in params]
        if self.probes is None:
            with FlopCounterMode(display=False) as flops:
                func(*args, **kwargs)
            self.recorded.append((func, _template(flat), spec, params, out, others, flops.get_total_flops() // 2,
                                  made))
        else:
            out = out + self.probes[len(self.others)]
        self.others.append(others)
        return out


class MixedMode:
    """Mixed-mode kernels of one FlatModel (module docstring)."""

    def __init__(self, flat: FlatModel):
        self.flat = flat
        self._calls: dict[tuple, list[Call] | None] = {}  # per input shape (see calls)
        self._exact: dict[tuple, bool] = {}  # per input shape and target (see exact)
        self.refusal: dict[tuple, str] = {}  # per input shape: why mixed mode was refused ("": it was not)

    def calls(self, theta: torch.Tensor, x: torch.Tensor) -> list[Call] | None:
        """The calls that read trained tensors in a forward pass of x's shape, once per input
        shape; None where one of them cannot be taken by mixed mode (module docstring; self.refusal
        says why)."""
        key = tuple(x.shape[1:])
        if key not in self._calls:
            self._calls[key], self.refusal[key] = _discover(self.flat, theta, x)
        return self._calls[key]

    def exact(self, calls: list[Call], theta: torch.Tensor, x: torch.Tensor, target: str) -> bool:
        """Whether the calls' terms add up to a jvp of the explained outputs (module docstring),
        checked once per input shape and target, in float64; a model that cannot compute in
        float64, or whose ops torch.func cannot transform so, is not."""
        key = (tuple(x.shape[1:]), target)
        if key not in self._exact:
            try:
                why = _incomplete(self.flat.in_dtype(torch.float64), calls, theta, x, target)
            except (RuntimeError, NotImplementedError) as error:
                why = f"the ops' terms could not be checked in float64 ({type(error).__name__}: {error})"
            self._exact[key] = not why
            self.refusal[key[0]] = why
        return self._exact[key]

    def pays(self, calls: list[Call], rows: int, inputs: int, outputs: int, tangents: int, steps: int = 1) -> bool:
        """Whether mixed mode's estimated cost for these rows, inputs, outputs per input and
        tangents of a step is below the per-row route's: J of every row and the contraction of an
        input's sum with the tangents, against the δ pass and each op's term the cheaper way round,
        each with its own fixed cost (JACOBIAN_ELEMENT; OP_TERM, shared by the `steps` steps of a
        mixed batch, whose terms one call takes). With one output per input the per-row route wins
        (measured on the reference Transformer, float32 on one core: 7 ms against 16 ms for 36 rows),
        with 25 mixed mode (30-34 ms against 22-24 ms). On a segment taken by the plain rule's nodes
        alone, where the Jacobian route takes each node at one point for a chunk of inputs, mixed
        mode wins as well (the reference workload's plain setting, 2 threads: 0.97 s against
        1.65 s)."""
        dim, forward = self.flat.layout.dim, sum(call.macs for call in calls)
        per_row = rows * outputs * (JACOBIAN_ELEMENT * dim + forward) + inputs * outputs * dim * tangents
        terms = [min(_reverse_cost(call, name, self.flat, rows, inputs, outputs, tangents),
                     _forward_cost(call, rows, outputs, tangents)) for call in calls for name in call.params.values()]
        return rows * outputs * forward + sum(terms) + OP_TERM * len(terms) / steps < per_row

    @staticmethod
    def row_elements(calls: list[Call], outputs: int, tangents: int) -> int:
        """Elements one row holds at once in add_kernel: its δ, probes and O copies of the
        activations (each call's output standing for one), and the largest op's change along
        every tangent."""
        sizes = [call.outputs_per_input for call in calls]
        return 3 * outputs * sum(sizes) + tangents * max(sizes)

    def add_kernel(self, out: torch.Tensor, step: torch.Tensor, owner: torch.Tensor, theta: torch.Tensor,
                   delta: torch.Tensor, x: torch.Tensor, t: torch.Tensor, w: torch.Tensor,
                   select: torch.Tensor | None, target: str, tangents: torch.Tensor, parts: list[slice],
                   calls: list[Call], reverse: bool | None = None) -> None:
        """out[s, p, owner[r]] += w_r J(x_r; θ_s + t_r Δ_s)[:, part p] · tangents[s][:, part p]ᵀ for
        each row r (an input of segment s = step[r] with its own node t_r and weight w_r; rows
        ordered by segment), every selected output and each part p of θ (out: [S, parts, N, O, V];
        θ, Δ: [S, D]; tangents [S, V, D]). The rows of several segments share one δ pass and each
        reverse term's passes, whose fixed costs then count once (module docstring). `reverse` takes
        every op one way round (for the completeness check; None: the cheaper)."""
        flat = self.flat
        points = flat.layout.unflatten(row_points(theta[step], delta[step], t))
        deltas, others = _deltas(flat, calls, points, x, w.to(theta.dtype), select, target, out.shape[3])
        at = flat.layout.unflatten(theta[0])  # the point the ops' changes are taken at: any, for they are affine
        views = flat.layout.unflatten(tangents)  # [S, V, *shape] each
        slices = flat.layout.slices()
        _, _, inputs, outputs, n = out.shape
        present, counts = torch.unique_consecutive(step, return_counts=True)
        runs = [(int(s), slice(int(end - count), int(end))) for s, count, end in zip(present, counts, counts.cumsum(0))]
        span = slice(runs[0][0], runs[-1][0] + 1)  # the segments of these rows
        segments = span.stop - span.start
        groups = _Groups((step - span.start) * inputs + owner, segments * inputs)  # (segment, input) pairs
        for call, delta_k, others_k in zip(calls, deltas, others):
            rows_k = [a.flatten(0, 1) if b else a[0] for a, b in zip(others_k, call.batched)]  # rows into the batch
            for place, name in call.params.items():
                part = next(p for p, sl in enumerate(parts) if _within(slices[name], sl))
                backwards = reverse if reverse is not None else \
                    _reverse_cost(call, name, flat, len(t), len(runs) * inputs, outputs, n) < \
                    _forward_cost(call, len(t), outputs, n)
                if backwards:  # every (segment, input)'s share at once, summed over its rows
                    summed = _summed_share(call, name, others_k, delta_k, at, groups)
                    out[span, part] += torch.bmm(summed.reshape(segments, inputs * outputs, -1),
                                                 views[name][span].flatten(2).transpose(1, 2)).view(out[span, part].shape)
                    continue
                for s, rows in runs:  # each segment along its own tangents
                    own_rows = [a[rows] if b else a for a, b in zip(rows_k, call.batched)]
                    out[s, part].index_add_(0, owner[rows], _forward_terms(call, place, name, own_rows, delta_k[rows],
                                                                           at, views[name][s]))


def _within(inner: slice, outer: slice) -> bool:
    return (outer.start or 0) <= inner.start and (outer.stop is None or inner.stop <= outer.stop)


def _reverse_cost(call: Call, name: str, flat: FlatModel, rows: int, inputs: int, outputs: int, tangents: int) -> int:
    """Multiply-adds of an op's term taken reverse: its share of J per row, the contraction of
    an input's sum."""
    size = prod(flat.layout.shapes[flat.layout.names.index(name)])
    return rows * outputs * call.macs + inputs * outputs * size * tangents


def _forward_cost(call: Call, rows: int, outputs: int, tangents: int) -> int:
    """Multiply-adds of an op's term taken forward: its change along every tangent, the product
    with δ."""
    return rows * tangents * (call.macs + outputs * call.outputs_per_input)


def _deltas(flat: FlatModel, calls: list[Call], points: dict[str, torch.Tensor], x: torch.Tensor,
            w: torch.Tensor, select: torch.Tensor | None, target: str, outputs: int):
    """δ of every call, w_r ∂(selected output o of row r)/∂(the call's output) [R, O, *shape[1:]],
    and each call's other tensors per row ([R, 1, ...] where they run over the batch), by one
    gradient per row of the explained outputs of O copies of its input (module docstring)."""

    def row(p: dict[str, torch.Tensor], x1: torch.Tensor, w1: torch.Tensor, sel: torch.Tensor | None):
        def picked(probes: list[torch.Tensor]):
            mode = _Reads(p, probes)
            with mode:
                y = flat._explain(flat._call(p, x1.expand(outputs, *x1.shape), jacobian=True), target, outputs)
            if len(mode.others) != len(calls):
                raise RuntimeError(f"explaind's mixed mode found {len(mode.others)} calls reading trained tensors "
                                   f"where discovery found {len(calls)}: the model calls other ops for other inputs "
                                   "(a branch on its input). Fix: write the forward without the branch (torch.where "
                                   "on both sides), or explain with breakpoints=False, which mixed mode leaves to "
                                   "the Jacobians")
            copy = torch.arange(outputs, device=y.device)
            y = y[copy, copy] if sel is None else y[copy, sel]
            kept = [[a[:1] if b else a for a, b in zip(others, call.batched)] for others, call in zip(mode.others, calls)]
            return (y * w1).sum(), kept

        probes = [torch.zeros(outputs, *call.shape[1:], dtype=w1.dtype, device=w1.device) for call in calls]
        return grad(picked, has_aux=True)(probes)

    return vmap(row, in_dims=(0, 0, 0, None if select is None else 0))(points, x, w, select)


def _forward_terms(call: Call, place: int, name: str, rows: list[torch.Tensor], delta: torch.Tensor,
                   at: dict[str, torch.Tensor], tangents: torch.Tensor) -> torch.Tensor:
    """<δ_r,o, the op's change along each tangent> [R, O, V], summed over the K positions a row
    reads the tensor at. For F.linear's weight (a matmul), F.embedding's table (a lookup) and an
    einsum (by an einsum) the change is made as [R, K·Y, V], so that δ enters as [R, O, K·Y] and
    one product per row sums over the positions too (measured on the reference Transformer's
    embedding, 100 rows: 2.4 ms against 4.1 ms for a product per position and a sum; W_K at 54
    rows: 1.6 ms against 2.0 ms). For any other op (by jvp) the changes are [R·K, V, Y] and δ
    [R·K, O, Y], summed after."""
    n, (r, outputs) = len(tangents), delta.shape[:2]
    itself = call.reads_itself(place)  # a tensor made from the trained one (W.T) goes by jvp
    if itself and call.func is F.linear and place == 1:
        a = rows[0]
        weights = tangents.transpose(0, 1).reshape(-1, a.shape[-1])  # [(out, V), in]
        change = F.linear(a.reshape(-1, a.shape[-1]), weights).view(r, -1, n)
        return torch.bmm(delta.reshape(r, outputs, -1), change)
    if itself and call.func is F.embedding and place == 1:  # the rows of the tangents the input looks up
        table = tangents.permute(1, 2, 0).contiguous()  # [size, features, V]
        return torch.bmm(delta.reshape(r, outputs, -1), table[rows[0]].view(r, -1, n))
    if itself and _plain_einsum(call):
        return torch.bmm(*_einsum_change(call, place, rows, delta, tangents))
    op = lambda p: call(rows, {**at, name: p})  # noqa: E731
    # a copy: forward mode gives a view's base a tangent too, here one per tangent of all of θ
    primal = at[name].clone()
    change = vmap(lambda v: jvp(op, (primal,), (v,))[1], out_dims=1)(tangents).reshape(r, n, -1)
    terms = torch.bmm(delta.reshape(r, outputs, -1), change.transpose(1, 2))  # [R·K, O, V]
    return terms if len(terms) == r else terms.view(r, -1, outputs, n).sum(1)


def _einsum_change(call: Call, place: int, rows: list[torch.Tensor], delta: torch.Tensor, tangents: torch.Tensor):
    """δ as [R, O, K·Y] and an einsum's change along every tangent [R, K·Y, V], with K the
    positions (the output's indices that are not the tensor's, after the batch's) and Y the
    output's indices that are the tensor's."""
    equation = call.template[0].replace(" ", "")
    operands, out = equation.split("->")
    operands = operands.split(",")
    own = set(operands[place - 1])
    free = next(c for c in string.ascii_letters if c not in equation)
    positions = "".join(c for c in out if c not in own)
    kept = "".join(c for c in out if c in own)
    operands[place - 1] = free + operands[place - 1]
    values, rest = [], iter(rows)
    for i in range(len(operands)):
        values.append(tangents if i == place - 1 else next(rest))
    change = torch.einsum(",".join(operands) + "->" + positions + kept + free, *values)
    # δ's dims: 0 the row, 1 the output, then the op's output dims after the batch's
    order = [0, 1, *(1 + out.index(c) for c in positions[1:] + kept)]
    r = len(delta)
    return delta.permute(order).reshape(r, delta.shape[1], -1), change.reshape(r, -1, len(tangents))


def _plain_einsum(call: Call) -> bool:
    """Whether the call is an einsum with an explicit output, no ellipsis, no letter twice in one
    subscript and one trained tensor: the form the einsum terms below are written for."""
    equation = call.template[0]
    if call.func is not torch.einsum or not isinstance(equation, str) or "->" not in equation or "." in equation:
        return False
    subscripts = equation.replace(" ", "").replace("->", ",").split(",")
    return len(call.params) == 1 and all(len(set(s)) == len(s) for s in subscripts)


class _Groups:
    """Rows grouped by an index (each row's segment and input), for sums over each group's rows:
    by index_add, or, for a product over a group's rows, as one batched matmul over a [groups,
    L] layout of the rows, L the largest group (worked out only if a term asks for it)."""

    def __init__(self, index: torch.Tensor, size: int):
        self.index, self.size = index, size

    @cached_property
    def _counts(self) -> torch.Tensor:
        return torch.bincount(self.index, minlength=self.size)

    @cached_property
    def length(self) -> int:
        return int(self._counts.max())

    @cached_property
    def slot(self) -> torch.Tensor:
        """Each row's place in the [groups · L] layout: its group's first slot plus its rank there."""
        index = self.index
        order = torch.argsort(index, stable=True)
        first = self._counts.cumsum(0) - self._counts
        slot = torch.empty_like(index)
        slot[order] = index[order] * self.length + torch.arange(len(index), device=index.device) - first[index[order]]
        return slot

    def summed(self, rows: torch.Tensor) -> torch.Tensor:
        """[R, ...] -> [groups, ...], each group's rows summed."""
        return rows.new_zeros(self.size, *rows.shape[1:]).index_add_(0, self.index, rows)

    def padded(self, rows: torch.Tensor) -> torch.Tensor:
        """[R, ...] -> [groups, L, ...], zeros in the slots no row takes."""
        out = rows.new_zeros(self.size * self.length, *rows.shape[1:])
        out[self.slot] = rows
        return out.view(self.size, self.length, *rows.shape[1:])


def _summed_share(call: Call, name: str, others: list[torch.Tensor], delta: torch.Tensor,
                  at: dict[str, torch.Tensor], groups: _Groups) -> torch.Tensor:
    """The op's share of J for each output, δ pulled back to its tensor and summed over each
    group's rows: [groups, O, *shape]. By one product where the op's form is known
    (_known_share), else by a vjp per row and output, summed after."""
    place = next(i for i, n in call.params.items() if n == name)
    rows = [a[:, 0] if b else a[0] for a, b in zip(others, call.batched)]  # each row's, without the batch dim
    share = _known_share(call, place, rows, delta, at[name], groups)
    if share is not None:
        return share

    def one(row_others: list[torch.Tensor], d: torch.Tensor) -> torch.Tensor:
        _, pullback = vjp(lambda p: call(row_others, {**at, name: p}), at[name])
        return pullback(d)[0]

    dims = [0 if b else None for b in call.batched]
    return groups.summed(vmap(lambda o, d: vmap(lambda d1: one(o, d1))(d), in_dims=(dims, 0))(
        [a if b else a[0] for a, b in zip(others, call.batched)], delta.unsqueeze(2)))


def _known_share(call: Call, place: int, rows: list[torch.Tensor], delta: torch.Tensor,
                 tensor: torch.Tensor, groups: _Groups) -> torch.Tensor | None:
    """_summed_share by one product for F.linear's weight and bias, F.embedding's table, an einsum
    (_plain_einsum) and a tensor added to activations, each read as it is (not W.T): the vjp per
    row and output costs ~1 ms of small transforms per op and step on the reference Transformer,
    these a tenth of it. None for any other op or form. rows: the call's other tensors, each
    row's without the batch dim. The products of two row tensors (a weight's, an einsum's) sum over a group's rows inside one
    batched matmul over the groups' padded layout, so no row's share is ever held."""
    r, outputs = delta.shape[:2]
    if not call.reads_itself(place):
        return None
    if call.func is F.linear and place == 2:
        return groups.summed(delta.reshape(r, outputs, -1, delta.shape[-1]).sum(2))
    if call.func is F.linear and place == 1 and call.batched[0]:
        a, d = groups.padded(rows[0]), groups.padded(delta)
        return torch.einsum("glki,glokj->goji", a.reshape(*a.shape[:2], -1, a.shape[-1]),
                            d.reshape(*d.shape[:3], -1, d.shape[-1]))
    if call.func is F.embedding and place == 1 and call.batched[0]:
        # each looked-up row of the table takes δ at the positions that read it, in its group's table
        size, width = tensor.shape
        index = (rows[0].reshape(r, -1) + size * groups.index[:, None]).flatten()
        d = delta.reshape(r, outputs, -1, width).transpose(1, 2).reshape(-1, outputs, width)
        share = delta.new_zeros(groups.size * size, outputs, width).index_add_(0, index, d)
        return share.view(groups.size, size, outputs, width).transpose(1, 2)
    if call.func in (torch.add, torch.Tensor.add) and len(call.template) == 2 and call.batched[0]:
        # broadcast against the output [O, ...] (O in the batch's place): sum δ over the dims the tensor lacks
        dims = delta.dim() - 1
        if tensor.dim() > dims or (tensor.dim() == dims and tensor.shape[0] != 1):
            return None
        shape = (1,) * (dims - tensor.dim()) + tuple(tensor.shape)
        summed = groups.summed(delta.sum_to_size(r, outputs, *shape[1:]))
        return summed.reshape(groups.size, outputs, *tensor.shape)
    if _plain_einsum(call):
        operands, out = call.template[0].replace(" ", "").split("->")
        operands = operands.split(",")
        own = operands.pop(place - 1)
        group, row = [c for c in string.ascii_letters if c not in call.template[0]][:2]
        batch = out[0]
        subscripts = []
        for operand, batched in zip(operands, call.batched):
            if batched and operand[0] != batch:
                return None
            subscripts.append(group + row + operand[1:] if batched else operand)
        subscripts.append(group + row + out)  # δ, the output copies in the batch's place
        if batch in own or set(own) - set("".join(subscripts)):
            return None
        padded = [groups.padded(a) if b else a for a, b in zip(rows, call.batched)]
        return torch.einsum(",".join(subscripts) + "->" + group + batch + own, *padded, groups.padded(delta))
    return None


def _discover(flat: FlatModel, theta: torch.Tensor, x: torch.Tensor) -> tuple[list[Call] | None, str]:
    """The calls that read trained tensors, from forward passes on 2 and 3 copies of x[:1] (the
    dims that grow with them run over the batch), and why they cannot be used ("": they can)."""
    params = flat.layout.unflatten(theta)
    passes = []
    for copies in (2, 3):
        mode = _Reads(params)
        with torch.no_grad(), mode:
            flat._call(params, flat.cast_inputs(torch.cat([x[:1]] * copies)), jacobian=True)
        if mode.refused:
            return None, mode.refused
        passes.append(mode.recorded)
    if len(passes[0]) != len(passes[1]):
        return None, "the calls differ with the batch size"
    calls = []
    for (func, template, spec, params_at, out, others, macs, made), (func3, _, _, params3, out3, others3, _, _) in \
            zip(*passes):
        name = getattr(func, "__name__", str(func))
        if func is not func3 or params_at != params3:
            return None, "the calls differ with the batch size"
        batched = tuple(a.dim() > 0 and a.shape[0] == 2 and b.dim() > 0 and b.shape[0] == 3
                        for a, b in zip(others, others3))
        if not any(batched):
            return None, f"{name} reads {sorted(params_at.values())} beside no tensor that runs over the batch (dim 0)"
        if out.dim() == 0 or out.shape[0] != 2 or out3.shape[0] != 3:
            return None, f"{name} reading {sorted(params_at.values())} returns no batch dim first"
        calls.append(Call(func, template, spec, params_at, batched, (1, *out.shape[1:]),
                          max(macs // 2, out[0].numel()), made))
    return calls, ""


def _incomplete(flat64: FlatModel, calls: list[Call], theta: torch.Tensor, x: torch.Tensor, target: str) -> str:
    """Why the terms of the calls, taken forward and taken reverse, miss a jvp of the explained
    outputs along a random tangent, on two rows of the first two inputs (the first twice if it is
    alone) at two points of a random segment, in float64 ("": they add up to it)."""
    generator = torch.Generator().manual_seed(0)
    dim = flat64.layout.dim

    def random(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64, device="cpu").to(flat64.device)

    theta = theta.to(flat64.device, torch.float64)
    delta = random(dim) * (theta.abs().mean() + 1)
    x = flat64.cast_inputs(x[torch.arange(2, device=x.device) % len(x)])
    t = torch.tensor([0.3, 0.8], dtype=torch.float64, device=flat64.device)
    w = torch.ones_like(t)
    tangent = random(1, dim)
    owner, step = torch.arange(2, device=flat64.device), torch.zeros(2, dtype=torch.long, device=flat64.device)
    expected = flat64.directional_rows(theta, delta, x, t, tangent, target)[:, 0]  # [R, O]
    mixed = MixedMode(flat64)
    for reverse in (False, True):
        out = torch.zeros(1, 1, 2, expected.shape[1], 1, dtype=torch.float64, device=flat64.device)
        mixed.add_kernel(out, step, owner, theta[None], delta[None], x, t, w, None, target, tangent[None],
                         [slice(0, dim)], calls, reverse)
        miss = float((out[0, 0, :, :, 0] - expected).abs().max())
        if not miss <= COMPLETENESS_TOLERANCE * float(expected.abs().max()):
            return (f"the ops' terms ({'reverse' if reverse else 'forward'}) miss a jvp of the explained outputs by "
                    f"{miss:.1e}")
    return ""
