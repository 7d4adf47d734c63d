"""Reliability: transactional consolidation, autocast, devices, checkpoints, long streams, names under
wrappers (torch.compile, DataParallel), anchors as copies in every dtype, divergence, kept gradients."""

import copy
import gc
import io
import warnings

import pytest
import torch
from torch import nn

from avalanche.core import SupervisedPlugin
from avalanche.training.plugins import EWCPlugin
from avalanche.training.supervised import Naive

from avalanche_pcreg import ParameterChangePlugin, compute_importance
from avalanche_pcreg.state import state_dtype
from helpers import mlp, tensor_data, tiny_nc

F64 = torch.float64
HAS_CUDA = torch.cuda.is_available()


def make_strategy(model, plugins, *, lr=0.05, epochs=1, mb=32, cls=Naive, device="cpu"):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    return cls(model=model, optimizer=opt, criterion=nn.CrossEntropyLoss(), train_mb_size=mb,
               train_epochs=epochs, eval_mb_size=64, device=device, plugins=plugins, evaluator=None)


def sd_equal(a, b, path="sd"):
    """Exact, recursive equality of two state dicts (tensors bit for bit, dtypes included)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), path
        for k in a:
            sd_equal(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            sd_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


class FailingEstimator:
    """A per-sample Fisher that fails on the given call with the given exception (or bad values)."""

    def __init__(self, fail_on, exc=None, bad_value=None, bad_name="4.bias"):
        self.calls, self.fail_on, self.exc, self.bad_value, self.bad_name = 0, fail_on, exc, bad_value, bad_name
        self.__name__ = "failing_estimator"

    def __call__(self, model, data, **kw):
        self.calls += 1
        out = compute_importance(model, data.dataset, "empirical_fisher", batch_size=32)
        if self.calls == self.fail_on:
            if self.exc is not None:
                raise self.exc
            out[self.bad_name] = out[self.bad_name].clone()
            out[self.bad_name][1] = self.bad_value
        return out


# ----------------------------------------------------------------------------- transactional consolidation
@pytest.mark.parametrize("exc", [RuntimeError("estimator crashed"), KeyboardInterrupt()])
def test_estimator_raising_leaves_state_exactly_unchanged(exc):
    est = FailingEstimator(fail_on=2, exc=exc)
    plugin = ParameterChangePlugin(10.0, est)
    bench = tiny_nc(3)
    model = mlp()
    strategy = make_strategy(model, [plugin])
    strategy.train(bench.train_stream[0])
    before = copy.deepcopy(plugin.state_dict())
    assert before["state"]["num_consolidations"] == 1
    with pytest.raises(type(exc)):
        strategy.train(bench.train_stream[1])
    sd_equal(before, plugin.state_dict())
    # and the plugin still works: the next experience consolidates from the intact state
    strategy.train(bench.train_stream[2])
    assert plugin.num_consolidations == 2


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -3.0])
@pytest.mark.parametrize("mode", ["separate", "online"])
def test_bad_importances_raise_naming_parameter_and_estimator(bad, mode):
    est = FailingEstimator(fail_on=2, bad_value=bad, bad_name="4.bias")  # the last parameter
    plugin = ParameterChangePlugin(10.0, est, mode=mode)
    bench = tiny_nc(2)
    strategy = make_strategy(mlp(), [plugin])
    strategy.train(bench.train_stream[0])
    before = copy.deepcopy(plugin.state_dict())
    with pytest.raises(ValueError, match=r"'4\.bias'.*'failing_estimator'"):
        strategy.train(bench.train_stream[1])
    sd_equal(before, plugin.state_dict())


def test_bad_si_importances_detected_in_merge_state_unchanged(monkeypatch):
    """The merge itself (not compute_importance) validates: SI path, failure on the last name."""
    plugin = ParameterChangePlugin(10.0, "si")
    bench = tiny_nc(2)
    strategy = make_strategy(mlp(), [plugin])
    strategy.train(bench.train_stream[0])
    before = copy.deepcopy(plugin.state_dict())
    real = plugin._tracker.importance

    def poisoned(params, data_importance=None):
        out = real(params, data_importance)
        out["4.bias"] = out["4.bias"].clone()
        out["4.bias"][0] = float("nan")
        return out

    monkeypatch.setattr(plugin._tracker, "importance", poisoned)
    with pytest.raises(ValueError, match=r"'4\.bias'.*'si'"):
        strategy.train(bench.train_stream[1])
    # The path integral moved during training (its tracker state is checkpointed too); the
    # consolidated state is what must be unchanged.
    after = plugin.state_dict()
    before.pop("tracker"), after.pop("tracker")
    sd_equal(before, after)


# ----------------------------------------------------------------------------- mixed precision
class AutocastForward(Naive):
    def forward(self):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return super().forward()


class AutocastEverything(Naive):
    """Forward, loss and penalty all computed under autocast."""

    def training_epoch(self, **kwargs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return super().training_epoch(**kwargs)


class LossDtypeProbe(SupervisedPlugin):
    def __init__(self, plugin):
        super().__init__()
        self.plugin = plugin
        self.loss_dtypes, self.output_dtypes, self.penalties = [], [], []

    def before_backward(self, strategy, **kw):
        self.loss_dtypes.append(strategy.loss.dtype)
        self.output_dtypes.append(strategy.mb_output.dtype)
        if not self.plugin.state.empty:
            self.penalties.append(self.plugin.penalty(strategy.model))


@pytest.mark.parametrize("cls", [AutocastForward, AutocastEverything])
def test_training_under_bf16_autocast(cls):
    plugin = ParameterChangePlugin(10.0, "empirical_fisher")
    probe = LossDtypeProbe(plugin)
    model = mlp()
    strategy = make_strategy(model, [plugin, probe], cls=cls)
    bench = tiny_nc(3)
    for exp in bench.train_stream:
        strategy.train(exp)
    assert set(probe.output_dtypes) == {torch.bfloat16}  # autocast really was on
    assert plugin.num_consolidations == 3
    for d in (plugin.importances, plugin.anchors):
        assert all(t.dtype == torch.float32 for t in d.values())
    assert all(torch.isfinite(t).all() for t in plugin.importances.values())
    assert plugin.state.const.dtype == F64
    assert probe.penalties and all(p.dtype == torch.float32 for p in probe.penalties)
    assert all(d == torch.float32 for d in probe.loss_dtypes)
    pen = plugin.penalty(model)
    assert pen.dtype == torch.float32 and pen.item() > 0
    # the penalty under autocast is the same float32 number as outside
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pen_ac = plugin.penalty(model)
    assert pen_ac.dtype == torch.float32 and pen_ac.item() == pytest.approx(pen.item(), rel=1e-6)


def test_importance_under_autocast_is_float32_and_close():
    model = mlp()
    x, y = tensor_data(64)
    data = torch.utils.data.TensorDataset(x, y)
    ref = compute_importance(model, data, "empirical_fisher", batch_size=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = compute_importance(model, data, "empirical_fisher", batch_size=16)
    for n in ref:
        assert got[n].dtype == torch.float32 and torch.isfinite(got[n]).all()
        rel = ((got[n] - ref[n]).abs().sum() / ref[n].abs().sum()).item()
        assert rel < 0.1, (n, rel)  # bf16 has ~3 significant digits


# ----------------------------------------------------------------------------- device / dtype moves
def _penalty_by_hand(plugin, model):
    st = plugin.state
    total = st.const.clone()
    params = dict(model.named_parameters())
    for n, A in st.importances.items():
        p = params[n].detach().to(F64)
        idx = tuple(slice(0, s) for s in A.shape)
        total = total + (A.to(F64) * (p[idx] - st.anchors[n].to(F64)) ** 2).sum()
    return plugin.factor * total.item()


class CastingMLP(nn.Module):
    """The helpers' MLP, casting its (float32) input to its own dtype."""

    def __init__(self):
        super().__init__()
        self.net = mlp()

    def forward(self, x):
        return self.net(x.to(self.net[0].weight.dtype))


def test_model_dtype_change_after_first_experience():
    """On CPU the move that can be tested is a dtype move: float32 -> float64 after experience 1."""
    plugin = ParameterChangePlugin(10.0, "empirical_fisher")
    model = CastingMLP()
    strategy = make_strategy(model, [plugin])
    bench = tiny_nc(3)
    strategy.train(bench.train_stream[0])
    assert all(t.dtype == torch.float32 for t in plugin.importances.values())
    model.double()
    for exp in bench.train_stream[1:]:
        strategy.train(exp)
    assert all(t.dtype == F64 for t in plugin.importances.values())
    assert all(t.dtype == F64 for t in plugin.anchors.values())
    pen = plugin.penalty(model)
    assert pen.dtype == F64
    assert pen.item() == pytest.approx(_penalty_by_hand(plugin, model), rel=1e-10)


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA: moves the model CPU -> GPU after experience 1")
def test_model_moved_to_cuda_after_first_experience():
    plugin = ParameterChangePlugin(10.0, "empirical_fisher")
    model = mlp()
    strategy = make_strategy(model, [plugin])
    bench = tiny_nc(3)
    strategy.train(bench.train_stream[0])
    model.cuda()
    strategy.device = torch.device("cuda")
    strategy.optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for exp in bench.train_stream[1:]:
        strategy.train(exp)
    assert all(t.is_cuda for t in plugin.importances.values())
    assert all(t.is_cuda for t in plugin.anchors.values())
    pen = plugin.penalty(model)
    assert pen.is_cuda and pen.item() == pytest.approx(_penalty_by_hand(plugin, model), rel=1e-5)


# ----------------------------------------------------------------------------- checkpoints
def test_load_state_dict_map_location_resumes_exactly():
    bench = tiny_nc(3)

    def run(resume_after):
        model = mlp()
        plugin = ParameterChangePlugin(10.0, "empirical_fisher")
        strategy = make_strategy(model, [plugin])
        for k, exp in enumerate(bench.train_stream):
            if k == resume_after:
                buf = io.BytesIO()
                torch.save({"plugin": plugin.state_dict(), "model": model.state_dict()}, buf)
                buf.seek(0)
                ckpt = torch.load(buf, map_location="cpu", weights_only=True)
                model = mlp(seed=123)
                model.load_state_dict(ckpt["model"])
                plugin = ParameterChangePlugin(10.0, "empirical_fisher")
                plugin.load_state_dict(ckpt["plugin"], map_location="cpu")
                strategy = make_strategy(model, [plugin])
            torch.manual_seed(100 + k)
            strategy.train(exp)
        return model, plugin

    m1, p1 = run(resume_after=None)
    m2, p2 = run(resume_after=2)
    sd_equal(p1.state_dict()["state"], p2.state_dict()["state"])
    for (n, a), (_, b) in zip(m1.named_parameters(), m2.named_parameters()):
        assert torch.equal(a, b), n
    assert p2.num_consolidations == 3 and len(p2.history) == 3


def test_same_plugin_two_strategies_is_an_error():
    plugin = ParameterChangePlugin(1.0)
    bench = tiny_nc(2)
    s1 = make_strategy(mlp(), [plugin])
    s1.train(bench.train_stream[0])
    s2 = make_strategy(mlp(), [plugin])
    with pytest.raises(RuntimeError, match="another strategy"):
        s2.train(bench.train_stream[1])
    s1.train(bench.train_stream[1])  # the owner keeps working
    assert plugin.num_consolidations == 2


# ----------------------------------------------------------------------------- long streams
def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _ewc_bytes(ewc):
    return sum(pd.data.numel() * pd.data.element_size()
               for store in (ewc.saved_params, ewc.importances) for d in store.values() for pd in d.values())


def test_long_stream_memory_flat():
    from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
    from avalanche.benchmarks.utils.classification_dataset import (
        _make_taskaware_tensor_classification_dataset as make_ds,
    )

    g = torch.Generator().manual_seed(0)
    ds = make_ds(torch.randn(10, 5, generator=g), torch.arange(10) % 4)
    exp = benchmark_from_datasets(train=[ds], test=[ds]).train_stream[0]
    P = 5 * 4 + 4

    def run(plugin, measure, n_exps=100):
        torch.manual_seed(0)
        model = nn.Linear(5, 4)
        strategy = make_strategy(model, [plugin], mb=10, lr=0.01)
        out = {}
        for k in range(1, n_exps + 1):
            strategy.train(exp)
            if k in (2, n_exps):
                gc.collect()
                out[k] = (measure(), _rss_bytes())
        return out

    ours = ParameterChangePlugin(0.01, "empirical_fisher", "separate")
    res = run(ours, lambda: ours.state.nbytes())
    assert ours.num_consolidations == 100
    assert res[2][0] == res[100][0] == 2 * P * 4
    assert res[100][1] - res[2][1] < 50 * 2**20, f"RSS grew {(res[100][1] - res[2][1]) / 2**20:.1f} MB"

    # Avalanche's EWCPlugin keeps one (importance, parameter) pair per experience: linear growth
    # (20 experiences are enough to show it; its penalty costs O(T) a step)
    ewc = EWCPlugin(ewc_lambda=0.01, mode="separate")
    theirs = run(ewc, lambda: _ewc_bytes(ewc), n_exps=20)
    assert theirs[2][0] == 2 * (2 * P * 4)
    assert theirs[20][0] == 10 * theirs[2][0]


# ----------------------------------------------------------------------------- names under wrappers
class LossRecorderAfter(SupervisedPlugin):
    """After the plugin: the loss (penalty included) and the plugin's penalty at every step."""

    def __init__(self, plugin):
        super().__init__()
        self.plugin, self.losses, self.penalties = plugin, [], []

    def before_backward(self, strategy, **kw):
        self.losses.append(float(strategy.loss.detach()))
        self.penalties.append((strategy.clock.train_exp_counter, float(self.plugin.penalty(strategy.model).detach())))


def _run_wrapped(wrap_from=None, wrap=None, plugin=None, n_exps=3):
    torch.manual_seed(0)
    model = mlp()
    plugin = plugin or ParameterChangePlugin(50.0, "empirical_fisher")
    rec = LossRecorderAfter(plugin)
    strategy = make_strategy(model, [plugin, rec])
    for k, exp in enumerate(list(tiny_nc(3).train_stream)[:n_exps]):
        if wrap_from is not None and k == wrap_from:
            strategy.model = wrap(model)
        torch.manual_seed(10 + k)
        strategy.train(exp)
    return plugin, rec, strategy


@pytest.mark.parametrize("wrapper", ["compile", "dataparallel"])
def test_wrapping_the_model_after_the_first_experience_keeps_the_penalty(wrapper):
    """torch.compile adds '_orig_mod.' to every name, DataParallel 'module.': the stored names must
    still match, the penalty must stay on, and the state must not grow a second copy."""
    if wrapper == "compile":
        wrap = lambda m: torch.compile(m, backend="eager")  # noqa: E731  (adds the prefix like any backend)
    else:
        wrap = nn.DataParallel  # on CPU: a plain call of the module, but the 'module.' names
    plain, rec_plain, _ = _run_wrapped()
    wrapped, rec_wrapped, strategy = _run_wrapped(wrap_from=1, wrap=wrap)
    prefix = "_orig_mod." if wrapper == "compile" else "module."
    assert all(n.startswith(prefix) for n, _ in strategy.model.named_parameters())
    assert sorted(wrapped.importances) == sorted(plain.importances) == ["0.bias", "0.weight", "2.bias", "2.weight",
                                                                       "4.bias", "4.weight"]
    assert wrapped.state.nbytes() == plain.state.nbytes()
    later = [v for e, v in rec_wrapped.penalties if e > 0]
    assert len(later) > 2 and later[0] == 0.0 and min(later[1:]) > 0  # 0 only at the anchor itself
    la, lb = torch.tensor(rec_plain.losses, dtype=F64), torch.tensor(rec_wrapped.losses, dtype=F64)
    assert len(la) == len(lb)
    torch.testing.assert_close(lb, la, rtol=1e-5, atol=0)


def test_state_saved_with_compile_prefix_loads_into_plain_model():
    plain, _, strategy = _run_wrapped(n_exps=2)
    sd = plain.state_dict()
    # what a state written from a compiled model by an earlier version looked like
    for key in ("importances", "anchors"):
        sd["state"][key] = {f"_orig_mod.{n}": t for n, t in sd["state"][key].items()}
    loaded = ParameterChangePlugin(50.0, "empirical_fisher")
    loaded.load_state_dict(sd)
    assert sorted(loaded.importances) == sorted(plain.importances)
    model = copy.deepcopy(strategy.model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05)
    assert loaded.penalty(model).item() == plain.penalty(model).item() > 0
    dup = copy.deepcopy(plain.state_dict())
    dup["state"]["importances"]["_orig_mod.0.bias"] = dup["state"]["importances"]["0.bias"]
    dup["state"]["anchors"]["_orig_mod.0.bias"] = dup["state"]["anchors"]["0.bias"]
    with pytest.raises(ValueError, match=r"'0\.bias'.*'_orig_mod\.0\.bias'.*'0\.bias'"):
        ParameterChangePlugin(50.0, "empirical_fisher").load_state_dict(dup)


def test_stored_names_missing_from_model_raise_or_warn():
    plain, _, _ = _run_wrapped(n_exps=1)
    sd = copy.deepcopy(plain.state_dict())
    for key in ("importances", "anchors"):
        sd["state"][key]["ghost.weight"] = torch.ones(3)
    strict = ParameterChangePlugin(50.0, "empirical_fisher")
    strict.load_state_dict(sd)
    strategy = make_strategy(mlp(), [strict])
    with pytest.raises(ValueError, match=r"stored parameters \['ghost\.weight'\] are missing from the model.*strict=False"):
        strategy.train(tiny_nc(3).train_stream[1])
    lenient = ParameterChangePlugin(50.0, "empirical_fisher", strict=False)
    lenient.load_state_dict(sd)
    strategy = make_strategy(mlp(), [lenient])
    with pytest.warns(UserWarning, match=r"stored parameters \['ghost\.weight'\] are missing from the model"):
        strategy.train(tiny_nc(3).train_stream[1])
    assert lenient.num_consolidations == 2
    with pytest.raises(TypeError, match="strict"):
        ParameterChangePlugin(1.0, strict="yes")


# ----------------------------------------------------------------------------- anchors are copies, any dtype
class SnapshotBefore(SupervisedPlugin):
    """Before the plugin: the parameters at each consolidation (the anchors it must store)."""

    def __init__(self):
        super().__init__()
        self.params = []

    def after_training_exp(self, strategy, **kw):
        self.params.append({n: p.detach().clone() for n, p in strategy.model.named_parameters()})


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["online", "separate"])
def test_anchors_are_copies_for_every_dtype(dtype, mode):
    """Online mode on a float64 model stored the parameters themselves as anchors (a .to() that
    copies nothing): the anchor followed the parameter and the penalty was always 0."""
    model = CastingMLP().to(dtype)
    plugin = ParameterChangePlugin(3.0, "uniform", mode)
    snap = SnapshotBefore()
    strategy = make_strategy(model, [snap, plugin], lr=0.1)
    bench = tiny_nc(2)
    strategy.train(bench.train_stream[0])
    params = dict(model.named_parameters())
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    for d in (plugin.importances, plugin.anchors):
        assert all(t.dtype == state_dtype(dtype) for t in d.values())  # at least float32
        assert not storages & {t.untyped_storage().data_ptr() for t in d.values()}
    strategy.train(bench.train_stream[1])  # the model moves away from the anchors
    anchors = snap.params[0] if mode == "separate" else snap.params[1]
    if mode == "online":
        for n, mu in plugin.anchors.items():
            assert torch.equal(mu, anchors[n].to(mu.dtype)), n
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.25)
    ref = 0.0
    for n, A in plugin.importances.items():
        if mode == "online":  # uniform: A = decay * 1 + 1 = 2, mu = theta at the 2nd consolidation
            ref += 2.0 * float(((params[n].detach().double() - anchors[n].double()) ** 2).sum())
        else:  # A = 2, mu = mean of the two anchors, c = sum (theta1 - theta2)**2 / 2
            t1, t2 = snap.params[0][n].double(), snap.params[1][n].double()
            p = params[n].detach().double()
            ref += float(((p - t1) ** 2 + (p - t2) ** 2).sum())
    pen = plugin.penalty(model)
    assert ref > 0
    assert pen.item() == pytest.approx(3.0 * ref, rel=5e-2 if dtype == torch.bfloat16 else 1e-5)


# ----------------------------------------------------------------------------- NaN / inf
def test_consolidating_a_diverged_model_raises_and_keeps_state():
    plugin = ParameterChangePlugin(1.0, "uniform")
    model = mlp()
    strategy = make_strategy(model, [plugin])
    bench = tiny_nc(3)
    strategy.train(bench.train_stream[0])
    before = copy.deepcopy(plugin.state_dict())
    good = copy.deepcopy(model.state_dict())

    class Diverge(SupervisedPlugin):
        def after_training_epoch(self, strategy, **kw):
            with torch.no_grad():
                strategy.model[2].weight[0, 0] = float("nan")

    strategy.plugins.insert(0, Diverge())
    with pytest.raises(ValueError, match=r"parameter '2\.weight' has 1 NaN/inf entries .*diverged"):
        strategy.train(bench.train_stream[1])
    sd_equal(before, plugin.state_dict())
    # the user rolls the model back: the penalty is finite and training goes on
    strategy.plugins.pop(0)
    model.load_state_dict(good)
    assert torch.isfinite(plugin.penalty(model))
    strategy.train(bench.train_stream[1])
    assert plugin.num_consolidations == 2 and torch.isfinite(plugin.penalty(model))
    assert all(torch.isfinite(t).all() for t in plugin.anchors.values())


class PoisonAt(SupervisedPlugin):
    """Before the plugin: sets one weight to inf before the forward of the given iteration of the
    given experience's first epoch (the loss then is NaN/inf too, but the penalty is what we check)."""

    def __init__(self, exp, iteration):
        super().__init__()
        self.exp, self.iteration, self.count = exp, iteration, 0

    def before_training_epoch(self, strategy, **kw):
        self.count = 0

    def before_training_iteration(self, strategy, **kw):
        self.count += 1
        if strategy.clock.train_exp_counter == self.exp and self.count == self.iteration:
            with torch.no_grad():
                strategy.model[0].weight[0, 0] = float("inf")


def test_nonfinite_penalty_raises_at_its_iteration():
    plugin = ParameterChangePlugin(7.5, "uniform")
    strategy = make_strategy(mlp(), [PoisonAt(exp=1, iteration=3), plugin])
    bench = tiny_nc(3)
    strategy.train(bench.train_stream[0])
    with pytest.raises(FloatingPointError, match=r"at experience 1, epoch 0, iteration 3 of the epoch, with factor=7\.5"):
        strategy.train(bench.train_stream[1])
    assert strategy.clock.train_exp_iterations == 2  # stopped before the step of iteration 3


def test_nonfinite_penalty_without_per_step_sync_raises_at_epoch_end():
    """The CUDA path (forced here on the CPU): the first non-finite iteration is kept on the device
    and reported once, at the end of the epoch, with its iteration number."""
    plugin = ParameterChangePlugin(7.5, "uniform")
    plugin._check_every_step_on = ()
    strategy = make_strategy(mlp(), [PoisonAt(exp=1, iteration=2), plugin])
    bench = tiny_nc(3)
    strategy.train(bench.train_stream[0])
    with pytest.raises(FloatingPointError, match=r"penalty is not finite at experience 1, epoch 0, iteration 2 of the epoch"):
        strategy.train(bench.train_stream[1])
    n_iter = -(-len(bench.train_stream[1].dataset) // 32)
    assert n_iter == 3 and strategy.clock.train_exp_iterations == n_iter  # the whole epoch ran


def test_nonfinite_penalty_late_in_a_long_epoch_without_per_step_sync():
    """The device-side penalty log grows past its first 64 entries (120 samples, one a batch:
    120 iterations); a non-finite penalty at iteration 97 is reported with that iteration once
    the epoch is over."""
    plugin = ParameterChangePlugin(7.5, "uniform")
    plugin._check_every_step_on = ()
    strategy = make_strategy(mlp(), [PoisonAt(exp=1, iteration=97), plugin], mb=1)
    bench = tiny_nc(2)
    strategy.train(bench.train_stream[0])
    with pytest.raises(FloatingPointError, match=r"epoch 0, iteration 97 of the epoch"):
        strategy.train(bench.train_stream[1])
    n_iter = len(bench.train_stream[1].dataset)
    assert n_iter > 100 and strategy.clock.train_exp_iterations == n_iter


def test_nonfinite_penalty_warns_once_when_asked():
    plugin = ParameterChangePlugin(7.5, "uniform", on_nonfinite="warn")
    strategy = make_strategy(mlp(), [PoisonAt(exp=1, iteration=2), plugin], epochs=2)
    bench = tiny_nc(3)
    strategy.train(bench.train_stream[0])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # training went on (two epochs, one warning); the diverged model is then refused as anchor
        with pytest.raises(ValueError, match="diverged"):
            strategy.train(bench.train_stream[1])
    assert strategy.clock.train_exp_epochs == 2
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning) and "not finite" in str(w.message)]
    assert len(msgs) == 1 and "iteration 2 of the epoch" in msgs[0] and "factor=7.5" in msgs[0]
    with pytest.raises(ValueError, match="on_nonfinite"):
        ParameterChangePlugin(1.0, on_nonfinite="ignore")


# ----------------------------------------------------------------------------- gradients kept by others
class GradKeeper(SupervisedPlugin):
    """After the plugin: torch.autograd.grad of the loss for the unused head (only the penalty
    reaches it), kept across steps, with a copy taken at the time."""

    def __init__(self):
        super().__init__()
        self.kept, self.copies = [], []

    def before_backward(self, strategy, **kw):
        if strategy.clock.train_exp_counter == 0:
            return
        w = strategy.model.unused.weight
        (g,) = torch.autograd.grad(strategy.loss, [w], retain_graph=True)
        self.kept.append(g)
        self.copies.append(g.clone())


class UnusedHead(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(12, 8)
        self.head = nn.Linear(8, 6)
        self.unused = nn.Linear(8, 6)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


def test_gradients_kept_across_steps_are_not_overwritten_in_training():
    model = UnusedHead()
    plugin = ParameterChangePlugin(2.0, "uniform")
    keeper = GradKeeper()
    strategy = make_strategy(model, [plugin, keeper], lr=0.1)
    bench = tiny_nc(2)
    strategy.train(bench.train_stream[0])
    with torch.no_grad():
        model.unused.weight.add_(1.0)  # away from its anchor: the penalty pulls it back, step by step
    strategy.train(bench.train_stream[1])
    assert len(keeper.kept) >= 3
    for g, c in zip(keeper.kept, keeper.copies):
        assert torch.equal(g, c)
    assert not torch.equal(keeper.copies[0], keeper.copies[-1])
    torch.testing.assert_close(keeper.copies[0], torch.full_like(keeper.copies[0], 2 * 2.0 * 1.0))
