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


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


class FlatModel:
    """f(x; θ) for a flat θ, with the constant rest of the module (frozen tensors, buffers)."""

    def __init__(self, model: nn.Module, layout: ParamLayout, dtype: torch.dtype, device):
        self.model = model
        self.layout = layout
        self.dtype = dtype
        self.device = torch.device(device)
        trainable = set(layout.names)
        # frozen parameters and buffers enter every call as constants
        self.constants = {
            name: t.detach().to(self.device, self._cast(t))
            for name, t in list(model.named_parameters()) + list(model.named_buffers())
            if name not in trainable
        }

    def _cast(self, t: torch.Tensor) -> torch.dtype:
        return self.dtype if t.is_floating_point() else t.dtype

    def cast_inputs(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, self._cast(x))

    def raw(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The module's output on a batch x, with parameters θ."""
        params = self.layout.unflatten(theta)
        return functional_call(self.model, {**params, **self.constants}, (x,))

    def explained(self, theta: torch.Tensor, x: torch.Tensor, target: str) -> torch.Tensor:
        """The explained output f(x; θ), [batch, O]: log-probabilities or raw logits."""
        out = self.raw(theta, x)
        return F.log_softmax(out, dim=-1) if target == "log_prob" else out

    def jacobian(
        self, theta: torch.Tensor, x: torch.Tensor, select: torch.Tensor | None, target: str
    ) -> torch.Tensor:
        """J = ∂f/∂θ for each input and each selected output: [T, O, D].

        `select` is None (all outputs) or a LongTensor [T, O] of output indices per input.
        """

        def one(x1: torch.Tensor, sel: torch.Tensor | None) -> torch.Tensor:
            def f(th: torch.Tensor) -> torch.Tensor:
                y = self.explained(th, x1.unsqueeze(0), target)[0]
                return y if sel is None else y[sel]

            return jacrev(f)(theta)

        if select is None:
            return vmap(lambda x1: one(x1, None))(x)
        return vmap(one)(x, select)

    def directional(
        self, theta: torch.Tensor, direction: torch.Tensor, x: torch.Tensor, target: str
    ) -> torch.Tensor:
        """J(θ)·direction for every output of every input, by one forward-mode pass: [T, O]."""
        _, tangent = jvp(lambda th: self.explained(th, x, target), (theta,), (direction,))
        return tangent

    def per_sample_gradients(
        self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, loss: PerSampleLoss
    ) -> torch.Tensor:
        """∇_θ ℓ(f(x_k; θ), y_k) for each row k of a batch: [B, D]."""

        def sample_loss(th: torch.Tensor, x1: torch.Tensor, y1: torch.Tensor) -> torch.Tensor:
            return loss(self.raw(th, x1.unsqueeze(0)), y1.unsqueeze(0))[0]

        return vmap(grad(sample_loss), in_dims=(None, 0, 0))(theta, x, y)

    def batch_gradient(
        self,
        theta: torch.Tensor,
        x: torch.Tensor,
        y: torch.Tensor,
        weights: torch.Tensor,
        loss: PerSampleLoss,
    ) -> torch.Tensor:
        """Σ_k w_k ∇ℓ_k by one ordinary backward pass: [D]."""
        return grad(lambda th: (weights * loss(self.raw(th, x), y)).sum())(theta)


def layout_of(model: nn.Module, names: Sequence[str] | None = None) -> ParamLayout:
    params = trainable_parameters(model)
    names = tuple(names) if names is not None else tuple(params)
    return ParamLayout(names, tuple(tuple(params[n].shape) for n in names))
