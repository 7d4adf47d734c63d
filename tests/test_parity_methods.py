"""Parity with Avalanche 0.6's SynapticIntelligencePlugin, MASPlugin and RWalkPlugin.

Each case trains the same seeded model twice with Naive over 3 experiences, once with the
Avalanche plugin and once with ours, and compares every iteration's loss (penalty included) and
the final parameters. A third run without any plugin checks that the penalty really mattered.
"""

import math
import warnings

import pytest
import torch
from avalanche.training.plugins import MASPlugin, RWalkPlugin, SynapticIntelligencePlugin

from avalanche_pcreg import ParameterChangePlugin
from helpers import MultiHeadMLP, mlp, run_naive, tiny_nc


def _compare(bench, make_model, ours, theirs, **run):
    m1, m2 = make_model(), make_model()
    _, rec_a = run_naive(bench, m1, [theirs], **run)
    _, rec_o = run_naive(bench, m2, [ours], **run)
    assert len(rec_a.losses) == len(rec_o.losses) > 0
    la = torch.tensor(rec_a.losses, dtype=torch.float64)
    lo = torch.tensor(rec_o.losses, dtype=torch.float64)
    assert torch.isfinite(la).all() and torch.isfinite(lo).all()
    rel = ((la - lo).abs() / la.abs().clamp_min(1e-12)).max().item()
    p1, p2 = dict(m1.named_parameters()), dict(m2.named_parameters())
    assert p1.keys() == p2.keys()
    prel = max(((p1[k] - p2[k]).abs().max() / p1[k].abs().max().clamp_min(1e-12)).item() for k in p1)
    # the penalty really mattered: final parameters differ from a run without it
    m3 = make_model()
    run_naive(bench, m3, [], **run)
    effect = max((p2[k] - dict(m3.named_parameters())[k]).abs().max().item() for k in p2)
    assert effect > 1e-3, effect
    return rel, prel


@pytest.fixture
def si_copies(monkeypatch):
    """Avalanche's SI as it runs on CUDA, where ``param.detach().cpu().flatten()`` is a copy.

    On CPU that expression is a *view* of the parameter, so Avalanche's "old" and "new"
    parameters, and its anchor, follow the live weights: the path integral and the penalty
    are identically zero (see test_avalanche_si_is_a_no_op_on_cpu). Cloning restores the
    CUDA behaviour, which is the reference for ``avalanche_si``.
    """

    def extract_weights(model, target, excluded_parameters):
        for name, param in SynapticIntelligencePlugin.allowed_parameters(model, excluded_parameters):
            target[name].data = param.detach().cpu().flatten().clone()

    monkeypatch.setattr(SynapticIntelligencePlugin, "extract_weights", staticmethod(extract_weights))


@pytest.mark.parametrize("si_lambda", [100.0, 1000.0])
def test_parity_avalanche_si(si_copies, si_lambda):
    bench = tiny_nc(3)
    rel, prel = _compare(
        bench, lambda: mlp(),
        ParameterChangePlugin(si_lambda / 2, "avalanche_si", "online", decay=0.0),
        SynapticIntelligencePlugin(si_lambda=si_lambda),
        lr=0.1, epochs=3,
    )
    print(f"avalanche_si lambda={si_lambda}: max rel loss diff {rel:.2e}, max rel param diff {prel:.2e}")
    assert rel <= 1e-5 and prel <= 1e-5


def test_avalanche_si_is_a_no_op_on_cpu():
    """Upstream defect: on CPU, Avalanche 0.6's SI changes nothing (its copies are views)."""
    bench = tiny_nc(3)
    m1, m2 = mlp(), mlp()
    run_naive(bench, m1, [SynapticIntelligencePlugin(si_lambda=1000.0)], momentum=0.9)
    run_naive(bench, m2, [], momentum=0.9)
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))
    # ours, with Avalanche's definition, does regularize on CPU
    m3 = mlp()
    s, _ = run_naive(bench, m3, [ParameterChangePlugin(500.0, "avalanche_si", "online", decay=0.0)], momentum=0.9)
    assert max((a - b).abs().max().item() for a, b in zip(m3.parameters(), m2.parameters())) > 1e-3
    assert s.plugins[0].history[-1]["importance_max"] > 0


@pytest.mark.parametrize("alpha", [0.5, 0.8])
def test_parity_avalanche_mas(alpha):
    bench = tiny_nc(3)
    rel, prel = _compare(
        bench, lambda: mlp(),
        ParameterChangePlugin(1.0, "avalanche_mas", "online", decay=alpha, running_average=True),
        MASPlugin(lambda_reg=1.0, alpha=alpha),
    )
    print(f"avalanche_mas alpha={alpha}: max rel loss diff {rel:.2e}, max rel param diff {prel:.2e}")
    assert rel <= 1e-5 and prel <= 1e-5


@pytest.mark.parametrize("delta_t", [1, 4])
def test_parity_rwalk(delta_t):
    bench = tiny_nc(3)
    rel, prel = _compare(
        bench, lambda: mlp(),
        ParameterChangePlugin(5.0, "rwalk", "online", decay=0.0,
                              estimator_options={"ewc_alpha": 0.9, "delta_t": delta_t}),
        RWalkPlugin(ewc_lambda=5.0, ewc_alpha=0.9, delta_t=delta_t),
    )
    print(f"rwalk delta_t={delta_t}: max rel loss diff {rel:.2e}, max rel param diff {prel:.2e}")
    assert rel <= 1e-5 and prel <= 1e-5


# ----------------------------------------------------------------------------- upstream defects
# The set-up where Avalanche 0.6's SI and MAS fail: a 12-32-6 MLP, SGD with momentum 0.9,
# 3 class-incremental experiences.

def _small():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.ReLU(), torch.nn.Linear(32, 6))


def _strategy_run(cls, epochs=5, **kw):
    from torch import nn
    from helpers import LossRecorder
    torch.manual_seed(0)
    model = _small()
    rec = LossRecorder()
    strategy = cls(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                   criterion=nn.CrossEntropyLoss(), train_mb_size=32, train_epochs=epochs, eval_mb_size=64,
                   plugins=[rec], evaluator=None, **kw)
    for exp in tiny_nc(3).train_stream:
        strategy.train(exp)
    return model, rec


def test_avalanche_si_no_op_and_ours_regularizes_on_small_mlp():
    import avalanche.training as avl
    from avalanche.training.supervised import Naive
    from avalanche_pcreg import training as ours
    naive, _ = _strategy_run(Naive)
    for lam in (1.0, 1000.0):
        theirs, _ = _strategy_run(avl.SynapticIntelligence, si_lambda=lam)
        assert all(torch.equal(a, b) for a, b in zip(theirs.parameters(), naive.parameters()))
    mine, rec = _strategy_run(ours.SynapticIntelligence, si_lambda=1000.0)
    assert all(math.isfinite(v) for v in rec.losses)
    assert max((a - b).abs().max().item() for a, b in zip(mine.parameters(), naive.parameters())) > 1e-2


def test_avalanche_mas_diverges_and_ours_does_not():
    import avalanche.training as avl
    from avalanche_pcreg import training as ours
    _, rec_a = _strategy_run(avl.MAS, lambda_reg=0.5)
    assert not all(math.isfinite(v) for v in rec_a.losses)  # Avalanche: inf, then NaN
    with pytest.warns(RuntimeWarning, match=r"penalty alone makes SGD unstable.*capped"):
        _, rec_o = _strategy_run(ours.MAS, lambda_reg=0.5)
    assert all(math.isfinite(v) for v in rec_o.losses)
    # identical to Avalanche as long as the guard does not bind: all of experience 0
    first = [i for i, e in enumerate(rec_o.exp_of_loss) if e == 0]
    assert [rec_o.losses[i] for i in first] == [rec_a.losses[i] for i in first]
    # and the penalty did act on later experiences
    from avalanche.training.supervised import Naive
    _, rec_n = _strategy_run(Naive)
    later = [i for i, e in enumerate(rec_o.exp_of_loss) if e > 0]
    assert max(abs(rec_o.losses[i] - rec_n.losses[i]) for i in later) > 1e-2


def test_stability_warning_without_guard_names_the_numbers():
    from avalanche_pcreg import ParameterChangePlugin
    m = _small()
    # without the guard the run diverges as Avalanche's does, but the plugin stops at the first
    # iteration whose penalty is not finite instead of training on (as Avalanche does)
    with pytest.warns(RuntimeWarning, match=r"lr \* 2 \* factor \* max\(A\).*Use factor <"), \
            pytest.raises(FloatingPointError, match=r"not finite\) at experience \d+, epoch \d+, iteration \d+"):
        run_naive(tiny_nc(3), m, [ParameterChangePlugin(0.5, "avalanche_mas", "online", decay=0.5,
                                                         running_average=True)],
                  momentum=0.9, epochs=5, lr=0.05)


def test_rwalk_keeps_train_mode():
    """Upstream defect: RWalkPlugin's extra backward (before every iteration) calls model.eval()
    and never restores it, so every training forward runs in eval mode (dropout off, batch-norm
    statistics frozen). Ours restores each module's flag."""
    from torch import nn
    from avalanche.core import SupervisedPlugin

    class Modes(SupervisedPlugin):
        def __init__(self):
            super().__init__()
            self.flags = []

        def before_forward(self, strategy, **kw):
            self.flags.append(strategy.model.training)

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 6))

    bench = tiny_nc(2)
    theirs, ours = Modes(), Modes()
    run_naive(bench, model(), [RWalkPlugin(), theirs])
    run_naive(bench, model(), [ParameterChangePlugin(0.1, "rwalk", "online", decay=0.0), ours])
    assert theirs.flags and not any(theirs.flags)  # every training forward ran in eval mode
    assert ours.flags and all(ours.flags)


@pytest.mark.parametrize("importance,opts", [("rwalk", {"delta_t": 3}), ("avalanche_si", None), ("si", None)])
def test_trajectory_state_survives_a_checkpoint(importance, opts):
    """Resume from plugin.state_dict() between experiences (fresh plugin, fresh strategy, model
    weights copied): the run continues exactly as the uninterrupted one (the path statistics that
    outlive an experience, e.g. RWalk's EWC++ Fisher and step counter, are in the checkpoint)."""
    import copy
    import pickle

    def plugin():
        return ParameterChangePlugin(5.0, importance, "online", decay=0.0, estimator_options=opts)

    bench = tiny_nc(3)
    full = mlp()
    p_full = plugin()
    s_full, _ = run_naive(bench, full, [p_full])

    first = mlp()
    p1 = plugin()
    from helpers import LossRecorder
    from avalanche.training.supervised import Naive
    from torch import nn

    def strategy(model, p):
        return Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                     criterion=nn.CrossEntropyLoss(), train_mb_size=32, train_epochs=2, eval_mb_size=64,
                     plugins=[p], evaluator=None)

    torch.manual_seed(0)
    s1 = strategy(first, p1)
    for exp in bench.train_stream[:2]:
        s1.train(exp)
    sd = pickle.loads(pickle.dumps(p1.state_dict()))
    rng = torch.random.get_rng_state()
    second = copy.deepcopy(first)
    p2 = plugin()
    p2.load_state_dict(sd)
    s2 = strategy(second, p2)
    s2.clock.train_iterations = s1.clock.train_iterations
    s2.clock.train_exp_counter = s1.clock.train_exp_counter
    torch.random.set_rng_state(rng)
    s2.train(bench.train_stream[2])
    for a, b in zip(full.parameters(), second.parameters()):
        assert torch.equal(a, b)
    # the importances merged at the end, which depend on the path statistics carried over
    assert p_full.importances.keys() == p2.importances.keys()
    for n, a in p_full.importances.items():
        assert torch.equal(a, p2.importances[n]), n
