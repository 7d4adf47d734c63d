"""Avalanche's own strategy tests, with our classes swapped in.

The test bodies below are adapted from ``tests/training/test_strategies.py`` of
ContinualAI/avalanche at tag v0.6.0 (``StrategyTest.test_ewc``, ``test_ewc_online``,
``test_rwalk``, ``test_synaptic_intelligence``, ``test_mas``; MIT license), with
``run_strategy`` from ``tests/training/test_strategy_utils.py`` and the fast benchmark of
``tests/unit_tests_utils.py::get_fast_benchmark`` (sklearn's ``make_classification``: 10 classes,
6 features, 5 experiences; built locally here with a fixed seed, no download).

Upstream they only check that training runs. Here every run is repeated with Avalanche's own
class (same seeds) and the evaluation results and final parameters must agree, and the
regularizer must have consolidated once per experience with non-zero importances.
"""

import io
import warnings

import pytest
import torch
from sklearn.datasets import make_classification
from sklearn.model_selection import train_test_split
from torch.nn import CrossEntropyLoss
from torch.optim import SGD

import avalanche.training as avl
from avalanche.benchmarks import nc_benchmark
from avalanche.benchmarks.utils.classification_dataset import (
    _make_taskaware_tensor_classification_dataset as make_tensor_dataset,
)
from avalanche.logging import TextLogger
from avalanche.models import MTSimpleMLP, SimpleMLP
from avalanche.training.plugins import RWalkPlugin
from avalanche.training.supervised import Naive
from avalanche.training.templates.base import PositionalArgumentsDeprecatedWarning

from avalanche_pcreg.training import EWC, MAS, RWalk, SynapticIntelligence
from test_parity_methods import si_copies  # noqa: F401  (fixture)

SEED = 1234
DEVICE = "cpu"


def get_fast_benchmark(use_task_labels=False, shuffle=True, n_samples_per_class=100, n_classes=10,
                       n_features=6, seed=SEED):
    X, y = make_classification(n_samples=n_classes * n_samples_per_class, n_classes=n_classes,
                               n_features=n_features, n_informative=6, n_redundant=0, random_state=seed)
    X, y = torch.from_numpy(X).float(), torch.from_numpy(y).long()
    train_X, test_X, train_y, test_y = train_test_split(X, y, train_size=0.6, shuffle=True, stratify=y,
                                                        random_state=seed)
    train, test = make_tensor_dataset(train_X, train_y), make_tensor_dataset(test_X, test_y)
    return nc_benchmark(train, test, 5, task_labels=use_task_labels, shuffle=shuffle, seed=seed)


def run_strategy(benchmark, cl_strategy):
    cl_strategy.evaluator.loggers = [TextLogger(io.StringIO())]
    torch.manual_seed(SEED)
    results = []
    for train_batch_info in benchmark.train_stream:
        cl_strategy.train(train_batch_info, num_workers=0)
        results.append(cl_strategy.eval(benchmark.test_stream[:]))
    return results


def init_scenario(multi_task=False):
    torch.manual_seed(SEED)
    model = MTSimpleMLP(input_size=6, hidden_size=10) if multi_task else SimpleMLP(input_size=6, hidden_size=10)
    optimizer = SGD(model.parameters(), lr=1e-4)
    criterion = CrossEntropyLoss()
    benchmark = get_fast_benchmark(use_task_labels=multi_task)
    return model, optimizer, criterion, benchmark


def check_same_as_avalanche(ours, make_theirs, multi_task, ours_results):
    """Run Avalanche's class on the same seeds; compare metrics and final parameters."""
    model, optimizer, criterion, benchmark = init_scenario(multi_task)
    theirs = make_theirs(model, optimizer, criterion)
    their_results = run_strategy(benchmark, theirs)
    for a, b in zip(their_results, ours_results):
        for key in a:
            if "Time" in key or not isinstance(a[key], float):
                continue
            assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), key
    for (n, p), q in zip(theirs.model.named_parameters(), ours.model.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-7), n
    plugin = ours.pcreg
    assert plugin.num_consolidations == 5
    assert max(h["importance_max"] for h in plugin.history) > 0


# ----------------------------------------------------------------------------- adapted tests

def test_ewc():
    # SIT scenario
    model, optimizer, criterion, benchmark = init_scenario(multi_task=False)
    with pytest.warns(PositionalArgumentsDeprecatedWarning):
        strategy = EWC(model, optimizer, criterion, ewc_lambda=0.4, mode="separate", train_mb_size=10,
                       eval_mb_size=50, train_epochs=2)
    res = run_strategy(benchmark, strategy)
    check_same_as_avalanche(strategy, lambda m, o, c: avl.EWC(
        model=m, optimizer=o, criterion=c, ewc_lambda=0.4, mode="separate", train_mb_size=10, eval_mb_size=50,
        train_epochs=2), False, res)

    # MT scenario
    model, optimizer, criterion, benchmark = init_scenario(multi_task=True)
    strategy = EWC(model=model, optimizer=optimizer, criterion=criterion, ewc_lambda=0.4, mode="separate",
                   train_mb_size=10, eval_mb_size=50, train_epochs=2)
    res = run_strategy(benchmark, strategy)
    check_same_as_avalanche(strategy, lambda m, o, c: avl.EWC(
        model=m, optimizer=o, criterion=c, ewc_lambda=0.4, mode="separate", train_mb_size=10, eval_mb_size=50,
        train_epochs=2), True, res)


def test_ewc_online():
    # SIT scenario
    model, optimizer, criterion, benchmark = init_scenario(multi_task=False)
    with pytest.warns(PositionalArgumentsDeprecatedWarning):
        strategy = EWC(model, optimizer, criterion, ewc_lambda=0.4, mode="online", decay_factor=0.1,
                       train_mb_size=10, eval_mb_size=50, train_epochs=2)
    res = run_strategy(benchmark, strategy)
    check_same_as_avalanche(strategy, lambda m, o, c: avl.EWC(
        model=m, optimizer=o, criterion=c, ewc_lambda=0.4, mode="online", decay_factor=0.1, train_mb_size=10,
        eval_mb_size=50, train_epochs=2), False, res)

    # MT scenario
    model, optimizer, criterion, benchmark = init_scenario(multi_task=True)
    strategy = EWC(model=model, optimizer=optimizer, criterion=criterion, ewc_lambda=0.4, mode="online",
                   decay_factor=0.1, train_mb_size=10, eval_mb_size=50, train_epochs=2)
    res = run_strategy(benchmark, strategy)
    check_same_as_avalanche(strategy, lambda m, o, c: avl.EWC(
        model=m, optimizer=o, criterion=c, ewc_lambda=0.4, mode="online", decay_factor=0.1, train_mb_size=10,
        eval_mb_size=50, train_epochs=2), True, res)


def test_rwalk():
    # SIT scenario. SimpleMLP has dropout; Avalanche's RWalkPlugin leaves the model in eval mode
    # after its first iteration (an upstream defect, see test_rwalk_keeps_train_mode), so the
    # comparison with Avalanche runs on the same model with dropout disabled.
    for drop in (0.5, 0.0):
        model, optimizer, criterion, benchmark = init_scenario(multi_task=False)
        if drop == 0.0:
            model.features[2].p = 0.0
        with pytest.warns(PositionalArgumentsDeprecatedWarning):
            strategy = RWalk(model, optimizer, criterion, ewc_lambda=0.1, ewc_alpha=0.9, delta_t=10,
                             train_mb_size=10, eval_mb_size=50, train_epochs=2)
        res = run_strategy(benchmark, strategy)
        assert strategy.pcreg.num_consolidations == 5
    check_same_as_avalanche(strategy, lambda m, o, c: Naive(
        model=_no_dropout(m), optimizer=o, criterion=c, train_mb_size=10, eval_mb_size=50, train_epochs=2,
        plugins=[RWalkPlugin(ewc_lambda=0.1, ewc_alpha=0.9, delta_t=10)]), False, res)

    # MT scenario (dropout disabled for the comparison, as above)
    model, optimizer, criterion, benchmark = init_scenario(multi_task=True)
    strategy = RWalk(model=_no_dropout(model), optimizer=optimizer, criterion=criterion, ewc_lambda=0.1,
                     ewc_alpha=0.9, delta_t=10, train_mb_size=10, eval_mb_size=50, train_epochs=2)
    res = run_strategy(benchmark, strategy)
    check_same_as_avalanche(strategy, lambda m, o, c: Naive(
        model=_no_dropout(m), optimizer=o, criterion=c, train_mb_size=10, eval_mb_size=50, train_epochs=2,
        plugins=[RWalkPlugin(ewc_lambda=0.1, ewc_alpha=0.9, delta_t=10)]), True, res)


def _no_dropout(model):
    model.features[2].p = 0.0
    return model


def test_synaptic_intelligence(si_copies):  # noqa: F811
    # SIT scenario
    model, optimizer, criterion, benchmark = init_scenario(multi_task=False)
    with pytest.warns(PositionalArgumentsDeprecatedWarning):
        strategy = SynapticIntelligence(model, optimizer, criterion, si_lambda=0.0001, train_epochs=1,
                                        train_mb_size=10, eval_mb_size=10)
    res = run_strategy(benchmark, strategy)
    check_same_as_avalanche(strategy, lambda m, o, c: avl.SynapticIntelligence(
        model=m, optimizer=o, criterion=c, si_lambda=0.0001, train_epochs=1, train_mb_size=10, eval_mb_size=10),
        False, res)

    # MT scenario
    model, optimizer, criterion, benchmark = init_scenario(multi_task=True)
    strategy = SynapticIntelligence(model=model, optimizer=optimizer, criterion=criterion, si_lambda=0.0001,
                                    train_epochs=1, train_mb_size=10, eval_mb_size=10)
    res = run_strategy(benchmark, strategy)
    check_same_as_avalanche(strategy, lambda m, o, c: avl.SynapticIntelligence(
        model=m, optimizer=o, criterion=c, si_lambda=0.0001, train_epochs=1, train_mb_size=10, eval_mb_size=10),
        True, res)


def test_mas():
    # SIT scenario
    model, optimizer, criterion, benchmark = init_scenario(multi_task=False)
    with pytest.warns(PositionalArgumentsDeprecatedWarning):
        strategy = MAS(model, optimizer, criterion, lambda_reg=1.0, alpha=0.5, train_mb_size=10, device=DEVICE,
                       eval_mb_size=50, train_epochs=2)
    res = run_strategy(benchmark, strategy)
    check_same_as_avalanche(strategy, lambda m, o, c: avl.MAS(
        model=m, optimizer=o, criterion=c, lambda_reg=1.0, alpha=0.5, train_mb_size=10, device=DEVICE,
        eval_mb_size=50, train_epochs=2), False, res)
