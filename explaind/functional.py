"""A model seen as a pure function of one flat parameter vector.

The engine works on flat vectors θ ∈ R^D so that Jacobians, per-sample gradients and the
optimizer's preconditioners are plain matrices and the contraction is one big matmul.
`FlatModel` owns the layout (which slice of θ is which named tensor) and the batched
`torch.func` transforms on top of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jacrev, jvp, vmap
from torch.overrides import TorchFunctionMode

from .losses import PerSampleLoss

TARGETS = ("log_prob", "logit")


@dataclass(frozen=True)
class ParamLayout:
    """Names, shapes and offsets of the trainable tensors inside the flat vector."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @property
    def sizes(self) -> list[int]:
        return [prod(shape) for shape in self.shapes]

    @property
    def dim(self) -> int:
        return sum(self.sizes)

    def slices(self) -> dict[str, slice]:
        out, start = {}, 0
        for name, size in zip(self.names, self.sizes):
            out[name] = slice(start, start + size)
            start += size
        return out

    def flatten(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """dict of [*batch, *shape] tensors -> [*batch, D] (batch dims are leading)."""
        parts = []
        for name, shape in zip(self.names, self.shapes):
            t = tensors[name]
            parts.append(t.reshape(*t.shape[: t.dim() - len(shape)], -1))
        return torch.cat(parts, dim=-1)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """[D] -> dict of views with the tensors' shapes."""
        return {
            name: flat[sl].view(shape)
            for (name, sl), shape in zip(self.slices().items(), self.shapes)
        }


class _KinkPattern(TorchFunctionMode):
    """Records where a forward pass stands relative to the kinks of piecewise-linear ops.

    f is smooth in θ except where a ReLU-type input crosses zero (or a clamp's bound) or a
    max-pool's argmax switches; between such kinks Gauss–Legendre converges fast. Recorded:
    each ReLU-type input's signed distance to its kink (its sign says the piece, its value lets
    the path integral predict where it crosses) and each max-pool's argmax indices.
    """

    SIGN_OPS = {"relu", "relu_", "leaky_relu", "leaky_relu_", "abs", "prelu"}
    RANGE_OPS = {"hardtanh", "hardtanh_", "relu6", "clamp", "clip"}

    def __init__(self):
        super().__init__()
        self.distances: list[torch.Tensor] = []
        self.indices: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in self.SIGN_OPS:
            self.distances.append(args[0])
        elif name in self.RANGE_OPS:
            for bound in _range_bounds(name, args, kwargs):
                if bound is not None:
                    self.distances.append(args[0] - bound)
        elif "max_pool" in name:
            plain = {k: v for k, v in kwargs.items() if k != "return_indices"}
            _, indices = getattr(F, name.lstrip("_") + "_with_indices")(*args[:6], **plain)
            self.indices.append(indices)
        return func(*args, **kwargs)


def _range_bounds(name: str, args, kwargs) -> tuple[float | None, float | None]:
    """The (low, high) kinks of a clamp-like op; None where a side is unbounded."""
    if name == "relu6":
        return 0.0, 6.0
    keys = ("min_val", "max_val") if name.startswith("hardtanh") else ("min", "max")
    defaults = (-1.0, 1.0) if name.startswith("hardtanh") else (None, None)
    positional = list(args[1:3]) + [None, None]
    return tuple(
        kwargs.get(key, positional[i] if positional[i] is not None else defaults[i])
        for i, key in enumerate(keys)
    )


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


class FlatModel:
    """f(x; θ) for a flat θ, with the constant rest of the module (frozen tensors, buffers)."""

    def __init__(self, model: nn.Module, layout: ParamLayout, dtype: torch.dtype, device,
                 constants: dict[str, torch.Tensor] | None = None):
        self.model = model
        self.layout = layout
        self.dtype = dtype
        self.device = torch.device(device)
        trainable = set(layout.names)
        # frozen parameters and buffers enter every call as constants: the recorded ones when
        # given (a history's), else the module's own
        if constants is None:
            constants = {
                name: t.detach()
                for name, t in list(model.named_parameters()) + list(model.named_buffers())
                if name not in trainable
            }
        self.constants = {name: t.to(self.device, self._cast(t)) for name, t in constants.items()}

    def _cast(self, t: torch.Tensor) -> torch.dtype:
        return self.dtype if t.is_floating_point() else t.dtype

    def cast_inputs(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, self._cast(x))

    def _call(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, {**params, **self.constants}, (x,))

    def raw(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The module's output on a batch x, with parameters θ."""
        return self._call(self.layout.unflatten(theta), x)

    def _explain(self, out: torch.Tensor, target: str) -> torch.Tensor:
        return F.log_softmax(out, dim=-1) if target == "log_prob" else out

    def explained(self, theta: torch.Tensor, x: torch.Tensor, target: str) -> torch.Tensor:
        """The explained output f(x; θ), [batch, O]: log-probabilities or raw logits."""
        return self._explain(self.raw(theta, x), target)

    # Derivatives are taken with respect to the dict of named tensors, not the flat vector:
    # differentiating through slices of θ would materialise a [rows, D] zero tensor per named
    # tensor in the backward pass. One concatenation at the end is far cheaper.

    def jacobian(
        self, theta: torch.Tensor, x: torch.Tensor, select: torch.Tensor | None, target: str
    ) -> torch.Tensor:
        """J = ∂f/∂θ for each input and each selected output: [T, O, D].

        `select` is None (all outputs) or a LongTensor [T, O] of output indices per input.
        """
        params = self.layout.unflatten(theta)

        def one(x1: torch.Tensor, sel: torch.Tensor | None) -> dict[str, torch.Tensor]:
            def f(p: dict[str, torch.Tensor]) -> torch.Tensor:
                y = self._explain(self._call(p, x1.unsqueeze(0)), target)[0]
                return y if sel is None else y[sel]

            return jacrev(f)(params)

        if select is None:
            jac = vmap(lambda x1: one(x1, None))(x)
        else:
            jac = vmap(one)(x, select)
        return self.layout.flatten(jac)

    def path_jacobian(
        self,
        theta: torch.Tensor,
        delta: torch.Tensor,
        x: torch.Tensor,
        t: torch.Tensor,
        w: torch.Tensor,
        select: torch.Tensor | None,
        target: str,
    ) -> torch.Tensor:
        """Σ_r w_ir J(x_i; θ + t_ir Δ) for each input i, with its own nodes t_i and weights w_i
        ([T, R]; zero weights pad inputs with fewer nodes): [T, O, D].

        The weighted sum over nodes is taken inside the differentiated function, so autograd
        accumulates it into the gradient and no per-node Jacobian is ever materialised.
        """
        params = self.layout.unflatten(theta)
        direction = self.layout.unflatten(delta)

        def one(x1: torch.Tensor, t1: torch.Tensor, w1: torch.Tensor, sel: torch.Tensor | None):
            def f(p: dict[str, torch.Tensor]) -> torch.Tensor:
                def at(tr: torch.Tensor) -> torch.Tensor:
                    shifted = {n: p[n] + tr * direction[n] for n in p}
                    return self._explain(self._call(shifted, x1.unsqueeze(0)), target)[0]

                y = (w1[:, None] * vmap(at)(t1)).sum(0)
                return y if sel is None else y[sel]

            return jacrev(f)(params)

        if select is None:
            jac = vmap(lambda x1, t1, w1: one(x1, t1, w1, None))(x, t, w)
        else:
            jac = vmap(one)(x, t, w, select)
        return self.layout.flatten(jac)

    def kink_pattern(
        self, theta: torch.Tensor, delta: torch.Tensor, x: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Where each row's forward pass at θ + t_r Δ stands relative to the model's kinks:
        signed distances [R, P] (float) and argmax indices [R, P'] (P = P' = 0 if smooth)."""

        def one(x1: torch.Tensor, t1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            mode = _KinkPattern()
            with mode:
                self._call(self.layout.unflatten(theta + t1 * delta), x1.unsqueeze(0))
            distances = [d.reshape(-1) for d in mode.distances] or [x1.new_zeros(0, dtype=self.dtype)]
            indices = [i.reshape(-1) for i in mode.indices] or [x1.new_zeros(0, dtype=torch.long)]
            return torch.cat(distances), torch.cat(indices)

        with torch.no_grad():
            return vmap(one)(x, t)

    def directional_along(
        self, theta: torch.Tensor, delta: torch.Tensor, x: torch.Tensor, t: torch.Tensor, target: str
    ) -> torch.Tensor:
        """J(θ + t_r Δ)·Δ for row r's input, all outputs, by forward mode: [R, O]."""

        def one(x1: torch.Tensor, t1: torch.Tensor) -> torch.Tensor:
            f = lambda th: self.explained(th, x1.unsqueeze(0), target)[0]
            return jvp(f, (theta + t1 * delta,), (delta,))[1]

        return vmap(one)(x, t)

    def per_sample_gradients(
        self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, loss: PerSampleLoss
    ) -> torch.Tensor:
        """∇_θ ℓ(f(x_k; θ), y_k) for each row k of a batch: [B, D]."""

        def sample_loss(p: dict[str, torch.Tensor], x1: torch.Tensor, y1: torch.Tensor) -> torch.Tensor:
            return loss(self._call(p, x1.unsqueeze(0)), y1.unsqueeze(0))[0]

        params = self.layout.unflatten(theta)
        return self.layout.flatten(vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, x, y))

    def batch_gradient(
        self,
        theta: torch.Tensor,
        x: torch.Tensor,
        y: torch.Tensor,
        weights: torch.Tensor,
        loss: PerSampleLoss,
    ) -> torch.Tensor:
        """Σ_k w_k ∇ℓ_k by one ordinary backward pass: [D]."""
        params = self.layout.unflatten(theta)
        g = grad(lambda p: (weights * loss(self._call(p, x), y)).sum())(params)
        return self.layout.flatten(g)


def layout_of(model: nn.Module, names: Sequence[str] | None = None) -> ParamLayout:
    params = trainable_parameters(model)
    names = tuple(names) if names is not None else tuple(params)
    return ParamLayout(names, tuple(tuple(params[n].shape) for n in names))
