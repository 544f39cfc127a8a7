"""Hugging Face causal language models, as a stranger trains them: built from a config (no
download), called on token ids, returning a ModelOutput whose `.logits` hold every position.

They are trained on the next token after each prompt, through a custom per-sample loss, and
explained through `output_fn`; the last test trains on every position through the model's own
loss (`labels=`), which computes in float32. What they bring that our own models do not: GPT-2's Conv1D
(addmm on transposed weights), tied input and output embeddings, `gelu_new`, a causal mask built
inside forward, SDPA attention; Llama's RMSNorm, rotary position embeddings computed in forward,
SiLU gating and grouped-query attention; Bloom's GeLU as a custom autograd.Function and its
ALiBi attention; Mamba's selective scan and a cache filled in place; DeBERTa-v2's disentangled
attention and a padding check on token values.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import (BloomConfig, BloomForCausalLM, DebertaV2Config, DebertaV2ForSequenceClassification,
                          GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MambaConfig,
                          MambaForCausalLM)
from transformers.models.bloom.modeling_bloom import BloomGelu, bloom_gelu_forward

import explaind as ex

VOCAB = 11


def gpt2() -> torch.nn.Module:
    config = GPT2Config(vocab_size=VOCAB, n_positions=4, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None)
    return GPT2LMHeadModel(config)


def llama() -> torch.nn.Module:
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return LlamaForCausalLM(config)


def bloom() -> torch.nn.Module:
    config = BloomConfig(vocab_size=VOCAB, hidden_size=16, n_layer=1, n_head=4, hidden_dropout=0.0,
                         attention_dropout=0.0, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return BloomForCausalLM(config)


def next_token(out) -> torch.Tensor:
    return out.logits[:, -1]


def next_token_loss(out, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(next_token(out), target, reduction="none")


def record_next_token(path, model: torch.nn.Module, prompts: torch.Tensor | None = None,
                      check_every: int = 1) -> torch.Tensor:
    """AdamW with a schedule on shuffled mini-batches of 8 of 24 prompts (by default 3 random
    tokens; answer: the sum of the first row of each mod VOCAB); returns the prompts."""
    if prompts is None:
        prompts = torch.randint(0, VOCAB, (24, 3))
    answers = prompts.flatten(1)[:, :prompts.shape[-1]].sum(1) % VOCAB
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 / (1 + s))
    with ex.Recorder(path, model, optimizer, scheduler=scheduler, loss=next_token_loss, check_every=check_every) as rec:
        for _ in range(4):
            batch = torch.randperm(len(prompts))[:8]
            optimizer.zero_grad()
            next_token_loss(model(prompts[batch]), answers[batch]).mean().backward()
            rec.batch(batch, prompts[batch], answers[batch])
            optimizer.step()
            scheduler.step()
    return prompts


def explained_against_the_models_own_change(path, model, initial, test) -> tuple[float, str]:
    """The largest miss of the cube's sum over samples against the change of the next-token
    log-probabilities that the untrained and the trained model compute themselves, relative to
    the largest change; and where the model rounds to a coarser dtype ("" nowhere)."""
    cube = ex.explain(path, model, test, keep=("train", "test", "output"), outputs="all", loss=next_token_loss,
                      output_fn=next_token, quadrature=8, progress=False)
    assert cube.sizes["train"] == len(ex.History(path).train_indices())
    with torch.no_grad():
        change = (F.log_softmax(next_token(model(test)), -1)
                  - F.log_softmax(next_token(initial(test)), -1)).numpy()
    explained = (cube.attribution.sum("train") + cube.regularization).transpose("test", "output").values
    return abs(explained - change).max() / abs(change).max(), cube.attrs["coarser_rounding"]


def test_gpt2_decomposes_exactly(tmp_path):
    """float64: exact to rounding, and nothing of it rounds to a coarser dtype."""
    torch.manual_seed(0)
    model = gpt2().double().eval()  # eval: no dropout (the config sets it to 0 anyway)
    initial = copy.deepcopy(model)
    prompts = record_next_token(tmp_path / "h", model)
    miss, coarser_rounding = explained_against_the_models_own_change(tmp_path / "h", model, initial, prompts[:3])
    assert miss <= 1e-9 and coarser_rounding == ""


def test_gpt2_with_its_cache_decomposes_without_a_train_dim(tmp_path):
    """A cube without a train dim is computed by forward mode, whose memory was measured by a jvp
    of the module's whole output: GPT-2's holds its cache (use_cache=True, the default), which
    jvp cannot return, and torch's bare RuntimeError was raised. The jvp is of the explained
    output now, and the cube adds up to the change the models compute themselves."""
    torch.manual_seed(0)
    model = gpt2().double().eval()
    assert model.config.use_cache
    initial = copy.deepcopy(model)
    prompts = record_next_token(tmp_path / "h", model)
    test = prompts[:3]
    cube = ex.explain(tmp_path / "h", model, test, keep=("test", "output"), loss=next_token_loss,
                      output_fn=next_token, quadrature=8, progress=False)
    with torch.no_grad():
        change = (F.log_softmax(next_token(model(test)), -1) - F.log_softmax(next_token(initial(test)), -1)).numpy()
    explained = (cube.attribution + cube.regularization).transpose("test", "output").values
    assert abs(explained - change).max() <= 1e-9 * abs(change).max()


def test_a_language_model_s_output_is_named_with_its_next_token(tmp_path):
    """explain without output_fn, given a causal LM's output, suggested out.logits, a
    [batch, positions, vocabulary] tensor it then refuses again; it names out.logits[:, -1]."""
    torch.manual_seed(0)
    model = gpt2().double().eval()
    prompts = record_next_token(tmp_path / "h", model)
    with pytest.raises(ex.InputError, match=re.escape(
            "not a tensor: explaind explains a tensor of outputs "
            "[batch, outputs]. Fix: pass output_fn, a function of the model's output that returns that tensor (for "
            "example output_fn=lambda out: out.logits[:, -1], the next token after each input)")):
        ex.explain(tmp_path / "h", model, prompts[:2], loss=next_token_loss, progress=False)


def test_llama_decomposes_to_its_float32_norms_rounding(tmp_path):
    """LlamaRMSNorm normalises in float32 whatever the model's dtype: the float64 decomposition
    adds up to that rounding (float32's 6e-8), and explain says where it comes from."""
    torch.manual_seed(0)
    model = llama().double().eval()
    initial = copy.deepcopy(model)
    prompts = record_next_token(tmp_path / "h", model)
    with pytest.warns(UserWarning, match=r"torch\.Tensor\.to at modeling_llama\.py:\d+ \(forward\)"):
        miss, coarser_rounding = explained_against_the_models_own_change(tmp_path / "h", model, initial, prompts[:3])
    assert 1e-11 < miss <= 1e-6 and coarser_rounding.startswith("torch.Tensor.to at modeling_llama.py:")


def test_activation_checkpointing_is_named_with_the_route_around_it(tmp_path):
    """Hugging Face's activation checkpointing hooks the input embeddings to require grad, which
    torch.func refuses: the Recorder's check names the hook and both switches; recorded unchecked
    and explained with both off, the decomposition is exact."""
    torch.manual_seed(0)
    model = gpt2().double().train()  # Hugging Face checkpoints in train mode only (dropout is 0 here)
    model.activation_checkpointing_enable()
    initial = copy.deepcopy(model)
    with pytest.raises(ex.UnsupportedError, match=r"(?s)at modeling_utils\.py:\d+ \(make_inputs_require_grads\).*"
                                                  r"disable_input_require_grads\(\).*activation_checkpointing_disable"):
        record_next_token(tmp_path / "refused", model)
    prompts = record_next_token(tmp_path / "h", model, check_every=0)
    model.activation_checkpointing_disable()
    model.disable_input_require_grads()
    miss, _ = explained_against_the_models_own_change(tmp_path / "h", model, initial, prompts[:3])
    assert miss <= 1e-9


def test_bloom_s_custom_gelu_is_named_and_its_fix_decomposes(tmp_path):
    """Bloom's GeLU is an old-style torch.autograd.Function, which torch.func cannot transform: the
    Recorder's gradient check names it and the fix; with the fix (the GeLU's own torch ops) the
    decomposition adds up to the float32 rounding of Bloom's attention softmax, which explain names."""
    torch.manual_seed(0)
    with pytest.raises(ex.UnsupportedError, match=r"(?s)GeLUFunction\.apply at modeling_bloom\.py:\d+.*bloom_gelu_forward"):
        record_next_token(tmp_path / "refused", bloom().double().eval())
    model = bloom().double().eval()
    for module in model.modules():
        if isinstance(module, BloomGelu):
            module.forward = bloom_gelu_forward
    initial = copy.deepcopy(model)
    prompts = record_next_token(tmp_path / "h", model)
    with pytest.warns(UserWarning, match=r"softmax at modeling_bloom\.py:\d+"):
        miss, coarser_rounding = explained_against_the_models_own_change(tmp_path / "h", model, initial, prompts[:3])
    assert 1e-12 < miss <= 1e-6 and "softmax at modeling_bloom.py:" in coarser_rounding


def test_mamba_s_cache_is_named_and_its_fix_decomposes(tmp_path):
    """Mamba fills its cache in place, which vmap cannot batch: explain names that line and
    use_cache=False, with which the decomposition adds up to the float32 rounding of its norms."""
    torch.manual_seed(0)
    config = MambaConfig(vocab_size=VOCAB, hidden_size=16, state_size=4, num_hidden_layers=1, expand=2, conv_kernel=2,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None)
    model = MambaForCausalLM(config).double().eval()
    initial = copy.deepcopy(model)
    prompts = record_next_token(tmp_path / "h", model)
    float32_norm = r"at modeling_mamba\.py:\d+"  # warned before each explain's first derivative
    with (pytest.warns(UserWarning, match=float32_norm),
          pytest.raises(ex.UnsupportedError, match=r"(?s)at cache_utils\.py:\d+.*in place.*use_cache=False")):
        ex.explain(tmp_path / "h", model, prompts[:3], loss=next_token_loss, output_fn=next_token, progress=False)
    model.config.use_cache = initial.config.use_cache = False
    with pytest.warns(UserWarning, match=float32_norm):
        miss, _ = explained_against_the_models_own_change(tmp_path / "h", model, initial, prompts[:3])
    assert 1e-12 < miss <= 1e-5


class Unpadded(torch.nn.Module):
    """The fix the refusal names for Hugging Face's padding warning: an attention mask of ones."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens):
        return self.model(tokens, attention_mask=torch.ones_like(tokens))


def test_deberta_s_padding_warning_is_named_and_its_fix_decomposes_exactly(tmp_path):
    """DeBERTa-v2 checks for padding by reading token ids in Python when called without an
    attention mask, which vmap cannot batch: explain names that line and the fix, which decomposes
    to rounding."""
    torch.manual_seed(0)
    config = DebertaV2Config(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=4, max_position_embeddings=8, hidden_dropout_prob=0.0,
                             attention_probs_dropout_prob=0.0, pooler_dropout=0.0, pad_token_id=0, num_labels=3)
    tokens = torch.randint(1, VOCAB, (16, 5))
    labels = tokens.sum(1) % 3

    def logits_loss(out, target):
        return F.cross_entropy(out.logits, target, reduction="none")

    def record(path, model):
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        with ex.Recorder(path, model, optimizer, loss=logits_loss, check_every=1) as rec:
            for step in range(3):
                batch = torch.arange(8) + 8 * (step % 2)
                optimizer.zero_grad()
                logits_loss(model(tokens[batch]), labels[batch]).mean().backward()
                rec.batch(batch, tokens[batch], labels[batch])
                optimizer.step()

    def explain(path, model):
        return ex.explain(path, model, tokens[:2], loss=logits_loss, output_fn=lambda out: out.logits, quadrature=8,
                          tolerance=1e-9, progress=False)

    model = DebertaV2ForSequenceClassification(config).double().eval()
    record(tmp_path / "refused", model)
    with pytest.raises(ex.UnsupportedError, match=r"(?s)at modeling_utils\.py:\d+ \(warn_if_padding_and_no_attention_mask\).*"
                                                  r"torch\.ones_like\(x\)"):
        explain(tmp_path / "refused", model)
    model = Unpadded(DebertaV2ForSequenceClassification(config).double().eval())
    record(tmp_path / "h", model)
    assert explain(tmp_path / "h", model).attrs["relative_residual"] <= 1e-9


class Padded(torch.nn.Module):
    """Token ids and their padding mask as one input [batch, 2, length] (explaind takes one
    tensor). Hugging Face's mask code reads the mask's values in Python, which vmap cannot batch;
    a 4D additive mask [batch, 1, queries, keys] it takes as it is, so `additive` hands it that:
    0 where a token may attend (not padding, not ahead), the dtype's lowest value elsewhere."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.additive = True

    def forward(self, x):
        tokens, kept = x[:, 0], x[:, 1]
        if not self.additive:
            return self.model(tokens, attention_mask=kept)
        length = x.shape[-1]
        ahead = torch.ones(length, length, dtype=torch.bool, device=x.device).triu(1)
        masked = (kept[:, None, None, :] == 0) | ahead
        return self.model(tokens, attention_mask=masked.to(self.model.dtype) * torch.finfo(self.model.dtype).min)


def test_a_tokenizer_s_batch_of_ids_and_mask_is_named_with_the_mask_wrapper(tmp_path):
    """A dict of input_ids and attention_mask, as a tokenizer returns them, was refused with the
    general advice (a wrapper whose forward takes one tensor); it now names the stacked tensor
    and the 4D mask wrapper."""
    model = gpt2().double().eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, VOCAB, (2, 4))
    with ex.Recorder(tmp_path / "h", model, optimizer, loss=next_token_loss) as rec:
        with pytest.raises(ex.InputError, match=re.escape(
                "token ids and their attention_mask go in as torch.stack([input_ids, attention_mask], 1) [batch, 2, "
                "length], through a module that hands the model a 4D additive mask (docs/library.md, 'Padded')")):
            rec.batch(torch.arange(2), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, ids[:, -1])


def test_padded_prompts_decompose_exactly_through_a_4d_mask(tmp_path):
    """Left-padded prompts of 2 to 4 tokens: with the 2D mask, explain names the mask code's line
    and the 4D mask; with the 4D mask the decomposition is exact to rounding."""
    torch.manual_seed(0)
    model = Padded(gpt2().double().eval())
    initial = copy.deepcopy(model)
    kept = (torch.arange(4) >= torch.randint(0, 3, (24, 1))).long()
    prompts = torch.stack([torch.randint(0, VOCAB, (24, 4)) * kept, kept], 1)
    record_next_token(tmp_path / "h", model, prompts)
    model.additive = False
    with pytest.raises(ex.UnsupportedError, match=r"(?s)at masking_utils\.py:\d+ \(_ignore_causal_mask_sdpa\).*"
                                                  r"4D additive mask"):
        explained_against_the_models_own_change(tmp_path / "h", model, initial, prompts[:3])
    model.additive = True
    miss, coarser_rounding = explained_against_the_models_own_change(tmp_path / "h", model, initial, prompts[:3])
    assert miss <= 1e-9 and coarser_rounding == ""


def test_a_fused_attention_gradient_of_a_fully_masked_row_is_named(tmp_path):
    """torch's fused CPU attention kernel computes, for a query whose every key is masked (a
    left-padded batch's padding under a 4D mask, whose prediction of the first token the shifted
    loss reads), a backward that is not its forward's derivative; the math kernel's is. The
    gradient check missed by 0.115 and listed the usual causes, none of them this one; it now names
    the kernel and the fixes, and the run trained with the math kernel is recorded."""
    torch.manual_seed(0)
    model = Padded(gpt2().double().eval())
    kept = (torch.arange(4) >= torch.tensor([[2], [1], [0], [2]])).long()
    tokens = torch.stack([torch.randint(0, VOCAB, (4, 4)) * kept, kept], 1)
    labels = tokens[:, 0].masked_fill(kept == 0, -100)[:, 1:]

    def sequence_sum(out, y):
        return F.cross_entropy(out.logits[:, :-1].transpose(1, 2), y, reduction="none").sum(1)

    def record(path):
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        with ex.Recorder(path, model, optimizer, loss=sequence_sum, reduction="token_mean", check_every=1) as rec:
            optimizer.zero_grad()
            F.cross_entropy(model(tokens).logits[:, :-1].flatten(0, 1), labels.flatten()).backward()
            rec.batch(torch.arange(4), tokens, labels)
            optimizer.step()

    with pytest.raises(ex.UnsupportedError, match=r"(?s)is what torch's fused attention kernel .* computes.*"
                                                  r"every key is masked.*SDPBackend\.MATH.*attn_implementation='eager'"):
        record(tmp_path / "fused")
    with sdpa_kernel(SDPBackend.MATH):
        record(tmp_path / "math")
    assert ex.History(tmp_path / "math").n_steps == 1


def test_the_loss_hugging_face_computes_is_float32_and_named_so(tmp_path):
    """model(x, labels=x).loss casts the logits to float32: in a float64 run the gradient check
    names it; with the tolerance it suggests, the decomposition holds to float32's precision."""
    torch.manual_seed(0)
    model = gpt2().double().eval()
    sequences = torch.randint(0, VOCAB, (16, 4))

    def shifted_loss(out, tokens):  # the same loss per sequence, in float64 (equal lengths: HF's is its mean)
        return F.cross_entropy(out.logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none").mean(1)

    def record(path, **options):
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        with ex.Recorder(path, model, optimizer, loss=shifted_loss, check_every=1, **options) as rec:
            for step in range(3):
                batch = torch.arange(8) + 8 * (step % 2)
                optimizer.zero_grad()
                model(sequences[batch], labels=sequences[batch]).loss.backward()
                rec.batch(batch, sequences[batch], sequences[batch])
                optimizer.step()

    with pytest.raises(ex.UnsupportedError, match="(?s)float32 rounding.*labels=.*check_tolerance=1e-6"):
        record(tmp_path / "refused")
    record(tmp_path / "h", check_tolerance=1e-6)
    cube = ex.explain(tmp_path / "h", model, sequences[:2], loss=shifted_loss, output_fn=next_token, quadrature=8,
                      progress=False)
    assert 1e-10 < cube.attrs["relative_residual"] <= 1e-5
    assert cube.attrs["max_abs_residual_from_updates"] > cube.attrs["max_abs_path_residual"]


def test_the_loss_hugging_face_computes_over_padded_labels_is_named_with_its_token_mean(tmp_path):
    """Padded labels (-100) under reduction='token_mean': the float32 rounding of
    model(x, labels=...).loss is named with the loss that records it exactly, the per-sequence
    sums divided by the batch's tokens; the message said 'averaged', which is not that loss."""
    torch.manual_seed(0)
    model = gpt2().double().eval()
    sequences = torch.randint(0, VOCAB, (8, 4))
    labels = sequences.masked_fill(torch.arange(4) >= torch.randint(2, 5, (8, 1)), -100)  # right padding

    def sequence_sum(out, y):
        return F.cross_entropy(out.logits[:, :-1].transpose(1, 2), y, reduction="none").sum(1)

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    with pytest.raises(ex.UnsupportedError) as caught:
        with ex.Recorder(tmp_path / "h", model, optimizer, loss=sequence_sum, reduction="token_mean") as rec:
            optimizer.zero_grad()
            model(sequences, labels=labels).loss.backward()
            rec.batch(torch.arange(8), sequences, labels[:, 1:])
            optimizer.step()
    message = str(caught.value)
    assert "float32 rounding" in message and ("(the declared per-sample loss, summed over the batch and divided by "
                                              "its count of target tokens that are not -100)") in message, message
    with ex.Recorder(tmp_path / "exact", model, optimizer, loss=sequence_sum, reduction="token_mean") as rec:
        optimizer.zero_grad()  # the advice: the same loss from the logits, in float64
        F.cross_entropy(model(sequences).logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()).backward()
        rec.batch(torch.arange(8), sequences, labels[:, 1:])
        optimizer.step()
