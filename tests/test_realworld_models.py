"""Per-sample importances on models that broke the old per-layer rules silently: tied weights,
output-changing hooks, pruning, sequence-first inputs, half precision, one-logit binary
classifiers; and the batched exact expected Fisher. References: float64 per-sample loops."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from avalanche_pcreg import compute_importance
from avalanche_pcreg.importance.persample import PerSampleGradNorms, default_policy
from avalanche_pcreg.importance.fisher import softmax_sqrt_hessian
from test_persample import TOL, brute

F64 = torch.float64


def fast(model, names, lf, power=2, chunk_size=3):
    with PerSampleGradNorms(model, names, power=power, chunk_size=chunk_size) as acc:
        acc.backward(lf(), fallback=lambda p: lf(p))
    return acc.sums


def assert_exact(got, ref, names):
    for n in names:
        assert ref[n].abs().sum() > 0, n
        torch.testing.assert_close(got[n], ref[n], **TOL, msg=lambda m: f"{n}: {m}")


# ----------------------------------------------------------------------------- tied weights
class TinyLM(nn.Module):
    """Embedding, a hidden layer, and an LM head tied to the embedding via F.linear."""

    def __init__(self, vocab=11, dim=6):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.hidden = nn.Linear(dim, dim)

    def forward(self, idx):
        h = torch.tanh(self.hidden(self.emb(idx)))
        return F.linear(h, self.emb.weight)  # [N, L, vocab]


def lm_losses(model, idx, target):
    def lf(params=None):
        out = model(idx) if params is None else torch.func.functional_call(model, params, (idx,))
        return F.cross_entropy(out.transpose(1, 2), target, reduction="none").sum(1)
    return lf


def test_tied_lm_head_exact():
    torch.manual_seed(0)
    model = TinyLM().double().eval()
    idx = torch.randint(0, 11, (7, 5))
    target = torch.randint(0, 11, (7, 5))
    names = [n for n, _ in model.named_parameters()]
    lf = lm_losses(model, idx, target)
    ref = brute(model, names, lf, 2)
    with pytest.warns(RuntimeWarning, match="emb.weight"):
        got = fast(model, names, lf)
    assert_exact(got, ref, names)


# ----------------------------------------------------------------------------- hooks, pruning
def mlp():
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def ce_losses(model, x, y):
    def lf(params=None):
        out = model(x) if params is None else torch.func.functional_call(model, params, (x,))
        return F.cross_entropy(out, y, reduction="none")
    return lf


@pytest.mark.parametrize("power", [1, 2])
def test_forward_hook_changing_output_exact(power):
    torch.manual_seed(1)
    model = mlp().double().eval()
    handle = model[2].register_forward_hook(lambda m, a, out: out * 2)
    x, y = torch.randn(9, 4, dtype=F64), torch.randint(0, 3, (9,))
    names = [n for n, _ in model.named_parameters()]
    lf = ce_losses(model, x, y)
    ref = brute(model, names, lf, power)
    with pytest.warns(RuntimeWarning, match=r"2\.weight"):
        got = fast(model, names, lf, power)
    assert_exact(got, ref, names)
    handle.remove()


def test_pruned_layer_exact():
    import torch.nn.utils.prune as prune

    torch.manual_seed(2)
    model = mlp().double().eval()
    prune.l1_unstructured(model[2], "weight", amount=0.4)  # weight = weight_orig * mask (pre-hook)
    x, y = torch.randn(8, 4, dtype=F64), torch.randint(0, 3, (8,))
    names = [n for n, _ in model.named_parameters()]
    assert "2.weight_orig" in names
    lf = ce_losses(model, x, y)
    ref = brute(model, names, lf, 2)
    assert_exact(fast(model, names, lf), ref, names)
    assert (ref["2.weight_orig"][model[2].weight_mask == 0] == 0).all()


# ----------------------------------------------------------------------------- sequence-first
class SeqFirst(nn.Module):
    """RNN-style [T, N, D] through nn.Linear and LayerNorm; per-sample loss from out[:, n]."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.norm = nn.LayerNorm(4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):  # x [T, N, 3]
        return self.out(torch.tanh(self.norm(self.inp(x)))).mean(0)  # [N, 2]


@pytest.mark.parametrize("t", [3, 5])  # 5 = N: the time and sample axes have the same size
def test_sequence_first_linear_exact(t):
    torch.manual_seed(3)
    model = SeqFirst().double().eval()
    with torch.no_grad():
        model.norm.weight.normal_()
        model.norm.bias.normal_()
    x, y = torch.randn(t, 5, 3, dtype=F64), torch.randint(0, 2, (5,))
    names = [n for n, _ in model.named_parameters()]
    lf = ce_losses(model, x, y)
    ref = brute(model, names, lf, 2)
    with PerSampleGradNorms(model, names, chunk_size=2) as acc:
        acc.backward(lf())  # no fallback: every parameter must go through its rule
        assert acc.fallback_names == []
    assert_exact(acc.sums, ref, names)


class Encoder(nn.Module):
    def __init__(self, batch_first):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=12, dropout=0.0, batch_first=batch_first)
        self.head = nn.Linear(8, 3)
        self.batch_first = batch_first

    def forward(self, x):
        h = self.layer(x)
        return self.head(h.mean(1 if self.batch_first else 0))


@pytest.mark.parametrize("batch_first,t", [(False, 3), (False, 4), (True, 3)])
@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_transformer_encoder_layer_exact(batch_first, t):
    torch.manual_seed(4)
    model = Encoder(batch_first).double().eval()
    n = 4
    x = torch.randn((n, t, 8) if batch_first else (t, n, 8), dtype=F64)
    y = torch.randint(0, 3, (n,))
    names = [nm for nm, _ in model.named_parameters()]
    lf = ce_losses(model, x, y)
    ref = brute(model, names, lf, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # nothing here needs a warning
        with PerSampleGradNorms(model, names, chunk_size=3) as acc:
            acc.backward(lf(), fallback=lambda p: lf(p))
    attn = [nm for nm in names if nm.startswith("layer.self_attn.")]
    assert len(attn) == 4
    # MultiheadAttention: per-layer fallback; with T = N its inputs are ambiguous -> whole model
    assert acc.model_fallback_names == (attn if t == n else [])
    assert acc.fallback_names == attn
    assert_exact(acc.sums, ref, names)


# ----------------------------------------------------------------------------- half precision
def test_bfloat16_accumulates_in_float32():
    """4096 samples in 512 batches: bf16 sums stopped growing (about 0.5x); float32 does not."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 3)).to(torch.bfloat16)
    x = torch.randn(4096, 4).to(torch.bfloat16)
    y = torch.randint(0, 3, (4096,))
    got = compute_importance(model, TensorDataset(x, y), "empirical_fisher", batch_size=8)
    ref64 = copy.deepcopy(model).double()
    params = {k: v.detach() for k, v in ref64.named_parameters()}

    def loss(p, xi, yi):
        return F.cross_entropy(torch.func.functional_call(ref64, p, (xi[None],)), yi[None])

    g = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x.double(), y)
    for k in params:
        ref = (g[k] ** 2).mean(0)
        assert got[k].dtype == torch.bfloat16
        torch.testing.assert_close(got[k].double(), ref, rtol=2e-2, atol=0)


# ----------------------------------------------------------------------------- one logit
def binary_net():
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 1))


def binary_reference(model, x, y, method, seed=0):
    model = copy.deepcopy(model).double().eval()
    params = dict(model.named_parameters())
    acc = {k: torch.zeros_like(p) for k, p in params.items()}
    u = torch.rand(x.shape[0], generator=torch.Generator().manual_seed(seed), dtype=F64)
    for i in range(x.shape[0]):
        z = model(x[i:i + 1].double())[0, 0]
        p1 = torch.sigmoid(z)
        if method == "empirical_fisher":
            cases = [(float(y[i]), 1.0)]
        elif method == "fisher":  # inverse CDF over (0, 1) with p = (1 - p1, p1)
            cases = [(1.0 if u[i] >= 1 - p1.item() else 0.0, 1.0)]
        else:
            cases = [(1.0, p1.item()), (0.0, 1 - p1.item())]
        for label, w in cases:
            nll = -(label * F.logsigmoid(z) + (1 - label) * F.logsigmoid(-z))
            gs = torch.autograd.grad(nll, list(params.values()), retain_graph=True)
            for k, gk in zip(params, gs):
                acc[k] += w * gk ** 2
    return {k: v / x.shape[0] for k, v in acc.items()}


@pytest.mark.parametrize("method", ["empirical_fisher", "fisher", "expected_fisher"])
def test_one_logit_binary_classifier(method):
    torch.manual_seed(6)
    model = binary_net().double()
    x, y = torch.randn(11, 5, dtype=F64), torch.randint(0, 2, (11,))
    got = compute_importance(model, TensorDataset(x, y), method, batch_size=4, seed=0)
    ref = binary_reference(model, x, y, method, seed=0)
    for k in ref:
        assert ref[k].abs().sum() > 0
        torch.testing.assert_close(got[k], ref[k], rtol=1e-10, atol=1e-12)
    if method == "empirical_fisher":  # BCEWithLogitsLoss as the criterion: the same
        got2 = compute_importance(model, TensorDataset(x, y.double()[:, None]), method, batch_size=4,
                                  criterion=nn.BCEWithLogitsLoss())
        for k in ref:
            torch.testing.assert_close(got2[k], ref[k], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["empirical_fisher", "fisher", "expected_fisher"])
@pytest.mark.parametrize("shape", [(4, 3), (3, 5)])
def test_non_logit_outputs_are_a_clear_error(method, shape):
    class Dense(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, shape[0] * shape[1])

        def forward(self, x):
            return self.fc(x).reshape(x.shape[0], *shape)

    x, y = torch.randn(6, 2), torch.randint(0, 3, (6,))
    with pytest.raises(ValueError, match=r"shape \(6, %d, %d\).*expected logits of shape \[N, C\]" % shape):
        compute_importance(Dense(), TensorDataset(x, y), method, batch_size=6)


# ----------------------------------------------------------------------------- expected Fisher
def test_expected_fisher_identity_sqrt_hessian():
    """sum_c p_c g_c**2 (g_c = grad of -log p_c) equals sum_c (S^T J)_c**2."""
    torch.manual_seed(7)
    model = mlp().double()
    x = torch.randn(4, 4, dtype=F64)
    params = {k: v.detach() for k, v in model.named_parameters()}
    for i in range(x.shape[0]):
        def logits(p):
            return torch.func.functional_call(model, p, (x[i:i + 1],))[0]
        z = logits(params)
        p = torch.softmax(z, -1)
        jac = torch.func.jacrev(logits)(params)  # {name: [C, *shape]}
        s = softmax_sqrt_hessian(z[None])[:, 0]  # [K=C-1, C]: column k of S in row k
        assert s.shape == (2, 3)
        torch.testing.assert_close(s.t() @ s, torch.diag(p) - torch.outer(p, p), **TOL)
        for k, j in jac.items():
            jf = j.reshape(j.shape[0], -1)
            lhs = sum(p[c] * ((p - F.one_hot(torch.tensor(c), 3).double()) @ jf) ** 2 for c in range(3))
            rhs = ((s @ jf) ** 2).sum(0)
            assert lhs.abs().sum() > 0
            torch.testing.assert_close(lhs, rhs, **TOL)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_sqrt_hessian_has_c_minus_1_columns_even_for_saturated_softmax(dtype):
    """S Sᵀ = diag(p) - p pᵀ with K = C - 1 columns (one for two classes), also where p is
    one-hot to working precision and where the last class takes it all."""
    z = torch.tensor([[0.3, -1.2], [40.0, -40.0], [2.0, 1.0], [0.0, 0.0]], dtype=dtype)
    for logits in (z, torch.cat([z, torch.tensor([[5.0], [-3.0], [90.0], [0.0]], dtype=dtype)], 1)):
        s = softmax_sqrt_hessian(logits)
        c = logits.shape[1]
        assert s.shape == (c - 1, 4, c) and s.dtype == dtype
        p = torch.softmax(logits.double(), -1)
        h = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)
        tol = dict(rtol=0, atol=1e-15) if dtype == F64 else dict(rtol=0, atol=1e-7)
        torch.testing.assert_close(torch.einsum("kni,knj->nij", s.double(), s.double()), h, **tol)


def expected_reference(model, x):
    model = copy.deepcopy(model).eval()
    params = dict(model.named_parameters())
    acc = {k: torch.zeros_like(p) for k, p in params.items()}
    for i in range(x.shape[0]):
        logp = torch.log_softmax(model(x[i:i + 1]), -1)[0]
        for c in range(logp.shape[0]):
            gs = torch.autograd.grad(-logp[c], list(params.values()), retain_graph=True)
            for k, g in zip(params, gs):
                acc[k] += logp[c].exp().detach() * g ** 2
    return {k: v / x.shape[0] for k, v in acc.items()}


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(h + self.bn2(self.conv2(h)))
        return self.fc(h.mean((2, 3)))


def cnn_bn():
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(3 * 5 * 5, 3))


def _randomize_bn(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.3)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("arch", ["mlp", "cnn_bn", "residual"])
@pytest.mark.parametrize("batched", [True, False])
def test_expected_fisher_batched_and_per_class_paths_exact(arch, batched, monkeypatch):
    torch.manual_seed(8)
    model = _randomize_bn({"mlp": mlp, "cnn_bn": cnn_bn, "residual": Residual}[arch]()).double()
    x = torch.randn((10, 4) if arch == "mlp" else (10, 2, 5, 5), dtype=F64)
    if not batched:  # the batched backward is refused: one backward per class instead
        real = torch.autograd.grad

        def no_batched(*a, **kw):
            if kw.get("is_grads_batched"):
                raise RuntimeError("batched backward not supported")
            return real(*a, **kw)

        monkeypatch.setattr(torch.autograd, "grad", no_batched)
    got = compute_importance(model, TensorDataset(x), "expected_fisher", batch_size=4)
    monkeypatch.undo()
    ref = expected_reference(model, x)
    for k in ref:
        assert ref[k].abs().sum() > 0, k
        torch.testing.assert_close(got[k], ref[k], rtol=1e-10, atol=1e-12, msg=lambda m: f"{k}: {m}")


def test_expected_fisher_columns_in_pieces_exact():
    """A tiny byte budget: one cotangent column per batched backward, same result."""
    torch.manual_seed(9)
    model = _randomize_bn(Residual()).double().eval()
    x = torch.randn(6, 2, 5, 5, dtype=F64)
    names = [k for k, _ in model.named_parameters()]
    with PerSampleGradNorms(model, names, max_bytes=1) as acc:
        out = model(x)
        assert acc._col_step(3, 8) == 1
        acc.backward_batched(out, softmax_sqrt_hessian(out), fallback=lambda p: torch.func.functional_call(model, p, (x,)))
    ref = expected_reference(model, x)
    for k in names:
        torch.testing.assert_close(acc.sums[k] / 6, ref[k], rtol=1e-10, atol=1e-12, msg=lambda m: f"{k}: {m}")
    with pytest.raises(ValueError, match="max_bytes"):
        PerSampleGradNorms(model, names, max_bytes=0)


class ChannelsAsBatch(nn.Module):
    """A conv whose axis 0 has size N but holds channels (samples are on axis 1)."""

    def __init__(self, n):
        super().__init__()
        self.conv = nn.Conv1d(n, n, 3, padding=1)
        self.head = nn.Linear(n * 6, 3)

    def forward(self, x):  # x [N, C=N, 6]
        h = torch.tanh(self.conv(x.transpose(0, 1))).transpose(0, 1)  # conv sees [C, N, 6]
        return self.head(h.reshape(x.shape[0], -1))


def test_axis_of_size_n_without_the_samples_is_not_trusted():
    torch.manual_seed(10)
    n = 4
    model = ChannelsAsBatch(n).double().eval()
    x, y = torch.randn(n, n, 6, dtype=F64), torch.randint(0, 3, (n,))
    names = [k for k, _ in model.named_parameters()]
    lf = ce_losses(model, x, y)
    ref = brute(model, names, lf, 2)
    with PerSampleGradNorms(model, names) as acc:
        acc.backward(lf(), fallback=lambda p: lf(p))
        assert acc.model_fallback_names == ["conv.weight", "conv.bias"]
    assert_exact(acc.sums, ref, names)


def _small_maps_model(conv1d):
    if conv1d:
        model = nn.Sequential(nn.Conv1d(2, 3, 3, stride=2, padding=1), nn.Tanh(), nn.Conv1d(3, 4, 2),
                              nn.Flatten(), nn.Linear(4 * 2, 7))
        return model.double(), torch.randn(9, 2, 6, dtype=F64)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1, dilation=1), nn.Tanh(),
                          nn.Conv2d(3, 4, 2, padding="same"), nn.Flatten(), nn.Linear(4 * 3 * 3, 7))
    return model.double(), torch.randn(9, 2, 6, 6, dtype=F64)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("conv1d", [False, True])
def test_expected_fisher_small_maps_many_classes_exact(conv1d):
    """Few output positions, many classes: the convolutions sum the columns in Gram form."""
    torch.manual_seed(11)
    model, x = _small_maps_model(conv1d)
    got = compute_importance(model, TensorDataset(x), "expected_fisher", batch_size=4, chunk_size=2)
    ref = expected_reference(model, x)
    for k in ref:
        assert ref[k].abs().sum() > 0, k
        torch.testing.assert_close(got[k], ref[k], rtol=1e-10, atol=1e-12, msg=lambda m: f"{k}: {m}")


@pytest.fixture
def counted_gram():
    """The convolutions' rules, re-registered (public API) so that the pieces of columns reaching
    their column accumulators are counted: [columns of each piece, in order]."""
    from avalanche_pcreg.importance.persample.rules import RULES, register_rule
    from avalanche_pcreg.importance.persample.rules.conv import Conv1dRule, Conv2dRule

    adds, before = [], dict(RULES)

    def counting(base):
        class Counting(base):
            def column_accumulator(self, module, a, out_shape, req):
                acc = super().column_accumulator(module, a, out_shape, req)
                if acc is not None:
                    add = acc.add
                    acc.add = lambda d: (adds.append(d.shape[0]), add(d))[1]
                return acc
        return Counting

    register_rule(nn.Conv1d, counting(Conv1dRule), replace=True)
    register_rule(nn.Conv2d, counting(Conv2dRule), replace=True)
    yield adds
    RULES.clear()
    RULES.update(before)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("mode", ["one piece", "pieces of 2", "one column at a time", "no state"])
def test_gram_columns_exact_whichever_way_the_columns_arrive(conv1d, mode, counted_gram):
    """The 6 columns of S (7 classes) reach the Gram accumulators of both convolutions in one
    vmapped piece, in pieces of 2, or one streamed column at a time, and are folded into G in
    equal folds of at most 4 (a piece may cross a fold); with no state to spare the direct
    products run. On the checked first batch the check's Σ_k S_k stands for one column (its sums
    count 1/6): 5 columns are left."""
    torch.manual_seed(12)
    model, x = _small_maps_model(conv1d)
    model.eval()
    names = [k for k, _ in model.named_parameters()]
    adds = counted_gram
    step = {"one piece": 6, "pieces of 2": 2, "one column at a time": 1, "no state": None}[mode]
    policy = default_policy(torch.device("cpu")).replace(gram_fold=4, columns_per_backward=step)
    x = x[:8]
    with PerSampleGradNorms(model, names, max_bytes=1 if mode == "no state" else 64 * 2 ** 20, policy=policy) as acc:
        for s in range(0, 8, 4):
            xb = x[s:s + 4]
            out = model(xb)
            acc.backward_batched(out, softmax_sqrt_hessian(out),
                                 fallback=lambda p, xb=xb: torch.func.functional_call(model, p, (xb,)))
    ref = expected_reference(model, x)
    for k in names:
        assert ref[k].abs().sum() > 0, k
        torch.testing.assert_close(acc.sums[k] / 8, ref[k], rtol=1e-10, atol=1e-12, msg=lambda m: f"{k}: {m}")
    want_adds = {"one piece": ([5], [6]), "pieces of 2": ([2, 2, 1], [2, 2, 2]),
                 "one column at a time": ([1] * 5, [1] * 6), "no state": ([], [])}[mode]
    assert adds == [a for a in want_adds[0] for _ in range(2)] + [a for a in want_adds[1] for _ in range(2)]
