"""The on-disk training history: crash / resume, integrity checks, no pickle, overwriting."""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
import warnings
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import explaind as ex
from engine_cases import Case, make_data, train

README = Path(__file__).resolve().parents[1] / "README.md"
N_STEPS, CRASH_AT, N_TRAIN, BATCH = 10, 5, 12, 4
MAX_NORM = 0.8  # the loop clips its gradients' norm to this: some steps are clipped, some not


class Crash(RuntimeError):
    pass


def fresh_objects(seed: int):
    """A new model (initialised from `seed`), AdamW with two groups, and a StepLR schedule."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    params = list(model.parameters())
    optimizer = torch.optim.AdamW([{"params": params[:2], "lr": 0.03},
                                   {"params": params[2:], "lr": 0.01, "weight_decay": 0.1}],
                                  betas=(0.8, 0.9), amsgrad=True)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
    return model, optimizer, scheduler


def rows_of(step: int) -> torch.Tensor:
    """The batch of a step depends on the step only (a resumed loop draws the same data)."""
    return torch.randperm(N_TRAIN, generator=torch.Generator().manual_seed(step))[:BATCH]


def training_loop(rec, model, optimizer, scheduler, x, y, start: int, crash_at: int | None = None,
                  scheduler_first: bool = False, closure: str | None = None, crash_after_step: int | None = None):
    """`crash_after_step` kills the loop right after that step's optimizer.step(). With `scheduler_first`, the schedule is stepped at the start of each step but the first,
    before the batch, as some loops do (rather than after optimizer.step()). With `closure`
    ("positional" or "keyword"), the loop hands optimizer.step() a closure that makes the gradient,
    declares the batch and clips, as PyTorch Lightning's automatic optimization does."""
    for step in range(start, N_STEPS):
        if scheduler_first and step > 0:
            scheduler.step()
        rows = rows_of(step)
        # random augmentation through torch's global RNG: resuming must restore its state
        xb = x[rows] + 0.1 * torch.randn(len(rows), x.shape[1], dtype=x.dtype)

        def gradient(rows=rows, xb=xb):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(xb), y[rows])
            loss.backward()
            rec.batch(rows + 100, xb, y[rows])
            rec.clip_grad_norm_(MAX_NORM)
            return loss

        if closure == "positional":
            optimizer.step(gradient)
        elif closure == "keyword":
            optimizer.step(closure=gradient)
        else:
            gradient()
            if step == crash_at:  # killed after backward and batch(), before the step
                raise Crash(f"killed at step {step}")
            optimizer.step()
        if step == crash_after_step:  # before the scheduler's step (and the next batch)
            raise Crash(f"killed after step {step}")
        if not scheduler_first:
            scheduler.step()


def record(path: Path, crash_at: int | None = None, **loop):
    x, y, _, _ = make_data("mlp", N_TRAIN, 0, 3)
    model, optimizer, scheduler = fresh_objects(0)
    torch.manual_seed(1234)
    with ex.Recorder(path, model, optimizer, scheduler=scheduler, check_every=1) as rec:
        training_loop(rec, model, optimizer, scheduler, x, y, 0, crash_at, **loop)
    return model


def resume(path: Path, **loop):
    x, y, _, _ = make_data("mlp", N_TRAIN, 0, 3)
    model, optimizer, scheduler = fresh_objects(99)  # a different initialisation: θ must be loaded
    torch.manual_seed(555)  # a different RNG state: it must be restored
    with ex.Recorder.resume(path, model, optimizer, scheduler=scheduler, check_every=1) as rec:
        start = rec.step
        training_loop(rec, model, optimizer, scheduler, x, y, start, **loop)
    return model, start


def manifest(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "manifest.jsonl").read_text().splitlines()]


def assert_same_history(a: Path, b: Path) -> None:
    ma, mb = manifest(a), manifest(b)
    assert [l["sha256"] for l in ma] == [l["sha256"] for l in mb]
    assert ma == mb
    for name in ["initial.safetensors"] + [l["file"] for l in ma]:
        ta, tb = load_file(a / name), load_file(b / name)
        assert ta.keys() == tb.keys(), name
        for key in ta:
            assert torch.equal(ta[key], tb[key]), (name, key)
    assert json.loads((a / "meta.json").read_text()) == json.loads((b / "meta.json").read_text())
    assert json.loads((a / "closed.json").read_text()) == json.loads((b / "closed.json").read_text())
    assert ex.History(a).fingerprint() == ex.History(b).fingerprint()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("history") / "whole"
    record(path)
    return path


@pytest.fixture
def copy_of(uninterrupted, tmp_path):
    def make() -> Path:
        target = tmp_path / "copy"
        shutil.copytree(uninterrupted, target)
        return target

    return make


# --------------------------------------------------------------------------- crash and resume


def test_a_history_whose_recorder_is_still_open_names_close(tmp_path):
    """Read before its Recorder was closed (a loop written without `with`), a history was called
    killed, with Recorder.resume as the fix, which refuses a run whose recorder is still open."""
    x, y, _, _ = make_data("mlp", N_TRAIN, 0, 3)
    model, optimizer, scheduler = fresh_objects(0)
    rec = ex.Recorder(tmp_path / "h", model, optimizer, scheduler=scheduler)
    training_loop(rec, model, optimizer, scheduler, x, y, 0)
    with pytest.raises(ex.HistoryError) as caught:
        ex.History(tmp_path / "h")
    message = str(caught.value)
    assert all(words in message for words in (f"{N_STEPS} steps", "a Recorder of this process is still open",
                                              "rec.close()", "with ex.Recorder(")), message
    assert "killed" not in message, message
    assert ex.History(tmp_path / "h", allow_incomplete=True).n_steps == N_STEPS
    rec.close()
    assert ex.History(tmp_path / "h").n_steps == N_STEPS


def test_crash_then_resume_equals_uninterrupted_run(uninterrupted, tmp_path):
    path = tmp_path / "crashed"
    with pytest.raises(Crash):
        record(path, crash_at=CRASH_AT)
    assert not (path / "closed.json").exists()
    with pytest.raises(ex.HistoryError, match="incomplete"):
        ex.History(path)
    partial = ex.History(path, allow_incomplete=True)
    assert partial.n_steps == CRASH_AT
    model, start = resume(path)
    assert start == CRASH_AT
    assert_same_history(path, uninterrupted)
    scales = [line["gradient_scale"] for line in manifest(path)]
    assert min(scales[:CRASH_AT]) < 0.9 and min(scales[CRASH_AT:]) < 0.9 and max(scales) == 1.0
    # the resumed model ends exactly where the uninterrupted one does
    whole = ex.History(uninterrupted)
    for name, value in whole.params(N_STEPS).items():
        assert torch.equal(dict(model.named_parameters())[name].detach(), value)


def test_a_resume_given_other_hyperparameters_says_that_it_keeps_the_recorded_ones(uninterrupted, tmp_path,
                                                                                      monkeypatch):
    """An optimizer built from a changed config (another base lr and eps) is told that the resume
    restores the recorded ones; the resumed history is still the uninterrupted run's. One built as
    the killed run's is not warned about (the scheduled lr at the crash differs from the built one)."""
    path = tmp_path / "crashed"
    with pytest.raises(Crash):
        record(path, crash_at=CRASH_AT)
    shutil.copytree(path, tmp_path / "again")

    def changed(seed, built=fresh_objects):
        model, _, _ = built(seed)
        params = list(model.parameters())
        optimizer = torch.optim.AdamW([{"params": params[:2], "lr": 0.03},
                                       {"params": params[2:], "lr": 0.5, "weight_decay": 0.1, "eps": 1e-3}],
                                      betas=(0.8, 0.9), amsgrad=True)
        return model, optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)

    with monkeypatch.context() as other_config:
        other_config.setitem(globals(), "fresh_objects", changed)
        with pytest.warns(UserWarning, match=r"(?s)initial_lr=0.5 in group 1 \(recorded: 0.01\), eps=0.001 in "
                                             r"group 1 \(recorded: 1e-08\).*restores the recorded.*record a new run"):
            resume(path)
    assert_same_history(path, uninterrupted)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="Recorder.resume")
        resume(tmp_path / "again")


@pytest.mark.parametrize("sequential", [False, True], ids=["LambdaLR", "within a SequentialLR"])
def test_a_resume_given_another_lambda_schedule_says_so(tmp_path, monkeypatch, sequential):
    """A LambdaLR's function is not stored: a resume given another one (a longer warm-up) took the
    resumed steps on another schedule, silently (a user's rates went 0, .002, .004, .003 … where
    the uninterrupted run went on to .006). The restored function is evaluated at the recorded
    step (4 of an 8-step warm-up: half of each base lr); another one is warned about, the killed
    run's is not."""
    made = fresh_objects

    def warm_up(steps):
        def built(seed):
            model, optimizer, _ = made(seed)
            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, s / steps))
            if sequential:
                decay = torch.optim.lr_scheduler.ExponentialLR(optimizer, 0.9)
                schedule = torch.optim.lr_scheduler.SequentialLR(optimizer, [schedule, decay], milestones=[8])
            return model, optimizer, schedule
        return built

    monkeypatch.setitem(globals(), "fresh_objects", warm_up(8))
    with pytest.raises(Crash):
        record(tmp_path / "killed", crash_at=CRASH_AT)
    shutil.copytree(tmp_path / "killed", tmp_path / "again")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="Recorder.resume")
        resume(tmp_path / "again")
    monkeypatch.setitem(globals(), "fresh_objects", warm_up(16))
    with pytest.warns(UserWarning, match=r"(?s)LambdaLR whose function sets the learning rate of its recorded step to "
                                         r"0\.0075 in group 0 \(recorded: 0\.015\), 0\.0025 in group 1 "
                                         r"\(recorded: 0\.005\).*the killed run's function"):
        resume(tmp_path / "killed")


def resume_example() -> str:
    """The README's loop that records and resumes alike."""
    blocks = re.findall(r"```python\n(# a loop that records and resumes.*?)```", README.read_text(), flags=re.DOTALL)
    assert len(blocks) == 1, "the README's resumable loop example is gone"
    return blocks[0]


class Augmented(torch.utils.data.Dataset):
    """(dataset index, input with noise drawn from torch's global RNG, class)."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return i, self.x[i] + 0.1 * torch.randn(self.x.shape[1], dtype=self.x.dtype), self.y[i]


def test_a_shuffled_loader_resumes_as_the_readme_says(tmp_path):
    """The README's loop, run as written: each epoch's order drawn from a generator seeded by the
    epoch, which the loader also takes (or it draws a seed from the global RNG that the resume
    restores), and the batches recorded before the crash left out of the sampler (not loaded and
    skipped, which would draw their augmentation from that RNG). The same loop records and
    resumes; killed in the middle of an epoch, it yields the uninterrupted history."""
    x, y, _, _ = make_data("mlp", N_TRAIN, 0, 3)
    readme_loop = compile(resume_example(), str(README), "exec")
    steps_per_epoch = N_TRAIN // BATCH

    def loop(rec, model, optimizer, crash_at=None):
        def killed(*_):  # runs after the Recorder's own hook: the step is stored
            if rec.step == crash_at:
                raise Crash(f"killed after step {crash_at - 1}")

        hook = optimizer.register_step_post_hook(killed)
        try:
            exec(readme_loop, {"rec": rec, "model": model, "optimizer": optimizer, "torch": torch, "F": F,
                               "DataLoader": torch.utils.data.DataLoader, "dataset": Augmented(x, y),
                               "batch_size": BATCH, "steps_per_epoch": steps_per_epoch, "epochs": 3, "seed": 7})
        finally:
            hook.remove()

    for name, crash_at in (("whole", None), ("killed", steps_per_epoch + 1)):
        model, optimizer, _ = fresh_objects(0)
        torch.manual_seed(1)
        with pytest.raises(Crash) if crash_at else nullcontext(), ex.Recorder(tmp_path / name, model, optimizer) as rec:
            loop(rec, model, optimizer, crash_at)
    model, optimizer, _ = fresh_objects(2)
    torch.manual_seed(3)
    with ex.Recorder.resume(tmp_path / "killed", model, optimizer) as rec:
        assert rec.step == steps_per_epoch + 1
        loop(rec, model, optimizer)
    assert_same_history(tmp_path / "killed", tmp_path / "whole")


def test_a_loop_that_steps_its_scheduler_first_resumes_on_its_schedule(tmp_path):
    """The resumed loop steps the schedule again at the start of the step it redoes: the resume
    had already brought the schedule to that step (restored, or caught up), so it was a step
    ahead, and the learning rates recorded from there on were the next step's."""
    whole, crashed = tmp_path / "whole", tmp_path / "crashed"
    record(whole, scheduler_first=True)
    with pytest.raises(Crash):
        record(crashed, crash_at=CRASH_AT, scheduler_first=True)
    _, start = resume(crashed, scheduler_first=True)
    assert start == CRASH_AT
    lrs = [line["groups"][0]["lr"] for line in manifest(whole)]
    assert lrs[CRASH_AT] != lrs[CRASH_AT + 1]  # StepLR(3): step 5 is the last of its learning rate
    assert_same_history(crashed, whole)


@pytest.mark.parametrize("scheduler_first", [False, True])
def test_a_run_killed_right_after_its_first_step_resumes_from_the_start(tmp_path, scheduler_first):
    """How often the loop steps its scheduler is learned at the second step: a run killed before
    it resumes from the state stored at the first step's batch, and records that step again."""
    whole, crashed = tmp_path / "whole", tmp_path / "crashed"
    record(whole, scheduler_first=scheduler_first)
    with pytest.raises(Crash):
        record(crashed, crash_after_step=0, scheduler_first=scheduler_first)
    assert ex.History(crashed, allow_incomplete=True).n_steps == 1
    _, start = resume(crashed, scheduler_first=scheduler_first)
    assert start == 0
    assert_same_history(crashed, whole)


def test_a_resume_from_the_start_killed_before_its_first_step_resumes_again(uninterrupted, tmp_path):
    """The resume from step 0 empties the manifest before the loop records step 0 again: killed
    before it has, the history holds no step, and the resume state of step 0 still resumes it."""
    path = tmp_path / "crashed"
    with pytest.raises(Crash):
        record(path, crash_after_step=0)
    with pytest.raises(Crash):
        resume(path, crash_at=0)  # killed after step 0's batch, before its update
    assert not (path / "manifest.jsonl").read_text()
    _, start = resume(path)
    assert start == 0
    assert_same_history(path, uninterrupted)


def recording_or_resume(path: Path):
    """tiny(1) with momentum SGD and no scheduler, recorded to `path`, or resumed where a run there
    was killed: (model, optimizer, recorder)."""
    model = tiny(1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return model, optimizer, (ex.Recorder.resume if path.exists() else ex.Recorder)(path, model, optimizer)


def record_augmented(path: Path, noise, crash_after: int | None = None) -> None:
    """recording_or_resume's run for 6 steps of 4 rows, each batch's inputs plus noise() (the
    loop's augmentation, drawn from whatever RNG the test is about); Crash after step crash_after."""
    x, y = tiny_data()
    model, optimizer, recorder = recording_or_resume(path)
    with recorder as rec:
        for step in range(rec.step, 6):
            rows = torch.arange(4 * step, 4 * step + 4) % len(x)
            xb = x[rows] + noise()
            optimizer.zero_grad()
            F.cross_entropy(model(xb), y[rows]).backward()
            rec.batch(rows, xb, y[rows])
            optimizer.step()
            if step == crash_after:
                raise Crash(f"killed after step {step}")


def test_a_run_without_scheduler_killed_before_the_state_after_its_first_step_resumes(tmp_path, monkeypatch):
    """Killed after the first step's manifest line, before the state after it: the state stored at
    the first batch resumes the run from the start (with or without a scheduler)."""
    x, y = tiny_data()

    def run(path):
        model, optimizer, recorder = recording_or_resume(path)
        with recorder as rec:
            sgd_steps(rec, model, optimizer, x, y, rec.step, 4)

    run(tmp_path / "whole")
    write_info = ex.Recorder._write_resume_info

    def killed_before_writing(self, scheduler_stepped):
        if self.step == 1:
            raise Crash("killed after the first step's manifest line, before resume.json")
        write_info(self, scheduler_stepped)

    monkeypatch.setattr(ex.Recorder, "_write_resume_info", killed_before_writing)
    with pytest.raises(Crash):
        run(tmp_path / "crashed")
    monkeypatch.undo()
    assert ex.History(tmp_path / "crashed", allow_incomplete=True).n_steps == 1
    run(tmp_path / "crashed")
    assert_same_history(tmp_path / "crashed", tmp_path / "whole")


@pytest.fixture
def global_rngs():
    """numpy's and Python's global RNG states, put back after the test that reseeds them."""
    states = np.random.get_state(), random.getstate()
    yield
    np.random.set_state(states[0])
    random.setstate(states[1])


def test_augmentation_from_numpy_and_python_random_resumes_as_drawn(tmp_path, global_rngs):
    """The resume restores numpy's and Python's global RNGs with torch's: a loop that draws its
    augmentation from them, gaussians included (both cache one), records the uninterrupted history."""
    def run(path, crash_after=None):
        record_augmented(path, lambda: 0.1 * random.gauss(1.0, 0.2) * torch.from_numpy(
            np.random.normal(size=(4, 3)) @ np.ones((3, 4))), crash_after)

    for path, crash_after in ((tmp_path / "whole", None), (tmp_path / "crashed", 2)):
        np.random.seed(0)
        random.seed(0)
        with pytest.raises(Crash) if crash_after is not None else nullcontext():
            run(path, crash_after)
    np.random.seed(99)  # another process's states: the resume restores the recorded ones
    random.seed(99)
    run(tmp_path / "crashed")
    assert_same_history(tmp_path / "crashed", tmp_path / "whole")


def test_a_first_step_state_of_an_older_explaind_is_refused_with_the_fix(tmp_path):
    """An explaind before the step-0 resume state stored the state after the first step with its
    scheduler not yet stepped, and nothing to tell how often to step it: refused, naming the fix."""
    path = tmp_path / "crashed"
    with pytest.raises(Crash):
        record(path, crash_after_step=0)
    info = json.loads((path / "resume.json").read_text())
    after_step = path / "resume-1.safetensors"  # the tensors written after step 0
    (path / "resume.json").write_text(json.dumps({
        **info, "next_step": 1, "scheduler_stepped": False, "scheduler_steps_per_step": None,
        "tensors": after_step.name, "tensors_sha256": hashlib.sha256(after_step.read_bytes()).hexdigest()}))
    model, optimizer, scheduler = fresh_objects(0)
    refused_at_the_next_step_but_closes(path, model, optimizer, scheduler, ex.HistoryError,
                                        "(?s)killed right after its first step.*overwrite=True")


def record_step_past_resume_state(path: Path) -> None:
    """A run killed between a step's manifest line and its resume state (CRASH_AT steps
    stored, the resume state of CRASH_AT − 1)."""
    with pytest.raises(Crash):
        record(path, crash_at=CRASH_AT - 1)
    saved = {n: (path / n).read_bytes() for n in ("resume.json", resume_tensors_file(path))}
    shutil.rmtree(path)
    with pytest.raises(Crash):
        record(path, crash_at=CRASH_AT)
    for name, data in saved.items():  # the resume state of one step earlier
        (path / name).write_bytes(data)


def resume_tensors_file(path: Path) -> str:
    return json.loads((path / "resume.json").read_text())["tensors"]


def record_cut_manifest_line(path: Path, uninterrupted: Path) -> None:
    """A run killed while appending the manifest line of step CRASH_AT."""
    with pytest.raises(Crash):
        record(path, crash_at=CRASH_AT)
    line = (uninterrupted / "manifest.jsonl").read_text().splitlines()[CRASH_AT]
    with open(path / "manifest.jsonl", "a") as fh:
        fh.write(line[: len(line) // 2])


@pytest.mark.parametrize("closure", ["positional", "keyword"])
def test_a_loop_that_steps_by_closure_records_the_same_history(uninterrupted, tmp_path, closure):
    """optimizer.step(closure): the gradient, the batch and the clipping come inside step(), and the
    history equals the plain loop's, file for file."""
    record(tmp_path / "h", closure=closure)
    assert_same_history(uninterrupted, tmp_path / "h")


@pytest.mark.parametrize("forgets, refusal", [
    ("batch", r"(?s)without rec\.batch.*inside the closure"),
    ("clipping", r"(?s)gradient.*clipping.*rec\.clip_grad_norm_"),
])
def test_a_closure_is_checked_when_it_returns(tmp_path, forgets, refusal):
    """The step's checks run once the closure has made the gradient: a closure that declares no
    batch, or clips with torch's own clip_grad_norm_, is refused before the update."""
    x, y, _, _ = make_data("mlp", N_TRAIN, 0, 3)
    model, optimizer, _ = fresh_objects(0)
    before = [p.detach().clone() for p in model.parameters()]

    def gradient():
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if forgets == "clipping":
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
            rec.batch(torch.arange(N_TRAIN), x, y)

    with pytest.raises((ex.InputError, ex.UnsupportedError), match=refusal):
        with ex.Recorder(tmp_path / "h", model, optimizer, check_every=1) as rec:
            optimizer.step(gradient)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_resume_when_the_last_step_outran_its_resume_state(uninterrupted, tmp_path):
    """Killed between a step's manifest line and its resume state: that step is redone."""
    path = tmp_path / "crashed"
    record_step_past_resume_state(path)
    assert ex.History(path, allow_incomplete=True).n_steps == CRASH_AT
    _, start = resume(path)
    assert start == CRASH_AT - 1
    assert_same_history(path, uninterrupted)


def test_resume_after_a_manifest_line_cut_by_the_crash(uninterrupted, tmp_path):
    path = tmp_path / "crashed"
    record_cut_manifest_line(path, uninterrupted)
    assert ex.History(path, allow_incomplete=True).n_steps == CRASH_AT  # the cut line is ignored
    _, start = resume(path)
    assert start == CRASH_AT
    assert_same_history(path, uninterrupted)


def test_killed_between_the_resume_tensors_and_resume_json(uninterrupted, tmp_path, monkeypatch):
    """The optimizer state after step CRASH_AT − 1 is on disk, resume.json still names the
    state before it: the resume continues from the consistent older pair."""
    path = tmp_path / "crashed"
    write_info = ex.Recorder._write_resume_info

    def killed_before_writing(self, scheduler_stepped):
        if self.step == CRASH_AT and not scheduler_stepped:
            raise Crash("killed after the resume tensors, before resume.json")
        write_info(self, scheduler_stepped)

    monkeypatch.setattr(ex.Recorder, "_write_resume_info", killed_before_writing)
    with pytest.raises(Crash):
        record(path)
    monkeypatch.undo()
    assert ex.History(path, allow_incomplete=True).n_steps == CRASH_AT
    _, start = resume(path)
    assert start == CRASH_AT - 1
    assert_same_history(path, uninterrupted)


def damage_resume_state(path: Path, damage: str) -> str:
    """Damage the resume state of a crashed run; returns what the refusal must say."""
    if damage == "flipped byte":
        file = path / resume_tensors_file(path)
        data = bytearray(file.read_bytes())
        data[-5] ^= 0x01
        file.write_bytes(bytes(data))
        return "resume.json.*corrupted.*overwrite=True"
    if damage == "older format":  # resume.json as explaind wrote it before naming its tensors file
        info = json.loads((path / "resume.json").read_text())
        del info["tensors"], info["tensors_sha256"]
        (path / "resume.json").write_text(json.dumps(info))
        return "older explaind.*overwrite=True"
    if damage == "corrupt resume.json":
        (path / "resume.json").write_text("{bad")
        return "resume.json.*Fix"
    file = resume_tensors_file(path)  # deleted
    (path / file).unlink()
    return f"{file}.*Fix"


@pytest.mark.parametrize("damage", ["flipped byte", "older format", "corrupt resume.json", "resume tensors deleted"])
def test_damaged_resume_state_is_refused(tmp_path, damage):
    path = tmp_path / "crashed"
    with pytest.raises(Crash):
        record(path, crash_at=CRASH_AT)
    words = damage_resume_state(path, damage)
    model, optimizer, scheduler = fresh_objects(0)
    with pytest.raises(ex.HistoryError, match=f"(?s){words}"):
        ex.Recorder.resume(path, model, optimizer, scheduler=scheduler)


def test_resume_without_resume_state_is_refused(tmp_path):
    path = tmp_path / "crashed"
    with pytest.raises(Crash):
        record(path, crash_at=1)
    (path / "resume.json").unlink()  # as if killed right after step 0's manifest line
    model, optimizer, scheduler = fresh_objects(0)
    with pytest.raises(ex.HistoryError, match="(?s)no resume state.*overwrite=True"):
        ex.Recorder.resume(path, model, optimizer, scheduler=scheduler)


def test_resume_refuses_a_closed_history(uninterrupted):
    model, optimizer, scheduler = fresh_objects(0)
    with pytest.raises(ex.HistoryError, match="nothing to resume"):
        ex.Recorder.resume(uninterrupted, model, optimizer, scheduler=scheduler)


def test_resume_refuses_another_model(tmp_path):
    path = tmp_path / "crashed"
    with pytest.raises(Crash):
        record(path, crash_at=2)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(ex.HistoryError, match="shape"):
        ex.Recorder.resume(path, model, optimizer)


# --------------------------------------------------------------------------- truncation and corruption


def test_intact_history_reads_back(uninterrupted):
    hist = ex.History(uninterrupted)
    assert hist.n_steps == N_STEPS and hist.closed and hist.optimizer == "adamw"
    assert hist.train_indices().tolist() == sorted({int(i) + 100 for s in range(N_STEPS) for i in rows_of(s)})
    records = list(hist.steps())
    assert [r.step for r in records] == list(range(N_STEPS))
    assert all(torch.equal(r.indices, rows_of(r.step) + 100) for r in records)
    # learning rates as the StepLR schedule set them, per group
    assert [r.groups[0]["lr"] for r in records] == pytest.approx([0.03 * 0.5 ** (s // 3) for s in range(N_STEPS)])
    assert [r.groups[1]["lr"] for r in records] == pytest.approx([0.01 * 0.5 ** (s // 3) for s in range(N_STEPS)])
    for r in records[1:]:
        assert all(torch.equal(r.before[n], records[r.step - 1].after[n]) for n in r.before)


def test_missing_step_file_is_refused(copy_of):
    path = copy_of()
    last = manifest(path)[-1]["file"]
    (path / last).unlink()
    with pytest.raises(ex.HistoryError, match="(?s)missing.*(truncated|corrupted)"):
        ex.History(path)


def test_cut_manifest_is_refused(copy_of):
    path = copy_of()
    lines = (path / "manifest.jsonl").read_text().splitlines(keepends=True)
    (path / "manifest.jsonl").write_text("".join(lines[:-2]))
    with pytest.raises(ex.HistoryError, match=f"(?s)truncated.*{N_STEPS}.*{N_STEPS - 2}"):
        ex.History(path)


def test_a_manifest_naming_a_file_the_recorder_never_writes_is_refused(copy_of, tmp_path):
    """Even one whose size and sha256 match: a history reads only its own step files."""
    path = copy_of()
    lines = (path / "manifest.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    outside = tmp_path / "outside.safetensors"
    shutil.copy(path / first["file"], outside)
    lines[0] = json.dumps({**first, "file": "../outside.safetensors"}, sort_keys=True)
    (path / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ex.HistoryError, match=r"step 0 names the file '../outside.safetensors', where the Recorder "
                                              r"writes 'steps/0000000.safetensors'.*edited or corrupted"):
        ex.History(path)


def test_a_step_added_to_a_closed_manifest_is_not_called_truncated(copy_of):
    path = copy_of()
    lines = (path / "manifest.jsonl").read_text().splitlines()
    added = {**json.loads(lines[-1]), "step": N_STEPS, "file": f"steps/{N_STEPS:07d}.safetensors"}
    shutil.copy(path / json.loads(lines[-1])["file"], path / added["file"])
    (path / "manifest.jsonl").write_text("\n".join(lines + [json.dumps(added, sort_keys=True)]) + "\n")
    with pytest.raises(ex.HistoryError, match=f"has steps added after it was closed: closed with {N_STEPS} steps but "
                                              f"the manifest lists {N_STEPS + 1}"):
        ex.History(path)


def test_a_deleted_manifest_is_named(copy_of):
    path = copy_of()
    (path / "manifest.jsonl").unlink()
    for allow_incomplete in (False, True):
        with pytest.raises(ex.HistoryError, match="(?s)manifest.jsonl is missing.*deleted.*record it again.*overwrite=True"):
            ex.History(path, allow_incomplete=allow_incomplete)


def test_manifest_cut_mid_line_is_refused(copy_of):
    path = copy_of()
    text = (path / "manifest.jsonl").read_text()
    (path / "manifest.jsonl").write_text(text[: len(text) - 40])
    with pytest.raises(ex.HistoryError, match="truncated"):
        ex.History(path)


def test_missing_closed_json_means_incomplete(copy_of):
    path = copy_of()
    (path / "closed.json").unlink()
    with pytest.raises(ex.HistoryError, match="(?s)incomplete.*Recorder.resume.*allow_incomplete"):
        ex.History(path)
    hist = ex.History(path, allow_incomplete=True)
    assert hist.n_steps == N_STEPS and not hist.closed


def test_a_history_closed_before_the_manifest_was_hashed_still_opens(copy_of):
    """Its closed.json carries the final step file's hash only, which is still checked against
    the manifest's last line."""
    path = copy_of()
    edit_json("closed.json", lambda c: c.pop("manifest_sha256"))(path)
    assert ex.History(path).n_steps == N_STEPS
    edit_json("closed.json", lambda c: c.update(final_sha256="0" * 64))(path)
    with pytest.raises(ex.HistoryError, match="manifest.jsonl does not match"):
        ex.History(path)


def test_params_and_constants_load_the_trained_model(tmp_path):
    """The README's recipe: a fresh model loaded with {**h.params(s), **h.constants()} is the
    recorded one, BatchNorm's running statistics (set before recording, the model in eval mode) and
    a frozen layer included; θ_s alone leaves the fresh model's constants and computes other outputs.
    explain, handed that fresh model, computes with the recorded constants (library.md)."""
    def built(seed):
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.ReLU(),
                                   torch.nn.Linear(6, 3)).double()
    x, y = tiny_data()
    model = built(0)
    with torch.no_grad():
        model(3 * x + 1)  # train mode: running statistics of other data
    model.eval()
    model[0].requires_grad_(False)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with ex.Recorder(tmp_path / "h", model, optimizer) as rec:
        sgd_steps(rec, model, optimizer, x, y, 0, 2)
    h = ex.History(tmp_path / "h")
    loaded = built(1).eval()
    loaded.load_state_dict({**h.params(h.n_steps), **h.constants()})
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
        loaded.load_state_dict(built(1).state_dict())
        loaded.load_state_dict(h.params(h.n_steps), strict=False)
        assert (loaded(x) - model(x)).abs().max() > 0.1
        trained = F.log_softmax(model(x[:3]), -1)
    fresh = built(1).eval()
    fresh[0].requires_grad_(False)
    cube = ex.explain(h, fresh, x[:3], keep=("test", "output"), progress=False)  # with the history's constants
    assert torch.allclose(torch.as_tensor(cube.final.transpose("test", "output").values), trained, rtol=0, atol=1e-13)
    assert cube.attrs["relative_residual"] <= 1e-12


def test_flipped_byte_in_step_file_is_refused_when_read(copy_of):
    path = copy_of()
    file = path / manifest(path)[3]["file"]
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x40
    file.write_bytes(bytes(data))
    hist = ex.History(path)  # sizes still match: the hash is checked when the file is read
    hist.params(3)
    with pytest.raises(ex.HistoryError, match="(?s)sha256.*corrupted"):
        hist.params(4)
    with pytest.raises(ex.HistoryError, match="corrupted"):
        list(hist.steps())
    model, _, _ = fresh_objects(0)
    x, _, _, _ = make_data("mlp", 2, 0, 3)
    with pytest.raises(ex.HistoryError, match="corrupted"):
        ex.explain(path, model, x, progress=False)


def test_flipped_byte_in_initial_state_is_refused(copy_of):
    path = copy_of()
    file = path / "initial.safetensors"
    data = bytearray(file.read_bytes())
    data[-3] ^= 0x01
    file.write_bytes(bytes(data))
    with pytest.raises(ex.HistoryError, match="corrupted"):
        ex.History(path).params(0)


def test_flipped_byte_in_meta_json_is_refused(copy_of):
    """meta.json is not hashed by anything else: a flipped byte must still fail loudly."""
    path = copy_of()
    file = path / "meta.json"
    original = file.read_bytes()
    data = bytearray(original)
    data[0] ^= 0x01  # '{' -> 'z': no longer JSON
    file.write_bytes(bytes(data))
    with pytest.raises(ex.HistoryError, match="meta.json"):
        ex.History(path)
    # a flip that keeps valid JSON: the recorded loss reduction "mean" -> "mean" with one letter changed
    text = original.decode()
    position = text.index('"reduction": "mean"') + len('"reduction": "m')
    data = bytearray(original)
    data[position] ^= 0x01
    file.write_bytes(bytes(data))
    with pytest.raises(ex.HistoryError, match="meta.json"):
        ex.History(path)


class PositionMean(torch.nn.Module):
    """Logits of the mean over an input's positions: it takes inputs of any length."""

    def __init__(self):
        super().__init__()
        self.out = torch.nn.Linear(1, 3)

    def forward(self, x):
        return self.out(x.mean(1, keepdim=True))


def test_the_input_spec_is_the_first_batchs(tmp_path):
    """A run whose batches grow from 3 positions to 5: input_spec gives the first batch's shape
    and dtype (as its docstring says), not the last's."""
    torch.manual_seed(0)
    model = PositionMean().double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with ex.Recorder(tmp_path / "h", model, optimizer) as rec:
        for length in (3, 5):
            x, y = torch.randn(4, length, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            rec.batch(torch.arange(4), x, y)
            optimizer.step()
    assert ex.History(tmp_path / "h").input_spec() == ((3,), torch.float64)


def test_a_run_of_several_lengths_explains_any_length(tmp_path):
    """Batches of 3 and 5 positions: test inputs of 4 and 5 positions were refused ('trained on
    inputs of shape [batch, 3]'), though the model takes any length. Now a dim whose size the
    recorded batches vary takes any size, and the cube adds up to the change of outputs computed
    here at θ_0 and θ_N; another number of dims is refused naming the recorded shapes."""
    torch.manual_seed(0)
    model = PositionMean().double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with ex.Recorder(tmp_path / "h", model, optimizer) as rec:
        for length in (3, 5, 3):
            x, y = torch.randn(4, length, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            rec.batch(torch.arange(4), x, y)
            optimizer.step()
    history = ex.History(tmp_path / "h")
    assert history.input_shapes() == [(3,), (5,)]
    for length in (4, 5):
        test = torch.randn(2, length, dtype=torch.float64)
        cube = ex.explain(history, model, test, keep=("test", "output"), progress=False)
        change = []
        for s in (0, history.n_steps):
            model.load_state_dict(history.params(s))
            with torch.no_grad():
                change.append(F.log_softmax(model(test), -1))
        np.testing.assert_allclose(cube["attribution"].values, (change[1] - change[0]).numpy(), rtol=0, atol=1e-12)
    with pytest.raises(ex.InputError, match=re.escape(
            "test inputs have shape (2, 4, 1), but the model was trained on inputs of shape [batch, 3] and [batch, 5] "
            "(dims [1] vary in the recorded batches: any size there)")):
        ex.explain(history, model, torch.randn(2, 4, 1, dtype=torch.float64), progress=False)


# --------------------------------------------------------------------------- files on disk


def files_on_disk(path: Path) -> dict[str, tuple[str, int]]:
    """Every file under path: its sha256 and modification time (a rewrite changes the time)."""
    return {str(f.relative_to(path)): (hashlib.sha256(f.read_bytes()).hexdigest(), f.stat().st_mtime_ns)
            for f in sorted(path.rglob("*")) if f.is_file()}


def read_everything(path: Path) -> None:
    hist = ex.History(path, allow_incomplete=True)
    model, _, _ = fresh_objects(0)
    hist.check_model(model)
    assert len(hist.fingerprint()) == 64 and len(hist.train_indices()) > 0
    assert hist.input_spec() == ((4,), torch.float64) and hist.max_batch() == BATCH
    for reverse in (False, True):
        assert len(list(hist.steps(reverse=reverse))) == hist.n_steps
    hist.params(hist.n_steps)
    if hist.closed:  # explain() reads every step again, through its own History
        x, _, _, _ = make_data("mlp", 2, 0, 3)
        ex.explain(path, model, x, progress=False)


@pytest.mark.parametrize("state", ["closed", "step past resume state", "cut manifest line"])
def test_reading_a_history_leaves_every_file_untouched(uninterrupted, copy_of, tmp_path, state):
    path = copy_of() if state == "closed" else tmp_path / "crashed"
    if state == "step past resume state":
        record_step_past_resume_state(path)
    elif state == "cut manifest line":
        record_cut_manifest_line(path, uninterrupted)
    before = files_on_disk(path)
    read_everything(path)
    assert files_on_disk(path) == before


def test_no_pickle_in_the_history(tmp_path):
    path = tmp_path / "crashed"
    with pytest.raises(Crash):
        record(path, crash_at=3)  # leaves the resume state behind too
    files = [f for f in path.rglob("*") if f.is_file()]
    assert {"meta.json", "initial.safetensors", "manifest.jsonl", "resume.json", resume_tensors_file(path)} <= \
        {f.name for f in files}
    for f in files:
        assert f.name.endswith((".json", ".jsonl", ".safetensors")), f
        head = f.read_bytes()[:2]
        assert not head.startswith(b"\x80"), f"{f} looks like a pickle"
        assert not head.startswith(b"PK"), f"{f} looks like a torch.save zip archive"


def test_the_fingerprint_covers_every_step(tmp_path):
    """Two runs alike but for their last step's learning rate: a cube of one must not cite the other."""
    x, y = tiny_data()
    histories = []
    for last_lr in (0.1, 0.2):
        model = tiny()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        with ex.Recorder(tmp_path / f"lr{last_lr}", model, optimizer) as rec:
            optimizer.param_groups[0]["lr"] = 0.1
            sgd_steps(rec, model, optimizer, x, y, 0, 2)
            optimizer.param_groups[0]["lr"] = last_lr
            sgd_steps(rec, model, optimizer, x, y, 2, 3)
        histories.append(ex.History(tmp_path / f"lr{last_lr}"))
    same, other = histories
    assert [line["sha256"] for line in same.manifest[:2]] == [line["sha256"] for line in other.manifest[:2]]
    assert same.manifest[2]["sha256"] != other.manifest[2]["sha256"]
    assert same.fingerprint() != other.fingerprint()


def test_refuses_to_overwrite_a_history(tmp_path):
    run = train(Case("mlp", "sgd", steps=2), tmp_path / "h")
    before = ex.History(run.path).fingerprint()
    model = Case("mlp", "sgd").fresh_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ex.HistoryError, match="(?s)already holds files.*overwrite=True"):
        ex.Recorder(run.path, model, optimizer)
    assert ex.History(run.path).fingerprint() == before  # untouched
    again = train(Case("mlp", "sgd_momentum", steps=3, seed=4), tmp_path / "other")
    # overwrite=True replaces the old history completely
    x, y = again.train_x, again.train_y
    with ex.Recorder(run.path, model, optimizer, overwrite=True) as rec:
        for _ in range(3):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            rec.batch(torch.arange(len(x)), x, y)
            optimizer.step()
    hist = ex.History(run.path)
    assert hist.n_steps == 3 and hist.fingerprint() != before
    assert sorted(f.name for f in (run.path / "steps").iterdir()) == [f"{s:07d}.safetensors" for s in range(3)]


# --------------------------------------------------------------------------- defects found by probing


def tiny(seed: int = 0, activation=torch.nn.ReLU) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), activation(), torch.nn.Linear(8, 3)).double()


def tiny_data(n: int = 12):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def sgd_history(path, steps: int):
    """A closed history of `steps` SGD steps of tiny() on tiny_data(): (model, x, y)."""
    x, y = tiny_data()
    model = tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with ex.Recorder(path, model, optimizer) as rec:
        sgd_steps(rec, model, optimizer, x, y, 0, steps)
    return model, x, y


def sgd_steps(rec, model, optimizer, x, y, start: int, stop: int, *, loss=None, scheduler=None,
              crash_at: int | None = None, scheduler_every: int = 1, killed_after_schedule: bool = False):
    """SGD-style loop over batches of 4, stepping its scheduler after every `scheduler_every`-th step
    (a ReduceLROnPlateau with the loss on all of x, an epoch's evaluation); killed right after
    optimizer.step() of `crash_at`, or `killed_after_schedule`, after the scheduler's step there."""
    loss = loss or (lambda out, t: F.cross_entropy(out, t))
    for step in range(start, stop):
        rows = torch.arange(4 * step, 4 * step + 4) % len(x)
        optimizer.zero_grad()
        loss(model(x[rows]), y[rows]).backward()
        rec.batch(rows, x[rows], y[rows])
        optimizer.step()
        if step == crash_at and not killed_after_schedule:
            raise Crash(f"killed after step {step}")
        if scheduler is not None and step % scheduler_every == scheduler_every - 1:
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                with torch.no_grad():
                    scheduler.step(loss(model(x), y).item())
            else:
                scheduler.step()
        if step == crash_at:
            raise Crash(f"killed after step {step}'s scheduler step")


def test_overwrite_refuses_a_directory_that_is_not_a_history(tmp_path):
    path, elsewhere = tmp_path / "results", tmp_path / "keep"
    (path / "sub").mkdir(parents=True)
    elsewhere.mkdir()
    (elsewhere / "important.txt").write_text("x")
    (path / "notes.txt").write_text("my notes")
    (path / "sub" / "model.pt").write_text("weights")
    (path / "link").symlink_to(elsewhere)
    before = sorted(str(f) for f in tmp_path.rglob("*"))
    model = tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for overwrite in (False, True):
        with pytest.raises(ex.InputError, match="(?s)no explaind history.*new or empty directory") as err:
            ex.Recorder(path, model, optimizer, overwrite=overwrite)
        assert "overwrite=True" not in str(err.value)
    assert sorted(str(f) for f in tmp_path.rglob("*")) == before


def test_overwrite_deletes_only_the_history_files(tmp_path):
    x, y = tiny_data()
    path = tmp_path / "h"
    for steps in (3, 2):
        model = tiny(steps)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        with ex.Recorder(path, model, optimizer, overwrite=steps == 2) as rec:
            sgd_steps(rec, model, optimizer, x, y, 0, steps)
        if steps == 3:  # the user's files, next to the history that is then replaced
            (path / "notes.txt").write_text("mine")
            (path / "steps" / "README").write_text("mine too")
    assert ex.History(path).n_steps == 2
    assert sorted(f.name for f in (path / "steps").iterdir()) == ["0000000.safetensors", "0000001.safetensors", "README"]
    assert (path / "notes.txt").read_text() == "mine"


def test_overwrite_keeps_the_old_history_until_the_new_one_has_passed_its_first_step(tmp_path):
    """The new recording is written beside the old history until its first step has passed the
    gradient check: refused there (a loss other than the declared one), or raising in the loop,
    or killed outright, it leaves the old history as it was; a later overwrite then succeeds."""
    path = tmp_path / "h"
    model, x, y = sgd_history(path, 3)
    before = files_on_disk(path)
    def smoothed(out, t):  # not the declared loss: refused by the first step's gradient check
        return F.cross_entropy(out, t, label_smoothing=0.1)

    def broken(out, t):  # the loop fails before its first optimizer step
        raise Crash("a bug in the new loop")

    for failure, loss in [(ex.UnsupportedError, smoothed), (Crash, broken)]:
        model = tiny(1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        with pytest.raises(failure):
            with ex.Recorder(path, model, optimizer, overwrite=True) as rec:
                sgd_steps(rec, model, optimizer, x, y, 0, 3, loss=loss)
        assert files_on_disk(path) == before
    # killed before its first step (no `with` to clean up): the old history still opens
    model = tiny(2)
    ex.Recorder(path, model, torch.optim.SGD(model.parameters(), lr=0.1), overwrite=True)
    assert (path / ex.history.REPLACEMENT / "meta.json").is_file()
    assert ex.History(path).n_steps == 3
    model = tiny(3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with ex.Recorder(path, model, optimizer, overwrite=True) as rec:
        sgd_steps(rec, model, optimizer, x, y, 0, 1)
        assert ex.History(path, allow_incomplete=True).n_steps == 1  # in place once its first step passed
        sgd_steps(rec, model, optimizer, x, y, 1, 2)
    assert sorted(f.name for f in path.iterdir()) == sorted([*ex.history.HISTORY_FILES, "steps"])  # none left beside
    hist = ex.History(path)
    assert hist.n_steps == 2 and torch.equal(hist.params(2)["2.bias"], model[2].bias.detach())


def test_overwrite_by_a_recording_of_no_step(tmp_path):
    """A recording closed before any step replaces the old history too (as one of n steps does)."""
    sgd_history(tmp_path / "h", 2)
    model = tiny(1)
    with ex.Recorder(tmp_path / "h", model, torch.optim.SGD(model.parameters(), lr=0.1), overwrite=True):
        pass
    assert sorted(f.name for f in (tmp_path / "h").iterdir()) == ["closed.json", "initial.safetensors",
                                                                  "manifest.jsonl", "meta.json", "steps"]
    with pytest.raises(ex.HistoryError, match="no complete step"):
        ex.History(tmp_path / "h")


def test_a_file_as_history_path_is_refused(tmp_path):
    (tmp_path / "f.txt").write_text("x")
    model = tiny()
    with pytest.raises(ex.InputError, match="(?s)is a file.*directory"):
        ex.Recorder(tmp_path / "f.txt", model, torch.optim.SGD(model.parameters(), lr=0.1))


@pytest.mark.parametrize("loss, reduction, fix", [
    (torch.nn.CrossEntropyLoss(label_smoothing=0.1), "mean", r"CrossEntropyLoss\(\.\.\., reduction='none'\)"),
    (torch.nn.MSELoss(reduction="none"), "sum", r"reduction='none'.*sum\(1\)"),
], ids=["mean-reducing", "per-output"])
def test_a_loss_without_per_sample_values_is_refused_at_record_time(tmp_path, loss, reduction, fix):
    """Both match .grad at record time (a batch of 3 against 3 outputs broadcasts), and break
    explain() later: refused at the first gradient check. A torch loss module that reduces is
    told to reduce none; one that reduces none but keeps each output, to sum them per sample."""
    x, y = tiny_data(3)
    targets = y if isinstance(loss, torch.nn.CrossEntropyLoss) else F.one_hot(y, 3).double()
    model = tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ex.InputError, match="(?s)one loss per sample.*Fix: .*" + fix):
        with ex.Recorder(tmp_path / "h", model, optimizer, loss=loss, reduction=reduction) as rec:
            optimizer.zero_grad()
            loss(model(x), targets).sum().backward()
            rec.batch(torch.arange(3), x, targets)
            optimizer.step()


def crashed_mse_run(path: Path) -> None:
    x, y = tiny_data()
    model = tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    targets = F.one_hot(y, 3).double()
    mse = lambda out, t: F.mse_loss(out, t, reduction="sum")  # noqa: E731
    with pytest.raises(Crash), ex.Recorder(path, model, optimizer, loss="mse", reduction="sum", check_every=1) as rec:
        sgd_steps(rec, model, optimizer, x, targets, 0, 3, loss=mse, crash_at=1)


def test_resume_continues_with_the_recorded_loss(tmp_path):
    path = tmp_path / "h"
    crashed_mse_run(path)
    model = tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(ex.InputError, match="(?s)reduction='sum'.*reduction='mean'.*leave loss= and reduction= out"):
        ex.Recorder.resume(path, model, optimizer, reduction="mean")
    x, y = tiny_data()
    mse = lambda out, t: F.mse_loss(out, t, reduction="sum")  # noqa: E731
    with ex.Recorder.resume(path, model, optimizer, check_every=1) as rec:  # the gradient check passes
        assert (rec.loss_name, rec.reduction) == ("mse", "sum")
        sgd_steps(rec, model, optimizer, x, F.one_hot(y, 3).double(), rec.step, 4, loss=mse)
    assert ex.History(path).n_steps == 4


def smoothed(out, targets):
    return F.cross_entropy(out, targets, label_smoothing=0.1, reduction="none")


def test_a_resume_given_another_custom_loss_names_the_recorded_one(tmp_path):
    """A run recorded with a custom loss and resumed with a function of another name was told to
    'leave loss= and reduction= out', which the resume then refused (a custom loss's code is not
    stored); the refusal names the killed run's function to pass again, which resumes."""
    path, (x, y) = tmp_path / "h", tiny_data()
    model = tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    mean_of_smoothed = lambda out, t: smoothed(out, t).mean()  # noqa: E731
    with pytest.raises(Crash), ex.Recorder(path, model, optimizer, loss=smoothed, check_every=1) as rec:
        sgd_steps(rec, model, optimizer, x, y, 0, 3, loss=mean_of_smoothed, crash_at=1)
    model = tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    renamed = lambda out, t: smoothed(out, t)  # noqa: E731
    with pytest.raises(ex.InputError, match=r"(?s)pass the killed run's loss function again.*"
                                            r"test_history\.smoothed") as refused:
        ex.Recorder.resume(path, model, optimizer, loss=renamed)
    assert "leave loss= and reduction= out" not in str(refused.value)
    with ex.Recorder.resume(path, model, optimizer, loss=smoothed, check_every=1) as rec:
        sgd_steps(rec, model, optimizer, x, y, rec.step, 3, loss=mean_of_smoothed)
    assert ex.History(path).n_steps == 3


def crashed_scheduled_run(path: Path, scheduler_of, crash_at: int):
    x, y = tiny_data()
    model = tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = scheduler_of(optimizer)
    with pytest.raises(Crash), ex.Recorder(path, model, optimizer, scheduler=scheduler) as rec:
        sgd_steps(rec, model, optimizer, x, y, 0, 8, scheduler=scheduler, crash_at=crash_at)
    model = tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return model, optimizer, scheduler_of(optimizer)


def step_lr(optimizer):
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)


def multi_step_lr(optimizer):
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[2, 4], gamma=0.5)


@pytest.mark.parametrize("sequential", [False, True], ids=["plain", "within a SequentialLR"])
def test_a_resume_given_a_scheduler_of_another_kind_is_refused(tmp_path, sequential):
    """A run scheduled by MultiStepLR([2, 4]) resumed with StepLR(3): the restored state has no
    step_size, so the StepLR kept its own and the resumed steps went on at rates 0.025 from step 6
    where the run's were 0.025 from step 4 on, silently. A field of the given scheduler that the
    recorded state does not hold is refused, naming it, before anything is rewritten; the killed
    run's scheduler resumes."""
    def kind(scheduler_of):
        def built(optimizer):
            if not sequential:
                return scheduler_of(optimizer)
            decay = torch.optim.lr_scheduler.ExponentialLR(optimizer, 0.9)
            return torch.optim.lr_scheduler.SequentialLR(optimizer, [scheduler_of(optimizer), decay], milestones=[6])
        return built

    model, optimizer, _ = crashed_scheduled_run(tmp_path / "h", kind(multi_step_lr), crash_at=3)
    before = files_on_disk(tmp_path / "h")
    other = kind(lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5))(optimizer)
    with pytest.raises(ex.InputError, match=r"(?s)StepLR.*step_size.*milestones.*Fix: build the scheduler as in "
                                            r"the killed run"):
        ex.Recorder.resume(tmp_path / "h", model, optimizer, scheduler=other)
    assert files_on_disk(tmp_path / "h") == before  # refused before anything is rewritten
    rec = ex.Recorder.resume(tmp_path / "h", model, optimizer, scheduler=kind(multi_step_lr)(optimizer))
    rec.close()


def test_resume_without_the_recorded_scheduler_is_refused(tmp_path):
    model, optimizer, _ = crashed_scheduled_run(tmp_path / "h", step_lr, crash_at=2)
    before = files_on_disk(tmp_path / "h")
    with pytest.raises(ex.InputError, match="(?s)scheduler.*scheduler="):
        ex.Recorder.resume(tmp_path / "h", model, optimizer)
    assert files_on_disk(tmp_path / "h") == before  # refused before anything is rewritten


def test_resume_with_a_scheduler_the_recording_did_not_store_is_refused(tmp_path):
    """Recorded without scheduler=: a scheduler passed to resume() would restart its schedule."""
    path, (x, y) = tmp_path / "h", tiny_data()
    model = tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = step_lr(optimizer)
    with pytest.raises(Crash), ex.Recorder(path, model, optimizer) as rec:
        sgd_steps(rec, model, optimizer, x, y, 0, 8, scheduler=scheduler, crash_at=2)
    before = files_on_disk(path)
    model = tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ex.InputError, match="(?s)without scheduler=.*Fix.*Recorder\\(\\.\\.\\., scheduler=scheduler\\)"):
        ex.Recorder.resume(path, model, optimizer, scheduler=step_lr(optimizer))
    assert files_on_disk(path) == before  # refused before anything is rewritten
    with ex.Recorder.resume(path, model, optimizer) as rec:  # scheduler=None: the last recorded step's lr
        assert rec.step == 3 and optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**2)


def refused_at_the_next_step_but_closes(path: Path, model, optimizer, scheduler, error, refusal: str) -> None:
    """A resume that cannot place its schedule refuses the first step its loop records, before
    anything is written; a loop that had finished (killed before close()) closes the history."""
    x, y = tiny_data()
    recorded = manifest(path)
    with pytest.raises(error, match=refusal):
        with ex.Recorder.resume(path, model, optimizer, scheduler=scheduler) as rec:
            sgd_steps(rec, model, optimizer, x, y, rec.step, rec.step + 1)
    assert manifest(path) == recorded
    with ex.Recorder.resume(path, model, optimizer, scheduler=scheduler):
        pass
    assert ex.History(path).n_steps == len(recorded)


EPOCH_SCHEDULES = {
    "StepLR": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),
    "SequentialLR": lambda opt: torch.optim.lr_scheduler.SequentialLR(  # steps the scheduler it is in
        opt, [torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0, end_factor=0.5, total_iters=2),
              torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.7)], milestones=[2]),
    "ChainedScheduler": lambda opt: torch.optim.lr_scheduler.ChainedScheduler(  # steps both
        [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5), torch.optim.lr_scheduler.ExponentialLR(opt, 0.9)]),
    # stepped with the evaluation's loss, which mode="max" takes as no improvement: halved each epoch
    "ReduceLROnPlateau": lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", patience=0, factor=0.5),
}


def scheduled_run(path: Path, scheduler_of, scheduler_every: int, crash_at: int | None = None, **kill) -> int:
    """tiny() with momentum SGD for 8 steps, its scheduler stepped every `scheduler_every` steps (an
    epoch), recorded to `path`, or resumed where a run there was killed (see sgd_steps): the first step."""
    x, y = tiny_data()
    model = tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = scheduler_of(optimizer)
    recorder = (ex.Recorder.resume if path.exists() else ex.Recorder)(path, model, optimizer, scheduler=scheduler)
    with pytest.raises(Crash) if crash_at is not None else nullcontext(), recorder as rec:
        first = rec.step
        sgd_steps(rec, model, optimizer, x, y, first, 8, scheduler=scheduler, crash_at=crash_at,
                  scheduler_every=scheduler_every, **kill)
    return first


@pytest.mark.parametrize("schedule", EPOCH_SCHEDULES)
@pytest.mark.parametrize("crash_at, killed_after_schedule", [
    (3, True),  # in the epoch-end evaluation after the scheduler's step
    (3, False),  # after the epoch's last optimizer step, before its scheduler's
    (4, False),  # mid-epoch
], ids=["after the epoch's scheduler step", "before it", "mid-epoch"])
def test_a_per_epoch_schedule_resumes_to_the_uninterrupted_history(tmp_path, schedule, crash_at,
                                                                    killed_after_schedule):
    """Stepped after every 2nd optimizer step, an epoch's last (a ReduceLROnPlateau with its evaluation's
    metric): a run killed after an optimizer step and before the next one cannot tell whether the loop
    stepped its scheduler in between, and resumes from the state before that optimizer step, which it
    redoes, the loop's evaluation and scheduler step with it."""
    whole, crashed = tmp_path / "whole", tmp_path / "crashed"
    assert scheduled_run(whole, EPOCH_SCHEDULES[schedule], 2) == 0
    lrs = [line["groups"][0]["lr"] for line in manifest(whole)]
    assert lrs[0::2] == lrs[1::2] and lrs[4] != lrs[3]  # one rate an epoch, moved by the step after step 3
    scheduled_run(crashed, EPOCH_SCHEDULES[schedule], 2, crash_at, killed_after_schedule=killed_after_schedule)
    assert ex.History(crashed, allow_incomplete=True).n_steps == crash_at + 1
    assert scheduled_run(crashed, EPOCH_SCHEDULES[schedule], 2) == crash_at  # the killed step, redone
    assert_same_history(crashed, whole)


def test_a_per_step_metric_driven_scheduler_killed_before_its_step_redoes_the_killed_step(tmp_path):
    """A ReduceLROnPlateau stepped after every optimizer step cannot be caught up (its metric is not
    in the history): killed between the two, the run resumes from before the killed step."""
    plateau = EPOCH_SCHEDULES["ReduceLROnPlateau"]
    scheduled_run(tmp_path / "whole", plateau, 1)
    scheduled_run(tmp_path / "crashed", plateau, 1, crash_at=2)
    assert scheduled_run(tmp_path / "crashed", plateau, 1) == 2
    assert_same_history(tmp_path / "crashed", tmp_path / "whole")


@pytest.mark.parametrize("schedule", ["ReduceLROnPlateau", "StepLR"])
def test_an_unplaceable_schedule_stored_by_an_older_explaind_is_refused_with_the_fix(tmp_path, schedule):
    """An explaind before the state before each step was kept with the one after it: a run killed
    between an optimizer step and its per-epoch (or metric-driven) scheduler's step cannot tell whether
    the scheduler was due, and refuses to record another step; a loop that had finished closes."""
    path = tmp_path / "h"
    scheduled_run(path, EPOCH_SCHEDULES[schedule], 4, crash_at=5)
    info = json.loads((path / "resume.json").read_text())
    del info["before_step"]
    (path / "resume.json").write_text(json.dumps(info))
    model = tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    refused_at_the_next_step_but_closes(path, model, optimizer, EPOCH_SCHEDULES[schedule](optimizer),
                                        ex.UnsupportedError, "(?s)killed after an optimizer step and before the "
                                        "next one.*older explaind.*Fix.*overwrite=True")


@pytest.mark.parametrize("ids", [torch.arange(-4, 0), torch.ones(4, dtype=torch.bool), torch.arange(4) + 0.5, [], ],
                         ids=["negative", "bool", "float", "empty batch"])
def test_batch_refuses_what_is_not_a_batch_of_dataset_indices(tmp_path, ids):
    x, y = tiny_data(4)
    rows = slice(0, len(ids))
    model = tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with ex.Recorder(tmp_path / "h", model, optimizer) as rec:
        with pytest.raises(ex.InputError, match="(?s)batch\\(\\).*(negative|integer|empty).*Fix"):
            rec.batch(ids, x[rows], y[rows])


def test_batch_refuses_dataset_indices_torch_makes_no_tensor_of(tmp_path):
    x, y = tiny_data(4)
    model = tiny()
    with ex.Recorder(tmp_path / "h", model, torch.optim.SGD(model.parameters(), lr=0.1)) as rec:
        with pytest.raises(ex.InputError, match="(?s)batch\\(\\)'s dataset indices cannot be made a tensor.*str.*pass a tensor"):
            rec.batch("abcd", x, y)


def test_batch_without_dataset_indices_names_where_they_come_from(tmp_path):
    """A Dataset that returns (x, y) gives a loop no indices: None was named only as a value torch
    makes no tensor of."""
    x, y = tiny_data(4)
    model = tiny()
    with ex.Recorder(tmp_path / "h", model, torch.optim.SGD(model.parameters(), lr=0.1)) as rec:
        with pytest.raises(ex.InputError, match=r"(?s)batch\(\) got no dataset indices \(None\).*__getitem__\(i\) "
                                                r"returns \(i, x\[i\], y\[i\]\).*torch.arange\(len\(inputs\)\)"):
            rec.batch(None, x, y)


def test_batch_indices_of_several_dims_are_refused_by_their_shape(tmp_path):
    """Token inputs passed first (batch(x, y, indices)) were flattened into 4 x 2 'indices' and
    named only by their count; an index per row as a column [batch, 1] is taken as it was."""
    x, y = tiny_data(4)
    model = tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with ex.Recorder(tmp_path / "h", model, optimizer) as rec:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        with pytest.raises(ex.InputError, match=r"(?s)one dataset index per row.*shape \(4, 2\).*"
                                                r"batch\(indices, inputs, targets\)"):
            rec.batch(torch.arange(8).reshape(4, 2), x, y)
        rec.batch(torch.arange(4)[:, None], x, y)
        optimizer.step()
    assert ex.History(tmp_path / "h").train_indices().tolist() == [0, 1, 2, 3]


def test_batch_positions_declared_as_dataset_indices_are_refused(tmp_path):
    """Shuffled batches declared with arange(batch size): position 0 holds another sample, of another
    class, at the next step. The same index with the same class (a later epoch) is fine."""
    x, y = tiny_data(12)
    model = tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    rows = [torch.arange(4), torch.arange(4), torch.tensor([5, 2, 7, 9])]  # two epochs, then shuffled
    assert y[5] != y[0]
    with ex.Recorder(tmp_path / "h", model, optimizer) as rec:
        for step, r in enumerate(rows):
            optimizer.zero_grad()
            F.cross_entropy(model(x[r]), y[r]).backward()
            if step < 2:
                rec.batch(r, x[r], y[r])
                optimizer.step()
        with pytest.raises(ex.InputError, match=f"(?s)index 0 with target {y[5]} at step 2.*step 0.*"
                                                f"target {y[0]}.*Fix.*not its position in the batch"):
            rec.batch(torch.arange(4), x[r], y[r])
        twice = torch.tensor([11, 11])  # one index, two classes, in one batch
        with pytest.raises(ex.InputError, match=f"(?s)index 11 twice in the batch of step 2, with targets {y[0]} and "
                                                f"{y[5]}.*Fix.*not its position in the batch"):
            rec.batch(twice, x[[0, 5]], y[[0, 5]])
        rec.batch(r, x[r], y[r])  # the batch's own dataset indices
        optimizer.step()
    assert ex.History(tmp_path / "h").n_steps == 3


def test_batch_positions_of_a_regression_are_refused_and_its_other_targets_are_not_checked(tmp_path):
    """An MSE target is the sample's own, so positions declared as indices are refused by their
    targets, as classes are; class probabilities (mixup draws them anew each step) and a custom
    loss's targets are left alone."""
    x, _ = tiny_data(12)
    targets = torch.linspace(-1, 1, 36, dtype=torch.float64).view(12, 3)
    model = tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with ex.Recorder(tmp_path / "mse", model, optimizer, loss="mse") as rec:
        for rows in (torch.arange(4), torch.arange(4)):  # one sample twice: the same targets
            optimizer.zero_grad()
            ((model(x[rows]) - targets[rows]) ** 2).sum(1).mean().backward()
            rec.batch(rows, x[rows], targets[rows])
            optimizer.step()
        with pytest.raises(ex.InputError, match=r"(?s)index 0 with target \[0.37.*at step 2.*step 0.*"
                                                r"target \[-1.0.*not its position in the batch"):
            rec.batch(torch.arange(4), x[8:], targets[8:])
    mixed = torch.softmax(targets, 1)
    probabilities, custom = tiny(), tiny()
    for name, model, loss, declared in [("p", probabilities, "cross_entropy", lambda r, s: mixed[r].roll(s, 1)),
                                        ("c", custom, lambda o, t: ((o - t) ** 2).sum(1), lambda r, s: targets[r] + s)]:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        with ex.Recorder(tmp_path / name, model, optimizer, loss=loss) as rec:
            for step in range(2):  # the same indices with other targets
                rows = torch.arange(4)
                optimizer.zero_grad()
                out, t = model(x[rows]), declared(rows, step)
                (F.cross_entropy(out, t) if name == "p" else loss(out, t).mean()).backward()
                rec.batch(rows, x[rows], t)
                optimizer.step()
        assert ex.History(tmp_path / name).n_steps == 2


def test_a_resumed_recorder_knows_the_classes_the_killed_run_declared(tmp_path):
    """The killed run declared index 0 with class y[0] at step 0; after the resume, position 0
    declared with another class is refused, naming that step."""
    x, y = tiny_data(12)
    assert y[5] != y[0]
    model = tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(Crash), ex.Recorder(tmp_path / "h", model, optimizer) as rec:
        sgd_steps(rec, model, optimizer, x, y, 0, 8, crash_at=1)  # indices 0-3, then 4-7
    model = tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with ex.Recorder.resume(tmp_path / "h", model, optimizer) as rec:
        assert rec.step == 2
        r = torch.tensor([5, 2, 7, 9])
        optimizer.zero_grad()
        F.cross_entropy(model(x[r]), y[r]).backward()
        with pytest.raises(ex.InputError, match=f"(?s)index 0 with target {y[5]} at step 2.*step 0 declared it "
                                                f"with target {y[0]}.*Fix"):
            rec.batch(torch.arange(4), x[r], y[r])
        rec.batch(r, x[r], y[r])
        optimizer.step()
    assert ex.History(tmp_path / "h").train_indices().tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 9]


def test_resuming_a_history_whose_steps_mix_classes_is_refused_before_anything_changes(tmp_path, monkeypatch):
    """Recorded by an explaind that did not check the classes (the check switched off here): step 1
    declares index 0 with another class than step 0. The resume names both steps, changes no file
    and leaves no hook on the optimizer."""
    import explaind.history as history_module

    x, y = tiny_data(12)
    assert y[4] != y[0]
    model = tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with monkeypatch.context() as unchecked:
        unchecked.setattr(history_module, "_target_conflict", lambda *args: None)
        with pytest.raises(Crash), ex.Recorder(tmp_path / "h", model, optimizer) as rec:
            for step, rows in enumerate([torch.arange(4), torch.arange(4, 8)]):
                optimizer.zero_grad()
                F.cross_entropy(model(x[rows]), y[rows]).backward()
                rec.batch(torch.arange(4), x[rows], y[rows])  # positions, not dataset indices
                optimizer.step()
            raise Crash("killed after step 1")
    before = files_on_disk(tmp_path / "h")
    model = tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ex.HistoryError, match=f"(?s)step 1 declares dataset index 0 with target {y[4]}, but step 0 "
                                              f"with target {y[0]}.*Fix: record the run again with overwrite=True"):
        ex.Recorder.resume(tmp_path / "h", model, optimizer)
    assert files_on_disk(tmp_path / "h") == before
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks


def test_int32_class_targets_are_recorded_and_explained(tmp_path):
    x, y = tiny_data()
    model = tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with ex.Recorder(tmp_path / "h", model, optimizer, check_every=1) as rec:
        sgd_steps(rec, model, optimizer, x, y.int(), 0, 3, loss=lambda out, t: F.cross_entropy(out, t.long()))
    cube = ex.explain(tmp_path / "h", model, x[:2], y[:2].int(), progress=False, dtype=torch.float64)
    assert cube.attrs["max_abs_residual"] < 1e-12


def test_a_diverging_run_is_refused_as_divergence(tmp_path):
    x, y = tiny_data()
    model = tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e308)
    with pytest.raises(ex.UnsupportedError, match="(?s)NaN or infinite at step 1.*lower the learning rate"):
        with ex.Recorder(tmp_path / "h", model, optimizer) as rec:
            sgd_steps(rec, model, optimizer, x, y, 0, 2)


def test_frozen_parameters_left_in_the_optimizer_are_constants(tmp_path):
    x, y = tiny_data()
    model = tiny()
    model[0].requires_grad_(False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    with ex.Recorder(tmp_path / "h", model, optimizer) as rec:
        sgd_steps(rec, model, optimizer, x, y, 0, 3)
        optimizer.zero_grad()
        F.cross_entropy(model(x[:4]), y[:4]).backward()
        model[0].weight.grad = torch.ones_like(model[0].weight)  # the optimizer would now move it
        rec.batch(torch.arange(4), x[:4], y[:4])
        with pytest.raises(ex.UnsupportedError, match="(?s)frozen parameter '0.weight' has a gradient.*Fix"):
            optimizer.step()
        rec._pending = None  # the refused step never ran
    cube = ex.explain(tmp_path / "h", model, x[:2], y[:2], progress=False, dtype=torch.float64)
    assert cube.attrs["max_abs_residual"] < 1e-12


class Masked(torch.nn.Module):
    """A ReLU MLP whose hidden units pass through a constant mask buffer."""

    def __init__(self):
        super().__init__()
        self.net = tiny()
        self.register_buffer("mask", torch.ones(3, dtype=torch.float64))

    def forward(self, x):
        return self.net(x) * self.mask


@pytest.mark.parametrize("change", ["add_param_group", "buffer", "frozen parameter"])
def test_changes_the_history_cannot_hold_are_refused_at_the_next_step(tmp_path, change):
    """The optimizer's tensors and the constants (frozen parameters, buffers) are fixed by the
    history; changed mid-run, the cube would explain another function than the one trained."""
    x, y = tiny_data()
    model = Masked()
    model.net[0].requires_grad_(False)
    optimizer = torch.optim.SGD(model.net[2].parameters(), lr=0.1)
    expected = {"add_param_group": (ex.UnsupportedError, "parameter groups changed before step 2"),
                "buffer": (ex.HistoryError, "buffer 'mask'.*changed before step 2"),
                "frozen parameter": (ex.HistoryError, "frozen parameter 'net.0.weight'.*changed before step 2")}
    error, message = expected[change]
    with ex.Recorder(tmp_path / "h", model, optimizer) as rec:
        sgd_steps(rec, model, optimizer, x, y, 0, 2)
        if change == "add_param_group":
            model.net[0].requires_grad_(True)
            optimizer.add_param_group({"params": model.net[0].parameters()})
        else:
            with torch.no_grad():
                (model.mask if change == "buffer" else model.net[0].weight)[0] = 0.0
        with pytest.raises(error, match="(?s)" + message + ".*Fix"):
            sgd_steps(rec, model, optimizer, x, y, 2, 3)
        rec._pending = None  # the refused step never ran
    assert ex.History(tmp_path / "h").n_steps == 2


def test_a_history_without_a_complete_step_names_the_fix(tmp_path):
    x, y = tiny_data()
    model = tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(Crash):
        with ex.Recorder(tmp_path / "h", model, optimizer):
            raise Crash("killed before the first step")
    for call in (lambda: ex.Recorder.resume(tmp_path / "h", model, optimizer), lambda: ex.History(tmp_path / "h"),
                 lambda: ex.explain(tmp_path / "h", model, x[:2], progress=False)):
        with pytest.raises(ex.HistoryError, match="(?s)no complete step.*refused by a check.*overwrite=True") as err:
            call()
        assert "resume(" not in str(err.value)  # there is nothing to resume


def edit_json(name: str, change):
    def damage(path: Path) -> None:
        content = json.loads((path / name).read_text())
        change(content)
        (path / name).write_text(json.dumps(content))
    return damage


def scale_second_step(value):
    def damage(path: Path) -> None:
        lines = manifest(path)
        lines[1]["gradient_scale"] = value
        (path / "manifest.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return damage


def halve_the_last_learning_rate(path: Path) -> None:
    lines = manifest(path)
    lines[-1]["groups"][0]["lr"] /= 2
    (path / "manifest.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def drop_file_of_second_manifest_line(path: Path) -> None:
    lines = manifest(path)
    del lines[1]["file"]
    (path / "manifest.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


@pytest.mark.parametrize("file, damage", [
    ("closed.json", lambda path: (path / "closed.json").write_text("")),
    ("closed.json", edit_json("closed.json", lambda c: c.pop("n_steps"))),
    ("meta.json", edit_json("meta.json", lambda c: c.pop("params"))),
    ("meta.json", edit_json("meta.json", lambda c: c["params"][0].update(dtype="float33"))),
    ("manifest.jsonl", drop_file_of_second_manifest_line),
    ("manifest.jsonl", scale_second_step(1.5)),
    ("manifest.jsonl", scale_second_step(0)),
    ("manifest.jsonl", scale_second_step("0.5")),
    ("manifest.jsonl", halve_the_last_learning_rate),
    ("manifest.jsonl", edit_json("closed.json", lambda c: c.update(final_sha256="0" * 64))),
    ("initial.safetensors", lambda path: (path / "initial.safetensors").unlink()),
    ("meta.json", edit_json("meta.json", lambda c: c.update(reduction="max"))),
    ("meta.json", edit_json("meta.json", lambda c: c.update(class_weights=[1.0, 2.0, 3.0]))),
    ("meta.json", edit_json("meta.json", lambda c: c.update(version=2))),
    ("meta.json", edit_json("meta.json", lambda c: c.update(version=2, class_weights=[1.0, -2.0, 3.0]))),
    ("meta.json", edit_json("meta.json", lambda c: c.update(version=2, class_weights=["1.0", 2.0, 3.0]))),
    ("meta.json", edit_json("meta.json", lambda c: c.update(version=2, class_weights=[]))),
    ("meta.json", edit_json("meta.json", lambda c: c.update(version=2, class_weights=[1.0, 2.0], loss="mse"))),
], ids=["empty closed.json", "closed.json without n_steps", "meta.json without params", "bad dtype",
        "manifest line without file", "gradient scale above 1", "gradient scale 0", "gradient scale as text",
        "a learning rate edited", "another final step hash",
        "initial state deleted", "unknown reduction", "class weights in format version 1",
        "version 2 without class weights", "a negative class weight", "a class weight as text",
        "no class weight", "class weights of a loss without classes"])
def test_damaged_files_are_refused_naming_the_file(copy_of, file, damage):
    path = copy_of()
    damage(path)
    with pytest.raises(ex.HistoryError, match=f"(?s){file}.*Fix: restore the history"):
        ex.History(path).params(0)


def test_a_closed_meta_json_edited_to_another_valid_value_is_refused(copy_of):
    """A reduction edited from mean to sum is a value this library knows, so only the hash close()
    recorded tells it from the recorded one: read as it stands, every sample's gradient would be
    weighted 1 where the run weighted it 1/|b_s|, or the other way round."""
    path = copy_of()
    recorded = json.loads((path / "meta.json").read_text())["reduction"]
    edit_json("meta.json", lambda c: c.update(reduction={"mean": "sum", "sum": "mean"}[recorded]))(path)
    with pytest.raises(ex.HistoryError, match=r"meta\.json does not match the hash recorded when the history was "
                                              r"closed: it was edited or corrupted"):
        ex.History(path)


def test_manifest_lines_out_of_order_are_refused_without_a_closing_hash(copy_of):
    """A killed run has no closing hash over its manifest: its step numbers alone show that two
    lines were swapped, which would read θ_3 as θ_2 and the batch of step 2 as step 1's."""
    path = copy_of()
    (path / "closed.json").unlink()
    lines = (path / "manifest.jsonl").read_text().splitlines(keepends=True)
    lines[1], lines[2] = lines[2], lines[1]
    (path / "manifest.jsonl").write_text("".join(lines))
    with pytest.raises(ex.HistoryError, match=r"manifest\.jsonl: line 2 is step 2, expected 1; the manifest is "
                                              "corrupted"):
        ex.History(path, allow_incomplete=True)


def test_a_killed_runs_gradient_scale_above_1_is_refused(tmp_path):
    """A killed run has no closing hash over its manifest: only the range check refuses a clip factor
    above 1, which no clipping makes (read as it stands, it would scale up every sample's share of
    that step)."""
    sgd_history(tmp_path / "h", 3)
    (tmp_path / "h" / "closed.json").unlink()
    scale_second_step(1.5)(tmp_path / "h")
    with pytest.raises(ex.HistoryError, match=r"manifest\.jsonl: step 1 records the gradient scale 1\.5, not a "
                                              r"number in \(0, 1\]: the manifest was edited or corrupted"):
        ex.History(tmp_path / "h", allow_incomplete=True)
    scale_second_step(1.0)(tmp_path / "h")
    assert ex.History(tmp_path / "h", allow_incomplete=True).n_steps == 3


def test_a_step_file_of_another_size_is_refused_when_the_history_opens(tmp_path):
    """A step file one byte longer than the manifest's record is refused on opening, before any
    step is read (its hash is checked only when it is read)."""
    sgd_history(tmp_path / "h", 3)
    file = tmp_path / "h" / "steps" / "0000001.safetensors"
    size = file.stat().st_size
    file.write_bytes(file.read_bytes() + b" ")
    fix = "the history is truncated or corrupted. Fix: restore the history from its source (dvc pull) or record it again"
    with pytest.raises(ex.HistoryError) as error:
        ex.History(tmp_path / "h")
    assert str(error.value) == f"{file} holds {size + 1} bytes, not the {size} recorded for step 1: {fix}"
    file.unlink()
    with pytest.raises(ex.HistoryError) as error:
        ex.History(tmp_path / "h")
    assert str(error.value) == f"{file} is missing for step 1: {fix}"


def test_a_resume_state_ahead_of_the_manifest_is_refused_before_anything_changes(tmp_path):
    """A manifest that lost its last line after that step's resume state was stored (a partial copy
    or restore: a crash leaves the manifest ahead of the resume state, never behind) is refused
    before anything is written: the stored optimizer state is that of a step the manifest lacks."""
    x, y = tiny_data()
    model = tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(Crash), ex.Recorder(tmp_path / "h", model, optimizer) as rec:
        sgd_steps(rec, model, optimizer, x, y, 0, 4, crash_at=2)
    assert json.loads((tmp_path / "h" / "resume.json").read_text())["next_step"] == 3
    lines = (tmp_path / "h" / "manifest.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "h" / "manifest.jsonl").write_text("".join(lines[:2]))
    before = {f: f.read_bytes() for f in (tmp_path / "h").rglob("*") if f.is_file()}
    model = tiny(1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ex.HistoryError, match="resume state is ahead of the manifest; the history is damaged"):
        ex.Recorder.resume(tmp_path / "h", model, optimizer)
    assert {f: f.read_bytes() for f in (tmp_path / "h").rglob("*") if f.is_file()} == before


def test_a_resume_state_deleted_after_steps_were_recorded_is_named_as_such(tmp_path):
    """A killed run whose resume.json was deleted read 'has no resume state: the run was killed
    before the state after its first step was stored', a cause its 3 recorded steps rule out (the
    state is written from the first batch on); it names the missing file and the steps kept."""
    x, y = tiny_data()
    model = tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(Crash), ex.Recorder(tmp_path / "h", model, optimizer) as rec:
        sgd_steps(rec, model, optimizer, x, y, 0, 4, crash_at=2)
    (tmp_path / "h" / "resume.json").unlink()
    model = tiny(1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ex.HistoryError) as error:
        ex.Recorder.resume(tmp_path / "h", model, optimizer)
    assert str(error.value) == (
        f"{tmp_path / 'h' / 'resume.json'} is missing, though 3 steps are recorded: it was deleted or lost, and "
        "without it the run cannot go on. Fix: record the run again with overwrite=True, or use its complete steps "
        "as they are: History(path, allow_incomplete=True) in place of the path for explain, reconstruct or "
        "verify_updates")
    assert ex.History(tmp_path / "h", allow_incomplete=True).n_steps == 3


def test_a_killed_runs_manifest_line_damaged_before_its_last_is_refused(tmp_path):
    """Only the last line can be one a crash cut (that step never completed, and is ignored): a
    damaged line before it is refused, not skipped, which would read every later step one off."""
    sgd_history(tmp_path / "h", 3)
    (tmp_path / "h" / "closed.json").unlink()
    lines = (tmp_path / "h" / "manifest.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "h" / "manifest.jsonl").write_text("".join([lines[0], lines[1][:20] + "\n", lines[2]]))
    with pytest.raises(ex.HistoryError, match=r"manifest\.jsonl line 2 is corrupted"):
        ex.History(tmp_path / "h", allow_incomplete=True)
    (tmp_path / "h" / "manifest.jsonl").write_text("".join([lines[0], lines[1], lines[2][:20]]))
    assert ex.History(tmp_path / "h", allow_incomplete=True).n_steps == 2


def test_a_manifest_byte_that_is_no_utf8_is_named_with_its_line_and_the_fix(tmp_path):
    """A flipped byte that leaves no UTF-8 (0xff) failed with Python's bare UnicodeDecodeError,
    naming neither the file nor the fix; it is the damaged line it sits in."""
    sgd_history(tmp_path / "h", 3)
    manifest = tmp_path / "h" / "manifest.jsonl"
    lines = manifest.read_bytes().splitlines(keepends=True)
    manifest.write_bytes(lines[0] + lines[1][:30] + b"\xff" + lines[1][31:] + lines[2])
    with pytest.raises(ex.HistoryError) as error:
        ex.History(tmp_path / "h")
    assert str(error.value) == (
        f"{manifest} line 2 is corrupted ('utf-8' codec can't decode byte 0xff in position 30: invalid start byte). "
        "Fix: restore the history from its source (dvc pull) or record it again")


def test_a_resumed_loop_is_checked_at_its_first_two_steps(tmp_path):
    """A resume checks the gradient at its first two steps whatever check_every says: the second
    is the first that can show a gradient the resumed loop lets accumulate (zero_grad forgotten)."""
    x, y = tiny_data()
    model = tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(Crash), ex.Recorder(tmp_path / "h", model, optimizer, check_every=50) as rec:
        sgd_steps(rec, model, optimizer, x, y, 0, 5, crash_at=2)
    model = tiny(1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ex.UnsupportedError, match=r"at step 4 the gradient in \.grad is the declared loss's gradient "
                                                  r"on the recorded batch plus step 3's \.grad .*optimizer\.zero_grad\(\) "
                                                  r"was not called"):
        with ex.Recorder.resume(tmp_path / "h", model, optimizer, check_every=50) as rec:
            assert rec.step == 3
            for step in (3, 4):  # no optimizer.zero_grad(): step 3's gradient is still in .grad at step 4
                rows = torch.arange(4 * step, 4 * step + 4) % len(x)
                F.cross_entropy(model(x[rows]), y[rows]).backward()
                rec.batch(rows, x[rows], y[rows])
                optimizer.step()


def test_a_tensor_learning_rate_is_recorded_and_resumed(tmp_path):
    x, y = tiny_data()
    model = tiny()
    optimizer = torch.optim.Adam(model.parameters(), lr=torch.tensor(0.01, dtype=torch.float64))
    with pytest.raises(Crash), ex.Recorder(tmp_path / "h", model, optimizer) as rec:
        sgd_steps(rec, model, optimizer, x, y, 0, 3, crash_at=1)
    model = tiny()
    optimizer = torch.optim.Adam(model.parameters(), lr=torch.tensor(0.01, dtype=torch.float64))
    with ex.Recorder.resume(tmp_path / "h", model, optimizer) as rec:
        sgd_steps(rec, model, optimizer, x, y, rec.step, 3)
    assert [line["groups"][0]["lr"] for line in manifest(tmp_path / "h")] == pytest.approx([0.01] * 3)


def test_torchs_mean_squared_error_is_named_with_the_loss_that_matches_it(tmp_path):
    """torch's MSELoss averages over outputs as well as the batch: the check says so, and the
    loss it names records the run and explains it exactly."""
    x, y = tiny_data()
    targets = F.one_hot(y, 3).double()
    model = tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def loop(rec, steps):
        for _ in range(steps):
            optimizer.zero_grad()
            torch.nn.MSELoss()(model(x), targets).backward()
            rec.batch(torch.arange(len(x)), x, targets)
            optimizer.step()

    with pytest.raises(ex.UnsupportedError, match=r"(?s)built-in 'mse'.*\(\(o - t\) \*\* 2\)\.mean\(1\), and explain with target='logit'"):
        with ex.Recorder(tmp_path / "h", model, optimizer, loss="mse") as rec:
            loop(rec, 1)
    with ex.Recorder(tmp_path / "h2", model, optimizer, loss=lambda o, t: ((o - t) ** 2).mean(1)) as rec:
        loop(rec, 3)
    cube = ex.explain(tmp_path / "h2", model, x[:2], progress=False, target="logit",
                      loss=lambda o, t: ((o - t) ** 2).mean(1))
    assert cube.attrs["max_abs_residual"] <= 1e-12 * cube.attrs["max_abs_change"]


CLASS_WEIGHTS = torch.tensor([1.0, 3.0, 0.2], dtype=torch.float64)  # 0.2: float32 would round it


def class_targets(kind: str, y: torch.Tensor) -> torch.Tensor:
    """Class indices with some ignored (torch's ignore_index, -100), or class probabilities."""
    if kind == "probabilities":
        g = torch.Generator().manual_seed(2)
        return torch.softmax(torch.randn(len(y), 3, generator=g, dtype=torch.float64), 1)
    ignored = y.clone()
    ignored[[1, 6, 7]] = -100  # batches of 4: one ignored, two ignored, none
    return ignored


def torch_class_loss(name: str, weight, reduction: str):
    """The loss as the user trains with it: torch's own reduction and weight=."""
    function = F.cross_entropy if name == "cross_entropy" else F.nll_loss
    return lambda out, t: function(out, t, weight=weight, reduction=reduction)


@pytest.mark.parametrize("name, targets, reduction, weight", [
    ("cross_entropy", "indices", "mean", CLASS_WEIGHTS), ("cross_entropy", "indices", "mean", None),
    ("cross_entropy", "probabilities", "mean", CLASS_WEIGHTS), ("nll", "indices", "mean", CLASS_WEIGHTS),
    ("nll", "indices", "sum", CLASS_WEIGHTS)])
def test_class_weights_and_ignored_targets_follow_torchs_reduction(tmp_path, name, targets, reduction, weight):
    """torch's mean over class indices divides by the batch's total class weight, an ignored
    target (-100) counting 0; over class probabilities by the batch size. The Recorder checks
    torch's .grad at every step; explain reconstructs every update and sums to the change.
    (Ignored targets were divided by the batch size before: explain missed 11 % of the change.)"""
    x, y = tiny_data()
    t = class_targets(targets, y)
    model = tiny() if name == "cross_entropy" else torch.nn.Sequential(tiny(), torch.nn.LogSoftmax(1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with ex.Recorder(tmp_path / "h", model, optimizer, loss=name, reduction=reduction, class_weights=weight,
                     check_every=1) as rec:
        sgd_steps(rec, model, optimizer, x, t, 0, 6, loss=torch_class_loss(name, weight, reduction))
    cube = ex.explain(tmp_path / "h", model, x[:3], keep=("train", "test"), quadrature=8, progress=False)
    assert cube.attrs["relative_residual"] <= 1e-9 and cube.attrs["max_update_residual"] <= 1e-12
    recorded = ex.History(tmp_path / "h").class_weights
    if weight is None:
        assert recorded is None and "class_weights" not in cube.attrs
    else:
        assert torch.equal(recorded, weight) and cube.attrs["class_weights"] == weight.tolist()


def test_sample_weights_of_torchs_means_by_hand():
    """w_{s,k}: a mean over class indices divides by the batch's total class weight, an ignored
    target counting 0 (here 1 + 3 + 0.2 = 4.2); over class probabilities, or the float targets
    of a custom loss declared with class weights (no class indices), by the batch size."""
    from explaind.losses import sample_weights

    def weights(loss, targets):
        return sample_weights("mean", loss, targets, CLASS_WEIGHTS, torch.float64, "cpu")

    indices = torch.tensor([0, 1, -100, 2])
    for loss in ("cross_entropy", "nll", "custom:losses.smoothed"):
        assert torch.equal(weights(loss, indices), torch.full((4,), 1 / 4.2, dtype=torch.float64))
    probabilities = torch.tensor([[0.2, 0.3, 0.5]] * 4, dtype=torch.float64)
    assert torch.equal(weights("cross_entropy", probabilities), torch.full((4,), 0.25, dtype=torch.float64))
    # 0.5, 1.5, 2.0, 0.0 read as class indices would divide by 1 + 3 + 0.2 + 1
    values = torch.tensor([0.5, 1.5, 2.0, 0.0], dtype=torch.float64)
    assert torch.equal(weights("custom:losses.regression", values), torch.full((4,), 0.25, dtype=torch.float64))


def test_class_weights_given_as_a_list_are_read_in_float64(tmp_path):
    """A list (as meta.json stores them) was read in float32: 0.2 missed the float64 .grad by 7e-9
    at the Recorder's check, and every history with weights was explained with rounded ones."""
    x, y = tiny_data()
    model = tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with ex.Recorder(tmp_path / "h", model, optimizer, class_weights=CLASS_WEIGHTS.tolist(), check_every=1) as rec:
        sgd_steps(rec, model, optimizer, x, y, 0, 6, loss=torch_class_loss("cross_entropy", CLASS_WEIGHTS, "mean"))
    assert torch.equal(ex.History(tmp_path / "h").class_weights, CLASS_WEIGHTS)
    cube = ex.explain(tmp_path / "h", model, x[:3], keep=("test",), quadrature=8, progress=False)
    assert cube.attrs["max_update_residual"] <= 1e-12


def test_a_custom_loss_with_class_weights_divides_its_mean_by_the_batchs_weight(tmp_path):
    """Weighted cross-entropy with label smoothing, which no built-in loss declares: the custom
    per-sample loss weights its samples, class_weights make its mean torch's (÷ the batch's total
    weight, ignored targets counting 0). Undeclared, the gradient check names class_weights."""
    x, y = tiny_data()
    t = class_targets("indices", y)
    per_sample = lambda o, t: F.cross_entropy(o, t, weight=CLASS_WEIGHTS, label_smoothing=0.1,  # noqa: E731
                                              reduction="none")
    trained = lambda o, t: F.cross_entropy(o, t, weight=CLASS_WEIGHTS, label_smoothing=0.1)  # noqa: E731
    model = tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ex.UnsupportedError, match=r"(?s)\.grad is 0.952381 times.*class_weights=w\), with a custom loss too"):
        with ex.Recorder(tmp_path / "unweighted", model, optimizer, loss=per_sample) as rec:
            sgd_steps(rec, model, optimizer, x, t, 0, 1, loss=trained)
    model = tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with ex.Recorder(tmp_path / "h", model, optimizer, loss=per_sample, class_weights=CLASS_WEIGHTS,
                     check_every=1) as rec:
        sgd_steps(rec, model, optimizer, x, t, 0, 6, loss=trained)
    assert torch.equal(ex.History(tmp_path / "h").class_weights, CLASS_WEIGHTS)
    cube = ex.explain(tmp_path / "h", model, x[:3], keep=("train", "test"), loss=per_sample, quadrature=8,
                      progress=False)
    assert cube.attrs["relative_residual"] <= 1e-9 and cube.attrs["max_update_residual"] <= 1e-12


def test_class_weights_are_part_of_the_history(tmp_path):
    """Two runs that differ in their class weights alone are two histories (cubes cite the
    fingerprint); an unweighted history hashes as before class weights existed."""
    x, y = tiny_data()
    fingerprints = []
    for weight in (None, CLASS_WEIGHTS, 2 * CLASS_WEIGHTS):  # 2w: the same mean, the same steps
        model = tiny()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        with ex.Recorder(tmp_path / str(len(fingerprints)), model, optimizer, class_weights=weight) as rec:
            sgd_steps(rec, model, optimizer, x, y, 0, 2, loss=torch_class_loss("cross_entropy", weight, "mean"))
        fingerprints.append(ex.History(tmp_path / str(len(fingerprints))).fingerprint())
    assert len(set(fingerprints)) == 3
    history = ex.History(tmp_path / "0")
    unweighted = hashlib.sha256(history.meta["initial_sha256"].encode())
    for line in history.manifest:
        unweighted.update(line["sha256"].encode())
    assert fingerprints[0] == unweighted.hexdigest()


@pytest.mark.parametrize("loss, weight, says", [
    ("mse", CLASS_WEIGHTS, "built-in losses.*not 'mse'.*w\\[t\\] \\* your_loss"),
    ("cross_entropy", CLASS_WEIGHTS.reshape(1, 3), "vector of finite weights ≥ 0, one per class"),
    ("cross_entropy", [1.0, -1.0, 2.0], "finite weights ≥ 0.*\\[1.0, -1.0, 2.0\\]. Fix: pass the weight="),
    ("cross_entropy", [1.0, float("nan"), 2.0], "finite weights ≥ 0"),
    ("cross_entropy", "heavy", "no vector of numbers"),
], ids=["mse", "matrix", "negative", "nan", "text"])
def test_class_weights_that_cannot_weight_the_loss_are_refused_before_anything_is_written(tmp_path, loss,
                                                                                           weight, says):
    model = tiny()
    with pytest.raises(ex.InputError, match=f"(?s)class_weights.*{says}"):
        ex.Recorder(tmp_path / "h", model, torch.optim.SGD(model.parameters(), lr=0.1), loss=loss,
                    class_weights=weight)
    assert not (tmp_path / "h").exists()


def test_class_weights_of_another_length_are_named_at_the_first_step(tmp_path):
    x, y = tiny_data()
    model = tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ex.InputError, match="(?s)class_weights has 2 entries.*a target is 2.*one weight per class"):
        with ex.Recorder(tmp_path / "h", model, optimizer, class_weights=[1.0, 2.0]) as rec:
            sgd_steps(rec, model, optimizer, x, y, 0, 1)
    with ex.Recorder(tmp_path / "h", model, optimizer, class_weights=[1.0, 2.0], overwrite=True) as rec:
        with pytest.raises(ex.InputError, match=r"(?s)class_weights has 2 entries.*a target is -5\."):
            rec.batch(torch.arange(4), x[:4], torch.tensor([1, -5, 1, 0]))  # torch ignores -100 only
    with pytest.raises(ex.InputError, match="(?s)class_weights has 2 entries.*returns 3 classes.*one weight per class"):
        with ex.Recorder(tmp_path / "h", model, optimizer, class_weights=[1.0, 2.0], overwrite=True) as rec:
            sgd_steps(rec, model, optimizer, x, y.clamp(max=1), 0, 1)
    # one weight too many: torch's weight= of another length failed deep inside the loss (a RuntimeError)
    with pytest.raises(ex.InputError, match="(?s)class_weights has 4 entries.*returns 3 classes.*one weight per class"):
        with ex.Recorder(tmp_path / "h", model, optimizer, class_weights=[1.0, 2.0, 1.0, 1.0], overwrite=True) as rec:
            sgd_steps(rec, model, optimizer, x, y, 0, 1)


@pytest.mark.parametrize("weight", [None, torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64)])
def test_a_batch_whose_mean_has_no_weight_is_refused_when_declared(tmp_path, weight):
    """All targets ignored (or of weight 0): torch's mean is 0 / 0, which used to surface only
    as a diverged step."""
    x, y = tiny_data(4)
    t = torch.tensor([-100, -100, 0, 0]) if weight is not None else torch.full((4,), -100)
    model = tiny()
    with ex.Recorder(tmp_path / "h", model, torch.optim.SGD(model.parameters(), lr=0.1), class_weights=weight) as rec:
        with pytest.raises(ex.InputError, match="(?s)step 0: every target.*ignored.*0 / 0.*Fix: skip"):
            rec.batch(torch.arange(4), x, t)


def test_resume_continues_with_the_recorded_class_weights(tmp_path):
    """Resumed without class_weights=, the gradient check of every step passes only with the
    recorded weights restored; other weights are refused."""
    x, y = tiny_data()
    t = class_targets("indices", y)
    weighted = torch_class_loss("cross_entropy", CLASS_WEIGHTS, "mean")
    model = tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(Crash), ex.Recorder(tmp_path / "h", model, optimizer, class_weights=CLASS_WEIGHTS) as rec:
        sgd_steps(rec, model, optimizer, x, t, 0, 4, loss=weighted, crash_at=1)
    model = tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ex.InputError, match=r"(?s)class_weights=\[1.0, 3.0, 0.2\].*\[1.0, 1.0, 1.0\].*leave "
                                            "class_weights= out"):
        ex.Recorder.resume(tmp_path / "h", model, optimizer, class_weights=[1.0, 1.0, 1.0])
    with ex.Recorder.resume(tmp_path / "h", model, optimizer, check_every=1) as rec:
        assert torch.equal(rec.class_weights, CLASS_WEIGHTS)
        sgd_steps(rec, model, optimizer, x, t, rec.step, 4, loss=weighted)
    cube = ex.explain(tmp_path / "h", model, x[:2], keep=("train",), quadrature=8, progress=False)
    assert cube.attrs["relative_residual"] <= 1e-9 and cube.attrs["max_update_residual"] <= 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_recorded_clipping_factor_is_the_one_torch_applies(tmp_path, dtype):
    """Twin loops, one clipping through the recorder and one with torch.nn.utils.clip_grad_norm_:
    their gradients are equal bit for bit, and each is the unclipped gradient times the factor
    in the manifest (1 where the norm was under max_norm)."""
    x, y = tiny_data()
    x = x.to(dtype)
    model, twin = tiny().to(dtype), tiny().to(dtype)
    optimizer, twin_optimizer = (torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9) for m in (model, twin))
    unclipped, clipped = [], []
    with ex.Recorder(tmp_path / "h", model, optimizer, check_every=1) as rec:
        for step in range(6):
            rows = torch.arange(4 * step, 4 * step + 4) % len(x)
            for m, o in ((model, optimizer), (twin, twin_optimizer)):
                o.zero_grad()
                F.cross_entropy(m(x[rows]), y[rows]).backward()
            unclipped.append([p.grad.clone() for p in model.parameters()])
            rec.batch(rows, x[rows], y[rows])
            total = rec.clip_grad_norm_(0.45)
            assert torch.equal(total, torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.45))
            clipped.append([p.grad.clone() for p in model.parameters()])
            assert all(torch.equal(p.grad, q.grad) for p, q in zip(model.parameters(), twin.parameters()))
            optimizer.step()
            twin_optimizer.step()
    scales = [line["gradient_scale"] for line in manifest(tmp_path / "h")]
    assert min(scales) < 0.9 and max(scales) == 1.0, scales
    for scale, before, after in zip(scales, unclipped, clipped):
        assert all(torch.equal(b * torch.tensor(scale, dtype=dtype), a) for b, a in zip(before, after))


def averaged_means(model, x, y, parts):
    """The usual accumulation: each micro-batch's mean loss divided by their number."""
    for part in parts:
        (F.cross_entropy(model(x[part]), y[part]) / len(parts)).backward()


def sums_over_the_batch(model, x, y, parts):
    """The fix for unequal micro-batches: each one's summed loss divided by the whole batch's size."""
    for part in parts:
        (F.cross_entropy(model(x[part]), y[part], reduction="sum") / sum(map(len, parts))).backward()


@pytest.mark.parametrize("sizes, accumulate, exact", [
    ((4, 4), averaged_means, True),
    ((5, 3), averaged_means, False),
    ((5, 3), sums_over_the_batch, True),
], ids=["equal micro-batches", "unequal", "unequal, summed over the batch"])
def test_gradient_accumulation_is_one_step_over_the_declared_batch(tmp_path, sizes, accumulate, exact):
    """Micro-batch losses accumulated into one step: the step's gradient is the mean over their
    union when averaged means come from micro-batches of equal size, or when each summed loss is
    divided by the whole batch's size; averaged means of unequal ones are refused, naming that fix."""
    x, y = tiny_data()
    model = tiny(activation=torch.nn.Tanh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)

    def loop(rec):
        for step in range(3):
            rows = torch.arange(8 * step, 8 * step + 8) % len(x)
            optimizer.zero_grad()
            accumulate(model, x, y, rows.split(list(sizes)))
            rec.batch(rows, x[rows], y[rows])
            optimizer.step()

    if not exact:
        with pytest.raises(ex.UnsupportedError, match="(?s)step 0 the gradient in .grad differs.*micro-batches of "
                           "unequal size.*divide each micro-batch's summed loss by the size of the step's whole batch"):
            with ex.Recorder(tmp_path / "h", model, optimizer, check_every=1) as rec:
                loop(rec)
        return
    with ex.Recorder(tmp_path / "h", model, optimizer, check_every=1) as rec:
        loop(rec)
    assert ex.verify_updates(tmp_path / "h", model).max() <= 1e-12
    cube = ex.explain(tmp_path / "h", model, x[:2], y[:2], quadrature=8, tolerance=1e-9, progress=False)
    assert cube.attrs["relative_residual"] <= 1e-9


MICRO_BATCH_WEIGHTS = torch.tensor([1.0, 2.0, 5.0], dtype=torch.float64)


def weighted_means_averaged(model, x, y, parts):
    """Accumulation as without class weights: each micro-batch's weighted mean divided by their number."""
    for part in parts:
        (F.cross_entropy(model(x[part]), y[part], weight=MICRO_BATCH_WEIGHTS) / len(parts)).backward()


def weighted_sums_over_the_batchs_weight(model, x, y, parts):
    """The fix: each micro-batch's weighted summed loss divided by the whole batch's total class weight."""
    total = sum(MICRO_BATCH_WEIGHTS[y[part]].sum() for part in parts)
    for part in parts:
        (F.cross_entropy(model(x[part]), y[part], weight=MICRO_BATCH_WEIGHTS, reduction="sum") / total).backward()


@pytest.mark.parametrize("accumulate, exact", [(weighted_means_averaged, False),
                                               (weighted_sums_over_the_batchs_weight, True)],
                         ids=["weighted means averaged", "weighted sums over the batch's weight"])
def test_gradient_accumulation_with_class_weights_divides_by_the_whole_batchs_weight(tmp_path, accumulate, exact):
    """torch's class-weighted mean divides by its micro-batch's total weight, so averaged weighted
    means of equal micro-batches are no weighted mean over the step's batch: refused, naming the
    accumulation that is (each weighted sum divided by the whole batch's total class weight)."""
    x, y = tiny_data()
    model = tiny(activation=torch.nn.Tanh)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)

    def loop(rec):
        for step in range(3):
            rows = torch.arange(8 * step, 8 * step + 8) % len(x)
            optimizer.zero_grad()
            accumulate(model, x, y, rows.split(4))
            rec.batch(rows, x[rows], y[rows])
            optimizer.step()

    if not exact:
        with pytest.raises(ex.UnsupportedError, match="(?s)the gradient in .grad differs.*class weights.*"
                           "divide each micro-batch's weighted summed loss .* by the total class weight of the "
                           "step's whole batch"):
            with ex.Recorder(tmp_path / "h", model, optimizer, class_weights=MICRO_BATCH_WEIGHTS, check_every=1) as rec:
                loop(rec)
        return
    with ex.Recorder(tmp_path / "h", model, optimizer, class_weights=MICRO_BATCH_WEIGHTS, check_every=1) as rec:
        loop(rec)
    assert ex.verify_updates(tmp_path / "h", model).max() <= 1e-12
    cube = ex.explain(tmp_path / "h", model, x[:2], y[:2], quadrature=8, tolerance=1e-9, progress=False)
    assert cube.attrs["relative_residual"] <= 1e-9


def test_an_unclipped_step_stores_no_gradient_scale_and_reads_as_one(tmp_path):
    """Histories recorded without clipping keep the manifest they had before clipping was recorded."""
    sgd_history(tmp_path / "h", 3)
    assert all("gradient_scale" not in line for line in manifest(tmp_path / "h"))
    assert [rec.gradient_scale for rec in ex.History(tmp_path / "h").steps()] == [1.0] * 3


# --------------------------------------------------------------------------- from a second probe of recording


def test_overwrite_keeps_the_old_history_when_the_new_recording_is_refused(tmp_path):
    x, y = tiny_data()
    model = tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with ex.Recorder(tmp_path / "h", model, optimizer) as rec:
        sgd_steps(rec, model, optimizer, x, y, 0, 3)
    before = files_on_disk(tmp_path / "h")
    with pytest.raises(ex.UnsupportedError, match="already has state"):  # this optimizer has stepped
        ex.Recorder(tmp_path / "h", model, optimizer, overwrite=True)
    assert files_on_disk(tmp_path / "h") == before


class WithConstants(torch.nn.Module):
    """A frozen scale and a buffer shift between two trained layers."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.a, self.b = torch.nn.Linear(4, 6).double(), torch.nn.Linear(6, 3).double()
        self.scale = torch.nn.Parameter(torch.rand(6, dtype=torch.float64) + 0.5, requires_grad=False)
        self.register_buffer("shift", torch.randn(6, dtype=torch.float64))

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)) * self.scale + self.shift)


def test_resume_restores_the_recorded_frozen_parameters_and_buffers(tmp_path):
    x, y = tiny_data()
    for name, crash_at in (("whole", None), ("crashed", 2)):
        model = WithConstants(0)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        with pytest.raises(Crash) if crash_at else nullcontext(), ex.Recorder(tmp_path / name, model, optimizer) as rec:
            sgd_steps(rec, model, optimizer, x, y, 0, 6, crash_at=crash_at)
    model = WithConstants(1)  # other constants, as a fresh process would build them
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with ex.Recorder.resume(tmp_path / "crashed", model, optimizer) as rec:
        sgd_steps(rec, model, optimizer, x, y, rec.step, 6)
    assert torch.equal(model.scale, WithConstants(0).scale) and torch.equal(model.shift, WithConstants(0).shift)
    assert_same_history(tmp_path / "crashed", tmp_path / "whole")


@pytest.mark.parametrize("other", ["float32 model", "Adam", "two groups", "swapped groups", "another buffer"])
def test_resume_refuses_another_precision_optimizer_grouping_or_constant(tmp_path, other):
    if other == "swapped groups":  # recorded with the first layer's tensors in group 0
        x, y = tiny_data()
        model = tiny()
        params = list(model.parameters())
        optimizer = torch.optim.SGD([{"params": params[:2]}, {"params": params[2:], "lr": 0.01}], lr=0.1)
        with pytest.raises(Crash), ex.Recorder(tmp_path / "h", model, optimizer) as rec:
            sgd_steps(rec, model, optimizer, x, y, 0, 8, crash_at=2)
    else:
        model, optimizer, _ = crashed_scheduled_run(tmp_path / "h", step_lr, crash_at=2)
    if other == "float32 model":
        model.float()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        words = r"recorded in \['float64'\], the model to resume is in \['float32'\].*model.to\(torch.float64\)"
    elif other == "Adam":
        optimizer = torch.optim.Adam(model.parameters())
        words = r"recorded with sgd over 1 parameter group\(s\), the resume was given adam over 1"
    elif other == "two groups":
        params = list(model.parameters())
        optimizer = torch.optim.SGD([{"params": params[:2]}, {"params": params[2:]}], lr=0.1, momentum=0.9)
        words = r"recorded with sgd over 1 parameter group\(s\), the resume was given sgd over 2"
    elif other == "swapped groups":
        params = list(model.parameters())
        optimizer = torch.optim.SGD([{"params": params[2:]}, {"params": params[:2], "lr": 0.01}], lr=0.1)
        words = r"parameters \['0.weight', '0.bias', '2.weight', '2.bias'\] are not in the parameter group"
    else:
        model.register_buffer("mask", torch.ones(3, dtype=torch.float64))  # the recorded model had none
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        words = r"frozen parameters and buffers differ .* name, shape or dtype: \['buffer/mask'\]"
    before = files_on_disk(tmp_path / "h")
    with pytest.raises(ex.InputError, match=f"(?s){words}"):
        ex.Recorder.resume(tmp_path / "h", model, optimizer,
                           scheduler=None if other == "swapped groups" else step_lr(optimizer))
    assert files_on_disk(tmp_path / "h") == before


def chained(optimizer):
    return torch.optim.lr_scheduler.ChainedScheduler([torch.optim.lr_scheduler.StepLR(optimizer, 2, gamma=0.5),
                                                      torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.9)])


def sequential(optimizer):
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [torch.optim.lr_scheduler.LinearLR(optimizer, 0.2, total_iters=3),
                                                             torch.optim.lr_scheduler.StepLR(optimizer, 2, gamma=0.5)], [3])


def record_whole_and_resumed(tmp_path: Path, schedule) -> None:
    """8 SGD steps under `schedule` recorded into whole/, and into crashed/ killed right after
    step 4 (its scheduler then caught up by the resume) and resumed."""
    x, y = tiny_data()
    model = tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = schedule(optimizer)
    with ex.Recorder(tmp_path / "whole", model, optimizer, scheduler=scheduler) as rec:
        sgd_steps(rec, model, optimizer, x, y, 0, 8, scheduler=scheduler)
    model, optimizer, scheduler = crashed_scheduled_run(tmp_path / "crashed", schedule, crash_at=4)
    with ex.Recorder.resume(tmp_path / "crashed", model, optimizer, scheduler=scheduler) as rec:
        sgd_steps(rec, model, optimizer, x, y, rec.step, 8, scheduler=scheduler)


@pytest.mark.parametrize("schedule", [chained, sequential])
def test_schedulers_of_schedulers_record_and_resume(tmp_path, schedule):
    """A ChainedScheduler has no last_epoch of its own: recording with one stopped on an
    AttributeError after the first step."""
    record_whole_and_resumed(tmp_path, schedule)
    assert len({line["groups"][0]["lr"] for line in manifest(tmp_path / "whole")}) >= 6
    assert_same_history(tmp_path / "crashed", tmp_path / "whole")


class Halving:
    """A hand-made scheduler: halves every group's learning rate at each step."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def step(self):
        for group in self.optimizer.param_groups:
            group["lr"] /= 2


class CountedHalving(Halving):
    """Halving that counts its steps, but has no state_dict to store."""

    last_epoch = 0

    def step(self):
        super().step()
        self.last_epoch += 1


@pytest.mark.parametrize("scheduler, cause", [(Halving, "Halving has no last_epoch"),
                                              (CountedHalving, "CountedHalving has no state_dict or load_state_dict")])
def test_a_scheduler_that_cannot_be_stored_is_refused_before_any_file(tmp_path, scheduler, cause):
    """CountedHalving stopped with an AttributeError at the first step, its history written."""
    model = tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ex.InputError, match=f"(?s){cause}.*Fix"):
        ex.Recorder(tmp_path / "h", model, optimizer, scheduler=scheduler(optimizer))
    assert not (tmp_path / "h").exists()


def test_a_scheduler_of_another_optimizer_is_refused_before_any_file(tmp_path):
    """An optimizer built again after its scheduler: the run trained at a constant rate, while the
    Recorder stored the schedule's state beside it (and a resume restored it into the stale one)."""
    model = tiny()
    scheduler = step_lr(torch.optim.SGD(model.parameters(), lr=0.1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    words = "(?s)StepLR sets the learning rates of another optimizer.*Fix: build the scheduler on the optimizer"
    with pytest.raises(ex.InputError, match=words):
        ex.Recorder(tmp_path / "h", model, optimizer, scheduler=scheduler)
    assert not (tmp_path / "h").exists()
    model, optimizer, _ = crashed_scheduled_run(tmp_path / "crashed", step_lr, crash_at=4)
    before = files_on_disk(tmp_path / "crashed")
    stale = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ex.InputError, match=words):
        ex.Recorder.resume(tmp_path / "crashed", model, optimizer, scheduler=step_lr(stale))
    assert files_on_disk(tmp_path / "crashed") == before  # refused before anything is rewritten


def test_a_resumed_multistep_schedule_keeps_its_milestones(tmp_path):
    """MultiStepLR keeps its milestones in a Counter of step numbers, which JSON would turn into
    strings: the resumed run would then never reach them."""
    def multistep(optimizer):
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[4, 6], gamma=0.1)

    record_whole_and_resumed(tmp_path, multistep)
    rates = [[line["groups"][0]["lr"] for line in manifest(tmp_path / name)] for name in ("whole", "crashed")]
    assert rates[0] == rates[1] and rates[0][-1] == pytest.approx(1e-3)  # both milestones passed
    assert_same_history(tmp_path / "crashed", tmp_path / "whole")
    # a run killed under an older explaind, which stored the milestones with the keys JSON made strings
    model, optimizer, scheduler = crashed_scheduled_run(tmp_path / "older", multistep, crash_at=4)
    info = json.loads((tmp_path / "older" / "resume.json").read_text())
    info["scheduler"]["milestones"] = {"4": 1, "6": 1}
    (tmp_path / "older" / "resume.json").write_text(json.dumps(info))
    x, y = tiny_data()
    with ex.Recorder.resume(tmp_path / "older", model, optimizer, scheduler=scheduler) as rec:
        sgd_steps(rec, model, optimizer, x, y, rec.step, 8, scheduler=scheduler)
    assert_same_history(tmp_path / "older", tmp_path / "whole")


def test_a_recording_killed_as_it_started_is_named_and_replaced_with_overwrite(tmp_path, monkeypatch):
    x, y = tiny_data()
    model = tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    write = ex.history._write_atomic

    def killed_writing_meta(path, data):
        if path.name == "meta.json":
            path.with_name("meta.json.tmp").write_bytes(data[:10])
            raise Crash("killed while writing meta.json")
        write(path, data)

    monkeypatch.setattr(ex.history, "_write_atomic", killed_writing_meta)
    with pytest.raises(Crash):
        ex.Recorder(tmp_path / "h", model, optimizer)
    monkeypatch.undo()
    assert sorted(f.name for f in (tmp_path / "h").iterdir()) == ["initial.safetensors", "meta.json.tmp", "steps"]
    for call in (lambda: ex.History(tmp_path / "h"), lambda: ex.Recorder.resume(tmp_path / "h", model, optimizer)):
        with pytest.raises(ex.HistoryError, match="(?s)killed as it started.*overwrite=True"):
            call()
    with pytest.raises(ex.HistoryError, match="(?s)killed as it started.*overwrite=True"):
        ex.Recorder(tmp_path / "h", model, optimizer)
    with ex.Recorder(tmp_path / "h", model, optimizer, overwrite=True) as rec:
        sgd_steps(rec, model, optimizer, x, y, 0, 2)
    assert ex.History(tmp_path / "h").n_steps == 2


def test_a_replacement_left_alone_is_discarded_by_a_new_recording(tmp_path):
    """A replacing recording killed before its first step leaves .explaind-replacement/ beside
    the history; with the history deleted by hand (`rm path/*` leaves the hidden folder) a new
    Recorder takes the folder as empty (it was refused as holding no history), records there
    and discards the leftover."""
    path = tmp_path / "h"
    model, x, y = sgd_history(path, 2)
    replacing = tiny(1)
    ex.Recorder(path, replacing, torch.optim.SGD(replacing.parameters(), lr=0.1), overwrite=True)  # killed
    assert (path / ex.history.REPLACEMENT / "meta.json").is_file()
    ex.history._remove_history(path)
    model = tiny(2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with ex.Recorder(path, model, optimizer) as rec:
        sgd_steps(rec, model, optimizer, x, y, 0, 3)
    assert sorted(f.name for f in path.iterdir()) == sorted([*ex.history.HISTORY_FILES, "steps"])
    history = ex.History(path)
    assert history.n_steps == 3 and torch.equal(history.params(3)["2.bias"], model[2].bias.detach())


def test_a_replacement_killed_as_it_moved_in_is_named_and_replaced_with_overwrite(tmp_path, monkeypatch):
    """A replacing recording whose first step passed moves its files in after deleting the old
    history's, meta.json last; failing there (the loop's exception discards the rest of the new
    one), the folder holds a history's files without meta.json. Opening, resuming and a
    recording without overwrite name that and overwrite=True (they said "not a training
    history" and "holds files but no explaind history"); a recording with it replaces them,
    keeping the user's file."""
    path = tmp_path / "h"
    model, x, y = sgd_history(path, 2)
    (path / "notes.txt").write_text("mine")
    move = ex.history.os.replace

    def killed_moving_meta(source, target):
        if Path(target) == path / "initial.safetensors":
            raise Crash("killed while moving the new history in")
        move(source, target)

    monkeypatch.setattr(ex.history.os, "replace", killed_moving_meta)
    model = tiny(1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(Crash):
        with ex.Recorder(path, model, optimizer, overwrite=True) as rec:
            sgd_steps(rec, model, optimizer, x, y, 0, 1)
    monkeypatch.undo()
    assert [f.name for f in (path / "steps").iterdir()] == ["0000000.safetensors"]
    assert not (path / "meta.json").exists()
    for call in (lambda: ex.History(path), lambda: ex.Recorder.resume(path, model, optimizer),
                 lambda: ex.Recorder(path, model, optimizer)):
        with pytest.raises(ex.HistoryError, match="(?s)without their meta.json.*killed as it moved them in.*"
                                                  "overwrite=True"):
            call()
    with ex.Recorder(path, model, optimizer, overwrite=True) as rec:
        sgd_steps(rec, model, optimizer, x, y, 0, 2)
    assert sorted(f.name for f in path.iterdir()) == sorted([*ex.history.HISTORY_FILES, "steps", "notes.txt"])
    assert ex.History(path).n_steps == 2


def test_a_relative_path_stays_where_it_was_when_the_loop_changes_directory(tmp_path, monkeypatch):
    x, y = tiny_data()
    model = tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    with ex.Recorder("h", model, optimizer) as rec:
        sgd_steps(rec, model, optimizer, x, y, 0, 2)
        monkeypatch.chdir(tmp_path / "b")
        sgd_steps(rec, model, optimizer, x, y, 2, 4)
    assert not (tmp_path / "b" / "h").exists()
    monkeypatch.chdir(tmp_path / "a")
    history = ex.History("h")
    monkeypatch.chdir(tmp_path / "b")
    assert history.n_steps == 4 and history.params(4).keys() == {"0.weight", "0.bias", "2.weight", "2.bias"}


def test_a_model_with_nothing_to_train_is_refused(tmp_path):
    model = tiny().requires_grad_(False)
    with pytest.raises(ex.InputError, match="(?s)no trainable parameter.*Fix"):
        ex.Recorder(tmp_path / "h", model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert not (tmp_path / "h").exists()


@pytest.mark.parametrize("reverse", [False, True])
def test_streaming_the_steps_reads_each_file_once_either_way(uninterrupted, monkeypatch, reverse):
    """θ_s is step s's `before` and step s−1's `after`: a backward walk read it twice."""
    history = ex.History(uninterrupted)
    reads = []
    read = history._step_tensors
    monkeypatch.setattr(history, "_step_tensors", lambda s: reads.append(s) or read(s))
    records = list(history.steps(reverse=reverse))
    assert sorted(reads) == list(range(history.n_steps))
    assert [rec.step for rec in records] == list(range(history.n_steps))[::-1 if reverse else 1]
    for rec in records:  # the neighbouring files, not one of them twice
        for name, before in rec.before.items():
            assert torch.equal(before, history.params(rec.step)[name])
            assert torch.equal(rec.after[name], history.params(rec.step + 1)[name])


def test_params_and_steps_read_back_what_the_training_loop_had(tmp_path):
    """θ_s, the records of steps(start, stop) either way and their batches, against the
    parameters and batches the training loop itself held; a step outside 0 … n_steps is refused."""
    run = train(Case("mlp", "adamw", steps=5, n_train=8), tmp_path / "h")
    history = ex.History(run.path)
    names = [name for name, _ in run.model.named_parameters()]

    def flat(tensors: dict) -> torch.Tensor:
        return torch.cat([tensors[name].reshape(-1) for name in names])

    for s in range(history.n_steps + 1):
        assert torch.equal(flat(history.params(s)), run.thetas[s]), s
    for reverse in (False, True):
        records = list(history.steps(1, 4, reverse=reverse))
        assert [rec.step for rec in records] == ([3, 2, 1] if reverse else [1, 2, 3])
        for rec in records:
            assert torch.equal(flat(rec.before), run.thetas[rec.step])
            assert torch.equal(flat(rec.after), run.thetas[rec.step + 1])
            for recorded, held in zip((rec.indices, rec.inputs, rec.targets), run.batches[rec.step]):
                assert torch.equal(recorded, held)
    for s in (-1, history.n_steps + 1):
        with pytest.raises(ex.InputError, match=re.escape(f"step {s} is outside the history's 0 … 5")):
            history.params(s)
    for s in (2.0, "3", True):  # a float, a string and a bool are no step numbers, though they compare like one
        words = f"takes a step number, got {s!r}: pass a whole number in 0 … 5"
        with pytest.raises(ex.InputError, match=re.escape(words)):
            history.params(s)
    assert torch.equal(flat(history.params(np.int64(2))), run.thetas[2])  # numpy's integers are step numbers


def test_a_step_record_counts_the_bytes_of_its_tensors(tmp_path):
    """What a window of steps holds is planned from StepRecord.nbytes. tiny() has 4·8 + 8 + 8·3 + 3
    = 67 float64 parameters: θ_s, θ_{s+1} and Adam's v_t are 3 · 67 · 8 = 1608 bytes; a batch of 4
    holds 4 int64 indices (32), 4 × 4 float64 inputs (128) and 4 int64 targets (32): 1800."""
    x, y = tiny_data()
    model = tiny()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    with ex.Recorder(tmp_path / "h", model, optimizer) as rec:
        sgd_steps(rec, model, optimizer, x, y, 0, 2)
    assert [rec.nbytes for rec in ex.History(tmp_path / "h").steps()] == [1800, 1800]


def test_a_killed_runs_train_indices_are_every_recorded_batchs(tmp_path):
    """Without closed.json's list they are gathered from the step files: the last step's too."""
    x, y = tiny_data()
    model = tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(Crash), ex.Recorder(tmp_path / "h", model, optimizer) as rec:
        sgd_steps(rec, model, optimizer, x, y, 0, 3, crash_at=1)  # steps 0 and 1: rows 0 … 3, 4 … 7
    history = ex.History(tmp_path / "h", allow_incomplete=True)
    assert history.n_steps == 2 and torch.equal(history.train_indices(), torch.arange(8))


def test_closed_json_lists_each_samples_class_that_the_steps_give_too(tmp_path):
    """close() lists each training sample's class in train_indices' order, so that a History
    need not read every step file for them on each explain (0.22 s at 2,000 steps): here dataset
    ids 100 … 111 in shuffled batches of 4, each labelled y[id − 100], looked up by hand. A killed
    run resumed lists the same (the labels of the steps before the kill come from its step files).
    Without the list (a history closed by an older explaind) the same classes come from the step
    files; a regression run's list is null, and a list edited to another length or to text is
    refused naming closed.json."""
    x, y = tiny_data()
    order = torch.randperm(12, generator=torch.Generator().manual_seed(3))

    def run(path, stop=5, start=0, crash_at=None, resumed=False, loss="cross_entropy"):
        model = tiny()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        recorder = ex.Recorder.resume(path, model, optimizer) if resumed else ex.Recorder(path, model, optimizer,
                                                                                          loss=loss)
        with recorder as rec:
            for step in range(rec.step if resumed else start, stop):
                rows = order[torch.arange(4 * step, 4 * step + 4) % 12]
                targets = y[rows] if loss == "cross_entropy" else x[rows, :3]
                optimizer.zero_grad()
                out = model(x[rows])
                (F.cross_entropy(out, targets) if loss == "cross_entropy" else ((out - targets) ** 2).sum(1).mean()).backward()
                rec.batch(rows + 100, x[rows], targets)
                optimizer.step()
                if step == crash_at:
                    raise Crash

    run(tmp_path / "whole")
    expected = y[ex.History(tmp_path / "whole").train_indices() - 100].tolist()
    assert len(expected) == 12 and json.loads((tmp_path / "whole" / "closed.json").read_text())["train_labels"] \
        == expected
    assert ex.History(tmp_path / "whole").train_labels().tolist() == expected
    with pytest.raises(Crash):
        run(tmp_path / "killed", crash_at=2)
    run(tmp_path / "killed", resumed=True)
    assert_same_history(tmp_path / "whole", tmp_path / "killed")
    edit_json("closed.json", lambda c: c.pop("train_labels"))(tmp_path / "killed")
    assert ex.History(tmp_path / "killed").train_labels().tolist() == expected
    run(tmp_path / "mse", loss="mse")
    assert json.loads((tmp_path / "mse" / "closed.json").read_text())["train_labels"] is None
    assert ex.History(tmp_path / "mse").train_labels() is None
    for damage in (lambda c: c["train_labels"].pop(), lambda c: c["train_labels"].__setitem__(0, "1")):
        edit_json("closed.json", damage)(tmp_path / "whole")
        with pytest.raises(ex.HistoryError, match="closed.json lists train_labels .*Fix: restore the history"):
            ex.History(tmp_path / "whole").train_labels()


def test_loss_scaling_records_the_steps_the_scaler_takes(tmp_path):
    """docs/library.md's GradScaler loop: gradients unscaled before the batch is declared, and no
    batch for the step the scaler skips (an overflow at step 2): the history holds the steps that
    ran, ends at the trained parameters, and is explained to float32's precision."""
    x, y = tiny_data()
    model = tiny(activation=torch.nn.Tanh).float()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.03)
    scaler = torch.amp.GradScaler("cpu")
    with ex.Recorder(tmp_path / "h", model, optimizer) as rec:
        for step in range(6):
            rows = torch.arange(4 * step, 4 * step + 4) % len(x)
            optimizer.zero_grad()
            scaler.scale(F.cross_entropy(model(x[rows].float()), y[rows])).backward()
            if step == 2:
                model[0].weight.grad[0, 0] = float("inf")  # a float16 overflow, as autocast meets one
            scaler.unscale_(optimizer)
            if all(p.grad.isfinite().all() for p in model.parameters()):
                rec.batch(rows, x[rows].float(), y[rows])
            scaler.step(optimizer)
            scaler.update()
    history = ex.History(tmp_path / "h")
    assert history.n_steps == 5 and scaler.get_scale() < 2.0**16  # the skipped step halved the scale
    for name, p in model.named_parameters():
        assert torch.equal(history.params(5)[name], p.detach())
    cube = ex.explain(tmp_path / "h", model, x[:4].float(), keep=("train", "test"), progress=False)
    assert cube.attrs["relative_residual"] <= 1e-5


# --------------------------------------------------------------------------- a GPU's paths, run on the CPU
# (no GPU here nor in CI: what differs on one is observed through counting wrappers and fakes of torch.cuda)


def count_host_copies(monkeypatch, storages: set[int]) -> list[str]:
    """The calls that copy a tensor of `storages` (data pointers) to the host (.cpu(), .to('cpu')),
    appended to the list returned as they happen: on a GPU each is a device-to-host transfer and
    a synchronisation (on the CPU they cost nothing, so they are counted, not timed)."""
    copies = []

    def counted(method, to_host):
        def call(tensor, *args, **kwargs):
            if tensor.data_ptr() in storages and to_host(*args, **kwargs):
                copies.append(method)
            return getattr(torch._C.TensorBase, method)(tensor, *args, **kwargs)
        return call

    def names_the_host(*args, **kwargs):
        return any(torch.device(a).type == "cpu" for a in (*args, kwargs.get("device"))
                   if isinstance(a, (str, torch.device)))

    monkeypatch.setattr(torch.Tensor, "cpu", counted("cpu", lambda *a, **k: True), raising=False)
    monkeypatch.setattr(torch.Tensor, "to", counted("to", names_the_host), raising=False)
    return copies


def test_a_recorded_step_copies_each_parameter_to_the_host_once(tmp_path, monkeypatch):
    """One host copy per trained tensor per step writes θ_{s+1}; the check that nothing else
    changed θ between steps compares on the device without another."""
    x, y = tiny_data()
    model = tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    copies = count_host_copies(monkeypatch, {p.data_ptr() for p in model.parameters()})
    with ex.Recorder(tmp_path / "h", model, optimizer, check_every=1) as rec:
        copies.clear()  # θ_0, written once as the recording starts
        for step in range(3):
            sgd_steps(rec, model, optimizer, x, y, step, step + 1)
            assert len(copies) == 4, (step, copies)  # two weights, two biases
            copies.clear()
    history = ex.History(tmp_path / "h")  # what is stored is unchanged: θ after each step
    assert torch.equal(history.params(3)["0.weight"], model[0].weight.detach())


def test_adams_moments_are_copied_to_the_host_once_per_step(tmp_path, monkeypatch):
    """The second moment that the step file holds is the one the resume state stores: one host
    copy of each of Adam's two moments per trained tensor and step (the second was copied twice)."""
    x, y = tiny_data()
    model = tiny()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    with ex.Recorder(tmp_path / "h", model, optimizer) as rec:
        sgd_steps(rec, model, optimizer, x, y, 0, 1)  # makes the moments, updated in place from here on
        moments = [state[key] for state in optimizer.state.values() for key in ("exp_avg", "exp_avg_sq")]
        copies = count_host_copies(monkeypatch, {m.data_ptr() for m in moments})
        sgd_steps(rec, model, optimizer, x, y, 1, 3)
    assert len(copies) == 2 * len(moments)  # two steps
    resumed = load_file(tmp_path / "h" / resume_tensors_file(tmp_path / "h"))
    step = load_file(tmp_path / "h" / "steps" / "0000002.safetensors")
    assert all(torch.equal(resumed[f"optimizer/{i}/exp_avg_sq"], step[f"second_moment/{n}"])
               for i, n in enumerate(dict(model.named_parameters())))


def test_each_groups_adam_hyperparameters_and_second_moment_are_recorded_as_torch_steps_them(tmp_path):
    """Two AdamW groups that differ in every setting, amsgrad in one only: each step's manifest
    lists each group's own settings and bias-correction count t = step + 1, and each tensor's step
    file holds the second moment its group's update divides by (torch's max v with amsgrad, its v
    without), copied from torch's state right after that step."""
    x, y = tiny_data()
    model = tiny()
    params = list(model.parameters())
    settings = [dict(lr=0.02, betas=(0.8, 0.95), eps=1e-7, weight_decay=0.05, amsgrad=False),
                dict(lr=0.01, betas=(0.9, 0.5), eps=1e-6, weight_decay=0.2, amsgrad=True)]
    optimizer = torch.optim.AdamW([{"params": params[:2], **settings[0]}, {"params": params[2:], **settings[1]}])
    moments = []  # torch's moments after each step, by parameter name
    with ex.Recorder(tmp_path / "h", model, optimizer, check_every=1) as rec:
        for step in range(4):
            sgd_steps(rec, model, optimizer, x, y, step, step + 1)
            moments.append({name: {key: optimizer.state[p][key].clone() for key in ("exp_avg_sq", "max_exp_avg_sq")
                                   if key in optimizer.state[p]}
                            for name, p in model.named_parameters()})
    expected = [[{**s, "betas": list(s["betas"]), "t": step + 1} for s in settings] for step in range(4)]
    assert [line["groups"] for line in manifest(tmp_path / "h")] == expected
    names = [name for name, _ in model.named_parameters()]
    for step, record in enumerate(ex.History(tmp_path / "h").steps()):
        for name in names[:2]:
            assert torch.equal(record.second_moment[name], moments[step][name]["exp_avg_sq"]), (step, name)
        for name in names[2:]:
            assert torch.equal(record.second_moment[name], moments[step][name]["max_exp_avg_sq"]), (step, name)
    # (the maximum is another tensor than v: β2 = 0.5 lets v fall below an earlier value)
    assert any(not torch.equal(m[n]["max_exp_avg_sq"], m[n]["exp_avg_sq"]) for m in moments for n in names[2:])
    assert ex.verify_updates(tmp_path / "h", tiny()).max() <= 1e-12


class FakeCuda:
    """torch.cuda's generators as a machine with `devices` GPUs has them, on the CPU: a state of
    16 bytes per device (a CUDA generator's seed and offset, as two int64), which `noise` draws
    from and advances as a draw on that GPU does."""

    def __init__(self, devices: int, seed: int):
        self.states = [torch.tensor([seed, d], dtype=torch.int64).view(torch.uint8) for d in range(devices)]
        self.restored: list[list[torch.Tensor]] = []

    def install(self, monkeypatch) -> "FakeCuda":
        for name, value in (("is_available", lambda: True), ("is_initialized", lambda: True),
                            ("device_count", lambda: len(self.states)),
                            ("get_rng_state_all", lambda: [s.clone() for s in self.states]),
                            ("set_rng_state_all", self.set_rng_state_all)):
            monkeypatch.setattr(torch.cuda, name, value)
        return self

    def set_rng_state_all(self, states) -> None:
        self.restored.append([s.clone() for s in states])
        for device, state in enumerate(states):
            self.states[device] = state.clone()

    def noise(self, device: int, shape) -> torch.Tensor:
        seed, offset = self.states[device].view(torch.int64).tolist()
        self.states[device] = torch.tensor([seed, offset + 1], dtype=torch.int64).view(torch.uint8)
        return torch.randn(shape, generator=torch.Generator().manual_seed(1000 * seed + offset), dtype=torch.float64)


def run_with_gpu_augmentation(path: Path, cuda: FakeCuda, crash_after: int | None = None) -> None:
    """record_augmented with augmentation drawn on GPU 1."""
    record_augmented(path, lambda: 0.1 * cuda.noise(1, (4, 4)), crash_after)


def test_augmentation_drawn_on_a_gpu_resumes_as_drawn(tmp_path, monkeypatch):
    """Each CUDA device's generator is stored with the resume state and restored byte for byte:
    a loop that draws its augmentation on a GPU records the uninterrupted history when resumed
    in a process whose generators start elsewhere."""
    whole = FakeCuda(2, seed=7).install(monkeypatch)
    run_with_gpu_augmentation(tmp_path / "whole", whole)
    killed = FakeCuda(2, seed=7).install(monkeypatch)
    with pytest.raises(Crash):
        run_with_gpu_augmentation(tmp_path / "crashed", killed, crash_after=2)
    stored = load_file(tmp_path / "crashed" / resume_tensors_file(tmp_path / "crashed"))
    assert all(torch.equal(stored[f"rng/cuda/{d}"], killed.states[d]) for d in range(2))
    resumed = FakeCuda(2, seed=99).install(monkeypatch)  # another process: its generators start elsewhere
    run_with_gpu_augmentation(tmp_path / "crashed", resumed)
    assert len(resumed.restored) == 1
    assert all(torch.equal(r, stored[f"rng/cuda/{d}"]) for d, r in enumerate(resumed.restored[0]))
    assert_same_history(tmp_path / "crashed", tmp_path / "whole")


def test_a_resume_on_fewer_gpus_restores_those_there_are_and_says_so(tmp_path, monkeypatch):
    killed = FakeCuda(2, seed=7).install(monkeypatch)
    with pytest.raises(Crash):
        run_with_gpu_augmentation(tmp_path / "h", killed, crash_after=2)
    stored = load_file(tmp_path / "h" / resume_tensors_file(tmp_path / "h"))
    here = FakeCuda(1, seed=99).install(monkeypatch)
    with pytest.warns(UserWarning, match=r"(?s)2 CUDA devices and this machine has 1.*not the uninterrupted run's"):
        _, _, rec = recording_or_resume(tmp_path / "h")
    rec.close()
    assert len(here.restored[0]) == 1 and torch.equal(here.restored[0][0], stored["rng/cuda/0"])


def test_a_history_without_gpu_generators_resumes_on_a_gpu_machine(tmp_path, monkeypatch):
    """A run that never started CUDA (and a history of an explaind that stored no CUDA generators)
    has none to restore: resumed where CUDA runs, it leaves the GPUs' generators as they are."""
    with pytest.raises(Crash):
        run_with_gpu_augmentation(tmp_path / "h", FakeCuda(2, seed=7), crash_after=2)  # CUDA not started
    assert not any(key.startswith("rng/cuda") for key in load_file(tmp_path / "h" / resume_tensors_file(tmp_path / "h")))
    here = FakeCuda(2, seed=99).install(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_with_gpu_augmentation(tmp_path / "h", here)
    assert here.restored == [] and ex.History(tmp_path / "h").n_steps == 6
