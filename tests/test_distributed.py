"""Sharding one explain() across processes: 2 gloo processes launched by torchrun on the CPU
write exactly the cube that one process writes, split by test inputs or by step ranges. The
same shards, run one after another and stored, make a long explain() resumable."""

import copy
import hashlib
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
import xarray as xr
import zarr
from safetensors.torch import save_file

import explaind as ex
import explaind.resumable as resumable
from engine_cases import Case, make_data, train
from explaind.distributed import explain_distributed, merge, read_part, shard_bounds, store_part
from explaind.resumable import explain_resumable

WORKER = Path(__file__).parent / "workers" / "explain_distributed.py"
OWN_GROUP_WORKER = Path(__file__).parent / "workers" / "explain_in_own_group.py"
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
    for name in ("attribution", "regularization", "initial", "final", "residual", "residual_from_updates",
                 "update_residual", "update_rounding_floor"):
        a, b = merged[name], single[name].transpose(*merged[name].dims)
        # residuals are rounding-sized themselves: compare them at the scale of the change
        scale = {"residual": change, "residual_from_updates": change, "update_residual": 1.0}.get(
            name, float(np.abs(b).max()))
        assert float(np.abs(a - b).max()) <= 1e-12 * scale, name
        assert np.array_equal(np.isnan(a), np.isnan(b)), name  # the same steps left unchecked
    assert merged.attrs["relative_residual"] == pytest.approx(single.attrs["relative_residual"], abs=1e-13)
    assert merged.attrs["max_abs_path_residual"] == pytest.approx(single.attrs["max_abs_path_residual"],
                                                                  abs=1e-12 * change)


def launch_with_torchrun(run, split: str, parts: Path, out: Path) -> tuple[xr.Dataset, str]:
    """The cube that 2 gloo processes launched by torchrun merge (the worker's options) into `out`,
    and what they wrote on stderr."""
    parts.mkdir(exist_ok=True)
    save_file({"inputs": run.test_x.contiguous()}, parts / "inputs.safetensors")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", free_port(),
           str(WORKER), str(run.path), run.case.model, run.case.opt, split, str(parts), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    assert result.returncode == 0, result.stderr[-4000:]
    return ex.open_cube(out).load(), result.stderr


def computed_by_workers(parts: Path) -> list[int]:
    """The ranks of the parts the workers computed (not read back), in every launch so far."""
    log = parts / "computed.log"
    return sorted(int(line) for line in log.read_text().split()) if log.exists() else []


@pytest.mark.parametrize("split", ["test", "steps"])
def test_two_gloo_processes_equal_one(run, split, tmp_path):
    parts = tmp_path / "parts"
    merged, stderr = launch_with_torchrun(run, split, parts, tmp_path / "merged.zarr")
    single = run.explain(step_bins=3, components="module", quadrature=6)
    assert_same_cube(merged, single)
    assert stderr.count("  passes ") == 1  # process 0's plan only; each process shows its bar
    assert sorted(p.name for p in parts.glob("part-*.zarr")) == ["part-00000.zarr", "part-00001.zarr"]


def test_a_second_launch_reuses_every_stored_part(tmp_path):
    """Launched again with the same request, no process computes its part again (each did, and
    replaced it): the parts are read back, untouched, and merged into the same cube."""
    run = train(Case(steps=5, n_test=4), tmp_path / "history")
    parts = tmp_path / "parts"
    first, _ = launch_with_torchrun(run, "test", parts, tmp_path / "first.zarr")
    assert computed_by_workers(parts) == [0, 1]
    stored = {part.name: files_on_disk(part) for part in parts.glob("part-*.zarr")}
    again, _ = launch_with_torchrun(run, "test", parts, tmp_path / "again.zarr")
    assert computed_by_workers(parts) == [0, 1]  # none computed in the second launch
    assert {part.name: files_on_disk(part) for part in parts.glob("part-*.zarr")} == stored
    xr.testing.assert_identical(again, first)


@pytest.mark.parametrize("split", ["test", "steps"])
def test_merging_three_shards_in_process(run, split):
    """The same merge for an odd split (3 shards of 5 inputs / 7 steps), without processes."""
    from explaind.distributed import explain_shard

    parts = [explain_shard(run.path, run.model, run.test_x, split=split, rank=r, world_size=3,
                           keep=("step", "train", "test"), step_bins=3, progress=False, tolerance=None)
             for r in range(3)]
    merged = merge(parts, split)
    assert_same_cube(merged, run.explain(keep=("step", "train", "test"), step_bins=3))



def test_a_part_names_a_refused_input_or_target_by_its_place_in_the_whole_set(run):
    """The part of process 1 of 2 holds test inputs 3 and 4 of 5: a bad input 4 is named 4 (it was
    named 1, its place in the part), and 4 targets for 5 inputs are counted as such (it counted
    1 target for its 2 inputs)."""
    from explaind.distributed import explain_shard

    bad = run.test_x.clone()
    bad[4] = float("nan") if bad.is_floating_point() else 10**6  # outside the embedding's 5 rows
    cause = "hold NaN" if bad.is_floating_point() else "hold indices \\[1000000\\]"
    with pytest.raises(ex.InputError, match=rf"test inputs \[4\] {cause}"):
        explain_shard(run.path, run.model, bad, split="test", rank=1, world_size=2, progress=False)
    with pytest.raises(ex.InputError, match="got 4 targets for 5 inputs"):
        explain_shard(run.path, run.model, run.test_x, run.test_y[:4], split="test", rank=1, world_size=2,
                      outputs="true", progress=False)


@pytest.mark.parametrize("replay", [1, 0])
def test_steps_split_with_a_bounded_replay_equals_one_call(run, replay):
    """Each part replays from the window's replay start, as one call does (each counted its
    `replay` steps back from its own start: per-sample shares off by half their scale), replay=0
    included (the window's start, not each part's)."""
    from explaind.distributed import explain_shard

    options = dict(keep=("step", "train", "test"), steps=(3, 7), replay=replay, progress=False, tolerance=None)
    parts = [explain_shard(run.path, run.model, run.test_x, split="steps", rank=r, world_size=3, **options)
             for r in range(3)]
    merged, single = merge(parts, "steps"), run.explain(**options)
    assert_same_cube(merged, single)
    scale = float(np.abs(single["carried"]).max())
    assert scale > 0 and float(np.abs(merged["carried"] - single["carried"]).max()) <= 1e-12 * scale
    for key in ("replay_start", "kinks_located", "kink_segments_searched", "kink_segments_unresolved"):
        assert merged.attrs[key] == single.attrs[key], key


def test_a_part_killed_while_signed_is_absent(run, tmp_path, monkeypatch):
    """The digest is written before the part is moved into place: a kill while reading it back
    leaves no part (one without a digest blocked the resume until deleted by hand)."""
    import explaind.distributed as distributed

    part = distributed.explain_shard(run.path, run.model, run.test_x, split="test", rank=0, world_size=2,
                                     progress=False, tolerance=None)
    monkeypatch.setattr(distributed, "part_digest", lambda part: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        store_part(part, tmp_path / "part-00000.zarr", "request", 0)
    assert list(tmp_path.iterdir()) == []


def test_shard_bounds_cover_everything_once():
    for n, world in [(5, 2), (7, 3), (10, 10), (3, 1)]:
        bounds = [shard_bounds(n, r, world) for r in range(world)]
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(b[1] == c[0] for b, c in zip(bounds, bounds[1:]))
        assert max(b - a for a, b in bounds) - min(b - a for a, b in bounds) <= 1


def test_steps_split_refuses_what_it_cannot_split(run):
    with pytest.raises(ex.InputError, match=r"needs convention='update'.*\. Fix: leave steps= out .*"
                                            r"or explain the window with convention='update' \(the default\)$"):
        run.explain(steps=(0, 3), convention="gradient")
    with pytest.raises(ex.InputError, match=r"parameter_scores .*\. Fix: explain all steps, or split the test inputs"):
        run.explain(steps=(0, 3), parameter_scores=True)


# --------------------------------------------------------------------------- a part that fails

GROUP_TIMEOUT = 40  # seconds a process of the workers' group waits in a collective before it fails


def launch_in_own_group(history, model_kind: str, split: str, inputs: torch.Tensor, parts_dir: Path, *,
                        fail: str = "none", failing_rank: int = 1, timeout: int = GROUP_TIMEOUT) -> dict[int, str]:
    """How explain_distributed ended in each of 2 plain processes (the last line each printed). The
    failing process lives on after its error, as a notebook does: once the other process has
    ended, it is stopped."""
    parts_dir.mkdir(exist_ok=True)  # a relaunch finds it
    save_file({"inputs": inputs.contiguous()}, parts_dir / "inputs.safetensors")
    port = free_port()
    processes = {}
    for rank in (1, 0):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1]),
               "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        processes[rank] = subprocess.Popen(
            [sys.executable, str(OWN_GROUP_WORKER), str(history), model_kind, split, str(parts_dir), fail,
             str(failing_rank), str(timeout)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ended = {}
    try:
        other = 1 - failing_rank
        # its own wait is bounded by the group's timeout; the rest is starting Python and computing a part,
        # which took over 30 s on a loaded 2-core machine (3 × 15 s failed there once)
        ended[other] = processes[other].communicate(timeout=timeout + 120)
    finally:
        for process in processes.values():
            process.kill()
        ended[failing_rank] = processes[failing_rank].communicate()
    return {rank: out.strip().splitlines()[-1] if out.strip() else f"nothing printed: {err[-2000:]}"
            for rank, (out, err) in ended.items()}


def test_a_part_failing_on_one_process_makes_every_process_raise(tmp_path):
    """Process 1's part refused: process 1 raises, and process 0, which computed and stored its
    part, names process 1's error (it waited at a barrier until the group's timeout, then raised
    gloo's 'Timed out waiting 40000ms for recv')."""
    run = train(Case(model="transformer", opt="adamw", steps=5, n_test=4), tmp_path / "history")
    ended = launch_in_own_group(run.path, "transformer", "test", run.test_x, tmp_path / "parts", fail="refuse")
    assert ended[1] == "InputError: this part is refused"
    assert ended[0].startswith("InputError: the part of process 1 failed (InputError: this part is refused)")
    assert ended[0].endswith("Fix: what process 1's error names, then launch every process again")
    assert sorted(p.name for p in (tmp_path / "parts").glob("part-*")) == ["part-00000.zarr"]


def test_an_input_of_one_share_is_refused_by_every_process_before_any_part(tmp_path):
    """A test input outside the vocabulary in process 1's share (inputs 2 and 3): each process
    checks the whole set first, so both refuse it by its place in the whole set, and neither
    computes a part (process 0 computed and stored its own, process 1 named it input 1)."""
    run = train(Case(model="transformer", opt="adamw", steps=5, n_test=4), tmp_path / "history")
    inputs = run.test_x.clone()
    inputs[3, 0] = 99
    ended = launch_in_own_group(run.path, "transformer", "test", inputs, tmp_path / "parts")
    cause = "InputError: test inputs [3] hold indices [99] that the model looks up in an embedding of 5 entries"
    assert ended[0].startswith(cause) and ended[1].startswith(cause)
    assert list((tmp_path / "parts").glob("part-*")) == []


@pytest.mark.parametrize("failing_rank", [0, 1])
def test_an_interrupted_process_makes_every_process_raise(failing_rank, tmp_path):
    """Ctrl-C reaching one process only (as it computes its part), process 0 or another."""
    run = train(Case(steps=5, n_test=4), tmp_path / "history")
    ended = launch_in_own_group(run.path, "mlp", "steps", run.test_x, tmp_path / "parts", fail="interrupt",
                                failing_rank=failing_rank)
    assert ended[failing_rank] == "KeyboardInterrupt:"
    assert ended[1 - failing_rank] == (
        f"RuntimeError: the part of process {failing_rank} failed (KeyboardInterrupt), so no cube is merged. "
        f"Fix: what process {failing_rank}'s error names, then launch every process again")


def test_a_relaunch_after_a_failed_part_computes_only_that_part(tmp_path):
    """Process 1 interrupted, process 0's part stored: launched again, process 0 reads its part
    back, untouched, and process 1 computes its own; the merged cube passes the check."""
    run = train(Case(steps=5, n_test=4), tmp_path / "history")
    parts = tmp_path / "parts"
    ended = launch_in_own_group(run.path, "mlp", "steps", run.test_x, parts, fail="interrupt")
    assert ended[0].startswith("RuntimeError: the part of process 1 failed (KeyboardInterrupt)")
    assert computed_by_workers(parts) == [0]
    stored = files_on_disk(parts / "part-00000.zarr")
    ended = launch_in_own_group(run.path, "mlp", "steps", run.test_x, parts)
    assert ended[0] == "returned a cube"
    assert computed_by_workers(parts) == [0, 1]  # part 1 only, this time
    assert files_on_disk(parts / "part-00000.zarr") == stored
    assert sorted(p.name for p in parts.glob("part-*")) == ["part-00000.zarr", "part-00001.zarr"]


def test_a_process_that_dies_outright_is_named_at_the_groups_timeout(tmp_path):
    """It tells nothing (gloo's barrier raised 'Connection closed by peer' without naming it; NCCL's
    waits for the group's timeout)."""
    run = train(Case(steps=5, n_test=4), tmp_path / "history")
    ended = launch_in_own_group(run.path, "mlp", "steps", run.test_x, tmp_path / "parts", fail="exit", timeout=15)
    assert ended[0] == (
        "RuntimeError: no outcome came from process 1 within the process group's timeout: each died outright "
        "(killed, out of host memory: see its log) or computes its part for longer than this process. Fix: what the "
        "log names, or initialise the group with a longer timeout, init_process_group(timeout=...), before calling "
        "explain_distributed")


def test_another_processs_error_comes_back_of_explaind_class_or_as_a_runtime_error():
    """One process's error told to the others as JSON (explain_distributed's store, the
    data-parallel Recorder's broadcast): explaind's class comes back, for a caller to catch as the
    error itself; any other exception, one of explaind's names in another module included, and
    names of explaind.errors that are no error class, come back as RuntimeError."""
    import json

    from explaind.errors import described, error_class

    def told(description):
        return error_class(json.loads(json.dumps(description)))

    class InputError(Exception):  # explaind's name, not its class
        pass

    assert described(ex.InputError("bad ids")) == ["explaind.errors", "InputError", "bad ids"]
    assert told(described(ex.InputError("bad ids"))) is ex.InputError
    assert told(described(ex.ReconstructionError("off", cube=xr.Dataset()))) is ex.ReconstructionError
    for other in (KeyboardInterrupt(), KeyError("step"), InputError("bad ids")):
        assert told(described(other)) is RuntimeError
    assert told(["explaind.errors", "is_whole", ""]) is RuntimeError


def record_a_loop_clipped_from(step: int, path: Path) -> torch.Tensor:
    """A 6-step SGD run of Case('mlp')'s model whose gradients are clipped from `step` on, which
    the history does not record (check_every=50 checks steps 0 and 1 only); its test inputs."""
    model = Case("mlp").fresh_model()
    x, y, test_x, _ = make_data("mlp", 8, 4, 0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with ex.Recorder(path, model, optimizer, check_every=50) as rec:
        for s in range(6):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            if s >= step:
                torch.nn.utils.clip_grad_value_(model.parameters(), 1e-3)
            rec.batch(torch.arange(len(x)), x, y)
            optimizer.step()
    return test_x


STOP = "ReconstructionError: step 4's update residual is "  # the first step clipped


@pytest.mark.parametrize("split", ["steps", "test"])
def test_processes_stop_at_a_missed_update(split, tmp_path):
    """Each shard stops at the first step whose update misses far beyond rounding, as explain
    does, instead of being computed to its end for the merged cube's check to refuse it: with
    split='steps', process 0 (steps 0-2) stores its part and process 1 (steps 3-5) stops at
    step 4; with split='test', both stop there and store nothing."""
    test_x = record_a_loop_clipped_from(4, tmp_path / "history")
    ended = launch_in_own_group(tmp_path / "history", "mlp", split, test_x, tmp_path / "parts")
    assert ended[1].startswith(STOP) and "stops at the first step so far off" in ended[1]
    if split == "steps":
        assert ended[0].startswith(f"ReconstructionError: the part of process 1 failed ({STOP}")
        assert sorted(p.name for p in (tmp_path / "parts").glob("part-*")) == ["part-00000.zarr"]
    else:
        assert ended[0].startswith(STOP)
        assert not list((tmp_path / "parts").glob("part-*"))


@pytest.mark.parametrize("split", ["steps", "test"])
def test_resumable_parts_stop_at_a_missed_update(split, tmp_path, monkeypatch):
    """As explain_distributed's shards: no step after the first missed one is computed (each part
    was computed to its end, and the merged cube refused)."""
    import explaind.engine as engine
    import explaind.verify as verify

    test_x = record_a_loop_clipped_from(4, tmp_path / "history")
    checked = []  # one per step checked: the steps computed
    check = verify.update_check

    def counted_check(*args):
        checked.append(args)
        return check(*args)

    for module in (engine, verify):  # the forward pass checks each step itself, the backward walk by verify
        monkeypatch.setattr(module, "update_check", counted_check)
    with pytest.raises(ex.ReconstructionError, match="(?s)step 4's update residual is .*stops at the first step"):
        explain_resumable(tmp_path / "history", Case("mlp").fresh_model(), test_x, parts_dir=tmp_path / "parts",
                          n_parts=2, split=split, **OPTIONS)
    assert len(checked) == 5  # steps 0 … 4
    stored = ["part-00000.zarr"] if split == "steps" else []
    assert sorted(p.name for p in (tmp_path / "parts").glob("part-*")) == stored


# --------------------------------------------------------------------------- resumable, in one process

OPTIONS = dict(keep=("step", "train", "test"), step_bins=3, quadrature=6, progress=False)


class Interrupted(RuntimeError):
    pass


def files_on_disk(path: Path) -> dict[str, tuple[str, int]]:
    """Every file under path: its sha256 and modification time (a rewrite changes the time)."""
    return {str(f.relative_to(path)): (hashlib.sha256(f.read_bytes()).hexdigest(), f.stat().st_mtime_ns)
            for f in sorted(path.rglob("*")) if f.is_file()}


@pytest.fixture
def computed_parts(monkeypatch):
    """The ranks of the parts computed (not read back); interrupts before the rank in `.stop_at`."""

    class Spy(list):
        stop_at = None

    spy = Spy()
    compute = resumable.explain_part

    def explain_part(*args, rank, **kwargs):
        if rank == spy.stop_at:
            raise Interrupted(f"killed before part {rank}")
        spy.append(rank)
        return compute(*args, rank=rank, **kwargs)

    monkeypatch.setattr(resumable, "explain_part", explain_part)
    return spy


@pytest.mark.parametrize("split", ["steps", "test"])
def test_interrupted_then_resumed_equals_uninterrupted(run, split, tmp_path, computed_parts):
    def call(parts_dir):
        return explain_resumable(run.path, run.model, run.test_x, parts_dir=parts_dir, n_parts=3, split=split,
                                 **OPTIONS)

    uninterrupted = call(tmp_path / "whole")
    assert_same_cube(uninterrupted, run.explain(**OPTIONS))  # the parts add up to one explain()
    computed_parts.clear()
    computed_parts.stop_at = 1
    with pytest.raises(Interrupted):
        call(tmp_path / "parts")
    assert sorted(p.name for p in (tmp_path / "parts").iterdir()) == ["part-00000.zarr"]
    (tmp_path / "parts" / ".part-00001.zarr.explaind-partial-x1" / "new").mkdir(parents=True)  # killed storing part 1
    first = files_on_disk(tmp_path / "parts" / "part-00000.zarr")
    computed_parts.stop_at = None
    resumed = call(tmp_path / "parts")
    assert computed_parts == [0, 1, 2]  # part 0 before the interruption, then 1 and 2 only
    assert files_on_disk(tmp_path / "parts" / "part-00000.zarr") == first  # read back, not rewritten
    xr.testing.assert_identical(resumed, uninterrupted)
    assert sorted(p.name for p in (tmp_path / "parts").iterdir()) == [f"part-0000{r}.zarr" for r in range(3)]


def test_resumable_shows_the_plan_of_its_first_computed_part_only(run, tmp_path, computed_parts, capsys):
    """Each part's explain() printed its plan, once per part; now the first part computed shows
    its plan, on stderr, and so does a resumed call (whose first part is another)."""
    options = {**OPTIONS, "progress": True}
    computed_parts.stop_at = 2
    with pytest.raises(Interrupted):
        explain_resumable(run.path, run.model, run.test_x, parts_dir=tmp_path, n_parts=3, **options)
    printed = capsys.readouterr()
    assert printed.out == "" and printed.err.count("  passes ") == 1 and ", steps 0–2 of 7, " in printed.err
    computed_parts.stop_at = None
    explain_resumable(run.path, run.model, run.test_x, parts_dir=tmp_path, n_parts=3, **options)
    printed = capsys.readouterr()
    assert printed.out == "" and printed.err.count("  passes ") == 1 and ", steps 5–7 of 7 " in printed.err


def test_stored_parts_make_no_tensor_on_torchs_default_device(run, tmp_path):
    """As explain itself (see test_engine): with torch's default device set to 'meta', where a
    tensor made without naming its device would stop the call, the parts are computed, stored,
    read back and merged into the same cube."""
    expected = explain_resumable(run.path, run.model, run.test_x, parts_dir=tmp_path / "a", n_parts=2, **OPTIONS)
    with torch.device("meta"):
        cube = explain_resumable(run.path, run.model, run.test_x, parts_dir=tmp_path / "b", n_parts=2, **OPTIONS)
    xr.testing.assert_identical(cube, expected)


@pytest.mark.parametrize("change", ["quadrature", "inputs", "n_parts", "history", "part_format"])
def test_parts_of_another_request_are_refused(run, change, tmp_path, computed_parts, monkeypatch):
    parts_dir = tmp_path / "parts"
    current = resumable.PART_FORMAT
    if change == "part_format":  # stored by an explaind whose parts held other variables
        monkeypatch.setattr(resumable, "PART_FORMAT", current - 1)
    explain_resumable(run.path, run.model, run.test_x, parts_dir=parts_dir, n_parts=2, **OPTIONS)
    monkeypatch.setattr(resumable, "PART_FORMAT", current)
    stored = files_on_disk(parts_dir)
    inputs = run.test_x.flip(0) if change == "inputs" else run.test_x
    options = {**OPTIONS, "quadrature": 4} if change == "quadrature" else OPTIONS
    path = run.path
    if change == "history":  # the same model and steps, trained from another seed
        case = Case(model=run.case.model, opt=run.case.opt, steps=7, n_test=5, seed=1)
        path = train(case, tmp_path / "other").path
    computed_parts.clear()
    # the field that differs is named: a loss whose code was edited reads 'it differs in loss'
    with pytest.raises(ex.InputError, match=f"(?s)part-00000.zarr.*different request \\(it differs in {change}\\)"
                                            ".*new parts_dir"):
        explain_resumable(path, run.model, inputs, parts_dir=parts_dir, n_parts=3 if change == "n_parts" else 2,
                          **options)
    assert computed_parts == []  # refused before any compute
    assert files_on_disk(parts_dir) == stored  # nothing overwritten


# explain()'s defaults, given explicitly, and keep in the cube's dim order
DEFAULTS_GIVEN = dict(keep=("train", "test"), quadrature=4, outputs="all", step_bins=None, dtype=torch.float64)


@pytest.mark.parametrize("spelled", [
    dict(keep=("test", "train")),  # every default left out, the dims named in another order
    dict(keep=["test", "train"], quadrature=4),
    dict(keep=("train", "test"), outputs="all", step_bins=None),
    dict(keep=("test", "train"), dtype=torch.float64, memory_budget=2**30),  # memory_budget: how, not what
], ids=["omitted", "quadrature", "outputs-step_bins", "dtype"])
def test_the_same_request_spelled_otherwise_reuses_the_stored_parts(run, spelled, tmp_path, computed_parts):
    parts_dir = tmp_path / "parts"

    def call(**options):
        return explain_resumable(run.path, run.model, run.test_x, parts_dir=parts_dir, n_parts=2, progress=False,
                                 **options)

    first = call(**DEFAULTS_GIVEN)
    stored = files_on_disk(parts_dir)
    computed_parts.clear()
    xr.testing.assert_identical(call(**spelled), first)
    assert computed_parts == []  # read back, none computed again
    assert files_on_disk(parts_dir) == stored
    # another request still is refused: 3 quadrature nodes are not the default 4
    with pytest.raises(ex.InputError, match="(?s)part-00000.zarr.*different request.*new parts_dir"):
        call(**{**spelled, "quadrature": 3})
    assert computed_parts == [] and files_on_disk(parts_dir) == stored


def test_fingerprint_is_of_the_request_not_its_spelling(run):
    history = ex.History(run.path)

    def fingerprint(**options):
        return resumable.request_fingerprint(history, run.model, run.test_x, None, split="test", n_parts=2,
                                             **options)

    assert fingerprint() == fingerprint(**{**DEFAULTS_GIVEN, "keep": ex.DIMS})
    assert fingerprint(keep="test") == fingerprint(keep=("test",)) == fingerprint(keep=["test"])
    assert fingerprint(keep=("output", "step")) == fingerprint(keep=("step", "output"))
    assert fingerprint(keep=("step", "output")) != fingerprint(keep=("step",))
    assert fingerprint(quadrature=3) != fingerprint()
    assert fingerprint(dtype=torch.float32) != fingerprint(dtype=torch.float64)
    assert fingerprint(step_bins=3) != fingerprint(step_bins=None)
    # the whole run as a window, and the default ids, spelled out
    n_steps, n_test = history.n_steps, len(run.test_x)
    assert fingerprint(steps=(0, n_steps)) == fingerprint(steps=[0, n_steps]) == fingerprint()
    assert fingerprint(steps=(0, n_steps - 1)) != fingerprint()
    assert fingerprint(test_ids=np.arange(n_test)) == fingerprint(test_ids=list(range(n_test))) == fingerprint()
    assert fingerprint(test_ids=np.arange(n_test) + 1) != fingerprint()
    assert fingerprint(test_ids=[str(i) for i in range(n_test)]) != fingerprint()
    with pytest.raises(ex.InputError, match="cannot keep dims"):  # as explain() names it, before any compute
        fingerprint(keep=("tests",))
    with pytest.raises(ex.InputError, match="more than once"):
        fingerprint(keep=("test", "test"))


def test_fingerprint_holds_the_models_class_the_targets_and_the_ids_dtype_not_how_the_call_runs(run):
    """The history holds the weights but not the function of them: a model of another class is
    another request, as are targets, and ids 0.0 … 4.0 (float labels on the cube) are not the
    default ids 0 … 4. Where it runs (a part computed on a GPU resumes on the CPU), in what chunks and
    whether it shows progress change no number."""
    history = ex.History(run.path)

    def fingerprint(model=run.model, targets=None, **options):
        return resumable.request_fingerprint(history, model, run.test_x, targets, split="test", n_parts=2,
                                             **options)

    subclassed = copy.deepcopy(run.model)
    subclassed.__class__ = type("Subclassed", (type(run.model),), {})
    assert fingerprint(model=copy.deepcopy(run.model)) == fingerprint()
    assert fingerprint(model=subclassed) != fingerprint()
    assert fingerprint(targets=run.test_y) != fingerprint()
    assert fingerprint(test_ids=np.arange(len(run.test_x), dtype=float)) != fingerprint()
    assert fingerprint(device="cuda:0", test_chunk=2, train_chunk=3, batch_chunk=1, memory_budget=2**20,
                       progress=True) == fingerprint()


def damage(part: Path, how: str) -> None:
    """Damage a stored part as a disk or a careless hand might."""
    chunk = next(f for f in sorted((part / "attribution").iterdir()) if not f.name.startswith("."))
    if how == "chunk_lost":  # zarr reads a missing chunk as its fill value, NaN
        chunk.unlink()
    elif how == "chunk_truncated":  # its compressed data no longer decode
        chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
    elif how == "chunk_rewritten":  # valid data, other numbers
        array = zarr.open_array(part / "attribution", mode="r+")
        array[...] = array[...] + 1.0
    elif how == "byte_flipped":  # of the same size, which opening the store checks, but not its sha256
        data = bytearray(chunk.read_bytes())
        data[-1] ^= 1
        chunk.write_bytes(bytes(data))
    else:  # the attributes, which hold the request's fingerprint
        (part / ".zattrs").write_text("{ not json")


@pytest.mark.parametrize("how", ["chunk_lost", "chunk_truncated", "chunk_rewritten", "byte_flipped",
                                 "attributes_garbled"])
def test_a_damaged_part_is_named_before_any_compute_and_recomputed_once_deleted(run, how, tmp_path, computed_parts):
    def call():
        return explain_resumable(run.path, run.model, run.test_x, parts_dir=tmp_path / "parts", n_parts=3, **OPTIONS)

    whole = call()
    damage(tmp_path / "parts" / "part-00001.zarr", how)
    shutil.rmtree(tmp_path / "parts" / "part-00000.zarr")  # missing: it would be computed first
    stored = files_on_disk(tmp_path / "parts")
    computed_parts.clear()
    with pytest.raises(ex.InputError, match=r"(?s)part 1 at \S*part-00001.zarr is damaged: .*Fix: delete") as refused:
        call()
    assert "dvc repro" not in str(refused.value)  # a whole cube's fix (explain the history again), not a part's
    assert computed_parts == []  # refused before computing anything
    assert files_on_disk(tmp_path / "parts") == stored  # and nothing overwritten
    shutil.rmtree(tmp_path / "parts" / "part-00001.zarr")
    xr.testing.assert_identical(call(), whole)
    assert computed_parts == [0, 1]


def test_a_part_of_any_dtype_reads_back_as_written(tmp_path):
    """The digest is taken of the part as read back, since zarr's round trip hands labels back
    in another string dtype, object ids as integers, None as '', times in nanoseconds, and a
    chunk of only NaN with another sign bit; a lost or changed value is still caught, and a part
    that is gone is named as such."""
    negative_nan = -np.abs(np.float64(np.nan))  # the sign bit torch's 0/0 sets
    part = xr.Dataset(
        {"all_nan": ("test", np.full(3, negative_nan)), "some_nan": ("test", np.array([1.0, negative_nan, -0.0])),
         "float32": ("test", np.array([1, np.nan, 3], dtype=np.float32)), "count": ((), np.int64(7)),
         "flag": ("test", np.array([True, False, True])), "lag": ("test", np.arange(3).astype("timedelta64[s]"))},
        coords={"test": np.array(["a", "bb", "c"], dtype=object), "day": ("test", np.arange(3).astype("datetime64[D]")),
                "label": ("test", np.array(["x", "y", "z"]))},
    )
    pandas_like = {"id": ("test", np.array([10, 11, 12], dtype=object)), "name": ("test", np.array(["a", None, "c"]))}
    path = tmp_path / "part-00000.zarr"
    store_part(part.assign_coords(pandas_like), path, "request", 0)
    read = read_part(path, "request", 0)
    assert read.attrs == {"resumable_request_sha256": "request", "resumable_part": 0}
    xr.testing.assert_identical(read.drop_vars(pandas_like).drop_attrs(), part)
    array = zarr.open_array(path / "some_nan", mode="r+")
    array[0] = 2.0
    with pytest.raises(ex.InputError, match="part 0 at .* is damaged: its numbers differ"):
        read_part(path, "request", 0)
    group = zarr.open_group(path, mode="r+", zarr_format=2)
    del group.attrs["resumable_part_sha256"]  # as if killed between storing the part and its digest
    with pytest.raises(ex.InputError, match="part 0 at .* is damaged: it has no digest"):
        read_part(path, "request", 0)
    shutil.rmtree(path)
    with pytest.raises(ex.InputError, match="part 0 was stored, but .* is gone: parts_dir must be one folder"):
        read_part(path, "request", 0)


def test_parts_labelled_by_a_pandas_column_of_ids_resume(run, tmp_path, computed_parts):
    """Object ids (what a pandas column gives) are stored as integers: their parts still read back."""
    ids = np.arange(100, 100 + len(run.test_x)).astype(object)

    def call():
        return explain_resumable(run.path, run.model, run.test_x, parts_dir=tmp_path / "parts", n_parts=2,
                                 test_ids=ids, **OPTIONS)

    first = call()
    xr.testing.assert_identical(call(), first)
    assert computed_parts == [0, 1]  # the second call read both parts back
    assert first["test"].values.tolist() == ids.tolist()


def test_repeated_test_ids_are_refused_though_each_part_sees_distinct_ones(run, tmp_path, computed_parts):
    ids = ["a", "b", "c", "a", "b"]  # parts of 3 and 2 inputs: distinct within each
    with pytest.raises(ex.InputError, match=r"test_ids repeat \['a', 'b'\]"):
        explain_resumable(run.path, run.model, run.test_x, parts_dir=tmp_path / "parts", n_parts=2, split="test",
                          test_ids=ids, **OPTIONS)
    assert computed_parts == [0] and not list(tmp_path.rglob("part-*"))  # refused as the first part began


def test_resumable_checks_the_whole_test_set_once_before_any_part(run, tmp_path, computed_parts, monkeypatch):
    """explain_resumable(split="test") checks all inputs once for its 3 parts (it checked them once
    per part); a bad input 4 is named by its place in the set before any part begins, and an option
    explain() does not take is refused in explain_resumable's name (it was explain_shard's)."""
    import explaind.distributed as distributed

    sizes, build = [], distributed.build_request

    def counted(history, model, inputs, *args, **kwargs):  # the whole-set checks (explain() calls its own)
        sizes.append(len(inputs))
        return build(history, model, inputs, *args, **kwargs)

    monkeypatch.setattr(distributed, "build_request", counted)

    def call(inputs, parts_dir, **options):
        return explain_resumable(run.path, run.model, inputs, parts_dir=parts_dir, n_parts=3, split="test",
                                 **OPTIONS, **options)

    call(run.test_x, tmp_path / "parts")
    assert sizes == [5] and computed_parts == [0, 1, 2]
    bad = run.test_x.clone()
    bad[4] = float("nan") if bad.is_floating_point() else 10**6
    computed_parts.clear()
    with pytest.raises(ex.InputError, match=r"test inputs \[4\]"):
        call(bad, tmp_path / "other")
    with pytest.raises(TypeError, match=r"^explain_resumable\(\) got arguments explain\(\) does not take: \['nodes'\]"):
        call(run.test_x, tmp_path / "other", nodes=4)
    assert computed_parts == [] and not (tmp_path / "other").exists()


@pytest.mark.parametrize("split, n_parts, refused", [("steps", 8, "n_parts=8 for 7 update steps: use 1 … 7 parts"),
                                                     ("test", 6, "n_parts=6 for 5 test inputs: use 1 … 5 parts")],
                         ids=["steps", "test"])
def test_resumable_refuses_more_parts_than_steps_or_test_inputs(run, split, n_parts, refused, tmp_path,
                                                                 computed_parts):
    with pytest.raises(ex.InputError) as error:
        explain_resumable(run.path, run.model, run.test_x, parts_dir=tmp_path / "parts", n_parts=n_parts,
                          split=split, **OPTIONS)
    assert str(error.value) == refused
    assert computed_parts == [] and not (tmp_path / "parts").exists()


def test_resumable_checks_the_merged_cubes_residual(tmp_path, computed_parts):
    """No part checks its own output residual (it covers only its steps); the merged cube's is
    checked as explain checks its cube: one midpoint node on long steps misses far beyond 1e-12.
    The tolerance is not part of the request: the parts are read back under another."""
    run = train(Case("mlp", "sgd", steps=3, lr_scale=15.0, widths=(6,)), tmp_path / "history")

    def call(tolerance):
        return explain_resumable(run.path, run.model, run.test_x, parts_dir=tmp_path / "parts", n_parts=3,
                                 quadrature=1, rule="midpoint", tolerance=tolerance, progress=False)

    with pytest.raises(ex.ReconstructionError, match="(?s)tolerance.*quadrature=") as error:
        call(1e-12)
    assert computed_parts == [0, 1, 2]
    cube = call(None)
    assert computed_parts == [0, 1, 2]  # read back, none computed again
    xr.testing.assert_identical(error.value.cube, cube)
    assert cube.attrs["relative_residual"] > 1e-6


def by_kind(name):
    return "weights" if name.endswith("weight") else "others"


def by_module(name):
    return name.split(".")[0]


def test_resumed_with_another_components_function_is_refused(run, tmp_path, computed_parts):
    """Two lambdas share the name '<lambda>': the grouping they make identifies them."""
    options = {**OPTIONS, "keep": ("component", "test"), "step_bins": None}

    def call(components):
        return explain_resumable(run.path, run.model, run.test_x, parts_dir=tmp_path / "parts", n_parts=2,
                                 components=components, **options)

    computed_parts.stop_at = 1
    with pytest.raises(Interrupted):
        call(lambda n: by_kind(n))
    stored = files_on_disk(tmp_path / "parts")
    computed_parts.stop_at = None
    with pytest.raises(ex.InputError, match="(?s)part-00000.zarr.*different request.*new parts_dir"):
        call(lambda n: by_module(n))
    assert files_on_disk(tmp_path / "parts") == stored and computed_parts == [0]
    # the same grouping, spelled as a mapping, resumes
    names = ex.History(run.path).layout.names
    resumed = call({group: [n for n in names if by_kind(n) == group] for group in ("weights", "others")})
    assert computed_parts == [0, 1]
    assert_same_cube(resumed, run.explain(components=by_kind, **options))


def test_fingerprint_tells_functions_apart_by_what_they_do(run):
    history = ex.History(run.path)

    def fingerprint(**options):
        return resumable.request_fingerprint(history, run.model, run.test_x, None, **options)

    assert fingerprint(loss=lambda o, t: (o - t) ** 2) != fingerprint(loss=lambda o, t: abs(o - t))
    assert fingerprint(loss=lambda o, t: (o - t) ** 2) == fingerprint(loss=lambda o, t: (o - t) ** 2)
    assert fingerprint(components=by_module) != fingerprint(components=by_kind)
    assert fingerprint(components="tensor") == fingerprint(components=lambda n: n)


@pytest.mark.parametrize("split", ["steps", "test"])
def test_merge_refuses_parts_with_other_labels(run, split):
    """xarray would add parts over their common labels only: other component names, none."""
    from explaind.distributed import explain_shard

    parts = [explain_shard(run.path, run.model, run.test_x, split=split, rank=r, world_size=2,
                           components=components, keep=("component", "test"), progress=False,
                           tolerance=None)
             for r, components in enumerate([by_kind, by_module])]
    with pytest.raises(ex.InputError, match="(?s)part 1 has other 'component' labels.*same options"):
        merge(parts, split)
    # part 0 without the component dim, which part 1 keeps
    parts[0] = explain_shard(run.path, run.model, run.test_x, split=split, rank=0, world_size=2, keep=("test",),
                             progress=False, tolerance=None)
    with pytest.raises(ex.InputError, match=r"part 1 has other 'component' labels than part 0 \(\['\S.*\] vs none\)"):
        merge(parts, split)


def test_resumable_splits_a_step_window(run, tmp_path, computed_parts):
    window = dict(OPTIONS, steps=(2, 7))
    with pytest.raises(ex.InputError, match="(?s)n_parts=6 for 5 update steps.*1 … 5"):
        explain_resumable(run.path, run.model, run.test_x, parts_dir=tmp_path / "parts", n_parts=6, **window)
    cube = explain_resumable(run.path, run.model, run.test_x, parts_dir=tmp_path / "parts", n_parts=2, **window)
    assert computed_parts == [0, 1]
    assert_same_cube(cube, run.explain(**window))


@pytest.fixture
def one_process_group(monkeypatch):
    """explain_distributed as the only process of a gloo group, in this process."""
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", free_port())
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def test_a_cpu_request_takes_gloo_on_a_machine_with_cuda(run, tmp_path, one_process_group, monkeypatch):
    """The backend follows the requested device: NCCL (which this CPU build of torch lacks, and which
    moves only CUDA tensors) was chosen whenever CUDA was available, whatever the device."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cube = explain_distributed(run.path, run.model, run.test_x, parts_dir=tmp_path / "parts", **OPTIONS)
    assert dist.get_backend() == "gloo"
    assert_same_cube(cube, run.explain(**OPTIONS))


def test_distributed_refuses_to_overwrite_another_requests_parts(run, tmp_path, one_process_group):
    parts_dir = tmp_path / "parts"
    explain_resumable(run.path, run.model, run.test_x, parts_dir=parts_dir, n_parts=2, split="test", **OPTIONS)
    stored = files_on_disk(parts_dir)
    with pytest.raises(ex.InputError, match="(?s)part-00000.zarr.*different request.*new parts_dir"):
        explain_distributed(run.path, run.model, run.test_x, parts_dir=parts_dir, **OPTIONS)
    assert files_on_disk(parts_dir) == stored
    # its own parts, from an earlier launch of the same request, are reused
    first = explain_distributed(run.path, run.model, run.test_x, parts_dir=tmp_path / "own", **OPTIONS)
    again = explain_distributed(run.path, run.model, run.test_x, parts_dir=tmp_path / "own", **OPTIONS)
    xr.testing.assert_identical(again, first)


def test_distributed_names_its_damaged_part_before_any_compute(run, tmp_path, one_process_group, monkeypatch):
    """A stored part is reused only with the numbers it was written with: one changed on disk in a
    way opening it does not see (a byte, the size kept) is named, not replaced (it was computed
    again and overwritten), and computed again once deleted."""
    import explaind.distributed as distributed

    parts_dir = tmp_path / "parts"
    whole = explain_distributed(run.path, run.model, run.test_x, parts_dir=parts_dir, **OPTIONS)
    damage(parts_dir / "part-00000.zarr", "byte_flipped")
    stored = files_on_disk(parts_dir)
    computed, compute = [], distributed.explain_shard

    def counted(*args, rank, **kwargs):
        computed.append(rank)
        return compute(*args, rank=rank, **kwargs)

    monkeypatch.setattr(distributed, "explain_shard", counted)
    with pytest.raises(ex.InputError, match=r"(?s)part 0 at \S*part-00000.zarr is damaged: .*Fix: delete it"):
        explain_distributed(run.path, run.model, run.test_x, parts_dir=parts_dir, **OPTIONS)
    assert computed == [] and files_on_disk(parts_dir) == stored
    shutil.rmtree(parts_dir / "part-00000.zarr")
    xr.testing.assert_identical(explain_distributed(run.path, run.model, run.test_x, parts_dir=parts_dir, **OPTIONS),
                                whole)
    assert computed == [0]


# --------------------------------------------------------------------------- resumable: arguments and callable options


@pytest.mark.parametrize("n_parts", [2.0, "2", True])
def test_resumable_refuses_a_count_of_parts_that_is_not_whole(run, n_parts, tmp_path, computed_parts):
    with pytest.raises(ex.InputError, match=f"n_parts={n_parts!r}: pass a whole number of parts"):
        explain_resumable(run.path, run.model, run.test_x, parts_dir=tmp_path / "parts", n_parts=n_parts, **OPTIONS)
    assert computed_parts == [] and not (tmp_path / "parts").exists()


@pytest.mark.parametrize("option", [{"convention": "gradient"}, {"parameter_scores": True}])
def test_resumable_by_steps_names_split_test_for_what_it_cannot_split(run, option, tmp_path, computed_parts):
    """The user passed no steps=(start, stop): the refusal speaks of split='steps', the default,
    and names split='test', which takes the request."""
    with pytest.raises(ex.InputError, match="(?s)^split='steps' .*Fix: pass split='test'"):
        explain_resumable(run.path, run.model, run.test_x, parts_dir=tmp_path / "parts", n_parts=2,
                          **OPTIONS, **option)
    assert computed_parts == [] and not (tmp_path / "parts").exists()
    explain_resumable(run.path, run.model, run.test_x, parts_dir=tmp_path / "parts", n_parts=2, split="test",
                      **OPTIONS, **option)
    assert computed_parts == [0, 1]


@pytest.mark.parametrize("under", [False, True])
def test_resumable_refuses_a_parts_dir_that_is_a_file(run, under, tmp_path, computed_parts):
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    parts_dir = notes / "parts" if under else notes
    where = f"lies under the file {notes}" if under else "is a file"
    with pytest.raises(ex.InputError, match=f"(?s)parts_dir='{parts_dir}' {where}, not a folder.*pass the path of a"):
        explain_resumable(run.path, run.model, run.test_x, parts_dir=parts_dir, n_parts=2, **OPTIONS)
    assert computed_parts == [] and notes.read_text() == "keep me"


def first_outputs(outputs, n):
    return outputs[:, :n]


class Scaled:
    """A callable without a __repr__ of its own: its default repr names a memory address."""

    def __init__(self, factor):
        self.factor = factor

    def __call__(self, outputs):
        return outputs * self.factor

    def halve(self, outputs):
        return outputs / 2


def callable_options() -> dict:
    """Callables whose repr names a memory address (other in every process), built alike in every process."""
    import functools

    torch.manual_seed(0)
    return {"partial": functools.partial(first_outputs, n=2), "object": Scaled(3.0), "method": Scaled(2.0).halve,
            "builtin": torch.log_softmax, "module": torch.nn.Linear(3, 3), "module_method": torch.nn.Linear(3, 3).forward,
            "loss": torch.nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 3.0]))}


def callable_fingerprints(history_path) -> dict:
    history = ex.History(history_path)
    model, inputs = torch.nn.Linear(4, 3), torch.zeros(2, 4)
    return {name: resumable.request_fingerprint(history, model, inputs, None, split="test", n_parts=2, output_fn=fn)
            for name, fn in callable_options().items()}


def test_callable_options_fingerprint_alike_in_a_new_process(tmp_path):
    """A resumed call runs in another process: a partial, a bound method, a builtin or an object
    without a __repr__ of its own must describe the request as they did there."""
    path = train(Case(steps=2, n_test=2), tmp_path / "history").path
    here = Path(__file__).parent
    code = "import json, sys, test_distributed as t; print(json.dumps(t.callable_fingerprints(sys.argv[1])))"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(here.parent), str(here)])}
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    import json

    there = json.loads(done.stdout.splitlines()[-1])
    assert there == callable_fingerprints(path)


def test_fingerprint_sees_the_tensors_and_arguments_of_callable_options(run):
    """Two output heads, losses or partials that compute differently are two requests, though
    their reprs read alike."""
    import functools

    import pandas as pd

    history = ex.History(run.path)

    def fingerprint(**options):
        return resumable.request_fingerprint(history, run.model, run.test_x, None, split="test", n_parts=2, **options)

    torch.manual_seed(0)
    head, other_head = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    assert fingerprint(output_fn=head) != fingerprint(output_fn=other_head)
    assert fingerprint(output_fn=head.forward) != fingerprint(output_fn=other_head.forward)
    weight = torch.tensor([1.0, 2.0, 3.0])
    assert fingerprint(loss=torch.nn.CrossEntropyLoss(weight=weight)) != \
        fingerprint(loss=torch.nn.CrossEntropyLoss(weight=2 * weight))
    assert fingerprint(loss=torch.nn.CrossEntropyLoss()) != fingerprint(loss=torch.nn.CrossEntropyLoss(reduction="sum"))
    assert fingerprint(output_fn=functools.partial(first_outputs, n=1)) != \
        fingerprint(output_fn=functools.partial(first_outputs, n=2))
    assert fingerprint(output_fn=Scaled(2.0)) != fingerprint(output_fn=Scaled(3.0))
    assert fingerprint(output_fn=Scaled(2.0)) == fingerprint(output_fn=Scaled(2.0))
    # a pandas column of ids, whose repr elides the middle rows
    ids = pd.Series(np.arange(100))
    assert fingerprint(test_ids=ids) != fingerprint(test_ids=ids.replace(50, 1000))


# --------------------------------------------------------------------------- shards, digests, merges and outcomes


@pytest.mark.parametrize("split, rank, world_size, refused", [("test", 2, 6, "6 processes for 5 test inputs"),
                                                               ("steps", 4, 8, "8 processes for 7 steps")],
                         ids=["test", "steps"])
def test_a_shard_left_nothing_to_explain_is_refused(run, split, rank, world_size, refused):
    """6 shares of 5 test inputs are cut at round(5k/6) = 0, 1, 2, 2, 3, 4, 5 and 8 of 7 steps at
    0, 1, 2, 3, 4, 4, 5, 6, 7: rank 2's, and rank 4's, share is empty."""
    from explaind.distributed import explain_shard

    assert shard_bounds(5 if split == "test" else 7, rank, world_size) == ((2, 2) if split == "test" else (4, 4))
    with pytest.raises(ex.InputError) as error:
        explain_shard(run.path, run.model, run.test_x, split=split, rank=rank, world_size=world_size, progress=False)
    assert str(error.value) == f"{refused}: use fewer processes"


def stored_hand_part(path: Path) -> None:
    part = xr.Dataset({"attribution": ("test", np.array([1.5, 2.0, -3.0]))}, coords={"test": np.array([10, 11, 12])})
    store_part(part, path, "request", 0)


@pytest.mark.parametrize("how", ["label_changed", "dtype_changed"])
def test_a_part_whose_labels_or_dtype_changed_on_disk_is_damaged(tmp_path, how):
    """The digest covers the coordinates, and each variable's dtype: a test label rewritten, or
    float64 numbers whose metadata reads them as int64 (the bytes and the file's size kept: the
    part opens), is named, not merged."""
    path = tmp_path / "part-00000.zarr"
    stored_hand_part(path)
    if how == "label_changed":
        zarr.open_array(path / "test", mode="r+")[1] = 99
    else:
        metadata = path / "attribution" / ".zarray"
        text = metadata.read_text()
        changed = text.replace('"<f8"', '"<i8"').replace('"NaN"', "null ")  # no NaN in int64: no fill value
        assert changed != text and len(changed) == len(text)
        metadata.write_text(changed)
    with pytest.raises(ex.InputError, match="part 0 at .* is damaged: its numbers differ"):
        read_part(path, "request", 0)


def test_a_part_stored_under_another_ranks_name_is_refused(tmp_path):
    """Part 0 copied into part 1's place holds this request, but not part 1 of it."""
    from explaind.distributed import missing_parts

    stored_hand_part(tmp_path / "part-00000.zarr")
    shutil.copytree(tmp_path / "part-00000.zarr", tmp_path / "part-00001.zarr")
    with pytest.raises(ex.InputError, match=r"(?s)part-00001.zarr holds a part computed for a different request"):
        missing_parts(tmp_path, "request", 2)


def test_each_process_checks_its_own_parts_numbers_before_any_compute(tmp_path, monkeypatch):
    """Process 1 of 2 names its damaged part at once (process 0 would find it only when it merges,
    once every other part is computed); process 0 reads only its own part's numbers."""
    import explaind.distributed as distributed

    run = train(Case(steps=3, n_test=2), tmp_path / "history")
    parts_dir, history = tmp_path / "parts", ex.History(run.path)
    explain_resumable(run.path, run.model, run.test_x, parts_dir=parts_dir, n_parts=2, split="test", **OPTIONS)
    damage(parts_dir / "part-00001.zarr", "byte_flipped")  # opens: the size is kept
    monkeypatch.setattr(distributed, "explain_shard", lambda *args, **kwargs: pytest.fail("a part was computed"))

    def own_part(rank):
        return distributed._store_own_part(history, run.model, run.test_x, None, "test", parts_dir, rank, 2, 1e-4,
                                           dict(OPTIONS))

    with pytest.raises(ex.InputError, match=r"(?s)part 1 at \S*part-00001.zarr is damaged: its numbers differ"):
        own_part(1)
    assert own_part(0) == resumable.request_fingerprint(history, run.model, run.test_x, None, split="test",
                                                        n_parts=2, **OPTIONS)


def test_distributed_checks_the_merged_cubes_residual(tmp_path, one_process_group):
    """As explain_resumable: one midpoint node on long steps misses far beyond 1e-12."""
    run = train(Case("mlp", "sgd", steps=3, lr_scale=15.0, widths=(6,)), tmp_path / "history")
    with pytest.raises(ex.ReconstructionError, match="(?s)tolerance.*quadrature=") as error:
        explain_distributed(run.path, run.model, run.test_x, parts_dir=tmp_path / "parts", quadrature=1,
                            rule="midpoint", tolerance=1e-12, progress=False)
    assert error.value.cube.attrs["relative_residual"] > 1e-6


def test_outcomes_are_told_per_call_and_waited_for(one_process_group):
    """Two processes' outcomes told through the group's store, played in one process: each reads
    every outcome (the first failure's class, explaind's, raised), a call does not read the last
    call's outcomes, and a process waits for every other's, naming those that told nothing."""
    import datetime

    from explaind.distributed import _Outcomes
    from explaind.history import process_group_store

    dist.init_process_group("gloo")
    process_group_store().set_timeout(datetime.timedelta(seconds=2))
    first = [_Outcomes(rank, 2) for rank in (0, 1)]
    first[0].tell(ex.InputError("bad ids"))
    first[1].tell(KeyboardInterrupt())
    with pytest.raises(ex.InputError) as error:
        first[1].raise_failed()
    assert str(error.value) == (
        "the parts of processes 0, 1 failed (process 0: InputError: bad ids; process 1: KeyboardInterrupt), so no "
        "cube is merged. Fix: what their errors name, then launch every process again")
    second = [_Outcomes(rank, 2) for rank in (0, 1)]
    second[0].tell(None)
    with pytest.raises(RuntimeError, match=r"^no outcome came from process 1 within the process group's timeout"):
        second[0].raise_failed()
    second[1].tell(None)
    assert second[0].raise_failed() is None and second[1].raise_failed() is None


def test_a_store_whose_host_stopped_is_named_with_the_relaunch(monkeypatch):
    """Process 1 of a group initialised from MASTER_ADDR, its part stored, when process 0 (the
    store's host) has stopped: it failed with torch's bare 'DistNetworkError: Broken pipe' (found by
    killing process 0 of a resumed launch); it now says its part is stored and to launch again. A
    failed part's own error is raised, not the store's. Played with a real TCPStore whose host is
    shut down."""
    import datetime

    from explaind import distributed
    from explaind.distributed import _Outcomes

    host = dist.TCPStore("127.0.0.1", 0, 2, True, wait_for_workers=False)
    client = dist.TCPStore("127.0.0.1", host.port, 2, False, timeout=datetime.timedelta(seconds=5))
    monkeypatch.setattr(distributed, "process_group_store", lambda: client)
    waiting, telling = _Outcomes(1, 2), _Outcomes(1, 2)
    waiting.tell(None)
    del host  # its server stops: every later request of the client fails at once
    for stored in (waiting.raise_failed, lambda: telling.tell(None)):
        with pytest.raises(RuntimeError, match=r"^the process group's store cannot be reached \(DistNetworkError: "
                                               r"[^\n]*\): the process that hosts it stopped .* This process's part "
                                               r"is stored, so no cube is merged here\. Fix: what that log names, then "
                                               r"launch every process again with the same request and parts_dir"):
            stored()
    assert telling.tell(ex.InputError("bad ids")) is None  # the caller raises that error


def test_test_split_adds_what_each_part_summed_over_its_inputs(tmp_path):
    """Without a test dim each part holds sums over its own inputs: merged, they add up to one
    explain()'s sums over all of them."""
    from explaind.distributed import explain_shard

    run = train(Case(steps=3, n_test=4), tmp_path / "history")
    parts = [explain_shard(run.path, run.model, run.test_x, split="test", rank=r, world_size=2, keep=("step",),
                           progress=False, tolerance=None) for r in range(2)]
    merged = merge(parts, "test")
    assert "test" not in merged["attribution"].dims
    assert_same_cube(merged, run.explain(keep=("step",)))


def test_steps_split_counts_the_kinks_of_every_part(tmp_path):
    """ReLU units switch along the paths of steps in both parts (1 and 2 kinks located, in 4
    segments each): the merged cube counts 3 in 8, as one explain() does."""
    from explaind.distributed import explain_shard

    run = train(Case(act="relu", lr_scale=5.0, steps=4, n_test=2), tmp_path / "history")
    parts = [explain_shard(run.path, run.model, run.test_x, split="steps", rank=r, world_size=2, progress=False,
                           tolerance=None) for r in range(2)]
    keys = ("kinks_located", "kink_segments_searched", "kink_segments_unresolved")
    assert [[part.attrs[key] for key in keys] for part in parts] == [[1, 4, 0], [2, 4, 0]]
    merged, single = merge(parts, "steps"), run.explain()
    assert [merged.attrs[key] for key in keys] == [single.attrs[key] for key in keys] == [3, 8, 0]
