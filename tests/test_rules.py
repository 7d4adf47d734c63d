"""The per-layer rules: user rules, the per-layer fallback and the self-check, each against a
brute-force float64 per-sample loop; every built-in rule × every quantity through the rule
interface (one reference harness); a second quantity (Σ_n g_n) through the whole engine."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from avalanche_pcreg.importance import register_rule
from avalanche_pcreg.importance.persample import GradientSum, PerSampleGradNorms, Policy, PowerSum, Request
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


# ----------------------------------------------------------------------------- the public API alone
@pytest.mark.parametrize("method", ["empirical_fisher", "expected_fisher", "mas"])
def test_user_rule_gives_exact_importances_through_compute_importance(registry, method):
    """A rule registered for a custom layer with ``register_rule`` (a function of (module, a, d),
    as short as Opacus's) is used by ``compute_importance`` -- no fallback, no warning -- and the
    importances equal a float64 loop over samples."""
    from torch.utils.data import TensorDataset

    from avalanche_pcreg import compute_importance

    calls = []

    @register_rule(Scale)
    def scale_rule(module, a, d):
        calls.append(a.shape[0])
        return {"scale": a * d, "shift": d}

    torch.manual_seed(8)
    model = net(Scale(5)).double()
    x, y = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback
        got = compute_importance(model, TensorDataset(x, y), method, batch_size=4)
    assert calls
    params = dict(model.named_parameters())
    ref = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(10):
        out = model(x[i:i + 1])
        if method == "empirical_fisher":
            terms = [(F.cross_entropy(out, y[i:i + 1]), 1.0)]
        elif method == "mas":
            terms = [(out.pow(2).sum(), 1.0)]
        else:  # Σ_c p_c g_c²
            logp = torch.log_softmax(out, -1)[0]
            terms = [(-logp[c], float(logp[c].detach().exp())) for c in range(3)]
        for loss, w in terms:
            for n, g in zip(params, torch.autograd.grad(loss, list(params.values()), retain_graph=True)):
                ref[n] += w * (g.abs() if method == "mas" else g * g) / 10
    for n in params:
        assert ref[n].abs().sum() > 0, n
        torch.testing.assert_close(got[n], ref[n], **TOL, msg=lambda m: f"{n}: {m}")


# ----------------------------------------------------------------------------- rules x quantities
QUANTITIES = pytest.mark.parametrize("quantity", [PowerSum(1), PowerSum(2), GradientSum()],
                                     ids=["power1", "power2", "gradient_sum"])


def _layer_cases():
    """Every built-in rule's layer family, in the configurations its closed forms distinguish:
    ``{id: (module, input)}``, float64, sample axis 0."""
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    def randomized(m):
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
        return m

    bn = randomized(nn.BatchNorm2d(3).double()).eval()
    with torch.no_grad():
        bn.running_mean.copy_(r(3))
        bn.running_var.copy_(r(3).abs() + 0.5)
    return {
        "linear": (nn.Linear(4, 3).double(), r(5, 4)),
        "linear-sequence": (nn.Linear(4, 3).double(), r(5, 2, 4)),
        "conv1d-grouped": (nn.Conv1d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2).double(), r(5, 4, 11)),
        "conv2d-strided": (nn.Conv2d(3, 4, (3, 2), stride=2, padding=1).double(), r(4, 3, 7, 6)),
        "conv2d-small-map": (nn.Conv2d(3, 4, 3, padding=1).double(), r(4, 3, 2, 2)),  # Gram form with K = 3
        "conv2d-large-map": (nn.Conv2d(2, 3, 3, padding=1).double(), r(3, 2, 17, 16)),
        "layernorm": (randomized(nn.LayerNorm(5).double()), r(5, 3, 5)),
        "groupnorm": (randomized(nn.GroupNorm(2, 4).double()), r(5, 4, 3)),
        "batchnorm-eval": (bn, r(4, 3, 2, 3)),
        "embedding": (nn.Embedding(7, 3, padding_idx=1).double(), torch.randint(0, 7, (5, 4), generator=g)),
    }


LAYERS = _layer_cases()


def _policies(module):
    """The CPU policy with small chunks; for convolutions, every path, and the position-Gram form
    of their power-2 sums."""
    base = Policy.cpu().replace(chunk_size=2)
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return ([base.replace(conv_path=p, conv_sums="per_sample") for p in ("auto", "batched", "kernel", "matmul",
                                                                             "wgrad")]
                + [base.replace(conv_sums="gram")])
    return [base]


def reference(module, a, d, quantity):
    """``({attr: Σ quantity.of(g)}, {attr: Σ g}, {attr: [g_i]})`` over every (column, sample): g
    by autograd on the module called on sample i alone, δ of that sample as the cotangent; the
    per-sample gradients of the first column."""
    params = dict(module.named_parameters())
    ds = d if d.dim() == module(a[:1]).dim() + 1 else d.unsqueeze(0)
    values = {n: torch.zeros_like(p) for n, p in params.items()}
    totals = {n: torch.zeros_like(p) for n, p in params.items()}
    first = {n: [] for n in params}
    for j in range(ds.shape[0]):
        for i in range(a.shape[0]):
            gs = torch.autograd.grad(module(a[i:i + 1]), list(params.values()), ds[j, i:i + 1])
            for n, gi in zip(params, gs):
                values[n] += quantity.of(gi)
                totals[n] += gi
                if j == 0:
                    first[n].append(gi)
    return values, totals, {n: torch.stack(v) for n, v in first.items()}


@QUANTITIES
@pytest.mark.parametrize("columns", [None, 3])
@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_rule_grid_against_float64_loops(layer, columns, quantity):
    """Each built-in rule × each quantity × one or K = 3 cotangents per sample, through the rule
    interface (``sums`` / ``column_sums`` with a ``Request``, the column accumulators, and
    ``per_sample``), against a float64 loop over samples; convolutions on every path."""
    module, a = LAYERS[layer]
    rule = rule_for(module)
    torch.manual_seed(len(layer))
    out_shape = tuple(module(a).shape)
    d = torch.randn(((columns,) if columns else ()) + out_shape, dtype=torch.float64)
    ref_v, ref_t, ref_first = reference(module, a, d, quantity)
    attrs = frozenset(n for n, _ in module.named_parameters())
    for n in attrs:
        assert ref_v[n].abs().sum() > 0, n
    accumulated = set()
    for policy in _policies(module):
        req = Request(quantity, attrs, totals=True, policy=policy, columns=columns)
        res = rule.sums(module, a, d, req) if columns is None else rule.column_sums(module, a, d, req)
        for n in attrs:
            torch.testing.assert_close(res.values[n], ref_v[n], **TOL,
                                       msg=lambda m: f"{policy.conv_path} {policy.conv_sums} {n}: {m}")
            torch.testing.assert_close(res.totals[n], ref_t[n], **TOL,
                                       msg=lambda m: f"{policy.conv_path} {policy.conv_sums} {n}: {m}")
        if columns is not None:  # the columns given in two pieces to the rule's accumulator, if it has one
            acc = rule.column_accumulator(module, a, out_shape, Request(quantity, attrs, policy=policy,
                                                                        columns=columns))
            if acc is not None:
                acc.add(d[:1])
                acc.add(d[1:])
                for n, v in acc.result().items():
                    accumulated.add(n)
                    torch.testing.assert_close(v, ref_v[n], **TOL, msg=lambda m: f"accumulator {n}: {m}")
    if columns is None:
        got = rule.per_sample(module, a, d)
        for n in attrs:
            torch.testing.assert_close(got[n], ref_first[n], **TOL, msg=lambda m: f"per_sample {n}: {m}")
    expect_acc = {("linear", 1), ("linear", 2), ("conv2d-small-map", 2)}
    want = {"linear": {"weight", "bias"}, "conv2d-small-map": {"weight"}}.get(layer, set())
    has_power = isinstance(quantity, PowerSum)
    assert accumulated == (want if columns and has_power and (layer, quantity.power) in expect_acc else set())


# ----------------------------------------------------------------------------- a second quantity
class _Tied(nn.Module):
    """A Linear, a convolution, a layer without a rule (per-layer fallback) and a weight shared
    by two calls (whole-model fallback)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.gated = Gated(12)
        self.shared = nn.Linear(12, 12)
        self.head = nn.Linear(12, 4)

    def forward(self, x):
        h = torch.tanh(self.conv(x)).flatten(1)
        h = torch.tanh(self.shared(torch.tanh(self.shared(self.gated(h)))))
        return self.head(h)


def test_gradient_sum_through_the_engine_equals_autograd():
    """The engine with ``quantity=GradientSum()``: Σ_n g_n through the rules (Linear's closed form,
    the conv rule), the per-layer and the whole-model fallback, over a checked and an unchecked
    batch, and with K = 3 cotangents per sample, equals autograd's gradient of the summed losses."""
    from torch.func import functional_call

    torch.manual_seed(9)
    model = _Tied().double().eval()
    params = dict(model.named_parameters())
    names = list(params)
    xs = [torch.randn(5, 2, 2, 2, dtype=torch.float64) for _ in range(2)]
    ys = [torch.randint(0, 4, (5,)) for _ in range(2)]
    cots = [torch.randn(3, 5, 4, dtype=torch.float64) for _ in range(2)]
    truth = {n: torch.zeros_like(p) for n, p in params.items()}
    truth_k = {n: torch.zeros_like(p) for n, p in params.items()}
    for x, y, cot in zip(xs, ys, cots):
        out = model(x)
        for n, g in zip(names, torch.autograd.grad(F.cross_entropy(out, y, reduction="sum"), list(params.values()),
                                                   retain_graph=True)):
            truth[n] += g
        for n, g in zip(names, torch.autograd.grad((out * cot.sum(0)).sum(), list(params.values()))):
            truth_k[n] += g
    with PerSampleGradNorms(model, names, quantity=GradientSum()) as acc:
        for x, y in zip(xs, ys):
            fb = (lambda p, x=x, y=y: F.cross_entropy(functional_call(model, p, (x,)), y, reduction="none"))
            acc.backward(F.cross_entropy(model(x), y, reduction="none"), fallback=fb)
        assert acc.checked_batches == 1
        assert acc.fallback_names == ["gated.weight", "gated.bias", "shared.weight", "shared.bias"]
        assert acc.model_fallback_names == ["shared.weight", "shared.bias"]
    for n in names:
        torch.testing.assert_close(acc.sums[n], truth[n], **TOL, msg=lambda m: f"{n}: {m}")
    with PerSampleGradNorms(model, names, quantity=GradientSum(), max_bytes=1) as acc:
        for x, cot in zip(xs, cots):
            acc.backward_batched(model(x), cot, fallback=lambda p, x=x: functional_call(model, p, (x,)))
    for n in names:
        torch.testing.assert_close(acc.sums[n], truth_k[n], **TOL, msg=lambda m: f"{n}: {m}")
