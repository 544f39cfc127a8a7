"""The reproducible pipeline: explaind.pipeline, params files, dvc.yaml, data.dvc, and an
end-to-end `dvc repro` of the whole pipeline at tiny parameters in a copy of the repository."""

from __future__ import annotations

import ast
import json
import math
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from explaind import grokking, pipeline
from explaind.errors import InputError
from explaind.pipeline import ParameterError
from repo_copy import BIN, dvc, run_cli

ROOT = Path(__file__).resolve().parents[1]


def write_yaml(path: Path, content: dict) -> Path:
    path.write_text(yaml.safe_dump(content, sort_keys=False))
    return path


@pytest.fixture
def no_pinned_root(monkeypatch):
    monkeypatch.delenv(pipeline.ROOT_ENV, raising=False)


# --- repo_root ----------------------------------------------------------------------------


def test_repo_root_is_found_from_any_subfolder(no_pinned_root):
    assert pipeline.repo_root(ROOT / "notebooks") == ROOT
    assert pipeline.repo_root(ROOT / "explaind") == ROOT


def test_repo_root_uses_the_working_directory_not_the_package(no_pinned_root, tmp_path, monkeypatch):
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "params.yaml").write_text("base: {}\n")
    (tmp_path / "notebooks").mkdir()
    monkeypatch.chdir(tmp_path / "notebooks")
    assert pipeline.repo_root() == tmp_path


def test_repo_root_can_be_pinned(tmp_path, monkeypatch):
    monkeypatch.setenv(pipeline.ROOT_ENV, str(tmp_path))
    assert pipeline.repo_root("/") == tmp_path.resolve()
    monkeypatch.setenv(pipeline.ROOT_ENV, str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="EXPLAIND_ROOT"):
        pipeline.repo_root()


def test_repo_root_outside_a_repository_says_how_to_fix_it(no_pinned_root, tmp_path):
    with pytest.raises(FileNotFoundError, match="EXPLAIND_ROOT"):
        pipeline.repo_root(tmp_path)


@pytest.mark.parametrize("only", ["dvc.yaml", "params.yaml"])
def test_repo_root_needs_both_dvc_yaml_and_params_yaml(no_pinned_root, tmp_path, only):
    """A folder with one of them (a lone params file, another DVC project) is not the root."""
    (tmp_path / "sub").mkdir()
    (tmp_path / only).write_text("{}\n")
    with pytest.raises(FileNotFoundError, match=rf"no folder above {re.escape(str((tmp_path / 'sub').resolve()))} "
                                                r"holds dvc.yaml and params.yaml"):
        pipeline.repo_root(tmp_path / "sub")


def test_the_pinned_root_is_undone_after_the_stage(tmp_path, monkeypatch):
    """run_stage pins $EXPLAIND_ROOT for the kernel only: a later call in the same process finds
    its own root again."""
    monkeypatch.delenv(pipeline.ROOT_ENV, raising=False)
    with pipeline._pinned_root(tmp_path):
        assert os.environ[pipeline.ROOT_ENV] == str(tmp_path)
    assert pipeline.ROOT_ENV not in os.environ
    monkeypatch.setenv(pipeline.ROOT_ENV, "/elsewhere")
    with pipeline._pinned_root(tmp_path):
        assert os.environ[pipeline.ROOT_ENV] == str(tmp_path)
    assert os.environ[pipeline.ROOT_ENV] == "/elsewhere"


def test_stage_paths_resolve_from_the_root(tmp_path):
    paths = pipeline.stage_paths("train_transformer", tmp_path)
    assert paths.notebook == tmp_path.resolve() / "results/train_transformer/notebook.ipynb"
    assert paths.history == tmp_path.resolve() / "runs/transformer/history"
    assert paths.metrics == tmp_path.resolve() / "reports/train_transformer/metrics.json"
    with pytest.raises(ParameterError, match="unknown stage 'train_gpt'"):
        pipeline.stage_paths("train_gpt", tmp_path)


def test_per_model_stages_have_an_instance_per_model(tmp_path):
    assert pipeline.stage_instances() == ["train_cnn", "train_transformer", "verify@cnn", "verify@transformer",
                                          "cubes@cnn", "cubes@transformer", "influence@cnn", "influence@transformer",
                                          "grokking"]
    paths = pipeline.stage_paths("cubes@transformer", tmp_path)
    assert paths.notebook == tmp_path.resolve() / "results/cubes/transformer/notebook.ipynb"
    assert paths.metrics == tmp_path.resolve() / "reports/cubes/transformer/metrics.json"
    assert paths.history == tmp_path.resolve() / "runs/transformer/history"
    assert paths.store == tmp_path.resolve() / "results/cubes/transformer/cubes"
    assert paths.model_name == "transformer"
    with pytest.raises(ParameterError, match="verify@cnn, verify@transformer"):
        pipeline.stage_paths("verify", tmp_path)
    with pytest.raises(ParameterError, match="not 'gpt'"):
        pipeline.stage_paths("verify@gpt", tmp_path)


def test_a_per_model_stage_reads_its_model_section_and_gets_the_model_from_its_name(tmp_path, tiny_params):
    params = pipeline.load_params("verify@transformer", params_file=ROOT / "tests" / "params_tiny.yaml")
    assert params["model"] == "transformer" and params["quadrature"] == tiny_params["verify"]["transformer"]["quadrature"]
    bad = {**tiny_params, "verify": {**tiny_params["verify"], "cnn": {**tiny_params["verify"]["cnn"], "model": "cnn"}}}
    write_yaml(tmp_path / "params.yaml", bad)
    with pytest.raises(ParameterError, match="remove 'model' from section 'verify.cnn'"):
        pipeline.load_params("verify@cnn", root=tmp_path)
    del bad["verify"]["transformer"]
    write_yaml(tmp_path / "params.yaml", bad)
    with pytest.raises(ParameterError, match="no section 'verify.transformer'"):
        pipeline.load_params("verify@transformer", root=tmp_path)


# --- parameter checking -------------------------------------------------------------------


@pytest.mark.parametrize("stage", pipeline.stage_instances())
def test_params_yaml_is_valid_for_every_stage(stage):
    params = pipeline.load_params(stage, root=ROOT)
    assert set(params) == set(pipeline.stage_schema(stage))
    pipeline.make_config(stage, params)  # the config dataclass accepts them


def test_load_params_converts_yaml_values_to_the_declared_types():
    params = pipeline.load_params("train_cnn", root=ROOT)
    assert isinstance(params["classes"], tuple) and all(isinstance(c, int) for c in params["classes"])
    assert isinstance(params["lr"], float) and isinstance(params["epochs"], int)


def valid(stage: str) -> dict:
    return pipeline.load_params(stage, params_file=ROOT / "tests" / "params_tiny.yaml")


def test_an_unknown_parameter_is_an_error_naming_it_and_the_fix():
    values = valid("train_transformer") | {"weight_decy": 1.0}
    with pytest.raises(ParameterError) as error:
        pipeline.check_params(values, "train_transformer", source="params.yaml")
    message = str(error.value)
    assert "unknown parameter 'weight_decy'" in message
    assert "did you mean 'weight_decay'?" in message
    assert "Fix: rename or remove it" in message and "params.yaml" in message


def test_a_string_where_an_int_is_expected_is_an_error_with_type_and_fix():
    values = valid("train_transformer") | {"max_steps": "many"}
    with pytest.raises(ParameterError, match=r"'max_steps' must be int, got str 'many'.*Fix: give a value of type int"):
        pipeline.check_params(values, "train_transformer")


@pytest.mark.parametrize("text, written", [("1e-3", "1.0e-3"), ("1.0e3", "1.0e+3"), ("2E5", "2.0e+5")])
def test_yaml_11_exponent_without_dot_or_sign_gets_a_specific_hint(text, written):
    # PyYAML (YAML 1.1) reads these as strings: a float needs a dot and a signed exponent
    content = yaml.safe_load(f"lr: {text}\n")
    assert content["lr"] == text
    with pytest.raises(ParameterError, match=rf"'lr' must be float, got str '{text}'.*write {re.escape(written)}:"):
        pipeline.check_params(valid("train_transformer") | content, "train_transformer")
    assert yaml.safe_load(f"lr: {written}\n")["lr"] == float(text)  # the hint's spelling is a float


def test_a_quoted_number_is_told_to_lose_its_quotes():
    with pytest.raises(ParameterError, match=r"'max_steps' must be int, got str '5'.*write it as a number, without quotes"):
        pipeline.check_params(valid("train_transformer") | {"max_steps": "5"}, "train_transformer")


def test_a_yaml_syntax_error_is_one_error_naming_the_line(tmp_path, capsys):
    path = tmp_path / "params.yaml"
    path.write_text("base:\n  seed: 0\n  device: [cpu\n")
    with pytest.raises(ParameterError, match="(?s)params.yaml is not valid YAML.*line 3.*Fix: mend the file"):
        pipeline.read_params_file(path)
    assert pipeline.main(["params", "train_cnn", "--params", str(path)]) == 1
    assert capsys.readouterr().err.startswith("error: ")


def test_version(capsys):
    with pytest.raises(SystemExit) as stop:
        pipeline.main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.startswith("explaind ")


def test_an_int_is_accepted_where_a_float_is_expected_and_converted():
    checked = pipeline.check_params(valid("train_transformer") | {"weight_decay": 4}, "train_transformer")
    assert checked["weight_decay"] == 4.0 and isinstance(checked["weight_decay"], float)


def test_a_float_is_refused_where_an_int_is_expected():
    with pytest.raises(ParameterError, match=r"'p' must be int, got float 113\.0.*write 113"):
        pipeline.check_params(valid("train_transformer") | {"p": 113.0}, "train_transformer")


def test_a_bool_is_not_a_number():
    with pytest.raises(ParameterError, match=r"'epochs' must be int, got bool True.*not true/false"):
        pipeline.check_params(valid("train_cnn") | {"epochs": True}, "train_cnn")
    with pytest.raises(ParameterError, match=r"'lr' must be float, got bool False.*not true/false"):
        pipeline.check_params(valid("train_cnn") | {"lr": False}, "train_cnn")


def test_tuples_accept_lists_of_the_right_length_and_item_types():
    assert pipeline.check_params(valid("train_cnn") | {"classes": [1, 7]}, "train_cnn")["classes"] == (1, 7)
    for wrong in ([1, 2, 3], [1, "7"], 3):
        with pytest.raises(ParameterError, match="'classes' must be a list of 2 values"):
            pipeline.check_params(valid("train_cnn") | {"classes": wrong}, "train_cnn")


def test_a_choice_outside_its_options_names_the_options():
    with pytest.raises(ParameterError, match=r"'dtype' must be one of 'float32' / 'float64', got str 'float16'"):
        pipeline.check_params(valid("train_cnn") | {"dtype": "float16"}, "train_cnn")


def test_every_problem_is_reported_at_once():
    values = valid("train_cnn") | {"epochs": "2", "widht": 8}
    del values["flip"]
    with pytest.raises(ParameterError) as error:
        pipeline.check_params(values, "train_cnn")
    message = str(error.value)
    assert message.startswith("3 problem(s)")
    assert "'epochs'" in message and "'widht'" in message and "'flip' (bool) is missing" in message


def test_params_file_problems(tmp_path):
    tiny = yaml.safe_load((ROOT / "tests" / "params_tiny.yaml").read_text())
    with pytest.raises(ParameterError, match="no section 'train_cnn'"):
        pipeline.load_params("train_cnn", params_file=write_yaml(tmp_path / "a.yaml", {"base": tiny["base"]}))
    bad_base = {**tiny, "base": {**tiny["base"], "lr": 0.1}}
    with pytest.raises(ParameterError, match=r"unknown key\(s\) \['lr'\] in section 'base'"):
        pipeline.load_params("train_cnn", params_file=write_yaml(tmp_path / "b.yaml", bad_base))
    override = {**tiny, "train_cnn": {**tiny["train_cnn"], "dtype": "float32"}}
    assert pipeline.load_params("train_cnn", params_file=write_yaml(tmp_path / "c.yaml", override))["dtype"] == "float32"


def test_notebook_params_refuses_injected_names_and_ignores_ipython_names():
    before = {"pipeline", "__name__", "In", "Out"}
    namespace = {name: None for name in before} | valid("train_cnn") | {"_": 1, "_i3": "x", "__annotations__": {}}
    assert pipeline.notebook_params("train_cnn", namespace, before)["width"] == 2
    with pytest.raises(ParameterError, match=r"unknown parameter 'epoch' \(did you mean 'epochs'\?\) in notebook"):
        pipeline.notebook_params("train_cnn", namespace | {"epoch": 3}, before)


def test_apply_base_sets_torchs_threads_but_for_0(monkeypatch):
    """threads: 1 is the robust CPU setting (not torch's default of one per core); 0 leaves torch's."""
    import torch

    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    for threads in (1, 0, 3):
        pipeline.apply_base({"seed": 0, "threads": threads})
    assert calls == [1, 3]


# --- metrics and plots --------------------------------------------------------------------


def test_write_metrics_writes_plain_sorted_json(tmp_path):
    path = pipeline.write_metrics(tmp_path / "sub" / "metrics.json",
                                  {"b": np.float64(0.5), "a": 3, "never": float("nan"), "nested": {"x": np.int64(2)}})
    text = path.read_text()
    assert json.loads(text) == {"a": 3, "b": 0.5, "never": None, "nested": {"x": 2}}
    assert text.index('"a"') < text.index('"b"') and text.endswith("\n") and "NaN" not in text
    with pytest.raises(TypeError, match="not a number or text"):
        pipeline.write_metrics(tmp_path / "bad.json", {"model": object()})


def test_write_plot_csv_round_trips_and_needs_the_x_column(tmp_path):
    frame = pd.DataFrame({"step": [0, 1, 2], "train_loss": [1.0, 0.5, 1 / 3]})
    path = pipeline.write_plot_csv(tmp_path / "curves.csv", frame)
    assert path.read_text().splitlines()[0] == "step,train_loss"
    pd.testing.assert_frame_equal(pd.read_csv(path), frame)
    with pytest.raises(ValueError, match="needs an 'step' column"):
        pipeline.write_plot_csv(tmp_path / "bad.csv", frame.drop(columns="step"))


def test_grokking_steps_keeps_only_reached_phases():
    steps = pipeline.grokking_steps({"t_mem": 120.0, "t_val_95": float("nan"), "t_val_100": None})
    assert steps == {"memorisation (train acc 100%)": 120.0}


# --- data/ and data.dvc -------------------------------------------------------------------


def test_dir_hash_matches_dvc_own(tmp_path):
    """Our implementation of DVC's directory hash agrees with `dvc add` on a nested folder."""
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "b.bin").write_bytes(bytes(range(256)) * 3)
    (tmp_path / "d" / "sub" / "a.txt").write_text("line\r\nwindows line ending stays\n")
    (tmp_path / "d" / "Z.txt").write_text("upper case sorts first")
    subprocess.run([BIN / "dvc", "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    subprocess.run([BIN / "dvc", "add", "-q", "d"], cwd=tmp_path, check=True)
    recorded = yaml.safe_load((tmp_path / "d.dvc").read_text())["outs"][0]
    assert pipeline.dvc_dir_hash(tmp_path / "d") == {k: recorded[k] for k in ("md5", "size", "nfiles")}


def test_the_export_rebuilds_data_byte_identically_to_data_dvc(digits_data):
    """A machine without the DVC remote rebuilds data/ to exactly the recorded hashes."""
    assert pipeline.dvc_dir_hash(digits_data) == pipeline.recorded_data_hash(ROOT)


def test_check_data_names_the_changed_file(tmp_path, digits_data):
    shutil.copytree(digits_data, tmp_path / "data")
    shutil.copy(ROOT / "data.dvc", tmp_path / "data.dvc")
    assert pipeline.check_data(tmp_path)["nfiles"] == 2
    labels = tmp_path / "data" / "digits" / "labels.npy"
    labels.write_bytes(labels.read_bytes()[:-1] + b"\x07")
    cache = tmp_path / ".dvc" / "cache" / "files" / "md5"
    recorded = pipeline.recorded_data_hash(tmp_path)["md5"]
    (cache / recorded[:2]).mkdir(parents=True)
    listing = pipeline.dir_listing(digits_data)
    (cache / recorded[:2] / recorded[2:]).write_text(json.dumps(listing))
    with pytest.raises(pipeline.DataError, match=r"(?s)changed: digits/labels\.npy.*dvc commit data\.dvc"):
        pipeline.check_data(tmp_path)
    shutil.rmtree(tmp_path / "data")
    with pytest.raises(pipeline.DataError, match="make data"):
        pipeline.check_data(tmp_path)


def test_check_data_names_a_missing_and_an_extra_file(tmp_path, digits_data):
    shutil.copytree(digits_data, tmp_path / "data")
    shutil.copy(ROOT / "data.dvc", tmp_path / "data.dvc")
    (tmp_path / "data" / "digits" / "labels.npy").rename(tmp_path / "data" / "digits" / "labels.old")
    recorded = pipeline.recorded_data_hash(tmp_path)["md5"]
    listing = tmp_path / ".dvc" / "cache" / "files" / "md5" / recorded[:2] / recorded[2:]
    listing.parent.mkdir(parents=True)
    listing.write_text(json.dumps(pipeline.dir_listing(digits_data)))
    with pytest.raises(pipeline.DataError) as error:
        pipeline.check_data(tmp_path)
    lines = str(error.value).splitlines()
    assert lines[1:3] == ["  missing: digits/labels.npy", "  extra: digits/labels.old"]


def test_a_data_dvc_that_tracks_another_folder_is_refused(tmp_path):
    record = yaml.safe_load((ROOT / "data.dvc").read_text())
    record["outs"][0]["path"] = "dataset"
    write_yaml(tmp_path / "data.dvc", record)
    with pytest.raises(pipeline.DataError, match=r"^data\.dvc tracks 'dataset', expected 'data'$"):
        pipeline.recorded_data_hash(tmp_path)


def test_check_data_reads_the_listing_from_dvcs_configured_cache(tmp_path, digits_data):
    """A cache moved elsewhere (`dvc cache dir --local`) is where the listing is looked up."""
    shutil.copytree(digits_data, tmp_path / "data")
    shutil.copy(ROOT / "data.dvc", tmp_path / "data.dvc")
    subprocess.run([BIN / "dvc", "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    subprocess.run([BIN / "dvc", "cache", "dir", "--local", str(tmp_path / "elsewhere")], cwd=tmp_path, check=True)
    labels = tmp_path / "data" / "digits" / "labels.npy"
    labels.write_bytes(labels.read_bytes()[:-1] + b"\x07")
    recorded = pipeline.recorded_data_hash(tmp_path)["md5"]
    listing = tmp_path / "elsewhere" / "files" / "md5" / recorded[:2] / recorded[2:]
    listing.parent.mkdir(parents=True)
    listing.write_text(json.dumps(pipeline.dir_listing(digits_data)))
    with pytest.raises(pipeline.DataError, match=r"(?s)changed: digits/labels\.npy"):
        pipeline.check_data(tmp_path)


# --- profiles, notebooks and dvc.yaml agree -----------------------------------------------


def test_paper_profile_is_the_papers_configuration(tmp_path):
    from explaind.training import CNNConfig, TransformerConfig

    for stage, cls in (("train_cnn", CNNConfig), ("train_transformer", TransformerConfig)):
        # root: a folder without data/ (this checkout's may hold the CPU profile's digits, not CIFAR-10)
        params = pipeline.load_params(stage, params_file=ROOT / "params_paper.yaml", root=tmp_path)
        params.pop("device")  # cuda: make_config refuses a device this machine lacks (the stage runs there)
        assert pipeline.make_config(stage, params) == cls.paper(), f"params_paper.yaml {stage} != {cls.__name__}.paper()"
    assert pipeline.load_params("train_transformer", params_file=ROOT / "params_paper.yaml")["p"] == 113


def keys(tree: dict, prefix: str = "") -> set[str]:
    """Every key path of a params file: train_cnn.lr, verify.cnn.inputs, ..."""
    return {path for key, value in tree.items()
            for path in (keys(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}"})}


def test_all_params_files_have_the_same_keys(tmp_path):
    shapes = {name: keys(pipeline.read_params_file(ROOT / name))
              for name in ("params.yaml", "params_paper.yaml", "tests/params_tiny.yaml")}
    assert shapes["params.yaml"] == shapes["params_paper.yaml"] == shapes["tests/params_tiny.yaml"]
    for name in shapes:  # and every stage instance loads from each of them (data/ aside: see the paper profile's test)
        for stage in pipeline.stage_instances():
            pipeline.load_params(stage, params_file=ROOT / name, root=tmp_path)


def test_a_profile_is_checked_for_this_machines_device_before_a_run_starts(tmp_path, tiny_params, monkeypatch,
                                                                           capsys):
    """`make repro-paper` on a machine without a GPU stops before `dvc exp run` writes the profile
    into params.yaml and deletes the stages' outputs; `make repro` checks every stage before the first."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same on a machine with a GPU
    path = write_yaml(tmp_path / "params.yaml", {**tiny_params, "base": {**tiny_params["base"], "device": "cuda"}})
    for call in (lambda: pipeline.set_args(path), lambda: pipeline.check_profile(path)):
        # worded for a params file, not for a library call (`pass device='cpu'`)
        with pytest.raises(ParameterError, match=rf"{path} \(stage train_cnn\): .*this torch sees 0 CUDA device.*"
                                                 r"Fix: set device: cpu \("):
            call()
    assert pipeline.set_args(path, here=False)  # a GPU machine's profile, read on another machine
    assert pipeline.main(["check", str(path)]) == 1 and "0 CUDA device" in capsys.readouterr().err
    assert pipeline.main(["check", str(ROOT / "tests" / "params_tiny.yaml")]) == 0
    assert f"the parameters of {len(pipeline.stage_instances())} stages" in capsys.readouterr().out


def test_a_profile_of_some_stages_is_checked_for_those_stages(tmp_path, tiny_params, capsys):
    """A profile may hold only some stages' sections: `dvc exp run -S` changes those, and leaves
    the others' as params.yaml has them."""
    sections = ("base", "train_transformer", "verify")
    path = write_yaml(tmp_path / "some.yaml", {key: tiny_params[key] for key in sections})
    assert pipeline.check_profile(path) == ["train_transformer", "verify@cnn", "verify@transformer"]
    assert {arg.split(".")[0] for arg in pipeline.set_args(path)[1::2]} == set(sections)
    assert pipeline.main(["check", str(path)]) == 0
    assert capsys.readouterr().out == f"{path}: the parameters of 3 stages and their devices pass\n"


def test_check_without_a_profile_checks_the_roots_params_yaml(tmp_path, tiny_params, monkeypatch, capsys):
    path = write_yaml(tmp_path / "params.yaml", tiny_params)
    monkeypatch.setenv(pipeline.ROOT_ENV, str(tmp_path))
    assert pipeline.main(["check"]) == 0
    assert capsys.readouterr().out == (f"{path.resolve()}: the parameters of {len(pipeline.stage_instances())} "
                                       "stages and their devices pass\n")
    write_yaml(path, {**tiny_params, "base": {**tiny_params["base"], "seed": -1}})
    assert pipeline.main(["check"]) == 1
    assert f"{path.resolve()} (sections 'base' + 'train_cnn'): seed" in capsys.readouterr().err


def test_set_args_covers_every_key_of_a_profile(tmp_path):
    # a copy in a folder without data/ (this checkout's may hold the CPU profile's digits, not CIFAR-10)
    args = pipeline.set_args(shutil.copy(ROOT / "params_paper.yaml", tmp_path), here=False)
    pairs = dict(arg.split("=", 1) for arg in args[1::2])
    assert args[::2] == ["-S"] * len(pairs)
    assert pairs["train_transformer.p"] == "113" and pairs["train_cnn.classes"] == "[3,5]"
    assert pairs["train_transformer.eps"] == "1.0e-08" and pairs["train_cnn.flip"] == "true"
    assert pairs["verify.transformer.breakpoints"] == "true"
    for key, text in pairs.items():  # each value reads back as the same YAML value
        expected = pipeline.read_params_file(ROOT / "params_paper.yaml")
        for part in key.split("."):
            expected = expected[part]
        assert yaml.safe_load(text) == expected


def parameters_cell(notebook: Path):
    import nbformat

    cells = nbformat.read(notebook, as_version=4).cells
    tagged = [i for i, cell in enumerate(cells) if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{notebook} needs exactly one cell tagged 'parameters'"
    return cells, tagged[0]


@pytest.mark.parametrize("stage", sorted(pipeline.STAGES))
def test_notebook_parameters_cell_declares_the_stage_schema(stage):
    """The defaults cell holds exactly the stage's parameters, each of its declared type, and is
    framed by the snapshot before it and the check right after it."""
    cells, index = parameters_cell(ROOT / pipeline.STAGES[stage].notebook)
    namespace: dict = {}
    exec(cells[index].source, namespace)
    defaults = {k: v for k, v in namespace.items() if not k.startswith("_")}
    pipeline.check_params(defaults, stage, source="the parameters cell")  # no unknown, missing, mistyped
    assert "_names_before_parameters = set(globals())" in cells[index - 1].source
    assert f'pipeline.notebook_params("{stage}", globals(), _names_before_parameters)' in cells[index + 1].source
    for line in cells[index].source.splitlines():  # every default is typed and commented
        if line and not line.startswith("#"):
            assert ": " in line.split("=")[0] and "  # " in line, f"untyped or uncommented: {line!r}"


@pytest.mark.parametrize("stage", sorted(pipeline.STAGES))
def test_papermill_parses_every_parameter(stage, caplog):
    """papermill's own parser (used for `papermill --help-notebook` and its warnings) reads every
    default; quotes in a comment would make it skip the line and warn about unknown parameters."""
    import papermill

    found = papermill.inspect_notebook(str(ROOT / pipeline.STAGES[stage].notebook))
    assert set(found) == set(pipeline.stage_schema(stage))
    assert "Unable to parse" not in caplog.text


def module_imports(path: Path) -> set[str]:
    """explaind modules a module imports (relative imports of the package)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:  # from .x import y, from . import x
            modules = [node.module.split(".")[0]] if node.module else [alias.name for alias in node.names]
            names.update(m for m in modules if (ROOT / "explaind" / f"{m}.py").is_file())
    return names


def imported_modules(*roots: str) -> set[str]:
    """explaind modules the given modules import, transitively, but for those that cannot change
    an output (errors: exception types and messages; phases: profiler labels)."""
    todo, seen = list(roots), set()
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += module_imports(ROOT / "explaind" / f"{module}.py")
    return seen - {"errors", "phases"}


def notebook_imports(path: Path) -> set[str]:
    """explaind modules a notebook's code cells import (`import explaind` brings what the
    package's __init__ imports)."""
    code = "\n".join("".join(cell["source"]) for cell in json.loads(path.read_text())["cells"]
                     if cell["cell_type"] == "code")
    names = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.ImportFrom) and node.module == "explaind":  # from explaind import x
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("explaind."):
            names.add(node.module.split(".")[1])  # from explaind.x import y
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "explaind":
                    names |= module_imports(ROOT / "explaind" / "__init__.py")
                elif alias.name.startswith("explaind."):
                    names.add(alias.name.split(".")[1])
    return names


def test_dvc_yaml_stages_follow_the_stage_registry():
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    assert set(dvc["stages"]) == set(pipeline.STAGES)
    rel = lambda p: p.relative_to(ROOT).as_posix()  # noqa: E731
    for name, info in pipeline.STAGES.items():
        stage = dvc["stages"][name]
        if info.models:  # foreach over the models; check the stage as DVC expands it for each
            assert stage["foreach"] == list(info.models)
            instances = [(f"{name}@{m}", yaml.safe_load(yaml.safe_dump(stage["do"]).replace("${item}", m)))
                         for m in info.models]
        else:
            instances = [(name, stage)]
        for instance, spec in instances:
            paths = pipeline.stage_paths(instance, ROOT)
            section = instance.replace("@", ".")
            assert spec["cmd"] == f"python -m explaind.pipeline run {instance}"
            assert spec["params"] == ["base", section]
            assert info.notebook in spec["deps"] and "explaind/pipeline.py" in spec["deps"]
            assert rel(paths.notebook) in spec["outs"], "the executed notebook is an output"
            assert not any(dep.endswith("notebook.ipynb") for dep in spec["deps"]), "executed notebooks are never deps"
            run_files = {rel(paths.history), rel(paths.model), rel(paths.config)}
            if info.models or info.reads:  # an analysis stage reads the model's training outputs
                assert run_files <= set(spec["deps"])
            else:
                assert run_files <= set(spec["outs"])
            # what the notebook and its config's module run, no more: an extra dependency reruns
            # the stage for nothing, a missing one leaves stale results
            modules = imported_modules(*notebook_imports(ROOT / info.notebook),
                                       info.config.partition(":")[0].removeprefix("explaind."))
            assert spec["metrics"] == [{rel(paths.metrics): {"cache": False}}]
            plots = {file: options for plot in spec["plots"] for file, options in plot.items()}
            assert rel(paths.curves) in plots and plots[rel(paths.curves)]["cache"] is False
            assert all(options["cache"] is False for options in plots.values())
            # every stage runs pipeline.py, whose own helpers write outputs (save_run: config.json)
            modules |= imported_modules("pipeline")
            library = {dep for dep in spec["deps"] if dep.startswith("explaind/")}
            expected = {f"explaind/{m}.py" for m in modules}
            assert library == expected, (f"stage {instance}: dependencies missing {sorted(expected - library)}, "
                                         f"not run {sorted(library - expected)}")
    assert "results/verify/${item}/reconstruction.zarr" in dvc["stages"]["verify"]["do"]["outs"]
    assert "results/verify/${item}/reconstruction.zarr" in dvc["stages"]["cubes"]["do"]["deps"]
    assert "results/cubes/${item}/cubes" in dvc["stages"]["cubes"]["do"]["outs"]
    plotted = {file for plot in dvc["plots"] for spec in plot.values() for file in spec["y"]}
    training = {pipeline.stage_paths(s, ROOT).curves.relative_to(ROOT).as_posix() for s in ("train_cnn", "train_transformer")}
    pruning = {f"reports/influence/{m}/{name}" for m in pipeline.MODELS for name in ("curves.csv", "curves_layerwise.csv")}
    grokking_plots = {"reports/grokking/curves.csv", "reports/grokking/fourier.csv"}
    assert plotted == training | pruning | grokking_plots


def test_every_notebook_belongs_to_a_stage():
    notebooks = {p.relative_to(ROOT).as_posix() for p in (ROOT / "notebooks").glob("*.ipynb")}
    assert notebooks == {stage.notebook for stage in pipeline.STAGES.values()}


# --- the runner ---------------------------------------------------------------------------


def test_runner_refuses_a_stage_that_reads_missing_data_before_touching_its_outputs(tmp_path, tiny_params):
    """The CNN's stages read data/; without it the runner stops before the notebook empties the
    stage's outputs, naming `make data`. The Transformer's stages generate their pairs."""
    write_yaml(tmp_path / "params.yaml", tiny_params)
    shutil.copytree(ROOT / "notebooks", tmp_path / "notebooks")
    (tmp_path / "runs" / "cnn" / "history").mkdir(parents=True)
    (tmp_path / "runs" / "cnn" / "history" / "meta.json").write_text("{}")
    for stage in ("train_cnn", "verify@cnn", "cubes@cnn", "influence@cnn"):
        with pytest.raises(pipeline.DataError, match=rf"(?s)data does not exist.*{stage}.*make data"):
            pipeline.run_stage(stage, root=tmp_path)
    assert (tmp_path / "runs" / "cnn" / "history" / "meta.json").read_text() == "{}"
    assert not (tmp_path / "results").exists()
    assert [s for s in pipeline.stage_instances() if pipeline.reads_data(s)] == [
        "train_cnn", "verify@cnn", "cubes@cnn", "influence@cnn"]


def test_a_batch_larger_than_the_training_set_stops_the_stage_before_its_outputs_are_emptied(
        tmp_path, tiny_params, digits_data):
    """batch_size against the training images data/ holds: a range the data set, checked with the
    parameters, so the runner stops before the notebook empties the last run's history."""
    shutil.copytree(digits_data, tmp_path / "data")
    shutil.copytree(ROOT / "notebooks", tmp_path / "notebooks")
    history = tmp_path / "runs" / "cnn" / "history"
    history.mkdir(parents=True)
    (history / "meta.json").write_text("{}")
    for batch_size, refused in ((287, True), (286, False)):  # 357 images of 3 and 8; 71 (a fifth) held out
        write_yaml(tmp_path / "params.yaml", {**tiny_params, "train_cnn": {**tiny_params["train_cnn"],
                                                                           "batch_size": batch_size}})
        if refused:
            with pytest.raises(ParameterError, match=r"train_cnn\.batch_size is 287, but it must be at most the 286 "
                                                     r"training images of digits classes \[3, 8\].*Fix"):
                pipeline.run_stage("train_cnn", root=tmp_path)
        else:
            assert pipeline.load_params("train_cnn", root=tmp_path)["batch_size"] == 286
    assert (history / "meta.json").read_text() == "{}"


def test_params_are_checked_against_the_data_of_the_root_not_of_the_params_files_folder(
        tmp_path, tiny_params, digits_data):
    """A profile kept outside the repository (`load_params(params_file=..., root=...)`) is checked
    against the data/ its stages will read: the root's; a root without data/ leaves it to run_stage."""
    with_data, bare = tmp_path / "with_data", tmp_path / "bare"
    shutil.copytree(digits_data, with_data / "data")
    bare.mkdir()
    bad = {**tiny_params, "train_cnn": {**tiny_params["train_cnn"], "batch_size": 287}}  # 286 training images
    with pytest.raises(ParameterError, match=r"train_cnn\.batch_size is 287, but it must be at most the 286"):
        pipeline.load_params("train_cnn", params_file=write_yaml(bare / "params.yaml", bad), root=with_data)
    assert pipeline.load_params("train_cnn", params_file=write_yaml(with_data / "params.yaml", bad),
                                root=bare)["batch_size"] == 287


def test_runner_refuses_a_device_this_machine_lacks_before_it_looks_for_the_notebook(tmp_path, tiny_params,
                                                                                     monkeypatch):
    """The parameters take another machine's GPU (a profile is printable anywhere); a stage run here does not."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same on a machine with a GPU
    write_yaml(tmp_path / "params.yaml", {**tiny_params, "base": {**tiny_params["base"], "device": "cuda"}})
    with pytest.raises(ParameterError, match=r"^params\.yaml: device \(section 'base' or the stage's\) is 'cuda': "
                                             r"this torch sees 0 CUDA device.*Fix: set device: cpu"):
        pipeline.run_stage("train_transformer", root=tmp_path)
    assert not (tmp_path / "results").exists()


def test_runner_refuses_a_missing_kernel(tmp_path, tiny_params):
    write_yaml(tmp_path / "params.yaml", tiny_params)
    shutil.copytree(ROOT / "notebooks", tmp_path / "notebooks")
    with pytest.raises(pipeline.ExplaindError, match="kernel 'no-such-kernel' is not installed.*make setup"):
        pipeline.run_stage("train_transformer", root=tmp_path, kernel="no-such-kernel")


def test_runner_refuses_bad_params_before_starting_a_kernel(tmp_path, tiny_params):
    bad = {**tiny_params, "train_transformer": {**tiny_params["train_transformer"], "lrr": 0.1}}
    write_yaml(tmp_path / "params.yaml", bad)
    result = run_cli("run", "train_transformer", cwd=tmp_path, env={pipeline.ROOT_ENV: str(tmp_path)})
    assert result.returncode == 1
    assert "unknown parameter 'lrr' (did you mean 'lr'?)" in result.stderr
    assert not (tmp_path / "results").exists()


def test_a_failing_cell_fails_the_stage_with_the_notebooks_error(tmp_path, tiny_params):
    """... and the kernel is reached through sockets in a private folder, removed after the stage
    (on TCP ports, ipykernel 7 warns at every stage that they can be eavesdropped); the notebook's
    progress reaches a log."""
    write_yaml(tmp_path / "params.yaml", tiny_params)
    shutil.copytree(ROOT / "notebooks", tmp_path / "notebooks")
    notebook = tmp_path / "notebooks" / "02_train_transformer.ipynb"
    content = json.loads(notebook.read_text())
    content["cells"].append({"cell_type": "code", "execution_count": None, "id": "failing", "metadata": {},
                             "outputs": [], "source": ["raise ValueError('a cell that fails')"]})
    notebook.write_text(json.dumps(content))
    sockets = Path(tempfile.mkdtemp(dir="/tmp"))  # short enough for a socket's path (tmp_path may not be)
    result = run_cli("run", "train_transformer", cwd=tmp_path,
                     env={pipeline.ROOT_ENV: str(tmp_path), "TMPDIR": str(sockets)})
    assert result.returncode == 1, result.stdout + result.stderr
    assert "stage train_transformer failed in its notebook" in result.stderr
    assert "ValueError" in result.stderr and "a cell that fails" in result.stderr
    executed = (tmp_path / "results" / "train_transformer" / "notebook.ipynb").read_text()
    assert "a cell that fails" in executed  # kept, with the error, for reading
    assert "without encryption" not in result.stderr and "Kernel is running over TCP" not in result.stderr
    # stderr is no terminal: each cell's start and output are streamed to it, as to a log file
    assert "Executing Cell 5" in result.stderr and "update steps in" in result.stderr
    assert not list(sockets.glob("explaind-kernel-*"))
    shutil.rmtree(sockets)


def test_impossible_values_stop_the_stage_before_its_notebook(tmp_path, tiny_params):
    """Valid types, impossible values: refused when the parameters are read, so nothing runs."""
    bad = {**tiny_params, "train_transformer": {**tiny_params["train_transformer"], "train_size": 10_000}}
    write_yaml(tmp_path / "params.yaml", bad)
    shutil.copytree(ROOT / "notebooks", tmp_path / "notebooks")
    result = run_cli("run", "train_transformer", cwd=tmp_path, env={pipeline.ROOT_ENV: str(tmp_path)})
    assert result.returncode == 1, result.stdout + result.stderr
    assert "train_transformer.val_size" in result.stderr and "91 pairs" in result.stderr
    assert not (tmp_path / "results").exists() and not (tmp_path / "runs").exists()


def test_a_mistyped_papermill_parameter_stops_the_notebook(tmp_path):
    """Run by hand, bypassing the runner: the notebook's own check catches `-p` typos."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    (tmp_path / "results").mkdir()
    with pytest.raises(PapermillExecutionError) as error:
        papermill.execute_notebook(str(ROOT / "notebooks" / "02_train_transformer.ipynb"),
                                   str(tmp_path / "results" / "out.ipynb"), kernel_name=pipeline.KERNEL_NAME,
                                   parameters={"max_step": 3}, cwd=str(tmp_path), progress_bar=False)
    assert error.value.ename == "ParameterError"
    assert "unknown parameter 'max_step' (did you mean 'max_steps'?)" in error.value.evalue
    assert not (tmp_path / "runs").exists(), "nothing was trained"


# --- end to end ---------------------------------------------------------------------------


@pytest.mark.xdist_group("tiny_repro")  # on the worker that holds the shared run
def test_end_to_end_dvc_repro(tiny_repro, tmp_path):
    # tiny_repro: data/ rebuilt by the export (no remote), then `dvc repro` in a fresh-clone copy
    assert "data/ matches data.dvc" in tiny_repro.data.stdout
    first = tiny_repro.first
    copy = shutil.copytree(tiny_repro.root, tmp_path / "explaind", symlinks=True)  # changed below
    assert "up to date" in dvc(copy, "status", "data.dvc").stdout

    for stage in pipeline.stage_instances():
        assert f"Running stage '{stage}'" in first.stdout
        paths = pipeline.stage_paths(stage, copy)
        assert paths.notebook.is_file() and paths.model.is_file() and paths.config.is_file()
        assert (paths.history / "meta.json").is_file() and (paths.history / "manifest.jsonl").is_file()
        assert pd.read_csv(paths.curves).columns[0] == ("fraction" if stage.startswith("influence@") else "step")
        metrics = json.loads(paths.metrics.read_text())
        if stage.startswith("verify@"):
            assert metrics["agreement"] == 1.0 and metrics["relative_residual"] <= 0.1
        elif stage.startswith("cubes@"):
            assert {p.name for p in paths.store.iterdir()} == {"step_component_test.zarr", "train_test.zarr",
                                                               "step_component_output.zarr", "parameters.zarr"}
            assert metrics["tests"] == 4
        elif stage.startswith("influence@"):
            assert metrics["pruning"]["input_groups"] >= 1 and metrics["lds"]["retrainings"] == 4
            assert {"explaind", "tracin", "random"} <= set(metrics["lds"])
        elif stage == "grokking":
            assert len(metrics["phases"]) == 3 and set(metrics["swap"]) == set(grokking.SWAP_VARIANTS)
            assert set(metrics["retraining"]) == {"pipeline@12", "scratch"}
        else:
            assert metrics["steps"] > 0
    assert (copy / "dvc.lock").is_file()
    stamps = {p: p.stat().st_mtime_ns for p in copy.glob("results/*/notebook.ipynb")}

    second = dvc(copy, "repro")  # nothing changed: nothing reruns
    assert "Running stage" not in second.stdout
    assert "Data and pipelines are up to date" in second.stdout
    assert stamps == {p: p.stat().st_mtime_ns for p in copy.glob("results/*/notebook.ipynb")}
    assert "up to date" in dvc(copy, "status").stdout

    metrics = json.loads(dvc(copy, "metrics", "show", "--json").stdout)
    shown = next(iter(metrics.values()))["data"]
    for stage in ("train_cnn", "train_transformer"):
        values = shown[f"reports/{stage}/metrics.json"]["data"]
        assert math.isfinite(values["train_loss"]) and values["steps"] > 0
    for model in pipeline.MODELS:
        assert shown[f"reports/verify/{model}/metrics.json"]["data"]["agreement"] == 1.0

    dvc(copy, "plots", "show", "-o", "plots_html")
    html = (copy / "plots_html" / "index.html").read_text()
    assert "transformer_accuracy" in html and "cnn_loss" in html

    # a changed parameter reruns its stage and what reads that stage's outputs, nothing else:
    # cubes@transformer integrates with the verify stage's nodes, read from its reconstruction
    # (a middle stage, so that two stages rerun instead of the Transformer's five)
    tiny = pipeline.read_params_file(copy / "params.yaml")
    tiny["verify"]["transformer"]["quadrature"] = 3
    write_yaml(copy / "params.yaml", tiny)
    third = dvc(copy, "repro").stdout
    reran = {stage for stage in pipeline.stage_instances() if f"Running stage '{stage}'" in third}
    assert reran == {"verify@transformer", "cubes@transformer"}
    executed = json.loads(pipeline.stage_paths("verify@transformer", copy).notebook.read_text())
    injected = next(cell for cell in executed["cells"] if "injected-parameters" in cell["metadata"].get("tags", []))
    assert "quadrature = 3\n" in "".join(injected["source"])
    cubes = json.loads(pipeline.stage_paths("cubes@transformer", copy).metrics.read_text())
    assert cubes["train_test_verify_gap"] <= 1e-12  # the cube equals the new reconstruction


@pytest.mark.parametrize("stage, section, key, value", [
    ("train_transformer", "train_transformer", "max_steps", -5),
    ("train_transformer", "train_transformer", "max_steps", 0),  # the library's untrained model, no stage's
    ("train_transformer", "train_transformer", "n_heads", 3),
    ("train_cnn", "train_cnn", "batch_size", 0),
    ("verify@transformer", "verify.transformer", "quadrature", 0),
    ("cubes@cnn", "cubes.cnn", "step_bins", 0),
    ("influence@transformer", "influence.transformer", "lds_fraction", 1.5),
    ("grokking", "grokking", "phases", 100),
    ("grokking", "grokking", "min_phase_bins", 0),
])
def test_params_refuse_values_out_of_range_naming_key_and_file(tmp_path, stage, section, key, value):
    content = yaml.safe_load((ROOT / "tests" / "params_tiny.yaml").read_text())
    target = content
    for name in section.split("."):
        target = target[name]
    target[key] = value
    path = write_yaml(tmp_path / "params.yaml", content)
    with pytest.raises(ParameterError, match=rf"(?s){path}.*{section}\.{key} is {value}.*Fix: set {section}\.{key}"):
        pipeline.load_params(stage, params_file=path)


def test_params_refuse_protected_components_the_model_lacks(tmp_path):
    """A misspelt protected component stops the stage at its parameters, before the run loads."""
    content = yaml.safe_load((ROOT / "tests" / "params_tiny.yaml").read_text())
    for protected in (["lnear"], ["linear", "lnear"]):  # alone, or beside a component the model has
        content["influence"]["cnn"]["protected"] = protected
        path = write_yaml(tmp_path / "params.yaml", content)
        shown = re.escape(repr(tuple(protected)))
        with pytest.raises(ParameterError, match=rf"(?s)influence\.cnn\.protected is {shown}.*the cnn's components: "
                                                 r"conv1, conv2, res1, conv3, res2, conv4, linear.*"
                                                 r"Fix: set influence\.cnn\.protected"):
            pipeline.load_params("influence@cnn", params_file=path)
    content["influence"]["cnn"]["protected"] = ["linear", "conv1"]
    assert pipeline.load_params("influence@cnn", params_file=write_yaml(tmp_path / "ok.yaml", content))["protected"] == (
        "linear", "conv1")


def test_params_refuse_an_unknown_device_but_not_an_absent_gpu(tmp_path):
    content = yaml.safe_load((ROOT / "tests" / "params_tiny.yaml").read_text())
    content["base"]["device"] = "gpu"
    with pytest.raises(ParameterError, match="device .*'gpu'.*Fix"):
        pipeline.load_params("train_cnn", params_file=write_yaml(tmp_path / "bad.yaml", content))
    content["base"]["device"] = "cuda:7"  # a profile for another machine is still printable here
    assert pipeline.load_params("train_cnn", params_file=write_yaml(tmp_path / "gpu.yaml", content))["device"] == "cuda:7"


def test_stage_config_refuses_a_device_before_the_stage_deletes_its_outputs():
    """The notebooks build the config before fresh_dir: a device this machine lacks stops them there."""
    params = pipeline.load_params("train_transformer", params_file=ROOT / "tests" / "params_tiny.yaml")
    with pytest.raises(InputError, match="device .*cuda:99"):
        pipeline.make_config("train_transformer", {**params, "device": "cuda:99"})


@pytest.mark.parametrize("old, new, words", [
    ("\ntrain_transformer:", "\ntrain_transfomer:", ["'train_transfomer'", "did you mean 'train_transformer'"]),
    ("\nverify:", "\nverify_:", ["'verify_'", "did you mean 'verify'"]),
    ("\n  cnn:", "\n  mlp:", ["'verify.mlp'", "did you mean 'verify.cnn'"]),
])
def test_params_refuse_unknown_sections(tmp_path, old, new, words):
    text = (ROOT / "tests" / "params_tiny.yaml").read_text()
    assert old in text
    path = tmp_path / "params.yaml"
    path.write_text(text.replace(old, new, 1))
    for call in (lambda: pipeline.load_params("train_cnn", params_file=path), lambda: pipeline.set_args(path)):
        with pytest.raises(ParameterError) as error:
            call()
        assert all(word in str(error.value) for word in words), error.value


def test_params_refuse_a_duplicate_key(tmp_path):
    text = (ROOT / "tests" / "params_tiny.yaml").read_text()
    path = tmp_path / "params.yaml"
    path.write_text(text.replace("\ntrain_cnn:\n", "\ntrain_cnn:\n  epochs: 99\n", 1))
    with pytest.raises(ParameterError, match="key 'epochs' is given twice.*Fix: keep one"):
        pipeline.load_params("train_cnn", params_file=path)
