"""Mixed mode (explaind.mixed): the same cube as the per-row Jacobian route, and that route wherever
mixed mode could not be exact.

Each cube by mixed mode is compared with the one the Jacobian route gives for the same call (mixed
mode forced on and off by its cost estimate, MixedMode.pays), in float64, to 1e-12 of the largest
entry; which route ran is read off the phases (explaind.phases.timed).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import explaind as ex
import explaind.mixed as mixed
from explaind.data import modular_addition
from explaind.functional import FlatModel, layout_of
from explaind.mixed import MixedMode
from explaind.models import ModAddTransformer
from explaind.phases import CONTRACTION, MIXED_KERNEL, PER_ROW_JACOBIANS, SHARED_NODE_JACOBIANS, timed
from engine_cases import Case, train

JACOBIANS = (PER_ROW_JACOBIANS, SHARED_NODE_JACOBIANS)
TRANSFORMER = Case("transformer", "adamw", steps=4, n_train=8, n_test=3)
RELU_MLP = Case("mlp", "adamw", act="relu", steps=6, lr_scale=3.0)


class Runs:
    """Records each case once per module, in a temporary directory."""

    def __init__(self, root: Path):
        self.root, self.cache = root, {}

    def get(self, case: Case):
        if case not in self.cache:
            self.cache[case] = train(case, self.root / f"run{len(self.cache)}")
        return self.cache[case]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("mixed_runs"))


def explained(run, monkeypatch, mixed_mode: bool, **kwargs):
    """run.explain(**kwargs) with mixed mode's estimate forced to say yes or no: (cube, phases)."""
    monkeypatch.setattr(MixedMode, "pays", lambda *args, **kwargs: mixed_mode)
    with timed() as seconds:
        cube = run.explain(tolerance=None, **kwargs)
    return cube, dict(seconds)


def assert_same_cube(by_mixed, by_jacobian) -> None:
    for name in ("attribution", "regularization", "residual", "carried"):
        if name in by_jacobian:
            expected = by_jacobian[name].values
            scale = max(np.abs(expected).max(), np.abs(by_jacobian["final"] - by_jacobian["initial"]).values.max())
            assert np.abs(by_mixed[name].values - expected).max() <= 1e-12 * scale, name


def assert_routes(mixed_phases: dict, jacobian_phases: dict) -> None:
    """Every step of the first call went by mixed mode, every step of the second by J."""
    assert MIXED_KERNEL in mixed_phases and not any(p in mixed_phases for p in (*JACOBIANS, CONTRACTION))
    assert MIXED_KERNEL not in jacobian_phases and any(p in jacobian_phases for p in JACOBIANS)


@pytest.mark.parametrize("case, options", [
    (TRANSFORMER, {}),
    (TRANSFORMER.with_(n_train=4), dict(components="module", keep=("train", "component", "output"))),
    (TRANSFORMER, dict(outputs="true", keep=("step", "train", "test"))),
    (TRANSFORMER.with_(opt="sgd_nesterov"), dict(outputs=[0, 3], train_chunk=3)),
    (TRANSFORMER.with_(opt="sgd_momentum"), dict(steps=(2, 4), replay=1, step_bins=2)),
    (RELU_MLP, dict(quadrature=3)),
    (RELU_MLP.with_(opt="sgd"), dict(keep=("step", "train", "test"), breakpoints=False)),
    (Case("cnn", "adamw", n_train=8), {}),
], ids=["transformer", "grouped-summed", "true-class", "nesterov-list-chunks", "replay-carried", "relu-kinks",
        "plain-sgd-summed", "cnn"])
def test_mixed_mode_gives_the_jacobian_routes_cube(runs, monkeypatch, case, options):
    """On the forward walk (as many kept rows as training samples, or more), every option of the
    walk that changes what is contracted."""
    run = runs.get(case)
    by_mixed, mixed_phases = explained(run, monkeypatch, True, **options)
    by_jacobian, jacobian_phases = explained(run, monkeypatch, False, **options)
    assert_routes(mixed_phases, jacobian_phases)
    assert_same_cube(by_mixed, by_jacobian)
    if case is RELU_MLP:
        assert by_mixed.attrs["kinks_located"] == by_jacobian.attrs["kinks_located"] > 0
    # the comparison tells a wrong kernel: δ 1e-9 off (past the completeness check, which would refuse it)
    original = mixed._deltas
    monkeypatch.setattr(mixed, "_deltas", lambda *args: (lambda d, o: ([v * (1 + 1e-9) for v in d], o))(
        *original(*args)))
    monkeypatch.setattr(mixed, "_incomplete", lambda *args: "")
    off, _ = explained(run, monkeypatch, True, **options)
    with pytest.raises(AssertionError):
        assert_same_cube(off, by_jacobian)


def test_the_estimate_keeps_one_output_per_input_on_the_jacobian_route():
    """On the reference workload's Transformer, 25 outputs per input against 3.6 nodes per input
    pay for mixed mode (measured 1.4× faster); the true class alone does not (2.3× slower), unless
    a batch's steps share its fixed costs. The
    einsums of its attention take mixed mode's einsum path, checked here against a jvp."""
    torch.manual_seed(0)
    model = ModAddTransformer(23, 32, 4, 64)
    flat = FlatModel(model, layout_of(model), torch.float32, "cpu")
    theta = flat.layout.flatten(dict(model.named_parameters())).detach()
    modes = MixedMode(flat)
    x = modular_addition(23, 50, 10, seed=0).val_inputs
    calls = modes.calls(theta, x)
    assert calls is not None and modes.exact(calls, theta, x, "log_prob")
    assert modes.pays(calls, rows=36, inputs=10, outputs=25, tangents=200)
    assert not modes.pays(calls, rows=36, inputs=10, outputs=1, tangents=200)
    # a plain segment's 2 nodes per input too (the reference workload's plain setting 1.7× faster)
    assert modes.pays(calls, rows=20, inputs=10, outputs=25, tangents=200)
    # and 4 inputs' 8 nodes, a step a batch (measured 9% faster), which each op's fixed cost at
    # 5 · 10^7 multiply-adds left to the Jacobians
    assert modes.pays(calls, rows=8, inputs=4, outputs=25, tangents=204)
    # the estimate shares the ops' fixed costs among the steps of a batch, which one call takes
    # (a batch of one output per input holds one step: its tangents outgrow the place of its φ_s)
    assert modes.pays(calls, rows=36, inputs=10, outputs=1, tangents=200, steps=8)


class Temperature(nn.Module):
    """A learned temperature: exp reads a trained tensor and no activation."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.log_t = nn.Parameter(torch.tensor(0.1))

    def forward(self, x):
        return self.fc(x) * self.log_t.exp()


class Power(nn.Module):
    """|x|^p with a trained exponent: an op that is not affine in its tensor."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.p = nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        return torch.pow(self.fc(x).abs() + 1, self.p)


class Broadcast(nn.Module):
    """torch.broadcast_tensors reads a trained tensor and returns a tuple."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.shift = nn.Parameter(torch.zeros(3))

    def forward(self, x):
        h, shift = torch.broadcast_tensors(self.fc(x), self.shift)
        return h + shift


class SequenceFirst(nn.Module):
    """A linear layer applied to [positions, batch, features]: its output's dim 0 is no batch."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 3)

    def forward(self, x):  # x: [batch, 2 positions, 2 features]
        return self.fc(x.transpose(0, 1)).sum(0)


@pytest.mark.parametrize("model, reason", [
    (Temperature(), "the ops' terms (forward) miss a jvp"),  # exp(log_t), made from it alone, is not affine in it
    (Power(), "the ops' terms (forward) miss a jvp"),
    (Broadcast(), "broadcast_tensors returns tuple"),
    (SequenceFirst(), "linear reads ['fc.bias', 'fc.weight'] beside no tensor that runs over the batch"),
])
def test_models_mixed_mode_cannot_be_exact_for_are_refused(model, reason):
    model = model.double()
    x = torch.randn(3, *((2, 2) if isinstance(model, SequenceFirst) else (4,)), dtype=torch.float64)
    flat = FlatModel(model, layout_of(model), torch.float64, "cpu")
    theta = flat.layout.flatten(dict(model.named_parameters())).detach()
    modes = MixedMode(flat)
    calls = modes.calls(theta, x)
    assert calls is None or not modes.exact(calls, theta, x, "log_prob")
    assert modes.refusal[tuple(x.shape[1:])].startswith(reason)


class Views(nn.Module):
    """Trained tensors read through tensors made from each alone, as hand-written models do: x @ W.T,
    a bias with a dim added, and a chain of a view, a transpose and a slice of a third tensor."""

    def __init__(self):
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(6, 4) / 2)
        self.bias = nn.Parameter(torch.randn(6) / 4)
        self.w_out = nn.Parameter(torch.randn(2, 3, 6) / 2)

    def forward(self, x):
        h = torch.tanh(x @ self.w_in.T + self.bias.unsqueeze(0).to(x.dtype))
        return h @ self.w_out.view(6, 6).t()[:, :3]


class Returned(nn.Module):
    """A trained tensor through calls that return it itself (its own dtype, already contiguous)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return F.linear(x, self.fc.weight.to(x.dtype).contiguous(), self.fc.bias)


def test_tensors_made_from_a_trained_one_alone_are_read_in_its_place(tmp_path, monkeypatch):
    """A call that reads one trained tensor and no other (W.T, a view, a slice, chained) makes a
    tensor that the calls after it read in its place (one that returns the tensor itself leaves it
    the tensor): mixed mode takes their terms by jvp and vjp through it, and gives the Jacobian
    route's cube (a model written so was left to the Jacobians,
    1.62–1.67 s against 0.96–0.98 s a reference call: mixed mode now takes it in 1.05–1.20 s)."""
    model = Views().double()
    test_x = record(model, tmp_path / "run")
    flat = FlatModel(model, layout_of(model), torch.float64, "cpu")
    theta = flat.layout.flatten(dict(model.named_parameters())).detach()
    calls = MixedMode(flat).calls(theta, test_x)
    assert [sorted(call.params.values()) for call in calls] == [["w_in"], ["bias"], ["w_out"]]
    assert all(not call.reads_itself(place) for call in calls for place in call.params)
    returned = Returned().double()  # read as it is: F.linear's written-out terms serve it
    flat = FlatModel(returned, layout_of(returned), torch.float64, "cpu")
    calls = MixedMode(flat).calls(flat.layout.flatten(dict(returned.named_parameters())).detach(), test_x)
    assert [(call.func, call.params, call.made) for call in calls] == [(F.linear, {1: "fc.weight", 2: "fc.bias"}, {})]
    cubes = {}
    for mixed_mode in (True, False):
        monkeypatch.setattr(MixedMode, "pays", lambda *args, mixed_mode=mixed_mode, **kwargs: mixed_mode)
        with timed() as phases:
            cubes[mixed_mode] = ex.explain(tmp_path / "run", model, test_x, progress=False, tolerance=1e-9)
        cubes[mixed_mode, "phases"] = dict(phases)
    assert_routes(cubes[True, "phases"], cubes[False, "phases"])
    assert_same_cube(cubes[True], cubes[False])
    assert cubes[True].attrs["relative_residual"] <= 1e-9


def test_a_term_that_misses_the_jvp_is_refused(runs, monkeypatch):
    """The completeness check compares the terms both ways round with a jvp: a wrong reverse share
    refuses mixed mode, and explain takes the Jacobian route."""
    run = runs.get(TRANSFORMER)
    original = mixed._summed_share
    monkeypatch.setattr(mixed, "_summed_share", lambda *args: original(*args) * (1 + 1e-6))
    flat = FlatModel(run.model, layout_of(run.model), torch.float64, "cpu")
    theta = flat.layout.flatten(dict(run.model.named_parameters())).detach()
    modes = MixedMode(flat)
    assert not modes.exact(modes.calls(theta, run.test_x), theta, run.test_x, "log_prob")
    assert modes.refusal[tuple(run.test_x.shape[1:])].startswith("the ops' terms (reverse) miss")
    cube, phases = explained(run, monkeypatch, True)
    assert MIXED_KERNEL not in phases and any(p in phases for p in JACOBIANS)
    assert cube.attrs["relative_residual"] <= 1e-9


def record(model: nn.Module, path: Path) -> torch.Tensor:
    """Three AdamW steps of the model on 6 random samples of 3 classes; the test inputs."""
    torch.manual_seed(0)
    shape = (2, 2) if isinstance(model, SequenceFirst) else (4,)
    x, y = torch.randn(6, *shape, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    with ex.Recorder(path, model, optimizer) as rec:
        for _ in range(3):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            rec.batch(torch.arange(6), x, y)
            optimizer.step()
    return torch.randn(2, *shape, dtype=torch.float64)


@pytest.mark.parametrize("model", [Temperature, SequenceFirst])
def test_a_refused_model_is_explained_by_the_jacobian_route(tmp_path, monkeypatch, model):
    model = model().double()
    test_x = record(model, tmp_path / "run")
    monkeypatch.setattr(MixedMode, "pays", lambda *args, **kwargs: True)
    with timed() as phases:
        cube = ex.explain(tmp_path / "run", model, test_x, progress=False, tolerance=1e-9)
    assert MIXED_KERNEL not in phases and any(p in phases for p in JACOBIANS)
    assert cube.attrs["relative_residual"] <= 1e-9


def test_the_plan_names_why_mixed_mode_cannot_take_a_model(tmp_path, capsys):
    """A model left to the per-row Jacobians is slower where many outputs are explained: the plan,
    which explain(progress=True) prints, says why mixed mode cannot take it, as its own checks
    found (discovery or the completeness check), and says nothing where it can or where the
    request does not walk forwards per training sample."""
    for model, reason in ((Temperature(), "the ops' terms (forward) miss a jvp"),
                          (SequenceFirst(), "linear reads ['fc.bias', 'fc.weight'] beside no tensor")):
        model = model.double()
        test_x = record(model, tmp_path / type(model).__name__)
        plan = ex.plan(tmp_path / type(model).__name__, model, test_x)
        assert plan.direction == "forward" and plan.mixed_refusal.startswith(reason)
        assert f"  mixed mode not used: {reason}" in str(plan)
        assert ex.plan(tmp_path / type(model).__name__, model, test_x, keep=("test", "output")).mixed_refusal == ""
    ex.explain(tmp_path / "Temperature", Temperature().double(), torch.zeros(1, 4, dtype=torch.float64), tolerance=None)
    assert "  mixed mode not used: the ops' terms (forward) miss a jvp" in capsys.readouterr().err
    model = Views().double()
    test_x = record(model, tmp_path / "views")
    plan = ex.plan(tmp_path / "views", model, test_x)
    assert plan.direction == "forward" and plan.mixed_refusal == "" and "mixed mode" not in str(plan)


class Forms(nn.Module):
    """Every op whose share _known_share takes by one product (an embedding, tensors added either
    way round and with the batch's dim or without, an einsum beside a tensor that does not run
    over the batch, F.linear's weight and bias over positions), and one it leaves to the vjp (a
    product with a trained tensor)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(7, 4)
        self.pos = nn.Parameter(torch.randn(3, 4))
        self.pos_batched = nn.Parameter(torch.randn(1, 3, 4))
        self.heads = nn.Parameter(torch.randn(2, 4, 5))
        self.mixing = nn.Parameter(torch.randn(2, 6))
        self.register_buffer("fixed", torch.randn(5, 6))
        self.fc = nn.Linear(2, 3)
        self.scale = nn.Parameter(torch.randn(3))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.pos_batched + (self.embed(tokens) + self.pos)
        h = torch.einsum("bsd,hde->bhse", x, self.heads)
        h = torch.einsum("bhse,ef,gf->bhsg", h, self.fixed, self.mixing)
        return (self.fc(h).sum((1, 2)) * self.scale).relu()


def test_each_known_share_equals_a_backward_pass_per_row_and_output():
    """_summed_share's products (and its vjp for the product it does not know) against
    torch.autograd.grad of <δ_{r,o}, op(row r)> for every row r and output o, summed over each
    group's rows, in float64: groups of one row, of two rows apart, and an empty one."""
    torch.manual_seed(0)
    model = Forms().double()
    flat = FlatModel(model, layout_of(model), torch.float64, "cpu")
    theta = flat.layout.flatten(dict(model.named_parameters())).detach()
    tokens = torch.randint(0, 7, (5, 3))
    modes = MixedMode(flat)
    calls = modes.calls(theta, tokens)
    assert calls is not None and modes.exact(calls, theta, tokens, "logit")
    assert [getattr(c.func, "__name__", "") for c in calls] == ["embedding", "add", "add", "einsum", "einsum", "linear",
                                                                 "mul"]
    points = flat.layout.unflatten(theta + torch.rand(4, 1, dtype=torch.float64) * torch.randn_like(theta))
    deltas, others = mixed._deltas(flat, calls, points, tokens[[0, 1, 1, 2]], torch.ones(4, dtype=torch.float64),
                                   None, "logit", 3)
    at = flat.layout.unflatten(theta)
    group = torch.tensor([1, 0, 1, 3])
    groups = mixed._Groups(group, 4)
    for call, delta, row_others in zip(calls, deltas, others):
        delta = torch.randn_like(delta)  # any cotangent: the share is linear in it
        rows = [a[:, 0] if batched else a[0] for a, batched in zip(row_others, call.batched)]
        for place, name in call.params.items():
            assert (mixed._known_share(call, place, rows, delta, at[name], groups) is None) == (name == "scale")
            share = mixed._summed_share(call, name, row_others, delta, at, groups)
            expected = torch.zeros_like(share)
            for r in range(len(delta)):
                for o in range(delta.shape[1]):
                    tensor = at[name].clone().requires_grad_()
                    y = call([a[r] for a in row_others], {**at, name: tensor})
                    expected[group[r], o] += torch.autograd.grad((y[0] * delta[r, o]).sum(), tensor)[0]
            largest = expected.flatten(2).abs().amax(-1)  # [group, output]
            assert largest[2].max() == 0 and largest[[0, 1, 3]].min() > 0
            torch.testing.assert_close(share, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("way", ["cheaper", "forward", "reverse"])
@pytest.mark.parametrize("architecture", ["mlp", "forms"])
def test_steps_taken_in_batches_give_the_jacobian_routes_cube(tmp_path, monkeypatch, architecture, way):
    """Mixed mode takes the steps of the forward walk a batch at a time (engine.MIXED_BATCH_STEPS):
    batches of 2 over 7 steps, one cut short where the tangents change size (SGD's momentum set to
    0 from step 3 on, so that the current gradients join the momentum buffer's: batches of 2, 1,
    2 and 2 steps), give the per-row Jacobian route's cube, each op's term taken the cheaper way,
    all forward (segment by segment) or all reverse (all segments' rows at once). On a ReLU MLP and
    on Forms, whose ops take every kind of term; 20 test inputs, so that a batch holds 2 steps,
    whose kinks give them different numbers of rows."""
    torch.manual_seed(0)
    if architecture == "mlp":
        model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double()
        x, test_x = torch.randn(10, 4, dtype=torch.float64), torch.randn(20, 4, dtype=torch.float64)
    else:
        model = Forms().double()
        x, test_x = torch.randint(0, 7, (10, 3)), torch.randint(0, 7, (20, 3))
    y = torch.arange(10) % 3
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    with ex.Recorder(tmp_path / "run", model, optimizer) as rec:
        for step in range(7):
            if step == 3:
                optimizer.param_groups[0]["momentum"] = 0.0
            batch = torch.randperm(10)[:4]
            optimizer.zero_grad()
            F.cross_entropy(model(x[batch]), y[batch]).backward()
            rec.batch(batch, x[batch], y[batch])
            optimizer.step()
    monkeypatch.setattr("explaind.engine.MIXED_BATCH_STEPS", 2)
    if way != "cheaper":
        monkeypatch.setattr(mixed, "_reverse_cost", lambda *args: 0 if way == "reverse" else 10**18)
    cubes, phases = [], []
    for mixed_mode in (True, False):
        monkeypatch.setattr(MixedMode, "pays", lambda *args, **kwargs: mixed_mode)
        with timed() as seconds:
            cubes.append(ex.explain(tmp_path / "run", model, test_x, progress=False, tolerance=None))
        phases.append(dict(seconds))
    assert_routes(*phases)
    assert_same_cube(*cubes)  # (Forms' products of trained tensors leave 2 nodes a step 6% off: same either way)
