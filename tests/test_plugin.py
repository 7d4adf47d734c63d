"""ParameterChangePlugin inside Avalanche: arguments, selection, logging, SI, data, multi-task."""

import copy
import dataclasses
import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
from avalanche.benchmarks.utils.classification_dataset import (
    _make_taskaware_tensor_classification_dataset as make_tensor_classification_dataset,
)
from avalanche.core import SupervisedPlugin
from avalanche.logging import BaseLogger
from avalanche.training.plugins import EvaluationPlugin, ReplayPlugin
from avalanche.training.supervised import Cumulative, Naive

from avalanche_pcreg import ParameterChangePlugin
from avalanche_pcreg.importance.persample import Policy
from avalanche_pcreg.options import PluginOptions
from helpers import MultiHeadMLP, mlp, tensor_data, tiny_nc

F64 = torch.float64


# ----------------------------------------------------------------------------- helpers
def make_strategy(model, plugins, *, evaluator=None, lr=0.05, epochs=1, mb=32, cls=Naive, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    return cls(model=model, optimizer=opt, criterion=nn.CrossEntropyLoss(), train_mb_size=mb,
               train_epochs=epochs, eval_mb_size=64, device="cpu", plugins=plugins, evaluator=evaluator, **kw)


def brute_empirical_fisher(model, dataset, names=None):
    """Mean over samples of squared per-sample CE gradients; float64 accumulation, eval mode."""
    model = copy.deepcopy(model).eval()
    params = dict(model.named_parameters())
    names = names or list(params)
    acc = {n: torch.zeros(params[n].shape, dtype=F64) for n in names}
    multitask = hasattr(model, "forward_single_task")
    for i in range(len(dataset)):
        item = dataset[i]
        x, y, t = torch.as_tensor(item[0])[None], torch.tensor([int(item[1])]), torch.tensor([int(item[-1])])
        out = model(x, t) if multitask else model(x)
        gs = torch.autograd.grad(F.cross_entropy(out, y), [params[n] for n in names], allow_unused=True)
        for n, g in zip(names, gs):
            if g is not None:
                acc[n] += g.to(F64) ** 2
    return {n: a / len(dataset) for n, a in acc.items()}


def assert_close_to(got, ref, rtol=1e-4):
    for n in ref:
        scale = ref[n].abs().max().item()
        torch.testing.assert_close(got[n].to(F64), ref[n], rtol=rtol, atol=rtol * scale + 1e-12,
                                   msg=lambda m: f"{n}: {m}")


class ModelWithUnusedHead(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(12, 8)
        self.head = nn.Linear(8, 6)
        self.unused = nn.Linear(8, 6)  # never called: no gradient

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


class ModelSnapshot(SupervisedPlugin):
    """Deep-copies the model at the end of every experience (put it before the plugin)."""

    def __init__(self):
        super().__init__()
        self.models = []

    def after_training_exp(self, strategy, **kw):
        self.models.append(copy.deepcopy(strategy.model))


class RecordingLogger(BaseLogger):
    def __init__(self):
        super().__init__()
        self.records = []

    def log_single_metric(self, name, value, x_plot):
        self.records.append((name, value, x_plot))

    def of(self, name):
        return [(x, v) for n, v, x in self.records if n == name]


# ----------------------------------------------------------------------------- constructor errors
@pytest.mark.parametrize("factor", [-1.0, float("nan"), float("inf")])
def test_error_factor_value(factor):
    with pytest.raises(ValueError, match="factor"):
        ParameterChangePlugin(factor)


@pytest.mark.parametrize("factor", ["10", None, False, [1.0]])
def test_error_factor_type(factor):
    with pytest.raises(TypeError, match="factor"):
        ParameterChangePlugin(factor)


def test_error_unknown_importance_lists_names():
    with pytest.raises(ValueError) as err:
        ParameterChangePlugin(1.0, "ewc")
    for name in ("uniform", "empirical_fisher", "fisher", "expected_fisher", "minibatch_fisher", "mas", "si"):
        assert name in str(err.value)


def test_error_unknown_mode_and_importance_data():
    with pytest.raises(ValueError, match=r"mode.*'offline'|'offline'.*mode"):
        ParameterChangePlugin(1.0, mode="offline")
    with pytest.raises(ValueError, match="importance_data"):
        ParameterChangePlugin(1.0, importance_data="buffer")


def test_error_decay():
    with pytest.raises(ValueError, match="decay"):
        ParameterChangePlugin(1.0, mode="separate", decay=0.9)
    for bad in (-0.5, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="decay"):
            ParameterChangePlugin(1.0, mode="online", decay=bad)
    with pytest.raises(TypeError, match="decay"):
        ParameterChangePlugin(1.0, mode="online", decay="0.9")
    assert ParameterChangePlugin(1.0, mode="online", decay=0.0).decay == 0.0


@pytest.mark.parametrize("arg", ["include", "exclude"])
@pytest.mark.parametrize("bad", [[], ["0.*", 4], [None], (b"0.*",)])
def test_error_include_exclude_types(arg, bad):
    with pytest.raises(TypeError, match=arg):
        ParameterChangePlugin(1.0, **{arg: bad})


@pytest.mark.parametrize("arg", ["include", "exclude"])
def test_error_include_exclude_non_iterable_names_argument(arg):
    with pytest.raises(TypeError, match=arg):
        ParameterChangePlugin(1.0, **{arg: 3})


def test_error_other_arguments():
    with pytest.raises(TypeError, match="parameters"):
        ParameterChangePlugin(1.0, parameters="0.weight")
    for bad in (0, -2, 1.5):
        with pytest.raises(ValueError, match="batch_size"):
            ParameterChangePlugin(1.0, batch_size=bad)
        with pytest.raises(ValueError, match="num_samples"):
            ParameterChangePlugin(1.0, num_samples=bad)
    with pytest.raises(ValueError, match="xi"):
        ParameterChangePlugin(1.0, "si", xi=0.0)
    with pytest.raises(ValueError, match="xi"):
        ParameterChangePlugin(1.0, "si", xi=-1.0)


@pytest.mark.parametrize("kw", [dict(impl="cuda"), dict(chunk_size=0)])
def test_error_impl_and_chunk_size_at_construction(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        ParameterChangePlugin(1.0, **kw)


@pytest.mark.parametrize("arg", ["include", "exclude"])
def test_error_pattern_matching_no_parameter(arg):
    plugin = ParameterChangePlugin(1.0, **{arg: ["0.*", "backbone.*"]})
    strategy = make_strategy(mlp(), [plugin])
    with pytest.raises(ValueError, match=rf"{arg} pattern 'backbone\.\*'"):
        strategy.train(tiny_nc(1).train_stream[0])


# ----------------------------------------------------------------------------- selection
def _train_one(plugin, model=None):
    bench = tiny_nc(1)
    model = model or mlp()
    strategy = make_strategy(model, [plugin], epochs=1)
    strategy.train(bench.train_stream[0])
    return model, bench.train_stream[0].dataset.eval()


def test_exclude_bias():
    plugin = ParameterChangePlugin(1.0, exclude="*.bias")
    model, data = _train_one(plugin)
    assert sorted(plugin.importances) == ["0.weight", "2.weight", "4.weight"]
    assert_close_to(plugin.importances, brute_empirical_fisher(model, data, list(plugin.importances)))


def test_include_backbone_only():
    plugin = ParameterChangePlugin(1.0, include=["0.*", "2.*"])
    model, data = _train_one(plugin)
    assert sorted(plugin.importances) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    assert_close_to(plugin.importances, brute_empirical_fisher(model, data, list(plugin.importances)))
    # the penalty ignores the head entirely
    before = plugin.penalty(model).item()
    with torch.no_grad():
        model[4].weight.add_(10.0)
    assert plugin.penalty(model).item() == before
    with torch.no_grad():
        model[0].weight.add_(0.01)
    assert plugin.penalty(model).item() > before


def test_include_and_exclude_and_callable():
    plugin = ParameterChangePlugin(1.0, include="*.weight", exclude="4.*",
                                   parameters=lambda name, p: p.dim() == 2 and p.shape[0] == 16)
    _train_one(plugin)
    assert sorted(plugin.importances) == ["0.weight", "2.weight"]


def test_frozen_parameters_skipped():
    model = mlp()
    model[0].weight.requires_grad_(False)
    model[0].bias.requires_grad_(False)
    plugin = ParameterChangePlugin(1.0)
    model, data = _train_one(plugin, model)
    assert "0.weight" not in plugin.importances and "0.bias" not in plugin.importances
    assert sorted(plugin.importances) == ["2.bias", "2.weight", "4.bias", "4.weight"]
    assert_close_to(plugin.importances, brute_empirical_fisher(model, data, list(plugin.importances)))


@pytest.mark.parametrize("importance", ["empirical_fisher", "fisher", "expected_fisher", "mas", "minibatch_fisher", "si"])
def test_parameters_without_gradient_get_zero_importance(importance):
    plugin = ParameterChangePlugin(1.0, importance)
    model, _ = _train_one(plugin, ModelWithUnusedHead())
    imp = plugin.importances
    assert torch.count_nonzero(imp["unused.weight"]) == 0 and torch.count_nonzero(imp["unused.bias"]) == 0
    assert imp["head.weight"].abs().sum() > 0 and imp["body.weight"].abs().sum() > 0


# ----------------------------------------------------------------------------- logging
class PenaltyProbe(SupervisedPlugin):
    """Put after the plugin: records plugin.penalty(model) at every before_backward, per epoch."""

    def __init__(self, plugin):
        super().__init__()
        self.plugin = plugin
        self.per_epoch = []

    def before_training_epoch(self, strategy, **kw):
        self.per_epoch.append([])

    def before_backward(self, strategy, **kw):
        self.per_epoch[-1].append(self.plugin.penalty(strategy.model).item())


def test_logger_sees_penalty_and_importance_statistics():
    produced = []

    def recorded_importance(model, data, *, names, **_):
        g = torch.Generator().manual_seed(len(produced))
        p = dict(model.named_parameters())
        out = {}
        for n in names:
            t = torch.rand(p[n].shape, generator=g) * (len(produced) + 1)
            t[t < 0.3] = 0.0
            out[n] = t
        produced.append(out)
        return out

    logger = RecordingLogger()
    plugin = ParameterChangePlugin(2.0, recorded_importance)
    probe = PenaltyProbe(plugin)
    evaluator = EvaluationPlugin(loggers=[logger])
    strategy = make_strategy(mlp(), [plugin, probe], evaluator=evaluator, epochs=2)
    for exp in tiny_nc(3).train_stream:
        strategy.train(exp)

    assert len(produced) == 3
    for stat in ("importance_mean", "importance_max", "importance_zero_frac"):
        rows = logger.of(f"ParameterChange/{stat}")
        assert [x for x, _ in rows] == [0, 1, 2], stat
    # wall-clock time is not a metric (a resumed run could not reproduce it): history only
    assert logger.of("ParameterChange/importance_time_s") == []
    assert {n for n, _, _ in logger.records if n.startswith("ParameterChange/")} == {
        f"ParameterChange/{s}" for s in ("importance_mean", "importance_max", "importance_zero_frac", "penalty_epoch")}
    for k, imp in enumerate(produced):
        flat = torch.cat([t.reshape(-1).double() for t in imp.values()])
        assert logger.of("ParameterChange/importance_mean")[k][1] == pytest.approx(flat.mean().item(), rel=1e-9)
        assert logger.of("ParameterChange/importance_max")[k][1] == pytest.approx(flat.max().item(), rel=1e-7)
        assert logger.of("ParameterChange/importance_zero_frac")[k][1] == pytest.approx((flat == 0).double().mean().item())
        assert plugin.history[k]["importance_time_s"] >= 0.0
        assert plugin.history[k]["importance_mean"] == pytest.approx(flat.mean().item(), rel=1e-9)
        assert plugin.history[k]["state_bytes"] == 2 * 4 * flat.numel()

    # penalty_epoch: one value per epoch once the state is non-empty (experiences 2 and 3)
    pen = logger.of("ParameterChange/penalty_epoch")
    probed = [sum(e) / len(e) for e in probe.per_epoch[2:]]
    assert len(pen) == 4 and all(v > 0 for v in probed)
    for (x, v), ref in zip(pen, probed):
        assert v == pytest.approx(ref, rel=1e-5)
    assert all(len(e) == 0 or max(e) == 0 for e in probe.per_epoch[:2])  # empty state in experience 1
    xs = [x for x, _ in pen]
    assert xs == sorted(xs) and len(set(xs)) == 4


# ----------------------------------------------------------------------------- SI
class BatchRecorder(SupervisedPlugin):
    def __init__(self):
        super().__init__()
        self.batches = []

    def before_forward(self, strategy, **kw):
        self.batches.append((strategy.clock.train_exp_counter, strategy.mb_x.clone(), strategy.mb_y.clone()))


def brute_si(model0, batches, n_exps, lr, factor, xi, with_penalty_grad=True):
    """Replay plain SGD in float64: omega += -g * dtheta per step (g: total loss, penalty included),
    Omega_t = max(omega / (Delta**2 + xi), 0), separate-mode A = sum_t Omega_t, anchors theta_end."""
    model = copy.deepcopy(model0).double()
    params = dict(model.named_parameters())
    A = {n: torch.zeros_like(p) for n, p in params.items()}
    anchors = None
    for t in range(n_exps):
        start = {n: p.detach().clone() for n, p in params.items()}
        omega = {n: torch.zeros_like(p) for n, p in params.items()}
        for exp, x, y in batches:
            if exp != t:
                continue
            loss = F.cross_entropy(model(x.double()), y)
            grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
            with torch.no_grad():
                for n, p in params.items():
                    g = grads[n]
                    if anchors is not None and with_penalty_grad:
                        g = g + 2 * factor * A[n] * (p - anchors[n])
                    before = p.clone()
                    p -= lr * g
                    omega[n] += -g * (p - before)
        with torch.no_grad():
            for n, p in params.items():
                delta = p - start[n]
                A[n] += (omega[n] / (delta * delta + xi)).clamp_min(0.0)
            anchors = {n: p.detach().clone() for n, p in params.items()}
    return A


def test_si_matches_brute_force_replay():
    lr, factor, xi = 0.1, 5.0, 0.05
    model = mlp()
    model0 = copy.deepcopy(model)
    rec = BatchRecorder()
    plugin = ParameterChangePlugin(factor, "si", xi=xi)
    strategy = make_strategy(model, [plugin, rec], lr=lr, epochs=2, mb=32)
    for exp in tiny_nc(2).train_stream:
        strategy.train(exp)
    ref = brute_si(model0, rec.batches, 2, lr, factor, xi)
    got = plugin.importances
    assert set(got) == set(ref)
    assert_close_to(got, ref, rtol=2e-4)
    # the reference is sensitive: dropping the penalty from g changes A by more than the tolerance
    alt = brute_si(model0, rec.batches, 2, lr, factor, xi, with_penalty_grad=False)
    assert max(((alt[n] - ref[n]).abs().max() / ref[n].abs().max()).item() for n in ref) > 1e-2


# ----------------------------------------------------------------------------- importance data
def _counting_estimator(counts):
    def counting(model, data, *, names, **_):
        counts.append(len(data.dataset))
        p = dict(model.named_parameters())
        return {n: torch.ones_like(p[n]) for n in names}

    return counting


def test_importance_data_experience_counts_experience_only():
    counts = []
    bench = tiny_nc(3)
    plugin = ParameterChangePlugin(1.0, _counting_estimator(counts))
    strategy = make_strategy(mlp(), [ReplayPlugin(mem_size=30), plugin])
    for exp in bench.train_stream:
        strategy.train(exp)
    assert counts == [len(e.dataset) for e in bench.train_stream]


def test_importance_data_adapted_with_cumulative():
    counts = []
    bench = tiny_nc(3)
    plugin = ParameterChangePlugin(1.0, _counting_estimator(counts), importance_data="adapted")
    strategy = make_strategy(mlp(), [plugin], cls=Cumulative)
    for exp in bench.train_stream:
        strategy.train(exp)
    sizes = [len(e.dataset) for e in bench.train_stream]
    assert counts == [sum(sizes[: k + 1]) for k in range(3)]


def test_importance_data_adapted_with_replay_includes_buffer():
    counts = []
    bench = tiny_nc(3)
    plugin = ParameterChangePlugin(1.0, _counting_estimator(counts), importance_data="adapted")
    replay = ReplayPlugin(mem_size=30)
    strategy = make_strategy(mlp(), [replay, plugin])
    for exp in bench.train_stream:
        strategy.train(exp)
    n = [len(e.dataset) for e in bench.train_stream]
    assert counts == [n[0], n[1] + 30, n[2] + 30]


# ----------------------------------------------------------------------------- multi-task and empty experiences
def test_multitask_module_importances():
    bench = tiny_nc(2, task_labels=True)
    model = MultiHeadMLP()
    snap = ModelSnapshot()
    plugin = ParameterChangePlugin(1.0, "empirical_fisher")
    strategy = make_strategy(model, [snap, plugin], epochs=1)
    strategy.train(bench.train_stream[0])
    d0 = bench.train_stream[0].dataset.eval()
    F0 = brute_empirical_fisher(snap.models[0], d0)
    assert_close_to(plugin.importances, F0)
    head0 = [n for n in F0 if n.startswith("classifier.classifiers.0")]
    assert head0 and all(F0[n].abs().sum() > 0 for n in head0)

    strategy.train(bench.train_stream[1])
    d1 = bench.train_stream[1].dataset.eval()
    F1 = brute_empirical_fisher(snap.models[1], d1)
    imp = plugin.importances
    head1 = [n for n in F1 if n.startswith("classifier.classifiers.1")]
    assert head1 and all(n not in F0 for n in head1)
    for n in head0:  # task 0's head got no gradient in experience 2: A unchanged
        assert torch.count_nonzero(F1[n]) == 0
        torch.testing.assert_close(imp[n].double(), F0[n], rtol=1e-4, atol=1e-10)
    assert_close_to({n: imp[n] for n in head1}, {n: F1[n] for n in head1})
    trunk = [n for n in F0 if n.startswith("trunk.")]
    assert_close_to({n: imp[n] for n in trunk}, {n: F0[n] + F1[n] for n in trunk})


def test_experience_with_no_samples_warns_and_keeps_state():
    x, y = tensor_data(40)
    full = make_tensor_classification_dataset(x, y)
    empty = make_tensor_classification_dataset(x[:0], y[:0])
    bench = benchmark_from_datasets(train=[full, empty], test=[full])
    plugin = ParameterChangePlugin(1.0)
    strategy = make_strategy(mlp(), [plugin], mb=16)
    strategy.train(bench.train_stream[0], shuffle=False)
    before = copy.deepcopy(plugin.state_dict())
    with pytest.warns(UserWarning, match="experience 1 has no samples"):
        strategy.train(bench.train_stream[1], shuffle=False)
    after = plugin.state_dict()
    assert after["history"] == before["history"] and after["state"]["num_consolidations"] == 1
    for key in ("importances", "anchors"):
        for n, t in before["state"][key].items():
            assert torch.equal(t, after["state"][key][n])


# ----------------------------------------------------------------------------- plumbing errors
class NoBackwardCallback(Naive):
    def _before_backward(self, **kwargs):  # a template that never fires before_backward
        pass


def test_error_template_without_before_backward():
    plugin = ParameterChangePlugin(1.0)
    strategy = make_strategy(mlp(), [plugin], cls=NoBackwardCallback)
    with pytest.raises(RuntimeError, match="before_backward"):
        strategy.train(tiny_nc(1).train_stream[0])


def test_load_state_dict_errors():
    plugin = ParameterChangePlugin(1.0)
    _train_one(plugin)
    good = plugin.state_dict()
    with pytest.raises(TypeError, match="dict"):
        ParameterChangePlugin(1.0).load_state_dict([good])
    for key in ("version", "importance", "state"):
        with pytest.raises(ValueError, match=key):
            ParameterChangePlugin(1.0).load_state_dict({k: v for k, v in good.items() if k != key})
    with pytest.raises(ValueError, match="version"):
        ParameterChangePlugin(1.0).load_state_dict(dict(good, version=99))
    with pytest.raises(ValueError, match="mode"):
        ParameterChangePlugin(1.0, mode="online").load_state_dict(good)
    online = ParameterChangePlugin(1.0, mode="online", decay=0.5)
    _train_one(online)
    with pytest.raises(ValueError, match="decay"):
        ParameterChangePlugin(1.0, mode="online", decay=0.9).load_state_dict(online.state_dict())
    other = ParameterChangePlugin(1.0)
    other.load_state_dict(good)
    for n, t in plugin.importances.items():
        assert torch.equal(other.importances[n], t)


# ----------------------------------------------------------------------------- epoch metrics, distributed flag, arguments
class RaiseOnce(SupervisedPlugin):
    """After the plugin: raises in before_backward of the given iteration of one experience, once."""

    def __init__(self, exp, iteration):
        super().__init__()
        self.exp, self.iteration, self.count, self.fired = exp, iteration, 0, False

    def before_training_epoch(self, strategy, **kw):
        self.count = 0

    def before_backward(self, strategy, **kw):
        self.count += 1
        if not self.fired and strategy.clock.train_exp_counter == self.exp and self.count == self.iteration:
            self.fired = True
            raise RuntimeError("boom")


def test_interrupted_epoch_leaks_nothing_into_the_next_epoch_metric():
    logger = RecordingLogger()
    plugin = ParameterChangePlugin(2.0, "uniform")
    probe = PenaltyProbe(plugin)
    strategy = make_strategy(mlp(), [plugin, probe, RaiseOnce(exp=1, iteration=3)],
                             evaluator=EvaluationPlugin(loggers=[logger]), lr=0.1)
    bench = tiny_nc(3)
    strategy.train(bench.train_stream[0])
    with pytest.raises(RuntimeError, match="boom"):
        strategy.train(bench.train_stream[1])
    assert len(probe.per_epoch[-1]) == 3 and max(probe.per_epoch[-1]) > 0  # a partial sum was running
    strategy.train(bench.train_stream[1])  # the user retries the experience
    pen = logger.of("ParameterChange/penalty_epoch")
    assert len(pen) == 1
    retried = probe.per_epoch[-1]
    assert pen[0][1] == pytest.approx(sum(retried) / len(retried), rel=1e-6)


@pytest.mark.parametrize("per_step_check", [True, False])
def test_penalty_epoch_is_the_mean_of_a_long_epoch(per_step_check):
    """penalty_epoch over 120 iterations (the penalty log grows past its first 64 entries), with
    the per-step finiteness check (the CPU) and without it (other devices): the mean of the
    penalties the model had at each backward."""
    logger = RecordingLogger()
    plugin = ParameterChangePlugin(2.0, "uniform")
    if not per_step_check:
        plugin._check_every_step_on = ()
    probe = PenaltyProbe(plugin)
    strategy = make_strategy(mlp(), [plugin, probe], evaluator=EvaluationPlugin(loggers=[logger]), lr=0.1, mb=1)
    bench = tiny_nc(2)
    for exp in bench.train_stream:
        strategy.train(exp)
    (pen,) = logger.of("ParameterChange/penalty_epoch")
    seen = probe.per_epoch[-1]
    assert len(seen) == len(bench.train_stream[1].dataset) > 100 and max(seen) > 0
    assert pen[1] == pytest.approx(sum(seen) / len(seen), rel=1e-6)


def test_supports_distributed_declared_and_seen_by_avalanche(monkeypatch):
    assert ParameterChangePlugin.supports_distributed is True
    assert ParameterChangePlugin(1.0).supports_distributed is True
    ours = make_strategy(mlp(), [ParameterChangePlugin(1.0)])
    other = make_strategy(mlp(), [ParameterChangePlugin(1.0), SupervisedPlugin()])
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)  # what Avalanche's check reads
    assert ours._check_distributed_training_compatibility() is True
    # the check can fail: a plugin that does not declare it is reported
    with pytest.warns(UserWarning, match="not compatible"):
        assert other._check_distributed_training_compatibility() is False


def test_plugin_keeps_to_the_callbacks():
    """Avalanche's convention: before*/after* names are callbacks of SupervisedPlugin, nothing else;
    mode and decay are read from the state, not copied."""
    own = {n for n in vars(ParameterChangePlugin) if n.startswith(("before", "after"))}
    assert own and own <= set(dir(SupervisedPlugin))
    plugin = ParameterChangePlugin(1.0, mode="online", decay=0.3)
    assert (plugin.mode, plugin.decay) == (plugin.state.mode, plugin.state.decay) == ("online", 0.3)
    _train_one(plugin)
    assert plugin.mode is plugin.state.mode


def test_load_state_dict_with_other_importance_or_factor_warns_or_raises():
    plugin = ParameterChangePlugin(1.0, "uniform")
    _train_one(plugin)
    sd = plugin.state_dict()
    with pytest.warns(UserWarning, match=r"importance='uniform' \(this plugin: importance='empirical_fisher'\)"):
        ParameterChangePlugin(1.0).load_state_dict(sd)
    with pytest.warns(UserWarning, match=r"factor=1\.0 \(this plugin: factor=3\.0\)"):
        ParameterChangePlugin(3.0, "uniform").load_state_dict(sd)
    with pytest.raises(ValueError, match=r"importance='uniform'.*factor=1\.0.*strict=True"):
        ParameterChangePlugin(3.0).load_state_dict(sd, strict=True)
    strict_ok = ParameterChangePlugin(1.0, "uniform")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        strict_ok.load_state_dict(sd, strict=True)  # same settings: silent
    for n, t in plugin.importances.items():
        assert torch.equal(strict_ok.importances[n], t)


def test_integer_like_arguments():
    np = pytest.importorskip("numpy")
    plugin = ParameterChangePlugin(1.0, batch_size=np.int64(16), num_samples=np.int32(40), seed=np.int64(3))
    assert (plugin.batch_size, plugin.num_samples, plugin.seed) == (16, 40, 3)
    assert all(type(v) is int for v in (plugin.batch_size, plugin.num_samples, plugin.seed))
    _train_one(plugin)
    assert plugin.num_consolidations == 1
    with pytest.raises(TypeError, match=r"seed must be an int .*got NoneType None"):
        ParameterChangePlugin(1.0, seed=None)
    with pytest.raises(TypeError, match=r"seed must be an int .*got float 1\.5"):
        ParameterChangePlugin(1.0, seed=1.5)
    with pytest.raises(ValueError, match=r"batch_size must be a positive int or None, got float64"):
        ParameterChangePlugin(1.0, batch_size=np.float64(16))
    with pytest.raises(ValueError, match=r"num_samples must be a positive int or None, got str '5'"):
        ParameterChangePlugin(1.0, num_samples="5")


# ----------------------------------------------------------------------------- options and policy
class CountingPolicy(Policy):
    """A policy that counts the convolution layers it was asked about (it reached the engine)."""

    calls = []

    def conv_path_for(self, module, a, weight_numel, positions):
        CountingPolicy.calls.append(type(module).__name__)
        return super().conv_path_for(module, a, weight_numel, positions)


def _conv_importances(importance, **kw):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 2, 6, 6, generator=g), torch.arange(48) % 3
    data = make_tensor_classification_dataset(x, y)
    bench = benchmark_from_datasets(train=[data], test=[data])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 3))
    plugin = ParameterChangePlugin(1.0, importance, batch_size=16, **kw)
    strategy = make_strategy(model, [plugin], mb=16)
    strategy.train(bench.train_stream[0], shuffle=False)
    return plugin


@pytest.mark.parametrize("importance", ["empirical_fisher", "expected_fisher", "rwalk_fisher"])
def test_policy_reaches_the_importance_pass_and_changes_no_result(importance):
    """policy= goes to compute_importance (a trajectory estimator's data pass too): one sample a
    chunk gives the device default's importances, to float rounding."""
    default = _conv_importances(importance)
    CountingPolicy.calls.clear()
    policy = CountingPolicy(**{f: getattr(Policy.cpu(), f) for f in Policy.__dataclass_fields__}).replace(chunk_size=1)
    chunked = _conv_importances(importance, policy=policy)
    assert chunked.policy is policy and chunked.options.policy is policy and default.policy is None
    assert "Conv2d" in CountingPolicy.calls
    assert set(chunked.importances) == set(default.importances)
    for n, t in default.importances.items():
        torch.testing.assert_close(chunked.importances[n], t, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("bad", [{"chunk_size": 1}, "cpu", 16, Policy])
def test_error_policy_type(bad):
    with pytest.raises(TypeError, match=r"^policy must be an avalanche_pcreg\.importance\.persample\.Policy"):
        ParameterChangePlugin(1.0, policy=bad)


def test_options_hold_the_rare_settings_read_only():
    """The constructor's keyword defaults are PluginOptions' defaults; every option reads as a
    plugin attribute and cannot be set there."""
    params = inspect.signature(ParameterChangePlugin).parameters
    fields = [f.name for f in dataclasses.fields(PluginOptions)]
    assert {f: params[f].default for f in fields} == {f: getattr(PluginOptions(), f) for f in fields}
    assert list(params)[-2:] == ["policy", "kfac_merge"]
    assert all(params[p].kind is inspect.Parameter.KEYWORD_ONLY for p in ("policy", "kfac_merge"))
    assert ParameterChangePlugin(1.0).options == PluginOptions()
    np = pytest.importorskip("numpy")
    plugin = ParameterChangePlugin(1.0, "si", seed=np.int64(3), xi=0.5, warn_ratio=None, importance_scale=2)
    assert plugin.options == PluginOptions(seed=3, xi=0.5, warn_ratio=None, importance_scale=2.0)
    for name in fields:
        assert getattr(plugin, name) is getattr(plugin.options, name)
        with pytest.raises(AttributeError, match=name):
            setattr(plugin, name, getattr(plugin, name))
    with pytest.raises(dataclasses.FrozenInstanceError):
        plugin.options.seed = 4
    plugin.factor = 2.0  # the factor stays a plain attribute (factor="auto" sets it)
    assert plugin.penalty(mlp()).item() == 0.0
    # checked in one place, naming the argument and what it takes
    with pytest.raises(TypeError, match=r"strict must be a bool, got str 'yes'"):
        PluginOptions(strict="yes")
    with pytest.raises(ValueError, match=r"importance_scale must be > 0"):
        PluginOptions(importance_scale=0)
