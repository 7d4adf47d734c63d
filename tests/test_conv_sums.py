"""The convolutions' Σ_n g_n² in its two forms -- from per-sample gradients, and the position-Gram
form (one matrix product over pairs of output positions; with one position, (δ²)ᵀ(u²)) -- each
forced through the policy, against float64 loops over samples; and the policy's choice between them
(``Policy.conv_sums_for``) on the layers of torchvision's ResNet-18 at 32×32."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from avalanche_pcreg.importance.persample import GradientSum, PerSampleGradNorms, Policy, PowerSum, Request
from avalanche_pcreg.importance.persample.policy import conv_sums_costs
from avalanche_pcreg.importance.rules import rule_for
from test_persample import TOL, brute, loss_fn_for

FORMS = ("per_sample", "gram", "auto")


def _cases():
    """``{id: (layer, input shape)}``: kernels 1 and 3, stride, padding ('same' too), dilation,
    groups, maps of one output position (with kernel offsets that see only padding), Conv1d."""
    return {
        "k3-pad": (nn.Conv2d(3, 5, 3, padding=1), (5, 3, 3, 3)),
        "k1-stride2": (nn.Conv2d(4, 6, 1, stride=2), (4, 4, 4, 5)),
        "k3-stride2-dilated": (nn.Conv2d(3, 4, 3, stride=2, padding=2, dilation=2), (4, 3, 6, 5)),
        "grouped": (nn.Conv2d(4, 6, (3, 2), stride=2, padding=1, dilation=2, groups=2), (6, 4, 9, 8)),
        "same": (nn.Conv2d(2, 3, (2, 3), padding="same", dilation=(1, 2)), (4, 2, 3, 4)),
        "one-position-k1": (nn.Conv2d(5, 4, 1), (5, 5, 1, 1)),
        "one-position-k3-pad": (nn.Conv2d(3, 4, 3, padding=1), (5, 3, 1, 1)),  # only the centre sees input
        "one-position-stride2": (nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), (5, 4, 2, 2)),
        "two-by-two-wide-pad": (nn.Conv2d(2, 3, (3, 5), padding=(1, 4), dilation=(1, 2)), (4, 2, 1, 2)),
        "conv1d-grouped": (nn.Conv1d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2), (7, 4, 11)),
        "conv1d-one-position": (nn.Conv1d(2, 3, 5, padding=2), (4, 2, 1)),
        "conv1d-same": (nn.Conv1d(2, 3, 4, padding="same"), (3, 2, 5)),
    }


CASES = _cases()


def _loops(conv, a, d, power):
    """``({attr: Σ |g|^p}, {attr: Σ g})`` over every (column, sample): g by autograd of the sample's
    own loss ⟨conv(a_i), d_i⟩, the layer called on that sample alone; float64."""
    ds = d if d.dim() == a.dim() + 1 else d.unsqueeze(0)
    params = dict(conv.named_parameters())
    pows = {n: torch.zeros_like(p) for n, p in params.items()}
    tots = {n: torch.zeros_like(p) for n, p in params.items()}
    for j in range(ds.shape[0]):
        for i in range(a.shape[0]):
            loss = (conv(a[i:i + 1]) * ds[j, i:i + 1]).sum()
            for n, g in zip(params, torch.autograd.grad(loss, list(params.values()))):
                pows[n] += g.abs() if power == 1 else g * g
                tots[n] += g
    return pows, tots


def _setup(case, columns, seed=0):
    conv, shape = CASES[case]
    g = torch.Generator().manual_seed(seed)
    conv = conv.double()
    with torch.no_grad():
        for p in conv.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    a = torch.randn(shape, generator=g, dtype=torch.float64)
    out_shape = tuple(conv(a).shape)
    d = torch.randn(((columns,) if columns else ()) + out_shape, generator=g, dtype=torch.float64)
    return conv, a, d


def _rule_sums(conv, a, d, columns, policy, quantity=PowerSum(2)):
    req = Request(quantity, frozenset({"weight", "bias"}), totals=True, policy=policy)
    rule = rule_for(conv)
    return rule.sums(conv, a, d, req) if columns is None else rule.column_sums(conv, a, d, req)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("columns", [None, 3])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_each_form_against_float64_loops(case, form, columns):
    """Σ g² and Σ g of weight and bias, each form forced by the policy, one or K = 3 cotangents a
    sample, with the default budget and with one so small that a chunk holds one sample and a
    sample's pairs of positions go in several blocks."""
    conv, a, d = _setup(case, columns)
    ref_p, ref_t = _loops(conv, a, d, 2)
    for n in ref_p:
        assert ref_p[n].abs().sum() > 0 and ref_t[n].abs().sum() > 0, n
    rule = rule_for(conv)
    for budget in (Policy.cpu().chunk_bytes, 256):
        policy = Policy.cpu().replace(conv_sums=form, chunk_size=2, chunk_bytes=budget)
        req = Request(PowerSum(2), frozenset({"weight"}), policy=policy)
        if form != "auto":
            assert rule.sums_form(conv, a, d, req, columns) == form
        res = _rule_sums(conv, a, d, columns, policy)
        for n in ("weight", "bias"):
            torch.testing.assert_close(res.values[n], ref_p[n], **TOL, msg=lambda m: f"{form} {budget} {n}: {m}")
            torch.testing.assert_close(res.totals[n], ref_t[n], **TOL, msg=lambda m: f"{form} {budget} {n}: {m}")


def _products(fn):
    """Run ``fn`` under the profiler: ``(rows, [(mat1 shape, mat2 shape)])`` of the matrix products
    the Gram form accumulates (``addmm_``: one group; ``baddbmm_``: per group)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        out = fn()
    shapes = [tuple(tuple(s) for s in e.input_shapes[1:3]) for e in prof.events()
              if e.name in ("aten::addmm_", "aten::baddbmm_")]
    return out, shapes


@pytest.mark.parametrize("case", ["one-position-k3-pad", "grouped", "conv1d-grouped"])
def test_other_quantities_take_the_per_sample_form(case):
    """Power 1 (MAS) and Σ g have no Gram form: forcing it leaves them on per-sample gradients,
    exact, and no Gram product is formed; power 2 takes it."""
    conv, a, d = _setup(case, None, seed=1)
    policy = Policy.cpu().replace(conv_sums="gram")
    rule = rule_for(conv)
    ref_p, ref_t = _loops(conv, a, d, 1)
    for quantity, ref in ((PowerSum(1), ref_p), (GradientSum(), ref_t)):
        assert rule.sums_form(conv, a, d, Request(quantity, frozenset({"weight"}), policy=policy)) == "per_sample"
        got, products = _products(lambda: _rule_sums(conv, a, d, None, policy, quantity))
        for n in ("weight", "bias"):
            torch.testing.assert_close(got.values[n], ref[n], **TOL)
        assert products == []
    assert rule.sums_form(conv, a, d, Request(PowerSum(2), frozenset({"weight"}), policy=policy)) == "gram"
    _, products = _products(lambda: _rule_sums(conv, a, d, None, policy))  # power 2: the Gram form
    assert products


def test_gram_form_stays_within_the_chunk_budget():
    """The products of one call of the Gram form's matrix product stay within ``chunk_bytes``:
    all 5 samples in one product when they fit, blocks of a sample's 45 pairs when one does not
    (14 pairs a block in 16 KiB; one at a time in less than a sample's patches)."""
    conv, a, d = _setup("k3-pad", None)  # 9 positions, 45 pairs a sample
    ref, _ = _loops(conv, a, d, 2)
    for budget, most_rows in ((10 ** 6, 5 * 45), (2 ** 14, 14), (2000, 1)):
        policy = Policy.cpu().replace(conv_sums="gram", chunk_bytes=budget)
        got, products = _products(lambda: _rule_sums(conv, a, d, None, policy))
        torch.testing.assert_close(got.values["weight"], ref["weight"], **TOL)
        rows = [m2[0] for _, m2 in products]  # mat1 [O, rows] (δ products), mat2 [rows, W] (patch products)
        assert sum(rows) == 5 * 45 and max(rows) == most_rows
        for m1, m2 in products:
            assert 8 * (m1[0] * m1[1] + m2[0] * m2[1]) <= budget


class _SmallMaps(nn.Module):
    """Convolutions on 4×4, 2×2 and 1×1 maps (a 3×3 kernel on 1×1: only its centre sees input),
    enough channels for the policy to take the Gram form on the small ones."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)  # 8x8 -> 4x4
        self.c2 = nn.Conv2d(8, 32, 3, stride=2, padding=1)  # -> 2x2
        self.c3 = nn.Conv2d(32, 32, 3, stride=2, padding=1)  # -> 1x1
        self.c4 = nn.Conv2d(32, 24, 3, padding=1)  # 1x1
        self.c5 = nn.Conv1d(24, 16, 1)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        h = torch.tanh(self.c3(torch.tanh(self.c2(torch.tanh(self.c1(x))))))
        h = torch.tanh(self.c4(h)).flatten(2)  # [N, 24, 1]
        return self.head(torch.tanh(self.c5(h)).flatten(1))


@pytest.mark.parametrize("power", [1, 2])
@pytest.mark.parametrize("form", FORMS)
def test_engine_with_each_form_equals_per_sample_loop(form, power):
    """Through the engine (one backward of the summed losses, a checked and an unchecked batch):
    every form forced, and the CPU's choice, which takes the Gram form on the 2×2 and 1×1 layers
    and per-sample gradients on the 4×4 one, against a float64 loop over samples."""
    torch.manual_seed(11)
    model = _SmallMaps().double().eval()
    names = [n for n, _ in model.named_parameters()]
    xs = [torch.randn(6, 3, 8, 8, dtype=torch.float64) for _ in range(2)]
    ys = [F.one_hot(torch.randint(0, 5, (6,)), 5).double() for _ in range(2)]
    ref = {n: 0 for n in names}
    for x, y in zip(xs, ys):
        r = brute(model, names, loss_fn_for(model, x, y), power)
        ref = {n: ref[n] + r[n] for n in names}
    policy = Policy.cpu().replace(conv_sums=form)
    with PerSampleGradNorms(model, names, power=power, policy=policy) as acc:
        for x, y in zip(xs, ys):
            acc.backward(loss_fn_for(model, x, y)())
        assert acc.checked_batches == 1 and acc.fallback_names == [] and acc.model_fallback_names == []
    for n in names:
        assert ref[n].abs().sum() > 0, n
        torch.testing.assert_close(acc.sums[n], ref[n], **TOL, msg=lambda m: f"{n}: {m}")
    # the form each layer's call takes, from the shapes the engine sees
    convs = [model.c1, model.c2, model.c3, model.c4, model.c5]
    calls = {}
    handles = [m.register_forward_hook(lambda m, i, o: calls.__setitem__(m, (i[0], o))) for m in convs]
    model(xs[0])
    for h in handles:
        h.remove()
    req = Request(PowerSum(power), frozenset({"weight"}), policy=policy)
    gram = [m for m in convs if rule_for(m).sums_form(m, calls[m][0], torch.zeros_like(calls[m][1]), req) == "gram"]
    expected = {"per_sample": [], "gram": convs, "auto": convs[1:]}[form] if power == 2 else []
    assert gram == expected


# ----------------------------------------------------------------------------- the choice
def _conv_shapes(model, x):
    """``[(name, positions, width, out_channels)]`` of every convolution of ``model`` on ``x``."""
    shapes, handles = [], []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(
                lambda mod, inp, out, name=name: shapes.append((name, out[0, 0].numel(), mod.weight[0].numel(),
                                                                mod.out_channels))))
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return shapes


def test_auto_takes_the_gram_form_on_torchvision_resnet18_small_maps():
    """torchvision's ResNet-18 at 32×32 (7×7 stride-2 stem and max-pool: maps of 16×16 for the stem,
    then 8×8, 4×4, 2×2, 1×1): the CPU's policy takes the Gram form on every 2×2 and 1×1 layer (most
    of the weights) and per-sample gradients on the 4×4 and larger ones, for any batch size; the
    CIFAR stem (maps of 32×32 down to 4×4) keeps per-sample gradients everywhere."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    shapes = _conv_shapes(model, torch.randn(1, 3, 32, 32))
    assert len(shapes) == 20 and {s[1] for s in shapes} == {256, 64, 16, 4, 1}
    policy = Policy.cpu()
    for n in (8, 32, 256):
        for name, positions, width, cout in shapes:
            want = "gram" if positions <= 4 else "per_sample"
            assert policy.conv_sums_for(n, positions, width, cout) == want, (name, positions)
    gram_weights = sum(w * c for _, p, w, c in shapes if p <= 4)
    assert gram_weights > 0.9 * sum(w * c for _, _, w, c in shapes)
    model.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
    model.maxpool = nn.Identity()
    cifar = _conv_shapes(model, torch.randn(1, 3, 32, 32))
    assert {s[1] for s in cifar} == {1024, 256, 64, 16}
    assert all(policy.conv_sums_for(32, p, w, c) == "per_sample" for _, p, w, c in cifar)
    # forced forms; a GPU's policy keeps per-sample gradients
    for form in ("per_sample", "gram"):
        assert all(policy.replace(conv_sums=form).conv_sums_for(32, p, w, c) == form for _, p, w, c in shapes)
    assert all(Policy.gpu().conv_sums_for(32, p, w, c) == "per_sample" for _, p, w, c in shapes)


def test_cost_model_figures():
    """The cost model's figures (multiply-adds): the per-sample form K·N·O·I·(L + v), the Gram form
    N·P·O·I + (1 + v)·N·P·(K·O + I) with P = L(L + 1)/2; the choice is the cheaper one, and K
    columns a sample favour the Gram form."""
    v = Policy.cpu().value_macs
    assert conv_sums_costs(32, 1, 4608, 512, 1, v) == (32 * 512 * 4608 * (1 + v),
                                                       32 * 512 * 4608 + (1 + v) * 32 * (512 + 4608))
    assert conv_sums_costs(2, 4, 10, 3, 5, 7) == (5 * 2 * 3 * 10 * (4 + 7), 2 * 10 * 3 * 10 + 8 * 2 * 10 * (5 * 3 + 10))
    assert conv_sums_costs(32, 16, 1152, 128, 1, 0)[1] == 32 * 136 * 128 * 1152 + 32 * 136 * (128 + 1152)
    policy = Policy.cpu()
    assert policy.conv_sums_for(32, 16, 4608, 512) == "per_sample"
    assert policy.conv_sums_for(32, 16, 4608, 512, columns=9) == "gram"
    # tiny layers: the pairs' products outweigh the weight
    assert policy.conv_sums_for(4, 4, 27, 4) == "per_sample"
    # a free value makes the per-sample form the cheaper one whenever L > 1
    assert policy.replace(value_macs=0).conv_sums_for(32, 4, 2304, 256) == "per_sample"
    assert policy.replace(value_macs=0).conv_sums_for(32, 1, 2304, 256) == "per_sample"


def test_policy_fields_are_checked():
    with pytest.raises(ValueError, match="conv_sums"):
        Policy(conv_sums="gemm")
    with pytest.raises(ValueError, match="value_macs"):
        Policy(value_macs=-1)
    with pytest.raises(ValueError, match="value_macs"):
        Policy(value_macs=2.5)
    assert Policy.cpu().conv_sums == "auto" and Policy.gpu().conv_sums == "per_sample"
