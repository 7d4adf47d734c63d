"""The rules' float32 products on the CPU (``rules._gemm.mm``): oneDNN's matmul where it applies,
``torch.mm`` otherwise, both against float64 products; and the conv paths that use it (the
one-sample matmul path, the Gram form's final product) against float64 loops."""

import pytest
import torch
from torch import nn

from avalanche_pcreg.importance.rules import _gemm
from test_persample import _conv_brute

ONEDNN = _gemm._self_check()
needs_onednn = pytest.mark.skipif(not ONEDNN, reason="this torch build has no usable oneDNN matmul operator")


@pytest.fixture
def calls(monkeypatch):
    """Counts the calls that reach oneDNN's operator."""
    n = {"onednn": 0}
    op = _gemm._linear()
    monkeypatch.setitem(_gemm._checked, "ok", ONEDNN)  # the one-time check, not counted

    def counted():
        if op is None:
            return None

        def f(*args):
            n["onednn"] += 1
            return op(*args)

        return f

    monkeypatch.setattr(_gemm, "_linear", counted)
    return n


def _rel(got, want):
    return float((got.double() - want).norm() / want.norm())


@needs_onednn
def test_mm_on_onednn_equals_the_float64_product(calls):
    """Products above MIN_MACS go to oneDNN and equal the float64 product to float32 rounding, for
    contiguous operands, a transposed ``b`` (the layout of the conv rules' patches) and a strided ``a``."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(256, 96, generator=g)
    b = torch.randn(96, 300, generator=g)
    cases = [(a, b), (a, torch.randn(300, 96, generator=g).t()), (torch.randn(256, 192, generator=g)[:, ::2], b)]
    for x, y in cases:
        assert x.shape[0] * x.shape[1] * y.shape[1] >= _gemm.MIN_MACS and _gemm.onednn_applies(x, y)
        got = _gemm.mm(x, y)
        assert got.dtype == torch.float32 and got.shape == (256, 300)
        assert _rel(got, x.double() @ y.double()) < 2e-6
    assert calls["onednn"] == len(cases)


def test_mm_falls_back_to_torch_mm(calls, monkeypatch):
    """float64, operands that require grad (the result stays differentiable), small products,
    oneDNN disabled and a lowered float32 matmul precision all take ``torch.mm``, with ``out``."""
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(256, 96, generator=g), torch.randn(96, 300, generator=g)
    a64, b64 = a.double(), b.double()
    assert torch.equal(_gemm.mm(a64, b64), a64 @ b64)
    ag = a.clone().requires_grad_()
    r = _gemm.mm(ag, b)
    r.sum().backward()
    torch.testing.assert_close(ag.grad, b.sum(1).expand(256, 96), rtol=1e-5, atol=1e-4)
    small_a, small_b = a[:8, :8], b[:8, :8]
    assert not _gemm.onednn_applies(small_a, small_b)
    with torch.backends.mkldnn.flags(enabled=False):
        assert not _gemm.onednn_applies(a, b)
        out = torch.empty(256, 300)
        assert _gemm.mm(a, b, out=out) is out and torch.equal(out, a @ b)
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert not _gemm.onednn_applies(a, b)
    finally:
        torch.set_float32_matmul_precision(before)
    assert calls["onednn"] == 0


def test_a_wrong_operator_is_refused_by_the_check(monkeypatch):
    """An operator that gives wrong products (or fails) never serves a product: the one-time
    check against float64 turns it off and ``torch.mm`` answers."""
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(256, 96, generator=g), torch.randn(96, 300, generator=g)
    for op in (lambda x, w, *rest: x @ w.t() * 1.001, lambda *args: (_ for _ in ()).throw(RuntimeError("no kernel"))):
        monkeypatch.setattr(_gemm, "_checked", {"op": op})
        assert not _gemm.onednn_applies(a, b) and _gemm._checked["ok"] is False
        assert torch.equal(_gemm.mm(a, b), a @ b)
    monkeypatch.setattr(_gemm, "_checked", {"op": None})
    assert not _gemm.onednn_applies(a, b)


@needs_onednn
@pytest.mark.parametrize("power", [1, 2])
def test_conv_matmul_path_in_float32_through_onednn(power, calls, monkeypatch):
    """The one-sample-at-a-time matmul path of the conv rule in float32 with every product sent to
    oneDNN: power sums and totals against float64 loops (Conv1d and Conv2d, stride, dilation,
    'same' padding, one cotangent or K = 3 per sample)."""
    from avalanche_pcreg.importance.rules import conv as C

    monkeypatch.setattr(C, "PER_SAMPLE_CALL_MIN_MACS", 0)
    monkeypatch.setattr(C, "KERNEL_MIN_INPUT", 10 ** 9)
    monkeypatch.setattr(_gemm, "MIN_MACS", 0)
    torch.manual_seed(5)
    cases = [(nn.Conv2d(3, 5, 3, padding=1), (4, 3, 7, 6)),
             (nn.Conv2d(2, 4, (2, 3), stride=2, padding=1, dilation=(1, 2)), (3, 2, 8, 9)),
             (nn.Conv1d(3, 4, 4, padding=2, dilation=2), (5, 3, 11))]
    for conv, shape in cases:
        rule = C.Conv1dRule() if isinstance(conv, nn.Conv1d) else C.Conv2dRule()
        a = torch.randn(shape)
        out_shape = tuple(conv(a).shape)
        for k in (None, 3):
            d = torch.randn(((k,) if k else ()) + out_shape)
            assert C._per_sample_path(conv, a, d, k) == "matmul"
            before = calls["onednn"]
            pows, tots = rule._sums(conv, a, d, {"weight", "bias"}, power, 2, True, k)
            assert calls["onednn"] - before == shape[0] * (k or 1)  # one product a sample and column
            ref_p, ref_t, _ = _conv_brute(conv, a, d, power)
            for n in ("weight", "bias"):
                assert pows[n].dtype == torch.float32 and ref_p[n].abs().sum() > 0
                torch.testing.assert_close(pows[n].double(), ref_p[n], rtol=2e-5, atol=1e-5)
                torch.testing.assert_close(tots[n].double(), ref_t[n], rtol=2e-5, atol=1e-5)


@needs_onednn
def test_conv_gram_form_in_float32_through_onednn(calls, monkeypatch):
    """The Gram form's final product through oneDNN: Σ over 5 columns and the samples of the
    squared weight gradients of a conv with a 4x4 output map, float32, against float64 loops."""
    from avalanche_pcreg.importance.rules import conv as C

    monkeypatch.setattr(_gemm, "MIN_MACS", 0)
    torch.manual_seed(6)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    a = torch.randn(6, 3, 4, 4)
    d = torch.randn(5, 6, 4, 4, 4)
    assert C._use_gram(16, 5) is False and C._use_gram(16, 8)  # the form is forced below, as for K >= 8
    acc = C._GramSquares(conv, a, tuple(conv(a).shape), 4, 5)
    acc.add(d[:2])
    acc.add(d[2:])
    got = acc.result()["weight"]
    assert calls["onednn"] == 2  # chunks of 4 and 2 samples
    ref_p, _, _ = _conv_brute(conv, a, d, 2)
    torch.testing.assert_close(got.double(), ref_p["weight"], rtol=2e-5, atol=1e-5)
