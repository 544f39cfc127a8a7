"""Benchmark: how fast one step's kernel could be with mixed-mode contraction (a probe, not the engine).

The engine computes one step's kernel K[input, output, train sample] per component in two moves:
every (input, quadrature node) row's Jacobian J_r = ∂f/∂θ [outputs, D] is materialised, the rows
of each input are summed, and the sums are contracted with the step's per-sample updates
G [train, D] (25 billion multiply-adds on the reference workload). Mixed mode never builds J:
a reverse pass gives δ, the output's derivative with respect to each op that reads a parameter,
per row and output; the op is linear in that parameter, so <J_r, G_i> on its part is
<δ_r, op(activations_r, G_i)>, and op(activations_r, ·) applied to all G_i at once is one matmul.
On the reference Transformer that is about half the multiply-adds of the contraction alone, and
no [rows, outputs, D] tensor is written.

This script hand-derives mixed mode for explaind.models.ModAddTransformer, checks it and the
library's generic mixed mode (explaind.mixed, which finds the parameter-reading ops of any module
itself) against the per-row Jacobians and contraction in float64, and times the three in float32,
interleaved, on one step's worth of rows: 10 test inputs with 3 or 4 nodes each (the reference
workload's kink search leaves 3.5 per input on average), all 25 outputs, 200 training samples,
the paper's 5 components.

    python benchmarks/mixed_mode_probe.py
    python benchmarks/mixed_mode_probe.py --threads 1
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch.func import jacrev, vmap

from explaind.components import group_tensors
from explaind.data import modular_addition
from explaind.functional import FlatModel, ParamLayout
from explaind.mixed import MixedMode
from explaind.models import TRANSFORMER_COMPONENTS, ModAddTransformer

P, D_MODEL, HEADS, D_MLP = 23, 32, 4, 64
VOCAB, SEQ, D_HEAD = P + 2, ModAddTransformer.seq_len, D_MODEL // HEADS
TRAIN, INPUTS = 200, 10
NODES = [4, 3, 4, 3, 4, 3, 4, 3, 4, 4]  # per input: 36 rows


class Step:
    """One step's rows (input, node t, weight w) at θ + tΔ, and the per-sample updates G."""

    def __init__(self, dtype: torch.dtype, seed: int = 0):
        torch.manual_seed(seed)
        model = ModAddTransformer(P, D_MODEL, HEADS, D_MLP).to(dtype)
        named = dict(model.named_parameters())
        self.layout = ParamLayout(tuple(named), tuple(tuple(p.shape) for p in named.values()))
        self.flat = FlatModel(model, self.layout, dtype, "cpu")
        self.theta = torch.cat([p.detach().flatten() for p in named.values()])
        self.delta = 0.01 * torch.randn_like(self.theta)
        self.tokens = modular_addition(P, 200, 100, seed=1, only_a_ge_b=False).val_inputs[:INPUTS]
        self.owner = torch.repeat_interleave(torch.arange(INPUTS), torch.tensor(NODES))
        self.t = torch.rand(len(self.owner), dtype=dtype)
        self.w = torch.rand(len(self.owner), dtype=dtype)
        self.G = 0.01 * torch.randn(TRAIN, self.layout.dim, dtype=dtype)
        groups = group_tensors(self.layout.names, TRANSFORMER_COMPONENTS)
        self.component = {name: i for i, names in enumerate(groups.values()) for name in names}
        self.n_components = len(groups)

    def per_row_jacobians(self) -> torch.Tensor:
        """The engine's way: K [component, input, output, train]."""
        J = torch.zeros(INPUTS, VOCAB, self.layout.dim, dtype=self.theta.dtype)
        self.flat.add_node_jacobians(J, self.owner, self.theta, self.delta, self.tokens[self.owner], self.t,
                                     self.w, None, "log_prob")
        K = torch.zeros(self.n_components, INPUTS, VOCAB, TRAIN, dtype=J.dtype)
        for name, part in self.layout.slices().items():
            K[self.component[name]] += J[..., part] @ self.G[:, part].T
        return K

    def generic(self) -> torch.Tensor:
        """explaind.mixed's kernel, one part per tensor summed into its component: K [component, input, output, train]."""
        if not hasattr(self, "calls"):
            self.modes = MixedMode(self.flat)
            self.calls = self.modes.calls(self.theta, self.tokens)
            assert self.modes.exact(self.calls, self.theta, self.tokens, "log_prob"), self.modes.refusal
        slices = self.layout.slices()
        out = torch.zeros(1, len(slices), INPUTS, VOCAB, TRAIN, dtype=self.theta.dtype)  # one segment
        self.modes.add_kernel(out, torch.zeros_like(self.owner), self.owner, self.theta[None], self.delta[None],
                              self.tokens[self.owner], self.t, self.w, None, "log_prob", self.G[None],
                              list(slices.values()), self.calls)
        K = torch.zeros(self.n_components, INPUTS, VOCAB, TRAIN, dtype=out.dtype)
        for part, name in zip(out[0], slices):
            K[self.component[name]] += part
        return K

    def mixed_mode(self) -> torch.Tensor:
        """Mixed mode, hand-derived for ModAddTransformer: K [component, input, output, train]."""
        rows = len(self.owner)
        params = self.layout.unflatten(self.theta + self.t[:, None] * self.delta)  # [rows, *shape]
        deltas, (x, mixed, last, hidden, last2) = vmap(_row_deltas)(params, self.tokens[self.owner], self.w)
        # each tensor's updates as [*shape, train]: an op reading it maps them all in one matmul
        G = {name: g.movedim(0, -1) for name, g in self.layout.unflatten(self.G).items()}
        K = torch.zeros(self.n_components, INPUTS, VOCAB, TRAIN, dtype=x.dtype)

        def add(name: str, delta: torch.Tensor, tangent: torch.Tensor) -> None:
            """K += <δ [rows, outputs, *s], op's change along every G_i [rows, *s, train]>."""
            k = torch.bmm(delta.reshape(rows, VOCAB, -1), tangent.reshape(rows, -1, TRAIN))
            K[self.component[name]].index_add_(0, self.owner, k)

        def add_shared(name: str, delta: torch.Tensor, tangent: torch.Tensor) -> None:
            """The same for an op whose change is the same in every row (an added tensor)."""
            k = delta.reshape(rows * VOCAB, -1) @ tangent.reshape(-1, TRAIN)
            K[self.component[name]].index_add_(0, self.owner, k.view(rows, VOCAB, TRAIN))

        def by_input(tensor: torch.Tensor, inputs: int) -> torch.Tensor:
            """[*shape, train] with the dim an op contracts with its input (`inputs` long) first."""
            dim = tensor.shape.index(inputs)
            return tensor.movedim(dim, 0).reshape(inputs, -1)

        add("embed.weight", deltas[0], G["embed.weight"][self.tokens[self.owner]])
        add_shared("pos_embed", deltas[0], G["pos_embed"])
        for j, name in ((1, "attn.W_K"), (2, "attn.W_V")):
            change = (x.reshape(-1, D_MODEL) @ by_input(G[name], D_MODEL)).view(rows, SEQ, HEADS, D_HEAD, TRAIN)
            add(name, deltas[j].transpose(2, 3), change)
        add("attn.W_Q", deltas[3], x[:, -1] @ by_input(G["attn.W_Q"], D_MODEL))
        add("attn.W_O", deltas[4], mixed.reshape(rows, D_MODEL) @ G["attn.W_O"].reshape(D_MODEL, -1))
        add("mlp.fc_in.weight", deltas[5], last @ by_input(G["mlp.fc_in.weight"].transpose(0, 1), D_MODEL))
        add_shared("mlp.fc_in.bias", deltas[5], G["mlp.fc_in.bias"])
        add("mlp.fc_out.weight", deltas[6], hidden @ by_input(G["mlp.fc_out.weight"].transpose(0, 1), D_MLP))
        add_shared("mlp.fc_out.bias", deltas[6], G["mlp.fc_out.bias"])
        add("unembed.weight", deltas[7], last2 @ by_input(G["unembed.weight"].transpose(0, 1), D_MODEL))
        return K


def _forward(p: dict[str, torch.Tensor], tokens: torch.Tensor, probes: list[torch.Tensor]):
    """ModAddTransformer's forward on one input, a zero probe added to the output of every op
    that reads a parameter: the log-probabilities and the activations those ops read."""
    x = p["embed.weight"][tokens] + p["pos_embed"] + probes[0]
    k = torch.einsum("sd,hde->hse", x, p["attn.W_K"]) + probes[1]
    v = torch.einsum("sd,hde->hse", x, p["attn.W_V"]) + probes[2]
    q = torch.einsum("d,hde->he", x[-1], p["attn.W_Q"]) + probes[3]
    scores = torch.einsum("he,hse->hs", q, k) / math.sqrt(D_HEAD)
    mixed = torch.einsum("hs,hse->he", scores.softmax(-1), v)
    last = x[-1] + torch.einsum("he,hed->d", mixed, p["attn.W_O"]) + probes[4]
    hidden = F.relu(p["mlp.fc_in.weight"] @ last + p["mlp.fc_in.bias"] + probes[5])
    last2 = last + p["mlp.fc_out.weight"] @ hidden + p["mlp.fc_out.bias"] + probes[6]
    logits = p["unembed.weight"] @ last2 + probes[7]
    return F.log_softmax(logits, -1), (x, mixed, last, hidden, last2)


def _row_deltas(p: dict[str, torch.Tensor], tokens: torch.Tensor, weight: torch.Tensor):
    """One row's δ per probe [outputs, *probe], times the row's weight, and its activations."""
    shapes = [(SEQ, D_MODEL), (HEADS, SEQ, D_HEAD), (HEADS, SEQ, D_HEAD), (HEADS, D_HEAD), (D_MODEL,), (D_MLP,),
              (D_MODEL,), (VOCAB,)]
    probes = [torch.zeros(shape, dtype=weight.dtype) for shape in shapes]
    deltas, activations = jacrev(lambda pr: _forward(p, tokens, pr), has_aux=True)(probes)
    return [d * weight for d in deltas], activations


def best_ms(functions: dict, repeat: int) -> dict:
    """Each function's best time of `repeat` calls in ms, the calls interleaved (a shared machine's
    load then weighs on all alike)."""
    times = {name: [] for name in functions}
    for function in functions.values():
        function()
    for _ in range(repeat):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * min(t) for name, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    exact = Step(torch.float64)
    engine = exact.per_row_jacobians()
    scale = engine.abs().max().item()
    for name, kernel in (("hand-derived", exact.mixed_mode), ("generic", exact.generic)):
        gap = (kernel() - engine).abs().max().item()
        print(f"float64: max |mixed mode ({name}) - per-row Jacobians| {gap:.1e} (largest entry {scale:.2f})")
    step = Step(torch.float32)
    ms = best_ms({"engine": step.per_row_jacobians, "hand": step.mixed_mode, "generic": step.generic}, args.repeat)
    print(f"one step's kernel, float32, {args.threads} thread(s), best of {args.repeat} (interleaved):")
    print(f"  per-row Jacobians + contraction (the engine)  {ms['engine']:6.2f} ms")
    print(f"  mixed mode (hand-derived)                     {ms['hand']:6.2f} ms  ({ms['engine'] / ms['hand']:.2f}×)")
    print(f"  mixed mode (explaind.mixed, generic)          {ms['generic']:6.2f} ms  ({ms['engine'] / ms['generic']:.2f}×)")


if __name__ == "__main__":
    main()
