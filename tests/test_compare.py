"""The comparison runner and its CLI (avalanche_pcreg.experiments.runner / avalanche_pcreg.experiments).

Tiny configurations only (digits subsampled to 20 images a class, 1 epoch). The figures a run reports
are checked against each other and against brute-force recomputations: Avalanche's stream accuracy
against the accuracy matrix (its per-experience metric) weighted by experience sizes, Avalanche's
forgetting against the matrix's diagonal minus last row, the factor choice against a loop over the
sweep, the summary against ``statistics``.
"""

from __future__ import annotations

import csv
import gzip
import json
import math
import statistics
import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings as hsettings, strategies as st

from avalanche_pcreg.experiments import compare, runner
from avalanche_pcreg.experiments.data import make_benchmark
from avalanche_pcreg.experiments.runner import METHODS, RESULT_COLUMNS, RunSpec, Settings

TINY = Settings(epochs=1, max_train_per_class=20)
GRIDS = {"avl-ewc": [10.0, 1000.0], "pc-ewc": [1.0, 100.0]}
METHOD_SET = ["naive", "avl-ewc", "pc-ewc", "joint"]
SEEDS = [0, 1]


@pytest.fixture(scope="module")
def tiny_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp")
    res = runner.run_comparison(["split-task"], METHOD_SET, SEEDS, TINY, grids=GRIDS, workers=1,
                                progress=False, out=out, plots=True)
    return res, out


def _test_sizes(scenario, seed):
    spec = make_benchmark(scenario, seed=seed, validation=TINY.validation,
                          max_train_per_class=TINY.max_train_per_class)
    return [len(e.dataset) for e in spec.benchmark.test_stream]


def _read_csv(path):
    with open(path, newline="") as f:
        r = csv.reader(f)
        header = next(r)
        return header, [dict(zip(header, row)) for row in r]


def _reject_nan(s):
    raise ValueError(f"non-JSON constant {s}")


# --------------------------------------------------------------------------- files


def test_results_files_have_the_columns_and_one_row_per_scenario_method_seed(tiny_result):
    res, out = tiny_result
    header, rows = _read_csv(out / "results.csv")
    assert header == RESULT_COLUMNS
    assert sorted((r["method"], int(r["seed"])) for r in rows) == sorted((m, s) for m in METHOD_SET for s in SEEDS)
    doc = json.loads((out / "results.json").read_text(), parse_constant=_reject_nan)
    assert doc["columns"] == RESULT_COLUMNS
    assert len(doc["results"]) == len(rows)
    for r in doc["results"]:
        assert set(RESULT_COLUMNS) <= set(r)
    # the sweep keeps every run: naive and joint once, the tuned methods once per factor
    _, sweep = _read_csv(out / "sweep.csv")
    assert len(sweep) == len(SEEDS) * (1 + 1 + len(GRIDS["avl-ewc"]) + len(GRIDS["pc-ewc"]))
    for name in ("acc_matrix_split-task.png", "acc_over_experiences.png", "lambda_sweep.png", "final_accuracy.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_values_are_sane_and_chosen_factors_come_from_the_grid(tiny_result):
    res, out = tiny_result
    _, rows = _read_csv(out / "results.csv")
    for r in rows:
        m = r["method"]
        for col in ("avg_accuracy", "valid_accuracy"):
            assert 0.0 <= float(r[col]) <= 1.0
        assert float(r["wall_time_s"]) > float(r["mean_step_time_s"]) > 0
        assert int(r["train_iterations"]) > 0
        if m in GRIDS:
            assert float(r["chosen_factor"]) in GRIDS[m]
            assert float(r["importance_time_s"]) > 0
        else:
            assert r["chosen_factor"] == "" and r["importance_time_s"] == ""
        if m == "joint":  # one training phase: forgetting is not defined
            assert r["avg_forgetting"] == "" and r["bwt"] == ""
        else:
            f, b = float(r["avg_forgetting"]), float(r["bwt"])
            assert -1.0 <= f <= 1.0 and b == pytest.approx(-f, abs=1e-9)


def test_stream_accuracy_and_forgetting_match_the_accuracy_matrix(tiny_result):
    res, _ = tiny_result
    for r in res.chosen:
        sizes = _test_sizes(r["scenario"], r["seed"])
        mat = r["acc_matrix"]
        if r["method"] == "joint":
            assert len(mat) == 1
            rows_seen = [(0, len(sizes))]
        else:
            assert len(mat) == len(sizes)
            rows_seen = [(i, i + 1) for i in range(len(sizes))]
            for i in range(len(sizes)):  # only seen experiences are evaluated
                assert all(math.isnan(v) for v in mat[i][i + 1:])
        for (i, n_seen), acc in zip(rows_seen, r["acc_curve"]):
            num = sum(mat[i][j] * sizes[j] for j in range(n_seen))
            assert acc == pytest.approx(num / sum(sizes[:n_seen]), abs=1e-9)
        assert r["avg_accuracy"] == r["acc_curve"][-1]
        if r["method"] != "joint":
            T = len(sizes)
            brute = sum(mat[j][j] - mat[T - 1][j] for j in range(T - 1)) / (T - 1)
            assert r["avg_forgetting"] == pytest.approx(brute, abs=1e-9)


def test_chosen_factor_is_the_argmax_of_mean_validation_accuracy_over_the_sweep(tiny_result):
    res, out = tiny_result
    _, sweep = _read_csv(out / "sweep.csv")
    _, chosen = _read_csv(out / "results.csv")
    for m, grid in GRIDS.items():
        best, best_mean = None, -1.0
        for f in grid:  # brute force, strict '>' keeps the first of equal means
            vals = [float(r["valid_accuracy"]) for r in sweep if r["method"] == m and float(r["factor"]) == f]
            assert len(vals) == len(SEEDS)
            mean = sum(vals) / len(vals)
            if mean > best_mean + 1e-12:
                best, best_mean = f, mean
        assert {float(r["chosen_factor"]) for r in chosen if r["method"] == m} == {best}
        assert res.selection[("split-task", m)]["factor"] == best


def test_summary_is_mean_and_sample_std_over_seeds(tiny_result):
    res, _ = tiny_result
    assert [s["method"] for s in res.summary] == METHOD_SET
    for s in res.summary:
        rs = [r for r in res.chosen if r["method"] == s["method"]]
        accs = [r["avg_accuracy"] for r in rs]
        assert s["n_seeds"] == len(SEEDS)
        assert s["acc_mean"] == pytest.approx(statistics.mean(accs), abs=1e-12)
        assert s["acc_std"] == pytest.approx(statistics.stdev(accs), abs=1e-12)
    text = runner.format_summary(res.summary)
    for m in METHOD_SET:
        assert m in text


def test_run_one_is_reproducible_and_the_same_in_a_worker_pool():
    specs = [RunSpec("permuted", "pc-ewc", 3, 10.0, TINY), RunSpec("split-class", "avl-ewc", 3, 100.0, TINY)]
    keys = ("avg_accuracy", "valid_accuracy", "avg_forgetting", "acc_matrix")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what every pool worker uses
    try:
        first = [runner.run_one(s) for s in specs]
        again = [runner.run_one(s) for s in specs]  # cached benchmark, fresh model
    finally:
        torch.set_num_threads(threads)
    pooled = runner.execute(specs, workers=2, progress=False)
    for a, b, c in zip(first, again, pooled):
        for k in keys:  # bitwise equal; NaN (unseen experiences) compares equal here
            np.testing.assert_array_equal(np.asarray(a[k], dtype=float), np.asarray(b[k], dtype=float))
            np.testing.assert_array_equal(np.asarray(a[k], dtype=float), np.asarray(c[k], dtype=float))


# --------------------------------------------------------------------------- selection


def test_select_factor_on_synthetic_scores():
    factors = [0.1, 1.0, 10.0, 100.0]
    scores = [[0.50, 0.60], [0.70, 0.90], [0.80, 0.75], [0.10, 0.20]]  # means .55 .80 .775 .15
    assert runner.select_factor(factors, scores) == (1.0, 1, pytest.approx(0.80))
    # NaN scores (a failed seed) are ignored, ties keep the first factor
    assert runner.select_factor(factors, [[0.9, float("nan")], [0.9], [0.5], [0.9]])[:2] == (0.1, 0)
    assert runner.select_factor(factors, [[float("nan")], [0.2], [0.3], [float("nan")]])[:2] == (10.0, 2)
    with pytest.raises(ValueError, match="NaN"):
        runner.select_factor([1.0], [[float("nan")]])
    with pytest.raises(ValueError, match="length"):
        runner.select_factor([1.0, 2.0], [[0.5]])


@hsettings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, 20), min_size=1, max_size=4), min_size=1, max_size=8))
def test_select_factor_matches_brute_force(int_scores):
    scores = [[v / 20 for v in s] for s in int_scores]
    factors = [10.0 ** k for k in range(len(scores))]
    best_k, best_mean = 0, None
    for k, s in enumerate(scores):
        mean = sum(s) / len(s)
        if best_mean is None or mean > best_mean + 1e-12:
            best_k, best_mean = k, mean
    f, k, mean = runner.select_factor(factors, scores)
    assert (f, k) == (factors[best_k], best_k)
    assert mean == pytest.approx(best_mean)


def test_select_factors_groups_rows_and_flags_grid_edges():
    def row(sc, m, f, seed, v):
        return {"scenario": sc, "method": m, "factor": f, "seed": seed, "valid_accuracy": v, "avg_accuracy": v}

    rows = [row("permuted", "pc-ewc", f, s, v) for f, vs in ((1.0, (0.2, 0.4)), (10.0, (0.5, 0.5)), (100.0, (0.6, 0.5)))
            for s, v in enumerate(vs)]
    rows += [row("permuted", "avl-ewc", f, s, v) for f, vs in ((10.0, (0.3, 0.3)), (1e3, (0.6, 0.8)), (1e5, (0.1, 0.1)))
             for s, v in enumerate(vs)]
    rows += [row("permuted", "naive", None, s, v) for s, v in enumerate((0.2, 0.3))]
    # a flat curve: every factor ties; the smallest is taken and not reported as an edge
    rows += [row("permuted", "pc-si", f, s, 0.5) for f in (0.1, 1.0, 10.0) for s in range(2)]
    sel = runner.select_factors(rows)
    assert sel[("permuted", "pc-si")]["factor"] == 0.1
    assert sel[("permuted", "pc-si")]["ties"] == 3 and not sel[("permuted", "pc-si")]["at_edge"]
    assert sel[("permuted", "pc-ewc")]["ties"] == 1
    assert sel[("permuted", "pc-ewc")]["factor"] == 100.0 and sel[("permuted", "pc-ewc")]["at_edge"]
    assert sel[("permuted", "avl-ewc")]["factor"] == 1e3 and not sel[("permuted", "avl-ewc")]["at_edge"]
    assert sel[("permuted", "avl-ewc")]["valid_by_factor"] == pytest.approx([0.3, 0.7, 0.1])
    assert sel[("permuted", "naive")]["factor"] is None
    assert sel[("permuted", "naive")]["valid_accuracy"] == pytest.approx(0.25)
    chosen = runner.chosen_rows(rows, sel)
    assert sorted((r["method"], r["factor"]) for r in chosen) == sorted(
        [("pc-ewc", 100.0)] * 2 + [("avl-ewc", 1e3)] * 2 + [("naive", None)] * 2 + [("pc-si", 0.1)] * 2)


def test_method_grids_are_log_spaced_and_wide():
    g = runner.method_grid("pc-ewc", 2)
    assert g[0] == pytest.approx(0.1) and g[-1] == pytest.approx(1e5) and len(g) == 13
    assert np.allclose(np.diff(np.log10(g)), 0.5)
    assert runner.method_grid("avl-ewc") == [10.0 ** k for k in range(1, 8)]
    assert runner.method_grid("naive") == [None]
    with pytest.raises(ValueError, match="points_per_decade"):
        runner.method_grid("pc-ewc", 0)


# --------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("argv, message", [
    (["--scenarios", "split-task,bogus"], "unknown scenario 'bogus'; valid scenarios: split-task, split-class, permuted"),
    (["--methods", "naive,ewc"], "unknown method 'ewc'; valid methods: " + ", ".join(METHODS)),
    (["--dataset", "mnist"], "--dataset mnist needs --data-root"),
    (["--dataset", "digits", "--data-root", "."], "--data-root is only used with"),
    (["--seeds", "two"], "--seeds takes a count"),
    (["--epochs", "0"], "expected a positive int"),
    (["--quick", "--full"], "not allowed with"),
])
def test_cli_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        compare.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_rejects_a_missing_or_empty_data_root(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        compare.main(["--dataset", "fashion-mnist", "--data-root", str(tmp_path / "nope")])
    assert e.value.code == 2
    assert "directory not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        compare.main(["--dataset", "mnist", "--data-root", str(tmp_path)])
    assert e.value.code == 2
    assert "train-images-idx3-ubyte" in capsys.readouterr().err


def _write_idx(path, arr, gz=False):
    codes = {np.uint8: 0x08}
    header = struct.pack(">BBBB", 0, 0, codes[arr.dtype.type], arr.ndim) + b"".join(
        struct.pack(">I", d) for d in arr.shape)
    data = header + arr.astype(">u1").tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


def test_cli_on_tiny_idx_files(tmp_path, capsys):
    root = tmp_path / "data"
    (root / "mnist").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 8), ("t10k", 3)):
        y = np.repeat(np.arange(10, dtype=np.uint8), per_class)
        # class-dependent bright pixel, so the task is learnable
        x = rng.integers(0, 60, size=(y.size, 6, 6), dtype=np.uint8)
        x.reshape(y.size, -1)[np.arange(y.size), y.astype(int) * 3] = 255
        _write_idx(root / "mnist" / f"{split}-images-idx3-ubyte", x, gz=split == "train")
        _write_idx(root / "mnist" / f"{split}-labels-idx1-ubyte", y)
    out = tmp_path / "out"
    code = compare.main(["--quick", "--dataset", "mnist", "--data-root", str(root), "--scenarios", "split-class,permuted",
                         "--methods", "naive,pc-ewc", "--hidden", "16", "--workers", "1", "--no-progress",
                         "--no-plots", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "pc-ewc" in printed and "MLP 2x16" in printed
    header, rows = _read_csv(out / "results.csv")
    assert header == RESULT_COLUMNS
    assert sorted((r["scenario"], r["method"]) for r in rows) == sorted(
        (s, m) for s in ("split-class", "permuted") for m in ("naive", "pc-ewc"))
    assert {r["dataset"] for r in rows} == {"mnist"}
    quick = runner.quick_grid("pc-ewc")
    for r in rows:
        assert 0.0 <= float(r["avg_accuracy"]) <= 1.0
        if r["method"] == "pc-ewc":
            assert float(r["chosen_factor"]) in quick
    doc = json.loads((out / "results.json").read_text(), parse_constant=_reject_nan)
    assert doc["config"]["settings"]["dataset"] == "mnist" and doc["config"]["settings"]["hidden"] == 16
    # the test stream was read from the IDX files: 3 images a class, 2 classes an experience
    assert all(len(r["acc_matrix"]) == 5 for r in doc["results"] if r["method"] != "joint")
