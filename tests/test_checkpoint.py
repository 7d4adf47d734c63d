"""Checkpointing ParameterChangePlugin.

* ``plugin.state_dict()`` / ``load_state_dict()`` round trip through ``torch.save``/``torch.load``
  (``weights_only=True``): the same state, the same penalty, the same training afterwards.
* Avalanche checkpointing across processes: a run stopped after experience k and resumed in a FRESH
  process (``avalanche.checkpointing.save_checkpoint(strategy, path, exclude=["optimizer"])`` +
  ``maybe_load_checkpoint``, the optimizer state saved separately with torch.save of
  ``optimizer.state_dict()``, RNGs through ``avalanche.training.determinism.rng_manager``) ends with
  bit-identical parameters, plugin state and accuracies as a run that never stopped, and with
  exactly the same metrics, ALL of them (the plugin publishes only figures a resumed run
  reproduces; wall-clock timings stay in ``plugin.history``).

Subprocess timeouts: ``PCREG_TEST_TIMEOUT`` seconds (default 600).
"""

from __future__ import annotations

import copy
import io
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from avalanche.training import Naive

from avalanche_pcreg import ParameterChangePlugin
from helpers import mlp, tiny_nc

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = float(os.environ.get("PCREG_TEST_TIMEOUT", "600"))
pytestmark = pytest.mark.filterwarnings("ignore:No loggers specified")


def _strategy(model, plugin, lr=0.05):
    return Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr), criterion=nn.CrossEntropyLoss(),
                 train_mb_size=16, train_epochs=1, eval_mb_size=64, device="cpu", plugins=[plugin], evaluator=None)


def _assert_same_state(a, b):
    assert a.num_consolidations == b.num_consolidations
    assert a.importances.keys() == b.importances.keys() == a.anchors.keys() == b.anchors.keys()
    for n in a.importances:
        assert torch.equal(a.importances[n], b.importances[n]), n
        assert a.importances[n].dtype == b.importances[n].dtype
        assert torch.equal(a.anchors[n], b.anchors[n]), n
    assert torch.equal(a.state.const, b.state.const) and a.state.const.dtype == torch.float64
    timeless = lambda h: [{k: v for k, v in d.items() if k != "importance_time_s"} for d in h]  # noqa: E731
    assert timeless(a.history) == timeless(b.history)  # history keeps the wall-clock timings


@pytest.mark.parametrize("importance,mode", [("empirical_fisher", "separate"), ("si", "online"), ("mas", "separate")])
def test_state_dict_round_trip(importance, mode):
    bench = tiny_nc(3)
    exps = list(bench.train_stream)
    kw = dict(decay=0.8) if mode == "online" else {}
    plugin = ParameterChangePlugin(5.0, importance, mode, **kw)
    model = mlp()
    strat = _strategy(model, plugin)
    torch.manual_seed(0)
    for exp in exps[:2]:
        strat.train(exp)
    assert plugin.num_consolidations == 2 and float(plugin.state.const) >= 0

    buf = io.BytesIO()
    torch.save(plugin.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)  # plain tensors/containers: loads without unpickling code
    loaded = ParameterChangePlugin(5.0, importance, mode, **kw)
    loaded.load_state_dict(sd)
    _assert_same_state(plugin, loaded)
    # the same penalty and gradient at a perturbed point
    probe = copy.deepcopy(model)
    with torch.no_grad():
        for p in probe.parameters():
            p.add_(0.1 * torch.randn_like(p))
    pa, pb = plugin.penalty(probe), loaded.penalty(probe)
    assert pa.item() > 0 and torch.equal(pa, pb)
    ga = torch.autograd.grad(pa, list(probe.parameters()))
    gb = torch.autograd.grad(loaded.penalty(probe), list(probe.parameters()))
    assert all(torch.equal(x, y) for x, y in zip(ga, gb))

    # training on with the original and with the restored plugin gives the same run
    model_b = copy.deepcopy(model)
    strat_b = _strategy(model_b, loaded)
    torch.manual_seed(5)
    strat.train(exps[2])
    torch.manual_seed(5)
    strat_b.train(exps[2])
    for (n, p), (_, q) in zip(model.named_parameters(), model_b.named_parameters()):
        assert torch.equal(p, q), n
    _assert_same_state(plugin, loaded)


SCRIPT = textwrap.dedent(r'''
    """Train 3 experiences with checkpoints after each; 'full' never stops, 'part1' stops after
    experience STOP, 'part2' resumes from the checkpoint. Writes <mode>.pt."""
    import sys
    from pathlib import Path

    import torch
    from torch import nn

    torch.set_num_threads(1)
    from avalanche.checkpointing import maybe_load_checkpoint, save_checkpoint
    from avalanche.evaluation.metrics import accuracy_metrics, loss_metrics
    from avalanche.training import Naive
    from avalanche.training.determinism.rng_manager import RNGManager
    from avalanche.training.plugins import EvaluationPlugin

    from avalanche_pcreg import ParameterChangePlugin
    from helpers import tiny_nc

    mode, workdir, stop = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    ckpt, optf = workdir / "ckpt.pkl", workdir / "optimizer.pt"
    LR, MOMENTUM = 0.05, 0.9

    RNGManager.set_random_seeds(1234)
    bench = tiny_nc(3)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 6))
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    plugin = ParameterChangePlugin(5.0, "empirical_fisher", num_samples=50, batch_size=8)
    evaluator = EvaluationPlugin(accuracy_metrics(experience=True, stream=True),
                                 loss_metrics(epoch=True, experience=True, stream=True), loggers=[])
    strategy = Naive(model=model, optimizer=optimizer, criterion=nn.CrossEntropyLoss(), train_mb_size=16,
                     train_epochs=2, eval_mb_size=64, device="cpu", plugins=[plugin], evaluator=evaluator)

    strategy, start = maybe_load_checkpoint(strategy, ckpt)
    if mode == "part2":
        assert start == stop + 1, (start, stop)
        # The optimizer was excluded from the checkpoint: rebuild it on the restored model's
        # parameters and load its state (momentum buffers) saved next to it.
        optimizer = torch.optim.SGD(strategy.model.parameters(), lr=LR, momentum=MOMENTUM)
        optimizer.load_state_dict(torch.load(optf, weights_only=True))
        strategy.optimizer = optimizer
        plugin = next(p for p in strategy.plugins if isinstance(p, ParameterChangePlugin))
    else:
        assert start == 0

    accs = {}
    for i, exp in enumerate(bench.train_stream):
        if i < start:
            continue
        strategy.train(exp)
        res = strategy.eval(bench.test_stream)
        accs[i] = {k: float(v) for k, v in res.items() if k.startswith("Top1_Acc")}
        save_checkpoint(strategy, ckpt, exclude=["optimizer"])
        torch.save(strategy.optimizer.state_dict(), optf)
        if mode == "part1" and i == stop:
            break

    torch.save({"params": {k: v.clone() for k, v in strategy.model.state_dict().items()},
                "plugin": plugin.state_dict(), "accs": accs, "start": start,
                "momentum": [s["momentum_buffer"].clone() for s in strategy.optimizer.state.values()],
                "metrics": strategy.evaluator.get_all_metrics()},
               workdir / f"{mode}.pt")
    print("done", mode, start, sorted(accs))
''')


def _run_script(script, mode, workdir, stop):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    proc = subprocess.run([sys.executable, str(script), mode, str(workdir), str(stop)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, f"{mode} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return torch.load(workdir / f"{mode}.pt", weights_only=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Four fresh processes: 'full'; 'part1' (stops after experience 1, i.e. two consolidations);
    'part2' resumes it; 'fresh_opt' resumes a copy of part1's checkpoint with a FRESH optimizer."""
    tmp = tmp_path_factory.mktemp("ckpt")
    script = tmp / "train_ckpt.py"
    script.write_text(SCRIPT)
    no_opt = tmp / "train_ckpt_fresh_optimizer.py"
    no_opt.write_text(SCRIPT.replace("optimizer.load_state_dict(torch.load(optf, weights_only=True))", "pass"))
    stop = 1
    dirs = {k: tmp / k for k in ("full", "resumed", "fresh_opt")}
    for d in dirs.values():
        d.mkdir()
    out = {"full": _run_script(script, "full", dirs["full"], stop),
           "part1": _run_script(script, "part1", dirs["resumed"], stop)}
    shutil.copytree(dirs["resumed"], dirs["fresh_opt"], dirs_exist_ok=True)
    out["part2"] = _run_script(script, "part2", dirs["resumed"], stop)
    out["fresh_opt"] = _run_script(no_opt, "part2", dirs["fresh_opt"], stop)
    return out


def test_resume_in_fresh_process_is_bit_identical(runs):
    full, part1, part2 = runs["full"], runs["part1"], runs["part2"]
    assert sorted(full["accs"]) == [0, 1, 2] and sorted(part1["accs"]) == [0, 1] and sorted(part2["accs"]) == [2]
    assert part2["start"] == 2
    # same accuracies, experience by experience, as the run that never stopped
    assert {**part1["accs"], **part2["accs"]} == full["accs"]
    assert len(full["accs"][2]) >= 4  # per-experience and stream accuracies were recorded
    # bit-identical parameters
    assert full["params"].keys() == part2["params"].keys()
    for k in full["params"]:
        assert torch.equal(full["params"][k], part2["params"][k]), k
    # ... and plugin state (3 consolidations, the last one after the resume point)
    pa, pb = ParameterChangePlugin(5.0), ParameterChangePlugin(5.0)
    pa.load_state_dict(full["plugin"])
    pb.load_state_dict(part2["plugin"])
    assert pa.num_consolidations == pb.num_consolidations == 3
    assert pa.importances.keys() == pb.importances.keys()
    for n in pa.importances:
        assert torch.equal(pa.importances[n], pb.importances[n]) and torch.equal(pa.anchors[n], pb.anchors[n]), n
    assert torch.equal(pa.state.const, pb.state.const) and float(pa.state.const) > 0
    assert [h["experience"] for h in pa.history] == [h["experience"] for h in pb.history] == [0, 1, 2]
    # the optimizer state really was carried (momentum buffers nonzero and identical)
    assert len(full["momentum"]) == len(part2["momentum"]) > 0
    assert all(torch.equal(x, y) for x, y in zip(full["momentum"], part2["momentum"]))
    assert any(float(x.abs().sum()) > 0 for x in full["momentum"])


def test_resume_reproduces_every_metric(runs):
    """Every metric of the evaluator, nothing stripped: the resumed run (whose evaluator came back
    with the checkpoint) logged exactly what the run that never stopped logged."""
    full, part2 = runs["full"]["metrics"], runs["part2"]["metrics"]
    ours = {k for k in full if k.startswith("ParameterChange/")}
    assert ours == {f"ParameterChange/{s}" for s in ("importance_mean", "importance_max", "importance_zero_frac",
                                                     "penalty_epoch")}
    assert any(k.startswith("Top1_Acc") for k in full) and any(k.startswith("Loss_") for k in full)
    assert full.keys() == part2.keys()
    for k in full:
        assert full[k] == part2[k], k
    assert len(full["ParameterChange/penalty_epoch"][1]) == 4  # 2 epochs x experiences 2 and 3
    # the comparison can fail: the run resumed with a fresh optimizer logs other losses
    fresh = runs["fresh_opt"]["metrics"]
    assert fresh["ParameterChange/penalty_epoch"] != full["ParameterChange/penalty_epoch"]


def test_resume_without_optimizer_state_differs(runs):
    """The check above can fail: resuming with a FRESH optimizer (momentum lost) does not reproduce
    the uninterrupted run, although everything else (model, plugin, RNGs) was restored."""
    full, fresh = runs["full"], runs["fresh_opt"]
    assert fresh["start"] == 2
    assert any(not torch.equal(full["params"][k], fresh["params"][k]) for k in full["params"])


# --------------------------------------------------------------------------- the README's recipe, as written

README_PRELUDE = textwrap.dedent(r'''
    """The README's usage set-up (Adam, the plugin, 3 permuted-digits experiences), then its checkpoint
    block verbatim. argv: the number of experiences this process may see (an interrupted run sees fewer)."""
    import sys

    import torch
    from torch import nn
    from avalanche.training.determinism.rng_manager import RNGManager
    from avalanche.training.supervised import Naive
    from avalanche_pcreg import ParameterChangePlugin
    from pcreg_experiments.data import make_benchmark

    torch.set_num_threads(1)
    RNGManager.set_random_seeds(0)
    full = make_benchmark("permuted", n_experiences=3, max_train_per_class=30).benchmark

    class Interrupted:  # the same benchmark, stopped after argv[1] experiences
        train_stream = full.train_stream[: int(sys.argv[1])]

    benchmark = Interrupted
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 100), nn.ReLU(), nn.Linear(100, 10))
    ewc = ParameterChangePlugin(factor=10.0, importance="empirical_fisher", mode="separate")
    strategy = Naive(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
                     criterion=nn.CrossEntropyLoss(), train_mb_size=32, train_epochs=2, plugins=[ewc])
''')


def test_readme_checkpoint_recipe_resumes_bit_identically(tmp_path):
    """The README's checkpoint block, pasted as it stands: a run interrupted after 2 experiences and
    resumed in a fresh process ends with the parameters, Adam moments and plugin state of a run that
    never stopped, bit for bit. Restoring the optimizer's state into the optimizer the strategy was
    built with (still attached to the pre-checkpoint model) gave a different run."""
    from test_readme import README, python_blocks

    block = next(code for _, code in python_blocks(README) if "maybe_load_checkpoint(" in code)
    epilogue = ('\ntorch.save({"params": strategy.model.state_dict(), "optim": strategy.optimizer.state_dict(),'
                ' "plugin": strategy.plugins[0].state_dict(), "start": start}, "final.pt")\n')
    script = tmp_path / "recipe.py"
    script.write_text(README_PRELUDE + block + epilogue)
    # the harness (pcreg_experiments) from the checkout: the script runs outside it
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))

    def run(workdir, n):
        workdir.mkdir(exist_ok=True)
        proc = subprocess.run([sys.executable, str(script), str(n)], cwd=workdir, env=env,
                              capture_output=True, text=True, timeout=TIMEOUT)
        assert proc.returncode == 0, proc.stderr[-4000:]
        return torch.load(workdir / "final.pt", weights_only=False)

    full = run(tmp_path / "full", 3)
    assert run(tmp_path / "resumed", 2)["start"] == 0
    resumed = run(tmp_path / "resumed", 3)
    assert full["start"] == 0 and resumed["start"] == 2
    for k, v in full["params"].items():
        assert torch.equal(v, resumed["params"][k]), k
    moments = [(s["exp_avg"], r["exp_avg"]) for s, r in zip(full["optim"]["state"].values(),
                                                            resumed["optim"]["state"].values())]
    assert moments and all(torch.equal(a, b) for a, b in moments)
    a, b = full["plugin"]["state"], resumed["plugin"]["state"]
    assert full["plugin"]["state"]["num_consolidations"] == 3
    for n in a["importances"]:
        assert torch.equal(a["importances"][n], b["importances"][n]) and torch.equal(a["anchors"][n], b["anchors"][n])
