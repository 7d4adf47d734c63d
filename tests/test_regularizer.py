"""ParameterChangeReg against float64 brute-force loops (the kernels themselves: test_penalty.py)."""

import copy
import math

import pytest
import torch
from torch import nn

from avalanche_pcreg import ParameterChangeReg

F64 = torch.float64
TIGHT = dict(rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- models
class Net(nn.Module):
    """fc1 -> fc2, registered in this order."""

    def __init__(self, out=3, seed=0, dtype=F64):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(4, 5)
        self.fc2 = nn.Linear(5, out)
        self.to(dtype)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class NetReversed(nn.Module):
    """The same names as Net, registered in the opposite order (fc2 first)."""

    def __init__(self, out=3, seed=1, dtype=F64):
        super().__init__()
        torch.manual_seed(seed)
        self.fc2 = nn.Linear(5, out)
        self.fc1 = nn.Linear(4, 5)
        self.to(dtype)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def random_weights(ref: nn.Module, seed=3, names=None):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=g, dtype=F64).to(p.dtype) * 3.0
            for n, p in ref.named_parameters() if names is None or n in names}


def brute(target: nn.Module, ref: nn.Module, weights, factor):
    """float64 loop over names and scalar entries of the leading block; value and gradient."""
    tp, rp = dict(target.named_parameters()), dict(ref.named_parameters())
    value = 0.0
    grads = {n: torch.zeros(p.shape, dtype=F64) for n, p in tp.items()}
    for name, w in weights.items():
        w64 = w.detach().to(F64).reshape(-1)
        r64 = rp[name].detach().to(F64)
        t64 = tp[name].detach().to(F64)
        g = grads[name]
        for flat in range(w64.numel()):
            idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), r64.shape))
            d = float(t64[idx]) - float(r64[idx])
            value += factor * float(w64[flat]) * d * d
            g[idx] += 2.0 * factor * float(w64[flat]) * d
    return value, grads


def check_against_brute(target, ref, weights, factor, rtol=1e-12):
    for p in list(target.parameters()) + list(ref.parameters()):
        p.grad = None
    reg = ParameterChangeReg(factor)
    val = reg(target, ref, weights)
    val.backward()
    ref_val, ref_grads = brute(target, ref, weights, factor)
    assert ref_val > 0
    assert val.item() == pytest.approx(ref_val, rel=rtol, abs=1e-300)
    for name, p in target.named_parameters():
        if name in weights:
            assert p.grad is not None, name
            torch.testing.assert_close(p.grad.to(F64), ref_grads[name], rtol=rtol, atol=rtol,
                                       msg=lambda m: f"{name}: {m}")
        else:
            assert p.grad is None or torch.count_nonzero(p.grad) == 0, name
    return val


# ----------------------------------------------------------------------------- value and gradient
@pytest.mark.parametrize("factor", [0.5, 7.25])
def test_value_and_gradient_match_brute_force(factor):
    target, ref = Net(seed=0), Net(seed=1)
    check_against_brute(target, ref, random_weights(ref), factor)


def test_float32_models_match_float64_reference():
    target, ref = Net(seed=0, dtype=torch.float32), Net(seed=1, dtype=torch.float32)
    val = check_against_brute(target, ref, random_weights(ref), 2.0, rtol=1e-5)
    assert val.dtype == torch.float32


def test_subset_of_parameters_only_those_regularized():
    target, ref = Net(seed=0), Net(seed=1)
    weights = random_weights(ref, names={"fc1.weight", "fc2.bias"})
    check_against_brute(target, ref, weights, 1.5)
    assert target.fc1.bias.grad is None and target.fc2.weight.grad is None


def test_reference_given_as_mapping_equals_module():
    target, ref = Net(seed=0), Net(seed=1)
    w = random_weights(ref)
    reg = ParameterChangeReg(3.0)
    a = reg(target, ref, w)
    b = reg(target, {k: v.detach().clone() for k, v in ref.state_dict().items()}, w)
    assert a.item() == pytest.approx(brute(target, ref, w, 3.0)[0], rel=1e-12)
    assert a.item() == b.item()


def test_zero_factor_and_identical_models_give_zero():
    target, ref = Net(seed=0), Net(seed=1)
    w = random_weights(ref)
    assert ParameterChangeReg(0.0)(target, ref, w).item() == 0.0
    with pytest.warns(RuntimeWarning, match="shares storage"):  # the reference is the target itself
        assert ParameterChangeReg(5.0)(target, target, w).item() == 0.0
    assert ParameterChangeReg(5.0)(target, copy.deepcopy(target), w).item() == 0.0
    assert ParameterChangeReg(5.0)(target, ref, {}).item() == 0.0


# ----------------------------------------------------------------------------- by name, never by position
class Twins(nn.Module):
    """Two same-shaped layers a, b: a positional pairing would run but pair a with b."""

    def __init__(self, reverse=False, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        first, second = nn.Linear(4, 4).double(), nn.Linear(4, 4).double()
        if reverse:
            self.b, self.a = second, first
        else:
            self.a, self.b = first, second


def test_models_with_different_registration_order_matched_by_name():
    target, ref = Net(seed=0), NetReversed(seed=1)
    assert [n for n, _ in target.named_parameters()] != [n for n, _ in ref.named_parameters()]
    check_against_brute(target, ref, random_weights(ref), 2.5)

    t2, r2 = Twins(seed=0), Twins(reverse=True, seed=1)
    assert [n for n, _ in r2.named_parameters()][0] == "b.weight"
    weights = random_weights(r2)
    val = check_against_brute(t2, r2, weights, 2.5)
    # pairing by position (a with b) gives another number: the by-name result is not an accident
    tp, rp = list(t2.parameters()), list(r2.parameters())
    wl = [weights[n] for n, _ in r2.named_parameters()]
    positional = 2.5 * sum(float((w * (t.detach() - r.detach()) ** 2).sum()) for t, r, w in zip(tp, rp, wl))
    assert abs(positional - val.item()) > 1e-3 * val.item()


def test_weights_dict_order_does_not_matter():
    target, ref = Net(seed=0), Net(seed=1)
    w = random_weights(ref)
    w_rev = dict(reversed(list(w.items())))
    reg = ParameterChangeReg(1.0)
    assert reg(target, ref, w).item() == pytest.approx(reg(target, ref, w_rev).item(), rel=1e-14)


# ----------------------------------------------------------------------------- grown heads
def test_grown_head_leading_slice_and_new_entries_free():
    target, ref = Net(out=7, seed=0), Net(out=3, seed=1)
    weights = random_weights(ref)  # shapes of ref: fc2.weight (3, 5), fc2.bias (3,)
    check_against_brute(target, ref, weights, 1.75)
    assert torch.count_nonzero(target.fc2.weight.grad[3:]) == 0
    assert torch.count_nonzero(target.fc2.bias.grad[3:]) == 0
    assert torch.count_nonzero(target.fc2.weight.grad[:3]) > 0
    # new rows do not change the value
    before = ParameterChangeReg(1.75)(target, ref, weights).item()
    with torch.no_grad():
        target.fc2.weight[3:] += 100.0
        target.fc2.bias[3:] -= 100.0
    assert ParameterChangeReg(1.75)(target, ref, weights).item() == before


# ----------------------------------------------------------------------------- gradient goes to target only
def test_gradient_flows_to_target_only():
    target, ref = Net(seed=0), Net(seed=1)
    weights = {k: v.requires_grad_(True) for k, v in random_weights(ref).items()}
    ParameterChangeReg(1.0)(target, ref, weights).backward()
    assert all(p.grad is None for p in ref.parameters())
    assert all(w.grad is None for w in weights.values())
    assert all(p.grad is not None for p in target.parameters())


# ----------------------------------------------------------------------------- errors
def test_error_name_missing_from_target():
    target, ref = Net(seed=0), Net(seed=1)
    w = random_weights(ref)
    w["fc3.weight"] = torch.ones(2)
    with pytest.raises(ValueError, match=r"'fc3\.weight'.*target_model"):
        ParameterChangeReg(1.0)(target, ref, w)


def test_error_name_missing_from_ref():
    target, ref = Net(seed=0), Net(seed=1)
    w = random_weights(ref)
    ref_map = {k: v for k, v in ref.named_parameters() if k != "fc1.bias"}
    with pytest.raises(ValueError, match=r"'fc1\.bias'.*ref_model"):
        ParameterChangeReg(1.0)(target, ref_map, w)


def test_error_weight_shape_mismatch_names_both_shapes():
    target, ref = Net(seed=0), Net(seed=1)
    w = random_weights(ref)
    w["fc1.weight"] = torch.ones(5, 3, dtype=F64)
    with pytest.raises(ValueError, match=r"'fc1\.weight'.*\(5, 3\).*\(5, 4\)"):
        ParameterChangeReg(1.0)(target, ref, w)


def test_error_target_ref_shape_mismatch_names_both_shapes():
    target, ref = Net(seed=0), Net(seed=1)
    w = random_weights(ref)
    ref_map = dict(ref.named_parameters())
    ref_map["fc1.bias"] = torch.zeros(5, 1, dtype=F64)
    w["fc1.bias"] = torch.ones(5, 1, dtype=F64)
    with pytest.raises(ValueError, match=r"'fc1\.bias'.*\(5,\).*\(5, 1\)"):
        ParameterChangeReg(1.0)(target, ref_map, w)


def test_error_target_smaller_than_ref():
    target, ref = Net(out=2, seed=0), Net(out=3, seed=1)
    with pytest.raises(ValueError, match=r"'fc2\.(weight|bias)'.*\(2.*\(3"):
        ParameterChangeReg(1.0)(target, ref, random_weights(ref))


@pytest.mark.parametrize("factor", [-1.0, float("nan"), float("inf"), -float("inf")])
def test_error_factor_bad_value(factor):
    with pytest.raises(ValueError, match="factor"):
        ParameterChangeReg(factor)


@pytest.mark.parametrize("factor", ["1.0", None, [1.0], True, torch.ones(2)])
def test_error_factor_not_a_number(factor):
    with pytest.raises(TypeError, match="factor"):
        ParameterChangeReg(factor)


def test_factor_accepts_ints_and_scalar_tensors():
    assert ParameterChangeReg(2).factor == 2.0
    assert ParameterChangeReg(torch.tensor(0.5)).factor == 0.5


@pytest.mark.parametrize("bad", [-0.5, float("nan"), float("inf")])
def test_error_weights_negative_nan_inf_name_parameter(bad):
    target, ref = Net(seed=0), Net(seed=1)
    w = random_weights(ref)
    w["fc2.weight"][1, 2] = bad
    kind = "negative" if bad < 0 else "NaN/inf"
    with pytest.raises(ValueError, match=rf"'fc2\.weight'.*1 {kind} entries"):
        ParameterChangeReg(1.0)(target, ref, w)
    # with checks off the caller takes responsibility: no validation (hot path), and the bad
    # weight shows in the value exactly as the formula says (not fixed up, not raised)
    val = ParameterChangeReg(1.0, check_weights=False)(target, ref, w).item()
    d = float(target.fc2.weight[1, 2].detach() - ref.fc2.weight[1, 2].detach())
    if bad < 0:
        w_ok = dict(w, **{"fc2.weight": w["fc2.weight"].clone()})
        w_ok["fc2.weight"][1, 2] = 0.0
        rest = ParameterChangeReg(1.0)(target, ref, w_ok).item()
        assert val == pytest.approx(rest + bad * d * d, rel=1e-12)
    elif math.isnan(bad):
        assert math.isnan(val)
    else:
        assert val == float("inf")


def test_error_weights_not_mapping_or_not_tensor():
    target, ref = Net(seed=0), Net(seed=1)
    with pytest.raises(TypeError, match="weights"):
        ParameterChangeReg(1.0)(target, ref, [torch.ones(3)])
    with pytest.raises(TypeError, match=r"fc1\.bias"):
        ParameterChangeReg(1.0)(target, ref, {"fc1.bias": [1.0] * 5})
    with pytest.raises(TypeError, match="ref_model"):
        ParameterChangeReg(1.0)(target, 3, {})


@pytest.mark.parametrize("how", ["state_dict", "detach", "data"])
def test_reference_sharing_storage_with_the_target_warns_naming_the_parameter(how):
    """A reference that is a view of the target's own parameters moves with them: the penalty
    would be 0 forever. A warning names the parameter; a copy gives none."""
    import warnings

    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    views = {"state_dict": lambda: model.state_dict(),
             "detach": lambda: {n: p.detach() for n, p in model.named_parameters()},
             "data": lambda: {n: p.data for n, p in model.named_parameters()}}[how]()
    weights = {"2.weight": torch.ones(2, 3)}
    reg = ParameterChangeReg(1.0)
    with pytest.warns(RuntimeWarning, match=r"ref_model\['2.weight'\] shares storage with the target"):
        assert reg(model, views, weights).item() == 0.0
    copies = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        model[2].weight.add_(1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert reg(model, copies, weights).item() == pytest.approx(6.0)
