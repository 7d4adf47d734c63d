"""The library on a CUDA device, against the same float64 references as the CPU tests: every
estimator and the per-layer rules (the batched conv paths, the Gram form, the K-column expected
Fisher), the penalty kernels, and the plugin in a CUDA strategy next to Avalanche's EWCPlugin.

Skipped where torch sees no CUDA device. TF32 is switched off here, so that float32 results can be
held to float32 tolerances."""

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from avalanche.training.plugins import EWCPlugin

from avalanche_pcreg import ParameterChangePlugin, ParameterChangeReg, compute_importance
from avalanche_pcreg.importance.persample import PerSampleGradNorms, Policy, PowerSum, Request
from avalanche_pcreg.penalty import quadratic_penalty
from helpers import mlp, run_naive, tiny_nc
from test_importance import ESTIMATORS, MODELS, assert_matches, brute_force, make_cnn, make_data
from test_persample import brute, loss_fn_for

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

F64 = torch.float64
CUDA = torch.device("cuda")
TOL64 = dict(rtol=1e-9, atol=1e-12)  # float64 on the device: other reduction orders than the loop's


@pytest.fixture(autouse=True)
def no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _cpu(d):
    for k, v in d.items():
        assert v.device.type == "cuda", k
    return {k: v.cpu() for k, v in d.items()}


# ----------------------------------------------------------------------------- models
class GramNet(nn.Module):
    """A strided conv with a 3x3 output map: 9 positions, the Gram form for the 9 columns of a
    10-class expected Fisher; eval-mode BatchNorm; a dilated grouped conv; a linear head."""

    def __init__(self, classes=10):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.grouped = nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2)
        self.head = nn.Linear(4 * 9, classes)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        return self.head(torch.tanh(self.grouped(h)).flatten(1))


class LargeMapNet(nn.Module):
    """A conv with a large output map (17 x 18 positions)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(self.pool(torch.relu(self.conv(x))).flatten(1))


def _gram_net():
    torch.manual_seed(4)
    m = GramNet().double()
    with torch.no_grad():
        m.bn.running_mean.normal_(0, 0.3)
        m.bn.running_var.uniform_(0.5, 1.5)
    g = torch.Generator().manual_seed(5)
    return m, torch.randn(11, 2, 5, 5, generator=g, dtype=F64), torch.randint(0, 10, (11,), generator=g)


def _large_map_net():
    torch.manual_seed(6)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(7, 3, 17, 18, generator=g, dtype=F64)
    return LargeMapNet().double(), x, torch.randint(0, 5, (7,), generator=g)


EXTRA_MODELS = {"gram": _gram_net, "large-map": _large_map_net}


# ----------------------------------------------------------------------------- estimators
@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("method", ESTIMATORS)
def test_estimator_on_cuda_matches_float64_loop(arch, method):
    model = MODELS[arch]()
    x, y = make_data(arch)
    ref = brute_force(model, x, y, method, batch_size=5, seed=3)
    got = compute_importance(model.to(CUDA), TensorDataset(x, y), method, batch_size=5, seed=3)
    assert_matches(_cpu(got), ref, tol=TOL64)


@pytest.mark.parametrize("arch", sorted(EXTRA_MODELS))
@pytest.mark.parametrize("method", ["empirical_fisher", "expected_fisher", "fisher", "mas"])
def test_conv_paths_on_cuda_match_float64_loop(arch, method):
    """The batched conv paths a CUDA layer takes (the one-sample-at-a-time paths are CPU-only):
    unfold + matmul, the Gram form with the expected Fisher's columns, grouped convolutions."""
    model, x, y = EXTRA_MODELS[arch]()
    ref = brute_force(model, x, y, method, batch_size=4, seed=1)
    got = compute_importance(model.to(CUDA), TensorDataset(x, y), method, batch_size=4, seed=1)
    assert_matches(_cpu(got), ref, tol=TOL64)


@pytest.mark.parametrize("method", ["empirical_fisher", "expected_fisher", "mas"])
def test_float32_on_cuda_close_to_float64_loop(method):
    model = make_cnn(torch.float32)
    x, y = make_data("cnn", dtype=torch.float32)
    ref = brute_force(model, x, y, method, batch_size=4)
    got = _cpu(compute_importance(model.to(CUDA), TensorDataset(x, y), method, batch_size=4))
    for k in ref:
        assert got[k].dtype == torch.float32, k
    assert_matches(got, ref, tol=dict(rtol=2e-4, atol=1e-7))


@pytest.mark.parametrize("power", [1, 2])
@pytest.mark.parametrize("arch", sorted(EXTRA_MODELS))
def test_per_sample_rules_on_cuda(arch, power):
    """PerSampleGradNorms with a loss whose output gradient differs per sample, in chunks of 3."""
    model, x, y = EXTRA_MODELS[arch]()
    model.eval()
    y1 = torch.nn.functional.one_hot(y, model.head.out_features).to(F64)
    names = [n for n, _ in model.named_parameters()]
    ref = brute(model, names, loss_fn_for(model, x, y1), power)
    dev = copy.deepcopy(model).to(CUDA)
    lf = loss_fn_for(dev, x.to(CUDA), y1.to(CUDA))
    with PerSampleGradNorms(dev, names, power=power, chunk_size=3) as acc:
        acc.backward(lf(), fallback=lf)
        assert acc.fallback_names == []
    assert_matches(_cpu(acc.sums), ref, tol=TOL64)


# ----------------------------------------------------------------------------- penalty
@pytest.mark.parametrize("impl", ["foreach", "forloop"])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_penalty_kernels_on_cuda(impl, dtype):
    g = torch.Generator().manual_seed(0)
    shapes = [(300, 200), (200,), (16, 8, 3, 3), (1,)]
    cpu = [(torch.randn(s, generator=g, dtype=F64), torch.rand(s, generator=g, dtype=F64),
            torch.randn(s, generator=g, dtype=F64)) for s in shapes]
    params = [p.to(CUDA, dtype).requires_grad_(True) for p, _, _ in cpu]
    weights = [w.to(CUDA, dtype) for _, w, _ in cpu]
    anchors = [a.to(CUDA, dtype) for _, _, a in cpu]
    val = quadratic_penalty(params, weights, anchors, 0.7, impl=impl)
    grads = torch.autograd.grad(val, params)
    # the reference starts from the device tensors' own values (float32 rounding of the inputs)
    ref = 0.7 * sum(float((w.to(F64) * (p.detach().to(F64) - a.to(F64)) ** 2).sum().cpu())
                    for p, w, a in zip(params, weights, anchors))
    assert val.device.type == "cuda"
    assert val.item() == pytest.approx(ref, rel=1e-12 if dtype == F64 else 1e-5)
    for p, w, a, gr in zip(params, weights, anchors, grads):
        rg = 2 * 0.7 * w.to(F64) * (p.detach().to(F64) - a.to(F64))
        tol = dict(rtol=1e-12, atol=1e-12) if dtype == F64 else dict(rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gr.to(F64), rg, **tol)


def test_regularizer_module_on_cuda():
    torch.manual_seed(0)
    target = mlp().to(CUDA)
    ref_model = copy.deepcopy(target)
    with torch.no_grad():
        for p in ref_model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    weights = {n: torch.rand_like(p) for n, p in target.named_parameters()}
    val = ParameterChangeReg(2.5)(target, ref_model, weights)
    ref = 2.5 * sum(float((weights[n].double() * (p.detach().double() - q.detach().double()) ** 2).sum())
                    for (n, p), (_, q) in zip(target.named_parameters(), ref_model.named_parameters()))
    assert val.device.type == "cuda"
    assert val.item() == pytest.approx(ref, rel=1e-5)


# ----------------------------------------------------------------------------- plugin in a CUDA strategy
def test_plugin_parity_with_ewc_plugin_on_cuda():
    """The minibatch Fisher in a Naive strategy on the device: the same losses and parameters as
    Avalanche's EWCPlugin up to float32 rounding, and a penalty that changed the run."""
    bench = tiny_nc(3)
    runs = {}
    for name, plugins in {"ours": [ParameterChangePlugin(10.0, "minibatch_fisher", batch_size=32)],
                          "theirs": [EWCPlugin(ewc_lambda=10.0)], "none": []}.items():
        model = mlp()
        _, rec = run_naive(bench, model, plugins, device="cuda")
        runs[name] = (model, rec, plugins)
    ours_model, rec_o, (ours,) = runs["ours"]
    theirs_model, rec_a, _ = runs["theirs"]
    assert next(ours_model.parameters()).device.type == "cuda"
    assert all(v.device.type == "cuda" for v in ours.importances.values())
    la = torch.tensor(rec_a.losses, dtype=F64)
    lo = torch.tensor(rec_o.losses, dtype=F64)
    assert len(la) == len(lo) > 0
    assert ((la - lo).abs() / la.abs().clamp_min(1e-12)).max().item() <= 1e-5
    for (n, p), (_, q) in zip(ours_model.named_parameters(), theirs_model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-5, msg=lambda m: f"{n}: {m}")
    rec_n = runs["none"][1]
    later = [i for i, e in enumerate(rec_o.exp_of_loss) if e > 0]
    assert max(abs(rec_o.losses[i] - rec_n.losses[i]) for i in later) > 1e-3


def test_plugin_expected_fisher_on_cuda_is_the_float64_loop_of_its_experience():
    """One experience in a CUDA strategy: the stored importances are the exact expected Fisher
    of the trained model over the experience's data (float32 model, float64 reference)."""
    bench = tiny_nc(1)
    plugin = ParameterChangePlugin(1.0, "expected_fisher", batch_size=16)
    model = mlp()
    run_naive(bench, model, [plugin], epochs=1, device="cuda")
    data = bench.train_stream[0].dataset
    x = torch.stack([data[i][0] for i in range(len(data))])
    y = torch.tensor([int(data[i][1]) for i in range(len(data))])
    ref = brute_force(model.cpu(), x, y, "expected_fisher")
    assert_matches(_cpu(plugin.importances), ref, tol=dict(rtol=2e-4, atol=1e-8))


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("power", [1, 2])
def test_conv_weight_gradient_path_on_cuda(power):
    """The GPU conv path (one weight-gradient call per chunk, the samples as groups) chosen on the
    device and exact in float64: stride, dilation, groups, 'same' padding, K = 1 and 3 columns."""
    from avalanche_pcreg.importance.persample.rules import conv as C
    from test_persample import _assert_conv_sums, _conv_cases

    torch.manual_seed(44)
    for conv, shape in _conv_cases():
        rule = C.Conv1dRule() if isinstance(conv, nn.Conv1d) else C.Conv2dRule()
        conv = conv.double()
        a = torch.randn(shape, dtype=F64)
        out_shape = tuple(conv(a).shape)
        for k in (None, 3):
            d = torch.randn(((k,) if k else ()) + out_shape, dtype=F64)
            req = Request(PowerSum(power), frozenset(), policy=Policy.for_device(CUDA))
            assert rule.path(conv, a.to(CUDA), d.to(CUDA), req, k) == "wgrad"
            _assert_conv_sums(rule, conv, a, d, power, 2, k, TOL64, to=lambda t: copy.deepcopy(t).to(CUDA))
