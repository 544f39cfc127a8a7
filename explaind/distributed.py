"""One explain() call split across processes: by test inputs or by ranges of steps.

Launch the same script on every process with torchrun (NCCL on GPUs, gloo on CPUs)::

    torchrun --nproc-per-node 4 my_script.py            # one node
    torchrun --nnodes 2 --node-rank 0 --master-addr HOST --nproc-per-node 8 my_script.py

where my_script.py calls ``explain_distributed(...)`` instead of ``explain(...)``. Every
process writes its part of the cube to ``parts_dir`` (a folder all nodes can see); process 0
merges them into exactly the cube one process writes and returns it (the others get None).

- split="test": each process explains a contiguous share of the test inputs; nothing is
  repeated except the per-sample gradients of the training batches.
- split="steps": each process explains a contiguous range of update steps; it first replays
  the momentum of the earlier steps (per-sample gradients only, no Jacobians). Update-step
  convention only; parameter-wise scores need all steps in one process. With
  steps=(start, stop), the ranges divide that window.

Every part records a fingerprint of its request (see explaind.resumable): a part stored for
another request, or by an older call without one, is refused, never overwritten. It also records
a sha256 of its labels and numbers, so that a part damaged on disk after it was written (a chunk
file lost or changed, which zarr would read as NaN or fail to decompress) is named, never merged.
Launched again with the same request and parts_dir (after a process failed, or was killed), each
process reads its stored part back instead of computing it: only the missing parts are computed.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import xarray as xr
import zarr

from .cube import (PER_HISTORY_STEP, STORE_FORMAT, checked_test_ids, open_cube, residual_attrs, save_cube,
                   store_damage)
from .engine import build_request, check_residual, checked_steps, dropped, explain, plans_shown_by, request_options
from .errors import InputError, ReconstructionError, described, error_class, is_whole
from .history import History, open_history, process_group_store

SPLITS = ("test", "steps")
# a stored part's request fingerprint and rank (explaind.resumable.request_fingerprint)
REQUEST_ATTR = "resumable_request_sha256"
REQUEST_FIELDS_ATTR = "resumable_request_fields_sha256"  # of each field, to name those another request changed
PART_ATTR = "resumable_part"
PART_DIGEST_ATTR = "resumable_part_sha256"  # of its variables' labels and values (part_digest)


def part_path(parts_dir: str | os.PathLike, rank: int) -> Path:
    """Where shard `rank` of a split explain() is stored."""
    return Path(parts_dir) / f"part-{rank:05d}.zarr"


def part_digest(part: xr.Dataset) -> str:
    """A sha256 of every variable and coordinate of a part as read back from its store: names,
    dims, dtypes and values."""
    digest = hashlib.sha256()
    for name in sorted(part.variables):
        values = np.asarray(part[name].values)
        text = values.dtype.kind in "OUST"  # labels: their bytes would be pointers or padding
        data = json.dumps([str(label) for label in values.ravel().tolist()]).encode() if text \
            else np.ascontiguousarray(values)
        digest.update(json.dumps([name, list(part[name].dims), list(values.shape), values.dtype.str]).encode())
        digest.update(data)
    return digest.hexdigest()


def store_part(part: xr.Dataset, path: Path, request: str, rank: int) -> None:
    """Save part `rank` of a request with its fingerprint and the digest of what reads back
    (zarr may hand values back otherwise held: object ids as integers, times in nanoseconds),
    signed before the store is moved into place: a part in place is complete."""
    part.attrs.update({REQUEST_ATTR: str(request), PART_ATTR: rank})
    if getattr(request, "fields", None):  # a Fingerprint of explaind.resumable, not a bare sha256
        part.attrs[REQUEST_FIELDS_ATTR] = request.fields
    save_cube(part, path, finish=_sign)


def _sign(store: Path) -> None:
    digest = part_digest(open_cube(store).load())
    zarr.open_group(store, mode="r+", zarr_format=STORE_FORMAT).attrs[PART_DIGEST_ATTR] = digest


# how a damaged part is computed again, for the fix of the error that names it
DELETE = "delete it and call again"  # a part that cannot be opened, which nothing overwrites
DELETE_AND_RESUME = f"{DELETE}: only that part is computed again"


def is_stored(path: Path, request: str, rank: int) -> bool:
    """Whether part `rank` of this request is stored at `path` (its attributes only: read_part
    checks its numbers); refuses another request's."""
    if not path.exists():
        return False
    damage = store_damage(path)  # named with a part's fix, not a cube's (explain the history again)
    if damage is not None:
        raise _damaged(path, rank, damage, DELETE_AND_RESUME)
    try:
        with open_cube(path) as stored:
            attrs = dict(stored.attrs)
    except Exception as error:  # its metadata lost or changed: unreadable for zarr or json
        raise _damaged(path, rank, f"it cannot be opened ({type(error).__name__}: {error})", DELETE) from error
    if attrs.get(REQUEST_ATTR) != request or attrs.get(PART_ATTR) != rank:
        raise InputError(
            f"{path} holds a part computed for a different request ({_what_differs(attrs, request, rank)}): it is "
            "neither reused nor overwritten. Pass a new parts_dir, or delete the old parts to recompute them"
        )
    return True


def _what_differs(attrs: dict, request: str, rank: int) -> str:
    """The fields of the request that the stored part's differ in, where both name them."""
    stored, given = attrs.get(REQUEST_FIELDS_ATTR), getattr(request, "fields", None)
    if attrs.get(REQUEST_ATTR) == request:
        return f"stored as part {attrs.get(PART_ATTR)!r}, where part {rank} belongs"
    if stored and given:
        differ = [key for key in sorted({*stored, *given}) if stored.get(key) != given.get(key)]
        if differ:
            return f"it differs in {', '.join(differ)}"
    return ("another history, model, inputs, targets, split, n_parts / number of processes or explain option, "
            "or an explaind whose parts hold other variables")


def read_part(path: Path, request: str, rank: int, fix: str = DELETE_AND_RESUME) -> xr.Dataset:
    """Stored part `rank` of this request, loaded, with its numbers checked against its digest."""
    if not is_stored(path, request, rank):
        raise InputError(f"part {rank} was stored, but {path} is gone: parts_dir must be one folder that every "
                         "process sees (on several nodes, a shared file system) and that nothing else cleans up")
    try:
        part = open_cube(path).load()
    except Exception as error:  # a chunk file truncated or changed: its compressed data fail to decode
        raise _damaged(path, rank, f"a chunk cannot be read ({type(error).__name__}: {error})", fix) from error
    stored = part.attrs.pop(PART_DIGEST_ATTR, None)
    if stored is None:
        raise _damaged(path, rank, "it has no digest: the process storing it stopped before writing one", fix)
    if stored != part_digest(part):
        raise _damaged(path, rank, "its numbers differ from those it was written with (a chunk file lost, "
                                   "which reads as NaN, or changed)", fix)
    return part


def missing_parts(parts_dir: str | os.PathLike, request: str, n_parts: int,
                  read: Iterable[int] | None = None) -> list[int]:
    """The ranks of this request's parts not stored in parts_dir. Every stored part's request is
    checked (another's refused), and the numbers of those in `read` (all of them by default), so
    that a damaged part is named before any compute."""
    paths = [part_path(parts_dir, rank) for rank in range(n_parts)]
    missing = [rank for rank, path in enumerate(paths) if not is_stored(path, request, rank)]
    for rank in sorted(set(range(n_parts) if read is None else read) - set(missing)):
        read_part(paths[rank], request, rank)
    return missing


def _damaged(path: Path, rank: int, cause: str, fix: str) -> InputError:
    return InputError(f"part {rank} at {path} is damaged: {cause}. It is not merged. Fix: {fix}")


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """The [start, stop) of rank's contiguous share of n items (sizes differ by at most 1)."""
    edges = np.linspace(0, n, world_size + 1).round().astype(int)
    return int(edges[rank]), int(edges[rank + 1])


def step_window(history: History, options: dict) -> tuple[int, int]:
    """The [start, stop) of the update steps that explain(**options) covers, checked."""
    return checked_steps(options.get("steps"), history.n_steps, options.get("convention", "update"),
                         options.get("parameter_scores", False))


def explain_shard(history, model, inputs, targets=None, *, split: str, rank: int, world_size: int,
                  tolerance: float | None = 1e-4, **kwargs):
    """This process's part of explain(history, model, inputs, ...). With a tolerance it stops, as
    explain does, at the first step whose recorded update misses the modelled one far beyond
    rounding; its output residual is not checked against the tolerance: a part's covers only its
    steps or inputs, and the parts are checked once merged."""
    if split not in SPLITS:
        raise InputError(f"split={split!r}: use one of {SPLITS}")
    history = open_history(history, model, "explain_shard")
    if split == "test":
        check_test_set("explain_shard", history, model, inputs, targets, kwargs)
    return explain_part(history, model, inputs, targets, split=split, rank=rank, world_size=world_size,
                        tolerance=tolerance, **kwargs)


def check_test_set(caller: str, history: History, model, inputs, targets, options: dict) -> None:
    """explain()'s checks of the whole set of test inputs and targets, before a part of them is
    explained: a refusal names an input by its place in the set, not in the part (an option
    explain() does not take, in `caller`'s name)."""
    build_request(history, model, inputs, targets, **request_options(caller, options))


def explain_part(history: History, model, inputs, targets=None, *, split: str, rank: int, world_size: int,
                 tolerance: float | None = 1e-4, **kwargs):
    """explain_shard's part, its test set already checked (check_test_set) where split="test"."""
    if split == "test":
        start, stop = shard_bounds(len(inputs), rank, world_size)
        if start == stop:
            raise InputError(f"{world_size} processes for {len(inputs)} test inputs: use fewer processes")
        test_ids = checked_test_ids(kwargs.pop("test_ids", None), len(inputs))  # checked whole: a part sees only its slice
        return _unchecked_part(history, model, inputs[start:stop], None if targets is None else targets[start:stop],
                               test_ids=test_ids[start:stop], tolerance=tolerance, **kwargs)
    first, last = step_window(history, kwargs)
    kwargs.pop("steps", None)  # replaced by this part's share of the window
    start, stop = (first + bound for bound in shard_bounds(last - first, rank, world_size))
    if start == stop:
        raise InputError(f"{world_size} processes for {last - first} steps: use fewer processes")
    replay = kwargs.pop("replay", None)
    if is_whole(replay) and replay >= 0:  # counted from the window's start, as one call counts it
        replay += start - first
    return _unchecked_part(history, model, inputs, targets, steps=(start, stop), replay=replay, tolerance=tolerance,
                           **kwargs)


def _unchecked_part(*args, **kwargs) -> xr.Dataset:
    """explain(*args, **kwargs), and its cube even where its output residual exceeds the tolerance."""
    try:
        return explain(*args, **kwargs)
    except ReconstructionError as error:
        if error.cube is None:  # stopped at a missed update: there is no part
            raise
        return error.cube


def merge(parts: list[xr.Dataset], split: str) -> xr.Dataset:
    """Combine the parts of explain_shard, in rank order, into one cube."""
    _check_same_coords(parts, split)
    if split == "test":
        merged = _merge_by_test(parts)
    else:
        merged = parts[0].copy()
        for name in ("attribution", "regularization", "residual", "residual_from_updates"):
            merged[name] = sum(p[name] for p in parts)
        for name in PER_HISTORY_STEP:  # each part checked its own steps (NaN elsewhere)
            merged[name] = functools.reduce(lambda a, b: a.fillna(b), (p[name] for p in parts))
        if any("carried" in p for p in parts):  # parts with a bounded replay
            merged["carried"] = sum(p["carried"] for p in parts if "carried" in p)
        merged["final"] = parts[-1]["final"]
    merged.attrs.update(
        **residual_attrs(merged["residual"], merged["final"] - merged["initial"], merged["residual_from_updates"]),
        max_update_residual=float(merged["update_residual"].max()),
        **{key: sum(int(p.attrs[key]) for p in parts)
           for key in ("kinks_located", "kink_segments_searched", "kink_segments_unresolved")},
    )
    for key in (REQUEST_ATTR, REQUEST_FIELDS_ATTR, PART_ATTR, PART_DIGEST_ATTR):  # a part's, not the whole cube's
        merged.attrs.pop(key, None)
    return merged


def _check_same_coords(parts: list[xr.Dataset], split: str) -> None:
    """Refuse parts labelled differently: xarray would add them over the common labels only,
    silently dropping the rest (all of them for other component names: a cube of zeros)."""
    def labels(part: xr.Dataset) -> dict:
        return {name: coord for name, coord in part.coords.items() if not (split == "test" and "test" in coord.dims)}

    first = labels(parts[0])
    for rank, part in enumerate(parts[1:], start=1):
        other = labels(part)
        for name in sorted(first.keys() | other.keys()):
            if name not in first or name not in other or not first[name].equals(other[name]):
                raise InputError(
                    f"part {rank} has other {name!r} labels than part 0 "
                    f"({_shown(other.get(name))} vs {_shown(first.get(name))}): the parts were computed "
                    "for different requests (components, outputs, step_bins, keep, ...) and cannot be "
                    "added. Fix: compute every part with the same options, into a new parts_dir"
                )


def _shown(coord) -> str:
    return "none" if coord is None else str(coord.values.tolist())[:200]


def _merge_by_test(parts: list[xr.Dataset]) -> xr.Dataset:
    with_test = [n for n in parts[0].data_vars if "test" in parts[0][n].dims]
    summed = [n for n in parts[0].data_vars if n not in with_test and n not in PER_HISTORY_STEP]
    merged = xr.concat([p[with_test] for p in parts], dim="test", data_vars="all", coords="different",
                       compat="equals", join="exact")
    for name in summed:  # test was summed while explaining, or a sum over test inputs
        merged[name] = sum(p[name] for p in parts)
    for name in PER_HISTORY_STEP:  # every part checked the same steps
        merged[name] = parts[0][name]
    merged.attrs = dict(parts[0].attrs)
    return merged


def explain_distributed(history, model, inputs, targets=None, *, split: str = "test",
                        parts_dir: str | os.PathLike, **kwargs) -> xr.Dataset | None:
    """explain() across the processes of a torchrun launch; process 0 returns the cube.

    A process whose part an earlier launch of the same request stored in parts_dir reads it back
    (checked against its digest) instead of computing it: launch again after a failure, and only
    the parts that are missing are computed.

    Every process checks the whole set of test inputs and targets first, so a refused one is
    refused by all of them before any compute, named by its place in the whole set. A process
    whose part fails (a step whose update misses far beyond rounding, out of memory, Ctrl-C, ...)
    raises its error at once, having told the others through the process group's store; each of
    the others, once its own part is stored, raises an error of the same explaind class
    (RuntimeError for any other exception) that names that process and its error. Under torchrun
    the first process to raise makes the agent stop the others at once, as it does for any failed
    worker. A process that dies outright (killed, out of host memory) tells nothing: launched
    otherwise, the others then wait for the group's timeout (init_process_group(timeout=...), 30
    minutes by default), or fail at once, saying that their parts are stored, where it was the
    store's host (process 0 of an env:// group). That timeout also bounds how long a process waits
    for the slowest part: initialise the group with a longer one for parts of unequal duration.
    """
    on_gpu = str(kwargs.get("device", "cpu")).startswith("cuda")
    if on_gpu:  # one GPU per process
        kwargs["device"] = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(kwargs["device"])
    if not dist.is_initialized():  # the backend follows the request, not the machine: NCCL needs CUDA
        dist.init_process_group("nccl" if on_gpu else "gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    tolerance = kwargs.pop("tolerance", 1e-4)
    outcomes = _Outcomes(rank, world_size)
    try:
        request = _store_own_part(history, model, inputs, targets, split, parts_dir, rank, world_size, tolerance,
                                  kwargs)
    except BaseException as error:  # told first, so that no process waits for this part
        outcomes.tell(error)
        raise
    outcomes.tell(None)
    outcomes.raise_failed()
    if rank != 0:
        return None
    merged = merge([read_part(part_path(parts_dir, r), request, r) for r in range(world_size)], split)
    check_residual(merged, tolerance)
    return merged


def _store_own_part(history, model, inputs, targets, split, parts_dir, rank, world_size, tolerance,
                    options: dict) -> str:
    """Compute and store this process's part of explain_distributed, unless an earlier launch
    stored it; the request's fingerprint."""
    from .resumable import request_fingerprint  # resumable imports this module

    history = open_history(history, model, "explain_distributed")
    request = request_fingerprint(history, model, inputs, targets, split=split, n_parts=world_size, **options)
    # every process checks every part's request, so that all of them refuse another's together,
    # and the numbers of its own only: process 0 reads them all to merge them
    if rank not in missing_parts(parts_dir, request, world_size, read=[rank]):
        return request
    with plans_shown_by(dropped) if rank else contextlib.nullcontext():  # one plan for the launch, from process 0
        part = explain_shard(history, model, inputs, targets, split=split, rank=rank,
                             world_size=world_size, tolerance=tolerance, **options)
    Path(parts_dir).mkdir(parents=True, exist_ok=True)
    store_part(part, part_path(parts_dir, rank), request, rank)
    return request


class _Outcomes:
    """How the part of each process of one explain_distributed call ended, in the key-value store
    of the default process group: a process whose part failed tells it and raises at once, where
    a collective would hold it until every other part is computed."""

    def __init__(self, rank: int, world_size: int):
        self.store = process_group_store()
        call = self.store.add(f"explaind.distributed/calls/{rank}", 1)  # the n-th call of every process is one call
        self.keys = [f"explaind.distributed/{call}/{r}" for r in range(world_size)]
        self.rank = rank

    def tell(self, error: BaseException | None) -> None:
        failure = None if error is None else described(error)
        try:
            self.store.set(self.keys[self.rank], json.dumps(failure))
        except dist.DistNetworkError as gone:
            if error is None:
                raise _store_gone(gone) from gone
            # else the failed part's own error is raised: no other process can hear of it anyway

    def raise_failed(self) -> None:
        """Wait for every process's outcome (within the store's timeout); raise if a part failed."""
        try:
            self.store.wait(self.keys)
        except dist.DistNetworkError as gone:  # its host stopped
            raise _store_gone(gone) from gone
        except dist.DistStoreError as error:  # the timeout
            silent = [rank for rank, key in enumerate(self.keys) if not self.store.check([key])]
            raise RuntimeError(
                f"no outcome came from {_processes(silent)} within the process group's timeout: each died outright "
                "(killed, out of host memory: see its log) or computes its part for longer than this process. "
                "Fix: what the log names, or initialise the group with a longer timeout, "
                "init_process_group(timeout=...), before calling explain_distributed") from error
        outcomes = [json.loads(self.store.get(key)) for key in self.keys]
        failed = {rank: failure for rank, failure in enumerate(outcomes) if failure is not None}
        if failed:
            raise _failed_parts(failed)


def _store_gone(error: Exception) -> RuntimeError:
    """The error of a process whose part is stored when the group's store can no longer be reached."""
    return RuntimeError(
        f"the process group's store cannot be reached ({type(error).__name__}: {str(error).splitlines()[0]}): the "
        "process that hosts it stopped (process 0 of a group initialised from MASTER_ADDR, or torchrun's agent): "
        "killed, failed, or timed out waiting for this part (see its log). This process's part is stored, so no "
        "cube is merged here. Fix: what that log names, then launch every process again with the same request and "
        "parts_dir: the stored parts are read back and only the missing ones computed")


def _failed_parts(failed: dict[int, list[str]]) -> Exception:
    """The error of a process whose part is stored when the parts of others failed: of the first
    failure's class where that is explaind's."""
    kind = error_class(next(iter(failed.values())))
    causes = {rank: f"{name}: {message}" if message else name for rank, (_, name, message) in failed.items()}
    if len(causes) == 1:
        [(rank, cause)] = causes.items()
        return kind(f"the part of process {rank} failed ({cause}), so no cube is merged. Fix: what process {rank}'s "
                    "error names, then launch every process again")
    listed = "; ".join(f"process {rank}: {cause}" for rank, cause in causes.items())
    return kind(f"the parts of {_processes(list(causes))} failed ({listed}), so no cube is merged. Fix: what their "
                "errors name, then launch every process again")


def _processes(ranks: list[int]) -> str:
    return f"process {ranks[0]}" if len(ranks) == 1 else f"processes {', '.join(map(str, ranks))}"
