"""Pruning criteria, masks, evaluation and areas (explaind.pruning), against hand-computed answers
and independent autograd loops over recorded runs."""

import types

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import xarray as xr
from torch import nn

import explaind as ex
from explaind import InputError, pruning, validation
from explaind.cube import per_parameter
from explaind.functional import FlatModel, ParamLayout
from explaind.losses import BUILTIN_LOSSES

from engine_cases import Case, train

CROSS_ENTROPY = BUILTIN_LOSSES["cross_entropy"]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A recorded momentum-SGD run of a tiny MLP with two parameter groups and a decaying schedule."""
    case = Case(model="mlp", opt="sgd_momentum", schedule="lambda", groups=2, steps=5, n_train=10, n_test=6)
    return train(case, tmp_path_factory.mktemp("pruning") / "history")


def flat_model(run) -> tuple[FlatModel, ex.History]:
    history = ex.History(run.path)
    return FlatModel(run.model, history.layout, torch.float64, "cpu", history.constants()), history


# --- splits and groups ---------------------------------------------------------------------


def test_splits_partition_the_held_out_set_and_depend_on_the_seed_only():
    splits = pruning.split_inputs(20, 5, 6, seed=3)
    assert len(splits) == 5
    for score, evaluation in splits:
        assert len(score) == 6 and len(evaluation) == 14
        assert sorted(np.concatenate([score, evaluation]).tolist()) == list(range(20))
    again = pruning.split_inputs(20, 5, 6, seed=3)
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(splits, again))
    assert not all(np.array_equal(a[0], b[0]) for a, b in zip(splits, pruning.split_inputs(20, 5, 6, seed=4)))
    with pytest.raises(InputError, match="score_inputs=20 must lie in 1 … 19"):
        pruning.split_inputs(20, 5, 20, seed=0)
    with pytest.raises(InputError, match="at least one split"):
        pruning.split_inputs(20, 0, 5, seed=0)
    with pytest.raises(InputError, match="score_inputs=0 must lie in 1 … 19"):  # an empty score part scores nothing
        pruning.split_inputs(20, 5, 0, seed=0)


def test_input_groups_by_membership_pattern():
    splits = [(np.array([0, 1, 2]), np.array([3, 4, 5])), (np.array([2, 3]), np.array([0, 1, 4, 5]))]
    groups, member = pruning.input_groups(splits, 6)
    # patterns (split 0, split 1): input 3 -> (0, 1), inputs 0, 1 -> (1, 0), input 2 -> (1, 1); 4, 5 in none
    assert [g.tolist() for g in groups] == [[3], [0, 1], [2]]
    assert member.tolist() == [[False, True, True], [True, False, True]]
    for i, (score, _) in enumerate(splits):
        assert sorted(np.concatenate([groups[g] for g in np.flatnonzero(member[i])]).tolist()) == score.tolist()


# --- masks ---------------------------------------------------------------------------------


def test_global_and_per_component_thresholds_keep_exactly_the_top_scores():
    scores = torch.tensor([0.9, 0.1, 0.5, 0.7, 0.3, 0.2, 0.8, 0.4])
    prunable = torch.tensor([True] * 6 + [False] * 2)  # the last two: a protected output layer
    keep = pruning.keep_mask(scores, 0.5, prunable)  # 3 of the 6 prunable: 0.9, 0.7, 0.5
    assert keep.tolist() == [True, False, True, True, False, False, True, True]
    layer_a, layer_b = torch.tensor([0, 1, 2, 3]), torch.tensor([4, 5, 6, 7])
    keep = pruning.keep_mask(scores, 0.5, prunable, [layer_a, layer_b])  # 2 of a's 4, 1 of b's 2 prunable
    assert keep.tolist() == [True, False, False, True, True, False, True, True]
    ties = pruning.keep_mask(torch.ones(4), 0.5, torch.ones(4, dtype=torch.bool))
    assert ties.tolist() == [True, True, False, False]  # ties keep the lower index
    # 0.6 of 6 prunable is 3.6 weights: 4 are kept (rounded, not cut down to 3)
    assert pruning.keep_mask(scores, 0.6, prunable).tolist() == [True, False, True, True, True, False, True, True]
    with pytest.raises(InputError, match="must lie in"):
        pruning.keep_mask(scores, 0.0, prunable)
    with pytest.raises(InputError, match="NaN"):
        pruning.keep_mask(torch.full((8,), float("nan")), 0.5, prunable)


def test_prunable_mask_and_component_coordinates():
    layout = ParamLayout(("a.weight", "a.bias", "out.weight"), ((2, 2), (2,), (1, 2)))
    components = {"hidden": ["a.weight", "a.bias"], "output": ["out.weight"]}
    assert pruning.prunable_mask(layout, components, ["output"]).tolist() == [True] * 6 + [False] * 2
    coordinates = pruning.component_coordinates(layout, components)
    assert coordinates["hidden"].tolist() == list(range(6)) and coordinates["output"].tolist() == [6, 7]
    with pytest.raises(InputError, match=r"protected components \['head'\] do not exist"):
        pruning.prunable_mask(layout, components, ["head"])
    prefixes = {"hidden": ["a"], "output": ["out"]}  # module prefixes, as explain(components=...) takes them
    assert pruning.prunable_mask(layout, prefixes, ["output"]).tolist() == [True] * 6 + [False] * 2
    assert {c: t.tolist() for c, t in pruning.component_coordinates(layout, prefixes).items()} == \
        {c: t.tolist() for c, t in coordinates.items()}
    # a protected component of two tensors protects both of them
    bias_protected = {"hidden": ["a.weight"], "output": ["a.bias", "out.weight"]}
    assert pruning.prunable_mask(layout, bias_protected, ["output"]).tolist() == [True] * 4 + [False] * 4
    head_only = {"output": ["out"]}  # a mapping may name only what it protects: the rest is prunable
    assert pruning.prunable_mask(layout, head_only, ["output"]).tolist() == [True] * 6 + [False] * 2
    with pytest.raises(InputError, match=r"\{'head': \['outt'\]\}.*match no parameter tensor"):
        pruning.prunable_mask(layout, {"head": ["outt"]}, ["head"])  # a typo protects nothing: refused


# --- evaluation ----------------------------------------------------------------------------


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(2, 2, bias=False)
        self.out = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.hidden.weight.copy_(torch.tensor([[1.0, -2.0], [0.5, 3.0]]))
            self.out.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))

    def forward(self, x):
        return F.log_softmax(self.out(self.hidden(x)), -1)


def two_layer_case():
    """TwoLayer as a FlatModel, its θ, three inputs, their classes and its two components."""
    model = TwoLayer().double()
    layout = ParamLayout(("hidden.weight", "out.weight"), ((2, 2), (2, 2)))
    flat = FlatModel(model, layout, torch.float64, "cpu")
    theta = layout.flatten(dict(model.named_parameters())).detach()
    x = torch.tensor([[20.0, 1.0], [0.0, 1.0], [1.0, -0.1]], dtype=torch.float64)
    components = {"hidden": torch.arange(4), "out": torch.arange(4, 8)}
    return flat, theta, x, torch.tensor([0, 1, 1]), components


def test_pruning_curves_on_a_hand_built_model():
    flat, theta, x, y, components = two_layer_case()
    prunable = torch.tensor([True] * 4 + [False] * 4)
    scores = {"mine": torch.tensor([0.0, 1.0, 0.0, 2.0, 0, 0, 0, 0])}  # keeps W[0, 1] and W[1, 1] at 1/2
    curves = pruning.pruning_curves(flat, theta, scores, [0.5], prunable, components, x, y)

    # by hand: the pruned hidden layer is [[0, -2], [0, 3]], the output layer the identity
    pruned = F.log_softmax(x @ torch.tensor([[0.0, -2.0], [0.0, 3.0]], dtype=torch.float64).T, -1)
    full = F.log_softmax(x @ torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=torch.float64).T, -1)
    kl = float((full.exp() * (full - pruned)).sum(-1).mean())
    expected = {"accuracy": float((pruned.argmax(-1) == y).double().mean()),
                "agreement": float((pruned.argmax(-1) == full.argmax(-1)).double().mean()), "kl": kl}
    for protocol in ("global", "layerwise"):  # one prunable component: both protocols agree
        row = curves[curves["protocol"] == protocol].iloc[0]
        assert row["criterion"] == "mine" and row["fraction"] == 0.5
        for metric, value in expected.items():
            assert row[metric] == pytest.approx(value, rel=1e-12)
    # predictions: unpruned [0, 1, 0], pruned [1, 1, 0]
    assert expected["accuracy"] == pytest.approx(1 / 3) and expected["agreement"] == pytest.approx(2 / 3)


def test_the_layerwise_protocol_keeps_the_fraction_of_each_component():
    """Both layers prunable, every hidden weight scoring above every output weight: half of all 8
    kept under one threshold is the whole hidden layer (the output layer zeroed, every input at
    log(1/2)); half of each layer keeps hidden W[0, :] and output V[0, :]."""
    flat, theta, x, y, components = two_layer_case()
    scores = {"mine": torch.tensor([4.0, 3.0, 2.0, 1.0, 0.4, 0.3, 0.2, 0.1], dtype=torch.float64)}
    curves = pruning.pruning_curves(flat, theta, scores, [0.5], torch.ones(8, dtype=torch.bool), components, x, y)

    def outputs(hidden, out):  # the two layers' weights by hand
        weights = [torch.tensor(w, dtype=torch.float64) for w in (hidden, out)]
        return F.log_softmax(x @ weights[0].T @ weights[1].T, -1)

    full = outputs([[1.0, -2.0], [0.5, 3.0]], [[1.0, 0.0], [0.0, 1.0]])  # predicts 0, 1, 0
    pruned = {"global": outputs([[1.0, -2.0], [0.5, 3.0]], [[0.0, 0.0], [0.0, 0.0]]),  # ties: argmax 0, 0, 0
              "layerwise": outputs([[1.0, -2.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 0.0]])}  # predicts 0, 1, 0
    expected = {"global": (1 / 3, 2 / 3), "layerwise": (2 / 3, 1.0)}  # accuracy, agreement
    for protocol, values in pruned.items():
        row = curves[curves["protocol"] == protocol].iloc[0]
        assert (row["accuracy"], row["agreement"]) == pytest.approx(expected[protocol], rel=1e-12)
        assert (values.argmax(-1) == y).double().mean() == pytest.approx(expected[protocol][0])
        kl = float((full.exp() * (full - values)).sum(-1).mean())
        assert kl > 0.05 and row["kl"] == pytest.approx(kl, rel=1e-12)


def test_compare_outputs_of_identical_models():
    reference = torch.log_softmax(torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64), -1)
    same = pruning.compare_outputs(reference, reference, torch.tensor([0, 0]))
    assert same == {"accuracy": 0.5, "agreement": 1.0, "kl": 0.0}


def test_area_under_a_log_spaced_curve():
    fractions = np.array([0.01, 0.1, 1.0])
    assert pruning.curve_area(fractions, np.array([0.7, 0.7, 0.7])) == pytest.approx(0.7)
    assert pruning.curve_area(fractions, np.array([0.0, 1.0, 2.0])) == pytest.approx(1.0)  # linear in log10
    assert pruning.curve_area(fractions, np.array([1.0, 0.0, 0.0])) == pytest.approx(0.25)
    assert pruning.curve_area(np.geomspace(1e-3, 0.3, 10), np.ones(10)) == pytest.approx(1.0)
    with pytest.raises(InputError, match="0 < min_fraction < max_fraction"):
        pruning.fraction_grid(0.3, 0.1, 5)
    with pytest.raises(InputError, match="at least 2 points, got 0.1, 0.5, 1"):  # one point spans no area
        pruning.fraction_grid(0.1, 0.5, 1)


def test_area_table_takes_each_metrics_own_curve_in_the_order_of_the_fractions():
    # the areas above: accuracy 0 → 2 linear in log10 (1.0), agreement flat (0.7), KL 1 then 0 (0.25)
    curve = pd.DataFrame({"fraction": [0.01, 0.1, 1.0], "accuracy": [0.0, 1.0, 2.0], "agreement": [0.7] * 3,
                          "kl": [1.0, 0.0, 0.0]})
    curves = pd.concat([curve.assign(split=split, protocol="global", criterion="magnitude").iloc[[1, 2, 0]]
                        for split in (0, 1)], ignore_index=True)  # rows not in the order of the fractions
    areas = pruning.area_table(curves)
    assert areas[["split", "protocol", "criterion"]].values.tolist() == [[0, "global", "magnitude"],
                                                                        [1, "global", "magnitude"]]
    for metric, area in (("accuracy", 1.0), ("agreement", 0.7), ("kl", 0.25)):
        assert areas[metric].tolist() == pytest.approx([area, area], rel=1e-12)


def test_verdicts_pair_the_splits_and_flip_the_sign_of_kl():
    rows = []
    for split, (ours, theirs) in enumerate([((0.9, 0.1), (0.8, 0.3)), ((0.8, 0.2), (0.7, 0.1)), ((0.7, 0.3), (0.6, 0.2))]):
        for criterion, (accuracy, kl) in (("explaind", ours), ("magnitude", theirs)):
            rows.append({"split": split, "protocol": "global", "criterion": criterion,
                         "accuracy": accuracy, "agreement": accuracy, "kl": kl})
    table = pruning.verdicts(pd.DataFrame(rows)).set_index("metric")
    assert table.loc["accuracy", "verdict"] == "wins" and table.loc["accuracy", "better_by"] == pytest.approx(0.1)
    # KL: lower is better; ExPLAIND is lower on split 0 only (by 0.2, then higher by 0.1 twice)
    assert table.loc["kl", "verdict"] == "ties" and table.loc["kl", "splits_better"] == 1
    assert table.loc["kl", "splits_worse"] == 2 and table.loc["accuracy", "splits_worse"] == 0
    assert table.loc["kl", "better_by"] == pytest.approx(0.0, abs=1e-12)
    # the spread of the differences 0.2, -0.1, -0.1 over 3 splits (sample standard deviation): √(0.06 / 2)
    assert table.loc["kl", "spread"] == pytest.approx(np.sqrt(0.03), rel=1e-9)
    assert table.loc["accuracy", "spread"] == pytest.approx(0.0, abs=1e-12)


def test_verdicts_call_areas_equal_on_every_split_a_tie():
    areas = pd.DataFrame([{"split": s, "protocol": "global", "criterion": c, "accuracy": a, "agreement": a, "kl": 0.1}
                          for s, a in ((0, 0.9), (1, 0.7)) for c in ("explaind", "magnitude")])
    table = pruning.verdicts(areas).set_index("metric")
    assert table["verdict"].tolist() == ["ties"] * 3
    assert table["splits_better"].tolist() == [0] * 3 and table["splits_worse"].tolist() == [0] * 3


def test_pruning_findings_count_both_ways_and_keep_small_areas_readable():
    """A tie said "better on 0/2 splits" (one split equal, one worse), and KL areas of 1e-5
    printed as 0.000."""
    rows = []
    for split, (ours, theirs) in enumerate([((0.9, 2e-5), (0.9, 1e-5)), ((0.8, 3e-5), (0.7, 1e-5))]):
        for criterion, (accuracy, kl) in (("explaind", ours), ("magnitude", theirs)):
            rows.append({"split": split, "protocol": "global", "criterion": criterion,
                         "accuracy": accuracy, "agreement": accuracy, "kl": kl})
    lines = validation.pruning_findings(types.SimpleNamespace(verdicts=pruning.verdicts(pd.DataFrame(rows))))
    accuracy = next(line for line in lines if "threshold, accuracy" in line)
    assert accuracy == ("global threshold, accuracy: ExPLAIND 0.85; ties with magnitude (0.8; better on 1, worse on 0 "
                        "of 2 splits)")
    kl = next(line for line in lines if "KL" in line)
    assert kl.endswith("ExPLAIND 2.5e-05; loses to magnitude (1e-05; better on 0, worse on 2 of 2 splits)")


SPLIT_VALUES = [0.1, 0.2, 0.6]  # mean 0.3, sample standard deviation √0.07, median 0.2
OFFSETS = (("explaind", 0.0), ("magnitude", 1.0))  # criterion, added to its areas


def test_area_summary_and_wide_curves_average_over_splits():
    """Three splits: the mean 0.3 (not the median 0.2) and the spread √0.07 (ddof 1) of each area;
    the curves averaged over splits for one protocol only."""
    areas = pd.DataFrame([{"split": s, "protocol": "global", "criterion": criterion,
                           **{m: value + offset for m in pruning.METRICS}}
                          for s, value in enumerate(SPLIT_VALUES) for criterion, offset in OFFSETS])
    summary = validation.area_summary(areas).set_index("criterion")
    for criterion, offset in OFFSETS:
        for metric in pruning.METRICS:
            assert summary.loc[criterion, f"{metric}_mean"] == pytest.approx(0.3 + offset)
            assert summary.loc[criterion, f"{metric}_std"] == pytest.approx(np.sqrt(0.07))
    curves = pd.DataFrame([{"split": s, "protocol": protocol, "criterion": criterion, "fraction": fraction,
                            **{m: (value if protocol == "global" else 100.0) + fraction + offset for m in pruning.METRICS}}
                           for protocol in ("global", "layer") for s, value in enumerate(SPLIT_VALUES)
                           for fraction in (0.1, 0.3) for criterion, offset in OFFSETS])
    wide = validation.wide_curves(curves, "global").set_index("fraction")
    assert sorted(wide.columns) == sorted(f"{m}_{c}" for m in pruning.METRICS for c in ("explaind", "magnitude"))
    for fraction in (0.1, 0.3):
        assert wide.loc[fraction, "accuracy_explaind"] == pytest.approx(0.3 + fraction)
        assert wide.loc[fraction, "kl_magnitude"] == pytest.approx(1.3 + fraction)


def test_influence_metrics_report_the_studies():
    """metrics.json of the influence stage from hand-made study results."""
    areas = pd.DataFrame([{"split": s, "protocol": "global", "criterion": "explaind", **dict.fromkeys(pruning.METRICS, v)}
                          for s, v in enumerate(SPLIT_VALUES)])
    pruned = types.SimpleNamespace(areas=areas, verdicts=pd.DataFrame({"verdict": ["wins", "wins", "loses"]}),
                                   unpruned=pd.DataFrame({"split": [0, 1, 2], "accuracy": [0.5, 0.7, 0.9]}),
                                   prunable=10, parameters=12, groups=[np.arange(3), np.arange(3, 8)],
                                   relative_residual=0.01)
    datamodel = types.SimpleNamespace(summary=pd.DataFrame({"method": ["explaind"], "lds": [0.4], "ci_low": [0.3],
                                                            "ci_high": [0.5]}),
                                      actual=np.zeros((16, 8)), steps=(0, 30), relative_residual=0.02)
    metrics = validation.influence_metrics(pruned, datamodel)
    assert metrics["pruning"].pop("area") == {"global": {"explaind": dict.fromkeys(pruning.METRICS, pytest.approx(0.3))}}
    assert metrics["pruning"] == {"explaind_wins": 2, "explaind_ties": 0, "explaind_losses": 1,
                                  "unpruned_accuracy": pytest.approx(0.7), "prunable_weights": 10, "weights": 12,
                                  "input_groups": 2, "explained_inputs": 8, "relative_residual": 0.01}
    assert metrics["lds"] == {"explaind": {"mean": 0.4, "ci_low": 0.3, "ci_high": 0.5}, "retrainings": 16,
                              "inputs": 8, "steps": 30, "relative_residual": 0.02}


# --- criteria ------------------------------------------------------------------------------


def test_cube_scores_follow_the_layout_order():
    layout = ParamLayout(("a", "b"), ((2,), (3,)))
    cube = xr.Dataset({"parameter_score": ("parameter", np.array([10.0, 11.0, 12.0, 1.0, 2.0])),
                       "parameter_score_stepwise_abs": ("parameter", np.array([20.0, 21.0, 22.0, 3.0, 4.0]))},
                      attrs={"tensor_names": ["b", "a"]})  # the cube lists component by component
    scores = pruning.cube_scores(cube, layout)
    assert scores["explaind"].tolist() == [1.0, 2.0, 10.0, 11.0, 12.0]
    assert scores["explaind_abs"].tolist() == [3.0, 4.0, 20.0, 21.0, 22.0]
    per_input = xr.concat([cube, 2 * cube], dim="test")  # a cube that keeps its test dim: summed
    assert pruning.cube_scores(per_input, layout)["explaind"].tolist() == [3.0, 6.0, 30.0, 33.0, 36.0]
    with pytest.raises(InputError, match="parameter_scores=True"):
        pruning.cube_scores(cube.drop_vars("parameter_score"), layout)
    other = cube.assign_attrs(tensor_names=["b", "c"])  # explained from another model
    with pytest.raises(InputError, match=r"the cube's parameters \['b', 'c'\] are not the layout's \['a', 'b'\]"):
        pruning.cube_scores(other, layout)


def test_a_nan_score_of_one_input_reaches_keep_mask_which_refuses_it():
    per_input = xr.Dataset({"parameter_score": (("test", "parameter"), np.array([[1.0, np.nan, 3.0],
                                                                                 [1.0, 2.0, 4.0]]))})
    scores = per_parameter(per_input)["parameter_score"].values
    assert scores[0] == 2.0 and np.isnan(scores[1]) and scores[2] == 7.0  # not 2.0: NaN is no zero
    with pytest.raises(InputError, match="contain NaN"):
        pruning.keep_mask(torch.from_numpy(scores), 0.5, torch.ones(3, dtype=torch.bool))


def test_explaind_scores_of_groups_are_sums_of_the_scores_per_input(recorded):
    """Why one explain call serves every split: a group's scores, explained on its own, are the
    sums of the per-input scores of a call that keeps the test dim."""
    _, history = flat_model(recorded)
    x, y = recorded.test_x, recorded.test_y
    common = dict(parameter_scores=True, components="module", quadrature=3, progress=False)
    per_input = ex.explain(recorded.path, recorded.model, x[:6], y[:6], keep=("test",), **common)
    for rows in ([0, 1], [2, 3, 4, 5]):
        alone = ex.explain(recorded.path, recorded.model, x[rows], y[rows], keep=(), **common)
        summed = pruning.cube_scores(per_input.isel(test=rows), history.layout)
        for name, values in pruning.cube_scores(alone, history.layout).items():
            torch.testing.assert_close(summed[name], values, rtol=1e-10, atol=1e-14)


def per_input_gradients(run, theta: torch.Tensor, x, y) -> torch.Tensor:
    """∇_θ ℓ(x_i) for each input, by autograd on the module with θ loaded."""
    model = run.case.fresh_model()
    torch.nn.utils.vector_to_parameters(theta, model.parameters())
    rows = []
    for xi, yi in zip(x, y):
        loss = F.cross_entropy(model(xi[None]), yi[None])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))]))
    return torch.stack(rows)


def test_gradient_scores_against_autograd(recorded):
    flat, history = flat_model(recorded)
    theta = recorded.thetas[-1]
    x, y = recorded.test_x, recorded.test_y
    expected = per_input_gradients(recorded, theta, x, y)
    scores = pruning.gradient_scores(flat, theta, x, y, CROSS_ENTROPY, chunk=4)  # two chunks
    torch.testing.assert_close(scores["gradient"], expected.sum(0), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(scores["taylor"], (expected * theta).abs().sum(0), rtol=1e-12, atol=1e-14)


def test_loss_change_allocation_against_a_loop_over_the_recorded_parameters(recorded):
    flat, history = flat_model(recorded)
    x, y = recorded.test_x, recorded.test_y
    weights = torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0, 1.0, 0.5]], dtype=torch.float64)
    lca = pruning.loss_change_allocation(history, flat, x, y, weights, CROSS_ENTROPY, progress=False)
    expected = torch.zeros_like(lca)
    thetas = recorded.thetas
    for before, after in zip(thetas[:-1], thetas[1:]):
        at_before = weights @ per_input_gradients(recorded, before, x, y)
        at_after = weights @ per_input_gradients(recorded, after, x, y)
        expected += 0.5 * (at_before + at_after) * (after - before)
    torch.testing.assert_close(lca, expected, rtol=1e-10, atol=1e-14)
    # and the allocation adds up to (nearly: trapezoid rule) each loss's change over the run
    losses = lambda theta: weights @ F.cross_entropy(flat.raw(theta, x), y, reduction="none")  # noqa: E731
    change = losses(thetas[-1]) - losses(thetas[0])
    torch.testing.assert_close(lca.sum(1), change, rtol=0.05, atol=1e-3)


def test_split_scores_combine_the_groups_of_a_split():
    theta = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    per_group = {
        "explaind": torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]], dtype=torch.float64),
        "explaind_abs": torch.tensor([[3.0, 0.0, 0.0], [0.0, 4.0, 0.0]], dtype=torch.float64),
        "taylor": torch.tensor([[0.1, 0.2, 0.3], [1.0, 1.0, 1.0]], dtype=torch.float64),
        "gradient": torch.tensor([[1.0, 1.0, -1.0], [-3.0, 1.0, 1.0]], dtype=torch.float64),
        "lca": torch.tensor([[-1.0, 0.5, 0.0], [0.0, -0.5, 2.0]], dtype=torch.float64),
    }
    generator = torch.Generator().manual_seed(0)
    both = pruning.split_scores(per_group, np.array([True, True]), theta, generator)
    assert list(both) == list(pruning.CRITERIA)
    assert both["explaind"].tolist() == [1.0, 2.0, 0.0]
    assert both["explaind_abs"].tolist() == [3.0, 4.0, 0.0]  # its own sums, not those of "explaind"
    assert both["gradient_weight"].tolist() == [2.0, 4.0, 0.0]  # |θ ⊙ (sum of the groups' gradients)|
    assert both["magnitude"].tolist() == [1.0, 2.0, 0.5]
    assert both["lca"].tolist() == [1.0, 0.0, -2.0]  # the loss decrease each parameter brought
    first = pruning.split_scores(per_group, np.array([True, False]), theta, generator)
    assert first["taylor"].tolist() == [0.1, 0.2, 0.3]
    assert first["explaind_abs"].tolist() == [3.0, 0.0, 0.0]
    assert not torch.equal(both["random"], first["random"])  # a fresh draw per split


def test_verdicts_refuse_a_reference_absent_from_the_table():
    areas = pd.DataFrame([{"split": 0, "protocol": "global", "criterion": c, "accuracy": a, "agreement": a, "kl": 1 - a}
                          for c, a in (("magnitude", 0.9), ("random", 0.5))])
    with pytest.raises(InputError, match=r"reference='explaind'.*\['magnitude', 'random'\]"):
        pruning.verdicts(areas)


def test_keep_mask_refuses_scores_of_another_length():
    with pytest.raises(InputError, match=r"scores of shape \(10,\) for a prunable mask of shape \(67,\)"):
        pruning.keep_mask(torch.rand(10, dtype=torch.float64), 0.5, torch.ones(67, dtype=torch.bool))


def test_gradient_scores_refuse_an_empty_group(recorded):
    flat, _ = flat_model(recorded)
    with pytest.raises(InputError, match="at least one input"):
        pruning.gradient_scores(flat, recorded.thetas[-1], recorded.test_x[:0], recorded.test_y[:0], CROSS_ENTROPY)


def test_verdicts_keep_a_nan_area_in_the_means():
    areas = pd.DataFrame([{"split": s, "protocol": "global", "criterion": c, "accuracy": a, "agreement": a, "kl": 0.1}
                          for s in (0, 1) for c, a in (("explaind", 0.9 if s else np.nan), ("magnitude", 0.5))])
    row = pruning.verdicts(areas).set_index("metric").loc["accuracy"]
    assert np.isnan(row["reference"]) and np.isnan(row["better_by"]) and row["verdict"] == "ties"
