"""Independent jobs side by side in worker processes: the retraining runs of the analysis stages.

Each job is a picklable call (a functools.partial of a module-level function) that seeds its
own randomness, so the results do not depend on how many processes run them, nor on which
process runs which job.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Sequence, TypeVar

import torch
from tqdm.auto import tqdm

from .errors import InputError

T = TypeVar("T")


def run_all(calls: Sequence[Callable[[], T]], workers: int, desc: str, progress: bool = True,
            device: str | torch.device = "cpu") -> list[T]:
    """call() for every call, in order: in this process (workers 1), or in `workers` processes
    of one CPU thread each (0: one per core where the calls compute on the CPU; on the GPU or
    other `device` they all compute on, this process: one per core would each start a CUDA
    context there, hundreds of MiB apiece, to queue for the same device).

    The processes are spawned, not forked (a forked torch may hang on its thread pool): called
    from a script, guard its top level with `if __name__ == "__main__":` (notebooks need nothing).
    """
    if workers < 0:
        raise InputError(f"retrain_workers is {workers}: use 1 (this process), more, or 0 (one per core, on a GPU 1)")
    if workers == 0:
        workers = (os.cpu_count() or 1) if torch.device(device).type == "cpu" else 1
    workers = min(workers, len(calls))
    bar = tqdm(total=len(calls), desc=desc, disable=not progress, leave=False)
    results = []
    if workers <= 1:
        for call in calls:
            results.append(call())
            bar.update()
    else:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=torch.set_num_threads, initargs=(1,)) as pool:
            for result in pool.map(_call, calls):
                results.append(result)
                bar.update()
    bar.close()
    return results


def _call(call: Callable[[], T]) -> T:
    return call()
