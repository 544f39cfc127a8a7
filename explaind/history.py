"""Recording a training run to disk while it trains, and reading it back safely.

On-disk format (a directory; no pickle anywhere):

    meta.json            model layout, optimizer kind, loss, reduction, input shape
    initial.safetensors  θ_0, frozen parameters and buffers
    steps/NNNNNNN.safetensors
                         θ_{s+1} after update step s, the optimizer's second moments that
                         enter its preconditioner, and the batch: dataset indices, the actual
                         (augmented) inputs and the targets
    manifest.jsonl       one line per *complete* step: file, size, sha256, per-group
                         hyperparameters used at that step (lr, betas, momentum, ...) and,
                         where the recorder clipped the step's gradient, the factor it
                         scaled the gradient by
    resume.json / resume-0.safetensors, resume-1.safetensors
                         the latest full optimizer and scheduler state and the global RNGs
                         (torch's on the CPU and, where the run started CUDA, on each CUDA
                         device; numpy's, Python's), so that a killed
                         run can continue from its last complete step. The tensors alternate
                         between the two files and resume.json, written last, names its file
                         and that file's sha256: a crash between the two writes leaves the
                         previous, consistent pair. The state of step 0 (the RNG as the
                         recording started, the rest at its first batch) is the first; with a
                         scheduler it stays until the second step shows how often the loop
                         steps the scheduler. With a scheduler, resume.json keeps the state
                         before the last step beside the one after it: a resume that cannot
                         tell whether the loop was due to step the scheduler in between redoes
                         that step
    closed.json          written by close(): the number of steps, the hashes of meta.json and
                         of the manifest (its per-step values are covered by nothing else) and
                         the final step's hash; the dataset indices of the training samples and
                         each one's class (null for targets that are not one class per sample),
                         so that readers need not open every step file for them

A step counts only once its manifest line exists; the manifest is appended after the step
file is on disk (fsync + atomic rename), so a crash leaves at worst an ignored orphan file.
"""

from __future__ import annotations

import collections
import copy
import hashlib
import json
import math
import os
import random
import stat
import warnings
import weakref
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from . import __version__  # set before the package imports its modules
from .errors import (ExplaindError, HistoryError, InputError, UnsupportedError, described, error_class, is_number,
                     is_whole)
from .functional import (EMBEDDINGS, FlatModel, ParamLayout, layout_of, module_of, tensor_of, trainable_parameters,
                         untrained_tensors)
from .losses import (BUILTIN_LOSSES, IGNORE_INDEX, REDUCTIONS, check_class_weights, check_per_sample, check_reduction,
                     recorded_loss, resolve_loss, sample_weights, takes_class_weights)

FORMAT = "explaind-history"
VERSION = 1
# a history with class weights: a reader of version 1 alone would explain it without them
CLASS_WEIGHTS_VERSION = 2
# a history of a data-parallel run, whose steps hold every process's shard and weigh each
# sample by its shard's size: a reader of versions 1 and 2 would weigh them as one batch
DATA_PARALLEL_VERSION = 3
VERSIONS = (VERSION, CLASS_WEIGHTS_VERSION, DATA_PARALLEL_VERSION)
# how long the processes of a data-parallel run wait for each other to build their Recorders: a
# process that builds none goes on to average gradients, which never meet the Recorders' messages
MEET_TIMEOUT = timedelta(seconds=120)

# optimizer class name -> kind, and the group hyperparameters each kind's update depends on
OPTIMIZER_KINDS = {"SGD": "sgd", "Adam": "adam", "AdamW": "adamw"}
GROUP_KEYS = {
    "sgd": ("lr", "weight_decay", "momentum", "dampening", "nesterov"),
    "adam": ("lr", "weight_decay", "betas", "eps", "amsgrad"),
    "adamw": ("lr", "weight_decay", "betas", "eps", "amsgrad"),
}


# --------------------------------------------------------------------------- file helpers


def step_file(step: int) -> str:
    """Where the Recorder writes a step's record, relative to the history's folder."""
    return f"steps/{step:07d}.safetensors"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    """Write bytes so that `path` is either absent/old or complete, never half-written."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _read_bytes(file: Path) -> bytes:
    try:
        return file.read_bytes()
    except OSError as err:
        raise HistoryError(f"{file} cannot be read ({err}). {_RESTORE}") from err


def _parse_json(file: Path, data: bytes):
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise HistoryError(f"{file} is corrupted ({err}). {_RESTORE}") from err


def _file_size(file: Path) -> int | None:
    """The size of a regular file, None where there is none."""
    try:
        status = file.stat()
    except OSError:
        return None
    return status.st_size if stat.S_ISREG(status.st_mode) else None


def _read_json(file: Path):
    return _parse_json(file, _read_bytes(file))


def _field(record, key: str, file: Path):
    """record[key] of a JSON file of the history; a missing key means the file was damaged."""
    try:
        return record[key]
    except (KeyError, IndexError, TypeError) as err:
        raise HistoryError(f"{file} lacks {key!r}: the file was edited or damaged. {_RESTORE}") from err


# what a history holds at its top level; steps/ holds NNNNNNN.safetensors (and their .tmp)
HISTORY_FILES = ("meta.json", "initial.safetensors", "manifest.jsonl", "resume.json",
                 "resume-0.safetensors", "resume-1.safetensors", "closed.json")
_RESTORE = "Fix: restore the history from its source (dvc pull) or record it again"
# where a recording that replaces a history (overwrite=True) writes until its first step has
# passed its checks: the history it replaces stays whole until then
REPLACEMENT = ".explaind-replacement"


def _is_history(path: Path) -> bool:
    try:
        return json.loads((path / "meta.json").read_bytes()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _killed_unfinished(path: Path) -> str | None:
    """What a folder of history files without meta.json holds, said for a message, or None:
    what a Recorder killed while writing θ_0 or meta.json left (history files only, steps/
    empty), or a history's files without their meta.json (steps/ holding step files, beside
    anything else: a replacing recording killed as it moved them in, which writes meta.json
    last, or a meta.json deleted)."""
    steps = path / "steps"
    if (path / "meta.json").exists() or steps.is_symlink() or (steps.exists() and not steps.is_dir()):
        return None
    if steps.exists() and any(steps.iterdir()):
        if not all(_is_step_file(f) for f in steps.iterdir()):
            return None
        return ("the files of a history without their meta.json (what a replacing recording killed as it "
                "moved them in left, or a meta.json deleted): it cannot be opened")
    names = {name for base in HISTORY_FILES for name in (base, base + ".tmp")}
    entries = [e for e in path.iterdir() if e.name != REPLACEMENT]
    if entries and all(e.name in names and e.is_file() for e in entries if e != steps):
        return "what a recording killed as it started left (no meta.json yet): no step was recorded"
    return None


def _is_step_file(file: Path) -> bool:
    return file.name.removesuffix(".tmp").removesuffix(".safetensors").isdigit() and not file.is_dir()


def _remove_history(path: Path) -> None:
    """Delete the files of the history at `path`, and nothing else the directory holds."""
    for name in HISTORY_FILES:
        for file in (path / name, path / (name + ".tmp")):
            if file.is_file() or file.is_symlink():
                file.unlink()
    steps = path / "steps"
    if steps.is_dir() and not steps.is_symlink():
        for file in steps.iterdir():
            if _is_step_file(file):
                file.unlink()
        if not any(steps.iterdir()):
            steps.rmdir()


def _discard(replacement: Path) -> None:
    """Delete a replacing recording's folder (only history files are ever written there)."""
    if replacement.is_dir() and not replacement.is_symlink():
        _remove_history(replacement)
        if not any(replacement.iterdir()):
            replacement.rmdir()


def _manifest_line(line: dict) -> str:
    return json.dumps(line, sort_keys=True) + "\n"


def _json_bytes(obj) -> bytes:
    return json.dumps(obj, indent=1, sort_keys=True).encode()


# JSON turns every key into a string: a dict with other keys (MultiStepLR's milestones, a
# Counter of step numbers) is stored as its items under this key, and restored as it was
_KEYED = "__explaind_items__"


def _plain(value):
    """0-d tensors (a tensor lr, ...) as numbers, so that JSON can store them."""
    if torch.is_tensor(value) and value.dim() == 0:
        return value.item()
    if isinstance(value, dict) and not all(isinstance(k, str) for k in value):
        return {_KEYED: [[_plain(k), _plain(v)] for k, v in value.items()],
                "counter": isinstance(value, collections.Counter)}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _unplain(value):
    """What _plain stored, with the keys and Counters of its dicts restored."""
    if isinstance(value, dict) and _KEYED in value:
        items = {_unplain(k): _unplain(v) for k, v in value[_KEYED]}
        return collections.Counter(items) if value.get("counter") else items
    if isinstance(value, dict):
        return {k: _unplain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unplain(v) for v in value]
    return value


def _keys_restored(stored: dict, fresh: dict) -> dict:
    """A scheduler state stored before _KEYED: a dict whose keys JSON made strings (MultiStepLR's
    milestones) gets the key type of the fresh scheduler's own state back."""
    restored = dict(stored)
    for key, value in fresh.items():
        if isinstance(value, dict) and value and isinstance(stored.get(key), dict) \
                and all(isinstance(k, str) for k in stored[key]) and not all(isinstance(k, str) for k in value):
            kind = type(next(iter(value)))
            items = {kind(k): v for k, v in stored[key].items()}
            restored[key] = collections.Counter(items) if isinstance(value, collections.Counter) else items
    return restored


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous().clone()


def _as_compared(params: dict[str, torch.Tensor],
                 host: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """θ as the next step's check compares it (only optimizer.step() may change it), kept on the
    parameters' device: on a GPU a copy there (one more θ in its memory) spares a second copy to
    the host, and its synchronisation, per step; on the CPU it is the host copy written, if any.
    (No GPU ran this: the copies are counted on the CPU.)"""
    return {n: host[n] if host is not None and host[n].device == p.device else p.detach().clone()
            for n, p in params.items()}


def _batch_tensor(name: str, value) -> torch.Tensor:
    """A batch's inputs or targets as one tensor with a row per sample (numpy arrays too)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    # a tokenizer's batch (a dict or Hugging Face's BatchEncoding) of token ids and their mask
    masked = hasattr(value, "keys") and "attention_mask" in value.keys()
    raise InputError(
        f"batch() takes the {name} as one tensor (or numpy array) with a row per sample, got a "
        f"{type(value).__name__}. Fix: pass torch.as_tensor(...); a model of several inputs is "
        "explained as a wrapper module whose forward takes them as one tensor (concatenated, or "
        "the constant ones kept as buffers)" + (
            ": token ids and their attention_mask go in as torch.stack([input_ids, attention_mask], 1) "
            "[batch, 2, length], through a module that hands the model a 4D additive mask "
            "(docs/library.md, 'Padded'), recorded and explained in the model's place" if masked else ""))


def _dataset_indices(indices) -> torch.Tensor:
    """The batch's dataset indices as int64; floats, bools and negatives are not indices."""
    if indices is None:  # a Dataset that returns (x, y) gives the loop none
        raise InputError(
            "batch() got no dataset indices (None): the history names each row's sample by its index in the "
            "training set. Fix: load them with the rows (a Dataset whose __getitem__(i) returns (i, x[i], y[i])), "
            "or, for full-batch training on the whole set, pass torch.arange(len(inputs))")
    indices = tensor_of(indices, "batch()'s dataset indices")
    if sum(size > 1 for size in indices.shape) > 1:  # flattened, they would be counted as some other batch's
        raise InputError(
            f"batch() takes one dataset index per row [batch], got a tensor of shape {tuple(indices.shape)}. Fix: "
            "pass the arguments as batch(indices, inputs, targets), the indices first")
    indices = indices.reshape(-1)  # a column [batch, 1] or one sample's index as a number
    if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
        raise InputError(
            f"batch() takes integer dataset indices, got dtype {indices.dtype}: a bool mask or "
            "float ids would name the wrong samples. Fix: pass the indices of the rows, e.g. "
            "mask.nonzero().squeeze(1), or ids.long() when they are whole numbers"
        )
    if (indices < 0).any():
        raise InputError(
            f"batch() got negative dataset indices (smallest {indices.min().item()}): indices "
            "count rows of the training set from 0. Fix: pass each row's position in the dataset"
        )
    return indices.long()


def _constant_tensors(model: nn.Module, trainable) -> dict[str, torch.Tensor]:
    """The frozen parameters and buffers, named as initial.safetensors names them."""
    frozen = {f"frozen/{n}": p for n, p in model.named_parameters() if n not in trainable}
    return {**frozen, **{f"buffer/{n}": b for n, b in model.named_buffers()}}


def _members(optimizer: torch.optim.Optimizer) -> list[list[int]]:
    return [[id(p) for p in group["params"]] for group in optimizer.param_groups]


def process_group_store() -> dist.Store:
    """The default process group's key-value store, where processes tell each other what a
    collective could not (a wait that ends at a timeout, a failure told before the others finish).
    torch has no public accessor: this is the one place that reaches for it."""
    return dist.distributed_c10d._get_default_store()


def _data_parallel(model: nn.Module) -> tuple[object, int, int]:
    """(process group, this process's rank in it, its number of processes) of a data-parallel
    run, whose gradients are averaged over the processes before optimizer.step(): a
    DistributedDataParallel model's group, or the default one; (None, 0, 1) in one process."""
    if not (dist.is_available() and dist.is_initialized()):
        return None, 0, 1
    group = model.process_group if isinstance(model, nn.parallel.DistributedDataParallel) else None
    processes = dist.get_world_size(group)
    return (group, dist.get_rank(group), processes) if processes > 1 else (None, 0, 1)


# --------------------------------------------------------------------------- checks on the model


EVAL_MODE = "keep it in eval mode for the whole run (.eval() before training, and no model.train() in the loop)"
# a recorded run had every such module in eval mode (the Recorder refuses the others): a module
# handed to explain in train mode (as torch builds it) needs only to be switched
EVAL_TO_EXPLAIN = "call model.eval() before explaining, as the run was recorded in eval mode"


def refuse_unreplayable_modules(model: nn.Module, when: str = "", eval_mode: str = EVAL_MODE) -> None:
    """Refuse modules that no decomposition over samples replays: train-mode dropout, RReLU and
    BatchNorm (random, or of the batch), train-mode spectral norm (it updates its buffers),
    embeddings with max_norm (they renormalise θ in place) or scale_grad_by_freq (their batch
    gradient is no sum over samples). `when` says where the check ran (e.g. " at step 3"), for a
    model switched mid-run; `eval_mode`, how to get to eval mode. InstanceNorm without running
    statistics normalises each sample by its own: a function of (x, θ) in any mode, so it passes.
    Every such module is named at once (a train-mode BatchNorm and Dropout: one model.eval() fixes both)."""
    refusals = []
    for name, module in model.named_modules():
        kind = type(module).__name__
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0 and module.training:
            cause = f"is a train-mode {kind}{when}: its output depends on random masks"
            fix = f"set p=0, {eval_mode}, or remove it"
        elif isinstance(module, nn.RReLU) and module.training and module.lower != module.upper:
            cause = f"is a train-mode {kind}{when}: its negative slopes are drawn at random"
            fix = f"{eval_mode} (it then uses the mean slope), or use LeakyReLU"
        elif isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is None \
                and module.running_var is None:
            # eval mode does not help: without running statistics torch normalises with the batch's
            cause = (f"is a {kind} without running statistics (track_running_stats=False, or running_mean and "
                     f"running_var set to None){when}: in any mode its output depends on the batch")
            fix = ("build it with track_running_stats=True and keep it in eval mode for the whole run, or use a "
                   "norm without batch statistics (LayerNorm, GroupNorm, InstanceNorm)")
        elif isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            cause = f"is a train-mode {kind}{when}: its output depends on the batch's statistics"
            fix = f"{eval_mode}, or remove it"
        elif isinstance(module, EMBEDDINGS) and module.max_norm is not None:
            cause = (f"is an {kind} with max_norm={module.max_norm}{when}: every forward pass renormalises the "
                     "rows it looks up in place, a change of the parameters outside optimizer.step()")
            fix = ("max_norm=None; to bound the vectors, scale them in forward instead (v * (max_norm / "
                   "v.norm(dim=-1, keepdim=True)).clamp(max=1)), which leaves the parameters to the optimizer")
        elif isinstance(module, EMBEDDINGS) and module.scale_grad_by_freq \
                and module.weight.requires_grad:
            cause = (f"is an {kind} with scale_grad_by_freq=True{when}: it divides each row's gradient by how "
                     "often the row occurs in the whole batch, so the batch's gradient is not the sum of its "
                     "samples' gradients that explaind splits it into")
            fix = "scale_grad_by_freq=False"
        elif module.training and _spectral_norm(module):
            cause = (f"has spectral norm in train mode{when}: every forward pass updates its power-iteration "
                     "vectors (buffers), so the function changes as it runs")
            fix = f"{eval_mode}: it then divides by the σ of its stored vectors; or remove it"
        elif isinstance(module, nn.modules.instancenorm._InstanceNorm) and module.track_running_stats \
                and module.training:
            cause = (f"is a train-mode {kind} with track_running_stats=True{when}: it normalises by each sample's "
                     "statistics but updates running ones, which eval mode uses")
            fix = (f"build it with track_running_stats=False (each sample's own statistics in any mode), or "
                   f"{eval_mode}")
        else:
            continue
        refusals.append(f"module {name or '<root>'!r} {cause}; no exact decomposition can replay it. Fix: {fix}.")
    if len(refusals) == 1:
        raise UnsupportedError(refusals[0])
    if refusals:
        raise UnsupportedError(f"{len(refusals)} modules cannot be replayed:\n" + "\n".join(
            f"  - {refusal}" for refusal in refusals))


SPARSE_FIX = ("Fix: sparse=False for the recorded run (SGD makes the same updates with dense gradients, and "
              "explain takes a module with sparse=True as well)")


def _refuse_sparse_embeddings(model: nn.Module) -> None:
    """Sparse gradients are refused: a resumed run would continue the momentum densely, which
    rounds otherwise than the sparse buffer, and torch's clip_grad_norm_ does not take them."""
    for name, module in model.named_modules():
        if isinstance(module, EMBEDDINGS) and module.sparse and module.weight.requires_grad:
            raise UnsupportedError(f"module {name!r} is an {type(module).__name__} with sparse=True, whose sparse "
                                   f"gradients explaind does not record. {SPARSE_FIX}")


def _refuse_parameter_dtypes(params: dict[str, torch.Tensor]) -> None:
    """The trained tensors share one precision, float32 or float64: the history records one, the
    decomposition computes in it, and a 16-bit one rounds every update by far more than the
    decomposition's exactness (bfloat16: up to 2^-8 of each parameter), by no rule of the optimizer."""
    names_of: dict[torch.dtype, list[str]] = {}
    for name, p in params.items():
        names_of.setdefault(p.dtype, []).append(name)
    if len(names_of) > 1:
        listed = "; ".join(f"{str(d).removeprefix('torch.')}: {', '.join(map(repr, names[:3]))}"
                           f"{' …' if len(names) > 3 else ''}" for d, names in names_of.items())
        raise UnsupportedError(
            f"the trainable parameters come in {len(names_of)} dtypes ({listed}): a history records one "
            "precision, and the decomposition computes in it. Fix: convert the model to one before building "
            "the optimizer (model.float() or model.double())")
    dtype = next(iter(names_of))
    if dtype not in (torch.float32, torch.float64):
        why = "complex parameters have no such decomposition" if dtype.is_complex else (
            f"a {torch.finfo(dtype).bits}-bit float rounds each parameter at every update by up to "
            f"{torch.finfo(dtype).eps / 2:.0e} of its value, which no model of the optimizer reproduces")
        raise UnsupportedError(
            f"the trainable parameters are {str(dtype).removeprefix('torch.')}: explaind decomposes runs "
            f"trained in float32 or float64 ({why}). Fix: train with float32 parameters (model.float() "
            "before building the optimizer)")


def _spectral_norm(module: nn.Module) -> bool:
    """Whether spectral norm runs power iterations in the module's forward: the parametrization
    (torch.nn.utils.parametrizations.spectral_norm) or the older forward pre-hook."""
    hooks = module._forward_pre_hooks.values()
    return any(getattr(f, "n_power_iterations", 0) > 0 for f in (module, *hooks))


def optimizer_kind(optimizer: torch.optim.Optimizer, when: str = "") -> str:
    name = type(optimizer).__name__
    if name not in OPTIMIZER_KINDS:
        raise UnsupportedError(
            f"optimizer {name} is not supported: explaind models the exact updates of "
            "torch.optim.SGD, torch.optim.Adam and torch.optim.AdamW. Fix: train with one of them."
        )
    kind = OPTIMIZER_KINDS[name]
    for i, group in enumerate(optimizer.param_groups):
        if group.get("maximize", False):
            raise UnsupportedError(f"param group {i} has maximize=True{when}: explaind models descent. Fix: "
                                   "train with maximize=False (to maximise an objective, minimise its negative)")
        if kind == "adam" and group.get("decoupled_weight_decay", False):
            kind = "adamw"  # Adam(decoupled_weight_decay=True) is AdamW
    return kind


def _group_hyperparameters(optimizer: torch.optim.Optimizer, kind: str) -> list[dict]:
    out = []
    for group in optimizer.param_groups:
        hyper = {}
        for key in GROUP_KEYS[kind]:
            value = group[key]
            value = value.item() if torch.is_tensor(value) else value
            hyper[key] = [float(v) for v in value] if key == "betas" else value
        out.append(hyper)
    return out


# --------------------------------------------------------------------------- recording


_MISSING = object()  # an argument left out, told from any value a user could pass


class Recorder:
    """Records a training run to `path` while it trains.

    Usage (three lines in an ordinary training loop)::

        with Recorder("runs/mlp", model, optimizer) as rec:          # 1
            for indices, x, y in loader:
                optimizer.zero_grad()
                F.cross_entropy(model(x), y).backward()
                rec.batch(indices, x, y)                              # 2
                optimizer.step()
                scheduler.step()
        # leaving the block closes the history                        # 3

    `loss` and `reduction` ("mean", "sum", or "token_mean": torch's mean over a batch's target
    entries that are not -100, for targets with a class per position, the loss then each
    sequence's sum over them) declare the training loss, and `class_weights` the weight= of a
    cross_entropy / nll loss (torch's mean then divides by the batch's total weight, which the
    history follows from each step's targets); every `check_every` steps, and at the first
    two steps of a recording or a resume, the recorder recomputes the batch gradient from
    the recorded batch and compares it with `.grad`, so that undeclared clipping, dropout, a
    wrong reduction, an undeclared loss term or a forgotten optimizer.zero_grad() fail at once
    instead of after hours of attribution. Clipping the gradient's norm is
    recorded by calling `rec.clip_grad_norm_(max_norm)` in place of
    `torch.nn.utils.clip_grad_norm_`.

    In a data-parallel run (DistributedDataParallel, or any process group of several processes
    whose gradients are averaged before optimizer.step()) every process builds its Recorder on
    the same path, with the wrapped model or its .module, and declares its own shard of each
    batch: process 0 gathers the shards and writes the history alone, each step's batch being
    their union, whose samples weigh 1/(processes · their shard's size) under a mean, as the
    averaged gradient has them. A refusal at process 0 is raised on every process. Such a run is
    resumed by as many processes, each calling Recorder.resume on the path (which all of them read).
    """

    _built = 0  # Recorders this process built in data-parallel runs

    def __init__(
        self,
        path: str | os.PathLike,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        loss="cross_entropy",
        reduction: str = "mean",
        class_weights=None,
        scheduler=None,
        check_every: int = 50,
        check_tolerance: float | None = None,
        overwrite: bool = False,
        _resume_from: int | None = None,
    ):
        self.path = Path(path).absolute()  # the loop may change the working directory
        self.model = module_of(model)
        self._group, self._rank, self._processes = _data_parallel(model)
        self.optimizer = optimizer
        self.scheduler = scheduler
        if scheduler is not None:
            _check_scheduler(scheduler, optimizer)
        self.kind = optimizer_kind(optimizer)
        self.class_weights = check_class_weights(class_weights)
        self.loss_name, self.loss = resolve_loss(loss, self.class_weights)
        self.reduction = check_reduction(reduction)
        if not (is_whole(check_every) and check_every >= 0):
            raise InputError(f"check_every={check_every!r} must be a whole number ≥ 0: the Recorder compares .grad "
                             "with the declared loss's gradient every check_every steps and at the first two (0: never)")
        self.check_every = check_every
        # the first two steps of a recording or a resume are checked too: a gradient that
        # accumulates across steps (optimizer.zero_grad() forgotten) shows from the second on,
        # and a resumed loop's own mistakes show at its first
        first = 0 if _resume_from is None else _resume_from
        self._also_checked = (first, first + 1)
        self._first_grad: torch.Tensor | None = None  # the first checked .grad, until the next step's check
        if check_tolerance is not None and not (is_number(check_tolerance) and check_tolerance >= 0):
            raise InputError(f"check_tolerance={check_tolerance!r} must be a number ≥ 0, the largest relative "
                             "difference of .grad from the declared loss's gradient (None: 1e-9 in float64, "
                             "1e-3 in float32)")  # NaN would pass every check
        self.check_tolerance = check_tolerance
        refuse_unreplayable_modules(self.model)
        self.layout = layout_of(model)
        self._params = trainable_parameters(model)
        if not self._params:
            raise InputError("the model has no trainable parameter (every one has requires_grad=False): a run "
                             "that trains nothing has no history. Fix: unfreeze the parameters to train")
        _refuse_parameter_dtypes(self._params)
        _refuse_sparse_embeddings(self.model)
        self._group_of = self._param_groups()
        # (indices, inputs, targets, each row's weight in the batch gradient) of the declared batch
        self._pending: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._gradient_scale: float | None = None  # this step's clipping factor, once clipped
        self._shards: list[int] | None = None  # each process's rows of a data-parallel step's batch
        self._closed = False
        self._seen: set[int] = set()
        self._target_of: dict[int, tuple] = {}  # dataset index: (its checked target, first step)
        self._class_targets = True  # every batch so far declared one class per sample (closed.json's train_labels)
        self._scheduler_steps: int | None = None  # scheduler.step() calls per optimizer step
        self._scheduler_steps_vary = False  # ... not the same after every optimizer step
        self._epoch_after_step: int | None = None  # the scheduler's position right after a step
        # the resume state stored before the last step (the schedule as the loop left it): kept beside
        # the one after that step, for a resume that cannot tell whether the loop stepped its scheduler after it
        self._schedule_info: dict | None = None
        # the schedule's position, state and group hyperparameters as a resume left them (see
        # _undo_a_repeated_schedule_step): until the first step after a resume
        self._resumed_schedule: tuple[int, dict, list[dict]] | None = None
        self._resume_tensors: dict[str, str] = {}  # the resume tensors' file and sha256 (a resume sets them)
        self._unknown_schedule: Exception | None = None  # a resume's refusal, raised if the loop goes on

        self._dir = self.path  # where the files are written: the path, or beside what it replaces
        self.step = 0 if _resume_from is None else _resume_from
        if self._processes > 1 and not self._meet_the_other_processes(model):
            self._group, self._rank, self._processes = None, 0, 1  # processes that train apart, a run each
        self._writes = self._rank == 0  # process 0 writes the history, the others send it their shards
        self._last = _as_compared(self._params) if self._writes else {}  # the writer checks the steps
        if _resume_from is None:
            self._on_writer(lambda: self._start_new(overwrite))
            self._rng_at_start = self._every_rng_state()  # before step 0 draws its batch: a resume from step 0 restores them
        # what the history holds fixed, to refuse an unrecorded change at any step
        self._members = _members(optimizer)
        self._constants = {n: _cpu(t) for n, t in _constant_tensors(self.model, self._params).items()}
        self._manifest = open(self._dir / "manifest.jsonl", "a") if self._writes else None
        self._hooks = [
            optimizer.register_step_pre_hook(self._before_step),
            optimizer.register_step_post_hook(self._after_step),
        ]
        _OPEN_RECORDERS.add(self)

    # ----------------------------------------------------------------- setup

    def _param_groups(self) -> dict[str, int]:
        by_id = {id(p): i for i, g in enumerate(self.optimizer.param_groups) for p in g["params"]}
        group_of = {}
        for name, p in self._params.items():
            if id(p) not in by_id:
                raise InputError(
                    f"trainable parameter {name!r} is not in the optimizer: pass all of "
                    "model.parameters() to it, or freeze the tensor with requires_grad_(False)"
                )
            group_of[name] = by_id.pop(id(p))
        # torch's optimizers skip a tensor without .grad: a frozen one in the optimizer stays
        # a recorded constant, as long as it never gets a gradient (checked at every step)
        self._frozen = {n: p for n, p in self.model.named_parameters() if by_id.pop(id(p), None) is not None}
        if by_id:
            raise InputError(
                f"the optimizer holds {len(by_id)} tensor(s) that are not trainable parameters "
                "of the model: build the optimizer from this model's parameters"
            )
        return group_of

    def _start_new(self, overwrite: bool) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise InputError(
                f"{self.path} is a file, not a directory: a history is a directory of files. "
                "Fix: pass the path of a new (or empty) directory"
            )
        if any(len(s) for s in self.optimizer.state.values()):  # refused before any old history is replaced
            raise UnsupportedError(
                "the optimizer already has state (momentum buffers or moments) from earlier "
                "steps, which the history would miss. Fix: record from a freshly built "
                "optimizer, or continue a recorded run with Recorder.resume(...)"
            )
        if self.path.exists() and any(e.name != REPLACEMENT for e in self.path.iterdir()):
            self._replace_existing(overwrite)
            self._dir = self.path / REPLACEMENT
        # a replacing recording killed before its first step (beside its history, or alone
        # where that history was deleted by hand): explaind's own files, never a user's
        _discard(self.path / REPLACEMENT)
        (self._dir / "steps").mkdir(parents=True, exist_ok=True)
        initial = {f"param/{n}": _cpu(p) for n, p in self._params.items()}
        trainable = set(self._params)
        for n, p in self.model.named_parameters():
            if n not in trainable:
                initial[f"frozen/{n}"] = _cpu(p)
        for n, b in self.model.named_buffers():
            initial[f"buffer/{n}"] = _cpu(b)
        data = save_safetensors(initial)
        _write_atomic(self._dir / "initial.safetensors", data)
        meta = {
            "format": FORMAT,
            "version": (DATA_PARALLEL_VERSION if self._processes > 1 else VERSION if self.class_weights is None
                        else CLASS_WEIGHTS_VERSION),
            **({} if self._processes == 1 else {"processes": self._processes}),
            "optimizer": self.kind,
            "loss": self.loss_name,
            "reduction": self.reduction,
            **({} if self.class_weights is None else {"class_weights": self.class_weights.tolist()}),
            "params": [
                {"name": n, "shape": list(s), "dtype": str(self._params[n].dtype).removeprefix("torch."),
                 "group": self._group_of[n]}
                for n, s in zip(self.layout.names, self.layout.shapes)
            ],
            "n_groups": len(self.optimizer.param_groups),
            "initial_sha256": _sha256(data),
            "explaind_version": __version__,
        }
        _write_atomic(self._dir / "meta.json", _json_bytes(meta))

    def _replace_existing(self, overwrite: bool) -> None:
        """Only a history (or what a recording killed before its history was whole left) may be
        replaced, and only its own files are deleted."""
        killed = _killed_unfinished(self.path)
        if killed and not overwrite:
            raise HistoryError(f"{self.path} holds {killed}. Fix: record it again with overwrite=True, "
                               "or choose another directory")
        if not _is_history(self.path) and not killed:
            raise InputError(
                f"{self.path} holds files but no explaind history (no meta.json of format "
                f"{FORMAT!r}), so nothing there is replaced. Fix: choose a new or empty directory"
            )
        if not overwrite:
            raise HistoryError(
                f"{self.path} already holds files: choose a new directory, pass "
                "overwrite=True to replace the history, or continue a killed run with "
                "Recorder.resume(...)"
            )

    def _take_its_place(self) -> None:
        """The replacing recording has passed its first step's checks (or closed without a
        step): only now are the files of the history it replaces deleted, and its own moved in."""
        _remove_history(self.path)
        (self.path / "steps").mkdir(exist_ok=True)
        for file in sorted((self._dir / "steps").iterdir()):
            os.replace(file, self.path / "steps" / file.name)
        for name in reversed(HISTORY_FILES):  # meta.json last: until then the folder holds no history
            if (self._dir / name).is_file():
                os.replace(self._dir / name, self.path / name)
        _discard(self._dir)
        self._dir = self.path

    def _abandon_replacement(self) -> None:
        """A replacing recording failed before its first step passed: the history it was to
        replace stays as it was."""
        if self._dir != self.path:
            _discard(self._dir)

    # ----------------------------------------------------------------- the three calls

    def batch(self, indices, inputs: torch.Tensor, targets: torch.Tensor = _MISSING) -> None:
        """Declare the batch of the coming optimizer step (after backward, before step)."""
        if targets is _MISSING:  # rec.batch(x, y): Python's own error named no dataset index
            raise InputError("batch() takes three arguments, the rows' dataset indices, the inputs and the targets "
                             "(rec.batch(indices, x, y)); it got two. The indices label the train dim and tell a "
                             "sample seen twice from two samples. Fix: pass each row's index in the dataset first "
                             "(a Dataset returning (index, x, y), or torch.arange(len(x)) for a full batch)")
        if self._unknown_schedule is not None:  # a resume that could not tell where the schedule is
            raise self._unknown_schedule
        if self._pending is not None:
            raise InputError(
                "batch() was called twice before optimizer.step(): call it once per step, "
                "with all rows that entered the loss. A loop that skips optimizer.step() for some batches (a "
                "check of the loss, a GradScaler's inf / NaN skip) calls rec.batch() only for the steps it takes"
            )
        inputs, targets = _batch_tensor("inputs", inputs), _batch_tensor("targets", targets)
        if len(inputs) == 0:
            raise InputError(
                "batch() got an empty batch: a step without samples has no gradient to explain. "
                "Fix: skip optimizer.step() for empty batches (e.g. drop_last=True)"
            )
        indices = _dataset_indices(indices)
        if not (len(indices) == len(inputs) == len(targets)):
            raise InputError(
                f"batch() got {len(indices)} indices, {len(inputs)} inputs and "
                f"{len(targets)} targets: pass one dataset index per row of the batch"
            )
        weights = sample_weights(self.reduction, self.loss_name, targets, self.class_weights, torch.float64, "cpu")
        if not weights.isfinite().all():
            raise InputError(
                f"batch() at step {self.step}: every target of the batch is ignored (-100) or has class weight 0, so "
                "torch's mean loss is 0 / 0 (NaN). Fix: skip optimizer.step() for such a batch")
        pending = (_cpu(indices), _cpu(inputs), _cpu(targets), weights)
        if self._processes == 1:
            self._declare(*pending)
        else:  # declared whole at the step, once process 0 holds every process's shard
            self._pending = pending

    def _declare(self, indices: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor,
                 weights: torch.Tensor) -> None:
        """The step's whole batch, each row's weight in its gradient with it."""
        conflict = _target_conflict(self._target_of, indices, targets, self.step, self.loss_name)
        if conflict is not None:
            index, target, (first_target, first_step) = conflict
            declared = (f"index {index} twice in the batch of step {self.step}, with targets {first_target} and "
                        f"{target}" if first_step == self.step else
                        f"index {index} with target {target} at step {self.step}, but step {first_step} declared it "
                        f"with target {first_target}")
            raise InputError(
                f"batch() declares dataset {declared}: an index names one sample of the dataset. Fix: pass each "
                "row's index in the dataset (e.g. from a Dataset whose __getitem__ returns it), not its position "
                "in the batch"
            )
        self._seen.update(indices.tolist())
        self._class_targets = self._class_targets and _one_class_each(targets)
        self._pending = (indices, inputs, targets, weights)

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False) -> torch.Tensor:
        """`torch.nn.utils.clip_grad_norm_` over all trained parameters, recorded: call it in its
        place (after backward, before optimizer.step()). Returns the gradients' total norm.

        Clipping scales the whole batch gradient by one factor, c = min(1, max_norm / (‖ḡ‖ + 1e-6)),
        so every sample's share of the step is scaled by it too and the decomposition stays exact:
        the history keeps c with the step, as it keeps the learning rate.
        """
        if not (is_number(max_norm) and max_norm > 0):
            raise InputError(
                f"clip_grad_norm_() got max_norm={max_norm!r}: the norm to clip to must be a number "
                "above 0. Fix: pass the max_norm you would pass to torch.nn.utils.clip_grad_norm_"
            )
        if self._gradient_scale is not None:
            raise InputError(
                f"clip_grad_norm_() was called twice before optimizer.step() (step {self.step}): "
                "clip once per step, after backward() and before step()"
            )
        total = torch.nn.utils.clip_grad_norm_(list(self._params.values()), max_norm, norm_type, error_if_nonfinite)
        # the factor torch scaled .grad by, computed as torch computes it (same ops, same dtype)
        scale = float(torch.clamp(max_norm / (total + 1e-6), max=1.0))
        if not scale > 0:  # (not kept: a caller who catches this and clips again is not "twice")
            raise UnsupportedError(
                f"the gradients' total norm at step {self.step} is {float(total)}: a step with a "
                "non-finite gradient has no decomposition. Fix: lower the learning rate, or skip "
                "optimizer.step() for such a batch"
            )
        self._gradient_scale = scale
        return total

    def _before_step(self, optimizer, args, kwargs) -> tuple[tuple, dict] | None:
        # args: step()'s own, the optimizer first, so a closure passed by position is args[1]
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is None:
            self._check_step(optimizer)
            return None

        # optimizer.step(closure), as PyTorch Lightning's automatic optimization calls it: the
        # closure makes the step's gradient (and declares its batch) inside step(), before the
        # update, so the step is checked when it returns
        def checked_closure():
            loss = closure()
            self._check_step(optimizer)
            return loss

        if "closure" in kwargs:
            return args, {**kwargs, "closure": checked_closure}
        return (args[0], checked_closure, *args[2:]), kwargs

    def _check_step(self, optimizer) -> None:
        """What must hold before the optimizer updates: the batch declared (in a data-parallel run,
        by every process, and joined at process 0, which checks the rest), nothing changed that the
        history holds fixed, every trained tensor with a dense gradient, and the gradient check."""
        if self._pending is None:
            raise InputError(
                "optimizer.step() was called without rec.batch(indices, inputs, targets) "
                "for this step: declare the batch after backward() and before step() (with "
                "optimizer.step(closure): inside the closure, as in a Lightning training_step)"
            )
        if self._resumed_schedule is not None:  # (in every process: each steps with its own learning rates)
            self._undo_a_repeated_schedule_step()
        if self._processes == 1:
            self._check_whole_step(optimizer)
            return
        shards = [None] * self._processes if self._writes else None
        dist.gather_object(self._pending[:3], shards, dst=self._writer, group=self._group)
        self._on_writer(lambda: (self._declare_shards(shards), self._check_whole_step(optimizer)))

    def _declare_shards(self, shards: list[tuple[torch.Tensor, ...]]) -> None:
        """The step's batch of a data-parallel run: every process's shard, in rank order."""
        self._shards = [len(indices) for indices, _, _ in shards]
        indices, inputs, targets = (torch.cat(parts) for parts in zip(*shards))
        weights = sample_weights(self.reduction, self.loss_name, targets, self.class_weights, torch.float64, "cpu",
                                 self._shards)
        self._declare(indices, inputs, targets, weights)

    def _meet_the_other_processes(self, model: nn.Module) -> bool:
        """Whether the processes record one data-parallel run: every process builds its Recorder
        (process 0 alone sees only its shard, and the others' averaged gradients would wait for its
        messages for ever), with one path; processes that train apart (no DistributedDataParallel
        model) give a path each, and record a run each. Met in the process group's rendezvous
        store, whose wait ends at its timeout: a collective would leave its work pending, which
        blocks the refused process's exit."""
        Recorder._built += 1  # the n-th Recorder of each process meets the n-th of the others
        key = f"explaind/recorder/{Recorder._built}/"
        keys = [f"{key}{rank}" for rank in dist.get_process_group_ranks(self._group or dist.group.WORLD)]
        store = process_group_store()
        store.set(f"{key}{dist.get_rank()}", str(self.path))
        try:
            store.wait(keys, MEET_TIMEOUT)
        except RuntimeError as error:
            raise UnsupportedError(
                f"process {self._rank} of this data-parallel run built a Recorder, and not every other process "
                f"did within {MEET_TIMEOUT.total_seconds():.0f} s: each process sees only its shard of "
                "a batch, and the update averages the gradients of all of them, so every process declares its "
                "shard. Fix: build the Recorder in every process, on the same path, with the same arguments "
                "(process 0 writes the history)") from error
        paths = [store.get(key).decode() for key in keys]
        apart = len(set(paths)) == len(paths) and not isinstance(model, nn.parallel.DistributedDataParallel)
        if len(set(paths)) > 1 and not apart:  # (refused by every process alike)
            raise InputError(
                f"the processes of this data-parallel run record to {len(set(paths))} paths ({paths[0]!r} in "
                f"process 0, {next(p for p in paths if p != paths[0])!r} in another): a data-parallel run has one "
                "history, of every process's shard, which process 0 writes. Fix: pass the same path in every "
                "process (processes that train apart, without DistributedDataParallel, pass a path each)")
        return len(set(paths)) == 1

    @property
    def _writer(self) -> int:
        """The global rank of the process that writes (the group's process 0): torch before 2.6
        takes collectives' source and destination as global ranks only."""
        return dist.get_global_rank(self._group or dist.group.WORLD, 0)

    def _on_writer(self, action: Callable[[], object]) -> None:
        """Run `action` at process 0, the one that writes the history, and raise its refusal at
        every process: in a data-parallel run a process refused alone would leave the others
        waiting for its gradients."""
        error = None
        if self._writes:
            try:
                action()
            except Exception as caught:
                error = caught
        if self._processes > 1:
            verdict = [None if error is None else described(error)]
            dist.broadcast_object_list(verdict, src=self._writer, group=self._group)
            if verdict[0] is not None and not self._writes:
                _, name, message = verdict[0]
                kind = error_class(verdict[0])
                raise kind(message) if issubclass(kind, ExplaindError) else \
                    RuntimeError(f"process 0 of the recording failed: {name}: {message}")
        if error is not None:
            raise error

    def _check_whole_step(self, optimizer) -> None:
        # a loop's model.train() (at each epoch's start, say) turns dropout back on mid-run; checked
        # first, since a train-mode BatchNorm also changes its buffers, which the next check refuses
        # without naming the cause
        refuse_unreplayable_modules(self.model, f" at step {self.step}")
        self._refuse_unrecorded_changes(optimizer)
        for name, p in self._frozen.items():
            if p.grad is not None:
                raise UnsupportedError(
                    f"the frozen parameter {name!r} has a gradient at step {self.step}, so the "
                    "optimizer would update a tensor recorded as constant. Fix: keep it frozen "
                    "with no .grad (optimizer.zero_grad(set_to_none=True)), or leave it out of "
                    "the optimizer"
                )
        for name, p in self._params.items():
            if not p.requires_grad:  # with zero_grad(set_to_none=False) its .grad stays, zeros
                raise UnsupportedError(_frozen_after_start(name, self.step))
            if p.grad is None:
                raise UnsupportedError(_no_gradient(name, self.step))
            if p.grad.layout != torch.strided:
                raise UnsupportedError(
                    f"parameter {name!r} has a sparse gradient at step {self.step} (F.embedding(..., sparse=True) "
                    "in forward, or an embedding made sparse after recording started), which explaind does not "
                    f"record. {SPARSE_FIX}")
            if p.dtype != self._last[name].dtype:  # torch.equal would pass a float32 θ cast to float64
                raise HistoryError(
                    f"parameter {name!r} is {p.dtype} before step {self.step}, but the run was recorded in "
                    f"{self._last[name].dtype}: the model was cast mid-run (model.double(), model.half(), "
                    "model.to(dtype)), and one history holds one precision (the optimizer's state stays in the "
                    "old one). Fix: cast the model before building its optimizer and the Recorder; to go on in "
                    f"the new precision, record that run as a history of its own (the steps before {self.step} "
                    "stay on disk, and Recorder.resume continues them in the recorded precision)")
            # compared where θ lives (.to is a no-op unless the model moved to another device between steps)
            if not torch.equal(p.detach(), self._last[name].to(p.device)):
                raise HistoryError(
                    f"parameter {name!r} changed between optimizer steps (before step "
                    f"{self.step}): only optimizer.step() may change parameters while recording, for the "
                    "decomposition splits only the optimizer's updates. Fix: remove what else changes it (a "
                    "clamp or max-norm projection after the step, an EMA copied in, weights loaded); a bound on "
                    "the weights can be written into forward instead (e.g. use w.clamp(-c, c) where w was used)"
                )
        if self.scheduler is not None and self.step > 0:
            # the loop has stepped its scheduler since the last step: store its state now
            if self._epoch_after_step is not None:  # (unknown right after a resume)
                self._observe_scheduler_steps(_schedule_position(self.scheduler) - self._epoch_after_step)
            self._write_resume_info(scheduler_stepped=True)
        elif not self._resume_tensors:
            # a new recording's first step: the state a kill resumes from until one after a step replaces it
            self._write_resume_tensors(self._rng_at_start)
            self._write_resume_info(scheduler_stepped=True)
        self._refuse_unmodelled_settings(optimizer)
        self._hyper = _group_hyperparameters(optimizer, self.kind)
        if self.check_every and (self.step % self.check_every == 0 or self.step in self._also_checked):
            self._check_gradient()

    def _refuse_unrecorded_changes(self, optimizer) -> None:
        """The history fixes which tensors the optimizer trains and the values of the frozen
        ones and buffers: a layer unfrozen or a mask edited mid-run would be explained wrongly."""
        if _members(optimizer) != self._members:
            raise UnsupportedError(
                f"the optimizer's parameter groups changed before step {self.step} (add_param_group, "
                "or tensors added or removed): a history records one fixed set of trained tensors. "
                "Fix: build the optimizer with every tensor it will train from the start, or record "
                "each phase of the run as its own history"
            )
        now = _constant_tensors(self.model, self._params)
        # compared on the host, a copy per step: kept on a GPU, a frozen backbone would take twice its memory there
        for name in sorted(now.keys() | self._constants.keys()):
            if name not in now or name not in self._constants or \
                    not torch.equal(now[name].detach().cpu(), self._constants[name]):
                kind, tensor = name.split("/", 1)
                raise HistoryError(
                    f"the {'frozen parameter' if kind == 'frozen' else 'buffer'} {tensor!r}, a constant of "
                    f"the recorded function, changed before step {self.step}: only optimizer.step() may change the model while "
                    "recording" + (" (a forward that updates a buffer in place, as a running statistic does, "
                                   "changes it at every step)" if kind != "frozen" else "")
                    + ". Fix: make the change before recording starts (a statistic computed from the dataset "
                    "beforehand), or train the tensor (requires_grad and in the optimizer)"
                )

    @property
    def _first_parameter(self) -> torch.Tensor:
        """The first trained tensor, whose dtype the history records as the run's."""
        return next(iter(self._params.values()))

    def _refuse_unmodelled_settings(self, optimizer) -> None:
        """Settings changed in param_groups mid-run that the history cannot model: maximize, or
        Adam's decoupled_weight_decay (which makes it AdamW), and tensor hyperparameters of
        lower precision than the parameters. Adam and AdamW compute their step size and bias
        corrections in the precision of a tensor learning rate or beta (as capturable or compiled
        optimizers use): in float32 on float64 parameters that moves them by ~1e-7 of a step away
        from any float64 model of the update."""
        kind = optimizer_kind(optimizer, f" before step {self.step}")  # (refuses maximize=True itself)
        if kind != self.kind:
            raise UnsupportedError(
                f"the optimizer became {kind} before step {self.step}, it was {self.kind} "
                "when recording started (decoupled_weight_decay changed in param_groups): a history "
                "records one optimizer. Fix: leave it as it was, or record each phase as its own history"
            )
        if self.kind == "sgd":  # SGD reads tensor hyperparameters as numbers
            return
        dtype = self._first_parameter.dtype
        for i, group in enumerate(optimizer.param_groups):
            for name, value in (("learning rate", group["lr"]), *(("beta", b) for b in group["betas"])):
                if torch.is_tensor(value) and torch.finfo(value.dtype).eps > torch.finfo(dtype).eps:
                    raise UnsupportedError(
                        f"param group {i}'s {name} is a {value.dtype} tensor and the parameters are "
                        f"{dtype}: {type(optimizer).__name__} then computes its step size in {value.dtype}, "
                        f"which the recorded {name} cannot reproduce. Fix: make it a {dtype} tensor "
                        f"(torch.tensor(value, dtype={dtype})) or a float"
                    )

    def _check_samples_alone(self, flat: FlatModel, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                             losses: torch.Tensor, tolerance: float) -> None:
        """explain() computes each sample's share of a step on that sample alone (a batch of one),
        and the shares add up to the step's gradient only if no sample's output depends on the
        others in its batch, which the gradient check on the whole batch cannot see: the first and
        last samples' losses alone must be their losses in the batch."""
        scale = losses.abs().max().clamp_min(torch.finfo(losses.dtype).tiny)
        # a random forward differs alone too: named as what it is, before it reads as batch mixing
        again = float((self.loss(flat.raw(theta, x), y) - losses).abs().max() / scale)
        if again > tolerance:
            raise UnsupportedError(
                f"at step {self.step} the model's forward gives other losses each time it runs on the same batch "
                f"and parameters (relative difference {again:.2e}): it draws random numbers (F.dropout(..., "
                "training=True), torch.rand in forward), which no decomposition can replay. Fix: remove the "
                "randomness from forward (dropout with p=0 or in eval mode; random augmentation in the loop, "
                "where batch() records the inputs it made)")
        for row in sorted({0, len(x) - 1}):
            try:
                alone = self.loss(flat.raw(theta, x[row:row + 1]), y[row:row + 1]).reshape(-1)[0]
            except Exception as error:  # forward or loss assumes a batch of several samples
                raise UnsupportedError(
                    f"at step {self.step} the model or the declared loss fails on one sample alone (a batch of "
                    f"1: sample {row} of the batch), on which explain() computes every sample's share of a step: "
                    f"{type(error).__name__}: {error}. Fix: make forward and the loss take a batch of any size, "
                    "including 1 (a squeeze() that drops the batch dim of a batch of one, say)") from error
            error = float((alone - losses[row]).abs() / scale)
            if error > tolerance:
                raise UnsupportedError(
                    f"at step {self.step} a sample's loss depends on the other samples of its "
                    f"batch: sample {row}'s loss is {float(losses[row]):.6g} in the batch and {float(alone):.6g} "
                    f"alone (relative difference {error:.2e}; tolerance {tolerance:.0e}). explain() computes each "
                    "sample's share of a step on that sample alone, so the shares would not add up to the step. "
                    "Causes: a statistic over the batch in forward (x.mean(0), a normalisation by the batch's mean "
                    "or variance, a Python branch on one), attention or pooling across the batch dim, a declared "
                    "loss that compares the samples (a contrastive loss). Fix: make forward and the loss treat "
                    "each sample on its own (LayerNorm or GroupNorm for a batch statistic; constants computed from "
                    "the dataset for a normalisation)")

    def _remember_resumed_schedule(self) -> None:
        """The schedule as a resume restored it: the one its first step runs with."""
        groups = [{key: value for key, value in group.items() if key != "params"} for group in self.optimizer.param_groups]
        state, groups = copy.deepcopy((self.scheduler.state_dict(), groups))
        self._resumed_schedule = (_schedule_position(self.scheduler), state, groups)

    def _undo_a_repeated_schedule_step(self) -> None:
        """A loop that steps its scheduler at the start of a step, before the batch, has stepped
        it again since the resume, which had brought it to this step already (the state stored
        for it, or caught up): put the schedule and the learning rates back where they were."""
        (position, state, groups), self._resumed_schedule = self._resumed_schedule, None
        if _schedule_position(self.scheduler) == position:
            return
        self.scheduler.load_state_dict(state)  # copies taken at the resume, used once
        for group, values in zip(self.optimizer.param_groups, groups):
            group.update(values)

    def _observe_scheduler_steps(self, steps: int) -> None:
        """A scheduler stepped per epoch steps 0 times after most optimizer steps and 1 after
        some: a resume cannot tell which count the killed step needed."""
        if self._scheduler_steps is not None and steps != self._scheduler_steps:
            self._scheduler_steps_vary = True
        self._scheduler_steps = steps

    def _check_gradient(self) -> None:
        """Compare .grad with the gradient of the declared loss on the declared batch."""
        _, x, y, w = self._pending
        p0 = self._first_parameter
        flat = FlatModel(self.model, self.layout, p0.dtype, p0.device)
        theta = torch.cat([p.detach().reshape(-1) for p in self._params.values()])
        x, y = flat.cast_inputs(x), y.to(p0.device)
        tolerance = self.check_tolerance
        if tolerance is None:
            tolerance = 1e-9 if p0.dtype == torch.float64 else 1e-3
        with torch.no_grad():
            losses = self.loss(flat.raw(theta, x), y)
            check_per_sample(self.loss_name, self.loss, losses, len(x))
            self._check_samples_alone(flat, theta, x, y, losses, tolerance)
        w = w.to(p0.device, p0.dtype) * (self._gradient_scale or 1.0)
        expected = flat.batch_gradient(theta, x, y, w, self.loss)
        actual = torch.cat([p.grad.reshape(-1) for p in self._params.values()])
        scale = expected.abs().max().clamp_min(torch.finfo(p0.dtype).tiny)
        error = ((actual - expected).abs().max() / scale).item()
        # the first checked step's .grad, to tell at the next one a gradient left over from it
        first_grad, self._first_grad = self._first_grad, actual if self.step == self._also_checked[0] else None
        if error > tolerance:
            if first_grad is not None and self.step == self._also_checked[1] and float(
                    (actual - expected - first_grad).abs().max() / scale) <= tolerance:
                raise UnsupportedError(
                    f"at step {self.step} the gradient in .grad is the declared loss's gradient on the recorded "
                    f"batch plus step {self._also_checked[0]}'s .grad (to {tolerance:.0e}, relative): "
                    "optimizer.zero_grad() was not called between the two steps, so backward() added this "
                    "step's gradient to the last one's. Fix: call optimizer.zero_grad() (or model.zero_grad()) "
                    "before each step's backward")
            if _grad_of_torch_kernels(flat, theta, x, y, w, self.loss, actual, scale, tolerance):
                raise UnsupportedError(_fused_attention_gradient(self.step, error))
            # torch's mse_loss / MSELoss mean over every element, outputs included
            mse = (" The built-in 'mse' sums a sample's squared errors over its outputs; for "
                   "torch's F.mse_loss / nn.MSELoss (a mean over outputs too) declare "
                   "loss=lambda o, t: ((o - t) ** 2).mean(1), and explain with target='logit' (the outputs "
                   "themselves: a declared loss's outputs are explained as log-probabilities unless told)."
                   ) if self.loss_name == "mse" else ""
            # torch's class-weighted mean divides by the batch's total weight, no per-sample loss's mean
            weighted = (" Class weights (F.cross_entropy(..., weight=w), nn.CrossEntropyLoss(weight=w)) are "
                        "declared as Recorder(..., class_weights=w), with a custom loss too (its mean then divides "
                        "by the batch's total class weight, as torch's does)."
                        ) if takes_class_weights(self.loss_name) and self.class_weights is None else ""
            # torch's weighted mean of each micro-batch divides by that micro-batch's weight, not the batch's
            accumulated = (" With class weights, gradient accumulation whose micro-batches' weighted mean losses were "
                           "averaged is no weighted mean over the step's batch, even over micro-batches of equal size: "
                           "divide each micro-batch's weighted summed loss (reduction='sum') by the total class weight "
                           "of the step's whole batch instead."
                           ) if self.class_weights is not None else ""
            # each micro-batch's token mean divides by its own count of tokens, not the step's
            accumulated += (" With reduction='token_mean', gradient accumulation whose micro-batches' mean losses "
                            "were averaged is no mean over the step's target tokens, even over micro-batches of equal "
                            "size (their counts of tokens differ): divide each micro-batch's summed loss "
                            "(reduction='sum') by the count of target tokens that are not -100 in the step's whole "
                            "batch (as Hugging Face's num_items_in_batch)."
                            ) if self.reduction == "token_mean" else ""
            smoothing = (" Label smoothing is declared as loss=lambda o, t: F.cross_entropy(o, t, "
                         "label_smoothing=eps, reduction='none')."
                         ) if self.loss_name == "cross_entropy" else ""
            # a float64 run that misses by about float32's rounding computes some step in float32
            # the history is the union of the processes' shards, under the gradient DDP averages
            group = _data_parallel(self.model)[2]
            shards = (f" This run has {self._processes} processes: the checked batch joins every process's shard, "
                      "and .grad must be the average of their gradients (DistributedDataParallel averages them; "
                      "processes that train apart pass a path each).") if self._processes > 1 else (
                f" This process is one of {group} in a process group, recording a run of its own (a path of its "
                "own): if DistributedDataParallel averages their gradients, build the Recorder in every process "
                "with the same path, which records the run of all of them.") if group > 1 else ""
            float32_loss = (" A miss this small in a float64 run is float32 rounding: a step of the loop computes in "
                            "float32, as Hugging Face's model(..., labels=...).loss does (it casts the logits to "
                            "float32). Compute the loss from the logits in float64 (the declared per-sample loss, "
                            f"{_REDUCED[self.reduction]}) for an exact record, or pass check_tolerance=1e-6 and expect "
                            "residuals of float32's precision.") if p0.dtype == torch.float64 and error <= 1e-5 else ""
            extras = "".join("\n" + extra.strip() for extra in (mse, weighted, accumulated, smoothing, shards,
                                                                  float32_loss) if extra)
            raise UnsupportedError(
                f"at step {self.step} the gradient in .grad differs from the gradient of the "
                f"declared loss ({self.loss_name}, reduction={self.reduction!r}) on the "
                f"recorded batch by {error:.2e} (relative; tolerance {tolerance:.0e}).{_multiple(actual, expected, scale, y, self.reduction)}"
                " The usual causes, and their fixes:\n"
                "- optimizer.zero_grad() forgotten: the last step's gradient is still in .grad (zero it before each "
                "step's backward);\n"
                "- a loss, loss reduction or loss term other than the declared ones: declare the loss you use "
                "(loss=callable returning per-sample losses);\n"
                "- gradient clipping or scaling: clip the norm with rec.clip_grad_norm_(max_norm) in place of "
                "torch.nn.utils.clip_grad_norm_, which records the factor (clipping by value cannot be recorded);\n"
                "- dropout or other randomness in forward, which the recorded tensors cannot reproduce;\n"
                "- mixed precision (torch.autocast), whose low-precision rounding of every product the recorded "
                "tensors cannot reproduce: train in float32 or float64;\n"
                "- gradient accumulation over micro-batches of unequal size whose mean losses were averaged: "
                "divide each micro-batch's summed loss by the size of the step's whole batch instead (its "
                "gradient is then the mean over that batch);\n"
                "- inputs passed to batch() that differ from those the model saw: pass the batch as the model "
                "took it (after any augmentation)."
                f"{extras}"
            )

    def _after_step(self, optimizer, args, kwargs) -> None:
        indices, inputs, targets, _ = self._pending
        self._pending = None
        after = {n: _cpu(p) for n, p in self._params.items()}
        self._refuse_non_finite(after)  # at every process: each holds the same parameters
        rngs = self._every_rng_state()
        if not self._writes:  # process 0 writes the step
            self._gradient_scale = None
            self.step += 1
            return
        tensors = {f"param/{n}": t for n, t in after.items()}
        moments: dict[int, torch.Tensor] = {}  # host copies by id of the optimizer's tensor: the resume state's too
        if self.kind in ("adam", "adamw"):
            for n, p in self._params.items():
                state = optimizer.state[p]
                amsgrad = self._hyper[self._group_of[n]]["amsgrad"]
                moment = state["max_exp_avg_sq" if amsgrad else "exp_avg_sq"]
                tensors[f"second_moment/{n}"] = moments[id(moment)] = _cpu(moment)
                # the bias-correction step count t, per group
                self._hyper[self._group_of[n]]["t"] = int(_scalar(state["step"]))
        tensors.update({"batch/indices": indices, "batch/inputs": inputs, "batch/targets": targets})
        data = save_safetensors(tensors)
        file = step_file(self.step)
        _write_atomic(self._dir / file, data)
        line = {"step": self.step, "file": file, "bytes": len(data), "sha256": _sha256(data),
                "groups": self._hyper, "batch_size": len(indices)}
        if self._processes > 1:
            line["shards"] = self._shards
        if self._gradient_scale is not None:
            line["gradient_scale"] = self._gradient_scale
            self._gradient_scale = None
        self._manifest.write(_manifest_line(line))
        self._manifest.flush()
        os.fsync(self._manifest.fileno())
        self._last = _as_compared(self._params, after)
        self.step += 1
        self._write_resume_tensors(rngs, copied=moments)
        if self.scheduler is not None:
            self._epoch_after_step = _schedule_position(self.scheduler)
        if self.scheduler is None or self._scheduler_steps is not None:
            self._write_resume_info(scheduler_stepped=False)
        # else how often the loop steps its scheduler is learned at the next step: until then the
        # state stored at step 0's batch resumes the run, which records step 0 again
        if self._dir != self.path:  # the first step has passed its checks
            self._manifest.close()
            self._take_its_place()
            self._manifest = open(self.path / "manifest.jsonl", "a")

    def _refuse_non_finite(self, params: dict[str, torch.Tensor]) -> None:
        """NaN != NaN: without this, the next step would blame the loop for changing θ."""
        for name, value in params.items():
            if not torch.isfinite(value).all():
                raise UnsupportedError(
                    f"parameter {name!r} became NaN or infinite at step {self.step}: the run "
                    "diverged, and a diverged run has no decomposition. Fix: lower the learning "
                    "rate, and keep Adam's eps > 0"
                )

    def _every_rng_state(self) -> dict[str, torch.Tensor] | None:
        """This process's global RNGs (_rng_states); in a data-parallel run every process's, at process
        0 (None elsewhere), process r's under "process{r}/": each may draw its own augmentation, and a
        resume restores each its own."""
        own = _rng_states()
        if self._processes == 1:
            return own
        every = [None] * self._processes if self._writes else None
        dist.gather_object(own, every, dst=self._writer, group=self._group)
        if not self._writes:
            return None
        return {**every[0], **{f"process{rank}/{key}": value for rank, states in enumerate(every[1:], 1)
                               for key, value in states.items()}}

    def _write_resume_tensors(self, rngs: dict[str, torch.Tensor],
                              copied: dict[int, torch.Tensor] | None = None) -> None:
        """Optimizer state and RNGs right after a step (before the next batch draws from them; at
        step 0, `rngs` as the recording started), into the file the current resume.json does not name.
        `copied`: host copies, by id, of optimizer tensors the step file holds (on a GPU, not copied twice)."""
        copied = copied or {}
        tensors = dict(rngs)
        for idx, entry in self.optimizer.state_dict()["state"].items():
            for key, value in entry.items():
                tensors[f"optimizer/{idx}/{key}"] = copied[id(value)] if id(value) in copied else \
                    _cpu(torch.as_tensor(value))
        data = save_safetensors(tensors)
        self._resume_tensors = {"tensors": f"resume-{self.step % 2}.safetensors", "tensors_sha256": _sha256(data)}
        _write_atomic(self._dir / self._resume_tensors["tensors"], data)

    def _write_resume_info(self, scheduler_stepped: bool) -> None:
        """Hyperparameters and scheduler state. Written at a new recording's first batch, after
        each step, and again before the next one once the loop has stepped its scheduler; a run
        killed in between is resumed by stepping the scheduler as often as the loop did per step,
        or, where that count is not fixed (a per-epoch scheduler, a ReduceLROnPlateau's metric),
        from `before_step`, the state stored before that step, which it redoes."""
        info = _plain({
            "next_step": self.step,
            "param_groups": self.optimizer.state_dict()["param_groups"],
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scheduler_stepped": scheduler_stepped,
            "scheduler_steps_per_step": self._scheduler_steps,
            "scheduler_steps_vary": self._scheduler_steps_vary,
            **self._resume_tensors,
        })
        if scheduler_stepped:
            self._schedule_info = info  # (plain: copies, which the schedule's next steps leave as they are)
        elif self.scheduler is not None and self._schedule_info is not None and \
                self._schedule_info["next_step"] == self.step - 1:
            info["before_step"] = self._schedule_info  # whose tensors file this step's state did not replace
        try:
            _write_atomic(self._dir / "resume.json", _json_bytes(info))
        except TypeError as err:
            raise UnsupportedError(
                f"the scheduler's state_dict cannot be stored as JSON ({err}); "
                "use a torch.optim.lr_scheduler whose lambdas are plain functions"
            ) from err

    def close(self) -> None:
        if self._closed:
            return
        for hook in self._hooks:
            hook.remove()
        self._close_manifest()
        self._closed = True
        if self._pending is not None:
            self._abandon_replacement()
            raise InputError("batch() was declared but optimizer.step() never ran for it")
        if not self._writes:
            return
        closed = {
            "meta_sha256": _sha256((self._dir / "meta.json").read_bytes()),
            "n_steps": self.step,
            "final_sha256": _manifest_last_hash(self._dir),
            "manifest_sha256": _sha256((self._dir / "manifest.jsonl").read_bytes()),
            "train_indices": sorted(self._seen),
            **self._train_labels(),
        }
        _write_atomic(self._dir / "closed.json", _json_bytes(closed))
        if self._dir != self.path:  # closed without a step
            self._take_its_place()

    def _train_labels(self) -> dict:
        """closed.json's train_labels, so that a History need not read them from every step file
        (0.22 s at 2,000 steps, on each explain that keeps the train dim): each sample's class in
        train_indices' order, null where the targets are not one class per sample, and no entry
        where the recorder did not check every sample's target (the History then reads the steps)."""
        if not self._class_targets:
            return {"train_labels": None}
        labels = [self._target_of.get(index) for index in sorted(self._seen)]
        return {} if None in labels else {"train_labels": [int(target) for target, _ in labels]}

    def __enter__(self) -> "Recorder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # keep the history resumable: do not mark it closed
            for hook in self._hooks:
                hook.remove()
            self._close_manifest()
            self._closed = True
            self._abandon_replacement()

    def _close_manifest(self) -> None:
        if self._manifest is not None:  # (only process 0 of a data-parallel run writes one)
            self._manifest.close()

    # ----------------------------------------------------------------- resuming

    @classmethod
    def resume(cls, path, model: nn.Module, optimizer: torch.optim.Optimizer, *, scheduler=None,
               loss=None, reduction: str | None = None, class_weights=None, **kwargs) -> "Recorder":
        """Continue a killed recording from its last complete step.

        Loads θ, the optimizer's and scheduler's state and the global RNGs' states of that step
        into the given objects; continue the training loop at `recorder.step`. A step stored after
        the last resume state, and a manifest line cut by the crash, are dropped from the
        manifest: the resumed loop records that step again. `loss`, `reduction` and
        `class_weights` default to the recorded ones (a custom loss must be passed again). A
        data-parallel recording is resumed by every process of a run of as many, each of which
        gets its own RNG states back (process 0 alone rewrites the manifest).
        """
        history = History(path, allow_incomplete=True, _no_step_ok=_resumes_from_the_start(path))
        if history.closed:
            raise HistoryError(f"{path} is a closed, complete history: there is nothing to resume")
        _, rank, processes = _data_parallel(model)
        if "processes" not in history.meta and not isinstance(model, nn.parallel.DistributedDataParallel):
            rank, processes = 0, 1  # a run of one process, as the Recorder finds it (its path is its own)
        if processes != history.meta.get("processes", 1):
            raise InputError(
                f"{history.path} was recorded by {history.meta.get('processes', 1)} data-parallel process(es), and "
                f"is resumed by {processes}: each process continues its own random generators, and a step's batch "
                "joins one shard per process. Fix: resume with as many processes as recorded, each calling "
                "Recorder.resume on the same path (which they all read)")
        history.check_model(model)
        _refuse_another_setup(history, model, optimizer)
        if scheduler is not None:
            _check_scheduler(scheduler, optimizer)  # before the resume rewrites anything
        path = history.path
        info = _read_resume_info(path, history.n_steps)
        declared = _resumed_loss(history, loss, reduction, class_weights)
        if scheduler is None and info["scheduler"] is not None:
            raise InputError(
                f"{path} was recorded with a learning-rate scheduler, whose state the resume "
                "restores: without it the resumed run follows another schedule. Fix: pass "
                "Recorder.resume(..., scheduler=scheduler), built as in the killed run"
            )
        if scheduler is not None and info["scheduler"] is None:
            raise InputError(
                f"{path} was recorded without scheduler=, so no scheduler state was stored and the "
                "resume cannot restore the one passed: restarted, it would follow another schedule. "
                "Fix: record the run again with Recorder(..., scheduler=scheduler); or resume with "
                "scheduler=None and set the learning rates of the resumed steps yourself (the optimizer "
                "gets those of the last recorded step)"
            )
        if scheduler is not None and info["scheduler"] is not None:
            _refuse_another_kind_of_scheduler(scheduler, info["scheduler"], path)
            if _redoes_the_killed_step(scheduler, info):
                info = info["before_step"]  # the killed step is redone, its schedule known
        step = min(info["next_step"], history.n_steps)
        if step < info["next_step"]:
            raise HistoryError(f"{path}: resume state is ahead of the manifest; the history is damaged")
        seen, target_of, class_targets = _declared_targets(history, step, path)
        resumed = {**history.params(step), **history.constants()}  # θ, and the constants it was trained with
        if rank == 0:  # (the history's writer; every process has read it above)
            _keep_manifest_lines(path, history.manifest[:step])  # (step 0: none; θ_0 is the initial file's)
        tensors = _read_resume_tensors(path, info)
        named = {**dict(module_of(model).named_parameters()), **dict(module_of(model).named_buffers())}
        with torch.no_grad():  # (checked to fit above)
            for name, value in resumed.items():
                named[name].copy_(value)
        opt_state: dict = {}
        for key, value in tensors.items():
            if key.startswith("optimizer/"):
                _, idx, name = key.split("/", 2)
                opt_state.setdefault(int(idx), {})[name] = value
        _warn_of_other_hyperparameters(optimizer, info["param_groups"], path)
        optimizer.load_state_dict({"state": opt_state, "param_groups": info["param_groups"]})
        unknown = None  # a schedule the resume cannot place: refused if the loop records another step
        if scheduler is not None and info["scheduler"] is not None:
            scheduler.load_state_dict(_keys_restored(_unplain(info["scheduler"]), scheduler.state_dict()))
            _warn_of_another_schedule(scheduler, path)  # before a catch-up step overwrites the recorded rates
            if not info["scheduler_stepped"]:
                unknown = _unknown_schedule(scheduler, info, path)
                if unknown is None:
                    _catch_up(scheduler, info["scheduler_steps_per_step"])
        _set_rng_states(_rng_states_of(tensors, rank), path)
        recorder = cls(path, model, optimizer, scheduler=scheduler, _resume_from=step, **declared, **kwargs)
        if scheduler is not None:
            recorder._remember_resumed_schedule()
        recorder._scheduler_steps = info["scheduler_steps_per_step"]
        recorder._scheduler_steps_vary = info.get("scheduler_steps_vary", False)
        recorder._resume_tensors = {key: info[key] for key in ("tensors", "tensors_sha256")}
        recorder._unknown_schedule = unknown  # (a loop that had finished records no step: it closes)
        recorder._seen, recorder._target_of, recorder._class_targets = seen, target_of, class_targets
        return recorder


# hyperparameters that no torch scheduler moves (OneCycleLR cycles momentum and β1, which are
# therefore compared only in a run without a scheduler), and lr as a scheduler's base
_FIXED_HYPERPARAMETERS = ("initial_lr", "weight_decay", "eps", "dampening", "nesterov", "amsgrad", "maximize")


def _warn_of_other_hyperparameters(optimizer: torch.optim.Optimizer, recorded: list[dict], path: Path) -> None:
    """The resume restores the recorded hyperparameters: an optimizer built with others (a changed
    config) is told that they are not used, rather than left to believe it trains with them."""
    differences = []
    for index, (given, kept) in enumerate(zip(optimizer.param_groups, recorded)):
        pairs = [(key, given.get(key), kept.get(key)) for key in _FIXED_HYPERPARAMETERS]
        if "betas" in given:
            pairs.append(("β2", given["betas"][1], kept["betas"][1]))
        if "initial_lr" not in kept:  # no scheduler: momentum and β1 stay as built
            pairs += [("momentum", given.get("momentum"), kept.get("momentum")),
                      ("β1", given.get("betas", (None,))[0], kept.get("betas", (None,))[0])]
        differences += [f"{key}={value!r} in group {index} (recorded: {old!r})" for key, value, old in pairs
                        if value is not None and old is not None and _scalar(value) != _scalar(old)]
    if differences:
        warnings.warn(f"Recorder.resume({str(path)!r}) was given an optimizer with {', '.join(differences)}: the "
                      "resume restores the recorded hyperparameters, so the resumed steps continue the recorded "
                      "run with those. To train with the new ones, record a new run", stacklevel=3)


def _frozen_after_start(name: str, step: int) -> str:
    return (f"parameter {name!r} was frozen (requires_grad_(False)) after the recording started: at step {step} "
            "it no longer requires a gradient, but a history's trained tensors are those of its first step. Fix: "
            "record each phase as a history of its own (close this Recorder, freeze, and record the rest with a "
            "new one), or freeze it before the Recorder is built")


def _no_gradient(name: str, step: int) -> str:
    """Why a trained tensor without .grad cannot be recorded: it did not enter the loss."""
    skipped = (f"parameter {name!r} has no gradient at step {step}, so the optimizer skips it (no decay, "
               "no momentum, no step counted), which explaind cannot model")
    return (f"{skipped}: it did not enter this step's loss (a branch not taken, a head unused by this "
            "batch). Fix: give it a zero gradient where it got none, before optimizer.step() (for p in "
            "model.parameters(): if p.grad is None: p.grad = torch.zeros_like(p)), which the optimizer "
            "steps as any other tensor; or, if it is never trained, freeze it (requires_grad_(False)) "
            "before the Recorder is built. A model whose forward the loop switches between steps (a flag "
            "that picks a head) is another function at each step, which one history cannot explain")


# the Recorders of this process not closed yet: a history one of them still writes is not a killed run's
_OPEN_RECORDERS: "weakref.WeakSet[Recorder]" = weakref.WeakSet()


def _recording(path: Path) -> bool:
    return any(rec.path == path and not rec._closed for rec in list(_OPEN_RECORDERS))


def _multiple(actual: torch.Tensor, expected: torch.Tensor, scale: torch.Tensor, targets: torch.Tensor,
              reduction: str) -> str:
    """What a gradient check says when .grad is the declared gradient times a factor (to
    rounding), which names the mistake: a count of backward passes added up, the batch size, or
    a mean over the batch's tokens."""
    factor = float(actual @ expected / (expected @ expected).clamp_min(torch.finfo(expected.dtype).tiny))
    if factor == 0 or float((actual - factor * expected).abs().max() / scale) > 1e-6 * max(1.0, abs(factor)):
        return ""
    if abs(factor - 1) <= 1e-6:  # a miss within the fit's own tolerance fits any factor near 1: it names none
        return ""
    said = f" .grad is {factor:.6g} times the declared gradient"
    batch = len(targets)
    if math.isclose(factor, batch, rel_tol=1e-6) or math.isclose(factor, 1 / batch, rel_tol=1e-6):
        return said + f", a factor of the batch size ({batch}): the loss's reduction is not the declared one."
    if tokens := _token_mean(factor, targets, reduction):
        return said + tokens
    if factor >= 256 and math.isclose(math.log2(factor), round(math.log2(factor)), abs_tol=1e-9):
        return said + (": a loss scaled by a power of two, as torch.amp.GradScaler scales it: call "
                       "scaler.unscale_(optimizer) before batch() (docs/library.md, loss scaling).")
    if factor >= 2 and math.isclose(factor, round(factor), rel_tol=1e-6):
        return said + (f": {round(factor)} backward passes' gradients added up, as gradient accumulation whose "
                       "micro-batch losses are not divided by their number makes.")
    if 0 < factor < 1:
        return said + (": one factor below 1 on every coordinate is what clipping the gradient's norm makes "
                       "(torch.nn.utils.clip_grad_norm_); clip with rec.clip_grad_norm_(max_norm), which records "
                       "the factor.")
    return said + "."


def _token_mean(factor: float, targets: torch.Tensor, reduction: str) -> str:
    """torch's cross-entropy over a batch's positions flattened into one batch divides by the
    batch's counted target tokens (those not -100, its ignore_index): declared as a mean of
    per-sample losses, .grad is the declared gradient times rows · m / counted, with m the
    positions of a row for a per-sample mean over them, or 1 for a sum; declared as
    reduction='token_mean' with a per-sample mean over positions, m times."""
    if targets.dim() < 2 or targets.is_floating_point() or targets.is_complex():
        return ""
    counted, entries = int((targets != IGNORE_INDEX).sum()), targets.numel()
    positions = entries // len(targets)
    sum_over_positions = "F.cross_entropy(out.transpose(1, 2), y, reduction='none').sum(1)"
    if reduction == "token_mean":
        if not math.isclose(factor, positions, rel_tol=1e-6):
            return _other_tokens_read(factor, counted, int((targets != IGNORE_INDEX).flatten(1).any(1).sum()))
        return (f": reduction='token_mean' divides by the batch's target tokens itself, so the per-sample loss is "
                f"each sequence's sum over its {positions} positions, not their mean. Fix: declare "
                f"loss=lambda out, y: {sum_over_positions}.")
    if not counted or not any(math.isclose(factor, len(targets) * m / counted, rel_tol=1e-6) for m in (positions, 1)):
        return ""
    padding = f" that are not -100 (torch's ignore_index; {entries - counted} of its {entries} are)" if (
        counted < entries) else ""
    return (f": the mean over the batch's {counted} target tokens{padding}, as torch's cross-entropy of the positions "
            "flattened into one batch takes it. Fix: declare reduction='token_mean', which divides by that count in "
            "every batch, with each sequence's sum over its positions as the per-sample loss "
            f"(loss=lambda out, y: {sum_over_positions}).")


def _wrapped_otherwise(recorded: set[str], given: set[str]) -> str:
    """Where every recorded name is a given one under one more module prefix (or the reverse),
    the run was recorded with a module that wraps the given one (a wrapper that hands a Hugging
    Face model its mask) or inside one: say which module to pass."""
    if (prefix := _common_prefix(recorded, given)) is not None:
        return (f"Every recorded name is one of the model's under {prefix!r}: the run was recorded with a module "
                f"that holds this one as its {prefix!r} (a wrapper, such as one that hands the model its mask): "
                "pass that wrapper. ")
    if (prefix := _common_prefix(given, recorded)) is not None:
        return (f"Every name of the model is a recorded one under {prefix!r}: the run was recorded with the "
                f"model's {prefix!r} alone: pass that module. ")
    return ""


def _common_prefix(outer: set[str], inner: set[str]) -> str | None:
    """The module name m where `outer` is `inner` with "m." before each name, else None."""
    first = next(iter(outer), "")
    if "." not in first:
        return None
    prefix = first.split(".")[0] + "."
    if all(n.startswith(prefix) for n in outer) and {n[len(prefix):] for n in outer} == inner:
        return prefix[:-1]
    return None


# how a loop reduces the declared per-sample losses to the loss it trains on, per reduction
_REDUCED = {"mean": "averaged", "sum": "summed",
            "token_mean": "summed over the batch and divided by its count of target tokens that are not -100"}


def _grad_of_torch_kernels(flat: FlatModel, theta, x, y, w, loss, actual, scale, tolerance: float) -> bool:
    """Whether .grad is the declared gradient as torch's own attention kernels compute it, where
    explaind's math kernel gives another. Asked on the CPU alone, where the two differ by attention
    alone (a GPU's TF32 too); a kernel torch.func cannot differentiate leaves the usual causes."""
    if theta.device.type != "cpu":
        return False
    try:
        with flat.torch_kernels():
            as_trained = flat.batch_gradient(theta, x, y, w, loss)
    except RuntimeError:  # such as the fast path of a module in eval mode, which has no derivative
        return False
    return float((actual - as_trained).abs().max() / scale) <= tolerance


def _fused_attention_gradient(step: int, error: float) -> str:
    """.grad is the declared gradient as torch's own attention kernels compute it, which differs
    from the math kernel's: a fused kernel's backward is not its forward's derivative there."""
    return (f"at step {step} the gradient in .grad is not the derivative of the declared loss: .grad is what torch's "
            "fused attention kernel (F.scaled_dot_product_attention, which the model calls) computes on the recorded "
            f"batch, but its math kernel, whose gradient is the loss's derivative, gives one that differs by "
            f"{error:.2e} (relative). torch's fused CPU kernel does so for a query whose every key is masked, as a "
            "padding position of a left-padded batch is under a 4D mask. The training loop's gradients are then "
            "wrong, and no history can reproduce them. Fix: train with the math kernel (with "
            "torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH): around forward and backward), or "
            "build the model with attn_implementation='eager', or leave no query row fully masked (let each "
            "position attend to its own key: no real query attends a padding key, so real positions' outputs stay "
            "as they were)")


def _other_tokens_read(factor: float, counted: int, rows: int) -> str:
    """reduction='token_mean' divides by the declared targets' count; .grad is `factor` times its
    gradient when the loss divided by another count, counted / factor: the loss reads other
    positions than the declared targets hold, one fewer per sequence where it shifts them itself
    (a next-token loss given the labels unshifted, as Hugging Face's models take them)."""
    read = counted / factor if counted else 0.0
    if read < 1 or not math.isclose(read, round(read), rel_tol=1e-9) or round(read) == counted:
        return ""
    read = round(read)
    said = (f": reduction='token_mean' divides by the declared targets' {counted} tokens that are not -100, but .grad "
            f"is the mean over {read} tokens, so the loss reads other positions than the targets passed to batch()")
    if read != counted - rows:
        return said + ". Fix: pass batch() the targets the loss reads, -100 where it reads none."
    return said + (f": {rows} fewer, one per sequence, as a next-token loss that shifts its labels reads them "
                   "(logits[:, :-1] against labels[:, 1:]). Fix: pass batch() the labels shifted (labels[:, 1:]) "
                   "and declare the loss on them (F.cross_entropy(out.logits[:, :-1].transpose(1, 2), y, "
                   "reduction='none').sum(1)), or set each sequence's first label to -100, which no next-token "
                   "loss reads.")


def _warn_of_another_schedule(scheduler, path: Path) -> None:
    """A LambdaLR's functions are not stored (only their state): restored, each gives its rate
    at the recorded step again, which is the recorded rate only if the function is the killed
    run's. Another one (a changed warm-up) would silently take the resumed steps on another
    schedule. Nested schedulers (SequentialLR, ChainedScheduler) are looked into."""
    differences = []
    for inner in _schedulers_within(scheduler):
        if isinstance(inner, torch.optim.lr_scheduler.LambdaLR):
            rates = [base * rule(inner.last_epoch) for base, rule in zip(inner.base_lrs, inner.lr_lambdas)]
            differences += [f"{new:.6g} in group {index} (recorded: {old:.6g})"
                            for index, (new, old) in enumerate(zip(rates, inner.get_last_lr()))
                            if not math.isclose(new, old, rel_tol=1e-12, abs_tol=1e-300)]
    if differences:
        warnings.warn(f"Recorder.resume({str(path)!r}) was given a LambdaLR whose function sets the learning rate of "
                      f"its recorded step to {', '.join(differences)}: it is not the killed run's function (a "
                      "scheduler's functions are not stored), so the resumed steps follow another schedule and the "
                      "history will not be the uninterrupted run's. Fix: build the scheduler with the killed run's "
                      "function; to train on the new schedule, record a new run", stacklevel=3)


def _refuse_another_kind_of_scheduler(scheduler, stored: dict, path: Path) -> None:
    """load_state_dict restores the fields the killed run's scheduler stored; a field of the given
    one that it did not store (StepLR's step_size where MultiStepLR stored milestones) keeps the
    given value, and the resumed steps would silently follow another schedule."""
    unrestorable = _unrestorable_fields(scheduler, stored)
    if unrestorable:
        raise InputError(
            f"{path} was recorded with another kind of scheduler than the one given to the resume: its stored state "
            f"has no {'; no '.join(unrestorable)}, which the resume cannot restore, so the resumed steps would follow "
            "another schedule than the killed run's. Fix: build the scheduler as in the killed run (its kind and "
            "arguments) and pass it as Recorder.resume(..., scheduler=scheduler)")


def _unrestorable_fields(scheduler, stored: dict) -> list[str]:
    """The public fields of the scheduler's state (and of those it chains or sequences) that the
    stored state lacks, each named with the fields the stored state has instead."""
    fields = [key for key in stored if not key.startswith("_")]
    missing = [f"{type(scheduler).__name__}'s {key} (it holds {', '.join(fields)})"
               for key in scheduler.state_dict() if not key.startswith("_") and key not in stored]
    inner, stored_inner = list(getattr(scheduler, "_schedulers", ())), stored.get("_schedulers") or []
    if len(inner) != len(stored_inner):
        missing.append(f"{len(inner)} schedulers within {type(scheduler).__name__} (it holds {len(stored_inner)})")
    for each, its_state in zip(inner, stored_inner):
        missing += _unrestorable_fields(each, its_state)
    return missing


def _schedulers_within(scheduler) -> list:
    """The scheduler and those it chains or sequences, depth first."""
    return [scheduler, *(s for inner in getattr(scheduler, "_schedulers", ()) for s in _schedulers_within(inner))]


def _refuse_another_setup(history: "History", model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """A resume continues the recorded run: another dtype, optimizer, grouping or set of constants
    would mix two runs in one history (or fail deep inside torch), so it is refused before the
    history is touched."""
    dtypes = {str(p.dtype).removeprefix("torch.") for p in trainable_parameters(model).values()}
    recorded = {p["dtype"] for p in history.meta["params"]}
    if dtypes != recorded:
        raise InputError(f"{history.path} was recorded in {sorted(recorded)}, the model to resume is in "
                         f"{sorted(dtypes)}: one history holds one precision. Fix: convert the model first, "
                         f"e.g. model.to({', '.join(f'torch.{d}' for d in sorted(recorded))})")
    kind, groups = optimizer_kind(optimizer), len(optimizer.param_groups)
    if (kind, groups) != (history.optimizer, history.meta["n_groups"]):
        raise InputError(f"{history.path} was recorded with {history.optimizer} over {history.meta['n_groups']} "
                         f"parameter group(s), the resume was given {kind} over {groups}: a resume continues "
                         "the recorded run. Fix: build the optimizer as the killed run did")
    group_of = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
    moved = [p["name"] for p in history.meta["params"]
             if group_of.get(id(trainable_parameters(model)[p["name"]])) != p["group"]]
    if moved:
        raise InputError(f"parameters {moved[:5]} are not in the parameter group they were recorded in: a resume "
                         "continues the recorded run. Fix: build the optimizer's groups as the killed run did")
    def kinds(tensors):  # a resume copies the recorded constants into the model's: they must fit
        return {n: (tuple(t.shape), t.dtype) for n, t in tensors.items()}

    constants = kinds(_constant_tensors(module_of(model), trainable_parameters(model)))
    recorded = kinds({n: t for n, t in history.initial().items() if n.startswith(("frozen/", "buffer/"))})
    if constants != recorded:
        differ = sorted(n for n in set(constants) | set(recorded) if constants.get(n) != recorded.get(n))[:5]
        raise InputError(f"the model's frozen parameters and buffers differ from those {history.path} recorded, "
                         f"in name, shape or dtype: {differ}. Fix: pass the architecture that was trained")


def _target_conflict(target_of: dict[int, tuple], indices: torch.Tensor, targets: torch.Tensor, step: int,
                     loss_name: str) -> tuple[int, object, tuple] | None:
    """Add the targets of step `step`'s batch to `target_of` (dataset index: (target, first
    step)), or return the first (index, target, what was declared before) that contradicts it,
    adding nothing. An index names one sample of the dataset: declared again with another target,
    it is not a dataset index (a row's position in its batch, say), and the train dim would mix
    samples. Checked: class targets, and the targets of a regression (MSE), which are the sample's
    own; not class probabilities, which a loop may mix anew each step (mixup), nor a custom
    loss's, which may be anything. (A dict lookup per row: 1.7 ms for 4,000 rows, where a
    sort-and-search in torch took 6.5 ms in its twenty small ops, both on a busy 2-core CPU.)"""
    if targets.is_complex() or (targets.is_floating_point() and loss_name != "mse") \
            or (not targets.is_floating_point() and targets.dim() != 1):
        return None
    new: dict[int, tuple] = {}
    for index, target in zip(indices.tolist(), targets.tolist()):
        first = target_of.get(index) or new.setdefault(index, (target, step))
        if first[0] != target:
            return index, target, first
    target_of.update(new)
    return None


def _declared_targets(history: "History", stop: int, path: Path) -> tuple[set[int], dict[int, tuple], bool]:
    """The dataset indices that steps 0 … stop−1 declared, the target of each that is checked
    (what a resumed Recorder checks its new batches against), and whether every batch declared
    one class per sample."""
    seen: set[int] = set()
    target_of: dict[int, tuple] = {}
    class_targets = True
    for s in range(stop):
        batch = history._step_tensors(s)
        conflict = _target_conflict(target_of, batch["batch/indices"], batch["batch/targets"], s, history.loss)
        if conflict is not None:
            index, target, (first_target, first_step) = conflict
            raise HistoryError(
                f"{path}: step {s} declares dataset index {index} with target {target}, but step {first_step} "
                f"with target {first_target}: the history's train dim mixes samples (recorded by an explaind "
                "that did not check this yet). Fix: record the run again with overwrite=True, passing each "
                "row's index in the dataset"
            )
        seen.update(batch["batch/indices"].tolist())
        class_targets = class_targets and _one_class_each(batch["batch/targets"])
    return seen, target_of, class_targets


def _one_class_each(targets: torch.Tensor) -> bool:
    """Whether a batch's targets are one class index per sample ([batch] integers)."""
    return targets.dim() == 1 and not (targets.is_floating_point() or targets.is_complex()
                                       or targets.dtype == torch.bool)


def _rng_states() -> dict[str, torch.Tensor]:
    """The global RNGs a loop may draw its batches and augmentation from, as tensors: torch's on
    the CPU and, once this process has started CUDA, on each CUDA device (augmentation or an order
    drawn on a GPU), numpy's and Python's `random` (a Generator object of the loop's own is its to
    seed). Asking a CUDA that has not started would start it, for a run that draws nothing there."""
    version, keys, gauss = random.getstate()
    _, mt, position, has_gauss, numpy_gauss = np.random.get_state(legacy=True)
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
    return {
        **{f"rng/cuda/{device}": state for device, state in enumerate(cuda)},
        "rng/cpu": torch.get_rng_state(),
        "rng/python": torch.tensor([version, *keys], dtype=torch.int64),
        "rng/python_gauss": torch.tensor([math.nan if gauss is None else gauss], dtype=torch.float64),
        "rng/numpy": torch.from_numpy(mt.astype(np.int64)),
        "rng/numpy_position": torch.tensor([position, has_gauss], dtype=torch.int64),
        "rng/numpy_gauss": torch.tensor([numpy_gauss], dtype=torch.float64),
    }


def _rng_states_of(tensors: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """The RNG states of data-parallel process `rank` among the resume tensors (process 0's, or a
    run of one process: those named rng/...)."""
    prefix = f"process{rank}/" if rank else ""
    return {key.removeprefix(prefix): value for key, value in tensors.items() if key.startswith(f"{prefix}rng/")}


def _set_rng_states(tensors: dict[str, torch.Tensor], path: Path) -> None:
    torch.set_rng_state(tensors["rng/cpu"])
    _set_cuda_rng_states(tensors, path)
    if "rng/python" not in tensors:  # stored by an explaind that kept torch's only
        return
    version, *keys = tensors["rng/python"].tolist()
    gauss = tensors["rng/python_gauss"].item()
    random.setstate((version, tuple(keys), None if math.isnan(gauss) else gauss))
    position, has_gauss = tensors["rng/numpy_position"].tolist()
    np.random.set_state(("MT19937", tensors["rng/numpy"].numpy().astype(np.uint32), position, has_gauss,
                         tensors["rng/numpy_gauss"].item()))


def _set_cuda_rng_states(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Each CUDA device's generator as the killed run left it, on the devices this machine has (a
    run that never started CUDA, or an explaind that did not store them, left none). Fewer devices
    than the killed run's are warned of, not refused: the run may go on elsewhere, but what its
    loop drew on the missing ones it now draws from other generators. (Run on the CPU only, with
    torch.cuda's functions faked: no GPU here.)"""
    stored = [tensors[f"rng/cuda/{device}"] for device in range(sum(key.startswith("rng/cuda/") for key in tensors))]
    here = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if len(stored) > here:
        warnings.warn(f"Recorder.resume({str(path)!r}): the killed run's process had started {len(stored)} CUDA "
                      f"devices and this machine has {here}: random numbers its loop drew on the missing ones (augmentation "
                      "or a batch order made on a GPU) now come from other generators, so the resumed steps are not "
                      f"the uninterrupted run's. To continue the run as it was, resume with {len(stored)} CUDA devices "
                      "visible, in the killed run's order", stacklevel=4)
    if stored and here:
        torch.cuda.set_rng_state_all(stored[:here])


def _resumes_from_the_start(path) -> bool:
    """Whether the resume state is that of step 0: a resume from there empties the manifest, and
    one killed before it stored the first step again still resumes."""
    try:
        return json.loads((Path(path) / "resume.json").read_text()).get("next_step") == 0
    except (OSError, ValueError, AttributeError):  # no or a damaged state: the resume says which
        return False


def _read_resume_info(path: Path, n_steps: int) -> dict:
    resume = path / "resume.json"
    if not resume.is_file() and n_steps > 1:  # the state after the first step is stored before the second
        raise HistoryError(
            f"{resume} is missing, though {n_steps} steps are recorded: it was deleted or lost, and without it the "
            "run cannot go on. Fix: record the run again with overwrite=True, or use its complete steps as they "
            "are: History(path, allow_incomplete=True) in place of the path for explain, reconstruct or "
            "verify_updates")
    if not resume.is_file():
        raise HistoryError(
            f"{path} has no resume state: the run was killed before the state after its first "
            "step was stored. Record it again with overwrite=True"
        )
    info = _read_json(resume)
    before = [info["before_step"]] if isinstance(info, dict) and "before_step" in info else []
    for record in (info, *before):
        for key in ("next_step", "param_groups", "scheduler", "scheduler_stepped", "scheduler_steps_per_step"):
            _field(record, key, resume)
    return info


def _read_resume_tensors(path: Path, info: dict) -> dict[str, torch.Tensor]:
    if "tensors" not in info:
        raise HistoryError(
            f"{path} was recorded by an older explaind whose resume state could pair the "
            "optimizer state of one step with another: record the run again with overwrite=True"
        )
    data = _read_bytes(path / info["tensors"])
    if _sha256(data) != info["tensors_sha256"]:
        raise HistoryError(
            f"{path / info['tensors']} does not match the sha256 in resume.json: the resume state "
            "is corrupted. Record the run again with overwrite=True"
        )
    return load_safetensors(data)


def _keep_manifest_lines(path: Path, lines: list[dict]) -> None:
    """Rewrite the manifest to the steps a resume continues from.

    Drops a step stored after the last resume state (the resumed loop redoes it) and a line
    cut by a crash, which the recorder would otherwise append after. Only resuming may do
    this: reading a history never writes.
    """
    text = "".join(_manifest_line(line) for line in lines)
    _write_atomic(path / "manifest.jsonl", text.encode())


def _resumed_loss(history: "History", loss, reduction: str | None, class_weights) -> dict:
    """The loss, reduction and class weights a resumed run continues with: the recorded ones,
    which a resume may repeat but not change."""
    if loss is None and history.loss not in BUILTIN_LOSSES:
        raise InputError(
            f"{history.path} was recorded with the custom loss {history.loss.removeprefix('custom:')}, "
            "which cannot be stored: pass it again as Recorder.resume(..., loss=...)"
        )
    loss = history.loss if loss is None else loss
    reduction = history.reduction if reduction is None else check_reduction(reduction)
    name = resolve_loss(loss)[0]
    if (name, reduction) != (history.loss, history.reduction):
        # a custom loss cannot be left out (its code is not stored): it is known by its module and name
        fix = ("leave loss= and reduction= out to continue with the recorded ones" if history.loss in BUILTIN_LOSSES
               else f"pass the killed run's loss function again as loss=, defined as it was (a custom loss is "
                    f"known by its module and qualified name, here {history.loss.removeprefix('custom:')}), "
                    "and leave reduction= out")
        raise InputError(
            f"{history.path} was recorded with loss {history.loss!r}, reduction="
            f"{history.reduction!r}; the resume was given loss {name!r}, reduction={reduction!r}. "
            f"A history has one loss: {fix}"
        )
    recorded, given = history.class_weights, check_class_weights(class_weights)
    if given is not None and (recorded is None or not torch.equal(given, recorded)):
        raise InputError(
            f"{history.path} was recorded with class_weights={None if recorded is None else recorded.tolist()}; "
            f"the resume was given {given.tolist()}. A history has one loss: leave class_weights= out to "
            "continue with the recorded ones")
    return {"loss": loss, "reduction": reduction, "class_weights": recorded}


def _recorded_class_weights(meta: dict, loss: str) -> torch.Tensor | None:
    """meta.json's class weights (float64), or None for an unweighted history; ValueError for what
    no Recorder writes: weights in a history of another version, of a loss without classes, or
    that check_class_weights refuses."""
    weights = meta.get("class_weights")
    if meta.get("version") != DATA_PARALLEL_VERSION and \
            (meta.get("version") == CLASS_WEIGHTS_VERSION) != ("class_weights" in meta):
        raise ValueError("class weights and format version disagree")
    if weights is None:
        return None
    if not takes_class_weights(loss) or not isinstance(weights, list) or not all(map(is_number, weights)):
        raise ValueError("no class weights a Recorder writes")
    try:
        return check_class_weights(weights)
    except InputError as error:
        raise ValueError(str(error)) from None


def _check_scheduler(scheduler, optimizer: torch.optim.Optimizer) -> None:
    """Refuse a scheduler that the recorder cannot store with each step and restore at a resume:
    one that sets another optimizer's rates (built before the optimizer was built again, say: the
    run would train at a constant rate, its schedule stored beside it), one whose steps it cannot
    count (see _schedule_position), or with no state_dict to store."""
    scheduled = getattr(scheduler, "optimizer", optimizer)  # every torch scheduler names its optimizer
    if scheduled is not optimizer:
        raise InputError(
            f"the scheduler {type(scheduler).__name__} sets the learning rates of another optimizer than the one "
            "passed to the Recorder: this run's rates would not follow its schedule. Fix: build the scheduler on "
            "the optimizer that trains the model (after the optimizer is built for the last time), and pass both")
    _schedule_position(scheduler)
    missing = [method for method in ("state_dict", "load_state_dict") if not callable(getattr(scheduler, method, None))]
    if missing:
        raise InputError(
            f"the scheduler {type(scheduler).__name__} has no {' or '.join(missing)}, with which the recorder stores its "
            "state with each step and resumes the schedule where a killed run left it. Fix: pass a "
            "torch.optim.lr_scheduler scheduler (LambdaLR takes any function of the step), or give yours "
            "state_dict() and load_state_dict()")


def _schedule_position(scheduler) -> int:
    """How often a scheduler has been stepped: its last_epoch (a ChainedScheduler's, that of the
    first scheduler it chains)."""
    while not hasattr(scheduler, "last_epoch") and getattr(scheduler, "_schedulers", None):
        scheduler = scheduler._schedulers[0]
    if not isinstance(getattr(scheduler, "last_epoch", None), int):
        raise InputError(
            f"the scheduler {type(scheduler).__name__} has no last_epoch counting its steps, which the recorder "
            "stores with each step to resume the schedule where a killed run left it. Fix: pass a "
            "torch.optim.lr_scheduler scheduler, or give yours a last_epoch that step() increments")
    return scheduler.last_epoch


def _catches_up(scheduler, steps: int | None, vary: bool) -> bool:
    """Whether a resume can step a scheduler restored from just after an optimizer step as the loop
    did: it steps it as often after every step, ≥ once, and with no metric (a ReduceLROnPlateau's,
    which the history does not hold)."""
    return not isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau) and bool(steps) and not vary


def _redoes_the_killed_step(scheduler, info: dict) -> bool:
    """Whether a resume continues from the state stored before the last step, which it redoes: killed
    after that step and before the next one, it cannot tell whether the loop stepped its scheduler in
    between (a per-epoch one: the epoch's last step?) nor catch it up (an older explaind kept no such
    state)."""
    return not info["scheduler_stepped"] and "before_step" in info and \
        not _catches_up(scheduler, info["scheduler_steps_per_step"], info.get("scheduler_steps_vary", False))


def _unknown_schedule(scheduler, info: dict, path) -> Exception | None:
    """Why a scheduler restored from just after an optimizer step cannot be caught up, if it cannot:
    how often the loop steps it there is unknown, and an older explaind kept no state before that step."""
    steps = info["scheduler_steps_per_step"]
    if steps is None:
        return HistoryError(
            f"{path} was killed right after its first step, before its scheduler's stepping "
            "could be observed, by an explaind that kept no state to resume that step from: record "
            "it again with overwrite=True"
        )
    if not _catches_up(scheduler, steps, info.get("scheduler_steps_vary", False)):
        return UnsupportedError(
            f"{path} was killed after an optimizer step and before the next one (where the scheduler's state "
            f"is stored), and its {type(scheduler).__name__} is not stepped once after every optimizer step "
            "(a per-epoch scheduler, or a ReduceLROnPlateau's metric, which the history does not hold): whether "
            "it was due in between is unknown, and the older explaind that recorded it kept no state before that "
            "step to redo it from, so the resumed run cannot record further steps (it can close). Fix: record "
            "the run again with overwrite=True, with this explaind, whose resume redoes such a step"
        )
    return None


def _catch_up(scheduler, steps: int) -> None:
    """Step a scheduler restored from just after an optimizer step as the loop would have."""
    with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": intended here
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(steps):
            scheduler.step()


def open_history(history: "History | str | os.PathLike", model: nn.Module, caller: str) -> "History":
    """Open (if given a path) and check a history against the model that explains it, for the
    public call named `caller`."""
    if isinstance(history, nn.Module) or not isinstance(model, nn.Module):
        raise InputError(f"{caller}() got a {type(history).__name__} as the history and a {type(model).__name__} as "
                         "the model: the history (its folder, or an explaind.History) comes first, the model second. "
                         f"Fix: call {caller}(history, model, ...)")
    history = history if isinstance(history, History) else History(history)
    history.check_model(model)
    refuse_unreplayable_modules(model, eval_mode=EVAL_TO_EXPLAIN)
    return history


def _scalar(value) -> float:
    return value.item() if torch.is_tensor(value) else float(value)


def _manifest_last_hash(path: Path) -> str | None:
    lines = (path / "manifest.jsonl").read_text().splitlines()
    return json.loads(lines[-1])["sha256"] if lines else None


# --------------------------------------------------------------------------- reading


@dataclass
class StepRecord:
    """Everything the decomposition needs about update step s."""

    step: int
    before: dict[str, torch.Tensor]  # θ_s
    after: dict[str, torch.Tensor]  # θ_{s+1}
    groups: list[dict]  # per-group hyperparameters used at this step
    gradient_scale: float  # c_s: the factor clipping scaled the batch gradient by (1: not clipped)
    second_moment: dict[str, torch.Tensor] | None  # Adam's v_t (or max v_t with amsgrad)
    indices: torch.Tensor
    inputs: torch.Tensor
    targets: torch.Tensor
    shards: list[int] | None = None  # a data-parallel step: each process's rows of the batch, in order

    @property
    def nbytes(self) -> int:
        """The bytes of its tensors."""
        tensors = [*self.before.values(), *self.after.values(), *(self.second_moment or {}).values(),
                   self.indices, self.inputs, self.targets]
        return sum(t.nbytes for t in tensors)


class History:
    """A recorded training run, opened read-only and checked.

    Opening checks the format, the manifest's continuity and that every step file exists
    with its recorded size; each file's sha256 is checked when it is read. Nothing here
    writes to the directory: only Recorder.resume changes a recorded history.
    """

    def __init__(self, path: str | os.PathLike, *, allow_incomplete: bool = False, _no_step_ok: bool = False):
        self.path = Path(path).absolute()  # the caller may change the working directory
        killed = _killed_unfinished(self.path) if self.path.is_dir() else None
        if killed:
            raise HistoryError(
                f"{self.path} holds {killed}, so there is nothing to open or resume. Fix: record the "
                "run again, with Recorder(..., overwrite=True) on this path"
            )
        if not self.path.exists():
            raise HistoryError(f"{self.path} does not exist: pass the folder that a Recorder wrote the run to")
        if not (self.path / "meta.json").is_file():
            raise HistoryError(
                f"{self.path} is not a training history (no meta.json): record one with "
                "explaind.Recorder, or check the path"
            )
        meta_file = self.path / "meta.json"
        meta_bytes = _read_bytes(meta_file)
        self.meta = _parse_json(meta_file, meta_bytes)
        if self.meta.get("format") != FORMAT or self.meta.get("version") not in VERSIONS:
            raise HistoryError(
                f"{self.path} has format {self.meta.get('format')!r} version {self.meta.get('version')!r}; "
                f"this explaind reads {FORMAT!r} versions {', '.join(map(str, VERSIONS))}"
            )
        params = [{key: _field(p, key, meta_file) for key in ("name", "shape", "group", "dtype")}
                  for p in _field(self.meta, "params", meta_file)]
        self.layout = ParamLayout(tuple(p["name"] for p in params), tuple(tuple(p["shape"]) for p in params))
        self.group_of = {p["name"]: p["group"] for p in params}
        self.dtype = getattr(torch, str(_field(params, 0, meta_file)["dtype"]), None)
        if not isinstance(self.dtype, torch.dtype):
            raise HistoryError(f"{meta_file} records an unknown dtype: the file was edited or damaged. {_RESTORE}")
        self.manifest, manifest_bytes = self._read_manifest()
        self._check_meta()
        closed = self.path / "closed.json"
        self.closed = closed.is_file()
        self._summary: dict | None = None  # closed.json, once checked
        if self.closed:
            summary = _read_json(closed)
            if summary.get("meta_sha256") != _sha256(meta_bytes):
                raise HistoryError(
                    f"{self.path}/meta.json does not match the hash recorded when the history "
                    "was closed: it was edited or corrupted. Restore it from its source"
                )
            expected = _field(summary, "n_steps", closed)
            if expected != len(self.manifest):
                state = "is truncated" if len(self.manifest) < expected else "has steps added after it was closed"
                raise HistoryError(
                    f"{self.path} {state}: closed with {expected} steps but the manifest "
                    f"lists {len(self.manifest)}. Restore the history from its source (dvc pull) "
                    "or record it again"
                )
            self._check_closed_manifest(summary, _sha256(manifest_bytes))
            self._summary = summary
        elif not allow_incomplete and self.manifest:  # (with none, the next error says more)
            cause = ("a Recorder of this process is still open on it: close it first, rec.close() (a loop inside "
                     "`with ex.Recorder(...) as rec:` closes it at the block's end)"
                     ) if _recording(self.path) else ("the recorder was never closed (the run was killed?). Continue "
                                                       "it with Recorder.resume(...)")
            raise HistoryError(
                f"{self.path} is incomplete: {len(self.manifest)} steps were recorded but {cause}, or use the "
                "complete steps: open it with History(path, allow_incomplete=True) and pass that History to explain, "
                "reconstruct or verify_updates in place of the path"
            )
        if not self.manifest and not _no_step_ok:
            raise HistoryError(f"{self.path} holds no complete step (its recording stopped before the first "
                               "step was stored: refused by a check, an error in the loop or killed; or it never "
                               "stepped): there is nothing to open or resume. Fix: record the run again, with "
                               "Recorder(..., overwrite=True) on this path")
        self._initial = None

    def _check_closed_manifest(self, summary: dict, manifest_sha256: str) -> None:
        """The manifest as close() left it: its learning rates, betas and clip factors enter every
        decomposition, and only this hash covers them (histories closed before it was written
        carry the final step's hash only)."""
        last = self.manifest[-1]["sha256"] if self.manifest else None
        if (summary.get("manifest_sha256", manifest_sha256) != manifest_sha256
                or summary.get("final_sha256", last) != last):
            raise HistoryError(
                f"{self.path}/manifest.jsonl does not match the hashes recorded when the history was "
                f"closed: it was edited or corrupted. {_RESTORE}")

    def _check_meta(self) -> None:
        """Refuse a meta.json whose facts this library cannot honour (edited or damaged); keep
        its class weights, the loss's weight= (float64), or None: unweighted."""
        meta = self.meta
        problems = []
        if meta.get("optimizer") not in GROUP_KEYS:
            problems.append(f"optimizer {meta.get('optimizer')!r}")
        if meta.get("reduction") not in REDUCTIONS:
            problems.append(f"reduction {meta.get('reduction')!r}")
        loss = str(meta.get("loss"))
        if not (loss in BUILTIN_LOSSES or loss.startswith("custom:")):
            problems.append(f"loss {loss!r}")
        try:
            self.class_weights = _recorded_class_weights(meta, loss)
        except ValueError:
            problems.append(f"class_weights {meta.get('class_weights')!r} (format version {meta.get('version')})")
        if problems:
            raise HistoryError(
                f"{self.path}/meta.json records an unknown {', '.join(problems)}: the file was "
                f"edited or corrupted. {_RESTORE}"
            )

    def _read_manifest(self) -> tuple[list[dict], bytes]:
        """The complete steps' lines, and the file's bytes for the hash close() recorded."""
        lines = []
        manifest = self.path / "manifest.jsonl"
        if not manifest.is_file():  # the Recorder creates it before any step
            raise HistoryError(
                f"{self.path}/manifest.jsonl is missing, so none of the recorded steps can be found: it "
                "was deleted (or the recording was killed as it started). Restore the history from its "
                "source (dvc pull) or record it again (Recorder(..., overwrite=True) on this path)"
            )
        raw_bytes = manifest.read_bytes()
        raw_lines = raw_bytes.splitlines()  # split as bytes: a damaged byte fails its own line's decoding only
        for number, raw in enumerate(raw_lines):
            try:
                line = json.loads(raw)
            except ValueError as error:  # JSONDecodeError, or UnicodeDecodeError from a damaged byte
                if number == len(raw_lines) - 1:
                    break  # a line cut by a crash: that step never completed
                raise HistoryError(
                    f"{self.path}/manifest.jsonl line {number + 1} is corrupted ({error}). {_RESTORE}") from error
            step, name, size, _, _ = (_field(line, key, manifest) for key in ("step", "file", "bytes", "sha256", "groups"))
            if step != number:
                raise HistoryError(
                    f"{self.path}/manifest.jsonl: line {number + 1} is step {step}, "
                    f"expected {number}; the manifest is corrupted. {_RESTORE}"
                )
            scale = line.get("gradient_scale", 1.0)
            if not (is_number(scale) and 0 < scale <= 1):
                raise HistoryError(
                    f"{self.path}/manifest.jsonl: step {step} records the gradient scale {scale!r}, "
                    f"not a number in (0, 1]: the manifest was edited or corrupted. {_RESTORE}"
                )
            shards = line.get("shards")
            if (shards is not None or self.meta.get("version") == DATA_PARALLEL_VERSION) and not (
                    isinstance(shards, list) and len(shards) == self.meta.get("processes")
                    and all(is_whole(n) and n > 0 for n in shards) and sum(shards) == line.get("batch_size")):
                raise HistoryError(
                    f"{self.path}/manifest.jsonl: step {step} records the shards {shards!r}, not the rows of each of "
                    f"the run's {self.meta.get('processes')} processes: the history was edited or corrupted. {_RESTORE}")
            if name != step_file(step):  # a name the Recorder never writes (e.g. one outside the folder)
                raise HistoryError(
                    f"{self.path}/manifest.jsonl: step {step} names the file {name!r}, where the Recorder writes "
                    f"{step_file(step)!r}: the manifest was edited or corrupted. {_RESTORE}"
                )
            file = self.path / name
            stored = _file_size(file)  # one stat a step: a long run's manifest is read on every open
            if stored != size:
                found = "is missing" if stored is None else f"holds {stored} bytes, not the {size} recorded"
                raise HistoryError(
                    f"{file} {found} for step {number}: the history is truncated or corrupted. {_RESTORE}")
            lines.append(line)
        return lines, raw_bytes

    # ----------------------------------------------------------------- facts

    @property
    def n_steps(self) -> int:
        return len(self.manifest)

    @property
    def optimizer(self) -> str:
        return self.meta["optimizer"]

    @property
    def loss(self) -> str:
        return self.meta["loss"]

    @property
    def reduction(self) -> str:
        return self.meta["reduction"]

    def per_sample_loss(self, loss=None):
        """The per-sample training loss (see losses.recorded_loss; a custom one is passed as `loss`)."""
        return recorded_loss(self.loss, loss, self.class_weights)

    def fingerprint(self) -> str:
        """A hash of the whole history (from the per-file hashes): cubes cite it."""
        h = hashlib.sha256(self.meta["initial_sha256"].encode())
        if "class_weights" in self.meta:  # they enter every decomposition (histories without them hash as before)
            h.update(_json_bytes(self.meta["class_weights"]))
        for line in self.manifest:
            h.update(line["sha256"].encode())
        return h.hexdigest()

    def check_model(self, model: nn.Module) -> None:
        """Refuse a model whose trainable tensors differ from the recorded ones."""
        params = trainable_parameters(model)
        recorded = {p["name"]: p for p in self.meta["params"]}
        if set(params) != set(recorded):
            missing = sorted(set(recorded) - set(params))[:5]
            extra = sorted(set(params) - set(recorded))[:5]
            untrained = untrained_tensors(model)  # a missing name the model has, frozen or tied: say which
            why = "; ".join(f"{n!r} is {untrained[n].split(' (')[0]} in the model" for n in missing if n in untrained)
            raise HistoryError(
                f"the model does not match the history {self.path}: recorded tensors missing "
                f"from the model {missing}{f' ({why})' if why else ''}, model tensors not in the history {extra}. "
                f"{_wrapped_otherwise(set(recorded), set(params))}"
                "Pass the same architecture that was trained (same names and requires_grad flags)"
            )
        for name, p in params.items():
            if list(p.shape) != recorded[name]["shape"]:
                raise HistoryError(
                    f"parameter {name!r} has shape {list(p.shape)} in the model but "
                    f"{recorded[name]['shape']} in the history: pass the trained architecture"
                )

    # ----------------------------------------------------------------- tensors

    def _load(self, name: str, sha256: str | None) -> dict[str, torch.Tensor]:
        data = _read_bytes(self.path / name)
        if sha256 is not None and _sha256(data) != sha256:
            raise HistoryError(
                f"{self.path / name} does not match its recorded sha256: the file is corrupted. "
                "Restore the history from its source (dvc pull) or record it again"
            )
        # safetensors returns a hash map, whose order changes from process to process: sort it,
        # so that whatever iterates over a read (e.g. drawing a re-initialisation) is reproducible
        return dict(sorted(load_safetensors(data).items()))

    def initial(self) -> dict[str, torch.Tensor]:
        if self._initial is None:
            self._initial = self._load("initial.safetensors", self.meta["initial_sha256"])
        return self._initial

    def constants(self) -> dict[str, torch.Tensor]:
        """The recorded frozen parameters and buffers: constant inputs of f."""
        initial = self.initial()
        return {**self._prefixed(initial, "frozen/"), **self._prefixed(initial, "buffer/")}

    def _step_tensors(self, s: int) -> dict[str, torch.Tensor]:
        line = self.manifest[s]
        return self._load(line["file"], line["sha256"])

    @staticmethod
    def _prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    def params(self, s: int) -> dict[str, torch.Tensor]:
        """θ_s: the parameters before update step s (s = n_steps gives the final ones)."""
        if not is_whole(s):  # 2.0 or "2" would fail deep in the manifest's list
            raise InputError(f"params() takes a step number, got {s!r}: pass a whole number in 0 … {self.n_steps}")
        if not 0 <= s <= self.n_steps:
            raise InputError(f"step {s} is outside the history's 0 … {self.n_steps}")
        tensors = self.initial() if s == 0 else self._step_tensors(s - 1)
        return self._prefixed(tensors, "param/")

    def steps(self, start: int = 0, stop: int | None = None, reverse: bool = False) -> Iterator[StepRecord]:
        """Stream the steps start … stop−1 from disk, forwards or backwards."""
        end = self.n_steps if stop is None else stop
        # checked here, not when the walk begins: a negative start would read the manifest from its end
        if not (is_whole(start) and is_whole(end) and 0 <= start <= end <= self.n_steps):
            raise InputError(f"steps(start={start!r}, stop={stop!r}) must be whole numbers with 0 ≤ start ≤ stop ≤ "
                             f"{self.n_steps} (this history's steps): step s runs from θ_s to θ_(s+1)")
        return self._walk(range(end - 1, start - 1, -1) if reverse else range(start, end))

    def _walk(self, order: range) -> Iterator[StepRecord]:
        """The steps of `order`, read from disk."""
        # step s's file holds θ_{s+1} and its batch, the file before it θ_s: neighbouring steps
        # share a file, read once whichever way the walk goes (-1: the initial parameters)
        files: dict[int, dict] = {}

        def read(i: int) -> dict[str, torch.Tensor]:
            return files[i] if i in files else self.initial() if i < 0 else self._step_tensors(i)

        for s in order:
            tensors, previous = read(s), read(s - 1)
            files = {s: tensors, s - 1: previous}
            yield StepRecord(
                step=s,
                before=self._prefixed(previous, "param/"),
                after=self._prefixed(tensors, "param/"),
                groups=self.manifest[s]["groups"],
                gradient_scale=self.manifest[s].get("gradient_scale", 1.0),
                shards=self.manifest[s].get("shards"),
                second_moment=self._prefixed(tensors, "second_moment/") or None,
                indices=tensors["batch/indices"],
                inputs=tensors["batch/inputs"],
                targets=tensors["batch/targets"],
            )

    def sample_weights(self, rec: StepRecord, dtype: torch.dtype, device) -> torch.Tensor:
        """c_s w_{s,k}: each sample's weight in step s's batch gradient, from the loss's
        reduction (over each process's shard in a data-parallel run), times the factor the step's
        gradient was clipped by."""
        weights = sample_weights(self.reduction, self.loss, rec.targets, self.class_weights, dtype, device,
                                 rec.shards)
        return weights * rec.gradient_scale

    def max_batch(self) -> int:
        """The largest batch of the run (rows of per-sample gradients held at once)."""
        return max(line.get("batch_size", 0) for line in self.manifest) or len(self.train_indices())

    def train_indices(self) -> torch.Tensor:
        """Every dataset index that appears in some batch, sorted."""
        listed = (self._summary or {}).get("train_indices")
        if listed is not None:
            return torch.tensor(listed, dtype=torch.long, device="cpu")
        seen: set[int] = set()
        for s in range(self.n_steps):
            seen.update(self._step_tensors(s)["batch/indices"].tolist())
        return torch.tensor(sorted(seen), dtype=torch.long, device="cpu")

    def train_labels(self) -> np.ndarray | None:
        """Each training sample's class, in train_indices' order: where every recorded batch's
        targets are class indices [batch] and no sample's changes between steps (as an older
        explaind let a history declare). None for regression targets, a class per position, or a
        label that changes. As the Recorder listed them when it closed the history, or else read
        from the step files' batch tensors alone, in numpy (whatever device
        torch.set_default_device has set), sorted by index: dataset ids may be sparse."""
        if self._summary is not None and "train_labels" in self._summary:
            return self._listed_labels(self._summary["train_labels"])
        indices, targets = [], []
        for step in self._step_files():
            index, target = step.get_tensor("batch/indices"), step.get_tensor("batch/targets")
            if not _one_class_each(target):
                return None
            indices.append(index.numpy())
            targets.append(target.numpy().astype(np.int64))
        if not indices:
            return None
        index, target = np.concatenate(indices), np.concatenate(targets)
        order = np.argsort(index, kind="stable")
        index, target = index[order], target[order]
        repeated = index[1:] == index[:-1]
        if (target[1:][repeated] != target[:-1][repeated]).any():
            return None
        first = np.concatenate([[True], ~repeated])
        return target[first][np.searchsorted(index[first], self.train_indices().numpy())]

    def _listed_labels(self, listed) -> np.ndarray | None:
        """closed.json's train_labels, checked to be a class for each of train_indices."""
        if listed is None:
            return None
        if not (isinstance(listed, list) and len(listed) == len(self.train_indices())
                and all(is_whole(label) for label in listed)):
            raise HistoryError(f"{self.path}/closed.json lists train_labels that are not one class for each of its "
                               f"train_indices: the file was edited or corrupted. {_RESTORE}")
        return np.asarray(listed, dtype=np.int64)

    def input_spec(self) -> tuple[tuple[int, ...], torch.dtype]:
        """Shape of one input and its dtype, as recorded in the first batch."""
        inputs = self._step_tensors(0)["batch/inputs"]
        return tuple(inputs.shape[1:]), inputs.dtype

    def input_shapes(self) -> list[tuple[int, ...]]:
        """The shapes of one input in the recorded batches (a run may vary a sequence's length
        from batch to batch), read from the step files' headers: no tensor is loaded."""
        return sorted({tuple(step.get_slice("batch/inputs").get_shape()[1:]) for step in self._step_files()})

    def _step_files(self) -> Iterator:
        """Each step file opened to read single tensors or their shapes (safetensors' safe_open):
        neither its parameters nor its hash are read."""
        for line in self.manifest:
            with safe_open(self.path / line["file"], framework="pt") as step:
                yield step
