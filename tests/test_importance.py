"""compute_importance: every estimator against a brute-force float64 per-sample loop."""

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from avalanche.benchmarks.utils.classification_dataset import (
    _make_taskaware_tensor_classification_dataset as make_tensor_classification_dataset,
)
from avalanche.models.dynamic_modules import avalanche_model_adaptation
from avalanche.training.plugins import EWCPlugin

from avalanche_pcreg import IMPORTANCE_ESTIMATORS, compute_importance, register_importance
from helpers import MultiHeadMLP, tiny_nc

F64 = torch.float64
TOL64 = dict(rtol=1e-10, atol=1e-12)
ESTIMATORS = ["empirical_fisher", "fisher", "expected_fisher", "mas", "uniform", "minibatch_fisher"]


# ----------------------------------------------------------------------------- models and data
def make_mlp(dtype=F64, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).to(dtype)


def make_cnn(dtype=F64, seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Dropout(0.5),
        nn.Flatten(), nn.Linear(3 * 5 * 5, 4),
    ).to(dtype)
    with torch.no_grad():  # non-trivial running statistics and affine parameters
        m[1].running_mean.copy_(torch.randn(3) * 0.5)
        m[1].running_var.copy_(torch.rand(3) + 0.5)
        m[1].weight.copy_(torch.rand(3) + 0.5)
        m[1].bias.copy_(torch.randn(3) * 0.1)
    return m


def make_data(kind, n=13, dtype=F64, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = (n, 6) if kind == "mlp" else (n, 2, 5, 5)
    x = torch.randn(shape, generator=g, dtype=dtype)
    y = torch.randint(0, 4, (n,), generator=g)
    return x, y


MODELS = {"mlp": make_mlp, "cnn": make_cnn}


# ----------------------------------------------------------------------------- brute force
def _forward(model, x, t):
    return model(x) if t is None else model(x, t)


def _grads(model, loss):
    params = list(model.parameters())
    gs = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
    return {n: (torch.zeros_like(p) if g is None else g) for (n, p), g in zip(model.named_parameters(), gs)}


def fisher_labels(model, x, batch_size, seed, t=None):
    """The labels ``fisher`` draws: one float64 uniform per sample from a generator seeded with
    ``seed``, drawn up front, then the inverse CDF of p(.|x) (see importance/fisher.py)."""
    u = torch.rand(x.shape[0], generator=torch.Generator().manual_seed(seed), dtype=F64)
    with torch.no_grad():
        out = torch.cat([_forward(model, x[s:s + batch_size], None if t is None else t[s:s + batch_size])
                         for s in range(0, x.shape[0], batch_size)])
        cdf = torch.softmax(out.to(F64), dim=-1).cumsum(-1)
    labels = []
    for n in range(x.shape[0]):  # first class whose cumulative probability exceeds u_n
        c = next((c for c in range(cdf.shape[1]) if cdf[n, c] > u[n]), cdf.shape[1] - 1)
        labels.append(c)
    return torch.tensor(labels)


def brute_force(model, x, y, method, *, t=None, batch_size=5, seed=0, criterion=None, work_dtype=F64):
    """Loop over single samples in eval mode, accumulated in float64 (computed in ``work_dtype``:
    float64 except for Avalanche's multi-head classifier, which only runs in float32)."""
    model = copy.deepcopy(model).to(work_dtype).eval()
    x = x.to(work_dtype)
    params = dict(model.named_parameters())
    acc = {n: torch.zeros(p.shape, dtype=F64) for n, p in params.items()}
    n = x.shape[0]
    if method == "uniform":
        return {k: torch.ones_like(v) for k, v in acc.items()}
    if method == "minibatch_fisher":
        crit = criterion or nn.CrossEntropyLoss()
        nb = 0
        for s in range(0, n, batch_size):
            tb = None if t is None else t[s:s + batch_size]
            loss = crit(_forward(model, x[s:s + batch_size], tb), y[s:s + batch_size])
            for k, g in _grads(model, loss).items():
                acc[k] += g.to(F64) ** 2
            nb += 1
        return {k: v / nb for k, v in acc.items()}
    if method == "fisher":
        y = fisher_labels(model, x, batch_size, seed, t)
    for i in range(n):
        xi = x[i:i + 1]
        ti = None if t is None else t[i:i + 1]
        out = _forward(model, xi, ti)
        if method in ("empirical_fisher", "fisher"):
            if criterion is None:
                loss = F.cross_entropy(out, y[i:i + 1])
            else:
                crit = copy.copy(criterion)
                crit.reduction = "sum"
                loss = crit(out, y[i:i + 1])
            for k, g in _grads(model, loss).items():
                acc[k] += g.to(F64) ** 2
        elif method == "expected_fisher":
            logp = torch.log_softmax(out, -1)[0]
            for c in range(out.shape[-1]):
                for k, g in _grads(model, -logp[c]).items():
                    acc[k] += logp[c].exp().detach().to(F64) * g.to(F64) ** 2
        elif method == "mas":
            for k, g in _grads(model, out.pow(2).sum()).items():
                acc[k] += g.to(F64).abs()
        else:
            raise AssertionError(method)
    return {k: v / n for k, v in acc.items()}


def assert_matches(got, ref, tol=TOL64, nontrivial=True):
    assert set(got) == set(ref)
    for k in ref:
        assert got[k].shape == ref[k].shape, k
        if nontrivial:
            assert ref[k].abs().sum() > 0, k
        torch.testing.assert_close(got[k].to(F64), ref[k], **tol, msg=lambda m: f"{k}: {m}")


def _flags(model):
    return [m.training for m in model.modules()]


def _mixed_flags(model):
    model.train()
    mods = list(model.modules())
    for i, m in enumerate(mods):
        if i % 2 == 1:
            m.eval()
    return _flags(model)


# ----------------------------------------------------------------------------- each estimator
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
@pytest.mark.parametrize("method", ESTIMATORS)
def test_estimator_matches_brute_force_float64(arch, method):
    model = MODELS[arch]()
    x, y = make_data(arch)
    flags = _mixed_flags(model)
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    got = compute_importance(model, TensorDataset(x, y), method, batch_size=5, seed=3)
    ref = brute_force(model, x, y, method, batch_size=5, seed=3)
    assert_matches(got, ref)
    assert _flags(model) == flags  # each module's own flag restored
    for k, v in model.state_dict().items():  # BN running stats / num_batches_tracked untouched
        assert torch.equal(v, buffers[k]), k
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("method", ["empirical_fisher", "expected_fisher", "mas", "fisher"])
def test_float32_model_close_to_float64_reference(method):
    model = make_cnn(torch.float32)
    x, y = make_data("cnn", dtype=torch.float32)
    got = compute_importance(model, TensorDataset(x, y), method, batch_size=4)
    ref = brute_force(model, x, y, method, batch_size=4)
    for k in ref:
        assert got[k].dtype == torch.float32
    assert_matches(got, ref, tol=dict(rtol=2e-4, atol=1e-7))


def test_estimators_really_differ():
    """The reference distinguishes the estimators (so a mix-up would fail)."""
    model = make_mlp()
    x, y = make_data("mlp")
    res = {m: compute_importance(model, TensorDataset(x, y), m, batch_size=5)
           for m in ["empirical_fisher", "fisher", "expected_fisher", "mas", "minibatch_fisher"]}
    for a, b in itertools.combinations(res, 2):
        diff = max((res[a][k] - res[b][k]).abs().max().item() for k in res[a])
        assert diff > 1e-6, (a, b)


def test_fisher_labels_seeded_and_global_rng_untouched():
    model = make_mlp()
    x, y = make_data("mlp", n=40)
    a = compute_importance(model, TensorDataset(x, y), "fisher", batch_size=8, seed=0)
    b = compute_importance(model, TensorDataset(x, y), "fisher", batch_size=8, seed=0)
    c = compute_importance(model, TensorDataset(x, y), "fisher", batch_size=8, seed=1)
    for k in a:
        assert torch.equal(a[k], b[k])
    assert any(not torch.allclose(a[k], c[k]) for k in a)
    # the global RNG is left alone
    torch.manual_seed(11)
    before = torch.rand(3)
    torch.manual_seed(11)
    compute_importance(model, TensorDataset(x, y), "fisher", batch_size=8, seed=0)
    assert torch.equal(torch.rand(3), before)


def test_empirical_fisher_with_custom_criterion():
    model = make_mlp()
    x, y = make_data("mlp")
    crit = nn.CrossEntropyLoss(label_smoothing=0.2)
    got = compute_importance(model, TensorDataset(x, y), "empirical_fisher", criterion=crit, batch_size=5)
    ref = brute_force(model, x, y, "empirical_fisher", criterion=crit)
    assert_matches(got, ref)
    assert crit.reduction == "mean"  # the user's criterion is not modified
    plain = brute_force(model, x, y, "empirical_fisher")
    assert any(not torch.allclose(plain[k], ref[k]) for k in ref)


def test_criterion_not_per_sample_is_an_error():
    model = make_mlp()
    x, y = make_data("mlp")
    with pytest.raises(ValueError, match="per-sample"):
        compute_importance(model, TensorDataset(x, y), "empirical_fisher",
                           criterion=lambda out, y: F.cross_entropy(out, y))


def test_names_restricts_output():
    model = make_mlp()
    x, y = make_data("mlp")
    names = ["2.weight", "4.bias"]
    got = compute_importance(model, TensorDataset(x, y), "empirical_fisher", names=names, batch_size=5)
    ref = brute_force(model, x, y, "empirical_fisher")
    assert_matches(got, {k: ref[k] for k in names})


def test_dataloader_input_and_unsupervised_data():
    model = make_mlp()
    x, y = make_data("mlp")
    got = compute_importance(model, DataLoader(TensorDataset(x, y), batch_size=4), "empirical_fisher")
    assert_matches(got, brute_force(model, x, y, "empirical_fisher"))
    # mas / expected_fisher need no labels: a dataset of inputs only works
    for method in ("mas", "expected_fisher"):
        got = compute_importance(model, TensorDataset(x), method, batch_size=5)
        assert_matches(got, brute_force(model, x, y, method))


# ----------------------------------------------------------------------------- Avalanche parity
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_minibatch_fisher_equals_avalanche_ewc_compute_importances(arch):
    model = MODELS[arch](torch.float32)
    x, y = make_data(arch, n=23, dtype=torch.float32)
    data = make_tensor_classification_dataset(x, y)
    crit = nn.CrossEntropyLoss()
    theirs_model = copy.deepcopy(model)
    opt = torch.optim.SGD(theirs_model.parameters(), lr=0.1)
    theirs = EWCPlugin(ewc_lambda=1.0).compute_importances(theirs_model, crit, opt, data, "cpu", 5)
    ours = compute_importance(model, data, "minibatch_fisher", criterion=crit, batch_size=5, device="cpu")
    assert set(ours) == set(theirs)
    for k in ours:
        assert torch.equal(ours[k], theirs[k].data), k
        assert theirs[k].data.abs().sum() > 0
    # and both equal the float64 brute force
    assert_matches(ours, brute_force(model, x, y, "minibatch_fisher", batch_size=5),
                   tol=dict(rtol=1e-4, atol=1e-9))


# ----------------------------------------------------------------------------- subsets, multi-head, callables
def test_num_samples_seeded_subset():
    model = make_mlp()
    x, y = make_data("mlp", n=30)
    ds = TensorDataset(x, y)
    a = compute_importance(model, ds, "empirical_fisher", num_samples=7, seed=4, batch_size=3)
    b = compute_importance(model, ds, "empirical_fisher", num_samples=7, seed=4, batch_size=3)
    c = compute_importance(model, ds, "empirical_fisher", num_samples=7, seed=5, batch_size=3)
    full = compute_importance(model, ds, "empirical_fisher", batch_size=3)
    for k in a:
        assert torch.equal(a[k], b[k])
    assert any(not torch.allclose(a[k], c[k]) for k in a)
    assert any(not torch.allclose(a[k], full[k]) for k in a)
    # it is the mean over exactly 7 distinct samples: the documented seeded permutation
    idx = torch.randperm(30, generator=torch.Generator().manual_seed(4))[:7]
    assert_matches(a, brute_force(model, x[idx], y[idx], "empirical_fisher"))
    # more samples than the data holds: all of them
    big = compute_importance(model, ds, "empirical_fisher", num_samples=1000, seed=4, batch_size=3)
    assert_matches(big, brute_force(model, x, y, "empirical_fisher"))


@pytest.mark.parametrize("method", ["empirical_fisher", "expected_fisher", "mas", "minibatch_fisher"])
def test_multi_head_model_with_task_labels(method):
    bench = tiny_nc(3, task_labels=True, n=60)
    model = MultiHeadMLP()  # float32: Avalanche's multi-head forward allocates a float32 output
    for exp in bench.train_stream:
        avalanche_model_adaptation(model, exp)
    xs, ys, ts = [], [], []
    for exp in bench.train_stream:
        ds = exp.dataset.eval()
        for i in range(0, len(ds), 9):  # a few samples of every task, interleaved below
            xi, yi, ti = ds[i][0], ds[i][1], ds[i][-1]
            xs.append(torch.as_tensor(xi))
            ys.append(int(yi))
            ts.append(int(ti))
    perm = torch.randperm(len(xs), generator=torch.Generator().manual_seed(0))
    x = torch.stack(xs)[perm]
    y = torch.tensor(ys)[perm]
    t = torch.tensor(ts)[perm]
    assert len(set(t[:5].tolist())) > 1  # batches mix tasks
    got = compute_importance(model, TensorDataset(x, y, t), method, batch_size=5)
    ref = brute_force(model, x, y, method, t=t, batch_size=5, work_dtype=torch.float32)
    assert_matches(got, ref, tol=dict(rtol=1e-4, atol=1e-8), nontrivial=False)
    heads = [k for k in ref if k.startswith("classifier.")]
    assert len(heads) == 6 and all(ref[k].abs().sum() > 0 for k in heads)


def test_multi_head_model_without_task_labels_is_an_error():
    model = MultiHeadMLP()
    _, y = make_data("mlp", n=6)
    x = torch.randn(6, 12)
    with pytest.raises(ValueError, match="task labels"):
        compute_importance(model, TensorDataset(x, y), "mas")


def test_user_callable_gets_loader_and_keywords_in_eval_mode():
    model = make_cnn()
    x, y = make_data("cnn")
    flags = _mixed_flags(model)
    seen = {}

    def my_importance(m, data, *, names, criterion, device, seed, limit, chunk_size):
        seen.update(training=[mm.training for mm in m.modules()], n=sum(b[0].shape[0] for b in data),
                    names=list(names), seed=seed, device=device)
        return {n: torch.full_like(dict(m.named_parameters())[n], 2.5) for n in names}

    got = compute_importance(model, TensorDataset(x, y), my_importance, batch_size=4, seed=9,
                             names=["0.weight", "5.bias"])
    assert seen["training"] == [False] * len(flags)
    assert seen["n"] == 13 and seen["names"] == ["0.weight", "5.bias"] and seen["seed"] == 9
    assert seen["device"] == torch.device("cpu")
    assert set(got) == {"0.weight", "5.bias"} and all(torch.all(v == 2.5) for v in got.values())
    assert _flags(model) == flags


def test_flags_restored_when_estimator_raises():
    model = make_cnn()
    x, y = make_data("cnn")
    flags = _mixed_flags(model)

    def boom(m, data, **kw):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        compute_importance(model, TensorDataset(x, y), boom)
    assert _flags(model) == flags


def test_register_importance():
    name = "test_importance_twice_uniform"

    @register_importance(name)
    def twice(model, data, *, names, **_):
        p = dict(model.named_parameters())
        return {n: 2 * torch.ones_like(p[n]) for n in names}

    try:
        model = make_mlp()
        x, y = make_data("mlp")
        got = compute_importance(model, TensorDataset(x, y), name)
        assert all(torch.all(v == 2) for v in got.values()) and len(got) == 6
        with pytest.raises(ValueError, match="already registered"):
            register_importance(name, twice)
        with pytest.raises(ValueError, match="already registered"):
            register_importance("si", twice)
        with pytest.raises(TypeError, match="callable"):
            register_importance("test_importance_not_callable", 3)
    finally:
        IMPORTANCE_ESTIMATORS.pop(name, None)


# ----------------------------------------------------------------------------- errors
def test_error_unknown_method_lists_valid_names():
    model = make_mlp()
    x, y = make_data("mlp")
    with pytest.raises(ValueError) as err:
        compute_importance(model, TensorDataset(x, y), "fishr")
    msg = str(err.value)
    assert "'fishr'" in msg
    for valid in ESTIMATORS + ["si"]:
        assert valid in msg


def test_error_si_is_plugin_only():
    model = make_mlp()
    x, y = make_data("mlp")
    with pytest.raises(ValueError, match=r"'si'.*ParameterChangePlugin"):
        compute_importance(model, TensorDataset(x, y), "si")


@pytest.mark.parametrize("method", ["empirical_fisher", "mas", "uniform"])
def test_error_empty_data(method):
    model = make_mlp()
    empty = TensorDataset(torch.zeros(0, 6, dtype=F64), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        compute_importance(model, empty, method)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_error_nonfinite_or_negative_result_names_parameter_and_estimator(bad):
    model = make_mlp()
    x, y = make_data("mlp")

    def broken_estimator(m, data, *, names, **_):
        p = dict(m.named_parameters())
        out = {n: torch.ones_like(p[n]) for n in names}
        out["2.bias"][3] = bad
        return out

    with pytest.raises(ValueError, match=r"'2\.bias'.*'broken_estimator'"):
        compute_importance(model, TensorDataset(x, y), broken_estimator)


def test_error_callable_returns_wrong_things():
    model = make_mlp()
    x, y = make_data("mlp")
    with pytest.raises(TypeError, match="dict"):
        compute_importance(model, TensorDataset(x, y), lambda m, d, **kw: [1, 2])
    with pytest.raises(ValueError, match=r"'nope\.weight'"):
        compute_importance(model, TensorDataset(x, y), lambda m, d, **kw: {"nope.weight": torch.ones(2)})
    with pytest.raises(ValueError, match=r"\(3,\).*'0\.bias'.*\(8,\)"):
        compute_importance(model, TensorDataset(x, y), lambda m, d, **kw: {"0.bias": torch.ones(3)})


@pytest.mark.parametrize("method", ["empirical_fisher", "minibatch_fisher"])
def test_error_supervised_estimator_without_labels(method):
    model = make_mlp()
    x, _ = make_data("mlp")
    with pytest.raises(ValueError, match=rf"'{method}'.*labels"):
        compute_importance(model, TensorDataset(x), method)


def test_error_bad_arguments():
    model = make_mlp()
    x, y = make_data("mlp")
    ds = TensorDataset(x, y)
    for bs in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="batch_size"):
            compute_importance(model, ds, batch_size=bs)
    for ns in (0, -1, 1.5):
        with pytest.raises(ValueError, match="num_samples"):
            compute_importance(model, ds, num_samples=ns)
    for cs in (0, -2, 2.5, True, "4"):
        with pytest.raises(ValueError, match="chunk_size must be a positive int or None"):
            compute_importance(model, ds, "empirical_fisher", chunk_size=cs)
    with pytest.raises(ValueError, match=r"'9\.weight'"):
        compute_importance(model, ds, names=["9.weight"])
    with pytest.raises(TypeError, match="model"):
        compute_importance("model", ds)
    with pytest.raises(TypeError, match="data"):
        compute_importance(model, 42)


def test_error_frozen_names():
    model = make_mlp()
    model[0].weight.requires_grad_(False)
    x, y = make_data("mlp")
    with pytest.raises(ValueError, match=r"'0\.weight'.*requires_grad"):
        compute_importance(model, TensorDataset(x, y), names=["0.weight", "0.bias"])
    # by default frozen parameters are left out
    got = compute_importance(model, TensorDataset(x, y), batch_size=5)
    assert "0.weight" not in got and "0.bias" in got
