"""A model seen as a pure function of one flat parameter vector.

The engine works on flat vectors θ ∈ R^D so that Jacobians, per-sample gradients and the
optimizer's preconditioners are plain matrices and the contraction is one big matmul.
`FlatModel` owns the layout (which slice of θ is which named tensor) and the batched
`torch.func` transforms on top of it.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import math
import os
import re
import threading
import traceback
import types
import warnings
import weakref
from dataclasses import dataclass
from math import prod
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jacrev, vjp, vmap
from torch.func import jvp as _unguarded_jvp
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.utils import parametrizations
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from .errors import InputError, UnsupportedError, is_whole
from .losses import PerSampleLoss
from .phases import PER_ROW_JACOBIANS, SAMPLE_GRADIENTS, SHARED_NODE_JACOBIANS, phase

TARGETS = ("log_prob", "logit")
EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)  # torch's embedding modules (checked for sparse=, max_norm=, scale_grad_by_freq=)

# torch.func.jvp keeps its nesting depth in a module global and forward AD's levels process-wide,
# so jvps in two threads at once fail ("no level exists", "invalid index"): one at a time.
_FORWARD_AD = threading.RLock()


def jvp(*args, **kwargs):
    """torch.func.jvp, one thread at a time (see _FORWARD_AD)."""
    with _FORWARD_AD:
        return _unguarded_jvp(*args, **kwargs)


def tensor_of(value, what: str = "the value") -> torch.Tensor:
    """`value` as a tensor: a tensor where it is, a list or an array on the CPU, whatever device
    torch.set_default_device has set (torch.as_tensor would move even a tensor there). `what`
    names the argument in the error for a value torch makes no tensor of."""
    if isinstance(value, torch.Tensor):
        return value
    try:
        return torch.as_tensor(value, device="cpu")
    except (TypeError, ValueError, RuntimeError) as error:
        raise InputError(
            f"{what} cannot be made a tensor ({type(value).__name__}: {error}): pass a tensor, a numpy "
            "array or a (nested) list of numbers, every row of the same length") from None


def resolve_target(target: str | None, loss: str) -> str:
    """What is explained of the output; None: what the recorded loss reads of it, the output
    itself under MSE, its log-probabilities under a classification loss (or a custom one)."""
    if target is None:
        return "logit" if loss == "mse" else "log_prob"
    if target not in TARGETS:
        raise InputError(f"unknown target {target!r}: use one of {TARGETS}, or None (what the loss reads)")
    return target


@dataclass(frozen=True)
class ParamLayout:
    """Names, shapes and offsets of the trainable tensors inside the flat vector."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @property
    def sizes(self) -> list[int]:
        return [prod(shape) for shape in self.shapes]

    @property
    def dim(self) -> int:
        return sum(self.sizes)

    def slices(self) -> dict[str, slice]:
        out, start = {}, 0
        for name, size in zip(self.names, self.sizes):
            out[name] = slice(start, start + size)
            start += size
        return out

    def flatten(self, tensors: dict[str, torch.Tensor], scale: torch.Tensor | None = None) -> torch.Tensor:
        """dict of [*batch, *shape] tensors -> [*batch, D] (batch dims are leading), each entry
        of the batch times scale[*batch] if given. Each tensor is written once, strided or not,
        into its slice (torch.cat first copied a strided one, such as a per-sample gradient that
        vmap leaves permuted), and the scaling rides on that write: on the reference workload's
        per-sample gradients [4, 200, 10,016], 3.5–4.8 ms against 5.2–5.8 ms for cat and a product."""
        if scale is None:
            return torch.cat([_flat_part(tensors[name], shape) for name, shape in zip(self.names, self.shapes)],
                             dim=-1)
        batch, dtype = tuple(scale.shape), tensors[self.names[0]].dtype
        out, scale = scale.new_empty(*batch, self.dim, dtype=dtype), scale.to(dtype)
        for (name, sl), shape in zip(self.slices().items(), self.shapes):
            part = out[..., sl].view(*batch, *shape)
            if tensors[name].shape != part.shape:
                raise ValueError(f"{name} is {tuple(tensors[name].shape)}, not {tuple(part.shape)} as the scale's "
                                 "batch dims and its layout shape make it")
            torch.mul(tensors[name], scale.view(*batch, *(1,) * len(shape)), out=part)
        return out

    def index_add(self, out: torch.Tensor, index: torch.Tensor, tensors: dict[str, torch.Tensor],
                  alpha: float = 1.0) -> None:
        """out[index[r]] += alpha · (row r of the dict of [R, *batch, *shape] tensors, flattened):
        out is [N, *batch, D]. Each tensor goes into a view of its slice of D as it comes,
        strided or not: no [R, *batch, D] copy (measured: a fifth faster than adding a
        contiguous copy), and the scaling rides on the addition.

        Rows bound for consecutive places (a chunk of inputs in order, the common case) are
        added run by run into narrowed views: CPU index_add_ into a strided view costs about a
        nanosecond per element, an add_ a few microseconds per call (measured on the reference
        workload's [10, 25, 10,016] Jacobians: 0.6 ms against 1.9–2.0 ms). So on the CPU a tensor takes
        the runs when each carries enough elements; on a GPU, whose index_add_ is one kernel,
        only when the whole index is one run."""
        runs = _runs(index)
        per_row = prod(out.shape[1:-1])
        one_run = len(runs) == 1
        for (name, sl), shape, size in zip(self.slices().items(), self.shapes, self.sizes):
            part = out[..., sl].view(*out.shape[:-1], *shape)
            source = tensors[name]
            if one_run or out.device.type == "cpu" and per_row * size * len(index) >= _RUN_ELEMENTS * len(runs):
                for first, stop, at in runs:
                    part[at:at + stop - first].add_(source[first:stop], alpha=alpha)
            else:
                part.index_add_(0, index, source, alpha=alpha)

    def add_runs(self, out: torch.Tensor, owner: torch.Tensor, tensors: dict[str, torch.Tensor]) -> None:
        """out[owner[r]] += row r of the dict of [R, *batch, *shape] tensors, as index_add, with
        each run of consecutive rows of one owner summed first, as a sum over a slice (measured
        on 40 rows of the reference workload's Jacobians: their pass took 15.5 ms so, 22 ms with
        CPU index_add_ of the strided rows into zero sums)."""
        places, counts = torch.unique_consecutive(owner, return_counts=True)
        if len(places) == len(owner):
            self.index_add(out, owner, tensors)
            return
        bounds = [0, *counts.cumsum(0).tolist()]
        runs = list(zip(bounds[:-1], bounds[1:], places.tolist()))
        for (name, sl), shape in zip(self.slices().items(), self.shapes):
            part = out[..., sl].view(*out.shape[:-1], *shape)
            for first, stop, at in runs:
                part[at] += tensors[name][first:stop].sum(0)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """[*batch, D] -> dict of [*batch, *shape] views (batch dims are leading)."""
        return {
            name: flat[..., sl].view((*flat.shape[:-1], *shape))
            for (name, sl), shape in zip(self.slices().items(), self.shapes)
        }


# Elements per run above which adding run by run beats CPU index_add_ (measured: 5× slower
# for runs of 550 elements, 1.3× faster for 22,000).
_RUN_ELEMENTS = 4096


def _runs(index: torch.Tensor) -> list[tuple[int, int, int]]:
    """The consecutive runs of an index as (first, stop, at): index[first:stop] is at, at + 1, …"""
    if not len(index):
        return []
    bounds = [0, *(torch.nonzero(index.diff() != 1).flatten() + 1).tolist(), len(index)]
    starts = index[bounds[:-1]].tolist()
    return list(zip(bounds[:-1], bounds[1:], starts))


def _flat_part(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A named tensor [*batch, *shape] as [*batch, its size]."""
    return t.reshape(*t.shape[: t.dim() - len(shape)], -1)


class ActivationSizes(NamedTuple):
    """What a forward pass on one input makes, in elements: all the new tensors of its ops (an
    upper bound on what a reverse pass saves) and the largest one; and its multiply-adds (at
    least `total`: an op that only makes elements counts one an element)."""

    total: int
    largest: int
    multiply_adds: int


# How the per-sample derivatives of a batch's losses along T tangents (a backward walk's effects,
# TracIn's directions) are taken: by forward mode, a jvp of the batch along each tangent, or by
# materialising the per-sample gradients [B, D] and contracting them, whichever forward_mode_pays
# estimates cheaper. Costs in multiply-adds of a large matmul (about 40 billion a second on two
# threads): forward mode costs FORWARD_MODE_STEP a step (12 ms: its transforms' fixed cost) plus,
# per tangent and sample, FORWARD_MODE_ELEMENT per element a forward pass makes and two per
# multiply-add (the product rule's two products); materialising costs GRADIENT_ELEMENT per element
# of the gradients plus one multiply-add per tangent and element to contract them. Fitted to whole
# backward walks (benchmarks/forward_mode_route.py, AMD EPYC, float32, two threads), whose
# break-evens the estimate puts at no tangent (the reference Transformer over 200 samples: forward
# mode was slower from 5 tangents on), 39 (a Transformer of d_model 64 over 568 samples: measured
# between 32 and 48) and 9 (the digits ResNet-9 of width 16 over 32: between 8 and 16). A rule of
# B / 4 tangents had put them at 50, 142 and 8.
FORWARD_MODE_STEP = 5 * 10**8
FORWARD_MODE_ELEMENT = 8
GRADIENT_ELEMENT = 250


def forward_mode_pays(sizes: ActivationSizes, dim: int, tangents: int, batch: int) -> bool:
    """Whether forward mode is the cheaper way to the derivatives of a batch of `batch` samples'
    losses along `tangents` tangents of a model with `dim` parameters, whose forward pass on one
    input makes `sizes` (see FORWARD_MODE_STEP)."""
    per_tangent = FORWARD_MODE_ELEMENT * sizes.total + 2 * sizes.multiply_adds
    return FORWARD_MODE_STEP + batch * tangents * per_tangent < batch * dim * (GRADIENT_ELEMENT + tangents)


class ForwardModeSizes(NamedTuple):
    """The most elements a forward-mode pass on one input holds at once (it keeps nothing for a
    backward): `base` + `per_tangent` for each tangent pushed through it together."""

    base: int
    per_tangent: int

    def elements(self, n_inputs: int, n_tangents: int) -> int:
        """What a pass on n_inputs inputs with n_tangents tangents is planned to hold, with an
        eighth more for scratch inside kernels that no dispatch mode sees (an encoder layer's
        pass peaked 2% above the tensors seen)."""
        return n_inputs * (self.base + n_tangents * self.per_tangent) * 9 // 8


class _OutputSizes(TorchDispatchMode):
    """Sizes the tensors a pass's ops make: all new ones, the largest, and the peak of those alive
    at once. A dispatch mode sees the ops inside composite ones (the [heads, L, L] scores of
    attention's math kernel, which a torch-function mode misses) and those that torch.func's
    transforms run. A view or in-place result shares its input's storage and is not new; a
    storage counts as alive until the last tensor on it is freed."""

    def __init__(self):
        super().__init__()
        self.total = self.largest = self.live = self.peak = 0
        self.tensors_on = {}  # storage address -> [elements, tensors alive on it]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {_storage_address(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel():
                self._made(t, given)
        return out

    def _made(self, t: torch.Tensor, given: set) -> None:
        address = _storage_address(t)
        if address is not None and address in given and address not in self.tensors_on:
            return  # a view of a parameter or of the input
        self.largest = max(self.largest, t.numel())
        if address is None:  # no storage to follow (a sparse tensor): new, and alive to the end
            self.total += t.numel()
            self.live += t.numel()
        elif address in self.tensors_on:
            self.tensors_on[address][1] += 1
        else:
            elements = t.untyped_storage().nbytes() // t.element_size()
            self.tensors_on[address] = [elements, 1]
            self.total += elements
            self.live += elements
        self.peak = max(self.peak, self.live)
        if address is not None:
            weakref.finalize(t, self._freed, address)

    def _freed(self, address: int) -> None:
        entry = self.tensors_on[address]
        entry[1] -= 1
        if not entry[1]:
            self.live -= entry[0]
            del self.tensors_on[address]


class _CoarserRounding(TorchFunctionMode):
    """Notes the first op that takes a tensor computed from the parameters in the explained dtype
    and returns one in a coarser floating dtype (a float32 norm inside a float64 model), with
    the line of the model's code that called it."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.eps = torch.finfo(dtype).eps
        self.site = ""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.site and self._coarsens(tree_leaves((args, kwargs)), tree_leaves(out)):
            self.site = f"{torch.overrides.resolve_name(func) or func} at {_callers_line()}"
        return out

    def _coarsens(self, given: list, made: list) -> bool:
        def computed(ts):  # floating tensors that depend on θ (which requires grad here)
            return [t for t in ts if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad]
        return (any(torch.finfo(t.dtype).eps <= self.eps for t in computed(given))
                and any(torch.finfo(t.dtype).eps > self.eps for t in computed(made)))


def _models_line(frames: traceback.StackSummary) -> str:
    """file:line (function) of the innermost of the frames outside torch and explaind: the model's code."""
    skipped = tuple(os.path.dirname(module) + os.sep for module in (torch.__file__, __file__))
    for frame in reversed(frames):
        if not frame.filename.startswith(skipped):
            return f"{os.path.basename(frame.filename)}:{frame.lineno} ({frame.name})"
    return "an unknown line"


def _callers_line() -> str:
    return _models_line(traceback.extract_stack())


def _raising_line(error: Exception) -> str:
    return _models_line(traceback.extract_tb(error.__traceback__))


def _storage_address(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None


class InputAxis(NamedTuple):
    """Where a tensor of a forward pass holds the batch's inputs: along `dim`, `span` entries
    each. A dim that folds the inputs with another ([B·L, E] from a batch-first [B, L, E], or
    [L·B, E] from a sequence-first [L, B, E]) spans more than one; `interleaved` says the inputs
    run innermost in it ([L·B, E]: an input's entries a batch's size apart) rather than in turn."""

    dim: int
    span: int = 1
    interleaved: bool = False


class _KinkPattern(TorchFunctionMode):
    """Records where a forward pass stands relative to the kinks of piecewise-linear ops.

    f is smooth in θ except where a ReLU-type input crosses zero (or a clamp's, a hard
    activation's or a threshold's bound), the two sides of an elementwise max / min tie, the two
    sides of a comparison that selects a piece (torch.where(z > 0, ...)) tie, or a max-pool's
    argmax switches; between such kinks Gauss–Legendre converges fast. Recorded: each ReLU-type
    input's signed distance to its kink and each pair's or comparison's difference (its sign
    says the piece; under forward mode its derivative along the segment comes with it), and
    each max-pool's argmax indices (amax / max and amin / min included; sort, topk, ... their
    indices; a quantile or a median of all entries the indices of the entries it reads).

    A tracked tensor of the inputs gives each row the entries along its input axis (dim 1 of a
    sequence-first [L, B, E] activation; see InputAxis). One of parameters alone (a learned
    temperature's clamp_min, a max over a weight's rows) switches along every input's path: each
    row gets all of its entries. Each call's axis (None: parameters alone) is told by `axes` (see
    FlatModel.input_axes); without it the pass only records each call's tensor, in `tracked`, and
    its shape, in `shapes`.

    With `straight_through`, ReLU-type ops pass gradients as if they were the identity, so a
    backward pass measures how the output depends on each unit whatever piece the unit is on;
    `units` holds each distance's input tensor (a pair's tie a − b) and its batch dim,
    `selectors` which of them are comparisons (whose boolean result passes no gradient: every
    one of θ counts), and `pooled` says a max-pool (whose gradient reaches only the argmax) was
    met.
    """

    # kinked at 0 (ELU, CELU and SELU in their slope, or in their curvature when it is 1; softsign,
    # z / (1 + |z|), in its curvature: torch writes it in Python, and a mode does not see the abs
    # inside a function it is handed whole)
    SIGN_OPS = {"relu", "relu_", "leaky_relu", "leaky_relu_", "abs", "prelu", "elu", "elu_", "celu", "celu_",
                "selu", "selu_", "softsign", "abs_", "absolute", "absolute_"}
    RANGE_OPS = {"hardtanh", "hardtanh_", "relu6", "clamp", "clamp_", "clip", "clip_", "clamp_min", "clamp_min_",
                 "clamp_max", "clamp_max_", "_threshold", "threshold", "threshold_", "hardsigmoid", "hardswish",
                 "softshrink", "hardshrink"}
    # the sides of a comparison (of floating-point values: integers and masks cross nothing along θ)
    COMPARISONS = {"gt", "lt", "ge", "le", "gt_", "lt_", "ge_", "le_", "greater", "less", "greater_equal",
                   "less_equal"}
    SIGN_TESTS = {"sign", "sign_", "sgn", "sgn_", "signbit"}  # x against 0
    # the elementwise max / min of two tensors (max and min only when given a tensor to compare)
    PAIR_OPS = {"maximum", "minimum", "fmax", "fmin", "max", "min"}
    # reductions, tracked like a max-pool (see _reduced_dims); whether they take the largest
    POOL_OPS = {"amax": True, "max": True, "amin": False, "min": False}
    # ops that order their input along a dim (see _ordered_dims): tracked by the indices they return
    ORDER_OPS = {"sort", "argsort", "topk", "kthvalue", "median", "nanmedian", "argmax", "argmin", "cummax", "cummin"}
    # ops that read their input at ranks and return no indices (see _ranked_dims): tracked by the
    # indices of the entries at those ranks
    RANK_OPS = {"quantile", "nanquantile", "median", "nanmedian"}
    # vector norms (and the ops that take one of a difference): an L1 norm is kinked where an entry
    # crosses 0, a max norm where the entry of largest magnitude switches, a min norm at both
    NORM_OPS = {"norm", "linalg_vector_norm", "linalg_norm", "normalize", "pairwise_distance", "dist"}
    # fused ops that apply a ReLU inside, where no distance to its kink can be read (nn.RNN and
    # nn.RNNCell are stepped by other ops in explaind's copy: see _relu_rnn_by_steps)
    FUSED_RELUS = {"rnn_relu", "rnn_relu_cell"}

    def __init__(self, rows: int, axes: list[InputAxis | None] | None, straight_through: bool = False):
        super().__init__()
        self.rows = rows
        self.axes = axes
        self.tracked: list[torch.Tensor] = []  # while only recording
        self.shapes: list[tuple[int, ...]] = []
        self.straight_through = straight_through
        self.distances: list[torch.Tensor] = []
        self.units: list[tuple[torch.Tensor, InputAxis | None]] = []  # with its input axis
        self.selectors: set[int] = set()  # indices into units
        self.indices: list[torch.Tensor] = []
        self.index_axes: list[InputAxis | None] = []  # each argmax's input axis
        self.pooled = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        x = args[0] if args else kwargs.get("input")
        if name in self.PAIR_OPS and (pair := _pair_operands(args, kwargs)) is not None:
            if any(t.is_floating_point() for t in pair):
                return self._pair(func, args, kwargs, *pair)
            return func(*args, **kwargs)  # of integers or booleans (indices, masks): no kink along θ
        if name in self.COMPARISONS or name in self.SIGN_TESTS:
            if (side := _compared(args, kwargs, name in self.SIGN_TESTS)) is not None:
                self.selectors.add(len(self.units))
                self._track(side, self._input_axis(side), side)
            return func(*args, **kwargs)
        if name in self.FUSED_RELUS:
            raise UnsupportedError(_fused_relu(name))
        kinked = name in self.SIGN_OPS or name in self.RANGE_OPS
        if kinked:
            axis = self._input_axis(x)
            bounds = [0.0] if name in self.SIGN_OPS else _range_bounds(name, args, kwargs)
            for bound in bounds:
                if bound is not None:
                    self._track(x - bound, axis, x)
        elif "max_pool" in name:  # max_pool2d, adaptive_max_pool2d, ... or their _with_indices (return_indices=True)
            plain = {k: v for k, v in kwargs.items() if k != "return_indices"}
            with_indices = name.lstrip("_").removesuffix("_with_indices") + "_with_indices"
            _, indices = getattr(F, with_indices)(*args[:6], **plain)
            self._pooled(indices, self._input_axis(indices))
        elif name in self.POOL_OPS and (dims := _reduced_dims(args, kwargs)) is not None:
            self._ordered(x, dims, lambda: _argmax_over(x if self.POOL_OPS[name] else -x, dims))
        elif name in self.ORDER_OPS and x.is_floating_point() and (dims := _ordered_dims(name, args, kwargs, x)):
            out = func(*args, **kwargs)
            self._ordered(x, dims, lambda: out if isinstance(out, torch.Tensor) else out.indices)
            return out
        elif name in self.NORM_OPS and (normed := _kinked_norm(name, args, kwargs)) is not None:
            v, order, dims = normed
            if order != math.inf:  # |v| at each entry's 0
                self._track(v, self._input_axis(v), v)
            if math.isinf(order):  # the largest |v| (the smallest: of −|v|)
                self._ordered(v.abs(), dims, lambda: _argmax_over(v.abs() if order > 0 else -v.abs(), dims))
            if name in ("pairwise_distance", "dist"):  # of v itself, which the pass's backward must reach
                keepdim = name == "pairwise_distance" and kwargs.get("keepdim", args[4] if len(args) > 4 else False)
                return torch.linalg.vector_norm(v, order, dim=dims, keepdim=keepdim)
        elif name in self.RANK_OPS and x.is_floating_point() and (dims := _ranked_dims(name, args, kwargs, x)):
            quantiles = None if "median" in name else kwargs.get("q", args[1] if len(args) > 1 else None)
            self._ordered(x, dims, lambda: _at_ranks(x, dims, quantiles, skip_nan=name.startswith("nan")))
        if not (kinked and self.straight_through):
            return func(*args, **kwargs)
        out = func(x.clone(), *args[1:], **kwargs)  # an in-place op must leave the unit's input intact
        return x + (out - x).detach()

    def _pair(self, func, args, kwargs, a: torch.Tensor, b: torch.Tensor):
        """An elementwise max / min of a and b: its kink is where they tie, at a − b = 0."""
        out = func(*args, **kwargs)
        tie = a - b
        self._track(tie, self._input_axis(tie), tie)
        if not self.straight_through:
            return out
        # the output depends on both sides whichever leads (∂a = 3/4, ∂b = 1/4) and on their tie
        # (1/4): unequal, so that no side's gradient cancels against the tie's
        through = (a + b) / 2 + tie / 4
        return out.detach() + through - through.detach()

    def _ordered(self, x: torch.Tensor, dims: list[int], indices_of: Callable[[], torch.Tensor]) -> None:
        """A max / min reduction or an op that orders x along `dims` (sort, topk, argmax, ...):
        its pieces switch where its indices do. They keep x's dims or drop `dims` (laid out as
        they may, for x of parameters alone)."""
        axis = self._input_axis(x)
        if axis is None or axis.dim not in dims:  # an order over the batch's inputs couples them: no kink of one path
            indices = indices_of()
            kept = [d for d in range(x.dim()) if d not in dims]
            same = axis is None or indices.dim() == x.dim()
            self._pooled(indices, axis if same else axis._replace(dim=kept.index(axis.dim)))

    def _track(self, distance: torch.Tensor, axis: InputAxis | None, unit: torch.Tensor) -> None:
        """Record a signed distance to a kink, laid out per row, and the unit it measures."""
        self.distances.append(self.per_row(distance, axis))
        self.units.append((unit, axis))

    def _input_axis(self, tensor: torch.Tensor) -> InputAxis | None:
        """This tracked call's input axis in `tensor` (None: of parameters alone), as `axes`
        tells; dim 0 while only recording."""
        self.shapes.append(tuple(tensor.shape))
        if self.axes is None:
            self.tracked.append(tensor)
            return InputAxis(0)
        if len(self.shapes) > len(self.axes):
            raise UnsupportedError(_branching(len(self.shapes), len(self.axes)))
        return self.axes[len(self.shapes) - 1]

    def per_row(self, tensor: torch.Tensor, axis: InputAxis | None) -> torch.Tensor:
        """[rows, entries]: each row's entries along its input axis, in the same order whatever
        the batch's size; a shared tensor's (axis None) repeated for every row. As it is while
        only recording, when nothing is laid out."""
        if self.axes is None:
            return tensor
        if axis is None:
            return tensor.reshape(1, -1).expand(self.rows, -1)
        tensor = tensor.movedim(axis.dim, 0)
        if axis.interleaved:  # [span · rows, ...] → [rows, span, ...]
            tensor = tensor.reshape(-1, self.rows, *tensor.shape[1:]).transpose(0, 1)
        return tensor.reshape(self.rows, -1)

    def _pooled(self, indices: torch.Tensor, axis: InputAxis | None) -> None:
        self.indices.append(self.per_row(indices, axis))
        self.index_axes.append(axis)
        self.pooled = True

    def flat(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The recorded distances [rows, P] and argmax indices [rows, P'] of the batch, on the
        pass's `device` (where it names the empty ones: a model without max-pool has no indices)."""
        if len(self.shapes) != len(self.axes):
            raise UnsupportedError(_branching(len(self.shapes), len(self.axes)))
        return (_rows(self.distances, self.rows, torch.get_default_dtype(), device),
                _rows(self.indices, self.rows, torch.long, device))

    def shared_columns(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Which columns of flat()'s distances [P] and argmax indices [P'] are of parameters alone."""

        def columns(tensors: list[torch.Tensor], axes: list[InputAxis | None]) -> torch.Tensor:
            shared = torch.tensor([axis is None for axis in axes], dtype=torch.bool, device="cpu")
            sizes = torch.tensor([t.shape[1] for t in tensors], dtype=torch.long, device="cpu")
            return shared.repeat_interleave(sizes)

        return columns(self.distances, [axis for _, axis in self.units]), columns(self.indices, self.index_axes)


class _TableLookups(TorchFunctionMode):
    """Refuses an index outside the table it looks up (an embedding's rows, one_hot's classes)
    before the lookup runs: on CUDA such an index stops the process with a device-side assert
    instead of raising an error. Inputs [first, first + rows) of the test batch are checked."""

    def __init__(self, first: int, rows: int):
        super().__init__()
        self.first, self.rows = first, rows

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.embedding:  # torch hands its (input, weight) on positionally, however called
            self._check(args[0], args[1].shape[0], "an embedding")
        elif func is torch.embedding:
            self._check(args[1], args[0].shape[0], "an embedding")
        elif func is F.one_hot:
            classes = kwargs.get("num_classes", args[1] if len(args) > 1 else -1)
            if classes >= 0:  # -1: as many classes as the largest index needs
                self._check(args[0], classes, "one_hot")
        return func(*args, **kwargs)

    def _check(self, index: torch.Tensor, size: int, table: str) -> None:
        outside = (index < 0) | (index >= size)
        if not bool(outside.any()):
            return
        where = ""
        if index.dim() and len(index) == self.rows:  # the lookup keeps the batch dim: name the inputs
            bad = outside.reshape(self.rows, -1).any(1).nonzero()[:, 0] + self.first
            where = f" {bad[:10].tolist()}"
        values = index[outside].unique()[:10].tolist()
        raise InputError(
            f"test inputs{where} hold indices {values} that the model looks up in {table} of {size} "
            f"entries (0 … {size - 1}); on CUDA such an index stops the process with a device-side "
            "assert. Fix: drop those inputs, or map them into the model's vocabulary")


def _fused_relu(op: str) -> str:
    return (f"torch's {op} applies its ReLU inside one fused op (as nn.RNN does given a PackedSequence, or "
            "with dropout in train mode), where the kink search cannot see where the ReLU's input crosses 0, and "
            "the path integral across such kinks converges only slowly (a 6-step run missed by 7e-3 of its "
            "output change). Fix: write the recurrence with torch ops, h = torch.relu(F.linear(x_t, w_ih, b_ih) "
            "+ F.linear(h, w_hh, b_hh)) at each step, whose kinks are located (explaind steps nn.RNN and "
            "nn.RNNCell so itself), or use nonlinearity='tanh' (smooth); or explain with breakpoints=False and "
            "quadrature=... raised until the cube's residual is small enough for you")


def _branching(made: int, sorted_on: int) -> str:
    return (f"the model's forward pass made {made} calls of ReLU / clamp / max / sort / comparison ops where another "
            f"pass made {sorted_on}: it branches on its input, its parameters or the batch's size, so its kinks cannot be "
            "tracked. Fix: explain with breakpoints=False (and more quadrature=...); a branch in Python on a "
            "tensor's value (`if x.mean() > 0:`) also keeps the per-sample passes of a train dim from being "
            "batched: write it with torch.where, or explain without a train dim")


def _grown_axis(two: tuple[int, ...], three: tuple[int, ...]) -> InputAxis | None:
    """The dim of a tracked tensor that grew from the pass on 2 copies of an input to the pass
    on 3, by as much per input (see FlatModel.input_axes); None if none did."""
    grown = [d for d, (a, b) in enumerate(zip(two, three)) if a != b]
    if len(two) != len(three) or len(grown) > 1:
        cause = "no single dim runs over the inputs"
    elif grown and two[grown[0]] != 2 * (three[grown[0]] - two[grown[0]]):
        cause = f"its dim {grown[0]} grows with the inputs but also holds entries of no input (a weight put beside them)"
    else:
        return InputAxis(grown[0], three[grown[0]] - two[grown[0]]) if grown else None
    raise UnsupportedError(
        f"a ReLU / clamp / max / sort / comparison op of the model's forward pass takes a tensor shaped {list(two)} for "
        f"2 inputs and {list(three)} for 3: {cause}, so its kinks cannot be told per input. "
        "Fix: explain with breakpoints=False (and more quadrature=...)")


def _unread_fold(shape: torch.Size, axis: InputAxis, inputs: int) -> str:
    return (f"a ReLU / clamp / max / sort / comparison op of the model's forward pass takes a tensor shaped {list(shape)} "
            f"for {inputs} inputs whose dim {axis.dim} folds them with another dim ({axis.span} entries each) in an order "
            "other than input by input or interleaved (a permute or a reshape across dims before it), so its kinks cannot "
            "be told per input. Fix: apply the op to the tensor before it is folded (a Linear and a ReLU take any leading "
            "dims), or explain with breakpoints=False (and more quadrature=...)")


def _distinct_inputs(x: torch.Tensor, most: int) -> torch.Tensor:
    """Up to `most` inputs of the batch that differ from each other."""
    flat = x.reshape(len(x), -1)
    if bool((flat == flat[:1]).all()):  # copies of one input (a search's probes of it)
        return x[:1]
    return torch.unique(flat, dim=0)[:most].reshape(-1, *x.shape[1:])


def _misread(seen: torch.Tensor, read: torch.Tensor) -> float:
    """The share of a tracked tensor's entries that a reading of it per input gets wrong: that
    differ by more than rounding (a batched pass rounds unlike one input's) from the passes on
    each input alone, laid out as the reading takes them."""
    if not seen.is_floating_point():  # argmax indices
        return float((seen != read).double().mean())
    slack = torch.finfo(seen.dtype).eps ** 0.5  # half the digits
    scale = float(read.abs().max()) if read.numel() else 0.0
    return float(((seen - read).abs() > slack * scale).double().mean())


def _rows(tensors: list[torch.Tensor], rows: int, empty_dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Recorded per-batch tensors side by side: [rows, Σ sizes] ([rows, 0] on `device` if none)."""
    if not tensors:
        return torch.zeros(rows, 0, dtype=empty_dtype, device=device)
    return torch.cat([t.reshape(rows, -1) for t in tensors], 1)


def _pair_operands(args, kwargs) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The two tensors of an elementwise max / min (torch.max(a, b), a.maximum(b), ...); None for
    a reduction such as max(x, dim)."""
    a = args[0] if args else kwargs.get("input")
    b = args[1] if len(args) > 1 else kwargs.get("other")
    return (a, b) if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) else None


def _compared(args, kwargs, against_zero: bool) -> torch.Tensor | None:
    """The difference a − b of a comparison's sides (x − 0 for a sign test); None unless one
    side is a floating-point tensor."""
    a = args[0] if args else kwargs.get("input")
    b = 0.0 if against_zero else (args[1] if len(args) > 1 else kwargs.get("other"))
    if not any(isinstance(side, torch.Tensor) and side.is_floating_point() for side in (a, b)):
        return None
    return a.to(torch.result_type(a, b)) - b


def _reduced_dims(args, kwargs) -> list[int] | None:
    """The dims an amax / max(x, dim) (or amin / min) reduces away: all of them without `dim`.
    None for one kept for broadcasting (keepdim=True: the shift of a hand-written stable softmax,
    whose kink cancels in its output)."""
    x = args[0] if args else kwargs["input"]
    dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    keepdim = kwargs.get("keepdim", args[2] if len(args) > 2 else False)
    if isinstance(dim, torch.Tensor) or keepdim or x.dim() == 0:  # a 0-d tensor's max is itself
        return None
    dims = range(x.dim()) if dim is None else (dim if isinstance(dim, (tuple, list)) else (dim,))
    return sorted({d % x.dim() for d in dims}) or None


def _ordered_dims(name: str, args, kwargs, x: torch.Tensor) -> list[int] | None:
    """The dim an ordering op orders along (sort's, topk's dim), all of x's for an argmax of the
    flattened input; None for one that returns no indices (a median of all entries: see
    _ranked_dims) or orders nothing (a 0-d tensor)."""
    position = 2 if name in ("topk", "kthvalue") else 1
    default = None if name in ("argmax", "argmin", "median", "nanmedian") else -1
    dim = kwargs.get("dim", args[position] if len(args) > position else default)
    if x.dim() == 0 or (dim is None and "median" in name):
        return None
    return list(range(x.dim())) if dim is None else [dim % x.dim()]


def _ranked_dims(name: str, args, kwargs, x: torch.Tensor) -> list[int] | None:
    """The dim a quantile (or a median of all entries) ranks x along: all of x's, flattened
    together, without `dim`. None for a 0-d tensor, which is its own quantile."""
    position = 2 if "quantile" in name else 1
    dim = kwargs.get("dim", args[position] if len(args) > position else None)
    if x.dim() == 0:
        return None
    return list(range(x.dim())) if dim is None else [dim % x.dim()]


def _at_ranks(x: torch.Tensor, dims: list[int], quantiles, skip_nan: bool) -> torch.Tensor:
    """The indices of the entries of x, ordered along `dims`, at the ranks that quantiles q read
    (the two that a quantile interpolates between: ⌊q(n − 1)⌋ and ⌈q(n − 1)⌉) or that a median
    reads (⌊(n − 1)/2⌋, the lower of two middles), per position of the other dims; n counts the
    entries that are not NaN with `skip_nan`. Laid out as x is, the ranks in place of `dims`,
    when they are one dim."""
    along = _flattened_over(x.detach(), dims)
    count = (~along.isnan()).sum(-1, keepdim=True) if skip_nan else torch.full_like(along[..., :1], along.shape[-1])
    last = count.to(torch.float64) - 1
    if quantiles is None:
        ranks = (last / 2).floor()
    else:
        position = torch.as_tensor(quantiles, dtype=torch.float64, device=x.device).detach().reshape(-1) * last
        ranks = torch.cat([position.floor(), position.ceil()], -1)
    indices = along.argsort(-1).gather(-1, ranks.clamp(min=0).long())  # NaN sorts last
    return indices.movedim(-1, dims[0]) if len(dims) == 1 else indices


def _kinked_norm(name: str, args, kwargs) -> tuple[torch.Tensor, float, list[int]] | None:
    """(the vector v, the order, the dims it is normed over) of a norm op of order 1, ∞ or −∞, whose
    kinks the search tracks; None for other orders (2 is smooth but at v = 0) and matrix norms.
    pairwise_distance and dist take the norm of a difference."""
    if name in ("pairwise_distance", "dist"):
        x1, x2 = args[0], kwargs.get("x2", kwargs.get("other", args[1] if len(args) > 1 else None))
        order = kwargs.get("p", args[2] if len(args) > 2 else 2.0)
        if name == "pairwise_distance":  # torch adds eps to the difference, along the last dim
            v = x1 - x2 + kwargs.get("eps", args[3] if len(args) > 3 else 1e-6)
            dim = -1
        else:
            v, dim = x1 - x2, None
    else:
        v = args[0] if args else kwargs["input"]
        key = "ord" if name.startswith("linalg") else "p"
        order = kwargs.get(key, args[1] if len(args) > 1 else (None if name == "linalg_norm" else 2.0))
        dim = kwargs.get("dim", args[2] if len(args) > 2 else (1 if name == "normalize" else None))
        if name == "linalg_norm" and not (isinstance(dim, int) or (dim is None and v.dim() == 1)):
            return None  # a matrix norm (or the Frobenius norm of all entries)
    if not isinstance(v, torch.Tensor) or not v.is_floating_point() or v.dim() == 0 \
            or not isinstance(order, (int, float)) or abs(order) not in (1, math.inf):
        return None
    dims = range(v.dim()) if dim is None else [dim] if isinstance(dim, int) else dim
    return v, float(order), sorted(d % v.dim() for d in dims)


def _argmax_over(x: torch.Tensor, dims: list[int]) -> torch.Tensor:
    """The argmax of x over `dims` (flattened together), per position of the other dims."""
    return _flattened_over(x, dims).argmax(-1)


def _flattened_over(x: torch.Tensor, dims: list[int]) -> torch.Tensor:
    """x with `dims` flattened into its last dim, after the other dims in their order."""
    kept = [d for d in range(x.dim()) if d not in dims]
    return x.permute(kept + dims).reshape(*(x.shape[d] for d in kept), -1)


def _range_bounds(name: str, args, kwargs) -> tuple[float | None, float | None]:
    """The (low, high) kinks of a clamp-like op; None where a side is unbounded."""
    if name == "relu6":
        return 0.0, 6.0
    if name in ("hardsigmoid", "hardswish"):
        return -3.0, 3.0
    if name.endswith("shrink"):  # softshrink, hardshrink: 0 on [−lambd, lambd]
        lambd = kwargs.get("lambd", args[1] if len(args) > 1 else 0.5)
        return -lambd, lambd
    if name.lstrip("_").startswith("threshold"):  # (x, threshold, value): x where x > threshold
        return kwargs.get("threshold", args[1] if len(args) > 1 else None), None
    if name.startswith("clamp_m"):  # clamp_min(x, min), clamp_max(x, max): one bound, given first
        bound = kwargs.get(name[6:9], args[1] if len(args) > 1 else None)
        return (bound, None) if name.startswith("clamp_min") else (None, bound)
    keys = ("min_val", "max_val") if name.startswith("hardtanh") else ("min", "max")
    defaults = (-1.0, 1.0) if name.startswith("hardtanh") else (None, None)
    positional = list(args[1:3]) + [None, None]
    return tuple(
        kwargs.get(key, positional[i] if positional[i] is not None else defaults[i])
        for i, key in enumerate(keys)
    )


def module_of(model: nn.Module) -> nn.Module:
    """The module a torch.compile'd or DistributedDataParallel one wraps (whose tensors are the
    same, named without the wrapper's "_orig_mod." or "module." prefix); any other module as it
    is. explaind records names and calls code of the plain module, so a history matches the
    wrapped module and the plain one alike, and torch.func transforms eager code."""
    while True:
        inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) \
            else getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in module_of(model).named_parameters() if p.requires_grad}


def untrained_tensors(model: nn.Module) -> dict[str, str]:
    """The model's parameter names that carry no attribution of their own, with why: a name
    tied to an earlier one (one tensor, recorded under that name) or a frozen tensor."""
    first: dict[int, str] = {}
    why: dict[str, str] = {}
    for name, p in module_of(model).named_parameters(remove_duplicate=False):
        if id(p) in first:
            why[name] = f"tied to {first[id(p)]!r} (one tensor, recorded and attributed under that name)"
            continue
        first[id(p)] = name
        if not p.requires_grad:
            why[name] = "frozen (requires_grad=False: not trained, so without attribution)"
    return why


def missing_device(dev: torch.device) -> tuple[str, int] | None:
    """Why this torch cannot compute on `dev`, and how many CUDA devices it offers instead; None
    where it can (a missing GPU is only an error when one is asked for). Callers word the fix."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if dev.type == "cuda" and (dev.index or 0) >= count:
        return (f"this torch sees {count} CUDA device(s)"
                + (" (a GPU needs a CUDA build of torch on a machine with one)" if count == 0 else "")), count
    if dev.type == "mps" and not torch.backends.mps.is_available():
        return "this torch has no usable MPS backend", count
    return None


def compute_device(device) -> torch.device:
    """`device` as a torch.device, refused before any work if this torch cannot compute there."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise InputError(f"device={device!r} is not a device torch knows ({error}). Fix: pass 'cpu', "
                         "'cuda' or 'cuda:N'") from None
    missing = missing_device(dev)
    if missing:
        reason, count = missing
        raise InputError(f"device={device!r}: {reason}. Fix: pass device='cpu'"
                         + (f" or one of 'cuda:0' to 'cuda:{count - 1}'" if count else ""))
    return dev


def _explainable_outputs(out, source: str, rows: int) -> torch.Tensor:
    """What `source` returned (the model, or output_fn) for `rows` inputs as the [batch, O]
    matrix explain() decomposes: [batch] is one output per input; a non-tensor, more dims or
    another batch size are refused, naming the fix."""
    if not isinstance(out, torch.Tensor):
        logits = getattr(out, "logits", None)  # a language model's are [batch, positions, vocabulary]
        example = ("output_fn=lambda out: out.logits[:, -1], the next token after each input" if isinstance(
            logits, torch.Tensor) and logits.dim() == 3 else "output_fn=lambda out: out.logits, or out[0]")
        raise InputError(
            f"{source} returned a {type(out).__name__}, not a tensor: explaind explains a tensor of outputs "
            "[batch, outputs]. Fix: pass output_fn, a function of the model's output that returns that "
            f"tensor (for example {example}); the training loss keeps the model's own output")
    if out.dim() == 1:
        out = out[:, None]
    if out.dim() != 2:
        raise InputError(
            f"{source} returned outputs of shape {tuple(out.shape)}: explaind explains [batch, outputs] or "
            "[batch]. Fix: pass output_fn, a function of the model's output that returns such a matrix, "
            "for example one position's logits (output_fn=lambda out: out[:, -1]) or out.flatten(1) "
            "(with target='logit'); the training loss keeps the model's own output")
    if out.shape[0] != rows:  # a batch dim dropped or mixed: out[-1], out.mean(0), out.T
        raise InputError(
            f"{source} returned outputs of shape {tuple(out.shape)} for {rows} input(s): the first dim must be "
            "the batch, one row per input. Fix: keep the batch dim first and select within each input, for "
            "example output_fn=lambda out: out[:, -1] (the last position), not out[-1] or out.mean(0)")
    return out


# what torch.func.vmap says when an op writes in place into a tensor that is not batched
_UNBATCHED_WRITE = re.compile(r"doesn't match the broadcast shape|vmap: .* is not possible because")
# what torch.func.vmap says when the model reads a tensor's value in Python or makes a shape from it
_DATA_DEPENDENT = re.compile(r"vmap: It looks like you're either \(1\) calling \.item\(\) on a Tensor or \(2\) "
                             r"attempting to use a Tensor in some data-dependent control flow|vmap: We do not "
                             r"support batching operators that can output dynamic shape\. Attempted to vmap over \S+")
# what torch.func says of saved-tensor hooks (non-reentrant activation checkpointing installs them)
_SAVED_TENSOR_HOOKS = "saved tensor hooks"
# what an op says that reads the raw memory of a tensor torch.func has wrapped (nn.LSTM on a PackedSequence)
_NO_STORAGE = "Cannot access data pointer of Tensor that doesn't have storage"
# what torch.func says of requires_grad_() in forward (a hook of Hugging Face's checkpointing calls it)
_REQUIRES_GRAD_INSIDE = "You are attempting to call Tensor.requires_grad_()"
# what an op says whose tensors are of two floating-point dtypes (a float64 class weight in a float32 loss)
_MIXED_DTYPES = re.compile(r"expected scalar type \w+ but found \w+|to have the same dtype|"
                           r"[Ff]ound dtype \w+ but expected \w+")
# the names torch's messages give the floating-point dtypes ("Double", "c10::Half", "float")
_TORCH_DTYPE_WORDS = {"double": torch.float64, "float": torch.float32, "half": torch.float16,
                      "bfloat16": torch.bfloat16}


# what torch.func says of a torch.autograd.Function it cannot transform: what the Function lacks, the fix
_FUNCTION_GAPS = (
    ("must override the setup_context staticmethod",
     "it is written in the old style, forward(ctx, ...), which torch.func does not transform",
     "write it in torch.func's style: forward(*inputs) without ctx, setup_context(ctx, inputs, output) to "
     "save what backward needs, generate_vmap_rule = True, and jvp(ctx, *tangents) for forward mode; or, "
     "where its backward is its forward's derivative, have the model compute the forward's torch ops "
     "itself (a Hugging Face Bloom model: m.forward = bloom_gelu_forward for each of its BloomGelu m)"),
    ("does not have vmap support", "it has no vmap rule",
     "set generate_vmap_rule = True on it (or write its vmap staticmethod)"),
    ("implement the jvp function", "it has no jvp staticmethod, which forward mode needs",
     "give it a jvp staticmethod, or explain with breakpoints=False and a train dim (or "
     "parameter_scores=True), which need reverse mode only"),
)


def _custom_function_refusal(error: Exception) -> UnsupportedError | None:
    """The refusal naming the model's torch.autograd.Function that torch.func could not
    transform, what it lacks and the fix; None for any other error."""
    said = str(error)
    for torch_says, gap, fix in _FUNCTION_GAPS:
        if torch_says in said:
            return UnsupportedError(
                f"torch.func cannot transform {_function_call(error)}, a torch.autograd.Function of the model: "
                f"{gap}. explaind takes every derivative with torch.func (per-sample gradients by vmap over "
                f"grad; kinks, cubes without a train dim and reconstruct() by forward mode). Fix: {fix}")
    return None


def _function_call(error: Exception) -> str:
    """'Name.apply at file:line (function)': the innermost torch.autograd.Function applied in the
    error's traceback, and the model's line that applied it."""
    for frame, _ in reversed(list(traceback.walk_tb(error.__traceback__))):
        cls = frame.f_locals.get("cls")
        if frame.f_code.co_name == "apply" and isinstance(cls, type) and issubclass(cls, torch.autograd.Function):
            return f"{cls.__name__}.apply at {_raising_line(error)}"
    return f"a torch.autograd.Function at {_raising_line(error)}"


def _transformed(method):
    """Turn torch's refusals to transform an op of the model into errors that name the cause and
    the fix (see _refusal)."""

    @functools.wraps(method)
    def wrapped(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except (NotImplementedError, RuntimeError) as error:
            refusal = _refusal(error, args[0].dtype)
            if refusal is None:
                raise
            raise refusal from error

    return wrapped


def _refusal(error: NotImplementedError | RuntimeError, dtype: torch.dtype) -> UnsupportedError | None:
    """What torch's error means for explaind, with the fix: a custom autograd.Function torch.func
    does not take; an op without a forward-mode derivative; saved-tensor hooks; requires_grad_() in
    forward; an op reading a wrapped tensor's memory; a value or shape read from a tensor, or an
    in-place write, which vmap cannot batch; tensors of two dtypes (`dtype`: the one computed in).
    None for any other error."""
    if refusal := _custom_function_refusal(error):
        return refusal
    cause = str(error).splitlines()[0]
    if isinstance(error, NotImplementedError):
        if "forward AD" not in cause:
            return None
        return UnsupportedError(
            f"torch cannot differentiate an op of the model in forward mode ({cause}). explaind uses "
            "forward mode to locate kinks (breakpoints=True), for cubes without a train dim and in "
            "reconstruct(). Fix: explain with breakpoints=False and a train dim (or parameter_scores="
            "True), which need reverse mode only, or build that op from ones torch differentiates in "
            "forward mode (torch.cdist(a, b): (a[..., :, None, :] - b[..., None, :, :]).norm(dim=-1); the "
            "older nn.utils.weight_norm: nn.utils.parametrizations.weight_norm, which explaind computes so)")
    if _SAVED_TENSOR_HOOKS in cause:
        return UnsupportedError(
            f"torch.func cannot transform the model ({cause}): it installs saved-tensor hooks, as "
            "torch.utils.checkpoint(..., use_reentrant=False) and torch.autograd.graph.save_on_cpu "
            "do. They save memory and leave the gradients as they are. Fix: give explaind the model "
            "without them: explain with the architecture built without checkpointing (explain takes "
            "every parameter value from the history), and record either so (a switch that forward "
            "reads) or with check_every=0, which skips the Recorder's gradient check")
    if _REQUIRES_GRAD_INSIDE in cause:
        return UnsupportedError(
            f"torch.func cannot transform the model's forward at {_raising_line(error)}: it calls "
            "requires_grad_() on a tensor, as the hook does that Hugging Face models put on their input "
            "embeddings for activation checkpointing and adapters (enable_input_require_grads()). It leaves "
            "the gradients of the parameters as they are. Fix: give explaind the model without it (explain "
            "takes every parameter value from the history): model.disable_input_require_grads(), and "
            "model.activation_checkpointing_disable() where checkpointing is on; record either so or with "
            "check_every=0, which skips the Recorder's gradient check")
    if _NO_STORAGE in cause:
        return UnsupportedError(
            f"torch.func cannot run an op of the model at {_raising_line(error)} ({cause}): the op reads the "
            "raw memory of its input, which torch.func's transforms wrap, as nn.LSTM, nn.GRU and nn.RNN do "
            "given a PackedSequence (pack_padded_sequence). explaind takes every derivative with torch.func. "
            "Fix: give the recurrent module the padded tensor, with an initial state made from the input "
            "(e.new_zeros(layers, batch, hidden)), and read each sequence's output at its last valid step "
            "(out.gather(1, (lengths - 1).view(-1, 1, 1).expand(-1, 1, out.shape[2]))) or mask the padding")
    if data_dependent := _DATA_DEPENDENT.search(cause):
        return UnsupportedError(
            f"torch.func.vmap cannot batch the model's forward at {_raising_line(error)} "
            f"({data_dependent.group(0).rstrip('.')}): vmap runs it once for a whole batch of inputs, "
            "samples or points, so forward can neither read a tensor's value in Python (.item(), `if t:`, "
            "`v in t`; F.one_hot, which checks its classes so) nor make a shape from one (torch.unique, "
            "nonzero, a boolean mask as an index). "
            "explaind batches every derivative with vmap, except in a cube without a train dim and with "
            "breakpoints=False, and in reconstruct(). Fix: write that step with ops of fixed shape "
            "(torch.where, a mask multiplied in; for F.one_hot(t, n): (t[..., None] == torch.arange(n, "
            "device=t.device)).to(dtype)) or move it out of forward; where a library's code does it, "
            "give the call what skips it. Hugging Face models, from a module around the model: no "
            "attention_mask where nothing is padded (DeBERTa-v2 warns without one: pass "
            "torch.ones_like(x)), and where something is, the 4D additive mask [batch, 1, queries, keys] "
            "they take as it is (0 where a token may attend, torch.finfo(dtype).min elsewhere, ahead "
            "included for a decoder)")
    if _MIXED_DTYPES.search(cause):
        return UnsupportedError(
            f"an op of the model or of its loss at {_raising_line(error)} meets tensors of two dtypes ({cause}): "
            f"explain computes in the dtype it is given (dtype=; here {dtype}), and a tensor that the model or "
            "the loss holds or makes in another one (a class-weight tensor, a constant) does not follow it. Fix: "
            "make such tensors follow their input's dtype (weight.to(logits.dtype), x.new_tensor(...)), or "
            f"explain in the dtype they are in ({_other_dtype(cause, dtype)})")
    if not _UNBATCHED_WRITE.search(str(error)):
        return None
    return UnsupportedError(
        f"torch.func.vmap cannot batch an op of the model at {_raising_line(error)} ({cause}): it writes "
        "in place into a tensor the model made without the input, such as torch.zeros(...), which vmap "
        "does not batch. explaind batches every derivative over inputs, samples or points with vmap. "
        "PyTorch's nn.LSTMCell and nn.GRUCell make their state so when called without one, and nn.LSTM, "
        "nn.GRU and nn.RNN in float64 on the CPU. Fix: make such tensors from the input (x.new_zeros(...), "
        "torch.zeros_like(x); from a floating-point tensor it made where the input is token ids, such as the "
        "embedded input e); for those modules pass that state, for example h0 = e.new_zeros(layers, batch, "
        "hidden); a Hugging Face model filling its cache: build it with use_cache=False in its config")


def _other_dtype(cause: str, dtype: torch.dtype) -> str:
    """'dtype=torch.float32': the dtype other than `dtype` that torch's message of mixed dtypes
    names (a float32 class weight in a float64 loss), or 'dtype=...' where it names none or several."""
    named = {_TORCH_DTYPE_WORDS[word] for word in re.findall(r"[a-z0-9]+", cause.lower()) if word in _TORCH_DTYPE_WORDS}
    others = named - {dtype}
    return f"dtype={others.pop()}" if len(others) == 1 else "dtype=..."


def checked_output(flat: "FlatModel", theta: torch.Tensor, x: torch.Tensor, target: str | None,
                   fix: str) -> torch.Tensor:
    """The explained output of x[:1] at θ in flat's dtype (target None: the module's own output,
    which the loss reads). A model that fails in float64 but computes in float32 is refused,
    naming `fix`; any other failure is raised as it is."""
    try:
        return _first_output(flat, theta, x, target)
    except (RuntimeError, NotImplementedError) as error:
        if flat.dtype != torch.float64 or not _computes(flat.in_dtype(torch.float32), theta, x, target):
            raise
        raise UnsupportedError(f"the model cannot compute in float64 ({type(error).__name__}: "
                               f"{str(error).splitlines()[0]}), though it does in float32. {fix}") from error


def _first_output(flat: "FlatModel", theta: torch.Tensor, x: torch.Tensor, target: str | None):
    theta, x = theta.to(flat.device, flat.dtype), flat.cast_inputs(x[:1])
    with torch.no_grad():
        return flat.raw(theta, x) if target is None else flat.explained(theta, x, target)


def _computes(flat: "FlatModel", theta: torch.Tensor, x: torch.Tensor, target: str | None) -> bool:
    try:
        _first_output(flat, theta, x, target)
    except Exception:  # whatever the model raises: it fails in this dtype too
        return False
    return True


def _private_structure(model: nn.Module) -> nn.Module:
    """A copy of the module whose parameters and buffers are empty placeholders on the meta
    device. functional_call swaps the given tensors into the module it calls for the duration
    of the call: on the user's own module, any other thread using it meanwhile (their training
    or serving loop, a second explain) would run with our θ or fail. Every call here supplies
    all tensors, so the placeholders are never read. A module that cannot be deep-copied is
    used as it is, with a warning. The copy's embeddings make dense gradients (sparse=False)."""
    memo = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        placeholder = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(placeholder, t.requires_grad) if isinstance(t, nn.Parameter) else placeholder
    try:
        private = copy.deepcopy(model, memo)
    except Exception as error:  # whatever a user's module raises when copied: fall back alike
        warnings.warn(
            f"explaind could not copy the module ({type(error).__name__}: {error}), so it calls the module "
            "itself, swapping parameters in for each call: do not use the module from another thread "
            "while explaind works with it", stacklevel=3)
        return model
    for module in private.modules():  # torch.func's transforms take no sparse gradient: the same numbers, dense
        if isinstance(module, EMBEDDINGS):
            module.sparse = False
        if (composed := _COMPOSED_FORWARDS.get(type(module))) is not None:
            module.forward = types.MethodType(composed, module)
    return private


def _prelu_by_relu(module: nn.PReLU, x: torch.Tensor) -> torch.Tensor:
    """nn.PReLU's value, relu(x) − a·relu(−x) with a along the channel dim (dim 1; one a for all
    without it): torch's prelu backward breaks its shapes under a vmap of reverse mode with a
    batched slope (vmap over rows of jacrev, which every cube with a train dim takes), while relu
    differentiates everywhere and is located as a kink like prelu."""
    slope = module.weight
    if x.dim() >= 2 and slope.numel() > 1:
        slope = slope.reshape(-1, *[1] * (x.dim() - 2))
    return F.relu(x) - slope * F.relu(-x)


# how each bag of [batch, length] ids reduces its rows (nn.EmbeddingBag's modes)
_BAG_REDUCTIONS = {"sum": lambda rows: rows.sum(1), "mean": lambda rows: rows.mean(1),
                   "max": lambda rows: rows.amax(1)}


def _embedding_bag_by_lookup(module: nn.EmbeddingBag, x: torch.Tensor, offsets=None, per_sample_weights=None):
    """nn.EmbeddingBag's value on bags of one length ([batch, length] ids, no padding_idx) as a
    lookup and its mode's reduction over each bag: torch's embedding_bag has no forward-mode
    derivative (the kink search, cubes without a train dim, reconstruct). Other calls as torch's."""
    if x.dim() != 2 or offsets is not None or per_sample_weights is not None or module.padding_idx is not None:
        return nn.EmbeddingBag.forward(module, x, offsets, per_sample_weights)
    return _BAG_REDUCTIONS[module.mode](F.embedding(x, module.weight))


def _parametrized_weight_norm(module: nn.Module, weight_g: torch.Tensor, weight_v: torch.Tensor) -> torch.Tensor:
    """nn.utils.parametrizations.weight_norm's weight, torch._weight_norm(v, g, dim): v scaled to the
    norm g over every dim but `dim` (-1: over the whole tensor), by ops that have a forward-mode
    derivative, which its fused kernel has not. (The older nn.utils.weight_norm computes it in a
    hook on a module that cannot be copied, so it stays with torch's kernel.)"""
    norm = weight_v.norm() if module.dim == -1 else torch.norm_except_dim(weight_v, 2, module.dim)
    return weight_v * (weight_g / norm)


def _rrelu_by_leaky_relu(module: nn.RReLU, x: torch.Tensor) -> torch.Tensor:
    """nn.RReLU's value where its slope is fixed (eval mode, or lower == upper): a leaky ReLU of
    slope (lower + upper) / 2. torch's rrelu has no vmap rule. (A random slope the Recorder refuses.)"""
    if module.training and module.lower != module.upper:
        return nn.RReLU.forward(module, x)
    return F.leaky_relu(x, (module.lower + module.upper) / 2)


def _relu_rnn_by_steps(module: nn.RNN, x, hx=None):
    """nn.RNN(nonlinearity='relu')'s value step by step, h = relu(W_ih x_t + b_ih + W_hh h + b_hh):
    torch's fused rnn_relu hides the ReLU from the kink search. Other calls (tanh, a PackedSequence,
    dropout between layers in train mode) as torch's."""
    if module.nonlinearity != "relu" or not isinstance(x, torch.Tensor) or (module.training and module.dropout):
        return nn.RNN.forward(module, x, hx)
    batched = x.dim() == 3
    x = (x.transpose(0, 1) if module.batch_first else x) if batched else x.unsqueeze(1)  # [L, B, H_in]
    directions = 2 if module.bidirectional else 1
    if hx is None:
        hx = x.new_zeros(module.num_layers * directions, x.shape[1], module.hidden_size)
    elif not batched:
        hx = hx.unsqueeze(1)
    last = []
    for layer in range(module.num_layers):
        outputs = []
        for direction in range(directions):
            suffix = f"_l{layer}" + ("_reverse" if direction else "")
            w_ih, w_hh = getattr(module, "weight_ih" + suffix), getattr(module, "weight_hh" + suffix)
            b_ih, b_hh = (getattr(module, "bias_ih" + suffix), getattr(module, "bias_hh" + suffix)) if module.bias \
                else (None, None)
            h, states = hx[layer * directions + direction], [None] * len(x)
            for t in range(len(x)) if direction == 0 else reversed(range(len(x))):
                h = states[t] = torch.relu(F.linear(x[t], w_ih, b_ih) + F.linear(h, w_hh, b_hh))
            outputs.append(torch.stack(states))
            last.append(h)
        x = torch.cat(outputs, -1)
    h_n = torch.stack(last)
    if not batched:
        return x.squeeze(1), h_n.squeeze(1)
    return (x.transpose(0, 1) if module.batch_first else x), h_n


def _relu_rnn_cell_by_ops(module: nn.RNNCell, x: torch.Tensor, hx=None) -> torch.Tensor:
    """nn.RNNCell(nonlinearity='relu')'s value, relu(W_ih x + b_ih + W_hh h + b_hh) (see _relu_rnn_by_steps)."""
    if module.nonlinearity != "relu":
        return nn.RNNCell.forward(module, x, hx)
    if hx is None:
        hx = x.new_zeros(*x.shape[:-1], module.hidden_size)
    return torch.relu(F.linear(x, module.weight_ih, module.bias_ih) + F.linear(hx, module.weight_hh, module.bias_hh))


# torch modules called in explaind's private copy of a model by other torch ops of the same value
_COMPOSED_FORWARDS = {nn.PReLU: _prelu_by_relu, nn.EmbeddingBag: _embedding_bag_by_lookup,
                      parametrizations._WeightNorm: _parametrized_weight_norm, nn.RReLU: _rrelu_by_leaky_relu,
                      nn.RNN: _relu_rnn_by_steps, nn.RNNCell: _relu_rnn_cell_by_ops}


class _DifferentiableKernels:
    """Attention computed by ops that torch.func can differentiate, while explaind calls a model.

    `scaled_dot_product_attention`'s fused kernels (flash, memory-efficient) have no forward-mode
    derivative, and in eval mode `nn.MultiheadAttention` and `nn.TransformerEncoderLayer` take a
    fused "fast path" with no derivative at all; the math kernel and the modules' composite path
    compute the same attention from ops that have both. TF32, which cuDNN uses for float32
    convolutions by default on Ampere and later GPUs, rounds every product to a 10-bit mantissa,
    far coarser than float32's 23 bits, so it is switched off too. The switches are
    process-wide, so the first call in sets them and the last one out restores them (a thread of
    your own that runs attention or float32 kernels meanwhile runs them the slower, equal way)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._calls = 0
        self._restore = contextlib.ExitStack()

    def __enter__(self) -> None:
        with self._lock:
            if self._calls == 0:
                self._restore.enter_context(sdpa_kernel(SDPBackend.MATH))
                self._restore.callback(torch.backends.mha.set_fastpath_enabled,
                                       torch.backends.mha.get_fastpath_enabled())
                torch.backends.mha.set_fastpath_enabled(False)
                for flags in (torch.backends.cudnn, torch.backends.cuda.matmul):
                    self._restore.callback(setattr, flags, "allow_tf32", flags.allow_tf32)
                    flags.allow_tf32 = False
            self._calls += 1

    def __exit__(self, *exc) -> None:
        with self._lock:
            self._calls -= 1
            if self._calls == 0:
                self._restore.close()


_DIFFERENTIABLE_KERNELS = _DifferentiableKernels()


class FlatModel:
    """f(x; θ) for a flat θ, with the constant rest of the module (frozen tensors, buffers)."""

    def __init__(self, model: nn.Module, layout: ParamLayout, dtype: torch.dtype, device,
                 constants: dict[str, torch.Tensor] | None = None, output_fn: Callable | None = None):
        if output_fn is not None and not callable(output_fn):
            raise InputError(f"output_fn must be a function of the model's output (or None), got {output_fn!r}")
        self.layout = layout
        self.output_fn = output_fn  # what is explained of the module's output (None: all of it)
        self.dtype = dtype
        self.device = compute_device(device)
        model = module_of(model)
        trainable = set(layout.names)
        # frozen parameters and buffers enter every call as constants: the recorded ones when
        # given (a history's), the module's own for the rest
        own = {name: t.detach() for name, t in itertools.chain(model.named_parameters(), model.named_buffers())
               if name not in trainable}
        constants = {**own, **(constants or {})}
        self.constants = {name: t.to(self.device, self._cast(t)) for name, t in constants.items()}
        self.model = _private_structure(model)
        # torch gives a padding row no gradient from its lookups (see _call)
        self._padded = [m for m in self.model.modules() if isinstance(m, nn.Embedding) and m.padding_idx is not None]
        self._kernels: contextlib.AbstractContextManager = _DIFFERENTIABLE_KERNELS  # see torch_kernels
        self._input_axes: dict[tuple[int, ...], list[InputAxis | None]] = {}  # per input shape (see input_axes)
        self._read_axes: dict[tuple[int, ...], list[InputAxis | None]] = {}  # and read_axes
        self._shared_columns: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}  # and shared_columns

    @contextlib.contextmanager
    def torch_kernels(self):
        """Calls with the attention kernels torch picks itself, as a training loop runs them, in
        place of the math kernel (see _DifferentiableKernels): the gradient check compares the two
        when .grad misses, for a fused kernel's backward may differ from the math (torch's CPU
        kernel, for a query row whose every key is masked)."""
        self._kernels = contextlib.nullcontext()
        try:
            yield self
        finally:
            self._kernels = _DIFFERENTIABLE_KERNELS

    def in_dtype(self, dtype: torch.dtype) -> "FlatModel":
        """The same function computed in another dtype (sharing the private module)."""
        twin = copy.copy(self)
        twin.dtype = dtype
        twin.constants = {name: t.to(self.device, twin._cast(t)) for name, t in self.constants.items()}
        return twin

    def _cast(self, t: torch.Tensor) -> torch.dtype:
        return self.dtype if t.is_floating_point() else t.dtype

    def cast_inputs(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, self._cast(x))

    def _sizing_pass(self, x: torch.Tensor, mode: TorchFunctionMode | TorchDispatchMode, copies: int = 1) -> torch.Tensor:
        """One forward pass on `copies` of x[:1] at θ = 0 under `mode`, for the sizes it records."""
        params = self.layout.unflatten(torch.zeros(self.layout.dim, dtype=self.dtype, device=self.device))
        x = self.cast_inputs(torch.cat([x[:1]] * copies))
        with torch.no_grad(), mode:
            return self._call(params, x)

    def check_lookups(self, x: torch.Tensor, rows: int = 1024) -> None:
        """Refuse integer inputs that index outside a table the model looks them up in (see
        _TableLookups), by forward passes over `rows` inputs at a time at θ = 0."""
        if x.is_floating_point():  # no lookup takes a float index
            return
        params = self.layout.unflatten(torch.zeros(self.layout.dim, dtype=self.dtype, device=self.device))
        for first in range(0, len(x), rows):
            part = self.cast_inputs(x[first:first + rows])
            with torch.no_grad(), _TableLookups(first, len(part)):
                self._call(params, part)

    def activation_sizes(self, x: torch.Tensor) -> ActivationSizes:
        """What a forward pass on one input (x[:1]) produces (see ActivationSizes)."""
        mode = _OutputSizes()
        with FlopCounterMode(display=False) as flops:
            self._sizing_pass(x, mode)
        return ActivationSizes(mode.total, mode.largest, max(flops.get_total_flops() // 2, mode.total))

    @_transformed
    def forward_mode_sizes(self, x: torch.Tensor) -> ForwardModeSizes:
        """What forward-mode passes on one input (x[:1]) hold at once: measured with three and
        with four tangents at θ = 0, whose difference is the part of each tangent (a product
        rule's terms and the batching of a tangent of the weights included). A pass needs at
        least four; vmap runs one or two of them in other ways (attention: 210, 230, then 240
        elements more per tangent). The jvp is of the explained output, as in those passes: a
        module's whole output may hold what jvp cannot return (Hugging Face's cache)."""
        theta = torch.zeros(self.layout.dim, dtype=self.dtype, device=self.device)
        x = self.cast_inputs(x[:1])
        peaks = []
        for n in (3, 4):
            mode = _OutputSizes()
            tangents = torch.ones(n, self.layout.dim, dtype=self.dtype, device=self.device)
            with torch.no_grad(), mode:
                vmap(lambda v: jvp(lambda th: self.explained(th, x, "logit"), (theta,), (v,))[1])(tangents)
            peaks.append(mode.peak)
        per_tangent = max(peaks[1] - peaks[0], 0)
        return ForwardModeSizes(max(peaks[0] - 3 * per_tangent, 0), per_tangent)

    def coarser_rounding(self, theta: torch.Tensor, x: torch.Tensor, target: str) -> str:
        """Where the explained output of x[:1] rounds a tensor computed from θ to a coarser dtype
        than self.dtype ("torch.Tensor.to at file:line (function)"), or "": every residual then
        keeps that rounding, whatever the quadrature. A warning says so."""
        mode = _CoarserRounding(self.dtype)
        with torch.enable_grad(), mode:
            self.explained(theta.detach().requires_grad_(), self.cast_inputs(x[:1]), target)
        if mode.site:
            warnings.warn(
                f"the model rounds tensors computed from its parameters from {self.dtype} to a coarser dtype "
                f"({mode.site}): a decomposition in {self.dtype} then adds up only to that rounding, however "
                "fine the quadrature (Hugging Face's LlamaRMSNorm, for one, computes in float32 by design). Fix: "
                "compute that step in the model's dtype for a decomposition exact to its rounding, or expect a "
                "residual of the coarser dtype's precision", stacklevel=4)
        return mode.site

    def _call(self, params: dict[str, torch.Tensor], x: torch.Tensor, jacobian: bool = False) -> torch.Tensor:
        """The module's output; `jacobian`: a call whose reverse-mode derivative is to be J = ∂f/∂θ.

        nn.Embedding(padding_idx=i) looks row i up like any other row, but its backward gives the
        row no gradient from the lookups: torch's semantics, which the training gradients (and so
        their per-sample split) keep. J must count the row wherever it is looked up, as forward
        mode does, for the row moves under weight decay or through a tied output layer: such
        calls run without padding_idx, which changes no value of nn.Embedding's forward."""
        padded = self._padded if jacobian else []
        saved = [m.padding_idx for m in padded]
        try:
            for m in padded:
                m.padding_idx = None
            with self._kernels:
                return functional_call(self.model, {**params, **self.constants}, (x,))
        finally:
            for m, padding_idx in zip(padded, saved):
                m.padding_idx = padding_idx

    @property
    def output_fn_name(self) -> str:
        """How a cube names output_fn: its qualified name, "" when the whole output is explained."""
        if self.output_fn is None:
            return ""
        return getattr(self.output_fn, "__qualname__", type(self.output_fn).__name__)

    def raw(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The module's output on a batch x, with parameters θ."""
        return self._call(self.layout.unflatten(theta), x)

    def _explain(self, out: torch.Tensor, target: str, rows: int) -> torch.Tensor:
        """The explained [rows, O] of the module's output `out` for `rows` inputs."""
        if self.output_fn is None:
            out = _explainable_outputs(out, "the model", rows)
        else:
            out = _explainable_outputs(self.output_fn(out), "output_fn", rows)
        if target == "log_prob" and out.shape[-1] == 1:
            raise InputError("the model has one output per input, whose log-probability is always 0: "
                             "explain it with target='logit'")
        return F.log_softmax(out, dim=-1) if target == "log_prob" else out

    def explained(self, theta: torch.Tensor, x: torch.Tensor, target: str) -> torch.Tensor:
        """The explained output f(x; θ), [batch, O]: log-probabilities or raw logits."""
        return self._explain(self.raw(theta, x), target, len(x))

    @torch.no_grad()
    def outputs(self, theta: torch.Tensor, inputs: torch.Tensor, target: str, chunk: int = 1024) -> torch.Tensor:
        """explained() for any number of inputs, `chunk` at a time (a forward pass of all of them
        at once could hold more activations than the device has): [N, O]."""
        return torch.cat([self.explained(theta, self.cast_inputs(x), target) for x in inputs.split(chunk)])

    # Derivatives are taken with respect to the dict of named tensors, not the flat vector:
    # differentiating through slices of θ would materialise a [rows, D] zero tensor per named
    # tensor in the backward pass. One concatenation at the end is far cheaper.

    def jacobian(
        self, theta: torch.Tensor, x: torch.Tensor, select: torch.Tensor | None, target: str
    ) -> torch.Tensor:
        """J = ∂f/∂θ for each input and each selected output: [T, O, D].

        `select` is None (all outputs) or a LongTensor [T, O] of output indices per input.
        """
        return self.layout.flatten(self._jacobians(theta, x, select, target))

    @phase(SHARED_NODE_JACOBIANS)
    def add_jacobian(self, out: torch.Tensor, rows: torch.Tensor, theta: torch.Tensor, x: torch.Tensor,
                     select: torch.Tensor | None, target: str, weight: float) -> None:
        """out[rows[i]] += weight · J(x_i; θ) for each input x_i of a batch (out: [N, O, D])."""
        self.layout.index_add(out, rows, self._jacobians(theta, x, select, target), alpha=weight)

    @_transformed
    def _jacobians(self, theta, x, select, target) -> dict[str, torch.Tensor]:
        """J per named tensor: [T, O, *shape] each."""
        params = self.layout.unflatten(theta)
        if select is None:
            return vmap(lambda x1: self._input_jacobian(params, x1, target))(x)
        return vmap(lambda x1, sel: self._input_jacobian(params, x1, target, sel))(x, select)

    def _input_jacobian(self, params: dict[str, torch.Tensor], x1: torch.Tensor, target: str,
                        sel: torch.Tensor | None = None, weight: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """J at `params` of one input's explained outputs (those `sel` picks, times `weight`):
        [O, *shape] per named tensor."""

        def f(p: dict[str, torch.Tensor]) -> torch.Tensor:
            y = self._explain(self._call(p, x1.unsqueeze(0), jacobian=True), target, 1)[0]
            y = y if sel is None else y[sel]
            return y if weight is None else y * weight

        return jacrev(f)(params)

    @phase(PER_ROW_JACOBIANS)
    @_transformed
    def add_node_jacobians(
        self,
        out: torch.Tensor,
        owner: torch.Tensor,
        theta: torch.Tensor,
        delta: torch.Tensor,
        x: torch.Tensor,
        t: torch.Tensor,
        w: torch.Tensor,
        select: torch.Tensor | None,
        target: str,
    ) -> None:
        """out[owner[r]] += w_r J(x_r; θ + t_r Δ) for rows r, each an input with its own node t_r
        and weight w_r, for every selected output (out: [N, O, D]; `select`: None or [R, O]
        output indices).

        Each row's Jacobian is taken at its own parameters θ + t_r Δ, by a reverse pass per row
        vmapped over the rows, and the rows of one owner are summed before they are added to out.
        Reverse mode inside the vmap over rows keeps each row's parameters unbatched over the
        output cotangents, so the backward's products take the outputs as one more matrix
        dimension; vmapped the other way round (a vjp of the rows' batched forward, vmapped over
        the cotangents) every row's weights were first copied once per output (measured on the
        reference workload's Transformer: 40 rows of 25 outputs 16.6 ms against 22.8 ms, 320
        rows 109 ms against 204 ms).
        """
        points = self.layout.unflatten(row_points(theta, delta, t))
        weights = w.to(theta.dtype)
        if select is None:
            grads = vmap(lambda p, x1, w1: self._input_jacobian(p, x1, target, weight=w1))(points, x, weights)
        else:
            grads = vmap(lambda p, x1, w1, sel: self._input_jacobian(p, x1, target, sel, w1))(points, x, weights,
                                                                                             select)
        self.layout.add_runs(out, owner, grads)

    def _pattern(self, theta: torch.Tensor, x: torch.Tensor, mode: _KinkPattern) -> torch.Tensor:
        with mode:
            return self._call(self.layout.unflatten(theta), x)

    def input_axes(self, x: torch.Tensor) -> list[InputAxis | None]:
        """Per call of a piecewise-linear op in a forward pass (see _KinkPattern): where its
        tensor runs over the inputs, None for a tensor of parameters alone. Told once per input
        shape by two passes on 2 and 3 copies of x[:1]: the dim that grows with them (1 for a
        sequence-first [L, B, E] activation), by its span per input; one of parameters alone grows
        in none (its shape may still lead with the batch's size: a [1] temperature with one
        input). Which way a dim that folds the inputs with another holds them, copies cannot
        tell: read_axes does."""
        key = tuple(x.shape[1:])
        if not len(x):
            raise InputError("no inputs to explain: the batch is empty")
        if key not in self._input_axes:
            shapes = []
            for copies in (2, 3):
                mode = _KinkPattern(copies, axes=None)
                self._sizing_pass(x, mode, copies)
                shapes.append(mode.shapes)
            if len(shapes[0]) != len(shapes[1]):
                raise UnsupportedError(_branching(len(shapes[1]), len(shapes[0])))
            self._input_axes[key] = [_grown_axis(two, three) for two, three in zip(*shapes)]
        return self._input_axes[key]

    def read_axes(self, theta: torch.Tensor, x: torch.Tensor, most: int = 8) -> list[InputAxis | None]:
        """input_axes, with the order of the inputs in each dim that folds them with another told
        by passes at θ: on up to `most` distinct inputs of the batch together, and on each alone.
        An input's entries follow each other ([B·L, E]) or lie a batch's size apart ([L·B, E]);
        a fold in neither order is refused. Told once per input shape, on the first batch of two
        inputs that tells it; a fold whose entries are the same for all of that batch's inputs keeps
        the first order. Inputs whose entries differ may still read alike in either order (a_l x_bl
        of (0.5, 0.5) and (0.5, 0.8) folded are [0.5, 0.5, 0.5, 0.8] both ways), and copies of one
        input, which tell it by their entries along the other dim (read in the wrong order, one
        copy's row holds the same position twice), read alike where those are the same too: such a
        batch is read alike in either order, and the order is told on a later one."""
        key = tuple(x.shape[1:])
        axes = self.input_axes(x)
        if key in self._read_axes:
            return self._read_axes[key]
        folds = [i for i, axis in enumerate(axes) if axis is not None and axis.span > 1]
        if not folds:
            self._read_axes[key] = axes
            return axes
        inputs = _distinct_inputs(x, most)
        copies = len(inputs) < 2
        if copies:
            if len(x) < 2:  # one row: read alike either way
                return axes
            inputs = x[:2]
        together = self._tracked(theta, inputs)
        alone = [self._tracked(theta, inputs[k:k + 1]) for k in range(len(inputs))]
        for tracked in (together, *alone):
            if len(tracked) != len(axes):
                raise UnsupportedError(_branching(len(tracked), len(axes)))
        read, untold = list(axes), False
        for i in folds:
            seen = together[i].movedim(axes[i].dim, 0)
            each = [tracked[i].movedim(axes[i].dim, 0) for tracked in alone]
            in_turn, interleaved = _misread(seen, torch.cat(each)), _misread(seen, torch.stack(each, 1).flatten(0, 1))
            if min(in_turn, interleaved) > 0.05:  # more than a tie's rounding apart
                raise UnsupportedError(_unread_fold(together[i].shape, axes[i], len(inputs)))
            read[i] = axes[i]._replace(interleaved=interleaved < in_turn)
            # entries that differ between the inputs (copies': along the other dim) tell the order unless
            # they read alike either way; entries the same for all inputs read alike on any batch
            could_tell = copies or any(not torch.equal(each[0], other) for other in each[1:])
            untold |= in_turn == interleaved and could_tell
        if not untold:
            self._read_axes[key] = read
        return read

    def _tracked(self, theta: torch.Tensor, x: torch.Tensor) -> list[torch.Tensor]:
        """The tensor of each call of a piecewise-linear op in a forward pass on x at θ."""
        mode = _KinkPattern(len(x), axes=None)
        with torch.no_grad():
            self._pattern(theta, self.cast_inputs(x), mode)
        return mode.tracked

    def shared_columns(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Which columns of kink_pattern's distances [P] and argmax indices [P'] are of
        parameters alone, and so the same for every input: bool, on the model's device."""
        key = tuple(x.shape[1:])
        if key not in self._shared_columns:
            mode = _KinkPattern(rows=1, axes=self.input_axes(x))
            self._sizing_pass(x, mode)
            self._shared_columns[key] = tuple(c.to(self.device) for c in mode.shared_columns())
        return self._shared_columns[key]

    def kink_sizes(self, x: torch.Tensor) -> tuple[int, int, int]:
        """How many distances, argmax indices and explained outputs kink_pattern gives per
        input, from a plain forward pass on x[:1] (no derivatives: cheap enough for a plan; the
        first for an input shape takes two more, see input_axes)."""
        mode = _KinkPattern(rows=1, axes=self.input_axes(x))
        out = self._sizing_pass(x, mode)
        distances, indices = mode.flat(x.device)
        return distances.shape[1], indices.shape[1], self._explain(out, "logit", 1).shape[1]

    @_transformed
    def kink_pattern(
        self, theta: torch.Tensor, delta: torch.Tensor, x: torch.Tensor, t: torch.Tensor | float,
        target: str = "logit",
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Where each row's forward pass at θ + tΔ stands relative to the model's kinks: signed
        distances z [R, P], their derivatives dz/dt along the segment [R, P] (forward mode) and
        argmax indices [R, P'] (P = P' = 0 if smooth); and the explained output there [R, O],
        which the same pass computes.

        t is one float for all rows (one batched pass with shared parameters) or a tensor [R],
        one point per row (a vmapped pass, each row with its own parameters); then θ and Δ may
        be [R, D] too, each row on its own segment (the segments of several steps in one pass).
        With one float t, θ and Δ may be S segments' [S, D]: a pass over the inputs at each
        segment's point, vmapped over the segments, row s·n + i for input i on segment s.
        """

        axes = self.read_axes(theta if theta.dim() == 1 else theta[0], x)

        def pattern(th: torch.Tensor, x_: torch.Tensor):
            mode = _KinkPattern(rows=len(x_), axes=axes)
            out = self._explain(self._pattern(th, x_, mode), target, len(x_))
            distances, indices = mode.flat(x_.device)
            return distances.to(self.dtype), (indices, out)

        def along(th: torch.Tensor, d: torch.Tensor, x_: torch.Tensor):
            z, dz, (idx, out) = jvp(lambda p: pattern(p, x_), (th,), (d,), has_aux=True)
            return z, dz, idx, out

        with torch.no_grad():
            if not isinstance(t, torch.Tensor):
                if theta.dim() == 1:
                    return along(theta + t * delta, delta, x)
                z, dz, idx, out = vmap(lambda th1, d1: along(th1, d1, x))(theta + t * delta, delta)
                return z.flatten(0, 1), dz.flatten(0, 1), idx.flatten(0, 1), out.flatten(0, 1)
            own = 0 if theta.dim() == 2 else None
            z, dz, idx, out = vmap(lambda x1, p1, d1: along(p1, d1, x1.unsqueeze(0)),
                                   in_dims=(0, 0, own))(x, row_points(theta, delta, t), delta)
            return z[:, 0], dz[:, 0], idx[:, 0], out[:, 0]

    def kink_relevance(self, theta: torch.Tensor, x: torch.Tensor, target: str) -> torch.Tensor | None:
        """Which distances of kink_pattern can move the explained output: [P] bool, any row.

        The kinks of a unit that the output does not depend on (a position the model does not
        read out, a discarded branch), or whose input does not depend on θ, leave J unchanged.
        One backward pass with ReLU-type ops made straight-through (so that units off at θ
        count too) and random output weights finds the units the output depends on. None (all
        relevant) if the model max-pools: its gradient reaches only the current argmax.
        """
        mode = _KinkPattern(rows=len(x), axes=self.read_axes(theta, x), straight_through=True)
        with torch.enable_grad():
            th = theta.detach().requires_grad_(True)
            out = self._explain(self._pattern(th, x, mode), target, len(x))
            if mode.pooled:
                return None
            weights = torch.rand(out.shape[1], generator=torch.Generator().manual_seed(0), dtype=torch.float64,
                                 device="cpu")
            # a unit whose input does not depend on θ (after a frozen layer) has no kink along a segment
            live = [i for i, (unit, _) in enumerate(mode.units) if unit.requires_grad]
            traced = [i for i in live if i not in mode.selectors]
            grads = torch.autograd.grad((out * weights.to(out)).sum(), [mode.units[i][0] for i in traced],
                                        allow_unused=True) if traced else ()
        depends = [torch.zeros_like(d, dtype=torch.bool) for d in mode.distances]
        for i, g in zip(traced, grads):
            if g is not None:
                depends[i] = mode.per_row(g != 0, mode.units[i][1])
        for i in mode.selectors.intersection(live):  # what it selects is not traced: taken to matter
            depends[i] = torch.ones_like(depends[i])
        return _rows(depends, len(x), torch.bool, x.device).any(0)

    @_transformed
    def derivative_mismatch(self, theta: torch.Tensor, x: torch.Tensor, target: str) -> float:
        """|⟨v, J u⟩ − ⟨Jᵀv, u⟩| over Σ_j |(Jᵀv)_j u_j| for a batch x and random u, v: J by forward
        mode against J by reverse mode, as the per-sample and per-row Jacobians take it. Rounding
        level where the model's backward is its forward's derivative; not so after a custom
        autograd.Function or a hook whose backward differs (gradient reversal)."""
        generator = torch.Generator().manual_seed(0)
        u = torch.randn(theta.shape, generator=generator, dtype=torch.float64, device="cpu").to(theta)
        reverse = lambda th: self._explain(self._call(self.layout.unflatten(th), x, jacobian=True),  # noqa: E731
                                           target, len(x))
        out, pullback = vjp(reverse, theta)
        v = torch.randn(out.shape, generator=generator, dtype=torch.float64, device="cpu").to(out)
        (transposed,) = pullback(v)
        forward = jvp(lambda th: self.explained(th, x, target), (theta,), (u,))[1]
        terms = transposed * u
        scale = float(terms.abs().sum())
        return float(((v * forward).sum() - terms.sum()).abs()) / scale if scale > 0 else 0.0

    @_transformed
    def directional(self, theta: torch.Tensor, delta: torch.Tensor, x: torch.Tensor, target: str) -> torch.Tensor:
        """J(θ)·Δ for every input of a batch, all outputs, by one forward-mode pass: [B, O]. θ and
        Δ may be S points' [S, D]: [S·B, O], row s·B + i for input i at point s, by a pass over the
        batch vmapped over the points."""
        def along(th: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
            return jvp(lambda p: self.explained(p, x, target), (th,), (d,))[1]

        return along(theta, delta) if theta.dim() == 1 else vmap(along)(theta, delta).flatten(0, 1)

    @_transformed
    def directional_many(self, theta: torch.Tensor, tangents: torch.Tensor, x: torch.Tensor, target: str) -> torch.Tensor:
        """J(θ)·v for every tangent v [V, D] and every input of a batch, all outputs: [V, B, O]."""
        f = lambda th: self.explained(th, x, target)
        return vmap(lambda v: jvp(f, (theta,), (v,))[1])(tangents)

    @_transformed
    def directional_rows(self, theta: torch.Tensor, delta: torch.Tensor, x: torch.Tensor, t: torch.Tensor,
                         tangents: torch.Tensor, target: str) -> torch.Tensor:
        """J(x_r; θ + t_r Δ)·v for each row r (its own input and point) and tangent v: [R, V, O]."""

        def one(x1: torch.Tensor, t1: torch.Tensor) -> torch.Tensor:
            f = lambda th: self.explained(th, x1.unsqueeze(0), target)[0]
            return vmap(lambda v: jvp(f, (theta + t1 * delta,), (v,))[1])(tangents)

        return vmap(one)(x, t)

    @_transformed
    def directional_along(
        self, theta: torch.Tensor, delta: torch.Tensor, x: torch.Tensor, t: torch.Tensor, target: str
    ) -> torch.Tensor:
        """J(θ + t_r Δ)·Δ for row r's input, all outputs, by forward mode: [R, O]. θ and Δ are one
        segment's [D] or each row's own [R, D] (see kink_pattern)."""

        def one(x1: torch.Tensor, p1: torch.Tensor, d1: torch.Tensor) -> torch.Tensor:
            f = lambda th: self.explained(th, x1.unsqueeze(0), target)[0]
            return jvp(f, (p1,), (d1,))[1]

        own = 0 if theta.dim() == 2 else None
        return vmap(one, in_dims=(0, 0, own))(x, row_points(theta, delta, t), delta)

    @phase(SAMPLE_GRADIENTS)
    @_transformed
    def per_sample_gradients(
        self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, loss: PerSampleLoss,
        rows: int | None = None, weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """∇_θ ℓ(f(x_k; θ), y_k) for each row k of a batch: [B, D], by backward passes over at
        most `rows` samples each (None: the whole batch at once). θ [S, D] with S batches of as
        many samples (x [S, B, ...], y [S, B]): [S, B, D], each step's batch at its own θ, by one
        vmap over the steps, whose fixed costs then count once (measured on the reference
        Transformer: 4 steps of 200 samples in 15 ms against 24-27 ms a step at a time).
        `weights` ([B], or [S, B]): each gradient times its sample's weight, as it is written
        (ParamLayout.flatten)."""

        def sample_loss(p: dict[str, torch.Tensor], x1: torch.Tensor, y1: torch.Tensor) -> torch.Tensor:
            return loss(self._call(p, x1.unsqueeze(0)), y1.unsqueeze(0))[0]

        params = self.layout.unflatten(theta)
        per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))
        steps = theta.dim() == 2
        if steps:
            per_sample = vmap(per_sample)
        samples = (slice(None),) * steps  # the index of the samples' dim: after the steps'
        parts = sample_parts(x.shape[steps], rows)
        if len(parts) == 1:
            return self.layout.flatten(per_sample(params, x, y), weights)
        out = theta.new_empty(*x.shape[:steps + 1], self.layout.dim)
        for part in parts:
            at = (*samples, part)
            out[at] = self.layout.flatten(per_sample(params, x[at], y[at]), None if weights is None else weights[at])
        return out

    @phase(SAMPLE_GRADIENTS)
    @_transformed
    def per_sample_directional(
        self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, loss: PerSampleLoss, tangents: torch.Tensor,
        rows: int | None = None,
    ) -> torch.Tensor:
        """∇_θ ℓ(f(x_k; θ), y_k) · v_r for each row k of a batch and each tangent v_r [R, D], by
        forward mode: [R, B]. About R forward passes of the batch (in parts of at most `rows`
        samples; None: all at once); the [B, D] per-sample gradients are never held, which makes
        it the cheaper route when R is small (forward_mode_pays)."""
        params = self.layout.unflatten(theta)

        def along(x_part: torch.Tensor, y_part: torch.Tensor) -> torch.Tensor:
            def losses(p: dict[str, torch.Tensor]) -> torch.Tensor:
                return loss(self._call(p, x_part), y_part)

            return vmap(lambda v: jvp(losses, (params,), (self.layout.unflatten(v),))[1])(tangents)

        return torch.cat([along(x[part], y[part]) for part in sample_parts(len(x), rows)], dim=1)

    @phase(SAMPLE_GRADIENTS)
    @_transformed
    def batch_gradient(
        self,
        theta: torch.Tensor,
        x: torch.Tensor,
        y: torch.Tensor,
        weights: torch.Tensor,
        loss: PerSampleLoss,
        rows: int | None = None,
    ) -> torch.Tensor:
        """Σ_k w_k ∇ℓ_k by ordinary backward passes over at most `rows` samples each (None: one
        pass over the whole batch): [D]. The sum is linear in the samples, so parts add up to it
        exactly (up to the order of rounding). θ [S, D] with S batches of as many samples (x
        [S, B, ...], y and weights [S, B]): [S, D], each step's at its own θ, by one vmap over the
        steps (as per_sample_gradients)."""

        def batch_loss(p: dict[str, torch.Tensor], x1: torch.Tensor, y1: torch.Tensor, w1: torch.Tensor):
            return (w1 * loss(self._call(p, x1), y1)).sum()

        params = self.layout.unflatten(theta)
        steps = theta.dim() == 2
        gradient = vmap(grad(batch_loss)) if steps else grad(batch_loss)
        total = None
        for part in sample_parts(x.shape[steps], rows):
            at = (slice(None),) * steps + (part,)
            flat = self.layout.flatten(gradient(params, x[at], y[at], weights[at]))
            total = flat if total is None else total.add_(flat)
        return total


def row_points(theta: torch.Tensor, delta: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """θ + t_r Δ of every row r, [R, D] (θ, Δ: one segment's [D] or each row's [R, D]), by one
    op, where a product and a sum made two fresh [R, D] tensors, their pages faulted in anew each
    time (on the reference workload's kink search, 209 rows in float64: 3.6 ms against 13 ms)."""
    return torch.addcmul(theta, t[:, None].to(theta.dtype), delta)


def sample_parts(n: int, rows: int | None) -> list[slice]:
    """The batch's samples 0 … n − 1 in consecutive parts of at most `rows` (None: one part).
    Splitting a batch is exact because each sample's loss depends on its own input only: the
    loss is per sample, and modules that mix a batch (train-mode BatchNorm) are refused."""
    if rows is not None and not (is_whole(rows) and rows >= 1):  # explain's chunks are checked on entry
        raise InputError(f"rows={rows!r} must be a whole number ≥ 1 (None: the whole batch in one part)")
    if n == 0:
        return [slice(0, 0)]
    size = n if rows is None else rows
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def layout_of(model: nn.Module, names: Sequence[str] | None = None) -> ParamLayout:
    params = trainable_parameters(model)
    names = tuple(names) if names is not None else tuple(params)
    return ParamLayout(names, tuple(tuple(params[n].shape) for n in names))
