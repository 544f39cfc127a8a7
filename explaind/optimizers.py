"""The recorded optimizers' updates, written as one linear recurrence (docs/method.md §1).

Every supported optimizer (PyTorch semantics) is an instance of

    d_s  = ḡ_s + λ_c θ_s                       (gradient plus coupled L2 decay)
    m_s  = a_s m_{s−1} + b_s d_s                (momentum / first-moment buffer, m_{−1} = 0)
    Δθ_s = −η_s [ P_s ⊙ (c_s m_s + e_s d_s) + λ_d θ_s ]

with per-coordinate coefficients (they differ between parameter groups) and a recorded
diagonal preconditioner P_s:

    SGD, no momentum     a=0  b=0    c=0           e=1  P=1   λ_c=λ  λ_d=0
    SGD, momentum μ      a=μ  b=1−τ  c=1 (μ, nesterov) e=0 (1, nesterov)    (first step: a=0, b=1)
    SGD, μ = 0 once μ was not  a=1  b=0  c=0  e=1  (PyTorch leaves the buffer as it was)
    Adam                 a=β1 b=1−β1 c=1/(1−β1^t)  e=0  P=1⊘(√v_t/√(1−β2^t)+ε)  λ_c=λ
    AdamW                as Adam, but λ_c=0 and λ_d=λ (the multiplier 1−ηλ as torch rounds it)

Since ḡ_s = κ_s Σ_k w_{s,k} g_{s,k}, the update is linear in per-sample gradients, which is what
lets the engine split it exactly by training sample (κ_s is the recorded factor by which
gradient-norm clipping scaled step s's gradient, 1 without clipping; docs/method.md writes it
c_s, a name this module gives the recurrence's coefficient).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .errors import UnsupportedError


@dataclass
class StepCoefficients:
    """The recurrence's coefficients at one step, each a [D] vector over coordinates."""

    eta: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    c: torch.Tensor
    e: torch.Tensor
    precond: torch.Tensor
    coupled_decay: torch.Tensor
    decoupled_decay: torch.Tensor


def group_index(history, flat) -> torch.Tensor:
    """The [D] vector of each coordinate's parameter group, in the flat layout's order."""
    return torch.repeat_interleave(
        torch.tensor([history.group_of[n] for n in flat.layout.names], device=flat.device),
        torch.tensor(flat.layout.sizes, device=flat.device),
    )


def step_coefficients(
    kind: str,
    groups: list[dict],
    group_index: torch.Tensor,
    second_moment: torch.Tensor | None,
    started: Sequence[bool],
    dtype: torch.dtype,
    scalar_precision: torch.dtype = torch.float64,
) -> StepCoefficients:
    """Coefficients of step s from its recorded hyperparameters.

    `group_index` is the [D] vector of each coordinate's parameter group, `second_moment` the
    flat recorded v_t for Adam (None for SGD), `started` per group whether SGD's momentum buffer
    exists before step s (`sgd_buffers_started`). `scalar_precision`: the precision in which the
    optimizer multiplied the parameters by a Python number (decoupled_decay_rate).

    Every coefficient but the preconditioner is one number per group: they are computed per
    group and spread over the coordinates by one gather (a gather and a few ops per coefficient
    took 0.55 ms a step on the reference workload, most of a call's optimizer bookkeeping).
    """

    def vec(key_or_fn) -> torch.Tensor:  # one float64 value per group
        fn = key_or_fn if callable(key_or_fn) else (lambda g: float(g[key_or_fn]))
        return torch.tensor([fn(g) for g in groups], dtype=torch.float64, device=group_index.device)

    eta = vec("lr")
    zeros, ones = torch.zeros_like(eta), torch.ones_like(eta)
    if kind == "sgd":
        mu = vec("momentum")
        has_momentum = mu != 0
        nesterov = vec(lambda g: float(bool(g["nesterov"])))
        started = torch.tensor([bool(x) for x in started], device=eta.device)
        # PyTorch copies the first direction into a new buffer without dampening, and leaves an
        # existing buffer untouched at a step with momentum 0 (it counts again once μ is back)
        a = torch.where(started, mu, zeros)
        b = torch.where(started, 1 - vec("dampening"), ones)
        per_group = dict(
            eta=eta,
            a=torch.where(has_momentum, a, started.to(zeros.dtype)),
            b=torch.where(has_momentum, b, zeros),
            c=torch.where(has_momentum, torch.where(nesterov > 0, mu, ones), zeros),
            e=torch.where(has_momentum, nesterov, ones),
            coupled_decay=vec("weight_decay"),
            decoupled_decay=zeros,
        )
        precond = None
    elif kind in ("adam", "adamw"):
        beta1 = vec(lambda g: g["betas"][0])
        beta2 = vec(lambda g: g["betas"][1])
        t = vec("t")
        decay = vec("weight_decay")
        if kind == "adamw":
            decay = decoupled_decay_rate(eta, decay, scalar_precision)
        per_group = dict(
            eta=eta,
            a=beta1,
            b=1 - beta1,
            c=1 / (1 - beta1**t),
            e=zeros,
            coupled_decay=decay if kind == "adam" else zeros,
            decoupled_decay=decay if kind == "adamw" else zeros,
        )
        scale, eps = torch.stack([(1 - beta2**t).sqrt(), vec("eps")])[:, group_index]
        precond = 1.0 / (second_moment.to(torch.float64).sqrt() / scale + eps)
    else:
        raise UnsupportedError(f"unknown optimizer kind {kind!r} in the history")
    spread = torch.stack(list(per_group.values()))[:, group_index].to(dtype)
    coefficients = dict(zip(per_group, spread))
    coefficients["precond"] = torch.ones_like(spread[0]) if precond is None else precond.to(dtype)
    return StepCoefficients(**coefficients)


def decoupled_decay_rate(eta: torch.Tensor, decay: torch.Tensor, precision: torch.dtype) -> torch.Tensor:
    """λ_d such that η λ_d = 1 − (1 − ηλ), with the multiplier 1 − ηλ rounded to `precision` as
    torch's AdamW rounds it before multiplying θ by it.

    Its steps on the CPU (single-tensor, foreach and fused) and its single-tensor and foreach steps
    on a GPU multiply θ by that Python number cast to the parameters' compute precision (float32
    for float32 parameters, and for bfloat16 ones in the single-tensor and fused steps, where the
    CPU's foreach step casts it to bfloat16, which this does not model; in float64 it is 1 − ηλ
    rounded to float64). Close to 1 the float32 cast moves
    ηλ by up to 3e-8, a relative 1e-5 at ηλ = 3e-3: the same relative error of the decay at every
    coordinate and step, so its effect on an output (about φ_s·θ_s times it) adds up over the steps
    instead of averaging out like the rounding of θ (the reference workload's float32 run explained
    in float64: 2.5e-5 of its outputs' residual, 7.8e-6 with the cast modelled). The fused CUDA
    kernel's source (adam_math) subtracts lr·λ·θ in double instead: there this model misses by the
    cast, which stays below the update check's rounding floor."""
    exact = 1 - eta * decay
    rounded = exact.to(precision).to(exact.dtype)
    moved = eta != 0
    return torch.where(moved, (1 - rounded) / torch.where(moved, eta, 1), decay)


def sgd_buffers_started(history) -> list[list[bool]]:
    """Per step s and parameter group: whether SGD's momentum buffer exists before step s, i.e.
    an earlier step ran with momentum ≠ 0 (PyTorch creates it at the first such step)."""
    started = [False] * history.meta["n_groups"]
    rows = []
    for line in history.manifest:
        rows.append(list(started))
        if history.optimizer == "sgd":
            started = [was or g["momentum"] != 0 for was, g in zip(started, line["groups"])]
    return rows


class AggregateUpdate:
    """The recurrence on whole-batch gradients: the modelled −Δθ_s/η_s, step after step.

    Used by the update-reconstruction check (docs/method.md §1, check 1) and for the total update
    that parameter-wise scores need.
    """

    def __init__(self):
        self.momentum: torch.Tensor | None = None

    def step(self, k: StepCoefficients, batch_gradient: torch.Tensor | None, theta: torch.Tensor) -> torch.Tensor:
        """−Δθ_s/η_s for the batch gradient ḡ_s (None: the weight decay's own share r_s, its
        coupled part carried by a momentum of its own)."""
        d = k.coupled_decay * theta if batch_gradient is None else batch_gradient + k.coupled_decay * theta
        m = k.b * d if self.momentum is None else k.a * self.momentum + k.b * d
        self.momentum = m
        return k.precond * (k.c * m + k.e * d) + k.decoupled_decay * theta


def momentum_from_update(k: StepCoefficients, theta: torch.Tensor, delta: torch.Tensor,
                         direct: torch.Tensor | None = None) -> torch.Tensor:
    """The momentum buffer m_s solved from step s's recorded update (the recurrence above):
    m_s = (−Δθ_s/η_s − λ_d θ_s − P_s e_s d_s) / (P_s c_s), zero where c_s = 0 (no momentum).
    Needs η_s ≠ 0 wherever c_s ≠ 0, and d_s (`direct`) wherever e_s ≠ 0 too (nesterov)."""
    moving = k.c != 0
    if bool((moving & (k.eta == 0)).any()):
        raise ValueError("the momentum cannot be solved from an update with learning rate 0")
    rest = -delta / torch.where(moving, k.eta, torch.ones_like(k.eta)) - k.decoupled_decay * theta
    if direct is not None:
        rest = rest - k.precond * k.e * direct
    elif bool((moving & (k.e != 0)).any()):
        raise ValueError("a nesterov update holds the current gradient too: pass it as `direct`")
    return torch.where(moving, rest / (k.precond * torch.where(moving, k.c, torch.ones_like(k.c))), torch.zeros_like(rest))

