"""Running the pipeline's commands (explaind.pipeline, dvc) in a copy of the repository."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from explaind import pipeline

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def repository_files(root: Path) -> list[str]:
    """Files git tracks, or would track (not ignored), in the checkout."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                            cwd=root, check=True, capture_output=True, text=True).stdout
    return [name for name in listed.split("\0") if name and (root / name).is_file()]


def copy_repository(copy: Path, params: dict) -> Path:
    """A copy of the repository as a fresh clone has it (no environments, data or outputs), with
    `params` as its params.yaml."""
    for name in repository_files(ROOT):
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, copy / name)
    for generated in ("dvc.lock", "reports"):  # start as a fresh clone would, before any run
        shutil.rmtree(copy / generated, ignore_errors=True) if (copy / generated).is_dir() else (copy / generated).unlink(missing_ok=True)
    (copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=copy, check=True)
    return copy


def run_cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "explaind.pipeline", *args], cwd=cwd, text=True,
                          capture_output=True, env={**os.environ, **(env or {})})


def dvc(copy: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(copy)}
    env.pop(pipeline.ROOT_ENV, None)
    result = subprocess.run([BIN / "dvc", *args], cwd=copy, env=env, text=True, capture_output=True)
    assert result.returncode == 0, f"dvc {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result
