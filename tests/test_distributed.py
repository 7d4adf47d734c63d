"""Distributed importances: 2 gloo processes on CPU, spawned from pytest.

Expected library behaviour: when ``torch.distributed`` is initialized, ``compute_importance`` shards a
Dataset by rank (``rank::world_size``), all-reduces the sums and the sample counts, and returns on
every rank what one process returns on the union of the data; ``ParameterChangePlugin`` on a
``DistributedDataParallel`` model stores names without DDP's ``module.`` prefix, and its anchors are
identical on every rank. The trajectory estimators hold one estimate on every rank too: ``rwalk``'s
task gradient (an extra pass on the rank's own minibatch, which DDP does not reduce) is averaged
over ranks, so RWalk (``rwalk`` and ``rwalk_fisher``) under DDP equals one process trained on the
ranks' minibatches put together; ``SynapticIntelligence`` on a DDP model leaves BatchNorm out by the
plain model's names.

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
RWALK_METHODS = ["rwalk", "rwalk_fisher"]
RWALK_EXPS, RWALK_EPOCHS = 2, 2
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


def make_rwalk_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 6))


def rwalk_strategy(model, method, plugins, cls=None):
    """Our RWalk drop-in (or ``cls``, a subclass); the same arguments on the ranks and in the
    single-process reference."""
    from avalanche_pcreg.training import RWalk

    return (cls or RWalk)(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                          criterion=nn.CrossEntropyLoss(), ewc_lambda=5.0, ewc_alpha=0.9, delta_t=2, train_mb_size=16,
                          train_epochs=RWALK_EPOCHS, device="cpu", plugins=plugins, evaluator=None, importance=method)


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
    from avalanche_pcreg.training import SynapticIntelligence
    from helpers import tiny_nc
    from test_distributed import METHODS, RWALK_EXPS, RWALK_METHODS, make_data, make_model, make_rwalk_model, rwalk_strategy

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

    class Batches(SupervisedPlugin, supports_distributed=True):  # this rank's minibatches, epoch by epoch
        def __init__(self):
            super().__init__()
            self.epochs = []
        def before_training_epoch(self, strategy, **kw):
            self.epochs.append([])
        def before_training_iteration(self, strategy, **kw):
            self.epochs[-1].append([t.detach().clone() for t in strategy.mbatch])

    from avalanche_pcreg.importance.rwalk import mean_over_ranks
    shapes = {"a": torch.zeros(3), "b": torch.zeros(2), "c": torch.zeros(1, dtype=torch.float64), "d": torch.zeros(2)}
    out["mean"] = mean_over_ranks(shapes, {  # b: a gradient on rank 0 only; d: on no rank
        "a": torch.full((3,), float(rank + 1)), "b": torch.ones(2) if rank == 0 else None,
        "c": torch.full((1,), 2.0 * rank, dtype=torch.float64), "d": None})

    out["rwalk"] = {}
    for method in RWALK_METHODS:
        torch.manual_seed(0)
        ddp = DDP(make_rwalk_model())
        batches = Batches()
        strategy = rwalk_strategy(ddp, method, [batches])
        states = []
        for exp in list(tiny_nc(3).train_stream)[:RWALK_EXPS]:
            strategy.train(exp)
            states.append((strategy.pcreg.importances, strategy.pcreg.anchors))
        out["rwalk"][method] = {"states": states, "batches": batches.epochs}

    # SynapticIntelligence on a DDP model with BatchNorm: regularized names are the plain model's
    torch.manual_seed(0)
    bn = nn.Sequential(nn.Linear(12, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 6))
    ddp = DDP(bn)
    si = SynapticIntelligence(model=ddp, optimizer=torch.optim.SGD(ddp.parameters(), lr=0.1),
                              criterion=nn.CrossEntropyLoss(), si_lambda=1.0, train_mb_size=16, device="cpu",
                              evaluator=None, importance="si")
    si.train(tiny_nc(3).train_stream[0])
    out["si"] = {"selected": sorted(si.pcreg.selected_parameters(ddp)), "importances": si.pcreg.importances}

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


class _Epochs:
    """A stand-in DataLoader that yields recorded minibatches, one recorded epoch per iteration."""

    def __init__(self, epochs):
        self.epochs, self.k = epochs, 0

    def __len__(self):
        return len(self.epochs[0])

    def __iter__(self):
        epoch = self.epochs[self.k]
        self.k += 1
        return iter(epoch)


def _rwalk_single_process(method, union_epochs):
    """One process, our RWalk, trained on the ranks' minibatches put together (the DDP step's
    averaged gradient is this minibatch's gradient: every rank's minibatch has the same size)."""
    from avalanche_pcreg.training import RWalk

    class Replay(RWalk):
        def make_train_dataloader(self, **kw):
            k = int(self.clock.train_exp_counter)
            self.dataloader = _Epochs(union_epochs[k * RWALK_EPOCHS:(k + 1) * RWALK_EPOCHS])

    torch.manual_seed(0)
    strategy = rwalk_strategy(make_rwalk_model(), method, [], cls=Replay)
    states = []
    for exp in list(tiny_nc(3).train_stream)[:RWALK_EXPS]:
        strategy.train(exp)
        states.append((strategy.pcreg.importances, strategy.pcreg.anchors))
    return states


@pytest.mark.parametrize("method", RWALK_METHODS)
def test_rwalk_under_ddp_is_one_estimate_on_every_rank(ranks, method):
    r0, r1 = ranks[0]["rwalk"][method], ranks[1]["rwalk"][method]
    assert len(r0["states"]) == len(r1["states"]) == RWALK_EXPS
    # each rank trained on its own shard
    assert len(r0["batches"]) == len(r1["batches"]) == RWALK_EXPS * RWALK_EPOCHS
    assert not torch.equal(r0["batches"][0][0][0], r1["batches"][0][0][0])
    # every rank holds the same importances and anchors, bit for bit
    for (imp0, mu0), (imp1, mu1) in zip(r0["states"], r1["states"]):
        assert set(imp0) == set(imp1) == {"0.weight", "0.bias", "2.weight", "2.bias"}
        for n in imp0:
            assert torch.equal(imp0[n], imp1[n]), n
            assert torch.equal(mu0[n], mu1[n]), n
    # ... and they are those of one process on the union of the ranks' minibatches
    union = [[[torch.cat([a, b]) for a, b in zip(b0, b1)] for b0, b1 in zip(e0, e1)]
             for e0, e1 in zip(r0["batches"], r1["batches"])]
    for e0, e1 in zip(r0["batches"], r1["batches"]):
        assert [b[0].shape[0] for b in e0] == [b[0].shape[0] for b in e1]
    ref = _rwalk_single_process(method, union)
    for k, ((imp, mu), (want_imp, want_mu)) in enumerate(zip(r0["states"], ref)):
        for n in want_imp:
            assert float(want_imp[n].max()) > 0
            torch.testing.assert_close(imp[n], want_imp[n], rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"{method}, experience {k}, {n}: {m}")
            torch.testing.assert_close(mu[n], want_mu[n], rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{method}, experience {k}, anchor {n}: {m}")


def test_si_under_ddp_leaves_batchnorm_out(ranks):
    plain = {"0.weight", "0.bias", "3.weight", "3.bias"}  # BatchNorm (1.*) left out, as Avalanche's SI does
    for r in ranks:
        assert set(r["si"]["selected"]) == set(r["si"]["importances"]) == plain
    for n in plain:
        assert torch.equal(ranks[0]["si"]["importances"][n], ranks[1]["si"]["importances"][n]), n


def test_mean_over_ranks(ranks):
    """rwalk's task gradients averaged over ranks: missing on a rank counts as zeros there, missing
    everywhere stays out; a float64 gradient is its own group."""
    for r in ranks:
        got = r["mean"]
        assert set(got) == {"a", "b", "c"}
        assert torch.equal(got["a"], torch.full((3,), 1.5))
        assert torch.equal(got["b"], torch.full((2,), 0.5))
        assert got["c"].dtype == torch.float64 and torch.equal(got["c"], torch.ones(1, dtype=torch.float64))
