"""explain(output_fn=...): a model whose output is not one [batch, outputs] matrix (a sequence
model's logits at every position, a dict of tensors) is trained on its whole output and explained
on a part of it. The training loss, and so every per-sample gradient, keeps the whole output."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import explaind as ex
from explaind import datamodels
from explaind.losses import sample_weights

VOCAB, LENGTH, N_TRAIN, BATCH, STEPS, LR = 6, 4, 12, 4, 6, 0.05


class SequenceModel(nn.Module):
    """Next-token logits at every position, [batch, length, vocab]: tokens embedded, mixed
    causally (a running mean over the positions so far), through a tanh layer."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.hidden = nn.Linear(8, 8)
        self.unembed = nn.Linear(8, VOCAB)

    def forward(self, tokens):
        h = self.embed(tokens)
        h = h.cumsum(1) / torch.arange(1, tokens.shape[1] + 1, dtype=h.dtype)[:, None]
        return self.unembed(torch.tanh(self.hidden(h)))


class FlattenedSequenceModel(SequenceModel):
    """The same function and parameter names, returning [batch, length · vocab]."""

    def forward(self, tokens):
        return super().forward(tokens).flatten(1)


def sequence_loss(out, targets):
    """Per-sample mean next-token cross-entropy over the positions."""
    return F.cross_entropy(out.transpose(1, 2), targets, reduction="none").mean(1)


def flattened_loss(out, targets):
    return sequence_loss(out.view(len(out), LENGTH, VOCAB), targets)


def last_position(out):
    return out[:, -1]


def sequences_and_batches():
    """Token sequences x [N_TRAIN + 3, LENGTH] with their next tokens y, and each step's rows."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (N_TRAIN + 3, LENGTH + 1), generator=generator)
    batches = [torch.randperm(N_TRAIN, generator=generator)[:BATCH] for _ in range(STEPS)]
    return tokens[:, :-1], tokens[:, 1:], batches


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """AdamW on shuffled mini-batches of token sequences (the target: the next token)."""
    x, y, batches = sequences_and_batches()
    torch.manual_seed(0)
    model = SequenceModel().double()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    path = tmp_path_factory.mktemp("output_fn") / "history"
    with ex.Recorder(path, model, optimizer, loss=sequence_loss, check_every=1) as rec:
        for rows in batches:
            optimizer.zero_grad()
            sequence_loss(model(x[rows]), y[rows]).mean().backward()
            rec.batch(rows, x[rows], y[rows])
            optimizer.step()
    return path, model, x[N_TRAIN:], y[N_TRAIN:, -1]


def explain(run, model=None, targets=None, **kwargs):
    path, trained, test_x, test_y = run
    kwargs.setdefault("loss", sequence_loss)
    return ex.explain(path, model or trained, test_x, test_y if targets is None else targets, quadrature=8,
                      progress=False, **kwargs)


def at_step(path, step: int) -> SequenceModel:
    model = SequenceModel().double()
    with torch.no_grad():
        for name, value in ex.History(path).params(step).items():
            dict(model.named_parameters())[name].copy_(value)
    return model


def test_the_last_positions_log_probabilities_are_decomposed_exactly(run):
    path, _, test_x, _ = run
    cube = explain(run, output_fn=last_position, tolerance=1e-9)
    assert cube.attrs["relative_residual"] <= 1e-9 and cube.attrs["output_fn"] == "last_position"
    assert cube.sizes["output"] == VOCAB and cube.attrs["max_abs_change"] > 1e-2
    with torch.no_grad():  # the module's own last position, before and after training
        for variable, step in (("initial", 0), ("final", STEPS)):
            expected = F.log_softmax(at_step(path, step)(test_x)[:, -1], -1).numpy()
            np.testing.assert_allclose(cube[variable].values, expected, rtol=0, atol=1e-13)
    summed = cube["attribution"].sum(["step", "component", "train"]) + cube["regularization"].sum(["step", "component"])
    gap = np.abs(summed - (cube["final"] - cube["initial"] - cube["residual"])).max()
    assert float(gap) <= 1e-12 * cube.attrs["max_abs_change"]


def test_output_fn_equals_the_same_outputs_selected_from_the_flattened_model(run):
    """The whole output flattened (same parameter names), its last position's logits selected."""
    selected = explain(run, FlattenedSequenceModel().double(), loss=flattened_loss, target="logit",
                       outputs=list(range((LENGTH - 1) * VOCAB, LENGTH * VOCAB)), tolerance=1e-9)
    viewed = explain(run, output_fn=last_position, target="logit", tolerance=1e-9)
    for variable in ("attribution", "regularization", "initial", "final"):
        expected = selected[variable].values
        assert np.abs(viewed[variable].values - expected).max() <= 1e-12 * np.abs(expected).max(), variable


def test_reconstruct_and_plan_take_output_fn(run):
    path, model, test_x, _ = run
    rec = ex.reconstruct(path, model, test_x, output_fn=last_position, quadrature=8, progress=False)
    cube = explain(run, output_fn=last_position, keep=("test", "output"))
    assert rec.attrs["output_fn"] == "last_position" and rec.sizes["output"] == VOCAB
    np.testing.assert_allclose(rec["residual"].values, cube["residual"].values, rtol=0, atol=1e-12)
    plan = ex.plan(path, model, test_x, loss=sequence_loss, output_fn=last_position)
    assert plan.n_outputs == VOCAB


def test_tracin_takes_the_custom_loss_and_output_fn(run):
    """TracIn of the last position's true next token against its definition, summed by hand:
    −η ⟨∇ log p(y_x | x; θ_s), ∇ ℓ(z_k; θ_s) / |b_s|⟩ over the steps whose batch held k."""
    path, model, test_x, test_y = run
    scores = datamodels.tracin_scores(ex.History(path), model, test_x, test_y, loss=sequence_loss,
                                      output_fn=last_position, progress=False)
    x, y, batches = sequences_and_batches()
    expected = np.zeros((N_TRAIN, len(test_x)))
    for step, rows in enumerate(batches):
        at = at_step(path, step)

        def gradient(value):
            return torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, list(at.parameters()))])

        tests = [gradient(F.log_softmax(at(xt[None])[:, -1], -1)[0, yt]) for xt, yt in zip(test_x, test_y)]
        for k in rows.tolist():
            g_train = gradient(sequence_loss(at(x[k:k + 1]), y[k:k + 1])[0]) / BATCH
            expected[k] += [-LR * float(g_train @ g_test) for g_test in tests]
    seen = scores["train"].values  # the samples some batch held
    assert seen.tolist() == torch.cat(batches).unique().tolist()
    np.testing.assert_allclose(scores.values, expected[seen], rtol=1e-10, atol=1e-15)
    assert np.abs(expected).max() > 1e-3
    with pytest.raises(ex.InputError, match="custom loss"):
        datamodels.tracin_scores(ex.History(path), model, test_x, test_y, output_fn=last_position, progress=False)


def test_targets_at_every_position_are_named_with_the_explained_positions_column(run):
    """A sequence's next tokens [batch, length] as the test targets: the refusal named one-hot rows
    and the fix targets.argmax(1), which gives each sequence the position of its largest token id,
    a valid class, so that following it explained other outputs than the true ones, silently."""
    path, model, test_x, _ = run
    every_position = sequences_and_batches()[1][N_TRAIN:]
    calls = [lambda: explain(run, output_fn=last_position, outputs="true", targets=every_position),
             lambda: datamodels.tracin_scores(path, model, test_x, every_position, loss=sequence_loss,
                                              output_fn=last_position, progress=False)]
    for call in calls:
        with pytest.raises(ex.InputError) as caught:
            call()
        message = str(caught.value)
        assert f"targets of shape (3, {LENGTH})" in message and "targets[:, -1]" in message, message
        assert "argmax" not in message, message


def test_a_missed_update_names_a_custom_loss_given_under_another_name(run, monkeypatch):
    """explain given another custom loss than the one trained stopped at step 0 listing every cause
    of a missed update, without saying that the loss= given is not the one the history names; in
    either walk (the backward one wherever it holds less: BACKWARD_MEMORY_RATIO 1)."""
    monkeypatch.setattr(ex.engine, "BACKWARD_MEMORY_RATIO", 1)
    doubled = lambda out, targets: 2 * sequence_loss(out, targets)  # noqa: E731
    for keep, walk in ((("step", "component", "train", "test", "output"), "forward"), (("train", "test"), "backward")):
        assert ex.plan(run[0], run[1], run[2], loss=doubled, output_fn=last_position, keep=keep).direction == walk
        with pytest.raises(ex.ReconstructionError) as caught:
            explain(run, output_fn=last_position, loss=doubled, keep=keep)
        message = str(caught.value)
        assert "step 0's update residual" in message, message
        assert ("the loss= given is custom:test_output_fn.test_a_missed_update_names_a_custom_loss_given_under_"
                "another_name.<locals>.<lambda>, where the history was recorded with "
                "custom:test_output_fn.sequence_loss") in message, message
    with pytest.raises(ex.ReconstructionError) as caught:
        ex.verify_updates(run[0], run[1], loss=doubled)
    assert "where the history was recorded with custom:test_output_fn.sequence_loss" in str(caught.value)


def sequence_sum(out, targets):
    """Per-sample sum of next-token cross-entropy over the positions (a -100 target adds 0)."""
    return F.cross_entropy(out.transpose(1, 2), targets, reduction="none").sum(1)


def record_token_mean(path, targets, declared, reduction="mean", steps=1):
    """Steps of torch's mean over the tokens of the batch (the positions flattened into one batch,
    as a language model's loss is often written), recorded under a per-sample loss."""
    x = sequences_and_batches()[0][:len(targets)]
    torch.manual_seed(0)
    model = SequenceModel().double()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    with ex.Recorder(path, model, optimizer, loss=declared, reduction=reduction, check_every=1) as rec:
        for step in range(steps):
            rows = torch.arange(step, step + 3) % len(x)
            optimizer.zero_grad()
            F.cross_entropy(model(x[rows]).flatten(0, 1), targets[rows].flatten()).backward()
            rec.batch(rows, x[rows], targets[rows])
            optimizer.step()
    return model, x


def test_a_mean_over_tokens_is_named_by_the_gradient_check(tmp_path):
    """.grad of torch's mean over a batch's tokens is the declared gradient times a factor that
    the check named as clipping ('one factor below 1') for a per-sample sum over positions, and
    did not name at all for targets padded with -100 (torch's ignore_index), whose mean divides by
    the batch's counted tokens (a language model's padded batches). Both now name the reduction
    that records it, reduction='token_mean' with each sequence's sum over its positions."""
    y = sequences_and_batches()[1][:3]  # 3 sequences of 4 tokens (a batch size apart from the length)
    with pytest.raises(ex.UnsupportedError) as caught:
        record_token_mean(tmp_path / "summed", y, sequence_sum)
    message = str(caught.value)
    assert f".grad is {1 / LENGTH:.6g} times" in message and "mean over the batch's 12 target tokens" in message
    assert "reduction='token_mean'" in message and "reduction='none').sum(1)" in message, message
    assert "clipping the gradient" not in message, message
    padded = y.clone()
    padded[::2, :2] = -100  # two sequences' first two positions: 8 of 12 tokens counted
    with pytest.raises(ex.UnsupportedError) as caught:
        record_token_mean(tmp_path / "padded", padded, sequence_loss)
    message = str(caught.value)
    assert f".grad is {12 / 8:.6g} times" in message, message
    assert "mean over the batch's 8 target tokens that are not -100" in message, message
    assert "reduction='token_mean'" in message, message
    # token_mean declared with a per-sample mean over the positions: LENGTH times too little
    with pytest.raises(ex.UnsupportedError) as caught:
        record_token_mean(tmp_path / "means", padded, sequence_loss, reduction="token_mean")
    message = str(caught.value)
    assert f".grad is {LENGTH:.6g} times" in message and "not their mean" in message, message


def test_token_mean_names_labels_the_loss_shifts_itself(tmp_path):
    """Hugging Face's labels are the tokens themselves, shifted inside the loss: declared so under
    reduction='token_mean', the count of the declared targets holds each sequence's first token,
    which no next-token loss reads, and .grad was 10 / 7 times the declared gradient with only the
    list of usual causes. The check now names the two counts, the shift and both fixes, either of
    which records the run."""
    x = sequences_and_batches()[0][:3]
    labels = x.clone()
    labels[1, 2:] = -100  # right padding: 10 of 12 positions counted, 7 of them read by the shifted loss

    def shifting_sum(out, y):  # the loss shifts the labels itself
        return F.cross_entropy(out[:, :-1].transpose(1, 2), y[:, 1:], reduction="none").sum(1)

    def record(path, declared, loss):
        torch.manual_seed(0)
        model = SequenceModel().double()
        optimizer = torch.optim.SGD(model.parameters(), lr=LR)
        with ex.Recorder(path, model, optimizer, loss=loss, reduction="token_mean", check_every=1) as rec:
            optimizer.zero_grad()
            F.cross_entropy(model(x)[:, :-1].flatten(0, 1), labels[:, 1:].flatten()).backward()
            rec.batch(torch.arange(3), x, declared)
            optimizer.step()

    with pytest.raises(ex.UnsupportedError) as caught:
        record(tmp_path / "unshifted", labels, shifting_sum)
    message = str(caught.value)
    assert f".grad is {10 / 7:.6g} times the declared gradient" in message, message
    assert ("divides by the declared targets' 10 tokens that are not -100, but .grad is the mean over 7 tokens"
            in message and "3 fewer, one per sequence" in message), message
    assert "pass batch() the labels shifted (labels[:, 1:])" in message and "first label to -100" in message
    first_ignored = labels.clone()
    first_ignored[:, 0] = -100
    record(tmp_path / "first_ignored", first_ignored, shifting_sum)
    record(tmp_path / "shifted", labels[:, 1:], lambda out, y: sequence_sum(out[:, :-1], y))
    assert ex.History(tmp_path / "shifted").n_steps == ex.History(tmp_path / "first_ignored").n_steps == 1


def test_token_mean_accumulated_over_micro_batches_names_the_step_s_token_count(tmp_path):
    """Two micro-batches of 2 sequences, 8 and 5 counted tokens: averaging their token means
    weighs a token of the second 8 / 5 times one of the first, and the check listed only the
    fix for micro-batches of unequal size (divide by the batch's size). It now names the step's
    count of tokens, and each micro-batch's summed loss divided by that count is recorded."""
    x, y = sequences_and_batches()[:2]
    x, y = x[:4], y[:4].clone()
    y[3, 1:] = -100  # 8 + 5 of 16 tokens counted

    def record(path, micro_loss):
        torch.manual_seed(0)
        model = SequenceModel().double()
        optimizer = torch.optim.SGD(model.parameters(), lr=LR)
        with ex.Recorder(path, model, optimizer, loss=sequence_sum, reduction="token_mean", check_every=1) as rec:
            optimizer.zero_grad()
            for part in (slice(0, 2), slice(2, 4)):
                micro_loss(model(x[part]).flatten(0, 1), y[part].flatten()).backward()
            rec.batch(torch.arange(4), x, y)
            optimizer.step()

    with pytest.raises(ex.UnsupportedError) as caught:
        record(tmp_path / "averaged", lambda out, t: F.cross_entropy(out, t) / 2)
    message = str(caught.value)
    assert ("With reduction='token_mean', gradient accumulation whose micro-batches' mean losses were averaged"
            in message and "by the count of target tokens that are not -100 in the step's whole batch" in message), message
    record(tmp_path / "summed", lambda out, t: F.cross_entropy(out, t, reduction="sum") / 13)
    assert ex.History(tmp_path / "summed").n_steps == 1


def test_a_mean_over_tokens_of_padded_batches_is_recorded_and_explained_exactly(tmp_path):
    """reduction='token_mean': every sample weighs 1 / the batch's tokens that are not -100, a
    count that changes with each batch's padding (counted by hand here); torch's mean over the
    flattened positions then passes the gradient check at every step, and the run explains to
    the change of outputs computed here at θ_0 and θ_N."""
    y = sequences_and_batches()[1][:6].clone()
    y[0, :3] = y[2, :1] = y[3, 2:] = -100
    model, x = record_token_mean(tmp_path / "h", y, sequence_sum, reduction="token_mean", steps=4)
    history = ex.History(tmp_path / "h")
    assert history.reduction == "token_mean"
    for rec in history.steps():
        counted = int((rec.targets != -100).sum())
        weights = history.sample_weights(rec, torch.float64, "cpu")
        np.testing.assert_array_equal(weights.numpy(), np.full(3, 1 / counted))
    # rows 0-2, 1-3, 2-4, 3-5 of 1, 4, 3, 2, 4, 4 counted tokens
    assert [int((r.targets != -100).sum()) for r in history.steps()] == [8, 9, 9, 10]
    test = x[:2]
    cube = ex.explain(history, model, test, keep=("train", "test", "output"), output_fn=last_position,
                      loss=sequence_sum, quadrature=8, progress=False)
    change = []
    for s in (0, history.n_steps):
        model.load_state_dict(history.params(s))
        with torch.no_grad():
            change.append(F.log_softmax(model(test)[:, -1], -1))
    np.testing.assert_allclose(cube["attribution"].sum("train").values, (change[1] - change[0]).numpy(), rtol=0,
                               atol=1e-9)
    assert cube.attrs["max_update_residual"] <= 1e-12
    with pytest.raises(ex.InputError, match="reduction='token_mean' counts a batch's class targets, but its targets "
                                            "are torch.float64"):
        sample_weights("token_mean", "custom:sequence_sum", y.double(), None, torch.float64, "cpu")


class DictOutput(nn.Module):
    """A model returning a dict, as many libraries' models do."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 3)

    def forward(self, x):
        return {"logits": self.layer(torch.tanh(x)), "hidden": x}


def test_a_dict_output_is_explained_through_output_fn(tmp_path):
    torch.manual_seed(0)
    model = DictOutput().double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    x, y = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,))

    def loss(out, targets):
        return F.cross_entropy(out["logits"], targets, reduction="none")

    with ex.Recorder(tmp_path / "h", model, optimizer, loss=loss) as rec:
        for _ in range(4):
            optimizer.zero_grad()
            loss(model(x[:8]), y[:8]).mean().backward()
            rec.batch(torch.arange(8), x[:8], y[:8])
            optimizer.step()
    cube = ex.explain(tmp_path / "h", model, x[8:], y[8:], loss=loss, output_fn=lambda out: out["logits"],
                      quadrature=8, tolerance=1e-9, progress=False)
    assert cube.attrs["relative_residual"] <= 1e-9 and cube.sizes["output"] == 3
    with torch.no_grad():
        expected = F.log_softmax(model(x[8:])["logits"], -1).numpy()
    np.testing.assert_allclose(cube["final"].values, expected, rtol=0, atol=1e-13)


@pytest.mark.parametrize("output_fn, words", [
    ("last", ("output_fn must be a function", "'last'")),
    (lambda out: out, ("output_fn returned outputs of shape (1, 4, 6)", "[batch, outputs]")),
    # the batch dim dropped or mixed: torch's own index_add_ error, or "one output per input" for
    # the row of one position, before the batch size was checked
    (lambda out: out[-1], ("output_fn returned outputs of shape (4, 6) for 1 input(s)", "out[:, -1]")),
    (lambda out: out.mean(0), ("shape (4, 6) for 1 input(s)", "batch dim first")),
    (lambda out: out[:, -1].T, ("shape (6, 1) for 1 input(s)",)),
    (lambda out: out[0, -1], ("shape (6, 1) for 1 input(s)",)),
], ids=["not callable", "still three dims", "last row", "mean over the batch", "transposed", "one row as a vector"])
def test_an_output_fn_that_gives_no_matrix_is_refused(run, output_fn, words):
    path, model, test_x, _ = run
    calls = [lambda: explain(run, output_fn=output_fn)]
    if callable(output_fn):
        calls.append(lambda: ex.reconstruct(path, model, test_x, output_fn=output_fn, progress=False))
    for call in calls:
        with pytest.raises(ex.InputError) as caught:
            call()
        assert all(w in str(caught.value) for w in words), str(caught.value)
