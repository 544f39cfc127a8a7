"""Benchmark: kinks of parameters alone cost the search once per step, not once per input.

An input-convex MLP keeps its hidden weights nonnegative with `W.clamp(min=0)`: wherever an
entry of W crosses 0 along a step, every input's path has a kink at the same t (on top of each
input's own ReLU kinks). The search follows those shared units on the first input only and adds
their kinks to every input's, so its time grows with the inputs by their own kinks alone.
`reconstruct` (all outputs, Gauss-Legendre with 2 nodes per piece) runs on 1, 10 and 40 test
inputs; each line gives its time, the kinks located, the segments left unresolved (more kinks
than max_kinks) and the relative residual (float64 run).

    python benchmarks/shared_kinks.py               # width 64: 4,096 clamped weights
    python benchmarks/shared_kinks.py --width 128 --inputs 1 20
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import explaind as ex


class InputConvex(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.inp = nn.Linear(8, width, dtype=torch.float64)
        # entries near 0, so that many of them cross it within the run
        self.hidden = nn.Parameter((torch.rand(width, width, dtype=torch.float64) - 0.2) * 0.02)
        self.out = nn.Linear(width, 3, dtype=torch.float64)

    def forward(self, x):
        h = F.relu(self.inp(x))
        return self.out(F.relu(h @ self.hidden.clamp(min=0).T))


def record(path: Path, width: int) -> tuple[nn.Module, torch.Tensor]:
    """Five full-batch SGD steps on 64 random samples; returns the model and the samples."""
    torch.manual_seed(0)
    model = InputConvex(width)
    x, y = torch.randn(64, 8, dtype=torch.float64), torch.randint(0, 3, (64,))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with ex.Recorder(path, model, opt) as rec:
        for _ in range(5):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            rec.batch(torch.arange(64), x, y)
            opt.step()
    return model, x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--inputs", type=int, nargs="+", default=[1, 10, 40])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "history"
        model, x = record(path, args.width)
        for n in args.inputs:
            started = time.perf_counter()
            cube = ex.reconstruct(path, model, x[:n], quadrature=2, progress=False)
            seconds = time.perf_counter() - started
            print(f"{n:>3} inputs  {seconds:6.2f} s  kinks located {cube.attrs['kinks_located']:>5}  "
                  f"segments unresolved {cube.attrs['kink_segments_unresolved']:>3}  "
                  f"relative residual {cube.attrs['relative_residual']:.1e}")


if __name__ == "__main__":
    main()
