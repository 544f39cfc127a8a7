"""Benchmark: the kink search on a model that folds its batch length-major.

The search lays each ReLU's tensor out per input along the dim that grows with the batch. A dim
that folds the inputs with another holds each input's entries one after another ([B·L, E], as
`h.reshape(-1, E)` of a batch-first [B, L, E] gives) or interleaved a batch apart ([L·B, E], of
a sequence-first [L, B, E]); the search tells which by passes on distinct inputs. Read the wrong
way (before that check every fold was read input by input), its kinks are other inputs'. The
same small sequence-first ReLU model, recorded for 5 SGD steps in float64, is reconstructed with
its ReLU applied to [L, B, F] and to the folded [L·B, F]; each line gives the kinks located, the
segments left unresolved and the relative residual, which agree when the fold is read right.

    python benchmarks/folded_batch.py
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import explaind as ex

DT = torch.float64


class SequenceFirst(nn.Module):
    """Token ids [B, L] → embeddings [L, B, E] → ReLU MLP → mean over positions → 3 logits."""

    def __init__(self, fold: bool):
        super().__init__()
        self.emb = nn.Embedding(7, 8, dtype=DT)
        self.hidden = nn.Linear(8, 16, dtype=DT)
        self.out = nn.Linear(16, 3, dtype=DT)
        self.fold = fold

    def forward(self, ids):
        h = self.emb(ids).transpose(0, 1)
        length, batch, width = h.shape
        if self.fold:  # [L·B, E]: each position's batch side by side
            z = F.relu(self.hidden(h.reshape(length * batch, width))).reshape(length, batch, -1)
        else:
            z = F.relu(self.hidden(h))
        return self.out(z.mean(0))


def reconstructed(path: Path, fold: bool) -> dict:
    """The cube's attributes after 5 full-batch SGD steps on 16 sequences of 4 tokens, for 6 of them."""
    torch.manual_seed(0)
    model = SequenceFirst(fold)
    x, y = torch.randint(0, 7, (16, 4)), torch.randint(0, 3, (16,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    with ex.Recorder(path, model, optimizer) as rec:
        for _ in range(5):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            rec.batch(torch.arange(16), x, y)
            optimizer.step()
    return ex.reconstruct(path, model, x[:6], quadrature=4, progress=False).attrs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    torch.set_num_threads(parser.parse_args().threads)
    with tempfile.TemporaryDirectory() as tmp:
        for fold in (False, True):
            attrs = reconstructed(Path(tmp) / f"fold{fold}", fold)
            layout = "[L·B, F], folded" if fold else "[L, B, F]"
            print(f"ReLU of {layout:16}: {attrs['kinks_located']:3d} kinks, "
                  f"{attrs['kink_segments_unresolved']} segments unresolved, relative residual "
                  f"{attrs['relative_residual']:.1e}")


if __name__ == "__main__":
    main()
