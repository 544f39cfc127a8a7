"""PyTorch's own attention modules, as a stranger's Transformer uses them.

`nn.TransformerEncoderLayer` and `nn.MultiheadAttention` call `scaled_dot_product_attention`,
whose fused CPU kernel has no forward-mode derivative, and they carry a key bias, whose gradient
is zero (softmax ignores a shift shared by all keys): in a float32 run Adam scales that
gradient's rounding up to updates of the learning rate's size. A padding mask
(`src_key_padding_mask`) is read from the input inside forward, which vmap batches as it is.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

import explaind as ex

VOCAB, LENGTH, WIDTH = 7, 4, 8


class EncoderClassifier(nn.Module):
    """Embedding + position → one nn.TransformerEncoderLayer (ReLU MLP) → last position's logits."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.position = nn.Parameter(0.3 * torch.randn(LENGTH, WIDTH))
        self.encoder = nn.TransformerEncoderLayer(WIDTH, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, tokens):
        return self.head(self.encoder(self.embed(tokens) + self.position)[:, -1])


class AttentionClassifier(nn.Module):
    """Embedding + position → nn.MultiheadAttention (with its biases) → last position's logits."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.position = nn.Parameter(0.3 * torch.randn(LENGTH, WIDTH))
        self.attention = nn.MultiheadAttention(WIDTH, 2, batch_first=True)
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, tokens):
        h = self.embed(tokens) + self.position
        return self.head(self.attention(h, h, h, need_weights=False)[0][:, -1])


class PaddedEncoderClassifier(EncoderClassifier):
    """Token ids and their padding mask (1: a token, 0: padding) as one input [batch, 2, LENGTH]
    → the encoder layer with `src_key_padding_mask` → the mean over the tokens → logits."""

    def forward(self, x):
        tokens, kept = x[:, 0], x[:, 1]
        h = self.encoder(self.embed(tokens) + self.position, src_key_padding_mask=kept == 0)
        weights = kept.unsqueeze(-1).to(h.dtype)
        return self.head((h * weights).sum(1) / weights.sum(1))


def record_adamw(path, model: nn.Module, steps: int, lr: float = 1e-2,
                 inputs: torch.Tensor | None = None) -> tuple[nn.Module, torch.Tensor]:
    """AdamW on mini-batches of 8 of 24 inputs (by default token sequences; label: the sum of
    each input's first LENGTH entries mod VOCAB); returns the untrained copy of the model and the
    data."""
    torch.manual_seed(1)
    tokens = torch.randint(0, VOCAB, (24, LENGTH)) if inputs is None else inputs
    labels = tokens.flatten(1)[:, :LENGTH].sum(1) % VOCAB
    initial = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    with ex.Recorder(path, model, optimizer, check_every=1) as rec:
        for s in range(steps):
            batch = torch.arange(8) + 8 * (s % 3)
            optimizer.zero_grad()
            F.cross_entropy(model(tokens[batch]), labels[batch]).backward()
            rec.batch(batch, tokens[batch], labels[batch])
            optimizer.step()
    return initial, tokens


def test_a_pytorch_encoder_layer_decomposes_exactly_with_its_kinks_located(tmp_path):
    """float64: the kink search (forward mode through attention and the ReLU MLP) and the
    per-sample split add up to the change of the module's own outputs, computed here by calling
    the untrained and the trained module."""
    torch.manual_seed(0)
    model = EncoderClassifier().double()
    initial, tokens = record_adamw(tmp_path / "h", model, steps=4)
    model.eval()
    test = tokens[:3]
    cube = ex.explain(tmp_path / "h", model, test, keep=("train", "test", "output"), outputs="all",
                      dtype=torch.float64, tolerance=None, progress=False)
    with torch.no_grad():
        change = (F.log_softmax(model(test), -1) - F.log_softmax(initial.eval()(test), -1)).numpy()
    explained = (cube.attribution.sum("train") + cube.regularization).transpose("test", "output").values
    assert abs(explained - change).max() <= 1e-9 * abs(change).max()
    assert cube.attrs["kinks_located"] > 0  # the ReLUs switch along the steps: the pieces were needed
    # explain switched attention to differentiable kernels for its own calls only
    assert torch.backends.mha.get_fastpath_enabled() and torch.backends.cuda.flash_sdp_enabled()
    reconstruction = ex.reconstruct(tmp_path / "h", model, test, progress=False)
    assert reconstruction.attrs["relative_residual"] <= 1e-9


def test_a_padding_mask_decomposes_exactly_and_padding_gets_no_share(tmp_path):
    """float64, sequences of 1 to LENGTH tokens: exact against the module's own change; and a test
    input whose padded positions hold other tokens gets the same attribution, to rounding."""
    torch.manual_seed(0)
    model = PaddedEncoderClassifier().double()
    kept = (torch.arange(LENGTH) < torch.randint(1, LENGTH + 1, (24, 1))).long()
    inputs = torch.stack([torch.randint(0, VOCAB, (24, LENGTH)) * kept, kept], 1)
    initial, inputs = record_adamw(tmp_path / "h", model, steps=4, inputs=inputs)
    model.eval()
    test = inputs[kept.sum(1) < LENGTH][:3]  # each with padding

    def explain(x):
        return ex.explain(tmp_path / "h", model, x, keep=("train", "test", "output"), outputs="all",
                          tolerance=None, progress=False)

    cube = explain(test)
    with torch.no_grad():
        change = (F.log_softmax(model(test), -1) - F.log_softmax(initial.eval()(test), -1)).numpy()
    explained = (cube.attribution.sum("train") + cube.regularization).transpose("test", "output").values
    assert abs(explained - change).max() <= 1e-9 * abs(change).max()
    other_padding = test.clone()
    other_padding[:, 0] = torch.where(test[:, 1] == 0, (test[:, 0] + 3) % VOCAB, test[:, 0])
    scale = abs(cube.attribution).max().item()
    assert abs(explain(other_padding).attribution - cube.attribution).max().item() <= 1e-12 * scale


def test_adam_noise_on_a_gradient_free_key_bias_is_not_a_mismatch(tmp_path):
    """float32: at step 0 the key bias's gradient is zero but for rounding (checked in float64
    by autograd on the untrained module), so AdamW's modelled update of it is ~0 while the
    recorded one is a fair part of the learning rate: in parameter space a miss of over 1% of the
    step, a hundred times the float32 tolerance.
    Divided by the preconditioner, the miss is the gradient's rounding, and the run passes."""
    torch.manual_seed(0)
    model = AttentionClassifier()
    lr = 1e-2
    initial, tokens = record_adamw(tmp_path / "h", model, steps=3, lr=lr)
    keys = slice(WIDTH, 2 * WIDTH)  # in_proj_bias holds the query, key and value biases

    exact = initial.double()
    batch = torch.arange(8)
    F.cross_entropy(exact(tokens[batch]), tokens[batch].sum(1) % VOCAB).backward()
    assert exact.attention.in_proj_bias.grad[keys].abs().max() < 1e-15

    history = ex.History(tmp_path / "h")
    step0 = next(iter(history.steps()))
    moved = step0.after["attention.in_proj_bias"][keys] - step0.before["attention.in_proj_bias"][keys]
    largest = max((step0.after[n] - step0.before[n]).abs().max() for n in step0.before)
    assert moved.abs().max() >= 0.01 * largest

    residuals = ex.verify_updates(tmp_path / "h", model)
    assert residuals.max() <= 1e-4
    cube = ex.explain(tmp_path / "h", model, tokens[:2], keep=("train", "test"), dtype=torch.float64,
                      progress=False)
    assert abs(cube.update_residual.values - residuals).max() <= 1e-12


def test_overlapping_calls_keep_attention_differentiable_until_the_last_one_returns():
    """Two explains in two threads overlap as: first in, second in, first out, second out. The
    switches must stay set until the second returns, then come back as they were."""
    from explaind.functional import _DIFFERENTIABLE_KERNELS

    def switched() -> bool:  # TF32 off too: it rounds float32 products on GPUs (the flags exist on any build)
        return (not torch.backends.mha.get_fastpath_enabled() and not torch.backends.cuda.flash_sdp_enabled()
                and not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32)

    def unswitched() -> bool:  # as they were: the test sets TF32 on, as cuDNN's default has it
        return (torch.backends.mha.get_fastpath_enabled() and torch.backends.cuda.flash_sdp_enabled()
                and torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32)

    kernels = _DIFFERENTIABLE_KERNELS
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        check_overlapping_calls(kernels, switched, unswitched)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def check_overlapping_calls(kernels, switched, unswitched) -> None:
    assert unswitched()
    kernels.__enter__()  # the first call in
    kernels.__enter__()  # the second
    kernels.__exit__(None, None, None)  # the first returns
    assert switched()
    kernels.__exit__(None, None, None)  # the second returns
    assert unswitched()
    with kernels:  # and it can be entered again
        assert switched()
    assert unswitched()
