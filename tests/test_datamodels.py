"""Subset retraining, TracIn and the linear datamodeling score (explaind.datamodels), against
scipy, hand cases, a brute-force loop over the recorded checkpoints and a manual training run."""

import itertools
import types
import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch
import torch.nn.functional as F
from torch import nn
import xarray as xr

import explaind as ex
from explaind import InputError, datamodels, validation
from explaind.data import modular_addition
from explaind.functional import FlatModel
from explaind.models import ModAddTransformer
from explaind.training import TransformerConfig, train_transformer

from engine_cases import Case, train


RECORDED = Case(model="mlp", opt="sgd_momentum", schedule="lambda", groups=2, steps=6, batch=4, n_train=10, n_test=3)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """Mini-batch momentum SGD, two parameter groups (two learning rates), a decaying schedule,
    dataset indices that are not 0 … M−1."""
    return train(RECORDED, tmp_path_factory.mktemp("datamodels") / "history")


@pytest.fixture(scope="module")
def clipped(tmp_path_factory):
    """The same run with its gradient norm clipped to 0.5 by rec.clip_grad_norm_."""
    return train(RECORDED.with_(clip=0.5), tmp_path_factory.mktemp("datamodels") / "clipped")


def test_random_subsets_have_the_asked_size_and_follow_the_seed():
    subsets = datamodels.random_subsets(11, 6, 0.5, seed=1)
    assert subsets.shape == (6, 11) and subsets.sum(1).tolist() == [6] * 6  # round(5.5) = 6
    assert torch.equal(subsets, datamodels.random_subsets(11, 6, 0.5, seed=1))
    assert len({tuple(row.tolist()) for row in subsets}) > 1
    with pytest.raises(InputError, match="at least 2 subsets"):
        datamodels.random_subsets(11, 1, 0.5, seed=1)
    with pytest.raises(InputError, match="fraction 1.0"):
        datamodels.random_subsets(11, 4, 1.0, seed=1)


def test_spearman_matches_scipy_with_ties_and_nan_for_constant_columns():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 4, size=(12, 5)).astype(float)  # many ties
    b = a + rng.normal(size=(12, 5))
    b[:3, 1] = b[3, 1]  # ties in b too
    ours = datamodels.spearman(a, b)
    for j in range(5):
        assert ours[j] == pytest.approx(scipy.stats.spearmanr(a[:, j], b[:, j]).statistic, abs=1e-12)
    assert datamodels.ranks(np.array([[3.0], [1.0], [3.0], [2.0]]))[:, 0].tolist() == [3.5, 1.0, 3.5, 2.0]
    assert np.isnan(datamodels.spearman(np.ones((4, 1)), np.arange(4.0)[:, None]))[0]


def test_subset_predictions_and_lds_by_hand():
    scores = np.array([[1.0, -1.0], [2.0, 0.0], [4.0, 1.0]])  # [train 3, test 2]
    subsets = torch.tensor([[True, True, False], [False, True, True], [True, False, True]])
    predicted = datamodels.subset_predictions(scores, subsets)
    assert predicted.tolist() == [[3.0, -1.0], [6.0, 1.0], [5.0, 0.0]]
    actual = np.array([[0.1, 0.3], [0.9, 0.1], [0.5, 0.2]])  # input 0 ordered as predicted, input 1 reversed
    assert datamodels.lds(actual, predicted).tolist() == pytest.approx([1.0, -1.0])


def test_bootstrap_interval_of_a_perfect_and_a_null_score():
    rng = np.random.default_rng(1)
    actual = rng.normal(size=(20, 8))
    summary = datamodels.bootstrap_lds(actual, {"perfect": 2 * actual + 1, "noise": rng.normal(size=(20, 8))},
                                       resamples=200, level=0.9, seed=0, progress=False).set_index("method")
    assert summary.loc["perfect", ["lds", "ci_low", "ci_high"]].tolist() == pytest.approx([1.0, 1.0, 1.0])
    noise = summary.loc["noise"]
    assert noise["ci_low"] <= noise["lds"] <= noise["ci_high"] and noise["ci_low"] < 0 < noise["ci_high"]
    difference = summary.loc["noise_minus_perfect"]
    assert difference["lds"] == pytest.approx(noise["lds"] - 1.0) and difference["ci_high"] < 0


def test_bootstrap_leaves_out_resamples_without_a_ranking_and_warns_nothing():
    """With three retrained models, about one resample in nine draws a single model three times:
    no ranking, so its LDS is undefined on every input. Those resamples leave the interval; the
    others rank a perfect score perfectly."""
    actual = np.random.default_rng(2).normal(size=(3, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's "Mean of empty slice" used to leak into the notebooks
        summary = datamodels.bootstrap_lds(actual, {"perfect": actual, "reversed": -actual}, resamples=200,
                                           seed=0, progress=False).set_index("method")
    assert summary.loc["perfect", ["lds", "ci_low", "ci_high"]].tolist() == pytest.approx([1.0, 1.0, 1.0])
    assert summary.loc["reversed_minus_perfect", ["lds", "ci_low", "ci_high"]].tolist() == pytest.approx([-2.0] * 3)
    assert np.isnan(datamodels.defined_mean(np.full(2, np.nan)))
    assert np.isnan(list(datamodels.percentile_interval(np.full(2, np.nan), 0.9).values())).all()


def test_the_mean_and_the_interval_of_the_defined_draws():
    assert datamodels.defined_mean(np.array([1.0, 2.0, 6.0, np.nan])) == 3.0  # the mean of the three, not the median
    draws = np.append(np.arange(101.0), [np.nan, np.nan])  # the NaNs left out: percentiles of 0 … 100
    interval = datamodels.percentile_interval(draws, 0.9)  # 5% in each tail
    assert [interval["ci_low"], interval["ci_high"]] == pytest.approx([5.0, 95.0], abs=1e-9)


def test_bootstrap_resamples_the_inputs_as_well_as_the_models():
    """Input 0 is predicted perfectly (LDS 1 on every resample of models), input 1 reversed (−1):
    a resample of both inputs has mean LDS 0, but one that draws an input twice has ±1, each with
    chance 1/4; a bootstrap over the models alone would give 0 every time."""
    actual = np.random.default_rng(4).normal(size=(20, 2))
    predicted = actual * np.array([1.0, -1.0])
    summary = datamodels.bootstrap_lds(actual, {"half": predicted}, resamples=200, level=0.9, seed=0,
                                       progress=False).set_index("method")
    assert summary.loc["half", ["lds", "ci_low", "ci_high"]].tolist() == pytest.approx([0.0, -1.0, 1.0], abs=1e-12)


@pytest.mark.parametrize("level, resamples", [(1.0, 10), (0.0, 10), (0.9, 0)])
def test_bootstrap_refuses_a_level_outside_0_1_and_no_resamples(level, resamples):
    with pytest.raises(InputError, match=rf"need 0 < level < 1 and resamples >= 1, got {level} and {resamples}"):
        datamodels.bootstrap_lds(np.zeros((5, 3)), {"a": np.zeros((5, 3))}, level=level, resamples=resamples,
                                 progress=False)


@pytest.mark.parametrize("n", [2, 3, 4, 5, 6])
def test_spearman_takes_the_values_of_the_formula_over_every_order_of_n_ranks(n):
    """Every order of n ranks against 1 … n: the distinct correlations scipy computes are the
    formula's; n = 3 leaves out 0, the one even Σd² (4) that no order of three ranks reaches."""
    seen = {round(scipy.stats.spearmanr(range(n), order).statistic, 12)
            for order in itertools.permutations(range(n))}
    assert datamodels.spearman_values(n) == pytest.approx(sorted(seen), abs=1e-12)
    if n == 4:  # 1 − 6Σd²/60 for Σd² = 0, 2, …, 20
        assert datamodels.spearman_values(4) == pytest.approx(np.linspace(-1, 1, 11))
    if n == 3:
        assert 0 not in seen


@pytest.mark.parametrize("n", [2, 3, 4, 5, 6])
def test_two_subset_share_is_the_share_of_resamples_drawing_two_models(n):
    """Every resample of n models with replacement, enumerated: among those holding more than one
    model, the share holding exactly two; over those two, any scores correlate to ±1."""
    distinct = np.array([len(set(draw)) for draw in itertools.product(range(n), repeat=n)])
    assert datamodels.two_subset_share(n) == pytest.approx((distinct == 2).sum() / (distinct > 1).sum())
    rng = np.random.default_rng(n)
    actual, predicted = rng.normal(size=(n, 3)), rng.normal(size=(n, 3))
    draw = [0] * (n - 1) + [1]  # two distinct models, one of them drawn n − 1 times
    assert np.abs(datamodels.lds(actual[draw], predicted[draw])) == pytest.approx(np.ones(3))


def test_fewest_subsets_bring_the_two_model_share_within_a_tail():
    # shares from the enumeration above: n = 4: 84/252, n = 5: 300/3120, n = 6: 930/46650
    assert datamodels.fewest_subsets(0.95) == 6  # tail 2.5%: 9.6% at n = 5, 2.0% at n = 6
    assert datamodels.fewest_subsets(0.8) == 5  # tail 10%
    assert datamodels.fewest_subsets(0.3) == 4  # tail 35%: 33.3% at n = 4


def test_findings_call_the_verdicts_of_a_few_retrainings_not_informative():
    """The tests' tiny profile: 4 retrainings x 4 inputs at 90%. A perfect score's interval is
    [1, 1], but a third of the resamples draw two models only, so no verdict is given."""
    rng = np.random.default_rng(3)
    config = types.SimpleNamespace(lds_fraction=0.5, confidence=0.9)

    def findings(subsets, inputs):
        actual = rng.normal(size=(subsets, inputs))
        predicted = {"explaind": actual, "random": rng.normal(size=(subsets, inputs))}
        summary = datamodels.bootstrap_lds(actual, predicted, resamples=200, level=0.9, progress=False)
        result = types.SimpleNamespace(actual=actual, scores=predicted, summary=summary, steps=(0, 5))
        return validation.datamodel_findings(result, config)

    small = findings(4, 4)
    assert small[1] == "  explaind: 1.000 [1.000, 1.000]"
    assert small[3].endswith(": not informative at 4 subsets")
    assert small[-1].startswith("Caveat: the LDS rests on 4 retrained subsets and 4 held-out inputs. ")
    assert "takes 11 distinct values (the closest 0.2 apart)" in small[-1]
    assert "33.3% of the bootstrap resamples draw only two distinct subsets" in small[-1]
    assert "more than the 5.0% of each tail of the 90% intervals" in small[-1]
    assert "not informative at this size (lds_subsets >= 6" in small[-1]
    large = findings(16, 8)
    assert large[3].endswith(": ExPLAIND is better")
    assert large[-1].startswith("Resolution: the LDS rests on 16 retrained subsets and 8 held-out inputs. ")
    assert "takes 681 distinct values" in large[-1] and "under 0.1% of the bootstrap" in large[-1]


def test_findings_give_a_verdict_only_where_the_difference_interval_leaves_out_0():
    """16 retrainings (informative at 90%): a difference interval across 0 resolves nothing; one
    below 0 says ExPLAIND is better, one above 0 that it is worse."""
    summary = pd.DataFrame({
        "method": ["explaind", "across", "below", "above", "across_minus_explaind", "below_minus_explaind",
                   "above_minus_explaind"],
        "lds": [0.5, 0.6, 0.0, 0.9, 0.1, -0.5, 0.4],
        "ci_low": [0.4, 0.5, -0.1, 0.8, -0.05, -0.6, 0.3],
        "ci_high": [0.6, 0.7, 0.1, 1.0, 0.2, -0.4, 0.5]})
    methods = ["explaind", "across", "below", "above"]
    result = types.SimpleNamespace(actual=np.zeros((16, 8)), scores=dict.fromkeys(methods), summary=summary, steps=(0, 5))
    lines = validation.datamodel_findings(result, types.SimpleNamespace(lds_fraction=0.5, confidence=0.9))
    assert lines[5:8] == ["  across - explaind: +0.100 [-0.050, +0.200]: no difference resolved at this size",
                          "  below - explaind: -0.500 [-0.600, -0.400]: ExPLAIND is better",
                          "  above - explaind: +0.400 [+0.300, +0.500]: ExPLAIND is worse"]
    assert lines[-1].startswith("Resolution: ")


def test_aligned_scores_place_rows_by_dataset_index():
    scores = xr.DataArray([[1.0, 2.0], [3.0, 4.0]], dims=("train", "test"), coords={"train": [4, 1]})
    dense = datamodels.aligned_scores(scores, 5)
    assert dense.tolist() == [[0, 0], [3, 4], [0, 0], [0, 0], [1, 2]]
    # the same scores laid out [test, train]: placed by their labels, not by their axis order
    assert datamodels.aligned_scores(scores.transpose("test", "train"), 5).tolist() == dense.tolist()


def test_subset_outputs_record_the_true_class_log_probability():
    logits = torch.tensor([[0.0, 1.0], [2.0, 0.0]], dtype=torch.float64)
    trained = []

    def fake_train(indices):  # a "model" whose outputs scale with the subset's size
        trained.append(indices.tolist())
        return lambda x: x * len(indices)

    subsets = torch.tensor([[True, False, True], [True, True, True]])
    outputs = datamodels.subset_outputs(fake_train, subsets, logits, torch.tensor([1, 0]), progress=False)
    assert trained == [[0, 2], [0, 1, 2]]
    expected = torch.stack([F.log_softmax(logits * n, -1)[[0, 1], [1, 0]] for n in (2, 3)])
    torch.testing.assert_close(outputs, expected)


@pytest.mark.parametrize("fixture", ["recorded", "clipped"])
def test_tracin_against_a_brute_force_loop_over_the_checkpoints(request, fixture):
    """A clipped step moves every sample's gradient by c_s = min(1, max_norm / (‖ḡ_s‖ + 1e-6))."""
    run = request.getfixturevalue(fixture)
    scores = datamodels.tracin_scores(ex.History(run.path), run.model, run.test_x, run.test_y, progress=False)
    model = run.case.fresh_model()
    params = list(model.parameters())
    group_of_coordinate = torch.cat([torch.full((p.numel(),), g) for p, g in zip(params, run.group_of_tensor)])
    expected = {int(i): torch.zeros(len(run.test_x), dtype=torch.float64) for i in run.train_ids}
    for s, (ids, xb, yb) in enumerate(run.batches):
        torch.nn.utils.vector_to_parameters(run.thetas[s], params)
        eta = torch.tensor(run.lrs[s], dtype=torch.float64)[group_of_coordinate]

        def gradient(value):
            return torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, params)])

        g_batch = gradient(F.cross_entropy(model(xb), yb))
        clip = 1.0 if run.case.clip is None else min(1.0, run.case.clip / (float(g_batch.norm()) + 1e-6))
        for k, xk, yk in zip(ids.tolist(), xb, yb):
            g_train = clip * gradient(F.cross_entropy(model(xk[None]), yk[None])) / len(ids)  # mean over the batch
            for t, (xt, yt) in enumerate(zip(run.test_x, run.test_y)):
                g_test = gradient(F.log_softmax(model(xt[None]), -1)[0, yt])
                expected[k][t] += -(eta * g_train * g_test).sum()
    for k, values in expected.items():
        np.testing.assert_allclose(scores.sel(train=k).values, values.numpy(), rtol=1e-10, atol=1e-15)
    assert sorted(scores["train"].values.tolist()) == sorted(expected)


def test_tracin_is_the_same_by_forward_mode_and_by_per_sample_gradients(recorded, monkeypatch):
    """TracIn takes its products by forward mode where forward_mode_pays says so (never for a model
    this small), else from the per-sample gradients; both give the same scores."""
    history = ex.History(recorded.path)
    scores, calls = {}, []
    per_sample_directional = FlatModel.per_sample_directional
    monkeypatch.setattr(FlatModel, "per_sample_directional",
                        lambda *args, **kwargs: calls.append(1) or per_sample_directional(*args, **kwargs))
    for pays in (True, False):
        monkeypatch.setattr(datamodels, "forward_mode_pays", lambda *args, pays=pays: pays)
        scores[pays] = datamodels.tracin_scores(history, recorded.model, recorded.test_x, recorded.test_y,
                                                progress=False)
    assert len(calls) == history.n_steps  # each step by forward mode once, then by the gradients
    np.testing.assert_allclose(scores[True].values, scores[False].values, rtol=1e-10, atol=1e-15)


def test_tracin_labels_its_inputs_as_a_cube_does(recorded):
    """test_ids label the test dim as explain's do, so the scores align with a cube's by label;
    they were always 0 … T − 1. A wrong count is refused before the pass over the history."""
    history = ex.History(recorded.path)
    ids = np.array([f"pair-{i}" for i in range(len(recorded.test_x))])[::-1].copy()
    args = (history, recorded.model, recorded.test_x, recorded.test_y)
    scores = datamodels.tracin_scores(*args, test_ids=ids, progress=False)
    cube = ex.explain(*args, keep=("train", "test"), outputs="true", test_ids=ids, progress=False)
    assert list(scores["test"].values) == list(cube["test"].values) == list(ids)
    unlabelled = datamodels.tracin_scores(*args, progress=False)
    np.testing.assert_array_equal(scores.values, unlabelled.values)
    with pytest.raises(InputError, match="pass one id per input"):
        datamodels.tracin_scores(*args, test_ids=ids[:-1], progress=False)


def test_tracin_makes_no_tensor_on_torchs_default_device(recorded):
    """As explain (see test_engine): with the default device 'meta', a tensor made without naming
    its device would stop the call; both routes (one input: forward mode; more: per-sample
    gradients) give the same scores."""
    history = ex.History(recorded.path)
    for n in (1, len(recorded.test_x)):
        args = (history, recorded.model, recorded.test_x[:n], recorded.test_y[:n])
        expected = datamodels.tracin_scores(*args, progress=False)
        with torch.device("meta"):
            scores = datamodels.tracin_scores(*args, progress=False)
        xr.testing.assert_identical(scores, expected)


def test_tracin_over_a_step_range_is_the_sum_of_its_steps(recorded):
    history = ex.History(recorded.path)
    args = (history, recorded.model, recorded.test_x, recorded.test_y)
    whole = datamodels.tracin_scores(*args, progress=False)
    parts = [datamodels.tracin_scores(*args, steps=steps, progress=False) for steps in ((0, 2), (2, 6))]
    np.testing.assert_allclose(parts[0].values + parts[1].values, whole.values, rtol=1e-12, atol=1e-15)
    with pytest.raises(InputError, match="0 ≤ start < stop ≤ 6"):
        datamodels.tracin_scores(*args, steps=(3, 9), progress=False)


TINY = TransformerConfig(p=7, train_size=16, val_size=6, d_model=8, n_heads=2, d_mlp=16, lr=1e-2,
                         weight_decay=1.0, max_steps=4)


def test_a_subset_retraining_is_a_manual_adamw_run_on_the_subset_from_the_same_initialisation():
    subset = torch.tensor([0, 3, 5, 6, 9, 12, 15])
    retrained = train_transformer(TINY, train_indices=subset, progress=False).model

    data = modular_addition(TINY.p, TINY.train_size, TINY.val_size, TINY.data_seed)
    torch.manual_seed(TINY.seed)
    model = ModAddTransformer(TINY.p, TINY.d_model, TINY.n_heads, TINY.d_mlp).double()
    optimizer = torch.optim.AdamW(model.parameters(), lr=TINY.lr, betas=(TINY.beta1, TINY.beta2), eps=TINY.eps,
                                  weight_decay=TINY.weight_decay)
    for _ in range(TINY.max_steps):
        optimizer.zero_grad()
        F.cross_entropy(model(data.train_inputs[subset]), data.train_targets[subset]).backward()
        optimizer.step()
    for (name, p), q in zip(model.named_parameters(), retrained.parameters()):
        assert torch.equal(p, q), name
    full = train_transformer(TINY, progress=False).model
    assert not torch.equal(next(full.parameters()), next(retrained.parameters()))
    for bad in ([0, 16], [-1, 3], [2, 5, 2], []):  # a repeated pair would weigh twice in the loss
        with pytest.raises(InputError, match=f"distinct dataset indices in 0 … 15.*got {len(bad)} values"):
            train_transformer(TINY, train_indices=bad, progress=False)
    with pytest.raises(InputError, match="train_indices cannot be made a tensor.*pass a tensor"):
        train_transformer(TINY, train_indices="abc", progress=False)


def test_the_datamodel_study_explains_a_prefix_of_full_batch_runs_only():
    history = types.SimpleNamespace(n_steps=100)
    transformer = types.SimpleNamespace(name="transformer", history=history)
    cnn = types.SimpleNamespace(name="cnn", history=history)
    assert validation.explained_steps(transformer, validation.InfluenceConfig(lds_steps=0)) == (0, 100)
    assert validation.explained_steps(transformer, validation.InfluenceConfig(lds_steps=30)) == (0, 30)
    assert validation.explained_steps(transformer, validation.InfluenceConfig(lds_steps=100)) == (0, 100)
    with pytest.raises(InputError, match="must lie in 1 … 100"):
        validation.explained_steps(transformer, validation.InfluenceConfig(lds_steps=101))
    with pytest.raises(InputError, match="only full-batch runs"):
        validation.explained_steps(cnn, validation.InfluenceConfig(lds_steps=30))


def test_a_cnn_subset_retraining_trains_on_the_subset_and_records_dataset_indices(monkeypatch, digits_data):
    from explaind import training
    from explaind.data import load_image_pair

    batches = []

    class Capture:
        def __enter__(self):
            return self

        def __exit__(self, *exc_info):
            return None

        def batch(self, indices, inputs, targets):
            batches.append((indices.clone(), inputs.clone(), targets.clone()))

    monkeypatch.setattr(training, "_recorder", lambda *args, **kwargs: Capture())
    config = training.CNNConfig(width=2, batch_size=16, epochs=2, peak_epoch=1.0, flip=False)
    data = load_image_pair(digits_data, config.dataset, config.classes, config.test_size, config.data_seed)
    subset = torch.arange(1, len(data.train_y), 3)  # every third image
    training.train_cnn(config, digits_data, history_dir="unused", progress=False, train_indices=subset)
    assert len(batches) == 2 * (len(subset) // 16)  # steps per epoch follow the subset's size
    seen = torch.cat([indices for indices, _, _ in batches])
    assert set(seen.tolist()) <= set(subset.tolist())
    for indices, inputs, targets in batches:
        torch.testing.assert_close(inputs, data.train_x[indices].double())
        assert torch.equal(targets, data.train_y[indices])


def test_subset_retraining_in_worker_processes_gives_the_same_outputs():
    run = types.SimpleNamespace(name="transformer", config=TINY)
    train = validation.retrainer(run, steps=3, data_dir="unused", device="cpu")
    data = modular_addition(TINY.p, TINY.train_size, TINY.val_size, TINY.data_seed, TINY.only_a_ge_b)
    subsets = datamodels.random_subsets(TINY.train_size, 3, 0.5, seed=0)
    args = (train, subsets, data.val_inputs, data.val_targets)
    one = datamodels.subset_outputs(*args, workers=1, progress=False)
    two = datamodels.subset_outputs(*args, workers=2, progress=False)
    torch.testing.assert_close(one, two, rtol=0, atol=0)
    assert not torch.equal(one[0], one[1])  # the subsets' models differ, so the order is checked too


def test_a_column_holding_nan_has_no_rank_correlation():
    actual = np.array([[1.0, 1.0], [np.nan, 2.0], [3.0, 3.0], [2.0, 4.0]])  # a diverged retraining in column 0
    rho = datamodels.lds(actual, np.arange(8.0).reshape(4, 2))
    assert np.isnan(rho[0]) and rho[1] == pytest.approx(1.0)


def test_true_class_log_probs_are_the_eval_mode_outputs_and_leave_the_mode_as_it_was():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.5), nn.BatchNorm1d(8), nn.Linear(8, 2)).double()
    model[2].running_mean.normal_()  # running statistics unlike those of any batch
    model[2].running_var.uniform_(0.5, 2.0)
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1])
    w, b = model[0].weight, model[0].bias
    hidden = (x @ w.T + b - model[2].running_mean) / torch.sqrt(model[2].running_var + model[2].eps)
    by_hand = F.log_softmax(model[3](hidden * model[2].weight + model[2].bias), -1)[torch.arange(5), y]
    model.train()
    model[2].eval()  # as a recorded loop keeps its BatchNorm: each module's mode is given back
    first = datamodels.true_class_log_probs(model, x, y)
    assert [m.training for m in model] == [True, True, False, True] and not first.requires_grad
    torch.testing.assert_close(first, by_hand.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(datamodels.true_class_log_probs(model, x[:1], y[:1]), first[:1], rtol=0, atol=0)


def test_true_class_log_probs_run_the_inputs_on_the_models_device():
    """A retrained model stays where it trained: the inputs go to its parameters' device (here 'meta',
    which any machine has), and the log-probabilities come back to the CPU."""
    class Elsewhere(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(1, device="meta"))

        def forward(self, x):
            self.seen = x.device
            return torch.tensor([[0.0, np.log(3.0)]], dtype=torch.float64)  # p = 1/4, 3/4

    model = Elsewhere()
    out = datamodels.true_class_log_probs(model, torch.zeros(1, 2), torch.tensor([1]))
    assert model.seen == torch.device("meta") and out.device == torch.device("cpu")
    torch.testing.assert_close(out, torch.tensor([np.log(0.75)], dtype=torch.float64), rtol=1e-12, atol=0)


@pytest.mark.parametrize("steps", [(0.5, 2), "ab", (2,)])
def test_tracin_refuses_a_malformed_step_window(recorded, steps):
    with pytest.raises(InputError, match=r"must be two whole numbers \(start, stop\)"):
        datamodels.tracin_scores(ex.History(recorded.path), recorded.model, recorded.test_x, recorded.test_y,
                                 steps=steps, progress=False)


def test_tracin_refuses_inputs_and_targets_the_model_cannot_take(recorded):
    history, model = ex.History(recorded.path), recorded.model
    x, y = recorded.test_x, recorded.test_y
    with pytest.raises(InputError, match=r"targets must lie in 0 … "):
        datamodels.tracin_scores(history, model, x[:1], torch.tensor([99]), progress=False)
    with pytest.raises(InputError, match=r"test inputs have shape \(2, 1\)"):
        datamodels.tracin_scores(history, model, x[:2, :1], y[:2], progress=False)
    with pytest.raises(InputError, match=rf"got 2 targets for {len(x)} inputs"):
        datamodels.tracin_scores(history, model, x, y[:2], progress=False)
    with pytest.raises(InputError, match=r"^the true class \(outputs='true', TracIn\) needs the test targets, one "
                                         r"class index per input: pass targets=\.\.\.$"):  # it named outputs= alone
        datamodels.tracin_scores(history, model, x, None, progress=False)


def test_aligned_scores_and_bootstrap_refuse_arrays_of_another_shape():
    scores = xr.DataArray(np.zeros((2, 3, 2)), dims=("train", "test", "output"), coords={"train": [0, 1]})
    with pytest.raises(InputError, match=r"sel\(output=...\)"):
        datamodels.aligned_scores(scores, 4)
    with pytest.raises(InputError, match=r"predicted \{'a': \(5, 2\)\}"):
        datamodels.bootstrap_lds(np.zeros((5, 3)), {"a": np.zeros((5, 2))}, resamples=3, progress=False)


def test_tracin_takes_the_history_as_explain_does(recorded, tmp_path):
    """A history's folder, as explain takes it (it failed with "'str' object has no attribute
    'n_steps'"), gives the scores of the opened History; a model switched to train mode after a
    run recorded in eval mode is refused as explain refuses it (it failed inside torch's BatchNorm,
    or used each batch's statistics)."""
    args = (recorded.model, recorded.test_x, recorded.test_y)
    by_path = datamodels.tracin_scores(str(recorded.path), *args, progress=False)
    xr.testing.assert_identical(by_path, datamodels.tracin_scores(ex.History(recorded.path), *args, progress=False))

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double().eval()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.arange(8) % 3
    with ex.Recorder(tmp_path / "h", model, optimizer) as rec:
        for _ in range(2):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            rec.batch(torch.arange(8), x, y)
            optimizer.step()
    with pytest.raises(ex.UnsupportedError, match="train-mode BatchNorm1d"):
        datamodels.tracin_scores(tmp_path / "h", model.train(), x[:2], y[:2], progress=False)
