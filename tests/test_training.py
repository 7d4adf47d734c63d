"""The drop-in strategy classes of avalanche_pcreg.training against Avalanche 0.6's own classes.

Each swap trains the same seeded model with Avalanche's strategy class and with ours (same
arguments), over 3 experiences, and compares every iteration's loss and the final parameters.
"""

import inspect
import math
import warnings

import pytest
import torch
from torch import nn

import avalanche.training as avl
from avalanche.training.plugins import RWalkPlugin, SynapticIntelligencePlugin
from avalanche.training.supervised import Naive

from avalanche_pcreg import training as ours
from helpers import LossRecorder, MultiHeadMLP, mlp, tiny_nc

from test_parity_methods import si_copies  # noqa: F401  (fixture)


def _run(cls, model, bench, *, lr=0.05, momentum=0.0, **kw):
    torch.manual_seed(0)
    rec = LossRecorder()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    strategy = cls(model=model, optimizer=opt, criterion=nn.CrossEntropyLoss(), train_mb_size=32,
                   train_epochs=2, eval_mb_size=64, device="cpu", plugins=[rec], evaluator=None, **kw)
    for exp in bench.train_stream:
        strategy.train(exp)
    return strategy, rec


def _swap(name, make_model, bench, avl_cls=None, run=None, **kw):
    run = run or {}
    m1, m2 = make_model(), make_model()
    _, ra = _run(avl_cls or getattr(avl, name), m1, bench, **run, **kw)
    so, ro = _run(getattr(ours, name), m2, bench, **run, **kw)
    la = torch.tensor(ra.losses, dtype=torch.float64)
    lo = torch.tensor(ro.losses, dtype=torch.float64)
    assert la.shape == lo.shape and la.numel() > 0
    rel = ((la - lo).abs() / la.abs().clamp_min(1e-12)).max().item()
    pdiff = max((a - b).abs().max().item() for a, b in zip(m1.parameters(), m2.parameters()))
    m3 = make_model()
    _run(Naive, m3, bench, **run)
    effect = max((a - b).abs().max().item() for a, b in zip(m2.parameters(), m3.parameters()))
    return rel, pdiff, effect, so


@pytest.mark.parametrize("name", ["EWC", "SynapticIntelligence", "MAS"])
def test_signatures_match_avalanche(name):
    theirs = inspect.signature(getattr(avl, name).__init__).parameters
    mine = inspect.signature(getattr(ours, name).__init__).parameters
    for p, par in theirs.items():
        assert p in mine, p
        assert mine[p].default == par.default or p == "evaluator", (p, mine[p].default, par.default)
        assert mine[p].kind == par.kind, p
    assert set(mine) - set(theirs) <= {"importance", "importance_scale", "factor_search"}


def test_rwalk_signature_matches_plugin():
    theirs = inspect.signature(RWalkPlugin.__init__).parameters
    mine = inspect.signature(ours.RWalk.__init__).parameters
    for p in ("ewc_lambda", "ewc_alpha", "delta_t"):
        assert mine[p].default == theirs[p].default


@pytest.mark.parametrize("kw", [dict(ewc_lambda=50.0), dict(ewc_lambda=50.0, mode="online", decay_factor=0.5),
                                dict(ewc_lambda=50.0, keep_importance_data=True)])
def test_ewc_swap(kw):
    rel, pdiff, effect, _ = _swap("EWC", mlp, tiny_nc(3), **kw)
    assert rel <= 1e-5 and pdiff <= 1e-5 and effect > 1e-3


def test_ewc_swap_multi_head():
    rel, pdiff, effect, _ = _swap("EWC", MultiHeadMLP, tiny_nc(3, task_labels=True), ewc_lambda=50.0)
    assert rel <= 1e-5 and pdiff <= 1e-5 and effect > 1e-3


@pytest.mark.parametrize("si_lambda", [300.0, [100.0, 1000.0]])
def test_si_swap(si_copies, si_lambda):  # noqa: F811
    rel, pdiff, effect, _ = _swap("SynapticIntelligence", mlp, tiny_nc(3), si_lambda=si_lambda,
                                  run=dict(lr=0.1))
    assert rel <= 1e-5 and pdiff <= 1e-5 and effect > 1e-3


def test_mas_swap():
    rel, pdiff, effect, _ = _swap("MAS", mlp, tiny_nc(3), lambda_reg=1.0, alpha=0.5)
    assert rel == 0.0 and pdiff == 0.0 and effect > 1e-3


def test_rwalk_swap():
    class AvlRWalk(Naive):
        def __init__(self, *, plugins, ewc_lambda, ewc_alpha, delta_t, **kw):
            super().__init__(plugins=plugins + [RWalkPlugin(ewc_lambda, ewc_alpha, delta_t)], **kw)

    rel, pdiff, effect, _ = _swap("RWalk", mlp, tiny_nc(3), avl_cls=AvlRWalk, ewc_lambda=5.0, ewc_alpha=0.9,
                                  delta_t=3)
    assert rel <= 1e-5 and pdiff <= 1e-5 and effect > 1e-3


def test_l2_is_uniform_quadratic():
    """L2 against a brute-force float64 penalty: mean of anchors with weight T (separate mode)."""
    bench = tiny_nc(3)
    s, rec = _run(ours.L2, mlp(), bench, l2_lambda=0.3)
    plugin = s.pcreg
    assert plugin.num_consolidations == 3
    for n, a in plugin.importances.items():
        assert torch.all(a == 3.0), n


# ----------------------------------------------------------------------------- our switches

def test_importance_switch_changes_estimator():
    bench = tiny_nc(3)
    s, _ = _run(ours.EWC, mlp(), bench, ewc_lambda=1.0, importance="empirical_fisher")
    assert s.pcreg.importance_name == "empirical_fisher"
    s, _ = _run(ours.MAS, mlp(), bench, lambda_reg=0.1, importance="mas")
    assert s.pcreg.importance_name == "mas"
    s, _ = _run(ours.SynapticIntelligence, mlp(), bench, si_lambda=1.0, importance="si")
    assert s.pcreg.importance_name == "si" and s.pcreg.mode == "online" and s.pcreg.decay == 1.0
    s, _ = _run(ours.RWalk, mlp(), bench, ewc_lambda=1.0, importance="rwalk_fisher")
    assert s.pcreg.importance_name == "rwalk_fisher" and s.pcreg.mode == "separate"


def test_bad_arguments_are_named():
    m = mlp()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    base = dict(model=m, optimizer=opt, criterion=nn.CrossEntropyLoss(), evaluator=None)
    with pytest.raises(ValueError, match="decay_factor"):
        ours.EWC(ewc_lambda=1.0, mode="online", **base)
    with pytest.raises(ValueError, match="mode"):
        ours.EWC(ewc_lambda=1.0, mode="onlinesum", **base)
    with pytest.raises(ValueError, match="alpha"):
        ours.MAS(alpha=1.5, **base)
    with pytest.raises(ValueError, match="importance"):
        ours.SynapticIntelligence(si_lambda=1.0, importance="mas", **base)
    with pytest.raises(ValueError, match="si_lambda"):
        ours.SynapticIntelligence(si_lambda=-1.0, **base)
    with pytest.raises(ValueError, match="ewc_alpha"):
        ours.RWalk(ewc_alpha=2.0, **base)
    with pytest.raises(ValueError, match="delta_t"):
        ours.RWalk(delta_t=0, **base)
    with pytest.raises(TypeError, match="keep_importance_data"):
        ours.EWC(ewc_lambda=1.0, keep_importance_data="yes", **base)


# ----------------------------------------------------------------------------- lambda transfer

def test_importance_ratio_against_bruteforce():
    """sum(minibatch Fisher) / sum(per-sample Fisher), both from float64 loops."""
    from torch.utils.data import TensorDataset
    from avalanche_pcreg import importance_ratio
    from helpers import tensor_data

    x, y = tensor_data(70)
    model = mlp()
    ds = TensorDataset(x, y)
    got = importance_ratio(model, ds, "minibatch_fisher", "empirical_fisher", batch_size=16)
    m64 = mlp().double()
    m64.load_state_dict(model.state_dict())
    params = list(m64.parameters())
    crit = nn.CrossEntropyLoss()
    mb, nb = 0.0, 0
    for i in range(0, 70, 16):
        g = torch.autograd.grad(crit(m64(x[i:i + 16].double()), y[i:i + 16]), params)
        mb += sum(float((t ** 2).sum()) for t in g)
        nb += 1
    ps = 0.0
    for i in range(70):
        g = torch.autograd.grad(crit(m64(x[i:i + 1].double()), y[i:i + 1]), params)
        ps += sum(float((t ** 2).sum()) for t in g)
    want = (mb / nb) / (ps / 70)
    assert abs(got - want) / want < 1e-4, (got, want)
    assert 1 / 40 < got < 1 / 4  # about 1 / batch_size
    before = torch.random.get_rng_state()
    importance_ratio(model, ds, batch_size=16)
    assert torch.equal(before, torch.random.get_rng_state())


def test_importance_scale_carries_the_ratio():
    """After the first experience, the per-sample Fisher times importance_scale=ratio has the
    total of Avalanche's minibatch Fisher on that experience (the same model, the same data)."""
    from avalanche_pcreg import compute_importance, importance_ratio

    m = mlp()
    _run(Naive, m, tiny_nc(1, n=80, seed=1))
    bench = tiny_nc(1, n=80)
    data = bench.train_stream[0].dataset
    r = importance_ratio(m, data, batch_size=32)
    mb = compute_importance(m, data, "minibatch_fisher", batch_size=32)
    first = {}
    for scale in (1.0, r):
        model = mlp()
        model.load_state_dict(m.state_dict())
        s, _ = _run(ours.EWC, model, bench, ewc_lambda=1.0, importance="empirical_fisher",
                    importance_scale=scale, lr=0.0)  # lr=0: the model stays at m
        first[scale] = s.pcreg.importances
    for n in first[1.0]:
        assert torch.allclose(first[r][n], r * first[1.0][n], rtol=1e-6, atol=0)
    ours_total = sum(float(v.double().sum()) for v in first[r].values())
    theirs_total = sum(float(v.double().sum()) for v in mb.values())
    assert abs(ours_total - theirs_total) / theirs_total < 1e-4


def test_penalty_to_loss_warning_names_factor_and_ratio():
    """An Avalanche-sized lambda on the per-sample Fisher (here 1e9): the first non-zero penalty of
    experience 1 dwarfs the task loss and the warning says so, with the numbers."""
    from avalanche_pcreg import ParameterChangePlugin
    from helpers import run_naive

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            run_naive(tiny_nc(2), mlp(), [ParameterChangePlugin(1e9, "empirical_fisher")], epochs=1, lr=0.05)
        except ValueError:
            pass  # the diverged run's next merge refuses inf/NaN importances
    msgs = [str(w.message) for w in caught if "x the task loss" in str(w.message)]
    assert len(msgs) == 1, [str(w.message) for w in caught]
    assert "experience 1" in msgs[0] and "factor=1e+09" in msgs[0] and "importance_ratio" in msgs[0]
    ratio = float(msgs[0].split(" is ")[1].split("x the task loss")[0])
    assert ratio > 1e4
    # a transferred lambda does not trigger it
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        run_naive(tiny_nc(2), mlp(), [ParameterChangePlugin(1.0, "empirical_fisher")], epochs=1, lr=0.05)


# ----------------------------------------------------------------------------- wrapped models

class _BNNet(nn.Module):
    """An MLP with a BatchNorm1d and a LayerNorm (normalization layers: SI leaves them out) and a
    torch.compile'd submodule option (``_orig_mod.`` in the middle of its names)."""

    def __init__(self, compiled_block=False):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(12, 16), nn.BatchNorm1d(16), nn.ReLU())
        self.block = nn.Sequential(nn.Linear(16, 16), nn.LayerNorm(16), nn.Tanh())
        self.head = nn.Linear(16, 6)
        if compiled_block:
            self.block = torch.compile(self.block, backend="eager")

    def forward(self, x):
        return self.head(self.block(self.body(x)))


_PLAIN_NAMES = {"body.0.weight", "body.0.bias", "block.0.weight", "block.0.bias", "head.weight", "head.bias"}
_NORM_NAMES = {"body.1.weight", "body.1.bias", "block.1.weight", "block.1.bias"}

_WRAPPERS = {
    "plain": lambda m: m,
    "compile": lambda m: torch.compile(m, backend="eager"),
    "data_parallel": nn.DataParallel,  # without GPUs it only wraps (adds "module.")
    "compiled_data_parallel": lambda m: torch.compile(nn.DataParallel(m), backend="eager"),
    "compiled_submodule": None,  # _BNNet(compiled_block=True)
}


def _wrapped(kind):
    if kind == "compiled_submodule":
        m = _BNNet(compiled_block=True)
        return m, m
    m = _BNNet()
    return m, _WRAPPERS[kind](m)


def _run_si(kind, importance, model_and_wrapped=None):
    from avalanche_pcreg import ParameterChangePlugin

    m, w = model_and_wrapped or _wrapped(kind)
    torch.manual_seed(0)
    rec = LossRecorder()
    s = ours.SynapticIntelligence(model=w, optimizer=torch.optim.SGD(m.parameters(), lr=0.1),
                                  criterion=nn.CrossEntropyLoss(), si_lambda=10.0, train_mb_size=32, train_epochs=1,
                                  eval_mb_size=64, device="cpu", plugins=[rec], evaluator=None, importance=importance)
    for exp in tiny_nc(2).train_stream:
        s.train(exp)
    assert isinstance(s.pcreg, ParameterChangePlugin)
    return s, rec


@pytest.mark.parametrize("kind", list(_WRAPPERS))
def test_module_parameter_names_look_through_wrappers(kind):
    from avalanche_pcreg.selection import module_parameter_names, named_parameters
    from torch.nn.modules.batchnorm import _NormBase

    _, w = _wrapped(kind)
    assert set(named_parameters(w)) == _PLAIN_NAMES | _NORM_NAMES
    norms = module_parameter_names(w, lambda mod: isinstance(mod, (_NormBase, nn.LayerNorm)))
    assert set(norms) == _NORM_NAMES
    assert set(module_parameter_names(w, lambda mod: isinstance(mod, _NormBase))) == {"body.1.weight", "body.1.bias"}


@pytest.mark.parametrize("kind", [k for k in _WRAPPERS if k != "plain"])
def test_si_on_wrapped_model_is_the_plain_run(kind):
    """SynapticIntelligence regularizes the same parameters (BatchNorm left out, as Avalanche's SI
    does) and gets the same importances, anchors and losses whatever wraps the model."""
    for importance in ("avalanche_si", "si"):
        ref, ref_rec = _run_si("plain", importance)
        got, rec = _run_si(kind, importance)
        want = {"body.0.weight", "body.0.bias", "block.0.weight", "block.0.bias", "block.1.weight", "block.1.bias",
                "head.weight", "head.bias"}  # LayerNorm is not a _NormBase: Avalanche regularizes it too
        assert set(ref.pcreg.selected_parameters(ref.model)) == want
        assert set(got.pcreg.selected_parameters(got.model)) == want
        assert set(got.pcreg.importances) == set(ref.pcreg.importances) == want
        assert got.pcreg.num_consolidations == ref.pcreg.num_consolidations == 2
        assert rec.losses == pytest.approx(ref_rec.losses, rel=1e-6, abs=0)
        for n, a in ref.pcreg.importances.items():
            torch.testing.assert_close(got.pcreg.importances[n], a, rtol=1e-6, atol=0, msg=lambda m: f"{n}: {m}")
            torch.testing.assert_close(got.pcreg.anchors[n], ref.pcreg.anchors[n], rtol=1e-6, atol=0)
        assert any(float(a.max()) > 0 for a in ref.pcreg.importances.values())


@pytest.mark.parametrize("kind", [k for k in _WRAPPERS if k != "plain"])
def test_plugin_selection_and_reg_look_through_wrappers(kind):
    """include / exclude / parameters select by the plain model's names on a wrapped model, and
    ParameterChangeReg finds the plain names in a wrapped target."""
    from avalanche_pcreg import ParameterChangePlugin, ParameterChangeReg

    plain = _BNNet()
    _, w = _wrapped(kind)
    for kw in (dict(exclude=["*.1.*"]), dict(include=["body.*", "head.*"]),
               dict(parameters=lambda name, p: name.startswith("block."))):
        plugin = ParameterChangePlugin(1.0, **kw)
        assert set(plugin.selected_parameters(w)) == set(plugin.selected_parameters(plain)), kw
    weights = {n: torch.rand_like(p) for n, p in plain.named_parameters()}
    ref = {n: p.detach() + 0.5 for n, p in plain.named_parameters()}
    reg = ParameterChangeReg(2.0)
    assert float(reg(w, ref, weights)) == pytest.approx(float(reg(plain, ref, weights)), rel=1e-6)
    # the wrapper's own names are still accepted
    raw = {n: weights[canonical] for n, canonical in zip([n for n, _ in w.named_parameters()],
                                                          [n for n, _ in plain.named_parameters()])}
    own = {n: p.detach().clone() for n, p in w.named_parameters()}
    assert float(reg(w, own, raw)) == 0.0


@pytest.fixture
def one_process_group():
    """A 1-process gloo group in this process (an in-memory store), destroyed afterwards."""
    import torch.distributed as dist

    if not dist.is_available() or dist.is_initialized():
        pytest.skip("torch.distributed unavailable or already initialised")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_si_on_ddp_model_is_the_plain_run(one_process_group):
    """Under a 1-process group, SI on a DDP-wrapped model equals SI on the plain model (both under
    the group, so both get Avalanche's distributed sampler)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    for importance in ("avalanche_si", "si"):
        ref, ref_rec = _run_si("plain", importance)
        m = _BNNet()
        got, rec = _run_si("ddp", importance, (m, DDP(m)))
        assert set(got.pcreg.selected_parameters(got.model)) == set(ref.pcreg.selected_parameters(ref.model))
        assert not set(got.pcreg.importances) & {"body.1.weight", "body.1.bias"}
        assert set(got.pcreg.importances) == set(ref.pcreg.importances)
        assert rec.losses == pytest.approx(ref_rec.losses, rel=1e-6, abs=0)
        for n, a in ref.pcreg.importances.items():
            torch.testing.assert_close(got.pcreg.importances[n], a, rtol=1e-6, atol=0, msg=lambda m: f"{n}: {m}")
