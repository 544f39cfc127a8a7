"""Worker of tests/test_distributed.py, launched as a plain process (not by torchrun, whose agent
stops the other processes once one fails): it joins a gloo group of its own with a short timeout,
so that a process left waiting for the others fails the test instead of hanging it, and prints
how explain_distributed ended."""

import datetime
import os
import sys
import time
from pathlib import Path

import torch.distributed as dist
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared tiny cases
from computed_parts import log_computed_parts  # noqa: E402
from engine_cases import Case  # noqa: E402

import explaind.distributed as distributed  # noqa: E402
from explaind.errors import InputError  # noqa: E402

history, model_kind, split, parts_dir, fail, failing_rank, timeout = sys.argv[1:8]
rank = int(os.environ["RANK"])
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=float(timeout)))
log_computed_parts(parts_dir)
if fail != "none" and rank == int(failing_rank):  # this process only, as it computes its part
    def failing_shard(*args, **kwargs):
        if fail == "interrupt":  # Ctrl-C
            raise KeyboardInterrupt
        if fail == "refuse":  # an error of this part alone (a refused input is refused by every process)
            raise InputError("this part is refused")
        os._exit(3)  # dies outright (killed, out of host memory): no exception, no exit handlers

    distributed.explain_shard = failing_shard
inputs = load_file(Path(parts_dir) / "inputs.safetensors")["inputs"]
try:
    cube = distributed.explain_distributed(history, Case(model=model_kind).fresh_model(), inputs, split=split,
                                           parts_dir=parts_dir, quadrature=6, progress=False)
except BaseException as error:  # noqa: B036: a KeyboardInterrupt is an outcome here
    print(f"{type(error).__name__}: {error}", flush=True)
    if rank == int(failing_rank):  # lives on after its error, as a notebook or a script that catches it does
        time.sleep(600)
    sys.exit(1)
print("returned a cube" if cube is not None else "returned None")
