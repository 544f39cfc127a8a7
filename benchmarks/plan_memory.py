"""Benchmark: the bytes ex.plan counts for a pass, against what explain holds.

Four models, each recorded for 3 AdamW steps of random data: an MLP 64-256-256-10 (tanh, 85,002
parameters), the same with ReLU (the kink search runs), a ResNet9 of width 4 (9,072 parameters,
32x32 images; its kinks are integrated plainly here) and a Transformer encoder layer (d_model 32,
4 heads, 64 positions; 8,997 parameters; its ReLU's kinks located in the last two cases). Each
case explains its inputs keeping train x test (the reverse-mode passes), or test x component
(the forward-mode pass of a cube without a train dim), in its own process (peak RSS is a
process's), after a warm-up explain of a run with 2-sample batches, so that what is measured is
the pass and not torch's lazy initialisation: the peak is reported above the process's resident
memory before explain.

    MALLOC_MMAP_THRESHOLD_=65536 python benchmarks/plan_memory.py

Without that variable, peak RSS also counts what glibc keeps of freed memory.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import explaind as ex
from explaind.models import ResNet9

TRAIN, NO_TRAIN = ("train", "test"), ("test", "component")
# (model, test inputs, batch size, convention, memory_budget or None, dims kept, kinks located)
CASES = (
    ("mlp", 50, 32, "update", None, TRAIN, False),
    ("mlp", 2, 128, "update", None, TRAIN, False),
    ("relu", 20, 32, "update", 600e6, TRAIN, True),
    ("relu", 20, 32, "update", 300e6, TRAIN, True),
    ("resnet", 10, 32, "update", None, TRAIN, False),
    ("resnet", 80, 32, "update", None, TRAIN, False),
    ("resnet", 10, 256, "update", None, TRAIN, False),
    ("resnet", 10, 256, "update", 100e6, TRAIN, False),
    ("resnet", 2, 256, "update", None, TRAIN, False),
    ("resnet", 2, 256, "update", 40e6, TRAIN, False),
    ("resnet", 10, 256, "gradient", None, TRAIN, False),
    ("encoder", 100, 32, "update", None, TRAIN, False),
    ("encoder", 10, 256, "update", None, TRAIN, False),
    ("encoder", 2, 256, "update", None, TRAIN, False),
    ("resnet", 200, 32, "update", None, NO_TRAIN, False),
    ("resnet", 200, 32, "update", 200e6, NO_TRAIN, False),
    ("encoder", 100, 32, "update", None, NO_TRAIN, False),
    ("encoder", 100, 32, "update", 400e6, NO_TRAIN, False),
    ("encoder", 10, 32, "update", None, NO_TRAIN, True),
    ("encoder", 10, 32, "update", 150e6, NO_TRAIN, True),
)


class MeanOverPositions(nn.Module):
    def forward(self, x):
        return x.mean(1)


def model_and_data(kind: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    if kind == "resnet":
        return ResNet9(3, 2, width=4), torch.randn(1000, 3, 32, 32), torch.randint(0, 2, (1000,))
    if kind == "encoder":
        model = nn.Sequential(nn.Linear(8, 32), nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True),
                              MeanOverPositions(), nn.Linear(32, 5))
        return model, torch.randn(1000, 64, 8), torch.randint(0, 5, (1000,))
    act = nn.Tanh if kind == "mlp" else nn.ReLU
    model = nn.Sequential(nn.Linear(64, 256), act(), nn.Linear(256, 256), act(), nn.Linear(256, 10))
    return model, torch.randn(1000, 64), torch.randint(0, 10, (1000,))


def record(path: Path, kind: str, batch: int) -> None:
    model, x, y = model_and_data(kind)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with ex.Recorder(path, model, opt) as rec:
        for step in range(3):
            rows = torch.arange(batch * step, batch * step + batch)
            opt.zero_grad()
            F.cross_entropy(model(x[rows]), y[rows]).backward()
            rec.batch(rows, x[rows], y[rows])
            opt.step()


def resident_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**20


def measure(root: Path, kind: str, n_test: int, batch: int, convention: str, budget: float | None,
            keep: tuple[str, ...], kinks: bool) -> str:
    """One case, in this process."""
    model, x, _ = model_and_data(kind)
    options = dict(keep=keep, progress=False, tolerance=None, dtype=torch.float32,
                   breakpoints=kinks, convention=convention, memory_budget=budget)
    record(root / "warm-up", kind, 2)
    ex.explain(root / "warm-up", model, x[-1:], **options)
    # training raises peak RSS as explain would: the measured run is recorded by another process
    subprocess.run([sys.executable, __file__, "--record", kind, str(batch), str(root / "run")], check=True)
    plan = ex.plan(root / "run", model, x[-n_test:], **options)
    before = resident_mib()
    ex.explain(root / "run", model, x[-n_test:], **options)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    limit = "none" if budget is None else f"{budget / 2**20:.0f} MiB"
    located = "kinks located" if kinks else "plain"
    return (f"{kind:7s} {' x '.join(keep):16s} {located:13s} {convention:8s} {n_test:3d} inputs  batch {batch:3d}  "
            f"budget {limit:>8s}  "
            f"planned {plan.device_bytes / 2**20:7.1f} MiB a pass ({plan.passes} passes of {plan.test_chunk} inputs, "
            f"batch parts of {plan.batch_chunk})"
            f"  peak RSS +{peak - before:7.1f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", type=int, help=argparse.SUPPRESS)  # a child process
    parser.add_argument("--record", nargs=3, help=argparse.SUPPRESS)  # a child process: kind, batch, path
    args = parser.parse_args()
    if args.record:
        kind, batch, path = args.record
        record(Path(path), kind, int(batch))
        return
    if args.case is not None:
        with tempfile.TemporaryDirectory() as tmp:
            print(measure(Path(tmp), *CASES[args.case]), flush=True)
        return
    for i in range(len(CASES)):
        subprocess.run([sys.executable, __file__, "--case", str(i)], check=True)


if __name__ == "__main__":
    main()
