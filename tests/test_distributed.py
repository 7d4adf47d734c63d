"""Distributed importances: 2 gloo processes on CPU, spawned from pytest.

Expected library behaviour: when ``torch.distributed`` is initialized, ``compute_importance`` shards a
Dataset by rank (``rank::world_size``), all-reduces the sums and the sample counts, and returns on
every rank what one process returns on the union of the data; ``ParameterChangePlugin`` on a
``DistributedDataParallel`` model stores names without DDP's ``module.`` prefix, and its anchors are
identical on every rank.

Both ranks run one script (written to tmp_path) with torchrun-style environment variables
(RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT on a free port) and save what they computed; the
single-process references are computed here, in the pytest process, with no process group.
Subprocess timeout: ``PCREG_TEST_TIMEOUT`` seconds (default 600; a loaded 2-core machine needs minutes).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from avalanche_pcreg.importance import compute_importance
from helpers import tiny_nc

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
METHODS = ["empirical_fisher", "fisher", "expected_fisher", "mas", "minibatch_fisher", "uniform"]
TIMEOUT = float(os.environ.get("PCREG_TEST_TIMEOUT", "600"))
N_ODD = 101  # shards of 51 and 50 samples: different batch counts per rank


def make_data(n=N_ODD):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(n, 12, generator=g)
    y = torch.randint(0, 6, (n,), generator=g)
    return torch.utils.data.TensorDataset(x, y)


def make_model():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.LayerNorm(16), nn.Linear(16, 6))


SCRIPT = textwrap.dedent(r'''
    import copy, os, sys
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])

    # Import Avalanche BEFORE init_process_group: importing it afterwards on a rank != 0 raises
    # (avalanche.training builds an InteractiveLogger at import time, and loggers refuse to be
    # created outside the main process of a distributed run).
    from avalanche.core import SupervisedPlugin
    from avalanche.training import Naive
    from avalanche_pcreg import ParameterChangePlugin
    from avalanche_pcreg.importance import compute_importance
    from helpers import tiny_nc
    from test_distributed import METHODS, make_data, make_model

    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world)

    out = {"rank": rank, "compute": {}}
    data, model = make_data(), make_model()
    for m in METHODS:
        out["compute"][m] = compute_importance(model, data, m, batch_size=16, seed=5)

    class Snap(SupervisedPlugin, supports_distributed=True):  # before ours: the unwrapped model at each consolidation
        def __init__(self):
            super().__init__()
            self.models = []
        def after_training_exp(self, strategy, **kw):
            self.models.append(copy.deepcopy(strategy.model.module).state_dict())

    class Tap(SupervisedPlugin, supports_distributed=True):  # after ours: the state after each consolidation
        def __init__(self, plugin):
            super().__init__()
            self.plugin, self.states = plugin, []
        def after_training_exp(self, strategy, **kw):
            self.states.append((self.plugin.importances, self.plugin.anchors))

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 6))
    ddp = DDP(net)
    plugin = ParameterChangePlugin(5.0, "empirical_fisher", batch_size=16)
    snap, tap = Snap(), Tap(plugin)
    strategy = Naive(model=ddp, optimizer=torch.optim.SGD(ddp.parameters(), lr=0.05), criterion=nn.CrossEntropyLoss(),
                     train_mb_size=16, train_epochs=1, device="cpu", plugins=[snap, plugin, tap], evaluator=None)
    torch.manual_seed(1)
    for exp in list(tiny_nc(3).train_stream)[:2]:
        strategy.train(exp)
    out["compatible"] = strategy._check_distributed_training_compatibility()  # Avalanche's own check
    out["plugin"] = {"n": plugin.num_consolidations, "states": tap.states, "snapshots": snap.models,
                     "penalty": float(plugin.penalty(strategy.model).detach()),
                     "final": {k: v.detach().clone() for k, v in net.state_dict().items()}}
    torch.save(out, os.path.join(sys.argv[1], f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()
    print("rank", rank, "done")
''')


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    script = tmp / "rank_main.py"
    script.write_text(SCRIPT)
    port = _free_port()
    base = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                WORLD_SIZE=str(WORLD), PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp)], cwd=ROOT,
                              env=dict(base, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(WORLD)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    failed = [r for r, p in enumerate(procs) if p.returncode != 0]
    assert not failed, "\n".join(f"--- rank {r} (exit {procs[r].returncode}):\n{logs[r][-4000:]}" for r in range(WORLD))
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("method", METHODS)
def test_sharded_importance_equals_single_process_on_union(ranks, method):
    ref = compute_importance(make_model(), make_data(), method, batch_size=16, seed=5)
    for r in ranks:
        got = r["compute"][method]
        assert got.keys() == ref.keys()
        for n in ref:
            torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-7 * float(ref[n].abs().max()) + 1e-12,
                                       msg=lambda m: f"rank {r['rank']}, {method}, {n}: {m}")
    # every rank holds the same all-reduced result
    for n in ref:
        torch.testing.assert_close(ranks[0]["compute"][method][n], ranks[1]["compute"][method][n], rtol=0, atol=0)


def test_sharding_is_real(ranks):
    """One shard alone gives a different answer, so the test above can fail."""
    data = make_data()
    half = torch.utils.data.Subset(data, list(range(0, len(data), WORLD)))
    alone = compute_importance(make_model(), half, "empirical_fisher", batch_size=16, seed=5)
    full = ranks[0]["compute"]["empirical_fisher"]
    assert any(not torch.allclose(alone[n], full[n], rtol=1e-3) for n in full)


def test_plugin_under_ddp(ranks):
    assert ranks[0]["compatible"] is True and ranks[1]["compatible"] is True  # supports_distributed
    p0, p1 = ranks[0]["plugin"], ranks[1]["plugin"]
    assert p0["n"] == p1["n"] == 2
    exps = list(tiny_nc(3).train_stream)
    prev = None
    for k in range(2):
        (imp0, mu0), (imp1, mu1) = p0["states"][k], p1["states"][k]
        # no DDP prefix: the names of the module inside
        assert set(imp0) == set(mu0) == {"0.weight", "0.bias", "2.weight", "2.bias"}
        # anchors identical on every rank (DDP keeps replicas in sync); importances too (all-reduced)
        for n in mu0:
            assert torch.equal(mu0[n], mu1[n]), n
            assert torch.equal(imp0[n], imp1[n]), n
        # ... and equal to ONE process on the whole experience, at the weights of that consolidation:
        # A_k = A_{k-1} + F_k
        net = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 6))
        net.load_state_dict(p0["snapshots"][k])
        F_k = compute_importance(net, exps[k].dataset, "empirical_fisher", batch_size=16)
        for n, p in net.named_parameters():
            want = F_k[n] if prev is None else prev[n] + F_k[n]
            torch.testing.assert_close(imp0[n], want, rtol=1e-5, atol=1e-7 * float(want.abs().max()) + 1e-12,
                                       msg=lambda m: f"consolidation {k}, {n}: {m}")
            if k == 0:
                assert torch.equal(mu0[n], p.detach()), n
        prev = imp0
    for n in p0["final"]:
        assert torch.equal(p0["final"][n], p1["final"][n]), n
    assert p0["penalty"] == p1["penalty"] > 0
