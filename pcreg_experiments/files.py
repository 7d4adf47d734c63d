"""Where the dataset files are, and what is in them, with numpy only (no torch, no Avalanche).

The CLI checks ``--data-root`` with these before its heavy imports (:func:`check_dataset_files`);
:mod:`pcreg_experiments.data` reads the files with them.

* MNIST / Fashion-MNIST: the IDX files ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
  ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` (each optionally ``.gz``) in ``root``,
  ``root/<name>``, ``root/<name>/raw``, ``root/raw`` or torchvision's ``root/MNIST/raw`` /
  ``root/FashionMNIST/raw`` (:func:`idx_dirs`).
* CIFAR-10 / CIFAR-100: the python-pickle batches in ``root/cifar-10-batches-py/`` /
  ``root/cifar-100-python/`` (or in ``root`` itself).

Both IDX datasets have the same file names and image size, so they are told apart by content:
:func:`idx_mismatch` compares the mean intensity of the training images with each dataset's.
"""

from __future__ import annotations

import errno
import gzip
import os
import zlib
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from .catalog import CIFAR_DATASETS, DATASET_TITLES, IDX_DATASETS

__all__ = [
    "IDX_FILES", "IDX_TRAIN_MEANS", "CIFAR_FILES", "read_idx", "normalize_idx_name", "idx_dirs",
    "find_idx_file", "cifar_dir", "check_dataset_files", "idx_mismatch",
]

# IDX dtype code -> big-endian numpy dtype
IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# torchvision's folder names, also searched so an existing torchvision download works
TORCHVISION_DIRS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}

CIFAR_FILES = {
    # name: (folder, train files, test files, label key)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels"),
}

#: mean pixel intensity (in [0, 1]) of the 60000 training images of each IDX dataset
IDX_TRAIN_MEANS = {"mnist": 0.1307, "fashion-mnist": 0.2860}
# idx_mismatch: a mean within _NEAR of the other dataset's and at least _FAR from the asked one's
# (the two are 0.155 apart; the mean of a few thousand real images is within 0.01 of its dataset's)
_NEAR, _FAR = 0.03, 0.08
_MIN_IMAGES = 1000  # fewer 28x28 training images than this: not a copy of either dataset, no check


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzip-compressed or not.

    Compression is detected from the gzip magic bytes ``1f 8b`` (not the name).
    The result is a native-byte-order array of the header's dtype and shape.

    Raises ``FileNotFoundError`` (naming the path) if the file does not exist and
    ``ValueError`` (naming the path) for a bad magic number, a truncated file or
    trailing bytes after the payload.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(errno.ENOENT, "IDX file not found", str(path))
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"{path}: corrupt gzip stream: {e}") from e

    if len(data) < 4:
        raise ValueError(
            f"{path}: truncated: expected at least 4 header bytes, found {len(data)}"
        )
    magic = int.from_bytes(data[:4], "big")
    code, ndim = data[2], data[3]
    if data[0] != 0 or data[1] != 0 or code not in IDX_DTYPES:
        raise ValueError(f"{path}: bad magic number 0x{magic:08X}")
    dtype = IDX_DTYPES[code]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(
            f"{path}: truncated: expected {header} header bytes for {ndim} "
            f"dimensions, found {len(data)}"
        )
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    found = len(data) - header
    if found < expected:
        raise ValueError(
            f"{path}: truncated: expected {expected} bytes of data, found {found}"
        )
    if found > expected:
        raise ValueError(
            f"{path}: trailing bytes: expected {expected} bytes of data, "
            f"found {found} ({found - expected} extra)"
        )
    arr = np.frombuffer(data, dtype=dtype, count=expected // dtype.itemsize, offset=header)
    return arr.reshape(dims).astype(dtype.newbyteorder("="))


def normalize_idx_name(name: str) -> str:
    key = str(name).strip().lower().replace("_", "-")
    if key == "fashionmnist":
        key = "fashion-mnist"
    if key not in IDX_DATASETS:
        raise ValueError(
            f"unknown IDX dataset {name!r}; valid names: {', '.join(IDX_DATASETS)}"
        )
    return key


def idx_dirs(root: Path, name: str) -> List[Path]:
    """The directories searched for the IDX files of ``name``, in order."""
    return [root, root / name, root / name / "raw", root / "raw", root / TORCHVISION_DIRS[name] / "raw"]


def find_idx_file(root: Path, name: str, stem: str) -> Path:
    """The first of ``<dir>/<stem>`` / ``<dir>/<stem>.gz`` over :func:`idx_dirs` that exists."""
    tried = []
    for d in idx_dirs(Path(root), name):
        for fname in (stem, stem + ".gz"):
            p = d / fname
            tried.append(str(p))
            if p.is_file():
                return p
    raise FileNotFoundError(
        f"{name}: file {stem}[.gz] not found under {root}; tried: " + ", ".join(tried)
    )


def cifar_dir(root: Path, name: str) -> Path:
    """Where the batches of ``name`` are read: ``root/<folder>`` if it exists, else ``root``."""
    folder = CIFAR_FILES[name][0]
    return root / folder if (root / folder).is_dir() else root


def check_dataset_files(dataset: str, root: str | os.PathLike) -> Dict[str, Path]:
    """Check that the files of ``dataset`` exist under ``root`` by name (nothing is read), and
    return them (``{file name: path}``). ``FileNotFoundError`` names every missing file and where it
    was looked for; digits need no files."""
    if dataset == "digits":
        return {}
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(errno.ENOENT, f"{dataset} data directory not found", str(root))
    if dataset in CIFAR_DATASETS:
        folder, train, test, _ = CIFAR_FILES[dataset]
        base = cifar_dir(root, dataset)
        missing = [f for f in train + test if not (base / f).is_file()]
        if missing:
            where = (f"{base}" if base != root else f"{root / folder}/ (not found) or {root}")
            raise FileNotFoundError(
                f"{dataset}: python-pickle batch files missing from {where}: {', '.join(missing)} (expected in "
                f"{folder}/ under the data root, as unpacked from the official archive or downloaded by torchvision)"
            )
        return {f: base / f for f in train + test}
    name = normalize_idx_name(dataset)
    found, missing = {}, []
    for stem in IDX_FILES.values():
        try:
            found[stem] = find_idx_file(root, name, stem)
        except FileNotFoundError:
            missing.append(stem + "[.gz]")
    if missing:
        raise FileNotFoundError(
            f"{name}: IDX files not found: {', '.join(missing)}; looked in "
            + ", ".join(str(d) for d in idx_dirs(root, name))
        )
    return found


def idx_mismatch(name: str, images: np.ndarray, path: str | os.PathLike = "") -> Optional[str]:
    """A message when the training ``images`` (uint8 ``[N, 28, 28]``) asked for as ``name`` look
    like the other IDX dataset: MNIST and Fashion-MNIST have the same file names, but their mean
    intensities differ (0.1307 / 0.2860). None when they fit ``name``, or are not a copy of either
    (another shape, fewer than 1000 images, a mean near neither)."""
    name = normalize_idx_name(name)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28) or len(images) < _MIN_IMAGES:
        return None
    mean = float(images.mean(dtype=np.float64)) / 255.0
    other = next(n for n in IDX_DATASETS if n != name)
    if abs(mean - IDX_TRAIN_MEANS[other]) > _NEAR or abs(mean - IDX_TRAIN_MEANS[name]) < _FAR:
        return None
    asked, looks = DATASET_TITLES[name], DATASET_TITLES[other]
    return (f"{path}: these look like {looks} images, not {asked}: their mean intensity is {mean:.4f}, "
            f"{looks}'s is {IDX_TRAIN_MEANS[other]:.4f} and {asked}'s {IDX_TRAIN_MEANS[name]:.4f} (the two "
            f"datasets have the same file names). Ask for dataset {other!r} (--dataset {other}), or point the "
            f"data root at the {asked} files")
