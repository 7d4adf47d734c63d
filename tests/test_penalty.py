"""Penalty kernels (compiled, for-loop, foreach) against float64 brute force: value, gradient,
double backward, large tensors, fresh gradients, a constant too large for the parameters' dtype;
the compiled kernel's fallback where no compiler works; the state's penalty bound to a model once
and rebuilt when the model's parameters change."""

import copy
import gc
import pickle
import warnings

import pytest
import torch
from torch import nn

from avalanche_pcreg import ConsolidatedState, ParameterChangePlugin
from avalanche_pcreg import penalty as penalty_mod
from avalanche_pcreg.penalty import IMPLS, compile_error, default_impl, quadratic_penalty

F64 = torch.float64
TIGHT = dict(rtol=1e-12, atol=1e-12)


def _compiler_works() -> bool:
    return compile_error() is None


def _kernel_inputs(seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    shapes = [(4, 3), (3,), (2, 3, 2, 2), (1,)]
    params = [torch.randn(s, generator=g, dtype=dtype).requires_grad_(True) for s in shapes]
    weights = [torch.rand(s, generator=g, dtype=dtype) for s in shapes]
    anchors = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]
    return params, weights, anchors


@pytest.mark.parametrize("with_const", [False, True])
def test_all_kernels_agree_with_brute_force(with_const):
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
    for impl in IMPLS[1:]:
        torch.testing.assert_close(results[IMPLS[0]][0], results[impl][0], **TIGHT)
        for a, b in zip(results[IMPLS[0]][1], results[impl][1]):
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


# ----------------------------------------------------------------------------- the fused kernels
def _brute(params, weights, anchors, factor, const=0.0):
    """float64 loop straight from the definition: value and gradients."""
    value = const
    grads = []
    for p, w, a in zip(params, weights, anchors):
        p64, w64, a64 = p.detach().double(), w.double(), a.double()
        value += float((w64 * (p64 - a64) ** 2).sum())
        grads.append(2 * factor * w64 * (p64 - a64))
    return factor * value, grads


@pytest.mark.parametrize("impl", IMPLS)
def test_float32_value_and_gradient_against_a_float64_loop(impl):
    """The fused kernels compute the gradient 2 f A (theta - mu) in the forward and the value as
    half of sum g (theta - mu): both equal the float64 loop to float32 rounding."""
    g = torch.Generator().manual_seed(11)
    shapes = [(33, 17), (17,), (4, 3, 5, 5), (1,), (300, 70)]
    params = [torch.randn(s, generator=g).requires_grad_() for s in shapes]
    weights = [torch.rand(s, generator=g) * 3 for s in shapes]
    anchors = [p.detach() + 0.1 * torch.randn(s, generator=g) for p, s in zip(params, shapes)]
    const = torch.tensor(7.25, dtype=F64)
    ref_val, ref_grads = _brute(params, weights, anchors, 0.8, const=7.25)
    val = quadratic_penalty(params, weights, anchors, 0.8, const=const, impl=impl)
    grads = torch.autograd.grad(val, params)
    assert val.item() == pytest.approx(ref_val, rel=1e-6)
    for gi, ri in zip(grads, ref_grads):
        assert gi.dtype == torch.float32
        torch.testing.assert_close(gi.double(), ri, rtol=1e-6, atol=1e-7)


def test_compiled_is_the_fused_kernel_when_a_compiler_works():
    """impl='compiled' runs an Inductor kernel (not the eager fallback) wherever compiling works:
    the kernel is cached per signature and reused."""
    if not _compiler_works():
        pytest.skip(f"no working compiler here: {compile_error()}")
    params, weights, anchors = _kernel_inputs(seed=3, dtype=torch.float32)
    kernel = penalty_mod.compiled_kernel(params, weights, anchors)
    assert isinstance(kernel, penalty_mod.CompiledKernel) and not kernel.broken
    assert penalty_mod.compiled_kernel(params, weights, anchors) is kernel
    v, grads = kernel.run(params, weights, anchors, 1.5, torch.tensor(0.0))
    ref_val, ref_grads = _brute(params, weights, anchors, 1.5)
    assert v.item() == pytest.approx(ref_val, rel=1e-6)
    for gi, ri in zip(grads, ref_grads):
        torch.testing.assert_close(gi.double(), ri, rtol=1e-6, atol=1e-7)


def test_compiled_kernel_is_not_reused_for_other_strides():
    """A compiled kernel belongs to its inputs' strides: a transposed parameter gets another one,
    and a kernel called with inputs that no longer match gives way to the eager kernel (same result)."""
    if not _compiler_works():
        pytest.skip(f"no working compiler here: {compile_error()}")
    g = torch.Generator().manual_seed(5)
    p = torch.randn(6, 9, generator=g).requires_grad_()
    w, a = torch.rand(6, 9, generator=g), torch.randn(6, 9, generator=g)
    k1 = penalty_mod.compiled_kernel([p], [w], [a])
    pt = torch.randn(9, 6, generator=g).t().requires_grad_()  # same shape, other strides
    k2 = penalty_mod.compiled_kernel([pt], [w], [a])
    assert k2 is not k1
    out = penalty_mod._compiled([pt], [w], [a], 0.5, kernel=k1)  # the wrong kernel handed in
    ref_val, ref_grads = _brute([pt], [w], [a], 0.5)
    assert out[0].item() == pytest.approx(ref_val, rel=1e-6)
    torch.testing.assert_close(out[1][0].double(), ref_grads[0], rtol=1e-6, atol=1e-7)


def test_compiled_falls_back_to_the_eager_kernel_where_compiling_fails(monkeypatch):
    """No C compiler: the first call warns once, computes with the eager kernel, and from then on
    'compiled' is never tried again in the process (default_impl picks 'forloop')."""
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(penalty_mod, "_COMPILE_ERROR", None)
    monkeypatch.setattr(penalty_mod, "_KERNEL_CACHE", {})
    g = torch.Generator().manual_seed(8)
    shapes = [(13, 7), (7,)]  # a signature no other test compiles
    params = [torch.randn(s, generator=g).requires_grad_() for s in shapes]
    weights = [torch.rand(s, generator=g) for s in shapes]
    anchors = [torch.randn(s, generator=g) for s in shapes]
    ref_val, ref_grads = _brute(params, weights, anchors, 2.0)
    with inductor_config.patch({"cpp.cxx": ("/nonexistent/c++",)}):
        with pytest.warns(RuntimeWarning, match="compiled penalty kernel is not available"):
            val = quadratic_penalty(params, weights, anchors, 2.0, impl="compiled")
    assert compile_error() is not None
    assert val.item() == pytest.approx(ref_val, rel=1e-6)
    for gi, ri in zip(torch.autograd.grad(val, params), ref_grads):
        torch.testing.assert_close(gi.double(), ri, rtol=1e-6, atol=1e-7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: the next call is quiet
        val2 = quadratic_penalty(params, weights, anchors, 2.0, impl="compiled")
    assert val2.item() == val.item()
    assert penalty_mod.compiled_kernel(params, weights, anchors) is None
    big = [torch.zeros(penalty_mod.COMPILE_MIN_NUMEL)]
    assert default_impl(big) == "forloop"


def test_compiled_fallback_keeps_the_callers_errors(monkeypatch):
    """An error of the caller (mismatched shapes) is raised as such, and does not disable the
    compiled kernel."""
    monkeypatch.setattr(penalty_mod, "_COMPILE_ERROR", None)
    monkeypatch.setattr(penalty_mod, "_build", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    p = torch.randn(4, 3, requires_grad=True)
    with pytest.raises(RuntimeError, match="size"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            quadratic_penalty([p], [torch.rand(5, 3)], [torch.randn(5, 3)], 1.0, impl="compiled")


def test_default_impl_by_size():
    small = [torch.zeros(10)]
    assert default_impl(small) == "forloop"
    big = [torch.zeros(penalty_mod.COMPILE_MIN_NUMEL // 2), torch.zeros(penalty_mod.COMPILE_MIN_NUMEL // 2)]
    assert default_impl(big) == ("compiled" if _compiler_works() else "forloop")
    assert default_impl([]) == "forloop"


@pytest.mark.parametrize("impl", IMPLS)
def test_second_backward_through_a_retained_graph_recomputes(impl):
    """The gradient made in the forward is handed out once; a second backward through the same
    graph (retain_graph=True) recomputes it, and the first one is left alone."""
    params, weights, anchors = _kernel_inputs(seed=9, dtype=torch.float32)
    val = quadratic_penalty(params, weights, anchors, 1.25, impl=impl)
    first = torch.autograd.grad(val, params, retain_graph=True)
    kept = [g.clone() for g in first]
    second = torch.autograd.grad(2.0 * val, params)
    for g1, k, g2 in zip(first, kept, second):
        assert torch.equal(g1, k)
        torch.testing.assert_close(g2, 2.0 * k, rtol=1e-6, atol=0)
        assert g1.data_ptr() != g2.data_ptr()


@pytest.mark.parametrize("impl", IMPLS)
def test_penalty_accumulates_into_existing_gradients_with_other_terms(impl):
    """loss = task + penalty, backward with existing .grad (set_to_none=False): every parameter's
    gradient is old + task + penalty; a loss scaled as by a GradScaler scales the penalty's part."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    params = list(model.parameters())
    weights = [torch.rand_like(p) for p in params]
    anchors = [p.detach() + 0.1 * torch.randn_like(p) for p in params]
    x = torch.randn(8, 5)
    for p in params:
        p.grad = torch.full_like(p, 0.5)
    task = model(x).pow(2).mean()
    task_grads = torch.autograd.grad(task, params, retain_graph=True)
    (64.0 * (task + quadratic_penalty(params, weights, anchors, 3.0, impl=impl))).backward()
    for p, tg, w, a in zip(params, task_grads, weights, anchors):
        expected = 0.5 + 64.0 * (tg + 2 * 3.0 * w * (p.detach() - a))
        torch.testing.assert_close(p.grad, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_parameters_with_a_float32_state(impl):
    """bf16 parameters, float32 A and mu: the value is float32, the gradient bf16, both the float64
    loop's up to bf16's rounding of the gradient."""
    g = torch.Generator().manual_seed(4)
    shapes = [(40, 24), (24,)]
    anchors = [torch.randn(s, generator=g) for s in shapes]
    weights = [torch.rand(s, generator=g) + 0.1 for s in shapes]
    params = [(a + 0.1 * torch.randn(a.shape, generator=g)).to(torch.bfloat16).requires_grad_() for a in anchors]
    val = quadratic_penalty(params, weights, anchors, 2.0, impl=impl)
    assert val.dtype == torch.float32
    ref_val, ref_grads = _brute(params, weights, anchors, 2.0)
    assert val.item() == pytest.approx(ref_val, rel=1e-5)
    for gi, ri in zip(torch.autograd.grad(val, params), ref_grads):
        assert gi.dtype == torch.bfloat16
        assert float(((gi.double() - ri).abs() / ri.abs().clamp_min(1e-2)).max()) <= 2.0 ** -8


# ----------------------------------------------------------------------------- bound to a model
def _state_for(model, seed=0, T=2):
    g = torch.Generator().manual_seed(seed)
    state = ConsolidatedState()
    for _ in range(T):
        named = {n: p.detach() + 0.1 * torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}
        imps = {n: torch.rand(p.shape, generator=g) + 0.01 for n, p in model.named_parameters()}
        state = state.consolidated(imps, named)
    return state


def _state_brute(state, model, factor):
    """float64 value and gradients of the state's penalty for ``model``, by name (leading blocks)."""
    value, grads = float(state.const), {}
    for name, p in model.named_parameters():
        if name not in state.importances:
            continue
        A, mu = state.importances[name].double(), state.anchors[name].double()
        block = tuple(slice(0, s) for s in A.shape)
        d = p.detach().double()[block] - mu
        value += float((A * d * d).sum())
        g = torch.zeros(p.shape, dtype=F64)
        g[block] = 2 * factor * A * d
        grads[name] = g
    return factor * value, grads


@pytest.mark.parametrize("impl", IMPLS)
def test_bound_penalty_equals_the_mapping_path_and_a_float64_loop(impl):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    state = _state_for(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    by_model = state.penalty(model, 1.5, impl=impl)
    by_names = state.penalty(dict(model.named_parameters()), 1.5, impl=impl)
    ref, ref_grads = _state_brute(state, model, 1.5)
    assert by_model.item() == pytest.approx(ref, rel=1e-6)
    assert by_names.item() == pytest.approx(ref, rel=1e-6)
    by_model.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad.double(), ref_grads[name], rtol=1e-6, atol=1e-7)


def test_bound_penalty_is_resolved_once():
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    state = _state_for(model)
    bound = state.bind(model)
    for _ in range(3):
        state.penalty(model, 1.0)
    assert state.bind(model) is bound
    other = copy.deepcopy(model)
    assert state.bind(other) is not bound  # another model: matched again


def _grow_head(model, rows):
    """What model adaptation does to a growing head: a new, larger Linear holding the old rows."""
    old = model[2]
    new = nn.Linear(old.in_features, rows)
    with torch.no_grad():
        new.weight[: old.out_features] = old.weight
        new.bias[: old.out_features] = old.bias
    model[2] = new
    return new


@pytest.mark.parametrize("impl", IMPLS)
def test_bound_penalty_follows_a_grown_head(impl):
    """The head is replaced by a larger one (new parameter objects): the next penalty reads the new
    parameters (leading block against the stored state, new rows free). A stale binding would
    compute the old head's penalty and send the gradient to parameters no longer in the model."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    state = _state_for(model)
    before = state.penalty(model, 1.0, impl=impl)  # binds to the old head
    old_head = model[2]
    new_head = _grow_head(model, 5)
    with torch.no_grad():
        new_head.weight[:3].add_(0.5)  # the stored rows moved: the penalty must see it
    value = state.penalty(model, 1.0, impl=impl)
    ref, ref_grads = _state_brute(state, model, 1.0)
    assert value.item() == pytest.approx(ref, rel=1e-6)
    assert value.item() > before.item()
    value.backward()
    assert old_head.weight.grad is None
    torch.testing.assert_close(new_head.weight.grad.double(), ref_grads["2.weight"], rtol=1e-6, atol=1e-7)
    assert torch.all(new_head.weight.grad[3:] == 0) and torch.all(new_head.bias.grad[3:] == 0)


def test_bound_penalty_follows_a_replaced_parameter_of_the_same_shape():
    """A parameter replaced by another object of the same shape (a re-initialized layer, a loaded
    checkpoint assigned with assign=True) is picked up at once."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    state = _state_for(model)
    state.penalty(model, 1.0)
    replacement = nn.Parameter(model[0].weight.detach() + 1.0)
    model[0].weight = replacement
    value = state.penalty(model, 1.0)
    assert value.item() == pytest.approx(_state_brute(state, model, 1.0)[0], rel=1e-6)
    value.backward()
    assert replacement.grad is not None


def test_bound_penalty_follows_parameter_data_of_another_shape_or_dtype():
    """``p.data = ...`` registers nothing: the shape and dtype checks of every call catch it."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    state = _state_for(model)
    state.penalty(model, 1.0)
    head = model[2]
    grown = torch.zeros(4, 5)
    grown[:3] = head.weight.detach() + 0.25
    head.weight.data = grown  # same object, another shape
    assert state.penalty(model, 1.0).item() == pytest.approx(_state_brute(state, model, 1.0)[0], rel=1e-6)
    model.double()  # same objects, another dtype
    value = state.penalty(model, 1.0)
    assert value.dtype == F64
    assert value.item() == pytest.approx(_state_brute(state, model, 1.0)[0], rel=1e-6)


def test_plugin_penalty_follows_model_adaptation_between_experiences():
    """Through the plugin: a head replaced between two steps is regularized from the next step."""
    from types import SimpleNamespace

    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    plugin = ParameterChangePlugin(2.0, importance="uniform")
    plugin._state = _state_for(model)
    strategy = SimpleNamespace(model=model, loss=torch.zeros(()), device="cpu",
                               clock=SimpleNamespace(train_exp_counter=1))
    plugin.before_backward(strategy)
    new_head = _grow_head(model, 4)
    with torch.no_grad():
        new_head.weight[:3].add_(0.3)
    strategy.loss = torch.zeros(())
    plugin.before_backward(strategy)
    ref, ref_grads = _state_brute(plugin._state, model, 2.0)
    assert strategy.loss.item() == pytest.approx(ref, rel=1e-6)
    strategy.loss.backward()
    torch.testing.assert_close(new_head.weight.grad.double(), ref_grads["2.weight"], rtol=1e-6, atol=1e-7)


def test_bound_penalty_keeps_no_model_alive_and_states_still_copy():
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    state = _state_for(model)
    state.penalty(model, 1.0)
    clone = copy.deepcopy(state)
    loaded = pickle.loads(pickle.dumps(state))
    assert clone._bound is None and loaded._bound is None
    assert loaded.penalty(model, 1.0).item() == pytest.approx(state.penalty(model, 1.0).item(), rel=1e-12)
    import weakref

    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


@pytest.mark.parametrize("impl", IMPLS)
def test_float64_parameters_with_a_float32_state_compute_in_float64(impl):
    """A model made float64 after its state was stored in float32: the kernel computes in float64
    (the factor too, 0.7 being no float32 number), so the result is the float64 loop's."""
    g = torch.Generator().manual_seed(12)
    shapes = [(9, 4), (4,)]
    params = [torch.randn(s, generator=g, dtype=F64).requires_grad_() for s in shapes]
    weights = [torch.rand(s, generator=g) for s in shapes]
    anchors = [torch.randn(s, generator=g) for s in shapes]
    val = quadratic_penalty(params, weights, anchors, 0.7, impl=impl)
    ref_val, ref_grads = _brute(params, weights, anchors, 0.7)
    assert val.dtype == F64 and val.item() == pytest.approx(ref_val, rel=1e-13)
    for gi, ri in zip(torch.autograd.grad(val, params), ref_grads):
        torch.testing.assert_close(gi, ri, **TIGHT)
