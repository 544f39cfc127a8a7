"""Influence reductions and replication metrics, on hand-built cubes with known answers."""

import re

import numpy as np
import pytest
import torch
import xarray as xr

from explaind import InputError
from explaind.cube import per_parameter
from explaind.influence import (
    component_scores,
    component_shares,
    cosine_similarity,
    data_scores,
    decay_share,
    step_scores,
    top_training_samples,
)
from explaind.verify import replication_metrics


def make_cube(seed=0, steps=3, comps=2, train=4, test=2, out=2):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(steps, comps, train, test, out))
    r = rng.normal(size=(steps, comps, test, out))
    return xr.Dataset(
        {
            "attribution": (("step", "component", "train", "test", "output"), a),
            "regularization": (("step", "component", "test", "output"), r),
        },
        coords={"step": np.arange(steps), "component": ["a", "b"][:comps], "train": np.arange(train) * 10,
                "test": np.arange(test), "output": np.arange(out)},
    )


def test_data_and_step_scores_are_the_right_sums():
    cube = make_cube()
    a, r = cube.attribution.values, cube.regularization.values
    np.testing.assert_allclose(data_scores(cube).transpose("train", "test", "output").values, a.sum((0, 1)))
    np.testing.assert_allclose(step_scores(cube).transpose("step", "test", "output").values,
                               a.sum((1, 2)) + r.sum(1))
    np.testing.assert_allclose(step_scores(cube, include_decay=False).transpose("step", "test", "output").values,
                               a.sum((1, 2)))


def test_component_shares_absolute_and_signed():
    cube = make_cube()
    per = cube.attribution.values.sum((2, 3, 4))  # step × component
    shares = component_shares(cube).transpose("step", "component").values
    np.testing.assert_allclose(shares, np.abs(per) / np.abs(per).sum(1, keepdims=True))
    signed = component_shares(cube, absolute=False).transpose("step", "component").values
    np.testing.assert_allclose(signed, per / np.abs(per).sum(1, keepdims=True))
    np.testing.assert_allclose(shares.sum(1), 1.0)


def test_component_shares_of_components_that_cancel_by_hand():
    """The denominator is Σ |score|, not |Σ score|: step 0's components move the outputs by 3 and
    −1 (shares 3/4 and 1/4, not 3/2 and 1/2), step 1's by −2 and −2, and step 2 does not move
    them (no share: NaN). make_cube's components happen to share their sign in every step."""
    per = np.array([[3.0, -1.0], [-2.0, -2.0], [0.0, 0.0]])  # step × component, split over 2 train samples
    a = np.stack([per / 2, per / 2], axis=2)[..., None, None]
    cube = xr.Dataset({"attribution": (("step", "component", "train", "test", "output"), a)},
                      coords={"step": np.arange(3), "component": ["a", "b"], "train": [0, 1], "test": [0], "output": [0]})
    shares = component_shares(cube).transpose("step", "component").values
    np.testing.assert_array_equal(shares[:2], [[0.75, 0.25], [0.5, 0.5]])
    signed = component_shares(cube, absolute=False).transpose("step", "component").values
    np.testing.assert_array_equal(signed[:2], [[0.75, -0.25], [-0.5, -0.5]])
    assert np.isnan(shares[2]).all() and np.isnan(signed[2]).all()


def test_decay_share_by_hand():
    cube = make_cube()
    a = np.abs(cube.attribution.values.sum((1, 2))).sum((1, 2))  # per step
    r = np.abs(cube.regularization.values.sum(1)).sum((1, 2))
    np.testing.assert_allclose(decay_share(cube).values, r / (r + a))


def test_top_training_samples_orders_by_score():
    cube = make_cube()
    scores = cube.attribution.values.sum((0, 1))[:, 1, 0]  # train scores for test 1, output 0
    top = top_training_samples(cube, test=1, k=2, output=0)
    assert list(top["helpful"].train.values) == list(np.arange(4)[np.argsort(-scores)][:2] * 10)
    assert (scores > 0).all() and len(top["harmful"]) == 0  # no negative score: nothing harmful
    with pytest.raises(InputError, match=r"several outputs.*\[0, 1\]"):
        top_training_samples(cube, test=1)
    with pytest.raises(InputError, match=r"output=5 is not in the cube.*\[0, 1\]"):
        top_training_samples(cube, test=1, output=5)


def test_top_training_samples_of_a_single_output_need_no_choice():
    cube = make_cube(out=1).assign_coords(output=["true"])  # as explain(outputs="true") labels it
    scores = cube.attribution.values.sum((0, 1))[:, 1, 0]
    top = top_training_samples(cube, test=1, k=2)
    assert list(top["helpful"].train.values) == list(np.arange(4)[np.argsort(-scores)][:2] * 10)
    assert top["helpful"].equals(top_training_samples(cube, test=1, k=2, output="true")["helpful"])


def test_one_outputs_scores_are_refused_on_a_cube_that_summed_several():
    """A cube explained without 'output' in keep sums its outputs' attributions: no one output's
    top samples or similarities can be read off that sum, whichever output is asked for."""
    cube = make_cube()
    summed = cube.assign(attribution=cube.attribution.sum("output"))  # regularization keeps the labels
    for call in (lambda: top_training_samples(summed, test=1, output=0), lambda: top_training_samples(summed, test=1),
                 lambda: cosine_similarity(summed, output=1), lambda: cosine_similarity(summed)):
        with pytest.raises(InputError, match=r"(?s)sums the attributions of its 2 explained outputs.*keep=\(\.\.\., 'output'\)"):
            call()
    single = make_cube(out=1).assign_coords(output=["true"])
    one_summed = single.assign(attribution=single.attribution.sum("output"))  # a sum of one: that output
    for output in (None, "true"):
        top = top_training_samples(one_summed, test=1, k=2, output=output)
        assert top["helpful"].train.values.tolist() == top_training_samples(single, test=1, k=2)["helpful"].train.values.tolist()
    with pytest.raises(InputError, match="output=0 is not the cube's explained output: it explains 'true'"):
        top_training_samples(one_summed, test=1, output=0)


def test_step_scores_of_a_window_count_what_momentum_carried_into_it():
    cube = make_cube()
    carried = np.random.default_rng(1).normal(size=cube.regularization.shape)  # as explain(steps=, replay=) books it
    cube["carried"] = (cube.regularization.dims, carried)
    a, r = cube.attribution.values, cube.regularization.values
    np.testing.assert_allclose(step_scores(cube).transpose("step", "test", "output").values,
                               a.sum((1, 2)) + r.sum(1) + carried.sum(1))
    np.testing.assert_allclose(step_scores(cube, include_decay=False).transpose("step", "test", "output").values,
                               a.sum((1, 2)) + carried.sum(1))


def test_cosine_similarity_matches_numpy_for_each_output():
    cube = make_cube()
    for output in (0, 1):
        v = cube.attribution.values.sum((0, 1))[..., output].T  # test × train
        expected = (v @ v.T) / np.outer(np.linalg.norm(v, axis=1), np.linalg.norm(v, axis=1))
        np.testing.assert_allclose(cosine_similarity(cube, output=output).values, expected)
        np.testing.assert_allclose(np.diag(cosine_similarity(cube, output=output).values), 1.0)
    with pytest.raises(InputError, match=r"several outputs.*\[0, 1\]"):  # summed, outputs would cancel
        cosine_similarity(cube)
    single = make_cube(out=1)
    np.testing.assert_array_equal(cosine_similarity(single).values, cosine_similarity(single, output=0).values)


def test_cosine_similarity_over_components_matches_numpy():
    cube = make_cube(comps=2, test=3)
    v = cube.attribution.values.sum((0, 2))[..., 1].T  # test × component, output 1
    expected = (v @ v.T) / np.outer(np.linalg.norm(v, axis=1), np.linalg.norm(v, axis=1))
    cosine = cosine_similarity(cube, over="component", output=1)
    assert cosine.dims == ("test", "test_other")
    np.testing.assert_allclose(cosine.values, expected, rtol=1e-12)


def test_a_zero_score_vector_has_no_cosine():
    cube = make_cube(out=1)
    cube["attribution"][:, :, :, 1] = 0.0  # test input 1: no training sample moved it
    cosine = cosine_similarity(cube).values
    assert np.isnan(cosine[1]).all() and np.isnan(cosine[:, 1]).all() and cosine[0, 0] == pytest.approx(1.0)


def test_summed_dim_is_a_clear_error():
    cube = make_cube().sum("train")
    with pytest.raises(InputError, match=re.escape("this cube has no 'train' dim (summed while explaining): explain "
                                                   "again with keep=(..., 'train')")):
        data_scores(cube)
    with pytest.raises(InputError, match=re.escape("this cube has no 'train' or 'test' dims")):
        data_scores(cube.sum("test"))


@pytest.mark.parametrize("include_decay", ["no", 0.0, None])
def test_step_scores_take_a_boolean_for_the_decay(include_decay):
    """'no' was taken as True (a non-empty string), 0.0 and None as False."""
    with pytest.raises(InputError, match=re.escape(f"include_decay={include_decay!r} must be True or False")):
        step_scores(make_cube(), include_decay=include_decay)


def test_replication_metrics_by_hand():
    final = torch.log_softmax(torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.5]], dtype=torch.float64), -1)
    rebuilt = final.clone()
    rebuilt[1] = torch.tensor([1.0, 0.0, 0.0])  # second input: argmax flips to class 0
    ds = xr.Dataset(
        {"final": (("test", "output"), final.numpy()), "reconstructed": (("test", "output"), rebuilt.numpy()),
         "residual": (("test", "output"), (final - rebuilt).numpy())},
        attrs={"target": "log_prob", "relative_residual": 0.5},
    )
    m = replication_metrics(ds)
    assert m["agreement"] == 0.5
    q = torch.log_softmax(rebuilt[1], -1)
    kl1 = float((final[1].exp() * (final[1] - q)).sum())
    assert m["kl"] == pytest.approx(kl1 / 2, rel=1e-12)
    assert m["max_abs_residual"] == pytest.approx(float((final - rebuilt).abs().max()))


def test_a_nan_in_the_cube_shows_in_every_score():
    cube = make_cube()
    cube["attribution"][0, 0, 0, 0, 0] = np.nan  # step 0, component a, train 0, test 0, output 0
    assert np.isnan(data_scores(cube).sel(train=0, test=0, output=0))
    assert np.isnan(step_scores(cube).sel(step=0, test=0, output=0))
    assert np.isnan(component_shares(cube).sel(step=0)).all()
    assert np.isnan(decay_share(cube).sel(step=0)) and not np.isnan(decay_share(cube).sel(step=1))
    assert np.isnan(cosine_similarity(cube, output=0).values[0]).all()
    assert not np.isnan(cosine_similarity(cube, output=1).values).any()
    with pytest.raises(InputError, match="contain NaN"):
        top_training_samples(cube, test=0, output=0)


def test_top_training_samples_keep_only_scores_of_their_sign():
    cube = make_cube(train=8)
    scores = data_scores(cube).sel(test=1, output=0).values
    top = top_training_samples(cube, test=1, k=100, output=0)
    assert (top["helpful"].values > 0).all() and (top["harmful"].values < 0).all()
    assert len(top["helpful"]) == (scores > 0).sum() and len(top["harmful"]) == (scores < 0).sum()


def test_a_training_sample_of_score_0_is_neither_helpful_nor_harmful():
    cube = make_cube(train=4, out=1)
    cube["attribution"][:] = 0.0
    cube["attribution"][0, 0, :, 1, 0] = [2.0, 0.0, -1.0, 0.5]  # scores of test 1 over train 0, 10, 20, 30
    top = top_training_samples(cube, test=1, k=8)
    assert top["helpful"].train.values.tolist() == [0, 30] and top["helpful"].values.tolist() == [2.0, 0.5]
    assert top["harmful"].train.values.tolist() == [20] and top["harmful"].values.tolist() == [-1.0]
    none = top_training_samples(cube, test=1, k=0)  # k = 0 is a count: no sample listed
    assert none["helpful"].sizes == none["harmful"].sizes == {"train": 0}


@pytest.mark.parametrize("k", [-1, 2.5, True])
def test_top_training_samples_need_a_count(k):
    with pytest.raises(InputError, match=rf"k={k!r} must be a whole number ≥ 0"):
        top_training_samples(make_cube(), test=1, k=k, output=0)


# an array of one label is no label; 1.0 and True equal the label 1 but are no label of the cube's
@pytest.mark.parametrize("test", [99, [0, 1], np.array([1]), 1.0, True])
def test_top_training_samples_need_one_test_label(test):
    with pytest.raises(InputError, match=r"single one of \[0, 1\]"):
        top_training_samples(make_cube(), test=test, output=0)


def test_cosine_similarity_refuses_an_unusable_dim():
    with pytest.raises(InputError, match=r"over='test'.*\['train', 'component'\]"):
        cosine_similarity(make_cube(), over="test")


def test_tied_training_samples_are_listed_by_dataset_index():
    """Samples of equal score (duplicates of one image, say) are ranked in the cube's train order,
    ascending dataset index, in both lists: numpy's default sort is unstable beyond 16 entries, and
    reversing a sort for the helpful list would list them descending."""
    cube = make_cube(train=40, out=1)
    cube["attribution"][:] = 0.0
    scores = np.tile([1.0, -1.0, 0.5, -0.5], 10)  # over train 0, 10, …, 390: ten ties of each score
    cube["attribution"][0, 0, :, 1, 0] = scores
    top = top_training_samples(cube, test=1, k=12)
    train = cube.train.values
    assert top["helpful"].train.values.tolist() == train[scores == 1.0].tolist() + train[scores == 0.5][:2].tolist()
    assert top["harmful"].train.values.tolist() == train[scores == -1.0].tolist() + train[scores == -0.5][:2].tolist()


@pytest.mark.parametrize("score", [data_scores, step_scores, component_scores, component_shares, decay_share,
                                   cosine_similarity, per_parameter])
def test_a_cubes_variable_or_path_is_refused_naming_the_cube(score):
    """The natural slips, a cube's variable (cube.attribution) or its store's path, failed with a
    bare KeyError or TypeError (per_parameter: "holds no parameter scores", a wrong cause)."""
    cube = make_cube().assign(parameter_score=("parameter", np.ones(3)))
    name = score.__name__
    with pytest.raises(InputError, match=rf"^{name} takes a cube \(an xarray.Dataset\), not a DataArray\. "
                                         rf"Fix: pass the whole cube, not its variable 'attribution': {name}\(cube\)$"):
        score(cube.attribution)
    with pytest.raises(InputError, match=rf"not a str\. Fix: open the store first: "
                                         rf"{name}\(explaind.open_cube\('results/cube.zarr'\)\)$"):
        score("results/cube.zarr")


def test_top_training_samples_refuses_a_cubes_variable():
    with pytest.raises(InputError, match=r"top_training_samples takes a cube .* not its variable 'attribution'"):
        top_training_samples(make_cube().attribution, test=0, output=0)
