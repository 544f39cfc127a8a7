"""The optimizers' linear recurrence (explaind.optimizers) against PyTorch's own optimizers."""

from __future__ import annotations

import pytest
import torch

from explaind.optimizers import AggregateUpdate, momentum_from_update, step_coefficients

SIZES = (3, 2)  # two parameter tensors, one per group
GROUPS = torch.repeat_interleave(torch.arange(len(SIZES)), torch.tensor(SIZES))  # each coordinate's group


def torch_run(cls, groups: list[dict], steps: int, momenta=None):
    """Steps of a torch optimizer on random gradients: per step θ, its gradient, Δθ, the recorded
    hyperparameters (Adam's t added as the Recorder adds it), Adam's v (max v with amsgrad) and
    torch's own momentum buffer / first moment after the step, flat [D] each. `momenta`: SGD's
    momentum of every group at each step."""
    torch.manual_seed(0)
    params = [torch.randn(n, dtype=torch.float64, requires_grad=True) for n in SIZES]
    optimizer = cls([{"params": [p], **g} for p, g in zip(params, groups)])
    rows = []
    for s in range(steps):
        if momenta is not None:
            for g in optimizer.param_groups:
                g["momentum"] = momenta[s]
        theta = torch.cat([p.detach() for p in params]).clone()
        for p in params:
            p.grad = torch.randn_like(p)
        gradient = torch.cat([p.grad for p in params]).clone()
        optimizer.step()
        states = [optimizer.state[p] for p in params]
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        second = buffer = None
        if "betas" in hyper[0]:
            for h, state in zip(hyper, states):
                h["t"] = int(state["step"])
            second = torch.cat([st["max_exp_avg_sq" if h["amsgrad"] else "exp_avg_sq"] for h, st in zip(hyper, states)])
            buffer = torch.cat([st["exp_avg"] for st in states])
        elif states[0].get("momentum_buffer") is not None:
            buffer = torch.cat([st["momentum_buffer"] for st in states])
        delta = torch.cat([p.detach() for p in params]) - theta
        rows.append((theta, gradient, delta, hyper, second, buffer))
    return rows


@pytest.mark.parametrize("cls, groups, momenta", [
    (torch.optim.SGD, [dict(lr=0.1, momentum=0.9, dampening=0.3, weight_decay=0.02),
                       dict(lr=0.05, momentum=0.9, dampening=0.3)], (0.0, 0.9, 0.0, 0.5, 0.9)),
    (torch.optim.SGD, [dict(lr=0.1, momentum=0.8, nesterov=True, weight_decay=0.01),
                       dict(lr=0.3, momentum=0.8, nesterov=True)], None),
    (torch.optim.Adam, [dict(lr=0.02, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.05, amsgrad=True),
                        dict(lr=0.01, betas=(0.7, 0.9), eps=1e-2)], None),
    (torch.optim.AdamW, [dict(lr=0.02, betas=(0.85, 0.97), eps=1e-3, weight_decay=0.2),
                         dict(lr=0.04, betas=(0.85, 0.97), eps=1e-3, weight_decay=0.0, amsgrad=True)], None),
], ids=["sgd_momentum_schedule", "sgd_nesterov", "adam_amsgrad", "adamw"])
def test_the_recurrence_is_torchs_step_and_solves_torchs_buffer(cls, groups, momenta):
    """At every step the recurrence's −Δθ/η is torch's update, and the buffer solved from the
    update (a replay's starting momentum) is torch's momentum buffer / first moment. Large eps
    make the preconditioner's eps and bias correction visible beyond rounding."""
    kind = cls.__name__.lower()
    aggregate = AggregateUpdate()
    started = [False] * len(groups)
    for theta, gradient, delta, hyper, second, buffer in torch_run(cls, groups, 5, momenta):
        k = step_coefficients(kind, hyper, GROUPS, second, started, torch.float64)
        torch.testing.assert_close(k.eta * aggregate.step(k, gradient, theta), -delta, rtol=1e-12, atol=1e-15)
        moving = k.c != 0
        if moving.any():
            solved = momentum_from_update(k, theta, delta, gradient + k.coupled_decay * theta)
            torch.testing.assert_close(solved[moving], buffer[moving], rtol=1e-10, atol=1e-13)
        started = [was or h.get("momentum", 0) != 0 for was, h in zip(started, hyper)]


def test_a_momentum_the_update_does_not_show_is_refused():
    """The buffer is solved as (−Δθ/η − …) / (P·c): at learning rate 0 the update shows nothing
    of it, and a nesterov update holds the current gradient beside it."""
    def sgd(lr, nesterov):
        group = dict(lr=lr, momentum=0.9, dampening=0.0, nesterov=nesterov, weight_decay=0.0)
        return step_coefficients("sgd", [group, group], GROUPS, None, [True, True], torch.float64)

    theta, delta = torch.ones(sum(SIZES), dtype=torch.float64), torch.zeros(sum(SIZES), dtype=torch.float64)
    with pytest.raises(ValueError, match="^the momentum cannot be solved from an update with learning rate 0$"):
        momentum_from_update(sgd(0.0, False), theta, delta)
    with pytest.raises(ValueError, match="nesterov update holds the current gradient too: pass it as `direct`"):
        momentum_from_update(sgd(0.1, True), theta, delta)
    assert torch.equal(momentum_from_update(sgd(0.1, True), theta, delta, direct=torch.zeros_like(theta)),
                       torch.zeros_like(theta))
