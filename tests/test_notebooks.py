"""Every stage notebook, executed at tiny parameters, then validated by nbval.

The notebooks are the ones the end-to-end test's `dvc repro` executed with papermill (tiny_repro
in conftest.py, parameters from tests/params_tiny.yaml); executing them once more here would
double the suite's longest part. For each notebook, nbval executes the executed notebook again in
a fresh kernel and compares every cell's output with the first run (images excepted), after the
sanitizers in tests/nbval_sanitize.cfg blank out durations, library source paths, temporary paths
and memory addresses.
A pass therefore means: the notebook runs from top to bottom, and the same seeds give the same
printed results, tables and metrics.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from nbval.plugin import get_sanitize_patterns

from explaind import pipeline

ROOT = Path(__file__).resolve().parents[1]
SANITIZERS = ROOT / "tests" / "nbval_sanitize.cfg"

pytestmark = pytest.mark.xdist_group("tiny_repro")  # on the worker that holds the shared run


def test_sanitizers_blank_what_differs_between_two_executions():
    """A warning printed from a copy of the checkout under /tmp and from an installed package
    elsewhere reads the same; so do durations, temporary paths and addresses."""
    patterns = get_sanitize_patterns(SANITIZERS.read_text())

    def sanitize(text: str) -> str:
        for regex, replace in patterns:  # in file order, as nbval applies them
            text = re.sub(regex, replace, text)
        return text

    warning = "{}/datamodels.py:153: RuntimeWarning: Mean of empty slice"
    from_copy = warning.format("/tmp/pytest-of-ci/pytest-7/popen-gw1/repro0/explaind/explaind")
    from_install = warning.format("/home/someone/src/explaind")
    assert sanitize(from_copy) == sanitize(from_install) == warning.format("<EXPLAIND>")
    assert sanitize("wrote /tmp/run3/cube.zarr in 12.5 s at 0x7f3a9c2b10") == "wrote <TMPPATH> in <DURATION> s at <ADDRESS>"


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
         "--nbval-sanitize-with", str(SANITIZERS), str(paths.notebook)],
        cwd=tiny_root, text=True, capture_output=True,
        env={**os.environ, pipeline.ROOT_ENV: str(tiny_root)},
    )
    assert result.returncode == 0, f"nbval failed for {paths.notebook}:\n{result.stdout[-6000:]}\n{result.stderr[-2000:]}"
    assert " passed" in result.stdout and "failed" not in result.stdout
    # the re-execution wrote the stage's metrics again: byte for byte the same
    assert paths.metrics.read_bytes() == first_metrics
