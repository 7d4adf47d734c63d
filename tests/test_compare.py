"""The comparison runner and its CLI (pcreg_experiments.runner and the modules of a sweep / pcreg_experiments).

Tiny configurations only (digits subsampled to 20 images a class, 1 epoch). The figures a run reports
are checked against each other and against brute-force recomputations: Avalanche's stream accuracy
against the accuracy matrix (its per-experience metric) weighted by experience sizes, Avalanche's
forgetting against the matrix's diagonal minus last row, the factor choice against a loop over the
sweep, the summary against ``statistics``.
"""

from __future__ import annotations

import csv
from dataclasses import replace
import gzip
import json
import math
import statistics
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings as hsettings, strategies as st

from pcreg_experiments import catalog, compare, pool, runner, selection, store, tables
from pcreg_experiments.catalog import METHODS
from pcreg_experiments.data import make_benchmark
from pcreg_experiments.runner import RunSpec, Settings
from pcreg_experiments.tables import RESULT_COLUMNS

# the checkout: subprocesses run there to import the harness (pytest's pythonpath is not inherited)
ROOT = Path(__file__).resolve().parents[1]
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
    for name in ("acc_matrix_split-task.png", "acc_over_experiences.png", "lambda_sweep.png", "final_accuracy.png",
                 "difference.png", "cost_vs_experience.png"):
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
    text = tables.format_summary(res.summary)
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
    pooled = pool.execute(specs, workers=2, progress=False)
    for a, b, c in zip(first, again, pooled):
        for k in keys:  # bitwise equal; NaN (unseen experiences) compares equal here
            np.testing.assert_array_equal(np.asarray(a[k], dtype=float), np.asarray(b[k], dtype=float))
            np.testing.assert_array_equal(np.asarray(a[k], dtype=float), np.asarray(c[k], dtype=float))


# --------------------------------------------------------------------------- selection


def test_select_factor_on_synthetic_scores():
    factors = [0.1, 1.0, 10.0, 100.0]
    scores = [[0.50, 0.60], [0.70, 0.90], [0.80, 0.75], [0.10, 0.20]]  # means .55 .80 .775 .15
    assert selection.select_factor(factors, scores) == (1.0, 1, pytest.approx(0.80))
    # NaN scores (a failed seed) are ignored, ties keep the first factor
    assert selection.select_factor(factors, [[0.9, float("nan")], [0.9], [0.5], [0.9]])[:2] == (0.1, 0)
    assert selection.select_factor(factors, [[float("nan")], [0.2], [0.3], [float("nan")]])[:2] == (10.0, 2)
    with pytest.raises(ValueError, match="NaN"):
        selection.select_factor([1.0], [[float("nan")]])
    with pytest.raises(ValueError, match="length"):
        selection.select_factor([1.0, 2.0], [[0.5]])


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
    f, k, mean = selection.select_factor(factors, scores)
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
    sel = selection.select_factors(rows)
    assert sel[("permuted", "pc-si")]["factor"] == 0.1
    assert sel[("permuted", "pc-si")]["ties"] == 3 and not sel[("permuted", "pc-si")]["at_edge"]
    assert sel[("permuted", "pc-ewc")]["ties"] == 1
    assert sel[("permuted", "pc-ewc")]["factor"] == 100.0 and sel[("permuted", "pc-ewc")]["at_edge"]
    assert sel[("permuted", "avl-ewc")]["factor"] == 1e3 and not sel[("permuted", "avl-ewc")]["at_edge"]
    assert sel[("permuted", "avl-ewc")]["valid_by_factor"] == pytest.approx([0.3, 0.7, 0.1])
    assert sel[("permuted", "naive")]["factor"] is None
    assert sel[("permuted", "naive")]["valid_accuracy"] == pytest.approx(0.25)
    chosen = selection.chosen_rows(rows, sel)
    assert sorted((r["method"], r["factor"]) for r in chosen) == sorted(
        [("pc-ewc", 100.0)] * 2 + [("avl-ewc", 1e3)] * 2 + [("naive", None)] * 2 + [("pc-si", 0.1)] * 2)


def test_method_grids_are_log_spaced_and_wide():
    g = catalog.method_grid("pc-ewc", 2)
    assert g[0] == pytest.approx(0.1) and g[-1] == pytest.approx(1e5) and len(g) == 13
    assert np.allclose(np.diff(np.log10(g)), 0.5)
    assert catalog.method_grid("avl-ewc") == [10.0 ** k for k in range(1, 8)]
    assert catalog.method_grid("naive") == [None]
    with pytest.raises(ValueError, match="points_per_decade"):
        catalog.method_grid("pc-ewc", 0)


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
    quick = catalog.quick_grid("pc-ewc")
    for r in rows:
        assert 0.0 <= float(r["avg_accuracy"]) <= 1.0
        if r["method"] == "pc-ewc":
            assert float(r["chosen_factor"]) in quick
    doc = json.loads((out / "results.json").read_text(), parse_constant=_reject_nan)
    assert doc["config"]["settings"]["dataset"] == "mnist" and doc["config"]["settings"]["hidden"] == 16
    # the test stream was read from the IDX files: 3 images a class, 2 classes an experience
    assert all(len(r["acc_matrix"]) == 5 for r in doc["results"] if r["method"] != "joint")


# --------------------------------------------------------------------------- studies

STUDY_TINY = Settings(epochs=1, max_train_per_class=20, max_test_per_class=10, n_experiences=4)


def _n_params(spec_model):
    return sum(p.numel() for p in spec_model.parameters())


def test_long_stream_study_step_times_and_memory(tmp_path):
    from pcreg_experiments import studies
    from pcreg_experiments.data import make_model

    res = runner.run_comparison(["permuted"], ["naive", "avl-ewc", "pc-ewc"], [0, 1], STUDY_TINY,
                                grids={"avl-ewc": [100.0], "pc-ewc": [10.0]}, workers=1, progress=False,
                                out=tmp_path, study="long-stream")
    T = STUDY_TINY.n_experiences
    model = make_model(make_benchmark("permuted", n_experiences=T, max_train_per_class=20), hidden=100)
    P = _n_params(model)
    for r in res.rows:
        assert len(r["acc_curve"]) == len(r["step_time_per_exp_s"]) == len(r["reg_bytes_per_exp"]) == T
        if r["method"] == "avl-ewc":
            # Avalanche's separate mode stores (F_t, theta*_t), float32, for every experience so far
            assert r["reg_bytes_per_exp"] == [2 * 4 * P * t for t in range(1, T + 1)]
        elif r["method"] == "pc-ewc":
            # ours: one consolidated (importance, anchor) pair whatever T
            assert r["reg_bytes_per_exp"] == [2 * 4 * P] * T
        else:
            assert r["reg_bytes_per_exp"] == [0] * T
    table = {t["method"]: t for t in studies.long_stream_table(res)}
    for me, t in table.items():
        rs = [r for r in res.chosen if r["method"] == me]
        assert t["n_seeds"] == 2 and t["n_experiences"] == T
        assert t["acc_mean"] == pytest.approx(statistics.mean(r["avg_accuracy"] for r in rs), abs=1e-12)
        assert t["step_ms_T"] == pytest.approx(1e3 * statistics.mean(r["step_time_per_exp_s"][-1] for r in rs))
        assert t["step_ms_1"] == pytest.approx(1e3 * statistics.mean(r["step_time_per_exp_s"][0] for r in rs))
        assert t["reg_mb_T"] == pytest.approx(rs[0]["reg_bytes_per_exp"][-1] / 2 ** 20)
    text = (tmp_path / "long-stream.md").read_text()
    assert "Avalanche EWC" in text and "ours EWC (empirical)" in text and "8x8 digits" in text
    for name in ("long_stream_accuracy.png", "long_stream_step_time.png", "long_stream_memory.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_long_stream_table_shows_a_spread_only_over_seeds():
    from pcreg_experiments import studies

    row = {"label": "ours", "factor": 10.0, "at_edge": False, "acc_mean": 0.6667, "acc_std": 0.0, "forg_mean": 0.039,
           "forg_std": 0.0, "n_experiences": 50, "step_ms_1": 7.8, "step_ms_2": 20.5, "step_ms_T": 18.9,
           "growth_2_to_T": 0.92, "vs_naive_T": 4.2, "reg_mb_T": 6.62}
    one = studies.format_long_stream([dict(row, n_seeds=1)]).splitlines()[-1]
    three = studies.format_long_stream([dict(row, n_seeds=3, acc_std=0.012)]).splitlines()[-1]
    assert "| 0.667 | 0.039 |" in one and "±" not in one
    assert "| 0.667 ± 0.012 | 0.039 ± 0.000 |" in three


def test_fisher_variants_study_on_digits(tmp_path):
    from pcreg_experiments import studies

    methods = ["naive", "fv-exact", "fv-exact-500", "fv-batched-avl"]
    grids = {"fv-exact": [1.0, 100.0], "fv-exact-500": [1.0, 100.0], "fv-batched-avl": [100.0]}
    s = replace(STUDY_TINY, n_experiences=5)
    res = runner.run_comparison(["split-task"], methods, [0, 1], s, grids=grids, workers=1, progress=False,
                                out=tmp_path, study="fisher-variants")
    # 16 training images an experience (< 500): the 500-sample subset is the whole experience, so
    # "exact on 500 samples" must reproduce "exact" run for run
    by = {(r["method"], r["seed"], r["factor"]): r for r in res.rows}
    for seed in (0, 1):
        for f in (1.0, 100.0):
            a, b = by[("fv-exact", seed, f)], by[("fv-exact-500", seed, f)]
            assert a["avg_accuracy"] == b["avg_accuracy"] and a["valid_accuracy"] == b["valid_accuracy"]
    table = studies.fisher_variants_table(res)
    assert [t["method"] for t in table] == methods
    assert table[0]["label"] == "none"
    for t in table:
        summ = next(x for x in res.summary if x["method"] == t["method"])
        assert t["acc_mean"] == summ["acc_mean"] and t["factor"] == summ["chosen_factor"]
    assert (tmp_path / "fisher_variants.png").read_bytes()[:4] == b"\x89PNG"
    assert "exact Fisher (500 samples)" in (tmp_path / "fisher-variants.md").read_text()


def test_fisher_variant_methods_are_data():
    from pcreg_experiments.catalog import FV_DECAY, STUDIES

    fv = STUDIES["fisher-variants"].methods
    imp = {m: METHODS[m].options.get("importance") for m in fv if METHODS[m].kind == "pcreg"}
    assert imp == {"fv-exact": "expected_fisher", "fv-exact-500": "expected_fisher", "fv-sampled": "fisher",
                   "fv-empirical": "empirical_fisher", "fv-batched": "minibatch_fisher"}
    assert METHODS["fv-exact-500"].options["num_samples"] == 500
    for m in fv:
        if METHODS[m].kind == "pcreg":
            assert METHODS[m].options["mode"] == "online" and METHODS[m].options["decay"] == FV_DECAY
    assert METHODS["fv-batched-avl"].options == {"mode": "online", "decay_factor": FV_DECAY}
    # make_plugins builds each with its options
    p = runner.make_plugins("fv-exact-500", 3.0)[0]
    assert p.num_samples == 500 and p.mode == "online" and p.importance_name == "expected_fisher"


# --------------------------------------------------------------------------- results file, resume


def test_result_store_appends_and_drops_a_cut_line(tmp_path):
    results = store.ResultStore(tmp_path / "runs.jsonl")
    results.append("a", {"avg_accuracy": 0.5, "bwt": float("nan"), "acc_matrix": [[0.5, float("nan")]]})
    results.append("b", {"avg_accuracy": 0.25})
    with open(results.path, "a") as f:
        f.write('{"key": "c", "row": {"avg_ac')  # a kill in the middle of a write
    got = results.load()
    assert list(got) == ["a", "b"]
    assert got["a"]["avg_accuracy"] == 0.5 and math.isnan(got["a"]["bwt"]) and math.isnan(got["a"]["acc_matrix"][0][1])
    assert results.path.read_text().count("\n") == 2 and results.path.read_text().endswith("\n")
    results.path.write_text('{"key": "a"\n')
    with pytest.raises(ValueError, match="unreadable line 1"):
        results.load()


def test_rerun_skips_finished_runs_and_gives_the_same_tables(tmp_path, capsys):
    grids = {"pc-ewc": [1.0, 100.0]}
    args = (["split-task"], ["naive", "pc-ewc"], [0, 1], TINY)
    ref = runner.run_comparison(*args, grids=grids, workers=1, progress=False, out=tmp_path / "ref", plots=False)
    out = tmp_path / "resumed"
    # a first, partial sweep: seed 0 only, then the full one over the same file
    runner.run_comparison(args[0], args[1], [0], TINY, grids=grids, workers=1, progress=False, out=out, plots=False)
    assert len((out / "runs.jsonl").read_text().splitlines()) == 3
    msgs = []
    res = runner.run_comparison(*args, grids=grids, workers=1, progress=False, out=out, plots=False, log=msgs.append)
    assert msgs and "3 of 6 runs already done, skipping them" in msgs[0]
    assert res.config["n_runs_resumed"] == 3
    assert len((out / "runs.jsonl").read_text().splitlines()) == 6
    for a, b in zip(ref.summary, res.summary):
        for k in ("method", "acc_mean", "acc_std", "forgetting_mean", "chosen_factor", "valid_accuracy"):
            assert a[k] == b[k], k
    assert (tmp_path / "ref" / "results.csv").read_text().count("\n") == (out / "results.csv").read_text().count("\n")
    # resume=False trains everything again
    runner.run_comparison(args[0], args[1], [0], TINY, grids=grids, workers=1, progress=False, out=out,
                          plots=False, resume=False)
    assert len((out / "runs.jsonl").read_text().splitlines()) == 3


def _cli(args, **kw):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([sys.executable, "-m", "pcreg_experiments", *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


CLI_SWEEP = ["--quick", "--scenarios", "split-task", "--methods", "naive,pc-ewc", "--seeds", "2",
             "--max-train-per-class", "20", "--workers", "1", "--no-plots", "--no-progress"]


def _interrupt_after(out, n_lines, sig):
    import signal
    import time

    runs = out / "runs.jsonl"
    p = _cli([*CLI_SWEEP, "--out", str(out)])
    t0 = time.time()
    while time.time() - t0 < 240:
        if runs.is_file() and runs.read_text().count("\n") >= n_lines:
            break
        if p.poll() is not None:
            pytest.fail("the sweep ended before it could be interrupted: " + p.stderr.read()[-2000:])
        time.sleep(0.05)
    p.send_signal(getattr(signal, sig))
    _, err = p.communicate(timeout=120)
    return p.returncode, err, runs.read_text().count("\n")


def test_cli_interrupted_mid_sweep_resumes_to_the_same_tables(tmp_path):
    """Ctrl-C (SIGINT) after the first run, then a kill (SIGKILL) after the next, then the same
    command to the end: every finished run is kept and the tables equal an uninterrupted sweep's."""
    import signal

    out = tmp_path / "out"
    code, err, kept = _interrupt_after(out, 1, "SIGINT")
    assert code == 130 and "interrupted: the finished runs are kept" in err
    assert 1 <= kept < 6
    code, err, kept2 = _interrupt_after(out, kept + 1, "SIGKILL")
    assert code == -signal.SIGKILL
    assert kept < kept2 < 6
    q = _cli([*CLI_SWEEP, "--out", str(out)])
    printed, err = q.communicate(timeout=300)
    assert q.returncode == 0, err[-2000:]
    assert f"{kept2} of 6 runs already done, skipping them" in printed
    assert (out / "runs.jsonl").read_text().count("\n") == 6
    # the same tables as an uninterrupted sweep (the figures that do not depend on timing)
    ref = runner.run_comparison(["split-task"], ["naive", "pc-ewc"], [0, 1], TINY,
                                grids={"pc-ewc": catalog.quick_grid("pc-ewc")}, workers=1, progress=False)
    _, rows = _read_csv(out / "results.csv")
    got = {(r["method"], int(r["seed"])): r for r in rows}
    assert len(got) == len(ref.chosen) == 4
    for r in ref.chosen:
        g = got[(r["method"], r["seed"])]
        assert float(g["avg_accuracy"]) == pytest.approx(r["avg_accuracy"], abs=1e-6)
        assert float(g["valid_accuracy"]) == pytest.approx(r["valid_accuracy"], abs=1e-6)
        assert g["chosen_factor"] == ("" if r["chosen_factor"] is None else f"{r['chosen_factor']:.6g}")


# --------------------------------------------------------------------------- CLI: checks before training


def test_help_and_a_mistyped_option_do_not_import_torch():
    import subprocess
    import sys

    code = ("import sys\nfrom pcreg_experiments import compare\n"
            "for argv in (['--help'], ['--epocs', '2']):\n"
            "    try:\n        compare.main(argv)\n    except SystemExit:\n        pass\n"
            "print('heavy:', sorted(m for m in ('torch', 'avalanche', 'numpy', 'matplotlib') if m in sys.modules))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "heavy: []" in r.stdout, r.stdout + r.stderr
    assert "--n-experiences" in r.stdout and "--device" in r.stdout and "--study" in r.stdout
    assert "unrecognized arguments: --epocs" in r.stderr


def test_repository_script_and_module_answer_help(tmp_path):
    """The CLI runs from the checkout (the wheel does not ship it): ./pcreg-compare finds the harness next to
    itself from any directory, and ``python -m pcreg_experiments.compare`` from the repository root."""
    import subprocess
    import sys

    script = ROOT / "pcreg-compare"
    assert script.read_text().startswith("#!/usr/bin/env python3\n") and script.stat().st_mode & 0o111
    for argv, cwd in (([str(script), "--help"], tmp_path), (["-m", "pcreg_experiments.compare", "--help"], ROOT)):
        r = subprocess.run([sys.executable, *argv], cwd=cwd, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith("usage: pcreg-compare") and "--study" in r.stdout, r.stdout[:500]


@pytest.mark.parametrize("kind", ["file", "under-a-file"])
def test_cli_checks_out_before_any_training(tmp_path, capsys, monkeypatch, kind):
    f = tmp_path / "taken"
    f.write_text("not a directory")
    out = f if kind == "file" else f / "sub"
    trained = []
    monkeypatch.setattr(runner, "run_one", lambda *a, **k: trained.append(1))
    with pytest.raises(SystemExit) as e:
        compare.main(["--quick", "--out", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--out:" in err and str(out) in err
    assert ("is not a directory" in err) if kind == "file" else ("cannot write" in err)
    assert not trained
    with pytest.raises(ValueError, match="exists and is not a directory"):
        store.check_out_dir(f)


def test_device_cuda_without_cuda_fails_before_training_and_auto_picks_cpu(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runner.resolve_device("auto") == "cpu"
    assert runner.resolve_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="torch sees no CUDA device"):
        runner.resolve_device("cuda")
    with pytest.raises(ValueError, match="'auto', 'cpu', 'cuda' or 'cuda:N'"):
        runner.resolve_device("gpu")
    with pytest.raises(ValueError, match="no CUDA device"):
        Settings(device="cuda:0").check()
    trained = []
    monkeypatch.setattr(runner, "run_one", lambda *a, **k: trained.append(1))
    with pytest.raises(SystemExit) as e:
        compare.main(["--quick", "--device", "cuda", "--out", str(tmp_path)])
    assert e.value.code == 2
    assert "--device: device 'cuda' was asked for but torch sees no CUDA device" in capsys.readouterr().err
    assert not trained


def test_cli_auto_device_runs_on_cpu(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code = compare.main(["--quick", "--device", "auto", "--scenarios", "split-task", "--methods", "naive",
                         "--max-train-per-class", "20", "--workers", "1", "--no-plots", "--no-progress",
                         "--out", str(tmp_path)])
    assert code == 0
    assert "device=cpu" in capsys.readouterr().out
    row = json.loads((tmp_path / "runs.jsonl").read_text().splitlines()[0])["row"]
    assert row["device"] == "cpu"


@pytest.mark.parametrize("argv, message", [
    (["--n-experiences", "3", "--scenarios", "split-task"], "--n-experiences 3: the split-task scenario needs a divisor"),
    (["--study", "bogus"], "invalid choice: 'bogus'"),
    (["--device", "tpu"], "expected one of auto, cpu, cuda"),
    (["--download"], "--download: the digits are bundled"),
    (["--decades", "1"], "--decades takes two numbers"),
])
def test_cli_rejects_more_bad_arguments(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        compare.main([*argv, "--out", str(tmp_path)])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_study_defaults_and_long_permuted_streams(tmp_path):
    a = compare.parse_args(["--study", "long-stream", "--out", str(tmp_path)])
    assert a.scenarios == ["permuted"] and a.n_experiences == 20
    assert a.methods == ["naive", "avl-ewc", "avl-ewc-online", "pc-ewc", "pc-ewc-online"]
    a = compare.parse_args(["--study", "long-stream", "--n-experiences", "50", "--out", str(tmp_path)])
    assert a.n_experiences == 50
    a = compare.parse_args(["--study", "fisher-variants", "--out", str(tmp_path)])
    assert a.scenarios == ["split-task"] and "fv-exact-500" in a.methods and "naive" in a.methods
    a = compare.parse_args(["--decades", "1,-2", "--methods", "naive,pc-ewc", "--out", str(tmp_path)])
    assert a.grids == {"pc-ewc": catalog.method_grid("pc-ewc", 1, (0, 3))}
    spec = make_benchmark("permuted", n_experiences=7, max_train_per_class=3)
    assert len(spec.benchmark.train_stream) == 7


def test_cli_quick_on_tiny_cifar_files_with_the_conv_net(tmp_path, capsys, monkeypatch):
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from test_data import tiny_cifar

    tiny_cifar(tmp_path / "data", "cifar10", per_class_train=4, per_class_test=2)
    a = compare.parse_args(["--quick", "--dataset", "cifar10", "--data-root", str(tmp_path / "data"),
                            "--out", str(tmp_path / "o")])
    assert a.max_train_per_class == a.max_test_per_class == 100  # --quick subsamples every dataset
    # --download goes through torchvision's downloader, then the files are read as usual
    from pcreg_experiments import data

    asked = []
    monkeypatch.setattr(data, "download_dataset", lambda ds, root: asked.append((ds, str(root))))
    code = compare.main(["--quick", "--dataset", "cifar10", "--data-root", str(tmp_path / "data"), "--download",
                         "--scenarios", "split-task", "--methods", "naive,pc-ewc", "--hidden", "8",
                         "--workers", "1", "--no-plots", "--no-progress", "--out", str(tmp_path / "o")])
    assert code == 0
    assert asked == [("cifar10", str(tmp_path / "data"))]
    printed = capsys.readouterr().out
    assert "CNN 4 conv + 8" in printed and "subsampled to 100 train / 100 test images a class" in printed
    doc = json.loads((tmp_path / "o" / "results.json").read_text(), parse_constant=_reject_nan)
    assert doc["config"]["settings"]["model"] == "cnn" and doc["config"]["settings"]["dataset"] == "cifar10"
    assert len(doc["results"]) == 2


def test_cli_says_what_workers_do_on_a_gpu(tmp_path, capsys, monkeypatch):
    # pretend a GPU is visible: only the argument handling runs, nothing is trained
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    a = compare.parse_args(["--device", "auto", "--workers", "2", "--out", str(tmp_path)])
    assert a.device == "cuda"
    assert "--workers 2 is ignored on cuda: the runs go one after the other in this process" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compare.parse_args(["--device", "cuda:3", "--out", str(tmp_path)])
    assert "only 1 CUDA device(s) visible" in capsys.readouterr().err


def test_rwalk_methods_in_the_harness_avalanche_and_parity_mode_give_the_same_run():
    """Avalanche's RWalkPlugin and ours in its parity mode (``importance="rwalk"``) are the same run
    in the harness (same accuracies and validation score); the per-sample version is a different,
    consolidated method. Every experience runs more than ``delta_t`` = 10 iterations: with fewer,
    Avalanche's normalisation divides 0 by 0 and it trains on NaN, where ours uses 0."""
    settings = Settings(epochs=1, max_train_per_class=50)  # 13 iterations an experience
    rows = {m: runner.run_one(RunSpec("permuted", m, 0, 10.0, settings))
            for m in ("avl-rwalk", "pc-rwalk", "pc-rwalk-fisher")}
    avl, ours = rows["avl-rwalk"], rows["pc-rwalk"]
    assert ours["valid_accuracy"] == avl["valid_accuracy"]
    assert ours["avg_accuracy"] == avl["avg_accuracy"]
    assert np.allclose(np.asarray(ours["acc_matrix"], dtype=float), np.asarray(avl["acc_matrix"], dtype=float),
                       equal_nan=True)  # NaN: experiences not yet trained
    assert METHODS["avl-rwalk"].plugin == "RWalkPlugin" and METHODS["pc-rwalk-fisher"].kind == "pcreg"
    assert np.isfinite(rows["pc-rwalk-fisher"]["avg_accuracy"])
    assert rows["pc-rwalk-fisher"]["valid_accuracy"] != avl["valid_accuracy"]


def test_stop_flag_ends_the_sweep_before_the_next_run(tmp_path):
    """The CLI's SIGINT handler sets pool.STOP as well as raising KeyboardInterrupt: a sweep
    whose KeyboardInterrupt got lost (raised inside a finalizer) still stops at the next run."""
    rows = []
    specs = [RunSpec("permuted", "naive", 0, None, TINY), RunSpec("permuted", "naive", 1, None, TINY)]

    def on_row(spec, row):
        rows.append(row)
        pool.STOP.set()  # as if the handler ran during the first run and its exception was lost

    try:
        with pytest.raises(KeyboardInterrupt):
            pool.execute(specs, workers=1, progress=False, on_row=on_row)
    finally:
        pool.STOP.clear()
    assert len(rows) == 1
    assert len(pool.execute(specs[:1], workers=1, progress=False)) == 1  # cleared: runs again


# --------------------------------------------------------------------------- failures and cells


CELL = Settings(epochs=1, max_train_per_class=8, max_test_per_class=4)


@pytest.mark.parametrize("scenario", catalog.SCENARIOS)
def test_every_method_trains_in_every_scenario_or_is_left_out_for_a_true_reason(scenario):
    """Every method of the catalog (the default set among them) trains one tiny run in every
    scenario; a method left out of a scenario really fails there (so the note stays true)."""
    from pcreg_experiments.catalog import DEFAULT_METHODS, quick_grid, supported

    assert set(DEFAULT_METHODS) <= set(METHODS)
    for name in METHODS:
        row = runner.run_guarded(RunSpec(scenario, name, 0, quick_grid(name)[0], CELL))
        if supported(scenario, name) is None:
            assert row["status"] == "ok", f"{scenario}/{name}: {row.get('error')}"
            assert 0.0 <= row["avg_accuracy"] <= 1.0
        else:
            assert row["status"] == "failed", f"{scenario}/{name} no longer fails: drop it from unsupported"


def test_default_sweep_is_the_named_comparison_and_its_size(tmp_path):
    from pcreg_experiments.catalog import DEFAULT_METHODS, PRESETS, STUDIES

    assert PRESETS["default"]["methods"] == DEFAULT_METHODS == STUDIES["compare"].methods
    assert not any(m.startswith(("fv-", "avl-rwalk", "pc-rwalk")) for m in DEFAULT_METHODS)
    a = compare.parse_args(["--out", str(tmp_path)])
    plan = runner.plan_runs(a.scenarios, a.methods, a.seeds, Settings(), grids=a.grids)
    assert a.methods == list(DEFAULT_METHODS) and len(plan) == 585


def test_left_out_cells_are_not_planned_and_are_named_in_the_tables(tmp_path):
    plan = runner.plan_runs(["split-task", "split-class"], ["naive", "avl-rwalk"], [0], CELL,
                            grids={"avl-rwalk": [1.0]})
    assert [(p.scenario, p.method) for p in plan] == [
        ("split-task", "naive"), ("split-class", "naive"), ("split-class", "avl-rwalk")]
    left = runner.left_out(["split-task", "split-class"], ["naive", "avl-rwalk"])
    assert left == [{"scenario": "split-task", "method": "avl-rwalk",
                     "reason": METHODS["avl-rwalk"].unsupported["split-task"]}]
    res = runner.run_comparison(["split-task", "split-class"], ["naive", "avl-rwalk"], [0], CELL,
                                grids={"avl-rwalk": [1.0]}, workers=1, progress=False, out=tmp_path, plots=True)
    assert res.config["left_out"] == left and len(res.rows) == 3
    md = (tmp_path / "summary.md").read_text()
    assert "left out: split-task/avl-rwalk: Avalanche 0.6's RWalkPlugin raises KeyError" in md
    assert (tmp_path / "acc_matrix_split-task.png").is_file()


def test_a_failing_method_is_recorded_with_its_error_and_the_sweep_goes_on(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(METHODS, "broken", catalog.Method(
        "broken", "broken", "avalanche", (0, 1), {"no_such_option": 1}, "an Avalanche plugin given a bad option"))
    args = (["permuted"], ["naive", "broken", "pc-ewc"], [0, 1], CELL)
    grids = {"broken": [1.0, 10.0], "pc-ewc": [1.0]}
    res = runner.run_comparison(*args, grids=grids, workers=1, progress=False, out=tmp_path, plots=True)
    bad = [r for r in res.rows if r["method"] == "broken"]
    assert len(bad) == 4 and all(r["status"] == "failed" for r in bad)
    assert all(r["error"].startswith("TypeError:") and "no_such_option" in r["error"] for r in bad)
    good = [r for r in res.rows if r["method"] != "broken"]
    assert len(good) == 4 and all(r["status"] == "ok" and 0 <= r["avg_accuracy"] <= 1 for r in good)
    cell = next(s for s in res.summary if s["method"] == "broken")
    assert cell["all_failed"] and cell["n_failed"] == 4 and math.isnan(cell["acc_mean"])
    assert len(cell["errors"]) == 1 and "no_such_option" in cell["errors"][0]
    assert {s["method"] for s in res.summary if not s["all_failed"]} == {"naive", "pc-ewc"}
    assert res.config["n_runs_failed"] == 4
    assert not any(r["method"] == "broken" for r in res.chosen)
    table = tables.format_summary(res.summary)
    assert "broken!" in table and "failed" in table
    md = (tmp_path / "summary.md").read_text()
    assert "! permuted/broken: every run failed: TypeError:" in md
    doc = json.loads((tmp_path / "results.json").read_text(), parse_constant=_reject_nan)
    assert sum(r["status"] == "failed" for r in doc["sweep"]) == 4
    for name in ("final_accuracy.png", "acc_over_experiences.png", "lambda_sweep.png", "acc_matrix_permuted.png"):
        assert (tmp_path / name).is_file()
    # failed runs are kept in the results file, and a rerun trains them again (the rest is reused)
    assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == 8
    msgs = []
    again = runner.run_comparison(*args, grids=grids, workers=1, progress=False, out=tmp_path, plots=False,
                                  log=msgs.append)
    assert "4 of 8 runs already done" in msgs[0] and again.config["n_runs_resumed"] == 4
    assert [r["avg_accuracy"] for r in again.rows if r["method"] != "broken"] == [r["avg_accuracy"] for r in good]


def test_a_cell_with_some_failed_runs_chooses_among_the_finished_ones():
    ok = dict(scenario="permuted", method="pc-ewc", status="ok", avg_accuracy=0.5, avg_forgetting=0.1, bwt=-0.1,
              mean_step_time_s=0.001, importance_time_s=0.01, error=None)
    rows = [{**ok, "seed": 0, "factor": 1.0, "valid_accuracy": 0.4},
            {**ok, "seed": 1, "factor": 1.0, "valid_accuracy": 0.6},
            {**ok, "seed": 0, "factor": 10.0, "valid_accuracy": 0.9, "status": "failed", "error": "E: x"},
            {**ok, "seed": 1, "factor": 10.0, "valid_accuracy": 0.45}]
    sel = selection.select_factors(rows)[("permuted", "pc-ewc")]
    assert sel["factor"] == 1.0 and sel["valid_by_factor"] == [0.5, 0.45]
    assert sel["n_failed"] == 1 and sel["errors"] == ["E: x"] and not sel["all_failed"]
    chosen = selection.chosen_rows(rows, {("permuted", "pc-ewc"): sel})
    assert [r["seed"] for r in chosen] == [0, 1]
    summary = tables.summarize(chosen, {("permuted", "pc-ewc"): sel})
    assert tables.format_notes(summary) == ["! permuted/pc-ewc: 1 run(s) failed: E: x"]
    assert "pc-ewc!" in tables.format_summary(summary)


@pytest.mark.parametrize("kept", [False, True])
def test_cli_interrupt_says_what_was_kept(tmp_path, capsys, monkeypatch, kept):
    def interrupted(*a, out=None, **kw):
        if kept:
            (tmp_path / "runs.jsonl").write_text('{"key": "k", "row": {}}\n')
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run_comparison", interrupted)
    assert compare.main(["--quick", "--out", str(tmp_path), "--no-progress"]) == 130
    err = capsys.readouterr().err
    if kept:
        assert "interrupted: the finished runs are kept in" in err and "runs.jsonl" in err
    else:
        assert "interrupted before any run finished: nothing was kept" in err and "runs.jsonl" not in err


def test_cli_decades_with_quick_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        compare.parse_args(["--quick", "--decades", "1,-1", "--out", str(tmp_path)])
    assert "--decades is not used with --quick" in capsys.readouterr().err


def test_cli_ctrl_c_on_a_worker_pool_prints_no_worker_traceback(tmp_path):
    """Ctrl-C at a terminal reaches every process of the group: the workers leave quietly and the
    parent says what it kept."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    args = [*CLI_SWEEP, "--out", str(out)]
    args[args.index("--workers") + 1] = "2"
    args[args.index("--seeds") + 1] = "40"  # 120 runs: the sweep is still going when the interrupt comes
    p = subprocess.Popen([sys.executable, "-m", "pcreg_experiments", *args], cwd=ROOT,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"}, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    runs, t0 = out / "runs.jsonl", time.time()
    while not (runs.is_file() and runs.read_text().count("\n") >= 1) and time.time() - t0 < 240:
        if p.poll() is not None:
            pytest.fail("the sweep ended before it could be interrupted: " + p.stderr.read()[-2000:])
        time.sleep(0.05)
    # the workers first (a terminal delivers to all at once; this order makes the race certain)
    children = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout.split()
    assert children
    for pid in children:
        os.kill(int(pid), signal.SIGINT)
    time.sleep(1.0)
    os.killpg(p.pid, signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130 and "interrupted: the finished runs are kept" in err
    assert "SpawnPoolWorker" not in err and "Traceback" not in err, err[-3000:]


# --------------------------------------------------------------------------- the user's own stream


def _user_model():
    from helpers import mlp

    return mlp()  # seeded inside: the runner's seed decides nothing here, which the test checks


def _user_model_seeded():
    return torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 6))


def test_run_comparison_on_a_user_built_benchmark(tmp_path):
    """An Avalanche benchmark built from tensors and a model factory, through the same sweep, tables
    and figures; the validation split is seeded per run and each run equals a hand-built Naive run."""
    from avalanche.benchmarks.scenarios.validation_scenario import benchmark_with_validation_stream
    from avalanche.training.supervised import Naive
    from helpers import tiny_nc

    stream = runner.UserStream("tensors", tiny_nc(3), _user_model_seeded)
    grids = {"pc-ewc": [1.0, 100.0]}
    res = runner.run_comparison([stream], ["naive", "pc-ewc"], [0, 1], TINY, grids=grids, workers=1,
                                progress=False, out=tmp_path, plots=True)
    assert {r["scenario"] for r in res.rows} == {"tensors"} and len(res.rows) == 6
    assert all(r["status"] == "ok" and r["dataset"] == "tensors" and r["n_experiences"] == 3 for r in res.rows)
    assert [s["scenario"] for s in res.summary] == ["tensors", "tensors"]
    assert res.config["user_streams"] == ["tensors"]
    assert (tmp_path / "acc_matrix_tensors.png").is_file() and (tmp_path / "final_accuracy.png").is_file()
    # the naive run of seed 1, rebuilt by hand: the same validation split, initialisation and training
    bm = benchmark_with_validation_stream(tiny_nc(3), validation_size=0.2, shuffle=True, seed=1)
    torch.manual_seed(1)
    np.random.seed(1)
    model = _user_model_seeded()
    strategy = Naive(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=TINY.lr),
                     criterion=torch.nn.CrossEntropyLoss(), train_mb_size=32, train_epochs=1, eval_mb_size=512)
    for exp in bm.train_stream:
        strategy.train(exp)
    valid = strategy.eval(bm.valid_stream)
    acc = next(v for k, v in valid.items() if k.startswith("Top1_Acc_Stream/eval_phase/valid_stream"))
    row = next(r for r in res.rows if r["method"] == "naive" and r["seed"] == 1)
    assert row["valid_accuracy"] == pytest.approx(acc, abs=1e-6)
    # rerun: the user's runs are found in the results file by the stream's name
    msgs = []
    runner.run_comparison([stream], ["naive", "pc-ewc"], [0, 1], TINY, grids=grids, workers=1, progress=False,
                          out=tmp_path, plots=False, log=msgs.append)
    assert "6 of 6 runs already done" in msgs[0]


def test_user_stream_mixed_with_built_in_scenarios_and_through_the_cli(tmp_path, capsys):
    from helpers import tiny_nc

    stream = runner.UserStream("tensors", tiny_nc(3), _user_model)
    code = compare.main(["--quick", "--scenarios", "permuted", "--methods", "naive,pc-ewc", "--max-train-per-class",
                         "20", "--workers", "1", "--no-plots", "--no-progress", "--out", str(tmp_path)],
                        streams=[stream])
    assert code == 0
    out = capsys.readouterr().out
    assert "scenarios=permuted,tensors" in out and "tensors" in out.split("test accuracy")[-1]
    doc = json.loads((tmp_path / "results.json").read_text(), parse_constant=_reject_nan)
    assert {r["scenario"] for r in doc["results"]} == {"permuted", "tensors"}


def test_user_stream_bad_input_names_what_is_wrong():
    from helpers import tiny_nc

    with pytest.raises(ValueError, match="other than the built-in scenarios"):
        runner.UserStream("permuted", tiny_nc(3), _user_model)
    with pytest.raises(TypeError, match="benchmark must be an Avalanche benchmark with train_stream"):
        runner.UserStream("mine", [1, 2, 3], _user_model)
    with pytest.raises(TypeError, match="model_factory must be a callable"):
        runner.UserStream("mine", tiny_nc(3), "mlp")
    with pytest.raises(ValueError, match="validation must be a fraction"):
        runner.UserStream("mine", tiny_nc(3), _user_model, validation=1.5)
    s = runner.UserStream("mine", tiny_nc(3), _user_model)
    with pytest.raises(ValueError, match="scenario 'mine' given twice"):
        runner.plan_runs([s, s], ["naive"], [0], TINY)


# --------------------------------------------------------------------------- what the figures show


def test_pairs_stand_side_by_side_and_differences_are_paired_by_seed(tiny_result):
    from pcreg_experiments import figures

    res, out = tiny_result
    assert figures.comparison_order(METHOD_SET) == ["naive", "avl-ewc", "pc-ewc", "joint"]
    assert figures.comparison_order(["pc-ewc-online", "avl-ewc", "pc-l2", "avl-ewc-online", "naive"]) == [
        "naive", "avl-ewc", "pc-l2", "avl-ewc-online", "pc-ewc-online"]
    d = figures.paired_differences(res.chosen, "split-task")
    assert list(d) == ["pc-ewc"] and d["pc-ewc"]["ref"] == "avl-ewc"
    acc = {(r["method"], r["seed"]): r["avg_accuracy"] for r in res.chosen}
    by_seed = [acc[("pc-ewc", s)] - acc[("avl-ewc", s)] for s in SEEDS]
    assert d["pc-ewc"]["diffs"] == pytest.approx(by_seed, abs=0)
    assert d["pc-ewc"]["mean"] == pytest.approx(statistics.mean(by_seed))
    assert d["pc-ewc"]["std"] == pytest.approx(statistics.stdev(by_seed))


def test_cost_table_is_the_runs_step_times_and_state_bytes(tiny_result):
    res, out = tiny_result
    table = tables.format_costs(res.chosen)
    lines = {tuple(l.split()[:2]): l for l in table.splitlines()[2:]}
    assert set(lines) == {("split-task", "avl-ewc"), ("split-task", "pc-ewc")}
    for me in ("avl-ewc", "pc-ewc"):
        rs = [r for r in res.chosen if r["method"] == me]
        first = 1e3 * statistics.mean(r["step_time_per_exp_s"][0] for r in rs)
        kb = statistics.mean(r["reg_bytes_per_exp"][-1] for r in rs) / 1e3
        assert lines[("split-task", me)].split()[2] == f"{first:.2f}"
        assert lines[("split-task", me)].split()[-1] == f"{kb:.1f}"
    # Avalanche stores one (F, theta*) pair per experience, ours one consolidated pair: its bytes grow
    avl = [r for r in res.chosen if r["method"] == "avl-ewc"][0]["reg_bytes_per_exp"]
    ours = [r for r in res.chosen if r["method"] == "pc-ewc"][0]["reg_bytes_per_exp"]
    assert all(b > a for a, b in zip(avl, avl[1:])) and ours[-1] < avl[-1]
    assert "Cost against the number of experiences" in (out / "summary.md").read_text()
