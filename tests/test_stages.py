"""The cubes stage's check on write (explaind.stages.check_cube) against the verify stage.

A cube and a forward-mode reconstruction computed with the same path integral are two
independent computations of the same number: they must agree to rounding, and a cube computed
with another integral, or from another history, must be refused.

Also what the stages refuse before they start: the stage configs' ranges, a run folder's
config.json (load_run), and the params and data.dvc files the pipeline runner reads; what load_run
rebuilds from a run folder, and the verify stage's replication table. And the influence stage's
two studies (validation) on a tiny Transformer run, against hand computations.
"""

from __future__ import annotations

import json
import shutil
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch
import xarray as xr
import yaml
from safetensors.torch import save_model

import explaind as ex
from engine_cases import Case, train
from explaind import pipeline, stages, validation
from explaind.cube import PARAMETER_SCORES
from explaind.data import load_image_pair, modular_addition
from explaind.models import CNN_COMPONENTS, TRANSFORMER_COMPONENTS
from explaind.quadrature import MAX_NODES
from explaind.training import CNNConfig, TransformerConfig, load_config, save_config, train_cnn, train_transformer

ROOT = Path(__file__).resolve().parents[1]


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


def test_an_integral_that_searches_only_missed_steps_is_the_cubes_integral_too(run):
    """The verify stage's kink_tolerance chooses the steps whose kinks it locates: a cube that
    searched every step would integrate another path."""
    searched = ex.reconstruct(run.path, run.model, run.test_x, quadrature=2, breakpoints=True, kink_tolerance=1e-3,
                              progress=False)
    integral = stages.integration_of(searched)
    assert integral == {"quadrature": 2, "rule": "gauss", "breakpoints": True, "kink_tolerance": 1e-3}
    cube = cubes(run, **integral)["train_test"]
    assert stages.check_cube(cube, searched, tolerance=1.0, verify_tolerance=1e-10)["verify_gap"] <= 1e-10


def hand_cube():
    """A consistent cube of the held-out inputs 1, 2 and the outputs 2, 0 (in that order) and the
    reconstruction of all 3 x 3 it is checked against. Its changes f(θ_N) − f(θ_0) are
    [[2, 1], [-1, 0.5]] (largest 2, mean 1.125); the 9s are entries the cube does not hold."""
    tests, outputs = [1, 2], [2, 0]
    initial = np.arange(9.0).reshape(3, 3) / 10
    final = initial + np.array([[9, 9, 9], [1, -4, 2], [0.5, 9, -1]])
    at = np.ix_(tests, outputs)
    change = final[at] - initial[at]
    residual = np.array([[0.01, -0.02], [0.03, 0.0]])
    from_updates = np.array([[0.005, 0.0], [-0.01, 0.02]])  # the residual's part from the updates' miss
    explained = change - residual
    decay = np.array([[0.1, 0.2], [-0.3, 0.05]])  # regularization, all of it in the first bin
    reconstructed = final.copy()
    reconstructed[at] = initial[at] + explained + from_updates  # Σ_s φ_s·Δθ_s, the same integral
    pair = ("test", "output")
    cube = xr.Dataset(
        {"attribution": (("step", *pair), np.stack([0.25 * (explained - decay), 0.75 * (explained - decay)])),
         "regularization": (("step", *pair), np.stack([decay, np.zeros((2, 2))])),
         "initial": (pair, initial[at]), "final": (pair, final[at]), "residual": (pair, residual),
         "residual_from_updates": (pair, from_updates)},
        coords={"step": [0, 1], "test": tests, "output": outputs},
        attrs={"history_sha256": "h", "relative_residual": 0.015})  # max |residual| / 2
    reference = xr.Dataset({key: (pair, values) for key, values in
                            (("initial", initial), ("final", final), ("reconstructed", reconstructed))},
                           coords={"test": [0, 1, 2], "output": [0, 1, 2]}, attrs={"history_sha256": "h"})
    return cube, reference


def test_check_cube_compares_each_entry_with_the_references_same_input_and_output():
    cube, reference = hand_cube()
    gaps = stages.check_cube(cube, reference, tolerance=0.015, verify_tolerance=1e-15)
    assert gaps == pytest.approx({"sum_gap": 0.0, "initial_gap": 0.0, "final_gap": 0.0, "verify_gap": 0.0,
                                  "relative_residual": 0.015}, abs=1e-15)
    with pytest.raises(ex.ReconstructionError, match=r"\{'relative_residual': 0.015\}"):
        stages.check_cube(cube, reference, tolerance=0.0149, verify_tolerance=1e-15)


def test_check_cube_gaps_are_relative_to_the_largest_change_and_each_is_checked():
    cube, reference = hand_cube()
    for key in ("initial", "final", "reconstructed"):  # the reference's model moved by 0.3 at input 2, output 0
        reference[key].loc[{"test": 2, "output": 0}] += 0.3
    gaps = stages.check_cube(cube, reference, tolerance=1.0, verify_tolerance=0.2)
    assert gaps["initial_gap"] == pytest.approx(0.15, abs=1e-15)  # 0.3 / 2, not 0.3 / 1.125
    assert gaps["final_gap"] == pytest.approx(0.15, abs=1e-15)
    assert gaps["sum_gap"] <= 1e-15 and gaps["verify_gap"] <= 1e-15  # the change and its integral agree
    with pytest.raises(ex.ReconstructionError, match=r"\{'initial_gap': 0\.1\d*, 'final_gap': 0\.1\d*\} above"):
        stages.check_cube(cube, reference, tolerance=1.0, verify_tolerance=0.1)


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
    for name in PARAMETER_SCORES:
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


# --- the verify stage's gate and the inputs a count means -----------------------------------


def test_the_verify_gate_accepts_its_bounds_and_refuses_beyond_them_or_nan():
    config = stages.VerifyConfig(model="transformer", tolerance=1e-6, min_agreement=0.9)
    stages.check_verification({"agreement": 0.9, "relative_residual": 1e-6}, config)  # both bounds are accepted
    for metrics, problems in (
        ({"agreement": 0.89, "relative_residual": 0.0}, r"argmax agreement 0.8900 < min_agreement 0.9\. Fix"),
        ({"agreement": 1.0, "relative_residual": float("nan")}, r"relative residual nan > tolerance 1e-06\. Fix"),
        ({"agreement": 0.5, "relative_residual": 2e-6},
         r"argmax agreement 0.5000 < min_agreement 0.9; relative residual 2.00e-06 > tolerance 1e-06\. Fix"),
    ):
        with pytest.raises(ex.ReconstructionError, match=r"transformer run fails verify.transformer: " + problems):
            stages.check_verification(metrics, config)


def test_an_input_count_of_0_or_beyond_the_inputs_means_all_of_them():
    assert [stages.first(n, 7) for n in (0, -1, 1, 3, 7, 9)] == [7, 7, 1, 3, 7, 7]


def test_the_cubes_config_refuses_explaining_no_inputs():
    """0 means no inputs here, unlike verify.inputs' 0 (all): refused, not taken for all."""
    with pytest.raises(ex.InputError, match=r"cubes.cnn.tests is 0, but it must be at least 1\. Fix: set cubes"):
        stages.CubesConfig(tests=0)


# --- the stage configs' ranges ------------------------------------------------------------


@pytest.mark.parametrize("cls, section, key, value", [
    (stages.VerifyConfig, "verify.cnn", "quadrature", MAX_NODES + 1),
    (stages.VerifyConfig, "verify.cnn", "refine_quadrature", MAX_NODES + 1),
    (stages.VerifyConfig, "verify.cnn", "sensitivity_nodes", (1, 10, MAX_NODES + 1)),
    (stages.VerifyConfig, "verify.cnn", "sensitivity_kink_nodes", (MAX_NODES + 1,)),
    (validation.InfluenceConfig, "influence.cnn", "quadrature", MAX_NODES + 1),
    (validation.InfluenceConfig, "influence.cnn", "lds_quadrature", MAX_NODES + 1),
])
def test_the_configs_refuse_more_quadrature_nodes_than_explain_takes(cls, section, key, value):
    """explain (quadrature.nodes) refuses them only once the stage has started."""
    cls(**{key: (MAX_NODES,) if isinstance(value, tuple) else MAX_NODES})
    with pytest.raises(ex.InputError, match=rf"(?s){section}\.{key} is .*at most {MAX_NODES} \(each node is one "
                                            rf"Jacobian pass per step\).*Fix: set {section}\.{key}"):
        cls(**{key: value})


def test_the_influence_config_refuses_more_lds_inputs_than_the_run_holds_out():
    """Slicing would cap them without a word; both studies check before any work."""
    config = validation.InfluenceConfig(model="transformer", lds_inputs=16)
    config.check_run(held_out=16)
    with pytest.raises(ex.InputError, match=r"influence.transformer.lds_inputs is 16, but it must be at most 15 "
                                            r"\(the run's held-out inputs; 0: all of them\)"):
        config.check_run(held_out=15)
    run = types.SimpleNamespace(test_x=np.zeros((15, 2)))  # refused before the run is touched otherwise
    for study in (lambda: validation.pruning_study(run, config, 0, None),
                  lambda: validation.datamodel_study(run, config, "data", 0, None)):
        with pytest.raises(ex.InputError, match="lds_inputs is 16"):
            study()


@pytest.mark.parametrize("accepted, refused, key, rule", [
    (dict(min_fraction=0.3, max_fraction=0.3), dict(min_fraction=0.5, max_fraction=0.3), "min_fraction",
     r"in \(0, max_fraction\]"),
    (dict(lds_subsets=2), dict(lds_subsets=1), "lds_subsets", r"at least 2 \(a correlation over subsets\)"),
    (dict(lds_fraction=0.99), dict(lds_fraction=1.0), "lds_fraction", r"in \(0, 1\)"),
    (dict(confidence=0.99), dict(confidence=1.0), "confidence", r"in \(0, 1\)"),
])
def test_the_influence_config_refuses_values_just_outside_their_ranges(accepted, refused, key, rule):
    """A grid whose smallest fraction exceeds its largest, one retraining (no correlation over
    subsets), subsets that are the whole training set, a 100% interval: each refused by name."""
    validation.InfluenceConfig(**accepted)
    with pytest.raises(ex.InputError, match=rf"influence\.cnn\.{key} is {refused[key]}, but it must be {rule}\. "
                                            rf"Fix: set influence\.cnn\.{key}"):
        validation.InfluenceConfig(**refused)


@pytest.mark.parametrize("cls, section, key", [
    (stages.VerifyConfig, "verify.cnn", "inputs"),
    (stages.VerifyConfig, "verify.cnn", "sensitivity_inputs"),
    (stages.VerifyConfig, "verify.cnn", "float32_inputs"),
    (stages.CubesConfig, "cubes.cnn", "tests"),
])
def test_the_analysis_configs_refuse_more_inputs_than_the_run_holds_out(cls, section, key):
    """Slicing would cap them without a word (verify.cnn.inputs: 100000 reconstructed all 107)."""
    config = cls(**{key: 16})
    config.check_run(held_out=16)
    with pytest.raises(ex.InputError, match=rf"{section}.{key} is 16, but it must be at most 15 \(the run's "
                                            rf"held-out inputs; 0: all of them\)"):
        config.check_run(held_out=15)


def test_float32_inputs_are_among_the_inputs_verify_reconstructs():
    stages.VerifyConfig(inputs=0, float32_inputs=64)  # 0: all of them
    stages.VerifyConfig(inputs=8, float32_inputs=8)
    with pytest.raises(ex.InputError, match=r"verify.cnn.float32_inputs is 9, but it must be at least 0 and at "
                                            r"most inputs \(8\)"):
        stages.VerifyConfig(inputs=8, float32_inputs=9)


def test_the_cubes_stage_refuses_tests_the_verify_stage_does_not_reconstruct(tmp_path):
    """Both sections are in one file: refused with the parameters, not after verify has run."""
    content = tiny_params()
    content["verify"]["cnn"]["inputs"] = 3
    content["cubes"]["cnn"]["tests"] = 4
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(content, sort_keys=False))
    with pytest.raises(pipeline.ParameterError, match=r"cubes.cnn.tests is 4, but verify.cnn.inputs reconstructs "
                                                      r"only the first 3 inputs.*Fix: lower cubes.cnn.tests to at most 3"):
        pipeline.load_params("cubes@cnn", params_file=path)
    pipeline.load_params("cubes@transformer", params_file=path)  # the other model's sections are its own
    for verified, tests in ((0, 4), (4, 4)):  # 0: verify reconstructs all of them
        content["verify"]["cnn"]["inputs"], content["cubes"]["cnn"]["tests"] = verified, tests
        path.write_text(yaml.safe_dump(content, sort_keys=False))
        assert pipeline.load_params("cubes@cnn", params_file=path)["tests"] == tests


# --- a run folder's config.json -----------------------------------------------------------


@pytest.mark.parametrize("config", [TransformerConfig(), CNNConfig()], ids=["transformer", "cnn"])
def test_a_saved_training_config_reads_back_equal(tmp_path, config):
    path = save_config(config, tmp_path)
    assert load_config(path, "x", type(config)) == config


@pytest.mark.parametrize("name, write, words", [
    ("transformer", lambda values: "{oops", ["is not valid JSON"]),
    ("transformer", lambda values: json.dumps([values]), ["holds a JSON list, not an object"]),
    ("transformer", lambda values: json.dumps({**values, "dropout": 0.1}), ["unknown keys ['dropout']"]),
    ("transformer", lambda values: json.dumps({k: v for k, v in values.items() if k != "lr"}),
     ["missing keys ['lr']"]),
    ("transformer", lambda values: json.dumps({k: v for k, v in values.items() if k != "class"}),
     ["lacks the key 'class'", "TransformerConfig"]),
    ("transformer", lambda values: json.dumps({**values, "p": "43"}), ["holds a config that is refused"]),
    ("cnn", lambda values: json.dumps({**values, "class": "CNNConfig"}), ["unknown keys", "missing keys"]),
], ids=["broken", "not an object", "unknown key", "missing key", "no class", "wrong type", "other config"])
def test_load_run_refuses_a_broken_config_json_naming_it_and_the_fix(tmp_path, name, write, words):
    path = save_config(TransformerConfig(), tmp_path)
    path.write_text(write(json.loads(path.read_text())))
    with pytest.raises(ex.InputError) as error:
        stages.load_run(name, tmp_path, tmp_path / "data")
    message = str(error.value)
    assert str(path) in message and f"dvc repro train_{name}" in message, message
    assert all(word in message for word in words), message


def saved_run(folder: Path, config, trained) -> Path:
    """A run folder as the training stage writes it: config.json, model.safetensors, history/."""
    save_model(trained.model, str(folder / "model.safetensors"))
    save_config(config, folder)
    return folder


def assert_trained_weights(run, trained):
    loaded = dict(run.model.named_parameters())
    for name, value in trained.model.named_parameters():
        assert loaded[name].dtype == torch.float64 and torch.equal(loaded[name], value), name


def test_load_run_rebuilds_a_transformer_run_on_its_validation_pairs(tmp_path):
    config = TransformerConfig(p=5, train_size=9, val_size=6, d_model=8, n_heads=2, d_mlp=16, max_steps=2)
    trained = train_transformer(config, history_dir=tmp_path / "history", progress=False)
    run = stages.load_run("transformer", saved_run(tmp_path, config, trained), tmp_path / "unused")
    data = modular_addition(config.p, config.train_size, config.val_size, config.data_seed, config.only_a_ge_b)
    assert run.held_out == "validation" and run.class_names == ["0", "1", "2", "3", "4"]  # the residues mod 5
    assert run.components == TRANSFORMER_COMPONENTS and run.history.n_steps == 2
    for ours, theirs in ((run.train_x, data.train_inputs), (run.train_y, data.train_targets),
                         (run.test_x, data.val_inputs), (run.test_y, data.val_targets)):
        assert torch.equal(ours, theirs)
    assert_trained_weights(run, trained)


def test_load_run_rebuilds_a_cnn_run_on_its_test_images_in_its_dtype(tmp_path, digits_data):
    """The held-out images are the digits' test split (round(0.3 · (183 + 174)) = 107 of the 3s and
    8s), standardised by the training images and cast to the run's float64, as the model takes them."""
    config = CNNConfig(width=2, batch_size=128, epochs=1, peak_epoch=1.0, flip=False)
    trained = train_cnn(config, digits_data, history_dir=tmp_path / "history", progress=False)
    run = stages.load_run("cnn", saved_run(tmp_path, config, trained), digits_data)
    pair = load_image_pair(digits_data, "digits", (3, 8), 0.3, 0)
    assert run.held_out == "test" and run.class_names == ["digit 3", "digit 8"] and run.components == CNN_COMPONENTS
    assert len(run.test_y) == 107 and len(run.train_y) == 250
    for ours, theirs in ((run.train_x, pair.train_x), (run.test_x, pair.test_x)):
        assert ours.dtype == torch.float64 and torch.equal(ours, theirs.double())
    assert torch.equal(run.train_y, pair.train_y) and torch.equal(run.test_y, pair.test_y)
    assert_trained_weights(run, trained)
    with torch.no_grad():
        torch.testing.assert_close(run.model(run.test_x), trained.model(pair.test_x.double()), rtol=0, atol=0)


def test_the_replication_table_puts_the_papers_rows_first_and_labels_ours():
    ours = pd.DataFrame([{"source": "ours", "rule": "gauss", "nodes": 3, "breakpoints": True, "inputs": 10,
                          "agreement": 1.0, "kl": 1e-14, "relative_residual": 1e-12, "seconds": 5.0}])
    table = stages.replication_table(ours, "transformer (mod 7)")
    nan = float("nan")
    expected = pd.DataFrame(
        [["paper", "transformer (mod 113)", "midpoint", 100, False, nan, 1.0, 0.0, nan],
         ["paper", "transformer (mod 113)", "midpoint", 10, False, nan, 0.748, 0.885, nan],
         ["paper", "ResNet-9 (CIFAR-2)", "midpoint", 100, False, nan, 1.0, 0.0, nan],
         ["ours", "transformer (mod 7)", "gauss", 3, True, 10.0, 1.0, 1e-14, 1e-12]],
        columns=["source", "model", "rule", "nodes", "breakpoints", "inputs", "agreement", "kl", "relative_residual"])
    pd.testing.assert_frame_equal(table, expected, check_dtype=False)


# --- the params and data.dvc files the pipeline reads -------------------------------------


def tiny_params() -> dict:
    return yaml.safe_load((ROOT / "tests" / "params_tiny.yaml").read_text())


def test_params_with_a_yaml_merge_key_read_as_yaml_reads_them(tmp_path):
    """`<<: *anchor` is valid YAML (yaml.safe_load and DVC read it); the duplicate-key check must
    not take it for an unknown tag, nor a key the mapping overrides for a repeat."""
    text = (ROOT / "tests" / "params_tiny.yaml").read_text()
    assert "\nverify:\n  cnn:\n" in text and "\n  transformer:\n" in text
    text = text.replace("\nverify:\n  cnn:\n", "\nverify:\n  cnn: &verify_cnn\n", 1)
    start = text.index("\n  transformer:\n", text.index("\nverify:\n"))
    merged = text[:start] + "\n  transformer:\n    <<: *verify_cnn\n" + text[start + len("\n  transformer:\n"):]
    path = tmp_path / "params.yaml"
    path.write_text(merged)
    assert pipeline.read_params_file(path) == yaml.safe_load(merged)
    assert pipeline.load_params("verify@transformer", params_file=path) == pipeline.load_params(
        "verify@transformer", params_file=ROOT / "tests" / "params_tiny.yaml")  # every key overridden
    path.write_text(merged.replace("    <<: *verify_cnn\n", "    <<: *verify_cnn\n    inputs: 1\n", 1))
    with pytest.raises(pipeline.ParameterError, match="key 'inputs' is given twice.*Fix: keep one"):
        pipeline.read_params_file(path)  # an explicit key given twice is still refused


def test_params_that_are_not_utf8_are_refused_naming_the_file(tmp_path, capsys):
    path = tmp_path / "params.yaml"
    path.write_bytes("# Paramètres\n".encode("latin-1") + (ROOT / "tests" / "params_tiny.yaml").read_bytes())
    with pytest.raises(pipeline.ParameterError, match=f"{path} is not UTF-8 text.*Fix: save it as UTF-8"):
        pipeline.read_params_file(path)
    assert pipeline.main(["params", "train_cnn", "--params", str(path)]) == 1
    assert "is not UTF-8 text" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["outs: oops\n", "outs: []\n", "- 1\n", "", "outs: [{path: data}]\n",
                                  "outs: [{path: data\n", b"outs: \xe8\n"],
                         ids=["outs not a list", "no outs", "a list", "empty", "no hash", "broken", "not utf-8"])
def test_a_malformed_data_dvc_is_refused_naming_the_file(tmp_path, text):
    path = tmp_path / "data.dvc"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(pipeline.DataError, match=f"(?s){path}.*Fix: restore it .git checkout data.dvc."):
        pipeline.recorded_data_hash(tmp_path)
    path.unlink()
    with pytest.raises(pipeline.DataError, match="data.dvc is missing"):
        pipeline.recorded_data_hash(tmp_path)
    shutil.copy(ROOT / "data.dvc", path)
    assert pipeline.recorded_data_hash(tmp_path) == {key: yaml.safe_load(path.read_text())["outs"][0][key]
                                                     for key in ("md5", "size", "nfiles")}


def test_a_negative_seed_is_refused_with_the_parameters_not_by_numpy_in_a_late_stage(tmp_path):
    content = tiny_params()
    content["base"]["seed"] = -1
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(content, sort_keys=False))
    for stage in ("train_cnn", "influence@cnn"):
        with pytest.raises(pipeline.ParameterError, match=rf"(?s){path}.*seed .*is -1, but .*at least 0"):
            pipeline.load_params(stage, params_file=path)


def test_a_negative_thread_count_is_refused_not_taken_for_torchs_default(tmp_path):
    content = tiny_params()
    content["base"]["threads"] = -3
    content["train_cnn"].pop("threads")
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(content, sort_keys=False))
    with pytest.raises(pipeline.ParameterError, match=rf"(?s){path}.*threads .*is -3, but it must be at least 0"):
        pipeline.load_params("train_cnn", params_file=path)
    params = pipeline.load_params("train_cnn", params_file=ROOT / "tests" / "params_tiny.yaml")
    params.pop("device")
    for call in (pipeline.make_config, lambda stage, values: pipeline.apply_base(values)):
        with pytest.raises(ex.InputError, match="threads .*is -3"):
            call("train_cnn", {**params, "threads": -3})
    content["base"]["threads"] = 0  # 0: torch's default, as before
    path.write_text(yaml.safe_dump(content, sort_keys=False))
    assert pipeline.load_params("train_cnn", params_file=path)["threads"] == 0


def test_group_ticks_mark_each_label_groups_edges_centre_and_label():
    # groups 0: cells 0-2, 1: cells 3-4, 2: cell 5 (imshow centres cell i at i)
    labels = np.array([0, 0, 0, 1, 1, 2])
    edges, centres, names = stages.group_ticks(labels)
    np.testing.assert_array_equal(edges, [2.5, 4.5])
    np.testing.assert_array_equal(centres, [1.0, 3.5, 5.0])
    np.testing.assert_array_equal(names, [0, 1, 2])
    # at most 2 labelled: every 2nd group (the edges stay all of them)
    edges, centres, names = stages.group_ticks(labels, most=2)
    np.testing.assert_array_equal(edges, [2.5, 4.5])
    np.testing.assert_array_equal(centres, [1.0, 5.0])
    np.testing.assert_array_equal(names, [0, 2])
    edges, centres, names = stages.group_ticks(np.array([7, 7]))  # one group: no edge
    assert len(edges) == 0 and list(centres) == [0.5] and list(names) == [7]
    with pytest.raises(ex.InputError, match="sorted into groups"):
        stages.group_ticks(np.array([0, 1, 0]))


# --- the influence stage's studies on a tiny Transformer run ------------------------------

# no weight decay: a data cube's scores alone add up to the change of each output
TINY = TransformerConfig(p=7, train_size=15, val_size=10, d_model=8, n_heads=2, d_mlp=16, lr=1e-2, weight_decay=0.0,
                         max_steps=6, seed=0)
STUDY = validation.InfluenceConfig(model="transformer", splits=2, score_inputs=3, min_fraction=0.1, max_fraction=0.5,
                                   fractions=2, protected=("unembedding",), quadrature=2, breakpoints=True,
                                   tolerance=1.0, lds_subsets=3, lds_inputs=4, lds_steps=3, lds_quadrature=4,
                                   bootstrap=5, confidence=0.9)


@pytest.fixture(scope="module")
def tiny_transformer(tmp_path_factory):
    """A recorded 6-step full-batch AdamW run, as stages.load_run rebuilds it."""
    path = tmp_path_factory.mktemp("influence") / "history"
    model = train_transformer(TINY, history_dir=path, progress=False).model
    data = modular_addition(TINY.p, TINY.train_size, TINY.val_size, TINY.data_seed, TINY.only_a_ge_b)
    return stages.Run("transformer", TINY, model, ex.History(path), data.train_inputs, data.train_targets,
                      data.val_inputs, data.val_targets, "validation", dict(TRANSFORMER_COMPONENTS),
                      [str(r) for r in range(TINY.p)])


def loss_gradients(run, step: int, x, y) -> torch.Tensor:
    """[inputs, D]: each input's cross-entropy gradient at θ_step, the tensors in the history's order."""
    params = run.history.params(step)
    rows = []
    for xi, yi in zip(x, y):
        leaves = {name: value.clone().requires_grad_() for name, value in params.items()}
        log_probs = torch.func.functional_call(run.model, leaves, (xi[None],))
        grads = torch.autograd.grad(-log_probs[0, yi], [leaves[n] for n in run.history.layout.names])
        rows.append(torch.cat([g.flatten() for g in grads]))
    return torch.stack(rows)


def test_the_pruning_study_scores_each_split_on_its_score_part_and_evaluates_it_on_the_rest(tiny_transformer):
    """Per split (the seed's permutation of the 10 held-out inputs: 3 score, 7 evaluate): the
    Taylor criterion Σ_score |θ ⊙ ∇ℓ| and loss-change allocation (trapezoid over the recorded
    steps of the score part's summed loss), each kept at 10% and 50% of the weights outside the
    unembedding, give the accuracy and KL of the pruned final model on the evaluation part."""
    run = tiny_transformer
    result = validation.pruning_study(run, STUDY, seed=4, dtype=torch.float64, progress=False)
    names, n = run.history.layout.names, run.history.n_steps
    final = run.history.params(n)
    theta = torch.cat([final[name].flatten() for name in names])
    prunable = torch.cat([torch.full((final[name].numel(),), name != "unembed.weight") for name in names])
    pool = prunable.nonzero().squeeze(1)
    rng = np.random.default_rng(4)
    for split in range(2):
        order = rng.permutation(10)
        score, evaluation = np.sort(order[:3]), np.sort(order[3:])
        x, y = run.test_x[score], run.test_y[score]
        lca = sum(0.5 * (loss_gradients(run, s, x, y).sum(0) + loss_gradients(run, s + 1, x, y).sum(0))
                  * torch.cat([(run.history.params(s + 1)[m] - run.history.params(s)[m]).flatten() for m in names])
                  for s in range(n))
        criteria = {"taylor": (loss_gradients(run, n, x, y) * theta).abs().sum(0), "lca": -lca}
        with torch.no_grad():
            reference = run.model(run.test_x[evaluation])
        targets = run.test_y[evaluation]
        unpruned = result.unpruned.set_index("split").loc[split, "accuracy"]
        assert unpruned == (reference.argmax(-1) == targets).double().mean().item()
        curves = result.curves[(result.curves["split"] == split) & (result.curves["protocol"] == "global")]
        for criterion, scores in criteria.items():
            for fraction in (0.1, 0.5):
                keep = ~prunable.clone()
                # ties (coordinates that never moved score 0) keep the lower index, as pruning.keep_mask does
                ranked = pool[torch.argsort(scores[pool], descending=True, stable=True)]
                keep[ranked[:round(fraction * len(pool))]] = True
                pruned_theta = (theta * keep).split([final[m].numel() for m in names])
                pruned_params = {m: v.view_as(final[m]) for m, v in zip(names, pruned_theta)}
                with torch.no_grad():
                    pruned = torch.func.functional_call(run.model, pruned_params, (run.test_x[evaluation],))
                row = curves[(curves["criterion"] == criterion) & np.isclose(curves["fraction"], fraction)]
                assert len(row) == 1
                assert row["accuracy"].item() == (pruned.argmax(-1) == targets).double().mean().item()
                kl = (reference.exp() * (reference - pruned)).sum(-1).mean().item()
                assert kl > 1e-3 and row["kl"].item() == pytest.approx(kl, rel=1e-9), (split, criterion, fraction)


def test_the_datamodel_study_predicts_each_subset_from_its_members_scores(tiny_transformer):
    """ExPLAIND's data scores of the first 3 steps add up, per input, to the change of its
    true-class log-probability over them (no weight decay; kinks located); every method's
    prediction for a subset is the sum of its members' scores, and the LDS is scipy's Spearman
    correlation of the retrained outputs with those predictions."""
    run = tiny_transformer
    result = validation.datamodel_study(run, STUDY, "unused", seed=1, dtype=torch.float64, progress=False)
    assert result.steps == (0, 3)
    x, y = run.test_x[:4], run.test_y[:4]
    with torch.no_grad():
        before, after = (torch.func.functional_call(run.model, run.history.params(s), (x,)).gather(1, y[:, None])
                         .squeeze(1).numpy() for s in (0, 3))
    change = after - before
    np.testing.assert_allclose(result.scores["explaind"].sum(0), change, rtol=0, atol=1e-6 * np.abs(change).max())
    subsets = result.subsets.numpy()
    assert subsets.shape == (3, 15) and (subsets.sum(1) == 8).all()  # round(0.5 * 15) of the 15 pairs
    for method, scores in result.scores.items():
        members = np.array([[scores[subsets[r], i].sum() for i in range(4)] for r in range(3)])
        np.testing.assert_allclose(result.predicted[method], members, rtol=1e-12, atol=1e-15)
        expected = [scipy.stats.spearmanr(result.actual[:, i], members[:, i]).statistic for i in range(4)]
        np.testing.assert_allclose(result.per_input[method], expected, rtol=1e-12)


# --- what the cubes stage's plots and summary read ------------------------------------------


def test_the_kernel_order_sorts_the_cubes_own_samples_by_label_keeping_ties_in_order():
    run = types.SimpleNamespace(train_y=torch.tensor([1, 0, 1, 0, 2]), test_y=torch.tensor([2, 1, 0, 1]))
    cube = xr.Dataset(coords={"train": [2, 3, 0], "test": [0, 1]})  # labels 1, 0, 1 and 2, 1
    train_order, test_order = stages.kernel_order(run, cube)
    np.testing.assert_array_equal(train_order, [1, 0, 2])
    np.testing.assert_array_equal(test_order, [1, 0])


def test_the_same_label_share_is_of_the_positive_influence_only():
    scores = np.array([[2.0, -1.0], [1.0, 3.0], [-4.0, 1.0]])  # [train, test]
    train_labels, test_labels = np.array([0, 0, 1]), np.array([0, 1])
    # positive: 2 and 1 (train 0, 1 on test 0, same label), 3 (train 1 on test 1, other), 1 (train 2 on test 1, same)
    assert stages.same_label_share(scores, train_labels, test_labels) == pytest.approx(4 / 7, abs=1e-15)
    assert np.isnan(stages.same_label_share(-np.abs(scores), train_labels, test_labels))  # no positive influence
