"""Every stage notebook, executed at tiny parameters, then validated by nbval.

The notebooks are the ones the end-to-end test's `dvc repro` executed with papermill (tiny_repro
in conftest.py, parameters from tests/params_tiny.yaml); executing them once more here would
double the suite's longest part. For each notebook, nbval executes the executed notebook again in
a fresh kernel and compares every cell's output with the first run (images excepted), after the
sanitizers in tests/nbval_sanitize.cfg blank out durations, temporary paths and memory addresses.
A pass therefore means: the notebook runs from top to bottom, and the same seeds give the same
printed results, tables and metrics.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from explaind import pipeline

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.xdist_group("tiny_repro")  # on the worker that holds the shared run


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory, tiny_repro) -> Path:
    """A copy of the pipeline's tiny run (nbval's re-executions write the stages' outputs again)."""
    root = shutil.copytree(tiny_repro.root, tmp_path_factory.mktemp("notebooks") / "explaind", symlinks=True)
    # nbval needs its own pytest run; isolate it from this project's pytest configuration
    (root / "pytest.ini").write_text("[pytest]\n")
    return root


@pytest.mark.parametrize("stage", pipeline.stage_instances())  # in order: each re-execution reads the earlier ones' outputs
def test_notebook_runs_and_reproduces_its_outputs(stage, tiny_root):
    paths = pipeline.stage_paths(stage, tiny_root)
    first_metrics = paths.metrics.read_bytes()

    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--nbval", "--nbval-current-env",
         "--nbval-sanitize-with", str(ROOT / "tests" / "nbval_sanitize.cfg"), str(paths.notebook)],
        cwd=tiny_root, text=True, capture_output=True,
        env={**os.environ, pipeline.ROOT_ENV: str(tiny_root)},
    )
    assert result.returncode == 0, f"nbval failed for {paths.notebook}:\n{result.stdout[-6000:]}\n{result.stderr[-2000:]}"
    assert " passed" in result.stdout and "failed" not in result.stdout
    # the re-execution wrote the stage's metrics again: byte for byte the same
    assert paths.metrics.read_bytes() == first_metrics
