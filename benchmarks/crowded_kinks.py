"""Benchmark: a small ReLU + max-pool net whose steps cross more kinks than the search resolves.

A two-layer convolutional net (ReLU, max-pooling; 239 parameters) trained in float32 with AdamW
and a cosine schedule, 15 steps of 12 random images. explain() keeps train × test × output for
4 images, once per `max_kinks`, and compares the cube's total with the change of the model's own
log-probabilities between θ_0 and θ_15, computed here in float64: segments beyond the cap are
integrated plainly (`kink_segments_unresolved`), and with none left the miss is the float32
rounding of the recorded updates.

    python benchmarks/crowded_kinks.py                 # max_kinks 16 (the default) and 256
    python benchmarks/crowded_kinks.py --max-kinks 0 16 64 256
    python benchmarks/crowded_kinks.py --width 8 --size 16   # 8 channels on 16x16 images

Prints each call's seconds and those of its kink search (explaind.phases).
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
from explaind.phases import KINK_SEARCH, timed


def net(width: int, size: int) -> nn.Sequential:
    torch.manual_seed(5)
    side = size // 2 - 2  # after the pooling and the unpadded convolution
    return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(width, width, 3),
                         nn.ReLU(), nn.Flatten(), nn.Linear(width * side * side, 3))


def record(path: Path, width: int, size: int) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """Train and record the run; returns the models at θ_0 and θ_N and the images to explain."""
    torch.manual_seed(4)
    x, y = torch.randn(48, 1, size, size), torch.randint(0, 3, (48,))
    model = net(width, size)
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
    return initial, model, torch.randn(4, 1, size, size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-kinks", type=int, nargs="+", default=[16, 256])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--width", type=int, default=4, help="channels of both convolutions")
    parser.add_argument("--size", type=int, default=8, help="side of the square images (at least 6)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "history"
        initial, final, images = record(path, args.width, args.size)
        with torch.no_grad():  # the change explained, from the trained modules themselves
            change = (F.log_softmax(final.double()(images.double()), -1)
                      - F.log_softmax(initial.double()(images.double()), -1))
        scale = float(change.abs().max())
        print(f"largest change of a log-probability: {scale:.3f}")
        for cap in args.max_kinks:
            started = time.perf_counter()
            with timed() as phases:
                cube = ex.explain(path, final, images, keep=("train", "test", "output"), max_kinks=cap,
                                  tolerance=None, progress=False)
            seconds = time.perf_counter() - started
            total = (cube["attribution"].sum("train") + cube["regularization"]).transpose("test", "output")
            miss = float((torch.from_numpy(total.values) - change).abs().max()) / scale
            print(f"max_kinks={cap:<4} relative miss {miss:.1e}  kinks located {cube.attrs['kinks_located']:>4}  "
                  f"segments unresolved {cube.attrs['kink_segments_unresolved']}  {seconds:.1f} s "
                  f"(kink search {phases.get(KINK_SEARCH, 0.0):.1f} s)")


if __name__ == "__main__":
    main()
