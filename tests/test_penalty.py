"""Penalty kernels (foreach and for-loop) against float64 brute force: value, gradient, double
backward, large tensors, fresh gradients, and a constant too large for the parameters' dtype."""

import pytest
import torch

from avalanche_pcreg import ConsolidatedState
from avalanche_pcreg.penalty import quadratic_penalty

F64 = torch.float64
TIGHT = dict(rtol=1e-12, atol=1e-12)
IMPLS = ["foreach", "forloop"]


def _kernel_inputs(seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    shapes = [(4, 3), (3,), (2, 3, 2, 2), (1,)]
    params = [torch.randn(s, generator=g, dtype=dtype).requires_grad_(True) for s in shapes]
    weights = [torch.rand(s, generator=g, dtype=dtype) for s in shapes]
    anchors = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]
    return params, weights, anchors


@pytest.mark.parametrize("with_const", [False, True])
def test_foreach_and_forloop_agree_with_brute_force(with_const):
    params, weights, anchors = _kernel_inputs()
    const = torch.tensor(0.8125, dtype=F64) if with_const else None
    factor = 1.3
    ref_val = factor * (sum(float((w * (p.detach() - a) ** 2).sum()) for p, w, a in zip(params, weights, anchors))
                        + (0.8125 if with_const else 0.0))
    ref_grads = [2 * factor * w * (p.detach() - a) for p, w, a in zip(params, weights, anchors)]
    results = {}
    for impl in IMPLS:
        val = quadratic_penalty(params, weights, anchors, factor, const=const, impl=impl)
        grads = torch.autograd.grad(val, params)
        assert val.item() == pytest.approx(ref_val, rel=1e-13)
        for g, rg in zip(grads, ref_grads):
            torch.testing.assert_close(g, rg, **TIGHT)
        results[impl] = (val, grads)
    torch.testing.assert_close(results["foreach"][0], results["forloop"][0], **TIGHT)
    for a, b in zip(results["foreach"][1], results["forloop"][1]):
        torch.testing.assert_close(a, b, **TIGHT)


@pytest.mark.parametrize("impl", IMPLS)
def test_gradcheck_float64(impl):
    params, weights, anchors = _kernel_inputs(seed=5)
    const = torch.tensor(0.25, dtype=F64)

    def fn(*ps):
        return quadratic_penalty(list(ps), weights, anchors, 0.7, const=const, impl=impl)

    assert torch.autograd.gradcheck(fn, tuple(params), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_upstream_gradient_scales_backward(impl):
    params, weights, anchors = _kernel_inputs(seed=2)
    val = quadratic_penalty(params, weights, anchors, 2.0, impl=impl)
    (3.5 * val).backward()
    for p, w, a in zip(params, weights, anchors):
        torch.testing.assert_close(p.grad, 3.5 * 2 * 2.0 * w * (p.detach() - a), **TIGHT)


@pytest.mark.parametrize("impl", IMPLS)
def test_double_backward_is_correct(impl):
    """Both kernels support create_graph=True: the Hessian-vector product is 2 * factor * A * v."""
    params, weights, anchors = _kernel_inputs(seed=4)
    p, w, a = params[0], weights[0], anchors[0]
    other = (p ** 2).sum()  # another differentiable term
    val = quadratic_penalty([p], [w], [a], 1.5, impl=impl)
    (g,) = torch.autograd.grad(val, [p], create_graph=True)
    assert g.requires_grad
    (h,) = torch.autograd.grad((g ** 2).sum() + other, [p])
    g_ref = 2 * 1.5 * w * (p.detach() - a)
    expected = 2 * g_ref * (2 * 1.5 * w) + 2 * p.detach()
    torch.testing.assert_close(h, expected, **TIGHT)
    # and the Hessian of the penalty alone, column by column, is diag(2 * factor * A)
    val = quadratic_penalty([p], [w], [a], 1.5, impl=impl)
    (g,) = torch.autograd.grad(val, [p], create_graph=True)
    v = torch.randn(p.shape, dtype=F64, generator=torch.Generator().manual_seed(1))
    (hv,) = torch.autograd.grad((g * v).sum(), [p])
    torch.testing.assert_close(hv, 2 * 1.5 * w * v, **TIGHT)


def test_quadratic_penalty_bad_impl():
    params, weights, anchors = _kernel_inputs()
    with pytest.raises(ValueError, match="impl"):
        quadratic_penalty(params, weights, anchors, 1.0, impl="cuda")


def test_quadratic_penalty_empty_is_zero():
    assert quadratic_penalty([], [], [], 3.0).item() == 0.0
    assert quadratic_penalty([], [], [], 3.0, const=torch.tensor(2.0, dtype=F64)).item() == 6.0


@pytest.mark.parametrize("impl", IMPLS)
def test_value_and_gradient_on_millions_of_entries(impl):
    """The value stays right for logging (float32 accumulation drift)."""
    g = torch.Generator().manual_seed(0)
    shapes = [(256, 256, 3, 3), (512, 256, 3, 3), (10,)]
    p = [torch.randn(s, generator=g).requires_grad_() for s in shapes]
    a = [x.detach() + 0.01 * torch.randn(x.shape, generator=g) for x in p]
    w = [torch.rand(x.shape, generator=g) + 0.01 for x in p]
    ref = sum((wi.double() * (pi.detach().double() - ai.double()) ** 2).sum() for pi, ai, wi in zip(p, a, w))
    value = quadratic_penalty(p, w, a, 0.5, impl=impl)
    assert value.dtype == torch.float32
    assert abs(value.item() - 0.5 * ref.item()) / (0.5 * ref.item()) < 2e-5
    grads = torch.autograd.grad(value, p)
    for gi, pi, ai, wi in zip(grads, p, a, w):
        torch.testing.assert_close(gi.double(), wi.double() * (pi.detach().double() - ai.double()),
                                   rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("impl", IMPLS)
def test_gradients_kept_across_steps_are_not_overwritten(impl):
    """A gradient handed out by torch.autograd.grad belongs to the caller: the next step must not
    write into it (it did when the CPU kernel returned its scratch buffers)."""
    params, weights, anchors = _kernel_inputs(seed=7, dtype=torch.float32)
    kept, expected = [], []
    for step in range(3):
        grads = torch.autograd.grad(quadratic_penalty(params, weights, anchors, 2.0, impl=impl), params)
        kept.append(grads)
        expected.append([g.clone() for g in grads])
        with torch.no_grad():
            for p in params:
                p.sub_(0.3 * (step + 1))  # the next step sees other parameters, other gradients
    for step in range(3):
        for g, e in zip(kept[step], expected[step]):
            assert torch.equal(g, e), step
    assert not torch.equal(expected[0][0], expected[1][0])
    ptrs = [g.data_ptr() for gs in kept for g in gs]
    assert len(set(ptrs)) == len(ptrs)


@pytest.mark.parametrize("impl", IMPLS)
def test_constant_too_large_for_float32_is_added_in_float64(impl):
    """Separate mode: c = A F / (A + F) (mu - theta*)**2 summed can exceed float32's range while
    every A, mu is a float32 number. The value is then float64 and finite; the gradient is the
    float32 gradient of the quadratic part."""
    big, gap = 2.0 ** 100, 2.0 ** 17  # exact in float32
    th1 = torch.zeros(3)
    th2 = torch.full((3,), gap)
    state = ConsolidatedState().consolidated({"w": torch.full((3,), big)}, {"w": th1})
    state = state.consolidated({"w": torch.full((3,), big)}, {"w": th2})
    c_ref = 3 * (big * big / (2 * big)) * gap * gap  # 3.3e40 > float32 max 3.4e38
    assert state.const.item() == pytest.approx(c_ref, rel=1e-12)
    theta = (state.anchors["w"].clone() + torch.tensor([0.0, 1.0, -2.0])).requires_grad_(True)
    val = state.penalty({"w": theta}, 0.5, impl=impl)
    assert val.dtype == F64 and torch.isfinite(val)
    A = state.importances["w"].double()
    quad = (A * (theta.detach().double() - state.anchors["w"].double()) ** 2).sum().item()
    assert val.item() == pytest.approx(0.5 * (c_ref + quad), rel=1e-7)
    (g,) = torch.autograd.grad(val, [theta])
    assert g.dtype == torch.float32
    torch.testing.assert_close(g, (2 * 0.5 * A * (theta.detach().double() - state.anchors["w"].double())).float(),
                               rtol=1e-6, atol=0)
    # a constant that fits keeps the parameters' dtype (the loss dtype does not change)
    small = ConsolidatedState().consolidated({"w": torch.ones(3)}, {"w": th1}).consolidated(
        {"w": torch.ones(3)}, {"w": torch.ones(3)})
    assert small.penalty({"w": theta}, 0.5, impl=impl).dtype == torch.float32
