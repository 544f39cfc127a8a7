"""Command line on the recorded runs of the pipeline (runs/cnn, runs/transformer):
`python -m explaind plan <run folder> ...` prints what an explain() request will cost before
anything heavy runs, and `python -m explaind explain <run folder> --out <store> ...` computes
the cube and saves it (open it with explaind.open_cube).

    python -m explaind plan runs/transformer --tests 2000 --keep step component test \\
        --outputs true --step-bins 100 --device cuda --calibrate 6
    python -m explaind explain runs/transformer --tests 8 --keep train test --outputs true \\
        --out results/transformer_kernel.zarr
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

from . import __version__
from .engine import CONVENTIONS, CUBE_KEPT, DIMS
from .errors import ExplaindError, InputError, ReconstructionError
from .functional import TARGETS
from .history import _is_history
from .planning import rounded_up
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


def _gib(text: str) -> float:
    """--memory-budget: GiB above 0 and finite (NaN passes every comparison; no chunk fills infinity)."""
    value = _at_least(0, float)(text)
    if not math.isfinite(value * 2**30):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number of GiB")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m explaind", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"explaind {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    p = _request_arguments(commands.add_parser("plan", help="memory, disk and time of an explain() request on a "
                                                             "recorded run"))
    p.add_argument("--calibrate", type=_at_least(0), default=0, metavar="STEPS",
                   help="time this many steps, spread over the run, and extrapolate (0: no time estimate; 6 is a "
                        "good choice, 1 times a first step alone and overestimates)")
    e = _request_arguments(commands.add_parser("explain", help="compute the cube of an explain() request on a "
                                                               "recorded run and save it"))
    e.add_argument("--out", type=Path, required=True, help="the zarr store the cube is saved to")
    e.add_argument("--overwrite", action="store_true", help="replace a store saved there before")
    e.add_argument("--tolerance", type=_at_least(0, float), default=1e-4,
                   help="the largest accepted output residual, relative to the largest change")
    e.add_argument("--quiet", action="store_true", help="no plan summary and no progress bars")
    return parser


def _request_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of an explain() request, which both commands take."""
    p.add_argument("run", type=Path, help="a run folder of the pipeline: config.json, model.safetensors, history/")
    p.add_argument("--data", type=Path, default=Path("data"), help="the data folder (the CNN's images)")
    p.add_argument("--tests", type=_at_least(0), default=0, help="held-out inputs explained (0: all)")
    p.add_argument("--keep", nargs="*", default=list(DIMS), choices=DIMS,
                   help="dims kept in the cube (default: all); --keep alone keeps none: every dim is summed into "
                        "one number (with --parameter-scores, the pruning importance)")
    p.add_argument("--outputs", default="all", help="all, true, predicted, or comma-separated output indices")
    p.add_argument("--target", default=None, choices=TARGETS,
                   help="what is explained (default: the log-probabilities, or under MSE the output itself)")
    p.add_argument("--quadrature", type=_at_least(1), default=4, help="nodes per smooth piece of each step")
    p.add_argument("--rule", default="gauss", choices=("gauss", "midpoint"))
    p.add_argument("--no-breakpoints", dest="breakpoints", action="store_false", help="do not locate kinks")
    p.add_argument("--max-kinks", type=_at_least(1), default=16,
                   help="kinks per input and step the search resolves (beyond: plain quadrature)")
    p.add_argument("--kink-tolerance", type=float, default=0.0,
                   help="0 searches every step's kinks; above 0 only where the plain integral misses by more")
    p.add_argument("--convention", default="update", choices=CONVENTIONS)
    p.add_argument("--step-bins", type=_at_least(1), default=None, help="equal bins of steps (default: every step)")
    p.add_argument("--parameter-scores", action="store_true")
    p.add_argument("--no-update-check", dest="check_updates", action="store_false",
                   help="trust the recorded updates (checked by verify_updates): no gradients without a train dim")
    p.add_argument("--dtype", default="float64", choices=sorted(DTYPES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--memory-budget", type=_gib, default=4.0, help="GiB on the compute device")
    return p


def _outputs(text: str):
    if text in ("all", "true", "predicted"):
        return text
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise InputError(f"--outputs {text!r}: use all, true, predicted, or indices like 0,3,7") from None


def _request(args: argparse.Namespace) -> tuple[tuple, dict]:
    """The run folder's history, model, inputs and targets, and explain()'s keyword arguments
    from the options; a folder that holds no pipeline run is refused with the fix."""
    config = args.run / "config.json"
    if not args.run.is_dir():
        raise InputError(f"{args.run} is not a folder: pass a run folder written by a training stage "
                         "(runs/cnn, runs/transformer, which `make repro` writes)")
    if not config.is_file() and _is_history(args.run):
        raise InputError(f"{args.run} is a training history, without the config.json from which the command rebuilds "
                         f"the pipeline's models: for your own model, call explaind.{args.command}(history, model, "
                         "inputs, ...) in Python, with explain()'s arguments")
    if not config.is_file():
        raise InputError(f"{config} is missing: pass a run folder written by a training stage (runs/cnn, runs/transformer)")
    run = _load_run(args.run, args.data)
    if args.tests > len(run.test_x):
        raise InputError(f"--tests {args.tests}: {args.run} holds {len(run.test_x)} held-out inputs; pass at most "
                         "that many (0: all of them)")
    n = args.tests or len(run.test_x)
    options = dict(keep=tuple(args.keep), outputs=_outputs(args.outputs), target=args.target,
                   quadrature=args.quadrature, rule=args.rule, breakpoints=args.breakpoints,
                   max_kinks=args.max_kinks, kink_tolerance=args.kink_tolerance,
                   convention=args.convention, components=run.components, step_bins=args.step_bins,
                   parameter_scores=args.parameter_scores, check_updates=args.check_updates,
                   dtype=DTYPES[args.dtype], device=args.device, memory_budget=args.memory_budget * 2**30)
    return (run.history, run.model, run.test_x[:n], run.test_y[:n]), options


def plan_command(args: argparse.Namespace) -> str:
    from .planning import plan

    request, options = _request(args)
    try:
        result = plan(*request, calibrate_steps=args.calibrate, **options)
    except ExplaindError as error:  # a refused request, as explain_command's
        raise _as_options(error, args.memory_budget) from None
    return _in_options(result.report(), args.memory_budget)


def explain_command(args: argparse.Namespace) -> str:
    from .cube import check_cube_path, save_cube
    from .engine import explain, plans_shown_by

    try:  # what save_cube would refuse, refused before the compute
        check_cube_path(args.out, args.overwrite)
    except (InputError, FileExistsError) as error:
        raise InputError(str(_as_options(error, args.memory_budget))) from None
    request, options = _request(args)
    try:  # explain's plan summary on stdout, in this command's words
        with plans_shown_by(lambda summary: print(_in_options(summary, args.memory_budget), flush=True)):
            cube = explain(*request, tolerance=args.tolerance, progress=not args.quiet, **options)
    except ReconstructionError as error:  # kept, as explain() keeps it in the error: hours of compute
        save_cube(error.cube, args.out, overwrite=args.overwrite)
        cause = str(error).split(CUBE_KEPT)[0]
        raise _as_options(ReconstructionError(
            f"{cause} The cube is saved at {args.out} all the same, to be read with its residual "
            "(explaind.open_cube); a rerun replaces it with --overwrite"), args.memory_budget) from None
    except ExplaindError as error:  # a refused request
        raise _as_options(error, args.memory_budget) from None
    path = save_cube(cube, args.out, overwrite=args.overwrite)
    sizes = ", ".join(f"{dim} {size}" for dim, size in cube["attribution"].sizes.items()) or "every dim summed"
    return (f"saved {path} (attribution: {sizes}); relative residual {cube.attrs['relative_residual']:.2e}. "
            "Read it with explaind.open_cube")



def _restore(name: str | None = None) -> str:
    """The fix for a damaged run folder: the stage that writes it, once the config names it."""
    stage = f"train_{name}" if name else "train_cnn / train_transformer"
    return f"restore the run folder from a copy, or rerun its training stage (dvc repro {stage})"


def _load_run(run_dir: Path, data_dir: Path):
    """load_run, with a config.json or model.safetensors that cannot rebuild the run refused in one
    line that names the file (load_run refuses a config.json of other keys itself, and lets json
    and torch raise their own)."""
    from safetensors import SafetensorError

    from .stages import load_run

    config, weights = run_dir / "config.json", run_dir / "model.safetensors"
    name = _run_name(config, _config_values(config))
    try:
        return load_run(name, run_dir, data_dir)
    except FileNotFoundError:
        if weights.exists():  # another file (the CNN's data) names itself
            raise
        raise InputError(f"{weights} is missing: {_restore(name)}") from None
    except SafetensorError as error:
        raise InputError(f"{weights} cannot be read ({error}): {_restore(name)}") from None
    except RuntimeError as error:
        if "Error(s) in loading state_dict" not in str(error):
            raise
        # its first line names the model class; the next ones each tensor that does not fit
        details = str(error).splitlines()
        detail = (details[1] if len(details) > 1 else details[0]).strip().rstrip(".")
        raise InputError(f"{weights} does not fit the model that {config} describes ({detail}); the two come "
                         f"from different runs: {_restore(name)}") from None


def _config_values(config: Path) -> dict:
    """config.json's settings, refused if they are not a JSON object."""
    try:
        values = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{config} is not valid JSON ({error}): {_restore()}") from None
    if not isinstance(values, dict):
        raise InputError(f"{config} holds a JSON {type(values).__name__}, not an object of training settings: {_restore()}")
    return values


def _run_name(config: Path, values: dict) -> str:
    """The pipeline run that config.json describes (load_run checks its keys against the class)."""
    names = {"CNNConfig": "cnn", "TransformerConfig": "transformer"}
    kind = values.get("class")
    if not isinstance(kind, str) or kind not in names:
        raise InputError(f"{config} describes a {kind!r}; the command knows {sorted(names)}: {_restore()}")
    return names[kind]


# explain()'s arguments that the library's messages name, as the options that set them here
_OPTIONS = {"step_bins": "--step-bins", "quadrature": "--quadrature", "device": "--device", "dtype": "--dtype",
            "tolerance": "--tolerance", "max_kinks": "--max-kinks", "kink_tolerance": "--kink-tolerance",
            "convention": "--convention", "outputs": "--outputs", "target": "--target"}


# what the library's messages tell a Python caller to pass, as this command's options say it
_PHRASES = {"choose another path or pass overwrite=True to replace it":
            "pass another --out, or --overwrite to replace the cube saved there",
            "choose another path": "pass another --out",
            "pass tolerance=None": "pass a larger --tolerance",
            "explaind.plan(..., calibrate_steps=6)": "python -m explaind plan ... --calibrate 6",
            "add 'step' to keep, or leave step_bins out": "add step to --keep, or leave --step-bins out",
            "set breakpoints=True": "drop --no-breakpoints",
            "breakpoints=False": "--no-breakpoints",
            "parameter_scores=True": "--parameter-scores",
            "parameter_scores=False": "no --parameter-scores",
            "check_updates=False": "--no-update-check"}


def _as_options(error: Exception, gib: float) -> Exception:
    """A refusal in the words of this command (_in_options)."""
    text = _in_options(str(error), gib)
    return error if text == str(error) else type(error)(text)


def _in_options(text: str, gib: float) -> str:
    """The library's words in those of this command: its options instead of explain()'s and
    save_cube's arguments (device='cpu' -> --device cpu), and budgets in the GiB of --memory-budget."""
    for phrase, option in _PHRASES.items():  # longest first: the dict's order
        text = text.replace(phrase, option)
    text = re.sub(r"\bmemory_budget=(\d+(?:\.\d*)?(?:e[+-]?\d+)?)( bytes)?",
                  lambda m: f"--memory-budget {_in_gib(float(m.group(1)), gib)} GiB", text)
    text = re.sub(r"\bkeep=\(([^)]*)\)",
                  lambda m: "--keep " + (" ".join(re.findall(r"'(\w+)'", m.group(1))) or "with no dims"), text)
    text = re.sub(r"\bmemory_budget\b", "--memory-budget", text)
    text = re.sub(r"\b(test|train|batch)_chunk=", r"\1 chunk ", text)  # no options here: as the plan words them
    text = re.sub(r"\b(" + "|".join(_OPTIONS) + r")='?([^'\s,;:)]+)'?",
                  lambda m: f"{_OPTIONS[m.group(1)]} {m.group(2).removeprefix('torch.')}", text)
    # a name with an underscore is no English word: named alone, it is the argument
    return re.sub(r"\b(" + "|".join(name for name in _OPTIONS if "_" in name) + r")\b",
                  lambda m: _OPTIONS[m.group(1)], text)


def _in_gib(n_bytes: float, gib: float) -> str:
    """A budget of the library's words in the GiB --memory-budget takes: the one given as typed,
    another (the plan's budget of one pass) rounded up, so that it still holds the pass."""
    return f"{gib:g}" if n_bytes == gib * 2**30 else f"{rounded_up(n_bytes / 2**30):.3g}"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        print((plan_command if args.command == "plan" else explain_command)(args))
    except (ExplaindError, FileNotFoundError) as error:  # the message names the fix: no traceback
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # save_cube moves a store into place whole: an interrupted one leaves none
        print(f"interrupted: nothing {'saved' if args.command == 'explain' else 'planned'}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
