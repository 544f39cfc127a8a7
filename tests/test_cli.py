"""`python -m explaind plan`: the command line prints the plan that ex.plan computes for the same
request on a pipeline run folder, and refuses bad input with the fix."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_model

import explaind as ex
from explaind.__main__ import main
from explaind.stages import load_run
from explaind.training import CNNConfig, TransformerConfig, save_config, train_transformer

TINY = TransformerConfig(p=7, train_size=15, val_size=10, d_model=8, n_heads=2, d_mlp=16, lr=1e-2, max_steps=4)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder as the training stage writes it: config.json, model.safetensors, history/."""
    folder = tmp_path_factory.mktemp("runs") / "transformer"
    result = train_transformer(TINY, history_dir=folder / "history", progress=False)
    save_model(result.model, str(folder / "model.safetensors"))
    save_config(TINY, folder)
    return folder


def test_plan_command_prints_the_plan_of_the_same_request(run_dir, tmp_path, capsys):
    assert main(["plan", str(run_dir), "--data", str(tmp_path), "--tests", "3", "--keep", "train", "test",
                 "--outputs", "true", "--quadrature", "2", "--no-breakpoints"]) == 0
    printed = capsys.readouterr().out
    run = load_run("transformer", run_dir, tmp_path)
    expected = ex.plan(run.history, run.model, run.test_x[:3], run.test_y[:3], keep=("train", "test"),
                       outputs="true", quadrature=2, breakpoints=False, components=run.components)
    lines, library = printed.strip().splitlines(), expected.report().splitlines()
    assert [line for line in lines if not line.startswith("  time")] == [line for line in library if not line.startswith("  time")]
    # the command that estimates it, not the Python call
    assert "  time       not calibrated (python -m explaind plan ... --calibrate 6 estimates it)" in lines
    assert (expected.n_steps, expected.n_test, expected.n_train) == (4, 3, TINY.train_size)


def test_both_commands_print_the_plan_in_their_options(run_dir, tmp_path, capsys):
    """The plan's summary names --calibrate and a one-pass budget as --memory-budget takes it (in
    GiB, rounded up so that it holds the pass: the library's bytes read as GiB would be 2**30 times
    too large); explain prints the same summary before it computes."""
    argv = [str(run_dir), "--data", str(tmp_path), "--tests", "4", "--keep", "train", "test", "--outputs", "true"]
    assert main(["plan", *argv, "--memory-budget", "0.0005"]) == 0
    printed = capsys.readouterr().out
    run = load_run("transformer", run_dir, tmp_path)
    expected = ex.plan(run.history, run.model, run.test_x[:4], run.test_y[:4], keep=("train", "test"),
                       outputs="true", components=run.components, memory_budget=0.0005 * 2**30)
    gib = float(re.search(r"one pass   --memory-budget (\S+) GiB \(", printed).group(1))
    assert expected.passes > 1 and f"instead of {expected.passes}," in printed
    assert expected.one_pass_budget <= gib * 2**30 <= 1.01 * expected.one_pass_budget
    assert "memory_budget" not in printed and "calibrate_steps" not in printed, printed
    assert main(["plan", *argv, "--memory-budget", f"{gib}"]) == 0
    assert "  passes     1 (" in capsys.readouterr().out

    assert main(["explain", *argv, "--memory-budget", "0.0005", "--out", str(tmp_path / "c.zarr")]) == 0
    summary = capsys.readouterr().out.split("saved ")[0]
    assert summary == printed, summary


def test_plan_command_calibrates_and_runs_as_a_module(run_dir, tmp_path):
    """The module entry point itself, as a user types it, with a calibrated time."""
    done = subprocess.run([sys.executable, "-m", "explaind", "plan", str(run_dir), "--data", str(tmp_path),
                           "--tests", "2", "--outputs", "0,3", "--calibrate", "2"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "not calibrated" not in done.stdout and str(TINY.train_size) in done.stdout


@pytest.mark.parametrize("argv, words", [
    (["--outputs", "first"], ["--outputs 'first'", "indices like 0,3,7"]),
    (["--keep", "steps"], ["invalid choice", "'steps'"]),
    (["--memory-budget", "0"], ["--memory-budget", "0 is not above 0"]),
    (["--memory-budget", "nan"], ["--memory-budget", "nan is not a finite number of GiB"]),
    (["--memory-budget", "inf"], ["--memory-budget", "inf is not a finite number of GiB"]),
    (["--calibrate", "-1"], ["--calibrate", "-1 is not at least 0"]),
    (["--tests", "-2"], ["--tests", "-2 is not at least 0"]),
    (["--quadrature", "0"], ["--quadrature", "0 is not at least 1"]),
    (["--step-bins", "0"], ["--step-bins", "0 is not at least 1"]),
    (["--max-kinks", "0"], ["--max-kinks", "0 is not at least 1"]),
    (["--tests", "11"], ["--tests 11", "holds 10 held-out inputs", "at most that many (0: all of them)"]),
])
def test_plan_command_refuses_bad_options(run_dir, tmp_path, capsys, argv, words):
    try:
        code = main(["plan", str(run_dir), "--data", str(tmp_path), *argv])
    except SystemExit as stop:  # argparse's own refusals
        code = stop.code
    message = capsys.readouterr().err
    assert code not in (0, None) and all(w in message for w in words), message


def test_plan_command_refuses_a_folder_without_a_run(run_dir, tmp_path, capsys):
    """Each in one line after "error: ", as every refusal of the commands (no traceback)."""
    for argv, pattern in ((["plan", str(tmp_path)], "config.json is missing: pass a run folder"),
                          (["plan", str(tmp_path / "missing")], "missing is not a folder: pass a run folder.*make repro"),
                          # a user's own history: the command cannot rebuild the model, explaind.plan can
                          (["explain", str(run_dir / "history"), "--out", str(tmp_path / "c.zarr")],
                           "is a training history.*explaind.explain\\(history, model, inputs")):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert re.match(f"error: .*{pattern}", err) and err.count("\n") == 1, err


def test_version(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out == f"explaind {ex.__version__}\n"


@pytest.mark.parametrize("argv, words", [
    (["--quadrature", "5000"], ["--quadrature 5000 nodes: at most 1000"]),
    (["--step-bins", "9"], ["--step-bins 9 must lie in 1 … 4"]),
    (["--keep", "train", "test", "--step-bins", "2"], ["which --keep train test sums over",
                                                       "Fix: add step to --keep, or leave --step-bins out"]),
    (["--keep", "--step-bins", "2"], ["which --keep with no dims sums over"]),
    (["--outputs", "99"], ["outputs [99] do not exist"]),
    (["--device", "cuda:7"], ["--device cuda:7", "Fix: pass --device cpu"]),  # no GPU, or not 8 of them
])
def test_plan_command_reports_a_refused_request_without_a_traceback(run_dir, tmp_path, capsys, argv, words):
    """... in the command's words: its options, not explain()'s arguments."""
    assert main(["plan", str(run_dir), "--data", str(tmp_path), *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and all(w in err for w in words), err
    assert "step_bins" not in err and "device=" not in err and "quadrature=" not in err and "keep=" not in err
    assert "to keep" not in err


def test_plan_command_words_an_unsupported_model_in_its_options(run_dir, tmp_path, capsys, monkeypatch):
    """plan refuses what explain refuses before computing, an UnsupportedError too (a model whose
    backward is not its derivative: test_refusals); the command words it as explain's refusals."""
    def refused(*args, **kwargs):
        raise ex.UnsupportedError("the model's backward is not its forward's derivative. Fix: keep no train dim "
                                  "(and parameter_scores=False)")

    monkeypatch.setattr(ex.planning, "plan", refused)
    assert main(["plan", str(run_dir), "--data", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "keep no train dim (and no --parameter-scores)" in err, err


def test_plan_command_reports_a_missing_history(run_dir, tmp_path, capsys):
    broken = tmp_path / "transformer"
    broken.mkdir()
    for name in ("config.json", "model.safetensors"):
        (broken / name).write_bytes((run_dir / name).read_bytes())
    assert main(["plan", str(broken), "--data", str(tmp_path)]) == 1
    err = capsys.readouterr().err  # the missing folder itself, not the weights beside it
    assert err.startswith("error: ") and "history does not exist" in err and "safetensors" not in err, err


def test_plan_command_speaks_of_the_budget_in_gib(run_dir, tmp_path, capsys):
    """--memory-budget is typed in GiB: a budget too small is refused in GiB, not in bytes."""
    assert main(["plan", str(run_dir), "--data", str(tmp_path), "--tests", "2", "--memory-budget", "1e-6"]) == 1
    err = capsys.readouterr().err
    assert "over --memory-budget 1e-06 GiB" in err and "bytes" not in err, err
    # the fixes that shrink this pass, as the options that apply them
    assert all(fix in err for fix in ("(--outputs true)", "(--step-bins)", "use --convention gradient",
                                      "--dtype float32, or a budget of at least --memory-budget 0.000")), err
    assert "=" not in err, err
    # the budget as typed, to its last digit: rounded up (to 1.24e-06) only a budget the plan proposes
    assert main(["plan", str(run_dir), "--data", str(tmp_path), "--tests", "2", "--memory-budget", "1.2345e-6"]) == 1
    assert "over --memory-budget 1.2345e-06 GiB (" in capsys.readouterr().err


def damage_config(folder, how: str) -> str:
    """Damage a copied run folder's config.json as a careless edit or another run's files might;
    the words its refusal must hold."""
    config = folder / "config.json"
    values = json.loads(config.read_text())
    if how == "not_json":
        config.write_text("{ training settings")
        return "config.json is not valid JSON"
    if how == "not_object":
        config.write_text("[1, 2]")
        return "config.json holds a JSON list, not an object"
    if how == "no_weights":
        (folder / "model.safetensors").unlink()
        return "model.safetensors is missing"
    config.write_text(json.dumps({**values, "d_model": 16}))  # another architecture than the weights'
    return "model.safetensors does not fit the model that"


@pytest.mark.parametrize("how", ["not_json", "not_object", "no_weights", "other_model"])
def test_plan_command_names_a_damaged_run_folder(run_dir, tmp_path, capsys, how):
    broken = tmp_path / "transformer"
    shutil.copytree(run_dir, broken)
    words = damage_config(broken, how)
    assert main(["plan", str(broken), "--data", str(tmp_path)]) == 1
    message = capsys.readouterr().err
    assert message.startswith("error: ") and words in message and "rerun its training stage" in message
    assert message.count("\n") == 1, message


def test_plan_command_names_missing_data_beside_its_weights(tmp_path, capsys):
    """A CNN run whose images are not in --data: the data's own fix (make data), not a missing model.safetensors."""
    folder = tmp_path / "cnn"
    folder.mkdir()
    save_config(CNNConfig(), folder)
    (folder / "model.safetensors").write_bytes(b"weights")  # never read: the images come first
    assert main(["plan", str(folder), "--data", str(tmp_path / "data")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: no digits in {tmp_path / 'data' / 'digits'}: run `make data`") and "safetensors" not in err, err


def test_plan_command_names_a_config_of_other_keys(run_dir, tmp_path, capsys):
    broken = tmp_path / "transformer"
    shutil.copytree(run_dir, broken)
    values = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**values, "width": 3}))
    assert main(["plan", str(broken), "--data", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "does not match TransformerConfig (unknown keys ['width'])" in err and "dvc repro train_transformer" in err, err


# --------------------------------------------------------------------------- explain


def test_explain_command_saves_the_cube_of_the_same_request(run_dir, tmp_path, capsys):
    out = tmp_path / "kernel.zarr"
    assert main(["explain", str(run_dir), "--data", str(tmp_path), "--tests", "3", "--keep", "train", "test",
                 "--outputs", "true", "--quadrature", "2", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    run = load_run("transformer", run_dir, tmp_path)
    expected = ex.explain(run.history, run.model, run.test_x[:3], run.test_y[:3], keep=("train", "test"),
                          outputs="true", quadrature=2, components=run.components, progress=False)
    saved = ex.open_cube(out, verify=True)
    assert saved["attribution"].dims == expected["attribution"].dims
    np.testing.assert_array_equal(saved["attribution"].values, expected["attribution"].values)
    assert saved.attrs["relative_residual"] == expected.attrs["relative_residual"]
    assert f"saved {out}" in printed and "train 15, test 3" in printed and "open_cube" in printed


def test_keep_alone_sums_every_dim_as_keep_nothing_does(run_dir, tmp_path, capsys):
    """--keep with no dims is keep=(): one number, the explained change less the weight decay's share
    (with --parameter-scores, the pruning importance)."""
    out = tmp_path / "total.zarr"
    assert main(["plan", str(run_dir), "--data", str(tmp_path), "--tests", "2", "--keep", "--outputs", "true"]) == 0
    assert "keeps nothing" in capsys.readouterr().out
    assert main(["explain", str(run_dir), "--data", str(tmp_path), "--tests", "2", "--keep", "--outputs", "true",
                 "--parameter-scores", "--quiet", "--out", str(out)]) == 0
    assert "(attribution: every dim summed)" in capsys.readouterr().out
    saved = ex.open_cube(out)
    change = float((saved["final"] - saved["initial"]).sum() - saved["regularization"] - saved["residual"].sum())
    assert saved["attribution"].dims == () and "parameter_score" in saved
    assert abs(float(saved["attribution"]) - change) <= 1e-12 * abs(change)


def test_explain_command_keeps_a_saved_cube_unless_told(run_dir, tmp_path, capsys):
    """An existing --out is refused before any compute, and --overwrite replaces it."""
    out = tmp_path / "cube.zarr"
    request = ["explain", str(run_dir), "--data", str(tmp_path), "--tests", "2", "--keep", "test",
               "--quadrature", "1", "--no-breakpoints", "--tolerance", "1", "--quiet", "--out", str(out)]
    assert main(request) == 0
    first = ex.open_cube(out)["attribution"].values
    digests = ex.open_cube(out).attrs["relative_residual"], (out / ".zattrs").read_bytes()
    assert main([*request[:-2], "--quadrature", "3", "--out", str(out)]) == 1
    assert "cube.zarr exists: pass another --out, or --overwrite" in capsys.readouterr().err
    assert (ex.open_cube(out).attrs["relative_residual"], (out / ".zattrs").read_bytes()) == digests
    assert main([*request[:-2], "--quadrature", "3", "--overwrite", "--out", str(out)]) == 0
    assert not np.array_equal(ex.open_cube(out)["attribution"].values, first)  # the finer integral's


def test_explain_command_reports_a_cube_beyond_its_tolerance_in_its_words(run_dir, tmp_path, capsys):
    """One midpoint node per step misses far more than 1e-12: the error names --quadrature, and the
    cube is saved all the same (as explain() keeps it in the error), without a traceback."""
    out = tmp_path / "coarse.zarr"
    assert main(["explain", str(run_dir), "--data", str(tmp_path), "--tests", "2", "--keep", "test",
                 "--rule", "midpoint", "--quadrature", "1", "--no-breakpoints", "--tolerance", "1e-12",
                 "--quiet", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--quadrature" in err and "quadrature=" not in err, err
    assert "or drop --no-breakpoints if the model has ReLU" in err and "breakpoints=" not in err, err
    assert f"The cube is saved at {out} all the same" in err and "error.cube" not in err
    assert "Traceback" not in err and ex.open_cube(out).attrs["relative_residual"] > 1e-3


@pytest.mark.parametrize("out, overwrite, words", [
    ("cube", False, "its name must end in .zarr: save to"),
    ("folder.zarr", True, "exists and is not a store save_cube wrote, so it is not replaced"),
    ("file/cube.zarr", False, "cannot hold a new folder"),
], ids=["no_suffix", "not_a_store", "under_a_file"])
def test_explain_command_refuses_a_destination_before_computing(run_dir, tmp_path, capsys, monkeypatch, out,
                                                                   overwrite, words):
    """What save_cube refuses after the compute was refused only then (a trial lost 6.6 minutes)."""
    (tmp_path / "folder.zarr").mkdir()
    (tmp_path / "folder.zarr" / "mine.txt").write_text("kept")
    (tmp_path / "file").write_text("a file, not a folder")
    monkeypatch.setattr(ex.engine, "explain", lambda *a, **k: pytest.fail("computed before the refusal"))
    argv = ["explain", str(run_dir), "--data", str(tmp_path), "--tests", "2", "--out", str(tmp_path / out)]
    assert main([*argv, *(["--overwrite"] if overwrite else [])]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words in err and "overwrite=True" not in err, err
    assert (tmp_path / "folder.zarr" / "mine.txt").read_text() == "kept"


def test_explain_command_passes_the_kink_options_and_stops_cleanly_when_interrupted(run_dir, tmp_path, capsys,
                                                                                       monkeypatch):
    out = tmp_path / "kinks.zarr"
    argv = ["explain", str(run_dir), "--data", str(tmp_path), "--tests", "2", "--keep", "test", "--quiet"]
    assert main([*argv, "--max-kinks", "64", "--kink-tolerance", "1e-6", "--out", str(out)]) == 0
    saved = ex.open_cube(out)
    assert saved.attrs["max_kinks"] == 64 and saved.attrs["kink_tolerance"] == 1e-6

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ex.engine, "explain", interrupted)
    assert main([*argv, "--out", str(tmp_path / "never.zarr")]) == 130
    assert capsys.readouterr().err == "interrupted: nothing saved\n" and not (tmp_path / "never.zarr").exists()


def library_calls(monkeypatch, module, name: str) -> list:
    """The calls the commands make to the library's `name`, each refused once recorded (nothing is
    computed): the request and options as the library receives them."""
    calls = []

    def record(*args, **kwargs):
        calls.append((args, kwargs))
        raise ex.InputError("recorded")

    monkeypatch.setattr(module, name, record)
    return calls


def test_commands_pass_the_library_its_defaults(run_dir, tmp_path, capsys, monkeypatch):
    """Without options: every held-out input, explain()'s defaults, a budget of 4 GiB in bytes, no
    calibration, a tolerance of 1e-4, progress bars, and the data folder ./data."""
    plans, explains = library_calls(monkeypatch, ex.planning, "plan"), library_calls(monkeypatch, ex.engine, "explain")
    data_folders, load = [], ex.stages.load_run
    monkeypatch.setattr(ex.stages, "load_run", lambda name, run, data: data_folders.append(data) or load(name, run, data))
    monkeypatch.chdir(tmp_path)
    assert main(["plan", str(run_dir)]) == 1
    assert main(["explain", str(run_dir), "--out", "cube.zarr"]) == 1
    assert capsys.readouterr().err == "error: recorded\n" * 2  # both reached the library
    run = load_run("transformer", run_dir, tmp_path)
    defaults = dict(keep=("step", "component", "train", "test", "output"), outputs="all", target=None, quadrature=4,
                    rule="gauss", breakpoints=True, max_kinks=16, kink_tolerance=0.0, convention="update",
                    components=run.components, step_bins=None, parameter_scores=False, check_updates=True,
                    dtype=torch.float64, device="cpu", memory_budget=4 * 2**30)
    (plan_args, plan_options), = plans
    (explain_args, explain_options), = explains
    assert plan_options == {**defaults, "calibrate_steps": 0}
    assert explain_options == {**defaults, "tolerance": 1e-4, "progress": True}
    for args in (plan_args, explain_args):
        assert len(args) == 4 and len(run.test_x) == TINY.val_size
        assert torch.equal(args[2], run.test_x) and torch.equal(args[3], run.test_y)
    assert data_folders == [Path("data")] * 2


def test_commands_pass_each_option_to_the_library(run_dir, tmp_path, capsys, monkeypatch):
    """Each option under its own name, the smallest values they take accepted, --tests as large as
    the run's held-out inputs, --outputs parsed as a list and --memory-budget read as GiB."""
    plans, explains = library_calls(monkeypatch, ex.planning, "plan"), library_calls(monkeypatch, ex.engine, "explain")
    argv = [str(run_dir), "--data", str(tmp_path), "--tests", str(TINY.val_size), "--keep", "test", "step",
            "--outputs", "0,3,6", "--target", "logit", "--quadrature", "1", "--rule", "midpoint", "--no-breakpoints",
            "--max-kinks", "1", "--kink-tolerance", "0.5", "--convention", "gradient", "--step-bins", "1",
            "--parameter-scores", "--no-update-check", "--dtype", "float32", "--device", "meta",
            "--memory-budget", "0.25"]
    assert main(["plan", *argv, "--calibrate", "3"]) == 1
    assert main(["explain", *argv, "--tolerance", "0.5", "--quiet", "--out", str(tmp_path / "cube.zarr")]) == 1
    assert capsys.readouterr().err == "error: recorded\n" * 2  # both reached the library
    run = load_run("transformer", run_dir, tmp_path)
    options = dict(keep=("test", "step"), outputs=[0, 3, 6], target="logit", quadrature=1, rule="midpoint",
                   breakpoints=False, max_kinks=1, kink_tolerance=0.5, convention="gradient", components=run.components,
                   step_bins=1, parameter_scores=True, check_updates=False, dtype=torch.float32, device="meta",
                   memory_budget=2**28)
    (plan_args, plan_options), = plans
    (explain_args, explain_options), = explains
    assert plan_options == {**options, "calibrate_steps": 3}
    assert explain_options == {**options, "tolerance": 0.5, "progress": False}
    for args in (plan_args, explain_args):
        assert torch.equal(args[2], run.test_x) and torch.equal(args[3], run.test_y)
