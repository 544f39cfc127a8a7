"""Data sets of the paper package: modular addition, the 8x8 digits (CPU default) and CIFAR-2.

Everything here is deterministic given its seed, and nothing downloads: the digits ship inside
scikit-learn, and CIFAR-10 must be placed in the data directory by the user.
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch

from .errors import InputError, is_number, is_whole


@dataclass
class ModAddData:
    """Addition mod p as token sequences [a, p, b, p + 1] ("a + b =") with targets (a + b) mod p."""

    p: int
    train_inputs: torch.Tensor  # long [M, 4]
    train_targets: torch.Tensor  # long [M]
    val_inputs: torch.Tensor  # long [V, 4]
    val_targets: torch.Tensor  # long [V]
    train_pairs: torch.Tensor  # long [M, 2], the (a, b) of each training row, for labelling
    val_pairs: torch.Tensor  # long [V, 2]


def modular_addition(
    p: int, train_size: int, val_size: int, seed: int, only_a_ge_b: bool = True
) -> ModAddData:
    """Split the pairs (a, b) of residues mod p into disjoint training and validation sets.

    With only_a_ge_b (the paper's choice) only pairs with a >= b are used: p(p + 1)/2 of them
    (6,441 for p = 113). The pairs are shuffled by a torch.Generator seeded with `seed`; the
    first train_size form the training set, the next val_size the validation set.
    """
    if not is_whole(p):  # a float p would make float tokens, which an embedding cannot look up
        raise InputError(f"modulus p={p!r} must be an integer, got {type(p).__name__}. Fix: pass p={int(p)}"
                         if is_number(p) and float(p).is_integer() else
                         f"modulus p={p!r} must be an integer, got {type(p).__name__}. Fix: pass a whole p ≥ 2")
    if p < 2:
        raise InputError(f"modulus p={p} must be at least 2 (addition mod 1 has one residue). Fix: pass p ≥ 2")
    if train_size < 1 or val_size < 0:
        raise InputError(f"need train_size >= 1 and val_size >= 0, got {train_size} and {val_size}. Fix: pass "
                         "at least one training pair and no negative count")
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    pairs = torch.stack([a.flatten(), b.flatten()], dim=1)
    if only_a_ge_b:
        pairs = pairs[pairs[:, 0] >= pairs[:, 1]]
    if train_size + val_size > len(pairs):
        raise InputError(
            f"train_size + val_size = {train_size + val_size} exceeds the {len(pairs)} pairs available "
            f"for p={p} (only_a_ge_b={only_a_ge_b}). Fix: lower the sizes or raise p"
        )
    generator = torch.Generator().manual_seed(seed)
    pairs = pairs[torch.randperm(len(pairs), generator=generator)]
    train_pairs, val_pairs = pairs[:train_size], pairs[train_size : train_size + val_size]

    def encode(pairs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        plus = torch.full((len(pairs),), p)
        equals = torch.full((len(pairs),), p + 1)
        tokens = torch.stack([pairs[:, 0], plus, pairs[:, 1], equals], dim=1)
        return tokens, (pairs[:, 0] + pairs[:, 1]) % p

    train_inputs, train_targets = encode(train_pairs)
    val_inputs, val_targets = encode(val_pairs)
    return ModAddData(p, train_inputs, train_targets, val_inputs, val_targets, train_pairs, val_pairs)


# --- digits -------------------------------------------------------------------------------


def _write_exact(path: Path, array: np.ndarray) -> None:
    """Write `array` as .npy unless an identical file exists; refuse to replace a different one."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    payload = buffer.getvalue()
    if path.exists():
        if path.read_bytes() == payload:
            return
        raise FileExistsError(
            f"{path} exists with different content; delete it if you want it re-exported"
        )
    temporary = path.with_suffix(".tmp")
    temporary.write_bytes(payload)
    os.replace(temporary, path)  # atomic: a crash never leaves a half-written file behind


def export_digits(data_dir: str | os.PathLike) -> Path:
    """Write scikit-learn's 8x8 digits to data_dir/digits/{images,labels}.npy; return that folder.

    images: uint8 [1797, 8, 8] with values 0..16; labels: int64 [1797]. Fixed little-endian
    dtypes and np.save (no timestamps) make the files byte-identical on every machine.
    """
    from sklearn.datasets import load_digits  # only this step needs scikit-learn

    digits = load_digits()
    folder = Path(data_dir) / "digits"
    folder.mkdir(parents=True, exist_ok=True)
    _write_exact(folder / "images.npy", digits.images.astype("<u1"))
    _write_exact(folder / "labels.npy", digits.target.astype("<i8"))
    return folder


def _load_digits(data_dir: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    folder = Path(data_dir) / "digits"
    if not (folder / "images.npy").exists() or not (folder / "labels.npy").exists():
        raise FileNotFoundError(
            f"no digits in {folder}: run `make data` in the repository (it writes data/), or "
            f"explaind.data.export_digits({str(data_dir)!r}) for this folder"
        )
    images, labels = _load_array(folder / "images.npy"), _load_array(folder / "labels.npy")
    if images.ndim != 3 or not np.issubdtype(images.dtype, np.number):
        _bad_data(folder / "images.npy", f"holds {images.dtype} of shape {images.shape}, not images [N, H, W]")
    if not np.isfinite(images).all():
        _bad_data(folder / "images.npy", "holds NaN or infinite pixels")
    if labels.shape != images.shape[:1] or not np.issubdtype(labels.dtype, np.integer):
        _bad_data(folder / "labels.npy", f"holds {labels.dtype} of shape {labels.shape}, not one integer label "
                  f"per image ({len(images)})")
    return images[:, None], labels  # add the channel axis: [N, 1, 8, 8]


def _bad_data(path: Path, cause: str) -> NoReturn:
    raise InputError(f"{path} {cause}: data/ is damaged. Fix: delete data/ and run `make data` "
                     "(`python -m explaind.pipeline data --check-only` compares it with data.dvc)")


def _load_array(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:  # truncated, empty or not an .npy file
        _bad_data(path, f"cannot be read ({error})")


# --- CIFAR-2 ------------------------------------------------------------------------------

CIFAR_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR_TEST_BATCH = "test_batch"
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
CIFAR_IMAGE_VALUES = 3 * 32 * 32  # uint8 values per image, channel-major


class _UnreadableBatch(InputError, pickle.UnpicklingError):
    """A CIFAR batch that does not unpickle: an InputError naming the file, and still the
    UnpicklingError that callers caught before it did."""


def _cifar_fix(path: Path) -> str:
    """How to repair the damaged CIFAR-10 file `path`. Never `make data`: nothing downloads
    CIFAR-10, the copy in the data directory is the user's own."""
    fresh = f"a fresh copy of CIFAR-10's python archive (from {CIFAR_URL})"
    if path.parent.name == CIFAR_FOLDER and path.parent.parent.name != CIFAR_ARCHIVE:  # extracted file
        archive = path.parent.parent / CIFAR_ARCHIVE
        return (f"restore this file from the archive, or delete {path.parent} so that {archive} is read "
                f"instead; if that archive is missing or damaged too, put {fresh} there")
    archive = path if path.name == CIFAR_ARCHIVE else path.parent.parent  # the archive or a member
    return f"replace {archive} with {fresh}"


def _bad_cifar(path: Path, cause: str, error: type[InputError] = InputError) -> NoReturn:
    raise error(f"{path} {cause}: the CIFAR-10 copy is damaged. Fix: {_cifar_fix(path)}")


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild numpy arrays and nothing else.

    A pickle can name any importable callable and have it called; admitting only the few
    array-reconstruction helpers numpy's pickles use means a tampered file cannot run code.
    """

    ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),  # numpy 1.x pickles (the CIFAR files)
        ("numpy._core.multiarray", "_reconstruct"),  # numpy 2.x pickles
        ("numpy.core.numeric", "_frombuffer"),  # pickle protocol 5
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: a CIFAR batch only contains numpy arrays, "
                "so this file is not a genuine CIFAR-10 python batch"
            )
        return super().find_class(module, name)


def _unpickle_batch(raw: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [N, 3, 32, 32] and labels int64 [N] of one batch; `name` is its path, for errors."""
    path = Path(name)
    try:
        batch = _NumpyOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as error:  # garbage, empty, truncated or tampered: every failure means "not a batch"
        _bad_cifar(path, f"is not a CIFAR-10 python batch ({type(error).__name__}: {error})", _UnreadableBatch)
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        _bad_cifar(path, "is not a dict with b'data' and b'labels'")
    try:
        data, labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"], dtype=np.int64)
    except (TypeError, ValueError, OverflowError) as error:
        _bad_cifar(path, f"holds data or labels that are not arrays of numbers ({error})")
    # a cast to uint8 would wrap 256 to 0 and truncate fractions without a word
    if data.dtype.kind not in "ui" or (data.size and not 0 <= data.min() <= data.max() <= 255):
        found = f"{data.min()} to {data.max()}" if data.dtype.kind in "uif" and data.size else "no numbers"
        _bad_cifar(path, f"holds pixels of dtype {data.dtype} ({found}), not whole values 0..255")
    data = data.astype(np.uint8, copy=False)
    if data.size % CIFAR_IMAGE_VALUES:
        _bad_cifar(path, f"holds {data.size} pixel values, not a whole number of 3x32x32 images")
    data = data.reshape(-1, 3, 32, 32)
    if labels.shape != data.shape[:1]:  # images and labels are matched by position
        _bad_cifar(path, f"holds {labels.size} labels for {len(data)} images")
    if labels.size and not 0 <= labels.min() <= labels.max() <= 9:
        _bad_cifar(path, f"holds labels outside 0..9 (from {labels.min()} to {labels.max()})")
    return data, labels


def _cifar_batch_path(data_dir: Path, name: str) -> Path:
    """Where batch `name` is read from, for messages: the extracted folder, else inside the archive."""
    folder = data_dir / CIFAR_FOLDER
    return folder / name if folder.is_dir() else data_dir / CIFAR_ARCHIVE / CIFAR_FOLDER / name


def _read_extracted(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        _bad_cifar(path, "is missing")
    except OSError as error:  # a folder or an unreadable file in its place
        _bad_cifar(path, f"cannot be read ({error})")


def _read_member(tar: tarfile.TarFile, archive: Path, name: str) -> bytes:
    member = tar.extractfile(f"{CIFAR_FOLDER}/{name}")  # KeyError when absent
    if member is None:  # a folder or a device of that name, not a file
        _bad_cifar(archive / CIFAR_FOLDER / name, "is not a regular file")
    return member.read()


def _read_cifar_batches(data_dir: Path) -> dict[str, bytes]:
    """Raw bytes of each batch, from the extracted folder or straight from the archive."""
    names = CIFAR_TRAIN_BATCHES + [CIFAR_TEST_BATCH]
    folder, archive = data_dir / CIFAR_FOLDER, data_dir / CIFAR_ARCHIVE
    if folder.is_dir():
        return {name: _read_extracted(folder / name) for name in names}
    if archive.is_file():
        try:
            with tarfile.open(archive, "r:gz") as tar:  # read members in memory: nothing is extracted
                return {name: _read_member(tar, archive, name) for name in names}
        except (tarfile.TarError, OSError, EOFError, KeyError) as error:  # truncated or another archive
            _bad_cifar(archive, f"is not a complete CIFAR-10 python archive ({type(error).__name__}: {error})")
    raise FileNotFoundError(
        f"CIFAR-10 not found: put the python version ({CIFAR_ARCHIVE}, from "
        f"{CIFAR_URL}) or its extracted {CIFAR_FOLDER}/ into {data_dir}"
    )


def _check_cifar_classes(
    data_dir: Path, classes: tuple[int, int], labels: np.ndarray, split: str, names: list[str]
) -> None:
    missing = [c for c in classes if not (labels == c).any()]
    if missing:  # a one-class or empty task would train silently (e.g. a hand-made subset of CIFAR-10)
        where = _cifar_batch_path(data_dir, names[0]).parent
        raise InputError(
            f"the CIFAR-10 {split} split ({', '.join(names)} in {where}) has no image of class(es) "
            f"{missing}, so classes {classes} do not make a two-class task. Fix: choose two classes that "
            f"both splits contain, or use the complete CIFAR-10 ({CIFAR_ARCHIVE}, from {CIFAR_URL})"
        )


@dataclass
class ImageArrays:
    """Raw uint8 images [N, C, H, W] with binary labels (0 = first class, 1 = second)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def load_cifar2(data_dir: str | os.PathLike, classes: tuple[int, int] = (3, 5)) -> ImageArrays:
    """CIFAR-2 from the CIFAR-10 python archive: two classes (default cat 3 vs dog 5).

    Uses CIFAR-10's own split: 10,000 training and 2,000 test images for two classes.
    """
    _check_classes(classes, 10)
    data_dir = Path(data_dir)
    batches = {name: _unpickle_batch(raw, str(_cifar_batch_path(data_dir, name)))
               for name, raw in _read_cifar_batches(data_dir).items()}
    train = [batches[name] for name in CIFAR_TRAIN_BATCHES]
    train_images = np.concatenate([images for images, _ in train])
    train_labels = np.concatenate([labels for _, labels in train])
    test_images, test_labels = batches[CIFAR_TEST_BATCH]
    _check_cifar_classes(data_dir, classes, train_labels, "training", CIFAR_TRAIN_BATCHES)
    _check_cifar_classes(data_dir, classes, test_labels, "test", [CIFAR_TEST_BATCH])
    keep_train, keep_test = np.isin(train_labels, classes), np.isin(test_labels, classes)
    return ImageArrays(
        train_images[keep_train],
        (train_labels[keep_train] == classes[1]).astype(np.int64),
        test_images[keep_test],
        (test_labels[keep_test] == classes[1]).astype(np.int64),
    )


# --- normalised binary image tasks --------------------------------------------------------


@dataclass
class ImagePair:
    """A binary image task as normalised float tensors, ready for training."""

    train_x: torch.Tensor  # float32 [N, C, H, W], standardised per channel with training statistics
    train_y: torch.Tensor  # long [N] in {0, 1}
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: tuple[int, int]  # original labels of class 0 and class 1


def _check_classes(classes: tuple[int, int], num_labels: int) -> None:
    if len(classes) != 2 or classes[0] == classes[1] or not all(0 <= c < num_labels for c in classes):
        raise InputError(f"classes must be two different labels in 0..{num_labels - 1}, got {classes}. Fix: "
                         f"pass two, e.g. [3, 8]")


def _split_digits(
    data_dir: str | os.PathLike, classes: tuple[int, int], test_size: float, seed: int
) -> ImageArrays:
    _check_classes(classes, 10)
    if not 0.0 < test_size < 1.0:
        raise InputError(f"test_size is a fraction of the images and must lie in (0, 1), got {test_size}. Fix: "
                         "pass e.g. 0.3")
    images, labels = _load_digits(data_dir)
    keep = np.isin(labels, classes)
    missing = [c for c in classes if not (labels == c).any()]
    if missing:  # a one-class task would train silently
        _bad_data(Path(data_dir) / "digits" / "labels.npy", f"has no image of class(es) {missing}")
    images, labels = images[keep], (labels[keep] == classes[1]).astype(np.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed)).numpy()
    n_test = round(test_size * len(labels))
    if not 0 < n_test < len(labels):  # an empty split fails later, far from its cause
        raise InputError(
            f"test_size={test_size} leaves the {'test' if n_test == 0 else 'training'} split empty: "
            f"classes {classes} have {len(labels)} images. Fix: use a test_size between "
            f"{1 / len(labels):.4g} and {1 - 1 / len(labels):.4g}"
        )
    test, train = order[:n_test], order[n_test:]
    return ImageArrays(images[train], labels[train], images[test], labels[test])


def load_image_pair(
    data_dir: str | os.PathLike,
    dataset: str = "digits",
    classes: tuple[int, int] | None = None,
    test_size: float = 0.3,
    seed: int = 0,
) -> ImagePair:
    """Load a binary image task, standardised per channel with the training images' statistics.

    dataset "digits": scikit-learn's 8x8 digits (see export_digits), default classes (3, 8),
    two shapes that share most strokes and are among the most confused pairs, so the task is
    not trivial. A seeded random test_size fraction is held out.
    dataset "cifar2": CIFAR-10 cat vs dog by default (3, 5); CIFAR's own test split is used,
    so test_size and seed are ignored.
    """
    if dataset == "digits":
        classes = (3, 8) if classes is None else tuple(classes)
        arrays = _split_digits(data_dir, classes, test_size, seed)
    elif dataset == "cifar2":
        classes = (3, 5) if classes is None else tuple(classes)
        arrays = load_cifar2(data_dir, classes)
    else:
        raise InputError(f"unknown dataset {dataset!r}. Fix: choose 'digits' or 'cifar2'")
    train_x = torch.from_numpy(arrays.train_images).float()
    test_x = torch.from_numpy(arrays.test_images).float()
    mean = train_x.mean(dim=(0, 2, 3), keepdim=True)
    std = train_x.std(dim=(0, 2, 3), keepdim=True)
    return ImagePair(
        (train_x - mean) / std,
        torch.from_numpy(arrays.train_labels),
        (test_x - mean) / std,
        torch.from_numpy(arrays.test_labels),
        classes,
    )
