"""Shared fixtures. Keep this file small: fixtures used by one test module live in that module."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

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
