"""Tiny smooth models and recorded training loops shared by the engine / history / refusal tests.

Everything here is plain PyTorch: the models, the data, the optimizers and the loops. The loop
records with `explaind.Recorder` and also keeps its own ground truth (the parameters after every
step, the learning rate each group used, the batches), which the independent brute force in
`brute_force.py` consumes. Models use smooth activations only (tanh, GELU, softplus, average
pooling, softmax attention), so Gauss–Legendre quadrature converges to rounding level; ReLU is
available for the tests of explain(breakpoints=True).

`Run.explain` computes on the device named by the environment variable EXPLAIND_TEST_DEVICE
(default "cpu"): `EXPLAIND_TEST_DEVICE=cuda pytest tests/test_engine.py` compares the CUDA
path with the same float64 brute force on the CPU.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import explaind as ex

DEVICE = os.environ.get("EXPLAIND_TEST_DEVICE", "cpu")
ACTIVATIONS = {"tanh": torch.tanh, "gelu": F.gelu, "softplus": F.softplus, "relu": F.relu}  # relu: kinks


# --------------------------------------------------------------------------- models


class MLP(nn.Module):
    def __init__(self, d_in: int = 4, widths=(6,), d_out: int = 3, act: str = "tanh"):
        super().__init__()
        sizes = [d_in, *widths]
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.out = nn.Linear(sizes[-1], d_out)
        self.act = act

    def forward(self, x):
        for layer in self.hidden:
            x = ACTIVATIONS[self.act](layer(x))
        return self.out(x)


class SlopedMLP(MLP):
    """An MLP whose inputs first pass an nn.PReLU with a trained slope per feature: a kink at each
    input's 0, which no step moves (the inputs are data), so the brute force's quadrature over
    whole steps stays exact."""

    def __init__(self, d_in: int = 4, **kwargs):
        super().__init__(d_in, **kwargs)
        self.slope = nn.PReLU(d_in, init=0.3)

    def forward(self, x):
        return super().forward(self.slope(x))


class Bagged(nn.Module):
    """nn.EmbeddingBag (mean over each sequence of 3 tokens from a vocabulary of 5) → tanh → linear."""

    def __init__(self, vocab: int = 5, d: int = 6):
        super().__init__()
        self.bag = nn.EmbeddingBag(vocab, d, mode="mean")
        self.out = nn.Linear(d, vocab)

    def forward(self, tokens):
        return self.out(torch.tanh(self.bag(tokens)))


class CNN(nn.Module):
    """conv 1→3 (3×3) → softplus → 2×2 average pooling → linear 12→3, on 1×6×6 images."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        return self.fc(self.pool(F.softplus(self.conv(x))).flatten(1))


class TinyTransformer(nn.Module):
    """One smooth attention layer (2 heads, causal softmax attention, GELU MLP), no LayerNorm,
    on sequences of 3 tokens from a vocabulary of 5; logits at the last position."""

    def __init__(self, vocab: int = 5, seq: int = 3, d: int = 8, heads: int = 2, d_mlp: int = 8):
        super().__init__()
        self.heads, self.dh = heads, d // heads
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(0.3 * torch.randn(seq, d))
        self.attn = nn.ModuleDict({
            "q": nn.Linear(d, d, bias=False),
            "k": nn.Linear(d, d, bias=False),
            "v": nn.Linear(d, d, bias=False),
            "o": nn.Linear(d, d),
        })
        self.mlp_in = nn.Linear(d, d_mlp)
        self.mlp_out = nn.Linear(d_mlp, d)
        self.unembed = nn.Linear(d, vocab, bias=False)
        self.register_buffer("causal", torch.ones(seq, seq).tril().bool())

    def forward(self, tokens):
        h = self.embed(tokens) + self.pos
        b, n, d = h.shape

        def split(t):
            return t.view(b, n, self.heads, self.dh).transpose(1, 2)

        q, k, v = (split(self.attn[key](h)) for key in ("q", "k", "v"))
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.dh)
        scores = scores.masked_fill(~self.causal, -1e9)
        mixed = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)
        h = h + self.attn["o"](mixed)
        h = h + self.mlp_out(F.gelu(self.mlp_in(h)))
        return self.unembed(h[:, -1])


def make_model(name: str, seed: int, dtype=torch.float64, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    model = {"mlp": MLP, "prelu": SlopedMLP, "bag": Bagged, "cnn": CNN, "transformer": TinyTransformer}[name](**kwargs)
    return model.to(dtype)


def make_data(name: str, n_train: int, n_test: int, seed: int, dtype=torch.float64, d_in: int = 4):
    """(train inputs, train targets, test inputs, test targets) for a model kind."""
    g = torch.Generator().manual_seed(1000 + seed)
    n = n_train + n_test
    if name in ("mlp", "prelu"):
        x = torch.randn(n, d_in, generator=g, dtype=torch.float64)
        y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 0.8).long()
    elif name == "cnn":
        x = torch.randn(n, 1, 6, 6, generator=g, dtype=torch.float64)
        y = (x[:, 0, :3].mean((1, 2)) > 0).long() + (x[:, 0, 3:, 3:].mean((1, 2)) > 0.3).long()
    else:
        x = torch.randint(0, 5, (n, 3), generator=g)
        y = (x[:, 0] + x[:, 1]) % 5
    if x.is_floating_point():
        x = x.to(dtype)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


# --------------------------------------------------------------------------- optimizers

# hyperparameters of each optimizer variant (the learning rate of group 0)
OPTIMIZERS = {
    "sgd": ("SGD", dict(lr=0.2)),
    "sgd_momentum": ("SGD", dict(lr=0.1, momentum=0.9, dampening=0.3, weight_decay=0.02)),
    "sgd_nesterov": ("SGD", dict(lr=0.1, momentum=0.8, nesterov=True, weight_decay=0.01)),
    "adam": ("Adam", dict(lr=0.02, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.05, amsgrad=True)),
    "adamw": ("AdamW", dict(lr=0.02, betas=(0.85, 0.97), eps=1e-7, weight_decay=0.2)),
}

# the second parameter group's overrides, for the two-group cases
SECOND_GROUP = {"lr": 0.5, "weight_decay": 0.0}


def optimizer_spec(opt: str, groups: int, lr_scale: float = 1.0, overrides: dict | None = None):
    """(torch class name, per-group hyperparameters), the defaults of PyTorch filled in."""
    cls_name, hyper = OPTIMIZERS[opt]
    hyper = {**hyper, **(overrides or {})}
    hyper["lr"] = hyper["lr"] * lr_scale
    if cls_name == "SGD":
        full = dict(lr=hyper["lr"], momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False)
    else:
        full = dict(lr=hyper["lr"], betas=(0.9, 0.999), eps=1e-8, amsgrad=False,
                    weight_decay=0.0 if cls_name == "Adam" else 1e-2)
    full.update({k: v for k, v in hyper.items() if k != "lr"})
    specs = [full]
    if groups == 2:
        second = dict(full)
        second["lr"] = full["lr"] * SECOND_GROUP["lr"]
        second["weight_decay"] = SECOND_GROUP["weight_decay"] if full["weight_decay"] == 0 else full["weight_decay"] * 3
        specs.append(second)
    return cls_name, specs


def build_optimizer(model: nn.Module, cls_name: str, group_specs: list[dict]):
    params = [p for p in model.parameters() if p.requires_grad]
    if len(group_specs) == 1:
        groups = [{"params": params, **group_specs[0]}]
    else:  # first half of the tensors in group 0, the rest in group 1
        half = len(params) // 2
        groups = [{"params": params[:half], **group_specs[0]}, {"params": params[half:], **group_specs[1]}]
    return getattr(torch.optim, cls_name)(groups)


def build_scheduler(optimizer, schedule: str | None):
    if schedule is None:
        return None
    if schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
    if schedule == "lambda":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=decay_schedule)
    raise ValueError(schedule)


def decay_schedule(step: int) -> float:
    return 1.0 / (1.0 + 0.25 * step)


# --------------------------------------------------------------------------- losses


def smooth_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A custom per-sample loss: cross-entropy plus a penalty on the logits' size."""
    return F.cross_entropy(out, y, reduction="none") + 0.05 * out.pow(2).sum(-1)


def per_sample_loss(name: str):
    if name == "custom":
        return smooth_loss
    if name == "cross_entropy":
        return lambda out, y: F.cross_entropy(out, y, reduction="none")
    raise ValueError(name)


# --------------------------------------------------------------------------- a recorded run


@dataclass(frozen=True)
class Case:
    model: str = "mlp"
    opt: str = "sgd"
    reduction: str = "mean"
    loss: str = "cross_entropy"
    schedule: str | None = None
    groups: int = 1
    steps: int = 6
    batch: int = 4
    n_train: int = 10
    n_test: int = 3
    seed: int = 0
    dtype: torch.dtype = torch.float64
    lr_scale: float = 1.0
    widths: tuple = (6,)
    act: str = "tanh"
    overrides: tuple = ()  # extra optimizer hyperparameters as (key, value) pairs
    clip: float | None = None  # max_norm of rec.clip_grad_norm_ at every step (None: no clipping)

    def model_kwargs(self) -> dict:
        return {"widths": self.widths, "act": self.act} if self.model in ("mlp", "prelu") else {}

    def fresh_model(self, seed: int | None = None) -> nn.Module:
        return make_model(self.model, self.seed if seed is None else seed, self.dtype, **self.model_kwargs())

    def with_(self, **changes) -> "Case":
        return replace(self, **changes)


@dataclass
class Run:
    """A recorded run and the loop's own account of it (for the brute force)."""

    case: Case
    path: Path
    model: nn.Module
    train_x: torch.Tensor
    train_y: torch.Tensor
    train_ids: torch.Tensor  # dataset index of each row of train_x
    test_x: torch.Tensor
    test_y: torch.Tensor
    cls_name: str
    group_specs: list[dict]
    group_of_tensor: list[int]  # parameter group of each trainable tensor (named_parameters order)
    thetas: list[torch.Tensor] = field(default_factory=list)  # flat θ_0 … θ_N
    lrs: list[list[float]] = field(default_factory=list)  # lr of each group at each step
    batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)

    @property
    def loss_fn(self):
        return per_sample_loss(self.case.loss)

    @property
    def explain_loss(self):
        return smooth_loss if self.case.loss == "custom" else None

    def explain(self, **kwargs):
        kwargs.setdefault("progress", False)
        kwargs.setdefault("loss", self.explain_loss)
        kwargs.setdefault("device", DEVICE)
        return ex.explain(self.path, self.model, self.test_x, self.test_y, **kwargs)


def dataset_ids(n: int) -> torch.Tensor:
    """Dataset indices of the training rows: not 0 … n−1, so that index mapping is tested."""
    return 5 + 3 * torch.arange(n).flip(0)


def batch_order(n_train: int, batch: int, steps: int, seed: int) -> list[torch.Tensor]:
    """Shuffled mini-batches (rows of the training set), reshuffled each epoch, last one short."""
    g = torch.Generator().manual_seed(2000 + seed)
    out: list[torch.Tensor] = []
    while len(out) < steps:
        perm = torch.randperm(n_train, generator=g)
        out.extend(perm.split(batch))
    return out[:steps]


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad]).clone()


def train(case: Case, path: Path, *, check_every: int = 1) -> Run:
    model = case.fresh_model()
    x, y, tx, ty = make_data(case.model, case.n_train, case.n_test, case.seed, case.dtype)
    ids = dataset_ids(case.n_train)
    cls_name, specs = optimizer_spec(case.opt, case.groups, case.lr_scale, dict(case.overrides))
    optimizer = build_optimizer(model, cls_name, specs)
    scheduler = build_scheduler(optimizer, case.schedule)
    group_of = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
    run = Run(case, Path(path), model, x, y, ids, tx, ty, cls_name, specs,
              [group_of[id(p)] for p in model.parameters() if p.requires_grad])
    loss_fn = run.loss_fn
    rec_loss = smooth_loss if case.loss == "custom" else "cross_entropy"
    run.thetas.append(flat(model))
    with ex.Recorder(path, model, optimizer, loss=rec_loss, reduction=case.reduction,
                     scheduler=scheduler, check_every=check_every) as rec:
        for rows in batch_order(case.n_train, case.batch, case.steps, case.seed):
            xb, yb = x[rows], y[rows]
            optimizer.zero_grad()
            losses = loss_fn(model(xb), yb)
            (losses.mean() if case.reduction == "mean" else losses.sum()).backward()
            rec.batch(ids[rows], xb, yb)
            if case.clip is not None:
                rec.clip_grad_norm_(case.clip)
            run.lrs.append([g["lr"] for g in optimizer.param_groups])
            run.batches.append((ids[rows], xb, yb))
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            run.thetas.append(flat(model))
    return run
