"""ConsolidatedState against the loop over stored (F_t, theta*_t) pairs it replaces (float64)."""

import copy
import io
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from avalanche.training.plugins import EWCPlugin
from avalanche.training.utils import ParamData

from avalanche_pcreg import ConsolidatedState
from avalanche_pcreg.state import STATE_VERSION

F64 = torch.float64
HYP = settings(max_examples=12, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------------- a random history
def make_history(T, seed, *, dtype=F64, lo=1e-3, hi=10.0, grow_at=(2,), appear_at=1, zero_frac=0.2):
    """T experiences of {name: (F_t, theta*_t)}.

    ``head.weight`` grows from 2 to 3 to 4 rows at ``grow_at``; ``late.bias`` appears at
    ``appear_at``; ``trunk.weight`` is there throughout. Importances are log-uniform in [lo, hi],
    with a fraction of exact zeros.
    """
    g = torch.Generator().manual_seed(seed)
    rows = 2
    history = []
    for t in range(T):
        if t in grow_at:
            rows += 1
        shapes = {"trunk.weight": (3, 4), "head.weight": (rows, 3)}
        if t >= appear_at:
            shapes["late.bias"] = (5,)
        exp = {}
        for name, shape in shapes.items():
            u = torch.rand(shape, generator=g, dtype=F64)
            F = torch.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))
            F[torch.rand(shape, generator=g) < zero_frac] = 0.0
            theta = torch.randn(shape, generator=g, dtype=F64) * 2.0
            exp[name] = (F.to(dtype), theta.to(dtype))
        history.append(exp)
    return history


def run_state(history, mode="separate", decay=None):
    state = ConsolidatedState(mode, decay)
    for exp in history:
        state = state.consolidated({n: F for n, (F, _) in exp.items()},
                                   {n: th for n, (_, th) in exp.items()}, estimator="test")
    return state


def final_params(history, seed=99, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    last = history[-1]
    return {n: torch.randn(th.shape, generator=g, dtype=F64).to(dtype).requires_grad_(True)
            for n, (_, th) in last.items()}


def brute_separate(history, params, factor):
    """sum_t sum F_t (theta[lead] - theta*_t)**2 in float64, with its gradient and the error scale."""
    value = torch.zeros((), dtype=F64)
    grads = {n: torch.zeros(p.shape, dtype=F64) for n, p in params.items()}
    scale = {n: torch.zeros(p.shape, dtype=F64) for n, p in params.items()}
    for exp in history:
        for name, (F, th) in exp.items():
            idx = tuple(slice(0, s) for s in th.shape)
            d = params[name].detach().to(F64)[idx] - th.to(F64)
            value += factor * (F.to(F64) * d * d).sum()
            grads[name][idx] += 2 * factor * F.to(F64) * d
            scale[name][idx] += 2 * factor * (F.to(F64) * d).abs()
    return value, grads, scale


def brute_online(history, params, factor, decay):
    """Avalanche's online EWC: F <- decay * F (zero-padded) + F_new, theta* <- latest."""
    A = {}
    for exp in history:
        newA = {}
        for name, (F, _) in exp.items():
            old = A.get(name)
            pad = torch.zeros(F.shape, dtype=F64)
            if old is not None:
                pad[tuple(slice(0, s) for s in old.shape)] = old
            newA[name] = decay * pad + F.to(F64)
        for name in A:
            newA.setdefault(name, A[name])
        A = newA
    last = history[-1]
    value = torch.zeros((), dtype=F64)
    grads = {}
    for name, p in params.items():
        d = p.detach().to(F64) - last[name][1].to(F64)
        value += factor * (A[name] * d * d).sum()
        grads[name] = 2 * factor * A[name] * d
    return value, grads, A


def value_and_grads(state, params, factor):
    for p in params.values():
        p.grad = None
    val = state.penalty(params, factor)
    val.backward()
    return val, {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in params.items()}


def assert_grads(got, ref, scale, rtol):
    for n in ref:
        err = (got[n].to(F64) - ref[n]).abs()
        bound = rtol * (scale[n] + ref[n].abs()) + 1e-300
        assert bool((err <= bound).all()), f"{n}: max err {err.max().item():.3e}"


# ----------------------------------------------------------------------------- separate mode
@pytest.mark.parametrize("impl", ["foreach", "forloop"])
def test_separate_equals_loop_over_pairs_with_growth_and_late_params(impl):
    history = make_history(6, seed=0, grow_at=(2, 4), appear_at=3)
    state = run_state(history)
    params = final_params(history)
    factor = 1.7
    for p in params.values():
        p.grad = None
    val = state.penalty(params, factor, impl=impl)
    val.backward()
    got = {n: p.grad for n, p in params.items()}
    ref_val, ref_grads, scale = brute_separate(history, params, factor)
    assert val.item() == pytest.approx(ref_val.item(), rel=1e-12)
    assert_grads(got, ref_grads, scale, 1e-12)
    assert state.num_consolidations == 6
    assert state.const.dtype == F64 and state.const.dim() == 0 and state.const.item() > 0
    assert state.importances["head.weight"].shape == (4, 3)
    assert state.importances["late.bias"].shape == (5,)


def test_new_rows_free_until_they_get_importance():
    """Pad: old entries keep their quadratics, the new rows have A = 0 and mu = their new anchor."""
    F1, th1 = torch.tensor([[2.0, 1.0]], dtype=F64), torch.tensor([[0.5, -1.0]], dtype=F64)
    s1 = ConsolidatedState().consolidated({"w": F1}, {"w": th1})
    # the head grows to 3 rows; the new rows got no importance (F = 0) in experience 2
    F2 = torch.tensor([[1.0, 3.0], [0.0, 0.0], [0.0, 0.0]], dtype=F64)
    th2 = torch.tensor([[1.5, 0.0], [7.0, 8.0], [9.0, 10.0]], dtype=F64)
    s2 = s1.consolidated({"w": F2}, {"w": th2})
    A, mu = s2.importances["w"], s2.anchors["w"]
    torch.testing.assert_close(A, torch.tensor([[3.0, 4.0], [0.0, 0.0], [0.0, 0.0]], dtype=F64))
    torch.testing.assert_close(mu[0], torch.tensor([(2 * 0.5 + 1.5) / 3, (1 * -1.0 + 0.0) / 4], dtype=F64))
    torch.testing.assert_close(mu[1:], th2[1:])
    theta = torch.tensor([[0.0, 2.0], [100.0, -100.0], [5.0, 5.0]], dtype=F64)
    expect = (2 * 0.25 + 1 * 9.0) + (1 * 2.25 + 3 * 4.0)
    assert s2.penalty({"w": theta}, 1.0).item() == pytest.approx(expect, rel=1e-14)
    # a parameter that first appears now starts free too
    s3 = s2.consolidated({"v": torch.zeros(2, dtype=F64)}, {"v": torch.ones(2, dtype=F64)})
    assert s3.penalty({"w": theta, "v": torch.full((2,), 50.0, dtype=F64)}, 1.0).item() == pytest.approx(expect)


def test_aligned_pads_and_keeps_the_value():
    history = make_history(3, seed=1, grow_at=(2,))
    state = run_state(history[:2])  # head.weight has 2 rows in the state
    params = final_params(history)  # 3 rows now
    aligned = state.aligned(params)
    assert aligned is not state
    assert aligned.importances["head.weight"].shape == (3, 3)
    assert torch.count_nonzero(aligned.importances["head.weight"][2:]) == 0
    torch.testing.assert_close(aligned.anchors["head.weight"][2:], params["head.weight"].detach()[2:])
    assert state.importances["head.weight"].shape == (2, 3)  # the old state is untouched
    v1, g1 = value_and_grads(state, params, 2.0)
    v2, g2 = value_and_grads(aligned, params, 2.0)
    assert v1.item() == pytest.approx(v2.item(), rel=1e-14)
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], rtol=1e-14, atol=0)
    assert aligned.aligned(params) is aligned  # nothing to do: the same object


def test_penalty_skips_names_not_given():
    history = make_history(3, seed=2)
    state = run_state(history)
    params = final_params(history)
    sub = {k: v for k, v in params.items() if k != "late.bias"}
    at_anchor = dict(sub, **{"late.bias": state.anchors["late.bias"].clone()})
    # leaving a name out = putting it at its anchor (its quadratic is 0; the constant stays)
    assert state.penalty(sub, 1.0).item() == pytest.approx(state.penalty(at_anchor, 1.0).item(), rel=1e-14)
    _, got = value_and_grads(state, sub, 1.0)
    _, ref_grads, scale = brute_separate(history, params, 1.0)
    assert_grads(got, {k: ref_grads[k] for k in sub}, scale, 1e-12)
    # and the left-out quadratic really is non-zero at the drawn point
    assert state.penalty(params, 1.0).item() > state.penalty(sub, 1.0).item() * (1 + 1e-6)


def test_float32_state_close_to_float64_loop():
    history = make_history(8, seed=3, dtype=torch.float32)
    state = run_state(history)
    params = final_params(history, dtype=torch.float32)
    val, got = value_and_grads(state, params, 0.9)
    assert val.dtype == torch.float32
    assert all(t.dtype == torch.float32 for d in (state.importances, state.anchors) for t in d.values())
    ref_val, ref_grads, scale = brute_separate(history, params, 0.9)
    assert val.item() == pytest.approx(ref_val.item(), rel=1e-5)
    assert_grads(got, ref_grads, scale, 1e-5)


# ----------------------------------------------------------------------------- online mode
@pytest.mark.parametrize("decay", [1.0, 0.6, 0.0])
def test_online_equals_avalanche_formula(decay):
    history = make_history(5, seed=4, grow_at=(2,), appear_at=0, zero_frac=0.0)
    state = run_state(history, "online", decay)
    params = final_params(history)
    val, got = value_and_grads(state, params, 1.3)
    ref_val, ref_grads, A = brute_online(history, params, 1.3, decay)
    assert val.item() == pytest.approx(ref_val.item(), rel=1e-12)
    for n in ref_grads:
        torch.testing.assert_close(got[n], ref_grads[n], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(state.anchors[n], history[-1][n][1], rtol=0, atol=0)
    assert state.const.item() == 0.0

    # Avalanche's own update_importances (ParamData, zero-padded expand) gives the same A
    ewc = EWCPlugin(ewc_lambda=1.3, mode="online", decay_factor=decay)
    for t, exp in enumerate(history):
        ewc.update_importances({n: ParamData(f"imp_{n}", init_tensor=F.clone()) for n, (F, _) in exp.items()}, t)
    theirs = ewc.importances[len(history) - 1]
    for n in A:
        # ParamData.expand pads through a float32 zeros tensor, hence float32 precision
        torch.testing.assert_close(state.importances[n], theirs[n].data.to(F64), rtol=1e-6, atol=1e-30)
        torch.testing.assert_close(state.importances[n], A[n], rtol=1e-13, atol=1e-300)


# ----------------------------------------------------------------------------- properties
@HYP
@given(seed=st.integers(0, 2**31 - 1), grow=st.integers(1, 99), appear=st.integers(0, 99),
       factor=st.floats(1e-3, 1e3))
def test_property_100_experiences_wide_importances(seed, grow, appear, factor):
    history = make_history(100, seed, lo=1e-12, hi=1e6, grow_at=(grow,), appear_at=appear, zero_frac=0.05)
    state = run_state(history)
    params = final_params(history, seed=seed + 1)
    val, got = value_and_grads(state, params, factor)
    ref_val, ref_grads, scale = brute_separate(history, params, factor)
    assert val.item() == pytest.approx(ref_val.item(), rel=1e-9)
    assert_grads(got, ref_grads, scale, 1e-9)
    assert state.nbytes() == 2 * sum(p.numel() for p in params.values()) * 8


@HYP
@given(seed=st.integers(0, 2**31 - 1), T=st.integers(1, 12), mode=st.sampled_from(["separate", "online"]),
       decay=st.floats(0.0, 2.0), dtype=st.sampled_from([F64, torch.float32]))
def test_property_penalty_nonnegative_both_modes_and_zero_at_anchor_online(seed, T, mode, decay, dtype):
    history = make_history(T, seed, lo=1e-12, hi=1e6, dtype=dtype)
    state = run_state(history, mode, decay if mode == "online" else None)
    params = final_params(history, seed=seed + 7, dtype=dtype)
    assert state.penalty(params, 2.0).item() >= 0.0
    at_anchor = {n: a.clone() for n, a in state.anchors.items()}
    assert state.penalty(at_anchor, 2.0).item() >= 0.0
    assert state.const.item() >= 0.0
    if mode == "online":
        assert state.penalty(at_anchor, 2.0).item() == 0.0


def _one_experience_at_anchor(seed, dtype):
    g = torch.Generator().manual_seed(seed)
    F = torch.exp(torch.rand(50, generator=g, dtype=F64) * 30 - 20).to(dtype)
    theta = torch.randn(50, generator=g, dtype=F64).to(dtype)
    # a fixed pair on top of the random ones: 3 * 0.1 / 3 != 0.1 in float64
    F = torch.cat([F, torch.tensor([3.0], dtype=dtype)])
    theta = torch.cat([theta, torch.tensor([0.1], dtype=dtype)])
    state = ConsolidatedState().consolidated({"w": F}, {"w": theta})
    assert state.const.item() == 0.0
    return state.penalty({"w": theta.clone()}, 1.0).item()


@HYP
@given(seed=st.integers(0, 2**31 - 1))
def test_property_zero_at_anchor_after_one_experience_separate_float32(seed):
    assert _one_experience_at_anchor(seed, torch.float32) == 0.0


@HYP
@given(seed=st.integers(0, 2**31 - 1))
def test_property_zero_at_anchor_after_one_experience_separate_float64(seed):
    assert _one_experience_at_anchor(seed, F64) == 0.0


# ----------------------------------------------------------------------------- immutability and I/O
def _snapshot(state):
    return copy.deepcopy(state.state_dict())


def _assert_sd_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], dict):
            assert a[k].keys() == b[k].keys(), k
            for n in a[k]:
                assert a[k][n].dtype == b[k][n].dtype and torch.equal(a[k][n], b[k][n]), (k, n)
        elif isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


@pytest.mark.parametrize("mode", ["separate", "online"])
def test_consolidated_never_mutates_old_state(mode):
    history = make_history(4, seed=5)
    old = run_state(history[:2], mode, 0.5 if mode == "online" else None)
    before = _snapshot(old)
    tensors = {n: (a, old.anchors[n]) for n, a in old.importances.items()}
    new = old
    for exp in history[2:]:
        new = new.consolidated({n: F for n, (F, _) in exp.items()}, {n: th for n, (_, th) in exp.items()})
    _assert_sd_equal(before, _snapshot(old))
    for n, (a, m) in tensors.items():
        assert old.importances[n] is a and old.anchors[n] is m
    assert new.num_consolidations == 4 and old.num_consolidations == 2
    # a failed merge leaves nothing half-done either
    bad = {n: F.clone() for n, (F, _) in history[3].items()}
    bad["late.bias"][0] = float("nan")
    with pytest.raises(ValueError):
        old.consolidated(bad, {n: th for n, (_, th) in history[3].items()})
    _assert_sd_equal(before, _snapshot(old))


@pytest.mark.parametrize("mode", ["separate", "online"])
def test_state_dict_round_trip(mode):
    history = make_history(5, seed=6, dtype=torch.float32)
    state = run_state(history, mode, 0.8 if mode == "online" else None)
    buf = io.BytesIO()
    torch.save(state.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    loaded = ConsolidatedState.from_state_dict(sd, map_location="cpu")
    _assert_sd_equal(state.state_dict(), loaded.state_dict())
    assert loaded.mode == mode and loaded.decay == state.decay
    params = final_params(history, dtype=torch.float32)
    v1, g1 = value_and_grads(state, params, 3.0)
    v2, g2 = value_and_grads(loaded, params, 3.0)
    assert v1.item() == v2.item()
    for n in g1:
        assert torch.equal(g1[n], g2[n])
    # the state dict is a copy: editing it does not reach the state
    sd2 = state.state_dict()
    next(iter(sd2["importances"].values())).fill_(123.0)
    assert state.penalty(params, 3.0).item() == v1.item()


def test_load_errors():
    state = run_state(make_history(2, seed=7))
    good = state.state_dict()
    for key in ("version", "importances", "anchors", "const"):
        sd = dict(good)
        del sd[key]
        with pytest.raises(ValueError, match=key):
            ConsolidatedState.from_state_dict(sd)
    sd = dict(good, version=STATE_VERSION + 1)
    with pytest.raises(ValueError, match="version"):
        ConsolidatedState.from_state_dict(sd)
    sd = copy.deepcopy(good)
    sd["anchors"]["trunk.weight"] = torch.zeros(4, 3, dtype=F64)
    with pytest.raises(ValueError, match=r"'trunk\.weight'.*\(3, 4\).*\(4, 3\)"):
        ConsolidatedState.from_state_dict(sd)
    sd = copy.deepcopy(good)
    del sd["anchors"]["late.bias"]
    with pytest.raises(ValueError, match=r"late\.bias"):
        ConsolidatedState.from_state_dict(sd)
    sd = copy.deepcopy(good)
    sd["importances"]["trunk.weight"][0, 0] = -1.0
    with pytest.raises(ValueError, match=r"'trunk\.weight'"):
        ConsolidatedState.from_state_dict(sd)
    with pytest.raises(TypeError, match="mapping"):
        ConsolidatedState.from_state_dict([1, 2])
    sd = dict(good, mode="offline")
    with pytest.raises(ValueError, match="mode"):
        ConsolidatedState.from_state_dict(sd)


def test_constructor_and_merge_errors():
    with pytest.raises(ValueError, match="mode"):
        ConsolidatedState("both")
    with pytest.raises(ValueError, match="decay"):
        ConsolidatedState("separate", 0.5)
    for bad in (-0.1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="decay"):
            ConsolidatedState("online", bad)
    with pytest.raises(TypeError, match="decay"):
        ConsolidatedState("online", "0.5")
    s = ConsolidatedState()
    w = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"'v'"):
        s.consolidated({"v": torch.ones(2, 3)}, {"w": w})
    with pytest.raises(ValueError, match=r"'w'.*\(3, 2\).*\(2, 3\)"):
        s.consolidated({"w": torch.ones(3, 2)}, {"w": w})
    with pytest.raises(ValueError, match=r"'w'.*'my_estimator'"):
        s.consolidated({"w": torch.full((2, 3), -1.0)}, {"w": w}, estimator="my_estimator")
    s1 = s.consolidated({"w": torch.ones(2, 3)}, {"w": w})
    with pytest.raises(ValueError, match=r"'w'"):  # a parameter may grow, never shrink
        s1.consolidated({"w": torch.ones(1, 3)}, {"w": torch.zeros(1, 3)})


# ----------------------------------------------------------------------------- memory
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_memory_flat_over_100_experiences(dtype):
    g = torch.Generator().manual_seed(0)
    shapes = {"a.weight": (7, 5), "a.bias": (7,), "b.weight": (3, 7)}
    P = sum(math.prod(s) for s in shapes.values())
    state = ConsolidatedState()
    sizes, n_tensors = [], []
    for _ in range(100):
        F = {n: torch.rand(s, generator=g, dtype=F64).to(dtype) for n, s in shapes.items()}
        th = {n: torch.randn(s, generator=g, dtype=F64).to(dtype) for n, s in shapes.items()}
        state = state.consolidated(F, th)
        sizes.append(state.nbytes())
        n_tensors.append(len(state.state_dict()["importances"]) + len(state.state_dict()["anchors"]))
    elem = torch.empty((), dtype=dtype).element_size()
    assert sizes == [2 * P * elem] * 100
    # independently of nbytes(): what a checkpoint holds is two tensors per parameter, P elements
    # each side, whatever the number of experiences (a per-experience store would hold 100x)
    assert n_tensors == [2 * len(shapes)] * 100
    buf = io.BytesIO()
    torch.save(state.state_dict(), buf)
    first = ConsolidatedState().consolidated(F, th)
    buf1 = io.BytesIO()
    torch.save(first.state_dict(), buf1)
    assert len(buf.getvalue()) == len(buf1.getvalue())
    sd = state.state_dict()
    assert sum(t.numel() for t in sd["importances"].values()) == sum(t.numel() for t in sd["anchors"].values()) == P


# ----------------------------------------------------------------------------- copies, non-finite, online decay
@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["separate", "online"])
def test_state_holds_copies_never_views(dtype, mode):
    """In online mode mu = theta: for a float64 parameter a plain .to() returned the parameter
    itself, so the anchor moved with it and the penalty stayed 0."""
    theta = torch.randn(4, 3, dtype=F64).to(dtype)
    F = torch.rand(4, 3, dtype=F64).to(dtype)
    state = ConsolidatedState(mode, 0.5 if mode == "online" else None).consolidated({"w": F}, {"w": theta})
    for t in (state.importances["w"], state.anchors["w"]):
        assert t.untyped_storage().data_ptr() not in (theta.untyped_storage().data_ptr(), F.untyped_storage().data_ptr())
    anchor = theta.clone()
    theta += 1.0  # the model trains on
    F.zero_()
    assert torch.equal(state.anchors["w"], anchor)
    expect = float((F64_(state.importances["w"]) * (F64_(theta) - F64_(anchor)) ** 2).sum())
    assert expect > 0
    assert state.penalty({"w": theta}, 1.0).item() == pytest.approx(expect, rel=1e-2 if dtype == torch.bfloat16 else 1e-6)
    # from_state_dict copies too
    sd = state.state_dict()
    loaded = ConsolidatedState.from_state_dict(sd)
    sd["anchors"]["w"].add_(5.0)
    assert torch.equal(loaded.anchors["w"], anchor)


def F64_(t):
    return t.to(F64)


@pytest.mark.parametrize("mode", ["separate", "online"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_parameters_are_refused_state_unchanged(mode, bad):
    state = run_state(make_history(2, seed=8), mode, 0.5 if mode == "online" else None)
    before = _snapshot(state)
    exp = make_history(3, seed=8)[2]
    params = {n: th.clone() for n, (_, th) in exp.items()}
    params["trunk.weight"][1, 2] = bad
    with pytest.raises(ValueError, match=r"parameter 'trunk\.weight' has 1 NaN/inf entries of 12"):
        state.consolidated({n: F for n, (F, _) in exp.items()}, params)
    _assert_sd_equal(before, _snapshot(state))
    # 'uniform' importances are finite whatever the parameters: the parameter check is what refuses
    with pytest.raises(ValueError, match="trunk"):
        state.consolidated({n: torch.ones_like(p) for n, p in params.items()}, params)
    sd = state.state_dict()
    sd["anchors"]["trunk.weight"][0, 0] = bad
    with pytest.raises(ValueError, match=r"anchor in state_dict 'trunk\.weight'"):
        ConsolidatedState.from_state_dict(sd)


def test_online_decays_entries_without_new_importance():
    """A stored entry that gets no importance this time (frozen, left out) decays: A <- decay * A,
    and its anchor moves to the current parameter when given (Avalanche: F_new = 0)."""
    s1 = ConsolidatedState("online", 0.5).consolidated(
        {"a": torch.full((2,), 4.0, dtype=F64), "b": torch.full((3,), 8.0, dtype=F64)},
        {"a": torch.zeros(2, dtype=F64), "b": torch.zeros(3, dtype=F64)})
    s2 = s1.consolidated({"a": torch.ones(2, dtype=F64)},
                         {"a": torch.ones(2, dtype=F64), "b": torch.full((3,), 2.0, dtype=F64)})
    torch.testing.assert_close(s2.importances["a"], torch.full((2,), 3.0, dtype=F64), rtol=0, atol=0)
    torch.testing.assert_close(s2.importances["b"], torch.full((3,), 4.0, dtype=F64), rtol=0, atol=0)
    torch.testing.assert_close(s2.anchors["b"], torch.full((3,), 2.0, dtype=F64), rtol=0, atol=0)
    # not given at all (no longer in the model): decayed, anchor kept
    s3 = s2.consolidated({"a": torch.ones(2, dtype=F64)}, {"a": torch.ones(2, dtype=F64)})
    torch.testing.assert_close(s3.importances["b"], torch.full((3,), 2.0, dtype=F64), rtol=0, atol=0)
    torch.testing.assert_close(s3.anchors["b"], torch.full((3,), 2.0, dtype=F64), rtol=0, atol=0)
    # separate mode keeps such entries exactly
    t1 = ConsolidatedState().consolidated({"b": torch.full((3,), 8.0, dtype=F64)}, {"b": torch.zeros(3, dtype=F64)})
    t2 = t1.consolidated({}, {"b": torch.full((3,), 2.0, dtype=F64)})
    assert torch.equal(t2.importances["b"], t1.importances["b"]) and torch.equal(t2.anchors["b"], t1.anchors["b"])


def test_bf16_parameters_keep_a_float32_state_and_an_accurate_gradient():
    """A and mu of bf16 parameters are stored in float32: after 5 consolidations they equal the
    float64 merge to float32 rounding, and the penalty's gradient near the anchor is exact up to
    the final bf16 rounding of the gradient itself (a bf16 mu was off by percents there)."""
    g = torch.Generator().manual_seed(0)
    thetas = [torch.randn(64, 32, generator=g, dtype=F64).to(torch.bfloat16) for _ in range(5)]
    Fs = [torch.rand(64, 32, generator=g, dtype=F64) for _ in range(5)]
    state = ConsolidatedState("separate")
    for t, F in zip(thetas, Fs):
        state = state.consolidated({"w": F}, {"w": t})
    assert state.importances["w"].dtype == state.anchors["w"].dtype == torch.float32
    A_ref = sum(Fs)
    mu_ref = sum(F * F64_(t) for F, t in zip(Fs, thetas)) / A_ref
    torch.testing.assert_close(F64_(state.importances["w"]), A_ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(F64_(state.anchors["w"]), mu_ref, rtol=1e-6, atol=1e-7)
    # the model near the anchor: theta - mu is small, so a bf16 mu would dominate the error
    theta = (mu_ref + 0.05 * torch.randn(64, 32, generator=g, dtype=F64)).to(torch.bfloat16).requires_grad_()
    state.penalty({"w": theta}, 2.0).backward()
    assert theta.grad.dtype == torch.bfloat16
    ref = 2 * 2.0 * A_ref * (F64_(theta.detach()) - mu_ref)
    err = (F64_(theta.grad) - ref).abs() / ref.abs().clamp_min(1e-3)
    assert float(err.max()) <= 2.0 ** -8, float(err.max())  # bf16's own rounding of the result
    # the same merge stored in bf16 (the former behaviour) is visibly worse
    mu_bf16 = F64_(state.anchors["w"].to(torch.bfloat16))
    worst = ((F64_(theta.detach()) - mu_bf16) - (F64_(theta.detach()) - mu_ref)).abs() / (F64_(theta.detach()) - mu_ref).abs().clamp_min(1e-3)
    assert float(worst.max()) > 2.0 ** -6
    # a bf16 state read from a checkpoint is widened too
    sd = state.state_dict()
    sd["importances"]["w"] = sd["importances"]["w"].to(torch.bfloat16)
    assert ConsolidatedState.from_state_dict(sd).importances["w"].dtype == torch.float32
