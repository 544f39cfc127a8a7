"""The cubes stage's check on write (explaind.stages.check_cube) against the verify stage.

A cube and a forward-mode reconstruction computed with the same path integral are two
independent computations of the same number: they must agree to rounding, and a cube computed
with another integral, or from another history, must be refused.
"""

from __future__ import annotations

import numpy as np
import pytest

import explaind as ex
from engine_cases import Case, train
from explaind import stages


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    # ReLU with a large learning rate: a coarse plain quadrature misses a visible share of the change
    return train(Case("mlp", "adamw", act="relu", steps=6, lr_scale=3.0), tmp_path_factory.mktemp("stages") / "h")


@pytest.fixture(scope="module")
def reference(run):
    return ex.reconstruct(run.path, run.model, run.test_x, quadrature=2, breakpoints=False, progress=False)


def cubes(run, **integral):
    common = dict(tolerance=None, progress=False, **integral)
    return {
        "train_test": run.explain(keep=("train", "test"), outputs="true", **common),
        "step_test": run.explain(keep=("step", "test"), outputs="true", step_bins=2, **common),
        "every_output": run.explain(keep=("component", "test", "output"), **common),
        "summed_over_tests": run.explain(keep=("train", "output"), **common),
    }


def test_a_cube_with_the_verify_stages_integral_matches_it_to_rounding(run, reference):
    integral = stages.integration_of(reference)
    assert integral == {"quadrature": 2, "rule": "gauss", "breakpoints": False, "kink_tolerance": 0.0}
    for name, cube in cubes(run, **integral).items():
        residual = cube.attrs["relative_residual"]
        assert residual > 1e-4, "the case must leave a residual, or the check proves nothing"
        gaps = stages.check_cube(cube, reference, tolerance=1.0, verify_tolerance=1e-10, name=name)
        assert gaps["verify_gap"] <= 1e-10 and gaps["sum_gap"] <= 1e-12, (name, gaps)
        assert gaps["relative_residual"] == residual
        with pytest.raises(ex.ReconstructionError, match="relative_residual"):
            stages.check_cube(cube, reference, tolerance=residual / 2, verify_tolerance=1e-10, name=name)


def test_a_cube_with_another_integral_is_refused(run, reference):
    cube = cubes(run, quadrature=5, breakpoints=True)["train_test"]
    with pytest.raises(ex.ReconstructionError, match="verify_gap"):
        stages.check_cube(cube, reference, tolerance=1.0, verify_tolerance=1e-8)


def test_a_cube_from_another_history_is_refused(run, reference):
    cube = cubes(run, **stages.integration_of(reference))["train_test"]
    cube.attrs["history_sha256"] = "0" * 64
    with pytest.raises(ex.ReconstructionError, match="different histories"):
        stages.check_cube(cube, reference, tolerance=1.0, verify_tolerance=1e-8)


def test_reference_values_pick_each_inputs_selected_output(run, reference):
    cube = cubes(run, **stages.integration_of(reference))["train_test"]
    picked = stages.reference_values(cube, reference)
    classes = cube["output_class"].values.astype(int)
    for key in ("initial", "final", "reconstructed"):
        expected = reference[key].values[np.arange(len(classes)), classes]
        np.testing.assert_array_equal(picked[key][:, 0], expected)


def test_the_true_class_slice_of_every_output_equals_explaining_the_true_class(run):
    common = dict(keep=("step", "component", "test"), step_bins=2, quadrature=2, tolerance=None)
    direct = run.explain(outputs="true", **common)
    every = run.explain(outputs="all", keep=("step", "component", "test", "output"), step_bins=2, quadrature=2,
                        tolerance=None)
    sliced = stages.true_class_slice(every, run.test_y)
    for name in ("attribution", "regularization", "initial", "final", "residual"):
        assert sliced[name].dims == direct[name].dims, name
        np.testing.assert_allclose(sliced[name].values, direct[name].values, rtol=0, atol=1e-13, err_msg=name)
    np.testing.assert_array_equal(sliced["output_class"].values, direct["output_class"].values)
    assert sliced["output"].values.tolist() == ["true"]
    for key in ("max_abs_residual", "max_abs_change", "relative_residual"):
        assert sliced.attrs[key] == pytest.approx(direct.attrs[key], rel=1e-9, abs=1e-15), key


def test_the_stored_parameter_scores_are_one_per_parameter_summed_over_inputs(run):
    """The cubes stage keeps the test dim (its sums are checked per input) but stores the
    parameter scores of the explained inputs together, as explaining them without a test dim does."""
    common = dict(outputs="true", parameter_scores=True, quadrature=2, tolerance=None)
    stored = stages.parameter_cube(run.explain(keep=("test",), **common))
    summed = run.explain(keep=(), **common)
    for name in stages.PARAMETER_SCORES:
        assert stored[name].dims == ("parameter",), name
        np.testing.assert_allclose(stored[name].values, summed[name].values, rtol=1e-12, atol=0, err_msg=name)
    np.testing.assert_array_equal(stored["parameter_tensor"].values, summed["parameter_tensor"].values)


def test_quadrature_sensitivity_in_one_pass_equals_separate_reconstructions(run):
    from explaind.verify import quadrature_sensitivity

    table = quadrature_sensitivity(run.path, run.model, run.test_x, nodes_list=(1, 3), rules=("gauss", "midpoint"),
                                   breakpoints=(False, True), progress=False)
    assert len(table) == 8
    for row in table.itertuples():
        alone = ex.reconstruct(run.path, run.model, run.test_x, quadrature=row.nodes, rule=row.rule,
                               breakpoints=row.breakpoints, progress=False)
        assert row.relative_residual == pytest.approx(alone.attrs["relative_residual"], rel=1e-9, abs=1e-15)
        assert row.kinks_located == alone.attrs["kinks_located"]


def test_a_refinement_that_locates_no_kinks_cannot_have_a_kink_tolerance():
    with pytest.raises(ex.InputError, match="(?s)refine_kink_tolerance.*refine_breakpoints: true"):
        stages.VerifyConfig(model="transformer", refine_breakpoints=False, refine_kink_tolerance=1e-4)
    stages.VerifyConfig(refine_breakpoints=False, refine_kink_tolerance=0.0)  # the CNN's plain refinement is fine
