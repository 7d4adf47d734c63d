"""The per-layer rule registry: user rules, the per-layer fallback and the self-check, each
against a brute-force float64 per-sample loop."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from avalanche_pcreg.importance import register_rule
from avalanche_pcreg.importance._persample import PerSampleGradNorms
from avalanche_pcreg.importance.rules import RULES, Rule, rule_for
from test_persample import TOL, brute, loss_fn_for


class Scale(nn.Module):
    """y = x * scale + shift over the last dimension (no built-in rule)."""

    def __init__(self, d):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(d))
        self.shift = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return x * self.scale + self.shift


class Gated(nn.Module):
    """An unregistered layer with its own parameters: (W x) * sigmoid(x) + b."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d, d) / d ** 0.5)
        self.bias = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return F.linear(x, self.weight) * torch.sigmoid(x) + self.bias


def net(mid):
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), mid, nn.Tanh(), nn.Linear(5, 3))


@pytest.fixture
def registry():
    """Rules registered in a test are removed afterwards."""
    before = dict(RULES)
    yield
    RULES.clear()
    RULES.update(before)


def run(model, x, n_out, power, fallback=True, **kw):
    torch.manual_seed(5)
    y = F.one_hot(torch.randint(0, n_out, (x.shape[0],)), n_out).double()
    names = [n for n, _ in model.named_parameters()]
    lf = loss_fn_for(model, x, y)
    ref = brute(model, names, lf, power)
    with PerSampleGradNorms(model, names, power=power, chunk_size=3, **kw) as acc:
        acc.backward(lf(), fallback=(lambda p: lf(p)) if fallback else None)
        info = (acc.fallback_names, acc.model_fallback_names)
    for n in names:
        assert ref[n].abs().sum() > 0, n
        torch.testing.assert_close(acc.sums[n], ref[n], **TOL, msg=lambda m: f"{n}: {m}")
    return info


@pytest.mark.parametrize("power", [1, 2])
def test_user_rule_is_used_and_exact(registry, power):
    calls = []

    @register_rule(Scale)
    def scale_rule(module, a, d):
        calls.append(a.shape)
        red = tuple(range(1, a.dim() - 1))
        gs, gb = a * d, d
        return {"scale": gs.sum(red) if red else gs, "shift": gb.sum(red) if red else gb}

    torch.manual_seed(0)
    model = net(Scale(5)).double().eval()
    fb, model_fb = run(model, torch.randn(7, 4, dtype=torch.float64), 3, power, fallback=False)
    assert calls and fb == [] and model_fb == []
    assert rule_for(model[2]).fn is scale_rule


@pytest.mark.parametrize("power", [1, 2])
def test_unregistered_layer_per_layer_fallback_exact(power):
    torch.manual_seed(1)
    model = net(Gated(5)).double().eval()
    # no whole-model fallback function is given: the per-layer fallback must do it
    fb, model_fb = run(model, torch.randn(8, 4, dtype=torch.float64), 3, power, fallback=False)
    assert fb == ["2.weight", "2.bias"] and model_fb == []
    # on sequences ([N, T, D]) too
    torch.manual_seed(2)
    seq = nn.Sequential(nn.Linear(4, 5), Gated(5), nn.Flatten(), nn.Linear(15, 3)).double().eval()
    run(seq, torch.randn(6, 3, 4, dtype=torch.float64), 3, power, fallback=False)


def test_wrong_user_rule_is_caught_and_result_exact(registry):
    @register_rule(Scale)
    def wrong(module, a, d):  # forgets the input in the scale gradient
        return {"scale": d.clone(), "shift": d.clone()}

    torch.manual_seed(3)
    model = net(Scale(5)).double().eval()
    with pytest.warns(RuntimeWarning, match=r"2\.scale: .*differs from the true minibatch gradient"):
        fb, model_fb = run(model, torch.randn(9, 4, dtype=torch.float64), 3, 2)
    assert model_fb == ["2.scale"] and fb == ["2.scale"]  # the correct shift rule is kept


def test_rule_returning_wrong_shape_is_caught(registry):
    @register_rule(Scale)
    def bad_shape(module, a, d):
        return {"scale": (a * d)[:, :2], "shift": d}

    torch.manual_seed(4)
    model = net(Scale(5)).double().eval()
    with pytest.warns(RuntimeWarning, match="2.scale"):
        run(model, torch.randn(5, 4, dtype=torch.float64), 3, 1)


def test_rule_class_and_subclass_lookup(registry):
    class MyRule(Rule):
        params = ("scale", "shift")

        def per_sample(self, module, a, d):
            return {"scale": a * d, "shift": d}

    register_rule(Scale, MyRule)
    assert isinstance(rule_for(Scale(3)), MyRule)

    class Sub(Scale):  # keeps forward: same rule
        pass

    class Over(Scale):  # overrides forward: no rule
        def forward(self, x):
            return super().forward(x) * 2

    assert isinstance(rule_for(Sub(3)), MyRule) and rule_for(Over(3)) is None
    assert type(rule_for(nn.Linear(2, 2))).__name__ == "LinearRule"
    torch.manual_seed(6)
    run(net(Over(5)).double().eval(), torch.randn(6, 4, dtype=torch.float64), 3, 2, fallback=False)


def test_register_rule_errors(registry):
    with pytest.raises(TypeError, match="layer_type"):
        register_rule(lambda x: x)
    with pytest.raises(TypeError, match="rule"):
        register_rule(Scale, 3)
    with pytest.raises(ValueError, match="already registered"):
        register_rule(nn.Linear, lambda m, a, d: {})
    register_rule(nn.Linear, lambda m, a, d: {}, replace=True)  # explicit override is allowed


def test_check_runs_on_first_batch_and_on_new_shapes():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double().eval()
    names = [n for n, _ in model.named_parameters()]
    xs = [torch.randn(b, 4, dtype=torch.float64) for b in (6, 6, 6, 4)]
    ys = [F.one_hot(torch.randint(0, 3, (x.shape[0],)), 3).double() for x in xs]
    ref = {n: 0 for n in names}
    for x, y in zip(xs, ys):
        r = brute(model, names, loss_fn_for(model, x, y), 2)
        ref = {n: ref[n] + r[n] for n in names}
    for mode, expected in (("signature", 2), ("always", 4)):
        with PerSampleGradNorms(model, names, check=mode) as acc:
            for x, y in zip(xs, ys):
                acc.backward(loss_fn_for(model, x, y)())
        assert acc.checked_batches == expected
        for n in names:
            torch.testing.assert_close(acc.sums[n], ref[n], **TOL)
    with pytest.raises(ValueError, match="check"):
        PerSampleGradNorms(model, names, check="never")


def test_wrong_user_rule_is_caught_with_k_cotangents(registry):
    """With K cotangents per sample (the exact expected Fisher's path) the check runs once on
    their sum; a wrong rule still goes to the whole-model fallback and the sums stay exact."""
    from torch.func import functional_call

    @register_rule(Scale)
    def wrong(module, a, d):
        return {"scale": d.clone(), "shift": d.clone()}

    torch.manual_seed(5)
    model = net(Scale(5)).double().eval()
    x = torch.randn(6, 4, dtype=torch.float64)
    cot = torch.randn(4, 6, 3, dtype=torch.float64)
    names = [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    ref = {n: torch.zeros_like(p) for n, p in params.items()}
    out = model(x)
    for k in range(cot.shape[0]):
        for i in range(x.shape[0]):
            gs = torch.autograd.grad(out[i] @ cot[k, i], [params[n] for n in names], retain_graph=True)
            for n, g in zip(names, gs):
                ref[n] += g * g
    with PerSampleGradNorms(model, names, max_bytes=1) as acc:  # one column per backward
        with pytest.warns(RuntimeWarning, match=r"2\.scale: .*differs from the true minibatch gradient"):
            acc.backward_batched(model(x), cot, fallback=lambda p: functional_call(model, p, (x,)))
        assert acc.model_fallback_names == ["2.scale"] and acc.checked_batches == 1
    for n in names:
        torch.testing.assert_close(acc.sums[n], ref[n], **TOL, msg=lambda m: f"{n}: {m}")
