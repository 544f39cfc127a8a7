"""Every refusal of what cannot be decomposed exactly: raised before heavy compute, naming the cause and a fix."""

from __future__ import annotations

import inspect
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import xarray as xr
from torch import nn

import explaind as ex
import explaind.functional as functional
from explaind.datamodels import tracin_scores
from explaind.distributed import explain_shard
from explaind.engine import check_residual
from explaind.quadrature import MAX_NODES, nodes
from explaind.resumable import explain_resumable
from explaind.verify import quadrature_sensitivity
from engine_cases import MLP, Case, make_data, train


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train(Case("mlp", "sgd_momentum", steps=4, n_train=8), tmp_path_factory.mktemp("refusals") / "h")


@pytest.fixture
def no_heavy_compute(monkeypatch):
    """Makes any Jacobian / per-sample gradient / path computation fail the test."""

    def forbidden(*args, **kwargs):
        raise AssertionError("heavy compute started before the refusal")

    heavy = ("jacobian", "path_jacobian", "per_sample_gradients", "directional", "directional_along",
             "kink_pattern")
    patched = [name for name in heavy if hasattr(functional.FlatModel, name)]
    assert "jacobian" in patched or "path_jacobian" in patched
    for name in patched:
        monkeypatch.setattr(functional.FlatModel, name, forbidden)


def says(*words: str) -> str:
    """A regex matching a message that contains every word, in any order, across lines."""
    return "(?is)" + "".join(f"(?=.*{re.escape(w)})" for w in words)


def data(n: int = 8):
    x, y, _, _ = make_data("mlp", n, 0, 0)
    return x, y


def model_and_sgd(**kwargs):
    model = Case("mlp").fresh_model()
    return model, torch.optim.SGD(model.parameters(), lr=0.1, **kwargs)


def loop(rec, model, optimizer, x, y, steps: int = 2, reduction: str = "mean", clip: float | None = None):
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y, reduction=reduction).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        rec.batch(torch.arange(len(x)), x, y)
        optimizer.step()


# --------------------------------------------------------------------------- at record time


def test_unsupported_optimizer(tmp_path):
    model = Case("mlp").fresh_model()
    optimizer = torch.optim.RMSprop(model.parameters(), lr=0.01)
    with pytest.raises(ex.UnsupportedError, match=says("RMSprop", "SGD", "Adam", "AdamW", "Fix")):
        ex.Recorder(tmp_path / "h", model, optimizer)
    assert not (tmp_path / "h").exists()


@pytest.mark.parametrize("cls", ["SGD", "Adam", "AdamW"])
def test_maximize(tmp_path, cls):
    model = Case("mlp").fresh_model()
    optimizer = getattr(torch.optim, cls)(model.parameters(), lr=0.01, maximize=True)
    with pytest.raises(ex.UnsupportedError, match=says("maximize=True", "maximize=False")):
        ex.Recorder(tmp_path / "h", model, optimizer)


class WithModule(nn.Module):
    def __init__(self, module: nn.Module):
        super().__init__()
        self.inner = module
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.inner(x))


@pytest.mark.parametrize("module, name", [(nn.Dropout(0.2), "Dropout"), (nn.BatchNorm1d(4), "BatchNorm1d"),
                                          (nn.RReLU(), "RReLU")])
def test_train_mode_dropout_rrelu_and_batchnorm_at_record_time(tmp_path, module, name):
    model = WithModule(module).double().train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ex.UnsupportedError, match=says(name, "inner", "eval()")):
        ex.Recorder(tmp_path / "h", model, optimizer)


def test_every_train_mode_module_is_named_at_once(tmp_path):
    """A CNN-like model built in train mode with BatchNorm and Dropout: the refusal named the
    BatchNorm alone, so a user who put it in eval mode was refused again for the Dropout; both are
    named at once, each with its fix."""
    model = WithModule(nn.Sequential(nn.BatchNorm1d(4), nn.Dropout(0.2))).double().train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ex.UnsupportedError, match=says("2 modules cannot be replayed", "'inner.0' is a train-mode "
                                                       "BatchNorm1d", "'inner.1' is a train-mode Dropout",
                                                       "set p=0")):
        ex.Recorder(tmp_path / "h", model, optimizer)
    assert not (tmp_path / "h").exists()


@pytest.mark.parametrize("module, name", [(nn.Dropout(0.2), "Dropout"), (nn.BatchNorm1d(4), "BatchNorm1d")])
def test_train_mode_dropout_and_batchnorm_at_explain_time(tmp_path, no_heavy_compute, module, name):
    """Recorded in eval mode, then handed to explain() in train mode."""
    model = WithModule(module).double().eval()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = data()
    with ex.Recorder(tmp_path / "h", model, optimizer) as rec:
        loop(rec, model, optimizer, x, y)
    model.train()  # as torch builds a module: the fix is eval(), not another run
    for call in (lambda: ex.explain(tmp_path / "h", model, x[:2], progress=False),
                 lambda: ex.reconstruct(tmp_path / "h", model, x[:2], progress=False),
                 lambda: ex.verify_updates(tmp_path / "h", model)):
        with pytest.raises(ex.UnsupportedError, match=says(name, "model.eval() before explaining",
                                                           "recorded in eval mode")) as err:
            call()
        assert "whole run" not in str(err.value)


@pytest.mark.parametrize("module, name", [(nn.Dropout(0.2), "Dropout"), (nn.BatchNorm1d(4), "BatchNorm1d")])
def test_dropout_or_batchnorm_switched_on_mid_run_is_refused_at_that_step(tmp_path, module, name):
    """A loop's model.train() at an epoch's start, after the Recorder saw the model in eval mode:
    refused at the next step, not only at the next gradient check (check_every steps later), and
    named as such (a train-mode BatchNorm also changes its buffers, a cause that says less)."""
    model = WithModule(module).double().eval()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = data()
    with pytest.raises(ex.UnsupportedError, match=says(name, "at step 2", "no model.train() in the loop")):
        with ex.Recorder(tmp_path / "h", model, optimizer) as rec:
            loop(rec, model, optimizer, x, y, steps=2)
            model.train()
            loop(rec, model, optimizer, x, y, steps=1)
    assert ex.History(tmp_path / "h", allow_incomplete=True).n_steps == 2  # nothing of the refused step


class BatchDependent(nn.Module):
    """Hidden units centred on the batch's mean (the model "normalises" by a batch statistic); an
    output whose batch dim squeeze() drops for a batch of one; or dropout in forward."""

    def __init__(self, form: str):
        super().__init__()
        self.a, self.b, self.form = nn.Linear(4, 6), nn.Linear(6, 3), form

    def forward(self, x):
        h = self.a(x)
        if self.form == "centred":
            return self.b(torch.tanh(h - h.mean(0)))
        if self.form == "squeezed":
            return self.b(torch.tanh(h)).squeeze()
        return self.b(F.dropout(torch.tanh(h), 0.3, training=True))


@pytest.mark.parametrize("form, words", [
    ("centred", ["at step 0", "depends on the other samples of its batch", "sample 0's loss", "alone",
                 "x.mean(0)", "Fix", "each sample on its own"]),
    ("squeezed", ["at step 0", "fails on one sample alone", "sample 0", "Fix", "including 1", "squeeze()"]),
    ("random", ["at step 0", "other losses each time it runs on the same batch", "F.dropout", "Fix",
                "remove the randomness"]),
])
def test_a_model_whose_samples_are_not_its_own_is_refused_at_the_first_step(tmp_path, form, words):
    """Its whole-batch gradient passes the gradient check, but the per-sample shares explain()
    computes on each sample alone would not add up to it: refused before the step is kept."""
    model = BatchDependent(form).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = data()
    with pytest.raises(ex.UnsupportedError, match=says(*words)):
        with ex.Recorder(tmp_path / "h", model, optimizer) as rec:
            loop(rec, model, optimizer, x, y, steps=1)
    with pytest.raises(ex.HistoryError, match="no complete step"):  # the refused step is not kept
        ex.History(tmp_path / "h", allow_incomplete=True)


def test_a_loss_that_compares_the_samples_is_refused_at_the_first_step(tmp_path):
    """A declared per-sample loss that reads the whole batch (logits centred on the batch's mean,
    as a contrastive loss compares samples): no sample's share is its own either."""
    def centred(out, targets):
        return F.cross_entropy(out - out.mean(0), targets, reduction="none")

    model, optimizer = model_and_sgd()
    x, y = data()
    with pytest.raises(ex.UnsupportedError, match=says("at step 0 a sample's loss depends on the other samples",
                                                       "contrastive loss", "Fix")):
        with ex.Recorder(tmp_path / "h", model, optimizer, loss=centred) as rec:
            optimizer.zero_grad()
            centred(model(x), y).mean().backward()
            rec.batch(torch.arange(len(x)), x, y)
            optimizer.step()


class RowBranch(nn.Module):
    """A Python branch per input on its value: each sample's output is its own, but neither its
    kinks nor its per-sample passes can be batched."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)

    def forward(self, x):
        return torch.stack([self.a(row) if row[0] > 0 else -self.a(row) for row in x])


def test_a_python_branch_per_input_is_named_with_both_routes_around_it(tmp_path):
    """The kink search's refusal names breakpoints=False and, since a train dim's per-sample
    passes cannot be batched either, torch.where or a cube without a train dim, which is exact."""
    torch.manual_seed(0)
    model, (x, y) = RowBranch().double(), data()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with ex.Recorder(tmp_path / "h", model, optimizer) as rec:
        loop(rec, model, optimizer, x, y, steps=3)
    with pytest.raises(ex.UnsupportedError, match=says("branches on its input", "breakpoints=False", "torch.where",
                                                       "without a train dim")):
        ex.explain(tmp_path / "h", model, x[:3], progress=False)
    cube = ex.explain(tmp_path / "h", model, x[:3], keep=("step", "test"), breakpoints=False, progress=False)
    assert cube.attrs["relative_residual"] <= 1e-12


class Routed(nn.Module):
    """A head added only to the inputs whose last feature is positive, and skipped by a Python
    branch for a batch that holds none (as a mixture of experts skips an expert given no token):
    a function of the parameters and each input alone, whose head gets no .grad at such a step."""

    def __init__(self):
        super().__init__()
        self.a, self.aux = nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x):
        routed = x[:, 3:] > 0
        return self.a(x) + routed * self.aux(x) if bool(routed.any()) else self.a(x)


def routed_run(path, model, optimizer, steps: int, fill_missing: bool, freeze_at: int | None = None,
               set_to_none: bool = True):
    """Batches alternate between inputs routed to the head (even steps) and inputs that are not."""
    x, y = routed_data()
    with ex.Recorder(path, model, optimizer) as rec:
        for step in range(steps):
            rows = torch.arange(4) + 4 * (step % 2)
            if step == freeze_at:
                model.a.weight.requires_grad_(False)
            optimizer.zero_grad(set_to_none=set_to_none)
            F.cross_entropy(model(x[rows]), y[rows]).backward()
            if fill_missing:  # the fix the refusal names
                for p in model.parameters():
                    if p.grad is None and p.requires_grad:
                        p.grad = torch.zeros_like(p)
            rec.batch(rows, x[rows], y[rows])
            optimizer.step()


def routed_data():
    x, y = data()
    x[:, 3] = torch.where(torch.arange(8) < 4, x[:, 3].abs(), -x[:, 3].abs())
    return x, y


def test_a_parameter_without_gradient_is_named_with_the_fix_for_its_cause(tmp_path):
    """Unused at a step (the optimizer skips it: no decay, no momentum) or frozen mid-run: each
    refusal names its own fix, and the zero gradient it names for the first is explained exactly."""
    torch.manual_seed(0)
    model = Routed().double()
    adamw = lambda: torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)  # noqa: E731
    with pytest.raises(ex.UnsupportedError, match=says("'aux.weight' has no gradient at step 1", "did not enter",
                                                       "p.grad = torch.zeros_like(p)")):
        routed_run(tmp_path / "unused", model, adamw(), steps=3, fill_missing=False)
    # zeroed to None, the frozen tensor has no .grad; zeroed to zeros, it keeps one (which passed before)
    for set_to_none in (True, False):
        with pytest.raises(ex.UnsupportedError, match=says("'a.weight' was frozen", "after the recording started",
                                                           "at step 2", "a new one")):
            routed_run(tmp_path / f"frozen{set_to_none}", model, adamw(), steps=3, fill_missing=True, freeze_at=2,
                       set_to_none=set_to_none)
        model.a.weight.requires_grad_(True)
    model, (x, _) = Routed().double(), routed_data()
    initial = model(x).detach()
    routed_run(tmp_path / "filled", model, adamw(), steps=4, fill_missing=True)
    cube = ex.explain(tmp_path / "filled", model, x, keep=("step", "component", "test", "output"),
                      breakpoints=False, quadrature=8, progress=False)
    assert float(abs(cube.regularization.sel(component="aux.weight").isel(step=1)).max()) > 0  # decayed unused
    change = (model(x).log_softmax(1) - initial.log_softmax(1)).detach()
    total = (cube.attribution + cube.regularization).sum(["step", "component"]).transpose("test", "output")
    assert float(abs(total.values - change.numpy()).max()) <= 1e-12 * float(abs(change).max())


def spectral_normed(style: str) -> nn.Module:
    layer = nn.Linear(4, 4)
    if style == "parametrization":
        return torch.nn.utils.parametrizations.spectral_norm(layer)
    return torch.nn.utils.spectral_norm(layer)  # the older forward pre-hook


# the older hook leaves a computed module.weight, which deepcopy refuses: explaind calls the module itself
@pytest.mark.filterwarnings("ignore:explaind could not copy the module")
@pytest.mark.parametrize("style, where", [("parametrization", "'inner.parametrizations.weight.0'"),
                                          ("hook", "'inner'")])
def test_spectral_norm_is_recorded_in_eval_mode_and_refused_in_train_mode(tmp_path, style, where):
    """In train mode every forward pass updates spectral norm's power-iteration buffers: refused
    with the cause (it read as a buffer changed by hand, with a fix that did not apply). In eval
    mode its vectors stay, and the run decomposes exactly."""
    torch.manual_seed(0)
    model = WithModule(spectral_normed(style)).double()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    with pytest.raises(ex.UnsupportedError, match=says(where, "spectral norm in train mode", "power-iteration",
                                                       "Fix", "eval mode")):
        ex.Recorder(tmp_path / "train", model, optimizer)
    assert not (tmp_path / "train").exists()
    model.eval()
    x, y = data()
    with ex.Recorder(tmp_path / "eval", model, optimizer, check_every=1) as rec:
        loop(rec, model, optimizer, x, y, steps=3)
    cube = ex.explain(tmp_path / "eval", model, x[:2], keep=("train", "test"), quadrature=8, progress=False)
    assert cube.attrs["relative_residual"] <= 1e-9 and cube.attrs["max_update_residual"] <= 1e-12


def without_running_statistics(norm: nn.BatchNorm1d) -> nn.BatchNorm1d:
    norm.running_mean = norm.running_var = None  # torch then normalises with the batch's, in eval mode too
    return norm


@pytest.mark.parametrize("norm", [nn.BatchNorm1d(4, track_running_stats=False), without_running_statistics(nn.BatchNorm1d(4))],
                         ids=["track_running_stats=False", "running statistics set to None"])
def test_batchnorm_without_running_statistics_is_refused_in_eval_mode_too(tmp_path, norm):
    model = WithModule(norm).double().eval()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, _ = data()
    with torch.no_grad():  # the reason: a sample's output depends on the rest of its batch
        assert not torch.allclose(model(x)[:2], model(x[:2]))
    with pytest.raises(ex.UnsupportedError, match=says("BatchNorm1d", "without running statistics", "in any mode",
                                                       "track_running_stats=True", "LayerNorm")):
        ex.Recorder(tmp_path / "h", model, optimizer)


class SampleNorm(nn.Module):
    """A linear layer, then InstanceNorm over each sample's 4 features (one channel of length 4):
    the statistics normalised away depend on θ."""

    def __init__(self, track_running_stats: bool = False):
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.norm = nn.InstanceNorm1d(1, affine=True, track_running_stats=track_running_stats)

    def forward(self, x):
        return self.norm(self.linear(x).unsqueeze(1)).squeeze(1)


def test_instancenorm_without_running_statistics_is_explained_exactly_in_train_mode(tmp_path):
    """Each sample normalised by its own statistics is a function of (x, θ): accepted, and the
    decomposition adds up to the change of the model's own outputs (smooth in θ: Gauss nodes
    converge fast)."""
    torch.manual_seed(0)
    model = WithModule(SampleNorm()).double().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    x, y = data()
    test_x = x[:3] + 0.5
    with torch.no_grad():
        before = model(test_x)
    with ex.Recorder(tmp_path / "h", model, optimizer, check_every=1) as rec:
        loop(rec, model, optimizer, x, y, steps=4)
    with torch.no_grad():
        change = model(test_x) - before
    cube = ex.explain(tmp_path / "h", model, test_x, target="logit", keep=("test", "output"), quadrature=8,
                      progress=False)
    total = (cube["attribution"] + cube["regularization"]).transpose("test", "output").values
    assert np.abs(change.numpy()).max() > 0.05
    np.testing.assert_allclose(total, change.numpy(), rtol=0, atol=1e-12 * np.abs(change.numpy()).max())


def test_train_mode_instancenorm_with_running_statistics_is_refused(tmp_path):
    model = WithModule(SampleNorm(track_running_stats=True)).double().train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ex.UnsupportedError, match=says("InstanceNorm1d", "track_running_stats=True",
                                                       "track_running_stats=False", "eval mode")):
        ex.Recorder(tmp_path / "h", model, optimizer)


def test_gradient_clipping_is_caught_by_the_record_time_check(tmp_path):
    """The check finds .grad to be one factor below 1 times the declared gradient, and says that
    this is what clipping the norm makes: max_norm / ‖g‖ by torch's own computation."""
    model, optimizer = model_and_sgd(momentum=0.9)
    x, y = data()
    F.cross_entropy(model(x), y).backward()
    norm = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).norm()
    model.zero_grad()
    factor = f"{float(1e-3 / (norm + 1e-6)):.6g} times the declared gradient"
    with pytest.raises(ex.UnsupportedError, match=says("gradient", "step 0", factor, "one factor below 1",
                                                       "clipping the gradient's norm", "rec.clip_grad_norm_")):
        with ex.Recorder(tmp_path / "h", model, optimizer, check_every=1) as rec:
            loop(rec, model, optimizer, x, y, clip=1e-3)


def test_a_miss_of_rounding_is_not_named_as_a_factor_such_as_clipping(tmp_path):
    """Class weights declared in float32 while the float64 loop trains with their float64 values:
    torch's weighted mean divides by a total weight that differs by float32's rounding, so .grad
    is the declared gradient times 1 - 6e-9. Printed to 6 digits that factor reads 1, and a
    factor 1 names nothing: the check says float32 rounding, not '1 times the declared gradient'
    nor the clipping a factor below 1 would be."""
    model, optimizer = model_and_sgd()
    x, y = data()
    weights = torch.tensor([0.3, 0.7, 1.1], dtype=torch.float64)  # none of them a float32
    with pytest.raises(ex.UnsupportedError, match=says("float32 rounding")) as refused:
        with ex.Recorder(tmp_path / "h", model, optimizer, class_weights=weights.float()) as rec:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y, weight=weights).backward()
            rec.batch(torch.arange(len(x)), x, y)
            optimizer.step()
    assert "times the declared gradient" not in str(refused.value)
    assert "clipping the gradient's norm makes" not in str(refused.value)


def test_a_loss_scaled_as_gradscaler_scales_it_is_named_at_record_time(tmp_path):
    """.grad 65,536 times the declared gradient: a GradScaler's scale left in it (unscale_ not
    called before batch()), not 65,536 backward passes added up."""
    model, optimizer = model_and_sgd()
    x, y = data()
    with pytest.raises(ex.UnsupportedError, match=says("at step 0", ".grad is 65536 times the declared gradient",
                                                       "a power of two", "scaler.unscale_(optimizer) before batch()")):
        with ex.Recorder(tmp_path / "h", model, optimizer) as rec:
            optimizer.zero_grad()
            (F.cross_entropy(model(x), y) * 2.0**16).backward()
            rec.batch(torch.arange(len(x)), x, y)
            optimizer.step()


def clip_step(rec, model, optimizer, x, y, max_norm: float = 1e-3, times: int = 1):
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    rec.batch(torch.arange(len(x)), x, y)
    for _ in range(times):
        rec.clip_grad_norm_(max_norm)
    optimizer.step()


@pytest.mark.parametrize("max_norm, times, words", [
    (1e-3, 2, ("twice", "step 0", "once per step")),
    (0.0, 1, ("max_norm=0.0", "above 0", "Fix")),
    (-1.0, 1, ("max_norm=-1.0", "above 0", "Fix")),
], ids=["twice in a step", "zero", "negative"])
def test_clipping_through_the_recorder_refuses_misuse(tmp_path, max_norm, times, words):
    model, optimizer = model_and_sgd(momentum=0.9)
    x, y = data()
    with pytest.raises(ex.InputError, match=says(*words)):
        with ex.Recorder(tmp_path / "h", model, optimizer) as rec:
            clip_step(rec, model, optimizer, x, y, max_norm, times)


def test_clipping_a_non_finite_gradient_is_refused_each_time(tmp_path):
    """A caller who catches the refusal and clips again is refused for the gradient again, not
    told that it clipped twice: the refused factor is not kept for the step."""
    model, optimizer = model_and_sgd()
    x, y = data()
    with pytest.raises(ex.InputError, match=says("batch()", "never ran")):  # (the batch is never stepped)
        with ex.Recorder(tmp_path / "h", model, optimizer) as rec:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            next(model.parameters()).grad[0, 0] = float("inf")
            rec.batch(torch.arange(len(x)), x, y)
            for _ in range(2):
                with pytest.raises(ex.UnsupportedError, match=says("total norm", "step 0", "non-finite", "Fix")):
                    rec.clip_grad_norm_(1.0)


@pytest.mark.parametrize("cls", ["Adam", "AdamW"])
def test_a_float32_tensor_learning_rate_on_float64_parameters_is_refused(tmp_path, cls):
    """Adam computes its step size in the tensor's float32: verify_updates would miss by ~1e-7."""
    model = Case("mlp").fresh_model()
    optimizer = getattr(torch.optim, cls)(model.parameters(), lr=torch.tensor(0.01))
    x, y = data()
    with pytest.raises(ex.UnsupportedError, match=says("group 0", "torch.float32 tensor", "torch.float64",
                                                       "step size", "Fix", "dtype=torch.float64")):
        with ex.Recorder(tmp_path / "h", model, optimizer) as rec:
            loop(rec, model, optimizer, x, y)


def test_float32_tensor_betas_on_float64_parameters_are_refused(tmp_path):
    """Adam's bias corrections are computed in the betas' float32: verify_updates missed by 7e-7."""
    model = Case("mlp").fresh_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01, betas=(torch.tensor(0.9), torch.tensor(0.999)))
    x, y = data()
    with pytest.raises(ex.UnsupportedError, match=says("group 0", "beta", "torch.float32 tensor", "torch.float64",
                                                       "Fix", "dtype=torch.float64")):
        with ex.Recorder(tmp_path / "h", model, optimizer) as rec:
            loop(rec, model, optimizer, x, y)


@pytest.mark.parametrize("setting, words", [
    (dict(maximize=True), ("maximize=True", "maximize=False")),
    (dict(decoupled_weight_decay=True), ("became adamw", "was adam", "decoupled_weight_decay", "Fix")),
])
def test_optimizer_settings_changed_mid_run_are_refused_at_that_step(tmp_path, setting, words):
    model = Case("mlp").fresh_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=0.1)
    x, y = data()
    with pytest.raises(ex.UnsupportedError, match=says("before step 2", *words)):
        with ex.Recorder(tmp_path / "h", model, optimizer) as rec:
            loop(rec, model, optimizer, x, y)
            optimizer.param_groups[0].update(setting)
            loop(rec, model, optimizer, x, y, steps=1)
    assert ex.History(tmp_path / "h", allow_incomplete=True).n_steps == 2  # nothing of the refused step


@pytest.mark.parametrize("every", [-5, 0.5, True, "10"])
def test_a_nonsense_gradient_check_interval_is_refused(tmp_path, every):
    """-5 checked on Python's modulo, 0.5 and True every step; "10" failed at the first step."""
    model, optimizer = model_and_sgd()
    with pytest.raises(ex.InputError, match=says(f"check_every={every!r}", "whole number ≥ 0", "0: never")):
        ex.Recorder(tmp_path / "h", model, optimizer, check_every=every)
    assert not (tmp_path / "h").exists()


@pytest.mark.parametrize("tolerance", [float("nan"), -1e-9, "1e-9", True])
def test_a_nonsense_gradient_check_tolerance_is_refused(tmp_path, tolerance):
    """NaN turned the gradient check off, a negative one failed every step, 0 read as the default."""
    model, optimizer = model_and_sgd()
    with pytest.raises(ex.InputError, match=says(f"check_tolerance={tolerance!r}", "number ≥ 0", "None")):
        ex.Recorder(tmp_path / "h", model, optimizer, check_tolerance=tolerance)
    assert not (tmp_path / "h").exists()


def test_a_gradient_check_tolerance_of_zero_is_a_tolerance(tmp_path):
    """Zero allows no difference at all (it read as unset, i.e. the default 1e-9): a .grad
    scaled by 1 + 1e-12 is then refused."""
    model, optimizer = model_and_sgd()
    x, y = data()
    with pytest.raises(ex.UnsupportedError, match=says("at step 0", "tolerance 0e+00")):
        with ex.Recorder(tmp_path / "h", model, optimizer, check_tolerance=0, check_every=1) as rec:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            for p in model.parameters():
                p.grad.mul_(1 + 1e-12)
            rec.batch(torch.arange(len(x)), x, y)
            optimizer.step()


@pytest.mark.parametrize("cls, lr_dtype", [("SGD", torch.float32), ("AdamW", torch.float64)])
def test_tensor_learning_rates_that_reproduce_are_recorded(tmp_path, cls, lr_dtype):
    """SGD reads a tensor lr as a number; a float64 tensor gives Adam float64 step sizes."""
    model = Case("mlp").fresh_model()
    optimizer = getattr(torch.optim, cls)(model.parameters(), lr=torch.tensor(0.01, dtype=lr_dtype))
    x, y = data()
    with ex.Recorder(tmp_path / "h", model, optimizer) as rec:
        loop(rec, model, optimizer, x, y, steps=3)
    assert ex.verify_updates(tmp_path / "h", model).max() <= 1e-12


def test_mixed_precision_is_caught_by_the_record_time_check(tmp_path):
    """bfloat16 autocast rounds every product of the forward and backward pass: the recorded
    float32 tensors cannot reproduce that gradient."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))  # float32: what autocast casts
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = data(64)
    x = x.float()
    with pytest.raises(ex.UnsupportedError, match=says("step 0", "mixed precision", "autocast", "float32")):
        with ex.Recorder(tmp_path / "h", model, optimizer, check_every=1) as rec:
            optimizer.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            rec.batch(torch.arange(len(x)), x, y)
            optimizer.step()


def test_a_float32_loss_in_a_float64_run_is_named_with_both_fixes(tmp_path):
    """A loss computed from logits cast to float32 (as Hugging Face's model(..., labels=) does)
    misses the float64 gradient by float32's rounding: the check says so, and names computing
    the loss in float64 or a tolerance of float32's precision."""
    model, optimizer = model_and_sgd()
    x, y = data()
    with pytest.raises(ex.UnsupportedError, match=says("float32 rounding", "labels=", "check_tolerance=1e-6")):
        with ex.Recorder(tmp_path / "h", model, optimizer, check_every=1) as rec:
            optimizer.zero_grad()
            F.cross_entropy(model(x).float(), y).backward()
            rec.batch(torch.arange(len(x)), x, y)
            optimizer.step()


@pytest.mark.parametrize("dtype, rounding", [(torch.bfloat16, "4e-03"), (torch.float16, "5e-04")])
def test_16_bit_parameters_are_refused(tmp_path, dtype, rounding):
    """A 16-bit run rounds every update far beyond what the decomposition can attribute: explain
    blamed the optimizer model for it, after the whole computation."""
    model = Case("mlp").fresh_model().to(dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    with pytest.raises(ex.UnsupportedError, match=says(str(dtype).removeprefix("torch."), "float32 or float64",
                                                       rounding, "Fix", "model.float()")):
        ex.Recorder(tmp_path / "h", model, optimizer)
    assert not (tmp_path / "h").exists()


def test_parameters_of_two_precisions_are_refused(tmp_path):
    """A float32 layer beside a float64 one failed in the gradient check with torch's dtype error."""
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3).double())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ex.UnsupportedError, match=says("2 dtypes", "float32: '0.weight', '0.bias'",
                                                       "float64: '2.weight', '2.bias'", "model.double()")):
        ex.Recorder(tmp_path / "h", model, optimizer)
    assert not (tmp_path / "h").exists()


class Bag(nn.Module):
    """Token embeddings averaged: the module's (sparse gradients with sparse_module), or F.embedding's
    with sparse=True (sparse_call)."""

    def __init__(self, sparse_module: bool = False, sparse_call: bool = False):
        super().__init__()
        self.embed = nn.Embedding(10, 4, sparse=sparse_module)
        self.head = nn.Linear(4, 3)
        self.sparse_call = sparse_call

    def forward(self, tokens):
        vectors = F.embedding(tokens, self.embed.weight, sparse=True) if self.sparse_call else self.embed(tokens)
        return self.head(torch.tanh(vectors.mean(1)))


def test_sparse_embedding_gradients_are_refused(tmp_path):
    """Sparse gradients crashed the gradient check (torch cannot reshape them); a module is
    refused when the Recorder is built, a call in forward at its first step."""
    x, y = torch.randint(0, 10, (8, 3)), torch.randint(0, 3, (8,))
    model = Bag(sparse_module=True).double()
    with pytest.raises(ex.UnsupportedError, match=says("'embed'", "Embedding with sparse=True", "Fix",
                                                       "sparse=False")):
        ex.Recorder(tmp_path / "module", model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert not (tmp_path / "module").exists()
    model = Bag(sparse_call=True).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ex.UnsupportedError, match=says("'embed.weight'", "sparse gradient", "step 0",
                                                       "F.embedding", "sparse=False")):
        with ex.Recorder(tmp_path / "call", model, optimizer) as rec:
            loop(rec, model, optimizer, x, y)
    assert not any((tmp_path / "call" / "steps").iterdir())  # refused before its first step was stored


class Bounded(nn.Module):
    """Token vectors of norm at most 1: by nn.Embedding's max_norm (which renormalises the looked-up
    rows of the weight in place), or by scaling them in forward."""

    def __init__(self, in_place: bool):
        super().__init__()
        self.embed = nn.Embedding(10, 4, max_norm=1.0 if in_place else None)
        nn.init.normal_(self.embed.weight, std=0.5)  # norms about the bound: training crosses it
        self.head = nn.Linear(4, 3)

    def forward(self, tokens):
        v = self.embed(tokens)
        if self.embed.max_norm is None:
            v = v * (1.0 / v.norm(dim=-1, keepdim=True)).clamp(max=1)
        return self.head(torch.tanh(v.mean(1)))


def record_bounded(path) -> tuple[nn.Module, torch.Tensor]:
    """A run of Bounded scaling its vectors in forward, whose steps carry token vectors across the
    bound (8 kinks on the inputs' paths; with other data seeds 3 to 13): the model and its inputs."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 10, (8, 3), generator=g), torch.randint(0, 3, (8,), generator=g)
    torch.manual_seed(0)
    model = Bounded(in_place=False).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=2.0, momentum=0.9)
    with ex.Recorder(path, model, optimizer, check_every=1) as rec:
        loop(rec, model, optimizer, x, y, steps=6)
    return model, x


def test_an_embedding_with_max_norm_is_refused_when_recorded_and_explained(tmp_path, no_heavy_compute):
    """max_norm edits the parameters in each forward pass: recording read it as parameters changed
    by hand between steps, and explain failed in vmap, naming a tensor made without the input."""
    words = ("'embed'", "Embedding with max_norm=1.0", "in place", "Fix", "max_norm=None", "clamp(max=1)")
    model = Bounded(in_place=True).double()
    with pytest.raises(ex.UnsupportedError, match=says(*words)):
        ex.Recorder(tmp_path / "in_place", model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert not (tmp_path / "in_place").exists()
    _, x = record_bounded(tmp_path / "h")
    with pytest.raises(ex.UnsupportedError, match=says(*words)):
        ex.explain(tmp_path / "h", Bounded(in_place=True).double(), x[:2], progress=False)


def test_scaling_token_vectors_in_forward_decomposes_exactly(tmp_path):
    """The route the max_norm refusal names: a clamp in forward, whose kinks are located."""
    model, x = record_bounded(tmp_path / "h")
    cube = ex.explain(tmp_path / "h", model, x, keep=("train", "test"), quadrature=8, progress=False)
    assert cube.attrs["kinks_located"] > 0
    assert cube.attrs["relative_residual"] <= 1e-9 and cube.attrs["max_update_residual"] <= 1e-12


def test_an_embedding_that_scales_gradients_by_frequency_is_refused(tmp_path):
    """scale_grad_by_freq divides by counts over the whole batch: the Recorder's check (of the
    batch gradient) passed, and explain missed by 9e-3, blaming the loop or the model."""
    model = nn.Sequential(nn.Embedding(10, 4, scale_grad_by_freq=True), nn.Flatten(), nn.Linear(12, 3)).double()
    with pytest.raises(ex.UnsupportedError, match=says("'0'", "scale_grad_by_freq=True", "whole batch",
                                                       "Fix: scale_grad_by_freq=False")):
        ex.Recorder(tmp_path / "h", model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert not (tmp_path / "h").exists()


def test_undeclared_class_weights_are_named_by_the_gradient_check(tmp_path):
    """torch's class-weighted mean divides by the batch's total weight: the check names the
    declaration that models it (exact: test_history's class-weight tests)."""
    x, y = data()
    w = torch.tensor([1.0, 2.0, 5.0], dtype=torch.float64)
    model, optimizer = model_and_sgd(momentum=0.9)
    with pytest.raises(ex.UnsupportedError, match=says("step 0", "Class weights", "class_weights=w")):
        with ex.Recorder(tmp_path / "torch_mean", model, optimizer, check_every=1) as rec:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y, weight=w).backward()
            rec.batch(torch.arange(len(x)), x, y)
            optimizer.step()


def test_a_sparse_embedding_explains_a_run_recorded_dense(tmp_path):
    """The fix the refusal names: record with sparse=False; explain takes the module with
    sparse=True (torch.func's transforms take no sparse gradient: explaind's copy makes them dense)."""
    x, y = torch.randint(0, 10, (8, 3)), torch.randint(0, 3, (8,))
    torch.manual_seed(0)
    model = Bag().double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    with ex.Recorder(tmp_path / "h", model, optimizer) as rec:
        loop(rec, model, optimizer, x, y, steps=3)
    cubes = [ex.explain(tmp_path / "h", Bag(sparse_module=sparse).double(), x[:3], keep=("train", "test"),
                        quadrature=8, progress=False) for sparse in (False, True)]
    np.testing.assert_array_equal(cubes[0]["attribution"].values, cubes[1]["attribution"].values)
    assert cubes[1].attrs["relative_residual"] <= 1e-9


class Checkpointed(nn.Module):
    """A hidden layer under activation checkpointing (use_reentrant=False: saved-tensor hooks), or not."""

    def __init__(self, checkpointed: bool):
        super().__init__()
        self.hidden = nn.Linear(4, 6)
        self.head = nn.Linear(6, 3)
        self.checkpointed = checkpointed

    def forward(self, x):
        def block(z):
            return torch.tanh(self.hidden(z))

        h = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False) if self.checkpointed else block(x)
        return self.head(h)


def test_activation_checkpointing_is_named_with_the_route_around_it(tmp_path):
    """torch.func refuses saved-tensor hooks with a RuntimeError that named no fix. Named now, in
    the Recorder's gradient check and in explain; the route it names (record with check_every=0,
    explain the architecture without checkpointing) decomposes the checkpointed run exactly."""
    x, y = data()
    torch.manual_seed(0)
    model = Checkpointed(True).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    route = ("saved-tensor hooks", "use_reentrant=False", "Fix", "without checkpointing", "check_every=0")
    with pytest.raises(ex.UnsupportedError, match=says(*route)):
        with ex.Recorder(tmp_path / "checked", model, optimizer, check_every=1) as rec:
            loop(rec, model, optimizer, x, y)
    with ex.Recorder(tmp_path / "h", model, optimizer, check_every=0) as rec:
        loop(rec, model, optimizer, x, y, steps=3)
    with pytest.raises(ex.UnsupportedError, match=says(*route)):
        ex.explain(tmp_path / "h", model, x[:2], keep=("train", "test"), progress=False)
    cube = ex.explain(tmp_path / "h", Checkpointed(False).double(), x[:2], keep=("train", "test"), progress=False)
    assert cube.attrs["relative_residual"] <= 1e-9 and cube.attrs["max_update_residual"] <= 1e-12


def test_gradients_added_up_across_steps_or_micro_batches_are_named_at_record_time(tmp_path):
    """optimizer.zero_grad() forgotten: step 0's gradient is still in .grad at step 1, which the
    Recorder checks (it checked step 0 only, which cannot show it, and the mistake surfaced only
    when explaining), and names alone (it was one cause in a list of nine). Two micro-batches whose mean losses are not halved: .grad is twice the
    declared gradient, and the message says so."""
    x, y = data()
    model, optimizer = model_and_sgd()
    with pytest.raises(ex.UnsupportedError, match=says("at step 1", "the declared loss's gradient on the recorded "
                                                       "batch plus step 0's .grad", "optimizer.zero_grad() was not "
                                                       "called", "Fix: call optimizer.zero_grad()")):
        with ex.Recorder(tmp_path / "h", model, optimizer) as rec:
            for _ in range(2):
                F.cross_entropy(model(x), y).backward()
                rec.batch(torch.arange(len(x)), x, y)
                optimizer.step()
    model, optimizer = model_and_sgd()
    half = len(x) // 2
    with pytest.raises(ex.UnsupportedError, match=says("at step 0", ".grad is 2 times the declared gradient",
                                                       "2 backward passes' gradients added up")):
        with ex.Recorder(tmp_path / "h2", model, optimizer) as rec:
            optimizer.zero_grad()
            for rows in (slice(0, half), slice(half, None)):
                F.cross_entropy(model(x[rows]), y[rows]).backward()  # not divided by 2
            rec.batch(torch.arange(len(x)), x, y)
            optimizer.step()


def test_clipping_that_escapes_the_record_time_check_fails_verification(tmp_path):
    """With check_every=50 only steps 0 and 1 are checked: later clipping is caught by both checks."""
    model, optimizer = model_and_sgd(momentum=0.9)
    x, y = data()
    with ex.Recorder(tmp_path / "h", model, optimizer, check_every=50) as rec:
        loop(rec, model, optimizer, x, y, steps=2)
        loop(rec, model, optimizer, x, y, steps=2, clip=1e-3)
    with pytest.raises(ex.ReconstructionError, match=says("step", "clipping")):
        ex.verify_updates(tmp_path / "h", model)
    with pytest.raises(ex.ReconstructionError, match=says("update residual", "tolerance")):
        ex.explain(tmp_path / "h", model, x[:2], progress=False)


def test_raw_inputs_declared_after_the_checked_steps_are_named_by_both_checks(tmp_path):
    """A loop that trains on augmented inputs but declares the raw ones from step 2 on (after the
    Recorder's checked steps 0 and 1, check_every=50): both update checks listed every cause but
    that one; they now name the inputs declared to rec.batch()."""
    model, optimizer = model_and_sgd()
    x, y = data()
    with ex.Recorder(tmp_path / "h", model, optimizer) as rec:
        for step in range(4):
            augmented = x.flip(-1)
            optimizer.zero_grad()
            F.cross_entropy(model(augmented), y).backward()
            rec.batch(torch.arange(len(x)), augmented if step < 2 else x, y)
            optimizer.step()
    named = says("step 2", "inputs passed to rec.batch() other than those the model was trained on",
                 "the raw images where the loop trained on augmented ones")
    with pytest.raises(ex.ReconstructionError, match=named):
        ex.verify_updates(tmp_path / "h", model)
    with pytest.raises(ex.ReconstructionError, match=named):
        ex.explain(tmp_path / "h", model, x[:2], progress=False)


def test_a_late_unmodelled_clip_stops_a_backward_walk_before_it_starts(tmp_path, monkeypatch):
    """A pass that walks backwards checks the updates by a forward replay of its own: it runs
    first and stops at the first step so far off (a trial's 200-step run was explained to its end).
    BACKWARD_MEMORY_RATIO 1: 2 effects contracted with the materialised gradients of 16 samples walk
    backwards."""
    import explaind.engine as engine

    monkeypatch.setattr(engine, "BACKWARD_MEMORY_RATIO", 1)
    model, optimizer = model_and_sgd()
    x, y = data(16)
    with ex.Recorder(tmp_path / "h", model, optimizer, check_every=50) as rec:
        for step in range(6):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            if step >= 2:  # undeclared, after the Recorder's checked steps 0 and 1
                torch.nn.utils.clip_grad_value_(model.parameters(), 1e-3)
            rec.batch(torch.arange(len(x)), x, y)
            optimizer.step()
    options = dict(keep=("train", "test"), outputs="true")
    assert ex.plan(tmp_path / "h", model, x[:2], y[:2], **options).direction == "backward"
    walked = []
    effects = engine.ChunkPass.sample_effects
    monkeypatch.setattr(engine.ChunkPass, "sample_effects", lambda self, *a: walked.append(1) or effects(self, *a))
    with pytest.raises(ex.ReconstructionError, match=says("step 2's update residual", "clipping", "stops at the first")):
        ex.explain(tmp_path / "h", model, x[:2], y[:2], progress=False, **options)
    assert not walked
    cube = ex.explain(tmp_path / "h", model, x[:2], y[:2], progress=False, tolerance=None, **options)
    assert walked and float(cube["update_residual"][:2].max()) < 1e-12 < 1e-3 < float(cube["update_residual"][2])


def test_a_forgotten_zero_grad_or_another_model_is_named_when_explaining(tmp_path):
    """Both escape the record-time check when they start after step 1 (check_every=50 checks
    steps 0 and 1 only); explain() misses through the recorded updates and says so, with its
    numbers all relative to the largest change."""
    x, y = data()
    model = WithModule(nn.Tanh()).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with ex.Recorder(tmp_path / "h", model, optimizer) as rec:
        loop(rec, model, optimizer, x, y, steps=2)
        for _ in range(2):  # gradients accumulate over the steps
            F.cross_entropy(model(x), y).backward()
            rec.batch(torch.arange(len(x)), x, y)
            optimizer.step()
    with pytest.raises(ex.ReconstructionError, match=says("step 2's update residual", "zero_grad()",
                                                          "stops at the first step so far off", "verify_updates")):
        ex.explain(tmp_path / "h", model, x[:2], progress=False)
    cube = ex.explain(tmp_path / "h", model, x[:2], progress=False, tolerance=None)  # the whole run's check
    with pytest.raises(ex.ReconstructionError, match=says("zero_grad()", "update_rounding_floor per step")) as error:
        check_residual(cube, 1e-4)
    number = r"([0-9.]+e[+-][0-9]+)"
    relative, largest, change, through_updates, step, update, floor, first, through_path = map(float, re.search(
        f"misses {number} of the largest output change \\(max \\|residual\\| {number} of a change of {number};"
        f".*up to {number} is missed through the recorded updates differing from the modelled ones \\(step ([0-9]+)'s update residual is {number}, "
        f"where the rounding of the stored parameters allows {number}; the first step above what rounding allows "
        f"is step ([0-9]+)\\).*up to {number} by the path integral",
        str(error.value), re.S).groups())
    assert first == 2  # where the gradients start to accumulate
    assert relative == pytest.approx(largest / change, rel=1e-2) and through_path < through_updates <= 2 * relative
    above = (cube["update_residual"] / cube["update_rounding_floor"]).values  # steps 0, 1 had fresh gradients
    assert step == int(above.argmax()) in (2, 3) and float(above[:2].max()) < 1
    assert update == pytest.approx(float(cube["update_residual"][int(step)]), rel=1e-2) and update > 1e-3 > floor

    model = WithModule(nn.Tanh()).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with ex.Recorder(tmp_path / "h2", model, optimizer) as rec:
        loop(rec, model, optimizer, x, y, steps=3)
    with pytest.raises(ex.ReconstructionError, match=says("another function than the one trained")):
        ex.explain(tmp_path / "h2", WithModule(nn.ReLU()).double(), x[:2], progress=False)


@pytest.mark.parametrize("loss", ["cross_entropy", "nll"])
def test_float_class_targets_are_named_at_record_time(tmp_path, loss):
    """Class indices passed as floats reached torch's "expected target dtype to be Long" from
    inside the Recorder's gradient check."""
    model, optimizer = model_and_sgd()
    x, y = data()
    with pytest.raises(ex.InputError, match=says(f"'{loss}' got torch.float64 targets", "class indices", "y.long()")):
        with ex.Recorder(tmp_path / "h", model, optimizer, loss=loss) as rec:
            optimizer.zero_grad()
            out = model(x) if loss == "cross_entropy" else F.log_softmax(model(x), -1)
            getattr(F, loss if loss == "cross_entropy" else "nll_loss")(out, y).backward()
            rec.batch(torch.arange(len(x)), x, y.double())
            optimizer.step()


def test_class_probabilities_for_nll_are_named_by_their_shape_not_their_dtype():
    """nll takes class indices only: class probabilities [batch, classes] are refused by their
    shape, not with the fix for float class indices (y.long() would truncate them all to 0)."""
    from explaind.losses import resolve_loss

    g = torch.Generator().manual_seed(0)
    log_probs = torch.randn(8, 3, generator=g, dtype=torch.float64).log_softmax(1)
    probabilities = torch.randn(8, 3, generator=g, dtype=torch.float64).softmax(1)
    with pytest.raises(ex.InputError, match=says("'nll' takes outputs [batch, classes] and targets [batch]",
                                                  "for targets of shape (8, 3)")) as refused:
        resolve_loss("nll")[1](log_probs, probabilities)
    assert "y.long()" not in str(refused.value)


def test_the_history_and_the_model_swapped_are_named(tmp_path):
    """explain(model, path, ...) failed in pathlib: "expected str, bytes or os.PathLike object, not
    Sequential"."""
    model, optimizer = model_and_sgd()
    x, y = data()
    with ex.Recorder(tmp_path / "h", model, optimizer) as rec:
        loop(rec, model, optimizer, x, y)
    calls = {"explain": lambda: ex.explain(model, tmp_path / "h", x, progress=False),
             "reconstruct": lambda: ex.reconstruct(model, tmp_path / "h", x, progress=False),
             "verify_updates": lambda: ex.verify_updates(model, tmp_path / "h"),
             "quadrature_sensitivity": lambda: quadrature_sensitivity(model, tmp_path / "h", x, progress=False),
             "tracin_scores": lambda: tracin_scores(model, tmp_path / "h", x, y),
             # these failed in pathlib, as explain did
             "explain_shard": lambda: explain_shard(model, tmp_path / "h", x, split="test", rank=0, world_size=1),
             "explain_resumable": lambda: explain_resumable(model, tmp_path / "h", x, parts_dir=tmp_path / "parts",
                                                            n_parts=2)}
    for name, call in calls.items():
        with pytest.raises(ex.InputError, match=re.escape(
                f"{name}() got a MLP as the history and a PosixPath as the model: the history (its folder, "
                f"or an explaind.History) comes first, the model second. Fix: call {name}(history, model, ...)")):
            call()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h"]  # no parts folder made


def test_one_hot_test_targets_are_named(tmp_path):
    """One-hot rows were flattened and counted: "got 24 targets for 8 inputs"."""
    model, optimizer = model_and_sgd()
    x, y = data()
    with ex.Recorder(tmp_path / "h", model, optimizer) as rec:
        loop(rec, model, optimizer, x, y)
    with pytest.raises(ex.InputError, match=says("targets of shape (8, 3)", "one class index per input",
                                                 "targets.argmax(1)")):
        ex.explain(tmp_path / "h", model, x, F.one_hot(y, 3), outputs="true", progress=False)


def test_wrong_reduction_declared(tmp_path):
    model, optimizer = model_and_sgd()
    x, y = data()
    with pytest.raises(ex.UnsupportedError, match=says("reduction='mean'", f".grad is {len(x)} times the declared",
                                                       f"batch size ({len(x)})", "loss reduction")):
        with ex.Recorder(tmp_path / "h", model, optimizer, reduction="mean") as rec:
            loop(rec, model, optimizer, x, y, reduction="sum")
    model, optimizer = model_and_sgd()
    with pytest.raises(ex.InputError, match=says("reduction", "mean", "sum")):
        ex.Recorder(tmp_path / "h2", model, optimizer, reduction="average")


class Outputs(nn.Module):
    """The MLP's logits [batch, 3] in another form: a dict (as many libraries' models return),
    a sequence [batch, 2, 3], or one column [batch, 1]."""

    def __init__(self, form: str):
        super().__init__()
        self.inner = Case("mlp").fresh_model()
        self.form = form

    def forward(self, x):
        logits = self.inner(x)
        if self.form == "dict":
            return {"logits": logits}
        if self.form == "sequence":
            return torch.stack([logits, logits.flip(1)], 1)
        return logits[:, :1]


def logits_of(out):
    return out["logits"] if isinstance(out, dict) else out


@pytest.mark.parametrize("form, loss, targets, words", [
    ("dict", "cross_entropy", "classes", ("'cross_entropy'", "a dict", "[batch, classes]", "loss=callable",
                                          "output_fn=", "picks [batch, outputs]")),
    ("sequence", "nll", "sequence", ("'nll'", "(8, 2, 3)", "(8, 2)", "loss=callable")),
    ("column", "mse", "values", ("'mse'", "(8, 1)", "(8,)", "same shape")),
])
def test_outputs_the_built_in_loss_cannot_take(tmp_path, form, loss, targets, words):
    """Caught by the record-time check with the cause and the fix, not deep inside torch (or,
    for mse, silently broadcast to a [batch, batch] loss)."""
    model = Outputs(form).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = data()
    y = {"classes": y, "sequence": torch.stack([y, y], 1), "values": y.double()}[targets]
    with pytest.raises(ex.InputError, match=says(*words)):
        with ex.Recorder(tmp_path / "h", model, optimizer, loss=loss, check_every=1) as rec:
            optimizer.zero_grad()
            (logits_of(model(x)).flatten(1) ** 2).sum(1).mean().backward()
            rec.batch(torch.arange(8), x, y)
            optimizer.step()


@pytest.mark.parametrize("form, words", [
    ("dict", ("the model returned a dict", "not a tensor", "output_fn", "out.logits")),
    ("sequence", ("(1, 2, 3)", "[batch, outputs]", "output_fn", "out[:, -1]", "training loss")),
    ("column", ("one output", "always 0", "target='logit'")),  # log-probabilities of one output
])
def test_outputs_explain_cannot_decompose(tmp_path, no_heavy_compute, form, words):
    """A run recorded with a custom loss that reads the model's output, explained: refused before
    any Jacobian, naming the fix."""
    model = Outputs(form).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = data()

    def loss(out, targets):
        return (logits_of(out).flatten(1) ** 2).sum(1)

    with ex.Recorder(tmp_path / "h", model, optimizer, loss=loss, check_every=1) as rec:
        for _ in range(2):
            optimizer.zero_grad()
            loss(model(x), y).mean().backward()
            rec.batch(torch.arange(8), x, y)
            optimizer.step()
    with pytest.raises(ex.InputError, match=says(*words)):
        ex.explain(tmp_path / "h", model, x[:2], progress=False, loss=loss)


def test_optimizer_with_existing_state(tmp_path):
    model, optimizer = model_and_sgd(momentum=0.9)
    x, y = data()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    with pytest.raises(ex.UnsupportedError, match=says("already has state", "freshly built", "resume")):
        ex.Recorder(tmp_path / "h", model, optimizer)


def test_step_without_batch(tmp_path):
    model, optimizer = model_and_sgd()
    x, y = data()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ex.InputError, match=says("without rec.batch", "before step()")):
        with ex.Recorder(tmp_path / "h", model, optimizer):
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    # refused before the parameters moved
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))


def test_batch_twice(tmp_path):
    model, optimizer = model_and_sgd()
    x, y = data()
    with pytest.raises(ex.InputError, match=says("twice", "once per step")):
        with ex.Recorder(tmp_path / "h", model, optimizer) as rec:
            F.cross_entropy(model(x), y).backward()
            rec.batch(torch.arange(8), x, y)
            rec.batch(torch.arange(8), x, y)


def test_a_skipped_step_is_named_as_a_possible_cause_of_batch_twice(tmp_path):
    """A loop that skips optimizer.step() on a bad loss (as a GradScaler does) declares the next
    batch before a step: the message names the skip and where rec.batch() goes."""
    model, optimizer = model_and_sgd()
    x, y = data()
    with pytest.raises(ex.InputError, match=says("twice", "skips optimizer.step()", "GradScaler",
                                                 "rec.batch() only for the steps it takes")):
        with ex.Recorder(tmp_path / "h", model, optimizer) as rec:
            for step in range(3):
                optimizer.zero_grad()
                F.cross_entropy(model(x), y).backward()
                rec.batch(torch.arange(8), x, y)
                if step != 1:
                    optimizer.step()


def test_parameters_changed_after_the_step_are_named_with_the_fix(tmp_path):
    """A clamp after each step (weight clipping, a max-norm projection) moves θ outside the optimizer."""
    model, optimizer = model_and_sgd()
    x, y = data()
    with pytest.raises(ex.HistoryError, match=says("changed between optimizer steps", "before step 1",
                                                   "Fix: remove what else changes it", "into forward")):
        with ex.Recorder(tmp_path / "h", model, optimizer) as rec:
            for _ in range(2):
                optimizer.zero_grad()
                F.cross_entropy(model(x), y).backward()
                rec.batch(torch.arange(8), x, y)
                optimizer.step()
                with torch.no_grad():
                    for p in model.parameters():
                        p.clamp_(-0.01, 0.01)


@pytest.mark.parametrize("cast", [torch.float32, torch.float64], ids=["to_float32", "to_float64"])
def test_a_model_cast_mid_run_is_named_as_cast(tmp_path, cast):
    """A model cast to another dtype after the Recorder was built: float64 → float32 rounds θ and
    was named as a parameter 'changed between optimizer steps' by a clamp or weights loaded;
    float32 → float64 keeps θ's values and was recorded silently, a history of two precisions.
    Both are named as the cast, at the step after it, and the step before stays on disk."""
    model, optimizer = model_and_sgd()
    x, y = data()
    model.to(torch.float64 if cast == torch.float32 else torch.float32)
    recorded = next(model.parameters()).dtype
    with pytest.raises(ex.HistoryError, match=says(f"is {cast} before step 1", f"recorded in {recorded}",
                                                   "cast mid-run", "Fix: cast the model before")):
        with ex.Recorder(tmp_path / "h", model, optimizer) as rec:
            for step in range(2):
                if step == 1:
                    model.to(cast)
                optimizer.zero_grad()
                F.cross_entropy(model(x.to(cast if step else recorded)), y).backward()
                rec.batch(torch.arange(8), x, y)
                optimizer.step()
    history = ex.History(tmp_path / "h", allow_incomplete=True)
    assert history.n_steps == 1
    assert all(t.dtype == recorded for t in history.params(1).values())


def test_batch_without_indices_is_named_with_the_fix(tmp_path):
    """rec.batch(x, y) failed with Python's "missing 1 required positional argument: 'targets'",
    which named no dataset index; nothing is declared, so the step is then refused as undeclared."""
    model, optimizer = model_and_sgd()
    x, y = data()
    with ex.Recorder(tmp_path / "h", model, optimizer) as rec:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        with pytest.raises(ex.InputError, match=re.escape("batch() takes three arguments, the rows' dataset indices, "
                                                          "the inputs and the targets (rec.batch(indices, x, y)); it "
                                                          "got two")):
            rec.batch(x, y)
        rec.batch(torch.arange(len(x)), x, y)
        optimizer.step()
    assert ex.History(tmp_path / "h").n_steps == 1


def test_batch_with_inconsistent_lengths(tmp_path):
    model, optimizer = model_and_sgd()
    x, y = data()
    with pytest.raises(ex.InputError, match=says("indices", "one dataset index per row")):
        with ex.Recorder(tmp_path / "h", model, optimizer) as rec:
            rec.batch(torch.arange(7), x, y)


@pytest.mark.parametrize("form", ["tuple", "dict", "list"])
def test_batch_inputs_that_are_not_one_tensor(tmp_path, form):
    """Several inputs (or a list) used to pass the length check or fail deep inside; now the
    refusal names the wrapper that makes them one tensor."""
    model, optimizer = model_and_sgd()
    x, y = data()
    bad = {"tuple": (x, x), "dict": {"x": x}, "list": x.tolist()}[form]
    with pytest.raises(ex.InputError, match=says("batch()", "one tensor", f"got a {form}", "wrapper")):
        with ex.Recorder(tmp_path / "h", model, optimizer) as rec:
            rec.batch(torch.arange(8), bad, y)


def test_batch_of_numpy_arrays_is_recorded_as_tensors(tmp_path):
    x, y = data()
    cubes = []
    for name, rows in (("tensors", lambda t: t), ("numpy", lambda t: t.numpy())):
        model, optimizer = model_and_sgd(momentum=0.5)
        with ex.Recorder(tmp_path / name, model, optimizer, check_every=1) as rec:
            for _ in range(2):
                optimizer.zero_grad()
                F.cross_entropy(model(x), y).backward()
                rec.batch(rows(torch.arange(8)), rows(x), rows(y))
                optimizer.step()
        cubes.append(ex.explain(tmp_path / name, model, x[:2], progress=False, quadrature=4, tolerance=1e-9))
    np.testing.assert_array_equal(cubes[1]["attribution"].values, cubes[0]["attribution"].values)


# --------------------------------------------------------------------------- at explain time


def test_model_with_other_names(run, no_heavy_compute):
    other = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    with pytest.raises(ex.HistoryError, match=says("does not match", "hidden.0.weight", "same architecture")):
        ex.explain(run.path, other, run.test_x, progress=False)


class Wrapper(nn.Module):
    """A module that holds the recorded model as its `.inner` (as one that hands a model its mask)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


def test_model_inside_or_around_a_wrapper_is_named(run, tmp_path, no_heavy_compute):
    """Recorded through a wrapper and explained with the module it wraps (or the reverse), every
    name differs by the wrapper's prefix: the refusal listed five names of each side and said
    'pass the same architecture'; it now names the prefix and the module to pass."""
    with pytest.raises(ex.HistoryError, match=says("Every name of the model is a recorded one under 'inner'",
                                                   "recorded with the model's 'inner' alone: pass that module")):
        ex.explain(run.path, Wrapper(MLP().double()), run.test_x, progress=False)
    wrapped = Wrapper(MLP().double())
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.1)
    classes = torch.zeros(len(run.test_x), dtype=torch.long)
    with ex.Recorder(tmp_path / "wrapped", wrapped, optimizer) as rec:
        F.cross_entropy(wrapped(run.test_x), classes).backward()
        rec.batch(torch.arange(len(run.test_x)), run.test_x, classes)
        optimizer.step()
    with pytest.raises(ex.HistoryError, match=says("Every recorded name is one of the model's under 'inner'",
                                                   "holds this one as its 'inner'", "pass that wrapper")):
        ex.verify_updates(tmp_path / "wrapped", wrapped.inner)


def test_model_with_other_shapes(run, no_heavy_compute):
    other = MLP(widths=(7,)).double()
    with pytest.raises(ex.HistoryError, match=says("shape", "[7, 4]", "[6, 4]", "trained architecture")):
        ex.explain(run.path, other, run.test_x, progress=False)
    with pytest.raises(ex.HistoryError, match=says("shape")):
        ex.verify_updates(run.path, other)


def test_model_with_an_extra_trainable_tensor(run, no_heavy_compute):
    """Every recorded tensor and one more: the history says nothing of how the extra one moved."""
    other = MLP().double()
    other.extra = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ex.HistoryError, match=re.escape(
            "recorded tensors missing from the model [], model tensors not in the history ['extra']")):
        ex.explain(run.path, other, run.test_x, progress=False)


def test_model_with_a_recorded_tensor_frozen(run, no_heavy_compute):
    """A recorded tensor the model has but does not train was called missing from the model."""
    other = MLP().double()
    other.hidden[0].weight.requires_grad_(False)
    with pytest.raises(ex.HistoryError, match=says("recorded tensors missing from the model ['hidden.0.weight']",
                                                   "'hidden.0.weight' is frozen in the model", "requires_grad")):
        ex.explain(run.path, other, run.test_x, progress=False)


def test_model_with_a_tensor_of_as_many_numbers_in_another_shape(run, no_heavy_compute):
    other = MLP().double()
    other.hidden[0].weight = nn.Parameter(other.hidden[0].weight.detach().T.clone())  # [4, 6] for [6, 4]
    with pytest.raises(ex.HistoryError, match=re.escape(
            "parameter 'hidden.0.weight' has shape [4, 6] in the model but [6, 4] in the history")):
        ex.explain(run.path, other, run.test_x, progress=False)


def test_test_inputs_passed_where_the_model_goes_are_named(run, no_heavy_compute):
    for call in (lambda: ex.explain(run.path, run.test_x, run.model, progress=False),
                 lambda: ex.verify_updates(run.path, run.test_x)):
        with pytest.raises(ex.InputError, match=re.escape(
                f"got a {type(run.path).__name__} as the history and a Tensor as the model")):
            call()


def test_test_inputs_of_the_wrong_shape(run, no_heavy_compute):
    for bad in (torch.zeros(3, 5, dtype=torch.float64), torch.zeros(4, dtype=torch.float64),
                torch.zeros(2, 4, 1, dtype=torch.float64)):
        with pytest.raises(ex.InputError, match=says("shape", "[batch, 4]")):
            ex.explain(run.path, run.model, bad, progress=False)


@pytest.mark.parametrize("outputs, words", [([3], ("do not exist", "3 outputs")), ([-1, 0], ("do not exist",)),
                                            ([], ("names no output", "at least one output index", "3 outputs")), ("everything", ("not understood", "'all'"))])
def test_output_selection_that_does_not_exist(run, no_heavy_compute, outputs, words):
    with pytest.raises(ex.InputError, match=says(*words)):
        ex.explain(run.path, run.model, run.test_x, outputs=outputs, progress=False)


@pytest.mark.parametrize("outputs", ["all", "predicted", [0, 2]])
def test_targets_of_other_inputs_are_refused_where_no_output_reads_them(run, no_heavy_compute, outputs):
    """Targets sliced apart from the inputs were ignored without a word where outputs= reads none."""
    n = len(run.test_x)
    with pytest.raises(ex.InputError, match=says(f"got {n - 1} targets for {n} inputs", "one per input", "or none")):
        ex.explain(run.path, run.model, run.test_x, run.test_y[:-1], outputs=outputs, progress=False)


def test_true_outputs_need_targets(run, no_heavy_compute):
    with pytest.raises(ex.InputError, match=says("outputs='true'", "targets=")):
        ex.explain(run.path, run.model, run.test_x, outputs="true", progress=False)
    with pytest.raises(ex.InputError, match=says("targets", "one per input")):
        ex.explain(run.path, run.model, run.test_x, run.test_y[:2], outputs="true", progress=False)
    with pytest.raises(ex.InputError, match=says("targets", "0 … 2")):
        ex.explain(run.path, run.model, run.test_x, run.test_y + 5, outputs="true", progress=False)
    padded = run.test_y.clone()
    padded[1] = -100  # torch's ignore_index, a tokenizer's padded target: named with the inputs that hold it
    with pytest.raises(ex.InputError, match=says("0 … 2", "test inputs [1] have targets [-100]", "ignore_index",
                                                 "Fix: drop those inputs")):
        ex.explain(run.path, run.model, run.test_x, padded, outputs="true", progress=False)
    with pytest.raises(ex.InputError, match=says("class indices", "not whole numbers", "0.5")):
        ex.explain(run.path, run.model, run.test_x, run.test_y + 0.5, outputs="true", progress=False)


def test_unknown_keep_dim(run, no_heavy_compute):
    with pytest.raises(ex.InputError, match=says("'sample'", "step", "train")):
        ex.explain(run.path, run.model, run.test_x, keep=("sample", "test"), progress=False)


@pytest.mark.parametrize("bins", [0, 5, -1, [0, 2, 2, 4], [1, 4], [0, 3], [0, 3, 2, 4]])
def test_bad_step_bins(run, no_heavy_compute, bins):
    with pytest.raises(ex.InputError, match=says("step", "4")):
        ex.explain(run.path, run.model, run.test_x, step_bins=bins, progress=False)


@pytest.mark.parametrize("mapping, words", [
    ({"a": ["hidden"], "b": ["hidden.0.bias", "out"]}, ("hidden.0.bias", "in components", "exactly one")),
    ({"a": ["hidden"]}, ("out.weight', 'out.bias' are in no component", "exactly one")),
    ({"a": ["hidden", "out"], "b": ["nonexistent"]}, ("nonexistent",)),
    # a typo beside a pattern that matches: the typo still matches nothing
    ({"a": ["hidden", "hiden.0.bias"], "b": ["out"]}, ("{'a': ['hiden.0.bias']}", "typo")),
    ({"a": ["hidden", "out"], "b": []}, ("{'b': []}", "match no parameter tensor")),
    (42, ("not understood", "'tensor'", "'module'")),
])
def test_bad_component_mapping(run, no_heavy_compute, mapping, words):
    with pytest.raises(ex.InputError, match=says(*words)):
        ex.explain(run.path, run.model, run.test_x, components=mapping, progress=False)


@pytest.mark.parametrize("label", ["", None, 3])
def test_a_component_function_must_name_every_tensors_component(label):
    """The components are the labels of the cube's component dim: a function that maps a tensor
    to an empty name (or to no string at all) is refused naming that tensor, not made a label."""
    from explaind.components import group_tensors

    with pytest.raises(ex.InputError, match=says(f"components maps 'out.bias' to {label!r}",
                                                  "component names must be non-empty strings")):
        group_tensors(["hidden.weight", "out.bias"], lambda n: "body" if n.startswith("hidden") else label)


class TiedAndFrozen(nn.Module):
    """Token embedding whose transpose is the unembedding (one tensor, two names), and a frozen gain."""

    def __init__(self):
        super().__init__()
        self.emb, self.unemb = nn.Embedding(5, 4), nn.Linear(4, 5, bias=False)
        self.unemb.weight = self.emb.weight
        self.gain = nn.Parameter(torch.tensor(2.0), requires_grad=False)

    def forward(self, tokens):
        return self.unemb(torch.tanh(self.gain * self.emb(tokens).mean(1)))


@pytest.mark.parametrize("mapping, words", [
    ({"embedding": "emb", "unembedding": "unemb"},
     ("{'unembedding': ['unemb']}", "'unemb.weight' is tied to 'emb.weight'", "recorded and attributed under that name",
      "Fix: leave those patterns out")),
    ({"embedding": "emb", "gain": ["gain"]}, ("{'gain': ['gain']}", "'gain' is frozen", "Fix: leave those patterns out")),
])
def test_a_component_of_tied_or_frozen_tensors_only_is_named_as_such(tmp_path, no_heavy_compute, mapping, words):
    torch.manual_seed(0)
    model = TiedAndFrozen().double()
    x, y = make_data("transformer", 8, 0, 0)[:2]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with ex.Recorder(tmp_path / "h", model, optimizer) as rec:
        loop(rec, model, optimizer, x, y, steps=1)
    assert ex.History(tmp_path / "h").layout.names == ("emb.weight",)
    with pytest.raises(ex.InputError, match=says(*words)) as error:
        ex.explain(tmp_path / "h", model, x[:2], components=mapping, progress=False)
    assert "typo" not in str(error.value)


@pytest.fixture(scope="module")
def sequential(tmp_path_factory):
    """A user's report: Sequential(Linear, Tanh, Linear), tensors 0.weight, 0.bias, 2.weight,
    2.bias, recorded for 2 steps; (history, model, test inputs, test targets)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = data()
    path = tmp_path_factory.mktemp("sequential") / "h"
    with ex.Recorder(path, model, optimizer, check_every=1) as rec:
        loop(rec, model, optimizer, x, y, steps=2)
    return path, model, x[:3], y[:3]


def test_a_string_component_value_is_one_pattern(sequential):
    """A value "0.weight" is one pattern, as ["0.weight"] is: its character "0" must not claim 0.bias."""
    path, model, x, y = sequential

    def cube(components):
        return ex.explain(path, model, x, y, keep=("component",), components=components, progress=False)

    expected = cube({"first": ["0.weight"], "rest": ["0.bias", "2"]})
    assert list(expected.component.values) == ["first", "rest"]
    for first in ("0.weight", ("0.weight",), {"0.weight"}):
        xr.testing.assert_identical(cube({"first": first, "rest": ["0.bias", "2"]}).drop_attrs(),
                                    expected.drop_attrs())


@pytest.mark.parametrize("value", [None, 0, 2.5, [0], {"0.weight": 1}])
def test_a_component_value_that_is_no_pattern(sequential, no_heavy_compute, value):
    path, model, x, _ = sequential
    with pytest.raises(ex.InputError, match=says("components['first']", repr(value), "one tensor name or module prefix",
                                                  "or a list of them")):
        ex.explain(path, model, x, components={"first": value, "rest": ["0.bias", "2"]}, progress=False)


def test_a_typo_is_named_before_the_tensors_it_leaves_out(sequential, no_heavy_compute):
    """'layer2' matches nothing, so 2.weight and 2.bias are in no component: the typo is the cause
    and is named first, the tensors it leaves out after it."""
    path, model, x, _ = sequential
    with pytest.raises(ex.InputError) as refused:
        ex.explain(path, model, x, components={"a": ["0"], "b": ["layer2"]}, progress=False)
    message = str(refused.value)
    assert message.startswith("components {'b': ['layer2']} (component: patterns) match no parameter tensor (a typo?)")
    assert re.search(says("in no component", "['2.weight', '2.bias']"), message)
    # the same with one string per component
    with pytest.raises(ex.InputError, match=r"^components \{'b': \['layer2'\]\}"):
        ex.explain(path, model, x, components={"a": "0", "b": "layer2"}, progress=False)


@pytest.mark.parametrize("kwargs, words", [
    (dict(convention="backward"), ("convention", "update", "gradient")),
    (dict(target="prob"), ("target", "log_prob", "logit")),
    (dict(rule="simpson"), ("rule", "gauss", "midpoint")),
    (dict(quadrature=0), ("quadrature", "positive integer")),
    (dict(quadrature=1001, rule="midpoint"), ("quadrature=1001", "at most 1000", "breakpoints=True")),
    (dict(loss="mse"), ("loss", "cross_entropy")),
    # one past the last CUDA device: invalid on any machine, with or without a GPU
    (dict(device=f"cuda:{torch.cuda.device_count()}"), ("device", "cuda", "Fix", "cpu")),
    (dict(device="gpu0"), ("device", "Fix", "cpu", "cuda")),
])
def test_bad_options(run, no_heavy_compute, kwargs, words):
    with pytest.raises(ex.InputError, match=says(*words)):
        ex.explain(run.path, run.model, run.test_x, progress=False, **kwargs)


def test_reconstruct_refuses_a_device_it_cannot_use(run, no_heavy_compute):
    with pytest.raises(ex.InputError, match=says("device", "cuda", "Fix", "cpu")):
        ex.reconstruct(run.path, run.model, run.test_x, device=f"cuda:{torch.cuda.device_count()}", progress=False)


@pytest.mark.parametrize("cuda_devices, fix", [(0, "Fix: pass device='cpu'$"),
                                               (2, "Fix: pass device='cpu' or one of 'cuda:0' to 'cuda:1'$")])
def test_a_missing_gpu_names_the_devices_there_are(monkeypatch, cuda_devices, fix):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_devices > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda_devices)
    with pytest.raises(ex.InputError, match=rf"device='cuda:2': this torch sees {cuda_devices} CUDA device.*{fix}"):
        functional.compute_device("cuda:2")


def weight_normed_run(path, layer: nn.Module) -> tuple[nn.Module, torch.Tensor]:
    model = nn.Sequential(layer, nn.Tanh(), nn.Linear(6, 3)).double()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    x, y = data()
    with ex.Recorder(path, model, optimizer, check_every=1) as rec:
        loop(rec, model, optimizer, x, y, steps=3)
    return model, x


# torch warns that vmap loops over the weight norm backward, which has no batching rule, that the
# older weight norm is deprecated, and explaind that it cannot copy a module with that weight norm
@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning", "ignore::FutureWarning",
                            "ignore:explaind could not copy the module:UserWarning")
def test_an_op_without_forward_mode_names_the_reverse_mode_route(tmp_path):
    """torch has no forward-mode derivative of weight norm, which the older nn.utils.weight_norm
    computes in a hook: the routes that need forward mode say so and name the fix, and the fix
    (breakpoints=False with a train dim) decomposes exactly."""
    torch.manual_seed(0)
    model, x = weight_normed_run(tmp_path / "h", nn.utils.weight_norm(nn.Linear(4, 6).double()))
    fix = ("forward mode", "weight_norm", "breakpoints=False", "train dim", "reverse mode")
    with pytest.raises(ex.UnsupportedError, match=says(*fix, "locate kinks")):
        ex.explain(tmp_path / "h", model, x[:2], progress=False)
    with pytest.raises(ex.UnsupportedError, match=says(*fix, "reconstruct()")):
        ex.reconstruct(tmp_path / "h", model, x[:2], progress=False)
    cube = ex.explain(tmp_path / "h", model, x[:2], progress=False, breakpoints=False, quadrature=6, tolerance=1e-9)
    assert cube.attrs["relative_residual"] <= 1e-9


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
def test_parametrized_weight_norm_is_explained_by_forward_mode_too(tmp_path, monkeypatch):
    """nn.utils.parametrizations.weight_norm is computed in explaind's copy of the model by ops
    that forward mode differentiates (it was refused like the hook above): the default explain
    equals the reverse-mode route through torch's own kernel, and reconstruct() adds up."""
    torch.manual_seed(0)
    model, x = weight_normed_run(tmp_path / "h", nn.utils.parametrizations.weight_norm(nn.Linear(4, 6), dim=1))
    cube = ex.explain(tmp_path / "h", model, x, keep=("train", "test"), quadrature=8, progress=False, tolerance=1e-12)
    summed = ex.explain(tmp_path / "h", model, x, keep="test", quadrature=8, progress=False, tolerance=1e-12)
    assert float(abs(ex.reconstruct(tmp_path / "h", model, x, quadrature=8, progress=False)["residual"]).max()) <= 1e-13
    monkeypatch.setattr(functional, "_COMPOSED_FORWARDS", {})
    with pytest.raises(ex.UnsupportedError, match=says("forward mode", "_weight_norm_interface")):
        ex.explain(tmp_path / "h", model, x, keep="test", progress=False)
    by_torch = ex.explain(tmp_path / "h", model, x, keep=("train", "test"), quadrature=8, progress=False,
                          breakpoints=False)
    np.testing.assert_allclose(cube["attribution"].values, by_torch["attribution"].values, rtol=0, atol=1e-14)
    np.testing.assert_allclose(summed["attribution"].values, by_torch["attribution"].sum("train").values,
                               rtol=0, atol=1e-14)


class Recurrent(nn.Module):
    """An nn.LSTM over the 4 features as a sequence; its initial state made by the LSTM itself
    (torch.zeros, not batched by vmap) or, with `state_from_input`, from the input."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(1, 5, batch_first=True)
        self.out = nn.Linear(5, 3)
        self.state_from_input = False

    def forward(self, x):
        sequence = x.unsqueeze(-1)
        state = None
        if self.state_from_input:
            h0 = sequence.new_zeros(1, len(sequence), 5)
            state = (h0, h0)
        return self.out(self.lstm(sequence, state)[0][:, -1])


# torch warns that vmap loops over the LSTM, which has no batching rule
@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
def test_an_in_place_write_vmap_cannot_batch_names_the_fix(tmp_path):
    """In float64 on the CPU nn.LSTM writes into a state it makes itself, which vmap cannot
    batch: explain names the cause and the fix, and the fix (the state made from the input)
    explains the same history exactly."""
    torch.manual_seed(0)
    model = Recurrent().double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    x, y = data()
    with ex.Recorder(tmp_path / "h", model, optimizer, check_every=1) as rec:
        loop(rec, model, optimizer, x, y, steps=3)
    with pytest.raises(ex.UnsupportedError, match=says("vmap", "at test_refusals.py:", "in place", "nn.LSTM", "x.new_zeros",
                                                      "h0")):
        ex.explain(tmp_path / "h", model, x[:2], keep=("train", "test"), progress=False)
    model.state_from_input = True
    cube = ex.explain(tmp_path / "h", model, x[:2], keep=("train", "test"), quadrature=6, progress=False,
                      tolerance=1e-9)
    assert cube.attrs["relative_residual"] <= 1e-9


class ReluRecurrence(nn.Module):
    """A ReLU recurrence over the 4 features as a sequence: nn.RNN(nonlinearity="relu"), its cell
    nn.RNNCell stepped by hand, or that cell's weights given to torch's fused rnn_relu_cell."""

    def __init__(self, form: str):
        super().__init__()
        self.rnn = nn.RNN(1, 5, nonlinearity="relu", batch_first=True) if form == "rnn" else \
            nn.RNNCell(1, 5, nonlinearity="relu")
        self.out = nn.Linear(5, 3)
        self.form = form

    def forward(self, x):
        sequence = x.unsqueeze(-1)
        h = sequence.new_zeros(len(sequence), 5)
        if self.form == "rnn":
            return self.out(self.rnn(sequence, h[None])[0][:, -1])
        cell = self.rnn
        for t in range(sequence.shape[1]):
            h = cell(sequence[:, t], h) if self.form == "cell" else \
                torch.rnn_relu_cell(sequence[:, t], h, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
        return self.out(h)


def relu_recurrence_run(path, form: str) -> tuple[ReluRecurrence, torch.Tensor]:
    torch.manual_seed(0)
    model = ReluRecurrence(form).double()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    x, y = data()
    with ex.Recorder(path, model, optimizer, check_every=1) as rec:
        loop(rec, model, optimizer, x, y, steps=3)
    return model, x


@pytest.mark.parametrize("form", ["rnn", "cell"])
def test_relu_recurrences_are_stepped_with_their_kinks_located(tmp_path, form):
    """nn.RNN and nn.RNNCell run their ReLU inside torch's fused rnn_relu(_cell), where the kink
    search could not see it (a 6-step run of nn.RNN missed by 7e-3 of its output change): explaind's
    copy of the model steps them with torch.relu, the same values, and the kinks are located."""
    model, x = relu_recurrence_run(tmp_path / "h", form)
    cube = ex.explain(tmp_path / "h", model, x, keep="test", progress=False, tolerance=1e-9)
    assert cube.attrs["kinks_located"] > 0
    assert cube.attrs["relative_residual"] <= 1e-12
    without_search = ex.explain(tmp_path / "h", model, x, keep="test", progress=False, tolerance=None,
                                breakpoints=False)
    assert without_search.attrs["relative_residual"] > 1e-6


@pytest.mark.parametrize("layout", [{}, {"batch_first": True, "num_layers": 2},
                                    {"bidirectional": True, "num_layers": 3, "bias": False}])
def test_a_relu_rnn_stepped_by_explaind_computes_torchs_values(layout):
    """The stepped nn.RNN returns torch's output and final state, batched or not, given a state or not."""
    torch.manual_seed(0)
    rnn = nn.RNN(3, 4, nonlinearity="relu", **layout).double()
    stepped = functional._COMPOSED_FORWARDS[nn.RNN].__get__(rnn)
    states, batch = rnn.num_layers * (1 + rnn.bidirectional), 2
    x = torch.randn(5, batch, 3, dtype=torch.float64).transpose(0, int(rnn.batch_first))
    one = x[0] if rnn.batch_first else x[:, 0]
    for args in [(x,), (x, torch.randn(states, batch, 4, dtype=torch.float64)), (one,),
                 (one, torch.randn(states, 4, dtype=torch.float64))]:
        for ours, torchs in zip(stepped(*args), rnn(*args)):
            torch.testing.assert_close(ours, torchs, rtol=0, atol=1e-14)


def test_a_relu_fused_into_one_op_is_refused_before_the_search(tmp_path, no_heavy_compute):
    """torch's rnn_relu_cell called by the model itself keeps its ReLU out of sight: refused, with the fix."""
    model, x = relu_recurrence_run(tmp_path / "h", "fused")
    with pytest.raises(ex.UnsupportedError, match=says("rnn_relu_cell", "torch.relu(F.linear(", "nonlinearity='tanh'",
                                                      "breakpoints=False")):
        ex.explain(tmp_path / "h", model, x[:2], keep="test", progress=False)


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def swish_derivative(x: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s))


class OldStyleSwish(torch.autograd.Function):
    """forward(ctx, x): the style of most custom kernels (Megatron's, Hugging Face Bloom's GeLU)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return swish(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * swish_derivative(*ctx.saved_tensors)


class SwishWithoutVmap(torch.autograd.Function):
    """torch.func's style, but without a vmap rule."""

    @staticmethod
    def forward(x):
        return swish(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        return grad * swish_derivative(*ctx.saved_tensors)


class SwishWithoutJvp(SwishWithoutVmap):
    generate_vmap_rule = True


class Swish(SwishWithoutJvp):
    @staticmethod
    def jvp(ctx, tangent):
        return tangent * swish_derivative(*ctx.saved_tensors)


class ThroughFunction(nn.Module):
    def __init__(self, function: type[torch.autograd.Function]):
        super().__init__()
        self.hidden = nn.Linear(4, 6)
        self.out = nn.Linear(6, 3)
        self.function = function

    def forward(self, x):
        return self.out(self.function.apply(self.hidden(x)))


def record_through(path, function: type[torch.autograd.Function], check_every: int = 1):
    torch.manual_seed(0)
    model = ThroughFunction(function).double()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    x, y = data()
    with ex.Recorder(path, model, optimizer, check_every=check_every) as rec:
        loop(rec, model, optimizer, x, y, steps=3)
    return model, x


@pytest.mark.parametrize("function, words", [
    (OldStyleSwish, ("old style", "forward(ctx", "setup_context(ctx, inputs, output)", "generate_vmap_rule = True",
                     "jvp", "bloom_gelu_forward")),
    (SwishWithoutVmap, ("no vmap rule", "generate_vmap_rule = True")),
])
def test_a_custom_autograd_function_torch_func_cannot_take_is_named_with_the_fix(tmp_path, function, words):
    """Named (class and the model's line) by explain, with what the Function lacks and how to write
    it; the old style already by the Recorder's gradient check (torch.func.grad cannot take it; the
    check needs no vmap)."""
    named = says(f"torch.func cannot transform {function.__name__}.apply at test_refusals.py:", "(forward)", *words)
    if function is OldStyleSwish:
        with pytest.raises(ex.UnsupportedError, match=named):
            record_through(tmp_path / "checked", function)
    model, x = record_through(tmp_path / "h", function, check_every=0)
    with pytest.raises(ex.UnsupportedError, match=named):
        ex.explain(tmp_path / "h", model, x[:2], breakpoints=False, progress=False)


class NotWrittenYet(nn.Module):
    def forward(self, x):
        raise NotImplementedError("this layer's forward is not written yet")


def test_a_loss_holding_a_float64_tensor_explained_in_float32_is_named_with_its_line(tmp_path):
    """A custom loss with a float64 class-weight tensor (all ones: the run's gradient is the plain
    mean's) explained with dtype=torch.float32 failed with torch's bare 'expected scalar type Float
    but found Double'; it is named with the loss's line and both fixes."""
    model, optimizer = model_and_sgd()
    x, y = data()
    ones = torch.ones(model(x).shape[1], dtype=torch.float64)

    def weighted(out, targets):
        return F.cross_entropy(out, targets, weight=ones, reduction="none")

    with ex.Recorder(tmp_path / "h", model, optimizer, loss=weighted) as rec:
        loop(rec, model, optimizer, x, y)
    line = f"test_refusals.py:{weighted.__code__.co_firstlineno + 1} (weighted)"
    with pytest.raises(ex.UnsupportedError, match=says(
            line, "meets tensors of two dtypes", "expected scalar type Float but found Double",
            "Fix", "weight.to(logits.dtype)", "dtype=torch.float64")):
        ex.explain(tmp_path / "h", model, x[:2], loss=weighted, keep=("test",), dtype=torch.float32, progress=False)
    cube = ex.explain(tmp_path / "h", model, x[:2], loss=weighted, keep=("test",), progress=False)  # its dtype
    assert cube.attrs["relative_residual"] <= 1e-9


def test_a_loss_holding_a_float32_tensor_explained_in_float64_names_float32(tmp_path):
    """A float32 run whose custom loss holds a float32 class-weight tensor (library.md's recipe for
    weighted cross-entropy with label smoothing), explained at the default float64, was told to
    'explain in the dtype they are in (dtype=torch.float64)', the dtype it failed in; the fix names
    float32, which then explains the run."""
    model, optimizer = model_and_sgd()
    model.float()
    x, y = data()
    x = x.float()
    weights = torch.tensor([1.0, 2.0, 0.5, 1.5][:model(x).shape[1]])

    def weighted(out, targets):
        return F.cross_entropy(out, targets, weight=weights, label_smoothing=0.1, reduction="none")

    with ex.Recorder(tmp_path / "h", model, optimizer, loss=weighted, class_weights=weights) as rec:
        for _ in range(2):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y, weight=weights, label_smoothing=0.1).backward()
            rec.batch(torch.arange(len(x)), x, y)
            optimizer.step()
    with pytest.raises(ex.UnsupportedError, match=says(
            "meets tensors of two dtypes", "here torch.float64", "explain in the dtype they are in "
            "(dtype=torch.float32)")) as refused:
        ex.explain(tmp_path / "h", model, x[:2], loss=weighted, keep=("test",), progress=False)
    assert "(dtype=torch.float64)" not in str(refused.value)
    cube = ex.explain(tmp_path / "h", model, x[:2], loss=weighted, keep=("test",), dtype=torch.float32,
                      progress=False)
    assert cube.attrs["relative_residual"] <= 1e-5


def test_the_models_own_not_implemented_error_is_raised_as_it_is():
    """Only torch's NotImplementedError for an op without a forward-mode derivative becomes the
    refusal that names the reverse-mode route; the model's own (an unfinished layer) reaches the
    caller unchanged, not blamed on forward mode."""
    model = nn.Sequential(nn.Linear(2, 3), NotWrittenYet()).double()
    flat = functional.FlatModel(model, functional.layout_of(model), torch.float64, "cpu")
    theta = flat.layout.flatten(dict(model.named_parameters())).detach()
    with pytest.raises(NotImplementedError, match="^this layer's forward is not written yet$"):
        flat.directional(theta, torch.ones_like(theta), torch.ones(1, 2, dtype=torch.float64), "logit")


def test_a_custom_autograd_function_without_jvp_names_the_reverse_mode_route(tmp_path):
    """Without a jvp, the routes through forward mode are refused naming the route around it, which
    decomposes exactly; with one, every route does."""
    model, x = record_through(tmp_path / "h", SwishWithoutJvp)
    fix = ("SwishWithoutJvp.apply at test_refusals.py:", "no jvp staticmethod", "breakpoints=False", "train dim")
    with pytest.raises(ex.UnsupportedError, match=says(*fix)):
        ex.explain(tmp_path / "h", model, x[:2], progress=False)
    with pytest.raises(ex.UnsupportedError, match=says(*fix)):
        ex.reconstruct(tmp_path / "h", model, x[:2], progress=False)
    cube = ex.explain(tmp_path / "h", model, x[:2], progress=False, breakpoints=False, quadrature=6, tolerance=1e-9)
    assert cube.attrs["relative_residual"] <= 1e-9
    model.function = Swish
    cube = ex.explain(tmp_path / "h", model, x[:2], progress=False, quadrature=6, tolerance=1e-9)
    assert cube.attrs["relative_residual"] <= 1e-9
    assert ex.reconstruct(tmp_path / "h", model, x[:2], progress=False).attrs["relative_residual"] <= 1e-9


class GradientReversal(torch.autograd.Function):
    """The identity in forward, the negated gradient in backward (domain-adversarial training)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return -grad

    @staticmethod
    def jvp(ctx, tangent):
        return tangent


class Reversed(nn.Module):
    def __init__(self, function=GradientReversal):
        super().__init__()
        self.hidden = nn.Linear(4, 5)
        self.out = nn.Linear(5, 3)
        self.function = function

    def forward(self, x):
        return self.out(self.function.apply(torch.tanh(self.hidden(x))))


class Identity(GradientReversal):
    @staticmethod
    def backward(ctx, grad):
        return grad


def record_reversed(path, function=GradientReversal):
    torch.manual_seed(0)
    model = Reversed(function).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    x, y = data()
    with ex.Recorder(path, model, optimizer, check_every=1) as rec:
        loop(rec, model, optimizer, x, y, steps=3)
    return model, x


def test_a_backward_that_is_not_the_derivative_is_refused_where_reverse_mode_takes_j(tmp_path, no_heavy_compute):
    """A gradient-reversal layer trains as it should and passes every record-time check; a route
    that takes J by reverse mode is refused before any pass (it missed by 5 relative at the end)."""
    model, x = record_reversed(tmp_path / "h")
    refused = says("backward is not its forward's derivative", "gradient-reversal", "keep no train dim")
    for options in (dict(keep=("train", "test")), dict(keep=("step", "test"), convention="gradient"),
                    dict(keep=("test",), parameter_scores=True)):
        with pytest.raises(ex.UnsupportedError, match=refused):
            ex.explain(tmp_path / "h", model, x[:2], progress=False, **options)
        with pytest.raises(ex.UnsupportedError, match=refused):  # its plan too: it was costed as if it would run
            ex.plan(tmp_path / "h", model, x[:2], **options)


def test_the_derivative_mismatch_is_the_reversed_products_share_of_all(tmp_path):
    """FlatModel.derivative_mismatch by hand, with u and v drawn as it draws them (u first): the
    products t_j = (Jᵀv)_j u_j of J = ∂f/∂θ in float64 (torch.func.jacrev of the same forward with
    its true backward); the reversal negates the hidden layer's, so the mismatch is
    |2 Σ_hidden t_j| / Σ_j |t_j| (a share of the products summed, not of the largest one). The
    true backward's is 0 to rounding."""
    model, x = record_reversed(tmp_path / "h")
    layout = functional.layout_of(model)
    theta = layout.flatten({name: p.detach() for name, p in model.named_parameters()})
    true = Reversed(Identity).double()
    f = lambda th: torch.func.functional_call(true, layout.unflatten(th), (x[:1],))  # noqa: E731
    generator = torch.Generator().manual_seed(0)
    u = torch.randn(theta.shape, generator=generator, dtype=torch.float64)
    v = torch.randn(1, 3, generator=generator, dtype=torch.float64)
    products = torch.einsum("bo,bod->d", v, torch.func.jacrev(f)(theta)) * u
    hidden = layout.flatten({name: torch.full_like(p, name.startswith("hidden")) for name, p in model.named_parameters()})
    by_hand = float(2 * products[hidden.bool()].sum().abs() / products.abs().sum())
    assert by_hand > 1e-3
    flat = functional.FlatModel(model, layout, torch.float64, "cpu")
    assert flat.derivative_mismatch(theta, x[:1], "logit") == pytest.approx(by_hand, rel=1e-12)
    assert functional.FlatModel(true, layout, torch.float64, "cpu").derivative_mismatch(theta, x[:1], "logit") <= 1e-15


def test_forward_mode_decomposes_a_gradient_reversal_run_and_a_true_backward_passes_every_route(tmp_path):
    model, x = record_reversed(tmp_path / "h")
    cube = ex.explain(tmp_path / "h", model, x[:2], keep=("step", "component", "test"), quadrature=6,
                      tolerance=1e-9, progress=False)
    assert cube.attrs["relative_residual"] <= 1e-9
    model, x = record_reversed(tmp_path / "identity", Identity)  # the same forward, its true backward
    for options in (dict(keep=("train", "test")), dict(keep=("step", "test"), convention="gradient")):
        cube = ex.explain(tmp_path / "identity", model, x[:2], quadrature=6, tolerance=1e-9, progress=False, **options)
        assert cube.attrs["relative_residual"] <= 1e-9


class ScaledBackward(GradientReversal):
    """The identity in forward, the gradient times 3 in backward."""

    @staticmethod
    def backward(ctx, grad):
        return 3 * grad


class OneWeight(nn.Module):
    """f(x; w) = w·x through a layer whose backward scales the gradient: J = x, one output."""

    def __init__(self, function):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.7], dtype=torch.float64))
        self.function = function

    def forward(self, x):
        return self.function.apply(self.w * x)


@pytest.mark.parametrize("function, mismatch", [(GradientReversal, 2.0), (ScaledBackward, 2 / 3), (Identity, 0.0)])
def test_the_derivative_mismatch_is_the_share_the_backward_misses_whichever_sign_the_products_take(function, mismatch):
    """One weight and one output: forward mode gives J = x, a backward that scales the gradient
    by c gives c·x, so ⟨v, J u⟩ − ⟨(c J)ᵀ v, u⟩ over |⟨(c J)ᵀ v, u⟩| is |1 − c| / |c| for any u, v
    and x: 2 for a gradient reversal, 2/3 for c = 3. For x = 1 and x = −1 the products take
    both signs; a mismatch of the wrong sign fell below the refusal's threshold."""
    model = OneWeight(function)
    flat = functional.FlatModel(model, functional.layout_of(model), torch.float64, "cpu")
    theta = model.w.detach().clone()
    for x in (1.0, -1.0):
        got = flat.derivative_mismatch(theta, torch.tensor([[x]], dtype=torch.float64), "logit")
        assert got == pytest.approx(mismatch, rel=1e-12, abs=1e-15), x


class StraightThrough(nn.Module):
    """Rounds its hidden units in forward and passes the gradient straight through in backward:
    the training gradient is not the forward's derivative."""

    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(4, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.hidden(x))
        return self.out(h + (torch.round(h * 4) / 4 - h).detach())


def test_a_backward_that_is_not_the_derivative_is_named_where_more_nodes_do_not_help(tmp_path):
    """The recording passes every check; the path integral misses at any quadrature, and the
    error names a straight-through estimator among the causes, not only more nodes."""
    torch.manual_seed(0)
    model = StraightThrough().double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    x, y = data()
    with ex.Recorder(tmp_path / "h", model, optimizer, check_every=1) as rec:
        loop(rec, model, optimizer, x, y, steps=4)
    for quadrature in (4, 32):
        with pytest.raises(ex.ReconstructionError, match=says("raise quadrature", "more nodes leave as it is",
                                                              "straight-through estimator", "true ∂f/∂θ")) as error:
            ex.explain(tmp_path / "h", model, x[:3], quadrature=quadrature, progress=False)
        assert error.value.cube.attrs["relative_residual"] > 1e-2


class Unpooled(nn.Module):
    """max_pool1d then max_unpool1d over 6 hidden units: each pair's larger value is put back in its
    place, the other zeroed, so the output jumps where a pair's argmax switches."""

    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(4, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        pooled, indices = F.max_pool1d(self.hidden(x)[:, None], 2, return_indices=True)
        return self.out(F.max_unpool1d(pooled, indices, 2)[:, 0])


# torch warns that vmap loops over max_unpool, which has no batching rule
@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
def test_a_jump_of_the_models_value_is_named_where_more_nodes_do_not_help(tmp_path):
    """max_unpool's value jumps where its argmax switches, which the search locates but no integral
    spans: the error named only more nodes, unseen kinks and a backward that is not the derivative."""
    torch.manual_seed(0)
    model = Unpooled().double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    x, y = data()
    with ex.Recorder(tmp_path / "h", model, optimizer, check_every=1) as rec:
        loop(rec, model, optimizer, x, y, steps=4)
    with pytest.raises(ex.ReconstructionError, match=says("more nodes leave as it is", "jump", "max_unpool")) as error:
        ex.explain(tmp_path / "h", model, x, keep="test", progress=False)
    assert error.value.cube.attrs["kinks_located"] > 0 and error.value.cube.attrs["relative_residual"] > 1e-3


class PackedLSTM(nn.Module):
    """Token sequences of several lengths, packed for the LSTM (pack_padded_sequence)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(7, 4, padding_idx=0)
        self.rnn = nn.LSTM(4, 3, batch_first=True)
        self.out = nn.Linear(3, 3)

    def forward(self, tokens):
        e = self.embed(tokens)
        h0 = e.new_zeros(1, len(tokens), 3)
        packed = nn.utils.rnn.pack_padded_sequence(e, (tokens != 0).sum(1).cpu(), batch_first=True,
                                                   enforce_sorted=False)
        return self.out(self.rnn(packed, (h0, h0))[1][0][-1])


def test_a_packed_sequence_is_named_with_the_padded_route(tmp_path):
    """nn.LSTM reads a PackedSequence's raw memory, which torch.func's wrapped tensors have not:
    the Recorder's gradient check names it and the fix (it raised torch's bare RuntimeError)."""
    torch.manual_seed(0)
    model = PackedLSTM().double()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    x = torch.randint(1, 7, (4, 4), generator=torch.Generator().manual_seed(0))
    x[0, 3:], x[1, 2:] = 0, 0
    y = torch.tensor([0, 1, 2, 0])
    with pytest.raises(ex.UnsupportedError, match=says("PackedSequence", "pack_padded_sequence", "padded tensor",
                                                       "last valid step")):
        with ex.Recorder(tmp_path / "h", model, optimizer) as rec:
            loop(rec, model, optimizer, x, y, steps=1)


class OneHotTokens(nn.Module):
    """A linear model of one-hot tokens, by F.one_hot or by the comparison that does the same."""

    def __init__(self, by_one_hot: bool):
        super().__init__()
        self.out = nn.Linear(12, 3)
        self.by_one_hot = by_one_hot

    def forward(self, tokens):
        hot = F.one_hot(tokens, 4) if self.by_one_hot else tokens[..., None] == torch.arange(4)
        return self.out(hot.to(self.out.weight.dtype).flatten(1))


def test_one_hot_is_named_with_the_comparison_that_replaces_it(tmp_path):
    """F.one_hot checks its classes by reading values, which vmap refuses: the message names it
    and the comparison, which explains exactly."""
    torch.manual_seed(0)
    model = OneHotTokens(by_one_hot=True).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    x = torch.randint(0, 4, (8, 3), generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(1))
    with ex.Recorder(tmp_path / "h", model, optimizer) as rec:
        loop(rec, model, optimizer, x, y, steps=2)
    with pytest.raises(ex.UnsupportedError, match=says("F.one_hot", "torch.arange(n")):
        ex.explain(tmp_path / "h", model, x[:2], progress=False)
    model.by_one_hot = False
    cube = ex.explain(tmp_path / "h", model, x[:2], quadrature=6, tolerance=1e-9, progress=False)
    assert cube.attrs["relative_residual"] <= 1e-9


class CheckingInputs(nn.Module):
    """Checks its inputs in Python, as library models do: by a value read from a tensor, or by a
    shape made from one."""

    def __init__(self, check: str | None):
        super().__init__()
        self.hidden = nn.Linear(4, 6)
        self.out = nn.Linear(6, 3)
        self.check = check

    def forward(self, x):
        if self.check == "value" and bool((x.abs() > 1e3).any()):
            raise ValueError("inputs out of range")
        if self.check == "shape" and len(torch.unique(x.sign())) > 2:
            raise ValueError("zero inputs")
        return self.out(torch.tanh(self.hidden(x)))


@pytest.mark.parametrize("check, words", [("value", (".item()", "data-dependent control flow")),
                                          ("shape", ("dynamic shape", "aten::_unique2"))])
def test_a_value_or_shape_read_from_a_tensor_in_forward_names_the_line_and_the_fix(tmp_path, check, words):
    """vmap cannot batch such a forward: explain names the model's line, the cause and the fix; the
    routes without vmap (no train dim, breakpoints=False) decompose as they are, and the model
    without the check decomposes every way."""
    torch.manual_seed(0)
    model = CheckingInputs(check).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    x, y = data()
    with ex.Recorder(tmp_path / "h", model, optimizer, check_every=1) as rec:
        loop(rec, model, optimizer, x, y, steps=3)
    source, first = inspect.getsourcelines(CheckingInputs.forward)
    line = first + next(i for i, text in enumerate(source) if f'self.check == "{check}"' in text)
    named = says(f"the model's forward at test_refusals.py:{line} (forward)", *words, "torch.where",
                 "breakpoints=False", "attention_mask")
    for breakpoints in (True, False):
        with pytest.raises(ex.UnsupportedError, match=named):
            ex.explain(tmp_path / "h", model, x[:2], breakpoints=breakpoints, progress=False)
    cube = ex.explain(tmp_path / "h", model, x[:2], keep=("step", "test"), breakpoints=False, quadrature=6,
                      tolerance=1e-9, progress=False)
    assert cube.attrs["relative_residual"] <= 1e-9
    model.check = None
    cube = ex.explain(tmp_path / "h", model, x[:2], quadrature=6, tolerance=1e-9, progress=False)
    assert cube.attrs["relative_residual"] <= 1e-9


def test_custom_loss_must_be_passed_again(tmp_path, no_heavy_compute):
    from engine_cases import smooth_loss

    model, optimizer = model_and_sgd()
    x, y = data()
    with ex.Recorder(tmp_path / "h", model, optimizer, loss=smooth_loss) as rec:
        for _ in range(2):
            optimizer.zero_grad()
            smooth_loss(model(x), y).mean().backward()
            rec.batch(torch.arange(8), x, y)
            optimizer.step()
    with pytest.raises(ex.InputError, match=says("custom loss", "smooth_loss", "loss=")):
        ex.explain(tmp_path / "h", model, x[:2], progress=False)
    # a built-in's name is no custom loss: it was taken, and the run refused at step 0's update check
    with pytest.raises(ex.InputError, match=says("loss='cross_entropy'", "built-in", "custom loss", "smooth_loss",
                                                 "same per-sample function")):
        ex.explain(tmp_path / "h", model, x[:2], loss="cross_entropy", progress=False)


def test_another_builtin_loss_than_the_recorded_one_is_refused(tmp_path, no_heavy_compute):
    model, optimizer = model_and_sgd()
    x, y = data()
    with ex.Recorder(tmp_path / "h", model, optimizer) as rec:  # cross-entropy, the default
        loop(rec, model, optimizer, x, y, steps=2)
    with pytest.raises(ex.InputError, match=says("loss='nll'", "'cross_entropy'", "Fix", "leave loss= out")):
        ex.explain(tmp_path / "h", model, x[:2], loss="nll", progress=False)


def test_missing_history(tmp_path, no_heavy_compute):
    with pytest.raises(ex.HistoryError, match=says("nowhere does not exist", "Recorder")):
        ex.explain(tmp_path / "nowhere", Case("mlp").fresh_model(), torch.zeros(2, 4), progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ex.HistoryError, match=says("not a training history", "Recorder")):
        ex.explain(tmp_path / "empty", Case("mlp").fresh_model(), torch.zeros(2, 4), progress=False)


def test_residual_above_tolerance(tmp_path):
    """One midpoint node on long steps: the output residual is an error, not a buried number. The
    model is smooth (tanh), so the fix is more nodes, not the kink search it already asked for."""
    run = train(Case("mlp", "sgd", steps=3, lr_scale=15.0, widths=(6,)), tmp_path / "h")
    with pytest.raises(ex.ReconstructionError, match=says("tolerance", "quadrature=", "tolerance=None")) as error:
        run.explain(quadrature=1, rule="midpoint", tolerance=1e-12)
    assert "breakpoints" not in str(error.value) and "float64" not in str(error.value)
    # an error-controlled search cuts the smooth path into pieces until each meets the tolerance
    cube = run.explain(quadrature=1, rule="midpoint", kink_tolerance=1e-9, tolerance=None)
    assert cube.attrs["kink_segments_unresolved"] > 0
    with pytest.raises(ex.ReconstructionError, match=says("gave up", "kink_tolerance=1e-09", "max_kinks (try max_kinks=64) or quadrature=")):
        run.explain(quadrature=1, rule="midpoint", kink_tolerance=1e-9, tolerance=1e-12)
    cube = run.explain(quadrature=1, rule="midpoint", tolerance=None)
    assert cube.attrs["breakpoints"] == 1 and cube.attrs["kinks_located"] == 0  # asked for; none to locate
    assert "error.cube" in str(error.value)  # the refused cube is not lost: the error holds it
    xr.testing.assert_identical(error.value.cube, cube)
    assert cube.attrs["relative_residual"] > 1e-6  # reported, never hidden
    assert cube.attrs["max_update_residual"] <= 1e-12  # the optimizer was modelled exactly
    assert cube.attrs["quadrature_rule"] == "midpoint" and cube.attrs["quadrature_nodes"] == 1


def test_save_cube_refuses_to_overwrite(run, tmp_path):
    cube = run.explain(keep=("test",))
    ex.save_cube(cube, tmp_path / "c.zarr")
    with pytest.raises(FileExistsError, match=says("exists", "overwrite=True")):
        ex.save_cube(cube, tmp_path / "c.zarr")


@pytest.mark.parametrize("kwargs, words", [
    (dict(outputs=[1.7]), ("outputs=[1.7]", "whole numbers")),
    (dict(outputs=[1, 1]), ("outputs=[1, 1]", "distinct")),
    (dict(step_bins=2.0), ("step_bins=2.0", "number of bins", "edges")),
    (dict(step_bins=[]), ("step_bins=[]", "edges")),
    (dict(step_bins=[0, 2.5, 4]), ("step_bins=[0, 2.5, 4]", "whole numbers")),
    (dict(steps=(2,)), ("steps=(2,)", "start, stop")),
    (dict(steps=(0.5, 3)), ("steps=(0.5, 3)", "whole numbers")),
    (dict(dtype="float32"), ("dtype='float32'", "torch.float64", "torch.float32")),
    (dict(dtype=torch.bfloat16), ("bfloat16", "torch.float64", "torch.float32")),
    (dict(test_chunk=-1), ("test_chunk=-1", "≥ 1")),
    (dict(train_chunk=2.5), ("train_chunk=2.5", "≥ 1")),
    (dict(batch_chunk=0), ("batch_chunk=0", "≥ 1")),
    (dict(components=lambda n: (n,)), ("components", "non-empty strings")),
    (dict(components=lambda n: None), ("components", "None", "non-empty strings")),
    (dict(keep="trian"), ("['trian']", "choose among")),
    (dict(keep=None), ("keep=None", "() keeps none", "'step', 'component', 'train', 'test', 'output'")),
    (dict(keep=3), ("keep=3", "() keeps none", "'step', 'component', 'train', 'test', 'output'")),
    (dict(test_ids=["a", "b"]), ("test_ids of shape (2,)", "one id per input")),
    (dict(test_ids=["a", "b", "a"]), ("test_ids repeat ['a']", "distinct id")),
    (dict(kink_tolerance=float("nan")), ("kink_tolerance=nan", "positive error")),
    (dict(kink_tolerance="1e-3"), ("kink_tolerance='1e-3'", "positive error")),
    (dict(kink_tolerance=True), ("kink_tolerance=True", "positive error")),
    (dict(breakpoints="no"), ("breakpoints='no'", "True", "False")),
])
def test_malformed_arguments(run, no_heavy_compute, kwargs, words):
    with pytest.raises(ex.InputError, match=says(*words)):
        run.explain(**kwargs)


@pytest.mark.parametrize("change, words", [
    (lambda x: x.long(), ("torch.int64", "torch.float64", "inputs.to(")),
    (lambda x: x[:0], ("shape (0, 4)", "at least one input")),
    (lambda x: torch.where(torch.arange(len(x))[:, None] == 1, float("nan"), x), ("[1]", "NaN", "finite")),
    (lambda x: x.index_fill(0, torch.tensor([0, 2]), float("inf")), ("[0, 2]", "inf", "finite")),
])
def test_unusable_test_inputs(run, no_heavy_compute, change, words):
    with pytest.raises(ex.InputError, match=says(*words)):
        ex.explain(run.path, run.model, change(run.test_x), progress=False)


@pytest.mark.parametrize("inputs, words", [
    ("abc", ("str", "invalid data type")),
    ([[0.0, 1.0, 2.0, 3.0], [0.0]], ("list", "expected sequence of length 4")),
    (None, ("NoneType",)),
])
def test_test_inputs_torch_makes_no_tensor_of(run, no_heavy_compute, inputs, words):
    with pytest.raises(ex.InputError, match=says("the test inputs cannot be made a tensor", *words,
                                                 "numpy array", "same length")):
        ex.explain(run.path, run.model, inputs, progress=False)


def test_targets_torch_makes_no_tensor_of(run, no_heavy_compute):
    with pytest.raises(ex.InputError, match=says("targets cannot be made a tensor", "str")):
        ex.explain(run.path, run.model, run.test_x, "abc", outputs="true", progress=False)


@pytest.fixture(scope="module")
def token_run(tmp_path_factory):
    return train(Case("transformer", "adamw", steps=2, n_train=8, n_test=4), tmp_path_factory.mktemp("tokens") / "h")


@pytest.mark.parametrize("call", ["explain", "reconstruct"])
def test_tokens_outside_the_vocabulary(token_run, no_heavy_compute, call):
    """A token the embedding has no row for (a negative one included): on CUDA the lookup stops
    the process with a device-side assert (on CPU an IndexError that names nothing); it is
    refused before any lookup runs, naming the inputs, the tokens and the vocabulary of 5."""
    tokens = token_run.test_x.clone()
    tokens[1, 2], tokens[2, 1], tokens[3, 0] = 5, -1, 7
    functions = {"explain": ex.explain, "reconstruct": ex.reconstruct}
    with pytest.raises(ex.InputError, match=says("test inputs [1, 2, 3]", "indices [-1, 5, 7]",
                                                 "embedding of 5 entries", "0 … 4", "device-side assert", "vocabulary")):
        functions[call](token_run.path, token_run.model, tokens, progress=False)


class OneHotLinear(nn.Module):
    """A linear map of 2 one-hot tokens from a vocabulary of 4."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 3)

    def forward(self, tokens):
        return self.linear(F.one_hot(tokens, num_classes=4).to(self.linear.weight.dtype).flatten(1))


def test_classes_outside_one_hot(tmp_path, no_heavy_compute):
    torch.manual_seed(0)
    model = OneHotLinear()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tokens, labels = torch.randint(0, 4, (6, 2)), torch.randint(0, 3, (6,))
    with ex.Recorder(tmp_path / "h", model, optimizer) as rec:
        loop(rec, model, optimizer, tokens, labels)
    with pytest.raises(ex.InputError, match=says("test inputs [2]", "indices [4]", "one_hot of 4 entries")):
        ex.explain(tmp_path / "h", model, torch.tensor([[0, 1], [3, 2], [1, 4]]), progress=False)


def test_lookups_checked_in_parts_name_the_inputs_by_their_place_in_the_batch():
    """check_lookups runs `rows` inputs at a time (1024 in explain): a token outside the table in
    a later part is named by its place in the whole batch, not in its part."""
    model = OneHotLinear().double()
    flat = functional.FlatModel(model, functional.layout_of(model), torch.float64, "cpu")
    tokens = torch.tensor([[0, 1], [3, 2], [1, 0], [2, 2], [1, 4]])
    with pytest.raises(ex.InputError, match=says("test inputs [4]", "indices [4]", "one_hot of 4 entries")):
        flat.check_lookups(tokens, rows=2)
    flat.check_lookups(tokens[:4], rows=2)  # every token inside: nothing refused


def test_a_small_memory_budget_is_told_in_small_units(run, no_heavy_compute):
    with pytest.raises(ex.InputError, match=says("KiB", "memory_budget=1000 bytes")):
        run.explain(memory_budget=1000)


def test_the_largest_quadrature_allowed_is_accurate():
    """The cap on nodes leaves a usable rule: 1,000 Gauss–Legendre nodes integrate t^k on [0, 1]
    to 1/(k + 1) (a polynomial of degree ≤ 1,999 is integrated exactly)."""
    t, w = nodes(MAX_NODES)
    assert len(t) == 1000
    for k in (0, 1, 7, 40, 300):
        assert abs(float(w @ t**k) - 1 / (k + 1)) < 1e-12


class Float32Kernel(nn.Module):
    """A model with a kernel that has no float64, as torch's grouped_mm on the CPU, which Hugging
    Face's mixture-of-experts layers call; or, with `pairs`, one that fails in every dtype on a
    single input (a failure that is not the dtype's)."""

    def __init__(self, pairs: bool = False):
        super().__init__()
        self.pairs = pairs
        self.hidden, self.out = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = self.hidden(x)
        if h.dtype == torch.float64:
            raise RuntimeError("Expected mat_a to be Float32, got Double")
        if self.pairs and len(x) == 1:
            raise RuntimeError("this model takes inputs in pairs")
        return self.out(torch.tanh(h))


def record_float32_kernel(path, model: nn.Module, check_every: int = 50) -> torch.Tensor:
    x, y = data()
    x = x.float()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    with ex.Recorder(path, model, optimizer, check_every=check_every) as rec:
        loop(rec, model, optimizer, x, y, steps=3)
    return x


def test_a_model_without_float64_is_refused_where_float64_is_needed(tmp_path, no_heavy_compute):
    """float64 is explain's default dtype and the kink search's whatever the dtype: each refusal
    names the options that avoid it."""
    model = Float32Kernel()
    x = record_float32_kernel(tmp_path / "h", model)
    cause = "cannot compute in float64 (RuntimeError: Expected mat_a to be Float32, got Double), though it does in float32"
    with pytest.raises(ex.UnsupportedError, match=says(cause, "Fix: pass dtype=torch.float32 and breakpoints=False")):
        ex.explain(tmp_path / "h", model, x[:2], progress=False)
    with pytest.raises(ex.UnsupportedError, match=re.escape(cause) + r"\. Fix: pass breakpoints=False \(the kink search"):
        ex.explain(tmp_path / "h", model, x[:2], dtype=torch.float32, progress=False)
    with pytest.raises(ex.UnsupportedError, match=re.escape(cause) + r"\. Fix: pass dtype=torch.float32$"):
        ex.reconstruct(tmp_path / "h", model, x[:2], breakpoints=False, progress=False)
    with pytest.raises(ex.UnsupportedError, match=says(cause, "dtype=torch.float32 and breakpoints=False")):
        ex.plan(tmp_path / "h", model, x[:2])
    for call in (lambda: ex.verify_updates(tmp_path / "h", model),
                 lambda: tracin_scores(ex.History(tmp_path / "h"), model, x[:2], [0, 1], progress=False)):
        with pytest.raises(ex.UnsupportedError, match=re.escape(cause) + r"\. Fix: pass dtype=torch.float32$"):
            call()


def test_a_model_without_float64_is_explained_in_float32_by_plain_quadrature(tmp_path):
    model = Float32Kernel()
    x = record_float32_kernel(tmp_path / "h", model)
    cube = ex.explain(tmp_path / "h", model, x[:2], dtype=torch.float32, breakpoints=False, quadrature=8,
                      progress=False)
    assert cube.attrs["relative_residual"] <= 1e-5
    assert ex.verify_updates(tmp_path / "h", model, dtype=torch.float32).max() <= 1e-4


def test_a_failure_in_every_dtype_is_not_blamed_on_float64(tmp_path):
    """The Recorder's check runs a sample alone and refuses such a model at step 0; recorded
    without the check, explain's failure on one input is its own, not float64's."""
    model = Float32Kernel(pairs=True)
    with pytest.raises(ex.UnsupportedError, match=says("fails on one sample alone", "inputs in pairs")):
        record_float32_kernel(tmp_path / "checked", model)
    x = record_float32_kernel(tmp_path / "h", model, check_every=0)
    with pytest.raises(RuntimeError, match="Expected mat_a to be Float32, got Double"):
        ex.explain(tmp_path / "h", model, x[:2], progress=False)


def test_a_decomposition_of_outputs_that_never_moved_is_no_exact_one():
    """Its residual's share of no change read 0.0, which passed every tolerance."""
    from explaind.cube import residual_attrs

    cube = xr.Dataset(attrs=residual_attrs(np.array([1e-3, 0.0]), np.zeros(2)))
    with pytest.raises(ex.ReconstructionError, match=says("end where they started", "adds up to a change of 0.001",
                                                          "tolerance=None")):
        check_residual(cube, 1e-4)
    check_residual(xr.Dataset(attrs=residual_attrs(np.zeros(2), np.zeros(2))), 0.0)  # nothing moved at all: exact
