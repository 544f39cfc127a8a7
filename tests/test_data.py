import hashlib
import io
import os
import pickle
import re
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


@pytest.mark.parametrize("train_size, val_size", [(0, 5), (3, -1)])
def test_modular_addition_refuses_an_empty_training_set_or_a_negative_count(train_size, val_size):
    """A negative val_size sliced pairs[3:2], an empty validation set, without a word."""
    with pytest.raises(InputError, match=f"need train_size >= 1 and val_size >= 0, got {train_size} and {val_size}"):
        modular_addition(5, train_size, val_size, seed=0)


@pytest.mark.parametrize("p", [7.0, True])
def test_modular_addition_refuses_a_modulus_that_is_not_an_integer(p):
    fix = "pass a whole p ≥ 2" if p is True else "pass p=7"
    with pytest.raises(InputError, match=rf"p={p!r} must be an integer.*Fix: {fix}"):  # 7.0 made float tokens
        modular_addition(p, 10, 5, seed=0)


def test_modular_addition_takes_a_numpy_integer_modulus():
    data = modular_addition(np.int64(7), 10, 5, seed=0)
    assert data.train_inputs.dtype == torch.long and data.train_targets.dtype == torch.long
    assert torch.equal(data.train_inputs, modular_addition(7, 10, 5, seed=0).train_inputs)


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
    with pytest.raises(FileNotFoundError, match=r"(?s)no digits in .*run `make data` in the repository.*"
                                                 r"export_digits\(.*\) for this folder"):
        load_image_pair(tmp_path, "digits")


def test_image_pair_rejects_bad_arguments(tmp_path):
    export_digits(tmp_path)
    with pytest.raises(ValueError, match="unknown dataset"):
        load_image_pair(tmp_path, "mnist")
    for classes in ((3, 3), (-1, 3), (3, 10)):  # -1 was refused as damaged data (no image of it)
        with pytest.raises(ValueError, match=r"classes must be two different labels in 0\.\.9"):
            load_image_pair(tmp_path, "digits", classes=classes)
    with pytest.raises(ValueError, match="test_size"):
        load_image_pair(tmp_path, "digits", test_size=1.5)


@pytest.mark.parametrize("test_size, empty", [(0.001, "test"), (0.999, "training")])
def test_digits_refuse_a_test_size_that_empties_a_split(digits_data, test_size, empty):
    # 357 threes and eights: 0.001 holds out round(0.357) = 0 images, 0.999 keeps none for training
    with pytest.raises(ValueError, match=rf"test_size={test_size} leaves the {empty} split empty: "
                       r"classes \(3, 8\) have 357 images. Fix: use a test_size between 0.002801 and 0.9972"):
        load_image_pair(digits_data, "digits", classes=(3, 8), test_size=test_size)


def test_digits_test_size_bounds_in_the_message_work(digits_data):
    assert len(load_image_pair(digits_data, "digits", (3, 8), test_size=0.002801).test_y) == 1
    assert len(load_image_pair(digits_data, "digits", (3, 8), test_size=0.9972).train_y) == 1


# --- CIFAR-2 ------------------------------------------------------------------------------


def fake_batch(n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    labels = [int(v) for v in rng.integers(0, 10, n)]
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    data[:, 0] = labels  # lets the test check that images travel with their labels
    return {b"batch_label": b"fake", b"labels": labels, b"data": data}


def write_archive(path, batches: dict, protocol: int = 2) -> None:
    write_raw_archive(path, {name: pickle.dumps(batch, protocol=protocol) for name, batch in batches.items()})


def write_raw_archive(path, payloads: dict, folders: tuple = ()) -> None:
    """An archive of cifar-10-batches-py/<name> holding `payloads` (name -> bytes), and `folders` as folders."""
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in payloads.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        for name in folders:
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.type = tarfile.DIRTYPE
            tar.addfile(info)


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
    """Each channel is standardised by the training images' mean and spread of that channel (the
    green one here spans a quarter of the others' range), the test images by the same numbers."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = fake_batches()
    for name, batch in batches.items():
        batch[b"data"][:, 1024:2048] //= 4
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    pair = load_image_pair(tmp_path, "cifar2")
    assert pair.train_x.shape[1:] == (3, 32, 32) and pair.classes == (3, 5)

    def images(names):
        data = np.concatenate([batches[name][b"data"] for name in names])
        labels = np.concatenate([batches[name][b"labels"] for name in names])
        return data[np.isin(labels, (3, 5))].reshape(-1, 3, 32, 32).astype(np.float64)

    train = images([f"data_batch_{i}" for i in range(1, 6)])
    mean, std = train.mean(axis=(0, 2, 3), keepdims=True), train.std(axis=(0, 2, 3), ddof=1, keepdims=True)
    np.testing.assert_allclose(pair.train_x.numpy(), (train - mean) / std, atol=1e-5, rtol=0)
    np.testing.assert_allclose(pair.test_x.numpy(), (images(["test_batch"]) - mean) / std, atol=1e-5, rtol=0)


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
    # CIFAR-10 is the user's copy: `make data` cannot bring it back, so the fix must not say so
    with pytest.raises(InputError, match="(?s)cifar-10-python.tar.gz is not a complete.*Fix: replace "
                       ".*cifar-10-python.tar.gz with a fresh copy of CIFAR-10's python archive") as error:
        load_cifar2(tmp_path, (3, 5))
    assert "make data" not in str(error.value)


def damaged_batches(kind: str | None = None) -> dict:
    """The fake batches as pickle bytes (name -> bytes), data_batch_2 damaged as `kind` names (None:
    intact): its numbers changed before pickling, or its bytes after."""
    batches = fake_batches()
    batch = batches["data_batch_2"]
    if kind == "wrong size":
        batch[b"data"] = batch[b"data"][:, :3000]
    elif kind == "more labels":
        batch[b"labels"] = batch[b"labels"] + [3]
    elif kind == "fewer labels":
        batch[b"labels"] = batch[b"labels"][:-1]
    elif kind in ("label 10", "label -1"):
        batch[b"labels"][4] = int(kind.split()[1])
    elif kind == "pixel 256":
        batch[b"data"] = batch[b"data"].astype(np.int64)
        batch[b"data"][1, 7] = 256
    elif kind == "float pixels":
        batch[b"data"] = batch[b"data"] / 255
    pickled = {name: pickle.dumps(b, protocol=2) for name, b in batches.items()}
    if kind == "missing":
        del pickled["data_batch_2"]
    elif kind == "garbage":
        pickled["data_batch_2"] = b"these bytes are no pickle"
    elif kind == "empty":
        pickled["data_batch_2"] = b""
    elif kind == "truncated":
        pickled["data_batch_2"] = pickled["data_batch_2"][:-100]
    elif kind == "list":
        pickled["data_batch_2"] = pickle.dumps([1, 2, 3], protocol=2)
    return pickled


BATCH_DAMAGE = [
    ("garbage", "is not a CIFAR-10 python batch"), ("empty", "is not a CIFAR-10 python batch"),
    ("truncated", "is not a CIFAR-10 python batch"), ("list", "is not a dict with b'data' and b'labels'"),
    ("wrong size", "holds 120000 pixel values, not a whole number of 3x32x32 images"),
    ("more labels", "holds 41 labels for 40 images"), ("fewer labels", "holds 39 labels for 40 images"),
    ("label 10", r"holds labels outside 0..9 \(from 0 to 10\)"),
    ("label -1", r"holds labels outside 0..9 \(from -1 to"),
    ("pixel 256", r"holds pixels of dtype int64 \(0 to 256\), not whole values 0..255"),
    ("float pixels", r"holds pixels of dtype float64 \(0.0 to 1.0\), not whole values 0..255"),
]


@pytest.mark.parametrize("kind, cause", [("missing", "is missing")] + BATCH_DAMAGE)
def test_damaged_extracted_cifar_batch_is_refused_naming_the_file_and_the_fix(tmp_path, kind, cause):
    batches = damaged_batches(kind)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name, payload in batches.items():
        (folder / name).write_bytes(payload)
    path = re.escape(str(folder / "data_batch_2"))
    fix = (rf"Fix: restore this file from the archive, or delete {re.escape(str(folder))} so that "
           rf"{re.escape(str(tmp_path / 'cifar-10-python.tar.gz'))} is read instead; .*put a fresh copy")
    with pytest.raises(InputError, match=rf"(?s){path} {cause}.*{fix}") as error:
        load_image_pair(tmp_path, "cifar2")
    assert "make data" not in str(error.value)


@pytest.mark.parametrize("kind, cause", BATCH_DAMAGE)
def test_damaged_cifar_archive_member_is_refused_naming_the_member_and_the_fix(tmp_path, kind, cause):
    batches = damaged_batches(kind)
    archive = tmp_path / "cifar-10-python.tar.gz"
    write_raw_archive(archive, batches)
    member = re.escape(str(archive / "cifar-10-batches-py" / "data_batch_2"))
    with pytest.raises(InputError, match=rf"(?s){member} {cause}.*Fix: replace {re.escape(str(archive))} "
                       "with a fresh copy of CIFAR-10's python archive") as error:
        load_cifar2(tmp_path)
    assert "make data" not in str(error.value)


def test_cifar_archive_member_that_is_a_folder_is_refused(tmp_path):
    batches = damaged_batches()
    del batches["test_batch"]
    write_raw_archive(tmp_path / "cifar-10-python.tar.gz", batches, folders=("test_batch",))
    with pytest.raises(InputError, match="test_batch is not a regular file.*Fix: replace"):
        load_cifar2(tmp_path)


def test_malicious_extracted_cifar_batch_is_refused_naming_the_file(tmp_path):
    marker = tmp_path / "pwned"
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = fake_batches()
    batches["test_batch"] = {b"data": Exploit(str(marker)), b"labels": [0]}
    for name, batch in batches.items():
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(InputError, match=f"{re.escape(str(folder / 'test_batch'))} is not a CIFAR-10 python "
                       "batch .*refusing to load") as error:
        load_cifar2(tmp_path)
    assert isinstance(error.value, pickle.UnpicklingError)  # what the refusal was before it named the file
    assert not marker.exists()


@pytest.mark.parametrize("batch, split", [("data_batch_4", "training"), ("test_batch", "test")])
def test_cifar2_refuses_a_class_missing_from_a_split(tmp_path, batch, split):
    batches = fake_batches()
    names = [batch] if split == "test" else [f"data_batch_{i}" for i in range(1, 6)]
    for name in names:  # a hand-made subset without dogs (5) in this split
        labels = batches[name][b"labels"]
        batches[name][b"labels"] = [6 if label == 5 else label for label in labels]
    write_archive(tmp_path / "cifar-10-python.tar.gz", batches)
    with pytest.raises(InputError, match=rf"the CIFAR-10 {split} split .* has no image of class\(es\) \[5\]"):
        load_cifar2(tmp_path, (3, 5))
    assert len(load_cifar2(tmp_path, (3, 4)).test_labels) > 0  # classes both splits contain still load
