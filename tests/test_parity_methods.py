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
