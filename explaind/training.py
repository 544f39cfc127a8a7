"""Seeded training loops for the paper's two models, optionally recording their history.

Each config's field names are the keys of its params.yaml section. The defaults are the CPU
profile (minutes on 2 cores, see docs/grokking_search.md); `Config.paper()` gives docs/method.md §3.
With history_dir set, every update is recorded by explaind's Recorder so the run can later be
decomposed exactly; the loss is cross-entropy with mean reduction on the model's
log-probabilities (log_softmax is idempotent, so this equals the NLL of the output).
save_config / load_config write and read the config.json next to a trained model, from which
the later stages rebuild the run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .data import load_image_pair, modular_addition
from .errors import ExplaindError, InputError
from .functional import compute_device, tensor_of
from .history import Recorder
from .models import ModAddTransformer, ResNet9

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def check_ranges(section: str, config, rules) -> None:
    """Refuse a config value out of range when the config is built, so that a pipeline stage stops
    before it deletes or trains anything; the message names the params.yaml key and the fix.
    rules: (key, whether its value is in range, the range in words)."""
    for key, ok, rule in rules:
        if not ok:
            raise InputError(f"{section}.{key} is {getattr(config, key)!r}, but it must be {rule}. Fix: set "
                             f"{section}.{key} in the params file to such a value")


@dataclass
class TransformerConfig:
    """Grokking run: addition mod p, one-layer Transformer, full-batch AdamW."""

    p: int = 43  # modulus; vocabulary is p + 2 tokens
    train_size: int = 568  # training pairs (a >= b), one full batch (60% of the 946 pairs)
    val_size: int = 378  # held-out pairs (all the others)
    only_a_ge_b: bool = True  # use only pairs with a >= b, as the paper
    data_seed: int = 0  # seed of the train/validation split
    d_model: int = 64  # residual stream width
    n_heads: int = 4  # attention heads (d_model must be divisible by n_heads)
    d_mlp: int = 128  # hidden width of the MLP
    lr: float = 1e-2  # AdamW learning rate (constant)
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.98  # AdamW second-moment decay
    eps: float = 1e-8  # AdamW epsilon
    weight_decay: float = 1.0  # AdamW decoupled weight decay
    max_steps: int = 3000  # stop here if the run has not generalised (see stop_val_acc) before
    stop_val_acc: float = 0.99  # stop once training accuracy is 100% and validation accuracy is at least this
    # (the last steps from 99% to 100% only polish, and every analysis stage pays per step)
    seed: int = 0  # seed of the parameter initialisation
    dtype: str = "float64"  # "float64" makes the decomposition exact to rounding; or "float32"

    def __post_init__(self):
        pairs = self.p * (self.p + 1) // 2 if self.only_a_ge_b else self.p**2
        check_ranges("train_transformer", self, (
            ("p", self.p >= 2, "at least 2"),
            ("train_size", self.train_size >= 1, "at least 1"),
            ("val_size", self.val_size >= 1, "at least 1: the run stops on validation accuracy"),
            ("val_size", self.train_size + self.val_size <= pairs,
             f"at most {pairs} - train_size: mod {self.p} has {pairs} pairs"),
            ("d_model", self.d_model >= 1, "at least 1"),
            ("n_heads", self.n_heads >= 1 and self.d_model % self.n_heads == 0,
             f"a divisor of d_model={self.d_model}"),
            ("d_mlp", self.d_mlp >= 1, "at least 1"),
            ("lr", self.lr > 0, "positive"),
            ("beta1", 0 <= self.beta1 < 1, "in [0, 1)"),
            ("beta2", 0 <= self.beta2 < 1, "in [0, 1)"),
            ("eps", self.eps > 0, "positive"),
            ("weight_decay", self.weight_decay >= 0, "at least 0"),
            ("max_steps", self.max_steps >= 0, "at least 0"),
            ("stop_val_acc", 0 < self.stop_val_acc <= 1,
             "in (0, 1]: the validation accuracy at which a run that has memorised stops"),
            ("dtype", self.dtype in DTYPES, f"one of {sorted(DTYPES)}"),
        ))

    @classmethod
    def paper(cls) -> "TransformerConfig":
        """docs/method.md §3: p = 113, 4,000 / 2,000 pairs, 64-wide, 4 heads, MLP 512, lr 1e-3, wd 4.0."""
        return cls(p=113, train_size=4000, val_size=2000, d_model=64, n_heads=4, d_mlp=512,
                   lr=1e-3, beta1=0.9, beta2=0.98, eps=1e-8, weight_decay=4.0, max_steps=5000,
                   stop_val_acc=1.0)


@dataclass
class CNNConfig:
    """Binary image classification with a BatchNorm-free ResNet-9 and momentum SGD."""

    dataset: Literal["digits", "cifar2"] = "digits"  # "digits" (shipped with scikit-learn) or "cifar2" (needs the archive)
    classes: tuple[int, int] = (3, 8)  # original labels of class 0 and class 1
    test_size: float = 0.3  # held-out fraction (digits only; CIFAR has its own test split)
    data_seed: int = 0  # seed of the digits train/test split
    width: int = 16  # ResNet-9 base width (64 in the paper)
    batch_size: int = 32  # mini-batch size; the last incomplete batch of an epoch is dropped
    epochs: int = 12  # passes over the training set
    lr: float = 0.1  # peak learning rate of the triangular schedule
    peak_epoch: float = 5.0  # epoch at which the learning rate peaks
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 5e-3  # SGD (coupled L2) weight decay
    flip: bool = True  # random horizontal flips of each batch
    seed: int = 0  # seed of initialisation, batch order and flips
    dtype: str = "float64"  # "float64" makes the decomposition exact to rounding; or "float32"

    def __post_init__(self):
        check_ranges("train_cnn", self, (
            ("dataset", self.dataset in ("digits", "cifar2"), "'digits' or 'cifar2'"),
            ("classes", len(self.classes) == 2 and len(set(self.classes)) == 2
             and all(0 <= c <= 9 for c in self.classes), "two different labels in 0 … 9"),
            ("test_size", 0 < self.test_size < 1, "in (0, 1)"),
            ("width", self.width >= 1, "at least 1"),
            ("batch_size", self.batch_size >= 1, "at least 1"),
            ("epochs", self.epochs >= 1, "at least 1"),
            ("lr", self.lr > 0, "positive"),
            ("peak_epoch", 0 < self.peak_epoch <= self.epochs, f"in (0, epochs={self.epochs}]"),
            ("momentum", 0 <= self.momentum < 1, "in [0, 1)"),
            ("weight_decay", self.weight_decay >= 0, "at least 0"),
            ("dtype", self.dtype in DTYPES, f"one of {sorted(DTYPES)}"),
        ))

    def check_data(self, data_dir: str | os.PathLike) -> None:
        """The ranges that depend on the dataset in data_dir: a batch no larger than the training
        images (the pipeline checks this with the parameters, before a stage empties its outputs)."""
        images = len(load_image_pair(data_dir, self.dataset, tuple(self.classes), self.test_size,
                                     self.data_seed).train_y)
        check_ranges("train_cnn", self, (
            ("batch_size", self.batch_size <= images,
             f"at most the {images} training images of {self.dataset} classes {list(self.classes)}"),
        ))

    @classmethod
    def paper(cls) -> "CNNConfig":
        """docs/method.md §3: CIFAR-2, width 64, batch 256, 12 epochs, lr peak 0.1 at epoch 5, wd 5e-3."""
        return cls(dataset="cifar2", classes=(3, 5), width=64, batch_size=256, epochs=12,
                   lr=0.1, peak_epoch=5.0, momentum=0.9, weight_decay=5e-3, flip=True)


# the training config, saved next to model.safetensors: the later stages rebuild the run from it
CONFIG_FILE = "config.json"


def save_config(config: Any, run_dir: str | os.PathLike) -> Path:
    """Write the training config next to the model, so later stages rebuild the same architecture."""
    path = Path(run_dir) / CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    values = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}
    path.write_text(json.dumps({"class": type(config).__name__, **values}, indent=2, sort_keys=True) + "\n")
    return path


def load_config(path: Path, name: str, cls: type) -> Any:
    """The training config a run folder's config.json holds, as save_config writes it: a JSON
    object with the config's class name under "class" and exactly the fields of `cls`."""
    fix = f"Fix: rerun the stage that wrote it (dvc repro train_{name}), or restore it from the DVC cache (dvc checkout)"
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{path} is not valid JSON ({error}); it should hold the run's training config. {fix}") from None
    if not isinstance(values, dict):
        raise InputError(f"{path} holds a JSON {type(values).__name__}, not an object of the training config's "
                         f"fields. {fix}")
    if "class" not in values:
        raise InputError(f"{path} lacks the key 'class' (the config's class, here {cls.__name__}). {fix}")
    kind = values.pop("class")
    if kind != cls.__name__:
        raise ExplaindError(f"{path} holds a {kind}, not a {cls.__name__}")
    fields = {field.name for field in dataclasses.fields(cls)}
    unknown, missing = sorted(set(values) - fields), sorted(fields - set(values))
    if unknown or missing:
        found = "; ".join(text for text in (f"unknown keys {unknown}" if unknown else "",
                                            f"missing keys {missing}" if missing else "") if text)
        raise InputError(f"{path} does not match {cls.__name__} ({found}): it was written by another version "
                         f"of explaind or edited. {fix}")
    if "classes" in values and isinstance(values["classes"], list):  # JSON has no tuples
        values["classes"] = tuple(values["classes"])
    try:
        return cls(**values)
    except (InputError, TypeError) as error:  # a value out of range or of another type
        raise InputError(f"{path} holds a config that is refused: {error}. {fix}") from None


@dataclass
class TrainResult:
    """The trained model, a per-evaluation log and summary metrics."""

    model: nn.Module
    log: pd.DataFrame  # step, train_loss, train_acc, val_loss, val_acc, param_norm
    metrics: dict[str, float]


class _NoRecorder:
    """Stands in for the Recorder when no history is wanted."""

    def __enter__(self) -> "_NoRecorder":
        return self

    def __exit__(self, *exc_info) -> None:
        return None

    def batch(self, indices: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        return None


def _recorder(
    history_dir: str | os.PathLike | None,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> Recorder | _NoRecorder:
    """The one place where training is attached to the history recorder."""
    if history_dir is None:
        return _NoRecorder()
    return Recorder(history_dir, model, optimizer, loss="cross_entropy", reduction="mean", scheduler=scheduler)


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise InputError(f"dtype {name!r} is not supported. Fix: use one of {sorted(DTYPES)}")
    return DTYPES[name]


def _param_norm(model: nn.Module) -> float:
    return torch.sqrt(sum((p.detach() ** 2).sum() for p in model.parameters())).item()


@torch.no_grad()
def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of model on (x, y), in batches to bound memory."""
    total_loss, correct = 0.0, 0
    for start in range(0, len(y), batch_size):
        out = model(x[start : start + batch_size])
        total_loss += F.cross_entropy(out, y[start : start + batch_size], reduction="sum").item()
        correct += (out.argmax(-1) == y[start : start + batch_size]).sum().item()
    return total_loss / len(y), correct / len(y)


def first_step(log: pd.DataFrame, column: str, threshold: float) -> float:
    """First logged step at which `column` reaches `threshold` (NaN if it never does)."""
    hits = log.loc[log[column] >= threshold, "step"]
    return float(hits.iloc[0]) if len(hits) else float("nan")


def _training_subset(train_indices, n_train: int) -> torch.Tensor:
    """The dataset indices a run trains on: all of them, or a subset (datamodel retraining)."""
    if train_indices is None:
        return torch.arange(n_train)
    indices = tensor_of(train_indices, "train_indices").long().reshape(-1)
    if len(indices) == 0 or indices.min() < 0 or indices.max() >= n_train or len(indices.unique()) != len(indices):
        raise InputError(f"train_indices must be distinct dataset indices in 0 … {n_train - 1} (the training "
                         f"set), at least one; got {len(indices)} values. Fix: pass a subset of range({n_train})")
    return indices


def _overwrite_parameters(model: nn.Module, values: Mapping[str, torch.Tensor]) -> None:
    """Copy `values` into the model's parameters of the same names (cast to their dtype)."""
    params = dict(model.named_parameters())
    unknown = sorted(set(values) - set(params))
    if unknown:
        raise InputError(f"initial_state names {unknown}, which are not parameters of the model; "
                         f"use names from {list(params)}")
    with torch.no_grad():
        for name, value in values.items():
            if tuple(value.shape) != tuple(params[name].shape):
                raise InputError(f"initial_state[{name!r}] has shape {tuple(value.shape)}, the model's "
                                 f"parameter {tuple(params[name].shape)}: copy from the same architecture")
            params[name].copy_(value)


def _seed_global_generators(seed: int) -> None:
    """torch's, numpy's and Python's global generators: the loop draws from torch's alone, but the
    Recorder stores all three in each resume state, so a history is byte for byte the same in
    every run only if none of them starts from the operating system's entropy."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def train_transformer(
    cfg: TransformerConfig,
    history_dir: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    train_indices=None,
    initial_state: Mapping[str, torch.Tensor] | None = None,
) -> TrainResult:
    """Full-batch AdamW on addition mod p until training accuracy is 100% and validation
    accuracy reaches `cfg.stop_val_acc` (or `cfg.max_steps`).

    Log row `step` holds the metrics of the parameters after `step` updates (row 0: the
    initialisation). Metrics include t_mem (first step with 100% training accuracy) and
    t_val_95 / t_val_100 (first steps with >= 95% / 100% validation accuracy).
    train_indices: train on these training pairs only (same initialisation; datamodels).
    initial_state: parameters (by name) that replace the seeded initialisation before training,
    e.g. layers copied from a checkpoint (retraining experiments); the others keep it.
    """
    dtype, device = _dtype(cfg.dtype), compute_device(device)
    data = modular_addition(cfg.p, cfg.train_size, cfg.val_size, cfg.data_seed, cfg.only_a_ge_b)
    indices = _training_subset(train_indices, len(data.train_targets)).to(device)
    x, y = data.train_inputs.to(device)[indices], data.train_targets.to(device)[indices]
    x_val, y_val = data.val_inputs.to(device), data.val_targets.to(device)

    _seed_global_generators(cfg.seed)
    model = ModAddTransformer(cfg.p, cfg.d_model, cfg.n_heads, cfg.d_mlp).to(device=device, dtype=dtype)
    if initial_state is not None:
        _overwrite_parameters(model, initial_state)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  eps=cfg.eps, weight_decay=cfg.weight_decay)
    rows = []
    start = time.perf_counter()
    with _recorder(history_dir, model, optimizer) as recorder:
        bar = tqdm(range(cfg.max_steps + 1), desc="transformer", disable=not progress)
        for step in bar:
            out = model(x)
            loss = F.cross_entropy(out, y)
            train_acc = (out.argmax(-1) == y).double().mean().item()
            val_loss, val_acc = _evaluate(model, x_val, y_val)
            rows.append((step, loss.item(), train_acc, val_loss, val_acc, _param_norm(model)))
            if step % 50 == 0:
                bar.set_postfix(train_acc=f"{train_acc:.3f}", val_acc=f"{val_acc:.3f}")
            # Stopping before the update keeps the recorded history and the returned model in step.
            if (train_acc == 1.0 and val_acc >= cfg.stop_val_acc) or step == cfg.max_steps:
                break
            optimizer.zero_grad()
            loss.backward()
            recorder.batch(indices, x, y)
            optimizer.step()
        bar.close()
    log = pd.DataFrame(rows, columns=["step", "train_loss", "train_acc", "val_loss", "val_acc", "param_norm"])
    metrics = {
        "steps": float(log["step"].iloc[-1]),
        "train_loss": float(log["train_loss"].iloc[-1]),
        "train_acc": float(log["train_acc"].iloc[-1]),
        "val_loss": float(log["val_loss"].iloc[-1]),
        "val_acc": float(log["val_acc"].iloc[-1]),
        "t_mem": first_step(log, "train_acc", 1.0),
        "t_val_95": first_step(log, "val_acc", 0.95),
        "t_val_100": first_step(log, "val_acc", 1.0),
        "wall_time_s": time.perf_counter() - start,
    }
    return TrainResult(model, log, metrics)


def triangular_lr(steps_per_epoch: int, epochs: int, peak_epoch: float):
    """LambdaLR factor: linear from ~0 up to 1 at peak_epoch, then linear down to ~0.

    Evaluated at step + 1 on [0, peak, total + 1] so no step gets a learning rate of exactly
    zero (a zero-size step would make the update check -Δθ/η undefined).
    """
    total = steps_per_epoch * epochs
    peak = peak_epoch * steps_per_epoch
    if not 0 < peak_epoch <= epochs:
        raise InputError(f"peak_epoch={peak_epoch} must lie in (0, epochs={epochs}]: the learning rate peaks "
                         "within the run. Fix: pass a peak_epoch in that range")
    return lambda step: float(np.interp(step + 1, [0, peak, total + 1], [0.0, 1.0, 0.0]))


def train_cnn(
    cfg: CNNConfig,
    data_dir: str | os.PathLike,
    history_dir: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    train_indices=None,
) -> TrainResult:
    """Mini-batch momentum SGD with a triangular learning rate and random horizontal flips.

    Batch order, flips and initialisation all derive from cfg.seed, so two runs are identical.
    The recorded inputs are the flipped ones that were actually trained on. The log has one
    row per epoch end, whose train_* average that epoch's (flipped) batches, plus a row for
    step 0 measured on the whole training set; val_* are measured on the test split.
    train_indices: train on these training images only, with the same initialisation, epochs and
    schedule shape (fewer steps per epoch); the history records dataset indices (datamodels).
    """
    dtype, device = _dtype(cfg.dtype), compute_device(device)
    data = load_image_pair(data_dir, cfg.dataset, tuple(cfg.classes), cfg.test_size, cfg.data_seed)
    subset = _training_subset(train_indices, len(data.train_y))
    x, y = data.train_x[subset].to(device=device, dtype=dtype), data.train_y[subset].to(device)
    x_test, y_test = data.test_x.to(device=device, dtype=dtype), data.test_y.to(device)
    steps_per_epoch = len(y) // cfg.batch_size
    if steps_per_epoch == 0:
        raise InputError(f"batch_size={cfg.batch_size} exceeds the {len(y)} training images (the last incomplete "
                         f"batch of an epoch is dropped, so no step would run). Fix: use a batch_size of at most {len(y)}")

    _seed_global_generators(cfg.seed)
    model = ResNet9(x.shape[1], 2, cfg.width).to(device=device, dtype=dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, triangular_lr(steps_per_epoch, cfg.epochs, cfg.peak_epoch))
    generator = torch.Generator().manual_seed(cfg.seed)  # CPU generator: same draws on any device

    def log_row(step: int, train_loss: float, train_acc: float) -> tuple:
        return (step, train_loss, train_acc, *_evaluate(model, x_test, y_test), _param_norm(model))

    rows = [log_row(0, *_evaluate(model, x, y))]
    start = time.perf_counter()
    step = 0
    with _recorder(history_dir, model, optimizer, scheduler) as recorder:
        bar = tqdm(total=steps_per_epoch * cfg.epochs, desc="cnn", disable=not progress)
        for _ in range(cfg.epochs):
            order = torch.randperm(len(y), generator=generator)
            losses, correct = [], 0
            for batch in order[: steps_per_epoch * cfg.batch_size].view(steps_per_epoch, cfg.batch_size):
                inputs = x[batch.to(device)]
                if cfg.flip:
                    flipped = torch.rand(len(batch), generator=generator) < 0.5
                    inputs = torch.where(flipped.to(device)[:, None, None, None], inputs.flip(-1), inputs)
                targets = y[batch.to(device)]
                optimizer.zero_grad()
                out = model(inputs)
                loss = F.cross_entropy(out, targets)
                loss.backward()
                recorder.batch(subset[batch].to(device), inputs, targets)
                optimizer.step()
                scheduler.step()
                step += 1
                losses.append(loss.item())
                correct += (out.argmax(-1) == targets).sum().item()
                bar.update()
            rows.append(log_row(step, float(np.mean(losses)), correct / (steps_per_epoch * cfg.batch_size)))
            bar.set_postfix(train_acc=f"{rows[-1][2]:.3f}", test_acc=f"{rows[-1][4]:.3f}")
        bar.close()
    log = pd.DataFrame(rows, columns=["step", "train_loss", "train_acc", "val_loss", "val_acc", "param_norm"])
    train_loss, train_acc = _evaluate(model, x, y)
    test_loss, test_acc = _evaluate(model, x_test, y_test)
    metrics = {
        "steps": float(step),
        "train_loss": train_loss,
        "train_acc": train_acc,
        "test_loss": test_loss,
        "test_acc": test_acc,
        "wall_time_s": time.perf_counter() - start,
    }
    return TrainResult(model, log, metrics)
