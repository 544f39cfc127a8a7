"""The two models of the paper: a one-layer grokking Transformer and a BatchNorm-free ResNet-9.

Both are pure functions of their parameters and input (no buffers, no train/eval-mode
behaviour, no in-place state), so `torch.func.functional_call`, `vmap`, `grad` and `jacrev`
apply to them directly, and both return log-probabilities (the explained output of docs/method.md §1).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


# Paper component name -> parameter-name prefixes of ModAddTransformer.
TRANSFORMER_COMPONENTS: dict[str, list[str]] = {
    "embedding": ["embed.weight", "pos_embed"],
    "attention": ["attn.W_Q", "attn.W_K", "attn.W_V", "attn.W_O"],
    "mlp_in": ["mlp.fc_in.weight", "mlp.fc_in.bias"],
    "mlp_out": ["mlp.fc_out.weight", "mlp.fc_out.bias"],
    "unembedding": ["unembed.weight"],
}

# Layer name -> parameter-name prefixes of ResNet9 (every layer keeps its bias with its weight).
CNN_COMPONENTS: dict[str, list[str]] = {
    "conv1": ["conv1."],
    "conv2": ["conv2."],
    "res1": ["res1."],
    "conv3": ["conv3."],
    "res2": ["res2."],
    "conv4": ["conv4."],
    "linear": ["linear."],
}


def _normal_init(tensor: torch.Tensor, fan_in: int) -> torch.Tensor:
    """N(0, 1/fan_in): keeps activations O(1) at init without LayerNorm."""
    with torch.no_grad():
        return tensor.normal_(0.0, 1.0 / math.sqrt(fan_in))


class LastQueryAttention(nn.Module):
    """Multi-head attention without biases, read at the last position only.

    The model reads its output at the last token after one layer, so no other position's query
    can reach it: only the last query is computed (a causal mask would leave it unmasked), which
    makes every forward, jvp and per-sample gradient about twice as fast as full self-attention.
    W_Q, W_K, W_V: [n_heads, d_model, d_head]; W_O: [n_heads, d_head, d_model], so every head's
    slice of every matrix is one index away (per-head attribution needs no reshaping).
    """

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        d_head = d_model // n_heads
        self.W_Q = nn.Parameter(_normal_init(torch.empty(n_heads, d_model, d_head), d_model))
        self.W_K = nn.Parameter(_normal_init(torch.empty(n_heads, d_model, d_head), d_model))
        self.W_V = nn.Parameter(_normal_init(torch.empty(n_heads, d_model, d_head), d_model))
        self.W_O = nn.Parameter(_normal_init(torch.empty(n_heads, d_head, d_model), d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [batch, seq, d_model] -> the attention output at the last position, [batch, d_model]."""
        k = torch.einsum("bsd,hde->bhse", x, self.W_K)
        v = torch.einsum("bsd,hde->bhse", x, self.W_V)
        q = torch.einsum("bd,hde->bhe", x[:, -1], self.W_Q)
        scores = torch.einsum("bhe,bhse->bhs", q, k) / math.sqrt(q.shape[-1])
        mixed = torch.einsum("bhs,bhse->bhe", scores.softmax(dim=-1), v)
        return torch.einsum("bhe,hed->bd", mixed, self.W_O)


class MLP(nn.Module):
    """ReLU MLP d_model -> d_mlp -> d_model with biases."""

    def __init__(self, d_model: int, d_mlp: int):
        super().__init__()
        self.fc_in = nn.Linear(d_model, d_mlp)
        self.fc_out = nn.Linear(d_mlp, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(F.relu(self.fc_in(x)))


class ModAddTransformer(nn.Module):
    """One-layer Transformer for addition mod p (docs/method.md §3), read at the '=' token.

    Input: tokens [batch, 4] = [a, p, b, p + 1] (vocabulary p + 2: residues, '+', '=').
    Output: log-probabilities over the p + 2 tokens at the last position, [batch, p + 2].
    Attention and MLP run at that position only: with one layer no other position reaches the
    output, so this is exactly a causal one-layer Transformer read at '=', at half the cost.

    Parameters and the paper's components (TRANSFORMER_COMPONENTS):
        embedding   : embed.weight [p+2, d_model], pos_embed [4, d_model]
        attention   : attn.W_Q, attn.W_K, attn.W_V [n_heads, d_model, d_head], attn.W_O [n_heads, d_head, d_model]
        mlp_in      : mlp.fc_in.weight [d_mlp, d_model], mlp.fc_in.bias [d_mlp]   ("first MLP layer")
        mlp_out     : mlp.fc_out.weight [d_model, d_mlp], mlp.fc_out.bias [d_model] ("second MLP layer")
        unembedding : unembed.weight [p+2, d_model] (no bias)

    Count: 2(p+2)d + 4d + 4d² + 2 d·d_mlp + d_mlp + d. For p=113, d=64, d_mlp=512 that is
    97,472 (the paper's "~89k" matches no obvious subset exactly; the formula is what we build).

    Init: every weight matrix and embedding ~ N(0, 1/fan_in) (fan_in = d_model, or d_mlp for
    fc_out), biases 0. Plain and scale-aware without LayerNorm; the choice is ours, the paper
    does not state its init.
    """

    seq_len = 4

    def __init__(self, p: int, d_model: int, n_heads: int, d_mlp: int):
        super().__init__()
        if p < 2:
            raise ValueError(f"modulus p={p} must be at least 2")
        if min(d_model, n_heads, d_mlp) < 1:
            raise ValueError(
                f"need d_model, n_heads and d_mlp >= 1, got d_model={d_model}, n_heads={n_heads}, d_mlp={d_mlp}"
            )
        vocab = p + 2
        self.p = p
        self.embed = nn.Embedding(vocab, d_model)
        self.pos_embed = nn.Parameter(torch.empty(self.seq_len, d_model))
        self.attn = LastQueryAttention(d_model, n_heads)
        self.mlp = MLP(d_model, d_mlp)
        self.unembed = nn.Linear(d_model, vocab, bias=False)
        for weight, fan_in in [
            (self.embed.weight, d_model),
            (self.pos_embed, d_model),
            (self.mlp.fc_in.weight, d_model),
            (self.mlp.fc_out.weight, d_mlp),
            (self.unembed.weight, d_model),
        ]:
            _normal_init(weight, fan_in)
        nn.init.zeros_(self.mlp.fc_in.bias)
        nn.init.zeros_(self.mlp.fc_out.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: long [batch, 4] -> log-probabilities [batch, p + 2]."""
        if tokens.dim() != 2 or tokens.shape[1] != self.seq_len:
            raise ValueError(
                f"expected tokens of shape [batch, {self.seq_len}] ('a + b ='), got {tuple(tokens.shape)}; "
                "add a batch dimension with tokens.unsqueeze(0) for a single example"
            )
        try:
            x = self.embed(tokens) + self.pos_embed
        except IndexError:  # checked here, not before: a data-dependent check would break vmap
            raise ValueError(
                f"tokens must lie in 0 … {self.p + 1} (residues 0 … {self.p - 1}, '+' = {self.p}, "
                f"'=' = {self.p + 1}); some lie outside: build inputs for this model's p={self.p}"
            ) from None
        last = x[:, -1] + self.attn(x)  # the residual stream at '=', the only one the output reads
        last = last + self.mlp(last)
        return F.log_softmax(self.unembed(last), dim=-1)


class ConvReLU(nn.Module):
    """Conv2d (with bias, since there is no BatchNorm to supply a shift) followed by ReLU.

    He init (N(0, 2/fan_in), zero bias): without BatchNorm, PyTorch's default conv init
    shrinks the signal about threefold per layer and the network starts out unable to learn.
    """

    def __init__(self, c_in: int, c_out: int, kernel_size: int = 3, stride: int = 1, padding: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=padding)
        nn.init.kaiming_normal_(self.conv.weight, nonlinearity="relu")
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(x))


class Residual(nn.Module):
    """x + block(x) with two 3x3 ConvReLU layers of constant width."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv_a = ConvReLU(channels, channels)
        self.conv_b = ConvReLU(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_b(self.conv_a(x))


class ResNet9(nn.Module):
    """TRAK's CIFAR ResNet-9 with BatchNorm removed, returning log-probabilities.

    Layers (w = width): conv1 3x3 c_in->w; conv2 5x5 stride 2 w->2w; res1 (2w); conv3 3x3
    2w->4w; 2x2 max-pool; res2 (4w); conv4 3x3 4w->2w; global max-pool; linear 2w->classes
    (no bias); output scaled by 0.125 (TRAK's Mul, keeps initial logits small).

    One deviation: TRAK's conv4 has padding 0, which needs a 4x4 map there (32x32 inputs).
    We pad it by 1, which leaves the parameter count unchanged and lets inputs down to 4x4
    (the 8x8 digits give a 2x2 map) work. width=64, 3 channels, 2 classes: 2,272,512 parameters.
    """

    output_scale = 0.125

    def __init__(self, in_channels: int, num_classes: int, width: int = 64):
        super().__init__()
        if width < 1 or in_channels < 1 or num_classes < 2:
            raise ValueError(
                f"need width >= 1, in_channels >= 1 and num_classes >= 2, "
                f"got width={width}, in_channels={in_channels}, num_classes={num_classes}"
            )
        self.conv1 = ConvReLU(in_channels, width)
        self.conv2 = ConvReLU(width, 2 * width, kernel_size=5, stride=2, padding=2)
        self.res1 = Residual(2 * width)
        self.conv3 = ConvReLU(2 * width, 4 * width)
        self.res2 = Residual(4 * width)
        self.conv4 = ConvReLU(4 * width, 2 * width)
        self.linear = nn.Linear(2 * width, num_classes, bias=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: [batch, C, H, W] with H, W >= 4 -> log-probabilities [batch, num_classes]."""
        if images.dim() != 4 or min(images.shape[-2:]) < 4:
            raise ValueError(
                f"expected images of shape [batch, channels, H, W] with H, W >= 4, got {tuple(images.shape)}"
            )
        x = self.res1(self.conv2(self.conv1(images)))
        x = F.max_pool2d(self.conv3(x), 2)
        x = self.conv4(self.res2(x))
        x = torch.amax(x, dim=(-2, -1))  # global max-pool, any spatial size
        return F.log_softmax(self.linear(x) * self.output_scale, dim=-1)
