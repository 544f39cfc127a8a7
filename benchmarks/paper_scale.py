"""Benchmark: the paper-scale requests of docs/method.md §3 on one device, timed and extrapolated.

    python benchmarks/paper_scale.py --device cuda contraction
    python benchmarks/paper_scale.py --device cuda transformer --steps 100
    python benchmarks/paper_scale.py --device cuda resnet --steps 8

contraction: the achieved FLOP/s of the engine's dominant matmul at the mod-113
Transformer's sizes, split by component as the engine splits it, against a large square matmul
of the same dtype on the same device (the attainable peak).

transformer: trains the paper's mod-113 run (docs/method.md §3) for `--steps` steps with the history
recorded, then explains the true class of all 2,000 validation pairs, keeping component x train
x test (the data view) and, separately, step x component x test (the grokking view). Time per
step is measured after a warm-up call and extrapolated to the paper run's ~1,940 steps (time is
linear in steps: see reference_workload.py).

resnet: ResNet-9 (width 64, 2.3M parameters) trained with the paper's SGD settings on CIFAR-2
shaped data (10,000 training images of 32x32x3, batch 256; random pixels unless the CIFAR-10
archive is in --data) for `--steps` steps, explaining the true class of 500 test images with
component x train x test kept; extrapolated to the paper's 468 steps.

Every figure printed says whether it was measured or extrapolated.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import explaind as ex
from explaind.data import load_image_pair, modular_addition
from explaind.functional import compute_device
from explaind.models import CNN_COMPONENTS, TRANSFORMER_COMPONENTS, ModAddTransformer, ResNet9
from explaind.training import TransformerConfig, train_transformer

PAPER_TRANSFORMER_STEPS = 1940  # docs/method.md §3: stopped at 100% validation accuracy after ~1,940 steps
PAPER_RESNET_STEPS = 468  # 12 epochs of 39 batches
VIEWS = {"data": ("data view: component x train x test", ("component", "train", "test")),
         "grokking": ("grokking view: step x component x test", ("step", "component", "test"))}
CIFAR2 = {"train": 10_000, "test": 2_000, "batch": 256}


def on_gpu(device: str) -> bool:
    return device.startswith("cuda")


def synchronize(device: str) -> None:
    if on_gpu(device):
        torch.cuda.synchronize(device)


def timed(on: str, fn, *args, **kwargs):
    """(seconds, fn(*args, **kwargs)), with the work queued on device `on` finished."""
    synchronize(on)
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    synchronize(on)
    return time.perf_counter() - start, result


def peak_memory(device: str) -> str:
    if not on_gpu(device):
        return "n/a (CPU)"
    return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"


def reset_peak(device: str) -> None:
    if on_gpu(device):
        torch.cuda.reset_peak_memory_stats(device)


# --------------------------------------------------------------------------- contraction


def matmul_rate(device: str, dtype: torch.dtype, m: int, k: int, n: int, splits=None, repeat: int = 5) -> float:
    """FLOP/s of left [m, k] @ right [n, k]ᵀ, summed over the column splits (the components)."""
    left = torch.randn(m, k, device=device, dtype=dtype)
    right = torch.randn(n, k, device=device, dtype=dtype)
    slices = [slice(None)] if splits is None else splits

    def contract():
        return [left[:, sl] @ right[:, sl].T for sl in slices]

    contract()  # warm-up: cuBLAS picks its kernels
    seconds = min(timed(device, contract)[0] for _ in range(repeat))
    return 2.0 * m * k * n / seconds


def component_slices(model: torch.nn.Module, components: dict[str, list[str]]) -> list[slice]:
    sizes = dict((name, p.numel()) for name, p in model.named_parameters())
    out, start = [], 0
    for names in components.values():
        width = sum(sizes[n] for n in names)
        out.append(slice(start, start + width))
        start += width
    return out


def contraction(args) -> None:
    cfg = TransformerConfig.paper()
    model = ModAddTransformer(cfg.p, cfg.d_model, cfg.n_heads, cfg.d_mlp)
    slices = component_slices(model, TRANSFORMER_COMPONENTS)
    d = sum(p.numel() for p in model.parameters())
    rows, n = args.tests or cfg.val_size, cfg.train_size  # true class of each validation pair x each training pair
    gpu = on_gpu(args.device)
    print(f"contraction [{rows} x {d:,}] . [{n} x {d:,}]^T, split into {len(slices)} components "
          f"(mod-113 Transformer, one step of the data view) on "
          f"{torch.cuda.get_device_name(args.device) if gpu else 'the CPU'}")
    cases = [("float64", torch.float64, False), ("float32", torch.float32, False)]
    if gpu:
        cases.append(("float32 with TF32", torch.float32, True))
    for label, dtype, tf32 in cases:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        achieved = matmul_rate(args.device, dtype, rows, d, n, slices)
        square = 8192 if gpu else 2048
        peak = matmul_rate(args.device, dtype, square, square, square)
        print(f"  {label:18s} {achieved / 1e12:8.2f} TFLOP/s  = {achieved / peak:5.1%} of a {square}^3 matmul "
              f"({peak / 1e12:.2f} TFLOP/s); {2.0 * rows * d * n / achieved * 1e3:.1f} ms per step")
    torch.backends.cuda.matmul.allow_tf32 = False


# --------------------------------------------------------------------------- the paper's runs


def report(label: str, seconds: float, steps: int, paper_steps: int, cube, device: str) -> None:
    per_step = seconds / steps
    print(f"  {label}")
    print(f"    cube                {dict(cube['attribution'].sizes)}")
    print(f"    measured            {seconds:.2f} s for {steps} steps = {per_step * 1e3:.1f} ms per step; "
          f"peak device memory {peak_memory(device)}")
    print(f"    extrapolated        {per_step * paper_steps / 60:.1f} min for the paper's {paper_steps} steps")
    print(f"    residual            max {cube.attrs['max_abs_residual']:.2e}, relative "
          f"{cube.attrs['relative_residual']:.2e}; update residual {cube.attrs['max_update_residual']:.2e}")
    print(f"    kinks               {int(cube.attrs['kinks_located'])} located; "
          f"{int(cube.attrs['kink_segments_unresolved'])} segment(s) with more than max_kinks integrated plainly")


def explain_timed(args, history, model, x, y, label, steps, paper_steps, **request) -> None:
    request = dict(outputs="true", convention="update", quadrature=args.quadrature, breakpoints=args.breakpoints,
                   dtype=getattr(torch, args.dtype), device=args.device, memory_budget=args.memory_gib * 2**30,
                   tolerance=None, progress=False, **request)
    print(ex.plan(history, model, x, y, **request))
    ex.explain(history, model, x[:8], y[:8], **{**request, "steps": (0, 2)})  # warm-up: vmap tracing, kernels
    reset_peak(args.device)
    seconds, cube = timed(args.device, ex.explain, history, model, x, y, **request)
    report(label, seconds, steps, paper_steps, cube, args.device)


def transformer(args, root: Path) -> None:
    cfg = dataclasses.replace(TransformerConfig.paper(), max_steps=args.steps)
    seconds, result = timed(args.device, train_transformer, cfg, root / "transformer", device=args.device,
                            progress=False)
    steps = int(result.metrics["steps"])
    per_step = seconds / steps
    print(f"mod-113 Transformer on {args.device}: trained and recorded {steps} steps in {seconds:.1f} s "
          f"({per_step * 1e3:.1f} ms per step; extrapolated {per_step * PAPER_TRANSFORMER_STEPS / 60:.1f} min "
          f"for {PAPER_TRANSFORMER_STEPS}); validation accuracy {result.metrics['val_acc']:.3f}")
    data = modular_addition(cfg.p, cfg.train_size, cfg.val_size, cfg.data_seed, cfg.only_a_ge_b)
    model = ModAddTransformer(cfg.p, cfg.d_model, cfg.n_heads, cfg.d_mlp)
    history = root / "transformer"
    x, y = data.val_inputs[: args.tests or None], data.val_targets[: args.tests or None]
    for view in args.views:
        label, keep = VIEWS[view]
        explain_timed(args, history, model, x, y, label, steps, PAPER_TRANSFORMER_STEPS, keep=keep,
                      components=TRANSFORMER_COMPONENTS)


def cifar2_shaped(data_dir: Path):
    """CIFAR-2 if its archive is in data_dir, else random images of its shape (a stand-in)."""
    try:
        pair = load_image_pair(data_dir, "cifar2", (3, 5), 0.3, 0)
        return pair.train_x, pair.train_y, pair.test_x, pair.test_y, "CIFAR-2"
    except FileNotFoundError:
        g = torch.Generator().manual_seed(0)
        images = torch.randn(CIFAR2["train"] + CIFAR2["test"], 3, 32, 32, generator=g)
        labels = torch.randint(0, 2, (len(images),), generator=g)
        cut = CIFAR2["train"]
        return images[:cut], labels[:cut], images[cut:], labels[cut:], "a random stand-in of CIFAR-2's shape"


def resnet(args, root: Path) -> None:
    train_x, train_y, test_x, test_y, source = cifar2_shaped(args.data)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    model = ResNet9(3, 2, 64).to(args.device, dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-3)
    g = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    with ex.Recorder(root / "resnet", model, optimizer, loss="cross_entropy") as recorder:
        for _ in range(args.steps):
            batch = torch.randperm(len(train_y), generator=g)[: CIFAR2["batch"]]
            x, y = train_x[batch].to(args.device, dtype), train_y[batch].to(args.device)
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            recorder.batch(batch, x, y)
            optimizer.step()
    synchronize(args.device)
    seconds = time.perf_counter() - start
    print(f"ResNet-9 (width 64, {sum(p.numel() for p in model.parameters()):,} parameters) on {source}, "
          f"{args.device}: trained and recorded {args.steps} steps in {seconds:.1f} s")
    n = args.tests or 500
    explain_timed(args, root / "resnet", ResNet9(3, 2, 64), test_x[:n], test_y[:n],
                  "data view: component x train x test", args.steps, PAPER_RESNET_STEPS,
                  keep=("component", "train", "test"), components=CNN_COMPONENTS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workload", choices=("contraction", "transformer", "resnet"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=100, help="training steps recorded and explained")
    parser.add_argument("--tests", type=int, default=0, help="inputs explained (0: 2,000 pairs / 500 images)")
    parser.add_argument("--views", nargs="+", default=list(VIEWS), choices=VIEWS, help="the Transformer's cubes")
    parser.add_argument("--dtype", default="float64", choices=("float64", "float32"))
    parser.add_argument("--quadrature", type=int, default=3)
    parser.add_argument("--no-breakpoints", dest="breakpoints", action="store_false", help="plain quadrature")
    parser.add_argument("--memory-gib", type=float, default=64.0, help="memory budget on the device (GiB)")
    parser.add_argument("--data", type=Path, default=Path("data"), help="where a CIFAR-10 archive may be")
    parser.add_argument("--root", type=Path, default=None, help="where histories go (default: a temporary folder)")
    args = parser.parse_args()
    try:  # before any torch.cuda call: a device torch cannot use is refused with the library's fix
        compute_device(args.device)
    except ex.InputError as error:
        parser.error(str(error))
    if args.workload == "contraction":
        contraction(args)
        return
    with tempfile.TemporaryDirectory(dir=args.root) as tmp:
        {"transformer": transformer, "resnet": resnet}[args.workload](args, Path(tmp))


if __name__ == "__main__":
    main()
