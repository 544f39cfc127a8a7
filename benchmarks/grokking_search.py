"""Search for a Transformer setting that groks quickly on a CPU (see docs/grokking_search.md).

Each run trains with explaind.training.train_transformer (the code the pipeline uses) and
appends one CSV row: the setting, t_mem (first step at 100% training accuracy), t_val_95,
t_val_100, the wall and CPU time, and the trajectory (train/val accuracy every 200 steps).
A setting "groks" when t_val_95 >= 2 * t_mem and t_val_95 <= 3000.

    .venv/bin/python benchmarks/grokking_search.py grid coarse results.csv
    .venv/bin/python benchmarks/grokking_search.py seeds results.csv --p 43 --lr 0.003 ...
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import itertools
import os
import time

import torch

from explaind.errors import InputError
from explaind.training import TransformerConfig, train_transformer


def n_pairs(p: int) -> int:
    return p * (p + 1) // 2  # pairs with a >= b


def setting(p: int, frac: float, d_model: int, d_mlp: int, lr: float, wd: float) -> TransformerConfig:
    """A search point: float32 and at most 400 validation pairs, to keep the search cheap."""
    train_size = round(frac * n_pairs(p))
    return TransformerConfig(
        p=p, train_size=train_size, val_size=min(400, n_pairs(p) - train_size),
        d_model=d_model, n_heads=4, d_mlp=d_mlp, lr=lr, weight_decay=wd,
        max_steps=3000, dtype="float32")


def product(p, frac, d_model, lr, wd) -> list[TransformerConfig]:
    """Cartesian grid with the MLP 4x as wide as the residual stream."""
    return [setting(*v[:3], 4 * v[2], *v[3:]) for v in itertools.product(p, frac, d_model, lr, wd)]


GRIDS = {
    # phase 1 (stopped after 6 runs): train fraction 0.3 at p = 31 memorised, never generalised
    "coarse": product(p=[31, 43, 59], frac=[0.3, 0.5], d_model=[32, 64], lr=[1e-3, 3e-3], wd=[1.0, 3.0]),
    # phase 2 (stopped after p = 31): larger fractions; 0.94 validation accuracy at best
    "frac": product(p=[31, 43, 59], frac=[0.5, 0.7], d_model=[32], lr=[3e-3, 1e-2], wd=[1.0, 3.0]),
    # phase 3 (stopped after 2 runs): p = 59 with d_model 32 did not even memorise
    "decay": product(p=[59, 43], frac=[0.6, 0.7], d_model=[32], lr=[3e-3, 1e-2], wd=[3.0, 5.0]),
    # phase 4: single probes around p = 43, train fraction 0.6, lr 3e-3, weight decay 3
    "probes": [
        setting(31, 0.7, 32, 128, 1e-2, 3.0),
        setting(43, 0.6, 32, 128, 1e-2, 2.0),
        setting(31, 0.6, 32, 128, 1e-2, 3.0),
        setting(43, 0.5, 32, 128, 1e-2, 3.0),
        setting(43, 0.6, 32, 128, 3e-3, 3.0),
        setting(43, 0.7, 32, 128, 3e-3, 3.0),
        setting(43, 0.6, 32, 128, 5e-3, 3.0),
        setting(43, 0.6, 64, 256, 3e-3, 3.0),
        setting(53, 0.6, 32, 128, 3e-3, 3.0),
        # phase 5: the wide model groks; look for a cheaper one with the same shape
        setting(43, 0.6, 64, 128, 3e-3, 3.0),
        setting(43, 0.6, 64, 256, 3e-3, 5.0),
        setting(43, 0.6, 48, 192, 3e-3, 3.0),
        setting(31, 0.7, 64, 256, 3e-3, 3.0),
    ],
    # phase 6 (run with `seeds`, seeds 0-2 each, max_steps 2500): lr x wd ~1e-2 at d_model 64 /
    # MLP 128, trading weight decay for learning rate; lr 1e-2, wd 1 (the default) groks for all
    "lr_wd": [setting(43, frac, 64, 128, lr, wd) for frac, lr, wd in [
        (0.65, 3e-3, 3.5), (0.7, 3e-3, 3.5), (0.6, 1e-3, 10.0), (0.6, 2e-3, 5.0),
        (0.6, 5e-3, 2.0), (0.6, 1e-2, 1.0)]],
}


def trajectory(log, every: int = 200) -> str:
    rows = log[log["step"] % every == 0]
    return " ".join(f"{int(r.step)}:{r.train_acc:.2f}/{r.val_acc:.2f}" for r in rows.itertuples())


def parse_bool(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() == "true"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    grid = sub.add_parser("grid", help="run a named list of settings")
    grid.add_argument("name", choices=sorted(GRIDS))
    seeds = sub.add_parser("seeds", help="run one setting (flags = TransformerConfig fields) over seeds")
    for field in dataclasses.fields(TransformerConfig):
        kind = parse_bool if isinstance(field.default, bool) else type(field.default)
        seeds.add_argument("--" + field.name.replace("_", "-"), type=kind)
    seeds.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="initialisation seeds")
    for p in (grid, seeds):
        p.add_argument("out", help="CSV file to append results to")
        p.add_argument("--threads", type=int, default=1, help="torch threads (leave cores to others)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.mode == "grid":
        configs = GRIDS[args.name]
    else:
        given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TransformerConfig)
                 if getattr(args, f.name) is not None}
        try:  # the config's own range checks, named by their flags
            configs = [dataclasses.replace(TransformerConfig(**given), seed=s) for s in args.seeds]
        except InputError as error:
            parser.error(str(error).replace("train_transformer.", "--").split(". Fix:")[0].replace("_", "-"))

    fields = [f.name for f in dataclasses.fields(TransformerConfig)]
    columns = fields + ["t_mem", "t_val_95", "t_val_100", "steps", "val_acc", "wall_time_s",
                        "cpu_time_s", "threads", "trajectory"]
    write_header = not os.path.exists(args.out)
    with open(args.out, "a", newline="") as handle:
        writer = csv.writer(handle)
        if write_header:
            writer.writerow(columns)
        for cfg in configs:
            cpu_start = time.process_time()
            result = train_transformer(cfg, progress=False)
            m = result.metrics
            row = [getattr(cfg, f) for f in fields] + [
                m["t_mem"], m["t_val_95"], m["t_val_100"], m["steps"], round(m["val_acc"], 4),
                round(m["wall_time_s"], 1), round(time.process_time() - cpu_start, 1), args.threads,
                trajectory(result.log)]
            writer.writerow(row)
            handle.flush()
            print(dict(zip(columns, row)), flush=True)


if __name__ == "__main__":
    main()
