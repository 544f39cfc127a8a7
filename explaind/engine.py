"""The exact decomposition of a recorded run: explain(history, model, inputs) -> cube.

One pass streams the history from disk. At each step s it computes, for the explained
inputs, the path-integrated Jacobian φ_s (Gauss–Legendre over the segment θ_s → θ_{s+1}),
scales it by −η_s into G_s, and contracts it with the training samples' shares of the update
(docs/method.md §1). Dims the user does not keep are summed *before* the contraction, so a cube
summed over training samples never materialises per-sample gradients' momentum buffers, and
one summed over test inputs contracts a single row per output.

Two step conventions, both exact (docs/method.md §1):
- "update": the step at which a sample's share moves the parameters. A per-sample momentum
  buffer [M, D] is carried forwards.
- "gradient": the step at which the sample's gradient was computed. The history is walked
  backwards, carrying K_s = Σ_{s'≥s} (momentum decay) · P c G_{s'} of size [rows, D] instead
  of any per-sample buffer.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from itertools import chain, islice
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import xarray as xr
from tqdm.auto import tqdm

from .components import ComponentSpec, group_tensors
from .cube import MergedParts, assemble_cube, checked_test_ids
from .errors import UPDATE_MISS_CAUSES, InputError, ReconstructionError, UnsupportedError, is_number, is_whole
from .functional import (ActivationSizes, FlatModel, ForwardModeSizes, ParamLayout, forward_mode_pays, resolve_target,
                         tensor_of, untrained_tensors)
from .history import History, StepRecord, open_history
from .losses import IGNORE_INDEX, another_loss_note
from .optimizers import AggregateUpdate, StepCoefficients, momentum_from_update, sgd_buffers_started
from .path import PathIntegral
from .phases import CONTRACTION, EXPLAIN, phase
from .verify import StepReader, check_tolerance, rounding_eps, update_check

DIMS = ("step", "component", "train", "test", "output")
CONVENTIONS = ("update", "gradient")
DTYPES = (torch.float64, torch.float32)


# --------------------------------------------------------------------------- the request


@dataclass
class Request:
    """A validated explain() call: everything fixed before any heavy compute starts."""

    history: History
    flat: FlatModel
    inputs: torch.Tensor
    select: torch.Tensor | None  # [T, O] output indices per input, None = all outputs
    output_labels: list
    keep: tuple[str, ...]
    target: str
    path: PathIntegral
    convention: str
    components: dict[str, list[str]]
    step_edges: np.ndarray
    step_range: tuple[int, int]  # the update steps explained: start ≤ s < stop
    replay_start: int  # the first step whose gradients are split by sample (≤ start)
    train_index: torch.Tensor  # dataset indices of the train coordinate
    train_labels: np.ndarray | None  # their classes, where the run's targets give one each (History.train_labels)
    loss: object
    parameter_scores: bool
    test_chunk: int
    train_chunk: int
    progress: bool = False  # tqdm bars and the plan's summary (explain's progress=)
    batch_chunk: int = 0  # samples of a recorded batch per backward pass (0: planned)
    gradient_steps: int = 1  # steps whose per-sample gradients one call takes (plan_chunks sets it)
    component_slices: list[slice] = field(default_factory=list)
    check_updates: bool = True  # False: trust the recorded updates (checked by verify_updates)
    stop_at_missed_update: bool = False  # stop at a step whose update misses far beyond rounding (UPDATE_STOP_SHARE)
    loss_note: str = ""  # a custom loss given under another name than the history's (another_loss_note)
    coarser_rounding: str = ""  # where the model rounds to a coarser dtype (FlatModel.coarser_rounding)
    # bytes of the kink search's pieces a test chunk's first pass keeps for its later train
    # chunks (KeptPieces; None: no bound); plan_chunks sets it
    pieces_bytes: int | None = None
    # whether walks_backwards may walk forwards for speed where a backward walk would hold less;
    # plan_chunks turns it off where the forward walk's pass does not fit the budget
    forward_for_speed: bool = True

    @property
    def n_outputs(self) -> int:
        return len(self.output_labels)

    @functools.cached_property
    def activations(self) -> ActivationSizes:
        """What a forward pass produces per input, sized on the first test input (training
        inputs are taken to be of its size)."""
        return self.flat.activation_sizes(self.inputs)

    @functools.cached_property
    def forward_mode(self) -> ForwardModeSizes:
        """What a forward-mode pass holds per input, sized on the first test input."""
        return self.flat.forward_mode_sizes(self.inputs)

    @functools.cached_property
    def buffers_started(self) -> list[list[bool]]:
        """Per step and group, whether SGD's momentum buffer exists before the step; once per
        call, not per chunk of inputs."""
        return sgd_buffers_started(self.history)

    def keeps(self, dim: str) -> bool:
        return dim in self.keep


@phase(EXPLAIN)
def explain(
    history: History | str | os.PathLike,
    model: torch.nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor | None = None,
    *,
    keep: str | Sequence[str] = DIMS,
    outputs: str | int | Sequence[int] = "all",
    target: str | None = None,
    output_fn: Callable | None = None,
    quadrature: int = 4,
    rule: str = "gauss",
    breakpoints: bool = True,
    kink_tolerance: float = 0.0,
    max_kinks: int = 16,
    convention: str = "update",
    components: ComponentSpec = "tensor",
    step_bins: int | Sequence[int] | None = None,
    parameter_scores: bool = False,
    check_updates: bool = True,
    steps: tuple[int, int] | None = None,
    replay: int | None = None,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
    test_chunk: int | None = None,
    train_chunk: int | None = None,
    batch_chunk: int | None = None,
    memory_budget: float | None = 4 * 2**30,
    loss=None,
    tolerance: float | None = 1e-4,
    test_ids: Sequence | None = None,
    progress: bool = True,
) -> xr.Dataset:
    """Decompose the change of the model's outputs on `inputs` over a recorded training run.

    Returns the attribution cube (docs/method.md §2): `attribution` over the dims in `keep` (the
    others are summed while streaming), `regularization` (the weight-decay share), `initial`,
    `final`, `residual`, `update_residual` with its `update_rounding_floor` (what the rounding of
    the stored θ allows it) and `residual_from_updates` (the part of the residual
    that the recorded updates' difference from the modelled ones causes; the rest is the path
    integral's error); with a bounded `replay`, also `carried` (below).
    Positive attribution raises the output.

    history: a recorded run's folder, or an explaind.History (one opened with
    allow_incomplete=True explains the complete steps of a killed run). model: the trained
    architecture (its parameter values are ignored: every θ comes from the history). inputs: the
    test inputs, [n, ...] as the model takes them; targets: their classes, for outputs="true".
    keep: the dims kept, any of "step", "component", "train", "test", "output" (default: all).
    components: "tensor" (one component per parameter tensor), "module" (the tensors of the module
    that directly owns them: "enc.self_attn.in_proj_weight" is in "enc.self_attn", apart from
    "enc.self_attn.out_proj"), a mapping component -> a tensor name or module prefix (or a list of
    them), or a function tensor name -> component. convention: "update" books a gradient's effect
    at each step its momentum moves the parameters; "gradient" books it all at the step the gradient
    was taken (lighter: no per-sample momentum buffer). loss: the per-sample loss of a history
    recorded with a custom loss (as given to the Recorder), for the gradients. dtype / device: the
    compute precision and device ("cuda" runs the same code on a GPU). test_ids: labels of the test
    dim (default 0 … n−1; e.g. the inputs' dataset indices). progress: the plan's summary on
    stdout, then tqdm bars on stderr.
    outputs: "all", "true" (needs `targets`), "predicted" (argmax of the final model), an output
    index or a list of distinct output indices. target: "log_prob" (log-softmax of the model's
    output) or "logit" (the raw output); None: what the recorded loss reads, the raw output under
    MSE and the log-probabilities otherwise. output_fn: a function of the model's output that
    returns what is explained, [batch, outputs] or [batch] (e.g. lambda out: out[:, -1], a
    sequence model's last position, or lambda out: out.logits); the training loss keeps the
    model's own output. quadrature / rule: nodes and rule of the path integral, applied to each
    smooth piece of the path; breakpoints: locate the kinks of ReLU / max-pool along each
    segment first (each smooth piece then gets its own nodes; False: plain quadrature). kink_tolerance:
    0 locates and certifies every kink; a positive value searches only the segments whose plain
    integral misses the change of an explained output (all outputs of the input, not only the
    selected ones) by more than it, which is far cheaper when most steps cross no kink: each
    segment's change then misses by at most that much per smooth piece, but a unit that
    switches off and back on between the plain nodes goes unnoticed and skews the shares of
    that change (explaind/path.py). max_kinks: the kinks per input and step that the search
    resolves; a segment crossing more is integrated plainly and counted in the attribute
    `kink_segments_unresolved` (raise it when that count is not 0 and the residual matters).
    step_bins: None
    (every step), a number of equal bins, or bin edges 0 = e_0 < … < e_n = n_steps.
    steps: (start, stop) explains only the updates start ≤ s < stop (update convention; the
    momentum of earlier steps is replayed), e.g. to split a long run across processes; initial
    and final are then f(θ_start) and f(θ_stop). replay: with steps and a train dim, how many
    steps before start have their gradients split by sample (None: all, from step 0). What the
    steps before those carried into the explained updates by momentum is solved from the
    recorded update and booked whole as `carried` (exact, but not split by sample), so a window
    late in a long run costs its own steps plus the replay, not the run's length; with momentum
    β, `carried` holds about β^replay of the momentum at start.
    parameter_scores: also return the parameter-wise scores of docs/method.md §2, one per scalar
    parameter (weight decay excluded): |·| is taken per explained input and output, and the sum
    runs over the test / output dims not in `keep` (the pruning importance: keep neither).
    check_updates: True recomputes every step's batch gradient and checks the modelled update
    against the recorded one (docs/method.md §1, check 1; stored as update_residual, NaN for the steps
    outside `steps`). False, for a
    history already checked with verify_updates, skips that check (update_residual and
    update_rounding_floor NaN); a cube
    without a train dim then needs no gradient at all: the recorded update is split into its
    weight-decay part and the rest.
    tolerance: the largest output residual, relative to the largest change of an explained
    output, that is accepted; above it a ReconstructionError is raised, which holds the cube as its
    .cube (None: never raised). With a tolerance, explain also stops at the first step whose
    recorded update misses the modelled one far beyond rounding (by more than 1e-3 of the update
    and 100 times its rounding floor), before computing the rest of the run (no cube then).
    test_chunk / train_chunk / batch_chunk bound memory: test inputs per pass, training samples
    per momentum buffer (the history is streamed once per chunk pair, its kinks searched once per
    test chunk where memory_budget leaves room to keep them) and samples of a recorded
    batch per backward pass (a batch's gradient is summed over its parts, so this chunk costs no
    recomputation). Left as None, they are chosen as large as `memory_budget` (bytes, on the
    compute device) allows.
    """
    request = build_request(
        history, model, inputs, targets, keep=keep, outputs=outputs, target=target, output_fn=output_fn,
        quadrature=quadrature, rule=rule, breakpoints=breakpoints, kink_tolerance=kink_tolerance,
        max_kinks=max_kinks, convention=convention, components=components,
        step_bins=step_bins, parameter_scores=parameter_scores, steps=steps, replay=replay, dtype=dtype,
        device=device, test_chunk=test_chunk, train_chunk=train_chunk, batch_chunk=batch_chunk, loss=loss,
        check_updates=check_updates,
    )
    test_ids = checked_test_ids(test_ids, len(request.inputs))
    check_tolerance("tolerance", tolerance, "no check")
    check_reverse_mode(request)
    plan_chunks(request, memory_budget)
    request.progress = progress
    request.stop_at_missed_update = tolerance is not None
    if progress:
        from .planning import describe  # planning builds on this module

        _show_plan.get()(describe(request).report())
    initial = _outputs_at(request, request.step_range[0])
    final = _outputs_at(request, request.step_range[1])
    merged = MergedParts(request)
    _run_chunks(request, merged.add)
    cube = assemble_cube(request, merged.arrays, initial, final, test_ids)
    check_residual(cube, tolerance)
    return cube


def build_request(history, model, inputs, targets, *, keep, outputs, target, output_fn=None, quadrature, rule,
                  breakpoints, convention, kink_tolerance=0.0, max_kinks=16, components, step_bins, parameter_scores, steps,
                  replay=None, dtype, device, test_chunk, train_chunk, batch_chunk=None, loss,
                  check_updates=True) -> Request:
    """explain()'s arguments checked and resolved into a Request, before any heavy compute
    (explaind.planning costs the same Request without running it)."""
    history = open_history(history, model, "explain")
    keep = kept_dims(keep)
    if step_bins is not None and "step" not in keep:  # the bins of a dim that is summed over: a mistake
        raise InputError(f"step_bins={step_bins!r} bins the step dim, which keep={keep} sums over. Fix: add "
                         "'step' to keep, or leave step_bins out")
    if replay is not None and steps is None:
        raise InputError(f"replay={replay!r} bounds the replay of the momentum before steps=(start, stop); without "
                         "steps= every step is explained from step 0. Fix: pass steps=(start, stop), or leave "
                         "replay out")
    if convention not in CONVENTIONS:
        raise InputError(f"unknown step convention {convention!r}: use one of {CONVENTIONS}")
    target = resolve_target(target, history.loss)
    check_dtype(dtype)
    test_chunk, train_chunk = _chunk_size("test_chunk", test_chunk), _chunk_size("train_chunk", train_chunk)
    batch_chunk = _chunk_size("batch_chunk", batch_chunk)
    loss_note = another_loss_note(history.loss, loss)
    loss = history.per_sample_loss(loss)
    if isinstance(targets, torch.Tensor):
        targets = targets.detach()

    groups = group_tensors(history.layout.names, components, untrained=untrained_tensors(model))
    ordered = [n for names in groups.values() for n in names]  # each component contiguous
    shapes = dict(zip(history.layout.names, history.layout.shapes))
    layout = ParamLayout(tuple(ordered), tuple(shapes[n] for n in ordered))
    flat = FlatModel(model, layout, dtype, device, history.constants(), output_fn)
    inputs = checked_test_inputs(history, flat, inputs)
    slices, start = [], 0
    for names in groups.values():
        size = sum(int(np.prod(shapes[n])) for n in names)
        slices.append(slice(start, start + size))
        start += size

    theta_final = flat.layout.flatten(history.params(history.n_steps)).to(flat.device, dtype)
    path = PathIntegral(flat, quadrature, rule, breakpoints, kink_tolerance, max_kinks)
    n_outputs = path.model_output(theta_final, inputs, target).shape[-1]  # of the first input
    select, labels = select_outputs(outputs, targets, inputs, n_outputs, flat, theta_final, target)
    coarser_rounding = flat.coarser_rounding(theta_final, inputs, target)

    n_steps = history.n_steps
    train_index = history.train_indices()
    step_range = checked_steps(steps, n_steps, convention, parameter_scores)
    return Request(
        history=history, flat=flat, inputs=inputs, select=select, output_labels=labels,
        keep=keep, target=target, path=path,
        convention=convention, components=groups, step_edges=_step_edges(step_bins, n_steps),
        step_range=step_range, replay_start=_replay_start(history, step_range[0], replay, keep),
        train_index=train_index, train_labels=history.train_labels() if "train" in keep else None, loss=loss,
        parameter_scores=parameter_scores,
        test_chunk=test_chunk, train_chunk=train_chunk, batch_chunk=batch_chunk,
        component_slices=slices, check_updates=check_updates, coarser_rounding=coarser_rounding, loss_note=loss_note,
    )


def _on_stderr(summary: str) -> None:
    tqdm.write(summary, file=sys.stderr)  # beside the progress bars, off the caller's stdout


# what explain() does with its plan summary under progress=True (see plans_shown_by)
_show_plan: ContextVar[Callable[[str], None]] = ContextVar("explaind_show_plan", default=_on_stderr)


@contextmanager
def plans_shown_by(show: Callable[[str], None]) -> Iterator[None]:
    """explain() calls inside the block hand their plan summary to `show` instead of printing it
    on stderr: the command line prints it on its stdout in its own words, and the calls that run
    explain() once per part show one plan (explain_resumable its first computed part's,
    explain_distributed process 0's), passing the others a function that drops them."""
    token = _show_plan.set(show)
    try:
        yield
    finally:
        _show_plan.reset(token)


def dropped(summary: str) -> None:
    """A plan summary that is not shown (see plans_shown_by)."""


def explain_defaults() -> dict:
    """explain()'s keyword options and their defaults."""
    parameters = inspect.signature(explain).parameters
    return {name: p.default for name, p in parameters.items() if p.kind == p.KEYWORD_ONLY}


def request_options(caller: str, options: dict) -> dict:
    """explain()'s keyword defaults overridden by `options`, as build_request takes them (the
    options that only matter after computing are dropped; names explain() does not take are
    refused in `caller`'s name)."""
    defaults = explain_defaults()
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise TypeError(f"{caller}() got arguments explain() does not take: {unknown}. Fix: pass explain()'s "
                        f"keyword arguments, e.g. {sorted(defaults)[:6]} ...")
    merged = {**defaults, **options}
    for after_compute in ("memory_budget", "tolerance", "test_ids", "progress"):
        merged.pop(after_compute)
    return merged


def kept_dims(keep: str | Sequence[str]) -> tuple[str, ...]:
    """`keep` checked and in DIMS order, the order of the cube's dims whatever order they were named in."""
    if not isinstance(keep, (str, Iterable)):  # keep=None may mean every dim or none: refused, not guessed
        raise InputError(f"keep={keep!r} names no dims: pass some of {DIMS} (all five by default; () keeps none "
                         "and sums every dim)")
    keep = (keep,) if isinstance(keep, str) else tuple(keep)  # keep="train" means ("train",)
    unknown = [d for d in keep if d not in DIMS]
    if unknown:
        raise InputError(f"cannot keep dims {unknown}: choose among {DIMS}")
    repeated = sorted({d for d in keep if keep.count(d) > 1})
    if repeated:
        raise InputError(f"keep={keep} names {repeated} more than once: name each kept dim once")
    return tuple(d for d in DIMS if d in keep)


def check_dtype(dtype) -> None:
    if dtype not in DTYPES:
        raise InputError(f"dtype={dtype!r} is not supported: pass torch.float64 (the default) or torch.float32")


def _chunk_size(name: str, value) -> int:
    """A chunk size given by the user (0: unset, planned from the memory budget)."""
    if value is None:
        return 0
    if not is_whole(value) or value < 1:
        raise InputError(f"{name}={value!r} must be a whole number ≥ 1 (None: chosen from memory_budget)")
    return int(value)


def checked_test_inputs(history: History, flat: FlatModel, inputs) -> torch.Tensor:
    """The test inputs, detached (explain differentiates parameters, never inputs), checked
    against the recorded training inputs' shape and kind, and integer ones against the tables
    the model looks them up in."""
    shape, recorded = history.input_spec()
    inputs = tensor_of(inputs, "the test inputs").detach()
    if tuple(inputs.shape[1:]) != shape or not len(inputs):
        _check_input_shape(history, tuple(inputs.shape))
    if inputs.is_floating_point() != recorded.is_floating_point:
        raise InputError(
            f"test inputs have dtype {inputs.dtype}, but the model was trained on {recorded} inputs: "
            f"convert them, e.g. inputs.to({recorded})"
        )
    if inputs.is_floating_point() and not bool(torch.isfinite(inputs).all()):
        bad = sorted({int(i) for i in (~torch.isfinite(inputs)).flatten(1).any(1).nonzero()[:, 0]})
        raise InputError(f"test inputs {bad[:10]} hold NaN or inf: remove them or fill in finite values")
    # in the dtype the model was trained in, which it computes in (PathIntegral.model_output refuses the others)
    (flat if flat.dtype == history.dtype else flat.in_dtype(history.dtype)).check_lookups(inputs)
    return inputs


def _check_input_shape(history: History, given: tuple[int, ...]) -> None:
    """Refuse test inputs [batch, *shape] unless their shape is a recorded input's, but for dims
    whose size the recorded batches vary (a sequence's length): a model trained on several
    lengths takes any."""
    shapes = history.input_shapes()
    one = given[1:]
    same_rank = len({len(shape) for shape in shapes}) == 1
    varying = [len(set(sizes)) > 1 for sizes in zip(*shapes)] if same_rank else []
    fits = one in shapes or same_rank and len(one) == len(shapes[0]) and all(
        size == first or free for size, first, free in zip(one, shapes[0], varying))
    if given and given[0] and fits:
        return
    trained = " and ".join(f"[batch, {', '.join(map(str, s))}]" for s in shapes[:4]) + (" …" if len(shapes) > 4 else "")
    free = f" (dims {[i + 1 for i, v in enumerate(varying) if v]} vary in the recorded batches: any size there)" if (
        any(varying)) else ""
    raise InputError(f"test inputs have shape {given}, but the model was trained on inputs of shape {trained}{free}: "
                     "pass a batch of at least one input shaped like the training inputs")


def _integers(value) -> np.ndarray | None:
    """value (a whole number or a list of them) as a 1-d integer array; None if it is not that."""
    try:
        array = np.asarray(value)
    except (TypeError, ValueError, RuntimeError):
        return None
    if array.ndim == 1 and not len(array):
        return array.astype(np.int64)  # [] holds no number of the wrong kind
    return np.atleast_1d(array) if array.dtype.kind in "iu" and array.ndim <= 1 else None


def _several_targets_fix(targets: torch.Tensor) -> str:
    """The fix for targets with several entries per input: rows of one-hot or class probabilities
    become their class by argmax; anything else (a sequence's next token at every position) holds
    several classes, and argmax would turn it into a position, silently a valid class."""
    rows = targets.reshape(len(targets), -1).double()
    if bool(((rows >= 0) & (rows <= 1)).all()) and bool(torch.allclose(rows.sum(1), torch.ones(len(rows),
                                                                                                 dtype=rows.dtype))):
        return "One-hot or probability rows are not class indices. Fix: pass targets.argmax(1)"
    return ("These hold several classes per input (a sequence's next token at every position?). Fix: pass the "
            "class of the output explained, e.g. targets[:, -1] with output_fn=lambda out: out[:, -1]")


def select_outputs(outputs, targets, inputs, n_total, flat, theta_final, target):
    """The output indices to explain per input, and the labels of the output dim."""
    true = isinstance(outputs, str) and outputs == "true"
    if targets is not None and not true:  # read by outputs='true' alone, but another count means other inputs
        given = tensor_of(targets, "targets")
        count = len(given) if given.dim() else 1
        if count != len(inputs):
            raise InputError(f"got {count} targets for {len(inputs)} inputs: pass one per input, or none "
                             f"(outputs={outputs!r} reads no targets)")
    if isinstance(outputs, str) and outputs == "all":
        return None, list(range(n_total))
    if true:
        if targets is None:
            raise InputError("the true class (outputs='true', TracIn) needs the test targets, one class index per "
                             "input: pass targets=...")
        targets = tensor_of(targets, "targets")
        if targets.dim() > 1 and targets.shape[0] == len(inputs) and targets.shape[1:].numel() > 1:
            raise InputError(f"targets of shape {tuple(targets.shape)}: the true class (outputs='true', TracIn) takes "
                             f"one class index per input [batch]. {_several_targets_fix(targets)}")
        targets = targets.reshape(-1)
        if targets.is_floating_point() and not bool((targets == targets.round()).all()):
            raise InputError(f"targets must be class indices, got {targets.dtype} values that are not whole "
                             f"numbers (e.g. {targets[targets != targets.round()][0].item()}): pass the classes")
        targets = targets.long()
        if len(targets) != len(inputs):
            raise InputError(f"got {len(targets)} targets for {len(inputs)} inputs: pass one per input")
        outside = (targets < 0) | (targets >= n_total)
        if outside.any():
            values = targets[outside].unique()[:10].tolist()
            ignored = (" (-100, torch's ignore_index, marks a target no loss reads, such as a padded position's: "
                       "an explained output needs its class)") if IGNORE_INDEX in values else ""
            raise InputError(f"targets must lie in 0 … {n_total - 1}, the model's outputs: test inputs "
                             f"{outside.nonzero()[:10, 0].tolist()} have targets {values}{ignored}. Fix: drop those "
                             "inputs, or pass their classes")
        return targets.cpu()[:, None], ["true"]  # the cube reads them with numpy, as it reads the others
    if isinstance(outputs, str) and outputs == "predicted":
        return flat.outputs(theta_final, inputs, target).argmax(-1).cpu()[:, None], ["predicted"]
    if isinstance(outputs, str):
        raise InputError(
            f"outputs={outputs!r} is not understood: use 'all', 'true', 'predicted' or a list of "
            "output indices"
        )
    indices = _integers(outputs)
    if indices is None or len(set(indices.tolist())) != len(indices):
        raise InputError(
            f"outputs={outputs!r} is not understood: pass 'all', 'true', 'predicted', an output "
            "index or a list of distinct output indices (whole numbers)"
        )
    chosen = indices.tolist()
    if not chosen:
        raise InputError(f"outputs=[] names no output: pass at least one output index (the model has {n_total} "
                         f"outputs, 0 … {n_total - 1}), or 'all', 'true' or 'predicted'")
    bad = [o for o in chosen if not 0 <= o < n_total]
    if bad:
        raise InputError(
            f"outputs {bad} do not exist: the model has {n_total} outputs (0 … {n_total - 1})"
        )
    return torch.tensor(chosen, device="cpu").expand(len(inputs), -1), chosen


def step_range(steps, n_steps: int) -> tuple[int, int]:
    """steps=(start, stop) checked to be a window of a run of n_steps steps; None: all of them."""
    if steps is None:
        return 0, n_steps
    bounds = _integers(steps)
    if bounds is None or len(bounds) != 2:
        raise InputError(f"steps={steps!r} must be two whole numbers (start, stop), or None for all steps")
    start, stop = bounds.tolist()
    if not 0 <= start < stop <= n_steps:
        raise InputError(f"steps={steps!r} must satisfy 0 ≤ start < stop ≤ {n_steps} (the number of steps)")
    return start, stop


def checked_steps(steps, n_steps: int, convention: str, parameter_scores: bool) -> tuple[int, int]:
    """The [start, stop) of the update steps explain(steps=...) explains, refused if it cannot."""
    if steps is None:
        return 0, n_steps
    start, stop = step_range(steps, n_steps)
    if convention != "update":
        raise InputError(
            "steps=(start, stop) needs convention='update': with the gradient-step convention "
            "a step's attribution depends on every later step. Fix: leave steps= out to explain every "
            "step, or explain the window with convention='update' (the default)"
        )
    if parameter_scores:
        raise InputError(
            "parameter_scores take |·| after summing over all steps, so they cannot be split by "
            "steps=(start, stop). Fix: explain all steps, or split the test inputs instead"
        )
    return start, stop


def _replay_start(history: History, start: int, replay: int | None, keep: tuple[str, ...]) -> int:
    """The first step whose gradients are split by sample: `replay` steps before start, or
    earlier while the update before it does not show the momentum buffer (lr 0, or SGD run with
    momentum 0 while its buffer held earlier momentum), since the momentum carried into the
    replay is solved from that update."""
    if replay is None:
        return 0
    if "train" not in keep:
        raise InputError("replay= bounds the per-sample split of a cube with a train dim; without one "
                         "the steps before start cost one batch gradient each: drop replay=")
    if not is_whole(replay) or replay < 0:
        raise InputError(f"replay={replay!r} must be a whole number of steps ≥ 0 (None: replay from step 0)")
    first = max(0, start - int(replay))
    shown = momentum_shown(history)
    while first > 0 and not shown(first - 1):
        first -= 1
    return first


def momentum_shown(history: History) -> Callable[[int], bool]:
    """Whether step s's update shows the momentum buffer the next step continues, so that a
    replay can start after it (the buffer solved from it): not at a learning rate of 0, nor for
    SGD run with momentum 0 while its buffer held earlier momentum."""
    started = sgd_buffers_started(history)

    def shown(step: int) -> bool:
        groups = history.manifest[step]["groups"]
        return not any(float(g["lr"]) == 0 or (was and g["momentum"] == 0) for was, g in zip(started[step], groups))

    return shown


def _step_edges(step_bins, n_steps: int) -> np.ndarray:
    if step_bins is None:
        return np.arange(n_steps + 1)
    if is_whole(step_bins):
        if not 1 <= step_bins <= n_steps:
            raise InputError(f"step_bins={step_bins} must lie in 1 … {n_steps} (the number of steps)")
        return np.unique(np.linspace(0, n_steps, step_bins + 1).round().astype(int))
    edges = _integers(step_bins)
    if edges is None or len(edges) < 2 or edges[0] != 0 or edges[-1] != n_steps or np.any(np.diff(edges) <= 0):
        raise InputError(
            f"step_bins={step_bins!r}: pass a number of bins in 1 … {n_steps}, or bin edges (whole "
            f"numbers) that rise strictly from 0 to {n_steps} (the number of steps)"
        )
    return edges


# --------------------------------------------------------------------------- memory


def kept_sizes(req: Request, n_test: int, n_train: int) -> tuple[int, int, int, int]:
    """Rows (kept test x output), step bins, components and training columns of a pass."""
    rows = (n_test if req.keeps("test") else 1) * (req.n_outputs if req.keeps("output") else 1)
    n_bins = len(req.step_edges) - 1 if req.keeps("step") else 1
    n_comp = len(req.components) if req.keeps("component") else 1
    train = n_train if req.keeps("train") else 1
    return rows, n_bins, n_comp, train


def walks_backwards(req: Request, rows: int, train: int) -> bool:
    """Whether a pass walks the history backwards: always for the gradient convention; for the
    update convention when its carried effects (one per kept step bin and row) are smaller than
    the forward pass's per-sample momentum buffer [train, D], and either push them through the
    batch by forward mode or are BACKWARD_MEMORY_RATIO times smaller (req.forward_for_speed;
    else always where smaller). Both give the same cube."""
    if req.convention == "gradient":
        return True
    if req.parameter_scores:  # Σ_s |ψ(s, j)| needs each update step's own share, going forwards
        return False
    _, n_bins, _, _ = kept_sizes(req, 0, 0)
    effects = n_bins * rows
    if not req.forward_for_speed or not contracts_sample_gradients(req, rows):
        return effects < train
    return effects * BACKWARD_MEMORY_RATIO < train


# A backward walk that contracts its effects with the materialised per-sample gradients, as the
# forward walk does, is the slower: its update check takes a pass over the steps of its own before
# the walk, where the forward walk's comes with its gradients, and the forward walk may take its
# steps by mixed mode. Measured on the reference workload (200 samples, 25 outputs, AMD EPYC, two
# threads, pairs of calls): 1 test input 0.95-1.04 s forwards against 1.16-1.20 s backwards, 2 inputs
# 0.91-1.02 s against 1.09-1.26 s, 4 inputs 1.21-1.42 s against 1.44-1.86 s, 6 inputs (mixed mode)
# 0.96-1.00 s against 1.47-1.68 s. Such a walk is taken only where the forward walk's momentum
# buffer would hold more than this many times its effects, as a memory saving.
BACKWARD_MEMORY_RATIO = 8


def contracts_sample_gradients(req: Request, rows: int) -> bool:
    """Whether a backward walk over `rows` kept rows contracts its effects with the materialised
    per-sample gradients at every step (ChunkPass.sample_effects): where forward mode does not pay
    (forward_mode_pays) for its fewest effects, one step bin's rows per kept component, through the
    largest batch. Only then can the gradients of several steps be taken together."""
    _, _, n_comp, _ = kept_sizes(req, 0, 0)
    return req.keeps("train") and not forward_mode_pays(req.activations, req.flat.layout.dim, rows * n_comp,
                                                        req.history.max_batch())


# how far J by reverse mode may differ from J by forward mode (a share of the products summed in
# FlatModel.derivative_mismatch) before a model's backward is taken not to be its forward's
# derivative. Measured: rounding, 1e-17 to 4e-13 in float64 (the tests' MLP, CNN and Transformer; a
# Bloom block), 2e-8 to 4e-8 in float32, 1.2e-8 in float64 models that compute a part in float32
# (Mamba, Llama's RMSNorm); a gradient-reversal layer 0.74
DERIVATIVE_MISMATCH = 1e-3


def check_reverse_mode(req: Request) -> None:
    """Refuse, before any pass, a model whose backward is not its forward's derivative where the
    request takes J by reverse mode (every route but by_directions): checked on the first test
    input at the first explained step (FlatModel.derivative_mismatch). A model whose forward
    mode torch cannot take is left to the passes' own refusals."""
    if by_directions(req):
        return
    step = req.step_range[0]
    theta = theta_at(req, step)
    try:
        mismatch = req.flat.derivative_mismatch(theta, req.flat.cast_inputs(req.inputs[:1]), req.target)
    except UnsupportedError:
        return
    if mismatch > DERIVATIVE_MISMATCH:  # NaN passes: left to the checks
        raise UnsupportedError(
            f"the model's backward is not its forward's derivative: on test input 0 at step {step}, J = ∂f/∂θ by "
            f"reverse mode (which the per-sample and per-row Jacobians use) differs from J by forward mode by "
            f"{mismatch:.1e} of the products. A custom torch.autograd.Function whose backward is not its forward's "
            "derivative (a gradient-reversal layer) or a backward hook that changes gradients does this; the "
            "decomposition needs the true ∂f/∂θ. Fix: explain the architecture without it (explain takes every "
            "parameter value from the history; a gradient-reversal layer is the identity in forward), or keep no "
            "train dim (and parameter_scores=False), which takes J by forward mode alone")


def by_directions(req: Request) -> bool:
    """Whether a pass needs G_s only along a few vectors, by forward mode (see add_directions):
    the update convention without a train dim or parameter-wise scores."""
    return req.convention == "update" and not req.keeps("train") and not req.parameter_scores


def pass_bytes(req: Request, n_test: int, n_train: int, batch_rows: int) -> int:
    """Estimated peak bytes of one pass over n_test inputs and n_train training samples, with
    backward passes over at most batch_rows samples of a recorded batch."""
    size = torch.finfo(req.flat.dtype).bits // 8
    d = req.flat.layout.dim
    rows_full = n_test * req.n_outputs
    rows, n_bins, n_comp, train = kept_sizes(req, n_test, n_train)
    search = req.path.search_reserve(req.inputs, n_test)
    act = req.activations
    step_vectors = 10 * d  # the step's parameter-sized vectors: θ, Δθ, gradient, updates, optimizer state
    if by_directions(req):
        tangents = 2 * n_comp + 2
        elements = (
            tangents * d  # the tangents: update and weight decay per kept component, two totals
            + step_vectors
            + req.forward_mode.elements(n_test, tangents)  # the forward-mode pass
            + rows_full * tangents * 2  # φ·v on every row, and its kept sum
            + n_bins * n_comp * rows * 2  # the cube's accumulators (attribution, regularization)
            + _batch_backward_elements(req, batch_rows)  # the batch gradient of the modelled update
        )
        return int(elements * size) + search
    # the backward walk carries effects on the rows (the gradient convention's one K, the update
    # convention's one per step bin); the forward walk a per-sample momentum buffer
    effects = 0
    if req.convention == "gradient":
        effects = rows
    elif walks_backwards(req, rows, train):
        effects = n_bins * rows
    elements = (
        step_vectors
        + rows_full * d * 4  # φ / G, its scaled copies, the carried effect on all rows
        + (effects or train) * d * 2  # the carried effects / momentum buffer, and what is booked this step
        + _sample_pass_elements(req, effects, n_comp, train, batch_rows,
                                req.gradient_steps if not effects or contracts_sample_gradients(req, rows) else 1)
        + ((rows_full + rows) * d if req.parameter_scores else 0)
        + n_bins * n_comp * rows * train  # the cube's accumulator
        # a node's Jacobians and their flat copy (or a kinked pass's rows and gradients), on at
        # most the rows the path integral's max_elements allows at once
        + min(req.path.max_elements, rows_full * d) * 2
        # the reverse pass's saved activations, and their cotangents for every output
        + n_test * 2 * (act.total + req.n_outputs * act.largest)
    )
    return int(elements * size) + search


def _sample_pass_elements(req: Request, effects: int, n_comp: int, train: int, batch_rows: int, steps: int = 1) -> int:
    """Peak elements of a step's pass over its batch: the per-sample gradients of the chunk's
    samples and their weighted copies, and the activations a backward pass over a part of
    batch_rows samples saves (measured: 1.25-1.4x the forward's elements per sample on
    ResNet9); for a backward walk with few carried effects (sample_effects' forward mode), the
    primal and each effect's tangents through a part's samples, taken as 3 of the largest
    activation each (measured: a backward walk with 10 effects over batches of 256 images of
    ResNet9 width 4 peaked 173 MiB above where it started; this function counts 188 MiB of the
    196 planned), and the batch gradients of req.gradient_steps steps that the update check before
    such a walk takes by one call. `steps`: the steps whose per-sample gradients one call takes
    (ChunkPass._with_gradients)."""
    batch = req.history.max_batch()
    samples = min(batch, train) if req.keeps("train") else 0
    d = req.flat.layout.dim
    backward_pass = _batch_backward_elements(req, batch_rows)
    elements = steps * (samples * d * 3 + backward_pass)
    tangents = effects * n_comp
    if samples and tangents and forward_mode_pays(req.activations, d, tangents, batch):
        pushed = (tangents + 1) * min(samples, batch_rows) * req.activations.largest * 3
        elements = max(elements, pushed + backward_pass, req.gradient_steps * (backward_pass + d))
    return elements


def _batch_backward_elements(req: Request, batch_rows: int) -> int:
    """What a backward pass over batch_rows samples of a recorded batch saves (see
    _sample_pass_elements)."""
    return min(batch_rows, req.history.max_batch()) * req.activations.total * 3 // 2


def plan_chunks(req: Request, budget: float | None) -> None:
    """Fill in test_chunk / train_chunk / batch_chunk left unset: as large as the budget allows;
    a chunk asked for is costed and run at most as large as the data (a pass never holds more)."""
    if budget is not None and not (is_number(budget) and budget > 0):
        raise InputError(f"memory_budget={budget!r} must be a number of bytes > 0 (None: no limit)")
    given, budget = budget, within_free_memory(budget, req.flat.device)
    n_test, n_train, batch = len(req.inputs), len(req.train_index), req.history.max_batch()
    req.test_chunk, req.train_chunk = min(req.test_chunk, n_test), min(req.train_chunk, n_train)
    req.batch_chunk = min(req.batch_chunk, batch)
    test, train, rows = req.test_chunk or n_test, req.train_chunk or n_train, req.batch_chunk or batch
    # steps' gradients taken together cost a group's memory for speed alone: not where a batch is
    # split (batch_chunk asked for), and the first thing a budget gives up
    req.gradient_steps = GRADIENT_STEPS if req.keeps("train") and rows >= batch else 1
    req.forward_for_speed = True
    if budget is None:
        req.test_chunk, req.train_chunk, req.batch_chunk = test, train, rows
        return
    if pass_bytes(req, test, train, rows) > budget:  # a forward walk taken for speed must fit whole
        req.forward_for_speed = False
    if pass_bytes(req, test, train, rows) > budget:  # then the steps' gradients are taken one at a time
        req.gradient_steps = 1
    while (needed := pass_bytes(req, test, train, rows)) > budget:
        can_test = not req.test_chunk and test > 1
        can_train = not req.train_chunk and train > 1
        can_split_batch = not req.batch_chunk and rows > 1
        # smaller parts of a batch cost more, smaller passes over it but no recomputation (a
        # smaller test or train chunk streams the history again), so they go first while
        # halving them saves a quarter of the pass
        if can_split_batch and (4 * (needed - pass_bytes(req, test, train, (rows + 1) // 2)) >= needed
                                or not (can_test or can_train)):
            rows = (rows + 1) // 2
        elif can_test and (test * req.n_outputs >= train or not can_train):
            test = (test + 1) // 2
        elif can_train:
            train = (train + 1) // 2
        else:
            break
    # a kink search left (almost) nothing beyond its reserve takes its rows one at a time (measured:
    # 103 s of search where 11 MiB beyond the pass took 1.1 s): fewer inputs a pass leave it as much again
    while (req.path.searches and not req.test_chunk and test > 1
           and needed <= budget < needed + req.path.search_reserve(req.inputs, test)):
        test = (test + 1) // 2
        needed = pass_bytes(req, test, train, rows)
    # the kink search takes what the pass leaves of the budget, beyond its reserve, less what a first
    # train chunk keeps of its pieces for the later ones; a budget beyond any machine's memory (inf
    # too) leaves both unbounded, where int() would overflow
    spare = budget - needed
    if spare >= 2**62:
        req.pieces_bytes = req.path.search_bytes = None
    else:
        req.pieces_bytes = max(0, min(int(spare) // 4, kept_pieces_bytes(req, test, train)))
        req.path.search_bytes = max(0, int(spare) - req.pieces_bytes)
    if needed > budget:
        asked = [f"{name}=None" for name, value in (("test_chunk", req.test_chunk), ("train_chunk", req.train_chunk),
                                                    ("batch_chunk", req.batch_chunk)) if value]
        # only the changes that shrink this request's pass
        fixes = [fix for fix, shrinks in (
            (f"leave the chunks to the planner ({', '.join(asked)})", asked),
            ("explain fewer outputs (outputs='true')", req.n_outputs > 1),
            ("sum over steps or bin them (step_bins)", req.keeps("step")),
            ("use convention='gradient' (no per-sample momentum buffer)",
             req.convention == "update" and req.keeps("train")),
            ("dtype=torch.float32", req.flat.dtype == torch.float64)) if shrinks]
        # the smallest budget these chunks fit, as one can type it (the pass's bytes alone read
        # 'about 299 KiB' beside a refused budget of 299 KiB)
        least = rounded_up(needed)
        least = f"memory_budget={least:.3g} ({format_bytes(least)})"
        fixes.append(f"a budget of at least {least}" if budget == given
                     else f"more free memory on {req.flat.device} (at least {least})")
        raise InputError(
            f"one pass needs about {format_bytes(needed)}, over memory_budget={budget!r} bytes "
            f"({format_bytes(budget)}), even with test_chunk={test}, train_chunk={train}, batch_chunk={rows}. Fix: "
            + ", ".join(fixes[:-1]) + (", or " if len(fixes) > 1 else "") + fixes[-1])
    req.test_chunk, req.train_chunk, req.batch_chunk = test, train, rows


def kept_pieces_bytes(req: Request, n_test: int, n_train: int) -> int:
    """The most bytes of kink-search pieces a pass over n_test inputs keeps for the later train
    chunks (KeptPieces): those of every explained step, when the training samples are split into
    chunks of n_train."""
    if not req.keeps("train") or n_train >= len(req.train_index):  # one train chunk: nothing to keep
        return 0
    start, stop = req.step_range
    return (stop - start) * req.path.pieces_bytes(req.inputs, n_test)


def within_free_memory(budget: float | None, device: torch.device) -> float | None:
    """memory_budget, at most what a CUDA device has free (beside the blocks this process's
    allocator holds unused): chunks planned for more stop out of memory once the compute has
    started. Capped with a warning, not refused: the default budget, or one set for another
    machine, is no mistake of the caller's. Other devices are not asked (the CPU's budget is the
    caller's to size). (No GPU ran this: tested with torch.cuda's functions faked on the CPU.)"""
    if budget is None or device.type != "cuda":
        return budget
    free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if budget <= free:
        return budget
    warnings.warn(f"memory_budget={budget:.3g} ({format_bytes(budget)}) is more than {device} has free "
                  f"({format_bytes(free)}): the chunks are planned for {format_bytes(free)}, so that a pass fits. "
                  "To plan for less, pass a smaller memory_budget", stacklevel=4)
    return free


def rounded_up(x: float) -> float:
    """x > 0 rounded up to three significant digits (a budget one can type that still holds x)."""
    unit = 10.0 ** (math.floor(math.log10(x)) - 2)
    return math.ceil(x / unit) * unit


def format_bytes(n_bytes: float) -> str:
    """A byte count in the largest unit that keeps it ≥ 1, to three significant digits."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.3g} {unit}"
    return f"{n_bytes:.0f} bytes"


# --------------------------------------------------------------------------- passes


def theta_at(req: Request, s: int) -> torch.Tensor:
    """θ_s, flat, on the compute device in the request's dtype."""
    return req.flat.layout.flatten(req.history.params(s)).to(req.flat.device, req.flat.dtype)


def _outputs_at(req: Request, s: int) -> torch.Tensor:
    """The explained outputs f(x; θ_s) for every test input: [T, O]."""
    out = req.flat.outputs(theta_at(req, s), req.inputs, req.target)
    if req.select is not None:
        out = out.gather(1, req.select.to(out.device))
    return out.cpu()


def _run_chunks(req: Request, add: Callable[[slice, slice, dict], None]) -> None:
    """Run one pass per (test chunk, train chunk) pair, handing each pass's results to `add` as it
    ends (MergedParts.add), so that no name holds them once added."""
    n_test, n_train = len(req.inputs), len(req.train_index)
    test_chunks = [slice(i, min(i + req.test_chunk, n_test)) for i in range(0, n_test, req.test_chunk)]
    train_chunks = [slice(i, min(i + req.train_chunk, n_train)) for i in range(0, n_train, req.train_chunk)]
    if not req.keeps("train"):
        train_chunks = [slice(0, n_train)]
    n_passes = len(test_chunks) * len(train_chunks)
    # each pass's bar covers its steps: over many passes, a bar of the passes shows the whole call's pace
    passes = tqdm(total=n_passes, desc="explain passes", unit="pass", disable=not req.progress or n_passes == 1)
    for i, tests in enumerate(test_chunks):
        kept = kept_pieces(req, later_chunks=len(train_chunks) > 1)
        for j, trains in enumerate(train_chunks):
            label = f"explain {i * len(train_chunks) + j + 1}/{n_passes}"
            counted = replace(req.path.stats)
            # no name holds the pass: its device accumulators go before the next pass makes its own
            add(tests, trains, ChunkPass(req, tests, trains, first_train_chunk=(j == 0), kept=kept).run(label))
            passes.update()
            if j > 0:  # the first train chunk's segments: those it could not keep searched again, not counted again
                req.path.stats = counted
    passes.close()


def _prefetched(records: Iterable[StepRecord]) -> Iterator[StepRecord]:
    """Read the next step from disk while the current one is computed."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        iterator = iter(records)
        pending = pool.submit(next, iterator, None)
        while True:
            record = pending.result()
            if record is None:
                return
            pending = pool.submit(next, iterator, None)
            yield record


class KeptPieces:
    """What the kink search found on a test chunk's explained steps (search_steps' per-step
    pieces), kept by its first train chunk's pass for the later ones: the pieces depend on the
    step's segment, the test inputs and the target, not on the training samples. Steps are kept
    while their pieces fit within `limit` bytes (None: no limit); a later pass searches those
    left out again."""

    def __init__(self, limit: int | None):
        self.limit = limit
        self.by_step: dict[int, tuple] = {}
        self.bytes = 0

    def keep(self, step: int, pieces: tuple) -> None:
        """Keep search_steps' pieces of step, if they fit."""
        (owner, lo, hi), plain = pieces
        size = sum(t.nbytes for t in (owner, lo, hi, plain) if t is not None)
        if step in self.by_step or (self.limit is not None and self.bytes + size > self.limit):
            return
        # copies: a step's pieces are views of its window's tensors, which would all stay held
        self.by_step[step] = tuple(t.clone() for t in (owner, lo, hi)), None if plain is None else plain.clone()
        self.bytes += size

    def get(self, step: int) -> tuple | None:
        """The pieces kept for step (None: not kept)."""
        return self.by_step.get(step)


def kept_pieces(req: Request, later_chunks: bool) -> KeptPieces | None:
    """A test chunk's KeptPieces, where it has later train chunks and the plan leaves them bytes
    (None: nothing is kept)."""
    return KeptPieces(req.pieces_bytes) if later_chunks and req.pieces_bytes != 0 else None


# The most steps one mixed-mode call takes (ChunkPass.add_by_mixed_mode; fewer where their tangents
# and kernels would not fit in what the plan gives φ_s): its δ pass and each reverse term run once for
# all of them, so their fixed costs count once. Measured on the reference workload, 2 threads, with
# room for more: 4 and 8 steps a call equally fast, 16 and 50 slower (1.40-1.42 s against 1.26-1.29 s)
MIXED_BATCH_STEPS = 8
# The most steps whose per-sample gradients one call takes (ChunkPass._with_gradients; 1 where
# plan_chunks finds no room), in either walk: one vmap over the steps, whose fixed costs count
# once. Measured on the reference workload, 2 threads: 4 steps in 15 ms against 24-27 ms a step at a time
GRADIENT_STEPS = 4


@dataclass
class MixedStep:
    """A step waiting in a MixedBatch: what booking its kernel needs (add_by_mixed_mode)."""

    s: int
    theta: torch.Tensor
    delta: torch.Tensor
    pieces: tuple | None
    blocks: list[tuple[int, torch.Tensor | None]]  # the train columns' blocks of its tangents: (size, columns)


@dataclass
class MixedBatch:
    """Steps whose kernels one mixed-mode call computes, and their tangents [S, n, D] (room for
    up to S steps, written in place as each step joins)."""

    steps: list[MixedStep] = field(default_factory=list)
    tangents: torch.Tensor | None = None


class ChunkPass:
    """One stream over the history for a chunk of test inputs and of training samples. kept: the
    test chunk's KeptPieces, filled by its first train chunk's pass and taken by the later ones
    (None: one train chunk, nothing kept)."""

    def __init__(self, req: Request, tests: slice, trains: slice, first_train_chunk: bool,
                 kept: KeptPieces | None = None):
        self.req = req
        self.kept = kept
        flat = req.flat
        self.dev, self.dt = flat.device, flat.dtype
        self.x = flat.cast_inputs(req.inputs[tests])
        self.select = None if req.select is None else req.select[tests].to(self.dev)
        self.n_test = len(self.x)
        self.first_train_chunk = first_train_chunk
        self.reader = StepReader(req.history, flat, req.buffers_started)
        # training samples of this chunk, found by binary search in their sorted dataset indices
        # (a table indexed by dataset index would be as large as the largest, e.g. a hash)
        chunk_index = req.train_index[trains]
        self.n_train = len(chunk_index) if req.keeps("train") else 1
        self.chunk_ids, order = chunk_index.sort()
        self.chunk_columns = order if req.keeps("train") else torch.zeros_like(order)
        # rows of the contraction: test and output dims that are kept (the others are summed)
        self.rows_shape = (
            self.n_test if req.keeps("test") else 1,
            req.n_outputs if req.keeps("output") else 1,
        )
        n_rows, n_bins, n_comp, _ = kept_sizes(req, self.n_test, self.n_train)
        self.bin_of = np.searchsorted(req.step_edges, np.arange(req.history.n_steps), side="right") - 1
        self.attribution = torch.zeros(n_bins, n_comp, n_rows, self.n_train, dtype=self.dt, device=self.dev)
        self.regularization = torch.zeros(n_bins, n_comp, n_rows, dtype=self.dt, device=self.dev)
        # the share of the momentum from before the replay (not split by sample)
        self.carried = torch.zeros_like(self.regularization) if req.replay_start > 0 else None
        # Σ over everything but test and output: compared with f(θ_N) − f(θ_0)
        self.total = torch.zeros(self.n_test * req.n_outputs, dtype=self.dt, device=self.dev)
        # Σ_s φ_s·Δθ_s with the recorded updates: total misses it by what the modelled updates
        # miss (the update residual), the change misses it by the path integral's error
        self.path_change = torch.zeros_like(self.total)
        # docs/method.md §1 check 1 per step (NaN where not checked: outside the explained steps, or throughout)
        self.update_residual = np.full(req.history.n_steps, np.nan)
        self.update_rounding_floor = np.full(req.history.n_steps, np.nan)  # what the stored θ's rounding allows
        self.eps = rounding_eps(req.history, req.flat)
        # without a train dim or parameter-wise scores, G_s is needed only along a few vectors
        self.by_directions = by_directions(req)
        # without a train dim and with the update check left to verify_updates, no gradient is
        # needed: the recorded Δθ_s is the update, and the modelled weight decay splits it
        self.recorded_updates = not req.keeps("train") and not req.check_updates
        # the backward pass of the update convention carries one effect per kept step bin
        self.per_bin = req.convention == "update" and req.keeps("step")
        # the forward walk may contract φ_s by mixed mode (add_by_mixed_mode) where it books per training
        # sample (so the gradients are taken) and no scores per parameter, which need φ_s itself
        self.mixed_allowed = req.keeps("train") and not req.parameter_scores
        self.mixed_batch = MixedBatch()  # steps booked by mixed mode, taken a batch at a time
        self.all_columns = torch.arange(self.n_train, device=self.dev)  # a batch of the whole chunk, in order
        if req.parameter_scores:
            d = flat.layout.dim
            # |·| is taken per (test, output) row, then summed over the dims that are not kept
            self.score_sum = torch.zeros(self.n_test * req.n_outputs, d, dtype=self.dt, device=self.dev)
            self.score_stepwise_abs = torch.zeros(n_rows, d, dtype=self.dt, device=self.dev)

    # ----------------------------------------------------------------- per-step pieces

    def path_jacobian(self, theta: torch.Tensor, delta: torch.Tensor, pieces) -> torch.Tensor:
        """φ_s = ∫₀¹ J(θ_s + tΔθ_s) dt for all test rows: [T·O, D]; pieces: as _segments gives them."""
        phi = self.req.path.jacobian(theta, delta, self.x, self.select, self.req.target, self.req.n_outputs, pieces)
        return phi.reshape(-1, phi.shape[-1])

    def reduce_rows(self, full: torch.Tensor) -> torch.Tensor:
        """[T·O, D] -> [rows, D], summing the test / output dims that are not kept."""
        if self.req.keeps("test") and self.req.keeps("output"):
            return full
        t, o = self.n_test, self.req.n_outputs
        view = full.view(t, o, -1)
        if not self.req.keeps("test"):
            view = view.sum(0, keepdim=True)
        if not self.req.keeps("output"):
            view = view.sum(1, keepdim=True)
        return view.reshape(-1, full.shape[-1])

    def step_batch(self, rec: StepRecord):
        """A step's sample weights, the chunk column of each sample (−1: not in this chunk), and
        its inputs and targets on the compute device."""
        weights, x, y = self.reader.batch(rec)
        return weights, self.columns(rec.indices), x, y

    def columns(self, indices: torch.Tensor) -> torch.Tensor:
        """The chunk column of each dataset index (−1: not in this chunk)."""
        at = torch.searchsorted(self.chunk_ids, indices).clamp_max(len(self.chunk_ids) - 1)
        return self.chunk_columns[at].masked_fill(self.chunk_ids[at] != indices, -1)

    def batch_gradients(self, rec: StepRecord, theta: torch.Tensor, batch: tuple | None = None):
        """Weighted per-sample gradients w g of the chunk's rows [B_c, D], their columns, and
        the whole batch's gradient ḡ (for the update check); `batch`: the step's step_batch, if
        read already."""
        req = self.req
        weights, columns, x, y = self.step_batch(rec) if batch is None else batch
        in_chunk = columns >= 0
        if req.keeps("train"):
            rows = in_chunk.to(self.dev)
            if bool(rows.any()):
                wg = req.flat.per_sample_gradients(theta, x[rows], y[rows], req.loss, req.batch_chunk,
                                                   weights[rows])
            else:  # none of this batch's samples is in the chunk
                wg = torch.zeros(0, req.flat.layout.dim, dtype=self.dt, device=self.dev)
            full = wg.sum(0) if bool(in_chunk.all()) else None
        else:
            full = req.flat.batch_gradient(theta, x, y, weights, req.loss, req.batch_chunk)
            wg = full[None]
            columns = torch.zeros(1, dtype=torch.long, device="cpu")  # as self.columns gives them
            in_chunk = torch.ones(1, dtype=torch.bool, device="cpu")
        if full is None and self.first_train_chunk:
            full = req.flat.batch_gradient(theta, x, y, weights, req.loss, req.batch_chunk)
        return wg, columns[in_chunk].to(self.dev), full

    @phase(CONTRACTION)
    def contract(self, left: torch.Tensor, right: torch.Tensor) -> list[torch.Tensor]:
        """left [rows, D] · right [n, D]ᵀ per kept component (or over all of D): [comp][rows, n]."""
        if not self.req.keeps("component"):
            return [left @ right.T]
        return [left[:, sl] @ right[:, sl].T for sl in self.req.component_slices]

    def add(self, target: torch.Tensor, s: int, blocks: list[torch.Tensor], columns=None) -> None:
        b = self.bin_of[s] if self.req.keeps("step") else 0
        for p, block in enumerate(blocks):
            if columns is None:
                target[b, p] += block.reshape(target[b, p].shape)
            else:
                target[b, p].index_add_(1, columns, block)

    def record_update_check(self, s: int, k: StepCoefficients, modelled: torch.Tensor, theta: torch.Tensor,
                            delta: torch.Tensor) -> None:
        """docs/method.md §1 check 1: the modelled update −η(Σ_k u + r) against the recorded Δθ, and the
        miss the rounding of the stored θ allows (left NaN: not checked: check_updates=False)."""
        if not self.req.check_updates:
            return
        self.update_residual[s], self.update_rounding_floor[s] = update_check(k, theta, delta, modelled, self.eps)
        if self.req.stop_at_missed_update:
            stop_at_missed_update(s, self.update_residual[s], self.update_rounding_floor[s], self.req.loss_note)

    def record_scores(self, full: torch.Tensor, share: torch.Tensor) -> None:
        """Parameter-wise scores: accumulate Σ_k ψ(s, j, k, x) = G_s[:, j] · (Σ_k u_{s,k})[j]. Called
        by a test chunk's first train chunk only: the whole batch's update counts once per step."""
        if self.req.parameter_scores:
            psi = full * share
            self.score_sum += psi
            self.score_stepwise_abs += self.reduce_rows(psi.abs())

    # ----------------------------------------------------------------- the passes

    def momentum_before_replay(self) -> torch.Tensor | None:
        """m_{T−1}, the momentum buffer the replay from step T starts with, solved from the
        recorded update T−1 (None when the replay starts at step 0)."""
        first = self.req.replay_start
        if first == 0:
            return None
        rec = next(self.req.history.steps(first - 1, first))
        k = self.reader.coefficients(rec)
        theta, theta_next = self.reader.thetas(rec)
        direct = None
        if bool(((k.e != 0) & (k.c != 0)).any()):  # nesterov: the update holds d_{T−1} too
            weights, _, x, y = self.step_batch(rec)
            direct = self.req.flat.batch_gradient(theta, x, y, weights, self.req.loss, self.req.batch_chunk)
            direct += k.coupled_decay * theta
        return momentum_from_update(k, theta, theta_next - theta, direct)

    def run(self, label: str) -> dict:
        history = self.req.history
        first, stop = self.req.replay_start, self.req.step_range[1]
        backward = walks_backwards(self.req, self.attribution.shape[2], self.n_train)
        records = history.steps(first, stop, reverse=backward)
        # closed here, also when a step raises: its reading thread is joined now, from this thread
        # (left to the garbage collector, it may be finalised on that thread, which cannot join itself)
        with closing(_prefetched(records)) as prefetched:
            steps = tqdm(self._segments(prefetched), total=stop - first, desc=label, disable=not self.req.progress,
                         leave=False)
            if backward:
                self._backward(steps)
            else:
                self._forward(steps)
        return self._result()

    def _segments(self, records: Iterable[StepRecord]) -> Iterator[tuple]:
        """(record, θ_s, Δθ_s, pieces) per step. The explained steps' segments are searched
        for kinks a window of steps at once (PathIntegral.window), by one search whose passes
        each take rows of all of them (search_steps); pieces None where no kinks are searched.
        A test chunk's first train chunk keeps what it finds (self.kept) and a later one takes
        it, searching only the steps left out."""
        path, (start, stop) = self.req.path, self.req.step_range
        records = iter(records)
        first = next(records, None)
        if first is None:
            return
        # a window holds its steps' records and θ_s, θ_{s+1}
        size = path.window(self.x, stop - start, first.nbytes + 2 * self.req.flat.layout.dim * self.dt.itemsize)
        records = chain([first], records)
        while window := list(islice(records, size)):
            segments = [(theta, theta_next - theta) for theta, theta_next in map(self.reader.thetas, window)]
            pieces = [None] * len(window)
            explained = [j for j, rec in enumerate(window) if rec.step >= start]
            if self.kept is not None and not self.first_train_chunk:
                pieces = [self.kept.get(rec.step) for rec in window]
                explained = [j for j in explained if pieces[j] is None]
            if explained:
                found = path.search_window(torch.stack([segments[j][0] for j in explained]),
                                           torch.stack([segments[j][1] for j in explained]), self.x, self.req.target)
                for j, step_pieces in zip(explained, found):
                    pieces[j] = step_pieces
                    if self.kept is not None and self.first_train_chunk and step_pieces is not None:
                        self.kept.keep(window[j].step, step_pieces)
            for rec, (theta, delta), step_pieces in zip(window, segments, pieces):
                yield rec, theta, delta, step_pieces

    def _forward(self, records: Iterable[tuple]) -> None:
        """Update-step convention: carry per-sample momentum forwards."""
        buffer = None  # m_{s,k} for the chunk's samples, [n_train, D]
        decay = AggregateUpdate()  # r_s: the weight decay's share of the update, its coupled part with its own momentum
        aggregate = AggregateUpdate()
        carried = self.momentum_before_replay()  # decays through the steps, never split
        aggregate.momentum = None if carried is None else carried.clone()
        start = self.req.step_range[0]
        for rec, theta, delta, pieces, gradients in self._with_gradients(records, not self.recorded_updates):
            s = rec.step
            k = self.reader.coefficients(rec)
            recorded = recorded_update(k, delta)
            if self.recorded_updates:  # no gradients: the recorded update stands for the modelled one
                modelled = recorded
            else:
                wg, columns, g_full = gradients
                uses_buffer = bool((k.b != 0).any()) or bool((k.a != 0).any())  # not plain SGD
                if uses_buffer:
                    if buffer is None:
                        buffer = torch.zeros(self.n_train, len(theta), dtype=self.dt, device=self.dev)
                    buffer.mul_(k.a)
                    if len(columns) == len(buffer) and bool((columns == self.all_columns).all()):
                        buffer.addcmul_(wg, k.b)  # the whole chunk in order (full batch): no [B, D] temporary
                    else:
                        buffer.index_add_(0, columns, wg * k.b)
                modelled = aggregate.step(k, g_full, theta) if self.first_train_chunk else None
            r = decay.step(k, None, theta)
            if carried is not None:
                carried.mul_(k.a)
            if s < start:  # before the explained range: only replay the momentum
                continue
            if self.by_directions:
                self.add_directions(s, theta, delta, -k.eta * (modelled - r), -k.eta * r, -k.eta * modelled,
                                    None if self.recorded_updates else -k.eta * recorded, pieces)
                self.record_update_check(s, k, modelled, theta, delta)
                continue

            if self.mixed_allowed and self.add_by_mixed_mode(s, k, theta, delta, pieces, buffer if uses_buffer else None,
                                                             wg, columns, r, carried, modelled, recorded):
                if self.first_train_chunk:
                    self.record_update_check(s, k, modelled, theta, delta)
                continue
            full = self.path_jacobian(theta, delta, pieces).mul_(-k.eta)  # G_s, [T·O, D]
            rows = self.reduce_rows(full)
            if self.recorded_updates:  # one train column: the whole batch's share of the update
                self.add(self.attribution, s, self.contract(rows, (modelled - r)[None]))
            else:
                if uses_buffer:
                    self.add(self.attribution, s, self.contract(rows * (k.precond * k.c), buffer))
                if bool((k.e != 0).any()):  # nesterov / plain SGD: the current gradient acts directly
                    direct = rows * (k.precond * k.e)
                    self.add(self.attribution, s, self.contract(direct, wg), columns)
            if self.first_train_chunk:
                self.add(self.regularization, s, self.contract(rows, r[None]))
                if carried is not None:
                    self.add(self.carried, s, self.contract(rows * (k.precond * k.c), carried[None]))
                step_total = full @ modelled
                self.total += step_total
                self.path_change += step_total if self.recorded_updates else full @ recorded
                self.record_scores(full, modelled - r)
                self.record_update_check(s, k, modelled, theta, delta)
        self.book_mixed_batch()

    def _with_gradients(self, records: Iterable[tuple], needed: bool) -> Iterator[tuple]:
        """The walk's steps, each with its batch_gradients (None where not `needed`: the forward
        walk's recorded updates standing for the modelled ones, a backward walk's effects pushed
        through the batch by forward mode), taken req.gradient_steps steps at a time."""
        if not needed:
            for item in records:
                yield *item, None
            return
        records = iter(records)
        while group := list(islice(records, self.req.gradient_steps)):
            yield from self._group_gradients(group)

    def _group_gradients(self, group: list[tuple]) -> Iterator[tuple]:
        """Each step of the group with its batch_gradients: by one call over the steps where
        every batch lies wholly in this train chunk and has the same shape, step by step
        otherwise (groups of more than one step come only where training samples are kept:
        plan_chunks)."""
        batches = [self.step_batch(rec) for rec, *_ in group]
        if len(group) < 2 or len({(x.shape, y.shape) for _, _, x, y in batches}) > 1 \
                or not all(bool((columns >= 0).all()) for _, columns, _, _ in batches):
            for item, batch in zip(group, batches):
                yield *item, self.batch_gradients(item[0], item[1], batch)
            return
        weights, columns, x, y = (list(parts) for parts in zip(*batches))
        wg = self.req.flat.per_sample_gradients(torch.stack([theta for _, theta, *_ in group]), torch.stack(x),
                                                torch.stack(y), self.req.loss, self.req.batch_chunk,
                                                torch.stack(weights))
        for item, step_wg, step_columns in zip(group, wg, columns):
            yield *item, (step_wg, step_columns.to(self.dev), step_wg.sum(0))

    def add_by_mixed_mode(self, s: int, k: StepCoefficients, theta, delta, pieces, buffer: torch.Tensor | None,
                          wg: torch.Tensor, columns: torch.Tensor, r: torch.Tensor, carried: torch.Tensor | None,
                          modelled: torch.Tensor, recorded: torch.Tensor) -> bool:
        """Book step s of the forward walk as the Jacobian route below does, with φ_s contracted by
        mixed mode (PathIntegral.kernel) along the same vectors, each scaled as that route scales
        its rows: the momentum buffer, the current gradients (nesterov / plain SGD), r_s, the
        carried momentum, the modelled and the recorded update. The step joins a batch of steps
        (MixedBatch) whose kernels one call computes, so their passes' fixed costs count once; the
        batch is booked when full and at the end of the walk (book_mixed_batch). False (nothing
        booked) where the model's ops do not allow mixed mode or its estimate says the Jacobian
        route costs less (explaind.mixed)."""
        req, path = self.req, self.req.path
        calls = path.mixed.calls(theta, self.x)
        direct, first = bool((k.e != 0).any()), self.first_train_chunk
        n_extra = (3 + (carried is not None)) if first else 0  # r, carried, modelled, recorded
        n = (0 if buffer is None else len(buffer)) + (len(wg) if direct else 0) + n_extra
        # the tangents [n, D] take the place that plan_chunks gives φ_s and its scaled copies (4·T·O·D)
        if calls is None or n > 4 * len(self.total) or \
                not path.mixed.pays(calls, path.rows(self.n_test, pieces), self.n_test, req.n_outputs, n,
                                    self.mixed_batch_steps(n, len(theta))) or \
                not path.mixed.exact(calls, theta, self.x, req.target):
            return False
        batch = self.mixed_batch
        if batch.tangents is not None and (batch.tangents.shape[1] != n or len(batch.steps) == len(batch.tangents)):
            self.book_mixed_batch()
        if batch.tangents is None or batch.tangents.shape[1] != n:
            batch.tangents = theta.new_empty(self.mixed_batch_steps(n, len(theta)), n, len(theta))
        tangents = batch.tangents[len(batch.steps)]
        scale = -k.eta
        # the scaled vectors written straight into the tangents: no [n, D] copy per block and step
        at, blocks = 0, []
        for block, coefficient, block_columns in ([] if buffer is None else [(buffer, k.c, None)]) + \
                ([(wg, k.e, columns)] if direct else []):
            torch.mul(block, scale * k.precond * coefficient, out=tangents[at:at + len(block)])
            blocks.append((len(block), block_columns))
            at += len(block)
        if first:
            extra = [r, *([] if carried is None else [carried * (k.precond * k.c)]), modelled, recorded]
            torch.mul(torch.stack(extra), scale, out=tangents[at:])
        batch.steps.append(MixedStep(s, theta, delta, pieces, blocks))
        return True

    def mixed_batch_steps(self, n: int, dim: int) -> int:
        """The steps a mixed-mode batch of n tangents takes: S steps' tangents [S, n, D] and kernels
        [S, parts, T·O, n] within the place plan_chunks gives φ_s and its scaled copies (4·T·O·D),
        one step at least, MIXED_BATCH_STEPS at most."""
        rows = len(self.total)
        parts = len(self.req.component_slices) if self.req.keeps("component") else 1
        return min(max(4 * rows * dim // (n * (dim + parts * rows)), 1), MIXED_BATCH_STEPS)

    def book_mixed_batch(self) -> None:
        """Compute the kernels of the steps waiting in the mixed-mode batch by one call and book
        each as add_by_mixed_mode describes; the batch is then empty."""
        batch, req = self.mixed_batch, self.req
        if not batch.steps:
            return
        steps, tangents = batch.steps, batch.tangents[:len(batch.steps)]
        batch.steps = []
        theta = torch.stack([step.theta for step in steps])
        parts = req.component_slices if req.keeps("component") else [slice(0, theta.shape[1])]
        kernels = req.path.kernel(theta, torch.stack([step.delta for step in steps]), self.x, self.select, req.target,
                                  req.n_outputs, tangents, parts, req.path.mixed.calls(theta[0], self.x),
                                  [step.pieces for step in steps])  # [S, parts, T, O, V]
        for step, kernel in zip(steps, kernels):
            full = kernel.flatten(1, 2)  # [parts, T·O, V]
            rows = torch.stack([self.reduce_rows(part) for part in full])
            at = 0
            for size, block_columns in step.blocks:
                self.add(self.attribution, step.s, list(rows[:, :, at:at + size]), block_columns)
                at += size
            if self.first_train_chunk:
                self.add(self.regularization, step.s, list(rows[:, :, at:at + 1]))
                if self.carried is not None:  # a replay window: the tangents hold the carried momentum after r_s
                    self.add(self.carried, step.s, list(rows[:, :, at + 1:at + 2]))
                totals = full[:, :, -2:].sum(0)
                self.total += totals[:, 0]
                self.path_change += totals[:, 1]

    def add_directions(self, s: int, theta, delta, update: torch.Tensor, decay: torch.Tensor,
                       modelled: torch.Tensor, recorded: torch.Tensor | None, pieces) -> None:
        """Book step s when no training sample is kept: G_s is only ever contracted with the
        (−η-scaled) update, its weight-decay part, each restricted to a kept component, and the
        modelled and recorded totals (None: the recorded update stands for the modelled one, one
        tangent serves both), so forward mode gives those few numbers per output without G_s."""
        slices = self.req.component_slices if self.req.keeps("component") else [slice(None)]
        n = len(slices)
        totals = [modelled] if recorded is None else [modelled, recorded]
        tangents = update.new_zeros(2 * n + len(totals), len(update))
        for p, sl in enumerate(slices):
            tangents[p, sl] = update[sl]
            tangents[n + p, sl] = decay[sl]
        tangents[2 * n:] = torch.stack(totals)
        phi = self.req.path.directional(theta, delta, self.x, tangents, self.req.target, self.select, pieces)
        full = phi.reshape(-1, phi.shape[-1])  # [T·O, V]
        rows = self.reduce_rows(full)  # [rows, V]
        self.add(self.attribution, s, [rows[:, p, None] for p in range(n)])
        self.add(self.regularization, s, [rows[:, n + p] for p in range(n)])
        self.total += full[:, 2 * n]
        self.path_change += full[:, -1]

    def _backward(self, records: Iterable[tuple]) -> None:
        """Walk backwards carrying the effect of a gradient on the explained outputs (no
        per-sample buffer). A gradient computed at step s' moves the updates s ≥ s' through the
        momentum: K(s') = Σ_{s≥s'} (Π_{s'<r≤s} a_r) P_s c_s G_s. The gradient convention books
        the whole effect at s'. The update convention books each update step's part in that
        step's bin, so one K is carried per kept step bin (bins not yet reached are zero)."""
        req = self.req
        start = req.step_range[0]
        per_bin = self.per_bin
        momentum = self.momentum_before_replay() if self.first_train_chunk else None
        # the gradients of several steps are taken together where every step contracts them
        grouped = contracts_sample_gradients(req, kept_sizes(req, self.n_test, 0)[0])
        if self.first_train_chunk and req.check_updates:  # before the walk, which a missed update stops
            from .verify import update_residuals

            self.update_residual, self.update_rounding_floor = update_residuals(
                req.history, req.flat, req.loss, req.step_range, req.replay_start, momentum, req.batch_chunk,
                each=functools.partial(stop_at_missed_update, note=req.loss_note) if req.stop_at_missed_update else None,
                steps_at_once=req.gradient_steps)  # planned for either way of the walk (_sample_pass_elements)
        # Σ over bins for all T·O rows, for the total and the scores (first train chunk only);
        # when the carried rows are all rows (the test and output dims not kept are of one) and
        # unbinned, it is carried[0] itself
        all_rows = (req.keeps("test") or self.n_test == 1) and (req.keeps("output") or req.n_outputs == 1)
        separate_full = self.first_train_chunk and (per_bin or not all_rows)
        carried = None  # K per bin (or one), [bins, rows, D]
        carried_full = None
        a_next = None
        for rec, theta, delta, pieces, gradients in self._with_gradients(records, grouped):
            s = rec.step
            k = self.reader.coefficients(rec)
            if carried is not None:  # from the effect on step s + 1 on to step s
                carried.mul_(a_next)
                if separate_full:
                    carried_full.mul_(a_next)
            full = rows = None
            if s >= start:  # steps before the range only pass momentum on (update convention)
                full = self.path_jacobian(theta, delta, pieces).mul_(-k.eta)
                rows = self.reduce_rows(full)
                if self.first_train_chunk:
                    self.path_change += full @ recorded_update(k, delta)
                if carried is None:
                    carried = full.new_zeros(self.attribution.shape[0] if per_bin else 1, *rows.shape)
                    carried_full = torch.zeros_like(full) if separate_full else carried[0]
                carried[self.bin_of[s] if per_bin else 0].addcmul_(rows, k.precond * k.c)
                if separate_full:
                    carried_full.addcmul_(full, k.precond * k.c)
            # bins from here on (per_bin) or this step's bin: where the effect is booked
            first = self.bin_of[max(s, start)] if per_bin else 0
            effect = k.b * carried[first:]
            direct = rows is not None and bool((k.e != 0).any())  # nesterov / plain SGD
            if direct:
                effect[0].addcmul_(rows, k.precond * k.e)
            blocks, columns, g_full = self.sample_effects(rec, theta, effect, gradients, not separate_full)
            self.book(self.attribution, s, first, blocks, len(effect), columns)
            if self.first_train_chunk:
                if separate_full:
                    effect_full = k.b * carried_full
                    if direct:
                        effect_full.addcmul_(full, k.precond * k.e)
                else:  # the carried rows are all rows, unbinned: effect[0] is the same sum
                    effect_full = effect[0]
                decay = k.coupled_decay * theta
                decay_blocks = self.contract(effect.reshape(-1, effect.shape[-1]), decay[None])
                self.book(self.regularization, s, first, decay_blocks, len(effect))
                if g_full is None:  # the samples' dots along effect[0] (sample_effects), summed
                    self.total += sum(block.sum(1) for block in blocks) + effect_full @ decay
                else:
                    self.total += effect_full @ (g_full + decay)
                if full is not None:
                    self.add(self.regularization, s, self.contract(rows, (k.decoupled_decay * theta)[None]))
                    self.total += full @ (k.decoupled_decay * theta)
                self.record_scores(effect_full, g_full)
            a_next = k.a
        if momentum is not None:  # what the steps before the replay carried into the range
            first = self.bin_of[start] if per_bin else 0
            effect = a_next * carried[first:]
            self.book(self.carried, req.replay_start, first,
                      self.contract(effect.reshape(-1, effect.shape[-1]), momentum[None]), len(effect))
            self.total += (a_next * carried_full) @ momentum

    def sample_effects(self, rec: StepRecord, theta: torch.Tensor, effect: torch.Tensor, gradients: tuple | None,
                       full: bool):
        """effect [bins, rows, D] · w_k ∇ℓ_k for the chunk's training samples k of this step, per
        kept component ([comp][bins·rows, B_c]), their columns, and the batch gradient ḡ (first
        train chunk). A few effects are pushed through the batch by forward mode, one jvp each;
        many are contracted with the materialised per-sample gradients [B_c, D]: the step's
        batch_gradients where `gradients` brings them already (every step of the walk contracts).
        `full`: effect is one bin of all rows, whose product with ḡ, all the walk needs ḡ for
        without parameter scores, is the sum of the dots where forward mode takes every sample of
        the batch; ḡ is then None (a batch gradient took 3.7 ms a step of the reference
        Transformer, the jvps of 5 tangents 6.4 ms)."""
        req = self.req
        tangents = effect.reshape(-1, effect.shape[-1])
        n_comp = len(req.component_slices) if req.keeps("component") else 1
        if not req.keeps("train") or gradients is not None or \
                not forward_mode_pays(req.activations, req.flat.layout.dim, len(tangents) * n_comp, len(rec.indices)):
            wg, columns, g_full = self.batch_gradients(rec, theta) if gradients is None else gradients
            return self.contract(tangents, wg), columns, g_full
        weights, columns, x, y = self.step_batch(rec)
        in_chunk = (columns >= 0).to(self.dev)
        g_full = None
        if self.first_train_chunk and not (full and not req.parameter_scores and bool(in_chunk.all())):
            g_full = req.flat.batch_gradient(theta, x, y, weights, req.loss, req.batch_chunk)
        if req.keeps("component"):  # one tangent per component: the effect restricted to it
            masked = tangents.new_zeros(n_comp, *tangents.shape)
            for p, sl in enumerate(req.component_slices):
                masked[p, :, sl] = tangents[:, sl]
            tangents = masked.reshape(-1, tangents.shape[-1])
        if bool(in_chunk.any()):
            dots = req.flat.per_sample_directional(theta, x[in_chunk], y[in_chunk], req.loss, tangents,
                                                   req.batch_chunk)
            dots = dots * weights[in_chunk][None]
        else:  # none of this batch's samples is in the chunk
            dots = tangents.new_zeros(len(tangents), 0)
        # explicit sizes: a batch with no sample in the chunk gives 0 columns, which -1 cannot infer
        blocks = dots.view(n_comp, len(tangents) // n_comp, dots.shape[-1])
        return list(blocks), columns[in_chunk.cpu()].to(self.dev), g_full

    def book(self, target: torch.Tensor, s: int, first: int, blocks: list[torch.Tensor], n_bins: int,
             columns: torch.Tensor | None = None) -> None:
        """Book the backward pass's blocks [comp][bins·rows, n]: per-bin effects (update
        convention) go to bins first, first + 1, ...; a single effect to the bin of step s."""
        if not self.per_bin:
            self.add(target, s, blocks, columns)
            return
        for p, block in enumerate(blocks):
            block = block.view(n_bins, len(block) // n_bins, block.shape[-1])  # n may be 0
            if columns is None:
                target[first:first + n_bins, p] += block.reshape(target[first:first + n_bins, p].shape)
            else:
                target[first:first + n_bins, p].index_add_(2, columns, block)

    def _result(self) -> dict:
        out = {
            "attribution": self.attribution.cpu(),
            "regularization": self.regularization.cpu(),
            "rows_shape": self.rows_shape,
        }
        if self.carried is not None:
            out["carried"] = self.carried.cpu()
        if self.first_train_chunk:
            out["total"] = self.total.view(self.n_test, self.req.n_outputs).cpu()
            out["path_change"] = self.path_change.view(self.n_test, self.req.n_outputs).cpu()
            out["update_residual"] = self.update_residual
            out["update_rounding_floor"] = self.update_rounding_floor
            if self.req.parameter_scores:
                out["parameter_score"] = self.reduce_rows(self.score_sum.abs()).cpu()
                out["parameter_score_signed"] = self.reduce_rows(self.score_sum).cpu()
                out["parameter_score_stepwise_abs"] = self.score_stepwise_abs.cpu()
        return out


def recorded_update(k: StepCoefficients, delta: torch.Tensor) -> torch.Tensor:
    """−Δθ_s/η_s: the recorded update in the units of the modelled Σ_k u_{s,k} + r_s (0 where
    η_s is 0)."""
    return torch.where(k.eta != 0, -delta / k.eta, torch.zeros_like(delta))


# how a residual error ends: where the cube it refused is (the command line words its own ending)
CUBE_KEPT = " The cube computed is this error's .cube"
_ANYWAY = " (except ReconstructionError as error: error.cube); tolerance=None returns it without raising."

# explain(tolerance=...) stops at the first step whose recorded update misses the modelled one by more
# than this share of the update and this many times what rounding allows: so far beyond rounding, the
# loop did what the history does not describe, and a long run need not be explained to its end first
UPDATE_STOP_SHARE, UPDATE_STOP_FLOORS = 1e-3, 100


def stop_at_missed_update(s: int, residual: float, floor: float, note: str = "") -> None:
    """Raise ReconstructionError if step s's update residual is far beyond its rounding floor;
    `note` adds what the request knows of a likely cause (another_loss_note)."""
    if not residual > max(UPDATE_STOP_SHARE, UPDATE_STOP_FLOORS * floor):
        return
    raise ReconstructionError(
        f"step {s}'s update residual is {residual:.2e}: its recorded update misses the modelled optimizer's by "
        f"that share of the step's largest update (in gradient units), where the rounding of the stored parameters "
        f"allows {floor:.0e}. The usual causes: {UPDATE_MISS_CAUSES}.{note} explain stops at the first step so far off, "
        "before the rest of the run is computed; explaind.verify_updates(history, model) lists every step's "
        "residual without computing attributions, and tolerance=None computes the whole cube anyway (each step's "
        "update_residual in it)")


def check_residual(cube: xr.Dataset, tolerance: float | None) -> None:
    """Raise ReconstructionError if the cube misses more than `tolerance` of the largest output
    change, saying whether the recorded updates or the path integral miss and what to change."""
    relative = float(cube.attrs["relative_residual"])
    if tolerance is None or relative <= tolerance:
        return
    change = float(cube.attrs["max_abs_change"])
    if change == 0 and np.isfinite(float(cube.attrs["max_abs_residual"])):
        raise ReconstructionError(
            "the explained outputs end where they started (their largest change is 0), yet the decomposition "
            f"adds up to a change of {float(cube.attrs['max_abs_residual']):.3g}: no share of no change is within "
            "tolerance. Fix: explain steps over which the outputs move, or pass tolerance=None and read "
            f"max_abs_residual.{CUBE_KEPT}{_ANYWAY}", cube=cube
        )
    if not np.isfinite(relative):
        raise ReconstructionError(
            "the outputs or the decomposition hold NaN or inf (an overflow in the model or the "
            f"recorded run): compute in float64, or check the run for diverging steps.{CUBE_KEPT}{_ANYWAY}", cube=cube
        )
    from_updates = float(cube.attrs["max_abs_residual_from_updates"]) / change
    path = float(cube.attrs["max_abs_path_residual"]) / change
    update, floor = cube["update_residual"].values, cube["update_rounding_floor"].values
    checked = ""
    if np.isfinite(update).any():  # all NaN: not checked (check_updates=False)
        worst = int(np.nanargmax(update / np.maximum(floor, np.finfo(float).tiny)))  # the furthest above its floor
        above = np.flatnonzero(update > floor)  # NaN (unchecked) compares False
        first = f"; the first step above what rounding allows is step {above[0]}" if len(above) else ""
        checked = (f" (step {worst}'s update residual is {update[worst]:.2e}, where the rounding of the stored "
                   f"parameters allows {floor[worst]:.0e}{first})")
    if from_updates > path:
        fix = (f"The recorded updates are not those of the modelled optimizer on the declared batches: "
               f"{UPDATE_MISS_CAUSES}. Compare update_residual with update_rounding_floor per step to "
               "find where it starts. Only if the run is right and the miss is its own float32 rounding: "
               "explain with check_updates=False and no train dim, which splits the recorded updates instead.")
    else:
        fix = _path_fix(cube.attrs)
    raise ReconstructionError(
        f"the decomposition misses {relative:.2e} of the largest output change (max |residual| "
        f"{float(cube.attrs['max_abs_residual']):.2e} of a change of {change:.2e}; tolerance {tolerance:.0e}). "
        f"Of the largest change, up to {from_updates:.2e} is missed through the recorded updates "
        f"differing from the modelled ones{checked} and up to {path:.2e} by the path integral. "
        f"{fix}{CUBE_KEPT}{_ANYWAY}", cube=cube
    )


def _more_kinks(attrs: dict) -> str:
    """A next max_kinks to try: the search stops counting at the cap, so how many kinks a crowded
    segment holds is unknown, and four times the cap is a guess."""
    return f"max_kinks={4 * max(int(attrs['max_kinks']), 4)}"


def _path_fix(attrs: dict) -> str:
    """What to change when the path integral misses, from the options the cube records."""
    unresolved = int(attrs["kink_segments_unresolved"])
    if unresolved and attrs["kink_tolerance"] > 0:  # pieces still missing it: kinks, or curvature a node misses
        return (f"The path integral misses where the kink search gave up: it left {unresolved} (step, input) "
                f"segment(s) unresolved (more than max_kinks={attrs['max_kinks']} cuts, or pieces whose miss "
                f"stayed above kink_tolerance={attrs['kink_tolerance']:g}) and integrated them plainly. Raise "
                f"max_kinks (try {_more_kinks(attrs)}) or quadrature=... until the cube's attribute "
                "kink_segments_unresolved is 0.")
    if unresolved:
        # every segment then took the plain nodes: the search changed nothing but the time
        none_located = (" It located no kink at all, so this cube is the one breakpoints=False gives without the "
                        "search's cost: where raising max_kinks does not pay, take that and raise quadrature=..."
                        if int(attrs["kinks_located"]) == 0 else "")
        return (f"The path integral misses where kinks crowd: the kink search left {unresolved} (step, input) "
                f"segment(s) with more kinks than max_kinks={attrs['max_kinks']} and integrated them plainly. Raise "
                f"max_kinks (try {_more_kinks(attrs)}) until the cube's attribute kink_segments_unresolved is 0. "
                "A count that does not fall "
                "is of segments whose crossings the search could not pin down within its rounds (rare; cut where "
                f"their interpolants predict them): their miss is the search's limit.{none_located}")
    if attrs.get("coarser_rounding"):  # absent from cubes written before this attribute
        return (f"The model itself rounds to a coarser dtype than {attrs['dtype']} ({attrs['coarser_rounding']}), "
                "and no quadrature integrates that rounding away: compute that step in the model's dtype, or "
                "accept a tolerance of the coarser dtype's precision.")
    if not attrs["breakpoints"]:
        fix = "raise quadrature=..., or set breakpoints=True if the model has ReLU / max-pool kinks"
    elif attrs["kink_tolerance"] > 0:
        fix = f"lower kink_tolerance={attrs['kink_tolerance']:g} (0 locates every kink), or raise quadrature=..."
    else:
        fix = ("raise quadrature=..., and if the model has kinks the search does not see (an index computed "
               "outside torch, a hand-made sort), where more nodes converge only slowly: write them as relu, "
               "clamp, torch.where on a comparison, torch.maximum, max_pool or sort so that they are located. "
               "A miss that more nodes leave as it is comes from a jump of the model's value along a step, which "
               "no integral of ∂f/∂θ spans (hardshrink past its bound, max_unpool where its argmax switches, round "
               "or floor of a value that moves: write the model without it), or from a backward that is not its "
               "forward's derivative (a custom autograd.Function such as gradient reversal, a straight-through "
               "estimator x + (q(x) - x).detach()): the path integral needs the true ∂f/∂θ, so explain a model "
               "whose forward has it")
    if attrs["dtype"] != "float64":
        fix += f"; if that no longer helps, the {attrs['dtype']} rounding of each step's integral is left: dtype=torch.float64"
    return f"The path integral is too coarse: {fix}."
