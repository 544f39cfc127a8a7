"""Benchmark: the reference workload (README "Benchmarks"), and how the cost scales.

A one-layer Transformer (d_model 32, 4 heads, MLP 64) trained full-batch with AdamW on
addition mod 23 (200 training pairs, 50 steps); explain 10 test inputs × all 25 outputs,
keeping the full train × test × component × output kernel summed over steps.

    python benchmarks/reference_workload.py            # the reference numbers + scaling
    python benchmarks/reference_workload.py --quick    # the reference numbers only
    python benchmarks/reference_workload.py --quick --device cuda
    python benchmarks/reference_workload.py --quick --phases   # and where a call's time goes
    python benchmarks/reference_workload.py --quick --train-chunk 50   # in 4 train chunks of 50 samples

Prints wall time (best of `--repeat`), peak resident memory (and peak device memory on a GPU)
and max |residual|, split into what the recorded updates' difference from the modelled optimizer
and what the path integral leave; then time against steps, training samples, test inputs and parameters, and
the residual against the number of quadrature nodes for Gauss–Legendre and the midpoint rule.
With --phases, also the seconds of each phase of the default setting's calls (explaind.phases).
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import explaind as ex
from explaind.data import modular_addition
from explaind.functional import compute_device
from explaind.models import TRANSFORMER_COMPONENTS, ModAddTransformer
from explaind.phases import EXPLAIN, timed

P = 23
LR = 3e-3  # log-probabilities move by up to ~8, as in the reference run


def record_run(path: Path, *, steps=50, n_train=200, d_model=32, d_mlp=64, seed=0, p=P, n_val=20):
    """Train full-batch AdamW on addition mod p and record it; returns the trained model and the
    data (n_val held-out pairs beside the training ones)."""
    torch.manual_seed(seed)
    data = modular_addition(p, n_train, n_val, seed=seed, only_a_ge_b=False)
    model = ModAddTransformer(p, d_model=d_model, n_heads=4, d_mlp=d_mlp)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.98), weight_decay=1.0)
    indices = torch.arange(n_train)
    with ex.Recorder(path, model, opt) as rec:
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(model(data.train_inputs), data.train_targets).backward()
            rec.batch(indices, data.train_inputs, data.train_targets)
            opt.step()
    return model, data


def timed_explain(path, model, test_inputs, repeat=3, **kwargs):
    """(first call's seconds, best of `repeat` later calls, the cube)."""
    times = []
    for _ in range(repeat + 1):
        start = time.perf_counter()
        cube = ex.explain(path, model, test_inputs, progress=False, **kwargs)
        times.append(time.perf_counter() - start)
    return times[0], min(times[1:]), cube


def request(root: Path, n_test=10, dtype=torch.float32, quadrature=2, breakpoints=True, kink_tolerance=0.0,
            device="cpu", train_chunk=None, **run) -> tuple:
    """explain()'s arguments for the workload (path, model, test inputs, keywords), recording
    the run under root first if it is not there yet."""
    path = root / ("run_" + "_".join(f"{k}{v}" for k, v in sorted(run.items())))
    if not path.exists():
        record_run(path, **run)
    # the architecture only: explain() takes every parameter value from the history
    model = ModAddTransformer(P, d_model=run.get("d_model", 32), n_heads=4, d_mlp=run.get("d_mlp", 64))
    test = modular_addition(P, 200, 10 * n_test, seed=1, only_a_ge_b=False).val_inputs[:n_test]
    return path, model, test, dict(
        keep=("component", "train", "test", "output"), components=TRANSFORMER_COMPONENTS, dtype=dtype,
        quadrature=quadrature, breakpoints=breakpoints, kink_tolerance=kink_tolerance, tolerance=None, device=device,
        train_chunk=train_chunk)


def workload(root: Path, repeat: int, **settings):
    path, model, test, kwargs = request(root, **settings)
    return timed_explain(path, model, test, repeat=repeat, **kwargs)


def print_phases(root: Path, device: str, repeat: int) -> None:
    """Where a call of the default setting spends its time: the seconds of each of explain's
    phases (explaind.phases), from the fastest of `repeat` calls after a first one."""
    path, model, test, kwargs = request(root, device=device)
    ex.explain(path, model, test, progress=False, **kwargs)
    calls = []
    for _ in range(repeat):
        with timed() as seconds:
            ex.explain(path, model, test, progress=False, **kwargs)
        calls.append(seconds)
    fastest = min(calls, key=lambda seconds: sum(seconds.values()))
    wall = sum(fastest.values())
    print(f"\nwhere the time goes (exact setting, the fastest of {repeat} calls: {wall:.3f} s; each phase "
          "without the phases inside it)")
    for name, took in sorted(fastest.items(), key=lambda item: -item[1]):
        label = "the rest (momentum buffer, coefficients, checks)" if name == EXPLAIN else name.removeprefix("explaind.")
        print(f"  {label:48s} {took:7.3f} s  {took / wall:6.1%}")


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not at least 1")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only the reference numbers")
    parser.add_argument("--repeat", type=positive, default=3, help="timed calls after the first (at least 1)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cpu", help="compute device of explain(): cpu, cuda, cuda:1 ...")
    parser.add_argument("--train-chunk", type=positive, default=None,
                        help="training samples per pass (default: all 200 in one); the reference numbers only")
    parser.add_argument("--phases", action="store_true",
                        help="also time the phases of the default setting's calls (explaind.phases)")
    args = parser.parse_args()
    try:  # before any torch.cuda call: a device torch cannot use is refused with the library's fix
        compute_device(args.device)
    except ex.InputError as error:
        parser.error(str(error))
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        on = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else \
            f"{torch.get_num_threads()} CPU threads"
        chunks = "" if args.train_chunk is None else f", train chunks of {args.train_chunk} samples"
        print(f"reference workload: {on}, float32, Gauss-Legendre Q=2{chunks}")
        settings = (("exact (every kink located)", True, 0.0),
                    ("kinks located where a step misses by > 1e-6 (kink_tolerance)", True, 1e-6),
                    ("plain quadrature", False, 0.0))
        for label, kinks, kink_tolerance in settings:
            rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            if args.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats(args.device)
            cold, warm, cube = workload(root, args.repeat, breakpoints=kinks, kink_tolerance=kink_tolerance,
                                        device=args.device, train_chunk=args.train_chunk)
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            print(f"\n  {label}")
            print(f"    cube dims           {dict(cube['attribution'].sizes)}")
            print(f"    wall time           {warm:.3f} s (best of {args.repeat}; first call {cold:.3f} s)")
            print(f"    peak RSS            {rss / 1024:.0f} MiB (before: {rss_before / 1024:.0f} MiB)")
            if args.device.startswith("cuda"):
                print(f"    peak device memory  {torch.cuda.max_memory_allocated(args.device) / 2**20:.0f} MiB")
            print(f"    max |residual|      {cube.attrs['max_abs_residual']:.2e} "
                  f"(largest output change {cube.attrs['max_abs_change']:.2f})")
            print(f"      from the updates  {cube.attrs['max_abs_residual_from_updates']:.2e} "
                  "(recorded float32 updates vs the modelled optimizer)")
            print(f"      path integral     {cube.attrs['max_abs_path_residual']:.2e}")
            print(f"    max update residual {cube.attrs['max_update_residual']:.2e}")
            print(f"    kinks located       {cube.attrs['kinks_located']} "
                  f"({cube.attrs['kink_segments_searched']} of the step x input segments searched)")
        if args.phases:
            print_phases(root, args.device, args.repeat)
        if args.quick:
            return
        print("\nscaling (seconds, best of repeats; each should grow linearly)")
        for name, values in [("steps", (25, 50, 100)), ("n_train", (100, 200, 400)),
                             ("n_test", (5, 10, 20)), ("d_model", (16, 32, 64))]:
            row = []
            for v in values:
                kwargs = {"n_test": v} if name == "n_test" else {name: v}
                _, warm, _ = workload(root, args.repeat, device=args.device, **kwargs)
                row.append(f"{name}={v}: {warm:.3f}")
            print("  " + "   ".join(row))
        print("\nmax |residual| vs quadrature nodes (float64, all 25 outputs of the 10 inputs)")
        path = root / "quadrature"
        model, _ = record_run(path)
        test = modular_addition(P, 200, 100, seed=1, only_a_ge_b=False).val_inputs[:10]
        for rule, kinks, qs in (("gauss", True, (1, 2, 3, 4)), ("gauss", False, (1, 2, 4, 10, 100)),
                                ("midpoint", False, (10, 100))):
            row = []
            for q in qs:
                rec = ex.reconstruct(path, model, test, quadrature=q, rule=rule, breakpoints=kinks, progress=False,
                                     device=args.device)
                row.append(f"Q={q}: {rec.attrs['max_abs_residual']:.1e}")
            print(f"  {rule:8s} {'kinks located' if kinks else 'plain':13s} " + "  ".join(row))


if __name__ == "__main__":
    main()
