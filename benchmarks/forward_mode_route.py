"""Benchmark: which way a backward walk should take its effects through each step's batch.

A backward walk needs effect · w_k ∇ℓ_k for its T effects (each kept component's part of each
carried row) and the B samples of every step: by forward mode (a jvp of the batch's losses along
each effect) or by contracting the per-sample gradients [B, D] it materialises.
`explaind.functional.forward_mode_pays` estimates both; this script times whole explain calls
that walk backwards each way, explaining the true class of n test inputs, on models of the sizes
the pipeline and the reference workload use, and prints what the estimate takes.

    python benchmarks/forward_mode_route.py              # float32, 2 threads
    python benchmarks/forward_mode_route.py --repeat 5
    python benchmarks/forward_mode_route.py --device cuda   # the estimate's constants are CPU-fitted

Prints, per model and T: the median seconds a call took by each way, the way the estimate takes
and whether it is the faster one, and the two cubes' largest difference (rounding: both are exact).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

import explaind as ex
import explaind.engine
from explaind.functional import FlatModel, compute_device, forward_mode_pays
from explaind.history import layout_of
from explaind.models import TRANSFORMER_COMPONENTS, ModAddTransformer, ResNet9
from reference_workload import positive, record_run


def transformer_run(path: Path, p: int, d_model: int, d_mlp: int, n_train: int, steps: int):
    """Full-batch AdamW on addition mod p, recorded as the reference workload records its run;
    (a fresh model of the architecture, the held-out inputs and their classes, the batch)."""
    _, data = record_run(path, steps=steps, n_train=n_train, d_model=d_model, d_mlp=d_mlp, p=p, n_val=64)
    make = lambda: ModAddTransformer(p, d_model=d_model, n_heads=4, d_mlp=d_mlp)  # noqa: E731
    return make, data.val_inputs, data.val_targets, data.train_inputs


def resnet_run(path: Path, width: int, n_train: int, batch: int, steps: int):
    """Momentum SGD on random 8x8 one-channel images of two classes in mini-batches, recorded."""
    torch.manual_seed(0)
    x, y = torch.randn(n_train + 64, 1, 8, 8), torch.randint(0, 2, (n_train + 64,))
    make = lambda: ResNet9(1, 2, width)  # noqa: E731
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-3)
    with ex.Recorder(path, model, opt) as rec:
        for step in range(steps):
            index = torch.randperm(n_train)[:batch]
            opt.zero_grad()
            F.cross_entropy(model(x[index]), y[index]).backward()
            rec.batch(index, x[index], y[index])
            opt.step()
    return make, x[n_train:], y[n_train:], x[:batch]


MODELS = {  # name: (recorder, its arguments, components kept (None: none), test input counts)
    "reference Transformer (B 200)": (transformer_run, dict(p=23, d_model=32, d_mlp=64, n_train=200, steps=20),
                                      TRANSFORMER_COMPONENTS, (1, 2, 10)),
    "pipeline Transformer (B 568)": (transformer_run, dict(p=43, d_model=64, d_mlp=128, n_train=568, steps=8),
                                     None, (8, 16, 32, 48, 64)),
    "digits ResNet-9, width 16 (B 32)": (resnet_run, dict(width=16, n_train=256, batch=32, steps=16),
                                         None, (2, 4, 6, 8, 16)),
}


def timed(call, repeat: int) -> tuple[float, object]:
    """(median seconds of `repeat` calls after a first, the last result)."""
    result = call()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=positive, default=3, help="timed calls of each way (median; at least 1)")
    parser.add_argument("--threads", type=positive, default=2, help="torch threads (at least 1)")
    parser.add_argument("--device", default="cpu", help="compute device of explain(): cpu, cuda, cuda:1 ...")
    args = parser.parse_args()
    try:  # a device torch cannot use is refused with the library's fix, before any run is recorded
        compute_device(args.device)
    except ex.InputError as error:
        parser.error(str(error))
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp())
    print(f"{args.device}, {args.threads} threads, float32, the true class of n inputs, every walk backwards; "
          f"median of {args.repeat}")
    for name, (record, sizes, components, counts) in MODELS.items():
        path = root / name.split()[0]
        make, test_x, test_y, train_x = record(path, **sizes)
        model = make()
        flat = FlatModel(model, layout_of(model), torch.float32, "cpu")
        activations = flat.activation_sizes(train_x)
        batch = len(train_x)
        n_comp = len(components) if components else 1
        print(f"\n{name}: D {flat.layout.dim:,}, {activations.total:,} activations and "
              f"{activations.multiply_adds:,} multiply-adds a sample, {n_comp} component(s) kept")
        print(f"  {'n':>3} {'T':>5} {'forward mode':>13} {'materialised':>13}  estimate    cube diff")
        for n in counts:
            tangents = n * n_comp
            keep = ("component", "train", "test") if components else ("train", "test")
            keywords = dict(keep=keep, outputs="true", targets=test_y[:n], dtype=torch.float32, quadrature=2,
                            breakpoints=False, tolerance=None, device=args.device,
                            **({"components": components} if components else {}))
            seconds, cubes = {}, {}
            for way, pays in (("forward mode", True), ("materialised", False)):
                with mock.patch.object(explaind.engine, "forward_mode_pays", lambda *a, pays=pays: pays), \
                        mock.patch.object(explaind.engine, "BACKWARD_MEMORY_RATIO", 0):
                    seconds[way], cubes[way] = timed(
                        lambda: ex.explain(path, make(), test_x[:n], progress=False, **keywords), args.repeat)
            chosen = "forward mode" if forward_mode_pays(activations, flat.layout.dim, tangents, batch) else "materialised"
            right = "faster" if seconds[chosen] <= min(seconds.values()) else "slower"
            diff = float(abs(cubes["forward mode"]["attribution"] - cubes["materialised"]["attribution"]).max())
            print(f"  {n:3d} {tangents:5d} {seconds['forward mode']:12.2f}s {seconds['materialised']:12.2f}s  "
                  f"{chosen.split()[0]:>8} ({right})  {diff:.1e}")


if __name__ == "__main__":
    main()
