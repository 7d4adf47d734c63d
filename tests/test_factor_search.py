"""factor="auto": the continual factor search (avalanche_pcreg.factor_search) in the plugin and in
the strategy classes, on the tiny class-incremental stream tiny_nc (3 experiences of 2 classes,
SGD lr 0.05, 2 epochs), where naive fine-tuning forgets most of the first experience."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import nn

from avalanche.core import SupervisedPlugin
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.training.plugins import EvaluationPlugin

import avalanche_pcreg.factor_search as fsm
from avalanche_pcreg import ParameterChangePlugin
from avalanche_pcreg.factor_search import FactorSearch, search_factor
from helpers import mlp, run_naive, tiny_nc


class TrainAccuracy(SupervisedPlugin):
    """After each experience: the accuracy on every experience's training data (the tiny stream's
    test data is drawn around other class centers, so the training data is what is measured)."""

    def __init__(self, benchmark):
        super().__init__()
        self.benchmark, self.rows = benchmark, []

    def after_training_exp(self, strategy, **kw):
        model, row = strategy.model, []
        was = model.training
        model.eval()
        with torch.no_grad():
            for exp in self.benchmark.train_stream:
                x, y, _ = next(iter(torch.utils.data.DataLoader(exp.dataset.eval(), batch_size=10 ** 6)))
                row.append(float((model(x).argmax(-1) == y).float().mean()))
        model.train(was)
        self.rows.append(row)


def _run(plugin=None, **kw):
    bench = tiny_nc(3)
    acc = TrainAccuracy(bench)
    strategy, _ = run_naive(bench, mlp(), ([plugin] if plugin is not None else []) + [acc], **kw)
    return strategy, acc.rows


def _searches(plugin):
    return [h["factor_search"] for h in plugin.history if "factor_search" in h]


@pytest.fixture(scope="module")
def naive_rows():
    return _run()[1]


# ----------------------------------------------------------------------------- the plugin


@pytest.mark.parametrize("importance", ["empirical_fisher", "mas"])
def test_auto_forgets_less_than_naive_and_learns_each_task_within_tolerance(naive_rows, importance):
    plugin = ParameterChangePlugin("auto", importance)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, rows = _run(plugin)
    # the factors chosen keep SGD stable and do not hold the model
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in caught]
    # naive fine-tuning keeps 34 % of the first experience; the searched factor keeps >= 85 %
    assert naive_rows[0][0] > 0.95 and naive_rows[-1][0] < 0.4
    assert rows[-1][0] > 0.85
    assert sum(rows[-1]) / 3 > sum(naive_rows[-1]) / 3 + 0.1
    searches = _searches(plugin)
    assert [h["experience"] for h in plugin.history if "factor_search" in h] == [1, 2]
    tol = plugin.factor_search.tol
    for k, s in enumerate(searches, start=1):
        assert s["met"] and s["accuracy"] >= (1 - tol) * s["plastic_accuracy"] - 1e-12
        assert s["threshold"] == pytest.approx((1 - tol) * s["plastic_accuracy"])
        assert s["factor"] == s["tried"][-1][0] and s["factor"] > 0
        # every factor passed over was larger, and fell short of the threshold or (None) would have
        # made plain SGD unstable over the real training: lr * 2 * factor * max(A) > 2
        assert all(f > s["factor"] and (a is None or a < s["threshold"]) for f, a in s["tried"][:-1])
        assert s["start"] == pytest.approx(plugin.factor_search.start_ratio * s["balance"])
        # the real training then learns the new experience: within the tolerance of the plastic
        # accuracy, and within 0.1 of naive fine-tuning's accuracy on it
        assert rows[k][k] >= (1 - tol) * s["plastic_accuracy"]
        assert rows[k][k] >= naive_rows[k][k] - 0.1
    assert plugin.factor == searches[-1]["factor"]
    assert [h["factor"] for h in plugin.history] == [0.0] + [s["factor"] for s in searches]


@pytest.mark.parametrize("importance,kw", [
    ("uniform", {}), ("empirical_fisher", {}), ("expected_fisher", {}), ("fisher", {}), ("mas", {}),
    ("minibatch_fisher", {}), ("si", {"mode": "online", "decay": 1.0}),
    ("rwalk_fisher", {"estimator_options": {"delta_t": 2}}),
    ("rwalk", {"mode": "online", "decay": 0.0, "estimator_options": {"delta_t": 2}}),
])
def test_auto_runs_with_every_estimator(importance, kw):
    plugin = ParameterChangePlugin("auto", importance, **kw)
    _, rows = _run(plugin)
    searches = _searches(plugin)
    assert len(searches) == 2 and all(s["factor"] > 0 for s in searches)
    # the scale-aware start sits above the accepted factor for every estimator, whatever the scale
    assert all(s["start"] >= s["factor"] for s in searches)
    assert rows[-1][0] > 0.5  # the first experience is not forgotten as naive forgets it (0.34)


def test_auto_publishes_its_choices_to_the_evaluator():
    bench = tiny_nc(3)
    plugin = ParameterChangePlugin("auto", "empirical_fisher")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "no loggers"
        evaluator = EvaluationPlugin(accuracy_metrics(experience=True), loggers=[])
    torch.manual_seed(0)
    model = mlp()
    from avalanche.training.supervised import Naive

    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                     criterion=nn.CrossEntropyLoss(), train_mb_size=32, train_epochs=2, plugins=[plugin],
                     evaluator=evaluator)
    for exp in bench.train_stream:
        strategy.train(exp)
    metrics = evaluator.get_all_metrics()
    searches = _searches(plugin)
    xs, factors = metrics["ParameterChange/factor"]
    assert xs == [1, 2] and factors == [s["factor"] for s in searches]
    assert metrics["ParameterChange/search_plastic_accuracy"][1] == [s["plastic_accuracy"] for s in searches]
    assert metrics["ParameterChange/search_accuracy"][1] == [s["accuracy"] for s in searches]
    # wall-clock time stays out of the loggers (a resumed run would not reproduce it)
    assert not any("time" in name for name in metrics if name.startswith("ParameterChange/"))
    assert all(s["time_s"] > 0 for s in searches)


class _Tag(SupervisedPlugin):
    """Placed before the regularizer: the experience whose before_training_exp is running, and the
    global random state just before the search."""

    def __init__(self):
        super().__init__()
        self.current, self.rng_before = None, []

    def before_training_exp(self, strategy, **kw):
        self.current = strategy.experience.current_experience
        self.rng_before.append(torch.get_rng_state())


class _After(SupervisedPlugin):
    def __init__(self):
        super().__init__()
        self.rng_after = []

    def before_training_exp(self, strategy, **kw):
        self.rng_after.append(torch.get_rng_state())


def test_search_reads_only_the_current_experience_and_leaves_the_rng(monkeypatch):
    """Every sample a search loader yields belongs to the experience being started (none to a past
    one), and all of that experience's samples are used (train part and held-out part); the global
    random number generator is the same before and after the search."""
    bench = tiny_nc(3)
    rows_of = [{tuple(x.tolist()) for x, *_ in exp.dataset} for exp in bench.train_stream]
    tag, after = _Tag(), _After()
    seen: dict = {}
    inner = fsm._loader

    def recording_loader(dataset, batch_size, shuffle, generator):
        loader = inner(dataset, batch_size, shuffle, generator)

        class Recording:
            def __iter__(self_inner):
                for batch in loader:
                    seen.setdefault(tag.current, set()).update(tuple(r.tolist()) for r in batch[0])
                    yield batch
        return Recording()

    monkeypatch.setattr(fsm, "_loader", recording_loader)
    plugin = ParameterChangePlugin("auto", "empirical_fisher")
    run_naive(bench, mlp(), [tag, plugin, after])
    assert sorted(seen) == [1, 2]  # no search before the first experience (no penalty yet)
    for k, rows in seen.items():
        assert rows == rows_of[k]  # exactly the current experience's samples
        assert all(not (rows & rows_of[j]) for j in range(k))  # nothing of a past experience
    s = _searches(plugin)[0]
    assert s["n_train"] + s["n_valid"] == len(rows_of[1]) and s["n_valid"] == round(0.2 * len(rows_of[1]))
    for before, after_ in zip(tag.rng_before, after.rng_after):
        assert torch.equal(before, after_)


def test_search_is_deterministic_and_does_not_train_the_model():
    bench = tiny_nc(3)
    runs = []
    for _ in range(2):
        plugin = ParameterChangePlugin("auto", "mas")
        strategy, _ = run_naive(bench, mlp(), [plugin])
        runs.append((_searches(plugin), [p.detach().clone() for p in strategy.model.parameters()]))
    (s1, p1), (s2, p2) = runs
    assert [s["tried"] for s in s1] == [s["tried"] for s in s2]
    assert all(torch.equal(a, b) for a, b in zip(p1, p2))
    # a run at the chosen factors, fixed, ends at the same parameters: the search changed nothing else
    fixed = ParameterChangePlugin(s1[0]["factor"], "mas")

    class Schedule(SupervisedPlugin):
        def before_training_exp(self, strategy, **kw):
            k = strategy.clock.train_exp_counter
            if k:
                fixed.factor = s1[k - 1]["factor"]

    strategy, _ = run_naive(bench, mlp(), [Schedule(), fixed])
    assert all(torch.equal(a, b) for a, b in zip(p1, strategy.model.parameters()))


def test_checkpoint_round_trip_keeps_the_chosen_factor():
    plugin = ParameterChangePlugin("auto", "empirical_fisher", factor_search=FactorSearch(tol=0.3, decay=0.25))
    _run(plugin)
    chosen = plugin.factor
    assert chosen == _searches(plugin)[-1]["factor"] and chosen > 0
    buf = io.BytesIO()
    torch.save(plugin.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=False)
    assert sd["factor"] == chosen and sd["factor_search"]["tol"] == 0.3
    fresh = ParameterChangePlugin("auto", "empirical_fisher", factor_search=FactorSearch(tol=0.3, decay=0.25))
    assert fresh.factor == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "saved with another factor" warning in auto mode
        fresh.load_state_dict(sd, strict=True)
    assert fresh.factor == chosen
    assert fresh.history == plugin.history
    # a run stopped after two experiences and resumed from the checkpoint: the factor is the one
    # chosen for the second experience until the third one's search
    bench = tiny_nc(3)

    def naive(model, plugin):
        from avalanche.training.supervised import Naive

        return Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                     criterion=nn.CrossEntropyLoss(), train_mb_size=32, train_epochs=2, plugins=[plugin],
                     evaluator=None)

    first, model = ParameterChangePlugin("auto", "mas"), mlp()
    strategy = naive(model, first)
    for exp in bench.train_stream[:2]:
        strategy.train(exp)
    second, resumed = ParameterChangePlugin("auto", "mas"), mlp()
    resumed.load_state_dict(model.state_dict())
    second.load_state_dict(first.state_dict())
    assert second.factor == first.factor == _searches(first)[-1]["factor"]
    naive(resumed, second).train(bench.train_stream[2])
    assert [h["experience"] for h in second.history] == [0, 1, 2]
    assert second.factor == _searches(second)[-1]["factor"] and len(_searches(second)) == 2


# ----------------------------------------------------------------------------- the strategy classes


@pytest.mark.parametrize("cls,kw", [
    ("EWC", {"ewc_lambda": "auto"}),
    ("EWC", {"ewc_lambda": "auto", "importance": "empirical_fisher", "factor_search": {"decay": 0.1}}),
    ("MAS", {"lambda_reg": "auto"}),
    ("SynapticIntelligence", {"si_lambda": "auto", "importance": "si"}),
    ("RWalk", {"ewc_lambda": "auto", "delta_t": 2}),
    ("L2", {"l2_lambda": "auto"}),
])
def test_strategy_classes_take_auto(cls, kw):
    import avalanche_pcreg.training as ours

    bench = tiny_nc(3)
    torch.manual_seed(0)
    model = mlp()
    strategy = getattr(ours, cls)(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                                  criterion=nn.CrossEntropyLoss(), train_mb_size=32, train_epochs=2,
                                  evaluator=None, **kw)
    for exp in bench.train_stream:
        strategy.train(exp)
    plugin = strategy.pcreg
    assert plugin.factor_search is not None
    if "factor_search" in kw:
        assert plugin.factor_search.decay == 0.1
    searches = _searches(plugin)
    assert len(searches) == 2 and plugin.factor == searches[-1]["factor"] > 0


# ----------------------------------------------------------------------------- options


@pytest.mark.parametrize("kw,exc,name", [
    ({"tol": 1.5}, ValueError, "tol"), ({"tol": 0}, ValueError, "tol"), ({"tol": "0.2"}, TypeError, "tol"),
    ({"decay": 1.0}, ValueError, "decay"), ({"decay": -0.5}, ValueError, "decay"),
    ({"epochs": 0}, ValueError, "epochs"), ({"epochs": 1.5}, ValueError, "epochs"),
    ({"validation": 1.0}, ValueError, "validation"), ({"validation": 0.0}, ValueError, "validation"),
    ({"max_steps": 0}, ValueError, "max_steps"), ({"start_ratio": 0}, ValueError, "start_ratio"),
    ({"start_ratio": float("inf")}, ValueError, "start_ratio"), ({"start_ratio": None}, TypeError, "start_ratio"),
    ({"epochs": 3, "max_epochs": 2}, ValueError, "max_epochs"), ({"max_epochs": 0}, ValueError, "max_epochs"),
])
def test_bad_search_options_name_the_option(kw, exc, name):
    with pytest.raises(exc, match=name):
        FactorSearch(**kw)
    with pytest.raises(exc, match=name):
        ParameterChangePlugin("auto", factor_search=kw)


def test_bad_factor_and_factor_search_arguments():
    import avalanche_pcreg.training as ours

    with pytest.raises(TypeError, match="factor must be a real number >= 0 or 'auto', got str 'automatic'"):
        ParameterChangePlugin("automatic")
    with pytest.raises(ValueError, match="factor_search is used only with factor='auto'"):
        ParameterChangePlugin(1.0, factor_search=FactorSearch())
    with pytest.raises(TypeError, match=r"factor_search has unknown options \['tolerance'\]"):
        ParameterChangePlugin("auto", factor_search={"tolerance": 0.1})
    with pytest.raises(TypeError, match="factor_search must be a FactorSearch"):
        ParameterChangePlugin("auto", factor_search=0.2)
    model = mlp()
    base = dict(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), criterion=nn.CrossEntropyLoss())
    with pytest.raises(TypeError, match="ewc_lambda must be a real number >= 0 or 'auto'"):
        ours.EWC(ewc_lambda="max", **base)
    with pytest.raises(TypeError, match="lambda_reg"):
        ours.MAS(lambda_reg="a", **base)
    with pytest.raises(TypeError, match="si_lambda"):
        ours.SynapticIntelligence(si_lambda="auto-ish", **base)
    with pytest.raises(TypeError, match="l2_lambda"):
        ours.L2(l2_lambda="x", **base)
    with pytest.raises(TypeError, match="ewc_lambda"):
        ours.RWalk(ewc_lambda="x", **base)


def test_search_function_alone_on_copies():
    """search_factor: the model it is given is not trained, and the held-out split is seeded."""
    bench = tiny_nc(3)
    model = mlp()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    anchor = {n: p.detach().clone() for n, p in model.named_parameters()}

    def penalty(m, f):
        return f * sum(((p - anchor[n]) ** 2).sum() for n, p in m.named_parameters())

    kw = dict(options=FactorSearch(epochs=2, max_steps=6), make_optimizer=lambda m: fsm.optimizer_like(opt, model, m),
              criterion=nn.CrossEntropyLoss(), penalty=penalty, batch_size=16, seed=3)
    r1 = search_factor(model, bench.train_stream[1].dataset, **kw)
    r2 = search_factor(model, bench.train_stream[1].dataset, **kw)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert r1.record() == {**r2.record(), "time_s": r1.time_s}
    assert 1 <= len([a for _, a in r1.tried if a is not None]) <= 6
    assert fsm.split_indices(10, 0.2, 3) == fsm.split_indices(10, 0.2, 3)
    train, valid = fsm.split_indices(10, 0.2, 3)
    assert len(valid) == 2 and sorted(train + valid) == list(range(10))


def test_search_that_meets_no_threshold_warns_and_uses_the_smallest_factor():
    plugin = ParameterChangePlugin("auto", "empirical_fisher", factor_search=FactorSearch(max_steps=2, tol=0.01))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _run(plugin)
    msgs = [str(w.message) for w in caught if "no factor tried reached" in str(w.message)]
    assert len(msgs) == 2 and "experience 1" in msgs[0] and "max_steps" in msgs[0]
    for s in _searches(plugin):
        trained = [(f, a) for f, a in s["tried"] if a is not None]
        assert not s["met"] and len(trained) == 2 and s["factor"] == min(f for f, _ in s["tried"])
        assert all(a < s["threshold"] for _, a in trained)


def test_search_errors_name_the_problem():
    with pytest.raises(ValueError, match="needs at least 2 samples"):
        fsm.split_indices(1, 0.2, 0)
    model = mlp()
    x, y = torch.randn(8, 12), torch.randn(8, 6)  # float targets (regression): no accuracy to compare
    data = torch.utils.data.TensorDataset(x, y)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="needs class-index targets"):
        search_factor(model, data, options=FactorSearch(), make_optimizer=lambda m: fsm.optimizer_like(opt, model, m),
                      criterion=nn.MSELoss(), penalty=lambda m, f: torch.zeros(()), batch_size=4)
    other = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="optimizer holds none of the model's parameters"):
        fsm.optimizer_like(other, model, mlp())
