"""Every stage notebook, executed at tiny parameters, then validated by nbval.

For each notebook: the stage runner executes it with papermill (parameters from
tests/params_tiny.yaml) into a temporary root; nbval then executes that executed notebook again
in a fresh kernel and compares every cell's output with the first run (images excepted),
after the sanitizers in tests/nbval_sanitize.cfg blank out durations, temporary paths and
memory addresses. A pass therefore means: the notebook runs from top to bottom, and the same
seeds give the same printed results, tables and metrics.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from explaind import pipeline

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory, tiny_params, digits_data) -> Path:
    """A throwaway repository root: the notebooks, the digits and params.yaml at tiny sizes."""
    root = tmp_path_factory.mktemp("notebooks")
    shutil.copytree(ROOT / "notebooks", root / "notebooks")
    shutil.copytree(digits_data, root / "data")
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params, sort_keys=False))
    return root


@pytest.mark.parametrize("stage", pipeline.stage_instances())  # in order: training, verify, cubes
def test_notebook_runs_and_reproduces_its_outputs(stage, tiny_root):
    executed = pipeline.run_stage(stage, root=tiny_root)
    paths = pipeline.stage_paths(stage, tiny_root)
    first_metrics = paths.metrics.read_bytes()

    # nbval needs its own pytest run; isolate it from this project's pytest configuration
    (tiny_root / "pytest.ini").write_text("[pytest]\n")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--nbval", "--nbval-current-env",
         "--nbval-sanitize-with", str(ROOT / "tests" / "nbval_sanitize.cfg"), str(executed)],
        cwd=tiny_root, text=True, capture_output=True,
        env={**os.environ, pipeline.ROOT_ENV: str(tiny_root)},
    )
    assert result.returncode == 0, f"nbval failed for {executed}:\n{result.stdout[-6000:]}\n{result.stderr[-2000:]}"
    assert " passed" in result.stdout and "failed" not in result.stdout
    # the re-execution wrote the stage's metrics again: byte for byte the same
    assert paths.metrics.read_bytes() == first_metrics
