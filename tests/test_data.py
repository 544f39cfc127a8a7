import hashlib
import io
import os
import pickle
import shutil
import tarfile

import numpy as np
import pytest
import torch

from explaind import InputError
from explaind.data import export_digits, load_cifar2, load_image_pair, modular_addition


# --- modular addition ---------------------------------------------------------------------


def test_modular_addition_sizes_tokens_and_targets():
    data = modular_addition(113, 4000, 2000, seed=0)
    assert data.train_inputs.shape == (4000, 4) and data.val_inputs.shape == (2000, 4)
    assert data.train_inputs.dtype == torch.long
    a, b = data.train_inputs[:, 0], data.train_inputs[:, 2]
    assert (data.train_inputs[:, 1] == 113).all() and (data.train_inputs[:, 3] == 114).all()
    assert (a >= b).all()
    assert torch.equal(data.train_targets, (a + b) % 113)
    assert torch.equal(data.train_pairs, torch.stack([a, b], dim=1))


def test_modular_addition_splits_are_disjoint_and_exhaustive():
    data = modular_addition(113, 4000, 2441, seed=3)  # 113 * 114 / 2 = 6441 pairs
    pairs = {tuple(x) for x in torch.cat([data.train_pairs, data.val_pairs]).tolist()}
    assert len(pairs) == 6441
    assert pairs == {(a, b) for a in range(113) for b in range(a + 1)}


def test_modular_addition_all_ordered_pairs():
    data = modular_addition(5, 20, 5, seed=0, only_a_ge_b=False)
    assert len({tuple(x) for x in torch.cat([data.train_pairs, data.val_pairs]).tolist()}) == 25


def test_modular_addition_is_seeded():
    first, again, other = (modular_addition(23, 100, 50, seed=s) for s in (1, 1, 2))
    assert torch.equal(first.train_inputs, again.train_inputs)
    assert torch.equal(first.val_inputs, again.val_inputs)
    assert not torch.equal(first.train_inputs, other.train_inputs)


def test_modular_addition_refuses_too_many_pairs():
    with pytest.raises(ValueError, match="exceeds the 276 pairs"):
        modular_addition(23, 200, 77, seed=0)


# --- digits -------------------------------------------------------------------------------


def sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_digits_export_is_byte_identical_and_idempotent(tmp_path):
    one, two = export_digits(tmp_path / "a"), export_digits(tmp_path / "b")
    for name in ("images.npy", "labels.npy"):
        assert sha256(one / name) == sha256(two / name)
    images, labels = np.load(one / "images.npy"), np.load(one / "labels.npy")
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8 and images.max() == 16
    assert labels.shape == (1797,) and labels.dtype == np.int64
    export_digits(tmp_path / "a")  # same content again: allowed, nothing changes
    assert sha256(one / "images.npy") == sha256(two / "images.npy")


def test_digits_export_refuses_to_overwrite_different_file(tmp_path):
    folder = export_digits(tmp_path)
    np.save(folder / "labels.npy", np.zeros(3, dtype=np.int64))
    with pytest.raises(FileExistsError, match="labels.npy"):
        export_digits(tmp_path)


def test_digits_pair_split_and_normalisation(tmp_path):
    export_digits(tmp_path)
    pair = load_image_pair(tmp_path, "digits", classes=(3, 8), test_size=0.2, seed=0)
    n_total = 183 + 174  # threes and eights in scikit-learn's digits
    assert len(pair.train_y) + len(pair.test_y) == n_total
    assert len(pair.test_y) == round(0.2 * n_total)
    assert pair.train_x.shape[1:] == (1, 8, 8) and pair.train_x.dtype == torch.float32
    assert set(pair.train_y.tolist()) == {0, 1}
    torch.testing.assert_close(pair.train_x.mean(), torch.tensor(0.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(pair.train_x.std(), torch.tensor(1.0), atol=1e-4, rtol=0)
    # no image is in both splits, and the split is seeded
    train_rows = {tuple(row) for row in pair.train_x.flatten(1).tolist()}
    assert not any(tuple(row) in train_rows for row in pair.test_x.flatten(1).tolist())
    again = load_image_pair(tmp_path, "digits", classes=(3, 8), test_size=0.2, seed=0)
    assert torch.equal(again.train_x, pair.train_x) and torch.equal(again.test_y, pair.test_y)


def test_digits_missing_export_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="export_digits"):
        load_image_pair(tmp_path, "digits")


def test_image_pair_rejects_bad_arguments(tmp_path):
    export_digits(tmp_path)
    with pytest.raises(ValueError, match="unknown dataset"):
        load_image_pair(tmp_path, "mnist")
    with pytest.raises(ValueError, match="two different labels"):
        load_image_pair(tmp_path, "digits", classes=(3, 3))
    with pytest.raises(ValueError, match="test_size"):
        load_image_pair(tmp_path, "digits", test_size=1.5)


# --- CIFAR-2 ------------------------------------------------------------------------------


def fake_batch(n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    labels = [int(v) for v in rng.integers(0, 10, n)]
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    data[:, 0] = labels  # lets the test check that images travel with their labels
    return {b"batch_label": b"fake", b"labels": labels, b"data": data}


def write_archive(path, batches: dict, protocol: int = 2) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, batch in batches.items():
            payload = pickle.dumps(batch, protocol=protocol)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def fake_batches() -> dict:
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    return {name: fake_batch(40, seed) for seed, name in enumerate(names)}


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar2_reads_archive_and_keeps_cats_and_dogs(tmp_path, protocol):
    batches = fake_batches()
    write_archive(tmp_path / "cifar-10-python.tar.gz", batches, protocol)
    arrays = load_cifar2(tmp_path)
    train_labels = np.concatenate([batches[f"data_batch_{i}"][b"labels"] for i in range(1, 6)])
    test_labels = np.array(batches["test_batch"][b"labels"])
    assert len(arrays.train_labels) == np.isin(train_labels, (3, 5)).sum()
    assert len(arrays.test_labels) == np.isin(test_labels, (3, 5)).sum()
    assert arrays.train_images.shape[1:] == (3, 32, 32) and arrays.train_images.dtype == np.uint8
    # first pixel holds the original label: cat (3) -> 0, dog (5) -> 1
    original = arrays.train_images[:, 0, 0, 0]
    assert np.array_equal(arrays.train_labels, (original == 5).astype(np.int64))
    assert set(original.tolist()) <= {3, 5}


def test_cifar2_reads_extracted_folder_and_normalises(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name, batch in fake_batches().items():
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    pair = load_image_pair(tmp_path, "cifar2")
    assert pair.train_x.shape[1:] == (3, 32, 32) and pair.classes == (3, 5)
    torch.testing.assert_close(pair.train_x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)


def test_cifar2_missing_archive_says_where_to_put_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-python.tar.gz"):
        load_cifar2(tmp_path)


class Exploit:
    """Unpickling this would call os.system: the loader must refuse before that."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar2_refuses_malicious_pickle(tmp_path):
    marker = tmp_path / "pwned"
    batches = fake_batches()
    batches["data_batch_3"] = {b"data": Exploit(str(marker)), b"labels": [0]}
    write_archive(tmp_path / "cifar-10-python.tar.gz", batches)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        load_cifar2(tmp_path)
    assert not marker.exists()


# --- damaged data/ ------------------------------------------------------------------------


def _damage(folder, name, kind):
    path = folder / "digits" / name
    good = np.load(path)
    if kind == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "short":
        np.save(path, good[:-5])
    elif kind == "2d":
        np.save(path, good.reshape(len(good), -1))
    elif kind == "nan":
        np.save(path, np.where(np.arange(good.size).reshape(good.shape) == 7, np.nan, good))
    elif kind == "no class 8":
        np.save(path, np.where(good == 8, 9, good))


@pytest.mark.parametrize("name, kind, cause", [
    ("images.npy", "truncated", "cannot be read"), ("images.npy", "empty", "cannot be read"),
    ("labels.npy", "short", "one integer label per image"), ("images.npy", "2d", "not images"),
    ("images.npy", "nan", "NaN"), ("labels.npy", "no class 8", r"no image of class\(es\) \[8\]"),
])
def test_damaged_digits_are_refused_naming_the_file_and_the_fix(digits_data, tmp_path, name, kind, cause):
    folder = shutil.copytree(digits_data, tmp_path / "data")
    _damage(folder, name, kind)
    with pytest.raises(InputError, match=rf"(?s){name} .*{cause}.*Fix: delete data/ and run `make data`"):
        load_image_pair(folder, "digits", (3, 8))


def test_truncated_cifar_archive_is_refused_naming_the_fix(tmp_path):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"\x1f\x8b\x08\x00" + bytes(100))
    with pytest.raises(InputError, match="(?s)cifar-10-python.tar.gz is not a complete.*Fix: delete data/"):
        load_cifar2(tmp_path, (3, 5))
