"""The cube's store on disk: save_cube -> open_cube keeps values, labels, dtypes and attributes
exactly, and writes nothing zarr flags as unstable."""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import explaind as ex
import explaind.cube as cube_module
from engine_cases import Case, train

COMPONENTS = {"verborgene Schicht (ü)": ["hidden"], "Ausgabe": ["out"]}  # non-ASCII labels


@pytest.fixture(scope="module")
def cube(tmp_path_factory) -> xr.Dataset:
    run = train(Case("mlp", "adamw", steps=4, n_train=8, n_test=3), tmp_path_factory.mktemp("store") / "h")
    return run.explain(components=COMPONENTS, outputs="true", test_ids=["cat 1", "dog 22", "cat 333"])


def test_labelled_cube_round_trip_is_exact_and_warning_free(cube, tmp_path):
    assert cube["component"].dtype.kind == cube["test"].dtype.kind == cube["output"].dtype.kind == "U"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. zarr's UnstableSpecificationWarning for "<U" labels
        ex.save_cube(cube, tmp_path / "cube.zarr")
        opened = ex.open_cube(tmp_path / "cube.zarr").load()
    assert opened["component"].values.tolist() == list(COMPONENTS)
    assert opened["test"].values.tolist() == ["cat 1", "dog 22", "cat 333"]
    assert opened["output"].values.tolist() == ["true"]
    for name, variable in cube.variables.items():
        assert opened[name].dims == variable.dims, name
        assert opened[name].dtype == variable.dtype, name
        np.testing.assert_array_equal(opened[name].values, variable.values, err_msg=name)
    assert opened.attrs == cube.attrs


def chunk_of(store: Path, variable: str) -> Path:
    chunks = [file for file in (store / variable).iterdir() if not file.name.startswith(".")]
    assert chunks, f"{variable} has no chunk file"
    return chunks[0]


@pytest.mark.parametrize("damage", ["deleted", "truncated", "flipped", "metadata"])
def test_a_damaged_store_is_refused_when_opened_not_read_as_nan(cube, tmp_path, damage):
    """zarr reads a lost chunk as its fill value: a deleted attribution chunk read back as NaN and
    summed to 0. save_cube lists each file's size and sha256; open_cube checks the sizes, and
    with verify=True the digests."""
    store = ex.save_cube(cube, tmp_path / "c.zarr")
    ex.open_cube(store, verify=True)
    file = store / ".zattrs" if damage == "metadata" else chunk_of(store, "attribution")
    data = file.read_bytes()
    if damage == "deleted":
        file.unlink()
    elif damage == "truncated":
        file.write_bytes(data[:-1])
    elif damage == "flipped":
        file.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    else:
        file.write_text("{")
    said = {"deleted": "attribution/[^ ]+ is missing", "truncated": f"attribution/[^ ]+ holds {len(data) - 1} bytes, "
            f"not {len(data)}", "flipped": "attribution/[^ ]+ differs from its sha256",
            "metadata": r"its attributes \(\.zattrs\) cannot be read \(JSONDecodeError"}[damage]
    damaged = rf"(?s)cube store .*c\.zarr is damaged: {said}.*explain the history again and save the cube"
    with pytest.raises(ex.InputError, match=damaged):
        ex.open_cube(store, verify=True)
    if damage == "flipped":  # sizes alone pass it: the default open stays cheap
        np.testing.assert_array_equal(ex.open_cube(store)["initial"].values, cube["initial"].values)
    else:
        with pytest.raises(ex.InputError, match=damaged):
            ex.open_cube(store)


def test_saving_removes_nothing_of_the_users_and_leaves_no_scratch(cube, tmp_path):
    notes = tmp_path / "c.zarr.partial" / "notes.txt"  # a name the old scratch folder used
    notes.parent.mkdir()
    notes.write_text("mine")
    ex.save_cube(cube, tmp_path / "c.zarr")
    ex.save_cube(cube, tmp_path / "c.zarr", overwrite=True)
    assert notes.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.zarr", "c.zarr.partial"]


def test_a_killed_write_is_cleaned_up_unless_it_holds_the_old_store(cube, tmp_path):
    """A save killed while writing leaves its scratch folder with a partial `new` store: the next
    save to that path removes it. One killed between moving the old store aside and the new one
    in holds the only copy of the old store: it is kept."""
    partial = tmp_path / ".c.zarr.explaind-partial-killed1" / "new"
    aside = tmp_path / ".d.zarr.explaind-partial-killed2" / "old"
    partial.mkdir(parents=True)
    aside.mkdir(parents=True)
    ex.save_cube(cube, tmp_path / "c.zarr")
    ex.save_cube(cube, tmp_path / "d.zarr")
    assert sorted(p.name for p in tmp_path.iterdir()) == [aside.parent.name, "c.zarr", "d.zarr"]


def test_a_failed_write_keeps_the_old_store(cube, tmp_path, monkeypatch):
    ex.save_cube(cube, tmp_path / "c.zarr")

    write = xr.Dataset.to_zarr

    def full_disk(self, store, **kwargs):  # the disk fills up after half the store is written
        write(self[["initial"]], store, **{**kwargs, "encoding": None})
        raise OSError("No space left on device")

    monkeypatch.setattr(xr.Dataset, "to_zarr", full_disk)
    with pytest.raises(OSError, match="No space"):
        ex.save_cube(cube * 2, tmp_path / "c.zarr", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.zarr"]
    np.testing.assert_array_equal(ex.open_cube(tmp_path / "c.zarr")["attribution"].values, cube["attribution"].values)


def before_moving_the_new_store_in(monkeypatch, action):
    """os.replace that runs action(target) first when save_cube moves its new store into place."""
    replace = os.replace

    def replace_after(source, target):
        if Path(source).name == "new":
            action(Path(target))
        replace(source, target)

    monkeypatch.setattr(os, "replace", replace_after)


def test_a_store_that_fails_to_move_in_puts_the_old_one_back(cube, tmp_path, monkeypatch):
    ex.save_cube(cube, tmp_path / "c.zarr")

    def fail(target):  # e.g. the path was taken again in between
        raise OSError("simulated failure moving the new store into place")

    before_moving_the_new_store_in(monkeypatch, fail)
    with pytest.raises(OSError, match="simulated"):
        ex.save_cube(cube * 2, tmp_path / "c.zarr", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.zarr"]
    np.testing.assert_array_equal(ex.open_cube(tmp_path / "c.zarr")["attribution"].values, cube["attribution"].values)


def test_a_store_whose_path_was_taken_meanwhile_keeps_the_old_one_aside(cube, tmp_path, monkeypatch):
    ex.save_cube(cube, tmp_path / "c.zarr")
    # someone else's folder appears at the path in between
    before_moving_the_new_store_in(monkeypatch, lambda target: (target / "theirs").mkdir(parents=True))
    with pytest.raises(OSError):
        ex.save_cube(cube * 2, tmp_path / "c.zarr", overwrite=True)
    monkeypatch.undo()
    (aside,) = tmp_path.glob(".c.zarr.explaind-partial-*")
    np.testing.assert_array_equal(ex.open_cube(aside / "old")["attribution"].values, cube["attribution"].values)
    ex.save_cube(cube, tmp_path / "d.zarr")  # the next save to another path leaves it alone too
    assert aside.is_dir() and (tmp_path / "c.zarr" / "theirs").is_dir()


def test_killed_writes_are_matched_by_the_stores_literal_name(cube, tmp_path):
    """`[1]` in a store's name is no glob character class: the scratch folder of `cube[1].zarr` is
    cleaned up, and that of `cube1.zarr`, which another save may still be writing, is left alone."""
    own = tmp_path / ".cube[1].zarr.explaind-partial-killed" / "new"
    other = tmp_path / ".cube1.zarr.explaind-partial-writing" / "new"
    own.mkdir(parents=True)
    other.mkdir(parents=True)
    ex.save_cube(cube, tmp_path / "cube[1].zarr")
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.parent.name, "cube[1].zarr"]


def test_only_a_store_save_cube_wrote_is_replaced(cube, tmp_path):
    (tmp_path / "file.zarr").write_text("not a cube")
    (tmp_path / "folder.zarr").mkdir()
    other = xr.Dataset({"a": ("x", np.arange(3.0))})  # another program's zarr store: a .zgroup too
    other.to_zarr(tmp_path / "other.zarr", zarr_format=2, consolidated=False)
    for target in ("file.zarr", "folder.zarr"):
        with pytest.raises(FileExistsError, match="(?s)not a store save_cube wrote.*remove it yourself.*another path"):
            ex.save_cube(cube, tmp_path / target, overwrite=True)
    with pytest.raises(FileExistsError, match="(?s)zarr store without the attribute.*another program.*older "
                                              "explaind.*remove it yourself.*another path"):
        ex.save_cube(cube, tmp_path / "other.zarr", overwrite=True)
    assert (tmp_path / "file.zarr").read_text() == "not a cube"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.zarr", "folder.zarr", "other.zarr"]
    xr.testing.assert_identical(xr.open_zarr(tmp_path / "other.zarr", consolidated=False).load(), other)
    other.to_zarr(tmp_path / "v3.zarr", zarr_format=3, consolidated=False)
    with pytest.raises(ex.InputError, match="(?s)zarr format 3 store.*format 2.*xarray.open_zarr"):
        ex.open_cube(tmp_path / "v3.zarr")
    with pytest.raises(ex.InputError, match="(?s)not a cube store.*save_cube"):
        ex.open_cube(tmp_path / "folder.zarr")


def test_any_stored_dataset_is_replaced_with_overwrite(cube, tmp_path):
    """save_cube also stores datasets without an attribution (the datamodels' results)."""
    ex.save_cube(cube[["initial"]], tmp_path / "d.zarr")
    ex.save_cube(cube[["final"]], tmp_path / "d.zarr", overwrite=True)
    assert list(ex.open_cube(tmp_path / "d.zarr").data_vars) == ["final"]


def test_a_name_that_promises_another_format_is_refused(cube, tmp_path):
    """The refusal names the netCDF writer that takes a cube: 'call cube.to_netcdf yourself' led to
    scipy's, which fails on the cube's lists of names (components, tensor_names) with a bare
    KeyError: ('U', 32)."""
    path = tmp_path / "cube.nc"
    with pytest.raises(ex.InputError, match=rf"(?s)must end in \.zarr.*cube\.zarr.*install netCDF4 and call "
                                            rf"cube\.to_netcdf\({re.escape(repr(str(path)))}, engine='netcdf4'\)"):
        ex.save_cube(cube, path)
    assert not list(tmp_path.iterdir())


def test_a_large_variable_is_stored_in_chunks_of_at_most_chunk_bytes(tmp_path):
    """Chunks of at most 256 along each dim made a 4-dim variable of 256 steps × 5 components ×
    256 samples × 64 inputs one chunk of 160 MiB (now two of 80 MiB), read whole by any lazy read of one input (at
    256 × 4 × 256 × 100 × 11, 2.15 GiB, Blosc refused to write it: 'Codec does not support buffers
    of > 2147483647 bytes'). Zeros, so that the test holds no memory for them."""
    shape = (256, 5, 256, 64)
    cube = xr.Dataset({"attribution": (("step", "component", "train", "test"), np.zeros(shape))})
    cube["attribution"][3, 4, 200, 63] = 1.5
    ex.save_cube(cube, tmp_path / "c.zarr")
    chunks = json.loads((tmp_path / "c.zarr" / "attribution" / ".zarray").read_text())["chunks"]
    assert chunks == [128, 5, 256, 64] and np.prod(chunks) * 8 <= cube_module.CHUNK_BYTES == 2**27
    one_input = ex.open_cube(tmp_path / "c.zarr").attribution.sel(test=63).values
    assert one_input[3, 4, 200] == 1.5 and np.count_nonzero(one_input) == 1


def test_a_nan_residual_is_not_exact():
    from explaind.cube import residual_attrs

    assert np.isnan(residual_attrs([np.nan, 0.0], [1.0, 2.0])["relative_residual"])
    assert np.isnan(residual_attrs([0.0], [np.nan])["relative_residual"])
    assert residual_attrs([0.0], [0.0])["relative_residual"] == 0.0
    # a decomposition that moves where the outputs did not is no exact one (it read 0 before)
    assert residual_attrs([1e-3, 0.0], [0.0, 0.0])["relative_residual"] == np.inf


def test_the_residual_attributes_by_hand():
    """relative_residual is the largest |residual| over the largest |change| (no mean), and the
    residual's largest part beyond the updates' share is the path integral's."""
    from explaind.cube import residual_attrs

    attrs = residual_attrs([[1e-3, -4e-3]], [[2.0, -8.0]], from_updates=[[1e-3, 1e-3]])
    assert attrs == pytest.approx({"max_abs_residual": 4e-3, "max_abs_change": 8.0, "relative_residual": 5e-4,
                                   "max_abs_residual_from_updates": 1e-3, "max_abs_path_residual": 5e-3}, rel=1e-15)
