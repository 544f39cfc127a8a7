"""The attribution cube: a labelled xarray.Dataset (docs/method.md §2), and its store on disk."""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
import xarray as xr

from . import __version__  # set before the package imports its modules
from .errors import InputError
from .functional import tensor_of

if TYPE_CHECKING:
    from .engine import Request

UNITS = {"log_prob": "log-probability", "logit": "logit"}
# Zarr format 2 specifies fixed-width unicode ("<U8"), the dtype of component and class labels;
# format 3 has no stable specification for it yet (zarr warns UnstableSpecificationWarning), and
# its specified variable-length strings would come back with another dtype.
STORE_FORMAT = 2
# An attribute save_cube puts in every store it writes (and open_cube hides again): overwrite=True
# replaces only such stores, never a zarr store of another program (which has a .zgroup too).
STORE_MARK = "written_by_explaind_save_cube"
# An attribute save_cube puts in every store it writes: the size and sha256 of each of the store's
# other files, which open_cube checks (sizes always, digests on request): zarr reads a lost chunk as NaN.
STORE_DIGESTS = "explaind_file_digests"
ATTRIBUTES = ".zattrs"  # the store's attributes, which hold the digests of the other files
# The most bytes of one chunk of a stored variable: a chunk is read and decompressed whole (a lazy
# read of one input's slice reads every chunk it touches), and numcodecs' Blosc, zarr's default
# compressor, refuses a buffer of more than 2 GiB.
CHUNK_BYTES = 2**27
# the update check, one value per recorded step (not per step bin)
PER_HISTORY_STEP = ("update_residual", "update_rounding_floor")
PARAMETER_SCORES = ("parameter_score", "parameter_score_signed", "parameter_score_stepwise_abs")
# what they are (DESIGN §3), stored with the cube
PARAMETER_SCORE_DEFINITIONS = (
    "parameter_score: Σ_test Σ_output |Σ_step Σ_train ψ| (the paper's pruning importance); "
    "parameter_score_stepwise_abs: Σ_test Σ_output Σ_step |Σ_train ψ| (no cancellation over "
    "steps); parameter_score_signed: Σ_test Σ_output Σ_step Σ_train ψ. The sums run over the "
    "test and output dims that are not kept. Weight decay excluded."
)


def residual_attrs(residual, change, from_updates=None) -> dict[str, float]:
    """The residual attributes of a reconstruction or cube from its residual and its change
    f(θ_N) − f(θ_0) (arrays over the same entries): max_abs_residual, max_abs_change and
    relative_residual, the residual's share of the largest change (0 if neither the outputs nor
    the decomposition moved; inf if only the decomposition did). With
    a cube's residual_from_updates, also its largest entry and that of the rest, the path
    integral's own error: max_abs_residual_from_updates and max_abs_path_residual."""
    residual = np.asarray(residual)
    largest = float(np.abs(residual).max())
    change = float(np.abs(np.asarray(change)).max())
    relative = largest / change if change > 0 else (0.0 if largest == 0 else float("inf"))
    if np.isnan(largest) or np.isnan(change):  # a NaN output must never read as exact
        relative = float("nan")
    attrs = {"max_abs_residual": largest, "max_abs_change": change, "relative_residual": relative}
    if from_updates is not None:
        from_updates = np.asarray(from_updates)
        attrs.update(max_abs_residual_from_updates=float(np.abs(from_updates).max()),
                     max_abs_path_residual=float(np.abs(residual - from_updates).max()))
    return attrs


def takes_cube(score: Callable) -> Callable:
    """`score(cube, ...)` refusing anything but a cube, naming the fix: a cube's variable
    (`cube.attribution`) or its store's path failed deep inside with a bare KeyError or TypeError,
    or, for per_parameter, read as a cube without parameter scores."""
    @wraps(score)
    def checked(cube, *args, **kwargs):
        if not isinstance(cube, xr.Dataset):
            if isinstance(cube, xr.DataArray):
                fix = f"pass the whole cube, not its variable {cube.name!r}: {score.__name__}(cube)"
            elif isinstance(cube, (str, os.PathLike)):
                fix = f"open the store first: {score.__name__}(explaind.open_cube({str(cube)!r}))"
            else:
                fix = "pass the xarray.Dataset that explaind.explain returns or explaind.open_cube reads"
            raise InputError(f"{score.__name__} takes a cube (an xarray.Dataset), not a {type(cube).__name__}. "
                             f"Fix: {fix}")
        return score(cube, *args, **kwargs)
    return checked


@takes_cube
def per_parameter(cube: xr.Dataset) -> xr.Dataset:
    """A cube's parameter-wise scores, one per scalar parameter: summed over the explained inputs
    and outputs the cube may keep."""
    if "parameter_score" not in cube:
        raise InputError("the cube holds no parameter scores: explain again with parameter_scores=True")
    # skipna=False: a NaN score must reach keep_mask, which refuses it, rather than count as 0
    return xr.Dataset({name: cube[name].sum([d for d in cube[name].dims if d != "parameter"], skipna=False)
                       for name in PARAMETER_SCORES if name in cube})


class MergedParts:
    """Whole arrays that each chunk pair's partial results are added into as its pass ends, so
    that a pass's results are freed before the next pass runs (kept until every pass had ended,
    they held the cube twice: each pass's share, then the whole arrays). A first share as large
    as the whole attribution (one pass, or chunks of a dim summed over) becomes its array as it is."""

    def __init__(self, req: "Request"):
        self.req = req
        self.arrays: dict[str, torch.Tensor] = {}
        self.t_dim = len(req.inputs) if req.keeps("test") else 1
        self.o_dim = req.n_outputs if req.keeps("output") else 1

    def add(self, tests: slice, trains: slice, part: dict) -> None:
        req, merged = self.req, self.arrays
        rows_t, rows_o = part["rows_shape"]
        n_bins, n_comp = part["attribution"].shape[:2]
        block = part["attribution"].reshape(n_bins, n_comp, rows_t, rows_o, -1)
        if not merged:
            self._allocate(block)
        t_index = tests if req.keeps("test") else slice(0, 1)
        m_index = trains if req.keeps("train") else slice(0, 1)
        if merged["attribution"] is not block:
            merged["attribution"][:, :, t_index, :, m_index] += block
        regularization = merged["regularization"]
        if "total" in part:
            regularization[:, :, t_index] += part["regularization"].reshape(n_bins, n_comp, rows_t, rows_o)
            if "carried" in part:
                merged.setdefault("carried", torch.zeros_like(regularization))
                merged["carried"][:, :, t_index] += part["carried"].reshape(n_bins, n_comp, rows_t, rows_o)
            merged["total"][tests] = part["total"]
            merged["path_change"][tests] = part["path_change"]
            merged["update_residual"] = tensor_of(part["update_residual"])
            merged["update_rounding_floor"] = tensor_of(part["update_rounding_floor"])
            for key in PARAMETER_SCORES:
                if key in part:
                    empty = torch.zeros(self.t_dim, self.o_dim, part[key].shape[-1], dtype=req.flat.dtype,
                                        device="cpu")
                    scores = merged.setdefault(key, empty)
                    scores[t_index] += part[key].reshape(rows_t, rows_o, -1)

    def _allocate(self, block: torch.Tensor) -> None:
        """The whole arrays, on the host whatever torch.set_default_device has set."""
        req, dtype = self.req, self.req.flat.dtype
        n_bins, n_comp = block.shape[:2]
        n_train = len(req.train_index) if req.keeps("train") else 1
        shape = (n_bins, n_comp, self.t_dim, self.o_dim, n_train)
        whole = block.shape == shape and block.device.type == "cpu"  # its pass's own accumulator, no longer used
        total = torch.zeros(len(req.inputs), req.n_outputs, dtype=dtype, device="cpu")
        self.arrays.update(
            attribution=block if whole else torch.zeros(shape, dtype=dtype, device="cpu"),
            regularization=torch.zeros(shape[:-1], dtype=dtype, device="cpu"),
            total=total, path_change=torch.zeros_like(total))


def checked_test_ids(test_ids, n_test: int) -> np.ndarray:
    """The test coordinate: the given ids (one per input), or 0 … n_test − 1."""
    test_ids = np.arange(n_test) if test_ids is None else np.asarray(test_ids)
    if test_ids.ndim != 1 or len(test_ids) != n_test:
        raise InputError(f"got test_ids of shape {test_ids.shape} for {n_test} inputs: pass one id per input")
    ids = pd.Index(test_ids)
    if ids.has_duplicates:  # the cube's test labels select inputs: a repeated one could not be told apart
        raise InputError(f"test_ids repeat {ids[ids.duplicated()].unique().tolist()[:10]}: pass a distinct id per input")
    return test_ids


def assemble_cube(req: "Request", merged: dict[str, torch.Tensor], initial: torch.Tensor, final: torch.Tensor,
                  test_ids: np.ndarray) -> xr.Dataset:
    """The cube of a request from its passes' results, merged (MergedParts.arrays)."""
    coords = _coords(req, test_ids)

    def labelled(array: torch.Tensor, dims: tuple[str, ...]) -> tuple[tuple[str, ...], np.ndarray]:
        """Drop the dims that were summed (kept as size-1 axes while computing)."""
        kept = (*req.keep, "parameter")  # a parameter score is never summed over parameters
        summed = tuple(i for i, d in enumerate(dims) if d not in kept)
        return tuple(d for d in dims if d in kept), array.numpy().squeeze(axis=summed)

    initial, final, total = initial.numpy(), final.numpy(), merged["total"].numpy()
    residual = final - initial - total
    # Σ_s φ_s·(Δθ_s + η_s(Σ_k u_{s,k} + r_s)): the part of the residual that is the update
    # residual's effect; the rest is what the path integral misses
    from_updates = merged["path_change"].numpy() - total
    data = {
        "attribution": labelled(merged["attribution"], ("step", "component", "test", "output", "train")),
        "regularization": labelled(merged["regularization"], ("step", "component", "test", "output")),
        **({"carried": labelled(merged["carried"], ("step", "component", "test", "output"))} if "carried" in merged else {}),
        "initial": (("test", "output"), initial),
        "final": (("test", "output"), final),
        "residual": (("test", "output"), residual),
        "residual_from_updates": (("test", "output"), from_updates),
        "update_residual": (("history_step",), merged["update_residual"].numpy()),
        # the update residual the rounding of the stored θ allows at each step (it grows as a
        # schedule shrinks the updates): update_residual below it is rounding, not a miss
        "update_rounding_floor": (("history_step",), merged["update_rounding_floor"].numpy()),
    }
    if req.parameter_scores:
        tensor_id = np.repeat(np.arange(len(req.flat.layout.names)), req.flat.layout.sizes).astype(np.int32)
        coords["parameter_tensor"] = ("parameter", tensor_id)
        for key in PARAMETER_SCORES:
            data[key] = labelled(merged[key], ("test", "output", "parameter"))
    used = {d for dims, _ in data.values() for d in dims}
    cube = xr.Dataset(data, coords={k: v for k, v in coords.items() if v[0] in used})
    order = [d for d in ("step", "component", "train", "test", "output") if d in cube["attribution"].dims]
    cube["attribution"] = cube["attribution"].transpose(*order)
    cube.attrs.update(_attrs(req), **residual_attrs(residual, final - initial, from_updates),
                      max_update_residual=float(np.fmax.reduce(merged["update_residual"].numpy())),  # over the checked steps
                      parameter_score_definitions=PARAMETER_SCORE_DEFINITIONS)
    return cube


def _coords(req: "Request", test_ids: np.ndarray) -> dict:
    """The cube's labels: of every dim it may have (those of no variable are dropped)."""
    edges = req.step_edges
    coords = {
        "step": ("step", edges[:-1]),
        "step_stop": ("step", edges[1:]),
        "component": ("component", list(req.components)),
        "train": ("train", req.train_index.numpy()),
        "test": ("test", test_ids),
        "output": ("output", np.asarray(req.output_labels)),
        "history_step": ("history_step", np.arange(req.history.n_steps)),
    }
    if req.select is not None and not isinstance(req.output_labels[0], (int, np.integer)):
        coords["output_class"] = ("test", req.select[:, 0].numpy())
    if req.train_labels is not None:
        coords["train_label"] = ("train", req.train_labels)
    return coords


def _attrs(req: "Request") -> dict:
    """How the cube was computed, and from what."""
    history = req.history
    return dict(
        units=UNITS[req.target],
        sign_convention="positive attribution raises the output",
        target=req.target,
        output_fn=req.flat.output_fn_name,
        step_convention=req.convention,
        optimizer=history.optimizer,
        loss=history.loss,
        reduction=history.reduction,
        **({} if history.class_weights is None else {"class_weights": history.class_weights.tolist()}),
        quadrature_rule=req.path.rule,
        quadrature_nodes=req.path.quadrature,
        breakpoints=int(req.path.breakpoints),
        kink_tolerance=float(req.path.kink_tolerance),
        max_kinks=req.path.max_kinks,
        **req.path.stats.as_attrs(),
        dtype=str(req.flat.dtype).removeprefix("torch."),
        coarser_rounding=req.coarser_rounding,
        explaind_version=__version__,
        history_sha256=history.fingerprint(),
        n_steps=history.n_steps,
        replay_start=req.replay_start,
        components=list(req.components),
        tensor_names=list(req.flat.layout.names),
    )


def check_cube_path(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """What save_cube refuses about a destination, checked before a cube is computed for it: a
    name without .zarr, an existing path without overwrite, anything save_cube did not write, and
    a folder it cannot write in."""
    path = Path(path)
    if path.suffix != ".zarr":
        raise InputError(
            f"{path}: save_cube writes a zarr store (a folder), so its name must end in .zarr: "
            f"save to {path.with_suffix('.zarr')} (for NetCDF, install netCDF4 and call cube.to_netcdf({str(path)!r}, "
            "engine='netcdf4'): scipy's netCDF 3 writer, xarray's default without netCDF4, cannot write the "
            "cube's lists of names)"
        )
    if path.exists() and not _written_by_save_cube(path):
        raise FileExistsError(_not_replaced(path))
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists: choose another path or pass overwrite=True to replace it")
    parent = next((folder for folder in path.absolute().parents if folder.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{path}: {parent} cannot hold a new folder (not a writable folder): choose another path")
    return path


def save_cube(cube: xr.Dataset, path: str | os.PathLike, *, overwrite: bool = False,
              finish: Callable[[Path], None] | None = None) -> Path:
    """Write a cube to a chunked, compressed zarr store, format 2 (readable lazily with open_cube).

    Refuses to replace an existing store unless overwrite=True, and never replaces anything that
    save_cube did not write (it marks its stores with the attribute STORE_MARK); the store is
    written to a fresh folder next to its destination and moved into place, so a failed write
    never leaves half a cube or removes the old one. `finish(store)` runs on the written store
    before it is moved into place (e.g. to add what only the written store can tell).
    """
    path = check_cube_path(path, overwrite)
    encoding = {name: {"chunks": chunk_shape(var.shape, var.dtype.itemsize)}
                for name, var in cube.data_vars.items() if var.ndim}
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_killed_writes(path)
    scratch = Path(tempfile.mkdtemp(dir=path.parent, prefix=_scratch_prefix(path)))  # nobody else's name
    moved_in = False
    try:
        marked = cube.assign_attrs({STORE_MARK: __version__})  # a copy: the caller's cube is left as it is
        marked.to_zarr(scratch / "new", mode="w-", consolidated=False, encoding=encoding, zarr_format=STORE_FORMAT)
        if finish is not None:
            finish(scratch / "new")
        _write_digests(scratch / "new")
        if path.exists():  # moved aside, not deleted, until the new store is in place
            os.replace(path, scratch / "old")
        os.replace(scratch / "new", path)
        moved_in = True
    finally:
        if not moved_in and (scratch / "old").exists() and not path.exists():
            os.replace(scratch / "old", path)  # the old store goes back
        if moved_in or not (scratch / "old").exists():  # else scratch keeps the only copy of the old store
            shutil.rmtree(scratch, ignore_errors=True)
    return path


def chunk_shape(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """A stored variable's chunks: at most 256 along each dim, and the largest of them halved until
    a chunk holds at most CHUNK_BYTES."""
    chunks = [min(n, 256) for n in shape]
    while math.prod(chunks) * itemsize > CHUNK_BYTES:
        largest = chunks.index(max(chunks))
        chunks[largest] = -(-chunks[largest] // 2)
    return tuple(chunks)


def _not_replaced(path: Path) -> str:
    fix = "remove it yourself (if it is yours to lose) or choose another path"
    if _is_store(path):  # a zarr group without the mark: an older explaind's store, or another program's
        return (f"{path} is a zarr store without the attribute {STORE_MARK!r} that save_cube puts in every "
                "store: another program wrote it, or an older explaind, which did not mark its stores yet. It "
                f"is not replaced: {fix}")
    return f"{path} exists and is not a store save_cube wrote, so it is not replaced: {fix}"


def _scratch_prefix(path: Path) -> str:
    return f".{path.name}.explaind-partial-"


def _remove_killed_writes(path: Path) -> None:
    """The scratch folders of earlier saves to `path` that were killed while writing. One that
    holds an `old` store was killed between moving the old store aside and the new one in: it
    is kept, since it may hold the only copy of the old store."""
    for scratch in path.parent.glob(glob.escape(_scratch_prefix(path)) + "*"):  # names may hold [ ] * ?
        if scratch.is_dir() and not (scratch / "old").exists():
            shutil.rmtree(scratch)


def _is_store(path: Path) -> bool:
    """Whether path is a store save_cube writes: a zarr format 2 group (of a cube, or of any
    other dataset the pipeline stores with it, such as the datamodels' results)."""
    return (path / ".zgroup").is_file()


def _written_by_save_cube(path: Path) -> bool:
    try:
        return STORE_MARK in json.loads((path / ".zattrs").read_text())
    except (OSError, ValueError, TypeError):  # no attributes, not JSON, or not a JSON object
        return False


def _file_digest(path: Path) -> dict:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}


def _write_digests(store: Path) -> None:
    files = {file.relative_to(store).as_posix(): _file_digest(file) for file in sorted(store.rglob("*"))
             if file.is_file() and file != store / ATTRIBUTES}
    attributes = json.loads((store / ATTRIBUTES).read_text())
    (store / ATTRIBUTES).write_text(json.dumps({**attributes, STORE_DIGESTS: files}, indent=4))


def _check_digests(store: Path, verify: bool) -> None:
    """Refuse a store whose files save_cube listed are missing, of another size or (verify) of
    another sha256, or whose attributes are no JSON. A store without the list (an older explaind's)
    is opened unchecked."""
    damage = store_damage(store, verify)
    if damage is not None:
        raise InputError(f"the cube store {store} is damaged: {damage}. Fix: explain the history again and save the "
                         "cube (`dvc repro` for the pipeline's cubes), or restore the store from a copy")


def store_damage(store: Path, verify: bool = False) -> str | None:
    """What open_cube finds damaged in a store (None: nothing), for callers that name their own fix."""
    try:
        listed = {name: (int(recorded["size"]), str(recorded["sha256"])) for name, recorded in
                  json.loads((store / ATTRIBUTES).read_text()).get(STORE_DIGESTS, {}).items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        return f"its attributes ({ATTRIBUTES}) cannot be read ({type(error).__name__}: {error})"
    damaged = []
    for name, (size, sha256) in listed.items():
        file = store / name
        if not file.is_file():
            damaged.append(f"{name} is missing")
        elif file.stat().st_size != size:
            damaged.append(f"{name} holds {file.stat().st_size} bytes, not {size}")
        elif verify and _file_digest(file)["sha256"] != sha256:
            damaged.append(f"{name} differs from its sha256")
    if not damaged:
        return None
    more = f" and {len(damaged) - 3} more" if len(damaged) > 3 else ""
    return f"{'; '.join(damaged[:3])}{more} (zarr would read a lost chunk as NaN)"


def open_cube(path: str | os.PathLike, verify: bool = False) -> xr.Dataset:
    """Open a stored cube lazily (nothing is read until values are used).

    The store's files are checked against the sizes save_cube listed (a lost or truncated chunk,
    which zarr would read as NaN, is refused), and with verify=True against their sha256 too,
    which reads the whole store once (a flipped byte inside a chunk)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no cube at {path}: compute one with explaind.explain and save_cube")
    if (path / "zarr.json").is_file():
        raise InputError(f"{path} is a zarr format 3 store, and save_cube writes format {STORE_FORMAT}: it is "
                         "no cube store. Open it with xarray.open_zarr, or save the cube with explaind.save_cube")
    if not _is_store(path):
        raise InputError(f"{path} is not a cube store: open a folder written by explaind.save_cube")
    _check_digests(path, verify)
    try:
        store = xr.open_zarr(path, consolidated=False)
    except ValueError as error:  # an array's metadata is no JSON (a store without digests, or one of its size)
        raise InputError(f"the cube store {path} cannot be opened ({type(error).__name__}: {error}): its metadata "
                         "is damaged. Fix: explain the history again and save the cube, or restore the store") from None
    store.attrs.pop(STORE_MARK, None)
    store.attrs.pop(STORE_DIGESTS, None)
    return store
