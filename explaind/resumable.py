"""A long explain() that shows its progress and continues where a killed run stopped.

explain_resumable(...) computes the cube in parts, the shards of explaind.distributed run one
after another in this process (ranges of update steps, or shares of the test inputs), stores
each finished part in `parts_dir` (written next to its place and moved there, so a part is
either complete or absent) and merges the stored parts, each checked against the sha256 of its
numbers that it was written with (a part damaged on disk is named, never merged). Calling it
again after a crash reads the finished parts back and computes only the missing ones; the cube
equals the one an uninterrupted call returns, exactly.

Each part records a fingerprint of its request: the history, the model's class, the inputs,
the targets, every option that changes the result and the format of a part. A part stored for
another request, or by an explaind whose parts hold other variables, is refused with an error,
never reused and never overwritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import types
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import xarray as xr
from tqdm.auto import tqdm

from .components import group_tensors
from .distributed import SPLITS, explain_shard, is_stored, merge, part_path, read_part, step_window, store_part
from .engine import check_residual
from .errors import InputError
from .history import History

# Raised whenever explain()'s cube gains or loses a variable, or a part's metadata change: a
# part stored by an explaind of another format cannot be merged with new ones
# (2: update_rounding_floor; 3: the digest of a part's numbers)
PART_FORMAT = 3

# options that change how a part is computed (memory, device, display), not what it holds: a
# run killed on one machine may be finished on another
EXECUTION_OPTIONS = ("device", "test_chunk", "train_chunk", "batch_chunk", "memory_budget", "progress")


def explain_resumable(history, model, inputs, targets=None, *, parts_dir: str | os.PathLike, n_parts: int,
                      split: str = "steps", tolerance: float | None = 1e-4, progress: bool = True,
                      **kwargs) -> xr.Dataset:
    """explain(history, model, inputs, targets, **kwargs) in `n_parts` stored parts.

    split="steps" divides the update steps (those of `steps=(start, stop)` if given) into
    n_parts contiguous ranges (update-step convention; each part replays the momentum of the
    steps before it), split="test" the test inputs. Run the same call again after an
    interruption to continue it.
    """
    history = history if isinstance(history, History) else History(history)
    if split == "steps":
        start, stop = step_window(history, kwargs)
        _check_parts(split, n_parts, stop - start)
    else:
        _check_parts(split, n_parts, len(inputs))
    request = request_fingerprint(history, model, inputs, targets, split=split, n_parts=n_parts, **kwargs)
    paths = [part_path(parts_dir, rank) for rank in range(n_parts)]
    missing = [rank for rank, path in enumerate(paths) if not is_stored(path, request, rank)]
    for rank in sorted(set(range(n_parts)) - set(missing)):  # a damaged part is named before any compute
        read_part(paths[rank], request, rank)
    Path(parts_dir).mkdir(parents=True, exist_ok=True)
    with tqdm(total=n_parts, initial=n_parts - len(missing), desc="explain parts", disable=not progress) as bar:
        for rank in missing:
            part = explain_shard(history, model, inputs, targets, split=split, rank=rank, world_size=n_parts,
                                 tolerance=None, progress=progress, **kwargs)
            store_part(part, paths[rank], request, rank)
            bar.update()
    # merged from the stored parts only, so that a resumed call and an uninterrupted one
    # combine the very same numbers
    merged = merge([read_part(path, request, rank) for rank, path in enumerate(paths)], split)
    check_residual(merged, tolerance)
    return merged


def _check_parts(split: str, n_parts: int, n_items: int) -> None:
    if split not in SPLITS:
        raise InputError(f"split={split!r}: use one of {SPLITS}")
    what = "update steps" if split == "steps" else "test inputs"
    if not 1 <= n_parts <= n_items:
        raise InputError(f"n_parts={n_parts} for {n_items} {what}: use 1 … {n_items} parts")


def request_fingerprint(history: History, model: torch.nn.Module, inputs, targets, **options) -> str:
    """A sha256 of everything that determines a part's numbers."""
    if "components" in options:  # the grouping decides the cube, not how it was spelled
        options = {**options, "components": group_tensors(history.layout.names, options["components"])}
    described = {
        "history": history.fingerprint(),
        "part_format": PART_FORMAT,
        "model": f"{type(model).__module__}.{type(model).__qualname__}",
        "inputs": inputs,
        "targets": targets,
        **{key: value for key, value in options.items() if key not in EXECUTION_OPTIONS},
    }
    text = json.dumps(_canonical(sorted(described.items())))
    return hashlib.sha256(text.encode()).hexdigest()


def _canonical(value):
    """A JSON-serialisable description of an option value (order kept: it orders the cube)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().contiguous()
        return {"dtype": str(value.dtype), "shape": list(value.shape),
                "sha256": hashlib.sha256(value.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()}
    if isinstance(value, np.ndarray) and value.dtype != object:
        return {"dtype": value.dtype.str, "shape": list(value.shape),
                "sha256": hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest()}
    if isinstance(value, np.ndarray):
        return _canonical(value.tolist())
    if isinstance(value, Mapping):
        return [[str(key), _canonical(item)] for key, item in value.items()]
    if isinstance(value, (list, tuple)):
        return [_canonical(item) for item in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, types.FunctionType):  # e.g. a custom loss: every lambda is '<lambda>'
        return {"function": f"{value.__module__}.{value.__qualname__}", "code": _code(value.__code__),
                "defaults": _canonical(value.__defaults__),
                "closure": _canonical([cell.cell_contents for cell in value.__closure__ or ()])}
    if callable(value):  # a callable object: identified by its class and attributes
        return {"callable": f"{type(value).__module__}.{type(value).__qualname__}", "repr": repr(value)}
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return repr(value)


def _code(code: types.CodeType) -> list:
    """What a function's code does (bytecode, constants, names), not where it was defined."""
    constants = [_code(c) if isinstance(c, types.CodeType) else repr(c) for c in code.co_consts]
    return [hashlib.sha256(code.co_code).hexdigest(), constants, list(code.co_names)]
