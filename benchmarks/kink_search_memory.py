"""Benchmark: what memory_budget does to the kink search's memory and time.

A ResNet9 of width 4 trained 3 SGD steps (momentum 0.9) on 8 random images a step; explain 6
images, keeping train × test. Each budget runs in its own process, since peak RSS is a
process's: the peak is reported above the process before explain (the trained run, torch).

    python benchmarks/kink_search_memory.py                  # 16 and 32 pixels, every budget
    python benchmarks/kink_search_memory.py --pixels 48 --budgets none 100e6

Peak RSS counts what glibc keeps of freed memory too; MALLOC_MMAP_THRESHOLD_=65536 in the
environment makes it follow the bytes in use (and the run slower).
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import explaind as ex
from explaind.models import ResNet9


def record(path: Path, pixels: int) -> tuple[ResNet9, torch.Tensor]:
    """Train and record the run; returns the model and the 6 images to explain."""
    torch.manual_seed(0)
    x, y = torch.randn(32, 3, pixels, pixels), torch.randint(0, 2, (32,))
    model = ResNet9(3, 2, width=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with ex.Recorder(path, model, opt) as rec:
        for step in range(3):
            batch = torch.arange(8 * step, 8 * step + 8)
            opt.zero_grad()
            F.cross_entropy(model(x[batch]), y[batch]).backward()
            rec.batch(batch, x[batch], y[batch])
            opt.step()
    return model, x[:6]


def measure(pixels: int, budget: str) -> str:
    """One budget ('none': no bound, 'plain': no kink search), in this process."""
    with tempfile.TemporaryDirectory() as tmp:
        model, images = record(Path(tmp) / "run", pixels)
        options = dict(keep=("train", "test"), progress=False, tolerance=None, dtype=torch.float32,
                       breakpoints=budget != "plain",
                       memory_budget=None if budget in ("none", "plain") else float(budget))
        plan = ex.plan(Path(tmp) / "run", model, images, **options)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        cube = ex.explain(Path(tmp) / "run", model, images, **options)
        seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (f"{pixels:>3} px  budget {budget:>7}  planned {plan.device_bytes / 2**20:6.1f} MiB "
            f"(search reserve {plan.search_reserve / 2**20:5.1f})  peak RSS +{(peak - before) / 1024:5.0f} MiB  "
            f"{seconds:6.1f} s  kinks {cube.attrs['kinks_located']:4d} (segments unresolved "
            f"{cube.attrs['kink_segments_unresolved']:2d} of {3 * len(images)})  max |residual| "
            f"{cube.attrs['max_abs_residual']:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pixels", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--budgets", nargs="+", default=["plain", "none", "400e6", "100e6", "30e6"],
                        help="bytes, 'none' (no bound) or 'plain' (no kink search)")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child process
    args = parser.parse_args()
    if args.one:
        print(measure(args.pixels[0], args.budgets[0]), flush=True)
        return
    for pixels in args.pixels:
        for budget in args.budgets:
            subprocess.run([sys.executable, __file__, "--one", "--pixels", str(pixels), "--budgets", budget],
                           check=True)


if __name__ == "__main__":
    main()
