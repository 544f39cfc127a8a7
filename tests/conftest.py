"""Shared fixtures. Keep this file small: fixtures used by one test module live in that module."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from repo_copy import copy_repository, dvc, run_cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo() -> Path:
    """The repository root (the checkout the tests run from)."""
    return ROOT


@pytest.fixture(scope="session")
def tiny_params() -> dict:
    """params.yaml-shaped parameters that make every training stage run in seconds."""
    return yaml.safe_load((ROOT / "tests" / "params_tiny.yaml").read_text())


@pytest.fixture(scope="session")
def digits_data(tmp_path_factory) -> Path:
    """A data/ folder rebuilt by the deterministic export (the pipeline's default raw data)."""
    from explaind.data import export_digits

    data = tmp_path_factory.mktemp("export") / "data"
    export_digits(data)
    return data


@dataclass(frozen=True)
class Repro:
    root: Path
    data: subprocess.CompletedProcess  # `python -m explaind.pipeline data`
    first: subprocess.CompletedProcess  # the first `dvc repro`


@pytest.fixture(scope="session")
def tiny_repro(tmp_path_factory, tiny_params) -> Repro:
    """A fresh-clone copy of the repository at tiny parameters, after `explaind.pipeline data` and
    a first `dvc repro`. Shared because executing the notebooks is most of the suite's time: the
    end-to-end test checks this run, the notebook tests validate the notebooks it executed. Tests
    that change files work on a copy of `root`, so neither sees the other's changes. Its tests
    carry the mark xdist_group("tiny_repro"): each xdist worker would build its own."""
    root = copy_repository(tmp_path_factory.mktemp("repro") / "explaind", tiny_params)
    data = run_cli("data", cwd=root, env={"PYTHONPATH": str(root)})  # no remote: rebuilt by the export
    assert data.returncode == 0, data.stderr
    return Repro(root, data, dvc(root, "repro"))
