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


@pytest.mark.parametrize("implementation", [{}, {"foreach": True}, {"fused": True}],
                         ids=["single_tensor", "foreach", "fused"])
def test_adamw_decay_is_modelled_with_the_multiplier_torch_rounds(implementation):
    """A step with zero gradients is AdamW's decay alone: torch multiplies float32 θ by 1 − ηλ cast
    to float32, so θ + the modelled Δθ, rounded to float32, is torch's θ_{s+1} bit for bit
    (hand-derived: m = 0, so the Adam step adds an exact 0). The exact multiplier misses about a
    quarter of the coordinates by a rounding step: 1 − ηλ is far from a float32 number."""
    torch.manual_seed(0)
    lr, decay = 3e-3, 1.0
    param = (torch.rand(100_000) * 4 - 2).requires_grad_()
    theta = param.detach().double()
    optimizer = torch.optim.AdamW([param], lr=lr, weight_decay=decay, **implementation)
    param.grad = torch.zeros_like(param)
    optimizer.step()
    hyper = [dict(lr=lr, weight_decay=decay, betas=(0.9, 0.999), eps=1e-8, amsgrad=False, t=1)]
    groups = torch.zeros(len(theta), dtype=torch.long)

    def stepped(precision):
        k = step_coefficients("adamw", hyper, groups, torch.zeros_like(theta), [False], torch.float64, precision)
        return (theta - k.eta * AggregateUpdate().step(k, torch.zeros_like(theta), theta)).float()

    assert torch.equal(stepped(torch.float32), param.detach())
    assert (stepped(torch.float64) != param.detach()).float().mean() > 0.2
