"""The README's library examples, run as written on a small ReLU network and a shuffled
mini-batch loader: the recording loop, then `explain` with every option the example shows, then
saving and reopening the cube. A README example that no longer runs fails here."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

import explaind as ex

README = Path(__file__).resolve().parents[1] / "README.md"
N_TRAIN, BATCH, EPOCHS = 24, 8, 8  # 24 steps: more than the example's 20 step bins


class Indexed(Dataset):
    """Rows as (dataset index, input, label): what the README's loop unpacks."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return i, self.x[i], self.y[i]


class EpochLoader:
    """Several shuffled epochs of one DataLoader, so `for ... in loader` makes every step."""

    def __init__(self, loader: DataLoader, epochs: int):
        self.loader, self.epochs = loader, epochs

    def __iter__(self):
        for _ in range(self.epochs):
            yield from self.loader


def python_examples() -> list[str]:
    """The blocks that run one after another; the resumable loop runs in tests/test_history.py,
    killed and resumed."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    return [b for b in blocks if not b.startswith("# a loop that records and resumes")]


def test_readme_has_the_record_and_explain_examples():
    blocks = python_examples()
    assert any("ex.Recorder(" in b for b in blocks) and any("ex.explain(" in b for b in blocks)


def test_readme_examples_run_as_written_and_reconstruct_the_change(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the examples write runs/ and results/ relative to here
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(N_TRAIN + 6, 5, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (N_TRAIN + 6,), generator=generator)
    torch.manual_seed(0)
    # trained in float64, so that the recorded updates carry no float32 rounding (see Benchmarks)
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3)).double()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2, weight_decay=0.1)
    namespace = {
        "torch": torch, "F": F, "model": model, "optimizer": optimizer,
        "scheduler": torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.7),
        "loader": EpochLoader(DataLoader(Indexed(x[:N_TRAIN], y[:N_TRAIN]), batch_size=BATCH, shuffle=True,
                                         generator=generator), EPOCHS),
        "test_x": x[N_TRAIN:], "test_y": y[N_TRAIN:],
    }
    for block in python_examples():
        exec(compile(block, str(README), "exec"), namespace)

    cube = namespace["cube"]
    assert ex.History("runs/my_model").n_steps == EPOCHS * N_TRAIN // BATCH
    assert set(cube.attribution.dims) == {"step", "component", "train", "test"}
    assert cube.sizes["step"] == 20 and cube.sizes["test"] == 6 and cube.sizes["train"] == N_TRAIN
    # the decomposition against two forward passes: the final and initial model's true-class logits
    change = (cube["final"] - cube["initial"]).values.ravel()
    parts = (cube.attribution.sum(["step", "component", "train"]) + cube.regularization.sum(["step", "component"]))
    assert np.abs(parts.values.ravel() - change).max() <= 1e-9 * np.abs(change).max()
    reopened = ex.open_cube("results/cube.zarr")
    np.testing.assert_array_equal(reopened.attribution.values, cube.attribution.values)


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_between_the_readme_and_docs_resolve():
    """Every relative link of README.md and docs/*.md names a file that exists, and an anchor a
    heading of that file: moving a section between them cannot leave a link dangling."""
    pages = [README, *sorted((README.parent / "docs").glob("*.md"))]
    links = 0
    for page in pages:
        prose = re.sub(r"```.*?```|`[^`\n]*`", "", page.read_text(), flags=re.DOTALL)  # code is no link
        prose = re.sub(r"^    .*$", "", prose, flags=re.MULTILINE)  # nor is an indented code block
        for target in re.findall(r"\]\(([^)\s]+)\)", prose):
            if re.match(r"[a-z]+://", target):
                continue
            file, _, anchor = target.partition("#")
            linked = (page.parent / file).resolve() if file else page
            assert linked.exists(), f"{page.name} links to {target}, which does not exist"
            if anchor:
                headings = re.findall(r"^#+ (.+)$", linked.read_text(), flags=re.MULTILINE)
                assert anchor in {github_anchor(h) for h in headings}, f"{page.name}: no heading for {target}"
            links += 1
    assert links >= 10  # the README and the docs link each other
