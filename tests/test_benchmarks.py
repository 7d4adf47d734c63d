"""The benchmark scripts run: ``--help``, the refusal of ``--device cuda`` without CUDA, and a tiny
CPU run of each (smallest settings), in a subprocess. The correctness checks the scripts print
are parsed and asserted; no timing is asserted."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
SCRIPTS = ("bench_penalty.py", "bench_importance.py", "bench_memory.py", "bench_kfac.py")


def run(script, *args, cwd, timeout=240):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, os.path.join(BENCH, script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def floats(pattern, text):
    found = [float(x) for x in re.findall(pattern, text)]
    assert found, f"{pattern!r} not in output:\n{text[-3000:]}"
    return found


HELP_ALL = """
import runpy, sys
for script in sys.argv[1:]:
    sys.argv = [script, "--help"]
    print("=== " + script, flush=True)
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        print("=== exit", e.code, flush=True)
"""


def test_help(tmp_path):
    """Each script's --help, run as __main__ (one subprocess for the three: imports are the cost)."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONWARNINGS="ignore")
    r = subprocess.run([sys.executable, "-c", HELP_ALL, *[os.path.join(BENCH, s) for s in SCRIPTS]], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    parts = r.stdout.split("=== ")[1:]
    assert len(parts) == 2 * len(SCRIPTS)
    for i, script in enumerate(SCRIPTS):
        head, text, code = parts[2 * i], parts[2 * i].split("\n", 1)[1], parts[2 * i + 1]
        assert head.startswith(os.path.join(BENCH, script)) and code.strip() == "exit 0", (script, code)
        assert f"usage: {script}" in text and "--device {cpu,cuda}" in text and "--threads" in text
        if script == "bench_importance.py":
            assert "--peers" in text and "--peers-md" in text and "--rounds" in text
        if script == "bench_penalty.py":
            assert "--rounds" in text and "--min-steps" in text
        if script == "bench_memory.py":
            assert "--T T" in text
        if script == "bench_kfac.py":
            assert "--T T" in text and "--tasks" in text


def test_bench_kfac_quick(tmp_path):
    """The KFAC tables: every penalty timed against naive, and the nearest pair equal to the exact
    pairs after one task (and not after two: the inputs are permuted between tasks)."""
    r = run("bench_kfac.py", "--quick", "--raw-malloc", "--threads", "1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("diag", "kfac-online", "kfac-exact", "kfac-nearest"):
        assert len(floats(rf"\| mlp\s+\| \d+\s+\| {name}\s+\| ([0-9.]+) \[", r.stdout)) == 2, name
    errs = floats(r"\| \d+\s+\| ([0-9.]+)\s+\| [0-9.]+\s+\|\n", r.stdout)
    assert errs[0] == 0.0 and errs[1] > 0.0


def load_script(name):
    """Import a benchmark script as a module (its main() is not run)."""
    import importlib.util

    if BENCH not in sys.path:
        sys.path.insert(0, BENCH)
    spec = importlib.util.spec_from_file_location(f"pcreg_bench_{name}", os.path.join(BENCH, name))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_columns_bound_tiny(tmp_path):
    r = run("bench_importance.py", "--columns-bound", "--quick", "--raw-malloc", "--n", "2", "--resnet-classes", "3",
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ResNet-18 32×32, 3 classes: exact expected Fisher's columns alone, N = 2" in r.stdout
    (ratio,) = floats(r"forward \+ 2 column backward passes alone: ([0-9.]+)x the floor", r.stdout)
    assert ratio > 0


def test_resnet_classes_refused_below_two_before_any_work(tmp_path):
    r = run("bench_importance.py", "--resnet-classes", "1", "--quick", cwd=tmp_path)
    assert r.returncode == 2
    assert "argument --resnet-classes" in r.stderr and "expected a number of classes >= 2, got '1'" in r.stderr
    assert r.stdout == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: nothing to refuse")
def test_cuda_refused_at_parsing_before_any_work(tmp_path):
    r = run("bench_importance.py", "--device", "cuda", "--quick", cwd=tmp_path)
    assert r.returncode == 2  # argparse's usage error
    assert "argument --device" in r.stderr and "no CUDA device is available" in r.stderr
    assert "--device cpu" in r.stderr
    assert r.stdout == ""  # refused before any work (not even the machine info)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: nothing to refuse")
def test_every_script_parses_device_through_the_refusing_type(capsys):
    common = load_script("common.py")
    with pytest.raises(SystemExit) as err:
        common.base_parser("x").parse_args(["--device", "cuda"])
    assert err.value.code == 2
    assert "no CUDA device is available" in capsys.readouterr().err
    assert common.base_parser("x").parse_args(["--device", "CPU"]).device == "cpu"
    with pytest.raises(SystemExit):
        common.base_parser("x").parse_args(["--device", "tpu"])
    assert "invalid device 'tpu'" in capsys.readouterr().err
    for script in SCRIPTS:  # every script builds its parser on base_parser and parses before working
        src = open(os.path.join(BENCH, script)).read()
        main = src[src.index("def main("):]
        assert "base_parser(" in main and main.index("parse_args()") < main.index("resolve_device(")


def test_penalty_tiny_cpu_run(tmp_path):
    plot = tmp_path / "step.png"
    r = run("bench_penalty.py", "--quick", "--raw-malloc", "--T", "1", "2", "--rounds", "1", "--steps", "2", "--min-steps", "1",
            "--warmup", "1", "--block", "1", "--threads", "1", "--plot", str(plot), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    # our penalty and gradient against Avalanche's EWCPlugin and a float64 reference, at T=2
    for impl in ("ours-forloop", "ours-foreach"):
        line = next(ln for ln in r.stdout.splitlines() if f"value check T=2: {impl}" in ln)
        rels = floats(r"(\d\.\d+e[-+]\d+)", line)
        assert len(rels) == 4 and max(rels) < 1e-4, line
    assert "| naive" in r.stdout and "| ours-forloop" in r.stdout
    assert plot.exists()


def test_penalty_ab_base_run(tmp_path):
    """--ab-base times another checkout's plugin next to ours (here the same checkout, loaded a second
    time under another name) and prints the per-round ratio; --impls keeps one kernel; no figure."""
    r = run("bench_penalty.py", "--quick", "--raw-malloc", "--T", "1", "--rounds", "1", "--steps", "2", "--min-steps", "1",
            "--warmup", "1", "--block", "1", "--threads", "1", "--impls", "forloop", "--ab-base", ROOT, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| base-forloop" in r.stdout and "| ours-foreach" not in r.stdout
    assert len(floats(r"A/B ours-forloop T=1 / base-forloop T=1 \(cpu time, per-round ratios\): (\d+\.\d+)", r.stdout)) == 1
    r = run("bench_penalty.py", "--quick", "--ab-base", str(tmp_path), cwd=tmp_path)
    assert r.returncode != 0 and "--ab-base: no avalanche_pcreg package in" in r.stderr


def test_memory_tiny_cpu_run(tmp_path):
    plot = tmp_path / "mem.png"
    r = run("bench_memory.py", "--quick", "--T", "3", "--threads", "1", "--plot", str(plot), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ours separate flat at 2P floats for every T in 1..3: True; Avalanche separate = 2TP floats for every T: True" \
        in r.stdout
    assert floats(r"at T=3: Avalanche separate / ours separate = (\d+\.\d)x", r.stdout) == [3.0]
    assert plot.exists()


def test_importance_tiny_cpu_run(tmp_path):
    r = run("bench_importance.py", "--quick", "--raw-malloc", "--rounds", "1", "--n", "32", "--batch", "16",
            "--check-n", "32", "--threads", "1", "--variants", "ours empirical_fisher", "ours expected_fisher",
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert max(floats(r"ours empirical_fisher vs naive loop: rel diff (\S+?);", r.stdout)) < 1e-5
    assert floats(r"ours minibatch_fisher vs Avalanche: (\S+)", r.stdout) == [0.0]
    assert max(floats(r"ours expected_fisher vs per-sample per-class loop: rel diff (\S+)", r.stdout)) < 1e-5
    # peak memory, measured in subprocesses: a training step and ours empirical_fisher
    row = next(ln for ln in r.stdout.splitlines() if ln.startswith("| ours empirical_fisher"))
    assert float(row.split("|")[5]) > 0


def test_importance_peer_table_tiny(tmp_path):
    md = tmp_path / "RESULTS.md"
    md.write_text("# Results\n\nbefore\n")
    r = run("bench_importance.py", "--peers", "--quick", "--raw-malloc", "--models", "mlp", "--n", "16",
            "--batch-peers", "8", "--estimators", "empirical_fisher", "expected_fisher", "--peers-md", str(md),
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    # every variant (the installed peers, the per-sample loops) computed what ours computed
    checks = floats(r"check .*?: max relative difference vs ours (\S+) over", r.stdout)
    assert len(checks) >= 2 and max(checks) < 1e-5
    for peer in ("BackPACK", "Opacus", "nngeometry"):
        assert f"{peer}: " in r.stdout  # a version, or "not installed, skipped"
    text = md.read_text()
    assert text.startswith("# Results\n\nbefore\n")
    assert "| MLP 784-400-400-10, empirical Fisher | 16, 8 |" in text
    assert "| MLP 784-400-400-10, exact expected Fisher | 16, 8 |" in text
    assert "Load average (1/5/15 min) at start" in text and f"torch {torch.__version__}" in text


def test_peer_table_regeneration_replaces_its_block(tmp_path):
    bi = load_script("bench_importance.py")
    md = tmp_path / "RESULTS.md"
    md.write_text("# Results\n\nintro\n")
    bi.write_between_markers(str(md), "table one")
    bi.write_between_markers(str(md), "table two")
    text = md.read_text()
    assert text == f"# Results\n\nintro\n\n{bi.PEERS_MD_BEGIN}\ntable two\n{bi.PEERS_MD_END}\n"
    md.write_text(text + "\n## after\n")
    bi.write_between_markers(str(md), "table three")
    assert md.read_text().endswith(f"{bi.PEERS_MD_BEGIN}\ntable three\n{bi.PEERS_MD_END}\n\n## after\n")


def test_cuda_figures_script_calls_real_options_and_variants(tmp_path):
    """benchmarks/cuda_figures.sh, run with a stand-in interpreter that records its arguments:
    every step runs, each benchmark option it passes exists in that script (or in common.py's
    base parser), and each --variants name is one of bench_importance.py's variants."""
    calls = tmp_path / "calls.txt"
    fake = tmp_path / "fake_python"
    fake.write_text(f'#!/usr/bin/env bash\nprintf "%s\\0" "$@" >> {calls}\nprintf "\\n" >> {calls}\n')
    fake.chmod(0o755)
    r = subprocess.run(["bash", os.path.join(BENCH, "cuda_figures.sh"), str(tmp_path / "logs")], cwd=ROOT,
                       env=dict(os.environ, PYTHON=str(fake)), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    commands = [line.split("\0")[:-1] for line in calls.read_text().splitlines() if line]
    assert len(commands) == 8 and commands[0][:2] == ["-m", "pytest"] and commands[0][-1] == "tests/test_cuda.py"
    assert os.path.exists(os.path.join(ROOT, "tests", "test_cuda.py"))
    sources = {s: open(os.path.join(BENCH, s)).read() for s in SCRIPTS}
    common = open(os.path.join(BENCH, "common.py")).read()
    names = set(load_script("bench_importance.py").variants())
    for cmd in commands[1:]:
        script = os.path.basename(cmd[0])
        assert cmd[0] == f"benchmarks/{script}" and script in sources, cmd
        for i, tok in enumerate(cmd):
            if tok.startswith("--"):
                assert f'"{tok}"' in sources[script] or f'"{tok}"' in common, (script, tok)
            if tok == "--variants":
                chosen = [v for v in cmd[i + 1:] if not v.startswith("--")]
                assert chosen and set(chosen) <= names, chosen
        assert cmd[cmd.index("--device") + 1] == "cuda"


def test_batched_conv_variant_gives_a_policy_with_the_batched_conv_paths():
    """The A/B variant of bench_importance.py passes compute_importance a policy whose non-CPU
    convolutions take the batched paths; on the CPU, the device's policy."""
    from avalanche_pcreg.importance import Policy

    bench = load_script("bench_importance.py")
    seen = []
    real = bench.compute_importance
    try:
        bench.compute_importance = lambda model, data, method, **kw: seen.append((method, kw["policy"]))
        variant = bench.v_ours_batched_conv("expected_fisher")
        variant(None, None, 4, torch.device("meta"))
        variant(None, None, 4, torch.device("cpu"))
    finally:
        bench.compute_importance = real
    assert seen == [("expected_fisher", Policy.gpu().replace(conv_path="batched")), ("expected_fisher", Policy.cpu())]
    assert set(bench.GPU_ONLY) <= set(bench.variants())
    with pytest.raises(Exception, match="FIELD=VALUE"):
        bench.parse_policy_change("nope=1")
    assert bench.parse_policy_change("columns_per_backward=None") == {"columns_per_backward": None}
    assert bench.parse_policy_change("gram_fold=1") == {"gram_fold": 1}
