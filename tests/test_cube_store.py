"""The cube's store on disk: save_cube -> open_cube keeps values, labels, dtypes and attributes
exactly, and writes nothing zarr flags as unstable."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import xarray as xr

import explaind as ex
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
