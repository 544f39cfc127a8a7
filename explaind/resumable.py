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

import contextlib
import functools
import hashlib
import json
import os
import re
import types
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import xarray as xr
from tqdm.auto import tqdm

from .components import group_tensors
from .distributed import (SPLITS, check_test_set, explain_part, merge, missing_parts, part_path, read_part, step_window,
                          store_part)
from .engine import check_residual, dropped, explain_defaults, kept_dims, plans_shown_by
from .errors import InputError, is_whole
from .history import History, open_history

# Raised whenever explain()'s cube gains or loses a variable, or a part's metadata change: a
# part stored by an explaind of another format cannot be merged with new ones
# (2: update_rounding_floor; 3: the digest of a part's numbers; 4: a split by steps counts replay
# from the window's start, as one call does; 5: update_residual NaN outside the checked steps)
PART_FORMAT = 5

# options that change how a part is computed (memory, device, display), not what it holds: a
# run killed on one machine may be finished on another
EXECUTION_OPTIONS = ("device", "test_chunk", "train_chunk", "batch_chunk", "memory_budget", "progress")
# checked on the merged cube by each call (it stops a part at a missed update, but changes none of its numbers)
MERGED_CUBE_OPTIONS = ("tolerance",)

# a default repr names where an object lives in memory: another number in every process
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def explain_resumable(history, model, inputs, targets=None, *, parts_dir: str | os.PathLike, n_parts: int,
                      split: str = "steps", tolerance: float | None = 1e-4, progress: bool = True,
                      **kwargs) -> xr.Dataset:
    """explain(history, model, inputs, targets, **kwargs) in `n_parts` stored parts.

    split="steps" divides the update steps (those of `steps=(start, stop)` if given) into
    n_parts contiguous ranges (update-step convention; each part replays the momentum of the
    steps before it), split="test" the test inputs. Run the same call again after an
    interruption to continue it. With a tolerance, a part stops at the first step whose recorded
    update misses the modelled one far beyond rounding, as explain does; the output residual is
    checked on the merged cube.
    """
    _check_split(split, n_parts, kwargs)
    _check_parts_dir(Path(parts_dir))
    history = open_history(history, model, "explain_resumable")
    if split == "steps":
        start, stop = step_window(history, kwargs)
        _check_parts(split, n_parts, stop - start)
    else:
        _check_parts(split, n_parts, len(inputs))
    request = request_fingerprint(history, model, inputs, targets, split=split, n_parts=n_parts, **kwargs)
    missing = missing_parts(parts_dir, request, n_parts)
    if missing and split == "test":  # once for all the parts, which each explain a slice of the set
        check_test_set("explain_resumable", history, model, inputs, targets, kwargs)
    paths = [part_path(parts_dir, rank) for rank in range(n_parts)]
    Path(parts_dir).mkdir(parents=True, exist_ok=True)
    with tqdm(total=n_parts, initial=n_parts - len(missing), desc="explain parts", disable=not progress) as bar:
        for rank in missing:
            with plans_shown_by(dropped) if rank != missing[0] else contextlib.nullcontext():  # the first part's plan only
                part = explain_part(history, model, inputs, targets, split=split, rank=rank, world_size=n_parts,
                                    tolerance=tolerance, progress=progress, **kwargs)
            store_part(part, paths[rank], request, rank)
            bar.update()
    # merged from the stored parts only, so that a resumed call and an uninterrupted one
    # combine the very same numbers
    merged = merge([read_part(path, request, rank) for rank, path in enumerate(paths)], split)
    check_residual(merged, tolerance)
    return merged


def _check_split(split: str, n_parts, options: dict) -> None:
    """What the parts are, refused before the history is read."""
    if split not in SPLITS:
        raise InputError(f"split={split!r}: use one of {SPLITS}")
    if not is_whole(n_parts):
        raise InputError(f"n_parts={n_parts!r}: pass a whole number of parts, an int such as 2")
    if split == "steps" and options.get("convention", "update") != "update":
        # each part would explain a range of steps, which the gradient-step convention cannot
        raise InputError(
            f"split='steps' needs convention='update': with convention={options['convention']!r} a step's "
            "attribution depends on every later step, so the steps cannot be explained in parts. Fix: pass "
            "split='test' (parts of the test inputs, any convention), or convention='update'"
        )
    if split == "steps" and options.get("parameter_scores", False):
        raise InputError("split='steps' cannot give parameter_scores: they take |·| after summing over all steps. "
                         "Fix: pass split='test' (parts of the test inputs)")


def _check_parts_dir(parts_dir: Path) -> None:
    """A parts_dir that is a file, or lies under one, is named before any compute."""
    existing = next((path for path in (parts_dir, *parts_dir.parents) if path.exists()), None)
    if existing is not None and not existing.is_dir():
        where = "is a file" if existing == parts_dir else f"lies under the file {existing}"
        raise InputError(f"parts_dir={str(parts_dir)!r} {where}, not a folder: pass the path of a folder for the "
                         "parts (created if missing), or move the file away")


def _equals(value, default) -> bool:
    """Whether an option given as a sequence of numbers equals the default it spells out."""
    if value is None or isinstance(value, str):
        return False
    try:
        given = np.asarray(value)
    except (TypeError, ValueError):
        return False
    return given.shape == np.shape(default) and given.dtype.kind in "iu" and bool((given == default).all())


def _check_parts(split: str, n_parts: int, n_items: int) -> None:
    what = "update steps" if split == "steps" else "test inputs"
    if not 1 <= n_parts <= n_items:
        raise InputError(f"n_parts={n_parts} for {n_items} {what}: use 1 … {n_items} parts")


class Fingerprint(str):
    """A request's fingerprint (a sha256), carrying the sha256 of each of its fields, by which a
    part stored for another request names the fields that differ."""
    fields: dict[str, str]


def request_fingerprint(history: History, model: torch.nn.Module, inputs, targets, **options) -> Fingerprint:
    """A sha256 of everything that determines a part's numbers: of the request, not of how it was
    spelled (an option left at explain()'s default equals one given as that default)."""
    options = {**explain_defaults(), **options}
    # the grouping and the set of kept dims decide the cube, not the order or form they were named in
    options["components"] = group_tensors(history.layout.names, options["components"])
    options["keep"] = kept_dims(options["keep"])
    # the whole run named as a window, and the default ids named as ids, are the defaults
    if _equals(options["steps"], (0, history.n_steps)):
        options["steps"] = None
    if _equals(options["test_ids"], np.arange(len(inputs))):
        options["test_ids"] = None
    described = {
        "history": history.fingerprint(),
        "part_format": PART_FORMAT,
        "model": f"{type(model).__module__}.{type(model).__qualname__}",
        "inputs": inputs,
        "targets": targets,
        **{key: value for key, value in options.items() if key not in (*EXECUTION_OPTIONS, *MERGED_CUBE_OPTIONS)},
    }
    fields = {key: _canonical(value) for key, value in sorted(described.items())}
    request = Fingerprint(_sha256([[key, value] for key, value in fields.items()]))
    request.fields = {key: _sha256(value) for key, value in fields.items()}
    return request


def _sha256(canonical) -> str:
    return hashlib.sha256(json.dumps(canonical).encode()).hexdigest()


def _canonical(value, seen: frozenset = frozenset()):
    """A JSON-serialisable description of an option value (order kept: it orders the cube), the
    same in every process. `seen`: the objects being described, around a cycle of references."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().contiguous()
        return {"dtype": str(value.dtype), "shape": list(value.shape),
                "sha256": hashlib.sha256(value.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()}
    if isinstance(value, np.ndarray) and value.dtype != object:
        return {"dtype": value.dtype.str, "shape": list(value.shape),
                "sha256": hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest()}
    if isinstance(value, np.ndarray):
        return _canonical(value.tolist(), seen)
    if isinstance(value, torch.nn.Module):
        return _module(value, seen)
    if isinstance(value, Mapping):
        return [[str(key), _canonical(item, seen)] for key, item in value.items()]
    if isinstance(value, (list, tuple)):
        return [_canonical(item, seen) for item in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, types.FunctionType):  # e.g. a custom loss: every lambda is '<lambda>'
        name = f"{value.__module__}.{value.__qualname__}"
        if id(value) in seen:  # a nested function that calls itself holds itself in its closure
            return {"function": name, "cycle": True}
        seen = seen | {id(value)}
        return {"function": name, "code": _code(value.__code__), "defaults": _canonical(value.__defaults__, seen),
                "closure": _canonical([cell.cell_contents for cell in value.__closure__ or ()], seen)}
    if isinstance(value, functools.partial):
        return {"partial": _canonical(value.func, seen), "args": _canonical(value.args, seen),
                "keywords": _canonical(value.keywords, seen)}
    if isinstance(value, types.MethodType):  # what the method does, and to which object
        return {"method": _canonical(value.__func__, seen), "self": _canonical(value.__self__, seen)}
    if isinstance(value, (types.BuiltinFunctionType, types.MethodWrapperType)):  # e.g. torch.log_softmax
        owner = value.__self__
        return {"builtin": f"{getattr(value, '__module__', None)}.{value.__qualname__}",
                # a builtin method of an object (tensor.add) depends on it; a module's function does not
                "self": None if owner is None or isinstance(owner, (types.ModuleType, type)) else _canonical(owner, seen)}
    if isinstance(value, type):
        return {"class": f"{value.__module__}.{value.__qualname__}"}
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if hasattr(value, "__array__"):  # e.g. a pandas column of ids, whose repr elides the middle rows
        return _canonical(np.asarray(value), seen)
    return _object(value, seen)


def _module(module: torch.nn.Module, seen: frozenset):
    """A module (a loss, an output head) by its class, repr, tensors and settings: its repr does
    not show its weights, nor every setting (CrossEntropyLoss(reduction='sum') reads 'CrossEntropyLoss()')."""
    if id(module) in seen:
        return {"module": _kind(module), "cycle": True}
    seen = seen | {id(module)}
    settings = [[name, _canonical({key: item for key, item in vars(part).items() if not key.startswith("_")}, seen)]
                for name, part in module.named_modules()]
    return {"module": _kind(module), "repr": repr(module), "state": _canonical(module.state_dict(), seen),
            "settings": settings}


def _object(value, seen: frozenset):
    """Any other object by its class and repr, or by its attributes where the repr is the default
    one or names a memory address (another in every process)."""
    text = repr(value)
    if type(value).__repr__ is not object.__repr__ and not _ADDRESS.search(text):
        return {"callable": _kind(value), "repr": text} if callable(value) else text
    if id(value) in seen:
        return {"object": _kind(value), "cycle": True}
    return {"object": _kind(value), "attributes": _canonical(_attributes(value), seen | {id(value)})}


def _attributes(value) -> dict:
    """An object's instance attributes: its __dict__ and its __slots__."""
    found = dict(getattr(value, "__dict__", {}))
    for cls in type(value).__mro__:
        slots = cls.__dict__.get("__slots__", ())
        for name in [slots] if isinstance(slots, str) else slots:
            if name not in ("__dict__", "__weakref__") and hasattr(value, name):
                found[name] = getattr(value, name)
    return found


def _kind(value) -> str:
    return f"{type(value).__module__}.{type(value).__qualname__}"


def _code(code: types.CodeType) -> list:
    """What a function's code does (bytecode, constants, names), not where it was defined."""
    constants = [_code(c) if isinstance(c, types.CodeType) else repr(c) for c in code.co_consts]
    return [hashlib.sha256(code.co_code).hexdigest(), constants, list(code.co_names)]
