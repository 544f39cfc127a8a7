"""Worker of tests/test_data_parallel.py, launched by torchrun: a DistributedDataParallel training
loop on gloo processes with the Recorder added as the docs say, every process declaring its own
shard of each batch. Run in one process (no torchrun), the same loop trains on the whole batches.
`mistake` makes the loop go wrong one way, or (augment, kill, kill_after_schedule, resume) adds noise
to the inputs from each process's own RNG and halves the learning rate after every epoch of 2 steps,
is killed after 3 steps (or after the 4th and its epoch's scheduler step), or resumes such a run; or
(apart) trains a model in each process, on its shards, each recorded to a path of its own."""

import contextlib
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import explaind as ex

# each step's rows per process; a run of one process trains on their union
SHARDS = {"equal": [(5, 5)] * 6, "unequal": [(7, 2), (3, 6), (5, 4), (1, 8), (6, 3), (4, 4)]}
IDS = 5 + 3 * torch.arange(30)  # dataset indices that are not row numbers
CLASS_WEIGHTS = torch.tensor([0.5, 2.0, 1.25], dtype=torch.float64)  # a weighted run's loss weighs the classes


def data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(30, 4, generator=generator, dtype=torch.float64), torch.randint(0, 3, (30,), generator=generator)


def fresh_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def train(path: str, opt: str, shards: str, wrap: str = "ddp", mistake: str = "", weighted: bool = False) -> None:
    """The loop of process `rank` of `processes` (1: no process group, the whole batches)."""
    processes = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    model = fresh_model()
    apart = mistake == "apart"  # the processes train a model each, on their shards, without averaging
    trained = nn.parallel.DistributedDataParallel(model) if processes > 1 and not apart else model
    optimizer = (torch.optim.SGD(trained.parameters(), lr=0.3, momentum=0.9) if opt == "sgd"
                 else torch.optim.AdamW(trained.parameters(), lr=0.05, weight_decay=0.1))
    x, y = data()
    recording = mistake != "rank0_only" or rank == 0
    # torch's weighted mean divides each process's loss by its shard's total class weight
    class_weights = CLASS_WEIGHTS if weighted else None
    path = f"{path}-{rank}" if mistake in ("paths", "apart", "module_paths") else path
    augment = mistake in ("augment", "kill", "kill_after_schedule", "resume")
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5) if augment else None
    torch.manual_seed(100 + rank)  # each process draws its own noise
    given = trained if wrap == "ddp" else model
    recorder = (ex.Recorder.resume(path, given, optimizer, scheduler=scheduler, check_every=1) if mistake == "resume"
                else ex.Recorder(path, given, optimizer, check_every=1, class_weights=class_weights,
                                 scheduler=scheduler) if recording
                else contextlib.nullcontext())
    with recorder as rec:
        first = rec.step if rec else 0
        for step, sizes in enumerate(SHARDS[shards][first:], first):
            order = torch.randperm(len(x), generator=torch.Generator().manual_seed(step))[:sum(sizes)]
            rows = order if processes == 1 else order.split(sizes)[rank]
            inputs = x[rows] + 0.1 * torch.randn(len(rows), x.shape[1], dtype=x.dtype) if augment else x[rows]
            optimizer.zero_grad()
            F.cross_entropy(trained(inputs), y[rows], weight=class_weights).backward()
            if opt == "sgd" and rec:
                rec.clip_grad_norm_(0.5)
            declared = (y[rows] + 1) % 3 if mistake == "targets" and rank == 1 else y[rows]
            if rec:
                rec.batch(IDS[rows], inputs, declared)
            optimizer.step()
            if mistake == "kill" and step == 2:
                os._exit(0)  # killed: the Recorder is never closed
            if scheduler is not None and step % 2 == 1:  # an epoch's end
                scheduler.step()
            if mistake == "kill_after_schedule" and step == 3:
                os._exit(0)


if __name__ == "__main__":
    path, opt, shards, wrap, mistake, weighted = sys.argv[1:7]
    if mistake == "rank0_only":  # the others never come: wait for them briefly
        import datetime

        import explaind.history

        explaind.history.MEET_TIMEOUT = datetime.timedelta(seconds=3)
    dist.init_process_group("gloo")
    try:
        train(path, opt, shards, wrap, mistake, weighted == "weighted")
        dist.destroy_process_group()
    except (ex.ExplaindError, RuntimeError) as error:
        # said by each process for the test to read, and exited from cleanly: a process that failed
        # would have torchrun stop the others before they say theirs. Each says it in a file of its
        # own: two long lines printed at once interleave in torchrun's pipe
        said = Path(os.environ["SAID_DIR"]) / f"process-{dist.get_rank()}.said"
        said.write_text(f"process {dist.get_rank()}: {type(error).__name__}: {error}\n")
