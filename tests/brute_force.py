"""An independent, slow reference implementation of the exact decomposition (docs/method.md §1).

Nothing here imports explaind. It works on one flat float64 parameter vector:
- the optimizer is unrolled by hand from PyTorch's documented update rules (torch.optim.SGD,
  Adam, AdamW), with a separate momentum buffer for every (gradient step i, training sample k)
  pair, so that the share U[s, i, k] of update step s that comes from sample k's gradient taken
  at step i is explicit;
- per-sample gradients come from one autograd call per sample;
- Jacobians are materialised with torch.autograd.functional.jacobian on the flat vector;
- the path integral uses numpy's Gauss–Legendre nodes (10 by default).

Both step conventions then follow by summation over i (update step s) or over s (gradient
step i). The weight decay is handled as one more "sample" (column M of U); AdamW's decoupled
decay acts at its own step in both conventions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call


@dataclass
class Reference:
    train_ids: np.ndarray  # sorted dataset indices: the order of the k axis
    thetas: torch.Tensor  # [S+1, D], unrolled by hand
    initial: torch.Tensor  # f(θ_0) on the test inputs, [T, O]
    final: torch.Tensor  # f(θ_N), [T, O]
    psi: torch.Tensor  # [S (update step), S (gradient step), M+1, T, O, D]; column M: decay
    decoupled: torch.Tensor  # [S, T, O, D]: AdamW's decoupled decay share of step s
    tensor_of: np.ndarray  # [D]: which tensor (named_parameters order) each coordinate is in
    names: list[str]

    # --------------------------------------------------------------- the 5-D cubes

    def masks(self, components: dict[str, list[str]]) -> torch.Tensor:
        """[P, D] 0/1 masks from component -> tensor names."""
        out = torch.zeros(len(components), len(self.tensor_of), dtype=torch.float64)
        for p, names in enumerate(components.values()):
            for n in names:
                out[p, torch.as_tensor(self.tensor_of == self.names.index(n))] = 1.0
        return out

    def cube(self, convention: str, components: dict[str, list[str]] | None = None):
        """(A [step, component, train, test, output], R [step, component, test, output])."""
        components = components or {n: [n] for n in self.names}
        mask = self.masks(components)
        m = len(self.train_ids)
        if convention == "update":
            per_step = self.psi.sum(1)  # sum over gradient steps: [S, M+1, T, O, D]
        elif convention == "gradient":
            per_step = self.psi.sum(0)  # sum over update steps: [S(i), M+1, T, O, D]
        else:
            raise ValueError(convention)
        a = torch.einsum("skxoj,pj->spkxo", per_step[:, :m], mask)
        r = torch.einsum("sxoj,pj->spxo", per_step[:, m] + self.decoupled, mask)
        return a.numpy(), r.numpy()

    def window(self, start: int, stop: int, first: int, components: dict[str, list[str]] | None = None):
        """The update steps start ≤ s < stop, with the gradients of steps ≥ first split by sample
        and everything earlier summed: (A [component, train, test, output], R [component, test,
        output], C [component, test, output] the earlier steps' share)."""
        components = components or {n: [n] for n in self.names}
        mask = self.masks(components)
        m = len(self.train_ids)
        split = self.psi[start:stop, first:].sum((0, 1))  # [M+1, T, O, D]
        early = self.psi[start:stop, :first].sum((0, 1, 2))  # [T, O, D]
        a = torch.einsum("kxoj,pj->pkxo", split[:m], mask)
        r = torch.einsum("xoj,pj->pxo", split[m] + self.decoupled[start:stop].sum(0), mask)
        c = torch.einsum("xoj,pj->pxo", early, mask)
        return a.numpy(), r.numpy(), c.numpy()

    def parameter_scores(self, convention: str = "update", keep: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
        """docs/method.md §2, weight decay excluded, per coordinate in named_parameters order, summed over
        the test and output dims not in `keep` after |·| is taken per (test, output)."""
        m = len(self.train_ids)
        samples = self.psi[:, :, :m].sum(2)  # [S, S, T, O, D]
        total = samples.sum((0, 1))  # Σ_s Σ_k ψ: [T, O, D]
        per_step = samples.sum(1) if convention == "update" else samples.sum(0)
        summed = tuple(i for i, d in enumerate(("test", "output")) if d not in keep)
        scores = {"parameter_score": total.abs(), "parameter_score_signed": total,
                  "parameter_score_stepwise_abs": per_step.abs().sum(0)}
        return {key: values.numpy().sum(summed) for key, values in scores.items()}


def _functional(model: torch.nn.Module):
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = [n for n, _ in named]
    shapes = [tuple(p.shape) for _, p in named]
    sizes = [int(np.prod(s)) for s in shapes]
    constants = {n: t.detach().to(torch.float64) if t.is_floating_point() else t.detach()
                 for n, t in list(model.named_parameters()) + list(model.named_buffers())
                 if n not in names}

    def call(theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        params, start = {}, 0
        for n, shape, size in zip(names, shapes, sizes):
            params[n] = theta[start:start + size].reshape(shape)
            start += size
        return functional_call(model, {**params, **constants}, (x,))

    tensor_of = np.repeat(np.arange(len(names)), sizes)
    return call, names, tensor_of


def _per_group(values, group_of_coordinate: np.ndarray) -> torch.Tensor:
    return torch.tensor([float(v) for v in values], dtype=torch.float64)[torch.as_tensor(group_of_coordinate)]


def reference(
    model: torch.nn.Module,
    theta0: torch.Tensor,
    batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    lrs: list[list[float]],
    cls_name: str,
    group_specs: list[dict],
    group_of_tensor: list[int],
    loss_fn,
    reduction: str,
    test_x: torch.Tensor,
    *,
    target: str = "log_prob",
    nodes: int = 10,
    clip: float | None = None,
) -> Reference:
    """Unroll the run by hand and decompose f(test_x) along it. `clip`: the max_norm the
    loop clipped each step's gradient to, as torch.nn.utils.clip_grad_norm_ documents it."""
    call, names, tensor_of = _functional(model)
    group_of = np.asarray(group_of_tensor)[tensor_of]
    dim = len(tensor_of)
    steps = len(batches)
    ids = np.unique(np.concatenate([b[0].numpy() for b in batches]))
    column = {int(i): c for c, i in enumerate(ids)}
    m = len(ids)

    def hyper(key):
        return _per_group([g[key] for g in group_specs], group_of)

    wd = hyper("weight_decay")
    theta = theta0.to(torch.float64).clone()
    thetas = [theta.clone()]
    # U[s, i, k]: the share of update step s's direction from (gradient step i, sample k)
    U = torch.zeros(steps, steps, m + 1, dim, dtype=torch.float64)
    decoupled_update = torch.zeros(steps, dim, dtype=torch.float64)
    lr_coord = torch.zeros(steps, dim, dtype=torch.float64)

    buf = None  # SGD momentum buffer / Adam first moment per (i, k): [S, M+1, D]
    v = torch.zeros(dim, dtype=torch.float64)
    vmax = torch.zeros(dim, dtype=torch.float64)
    for s, (idx, x, y) in enumerate(batches):
        lr = _per_group(lrs[s], group_of)
        lr_coord[s] = lr
        weight = 1.0 / len(idx) if reduction == "mean" else 1.0
        fresh = torch.zeros(steps, m + 1, dim, dtype=torch.float64)  # this step's inputs d_s
        for row in range(len(idx)):
            th = theta.clone().requires_grad_(True)
            x1 = x[row:row + 1]
            x1 = x1.to(torch.float64) if x1.is_floating_point() else x1
            loss = loss_fn(call(th, x1), y[row:row + 1]).sum()
            (g,) = torch.autograd.grad(loss, th)
            fresh[s, column[int(idx[row])]] += weight * g
        if clip is not None:  # the whole batch gradient scaled by min(1, max_norm / (‖ḡ‖ + 1e-6))
            fresh[s, :m] *= min(1.0, clip / (float(fresh[s, :m].sum(0).norm()) + 1e-6))
        if cls_name in ("SGD", "Adam"):  # coupled L2 decay: enters the gradient
            fresh[s, m] = wd * theta
        d_total = fresh.sum((0, 1))

        if cls_name == "SGD":
            mu, tau = hyper("momentum"), hyper("dampening")
            nesterov = hyper("nesterov") > 0
            if buf is None:
                buf = fresh.clone()  # PyTorch: buf = clone(d) at the first step
            else:
                buf = mu * buf + (1 - tau) * fresh
            direction = torch.where(nesterov, fresh + mu * buf, buf)
            direction = torch.where(mu != 0, direction, fresh)
            U[s] = direction
        else:
            beta1 = _per_group([g["betas"][0] for g in group_specs], group_of)
            beta2 = _per_group([g["betas"][1] for g in group_specs], group_of)
            eps = hyper("eps")
            t = s + 1
            buf = torch.zeros_like(fresh) if buf is None else buf
            buf = beta1 * buf + (1 - beta1) * fresh
            v = beta2 * v + (1 - beta2) * d_total**2
            if any(g["amsgrad"] for g in group_specs):
                vmax = torch.maximum(vmax, v)
                second = torch.where(hyper("amsgrad") > 0, vmax, v)
            else:
                second = v
            denom = second.sqrt() / (1 - beta2**t).sqrt() + eps
            U[s] = buf / (1 - beta1**t) / denom
            if cls_name == "AdamW":
                decoupled_update[s] = wd * theta
        theta = theta - lr * (U[s].sum((0, 1)) + decoupled_update[s])
        thetas.append(theta.clone())

    thetas_t = torch.stack(thetas)
    xs, ws = np.polynomial.legendre.leggauss(nodes)
    xs, ws = (xs + 1) / 2, ws / 2
    test_x = test_x.to(torch.float64) if test_x.is_floating_point() else test_x

    def f(th: torch.Tensor) -> torch.Tensor:
        out = call(th, test_x)
        return F.log_softmax(out, -1) if target == "log_prob" else out

    with torch.no_grad():
        initial, final = f(thetas_t[0]), f(thetas_t[-1])
    n_test, n_out = initial.shape
    psi = torch.zeros(steps, steps, m + 1, n_test, n_out, dim, dtype=torch.float64)
    decoupled = torch.zeros(steps, n_test, n_out, dim, dtype=torch.float64)
    for s in range(steps):
        a, delta = thetas_t[s], thetas_t[s + 1] - thetas_t[s]
        phi = torch.zeros(n_test, n_out, dim, dtype=torch.float64)
        for t, w in zip(xs, ws):
            phi += float(w) * torch.autograd.functional.jacobian(f, a + float(t) * delta)
        g_s = -lr_coord[s] * phi  # [T, O, D]
        psi[s] = g_s[None, None] * U[s][:, :, None, None, :]
        decoupled[s] = g_s * decoupled_update[s]
    return Reference(ids, thetas_t, initial, final, psi, decoupled, tensor_of, names)


def reference_for_run(run, *, target: str = "log_prob", nodes: int = 10, test_x=None) -> Reference:
    """The brute force on a run of engine_cases (the model's structure, the loop's record)."""
    return reference(
        run.model, run.thetas[0], run.batches, run.lrs, run.cls_name, run.group_specs,
        run.group_of_tensor, run.loss_fn, run.case.reduction,
        run.test_x if test_x is None else test_x, target=target, nodes=nodes, clip=run.case.clip,
    )
