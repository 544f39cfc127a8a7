"""Command line: `python -m explaind plan <run folder> ...` prints what an explain() request on a
recorded run of the pipeline (runs/cnn, runs/transformer) will cost, before anything heavy runs.

    python -m explaind plan runs/transformer --tests 2000 --keep step component test \\
        --outputs true --step-bins 100 --device cuda --calibrate 3
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import __version__
from .engine import CONVENTIONS, DIMS
from .errors import ExplaindError
from .functional import TARGETS
from .history import _is_history
from .training import DTYPES


def _at_least(minimum: int, kind=int):
    """An argparse type that refuses numbers below `minimum` (above it, for a float)."""
    def convert(text: str):
        value = kind(text)
        if value < minimum or (kind is float and value <= minimum):
            bound = f"above {minimum}" if kind is float else f"at least {minimum}"
            raise argparse.ArgumentTypeError(f"{text} is not {bound}")
        return value
    return convert


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m explaind", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"explaind {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("plan", help="memory, disk and time of an explain() request on a recorded run")
    p.add_argument("run", type=Path, help="a run folder of the pipeline: config.json, model.safetensors, history/")
    p.add_argument("--data", type=Path, default=Path("data"), help="the data folder (the CNN's images)")
    p.add_argument("--tests", type=_at_least(0), default=0, help="held-out inputs explained (0: all)")
    p.add_argument("--keep", nargs="*", default=list(DIMS), choices=DIMS, help="dims kept in the cube")
    p.add_argument("--outputs", default="all", help="all, true, predicted, or comma-separated output indices")
    p.add_argument("--target", default="log_prob", choices=TARGETS)
    p.add_argument("--quadrature", type=int, default=4, help="nodes per smooth piece of each step")
    p.add_argument("--rule", default="gauss", choices=("gauss", "midpoint"))
    p.add_argument("--no-breakpoints", dest="breakpoints", action="store_false", help="do not locate kinks")
    p.add_argument("--convention", default="update", choices=CONVENTIONS)
    p.add_argument("--step-bins", type=int, default=None, help="equal bins of steps (default: every step)")
    p.add_argument("--parameter-scores", action="store_true")
    p.add_argument("--no-update-check", dest="check_updates", action="store_false",
                   help="trust the recorded updates (checked by verify_updates): no gradients without a train dim")
    p.add_argument("--dtype", default="float64", choices=sorted(DTYPES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--memory-budget", type=_at_least(0, float), default=4.0, help="GiB on the compute device")
    p.add_argument("--calibrate", type=_at_least(0), default=0, metavar="STEPS",
                   help="time this many steps of the first pass and extrapolate (0: no time estimate)")
    return parser


def _outputs(text: str):
    if text in ("all", "true", "predicted"):
        return text
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise SystemExit(f"--outputs {text!r}: use all, true, predicted, or indices like 0,3,7") from None


def plan_command(args: argparse.Namespace) -> str:
    from .planning import plan
    from .stages import load_run

    config = args.run / "config.json"
    if not args.run.is_dir():
        raise SystemExit(f"{args.run} is not a folder: pass a run folder written by a training stage "
                         "(runs/cnn, runs/transformer, which `make repro` writes)")
    if not config.is_file() and _is_history(args.run):
        raise SystemExit(f"{args.run} is a training history, without the config.json from which the command rebuilds "
                         "the pipeline's models: for your own model, call explaind.plan(history, model, inputs, ...) "
                         "in Python, with explain()'s arguments")
    if not config.is_file():
        raise SystemExit(f"{config} is missing: pass a run folder written by a training stage (runs/cnn, runs/transformer)")
    kind = json.loads(config.read_text()).get("class")
    names = {"CNNConfig": "cnn", "TransformerConfig": "transformer"}
    if kind not in names:
        raise SystemExit(f"{config} describes a {kind!r}; the command knows {sorted(names)}")
    run = load_run(names[kind], args.run, args.data)
    n = len(run.test_x) if args.tests <= 0 else min(args.tests, len(run.test_x))
    result = plan(
        run.history, run.model, run.test_x[:n], run.test_y[:n], keep=tuple(args.keep), outputs=_outputs(args.outputs),
        target=args.target, quadrature=args.quadrature, rule=args.rule, breakpoints=args.breakpoints,
        convention=args.convention, components=run.components, step_bins=args.step_bins,
        parameter_scores=args.parameter_scores, check_updates=args.check_updates,
        dtype=DTYPES[args.dtype], device=args.device,
        memory_budget=args.memory_budget * 2**30, calibrate_steps=args.calibrate,
    )
    return str(result)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        print(plan_command(args))
    except (ExplaindError, FileNotFoundError) as error:  # the message names the fix: no traceback
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
