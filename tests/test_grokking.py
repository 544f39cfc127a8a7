"""explaind.grokking: every analysis against an independent computation on hand-built inputs or
a tiny recorded Transformer run."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr

from explaind import History, grokking
from explaind.errors import InputError, ReconstructionError
from explaind.models import TRANSFORMER_COMPONENTS, ModAddTransformer
from explaind.training import TransformerConfig, train_transformer

TINY = TransformerConfig(p=7, train_size=15, val_size=10, d_model=8, n_heads=2, d_mlp=16, lr=1e-2,
                         max_steps=6, seed=0)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("grokking") / "history"
    result = train_transformer(TINY, history_dir=path, progress=False)
    return History(path), result


def fresh_model(config: TransformerConfig) -> ModAddTransformer:
    torch.manual_seed(config.seed)
    return ModAddTransformer(config.p, config.d_model, config.n_heads, config.d_mlp).double()


# --- Fourier ------------------------------------------------------------------------------


def direct_power(values: np.ndarray) -> np.ndarray:
    """|Σ_a v_a e^{-2πika/p}|² per frequency k = 0 … p−1, summed over columns, folded k ~ p−k."""
    p = len(values)
    a = np.arange(p)
    full = np.array([(np.abs(np.exp(-2j * np.pi * k * a / p) @ values) ** 2).sum() for k in range(p)])
    folded = np.array([full[k] + (full[p - k] if 0 < k and p - k != k else 0.0) for k in range(p // 2 + 1)])
    return folded / folded.sum()


def test_a_cyclic_signal_has_all_its_power_at_its_frequency():
    p, a = 13, np.arange(13)
    signal = np.stack([np.cos(2 * np.pi * 3 * a / p), 2 * np.sin(2 * np.pi * 3 * a / p)], 1)
    power = grokking.fourier_power(signal)
    assert power.shape == (7,)
    np.testing.assert_allclose(power, np.eye(7)[3], atol=1e-12)
    assert grokking.key_frequencies(power, 1) == [3]


@pytest.mark.parametrize("p", [12, 13])
def test_fourier_power_equals_the_direct_sum(p):
    rng = np.random.default_rng(p)
    values = rng.normal(size=(p, 3)) + 1.5  # a constant part, every frequency, the Nyquist one for even p
    np.testing.assert_allclose(grokking.fourier_power(values), direct_power(values), rtol=1e-12)
    np.testing.assert_allclose(grokking.fourier_power(torch.tensor(values)), direct_power(values), rtol=1e-12)


def test_constant_plus_cosine_splits_two_to_one():
    p, a = 11, np.arange(11)
    power = grokking.fourier_power(1 + np.cos(2 * np.pi * 2 * a / p))
    np.testing.assert_allclose(power[[0, 2]], [2 / 3, 1 / 3], rtol=1e-12)
    assert grokking.key_frequencies(power, 2)[0] == 2  # the constant is never a key frequency


def test_embedding_spectra_read_the_residue_rows(tiny_run):
    history, _ = tiny_run
    params = history.params(history.n_steps)
    spectra = grokking.embedding_spectra(params, TINY.p)
    np.testing.assert_allclose(spectra["embedding"], direct_power(params["embed.weight"][:TINY.p].numpy()), rtol=1e-12)
    np.testing.assert_allclose(spectra["unembedding"], direct_power(params["unembed.weight"][:TINY.p].numpy()), rtol=1e-12)
    over = grokking.spectra_over_training(history, [0, 3, 6], TINY.p, progress=False)
    np.testing.assert_allclose(over.sel(step=6, matrix="embedding"), spectra["embedding"])
    assert over.sizes == {"step": 3, "matrix": 2, "frequency": TINY.p // 2 + 1}


def test_a_cyclic_kernel_has_a_cyclic_residue_profile():
    p, f = 11, 4
    rng = np.random.default_rng(0)
    train_r, test_r = rng.integers(0, p, 200), rng.integers(0, p, 30)
    kernel = np.cos(2 * np.pi * f * (train_r[:, None] - test_r[None, :]) / p)
    profile = grokking.residue_profile(kernel, train_r, test_r, p)
    np.testing.assert_allclose(profile, np.cos(2 * np.pi * f * np.arange(p) / p), atol=1e-12)
    np.testing.assert_allclose(grokking.fourier_power(profile), np.eye(p // 2 + 1)[f], atol=1e-12)


def test_residue_profile_is_the_mean_by_difference():
    scores = np.array([[1.0, 2.0], [3.0, 5.0], [7.0, 11.0]])
    train_r, test_r = np.array([0, 1, 2]), np.array([0, 2])
    # differences (train - test) mod 3: [[0, 1], [1, 2], [2, 0]]
    np.testing.assert_allclose(grokking.residue_profile(scores, train_r, test_r, 3), [6.0, 2.5, 6.0])
    assert np.isnan(grokking.residue_profile(scores[:1, :1], train_r[:1], test_r[:1], 3)[1])


# --- the task's structure -----------------------------------------------------------------


def test_relations_and_their_influence_match_a_direct_loop():
    p = 7
    train = np.array([[3, 1], [4, 0], [5, 3], [6, 2], [2, 2], [6, 5]])
    test = np.array([[3, 1], [5, 6]])
    relation = grokking.relations(train, test, p)
    for k, x in itertools.product(range(len(train)), range(len(test))):
        (a, b), (c, d) = train[k], test[x]
        if {a, b} == {c, d}:
            expected = "same pair"
        elif (a + b) % p == (c + d) % p:
            expected = "same sum"
        elif {a, b} & {c, d}:
            expected = "shared operand"
        else:
            expected = "other"
        assert grokking.RELATIONS[relation[k, x]] == expected, (train[k], test[x])
    scores = np.arange(12, dtype=float).reshape(6, 2) - 5.0
    table = grokking.influence_by_relation(scores, relation).set_index("relation")
    for name in grokking.RELATIONS:
        mask = relation == grokking.RELATIONS.index(name)
        assert table.loc[name, "pairs_fraction"] == mask.mean()
        assert table.loc[name, "positive_share"] == pytest.approx(scores[mask].clip(0).sum() / scores.clip(0).sum())
        assert table.loc[name, "absolute_share"] == pytest.approx(np.abs(scores[mask]).sum() / np.abs(scores).sum())
    assert table["positive_share"].sum() == pytest.approx(1.0) and table["negative_share"].sum() == pytest.approx(1.0)


def window_cube(seed: int = 0) -> xr.Dataset:
    """A data_attribution cube by hand: windows 0-10 and 40-60, the training pairs 4, 1, 3 of
    a training set of five, two explained pairs."""
    rng = np.random.default_rng(seed)
    return xr.Dataset({"attribution": (("step", "train", "test"), rng.normal(size=(2, 3, 2))),
                       "carried": (("step", "test"), [[0.0, 0.0], [0.5, -2.0]])},
                      coords={"step": [0, 40], "step_stop": ("step", [10, 60]), "train": [4, 1, 3], "test": [0, 1]})


def test_carried_share_is_the_largest_inputs_unsplit_part():
    cube = window_cube()
    split = np.abs(cube["attribution"].values).sum(1)  # [window, input]
    expected = [0.0, max(0.5 / (split[1, 0] + 0.5), 2.0 / (split[1, 1] + 2.0))]
    np.testing.assert_allclose(grokking.carried_share(cube), expected, rtol=1e-15)


def test_data_structure_indexes_the_cubes_training_pairs_per_window():
    p, cube = 7, window_cube()
    train_pairs = np.array([[0, 1], [3, 4], [6, 6], [2, 5], [1, 2]])  # the whole training set
    train_residues = train_pairs.sum(1) % p
    test_pairs = np.array([[1, 2], [5, 2]])
    test_residues = test_pairs.sum(1) % p
    phases = pd.DataFrame({"phase": [1, 2], "start": [0, 30], "stop": [30, 60]})
    structure = grokking.data_structure(cube, train_pairs, train_residues, test_pairs, test_residues, p, phases)
    assert structure.labels == ["phase 1 (steps 0-10)", "phase 2 (steps 40-60)"]
    assert structure.phases.tolist() == [1, 2]
    np.testing.assert_array_equal(structure.carried_share, grokking.carried_share(cube))
    # the cube's rows are training pairs 4 = (1, 2), 1 = (3, 4) and 3 = (2, 5), by hand against
    # the explained (1, 2) and (5, 2): the same pair, a shared 2; neither; the sum 0; a shared 2, the same pair
    relation = np.array([["same pair", "shared operand"], ["other", "same sum"], ["shared operand", "same pair"]])
    for b, label in enumerate(structure.labels):
        scores = cube["attribution"].values[b]
        table = structure.by_relation[structure.by_relation["bin"] == label].set_index("relation")
        for name in grokking.RELATIONS:
            mask = relation == name
            assert table.loc[name, "pairs_fraction"] == mask.mean()
            assert table.loc[name, "mean_score"] == pytest.approx(scores[mask].mean())
            assert table.loc[name, "positive_share"] == pytest.approx(scores[mask].clip(0).sum() / scores.clip(0).sum())
        profile = np.full(p, np.nan)
        for delta in range(p):
            hits = [scores[k, x] for k, i in enumerate([4, 1, 3]) for x in range(2)
                    if (train_residues[i] - test_residues[x]) % p == delta]
            if hits:
                profile[delta] = np.mean(hits)
        np.testing.assert_allclose(structure.profiles[label], profile, rtol=1e-14)
        np.testing.assert_allclose(structure.spectra[label], grokking.fourier_power(np.nan_to_num(profile)), rtol=1e-14)
    same_sum = structure.same_sum()
    assert same_sum["bin"].tolist() == structure.labels


def test_decay_trend_averages_the_first_and_last_steps_within_the_run():
    updates = pd.DataFrame({"step": range(5), "decay_share": [0.1, 0.3, 0.5, 0.6, 0.9]})
    trend = grokking.decay_trend(updates, early=2, late=3)
    assert (trend.early_steps, trend.late_steps) == (2, 3)
    assert trend.early == pytest.approx(0.2) and trend.late == pytest.approx(2.0 / 3)
    whole = grokking.decay_trend(updates)  # windows longer than the run: the whole run
    assert (whole.early_steps, whole.late_steps) == (5, 5) and whole.early == whole.late == pytest.approx(0.48)


def test_key_frequency_power_sums_the_final_embeddings_strongest_frequencies():
    power = np.array([[[0.4, 0.1, 0.3, 0.2], [0.1, 0.2, 0.3, 0.4]],  # step 0: embedding, unembedding
                      [[0.1, 0.5, 0.1, 0.3], [0.0, 0.1, 0.6, 0.3]]])  # the final step
    spectra = xr.DataArray(power, dims=("step", "matrix", "frequency"),
                           coords={"step": [0, 10], "matrix": ["embedding", "unembedding"], "frequency": range(4)})
    keys, key_power = grokking.key_frequency_power(spectra, 2)
    assert keys == {"embedding": [1, 3], "unembedding": [2, 3]}  # frequency 0 (the constant) never counts
    np.testing.assert_allclose(key_power.transpose("step", "matrix").values,
                               [[0.1 + 0.2, 0.2 + 0.4], [0.5 + 0.3, 0.1 + 0.3]], rtol=1e-15)


def synthetic_summary() -> grokking.GrokkingSummary:
    """Every measurement of the stage by hand, on a 100-step run with phases 0-10, 10-50, 50-100."""
    marks = {"t_mem": 12.0, "t_val_50": 80.0, "t_val_95": np.nan}
    phases = pd.DataFrame({"phase": [1, 2, 3], "start": [0, 10, 50], "stop": [10, 50, 100],
                           "leader": ["unembedding", "attention", "embedding"]})
    bins = {"step": [0, 10, 20, 50], "step_stop": ("step", [10, 20, 50, 100])}
    labels = ["phase 1 (steps 0-10)", "phase 2 (steps 20-30)", "phase 3 (steps 60-70)"]
    by_relation = pd.concat([pd.DataFrame({"relation": list(grokking.RELATIONS), "pairs_fraction": [0.1, 0.2, 0.3, 0.4],
                                           "positive_share": [0.0, share, 0.0, 1 - share], "bin": label})
                             for label, share in zip(labels, [0.25, 0.5, 0.75])], ignore_index=True)
    structure = grokking.DataStructure(labels, np.array([1, 2, 3]), np.array([0.0, 0.125, 0.5]), by_relation, {}, {})
    swap = grokking.swap_summary(pd.DataFrame({"step": [0, 50, 100], "variant": "outer layers", "original_acc": 0.0,
                                               "swapped_acc": [0.0, 0.125, 0.96], "gain": [0.0, 0.125, 0.0]}), 0.95)
    retraining = pd.DataFrame({"variant": ["scratch", "pipeline"], "checkpoint": [np.nan, 40.0], "seeds": [2, 2],
                               "reached": [0.0, 1.0], "median_steps_to_target": [np.nan, 30.0]})
    return grokking.GrokkingSummary(
        label="Transformer (addition mod 7)", n_steps=100, marks=marks, phases=phases,
        nearest=grokking.nearest_boundaries([10, 50], marks),
        findings=pd.DataFrame({"claim": ["a claim"], "ours": ["a measurement"], "holds": [False]}),
        decay_share=xr.DataArray([0.1, 0.2, 0.4, 0.5], dims="step", coords=bins), component_residual=1e-9,
        bin_errors=pd.DataFrame({"step": [0, 10, 20, 50], "max_change": [1.0, 7.5, 2.0, 1.0],
                                 "relative": [0.1, 0.2, 0.05, 0.0]}),
        net_change=3.25, spikes=[60], updates=grokking.DecayTrend(10, 0.01, 100, 0.3),
        windows=[(0, 10), (20, 30), (60, 70)], data=structure, data_residual=2e-8,
        kernel_frequencies={label: [k, 1] for label, k in zip(labels, [3, 2, 5])},
        keys={"embedding": [2, 5], "unembedding": [5, 2]},
        key_power=xr.DataArray([[0.1, 0.2], [0.9, 0.8]], dims=("step", "matrix"),
                               coords={"step": [0, 100], "matrix": ["embedding", "unembedding"]}),
        swap=swap, retraining=retraining, target=0.95, max_steps=40)


def test_the_metrics_report_each_measurement():
    metrics = grokking.metrics(synthetic_summary())
    # step-weighted: phase 2 holds bins 10-20 (share 0.2) and 20-50 (share 0.4)
    assert metrics["mean_decay_share_per_phase"] == pytest.approx({"phase_1": 0.1, "phase_2": 0.35, "phase_3": 0.5})
    assert metrics["bin_relative_residual"] == pytest.approx({"median": 0.075, "max": 0.2})
    assert metrics["boundary_to_milestone_ratio"]["t_mem"] == pytest.approx(10 / 12)
    assert np.isnan(metrics["boundary_to_milestone_ratio"]["t_val_95"])
    assert metrics["paper_claims_hold"] == {"a claim": False}
    data = metrics["data_attribution"]
    assert data["windows"] == {"phase_1": [0, 10], "phase_2": [20, 30], "phase_3": [60, 70]}
    assert data["carried_share"] == {"phase_1": 0.0, "phase_2": 0.125, "phase_3": 0.5}
    assert data["same_sum_positive_share"] == {"phase_1": 0.25, "phase_2": 0.5, "phase_3": 0.75}
    assert data["same_sum_pairs_fraction"] == 0.2
    assert data["kernel_top_frequency"] == {"phase_1": 3, "phase_2": 2, "phase_3": 5}
    assert metrics["key_frequency_power_final"] == {"embedding": 0.9, "unembedding": 0.8}
    assert metrics["swap"]["outer layers"] == {"max_gain": 0.125, "max_gain_step": 50, "first_step_at_target": 100.0}
    assert metrics["retraining"]["pipeline@40"] == {"median_steps_to_target": 30.0, "reached": 1.0}
    assert np.isnan(metrics["retraining"]["scratch"]["median_steps_to_target"])


def test_the_conclusion_states_each_measurement():
    lines = grokking.conclusion(synthetic_summary())
    assert lines[0] == ("Run: Transformer (addition mod 7), 100 steps; memorised (100% training accuracy) at step 12, "
                        "50% / 95% validation accuracy at steps 80 / not reached.")
    assert lines[1] == ("Phases (rule of section 3): phase 1 steps 0-10 led by unembedding; phase 2 steps 10-50 led by "
                        "attention; phase 3 steps 50-100 led by embedding.")
    assert "t_mem 12 -> 10 (ratio 0.83)" in lines[2] and "t_val_95 not reached -> not reached" in lines[2]
    assert lines[3] == "Paper: a claim. Ours: a measurement. Does NOT hold."
    assert lines[4] == ("Data attribution: same-sum training pairs carry 25.0% of the positive influence in phase 1 "
                        "(steps 0-10); 50.0% of the positive influence in phase 2 (steps 20-30); 75.0% of the positive "
                        "influence in phase 3 (steps 60-70) (they are 20.0% of the pairs).")
    assert lines[6] == ("Swap: the final outer layers around the step-i pipeline gain at most 12.5% validation accuracy "
                        "(at step 50); the swapped model first reaches 95% at step 100, the original run at not reached.")
    assert lines[7] == "Retraining from scratch: steps to 95%, median not reached (0% of 2 seeds within 40 steps)."
    assert lines[8] == "Retraining pipeline copied from step 40: steps to 95%, median 30 (100% of 2 seeds within 40 steps)."
    assert lines[9] == ("Beyond the paper: training-loss spikes (x10 within one step) at steps [60]; inside single step bins "
                        "the true-class log-probability swings by up to 7.5 (bin from step 10), against a net change of "
                        "at most 3.2 over the run; weight decay's share of the parameter updates goes from 0.010 (first "
                        "10 steps) to 0.300 (last 100).")


# --- step bins and phases -----------------------------------------------------------------


def test_log_step_edges():
    np.testing.assert_array_equal(grokking.log_step_edges(12, 6), [0, 1, 2, 3, 4, 7, 12])
    edges = grokking.log_step_edges(1929, 40)
    assert edges[0] == 0 and edges[-1] == 1929 and np.all(np.diff(edges) > 0) and len(edges) <= 41
    with pytest.raises(InputError, match="at least one bin"):
        grokking.log_step_edges(10, 0)
    with pytest.raises(InputError, match="one step, got step_bins=5, n_steps=0"):  # not numpy's geomspace error
        grokking.log_step_edges(0, 5)


def test_segment_finds_the_change_points_of_a_piecewise_constant_series():
    rng = np.random.default_rng(1)
    levels = [np.array([0.1, 0.8]), np.array([0.6, 0.3]), np.array([0.2, 0.2])]
    series = np.concatenate([np.tile(level, (n, 1)) for level, n in zip(levels, (5, 7, 4))])
    assert grokking.segment(series + rng.normal(0, 0.01, series.shape), 3) == [0, 5, 12]
    assert grokking.segment(series, 2) == [0, 5]


def brute_force_segmentation(x: np.ndarray, k: int, min_size: int, w: np.ndarray) -> list[int]:
    def sse(i, j):
        mean = np.average(x[i:j], axis=0, weights=w[i:j])
        return float((w[i:j, None] * (x[i:j] - mean) ** 2).sum())

    best, best_starts = np.inf, None
    for cuts in itertools.combinations(range(1, len(x)), k - 1):
        bounds = [0, *cuts, len(x)]
        if min(np.diff(bounds)) < min_size:
            continue
        cost = sum(sse(i, j) for i, j in zip(bounds[:-1], bounds[1:]))
        if cost < best - 1e-12:
            best, best_starts = cost, [0, *cuts]
    return best_starts


@pytest.mark.parametrize("seed", range(4))
def test_segment_is_the_least_squares_optimum(seed):
    rng = np.random.default_rng(seed)
    x, w = rng.normal(size=(11, 3)), rng.uniform(0.1, 10, 11)
    for k, min_size in ((2, 1), (3, 2), (4, 1)):
        assert grokking.segment(x, k, min_size) == brute_force_segmentation(x, k, min_size, np.ones(11))
        assert grokking.segment(x, k, min_size, w) == brute_force_segmentation(x, k, min_size, w)


def test_segment_ties_to_the_earliest_split():
    """A constant series costs 0 however it is cut: the earliest starts win, as documented."""
    assert grokking.segment(np.zeros((4, 1)), 2) == [0, 1]
    assert grokking.segment(np.ones((6, 2)), 3, 2) == [0, 2, 4]
    assert grokking.segment(np.zeros((5, 1)), 2, 2) == [0, 2]


def test_segment_refuses_impossible_requests():
    with pytest.raises(InputError, match="cannot split 4 step bins into 3 phases of at least 2"):
        grokking.segment(np.zeros((4, 2)), 3, 2)
    with pytest.raises(InputError, match="4 positive numbers"):
        grokking.segment(np.zeros((4, 2)), 2, 1, np.array([1.0, 0.0, 1.0, 1.0]))


def test_phases_weigh_each_step_once():
    """Six one-step bins that flip back and forth, then two long bins that differ a little: by
    bins the split falls among the short ones, by steps between the long ones."""
    rows = [[1.0, 0.0], [0.0, 1.0]] * 3 + [[0.5, 0.5], [0.6, 0.4]]
    edges = np.array([0, 1, 2, 3, 4, 5, 6, 506, 1006])
    shares = xr.DataArray(np.array(rows), dims=("step", "component"),
                          coords={"step": edges[:-1], "step_stop": ("step", edges[1:]),
                                  "component": ["attention", "unembedding"]})
    assert grokking.segment(shares.values, 2) != [0, 7]
    phases = grokking.detect_phases(shares, 2)
    assert phases["start"].tolist() == [0, 506] and phases["stop"].tolist() == [506, 1006]
    # step-weighted means: the first phase is mostly its long bin
    assert phases.loc[0, "share_attention"] == pytest.approx((3 * 1.0 + 500 * 0.5) / 506)


def synthetic_shares() -> xr.DataArray:
    components = ["embedding", "attention", "mlp_in", "mlp_out", "unembedding"]
    rows = ([[0.1, 0.1, 0.1, 0.1, 0.6]] * 3 + [[0.1, 0.4, 0.3, 0.1, 0.1], [0.1, 0.3, 0.4, 0.1, 0.1]] * 2
            + [[0.3, 0.1, 0.05, 0.2, 0.35]] * 3)
    edges = np.arange(0, 110, 10)  # equal widths: every bin weighs the same
    return xr.DataArray(np.array(rows), dims=("step", "component"),
                        coords={"step": edges[:-1], "step_stop": ("step", edges[1:]), "component": components})


def test_detect_phases_and_the_paper_findings_on_synthetic_shares():
    shares = synthetic_shares()
    phases = grokking.detect_phases(shares, 3, min_bins=2)
    assert phases[["start", "stop", "bins", "leader"]].values.tolist() == [
        [0, 30, 3, "unembedding"], [30, 70, 4, "attention"], [70, 100, 3, "unembedding"]]
    assert phases.loc[1, "share_mlp_in"] == pytest.approx(0.35)
    leaders = grokking.bin_leaders(shares)
    assert leaders.tolist()[3:7] == ["attention", "mlp_in", "attention", "mlp_in"]
    np.testing.assert_array_equal(grokking.phase_of([0, 29, 30, 69, 70, 1000], phases), [1, 1, 2, 2, 3, 3])
    decay = xr.DataArray(np.r_[np.zeros(7), np.ones(3)] * 0.2, dims="step",
                         coords={"step": shares["step"], "step_stop": shares["step_stop"]})
    findings = grokking.paper_findings(phases, shares, decay)
    assert findings["holds"].tolist() == [True, True, True, True]
    assert "3 switches" in findings.loc[1, "ours"]
    assert findings.loc[2, "ours"] == "outer share 0.300 in phase 2 (its bins spread ±0.000), 0.850 in phase 3"
    assert grokking.paper_findings(phases, shares, 0.2 - decay)["holds"].tolist() == [True, True, True, False]
    # phase 2 (bins 3-6) swings 0.49 / 0.54: mean 0.515, standard deviation 0.025
    for phase_3, holds in ((0.53, False), (0.545, True)):
        noisy = decay.copy(data=[0.3] * 3 + [0.49, 0.54] * 2 + [phase_3] * 3)
        row = grokking.paper_findings(phases, shares, noisy).loc[3]
        assert row["holds"] == holds and row["ours"] == f"decay share 0.515 in phase 2 (its bins spread ±0.025), {phase_3:.3f} in phase 3"
    # the outer layers by the same rule: phase 2's outer share swings 0.25 / 0.35 (± 0.05 in the
    # embedding, leaders unchanged); phase 3's (embedding e + 0.2) rises by 0.04 or by 0.06
    for embedding, holds in ((0.14, False), (0.16, True)):
        swinging = shares.copy()
        swinging.loc[{"component": "embedding"}] = [0.1] * 3 + [0.05, 0.15] * 2 + [embedding] * 3
        swinging.loc[{"component": "mlp_out"}] = [0.1] * 10
        swinging.loc[{"component": "unembedding"}] = [0.6] * 3 + [0.1] * 7
        row = grokking.paper_findings(phases, swinging, decay).loc[2]
        assert row["holds"] == holds and row["ours"] == f"outer share 0.300 in phase 2 (its bins spread ±0.050), {embedding + 0.2:.3f} in phase 3"
    # a phase 2 of one bin has no bin-to-bin spread to judge a rise by: neither rise holds
    one_bin = grokking.paper_findings(phases.assign(start=[0, 60, 70]), shares, decay)
    assert one_bin["holds"].tolist()[2:] == [False, False]
    assert one_bin.loc[3, "ours"] == "decay share 0.000 in phase 2 (1 bin(s): its spread unknown), 0.200 in phase 3"
    with pytest.raises(InputError, match="step_stop"):
        grokking.detect_phases(shares.drop_vars("step_stop"), 3)


def test_the_paper_findings_weigh_bins_by_their_steps_and_leave_out_bins_without_a_share():
    """Hand-derived: phase 2's decay shares 0.1, 0.9, 0.5 over 10, 10 and 80 steps (and a bin of
    no change, NaN) have the step-weighted mean 0.5 and spread √0.032 = 0.179; phase 3's 0.4, 0.8
    over 50 and 150 steps mean 0.7, a rise of 0.2 that exceeds it. Unweighted, the rise (0.1)
    would stay within the spread (0.327)."""
    edges = np.array([0, 30, 40, 50, 130, 140, 190, 340])
    coords = {"step": edges[:-1], "step_stop": ("step", edges[1:])}
    decay = xr.DataArray([0.0, 0.1, 0.9, 0.5, np.nan, 0.4, 0.8], dims="step", coords=coords)
    rows = [[0.1, 0.1, 0.5, 0.1, 0.1]] * 4 + [[np.nan] * 5] + [[0.1, 0.5, 0.1, 0.1, 0.1]] * 2
    shares = xr.DataArray(rows, dims=("step", "component"),
                          coords={**coords, "component": ["embedding", "attention", "mlp_in", "mlp_out", "unembedding"]})
    phases = pd.DataFrame({"phase": [1, 2, 3], "start": [0, 30, 140], "stop": [30, 140, 340],
                           "leader": ["mlp_in", "mlp_in", "attention"], "share_unembedding": [0.1] * 3})
    findings = grokking.paper_findings(phases, shares, decay)
    assert findings.loc[3, "ours"] == "decay share 0.500 in phase 2 (its bins spread ±0.179), 0.700 in phase 3"
    assert findings.loc[2, "ours"] == "outer share 0.300 in phase 2 (its bins spread ±0.000), 0.300 in phase 3"
    assert findings["holds"].tolist() == [False, False, False, True]
    with pytest.raises(InputError, match="decay_share must be an xarray.DataArray over .'step'. with the bins' `step_stop`"):
        grokking.paper_findings(phases, shares, decay.drop_vars("step_stop"))
    with pytest.raises(InputError, match="shares must be an xarray.DataArray.*got Series.*component_shares"):
        grokking.paper_findings(phases, grokking.bin_leaders(shares), decay)
    with pytest.raises(InputError, match="different step bins"):
        grokking.paper_findings(phases, shares, decay.assign_coords(step=decay["step"] + 1))
    with pytest.raises(InputError, match="different step bins"):
        grokking.paper_findings(phases, shares, decay.assign_coords(step_stop=("step", edges[1:] + 1)))
    with pytest.raises(InputError, match=r"shares lack the components \['mlp_out'\].*component_attribution"):
        grokking.paper_findings(phases, shares.drop_sel(component="mlp_out"), decay)
    # the bin without a share leads nothing: phase 2's 3 bins with a share are all mlp_in's
    assert findings.loc[1, "ours"] == "they lead 3 of 3 bins, 0 switches between them"


def test_milestones_and_nearest_boundaries():
    log = pd.DataFrame({"step": range(6), "train_acc": [0, 0.5, 1, 1, 1, 1], "val_acc": [0, 0, 0.1, 0.5, 0.9, 0.96]})
    marks = grokking.milestones(log)
    assert marks == {"t_mem": 2.0, "t_val_50": 3.0, "t_val_95": 5.0}
    near = grokking.nearest_boundaries([4, 40], marks | {"never": float("nan")}).set_index("milestone")
    assert near.loc["t_mem", "boundary"] == 4 and near.loc["t_mem", "ratio"] == 2.0
    assert near.loc["t_val_95", "boundary"] == 4 and np.isnan(near.loc["never", "boundary"])
    # nearest in log steps: 20 is a factor 2 from 10 (|log 20 − log 10| = 0.69), 4 a factor 2.5 (0.92),
    # though 4 is nearer on the linear scale
    near = grokking.nearest_boundaries([4, 20], {"t": 10.0}).set_index("milestone")
    assert near.loc["t", "boundary"] == 20 and near.loc["t", "ratio"] == 2.0


def test_data_windows():
    phases = pd.DataFrame({"start": [0, 30, 200], "stop": [30, 200, 1000]})
    assert grokking.data_windows(phases, 40, "middle") == [(0, 30), (95, 135), (580, 620)]
    assert grokking.data_windows(phases, 40, "start") == [(0, 30), (30, 70), (200, 240)]
    assert grokking.data_windows(phases, 40, "end") == [(0, 30), (160, 200), (960, 1000)]
    assert grokking.data_windows(phases, 0) == [(0, 30), (30, 200), (200, 1000)]
    with pytest.raises(InputError, match="start, middle or end"):
        grokking.data_windows(phases, 40, "late")


def test_checkpoint_steps():
    assert grokking.checkpoint_steps(25, 10) == [0, 10, 20, 25]
    assert grokking.retraining_checkpoints(1929, 3) == [643, 1286, 1929]
    with pytest.raises(InputError, match="checkpoint_every"):
        grokking.checkpoint_steps(25, 0)


# --- decay share of the updates -----------------------------------------------------------


def test_decay_share_of_updates_matches_the_recorded_parameters(tiny_run):
    history, _ = tiny_run
    frame = grokking.decay_share_of_updates(history, progress=False)
    assert len(frame) == history.n_steps
    step = TINY.lr * TINY.weight_decay
    for s in (0, history.n_steps - 1):
        before, after = (history.layout.flatten(history.params(t)) for t in (s, s + 1))
        decay = float((step * before).norm())
        rest = float((after - before + step * before).norm())
        row = frame.iloc[s]
        assert row["decay_norm"] == pytest.approx(decay, rel=1e-12)
        assert row["gradient_norm"] == pytest.approx(rest, rel=1e-12)
        assert row["decay_share"] == pytest.approx(decay / (decay + rest), rel=1e-12)


# --- swap ---------------------------------------------------------------------------------


def test_splice_and_swap_equal_a_manual_state_dict_splice(tiny_run):
    history, result = tiny_run
    early, final = history.params(2), history.params(history.n_steps)
    spliced = grokking.splice(early, final, ("unembedding", "mlp_out"))
    for name in early:
        from_final = name.startswith(("unembed.", "mlp.fc_out."))
        assert torch.equal(spliced[name], final[name] if from_final else early[name]), name

    from explaind.data import modular_addition

    data = modular_addition(TINY.p, TINY.train_size, TINY.val_size, TINY.data_seed)
    model = fresh_model(TINY)
    swap = grokking.swap_experiment(history, model, data.val_inputs, data.val_targets, [0, 2],
                                    {"unembedding + mlp_out": ("unembedding", "mlp_out")}, progress=False)
    manual = fresh_model(TINY)
    state = {**early, **{k: v for k, v in final.items() if k.startswith(("unembed.", "mlp.fc_out."))}}
    manual.load_state_dict(state)
    with torch.no_grad():
        expected = (manual(data.val_inputs).argmax(-1) == data.val_targets).double().mean().item()
        manual.load_state_dict(early)
        original = (manual(data.val_inputs).argmax(-1) == data.val_targets).double().mean().item()
    row = swap.set_index("step").loc[2]
    assert row["swapped_acc"] == expected and row["original_acc"] == original
    assert row["gain"] == expected - original
    with pytest.raises(InputError, match="unknown components"):
        grokking.splice(early, final, ("unembed",))


def test_the_swap_takes_its_components_from_the_final_model(tiny_run):
    """Targets are the final model's own predictions on every token sequence: θ_i with every
    component from the final model is 100% accurate; the last checkpoint but one, 57 of the
    6,561 predictions off, would not be."""
    history, _ = tiny_run
    model = fresh_model(TINY)
    tokens = torch.tensor(list(itertools.product(range(TINY.p + 2), repeat=4)))
    final = history.params(history.n_steps)
    with torch.no_grad():
        targets = torch.func.functional_call(model, final, (tokens,)).argmax(-1)
    everything = tuple(TRANSFORMER_COMPONENTS)
    swap = grokking.swap_experiment(history, model, tokens, targets, [0, 3], {"all": everything}, progress=False)
    assert swap["swapped_acc"].tolist() == [1.0, 1.0]
    for s, original in zip(swap["step"], swap["original_acc"]):
        with torch.no_grad():
            predicted = torch.func.functional_call(model, history.params(s), (tokens,)).argmax(-1)
        assert original == (predicted == targets).double().mean().item() < 1.0


def test_swap_summary():
    swap = pd.DataFrame({"step": [0, 10, 20] * 2, "variant": ["a"] * 3 + ["b"] * 3,
                         "original_acc": [0.0, 0.1, 0.9] * 2, "swapped_acc": [0.1, 0.97, 1.0, 0.0, 0.2, 0.9],
                         "gain": [0.1, 0.87, 0.1, 0.0, 0.1, 0.0]})
    summary = grokking.swap_summary(swap, 0.95).set_index("variant")
    assert summary.loc["a", "max_gain_step"] == 10 and summary.loc["a", "first_step_at_target"] == 10
    assert summary.loc["b", "max_gain"] == pytest.approx(0.1) and np.isnan(summary.loc["b", "first_step_at_target"])
    assert summary.loc["a", "mean_gain"] == pytest.approx((0.1 + 0.87 + 0.1) / 3, rel=1e-12)  # not the median 0.1
    assert summary.loc["b", "mean_gain"] == pytest.approx(0.1 / 3, rel=1e-12)
    # a swapped model exactly at the target reaches it
    exact = swap.assign(swapped_acc=[0.1, 0.5, 0.95, 0.0, 0.2, 0.9])
    assert grokking.swap_summary(exact, 0.95).set_index("variant").loc["a", "first_step_at_target"] == 20


# --- retraining ---------------------------------------------------------------------------


def test_retraining_starts_from_the_copied_part_and_a_fresh_init(tiny_run):
    history, _ = tiny_run
    checkpoint = history.params(history.n_steps)
    seed = 5
    state = grokking.retraining_state(checkpoint, grokking.PIPELINE, seed, reinit_std=0.0)
    start = train_transformer(dataclasses.replace(TINY, seed=seed, max_steps=0), progress=False,
                              initial_state=state).model.state_dict()
    fresh = fresh_model(dataclasses.replace(TINY, seed=seed)).state_dict()
    copied = set(grokking.component_tensors(list(checkpoint), grokking.PIPELINE))
    assert copied == {"attn.W_Q", "attn.W_K", "attn.W_V", "attn.W_O", "mlp.fc_in.weight", "mlp.fc_in.bias"}
    for name, value in start.items():
        expected = checkpoint[name] if name in copied else fresh[name]
        assert torch.equal(value, expected), name

    drawn = grokking.retraining_state(checkpoint, grokking.PIPELINE, seed, reinit_std=0.1)
    assert set(drawn) == set(checkpoint)
    others = torch.cat([drawn[n].flatten() for n in drawn if n not in copied])
    assert others.std().item() == pytest.approx(0.1, rel=0.1)
    assert torch.equal(drawn["attn.W_Q"], checkpoint["attn.W_Q"])
    reordered = grokking.retraining_state(dict(reversed(list(checkpoint.items()))), grokking.PIPELINE, seed, 0.1)
    assert all(torch.equal(reordered[name], drawn[name]) for name in drawn)  # the draws follow the names


def test_a_history_reads_its_tensors_in_name_order(tiny_run):
    history, _ = tiny_run  # safetensors' own order changes from process to process
    assert list(history.params(0)) == sorted(history.params(0)) == sorted(history.params(history.n_steps))


def test_retraining_from_scratch_is_training_from_scratch(tiny_run):
    history, _ = tiny_run
    row = grokking.retrain(TINY, history.params(3), "scratch", seed=2, max_steps=4, target=0.95,
                           dtype="float64", reinit_std=0.0)
    direct = train_transformer(dataclasses.replace(TINY, seed=2, max_steps=4, stop_val_acc=0.95), progress=False)
    assert row["steps_run"] == int(direct.log["step"].iloc[-1])
    assert row["final_val_acc"] == direct.log["val_acc"].iloc[-1]
    assert row["steps_to_target"] == direct.metrics["t_val_95"] or (
        np.isnan(row["steps_to_target"]) and np.isnan(direct.metrics["t_val_95"]) and not row["reached"])


def test_retraining_experiment_runs_every_point_and_scratch_once_per_seed(tiny_run):
    history, _ = tiny_run
    runs = grokking.retraining_experiment(TINY, history, [3, 6], ["pipeline", "attention"], [1, 2], max_steps=2,
                                          target=0.95, dtype="float32", reinit_std=0.0, progress=False)
    assert len(runs) == 2 * 2 * 2 + 2
    assert runs.loc[runs["variant"] == "scratch", "checkpoint"].isna().all()
    assert set(runs.loc[runs["variant"] == "pipeline", "checkpoint"]) == {3, 6}
    assert (runs["steps_run"] <= 2).all()
    summary = grokking.retraining_summary(runs)
    assert len(summary) == 2 * 2 + 1 and (summary["seeds"] == 2).all()


def test_each_retraining_job_copies_its_own_checkpoint(tiny_run, monkeypatch):
    """Every (variant, t, seed) job gets θ_t itself, not another checkpoint's parameters."""
    history, _ = tiny_run
    calls = []

    def spy(config, checkpoint, variant, seed, **options):
        calls.append((variant, seed, checkpoint))
        return {"variant": variant, "seed": seed}

    monkeypatch.setattr(grokking, "retrain", spy)
    runs = grokking.retraining_experiment(TINY, history, [2, 4], ["pipeline", "outer"], [7, 8], max_steps=1,
                                          target=0.9, dtype="float64", reinit_std=0.0, progress=False)
    copied = [(variant, t, seed) for t in (2, 4) for variant in ("pipeline", "outer") for seed in (7, 8)]
    assert [(v, s) for v, s, _ in calls] == [(v, s) for v, _, s in copied] + [("scratch", 7), ("scratch", 8)]
    for (_, t, _), (_, _, checkpoint) in zip(copied, calls):
        expected = history.params(t)
        assert all(torch.equal(checkpoint[name], expected[name]) for name in expected), t
    assert runs["checkpoint"].tolist()[:8] == [t for _, t, _ in copied] and runs["checkpoint"][8:].isna().all()


def test_a_retraining_initialises_the_other_layers_with_its_seed(tiny_run, monkeypatch):
    """The model of retrain(..., seed=3) is that of training with seed 3 from the copied layers:
    its re-initialised layers differ from those of the run's own seed 0."""
    history, _ = tiny_run
    trained = []
    real = grokking.train_transformer

    def spy(config, **options):
        result = real(config, **options)
        trained.append(result.model)
        return result

    monkeypatch.setattr(grokking, "train_transformer", spy)
    grokking.retrain(TINY, history.params(4), "outer", 3, max_steps=2, target=0.95, dtype="float64", reinit_std=0.0)
    state = grokking.retraining_state(history.params(4), grokking.OUTER, 3, reinit_std=0.0)
    for seed, same in ((3, True), (0, False)):
        direct = real(dataclasses.replace(TINY, seed=seed, max_steps=2, stop_val_acc=0.95), progress=False,
                      initial_state=state).model
        equal = [torch.equal(p, q) for p, q in zip(trained[0].parameters(), direct.parameters())]
        assert all(equal) if same else not all(equal), seed


def test_retraining_in_worker_processes_gives_the_same_runs(tiny_run):
    history, _ = tiny_run
    options = dict(max_steps=3, target=0.95, dtype="float64", reinit_std=0.0, progress=False)
    one = grokking.retraining_experiment(TINY, history, [4], ["outer"], [1, 2], workers=1, **options)
    two = grokking.retraining_experiment(TINY, history, [4], ["outer"], [1, 2], workers=2, **options)
    pd.testing.assert_frame_equal(one, two)


def test_retraining_summary_counts_unreached_runs_as_slowest():
    runs = pd.DataFrame({"variant": ["pipeline"] * 3 + ["scratch"] * 2, "checkpoint": [10, 10, 10, np.nan, np.nan],
                         "seed": [0, 1, 2, 0, 1], "steps_to_target": [40, np.nan, 60, np.nan, np.nan],
                         "reached": [True, False, True, False, False]})
    summary = grokking.retraining_summary(runs).set_index("variant")
    assert summary.loc["pipeline", "median_steps_to_target"] == 60 and summary.loc["pipeline", "reached"] == pytest.approx(2 / 3)
    assert np.isnan(summary.loc["scratch", "median_steps_to_target"]) and summary.loc["scratch", "reached"] == 0


def test_the_retraining_claim_reads_the_pipeline_copied_last():
    summary = pd.DataFrame({"variant": ["pipeline", "pipeline", "outer"], "checkpoint": [100.0, 200.0, 200.0],
                            "seeds": [5, 5, 5], "reached": [1.0, 0.6, 1.0], "median_steps_to_target": [50.0, 180.0, 20.0]})
    row = grokking.retraining_finding(summary, max_steps=500)
    assert row["holds"] and "step 200: median 180 steps (60% of 5 seeds" in row["ours"]
    summary.loc[1, "median_steps_to_target"] = np.nan
    row = grokking.retraining_finding(summary, max_steps=500)
    assert not row["holds"] and "not reached within 500 steps" in row["ours"]
    with pytest.raises(InputError, match="add it to retrain_variants"):
        grokking.retraining_finding(summary[summary["variant"] == "outer"], max_steps=500)


@pytest.mark.parametrize("variants", [("pipelin",), ("outer",)], ids=["typo", "no pipeline"])
def test_the_config_refuses_retraining_variants_before_the_stage_starts(variants):
    """Checked with the other ranges when the config is built, not at the stage's retraining cell."""
    with pytest.raises(InputError, match="(?s)grokking.retrain_variants is .*names from .*'pipeline'.*pipeline among them"):
        grokking.GrokkingConfig(retrain_variants=variants)


@pytest.mark.parametrize("p", [23, 24])
def test_the_config_refuses_counts_beyond_the_run(p):
    """Slicing would cap them silently: 11 validation pairs asked, 10 explained."""
    nonconstant = len(grokking.fourier_power(np.random.default_rng(0).normal(size=(p, 3)))) - 1
    config = grokking.GrokkingConfig(val_inputs=10, train_inputs=20, data_inputs=10, key_frequencies=nonconstant)
    config.check_run(p, train_pairs=20, val_pairs=10, n_steps=1000)
    assert len(set(grokking.key_frequencies(np.arange(nonconstant + 1.0), nonconstant))) == nonconstant
    for key, value, rule in (("val_inputs", 11, "at most 10 .the run's validation pairs"),
                             ("train_inputs", 21, "at most 20 .the run's training pairs"),
                             ("data_inputs", 11, "at most 10 .the run's validation pairs"),
                             ("key_frequencies", nonconstant + 1, f"at most {nonconstant} .the non-constant")):
        with pytest.raises(InputError, match=f"(?s)grokking.{key} is {value}, but it must be {rule}.*Fix: set "
                                             f"grokking.{key}"):
            dataclasses.replace(config, **{key: value}).check_run(p, train_pairs=20, val_pairs=10, n_steps=1000)


def test_the_config_refuses_phases_that_the_runs_merged_step_bins_cannot_hold():
    """1,842 steps in 40 log-spaced bins give 36 (edges that round to the same step merge): 3 phases
    of at least 13 bins pass the config's own check (39 <= 40) but not the run's, which refuses them
    before the component attribution rather than in detect_phases after it."""
    bins = len(grokking.log_step_edges(1842, 40)) - 1
    assert bins == 36
    counts = dict(p=23, train_pairs=20, val_pairs=10, n_steps=1842)
    config = grokking.GrokkingConfig(val_inputs=10, train_inputs=4, data_inputs=8, step_bins=40, phases=3,
                                     min_phase_bins=13)
    with pytest.raises(InputError, match=r"(?s)grokking.phases is 3, but it must be .*\(3 x 13\) is at most the 36 step "
                                         r"bins that step_bins=40 yields over the run's 1842 update steps.*raise step_bins"):
        config.check_run(**counts)
    dataclasses.replace(config, phases=1, min_phase_bins=bins).check_run(**counts)
    with pytest.raises(InputError, match="at most the 36 step bins"):
        dataclasses.replace(config, phases=1, min_phase_bins=bins + 1).check_run(**counts)
    dataclasses.replace(config, min_phase_bins=12).check_run(**counts)  # 3 x 12 = 36
    with pytest.raises(InputError, match="grokking.phases is 3"):  # a short run merges more
        dataclasses.replace(config, min_phase_bins=3).check_run(**{**counts, "n_steps": 8})


def test_the_config_refuses_more_retraining_checkpoints_than_the_run_has_steps():
    config = grokking.GrokkingConfig(val_inputs=10, train_inputs=4, data_inputs=8, step_bins=6, min_phase_bins=1,
                                     retrain_checkpoints=5)
    config.check_run(23, train_pairs=20, val_pairs=10, n_steps=5)
    with pytest.raises(InputError, match=r"grokking.retrain_checkpoints is 5, but it must be at most 4 "):
        config.check_run(23, train_pairs=20, val_pairs=10, n_steps=4)


def test_retraining_checkpoints_are_distinct_and_never_step_0():
    """As the docstring says: `count` checkpoints after step 0, ending at the last step."""
    for n_steps in range(1, 30):
        for count in range(1, n_steps + 1):
            steps = grokking.retraining_checkpoints(n_steps, count)
            assert len(steps) == count and steps[0] >= 1 and steps[-1] == n_steps, (n_steps, count, steps)
    with pytest.raises(InputError, match="retrain_checkpoints=3 exceeds the run's 1 update steps"):
        grokking.retraining_checkpoints(1, 3)  # rounding gave [0, 1]: step 0 and one checkpoint short
    with pytest.raises(InputError, match="retrain_checkpoints=6 exceeds the run's 5 update steps"):
        grokking.retraining_checkpoints(5, 6)  # rounding gave five of six


def test_the_config_refuses_a_repeated_retraining_variant(tiny_run):
    """A repeat would run its jobs twice and report every seed twice."""
    with pytest.raises(InputError, match="(?s)grokking.retrain_variants is .*each at most once"):
        grokking.GrokkingConfig(retrain_variants=("pipeline", "pipeline"))
    history, _ = tiny_run
    with pytest.raises(InputError, match=r"retraining variants \['pipeline'\] are given more than once"):
        grokking.retraining_experiment(TINY, history, [1], ["pipeline", "outer", "pipeline"], [0], max_steps=1,
                                       target=0.9, dtype="float32", reinit_std=0)


def test_the_config_refuses_more_quadrature_nodes_than_explain_takes():
    """explain refuses them (quadrature.nodes) only once the stage has started."""
    from explaind.quadrature import MAX_NODES

    grokking.GrokkingConfig(quadrature=MAX_NODES)
    with pytest.raises(InputError, match=f"grokking.quadrature is {MAX_NODES + 1}, but it must be at least 1 and at "
                                         f"most {MAX_NODES} .each node is one Jacobian pass per step"):
        grokking.GrokkingConfig(quadrature=MAX_NODES + 1)


def test_retraining_refuses_bad_requests(tiny_run):
    history, _ = tiny_run
    with pytest.raises(InputError, match="unknown retraining variant 'pipe'"):
        grokking.retrain(TINY, history.params(1), "pipe", 0, max_steps=1, target=0.9, dtype="float32", reinit_std=0)
    with pytest.raises(InputError, match="unknown retraining variants"):
        grokking.retraining_experiment(TINY, history, [1], ["outer", "mlp"], [0], max_steps=1, target=0.9,
                                       dtype="float32", reinit_std=0)
    with pytest.raises(InputError, match="retrain_workers is -1"):
        grokking.retraining_experiment(TINY, history, [1], ["outer"], [0], max_steps=1, target=0.9,
                                       dtype="float32", reinit_std=0, workers=-1)
    with pytest.raises(InputError, match="retrain_dtype 'float16'"):
        grokking.retrain(TINY, history.params(1), "outer", 0, max_steps=1, target=0.9, dtype="float16", reinit_std=0)
    with pytest.raises(InputError, match="not parameters of the model"):
        train_transformer(TINY, progress=False, initial_state={"embed": torch.zeros(1)})
    with pytest.raises(InputError, match="has shape"):
        train_transformer(TINY, progress=False, initial_state={"embed.weight": torch.zeros(3, 3)})


# --- attribution passes -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_data():
    from explaind.data import modular_addition

    return modular_addition(TINY.p, TINY.train_size, TINY.val_size, TINY.data_seed)


EXACT = dict(quadrature=4, breakpoints=True, tolerance=1e-6, progress=False)  # kinks located: exact up to ~1e-7

# The paper's components, written out by tensor name (the library's mapping is under test).
COMPONENT_TENSORS = {"embedding": ["embed.weight", "pos_embed"],
                     "attention": ["attn.W_Q", "attn.W_K", "attn.W_V", "attn.W_O"],
                     "mlp_in": ["mlp.fc_in.weight", "mlp.fc_in.bias"],
                     "mlp_out": ["mlp.fc_out.weight", "mlp.fc_out.bias"],
                     "unembedding": ["unembed.weight"]}


def component_path_integrals(history, model, x, y, edges, nodes=2000) -> np.ndarray:
    """[bin, component, input]: Σ over a bin's steps of ∫₀¹ ∇_c f(θ_s + tΔ_s)·Δ_s,c dt for the
    true-class log-probability f, by the midpoint rule on `nodes` points (no kinks located:
    its error falls as 1/nodes, ~2e-5 of the largest entry here)."""
    def true_class(params):
        out = torch.func.functional_call(model, params, (x,))
        return torch.log_softmax(out, -1).gather(1, y[:, None]).squeeze(1)

    along_path = torch.func.vmap(torch.func.jacrev(true_class))
    t = (torch.arange(nodes, dtype=torch.float64) + 0.5) / nodes
    per_step = []
    for s in range(history.n_steps):
        start, stop = history.params(s), history.params(s + 1)
        delta = {n: stop[n] - start[n] for n in start}
        grads = along_path({n: start[n] + t.view(-1, *[1] * delta[n].dim()) * delta[n] for n in start})
        per_step.append([sum((grads[n].mean(0) * delta[n]).flatten(1).sum(1) for n in names).numpy()
                         for names in COMPONENT_TENSORS.values()])
    per_step = np.array(per_step)
    return np.stack([per_step[a:b].sum(0) for a, b in zip(edges[:-1], edges[1:])])


def test_component_attribution_labels_the_splits_and_each_bin_adds_up(tiny_run, tiny_data):
    history, _ = tiny_run
    model = fresh_model(TINY)
    groups = {"validation": (tiny_data.val_inputs[:3], tiny_data.val_targets[:3]),
              "training": (tiny_data.train_inputs[:2], tiny_data.train_targets[:2])}
    edges = grokking.log_step_edges(history.n_steps, 4)
    cube = grokking.component_attribution(history, model, groups, edges, **EXACT)
    assert cube["split"].values.tolist() == ["validation"] * 3 + ["training"] * 2
    assert cube["component"].values.tolist() == ["embedding", "attention", "mlp_in", "mlp_out", "unembedding"]
    x = torch.cat([tiny_data.val_inputs[:3], tiny_data.train_inputs[:2]])
    y = torch.cat([tiny_data.val_targets[:3], tiny_data.train_targets[:2]])
    residuals = grokking.bin_residuals(cube, history, model, x, y)
    # the exact per-bin changes add up to the whole change, and every bin is reproduced
    np.testing.assert_allclose(residuals["change"].sum("step"), (cube["final"] - cube["initial"]).values.ravel(), atol=1e-12)
    scale = float(np.abs(residuals["change"]).max())
    assert float(np.abs(residuals["residual"]).max()) < 1e-6 * scale
    np.testing.assert_allclose(residuals["residual"].sum("step"), cube["residual"].values.ravel(), atol=1e-10)
    # every (bin, component) entry, its weight decay included, is that component's own path integral
    explained = cube["attribution"] + cube["regularization"]
    expected = component_path_integrals(history, model, x, y, edges)
    assert list(COMPONENT_TENSORS) == cube["component"].values.tolist()
    assert sorted(sum(COMPONENT_TENSORS.values(), [])) == sorted(name for name, _ in model.named_parameters())
    np.testing.assert_allclose(explained.transpose("step", "component", "test").values, expected,
                               rtol=0, atol=1e-4 * np.abs(expected).max())


def test_data_attribution_explains_each_window_and_carries_the_earlier_momentum(tiny_run, tiny_data):
    """Windows (0, 2) and (4, 6) of the 6-step run, the second with 1 step of replay: per window,
    Σ_train attribution + weight decay + carried is the true class's change over the window; the
    replayed window carries what steps 0-2 passed on, and adds up to the fully replayed one."""
    history, _ = tiny_run
    model = fresh_model(TINY)
    x, y = tiny_data.val_inputs[:2], tiny_data.val_targets[:2]
    cube = grokking.data_attribution(history, model, x, y, [(0, 2), (4, 6)], replay=1, **EXACT)
    assert cube["step"].values.tolist() == [0, 4] and cube["step_stop"].values.tolist() == [2, 6]
    assert cube.sizes["train"] == TINY.train_size

    def true_class(s):
        with torch.no_grad():
            out = torch.func.functional_call(model, history.params(s), (x,))
        return out.gather(1, y[:, None]).squeeze(1).numpy()

    explained = cube["attribution"].sum("train") + cube["regularization"] + cube["carried"]
    for b, (start, stop) in enumerate([(0, 2), (4, 6)]):
        change = true_class(stop) - true_class(start)
        np.testing.assert_allclose(explained.isel(step=b).values.ravel(), change, atol=1e-6 * np.abs(change).max())
    carried = np.abs(cube["carried"].values)
    assert carried[0].max() == 0 and carried[1].max() > 1e-4 * np.abs(cube["attribution"][1]).sum("train").max()
    whole = grokking.data_attribution(history, model, x, y, [(4, 6)], replay=None, **EXACT)
    assert float(np.abs(whole["carried"]).max()) == 0
    np.testing.assert_allclose(whole["attribution"].sum("train") + whole["regularization"],
                               explained.isel(step=[1]), atol=1e-10)
    # windows that tile the run take one pass, binned at the windows: the same numbers
    tiled = grokking.data_attribution(history, model, x, y, [(0, 4), (4, 6)], replay=None, **EXACT)
    assert tiled["step"].values.tolist() == [0, 4] and float(np.abs(tiled["carried"]).max()) == 0
    np.testing.assert_allclose(tiled["attribution"].isel(step=1), whole["attribution"].isel(step=0), atol=1e-12)


def test_data_attribution_of_windows_with_a_gap_explains_each_and_keeps_the_worst_residual(tiny_run, tiny_data):
    """Windows (0, 2) and (4, 6) span the run but do not tile it: each is explained on its own
    (fully replayed, nothing carried), and with a coarse integral (one node, no kinks located)
    the residual attributes are those of the window that misses the most, measured here from
    forward passes at the window edges."""
    history, _ = tiny_run
    model = fresh_model(TINY)
    x, y = tiny_data.val_inputs[:3], tiny_data.val_targets[:3]
    windows = [(0, 2), (4, 6)]
    cube = grokking.data_attribution(history, model, x, y, windows, replay=None, quadrature=1, breakpoints=False,
                                     tolerance=None, progress=False)
    assert cube["step"].values.tolist() == [0, 4] and cube["step_stop"].values.tolist() == [2, 6]
    assert float(np.abs(cube["carried"]).max()) == 0

    def true_class(s):
        with torch.no_grad():
            return torch.func.functional_call(model, history.params(s), (x,)).gather(1, y[:, None]).squeeze(1).numpy()

    explained = (cube["attribution"].sum("train") + cube["regularization"]).transpose("step", ...).values.reshape(2, -1)
    errors = []
    for b, (start, stop) in enumerate(windows):
        change = true_class(stop) - true_class(start)
        residual = np.abs(change - explained[b]).max()
        errors.append((residual / np.abs(change).max(), residual, np.abs(change).max()))
    worst = max(errors)
    assert min(errors)[0] < 0.5 * worst[0], "the windows must miss by different shares, or the check proves nothing"
    for key, value in zip(("relative_residual", "max_abs_residual", "max_abs_change"), worst):
        assert cube.attrs[key] == pytest.approx(value, rel=1e-9), key


def test_bin_errors_and_their_check():
    residuals = xr.Dataset({"change": (("step", "test"), [[1.0, -4.0], [0.5, 0.1]]),
                            "residual": (("step", "test"), [[0.1, -0.2], [0.0, 0.2]])}, coords={"step": [0, 5]})
    errors = grokking.bin_errors(residuals)
    assert errors["max_change"].tolist() == [4.0, 0.5] and errors["max_residual"].tolist() == [0.2, 0.2]
    np.testing.assert_allclose(errors["relative"], [0.05, 0.4])
    grokking.check_bins(errors, 0.4)
    with pytest.raises(ReconstructionError, match="1 step bin.*from step 5 \\(0.4\\)"):
        grokking.check_bins(errors, 0.3)


def test_loss_spikes():
    log = pd.DataFrame({"step": range(6), "train_loss": [3.0, 1.0, 1e-4, 5e-2, 4e-2, 0.5]})
    assert grokking.loss_spikes(log) == [3, 5]
    assert grokking.loss_spikes(log, factor=100) == [3]
    # a jump by exactly the factor is no spike (more than the factor is): 5.0 / 0.5 = 10.0 exactly
    exact = pd.DataFrame({"step": range(3), "train_loss": [0.5, 5.0, 50.5]})
    assert grokking.loss_spikes(exact) == [2]


def test_segment_refuses_a_series_with_nan():
    with pytest.raises(InputError, match="NaN or inf"):
        grokking.segment(np.array([0, 0, np.nan, 1, 1, 1, 5, 5.0]), 3)


def test_phase_of_refuses_steps_before_the_first_phase():
    phases = pd.DataFrame({"phase": [1, 2, 3], "start": [0, 3, 6]})
    assert grokking.phase_of([0, 3, 5, 7], phases).tolist() == [1, 2, 2, 3]
    with pytest.raises(InputError, match=r"steps \[-1\] come before the first phase"):
        grokking.phase_of([-1, 4], phases)


def test_data_attribution_refuses_no_windows(tiny_run, tiny_data):
    history, _ = tiny_run
    with pytest.raises(InputError, match="windows is empty"):
        grokking.data_attribution(history, fresh_model(TINY), tiny_data.val_inputs[:1], tiny_data.val_targets[:1], [])


def test_a_nan_residual_is_the_worst_bin_not_a_missing_one():
    residuals = xr.Dataset({"change": (("step", "test"), [[1.0, -4.0], [0.5, 0.1]]),
                            "residual": (("step", "test"), [[0.1, np.nan], [0.0, 0.2]])}, coords={"step": [0, 5]})
    errors = grokking.bin_errors(residuals)
    assert np.isnan(errors["max_residual"][0]) and errors["max_residual"][1] == 0.2
    with pytest.raises(ReconstructionError, match="2 step bin.*from step 0 \\(nan\\)"):
        grokking.check_bins(errors, 0.3)
