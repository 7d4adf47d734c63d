"""Tests for pcreg_experiments.data: digits / IDX loading, benchmarks, models."""

from __future__ import annotations

import gzip
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from pcreg_experiments.data import (
    SCENARIOS,
    BenchmarkSpec,
    load_digits_arrays,
    load_idx_dataset,
    make_benchmark,
    make_model,
    read_idx,
)

# the checkout: subprocesses run there to import the harness (pytest's pythonpath is not inherited)
ROOT = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------- helpers

_CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C,
          np.float32: 0x0D, np.float64: 0x0E}


def idx_bytes(arr: np.ndarray) -> bytes:
    arr = np.asarray(arr)
    code = _CODES[arr.dtype.type]
    header = bytes([0, 0, code, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write_idx(path, arr: np.ndarray, gz: bool = False):
    data = idx_bytes(arr)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def tiny_mnist(root, n_train=40, n_test=20, gz=True, seed=0):
    """Write the 4 standard IDX files with tiny random content; labels cycle 0..9."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    sfx = ".gz" if gz else ""
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        imgs = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx(root / f"{split}-images-idx3-ubyte{sfx}", imgs, gz)
        write_idx(root / f"{split}-labels-idx1-ubyte{sfx}", labels, gz)
        arrays[split] = (imgs, labels)
    return arrays


def all_items(ds):
    xs, ys, ts = zip(*(ds[i] for i in range(len(ds))))
    return torch.stack(xs), torch.tensor(ys), torch.tensor(ts)


def rows(x: torch.Tensor) -> set:
    return {tuple(r) for r in x.reshape(len(x), -1).numpy().round(6).tolist()}


@pytest.fixture(scope="module")
def digits():
    return load_digits_arrays()


@pytest.fixture(scope="module")
def specs():
    return {sc: make_benchmark(sc, "digits", n_experiences=5, seed=0) for sc in SCENARIOS}


# --------------------------------------------------------------------------- digits


def test_load_digits_arrays(digits):
    X, y = digits
    assert X.shape == (1797, 1, 8, 8) and X.dtype == np.float32
    assert y.shape == (1797,) and y.dtype == np.int64
    assert X.min() == 0.0 and X.max() == 1.0
    assert sorted(np.unique(y).tolist()) == list(range(10))
    # exactly sklearn's data / 16
    from sklearn.datasets import load_digits
    np.testing.assert_allclose(X.reshape(1797, 64), load_digits().data / 16.0, rtol=0, atol=1e-7)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_spec_fields_and_items(specs, scenario):
    spec = specs[scenario]
    assert isinstance(spec, BenchmarkSpec)
    assert spec.scenario == scenario and spec.dataset == "digits"
    assert spec.input_shape == (1, 8, 8)
    assert spec.n_classes_total == 10
    assert spec.multi_head == (scenario == "split-task")
    assert spec.n_classes_per_exp == (10 if scenario == "permuted" else 2)
    bm = spec.benchmark
    assert len(bm.train_stream) == 5 and len(bm.test_stream) == 5
    assert not hasattr(bm, "valid_stream")
    for i, exp in enumerate(bm.train_stream):
        assert exp.current_experience == i
        x, y, t = exp.dataset[0]
        assert isinstance(x, torch.Tensor) and x.dtype == torch.float32
        assert tuple(x.shape) == (1, 8, 8)
        assert isinstance(y, int) and isinstance(t, int)
        xb, yb, tb = next(iter(torch.utils.data.DataLoader(exp.dataset, batch_size=8)))
        assert yb.dtype == torch.int64 and tb.dtype == torch.int64
        assert 0.0 <= float(xb.min()) and float(xb.max()) <= 1.0


def test_train_test_sizes_digits(specs):
    bm = specs["split-class"].benchmark
    n_tr = sum(len(e.dataset) for e in bm.train_stream)
    n_te = sum(len(e.dataset) for e in bm.test_stream)
    assert n_tr + n_te == 1797
    assert n_te == pytest.approx(0.3 * 1797, abs=2)
    # train and test are disjoint (digits images are all distinct)
    tr = set().union(*(rows(all_items(e.dataset)[0]) for e in bm.train_stream))
    te = set().union(*(rows(all_items(e.dataset)[0]) for e in bm.test_stream))
    assert len(tr) == n_tr and not (tr & te)


def test_split_class_labels(specs):
    bm = specs["split-class"].benchmark
    for stream in (bm.train_stream, bm.test_stream):
        for i, exp in enumerate(stream):
            _, y, t = all_items(exp.dataset)
            assert sorted(set(y.tolist())) == [2 * i, 2 * i + 1]
            assert set(t.tolist()) == {0}
            assert exp.task_label == 0
            assert list(exp.classes_in_this_experience) == [2 * i, 2 * i + 1]


def test_split_task_labels(specs, digits):
    bm = specs["split-task"].benchmark
    X, y_all = digits
    lookup = {r: int(c) for r, c in zip(map(tuple, X.reshape(len(X), -1).round(6).tolist()), y_all)}
    for stream in (bm.train_stream, bm.test_stream):
        for i, exp in enumerate(stream):
            x, y, t = all_items(exp.dataset)
            assert set(t.tolist()) == {i}
            assert exp.task_label == i and list(exp.task_labels) == [i]
            # local targets 0/1 that map back to the original classes 2i / 2i+1
            assert sorted(set(y.tolist())) == [0, 1]
            orig = [lookup[r] for r in map(tuple, x.reshape(len(x), -1).numpy().round(6).tolist())]
            assert orig == (y + 2 * i).tolist()


def test_permuted(specs, digits):
    spec = specs["permuted"]
    bm = spec.benchmark
    datasets = [e.dataset for e in bm.train_stream]
    assert all(len(d) == len(datasets[0]) for d in datasets)
    x0, y0, t0 = all_items(datasets[0])
    assert set(t0.tolist()) == {0}
    assert sorted(set(y0.tolist())) == list(range(10))
    # experience 0 is the identity: its images are original digits images
    X, _ = digits
    assert rows(x0) <= rows(torch.from_numpy(X))
    xt0 = all_items(bm.test_stream[0].dataset)[0]
    both0 = torch.cat([x0, xt0]).reshape(-1, 64)
    perms = []
    for exp, texp in zip(list(bm.train_stream)[1:], list(bm.test_stream)[1:]):
        x, y, t = all_items(exp.dataset)
        assert set(t.tolist()) == {0} and exp.task_label == 0
        assert torch.equal(y, y0)
        # same multiset of pixel values per image, different positions
        a, b = x0[5].flatten(), x[5].flatten()
        assert torch.equal(torch.sort(a).values, torch.sort(b).values)
        assert not torch.equal(a, b)
        # one fixed permutation for every image of train AND test: recover it
        both = torch.cat([x, all_items(texp.dataset)[0]]).reshape(-1, 64)
        perm = [int(np.flatnonzero((both0 == both[:, [j]]).all(0))[0]) for j in range(64)]
        assert torch.equal(both0[:, perm], both)
        perms.append(tuple(perm))
    assert len(set(perms)) == len(perms) == 4
    # permutation survives the eval transform group
    d1 = bm.train_stream[1].dataset
    assert torch.equal(d1.eval()[5][0], d1.train()[5][0])
    assert not torch.equal(d1.eval()[5][0], datasets[0].eval()[5][0])


def test_validation_stream(digits):
    spec = make_benchmark("split-class", "digits", seed=3, validation=0.2)
    plain = make_benchmark("split-class", "digits", seed=3)
    bm = spec.benchmark
    assert len(bm.valid_stream) == 5
    for i in range(5):
        xtr, ytr, _ = all_items(bm.train_stream[i].dataset)
        xva, yva, tva = all_items(bm.valid_stream[i].dataset)
        xte, _, _ = all_items(bm.test_stream[i].dataset)
        xfull, _, _ = all_items(plain.benchmark.train_stream[i].dataset)
        r_tr, r_va, r_te, r_full = rows(xtr), rows(xva), rows(xte), rows(xfull)
        assert not (r_tr & r_va)                  # disjoint from train
        assert not (r_va & r_te)                  # never test data
        assert r_tr | r_va == r_full              # drawn from the training data
        # test stream unchanged by validation
        assert r_te == rows(all_items(plain.benchmark.test_stream[i].dataset)[0])
        # stratified: ~20 % of each class
        assert sorted(set(yva.tolist())) == [2 * i, 2 * i + 1]
        c_tr, c_va = Counter(ytr.tolist()), Counter(yva.tolist())
        for c in c_va:
            assert c_va[c] == round(0.2 * (c_va[c] + c_tr[c]))
        assert bm.valid_stream[i].current_experience == i


def test_validation_permuted_and_task_labels():
    bm = make_benchmark("split-task", "digits", validation=0.25).benchmark
    assert [e.task_label for e in bm.valid_stream] == list(range(5))
    bm = make_benchmark("permuted", "digits", n_experiences=3, validation=0.25).benchmark
    x0 = all_items(bm.valid_stream[0].dataset)[0].reshape(-1, 64)
    x2 = all_items(bm.valid_stream[2].dataset)[0].reshape(-1, 64)
    assert len(x0) == len(x2) > 0
    assert torch.equal(torch.sort(x0, 1).values, torch.sort(x2, 1).values)
    assert not torch.equal(x0, x2)


def test_determinism():
    def dump(spec):
        out = []
        for name in ("train", "valid", "test"):
            for e in spec.benchmark.streams[name]:
                out.append(all_items(e.dataset))
        return out

    a = dump(make_benchmark("permuted", "digits", n_experiences=3, seed=7, validation=0.1))
    b = dump(make_benchmark("permuted", "digits", n_experiences=3, seed=7, validation=0.1))
    c = dump(make_benchmark("permuted", "digits", n_experiences=3, seed=8, validation=0.1))
    assert all(torch.equal(p, q) for ta, tb in zip(a, b) for p, q in zip(ta, tb))
    # a different seed changes the permutations (experience 1 train)
    assert not torch.equal(a[1][0], c[1][0])
    # identity experience 0 but a different validation split
    assert not torch.equal(a[3][0], c[3][0])


def test_max_train_per_class():
    spec = make_benchmark("split-class", "digits", max_train_per_class=7, validation=0.3)
    bm = spec.benchmark
    for i in range(5):
        ytr = all_items(bm.train_stream[i].dataset)[1].tolist()
        yva = all_items(bm.valid_stream[i].dataset)[1].tolist()
        assert Counter(ytr + yva) == {2 * i: 7, 2 * i + 1: 7}
        assert Counter(yva) == {2 * i: 2, 2 * i + 1: 2}


@pytest.mark.parametrize("n", [1, 2, 10])
def test_other_experience_counts(n):
    spec = make_benchmark("split-task", "digits", n_experiences=n)
    assert len(spec.benchmark.train_stream) == n
    assert spec.n_classes_per_exp == 10 // n


def test_benchmark_errors(tmp_path):
    with pytest.raises(ValueError, match="split-task.*split-class.*permuted"):
        make_benchmark("nope")
    with pytest.raises(ValueError, match="digits.*mnist.*fashion-mnist"):
        make_benchmark("permuted", "cifar")
    with pytest.raises(ValueError, match="divide"):
        make_benchmark("split-task", n_experiences=3)
    with pytest.raises(ValueError, match="divide"):
        make_benchmark("split-class", n_experiences=20)
    with pytest.raises(ValueError, match="data_root"):
        make_benchmark("split-class", "mnist")
    with pytest.raises(ValueError, match="validation"):
        make_benchmark("split-class", validation=1.0)
    with pytest.raises(FileNotFoundError, match="missing"):
        make_benchmark("split-class", "fashion-mnist", data_root=tmp_path / "missing")
    # permuted allows any positive count
    assert len(make_benchmark("permuted", n_experiences=3).benchmark.train_stream) == 3


# --------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_read_idx_roundtrip(tmp_path, gz, dtype):
    rng = np.random.default_rng(1)
    arr = (rng.standard_normal((20, 28, 28)) * 100).astype(dtype)
    p = write_idx(tmp_path / "x.idx", arr, gz=gz)  # no .gz suffix: detected by magic
    out = read_idx(p)
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative
    assert out.shape == (20, 28, 28)
    np.testing.assert_array_equal(out, arr)
    out1 = read_idx(write_idx(tmp_path / "l.gz", arr[:, 0, 0], gz=gz))
    np.testing.assert_array_equal(out1, arr[:, 0, 0])


def test_read_idx_errors(tmp_path):
    good = idx_bytes(np.arange(20, dtype=np.uint8).reshape(4, 5))
    cases = {
        "badmagic": (b"\x08\x03" + good[2:], r"bad magic number 0x0803"),
        "badcode": (good[:2] + b"\x07" + good[3:], r"bad magic number 0x00000702"),
        "trunc": (good[:-3], r"truncated: expected 20 bytes of data, found 17"),
        "trail": (good + b"\x00\x01", r"trailing bytes"),
        "trunchead": (good[:9], r"truncated"),
        "tiny": (b"\x00\x00", r"truncated"),
    }
    for name, (data, msg) in cases.items():
        for gz in (False, True):
            p = tmp_path / f"{name}{'.gz' if gz else ''}"
            p.write_bytes(gzip.compress(data) if gz else data)
            with pytest.raises(ValueError, match=msg) as ei:
                read_idx(p)
            assert str(p) in str(ei.value)
    p = tmp_path / "corrupt.gz"
    p.write_bytes(b"\x1f\x8b" + b"garbage")
    with pytest.raises(ValueError, match="corrupt.gz"):
        read_idx(p)
    with pytest.raises(FileNotFoundError, match="nothere"):
        read_idx(tmp_path / "nothere")


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("sub", ["", "mnist", "mnist/raw", "raw"])
def test_load_idx_dataset(tmp_path, gz, sub):
    arrays = tiny_mnist(tmp_path / sub if sub else tmp_path, gz=gz)
    (Xtr, ytr), (Xte, yte) = load_idx_dataset(tmp_path, "mnist")
    assert Xtr.shape == (40, 1, 28, 28) and Xte.shape == (20, 1, 28, 28)
    assert Xtr.dtype == np.float32 and ytr.dtype == np.int64
    np.testing.assert_allclose(Xtr[:, 0], arrays["train"][0] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(yte, arrays["t10k"][1])
    assert 0.0 <= Xtr.min() and Xtr.max() <= 1.0


def test_load_idx_dataset_errors(tmp_path):
    with pytest.raises(ValueError, match="mnist.*fashion-mnist"):
        load_idx_dataset(tmp_path, "kmnist")
    with pytest.raises(FileNotFoundError, match="nodir"):
        load_idx_dataset(tmp_path / "nodir")
    root = tmp_path / "fm"
    tiny_mnist(root / "fashion-mnist" / "raw", gz=False)
    assert load_idx_dataset(root, "fashion-mnist")[0][0].shape == (40, 1, 28, 28)
    (root / "fashion-mnist" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError) as ei:
        load_idx_dataset(root, "fashion-mnist")
    msg = str(ei.value)
    assert "t10k-labels-idx1-ubyte.gz" in msg and str(root / "fashion-mnist" / "raw") in msg
    # count mismatch
    root2 = tmp_path / "mm"
    tiny_mnist(root2)
    write_idx(root2 / "train-labels-idx1-ubyte.gz", np.zeros(39, np.uint8), gz=True)
    with pytest.raises(ValueError, match="40 images.*39 labels") as ei:
        load_idx_dataset(root2)
    assert str(root2 / "train-labels-idx1-ubyte.gz") in str(ei.value)


def test_make_benchmark_mnist_tiny(tmp_path):
    tiny_mnist(tmp_path, n_train=60, n_test=20)  # 6 train samples per class
    spec = make_benchmark("split-class", "mnist", data_root=tmp_path, validation=0.34)
    assert spec.input_shape == (1, 28, 28) and spec.dataset == "mnist"
    bm = spec.benchmark
    for i in range(5):
        x, y, t = all_items(bm.train_stream[i].dataset)
        assert x.shape[1:] == (1, 28, 28)
        assert Counter(y.tolist()) == {2 * i: 4, 2 * i + 1: 4}
        assert Counter(all_items(bm.valid_stream[i].dataset)[1].tolist()) == {2 * i: 2, 2 * i + 1: 2}
        assert len(bm.test_stream[i].dataset) == 4
    spec = make_benchmark("permuted", "mnist", data_root=tmp_path, n_experiences=2)
    x0 = all_items(spec.benchmark.train_stream[0].dataset)[0]
    x1 = all_items(spec.benchmark.train_stream[1].dataset)[0]
    assert torch.equal(torch.sort(x0.flatten(1), 1).values, torch.sort(x1.flatten(1), 1).values)


def idx_like(root, mean: float, n_train=1000, n_test=10, seed=0, gz=False):
    """The 4 IDX files with 28x28 training images of mean intensity ``mean`` (pixels 0 or 255,
    each 255 with probability ``mean``): MNIST's 0.1307, Fashion-MNIST's 0.2860, or another."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    sfx = ".gz" if gz else ""
    for split, n in (("train", n_train), ("t10k", n_test)):
        imgs = np.where(rng.random((n, 28, 28)) < mean, 255, 0).astype(np.uint8)
        write_idx(root / f"{split}-images-idx3-ubyte{sfx}", imgs, gz)
        write_idx(root / f"{split}-labels-idx1-ubyte{sfx}", (np.arange(n) % 10).astype(np.uint8), gz)
    return root


def test_mnist_and_fashion_mnist_files_are_told_apart_by_content(tmp_path):
    mnist = idx_like(tmp_path / "m", 0.1307)
    fashion = idx_like(tmp_path / "f" / "FashionMNIST" / "raw", 0.2860, gz=True).parents[1]
    assert load_idx_dataset(mnist, "mnist")[0][0].shape == (1000, 1, 28, 28)
    assert load_idx_dataset(fashion, "fashion-mnist")[0][0].shape == (1000, 1, 28, 28)
    # the same files under the other name: an error naming both datasets, their means and the fix
    with pytest.raises(ValueError) as ei:
        load_idx_dataset(mnist, "fashion-mnist")
    msg = str(ei.value)
    assert "look like MNIST images, not Fashion-MNIST" in msg and "0.1307" in msg and "0.2860" in msg
    assert "--dataset mnist" in msg and str(mnist / "train-images-idx3-ubyte") in msg
    (fashion / "mnist").mkdir()  # where "mnist" is looked for (root/FashionMNIST/raw is not)
    for f in (fashion / "FashionMNIST" / "raw").iterdir():
        (fashion / "mnist" / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ValueError, match=r"look like Fashion-MNIST images, not MNIST.*--dataset fashion-mnist"):
        load_idx_dataset(fashion, "mnist")
    with pytest.raises(ValueError, match="look like Fashion-MNIST images"):
        make_benchmark("permuted", "mnist", data_root=fashion, n_experiences=2)
    # the check can be skipped
    assert load_idx_dataset(fashion, "mnist", check_content=False)[0][0].shape == (1000, 1, 28, 28)


@pytest.mark.parametrize("mean", [0.0, 0.05, 0.2, 0.5, 0.9])
def test_other_idx_statistics_load_under_either_name(tmp_path, mean):
    root = idx_like(tmp_path, mean)
    for name in ("mnist", "fashion-mnist"):
        assert load_idx_dataset(root, name)[0][0].shape == (1000, 1, 28, 28)


def test_few_or_other_sized_images_are_not_checked(tmp_path):
    from pcreg_experiments.files import idx_mismatch

    fashion_like = np.where(np.random.default_rng(0).random((1000, 28, 28)) < 0.286, 255, 0).astype(np.uint8)
    assert idx_mismatch("mnist", fashion_like) is not None and idx_mismatch("fashion-mnist", fashion_like) is None
    assert idx_mismatch("mnist", fashion_like[:999]) is None  # fewer than 1000 training images
    assert idx_mismatch("mnist", fashion_like[:, :27, :27]) is None  # not 28x28
    root = idx_like(tmp_path, 0.2860, n_train=40)
    assert load_idx_dataset(root, "mnist")[0][0].shape == (40, 1, 28, 28)


def test_check_dataset_files_names_what_is_missing(tmp_path):
    from pcreg_experiments.files import check_dataset_files

    assert check_dataset_files("digits", tmp_path) == {}
    with pytest.raises(FileNotFoundError, match="nodir"):
        check_dataset_files("mnist", tmp_path / "nodir")
    with pytest.raises(FileNotFoundError) as ei:
        check_dataset_files("mnist", tmp_path)
    msg = str(ei.value)
    assert all(f"{stem}[.gz]" in msg for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                                   "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"))
    assert str(tmp_path / "MNIST" / "raw") in msg
    tiny_mnist(tmp_path / "mnist" / "raw")
    (tmp_path / "mnist" / "raw" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError) as ei:
        check_dataset_files("mnist", tmp_path)
    assert "t10k-labels-idx1-ubyte[.gz]" in str(ei.value) and "train-images" not in str(ei.value)
    tiny_mnist(tmp_path / "mnist" / "raw")
    found = check_dataset_files("mnist", tmp_path)
    assert found["train-images-idx3-ubyte"] == tmp_path / "mnist" / "raw" / "train-images-idx3-ubyte.gz"
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py/ \(not found\) or .*: data_batch_1, .*, test_batch"):
        check_dataset_files("cifar10", tmp_path)
    (tmp_path / "cifar-100-python").mkdir()
    (tmp_path / "cifar-100-python" / "train").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"cifar100: python-pickle batch files missing from .*cifar-100-python: test \("):
        check_dataset_files("cifar100", tmp_path)


def test_cli_checks_the_data_files_before_importing_torch(tmp_path):
    """An existing --data-root without the dataset's files is an error before torch is imported."""
    import subprocess
    import sys

    tiny_mnist(tmp_path / "data", gz=False)
    (tmp_path / "data" / "train-labels-idx1-ubyte").unlink()
    script = (
        "import sys\n"
        "from pcreg_experiments import compare\n"
        "try:\n"
        "    compare.parse_args(sys.argv[1:])\n"
        "except SystemExit as e:\n"
        "    print('exit', e.code, 'torch' in sys.modules, 'avalanche' in sys.modules)\n"
    )
    (tmp_path / "empty").mkdir()
    for dataset, root, missing in (("mnist", "data", "train-labels-idx1-ubyte[.gz]"),
                                   ("fashion-mnist", "empty", "train-images-idx3-ubyte[.gz]"),
                                   ("cifar10", "data", "data_batch_1")):
        r = subprocess.run([sys.executable, "-c", script, "--dataset", dataset, "--data-root", str(tmp_path / root),
                            "--out", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.stdout.strip() == "exit 2 False False", (dataset, r.stdout, r.stderr)
        assert "--data-root:" in r.stderr and missing in r.stderr, r.stderr


def test_cli_rejects_fashion_mnist_files_given_as_mnist(tmp_path, capsys):
    from pcreg_experiments import compare

    root = idx_like(tmp_path / "data", 0.2860)
    with pytest.raises(SystemExit) as e:
        compare.parse_args(["--dataset", "mnist", "--data-root", str(root), "--out", str(tmp_path / "out")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--data-root:" in err and "look like Fashion-MNIST images, not MNIST" in err
    assert compare.parse_args(["--dataset", "fashion-mnist", "--data-root", str(root),
                               "--out", str(tmp_path / "out")]).dataset == "fashion-mnist"


# --------------------------------------------------------------------------- models


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_make_model_forward(specs, scenario):
    from avalanche.models import MultiTaskModule, avalanche_forward
    from avalanche.models.dynamic_modules import avalanche_model_adaptation

    spec = specs[scenario]
    torch.manual_seed(0)
    model = make_model(spec, hidden=16, layers=3)
    assert sum(isinstance(m, torch.nn.Linear) for m in model.modules()) == 4
    assert isinstance(model, MultiTaskModule) == spec.multi_head
    for i, exp in enumerate(spec.benchmark.train_stream):
        avalanche_model_adaptation(model, exp)
        x, y, t = next(iter(torch.utils.data.DataLoader(exp.dataset, batch_size=6)))
        out = avalanche_forward(model, x, t)
        assert out.shape == (6, spec.n_classes_per_exp if spec.multi_head else 10)
        assert torch.isfinite(out).all() and (out.abs() < 100).all()  # nothing masked
        if spec.multi_head:
            assert sorted(model.classifier.classifiers.keys()) == [str(k) for k in range(i + 1)]
            torch.testing.assert_close(out, model.forward_single_task(x, i))
    if spec.multi_head:
        heads = [model.classifier.classifiers[str(k)] for k in range(5)]
        assert len({id(h) for h in heads}) == 5
        # different heads -> different outputs for the same input
        x = torch.rand(3, 1, 8, 8)
        assert not torch.allclose(model.forward_single_task(x, 0), model.forward_single_task(x, 1))
        # a mixed-task batch is routed per sample
        tm = torch.tensor([0, 3, 0])
        out = avalanche_forward(model, x, tm)
        torch.testing.assert_close(out[1], model.forward_single_task(x[1:2], 3)[0])


def test_make_model_sizes(specs):
    m = make_model(specs["split-class"])
    shapes = [tuple(p.shape) for p in m.parameters()]
    assert shapes == [(100, 64), (100,), (100, 100), (100,), (10, 100), (10,)]
    m = make_model(specs["split-task"], hidden=400)
    assert model_first_linear(m).out_features == 400
    with pytest.raises(ValueError):
        make_model(specs["permuted"], layers=0)


def model_first_linear(m):
    return next(mod for mod in m.modules() if isinstance(mod, torch.nn.Linear))


def test_naive_strategy_end_to_end(specs):
    """One tiny epoch of Avalanche's Naive strategy on each scenario (train + eval)."""
    from avalanche.training.supervised import Naive

    for scenario in SCENARIOS:
        spec = make_benchmark(scenario, "digits", n_experiences=2, max_train_per_class=10)
        torch.manual_seed(0)
        model = make_model(spec, hidden=8)
        strat = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                      train_mb_size=32,
                      train_epochs=1, eval_mb_size=64, device="cpu")
        for exp in spec.benchmark.train_stream:
            strat.train(exp)
        res = strat.eval(spec.benchmark.test_stream)
        assert isinstance(res, dict)
        if spec.multi_head:
            assert sorted(model.classifier.classifiers.keys()) == ["0", "1"]


# --------------------------------------------------------------------------- CIFAR (python-pickle batches)


def tiny_cifar(root, name="cifar10", per_class_train=3, per_class_test=1, seed=0):
    """Write the standard pickle files (cifar-10-batches-py / cifar-100-python) with tiny content.
    Returns {split: (uint8 [N, 3072], labels)}; CIFAR-10's training set is spread over 5 batches."""
    import pickle

    rng = np.random.default_rng(seed)
    n_classes = 10 if name == "cifar10" else 100
    out = {}
    for split, k in (("train", per_class_train), ("test", per_class_test)):
        labels = np.tile(np.arange(n_classes), k)
        data = rng.integers(0, 256, size=(labels.size, 3072), dtype=np.uint8)
        out[split] = (data, labels)
    if name == "cifar10":
        d = root / "cifar-10-batches-py"
        d.mkdir(parents=True, exist_ok=True)
        parts = np.array_split(np.arange(out["train"][1].size), 5)
        for i, idx in enumerate(parts, 1):
            with open(d / f"data_batch_{i}", "wb") as f:
                pickle.dump({b"data": out["train"][0][idx], b"labels": out["train"][1][idx].tolist()}, f)
        with open(d / "test_batch", "wb") as f:
            pickle.dump({b"data": out["test"][0], b"labels": out["test"][1].tolist()}, f)
    else:
        d = root / "cifar-100-python"
        d.mkdir(parents=True, exist_ok=True)
        for split in ("train", "test"):
            with open(d / split, "wb") as f:
                pickle.dump({b"data": out[split][0], b"fine_labels": out[split][1].tolist(),
                             b"coarse_labels": (out[split][1] // 5).tolist()}, f)
    return out


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_load_cifar_dataset(tmp_path, name):
    from pcreg_experiments.data import load_cifar_dataset

    raw = tiny_cifar(tmp_path, name)
    (Xtr, ytr), (Xte, yte) = load_cifar_dataset(tmp_path, name)
    n = 10 if name == "cifar10" else 100
    assert Xtr.shape == (3 * n, 3, 32, 32) and Xte.shape == (n, 3, 32, 32) and Xtr.dtype == np.float32
    # the batches in order, channel-major rows of 1024 pixels (R, G, B), scaled to [0, 1]
    np.testing.assert_allclose(Xtr.reshape(len(Xtr), -1), raw["train"][0] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(ytr, raw["train"][1])
    np.testing.assert_array_equal(yte, raw["test"][1])
    assert Xtr[5, 1, 0, 0] == np.float32(raw["train"][0][5, 1024] / 255.0)


def test_load_cifar_dataset_errors(tmp_path):
    from pcreg_experiments.data import load_cifar_dataset

    with pytest.raises(ValueError, match="cifar10, cifar100"):
        load_cifar_dataset(tmp_path, "cifar5")
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        load_cifar_dataset(tmp_path, "cifar10")
    tiny_cifar(tmp_path, "cifar10")
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:100])
    with pytest.raises(ValueError, match="data_batch_3: not a readable CIFAR python-pickle batch"):
        load_cifar_dataset(tmp_path, "cifar10")
    import pickle

    with open(batch, "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, f)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 9\]"):
        load_cifar_dataset(tmp_path, "cifar10")
    with open(batch, "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(ValueError, match=r"shape \[N, 3072\]"):
        load_cifar_dataset(tmp_path, "cifar10")


def test_cifar100_split_task_with_the_conv_net(tmp_path):
    from avalanche.models import avalanche_forward

    from pcreg_experiments.data import CNN, MultiHeadCNN

    tiny_cifar(tmp_path, "cifar100")
    spec = make_benchmark("split-task", "cifar100", data_root=tmp_path, n_experiences=10, validation=0.34)
    assert spec.n_classes_per_exp == 10 and spec.n_classes_total == 100 and spec.input_shape == (3, 32, 32)
    bm = spec.benchmark
    assert len(bm.train_stream) == 10
    x, y, t = all_items(bm.train_stream[3].dataset)
    assert sorted(set(y.tolist())) == list(range(10)) and set(t.tolist()) == {3} and len(y) == 20
    model = make_model(spec, hidden=32, kind="cnn")
    assert isinstance(model, MultiHeadCNN)
    from avalanche.models.utils import avalanche_model_adaptation

    avalanche_model_adaptation(model, bm.train_stream[3])
    assert avalanche_forward(model, x, t).shape == (20, 10)
    with pytest.raises(ValueError, match="divide the 100 classes of cifar100"):
        make_benchmark("split-class", "cifar100", data_root=tmp_path, n_experiences=3)
    spec10 = make_benchmark("split-class", "cifar10", data_root=tiny_cifar(tmp_path, "cifar10") and tmp_path)
    m = make_model(spec10, hidden=16, kind="cnn")
    assert isinstance(m, CNN) and m(torch.zeros(4, 3, 32, 32)).shape == (4, 10)
    # 4 conv layers, then one hidden layer
    convs = [mod for mod in m.modules() if isinstance(mod, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 32, 64, 64]
    with pytest.raises(ValueError, match="kind must be 'mlp' or 'cnn'"):
        make_model(spec10, kind="resnet")


def test_max_test_per_class(tmp_path):
    spec = make_benchmark("split-class", "digits", max_test_per_class=7, max_train_per_class=9, validation=0.2)
    for i, exp in enumerate(spec.benchmark.test_stream):
        assert Counter(all_items(exp.dataset)[1].tolist()) == {2 * i: 7, 2 * i + 1: 7}
    # the training side does not depend on the test subsample
    a = make_benchmark("split-class", "digits", max_train_per_class=9, validation=0.2)
    np.testing.assert_array_equal(all_items(a.benchmark.train_stream[0].dataset)[0],
                                  all_items(spec.benchmark.train_stream[0].dataset)[0])
    with pytest.raises(ValueError, match="max_test_per_class must be a positive int"):
        make_benchmark("split-class", "digits", max_test_per_class=0)


def test_download_uses_torchvision_only_when_asked(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    from pcreg_experiments import data

    calls = []

    class Fake:
        def __init__(self, root, train, download):
            calls.append((root, train, download))

    monkeypatch.setattr(tvd, "CIFAR10", Fake)
    monkeypatch.setattr(tvd, "FashionMNIST", Fake)
    data.download_dataset("cifar10", tmp_path / "d")
    assert calls == [(str(tmp_path / "d"), True, True), (str(tmp_path / "d"), False, True)]
    calls.clear()
    # loading never downloads: a missing file is an error naming it
    with pytest.raises(FileNotFoundError):
        data.load_arrays("fashion-mnist", tmp_path)
    assert calls == []
    data.download_dataset("digits", tmp_path)
    assert calls == []
