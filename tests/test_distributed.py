"""Sharding one explain() across processes: 2 gloo processes launched by torchrun on the CPU
write exactly the cube that one process writes, split by test inputs or by step ranges."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import save_file

import explaind as ex
from engine_cases import Case, train
from explaind.distributed import merge, shard_bounds

WORKER = Path(__file__).parent / "workers" / "explain_distributed.py"
CASES = [("mlp", "sgd_momentum"), ("transformer", "adamw")]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: "-".join(c))
def run(request, tmp_path_factory):
    model, opt = request.param
    return train(Case(model=model, opt=opt, steps=7, n_test=5), tmp_path_factory.mktemp("dist") / "history")


def free_port() -> str:
    """A loopback port nobody listens on (torchrun's --master-port 0 does not pick one)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def assert_same_cube(merged, single):
    change = float(np.abs(single["final"] - single["initial"]).max())
    for name in ("attribution", "regularization", "initial", "final", "residual", "update_residual"):
        a, b = merged[name], single[name].transpose(*merged[name].dims)
        # residuals are rounding-sized themselves: compare them at the scale of the change
        scale = {"residual": change, "update_residual": 1.0}.get(name, float(np.abs(b).max()))
        assert float(np.abs(a - b).max()) <= 1e-12 * scale, name
    assert merged.attrs["relative_residual"] == pytest.approx(single.attrs["relative_residual"], abs=1e-13)


@pytest.mark.parametrize("split", ["test", "steps"])
def test_two_gloo_processes_equal_one(run, split, tmp_path):
    parts = tmp_path / "parts"
    parts.mkdir()
    save_file({"inputs": run.test_x.contiguous()}, parts / "inputs.safetensors")
    out = tmp_path / "merged.zarr"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", free_port(),
           str(WORKER), str(run.path), run.case.model, run.case.opt, split, str(parts), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    assert result.returncode == 0, result.stderr[-4000:]
    merged = ex.open_cube(out).load()
    single = run.explain(step_bins=3, components="module", quadrature=6)
    assert_same_cube(merged, single)
    assert sorted(p.name for p in parts.glob("part-*.zarr")) == ["part-00000.zarr", "part-00001.zarr"]


@pytest.mark.parametrize("split", ["test", "steps"])
def test_merging_three_shards_in_process(run, split):
    """The same merge for an odd split (3 shards of 5 inputs / 7 steps), without processes."""
    from explaind.distributed import explain_shard

    parts = [explain_shard(run.path, run.model, run.test_x, split=split, rank=r, world_size=3,
                           keep=("step", "train", "test"), step_bins=3, progress=False, tolerance=None)
             for r in range(3)]
    merged = merge(parts, split)
    assert_same_cube(merged, run.explain(keep=("step", "train", "test"), step_bins=3))


def test_shard_bounds_cover_everything_once():
    for n, world in [(5, 2), (7, 3), (10, 10), (3, 1)]:
        bounds = [shard_bounds(n, r, world) for r in range(world)]
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(b[1] == c[0] for b, c in zip(bounds, bounds[1:]))
        assert max(b - a for a, b in bounds) - min(b - a for a, b in bounds) <= 1


def test_steps_split_refuses_what_it_cannot_split(run):
    with pytest.raises(ex.InputError, match="convention='update'"):
        run.explain(steps=(0, 3), convention="gradient")
    with pytest.raises(ex.InputError, match="parameter_scores"):
        run.explain(steps=(0, 3), parameter_scores=True)
