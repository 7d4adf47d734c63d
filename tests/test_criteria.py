"""Criteria other than class-index cross-entropy: per-sample losses and likelihoods.

Every estimate is compared with a float64 loop over single samples: the criterion on one sample
(``reduction='sum'``, i.e. its ``reduction='none'`` losses summed over the non-sample dimensions),
differentiated with ``torch.autograd.grad``, squared and averaged; for the expected Fisher, the
likelihood's outcomes weighted by their probabilities (Bernoulli) or the Jacobian (Gaussian).
Both through ``compute_importance`` and through the plugin in an Avalanche ``Naive`` run, whose
default criterion is the strategy's own.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from avalanche.benchmarks import benchmark_from_datasets
from avalanche.benchmarks.utils import AvalancheDataset
from avalanche.training.plugins import EWCPlugin
from avalanche.training.supervised import Naive

from avalanche_pcreg import ParameterChangePlugin, compute_importance
from avalanche_pcreg.importance.fisher import sample_outcomes
from helpers import LossRecorder

F64 = torch.float64
FEATURES, HIDDEN, OUT, CLASSES = 5, 8, 3, 4
RTOL = 1e-6


# ----------------------------------------------------------------------------- data and models
def _targets(kind: str, n: int, g: torch.Generator) -> torch.Tensor:
    if kind == "regression":
        return torch.randn(n, OUT, generator=g, dtype=F64)
    if kind == "regression1":  # one output per sample, targets of shape [N]
        return torch.randn(n, generator=g, dtype=F64)
    if kind == "multilabel":
        return (torch.rand(n, OUT, generator=g) < 0.4).to(F64)
    if kind == "classes":
        return torch.randint(0, CLASSES, (n,), generator=g)
    if kind == "soft":  # class probabilities
        return torch.softmax(torch.randn(n, CLASSES, generator=g, dtype=F64), -1)
    raise AssertionError(kind)


def make_data(kind: str, n: int = 23, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, FEATURES, generator=g, dtype=F64)
    return x, _targets(kind, n, g)


def make_model(outputs: int, log_softmax: bool = False, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(FEATURES, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, outputs)]
    if log_softmax:
        layers.append(nn.LogSoftmax(dim=-1))
    return nn.Sequential(*layers).to(F64)


# criterion id -> (criterion factory, target kind, model outputs, log-softmax head)
CRITERIA = {
    "mse": (lambda: nn.MSELoss(), "regression", OUT, False),
    "mse_one_output": (lambda: nn.MSELoss(), "regression1", 1, False),
    "bce_multilabel": (lambda: nn.BCEWithLogitsLoss(), "multilabel", OUT, False),
    "bce_pos_weight": (lambda: nn.BCEWithLogitsLoss(pos_weight=torch.tensor([0.5, 2.0, 3.0], dtype=F64)),
                       "multilabel", OUT, False),
    "l1": (lambda: nn.L1Loss(), "regression", OUT, False),
    "huber": (lambda: nn.HuberLoss(delta=0.5), "regression", OUT, False),
    "smooth_l1": (lambda: nn.SmoothL1Loss(beta=0.5), "regression", OUT, False),
    "nll": (lambda: nn.NLLLoss(), "classes", CLASSES, True),
    "ce_weighted": (lambda: nn.CrossEntropyLoss(weight=torch.tensor([0.2, 1.0, 3.0, 0.7], dtype=F64),
                                                label_smoothing=0.1, ignore_index=2), "classes", CLASSES, False),
    "ce_soft_targets": (lambda: nn.CrossEntropyLoss(), "soft", CLASSES, False),
}


def _case(name):
    make_crit, kind, outputs, log_softmax = CRITERIA[name]
    return make_crit(), kind, outputs, log_softmax


# ----------------------------------------------------------------------------- float64 references
def _grads(model, loss):
    params = dict(model.named_parameters())
    gs = torch.autograd.grad(loss, list(params.values()), allow_unused=True, retain_graph=True)
    return {k: (torch.zeros_like(p) if g is None else g) for (k, p), g in zip(params.items(), gs)}


def brute_empirical(model, x, y, criterion):
    """Mean over samples of (grad of the criterion on that one sample)**2, in float64."""
    model = copy.deepcopy(model).to(F64).eval()
    crit = copy.copy(criterion)
    crit.reduction = "sum"  # one sample: the sum of its reduction='none' losses
    acc = {k: torch.zeros_like(p, dtype=F64) for k, p in model.named_parameters()}
    for i in range(x.shape[0]):
        out = model(x[i:i + 1].to(F64))
        yi = y[i:i + 1]
        if yi.is_floating_point() and yi.numel() == out.numel():
            yi = yi.reshape(out.shape).to(F64)
        for k, g in _grads(model, crit(out, yi)).items():
            acc[k] += g ** 2
    return {k: v / x.shape[0] for k, v in acc.items()}


def brute_expected(model, x, likelihood):
    """Expected Fisher in float64: Bernoulli, for each output both outcomes weighted by their
    probabilities; Gaussian, the squared Jacobian rows (diag of JᵀJ); softmax, sum_c p_c g_c**2."""
    model = copy.deepcopy(model).to(F64).eval()
    acc = {k: torch.zeros_like(p, dtype=F64) for k, p in model.named_parameters()}
    for i in range(x.shape[0]):
        out = model(x[i:i + 1].to(F64))[0]
        for j in range(out.shape[0]):
            if likelihood == "bernoulli":
                p = torch.sigmoid(out[j]).detach()
                for outcome, prob in ((1.0, p), (0.0, 1 - p)):
                    loss = F.binary_cross_entropy_with_logits(out[j], torch.tensor(outcome, dtype=F64))
                    for k, g in _grads(model, loss).items():
                        acc[k] += prob * g ** 2
            elif likelihood == "gaussian":
                for k, g in _grads(model, out[j]).items():
                    acc[k] += g ** 2
            elif likelihood == "softmax":
                logp = torch.log_softmax(out, -1)
                for k, g in _grads(model, -logp[j]).items():
                    acc[k] += logp[j].exp().detach() * g ** 2
            else:
                raise AssertionError(likelihood)
    return {k: v / x.shape[0] for k, v in acc.items()}


def brute_sampled(model, x, likelihood, u):
    """``fisher`` in float64 with the outcomes drawn from each sample's uniform alone."""
    model = copy.deepcopy(model).to(F64).eval()
    acc = {k: torch.zeros_like(p, dtype=F64) for k, p in model.named_parameters()}
    for i in range(x.shape[0]):
        out = model(x[i:i + 1].to(F64))
        drawn = sample_outcomes(out.detach(), u[i:i + 1], likelihood)
        if likelihood == "bernoulli":
            loss = F.binary_cross_entropy_with_logits(out, drawn, reduction="sum")
        else:  # -log N(f + eps; f, I) has gradient -eps in f
            loss = 0.5 * (out - (out.detach() + drawn)).pow(2).sum()
        for k, g in _grads(model, loss).items():
            acc[k] += g ** 2
    return {k: v / x.shape[0] for k, v in acc.items()}


def assert_close(got, ref, rtol=RTOL):
    assert set(got) == set(ref)
    for k in ref:
        assert ref[k].abs().sum() > 0, k
        scale = float(ref[k].abs().max())
        torch.testing.assert_close(got[k].to(F64), ref[k], rtol=rtol, atol=rtol * 1e-3 * scale,
                                   msg=lambda m: f"{k}: {m}")


def assert_differs(a, b):
    assert any(not torch.allclose(a[k].to(F64), b[k].to(F64), rtol=1e-3, atol=0) for k in a)


# ----------------------------------------------------------------------------- compute_importance
@pytest.mark.parametrize("name", sorted(CRITERIA))
def test_empirical_fisher_uses_the_criterion_per_sample(name):
    crit, kind, outputs, log_softmax = _case(name)
    model = make_model(outputs, log_softmax)
    x, y = make_data(kind)
    got = compute_importance(model, TensorDataset(x, y), "empirical_fisher", criterion=crit, batch_size=5)
    ref = brute_empirical(model, x, y, crit)
    assert_close(got, ref)
    assert crit.reduction == "mean"  # the user's criterion is not modified


def test_per_sample_losses_differ_between_criteria():
    """The references tell the criteria apart, so using one for another fails the test above
    (cross-entropy for MSE, MSE for L1, the unweighted loss for the weighted one ...)."""
    model = make_model(OUT)
    x, y = make_data("regression")
    refs = {n: brute_empirical(model, x, y, CRITERIA[n][0]()) for n in ("mse", "l1", "huber", "smooth_l1")}
    names = list(refs)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert_differs(refs[a], refs[b])
    soft = brute_empirical(model, x, torch.softmax(y, -1), nn.CrossEntropyLoss())  # CE reading floats as soft labels
    assert_differs(refs["mse"], soft)
    cls = make_model(CLASSES)
    xc, yc = make_data("classes")
    assert_differs(brute_empirical(cls, xc, yc, CRITERIA["ce_weighted"][0]()),
                   brute_empirical(cls, xc, yc, nn.CrossEntropyLoss()))
    ml = make_model(OUT)
    xm, ym = make_data("multilabel")
    assert_differs(brute_empirical(ml, xm, ym, CRITERIA["bce_pos_weight"][0]()),
                   brute_empirical(ml, xm, ym, nn.BCEWithLogitsLoss()))


def test_weighted_cross_entropy_per_sample_is_weight_times_loss():
    """Documented choice: sample n's loss is weight[y_n] * loss_n (reduction='none'), not the
    weighted mean's share; an ignored target contributes nothing (and still counts as a sample)."""
    model = make_model(CLASSES)
    x, y = make_data("classes")
    w = torch.tensor([0.2, 1.0, 3.0, 0.7], dtype=F64)
    got = compute_importance(model, TensorDataset(x, y), "empirical_fisher",
                             criterion=nn.CrossEntropyLoss(weight=w, ignore_index=2), batch_size=5)
    acc = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    for i in range(x.shape[0]):
        if int(y[i]) == 2:
            continue
        loss = w[y[i]] * F.cross_entropy(model(x[i:i + 1]), y[i:i + 1])
        for k, g in _grads(model, loss).items():
            acc[k] += g ** 2
    assert_close(got, {k: v / x.shape[0] for k, v in acc.items()})


@pytest.mark.parametrize("name, likelihood", [("mse", "gaussian"), ("mse_one_output", "gaussian"),
                                              ("bce_multilabel", "bernoulli"), ("bce_pos_weight", "bernoulli"),
                                              ("nll", "softmax"), ("ce_weighted", "softmax")])
def test_expected_fisher_of_the_criterion_likelihood(name, likelihood):
    crit, kind, outputs, log_softmax = _case(name)
    model = make_model(outputs, log_softmax)
    x, y = make_data(kind)
    got = compute_importance(model, TensorDataset(x, y), "expected_fisher", criterion=crit, batch_size=5)
    assert_close(got, brute_expected(model, x, likelihood))


def test_expected_fisher_likelihoods_differ():
    """Gaussian, Bernoulli and softmax references differ on one model (a mix-up would fail)."""
    model = make_model(OUT)
    x, _ = make_data("regression")
    refs = {lk: brute_expected(model, x, lk) for lk in ("gaussian", "bernoulli", "softmax")}
    assert_differs(refs["gaussian"], refs["bernoulli"])
    assert_differs(refs["gaussian"], refs["softmax"])
    assert_differs(refs["bernoulli"], refs["softmax"])


def test_expected_fisher_default_is_softmax_and_one_logit_bernoulli():
    model = make_model(CLASSES)
    x, y = make_data("classes")
    got = compute_importance(model, TensorDataset(x, y), "expected_fisher", batch_size=5)
    assert_close(got, brute_expected(model, x, "softmax"))
    binary = make_model(1)
    yb = (y % 2).long()
    got = compute_importance(binary, TensorDataset(x, yb), "expected_fisher", batch_size=5)
    assert_close(got, brute_expected(binary, x, "bernoulli"))
    with_crit = compute_importance(binary, TensorDataset(x, yb.to(F64)), "expected_fisher", batch_size=5,
                                   criterion=nn.BCEWithLogitsLoss())
    assert_close(with_crit, got)


@pytest.mark.parametrize("name, likelihood", [("mse", "gaussian"), ("mse_one_output", "gaussian"),
                                              ("bce_multilabel", "bernoulli")])
def test_sampled_fisher_draws_from_the_criterion_likelihood(name, likelihood):
    """``fisher`` equals the float64 loop with each sample's outcomes drawn from its own uniform
    (as compute_importance draws them: one per sample, seeded), whatever the batch size."""
    crit, kind, outputs, _ = _case(name)
    model = make_model(outputs)
    x, y = make_data(kind)
    seed = 5
    u = torch.rand(x.shape[0], generator=torch.Generator().manual_seed(seed), dtype=F64)
    ref = brute_sampled(model, x, likelihood, u)
    for bs in (4, 23):
        got = compute_importance(model, TensorDataset(x, y), "fisher", criterion=crit, batch_size=bs, seed=seed)
        assert_close(got, ref)


@pytest.mark.parametrize("name, likelihood", [("mse", "gaussian"), ("bce_multilabel", "bernoulli")])
def test_sampled_fisher_averages_to_the_expected_fisher(name, likelihood):
    """Many samples at the same few inputs: the sampled Fisher is an unbiased estimate of the
    expected one (a wrong noise scale or a dependent draw would be off by far more than 10%)."""
    crit, kind, outputs, _ = _case(name)
    model = make_model(outputs)
    x, y = make_data(kind, n=3)
    reps = 4000
    xr, yr = x.repeat(reps, 1), y.repeat(reps, 1)
    got = compute_importance(model, TensorDataset(xr, yr), "fisher", criterion=crit, batch_size=500, seed=1)
    ref = brute_expected(model, x, likelihood)
    for k in ref:
        rel = float((got[k].sum() - ref[k].sum()).abs() / ref[k].sum())
        assert rel < 0.1, (k, rel)


@pytest.mark.parametrize("method", ["expected_fisher", "fisher"])
@pytest.mark.parametrize("crit", [nn.L1Loss(), nn.HuberLoss(), nn.SmoothL1Loss(), nn.BCELoss(),
                                  lambda out, y: F.mse_loss(out, y, reduction="none").sum(1)],
                         ids=["L1Loss", "HuberLoss", "SmoothL1Loss", "BCELoss", "callable"])
def test_likelihood_estimators_refuse_criteria_without_a_likelihood(method, crit):
    model = make_model(OUT)
    x, y = make_data("regression")
    with pytest.raises(ValueError) as err:
        compute_importance(model, TensorDataset(x, y), method, criterion=crit)
    msg = str(err.value)
    name = crit.__name__ if not isinstance(crit, nn.Module) else type(crit).__name__
    assert f"estimator {method!r}" in msg and f"criterion {name}" in msg and "empirical_fisher" in msg


def test_softmax_criterion_needs_class_logits():
    model = make_model(1)
    x, y = make_data("classes")
    with pytest.raises(ValueError, match=r"criterion CrossEntropyLoss is a softmax .* C >= 2.*BCEWithLogitsLoss"):
        compute_importance(model, TensorDataset(x, y), "expected_fisher", criterion=nn.CrossEntropyLoss())


def test_callable_criterion_must_return_per_sample_losses():
    model = make_model(OUT)
    x, y = make_data("regression")
    with pytest.raises(ValueError) as err:
        compute_importance(model, TensorDataset(x, y), "empirical_fisher", criterion=lambda out, t: F.mse_loss(out, t))
    msg = str(err.value)
    assert "criterion must return per-sample losses of shape (23,)" in msg and "ParameterChangePlugin" in msg
    # a per-sample callable is accepted, [N] or [N, ...] (summed per sample)
    ref = brute_empirical(model, x, y, nn.MSELoss())
    for fn in (lambda out, t: F.mse_loss(out, t, reduction="none").sum(1),
               lambda out, t: F.mse_loss(out, t, reduction="none")):
        assert_close(compute_importance(model, TensorDataset(x, y), "empirical_fisher", criterion=fn, batch_size=5),
                     ref)


def test_criterion_must_be_callable():
    model = make_model(OUT)
    x, y = make_data("regression")
    with pytest.raises(TypeError, match=r"criterion must be a callable .*got str 'mse'"):
        compute_importance(model, TensorDataset(x, y), "empirical_fisher", criterion="mse")
    with pytest.raises(TypeError, match=r"criterion must be a callable .*got int 3"):
        ParameterChangePlugin(1.0, criterion=3)


@pytest.mark.parametrize("method", ["empirical_fisher", "expected_fisher", "fisher"])
def test_no_criterion_and_float_targets_is_an_error(method):
    """The default is cross-entropy on class indices: float targets (regression, soft labels)
    are not read as soft labels silently."""
    model = make_model(CLASSES)
    x, y = make_data("soft")
    with pytest.raises(ValueError, match=r"targets are torch.float64 .*criterion=.*nn.MSELoss\(\)"):
        compute_importance(model, TensorDataset(x, y), method)


# ----------------------------------------------------------------------------- through the plugin
def _stream(kind: str, n: int = 24, experiences: int = 1, seed: int = 0):
    """A stream of ``experiences`` AvalancheDatasets of (x, y, task label) in float64."""
    def part(i):
        x, y = make_data(kind, n=n, seed=seed + i)
        return AvalancheDataset([TensorDataset(x, y, torch.zeros(n, dtype=torch.long))]), (x, y)

    parts = [part(i) for i in range(experiences)]
    bench = benchmark_from_datasets(train=[p[0] for p in parts], test=[parts[0][0]])
    return bench, [p[1] for p in parts]


def _train(bench, model, criterion, plugin, epochs=1):
    torch.manual_seed(0)
    rec = LossRecorder()
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05), criterion=criterion,
                     train_mb_size=8, train_epochs=epochs, eval_mb_size=8, device="cpu", plugins=[plugin, rec],
                     evaluator=None, eval_every=-1)
    for exp in bench.train_stream:
        strategy.train(exp)
    return strategy, rec


@pytest.mark.parametrize("name", sorted(CRITERIA))
def test_plugin_uses_the_strategy_criterion_per_sample(name):
    """The plugin's default importance on a Naive run with this criterion is the criterion's
    per-sample empirical Fisher of the trained model (the regression case used to be a
    cross-entropy Fisher of float targets read as soft labels)."""
    crit, kind, outputs, log_softmax = _case(name)
    bench, [(x, y)] = _stream(kind)
    plugin = ParameterChangePlugin(1.0, batch_size=5)
    strategy, rec = _train(bench, make_model(outputs, log_softmax), crit, plugin)
    assert plugin.num_consolidations == 1 and len(rec.losses) > 0
    assert_close(plugin.importances, brute_empirical(strategy.model, x, y, crit))


@pytest.mark.parametrize("name, likelihood", [("mse", "gaussian"), ("bce_multilabel", "bernoulli"),
                                              ("nll", "softmax")])
def test_plugin_expected_fisher_takes_the_strategy_likelihood(name, likelihood):
    crit, kind, outputs, log_softmax = _case(name)
    bench, [(x, _)] = _stream(kind)
    plugin = ParameterChangePlugin(1.0, "expected_fisher", batch_size=5)
    strategy, _ = _train(bench, make_model(outputs, log_softmax), crit, plugin)
    assert_close(plugin.importances, brute_expected(strategy.model, x, likelihood))


def test_plugin_criterion_overrides_the_strategy_criterion():
    bench, [(x, y)] = _stream("regression")
    plugin = ParameterChangePlugin(1.0, batch_size=5, criterion=nn.L1Loss())
    strategy, _ = _train(bench, make_model(OUT), nn.MSELoss(), plugin)
    assert_close(plugin.importances, brute_empirical(strategy.model, x, y, nn.L1Loss()))


@pytest.mark.parametrize("method", ["expected_fisher", "fisher"])
def test_plugin_refuses_a_likelihood_estimator_for_a_loss_without_one(method):
    bench, _ = _stream("regression")
    plugin = ParameterChangePlugin(1.0, method, batch_size=5)
    with pytest.raises(ValueError, match=rf"estimator '{method}' .*criterion HuberLoss has none it knows"):
        _train(bench, make_model(OUT), nn.HuberLoss(), plugin)
    assert plugin.num_consolidations == 0


def test_plugin_with_an_unknown_strategy_criterion_and_float_targets_asks_for_criterion():
    bench, _ = _stream("regression")
    plugin = ParameterChangePlugin(1.0, batch_size=5)

    def my_mse(out, y):
        return ((out - y) ** 2).mean()

    with pytest.raises(ValueError) as err:
        _train(bench, make_model(OUT), my_mse, plugin)
    msg = str(err.value)
    assert "the strategy's criterion my_mse is not a torch loss" in msg and "ParameterChangePlugin(criterion=...)" in msg
    assert plugin.num_consolidations == 0
    # with the loss given per sample, the same run works
    plugin = ParameterChangePlugin(1.0, batch_size=5, criterion=lambda out, y: ((out - y) ** 2).sum(1))
    strategy, _ = _train(bench, make_model(OUT), my_mse, plugin)
    x, y = make_data("regression", n=24)
    assert_close(plugin.importances, brute_empirical(strategy.model, x, y, nn.MSELoss()))


def test_plugin_with_an_unknown_strategy_criterion_on_classes_warns_and_uses_cross_entropy():
    bench, [(x, y)] = _stream("classes")
    plugin = ParameterChangePlugin(1.0, batch_size=5)
    with pytest.warns(UserWarning, match=r"the strategy's criterion <lambda> is not a torch loss.*cross-entropy"):
        strategy, _ = _train(bench, make_model(CLASSES), lambda out, t: F.cross_entropy(out, t), plugin)
    assert_close(plugin.importances, brute_empirical(strategy.model, x, y, nn.CrossEntropyLoss()))


# ----------------------------------------------------------------------------- dict outputs
class DictNet(nn.Module):
    """Returns ``{"logits": ..., "hidden": ...}``; ``plain=True``: the same network, logits only."""

    def __init__(self, outputs=CLASSES, plain=False):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.Tanh())
        self.head = nn.Linear(HIDDEN, outputs)
        self.plain = plain
        self.to(F64)

    def forward(self, x):
        h = self.body(x)
        z = self.head(h)
        return z if self.plain else {"logits": z, "hidden": h}


def dict_only_ce(out, y):
    """A criterion written for the dict model (it indexes the dict)."""
    return F.cross_entropy(out["logits"], y)


@pytest.mark.parametrize("importance", ["minibatch_fisher", "rwalk", "empirical_fisher"])
def test_dict_only_strategy_criterion_works(importance):
    """The strategy's criterion gets the raw (dict) output where it is called as it is, as in
    training and in Avalanche's plugins; the result equals the plain model's with cross-entropy."""
    bench, _ = _stream("classes", experiences=2)
    opts = dict(mode="online", decay=0.0) if importance == "rwalk" else {}
    ref = ParameterChangePlugin(3.0, importance, batch_size=5, **opts)
    _, ref_rec = _train(bench, DictNet(plain=True), nn.CrossEntropyLoss(), ref)
    plugin = ParameterChangePlugin(3.0, importance, batch_size=5, **opts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # empirical_fisher: not a torch loss, cross-entropy used
        _, rec = _train(bench, DictNet(), dict_only_ce, plugin)
    assert plugin.num_consolidations == ref.num_consolidations == 2
    assert rec.losses == pytest.approx(ref_rec.losses, rel=1e-9, abs=0)
    for k, v in ref.importances.items():
        assert v.abs().sum() > 0
        torch.testing.assert_close(plugin.importances[k], v, rtol=1e-9, atol=0)


def test_dict_only_strategy_criterion_matches_avalanche_ewc():
    """Avalanche's EWCPlugin calls the strategy's criterion on the raw output: same run."""
    bench, _ = _stream("classes", experiences=2)
    _, theirs = _train(bench, DictNet(), dict_only_ce, EWCPlugin(ewc_lambda=3.0, mode="separate"))
    _, ours = _train(bench, DictNet(), dict_only_ce, ParameterChangePlugin(3.0, "minibatch_fisher"))
    assert ours.losses == pytest.approx(theirs.losses, rel=1e-9, abs=0)


def test_plugin_criterion_gets_the_logits_of_a_dict_model():
    """A criterion given to the plugin gets the logits (the dict's "logits"), here a regression loss."""
    bench, [(x, y)] = _stream("regression")

    def dict_mse(out, t):
        return F.mse_loss(out["logits"], t)

    plugin = ParameterChangePlugin(1.0, batch_size=5, criterion=nn.MSELoss())
    strategy, _ = _train(bench, DictNet(outputs=OUT), dict_mse, plugin)
    plain = DictNet(outputs=OUT, plain=True)
    plain.load_state_dict(strategy.model.state_dict())
    assert_close(plugin.importances, brute_empirical(plain, x, y, nn.MSELoss()))


class ScaledMLP(nn.Module):
    """An MLP whose output is multiplied by a root-level parameter: that parameter goes through
    the whole-model (functional) fallback, where the criterion is evaluated again."""

    def __init__(self, outputs=OUT):
        super().__init__()
        torch.manual_seed(0)
        self.net = make_model(outputs)
        self.scale = nn.Parameter(1.0 + 0.1 * torch.randn(outputs, dtype=F64))

    def forward(self, x):
        return self.net(x) * self.scale


@pytest.mark.parametrize("name, likelihood", [("mse", "gaussian"), ("bce_pos_weight", "bernoulli")])
def test_criteria_through_the_functional_fallback(name, likelihood):
    crit, kind, _, _ = _case(name)
    model = ScaledMLP()
    x, y = make_data(kind)
    emp = compute_importance(model, TensorDataset(x, y), "empirical_fisher", criterion=crit, batch_size=5)
    exp = compute_importance(model, TensorDataset(x, y), "expected_fisher", criterion=crit, batch_size=5)
    assert_close(emp, brute_empirical(model, x, y, crit))
    assert_close(exp, brute_expected(model, x, likelihood))
