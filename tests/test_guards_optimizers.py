"""The guards against a penalty that dominates, for any optimizer (Adam as well as SGD), and
``keep_importance_data``.

A run held at its anchors by the penalty (a factor far above its balance) forgets nothing and learns
nothing: the plugin warns after the experience's last epoch, naming the estimator in use and a
balancing factor, and that factor lets the model learn. A healthy run does not warn."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn

from avalanche.training.supervised import Naive

from avalanche_pcreg import ParameterChangePlugin
from avalanche_pcreg.state import ConsolidatedState
from helpers import mlp, tiny_nc

HELD = "the penalty holds the model at its anchors"


def _train(optimizer: str, lr: float, plugin, n_experiences=2, epochs=2):
    """Naive on the tiny class-incremental stream; returns the warnings and the accuracy on the
    last experience's training data."""
    bench = tiny_nc(n_experiences)
    model = mlp()
    torch.manual_seed(0)
    opt = (torch.optim.SGD if optimizer == "sgd" else torch.optim.Adam)(model.parameters(), lr=lr)
    strategy = Naive(model=model, optimizer=opt, criterion=nn.CrossEntropyLoss(), train_mb_size=32,
                     train_epochs=epochs, evaluator=None, plugins=[plugin])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for exp in bench.train_stream:
            strategy.train(exp)
    x, y, _ = next(iter(torch.utils.data.DataLoader(bench.train_stream[n_experiences - 1].dataset.eval(), batch_size=10 ** 6)))
    with torch.no_grad():
        accuracy = float((model(x).argmax(-1) == y).float().mean())
    return [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)], accuracy


def _balance(message: str) -> float:
    return float(re.search(r"The balance factor is ([0-9.e+-]+)", message).group(1))


@pytest.mark.parametrize("optimizer,lr,importance,factor", [
    ("adam", 0.01, "mas", 10.0),                 # MAS at factor 10 with Adam: frozen, forgetting 0
    ("adam", 0.01, "empirical_fisher", 1e4),
    ("sgd", 0.05, "uniform", 15.0),              # stable for SGD (lr * 2 * 15 * 1 < 2), and frozen
])
def test_held_by_the_penalty_warns_with_the_estimator_and_a_balancing_factor(optimizer, lr, importance, factor):
    msgs, accuracy = _train(optimizer, lr, ParameterChangePlugin(factor, importance))
    held = [m for m in msgs if HELD in m]
    assert accuracy < 0.15  # the new classes are not learned
    assert len(held) == 1, msgs
    m = held[0]
    assert f"importance={importance!r}" in m and ("Adam" if optimizer == "adam" else "SGD") in m
    assert f"factor={factor:g}" in m and "experience 1" in m and "factor='auto'" in m
    assert "accuracy on the experience's data is 0.0" in m and "chance: 0.333, 3 classes" in m
    balance = _balance(m)
    assert 0 < balance < factor / 2
    # the balancing factor lets the model learn the new experience, without the warning
    msgs2, accuracy2 = _train(optimizer, lr, ParameterChangePlugin(balance, importance))
    assert not [x for x in msgs2 if HELD in x]
    assert accuracy2 > accuracy + 0.3


@pytest.mark.parametrize("optimizer,lr,importance,factor,n", [
    ("adam", 0.01, "mas", 0.1, 2), ("adam", 0.01, "uniform", 0.01, 2), ("adam", 0.01, "empirical_fisher", 1.0, 2),
    ("sgd", 0.05, "mas", 1.0, 3), ("sgd", 0.05, "empirical_fisher", 0.5, 3),
])
def test_healthy_runs_do_not_warn(optimizer, lr, importance, factor, n):
    msgs, accuracy = _train(optimizer, lr, ParameterChangePlugin(factor, importance), n_experiences=n)
    assert msgs == []
    # as much as naive fine-tuning learns of the last experience (Adam: 0.42 in 6 steps; SGD: 0.70)
    assert accuracy > (0.35 if optimizer == "adam" else 0.6)


def test_warn_frozen_false_turns_the_check_off():
    msgs, _ = _train("adam", 0.01, ParameterChangePlugin(10.0, "mas", warn_frozen=False))
    assert not [m for m in msgs if HELD in m]
    with pytest.raises(TypeError, match="warn_frozen must be a bool"):
        ParameterChangePlugin(1.0, warn_frozen="no")


@pytest.mark.parametrize("importance,hint", [("uniform", False), ("mas", False), ("empirical_fisher", True)])
def test_penalty_ratio_warning_names_the_estimator_in_use(importance, hint):
    """The first non-zero penalty far above the task loss: the warning names the estimator in use,
    the factor that would make the two equal, and suggests the minibatch-Fisher ratio only for the
    per-sample Fisher estimators (where a lambda tuned for Avalanche's EWCPlugin is too strong)."""
    factor = 1e12
    msgs, _ = _train("adam", 0.01, ParameterChangePlugin(factor, importance, warn_frozen=False), epochs=1)
    ratio = [m for m in msgs if "x the task loss" in m]
    assert len(ratio) == 1, msgs
    m = ratio[0]
    assert f"importance={importance!r}" in m and "experience 1" in m
    assert ("importance_ratio(model, data, a='minibatch_fisher'" in m) == hint
    pen = float(re.search(r"the penalty \(([0-9.e+-]+)\)", m).group(1))
    loss = float(re.search(r"the task loss \(([0-9.e+-]+)\)", m).group(1))
    balance = float(re.search(r"factor=([0-9.e+-]+) would make the two equal", m).group(1))
    assert balance == pytest.approx(factor * loss / pen, rel=1e-2)


# ----------------------------------------------------------------------------- keep_importance_data


@pytest.fixture
def merged(monkeypatch):
    """What every consolidation received: the importances handed to ConsolidatedState.consolidated."""
    got = []
    inner = ConsolidatedState.consolidated

    def recording(self, importances, *args, **kwargs):
        got.append({n: v.detach().clone() for n, v in importances.items()})
        return inner(self, importances, *args, **kwargs)

    monkeypatch.setattr(ConsolidatedState, "consolidated", recording)
    return got


@pytest.mark.parametrize("importance,kw", [
    ("empirical_fisher", {"importance_scale": 2.0}),
    ("mas", {"mode": "online", "decay": 0.5, "running_average": True}),
    ("si", {"mode": "online", "decay": 1.0}),
])
def test_keep_importance_data_keeps_what_each_consolidation_received(merged, importance, kw):
    plugin = ParameterChangePlugin(0.1, importance, keep_importance_data=True, **kw)
    _train("sgd", 0.05, plugin, n_experiences=3)
    assert sorted(plugin.kept_importances) == [0, 1, 2] and len(merged) == 3
    for k, received in enumerate(merged):
        kept = plugin.kept_importances[k]
        assert kept.keys() == received.keys()
        for name, tensor in received.items():
            assert kept[name].device.type == "cpu"
            assert torch.equal(kept[name], tensor.cpu())
    # not the consolidated state: the per-experience tensors sum (or average) to it
    if importance == "empirical_fisher":
        for name, A in plugin.importances.items():
            assert torch.allclose(sum(plugin.kept_importances[k][name] for k in range(3)), A, rtol=1e-5, atol=1e-12)
    # checkpoints carry them
    again = ParameterChangePlugin(0.1, importance, keep_importance_data=True, **kw)
    again.load_state_dict(plugin.state_dict())
    assert all(torch.equal(again.kept_importances[k][n], plugin.kept_importances[k][n])
               for k in range(3) for n in plugin.kept_importances[k])


def test_keep_importance_data_is_off_by_default_and_checked(merged):
    plugin = ParameterChangePlugin(0.1, "empirical_fisher")
    _train("sgd", 0.05, plugin)
    assert plugin.kept_importances == {} and len(merged) == 2
    assert "kept_importances" not in plugin.state_dict()
    with pytest.raises(TypeError, match="keep_importance_data must be a bool"):
        ParameterChangePlugin(0.1, keep_importance_data=1)


def test_strategy_classes_pass_keep_importance_data(merged):
    import avalanche_pcreg.training as ours

    bench = tiny_nc(2)
    model = mlp()
    strategy = ours.EWC(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                        criterion=nn.CrossEntropyLoss(), ewc_lambda=1.0, keep_importance_data=True,
                        train_mb_size=32, evaluator=None)
    for exp in bench.train_stream:
        strategy.train(exp)
    assert strategy.pcreg.keep_importance_data and sorted(strategy.pcreg.kept_importances) == [0, 1]
    for k in range(2):
        assert all(torch.equal(strategy.pcreg.kept_importances[k][n], merged[k][n].cpu()) for n in merged[k])
