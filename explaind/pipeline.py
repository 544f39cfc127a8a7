"""Plumbing of the reproducible paper pipeline (dvc.yaml -> papermill -> notebooks).

Every stage of dvc.yaml runs one notebook through the same small runner:

    python -m explaind.pipeline run train_transformer

The runner reads the `base` section and the stage's own section of params.yaml, checks them
against the stage's schema (the fields of its config dataclass plus the base keys), and hands
them to papermill as notebook parameters, so dvc.yaml never repeats the parameter list. The
notebook checks them again in its first cell after papermill's injected one (a notebook can also
be run by hand, with `papermill -p`), so an unknown or mistyped parameter is always an error
naming the parameter, the expected type and the fix, never a silently ignored value.

Other commands (see `python -m explaind.pipeline --help`):

    data      rebuild data/ (dvc pull with a remote, else the deterministic export) and check it
              byte for byte against the hashes recorded in data.dvc
    params    print a stage's checked parameters
    check     check every stage's parameters (and that this machine has their device) at once
    set-args  print `-S key=value` arguments that make `dvc exp run` use another profile

Paths are resolved from the repository root (`repo_root()`), never from the notebook's folder.
The notebooks' logic lives here too (saving a run, the figures), so a notebook stays a short
sequence of calls with prose between them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import hashlib
import importlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, Union

from . import __version__
from .errors import ExplaindError, InputError

# Environment variable that pins the repository root (the runner sets it for the kernel).
ROOT_ENV = "EXPLAIND_ROOT"
# Name of the Jupyter kernel that `make setup` registers inside the virtual environment.
KERNEL_NAME = "explaind"
PARAMS_FILE = "params.yaml"
DATA_DIR = "data"
DATA_DVC_FILE = "data.dvc"


class ParameterError(ExplaindError, ValueError):
    """Pipeline parameters that are unknown, missing or of the wrong type."""


class DataError(ExplaindError):
    """data/ does not match the hashes recorded in data.dvc."""


# --- stages -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Stage:
    """One notebook stage of dvc.yaml.

    `config` names the dataclass ("module:Class") whose fields are the keys of the stage's
    params.yaml section; `extra` declares any further notebook parameters with their types.
    Outputs follow one layout: results/<stage>/ for the executed notebook, reports/<stage>/ for
    the small git-tracked metrics and curves, runs/<run>/ for the trained model and its history.
    """

    name: str
    notebook: str
    config: str | None = None
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    run: str | None = None  # folder name under runs/ for stages that train a model
    reads: str | None = None  # folder name under runs/ that an analysis stage of one model reads
    # Stages run once per trained model (`foreach` in dvc.yaml): instance `<name>@<model>` reads
    # params.yaml section `<name>.<model>`, gets the notebook parameter `model`, reads runs/<model>/
    # and writes results/<name>/<model>/ and reports/<name>/<model>/.
    models: tuple[str, ...] = ()


MODELS = ("cnn", "transformer")
DATA_RUNS = ("cnn",)  # runs trained on data/ (the Transformer's pairs are generated from its params)

STAGES: dict[str, Stage] = {
    "train_cnn": Stage(
        "train_cnn", "notebooks/01_train_cnn.ipynb", "explaind.training:CNNConfig", run="cnn"
    ),
    "train_transformer": Stage(
        "train_transformer",
        "notebooks/02_train_transformer.ipynb",
        "explaind.training:TransformerConfig",
        run="transformer",
    ),
    "verify": Stage("verify", "notebooks/03_verify.ipynb", "explaind.stages:VerifyConfig", models=MODELS),
    "cubes": Stage("cubes", "notebooks/04_cubes.ipynb", "explaind.stages:CubesConfig", models=MODELS),
    "influence": Stage("influence", "notebooks/05_influence.ipynb", "explaind.validation:InfluenceConfig",
                       models=MODELS),
    "grokking": Stage("grokking", "notebooks/06_grokking.ipynb", "explaind.grokking:GrokkingConfig",
                      reads="transformer"),
}

# Keys of the shared `base` section; every stage receives them as notebook parameters.
# A stage section may override one of them (e.g. its own dtype).
BASE_SCHEMA: dict[str, Any] = {
    "seed": int,  # seed of initialisation, batch order and augmentation
    "device": str,  # "cpu", "cuda", "cuda:1", "mps" ...
    "dtype": Literal["float32", "float64"],  # float64: exact to rounding; float32: faster
    "threads": int,  # torch CPU threads; 0 keeps torch's default (one per core)
}


def split_stage(name: str) -> tuple[str, str | None]:
    """'verify@cnn' -> ('verify', 'cnn'); 'train_cnn' -> ('train_cnn', None)."""
    stage, _, item = name.partition("@")
    return stage, item or None


def reads_data(stage: str) -> bool:
    """Whether a stage instance trains or analyses a run of data/'s images."""
    info, item = get_stage(stage), split_stage(stage)[1]
    return (info.run or item or info.reads) in DATA_RUNS


def stage_instances() -> list[str]:
    """Every runnable stage as dvc names it: train_cnn, ..., verify@cnn, verify@transformer, ..."""
    return [f"{name}@{item}" if item else name
            for name, info in STAGES.items() for item in (info.models or (None,))]


def get_stage(name: str) -> Stage:
    """The registered stage of a name (an instance `verify@cnn` or the stage `verify`)."""
    stage, item = split_stage(name)
    if stage not in STAGES:
        raise ParameterError(
            f"unknown stage {name!r}; the stages are {stage_instances()} "
            "(register a new one in explaind.pipeline.STAGES)"
        )
    info = STAGES[stage]
    if item is not None and item not in info.models:
        raise ParameterError(f"stage {stage!r} runs for {list(info.models)}, not {item!r}: use "
                             + ", ".join(f"{stage}@{m}" for m in info.models))
    return info


def _import(spec: str) -> Any:
    module, _, attribute = spec.partition(":")
    return getattr(importlib.import_module(module), attribute)


def config_class(stage: str) -> type | None:
    spec = get_stage(stage).config
    return None if spec is None else _import(spec)


def stage_schema(stage: str) -> dict[str, Any]:
    """Parameter name -> expected type for a stage: its config's fields, its extras, the base keys."""
    info = get_stage(stage)
    schema: dict[str, Any] = {}
    cls = config_class(stage)
    if cls is not None:
        hints = typing.get_type_hints(cls)
        schema.update({field.name: hints[field.name] for field in dataclasses.fields(cls)})
    schema.update(info.extra)
    schema.update(BASE_SCHEMA)  # the base keys are checked by the stricter base types
    return schema


def check_base(params: Mapping[str, Any]) -> None:
    """Refuse base values out of range (their types are checked by check_params): a seed below 0,
    which numpy refuses only deep in a stage; threads below 0, which torch would silently take
    for its default."""
    seed = params.get("seed", 0)
    if seed < 0:
        raise InputError(f"seed (section 'base' or the stage's) is {seed!r}, but numpy's and torch's generators "
                         "take seeds of at least 0. Fix: set seed in the params file to such a value")
    threads = params.get("threads", 0)
    if threads < 0:
        raise InputError(f"threads (section 'base' or the stage's) is {threads!r}, but it must be at least 0 "
                         "(0: torch's default, one per core). Fix: set threads in the params file to such a value")


def apply_base(params: Mapping[str, Any]) -> None:
    """Apply the base settings that act on the process rather than on a config: CPU threads.

    Small models gain little from several threads, and on a busy machine an oversubscribed
    thread pool can make each step ten times slower; one thread is the robust CPU default.
    """
    check_base(params)
    if params.get("threads", 0) > 0:
        import torch

        torch.set_num_threads(params["threads"])


def _protected_components(config) -> str | None:
    """The range influence.<model>.protected is out of, if it is: components of the stage's model
    (a library call may protect any component of its own model; a stage fails at its start)."""
    from .models import CNN_COMPONENTS, TRANSFORMER_COMPONENTS

    components = {"cnn": CNN_COMPONENTS, "transformer": TRANSFORMER_COMPONENTS}[config.model]
    return None if set(config.protected) <= set(components) else \
        f"a list of the {config.model}'s components: {', '.join(components)}"


# Values a config takes for the library's own use that no pipeline stage can use:
# stage -> (key, the range its value is out of given the config, or None).
PIPELINE_RANGES: dict[str, tuple[tuple[str, Callable[[Any], str | None]], ...]] = {
    # train_transformer(max_steps=0) is an untrained model (the grokking study restarts from one);
    # as a stage it would leave a history of no step, which every analysis stage refuses
    "train_transformer": (("max_steps", lambda config: None if config.max_steps >= 1 else
                           "at least 1 in the pipeline: the analysis stages explain the recorded steps"),),
    "influence": (("protected", _protected_components),),
}


def make_config(stage: str, params: Mapping[str, Any]) -> Any:
    """The stage's config dataclass built from checked parameters (keys it lacks are ignored)."""
    cls = config_class(stage)
    if cls is None:
        raise ParameterError(f"stage {stage!r} has no config dataclass; use its parameters directly")
    names = {field.name for field in dataclasses.fields(cls)}
    config = cls(**{key: value for key, value in params.items() if key in names})  # checks the ranges
    from .training import check_ranges  # torch: imported with the config class, not by the CLI

    name, item = split_stage(stage)
    broken = [(key, out_of(config)) for key, out_of in PIPELINE_RANGES.get(name, ())]
    check_ranges(f"{name}.{item}" if item else name, config, [(key, rule is None, rule) for key, rule in broken])
    check_base(params)  # and those of the base keys
    if "device" in params:  # before the stage deletes its old outputs, as the config's ranges
        check_device(params["device"])
    return config


def check_device(device: str, here: bool = True) -> None:
    """Refuse a device torch does not know; with `here`, also one this machine lacks (a profile
    for a GPU machine is still checked on a laptop without `here`)."""
    import torch

    from .functional import missing_device

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise InputError(f"device (section 'base' or the stage's) is {device!r}, which torch does not know "
                         f"({error}). Fix: set it to cpu, cuda, cuda:N or mps") from None
    missing = missing_device(dev) if here else None
    if missing:
        reason, count = missing
        raise InputError(f"device (section 'base' or the stage's) is {device!r}: {reason}. Fix: set device: cpu"
                         + (f", or one of cuda:0 to cuda:{count - 1}" if count else "")
                         + " (params_paper.yaml is for a machine with a GPU)")


@dataclasses.dataclass(frozen=True)
class StagePaths:
    """Where a stage reads and writes, all absolute (resolved from the repository root)."""

    root: Path
    data: Path
    results: Path  # results/<stage>/: the executed notebook (DVC-cached)
    notebook: Path
    reports: Path  # reports/<stage>/: metrics.json and curves.csv (small, tracked by git)
    metrics: Path
    curves: Path
    run: Path | None  # runs/<run>/: the trained model and its recorded history (DVC-cached)
    history: Path | None
    model: Path | None
    config: Path | None  # runs/<run>/config.json: the training config (rebuilds the architecture)
    model_name: str | None = None  # the model a per-model stage analyses ("cnn", "transformer")
    store: Path | None = None  # results/<stage>/<model>/cubes/: the cubes of a per-model stage


def stage_paths(stage: str, root: str | os.PathLike | None = None) -> StagePaths:
    """Where a stage (or a per-model instance, `verify@cnn`) reads and writes."""
    info = get_stage(stage)
    name, item = split_stage(stage)
    if info.models and item is None:
        raise ParameterError(f"stage {name!r} runs per model: name one of "
                             + ", ".join(f"{name}@{m}" for m in info.models))
    root = Path(root).resolve() if root is not None else repo_root()
    folder = Path(name, item) if item else Path(name)
    results, reports = root / "results" / folder, root / "reports" / folder
    run_name = info.run or info.reads or item
    run = root / "runs" / run_name if run_name else None
    return StagePaths(
        root=root,
        data=root / DATA_DIR,
        results=results,
        notebook=results / "notebook.ipynb",
        reports=reports,
        metrics=reports / "metrics.json",
        curves=reports / "curves.csv",
        run=run,
        history=run / "history" if run else None,
        model=run / "model.safetensors" if run else None,
        config=run / "config.json" if run else None,
        model_name=item,
        store=results / "cubes" if item else None,
    )


# --- the repository root ------------------------------------------------------------------


def repo_root(start: str | os.PathLike | None = None) -> Path:
    """The repository root: $EXPLAIND_ROOT if set, else the nearest folder, from `start` (default:
    the working directory) upwards, that holds both dvc.yaml and params.yaml.

    Not derived from this file's location: an installed (or editable) package may live elsewhere
    than the repository it runs in, e.g. a temporary copy of it.
    """
    pinned = os.environ.get(ROOT_ENV)
    if pinned:
        root = Path(pinned).resolve()
        if not root.is_dir():
            raise FileNotFoundError(f"${ROOT_ENV}={pinned} is not a folder; unset it or fix the path")
        return root
    here = Path(start if start is not None else Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").is_file() and (folder / PARAMS_FILE).is_file():
            return folder
    raise FileNotFoundError(
        f"no folder above {here} holds dvc.yaml and {PARAMS_FILE}; run from inside the explaind "
        f"repository or set ${ROOT_ENV} to its path"
    )


@contextlib.contextmanager
def _pinned_root(root: Path):
    """Set $EXPLAIND_ROOT for the duration (the kernel papermill starts inherits it)."""
    previous = os.environ.get(ROOT_ENV)
    os.environ[ROOT_ENV] = str(root)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(ROOT_ENV, None)
        else:
            os.environ[ROOT_ENV] = previous


# --- parameter checking -------------------------------------------------------------------


def type_name(expected: Any) -> str:
    """A readable name of a type annotation: int, float, str or None, one of 'a' / 'b', ..."""
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if origin is Literal:
        return "one of " + " / ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join("None" if a is type(None) else type_name(a) for a in args)
    if origin in (tuple, list):
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {type_name(args[0])}"
        if origin is tuple and args:
            return f"a list of {len(args)} values ({', '.join(type_name(a) for a in args)})"
        return f"a list of {type_name(args[0])}" if args else "a list"
    return getattr(expected, "__name__", str(expected))


def _coerce(value: Any, expected: Any) -> tuple[bool, Any]:
    """(ok, value converted to the expected type) for a parameter value read from YAML or a notebook.

    The only conversions are the lossless ones a YAML or papermill round trip needs: an int where
    a float is expected, and a list where a tuple is expected. A bool is never taken for a number.
    """
    if expected is Any:
        return True, value
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if origin is Literal:
        return (value in args and type(value) in {type(a) for a in args}), value
    if origin in (Union, types.UnionType):
        for option in args:
            ok, converted = _coerce(value, option)
            if ok:
                return True, converted
        return False, value
    if expected is type(None):
        return value is None, value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return False, value
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                return False, value
            items = list(zip(value, args))
        else:
            item_type = args[0] if args else Any
            items = [(item, item_type) for item in value]
        converted = []
        for item, item_type in items:
            ok, item = _coerce(item, item_type)
            if not ok:
                return False, value
            converted.append(item)
        return True, tuple(converted) if origin is tuple else converted
    if expected is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False, value
        return True, float(value)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if isinstance(expected, type):
        return isinstance(value, expected), value
    raise TypeError(f"parameter type {expected!r} is not supported by explaind.pipeline")


def _hint(value: Any, expected: Any) -> str:
    """The fix for a mistyped value, as specific as the mistake allows."""
    if isinstance(value, str) and expected in (float, int):
        try:
            float(value)
        except ValueError:
            pass
        else:
            if expected is float and "e" in value.lower():  # YAML 1.1 floats: a dot, and a signed exponent
                mantissa, exponent = value.strip().lower().split("e")
                mantissa += "" if "." in mantissa else ".0"
                exponent = exponent if exponent[:1] in ("+", "-") else "+" + exponent
                return f"write {mantissa}e{exponent}: YAML 1.1 reads an exponent without a dot before it or a sign as text"
            return "write it as a number, without quotes"
    if isinstance(value, float) and expected is int and value.is_integer():
        return f"write {int(value)} (no decimal point)"
    if isinstance(value, bool) and expected in (int, float):
        return "write a number, not true/false"
    if typing.get_origin(expected) is Literal:
        return f"use {type_name(expected)}"
    return f"give a value of type {type_name(expected)}"


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_params(
    values: Mapping[str, Any], stage: str, source: str = "the notebook parameters", partial: bool = False
) -> dict[str, Any]:
    """Check parameter values against the stage's schema; return them converted (int -> float,
    list -> tuple where declared).

    Raises ParameterError listing every problem at once: unknown names (with the closest known
    one), wrong types (with the expected type and the fix) and, unless `partial`, missing names.
    """
    schema = stage_schema(stage)
    problems, checked = [], {}
    for name, value in values.items():
        if name not in schema:
            close = difflib.get_close_matches(name, schema, n=1)
            guess = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(
                f"unknown parameter {name!r}{guess} in {source}. Fix: rename or remove it; "
                f"stage {stage!r} knows: {', '.join(sorted(schema))}"
            )
            continue
        ok, converted = _coerce(value, schema[name])
        if not ok:
            problems.append(
                f"parameter {name!r} must be {type_name(schema[name])}, got "
                f"{type(value).__name__} {_show(value)} in {source}. Fix: {_hint(value, schema[name])}"
            )
        checked[name] = converted
    if not partial:
        for name in sorted(set(schema) - set(values)):
            problems.append(
                f"parameter {name!r} ({type_name(schema[name])}) is missing from {source}. "
                f"Fix: add it"
            )
    if problems:
        raise ParameterError(
            f"{len(problems)} problem(s) with the parameters of stage {stage!r}:\n  - "
            + "\n  - ".join(problems)
        )
    return {name: checked[name] for name in schema if name in checked}


def _is_session_name(name: str) -> bool:
    """Names IPython and the notebook define themselves (_, __, _i3, _5, In, Out, ...)."""
    return name.startswith("_") or name in {"In", "Out", "get_ipython", "exit", "quit"}


def notebook_params(stage: str, namespace: Mapping[str, Any], before: set[str]) -> dict[str, Any]:
    """Check a notebook's parameters; call it in the cell right after the parameters cell.

    `before` is `set(globals())` taken just before the parameters cell: every name defined since
    then (the defaults, and anything papermill injected) must be a known parameter of the
    stage with a value of its type. A mistyped `-p lrr 0.1` is therefore an error, not a new
    variable nobody reads.
    """
    defined = [name for name in namespace if name not in before and not _is_session_name(name)]
    values = {name: namespace[name] for name in defined}
    source = f"notebook {get_stage(stage).notebook} (papermill parameters / the parameters cell)"
    return check_params(values, stage, source=source)


MERGE_TAG = "tag:yaml.org,2002:merge"


def _unique_keys_loader(path: Path) -> type:
    """A YAML SafeLoader that refuses a key given twice in one mapping (YAML would keep the last).

    Merge keys (`<<: *anchor`) work as in yaml.safe_load: the mapping's own keys override the
    merged ones, which is no repeat. The check runs on the document's nodes before anything is
    constructed, since constructing a mapping flattens its merges into the merged node's keys."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_document(self, node):
            self._check_unique_keys(node, set())
            return super().construct_document(node)

        def _check_unique_keys(self, node, visited: set[int]) -> None:
            if id(node) in visited:  # an alias: the anchored node is checked once
                return
            visited.add(id(node))
            if isinstance(node, yaml.SequenceNode):
                for item in node.value:
                    self._check_unique_keys(item, visited)
            elif isinstance(node, yaml.MappingNode):
                seen = set()
                for key_node, value_node in node.value:
                    if key_node.tag != MERGE_TAG:
                        key = self.construct_object(key_node, deep=True)
                        try:
                            repeated = key in seen
                        except TypeError:  # an unhashable key: construct_mapping refuses it, naming the line
                            continue
                        if repeated:
                            raise ParameterError(f"{path}, line {key_node.start_mark.line + 1}: key {key!r} is given "
                                                 "twice in the same section. Fix: keep one of them")
                        seen.add(key)
                    self._check_unique_keys(value_node, visited)

    return UniqueKeyLoader


def _unknown(name: str, known: list[str], path: Path) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    guess = f" (did you mean {close[0]!r}?)" if close else ""
    return (f"unknown section {name!r}{guess} of {path}. Fix: rename or remove it; "
            f"the sections are {', '.join(known)}")


def _check_sections(content: Mapping[str, Any], path: Path) -> None:
    """Refuse a misspelled section (a stage would silently run on its defaults' neighbours)."""
    known = ["base", *STAGES]
    problems = [_unknown(name, known, path) for name in content if name not in known]
    for name, info in STAGES.items():
        if info.models and isinstance(content.get(name), Mapping):
            problems += [_unknown(f"{name}.{item}", [f"{name}.{m}" for m in info.models], path)
                         for item in content[name] if item not in info.models]
    if problems:
        raise ParameterError("\n".join(problems))


def read_params_file(path: str | os.PathLike) -> dict[str, Any]:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; run from the repository root or pass its path")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ParameterError(f"{path} is not UTF-8 text ({error}). Fix: save it as UTF-8 "
                             "(e.g. `iconv -f latin1 -t utf-8`)") from None
    try:
        content = yaml.load(text, Loader=_unique_keys_loader(path)) or {}
    except yaml.MarkedYAMLError as error:  # a syntax error, with its line and column
        raise ParameterError(f"{path} is not valid YAML: {error}\nFix: mend the file at the line named above") from None
    if not isinstance(content, dict):
        raise ParameterError(f"{path} must map section names to sections, got {type(content).__name__}")
    _check_sections(content, path)
    return content


def load_params(
    stage: str, params_file: str | os.PathLike | None = None, root: str | os.PathLike | None = None
) -> dict[str, Any]:
    """The checked parameters of a stage: the `base` section overlaid with the stage's section."""
    path = Path(params_file) if params_file is not None else (
        Path(root) if root is not None else repo_root()) / PARAMS_FILE
    content = read_params_file(path)
    info = get_stage(stage)
    name, item = split_stage(stage)
    if info.models and item is None:
        raise ParameterError(f"stage {name!r} runs per model: name one of "
                             + ", ".join(f"{name}@{m}" for m in info.models))
    sections = {}
    for section in ("base", f"{name}.{item}" if item else name):
        value = content
        for key in section.split("."):
            value = value.get(key) if isinstance(value, dict) else None
        if not isinstance(value, dict):
            raise ParameterError(
                f"{path} has no section {section!r} (a mapping of parameter: value); add one: "
                f"stage {stage!r} takes {', '.join(sorted(set(stage_schema(stage)) - {'model'}))}"
            )
        sections[section] = value
    if item is not None:  # the model comes from the stage's name, never from the file
        if "model" in sections[f"{name}.{item}"]:
            raise ParameterError(f"remove 'model' from section '{name}.{item}' of {path}: "
                                 f"the stage name ({stage}) sets it")
        sections[f"{name}.{item}"] = {**sections[f"{name}.{item}"], "model": item}
    base_unknown = set(sections["base"]) - set(BASE_SCHEMA)
    if base_unknown:
        raise ParameterError(
            f"unknown key(s) {sorted(base_unknown)} in section 'base' of {path}. Fix: move them to "
            f"a stage's section; 'base' holds only {', '.join(BASE_SCHEMA)}"
        )
    section = f"{name}.{item}" if item else name
    merged = {**sections["base"], **sections[section]}
    checked = check_params(merged, stage, source=f"{path} (sections 'base' + {section!r})")
    data = (Path(root) if root is not None else path.parent) / DATA_DIR
    try:  # the values' ranges, as the stage checks them (the device may be another machine's)
        config = make_config(stage, {key: value for key, value in checked.items() if key != "device"})
        check_device(checked["device"], here=False)
        if hasattr(config, "check_data") and data.is_dir():  # and those the data set (no data/: run_stage says so)
            config.check_data(data)
    except InputError as error:
        raise ParameterError(f"{path} (sections 'base' + {section!r}): {error}") from None
    _check_across_sections(stage, content, checked, path)
    return checked


def _check_across_sections(stage: str, content: Mapping[str, Any], checked: Mapping[str, Any], path: Path) -> None:
    """Refuse a stage's value that another stage's section rules out: the cubes stage explains
    the first `tests` inputs, which the verify stage must have reconstructed (its first `inputs`)."""
    name, item = split_stage(stage)
    if name != "cubes":
        return
    verified = content.get("verify", {}).get(item, {}).get("inputs", 0)
    if isinstance(verified, int) and verified > 0 and checked["tests"] > verified:
        raise ParameterError(
            f"{path}: cubes.{item}.tests is {checked['tests']}, but verify.{item}.inputs reconstructs only the "
            f"first {verified} inputs, against which the cubes stage checks every cube. Fix: lower cubes.{item}.tests "
            f"to at most {verified}, or raise verify.{item}.inputs (0: all held-out inputs)")


# --- outputs ------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """JSON-ready: numpy / torch scalars to Python numbers, NaN and infinities to null."""
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"metric value {value!r} of type {type(value).__name__} is not a number or text")


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def write_metrics(path: str | os.PathLike, metrics: Mapping[str, Any]) -> Path:
    """Write metrics as JSON for `dvc metrics show`: sorted keys, NaN as null, atomically."""
    path = Path(path)
    _atomic_write(path, json.dumps(_plain(metrics), indent=2, sort_keys=True) + "\n")
    return path


def write_plot_csv(path: str | os.PathLike, frame: Any, x: str = "step") -> Path:
    """Write a curves table as CSV for `dvc plots show` (no index column; `x` must be a column)."""
    if x not in frame.columns:
        raise ValueError(f"the curves table needs an {x!r} column for the plots' x axis; "
                         f"it has {list(frame.columns)}")
    path = Path(path)
    _atomic_write(path, frame.to_csv(index=False))
    return path


def fresh_dir(path: str | os.PathLike) -> Path:
    """Empty (or create) a stage's output folder so a rerun never mixes two runs."""
    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


# --- what the training notebooks save and show --------------------------------------------

# Metrics that measure the machine rather than the run: shown in the notebook, never written to
# metrics.json, so that the same seeds always give byte-identical metrics.
VOLATILE_METRICS = ("wall_time_s",)


def save_run(paths: StagePaths, result: Any, config: Any = None) -> dict[str, Any]:
    """Save a training stage's outputs: the model (safetensors), its training config
    (config.json: the later stages rebuild the architecture from it), metrics.json and curves.csv.

    `result` is an explaind.training.TrainResult. Returns the metrics written.
    """
    from safetensors.torch import save_model

    from .training import save_config

    paths.model.parent.mkdir(parents=True, exist_ok=True)
    save_model(result.model, str(paths.model))
    if config is not None:
        save_config(config, paths.run)
    metrics = {key: value for key, value in result.metrics.items() if key not in VOLATILE_METRICS}
    write_metrics(paths.metrics, metrics)
    write_plot_csv(paths.curves, result.log)
    return metrics


def _long_curves(log: Any, metric: str) -> Any:
    """One row per (step, split) for `metric` ("loss" or "acc") of a training log."""
    frame = log[["step", f"train_{metric}", f"val_{metric}"]]
    frame = frame.rename(columns={f"train_{metric}": "train", f"val_{metric}": "held out"})
    return frame.melt(id_vars="step", var_name="split", value_name=metric)


def plot_training_curves(log: Any, title: str, held_out: str = "validation") -> Any:
    """Loss (log scale when it spans a decade) and accuracy over update steps, training vs held-out split."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, metric, label in ((ax_loss, "loss", "cross-entropy"), (ax_acc, "acc", "accuracy")):
        data = _long_curves(log, metric).replace({"split": {"held out": held_out}})
        sns.lineplot(data=data, x="step", y=metric, hue="split", marker="o" if len(log) < 40 else None, ax=ax)
        ax.set(xlabel="update step", ylabel=label)
    losses = log[["train_loss", "val_loss"]].to_numpy()
    if losses.min() > 0 and losses.max() / losses.min() > 10:  # log scale only where it helps
        ax_loss.set_yscale("log")
    ax_acc.set_ylim(-0.02, 1.02)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def grokking_steps(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The phase boundaries of a grokking run that were reached (finite), by name."""
    names = {"t_mem": "memorisation (train acc 100%)", "t_val_95": "generalisation (val acc 95%)",
             "t_val_100": "generalisation (val acc 100%)"}
    steps = {}
    for key, label in names.items():
        value = metrics.get(key)
        if value is not None and math.isfinite(value):
            steps[label] = float(value)
    return steps


def plot_grokking(log: Any, metrics: Mapping[str, Any], title: str) -> Any:
    """The grokking curve: accuracies and parameter norm over a log step axis, with the
    memorisation and generalisation steps marked."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    later = log[log["step"] >= 1]  # a log axis starts at the first update
    fig, (ax_acc, ax_norm) = plt.subplots(1, 2, figsize=(11, 3.8))
    sns.lineplot(data=_long_curves(later, "acc").replace({"split": {"held out": "validation"}}),
                 x="step", y="acc", hue="split", ax=ax_acc)
    sns.lineplot(data=later, x="step", y="param_norm", color="0.3", ax=ax_norm)
    colours = sns.color_palette("dark", 3)
    for ax in (ax_acc, ax_norm):
        ax.set_xscale("log")
        ax.set_xlabel("update step (log scale)")
        for colour, (label, step) in zip(colours, grokking_steps(metrics).items()):
            if step >= 1:
                ax.axvline(step, color=colour, linestyle="--", linewidth=1,
                           label=f"{label}: step {step:.0f}" if ax is ax_acc else None)
    ax_acc.set(ylabel="accuracy", ylim=(-0.02, 1.02))
    ax_acc.legend(loc="upper left", fontsize=8)
    ax_norm.set(ylabel="parameter norm ||θ||")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


# --- the stage runner ---------------------------------------------------------------------


def check_kernel(kernel: str = KERNEL_NAME) -> None:
    from jupyter_client.kernelspec import KernelSpecManager

    if kernel not in KernelSpecManager().find_kernel_specs():
        raise ExplaindError(
            f"Jupyter kernel {kernel!r} is not installed for {sys.executable}. Fix: run `make setup`, "
            f"or `{sys.executable} -m ipykernel install --sys-prefix --name {kernel}`"
        )


@contextlib.contextmanager
def _kernel_sockets():
    """A private folder for the kernel's Unix sockets, removed afterwards; None (TCP) on Windows,
    where zmq may lack them, or where no temporary folder is short enough: a socket's path holds
    at most ~100 characters, and this one adds 34 to the folder's."""
    parent = next((p for p in (tempfile.gettempdir(), "/tmp") if len(p) <= 64 and os.path.isdir(p)), None)
    if os.name != "posix" or parent is None:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="explaind-kernel-", dir=parent) as folder:
        yield folder


def _kernel_manager_class(sockets: str | None) -> type:
    """nbclient's kernel manager, reaching the kernel through Unix sockets in the folder `sockets`
    instead of TCP ports on localhost, which ipykernel 7 warns at every stage can be eavesdropped."""
    from jupyter_client.manager import AsyncKernelManager

    if sockets is None:
        return AsyncKernelManager

    class SocketFileKernelManager(AsyncKernelManager):
        def __init__(self, **kwargs):
            super().__init__(transport="ipc", ip=os.path.join(sockets, "kernel"), **kwargs)

    return SocketFileKernelManager


def _for_papermill(value: Any) -> Any:
    return [_for_papermill(v) for v in value] if isinstance(value, tuple) else value


def run_stage(
    stage: str,
    root: str | os.PathLike | None = None,
    params_file: str | os.PathLike | None = None,
    kernel: str = KERNEL_NAME,
    log_output: bool = False,
) -> Path:
    """Execute a stage's notebook with its params.yaml parameters; return the executed notebook.

    Runs in the repository root (so relative paths mean the same everywhere) with $EXPLAIND_ROOT
    pinned for the kernel. A failing cell raises papermill's PapermillExecutionError, whose
    message shows the cell's error; the executed notebook, with the error, is kept for reading.
    """
    import papermill

    root = Path(root).resolve() if root is not None else repo_root()
    params = load_params(stage, params_file=params_file, root=root)
    try:  # the kernel runs here: a device this machine lacks stops the stage before it starts
        check_device(params["device"])
    except InputError as error:
        raise ParameterError(f"{params_file or PARAMS_FILE}: {error}") from None
    info = get_stage(stage)
    notebook = root / info.notebook
    if not notebook.is_file():
        raise FileNotFoundError(f"stage {stage!r} runs {notebook}, which does not exist")
    check_kernel(kernel)
    if reads_data(stage) and not (root / DATA_DIR).is_dir():  # before the notebook empties its outputs
        raise DataError(f"{root / DATA_DIR} does not exist, and stage {stage!r} reads the CNN's images from it. "
                        "Fix: run `make data`, which rebuilds data/ as data.dvc records it")
    paths = stage_paths(stage, root)
    paths.results.mkdir(parents=True, exist_ok=True)
    with _pinned_root(root), _kernel_sockets() as sockets:
        papermill.execute_notebook(
            str(notebook),
            str(paths.notebook),
            parameters={key: _for_papermill(value) for key, value in params.items()},
            kernel_name=kernel,
            cwd=str(root),
            progress_bar=sys.stderr.isatty(),  # papermill's cell progress bar, in a terminal
            log_output=log_output,
            kernel_manager_class=_kernel_manager_class(sockets),
        )
    return paths.notebook


# --- data/ and data.dvc -------------------------------------------------------------------


def file_md5(path: str | os.PathLike) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def dir_listing(path: str | os.PathLike) -> list[dict[str, str]]:
    """DVC's listing of a directory: {"md5", "relpath"} per file, sorted by POSIX relative path."""
    path = Path(path)
    entries = [
        {"md5": file_md5(file), "relpath": file.relative_to(path).as_posix()}
        for file in path.rglob("*")
        if file.is_file()
    ]
    return sorted(entries, key=lambda entry: entry["relpath"])


def dvc_dir_hash(path: str | os.PathLike) -> dict[str, Any]:
    """The hash DVC 3 records for a directory output (`md5`, `size`, `nfiles`).

    DVC stores the directory as a JSON listing of its files (see dir_listing) and names it by
    the MD5 of that listing, serialised with sorted keys, plus the suffix ".dir".
    """
    path = Path(path)
    listing = dir_listing(path)
    serialised = json.dumps(listing, sort_keys=True).encode("utf-8")
    size = sum((path / entry["relpath"]).stat().st_size for entry in listing)
    return {"md5": hashlib.md5(serialised).hexdigest() + ".dir", "size": size, "nfiles": len(listing)}


def recorded_data_hash(root: str | os.PathLike | None = None) -> dict[str, Any]:
    """md5 / size / nfiles of data/ as recorded in data.dvc."""
    import yaml

    root = Path(root) if root is not None else repo_root()
    path = root / DATA_DVC_FILE
    fix = f"Fix: restore it (git checkout {DATA_DVC_FILE}), or record data/ anew with `dvc add data`"
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path} is missing. {fix}") from None
    except (UnicodeDecodeError, yaml.YAMLError) as error:
        raise DataError(f"{path} is not valid YAML ({error}). {fix}") from None
    outs = content.get("outs") if isinstance(content, dict) else None
    entry = outs[0] if isinstance(outs, list) and outs else None
    if not isinstance(entry, dict):
        raise DataError(f"{path} does not hold DVC's record of an output (`outs:` with one entry of path, md5, "
                        f"size and nfiles). {fix}")
    if entry.get("path") != DATA_DIR:
        raise DataError(f"{DATA_DVC_FILE} tracks {entry.get('path')!r}, expected {DATA_DIR!r}")
    missing = [key for key in ("md5", "size", "nfiles") if key not in entry]
    if missing:
        raise DataError(f"{path} records no {', '.join(missing)} for {DATA_DIR}/. {fix}")
    return {key: entry[key] for key in ("md5", "size", "nfiles")}


def check_data(root: str | os.PathLike | None = None) -> dict[str, Any]:
    """Compare data/ with data.dvc; raise DataError naming what differs. Returns the hash."""
    root = Path(root) if root is not None else repo_root()
    recorded, folder = recorded_data_hash(root), root / DATA_DIR
    if not folder.is_dir():
        raise DataError(f"{folder} does not exist. Fix: run `make data` (or `dvc pull data.dvc`)")
    actual = dvc_dir_hash(folder)
    if actual == recorded:
        return actual
    message = [f"{folder} does not match {DATA_DVC_FILE}: recorded {recorded}, found {actual}."]
    cache = dvc_cache_dir(root) / "files" / "md5" / recorded["md5"][:2] / recorded["md5"][2:]
    if cache.is_file():  # DVC's cached listing tells which files differ
        expected = {e["relpath"]: e["md5"] for e in json.loads(cache.read_text())}
        found = {e["relpath"]: e["md5"] for e in dir_listing(folder)}
        for name in sorted(set(expected) | set(found)):
            if expected.get(name) != found.get(name):
                state = "missing" if name not in found else "extra" if name not in expected else "changed"
                message.append(f"  {state}: {name}")
    message.append(
        "Fix: if you changed data/ on purpose (e.g. added the CIFAR-10 archive), record it with "
        "`dvc commit data.dvc` (or `dvc add data`); otherwise delete data/ and run `make data`."
    )
    raise DataError("\n".join(message))


def _dvc(*args: str, root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, check=True,
                          capture_output=True, text=True)


def dvc_cache_dir(root: Path) -> Path:
    """DVC's cache directory as configured (`dvc cache dir`), .dvc/cache where none is."""
    try:
        return Path(_dvc("cache", "dir", root=root).stdout.strip())
    except (subprocess.CalledProcessError, FileNotFoundError):
        return root / ".dvc" / "cache"


def has_dvc_remote(root: Path) -> bool:
    try:
        return bool(_dvc("remote", "list", root=root).stdout.strip())
    except (subprocess.CalledProcessError, FileNotFoundError):
        return False


def ensure_data(root: str | os.PathLike | None = None, cache: bool = True) -> dict[str, Any]:
    """Make data/ match data.dvc: keep it if it does, else pull it from the DVC remote when one is
    configured, else rebuild it with the deterministic export (the 8x8 digits, byte-identical on
    every machine). Then check the hashes and, with `cache`, store it in DVC's cache so that
    `dvc status` is clean. Idempotent: a second call only re-hashes the (small) files.
    """
    root = Path(root) if root is not None else repo_root()
    folder = root / DATA_DIR
    if not folder.is_dir():
        if has_dvc_remote(root):
            print("data/: pulling it from the DVC remote")
            _dvc("pull", DATA_DVC_FILE, root=root)
        else:
            from .data import export_digits

            print("data/: no DVC remote configured, rebuilding it with explaind.data.export_digits")
            export_digits(folder)
    result = check_data(root)
    if cache:
        _dvc("commit", "--force", "--quiet", DATA_DVC_FILE, root=root)
    print(f"data/ matches {DATA_DVC_FILE} ({result['md5']}, {result['nfiles']} files, {result['size']} bytes)")
    return result


# --- profiles -----------------------------------------------------------------------------


def _yaml_value(value: Any) -> str:
    """A value as `dvc exp run -S` parses it (YAML flow style, no spaces)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_yaml_value(v) for v in value) + "]"
    if isinstance(value, float):
        text = repr(value)
        return text if "." in text or "inf" in text or "nan" in text else text.replace("e", ".0e")
    return str(value)


def check_profile(profile: str | os.PathLike, stages: list[str] | None = None, here: bool = True) -> list[str]:
    """Check every stage's parameters in a profile file (`stages`: those of the file's sections),
    as each stage checks its own when it starts, and, with `here`, that this machine has the
    device each names: `dvc repro` would otherwise stop at a later stage's mistake only when that
    stage's turn comes, after the earlier ones ran. Returns the stages checked."""
    content = read_params_file(profile)
    stages = stages if stages is not None else [name for name in stage_instances() if split_stage(name)[0] in content]
    for stage in stages:
        params = load_params(stage, params_file=profile)
        if here:
            try:
                check_device(params["device"])
            except InputError as error:
                raise ParameterError(f"{profile} (stage {stage}): {error}") from None
    return stages


def set_args(profile: str | os.PathLike, stages: list[str] | None = None, here: bool = True) -> list[str]:
    """`-S section.key=value` arguments that make `dvc exp run` use every value of a profile file,
    once the profile passes check_profile (`here`: on this machine, where `dvc exp run` would
    write the profile's values into params.yaml and start deleting the stages' outputs)."""
    content = read_params_file(profile)
    check_profile(profile, stages, here)
    args = []

    def flatten(prefix: str, values: Mapping[str, Any]) -> None:
        for key, value in values.items():
            if isinstance(value, Mapping):  # a per-model section: verify.cnn.inputs=...
                flatten(f"{prefix}{key}.", value)
            else:
                args.extend(["-S", f"{prefix}{key}={_yaml_value(value)}"])

    flatten("", content)
    return args


# --- command line -------------------------------------------------------------------------


def _stream_papermill_log() -> None:
    """Show papermill's log, where log_output puts each cell's start and output, on stderr (a
    logger without a handler of its own shows warnings only)."""
    import logging

    log = logging.getLogger("papermill")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m explaind.pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"explaind {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="execute a stage's notebook with its params.yaml parameters")
    run.add_argument("stage", choices=stage_instances())
    run.add_argument("--params", default=None, help="parameters file (default: params.yaml in the root)")
    run.add_argument("--kernel", default=KERNEL_NAME, help="Jupyter kernel (default: %(default)s)")
    run.add_argument("--log-output", action=argparse.BooleanOptionalAction, default=None,
                     help="stream each cell's start and output to stderr (default: where stderr is no terminal, "
                          "as a log file; a terminal shows papermill's progress bar)")
    show = commands.add_parser("params", help="print a stage's checked parameters")
    show.add_argument("stage", choices=stage_instances())
    show.add_argument("--params", default=None)
    data = commands.add_parser("data", help="rebuild data/ and check it against data.dvc")
    data.add_argument("--check-only", action="store_true", help="only compare data/ with data.dvc")
    profile = commands.add_parser("set-args", help="print `dvc exp run -S` arguments for a profile")
    profile.add_argument("profile", help="a params file, e.g. params_paper.yaml")
    check = commands.add_parser("check", help="check every stage's parameters and device before a run")
    check.add_argument("profile", nargs="?", default=None, help="a params file (default: params.yaml in the root)")
    args = parser.parse_args(argv)

    try:
        if args.command == "run":
            log_output = not sys.stderr.isatty() if args.log_output is None else args.log_output
            if log_output:
                _stream_papermill_log()
            print(f"stage {args.stage}: executed notebook -> {run_stage(args.stage, params_file=args.params, kernel=args.kernel, log_output=log_output)}")
        elif args.command == "params":
            print(json.dumps(load_params(args.stage, params_file=args.params), indent=2))
        elif args.command == "data":
            if args.check_only:
                result = check_data()
                print(f"data/ matches {DATA_DVC_FILE} ({result['md5']})")
            else:
                ensure_data()
        elif args.command == "set-args":
            print(" ".join(set_args(args.profile)))
        elif args.command == "check":
            profile = args.profile or repo_root() / PARAMS_FILE
            print(f"{profile}: the parameters of {len(check_profile(profile))} stages and their devices pass")
    except (ExplaindError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except Exception as error:  # papermill's execution error carries the failing cell's traceback
        if type(error).__name__ == "PapermillExecutionError":
            print(f"error: stage {args.stage} failed in its notebook (the executed notebook, with the "
                  f"error, is in {stage_paths(args.stage).notebook}):\n{error}", file=sys.stderr)
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
