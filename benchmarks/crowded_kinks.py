"""Benchmark: a small ReLU + max-pool net whose steps cross more kinks than the search resolves.

A two-layer convolutional net (ReLU, max-pooling; 239 parameters) trained in float32 with AdamW
and a cosine schedule, 15 steps of 12 random images. explain() keeps train × test × output for
4 images, once per `max_kinks`, and compares the cube's total with the change of the model's own
log-probabilities between θ_0 and θ_15, computed here in float64: segments beyond the cap are
integrated plainly (`kink_segments_unresolved`), and with none left the miss is the float32
rounding of the recorded updates.

    python benchmarks/crowded_kinks.py                 # max_kinks 16 (the default) and 256
    python benchmarks/crowded_kinks.py --max-kinks 0 16 64 256
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import explaind as ex


def net() -> nn.Sequential:
    torch.manual_seed(5)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 2 * 2, 3))


def record(path: Path) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """Train and record the run; returns the models at θ_0 and θ_N and the images to explain."""
    torch.manual_seed(4)
    x, y = torch.randn(48, 1, 8, 8), torch.randint(0, 3, (48,))
    model = net()
    initial = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=0.03, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=15)
    with ex.Recorder(path, model, opt, scheduler=schedule) as rec:
        for _ in range(15):
            batch = torch.randperm(48)[:12]
            opt.zero_grad()
            F.cross_entropy(model(x[batch]), y[batch]).backward()
            rec.batch(batch, x[batch], y[batch])
            opt.step()
            schedule.step()
    return initial, model, torch.randn(4, 1, 8, 8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-kinks", type=int, nargs="+", default=[16, 256])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "history"
        initial, final, images = record(path)
        with torch.no_grad():  # the change explained, from the trained modules themselves
            change = (F.log_softmax(final.double()(images.double()), -1)
                      - F.log_softmax(initial.double()(images.double()), -1))
        scale = float(change.abs().max())
        print(f"largest change of a log-probability: {scale:.3f}")
        for cap in args.max_kinks:
            started = time.perf_counter()
            cube = ex.explain(path, final, images, keep=("train", "test", "output"), max_kinks=cap,
                              tolerance=None, progress=False)
            seconds = time.perf_counter() - started
            total = (cube["attribution"].sum("train") + cube["regularization"]).transpose("test", "output")
            miss = float((torch.from_numpy(total.values) - change).abs().max()) / scale
            print(f"max_kinks={cap:<4} relative miss {miss:.1e}  kinks located {cube.attrs['kinks_located']:>4}  "
                  f"segments unresolved {cube.attrs['kink_segments_unresolved']}  {seconds:.1f} s")


if __name__ == "__main__":
    main()
