"""Recording a DistributedDataParallel run: 2 gloo processes launched by torchrun on the CPU,
each declaring its own shard of every batch, write one history (process 0) whose steps hold the
union of the shards, weighted as DDP's averaged gradient weighs them, and which explains exactly:
as one process trained on the same whole batches, where the shards are equal."""

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

import explaind as ex
from test_distributed import free_port

sys.path.insert(0, str(Path(__file__).parent / "workers"))
import record_data_parallel as worker  # noqa: E402

WORKER = Path(worker.__file__)


def record_on_two_processes(path: Path, opt: str, shards: str, wrap: str, mistake: str = "",
                            weighted: bool = False) -> str:
    """Run the worker's loop on 2 gloo processes (bounded: a hang fails the test); what each process
    said it raised, in process order."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", free_port(),
           str(WORKER), str(path), opt, shards, wrap, mistake, "weighted" if weighted else ""]
    with tempfile.TemporaryDirectory() as said_dir:  # beside the run's folder, which some tests find empty
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1]), "SAID_DIR": said_dir}
        result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
        assert result.returncode == 0, result.stderr[-4000:]
        return "".join(said.read_text() for said in sorted(Path(said_dir).glob("process-*.said")))


def explained(path: Path) -> "ex.Cube":
    inputs, _ = worker.data()
    return ex.explain(path, worker.fresh_model(), inputs[:5], quadrature=6, progress=False)


def assert_exact(cube) -> None:
    assert cube.attrs["relative_residual"] <= 1e-9
    # each update as the modelled optimizer makes it, to the rounding of the stored parameters
    assert float((cube["update_residual"] - cube["update_rounding_floor"]).max()) <= 0


@pytest.mark.parametrize("opt,wrap,weighted", [("sgd", "ddp", False), ("adamw", "module", True)])
def test_unequal_shards_are_recorded_with_the_weights_of_the_averaged_gradient(opt, wrap, weighted, tmp_path):
    """Each process's mean over its shard, averaged over the 2 processes: a sample of a shard of B
    rows weighs 1 / (2 B), not 1 / (size of the union); with class weights (whose per-sample losses
    carry them), 1 / (2 · its shard's total class weight)."""
    record_on_two_processes(tmp_path / "ddp", opt, "unequal", wrap, weighted=weighted)
    history = ex.History(tmp_path / "ddp")
    assert history.layout.names == ("0.weight", "0.bias", "2.weight", "2.bias")  # as the plain module names them
    assert history.meta["processes"] == 2 and history.meta.get("class_weights") == (
        worker.CLASS_WEIGHTS.tolist() if weighted else None)
    for rec, sizes in zip(history.steps(), worker.SHARDS["unequal"], strict=True):
        order = torch.randperm(30, generator=torch.Generator().manual_seed(rec.step))[:sum(sizes)]
        assert torch.equal(rec.indices, worker.IDS[order])  # both shards, in rank order
        assert rec.shards == list(sizes)
        weight = worker.CLASS_WEIGHTS[rec.targets] if weighted else torch.ones(len(rec.targets), dtype=torch.float64)
        expected = torch.cat([torch.full((len(shard),), 1 / (2 * shard.sum().item()), dtype=torch.float64)
                              for shard in weight.split(sizes)])
        assert torch.allclose(history.sample_weights(rec, torch.float64, "cpu") / rec.gradient_scale, expected,
                              rtol=1e-15, atol=0)
    assert_exact(explained(tmp_path / "ddp"))


def test_a_data_parallel_step_without_its_shards_is_refused(tmp_path):
    """Its samples' weights depend on them: a manifest line that lost or changed them was edited."""
    record_on_two_processes(tmp_path / "ddp", "sgd", "unequal", "ddp")
    manifest = tmp_path / "ddp" / "manifest.jsonl"
    lines = manifest.read_text().splitlines()
    for shards in (None, [9], [9, 0], [4, 4]):
        edited = json.loads(lines[0])
        edited.pop("shards") if shards is None else edited.update(shards=shards)
        manifest.write_text("\n".join([json.dumps(edited), *lines[1:]]) + "\n")
        with pytest.raises(ex.HistoryError, match=rf"step 0 records the shards {re.escape(repr(shards))}, not the "
                                                  "rows of each of the run's 2 processes"):
            ex.History(tmp_path / "ddp")


@pytest.mark.parametrize("opt,wrap", [("sgd", "module"), ("adamw", "ddp")])
def test_equal_shards_explain_as_one_process_on_the_whole_batches(opt, wrap, tmp_path):
    record_on_two_processes(tmp_path / "ddp", opt, "equal", wrap)
    worker.train(str(tmp_path / "one"), opt, "equal")  # no process group: the whole batches, in one process
    ddp, one = explained(tmp_path / "ddp"), explained(tmp_path / "one")
    assert_exact(ddp)
    for name in ("attribution", "initial", "final"):
        scale = float(np.abs(one[name]).max())
        assert scale > 0 and float(np.abs(ddp[name] - one[name]).max()) <= 1e-10 * scale, name
    np.testing.assert_array_equal(ddp["train"], one["train"])


def test_a_refusal_at_process_0_is_raised_by_every_process(tmp_path):
    """Process 1 declares other targets than it trained on: the gradient check of the joined
    batch, at process 0, refuses the step, and process 1 raises the same refusal rather than wait
    for process 0's gradients."""
    said = record_on_two_processes(tmp_path / "ddp", "sgd", "unequal", "ddp", mistake="targets")
    refusals = {line.split(": ", 1)[0]: line.split(": ", 1)[1] for line in said.splitlines()
                if line.startswith("process ")}
    assert refusals.keys() == {"process 0", "process 1"}
    assert refusals["process 0"].startswith("UnsupportedError: at step 0 the gradient in .grad differs")
    assert refusals["process 1"] == refusals["process 0"]  # process 0's, of the joined batch
    with pytest.raises(ex.HistoryError, match="holds no complete step"):
        ex.History(tmp_path / "ddp")


def test_a_recorder_in_process_0_alone_is_refused_not_left_waiting(tmp_path):
    """The other process trains without one: process 0 refuses when the others do not come (in
    3 s here), naming the fix; a DDP gradient exchange of process 1 then ends as process 0 exits."""
    said = record_on_two_processes(tmp_path / "ddp", "sgd", "unequal", "ddp", mistake="rank0_only")
    assert ("process 0: UnsupportedError: process 0 of this data-parallel run built a Recorder, and not every "
            "other process did within 3 s") in said
    assert "Fix: build the Recorder in every process, on the same path" in said


def test_processes_that_record_to_other_paths_are_refused(tmp_path):
    """Process 0 alone writes: another path, given to process 1, would be ignored without a word."""
    said = record_on_two_processes(tmp_path / "ddp", "sgd", "unequal", "ddp", mistake="paths")
    for process in (0, 1):
        assert (f"process {process}: InputError: the processes of this data-parallel run record to 2 paths "
                f"('{tmp_path / 'ddp'}-0' in process 0, '{tmp_path / 'ddp'}-1' in another)") in said
    assert "Fix: pass the same path in every process" in said
    assert not list(tmp_path.iterdir())  # nothing written


def test_a_ddp_run_recorded_as_runs_apart_is_refused_naming_the_fix(tmp_path):
    """DistributedDataParallel training, its .module given with a path per process: taken for
    processes that train apart, whose gradient checks see the averaged gradient, not their own."""
    said = record_on_two_processes(tmp_path / "ddp", "sgd", "unequal", "module", mistake="module_paths")
    for process in (0, 1):
        assert f"process {process}: UnsupportedError: at step 0 the gradient in .grad differs" in said
    assert said.count("This process is one of 2 in a process group, recording a run of its own (a path of its "
                      "own): if DistributedDataParallel averages their gradients, build the Recorder in every "
                      "process with the same path") == 2


def test_processes_that_train_apart_record_a_run_each(tmp_path):
    """No DistributedDataParallel, a path per process: each process's own run, as outside a group."""
    record_on_two_processes(tmp_path / "apart", "adamw", "unequal", "module", mistake="apart")
    for rank in (0, 1):
        history = ex.History(f"{tmp_path / 'apart'}-{rank}")
        assert history.meta["version"] == 1 and "processes" not in history.meta
        for rec, sizes in zip(history.steps(), worker.SHARDS["unequal"], strict=True):
            assert len(rec.indices) == sizes[rank] and rec.shards is None
        assert_exact(explained(history.path))


@pytest.mark.parametrize("kill, steps", [("kill", 3), ("kill_after_schedule", 4)])
def test_a_killed_data_parallel_recording_resumes_to_the_uninterrupted_history(tmp_path, kill, steps):
    """Each process adds noise to its inputs from its own RNG: the resume restores each process's
    generators (process 0's in all of them made other noise), and the history is the
    uninterrupted run's, file for file. Its scheduler steps once an epoch (2 steps): killed after an
    epoch's scheduler step or mid-epoch, every process redoes the killed step."""
    record_on_two_processes(tmp_path / "whole", "sgd", "unequal", "ddp", mistake="augment")
    lrs = [line["groups"][0]["lr"] for line in ex.History(tmp_path / "whole").manifest]
    assert lrs == [0.3, 0.3, 0.15, 0.15, 0.075, 0.075]
    record_on_two_processes(tmp_path / "resumed", "sgd", "unequal", "ddp", mistake=kill)
    assert ex.History(tmp_path / "resumed", allow_incomplete=True).n_steps == steps
    record_on_two_processes(tmp_path / "resumed", "sgd", "unequal", "ddp", mistake="resume")
    whole, resumed = ex.History(tmp_path / "whole"), ex.History(tmp_path / "resumed")
    assert resumed.n_steps == whole.n_steps == 6 and resumed.fingerprint() == whole.fingerprint()
    for name in ("manifest.jsonl", "initial.safetensors", *(f"steps/{s:07d}.safetensors" for s in range(6))):
        assert (tmp_path / "resumed" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    assert_exact(explained(tmp_path / "resumed"))


def test_a_history_is_resumed_by_as_many_processes_as_recorded_it(tmp_path):
    """One process, resuming a recording of two, would change what each step's batch joins."""
    record_on_two_processes(tmp_path / "ddp", "sgd", "unequal", "ddp", mistake="kill")
    model = worker.fresh_model()
    with pytest.raises(ex.InputError, match=r"recorded by 2 data-parallel process\(es\), and is resumed by 1"):
        ex.Recorder.resume(tmp_path / "ddp", model, torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9))
    assert ex.History(tmp_path / "ddp", allow_incomplete=True).n_steps == 3  # untouched
