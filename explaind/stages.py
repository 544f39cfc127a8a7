"""The analysis stages of the pipeline: `verify` (notebook 03) and `cubes` (notebook 04).

Both run once per trained model (`foreach` in dvc.yaml: `verify@cnn`, `verify@transformer`, ...).
Their config dataclasses below are the schemas of the params.yaml sections `verify.<model>` and
`cubes.<model>`; the runner adds `model` itself. The logic lives here, the notebooks call it and
plot: loading a trained run, the verification table and its gate, the cube requests, and the
checks that tie every stored cube to the verify stage's reconstruction.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
import xarray as xr

from .cube import per_parameter, residual_attrs
from .errors import ExplaindError, InputError, ReconstructionError
from .quadrature import MAX_NODES
from .training import CONFIG_FILE, DTYPES, check_ranges  # DTYPES re-exported: the notebooks read it from here

MODELS = ("cnn", "transformer")

# docs/method.md §3: the paper's replication numbers (mod-113 Transformer and CIFAR-2 ResNet-9).
PAPER_REPLICATION = pd.DataFrame(
    [
        {"source": "paper", "model": "transformer (mod 113)", "rule": "midpoint", "nodes": 100, "agreement": 1.0, "kl": 0.0},
        {"source": "paper", "model": "transformer (mod 113)", "rule": "midpoint", "nodes": 10, "agreement": 0.748, "kl": 0.885},
        {"source": "paper", "model": "ResNet-9 (CIFAR-2)", "rule": "midpoint", "nodes": 100, "agreement": 1.0, "kl": 0.0},
    ]
)


@dataclass
class VerifyConfig:
    """Section `verify.<model>` of params.yaml: how the exactness of a run is measured."""

    model: Literal["cnn", "transformer"] = "cnn"  # set by the runner from the stage (verify@cnn)
    inputs: int = 0  # held-out inputs reconstructed (all outputs); 0 = the whole held-out set
    quadrature: int = 3  # nodes per smooth piece of each step's path integral
    rule: Literal["gauss", "midpoint"] = "gauss"  # quadrature rule
    breakpoints: bool = True  # locate the ReLU / max-pool kinks along each step first
    # 0: search every step's kinks; > 0: only where the plain integral misses an output by more
    kink_tolerance: float = 0.0
    batch_size: int = 64  # rows (input x node) per forward-mode pass: bounds the memory
    sensitivity_inputs: int = 4  # inputs of the quadrature-sensitivity sweep (the first ones)
    sensitivity_nodes: tuple[int, ...] = (1, 2, 3, 10, 30, 100)  # nodes, plain quadrature (no kinks located)
    sensitivity_kink_nodes: tuple[int, ...] = (1, 2, 3)  # nodes with kinks located; () skips them
    float32_inputs: int = 16  # inputs of the float32-versus-float64 comparison
    # inputs whose residual closes at least this share of a gap to their top output
    # (verify.residual_to_gap; from 1 on the argmax could flip) are reconstructed again with a
    # finer integral; 0: none. The agreement is then decided by the finer reconstruction
    refine_ratio: float = 0.0
    refine_quadrature: int = 3  # nodes per smooth piece of that reconstruction
    refine_breakpoints: bool = True  # whether it locates the kinks along each step
    refine_kink_tolerance: float = 1.0e-4  # its kink_tolerance (0 unless refine_breakpoints)
    refine_max_kinks: int = 256  # kinks per input and step it resolves (beyond: plain quadrature)
    tolerance: float = 1.0e-8  # the largest accepted relative residual of the main reconstruction
    min_agreement: float = 1.0  # the smallest accepted argmax agreement (the paper reports 1.0)

    def __post_init__(self):
        # refused here so that the message names these keys (the library's names its own arguments)
        nodes = f"at most {MAX_NODES} (each node is one Jacobian pass per step)"
        check_ranges(f"verify.{self.model}", self, (
            ("inputs", self.inputs >= 0, "at least 0 (0: the whole held-out set)"),
            ("quadrature", 1 <= self.quadrature <= MAX_NODES, f"at least 1 and {nodes}"),
            ("kink_tolerance", self.kink_tolerance >= 0, "at least 0"),
            ("batch_size", self.batch_size >= 1, "at least 1"),
            ("sensitivity_inputs", self.sensitivity_inputs >= 0, "at least 0"),
            ("sensitivity_nodes", all(1 <= n <= MAX_NODES for n in self.sensitivity_nodes),
             f"node counts of at least 1 and {nodes}"),
            ("sensitivity_kink_nodes", all(1 <= n <= MAX_NODES for n in self.sensitivity_kink_nodes),
             f"node counts of at least 1 and {nodes}"),
            ("float32_inputs", self.float32_inputs >= 0 and (self.inputs == 0 or self.float32_inputs <= self.inputs),
             "at least 0" + ("" if self.inputs == 0 else f" and at most inputs ({self.inputs}): it compares those")),
            ("refine_ratio", self.refine_ratio >= 0, "at least 0 (0: refine none)"),
            ("refine_quadrature", 1 <= self.refine_quadrature <= MAX_NODES, f"at least 1 and {nodes}"),
            ("refine_kink_tolerance", self.refine_kink_tolerance >= 0, "at least 0"),
            ("refine_max_kinks", self.refine_max_kinks >= 1, "at least 1"),
            ("tolerance", self.tolerance >= 0, "at least 0"),
            ("min_agreement", 0 <= self.min_agreement <= 1, "in [0, 1]"),
        ))
        if self.refine_kink_tolerance > 0 and not self.refine_breakpoints:
            raise InputError(
                f"verify.{self.model}: refine_kink_tolerance={self.refine_kink_tolerance} chooses the steps whose "
                "kinks the refinement locates, but refine_breakpoints is false, which locates none. Fix: set "
                "refine_breakpoints: true, or refine_kink_tolerance: 0.0 for plain quadrature")

    def check_run(self, held_out: int) -> None:
        """Refuse counts beyond the trained run's `held_out` inputs, which slicing would otherwise
        cap without a word."""
        check_held_out(f"verify.{self.model}", self, held_out, ("inputs", "sensitivity_inputs", "float32_inputs"))


@dataclass
class CubesConfig:
    """Section `cubes.<model>` of params.yaml: which attribution cubes are computed and stored.

    The path integral (nodes, rule, kinks) is the verify stage's, read from its stored
    reconstruction: computed the same way, a cube's integral of the recorded updates must equal
    that reconstruction up to rounding, which makes the check on write a sharp one."""

    model: Literal["cnn", "transformer"] = "cnn"  # set by the runner from the stage (cubes@cnn)
    tests: int = 8  # held-out inputs explained (the first ones of the held-out split)
    step_bins: int = 12  # equal bins of update steps in the step x component cubes
    tolerance: float = 1.0e-8  # the largest accepted relative residual of a cube
    verify_tolerance: float = 1.0e-8  # the largest accepted gap to the verify stage's reconstruction
    top_k: int = 8  # most helpful / harmful training samples shown per explained input

    def __post_init__(self):
        check_ranges(f"cubes.{self.model}", self, (
            ("tests", self.tests >= 1, "at least 1"),
            ("step_bins", self.step_bins >= 1, "at least 1"),
            ("tolerance", self.tolerance >= 0, "at least 0"),
            ("verify_tolerance", self.verify_tolerance >= 0, "at least 0"),
            ("top_k", self.top_k >= 0, "at least 0"),
        ))

    def check_run(self, held_out: int) -> None:
        """Refuse more tests than the trained run's `held_out` inputs (see VerifyConfig.check_run)."""
        check_held_out(f"cubes.{self.model}", self, held_out, ("tests",))


def check_held_out(section: str, config, held_out: int, keys: tuple[str, ...]) -> None:
    """Refuse input counts of a config above the run's `held_out` inputs (0 still means all)."""
    check_ranges(section, config, [(key, getattr(config, key) <= held_out,
                                     f"at most {held_out} (the run's held-out inputs; 0: all of them)") for key in keys])


# --- a trained run ------------------------------------------------------------------------


@dataclass
class Run:
    """A trained model with its history and data, as the analysis stages need them."""

    name: str  # "cnn" or "transformer"
    config: Any  # training config (CNNConfig or TransformerConfig)
    model: torch.nn.Module  # the trained model (final parameters)
    history: Any  # explaind.History
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor  # held-out inputs: the CNN's test split, the Transformer's validation pairs
    test_y: torch.Tensor
    held_out: str  # "test" or "validation"
    components: dict[str, list[str]]
    class_names: list[str]

    @property
    def label(self) -> str:
        if self.name == "cnn":
            return f"ResNet-9 width {self.config.width} ({self.config.dataset} {list(self.config.classes)})"
        return f"transformer (mod {self.config.p})"


def load_run(name: str, run_dir: str | os.PathLike, data_dir: str | os.PathLike) -> Run:
    """Rebuild a trained run from runs/<name>/: its config.json, model.safetensors and history."""
    from safetensors.torch import load_model

    from .data import load_image_pair, modular_addition
    from .history import History
    from .models import CNN_COMPONENTS, TRANSFORMER_COMPONENTS, ModAddTransformer, ResNet9
    from .training import CNNConfig, TransformerConfig, load_config

    run_dir = Path(run_dir)
    config_path = run_dir / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} is missing: rerun the training stage (dvc repro train_{name})")
    if name == "cnn":
        config = load_config(config_path, name, CNNConfig)
        pair = load_image_pair(data_dir, config.dataset, tuple(config.classes), config.test_size, config.data_seed)
        model = ResNet9(pair.train_x.shape[1], 2, config.width)
        train = (pair.train_x, pair.train_y)
        test = (pair.test_x, pair.test_y)
        held_out, components = "test", dict(CNN_COMPONENTS)
        class_names = [f"digit {c}" if config.dataset == "digits" else f"CIFAR class {c}" for c in config.classes]
    elif name == "transformer":
        config = load_config(config_path, name, TransformerConfig)
        data = modular_addition(config.p, config.train_size, config.val_size, config.data_seed, config.only_a_ge_b)
        model = ModAddTransformer(config.p, config.d_model, config.n_heads, config.d_mlp)
        train = (data.train_inputs, data.train_targets)
        test = (data.val_inputs, data.val_targets)
        held_out, components = "validation", dict(TRANSFORMER_COMPONENTS)
        class_names = [str(r) for r in range(config.p)]
    else:
        raise ExplaindError(f"unknown run {name!r}; the runs are {MODELS}")
    dtype = DTYPES[config.dtype]
    model = model.to(dtype)
    load_model(model, str(run_dir / "model.safetensors"))
    train_x, test_x = train[0], test[0]
    if train_x.is_floating_point():
        train_x, test_x = train_x.to(dtype), test_x.to(dtype)
    return Run(name, config, model, History(run_dir / "history"), train_x, train[1], test_x, test[1],
               held_out, components, class_names)


def first(n: int, total: int) -> int:
    """How many inputs `n` means: 0 (or more than there are) = all of them."""
    return total if n <= 0 else min(n, total)


# --- verify -------------------------------------------------------------------------------


def replication_table(ours: pd.DataFrame, model_label: str) -> pd.DataFrame:
    """The paper's replication numbers side by side with ours (rows of `ours`: source, rule,
    nodes, breakpoints, inputs, agreement, kl, relative_residual)."""
    paper = PAPER_REPLICATION.assign(breakpoints=False, inputs=np.nan, relative_residual=np.nan)
    ours = ours.assign(model=model_label)
    columns = ["source", "model", "rule", "nodes", "breakpoints", "inputs", "agreement", "kl", "relative_residual"]
    return pd.concat([paper[columns], ours[columns]], ignore_index=True)


def check_verification(metrics: dict[str, float], cfg: VerifyConfig) -> None:
    """The stage's gate: the argmax agreement (decided by the finer reconstruction where inputs
    were refined, see VerifyConfig.refine_ratio) and the main reconstruction's relative residual."""
    problems = []
    if metrics["agreement"] < cfg.min_agreement:
        problems.append(f"argmax agreement {metrics['agreement']:.4f} < min_agreement {cfg.min_agreement}")
    if not metrics["relative_residual"] <= cfg.tolerance:
        problems.append(f"relative residual {metrics['relative_residual']:.2e} > tolerance {cfg.tolerance:.0e}")
    if problems:
        raise ReconstructionError(
            f"the reconstruction of the {cfg.model} run fails verify.{cfg.model}: " + "; ".join(problems)
            + ". Fix: locate kinks (breakpoints: true), raise quadrature, refine the inputs the integral "
            "cannot decide (refine_ratio: 1.0), or compute in float64"
        )


# --- cubes --------------------------------------------------------------------------------


def integration_of(reference: xr.Dataset) -> dict[str, Any]:
    """The path-integral settings a reconstruction was computed with, as explain() arguments."""
    attrs = reference.attrs
    return {"quadrature": int(attrs["quadrature_nodes"]), "rule": str(attrs["quadrature_rule"]),
            "breakpoints": bool(attrs["breakpoints"]), "kink_tolerance": float(attrs.get("kink_tolerance", 0.0))}


def check_cube(cube: xr.Dataset, reference: xr.Dataset, tolerance: float, verify_tolerance: float,
               name: str = "cube") -> dict[str, float]:
    """Check a cube against itself and against the verify stage's `reference` reconstruction of
    the same inputs (all outputs, same history and path integral). Returns the gaps, each relative
    to the cube's largest output change:

    - sum_gap: Σ attribution + Σ regularization (+ Σ carried) against final − initial − residual;
    - initial_gap / final_gap: the cube's f(θ_0), f(θ_N) against the reference's;
    - verify_gap: the cube's integral of the recorded updates Σ_s φ_s·Δθ_s (its explained change
      plus residual_from_updates) against the reference's forward-mode reconstruction of the
      same sum: one integral computed two ways, so they differ by rounding only;
    - relative_residual: what the path integral misses, at most `tolerance`.
    """
    if cube.attrs["history_sha256"] != reference.attrs["history_sha256"]:
        raise ReconstructionError(f"{name} and the verify stage's reconstruction come from different "
                                  "histories: rerun the verify stage (dvc repro)")
    parts = [cube[v].sum([d for d in cube[v].dims if d not in ("test", "output")])
             for v in ("attribution", "regularization", "carried") if v in cube]
    summed = [d for d in ("test", "output") if d not in parts[0].dims]
    explained = cube["final"] - cube["initial"] - cube["residual"]
    integrated = explained + cube["residual_from_updates"]
    at = reference_values(cube, reference)
    rebuilt = at["reconstructed"] - at["initial"]
    scale = float(np.abs(cube["final"] - cube["initial"]).max())
    gaps = {
        "sum_gap": float(np.abs(sum(parts) - explained.sum(summed)).max()) / scale,
        "initial_gap": float(np.abs(cube["initial"].values - at["initial"]).max()) / scale,
        "final_gap": float(np.abs(cube["final"].values - at["final"]).max()) / scale,
        "verify_gap": float(np.abs(integrated.values - rebuilt).max()) / scale,
    }
    bad = {k: v for k, v in gaps.items() if not v <= verify_tolerance}
    gaps["relative_residual"] = float(cube.attrs["relative_residual"])
    if not gaps["relative_residual"] <= tolerance:
        bad["relative_residual"] = gaps["relative_residual"]
    if bad:
        raise ReconstructionError(
            f"{name}: {bad} above tolerance {tolerance:.0e} (relative residual) / verify_tolerance "
            f"{verify_tolerance:.0e} (gaps). A large verify_gap means the cube and the verify stage "
            "disagree about the same integral (rerun both); a large residual needs more nodes or "
            "located kinks in the verify stage's settings"
        )
    return gaps


def reference_values(cube: xr.Dataset, reference: xr.Dataset) -> dict[str, np.ndarray]:
    """initial / final / reconstructed of the reference at the cube's (test, output) entries."""
    out = {}
    for key in ("initial", "final", "reconstructed"):
        values = reference[key].sel(test=cube["test"].values).values  # [T, all outputs]
        labels = cube["output"].values
        if "output_class" in cube.coords:  # one selected output per input ("true" / "predicted")
            values = np.take_along_axis(values, cube["output_class"].values[:, None].astype(int), 1)
        else:
            values = values[:, labels.astype(int)]
        out[key] = values
    return out


def kernel_order(run: Run, cube: xr.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Orders of the train and test axes for the train x test kernel plot: by class (CNN) or by
    residue (a + b) mod p (Transformer), so block structure shows."""
    train_labels = run.train_y.numpy()[cube["train"].values]
    test_labels = run.test_y.numpy()[cube["test"].values]
    return np.argsort(train_labels, kind="stable"), np.argsort(test_labels, kind="stable")


def group_ticks(sorted_labels, most: int = 12) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Marks for a heatmap axis sorted by label (kernel_order): the edges between label groups,
    half a cell before each group but the first (imshow puts cell i at i), and the centre and
    label of every k-th group, k the smallest that labels at most `most` groups."""
    labels = np.asarray(sorted_labels)
    if labels.ndim != 1 or not len(labels):
        raise InputError(f"group_ticks needs a non-empty 1-d array of labels, got shape {labels.shape}")
    starts = np.flatnonzero(np.r_[True, labels[1:] != labels[:-1]])
    if len(starts) != len(np.unique(labels)):  # a label in two runs: its group would be marked twice
        raise InputError("group_ticks needs labels sorted into groups (each label in one run): order them by "
                         "kernel_order first")
    ends = np.r_[starts[1:], len(labels)]
    every = -(-len(starts) // most)  # ceil: label every k-th group
    return starts[1:] - 0.5, ((starts + ends - 1) / 2)[::every], labels[starts][::every]


def true_class_slice(cube: xr.Dataset, targets) -> xr.Dataset:
    """The true-class part of a cube that keeps every output, laid out as explain(outputs="true")
    lays it out (one output labelled "true", each input's class in `output_class`), with its
    residual attributes recomputed over the selected entries. One pass over the history then
    serves both cubes; parameter-wise scores, if any, stay those of every output."""
    classes = xr.DataArray(np.asarray(targets, dtype=np.int64), dims="test")
    out = cube.isel(output=classes).rename({"output": "output_class"})
    for name in ("initial", "final", "residual", "residual_from_updates"):
        out[name] = out[name].expand_dims(output=["true"], axis=1)
    out = out.assign_coords(output=["true"])
    out.attrs = {**cube.attrs,
                 **residual_attrs(out["residual"], out["final"] - out["initial"], out["residual_from_updates"])}
    return out


def parameter_cube(cube: xr.Dataset) -> xr.Dataset:
    """The parameter-wise scores of a cube, one per scalar parameter (summed over the explained
    inputs and outputs the cube may keep), labelled by tensor."""
    out = per_parameter(cube)
    out.attrs = {k: cube.attrs[k] for k in ("tensor_names", "parameter_score_definitions", "history_sha256",
                                            "units", "target", "n_steps")}
    return out


def same_label_share(scores: np.ndarray, train_labels: np.ndarray, test_labels: np.ndarray) -> float:
    """Of all positive influence ([train, test] scores > 0), the fraction carried by training
    samples whose label equals the test input's (class for the CNN, residue for the Transformer)."""
    positive = np.clip(scores, 0, None)
    same = train_labels[:, None] == test_labels[None, :]
    total = positive.sum()
    return float((positive * same).sum() / total) if total > 0 else float("nan")
