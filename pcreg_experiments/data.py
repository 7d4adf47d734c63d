"""Continual-learning benchmarks (Avalanche 0.6 ``CLScenario``) and matching MLPs.

Three scenarios are supported, over three datasets:

* ``"split-task"``  -- task-incremental: the 10 classes are split into
  ``n_experiences`` groups of equal size (classes ``0..k-1``, ``k..2k-1``, ... in
  their natural order); experience ``i`` has task label ``i`` and its targets
  are re-indexed *within the experience* to ``0..k-1`` (like Avalanche's
  ``class_ids_from_zero_in_each_exp``), so each head of a
  :class:`~avalanche.models.MultiHeadClassifier` has exactly ``k`` outputs.
* ``"split-class"`` -- class-incremental: the same class split, all task labels
  0, original (global) class ids as targets, one shared 10-way head.
* ``"permuted"``    -- domain-incremental: ``n_experiences`` fixed, seeded pixel
  permutations of the whole dataset (all 10 classes each time), task label 0.
  **Experience 0 is the identity permutation** (the original images); experiences
  ``1..n-1`` use ``numpy.random.default_rng(seed)`` permutations.

Datasets: ``"digits"`` (scikit-learn's bundled 8x8 digits, no download; a fixed
70/30 stratified train/test split, seed independent of ``seed``), ``"mnist"``
and ``"fashion-mnist"`` (read from local IDX files under ``data_root``),
``"cifar10"`` and ``"cifar100"`` (read from the python-pickle batches,
``cifar-10-batches-py/`` / ``cifar-100-python/`` under ``data_root``; fine labels
for CIFAR-100, whose split scenarios divide its 100 classes). Nothing is
downloaded unless :func:`download_dataset` is called (``--download``).

Every experience dataset yields ``(x, y, t)``: ``x`` a float32 tensor of shape
``input_shape`` in [0, 1], ``y`` an int class id (collated to an int64 tensor by
the default collate), ``t`` an int task label. With ``validation > 0`` a
``valid_stream`` is added, made of a per-class (stratified) split held out from
the *training* data only; the test stream is never touched.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from avalanche_pcreg import _avalanche  # noqa: F401  (before Avalanche: its import without qpsolvers' warning)
from avalanche.models import MultiHeadClassifier, MultiTaskModule
from torch import nn

__all__ = [
    "SCENARIOS",
    "DATASETS",
    "IDX_DATASETS",
    "CIFAR_DATASETS",
    "load_cifar_dataset",
    "load_arrays",
    "download_dataset",
    "CNN",
    "MultiHeadCNN",
    "BenchmarkSpec",
    "load_digits_arrays",
    "read_idx",
    "load_idx_dataset",
    "make_benchmark",
    "make_model",
    "MLP",
    "MultiHeadMLP",
]

from .catalog import CIFAR_DATASETS, DATASETS, IDX_DATASETS, SCENARIOS
from .catalog import N_CLASSES as CLASSES_OF
from .files import (CIFAR_FILES, IDX_DTYPES, IDX_FILES, TORCHVISION_DIRS, cifar_dir, find_idx_file, idx_mismatch,
                    normalize_idx_name, read_idx)

N_CLASSES = 10  # of digits, MNIST, Fashion-MNIST and CIFAR-10
DIGITS_TEST_FRACTION = 0.3
_DIGITS_SPLIT_SEED = 0  # fixed: the digits test set is the same for every run

# the file names and where they are looked for live in .files (numpy only: the CLI checks them
# before importing torch); the old private names stay for code that used them
_IDX_DTYPES, _IDX_FILES, _TORCHVISION_DIRS, _CIFAR = IDX_DTYPES, IDX_FILES, TORCHVISION_DIRS, CIFAR_FILES
_normalize_idx_name, _find_idx_file = normalize_idx_name, find_idx_file


# --------------------------------------------------------------------------- arrays


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: ``X`` float32 ``[1797, 1, 8, 8]`` in [0, 1], ``y`` int64."""
    from sklearn.datasets import load_digits

    d = load_digits()
    X = (np.asarray(d.data, dtype=np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = np.asarray(d.target, dtype=np.int64)
    return np.ascontiguousarray(X), y


def load_idx_dataset(
    root: str | os.PathLike, name: str = "mnist", *, check_content: bool = True
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Load MNIST / Fashion-MNIST from local IDX files.

    Looks in ``root``, ``root/<name>``, ``root/<name>/raw``, ``root/raw`` (and
    torchvision's ``root/MNIST/raw`` / ``root/FashionMNIST/raw``) for
    ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each optionally
    ``.gz``. Returns ``((Xtr, ytr), (Xte, yte))`` with ``X`` float32
    ``[N, 1, H, W]`` in [0, 1] and ``y`` int64.

    MNIST and Fashion-MNIST files have the same names: training images whose mean intensity is
    Fashion-MNIST's when MNIST is asked for (or the reverse) are a ``ValueError`` naming both
    (:func:`~pcreg_experiments.files.idx_mismatch`; ``check_content=False`` skips it).
    """
    name = normalize_idx_name(name)
    if root is None:
        raise ValueError(f"{name}: a data root directory is required")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(errno.ENOENT, f"{name} data directory not found", str(root))

    out = []
    for split in ("train", "test"):
        ip = find_idx_file(root, name, IDX_FILES[f"{split}_images"])
        lp = find_idx_file(root, name, IDX_FILES[f"{split}_labels"])
        images, labels = read_idx(ip), read_idx(lp)
        if images.ndim != 3 or images.dtype != np.uint8:
            raise ValueError(
                f"{ip}: expected a 3-d unsigned-byte image array, got "
                f"{images.ndim}-d {images.dtype}"
            )
        if split == "train" and check_content:
            mismatch = idx_mismatch(name, images, ip)
            if mismatch:
                raise ValueError(mismatch + " (load_idx_dataset(..., check_content=False) skips this check)")
        if labels.ndim != 1:
            raise ValueError(f"{lp}: expected a 1-d label array, got {labels.ndim}-d")
        if images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"count mismatch: {ip} has {images.shape[0]} images but "
                f"{lp} has {labels.shape[0]} labels"
            )
        if labels.size and (labels.min() < 0 or labels.max() >= N_CLASSES):
            raise ValueError(f"{lp}: labels must lie in [0, {N_CLASSES - 1}]")
        X = (images.astype(np.float32) / 255.0)[:, None, :, :]
        out.append((np.ascontiguousarray(X), labels.astype(np.int64)))
    return out[0], out[1]


def _read_cifar_batch(path: Path, label_key: bytes, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    import pickle

    if not path.is_file():
        raise FileNotFoundError(errno.ENOENT, "CIFAR batch file not found", str(path))
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
    except Exception as e:  # truncated or not a pickle
        raise ValueError(f"{path}: not a readable CIFAR python-pickle batch ({type(e).__name__}: {e})") from None
    if not isinstance(d, dict) or b"data" not in d or label_key not in d:
        raise ValueError(f"{path}: expected a dict with keys b'data' and {label_key!r}")
    data = np.asarray(d[b"data"])
    labels = np.asarray(d[label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: expected uint8 data of shape [N, 3072], got {data.dtype} {list(data.shape)}")
    if labels.shape != (data.shape[0],):
        raise ValueError(f"count mismatch in {path}: {data.shape[0]} images but {labels.size} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(f"{path}: labels must lie in [0, {n_classes - 1}]")
    return data, labels


def load_cifar_dataset(
    root: str | os.PathLike, name: str = "cifar10"
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Load CIFAR-10 / CIFAR-100 from the standard python-pickle files.

    Reads ``root/cifar-10-batches-py/{data_batch_1..5,test_batch}`` or
    ``root/cifar-100-python/{train,test}`` (fine labels), as unpacked from the
    official archives or by torchvision's downloader. Returns
    ``((Xtr, ytr), (Xte, yte))`` with ``X`` float32 ``[N, 3, 32, 32]`` in [0, 1].
    """
    if name not in CIFAR_FILES:
        raise ValueError(f"unknown CIFAR dataset {name!r}; valid names: {', '.join(CIFAR_FILES)}")
    if root is None:
        raise ValueError(f"{name}: a data root directory is required")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(errno.ENOENT, f"{name} data directory not found", str(root))
    folder, train_files, test_files, key = CIFAR_FILES[name]
    base = cifar_dir(root, name)
    out = []
    for files in (train_files, test_files):
        parts = [_read_cifar_batch(base / f, key, CLASSES_OF[name]) for f in files]
        data = np.concatenate([p[0] for p in parts])
        X = (data.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0)
        out.append((np.ascontiguousarray(X), np.concatenate([p[1] for p in parts])))
    return out[0], out[1]


def load_arrays(dataset: str, data_root=None):
    """``((Xtr, ytr), (Xte, yte))`` of any dataset (digits: the fixed 70/30 split)."""
    if dataset == "digits":
        from sklearn.model_selection import train_test_split

        X, y = load_digits_arrays()
        Xtr, Xte, ytr, yte = train_test_split(
            X, y, test_size=DIGITS_TEST_FRACTION, stratify=y, random_state=_DIGITS_SPLIT_SEED
        )
        return (Xtr, ytr), (Xte, yte)
    if data_root is None:
        raise ValueError(
            f"dataset {dataset!r} needs data_root (a directory with its files); "
            "nothing is downloaded unless asked (download_dataset / --download)"
        )
    if dataset in CIFAR_DATASETS:
        return load_cifar_dataset(data_root, dataset)
    return load_idx_dataset(data_root, dataset)


_TORCHVISION_CLASSES = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "cifar10": "CIFAR10",
                        "cifar100": "CIFAR100"}


def download_dataset(dataset: str, root: str | os.PathLike) -> None:
    """Download ``dataset`` into ``root`` with torchvision's downloader (needs a network).

    The files land where :func:`load_idx_dataset` / :func:`load_cifar_dataset` look
    (``root/FashionMNIST/raw``, ``root/cifar-10-batches-py``, ...). Digits need no download.
    """
    if dataset == "digits":
        return
    if dataset not in _TORCHVISION_CLASSES:
        raise ValueError(f"unknown dataset {dataset!r}; valid datasets: {', '.join(DATASETS)}")
    import torchvision.datasets as tvd

    Path(root).mkdir(parents=True, exist_ok=True)
    cls = getattr(tvd, _TORCHVISION_CLASSES[dataset])
    for train in (True, False):
        cls(str(root), train=train, download=True)


# --------------------------------------------------------------------------- benchmark


@dataclass
class BenchmarkSpec:
    """A benchmark plus what a model needs to know about it."""

    benchmark: Any  # avalanche CLScenario: train_stream, test_stream[, valid_stream]
    input_shape: tuple
    n_classes_per_exp: int
    n_classes_total: int
    multi_head: bool
    scenario: str
    dataset: str


class _Permute:
    """Picklable transform: permute the flattened pixels of one sample."""

    def __init__(self, perm: np.ndarray):
        self.perm = torch.from_numpy(np.ascontiguousarray(perm, dtype=np.int64))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1)[self.perm].reshape(x.shape)

    def __repr__(self) -> str:
        return f"_Permute(n={self.perm.numel()})"


def _subsample_per_class(y: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    keep = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        keep.append(idx[rng.permutation(idx.size)[:k]] if idx.size > k else idx)
    return np.sort(np.concatenate(keep))


def _stratified_holdout(
    y: np.ndarray, fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Per-class split of ``arange(len(y))`` into (train, valid), both sorted."""
    tr, va = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        if idx.size < 2:
            raise ValueError(
                f"validation split needs >= 2 training samples of class {int(c)}, "
                f"found {idx.size}"
            )
        idx = idx[rng.permutation(idx.size)]
        n_val = min(max(int(round(fraction * idx.size)), 1), idx.size - 1)
        va.append(idx[:n_val])
        tr.append(idx[n_val:])
    return np.sort(np.concatenate(tr)), np.sort(np.concatenate(va))


def _tensor_dataset(X: np.ndarray, y: np.ndarray, task_label: int, transform=None):
    from avalanche.benchmarks.utils import _make_taskaware_tensor_classification_dataset

    xt = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))
    yt = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))
    ds = _make_taskaware_tensor_classification_dataset(
        xt, yt, targets=yt.tolist(), task_labels=int(task_label), transform=transform
    )
    if transform is not None:
        # so train()/eval() group switches and replace_current_transform_group
        # can never drop the permutation
        ds = ds.freeze_transforms()
    return ds


_TIMELINE_ATTRS = (
    "classes_in_this_experience",
    "previous_classes",
    "classes_seen_so_far",
    "future_classes",
)


def _classes_as_sorted_lists(bm) -> None:
    """``with_classes_timeline`` stores sets, but Avalanche 0.6's
    ``MultiHeadClassifier.adaptation`` indexes a tensor with
    ``classes_in_this_experience`` (fails on a set). Store sorted int lists, as
    the older generators did; every other consumer accepts a list."""
    for stream in bm.streams.values():
        for exp in stream:
            for attr in _TIMELINE_ATTRS:
                val = getattr(exp, attr, None)
                if val is not None:
                    setattr(exp, attr, sorted(int(c) for c in val))


_ARRAY_CACHE: dict = {}


def _cached_arrays(dataset: str, data_root):
    """The dataset's arrays, read once per process (a sweep builds many benchmarks of one dataset)."""
    key = (dataset, data_root)
    if key not in _ARRAY_CACHE:
        _ARRAY_CACHE.clear()
        _ARRAY_CACHE[key] = load_arrays(dataset, data_root)
    return _ARRAY_CACHE[key]


def make_benchmark(
    scenario: str,
    dataset: str = "digits",
    *,
    n_experiences: int = 5,
    seed: int = 0,
    validation: float = 0.0,
    data_root: str | os.PathLike | None = None,
    max_train_per_class: int | None = None,
    max_test_per_class: int | None = None,
) -> BenchmarkSpec:
    """Build an Avalanche 0.6 ``CLScenario`` for ``scenario`` on ``dataset``.

    See the module docstring for the scenario definitions. ``seed`` drives the
    permutations (experience 0 of ``"permuted"`` is the identity), the
    ``max_train_per_class`` subsample of the training set (applied first; the
    ``max_test_per_class`` subsample of the test set likewise) and the
    stratified ``validation`` hold-out (a fraction in [0, 1) of each class of the
    training set, applied to every experience consistently). The class split is
    fixed (natural class order), as is the digits 70/30 train/test split.

    The benchmark has ``train_stream`` and ``test_stream`` (plus ``valid_stream``
    if ``validation > 0``); experiences carry ``task_label``, ``task_labels``,
    ``classes_in_this_experience`` etc. (``with_task_labels`` and
    ``with_classes_timeline``).
    """
    from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
    from avalanche.benchmarks.scenarios.supervised import with_classes_timeline
    from avalanche.benchmarks.scenarios.task_aware import with_task_labels

    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; valid scenarios: {', '.join(SCENARIOS)}")
    ds_key = str(dataset).strip().lower().replace("_", "-")
    if ds_key == "fashionmnist":
        ds_key = "fashion-mnist"
    if ds_key not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; valid datasets: {', '.join(DATASETS)}")
    if isinstance(n_experiences, bool) or not isinstance(n_experiences, (int, np.integer)) or n_experiences < 1:
        raise ValueError(f"n_experiences must be a positive int, got {n_experiences!r}")
    n_experiences = int(n_experiences)
    n_classes = CLASSES_OF[ds_key]
    if scenario != "permuted" and (n_experiences > n_classes or n_classes % n_experiences):
        divisors = ", ".join(str(d) for d in range(1, n_classes + 1) if n_classes % d == 0)
        raise ValueError(
            f"{scenario}: n_experiences must divide the {n_classes} classes of {ds_key} "
            f"({divisors}), got {n_experiences}"
        )
    if not (0.0 <= float(validation) < 1.0):
        raise ValueError(f"validation must be a fraction in [0, 1), got {validation!r}")
    for name, v in (("max_train_per_class", max_train_per_class), ("max_test_per_class", max_test_per_class)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1):
            raise ValueError(f"{name} must be a positive int or None, got {v!r}")

    # ---- arrays
    (Xtr, ytr), (Xte, yte) = _cached_arrays(ds_key, None if data_root is None else str(data_root))

    rng = np.random.default_rng(seed)
    if max_train_per_class is not None:
        keep = _subsample_per_class(ytr, int(max_train_per_class), rng)
        Xtr, ytr = Xtr[keep], ytr[keep]
    if max_test_per_class is not None:
        # its own generator: the training subsample, split and permutations do not depend on it
        keep = _subsample_per_class(yte, int(max_test_per_class), np.random.default_rng([seed, 1]))
        Xte, yte = Xte[keep], yte[keep]
    splits = {"train": (Xtr, ytr), "test": (Xte, yte)}
    if validation > 0:
        tr, va = _stratified_holdout(ytr, float(validation), rng)
        splits = {"train": (Xtr[tr], ytr[tr]), "valid": (Xtr[va], ytr[va]), "test": (Xte, yte)}

    input_shape = tuple(int(s) for s in Xtr.shape[1:])

    # ---- experiences
    streams: dict[str, list] = {k: [] for k in splits}
    if scenario == "permuted":
        n_pix = int(np.prod(input_shape))
        perms = [np.arange(n_pix)] + [rng.permutation(n_pix) for _ in range(n_experiences - 1)]
        for i, perm in enumerate(perms):
            tf = None if i == 0 else _Permute(perm)
            for k, (Xs, ys) in splits.items():
                streams[k].append(_tensor_dataset(Xs, ys, 0, transform=tf))
        n_per_exp = n_classes
    else:
        n_per_exp = n_classes // n_experiences
        for i in range(n_experiences):
            classes = np.arange(i * n_per_exp, (i + 1) * n_per_exp)
            for k, (Xs, ys) in splits.items():
                m = np.isin(ys, classes)
                if not m.any():
                    raise ValueError(f"{k} split has no samples of classes {classes.tolist()}")
                if scenario == "split-task":
                    streams[k].append(_tensor_dataset(Xs[m], ys[m] - i * n_per_exp, i))
                else:
                    streams[k].append(_tensor_dataset(Xs[m], ys[m], 0))

    bm = benchmark_from_datasets(**streams)
    bm = with_task_labels(with_classes_timeline(bm))
    _classes_as_sorted_lists(bm)
    return BenchmarkSpec(
        benchmark=bm,
        input_shape=input_shape,
        n_classes_per_exp=n_per_exp,
        n_classes_total=n_classes,
        multi_head=scenario == "split-task",
        scenario=scenario,
        dataset=ds_key,
    )


# --------------------------------------------------------------------------- models


def _trunk(in_features: int, hidden: int, layers: int) -> nn.Sequential:
    mods: list[nn.Module] = [nn.Flatten()]
    d = in_features
    for _ in range(layers):
        mods += [nn.Linear(d, hidden), nn.ReLU()]
        d = hidden
    return nn.Sequential(*mods)


class MLP(nn.Module):
    """``features`` (Flatten, [Linear+ReLU] x layers) then a linear ``classifier``."""

    def __init__(self, input_shape: Sequence[int], n_classes: int, hidden: int = 100, layers: int = 2):
        super().__init__()
        self.features = _trunk(int(np.prod(input_shape)), hidden, layers)
        self.classifier = nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class _MultiHead(MultiTaskModule):
    """A shared trunk ``features`` (output width ``d``) plus an Avalanche
    ``MultiHeadClassifier`` (one head per task).

    ``forward_single_task(x, t)`` runs the trunk then head ``t``; ``forward`` runs
    the trunk once for the whole batch and lets the head route by task label.
    Heads for new tasks are created by Avalanche's model adaptation
    (``avalanche_model_adaptation(model, experience)``, done by strategies).
    """

    def __init__(self, features: nn.Module, d: int, n_classes_per_exp: int):
        super().__init__()
        self.features = features
        self.classifier = MultiHeadClassifier(d, initial_out_features=n_classes_per_exp)
        self.max_class_label = n_classes_per_exp

    def forward_single_task(self, x: torch.Tensor, task_label: int) -> torch.Tensor:
        return self.classifier.forward_single_task(self.features(x), int(task_label))

    def forward(self, x: torch.Tensor, task_labels) -> torch.Tensor:
        return self.classifier(self.features(x), task_labels)


class MultiHeadMLP(_MultiHead):
    """The MLP trunk of :func:`make_model` with one head per task (see :class:`_MultiHead`)."""

    def __init__(self, input_shape: Sequence[int], n_classes_per_exp: int, hidden: int = 100, layers: int = 2):
        super().__init__(_trunk(int(np.prod(input_shape)), hidden, layers), hidden, n_classes_per_exp)


def _conv_trunk(in_channels: int, image_hw, hidden: int) -> tuple[nn.Sequential, int]:
    """4 conv layers (32, 32, 64, 64 channels, 3x3, ReLU; 2x2 max-pool after the 2nd and 4th),
    then Flatten and one Linear(hidden)+ReLU: the small CIFAR net of the EWC / SI literature."""
    h, w = (int(v) for v in image_hw)
    mods: list[nn.Module] = []
    c = in_channels
    for k, out in enumerate((32, 32, 64, 64)):
        mods += [nn.Conv2d(c, out, 3, padding=1), nn.ReLU()]
        c = out
        if k % 2 == 1:
            mods.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
    if h < 1 or w < 1:
        raise ValueError(f"the conv net needs images of at least 4x4 pixels, got {tuple(image_hw)}")
    mods += [nn.Flatten(), nn.Linear(c * h * w, hidden), nn.ReLU()]
    return nn.Sequential(*mods), hidden


class CNN(nn.Module):
    """:func:`_conv_trunk` features then a linear ``classifier`` (one shared head)."""

    def __init__(self, input_shape: Sequence[int], n_classes: int, hidden: int = 256):
        super().__init__()
        self.features, d = _conv_trunk(int(input_shape[0]), input_shape[1:], hidden)
        self.classifier = nn.Linear(d, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class MultiHeadCNN(_MultiHead):
    """The conv trunk of :class:`CNN` with one head per task (task-incremental; see :class:`_MultiHead`)."""

    def __init__(self, input_shape: Sequence[int], n_classes_per_exp: int, hidden: int = 256):
        super().__init__(*_conv_trunk(int(input_shape[0]), input_shape[1:], hidden), n_classes_per_exp)


def make_model(spec: BenchmarkSpec, hidden: int = 100, layers: int = 2, kind: str = "mlp") -> nn.Module:
    """MLP for ``spec``: Flatten, ``layers`` x (Linear(hidden)+ReLU), then the head.

    ``spec.multi_head`` (split-task): :class:`MultiHeadMLP` with a
    ``MultiHeadClassifier(hidden, initial_out_features=spec.n_classes_per_exp)``;
    otherwise :class:`MLP` with a single ``nn.Linear(hidden, spec.n_classes_total)``.
    Both work with ``avalanche.models.avalanche_forward(model, x, t)``.

    The defaults (2 x 100) suit the 8x8 digits; the usual literature setup for
    (permuted / split) MNIST and Fashion-MNIST is 2 x 400: pass ``hidden=400``.

    ``kind="cnn"``: :class:`CNN` / :class:`MultiHeadCNN` (4 conv layers, then one hidden
    layer of ``hidden`` units; ``layers`` is not used), for CIFAR-sized images.
    """
    if kind not in ("mlp", "cnn"):
        raise ValueError(f"kind must be 'mlp' or 'cnn', got {kind!r}")
    if int(hidden) < 1:
        raise ValueError(f"hidden must be >= 1, got {hidden!r}")
    if kind == "cnn":
        if len(spec.input_shape) != 3:
            raise ValueError(f"the conv net needs [C, H, W] inputs, got {spec.input_shape}")
        if spec.multi_head:
            return MultiHeadCNN(spec.input_shape, spec.n_classes_per_exp, int(hidden))
        return CNN(spec.input_shape, spec.n_classes_total, int(hidden))
    if int(layers) < 1:
        raise ValueError(f"layers must be >= 1, got {layers!r}")
    if int(hidden) < 1:
        raise ValueError(f"hidden must be >= 1, got {hidden!r}")
    if spec.multi_head:
        return MultiHeadMLP(spec.input_shape, spec.n_classes_per_exp, int(hidden), int(layers))
    return MLP(spec.input_shape, spec.n_classes_total, int(hidden), int(layers))
