"""Worker processes for independent jobs (explaind.parallel)."""

import functools
import os

import pytest
import torch

from explaind import InputError
from explaind.parallel import run_all


def test_jobs_run_in_worker_processes_and_results_keep_the_call_order():
    pids = run_all([os.getpid] * 4, workers=2, desc="pids", progress=False)
    assert 1 <= len(set(pids)) <= 2 and os.getpid() not in pids
    assert run_all([functools.partial(pow, 2, k) for k in range(5)], workers=2, desc="powers", progress=False) == [
        1, 2, 4, 8, 16]
    assert run_all([os.getpid] * 2, workers=1, desc="here", progress=False) == [os.getpid()] * 2


def test_each_worker_process_computes_on_one_cpu_thread(monkeypatch):
    """Worker processes side by side each take one CPU thread, whatever torch would take by
    default (here 3, from OMP_NUM_THREADS, which the spawned processes inherit)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert run_all([torch.get_num_threads] * 3, workers=2, desc="threads", progress=False) == [1, 1, 1]


def test_a_failing_job_fails_the_call_with_its_error():
    with pytest.raises(ValueError, match="invalid literal for int"):
        run_all([functools.partial(int, "1"), functools.partial(int, "x")], workers=2, desc="int", progress=False)
    with pytest.raises(InputError, match="retrain_workers is -2"):
        run_all([os.getpid], workers=-2, desc="none", progress=False)


def test_workers_0_are_one_per_core_on_the_cpu_and_this_process_on_a_gpu(monkeypatch):
    """Every job runs on the one device named: on a GPU, processes one per core would each start a
    CUDA context there (hundreds of MiB each) and queue for the same GPU, so 0 means this process.
    (No GPU runs here: the jobs only report their process.)"""
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    on_cpu = run_all([os.getpid] * 3, workers=0, desc="pids", progress=False, device="cpu")
    assert os.getpid() not in on_cpu and len(set(on_cpu)) <= 2
    for device in ("cuda", "cuda:1", torch.device("mps")):
        assert run_all([os.getpid] * 3, workers=0, desc="pids", progress=False, device=device) == [os.getpid()] * 3
    two = run_all([os.getpid] * 3, workers=2, desc="pids", progress=False, device="cuda")  # as many as asked for
    assert os.getpid() not in two
