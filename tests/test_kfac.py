"""Kronecker-factored importance and its penalty, against curvlinops' KFACLinearOperator and against
float64 loops over samples, positions and classes."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from avalanche_pcreg.importance import compute_importance
from avalanche_pcreg.importance.kfac import KronFactors, KroneckerImportance, kfac
from avalanche_pcreg.importance.persample import PerSampleGradNorms, Policy
from avalanche_pcreg.importance.persample.quantity import KronBlock, KroneckerFactors
from avalanche_pcreg.kron_state import KronState, block_matrix
from avalanche_pcreg.state import ConsolidatedState

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from curvlinops import KFACLinearOperator


def _mlp(bias=True):
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 7, bias=bias), nn.Tanh(), nn.Linear(7, 4, bias=bias))


def _cnn():
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 4, 2, stride=2, dilation=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(4 * 2 * 2, 5), nn.Tanh(), nn.Linear(5, 4))


def _cnn1d():
    return nn.Sequential(nn.Conv1d(3, 4, 3, padding=2, dilation=2), nn.Tanh(), nn.Conv1d(4, 2, 2, stride=2),
                         nn.Flatten(), nn.Linear(2 * 3, 4))


MODELS = {"mlp": (_mlp, (12,)), "mlp_nobias": (lambda: _mlp(False), (12,)), "cnn": (_cnn, (2, 4, 4)),
          "cnn1d": (_cnn1d, (3, 6))}


def _data(shape, n=23, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=torch.float64), torch.randint(0, classes, (n,), generator=g)


def _dense_kv(imp: KroneckerImportance, v: dict) -> dict:
    """K v per parameter from our blocks: G [ΔW | Δb] A, split back into the parameters."""
    out = {}
    for blk in imp.blocks.values():
        w = v[blk.weight]
        delta = block_matrix(w, v[blk.bias] if blk.bias else None)
        kv = blk.G @ delta @ blk.A
        out[blk.weight] = kv[:, :w[0].numel()].reshape(w.shape)
        if blk.bias:
            out[blk.bias] = kv[:, -1]
    return out


@pytest.mark.parametrize("model_name,classes", [("mlp", 4), ("mlp_nobias", 4), ("cnn", 4),
                                                ("binary", 2)])  # curvlinops has no Conv1d
@pytest.mark.parametrize("ours,theirs", [("expected", "type-2"), ("empirical", "empirical")])
def test_factors_equal_curvlinops_kfac(model_name, classes, ours, theirs):
    """Also two classes: one cotangent column per sample, where the self-checked batch's only
    column is dropped from the check's piece and counted in the next."""
    make, shape = MODELS["mlp" if model_name == "binary" else model_name]
    torch.manual_seed(1)
    model = make().double()
    if classes == 2:
        model[-1] = nn.Linear(7, 2).double()
    x, y = _data(shape, classes=classes)
    params = [p for p in model.parameters()]
    names = [n for n, _ in model.named_parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        oracle = KFACLinearOperator(model, nn.CrossEntropyLoss(reduction="mean"), params, [(x[:12], y[:12]), (x[12:], y[12:])],
                                    fisher_type=theirs, separate_weight_and_bias=False, check_deterministic=False)
    # our batches differ from the oracle's: the factors are means over the whole data
    imp = kfac(model, [(x[:5], y[:5]), (x[5:], y[5:])], names=names, fisher=ours)
    assert sorted(n for b in imp.blocks.values() for n in b.names) == sorted(names) and not imp.diagonal
    g = torch.Generator().manual_seed(2)
    for _ in range(2):
        v = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]
        want = oracle @ v
        got = _dense_kv(imp, dict(zip(names, v)))
        for n, w in zip(names, want):
            torch.testing.assert_close(got[n], w, rtol=1e-10, atol=1e-13, msg=f"K v of {n}")


def _patch_rows(m, x):
    """Brute force: the patches of conv layer m at every position, by slicing (float64)."""
    if isinstance(m, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    conv2d = isinstance(m, nn.Conv2d)
    x = x if conv2d else x.unsqueeze(2)
    k = m.kernel_size if conv2d else (1,) + m.kernel_size
    st = m.stride if conv2d else (1,) + m.stride
    dl = m.dilation if conv2d else (1,) + m.dilation
    pd = m.padding if conv2d else (0,) + m.padding
    xp = F.pad(x, (pd[1], pd[1], pd[0], pd[0]))
    rows = []
    for n in range(x.shape[0]):
        oh = (xp.shape[2] - dl[0] * (k[0] - 1) - 1) // st[0] + 1
        ow = (xp.shape[3] - dl[1] * (k[1] - 1) - 1) // st[1] + 1
        for i in range(oh):
            for j in range(ow):
                patch = xp[n, :, i * st[0]: i * st[0] + dl[0] * (k[0] - 1) + 1: dl[0],
                           j * st[1]: j * st[1] + dl[1] * (k[1] - 1) + 1: dl[1]]
                rows.append(patch.reshape(-1))
    return torch.stack(rows)


@pytest.mark.parametrize("model_name", ["cnn", "cnn1d"])
def test_factors_equal_float64_loops_over_samples_positions_and_classes(model_name):
    make, shape = MODELS[model_name]
    torch.manual_seed(3)
    model = make().double().eval()
    x, y = _data(shape, n=9)
    names = [n for n, _ in model.named_parameters()]
    imp = kfac(model, [(x, y)], names=names, fisher="expected")
    layers = [m for m in model if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]
    # per sample: the layer inputs, and per class c the gradient of log p_c ... as the exact Fisher's
    # columns sqrt(p_c) (e_c - p) backpropagated from the logits
    for li, layer in enumerate(layers):
        a_sum = torch.zeros_like(imp.blocks[names[2 * li]].A)
        g_sum = torch.zeros_like(imp.blocks[names[2 * li]].G)
        rows_total = 0
        for n in range(x.shape[0]):
            acts = {}
            h = layer.register_forward_hook(lambda m, i, o: acts.update(a=i[0], out=o))
            logits = model(x[n:n + 1])
            h.remove()
            p = logits.softmax(-1)[0]
            arow = _patch_rows(layer, acts["a"].detach())
            arow = torch.cat([arow, torch.ones(arow.shape[0], 1, dtype=arow.dtype)], 1)
            a_sum += arow.t() @ arow
            rows_total += arow.shape[0]
            for c in range(p.shape[0]):
                cot = p[c].sqrt() * (torch.eye(p.shape[0], dtype=p.dtype)[c] - p)
                (d,) = torch.autograd.grad(logits[0], acts["out"], cot.detach(), retain_graph=True)
                d = d[0].reshape(d.shape[1], -1).t() if d.dim() > 2 else d
                g_sum += d.t() @ d
        blk = imp.blocks[names[2 * li]]
        torch.testing.assert_close(blk.A, a_sum / rows_total, rtol=1e-11, atol=1e-14)
        torch.testing.assert_close(blk.G, g_sum / x.shape[0], rtol=1e-11, atol=1e-14)


def test_sequence_inputs_expand_over_positions_and_sequence_first():
    """A Linear on [T, N, in] (sequence first): every position is a row of both factors."""
    torch.manual_seed(4)

    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(3, 5)
            self.head = nn.Linear(5, 4)

        def forward(self, x):  # x: [N, T, 3] -> sequence first inside
            h = torch.tanh(self.proj(x.transpose(0, 1)))  # [T, N, 5]
            return self.head(h.mean(0))

    model = Seq().double()
    x, y = _data((6, 3), n=7)
    imp = kfac(model, [(x, y)], names=[n for n, _ in model.named_parameters()], fisher="empirical")
    rows = torch.cat([x.reshape(-1, 3), torch.ones(7 * 6, 1, dtype=torch.float64)], 1)
    torch.testing.assert_close(imp.blocks["proj.weight"].A, rows.t() @ rows / rows.shape[0], rtol=1e-12, atol=1e-14)
    g = torch.zeros(5, 5, dtype=torch.float64)
    for n in range(7):
        out = {}
        h = model.proj.register_forward_hook(lambda m, i, o: out.update(o=o))
        loss = F.cross_entropy(model(x[n:n + 1]), y[n:n + 1], reduction="sum")
        h.remove()
        (d,) = torch.autograd.grad(loss, out["o"])
        d = d.reshape(-1, 5)
        g += d.t() @ d
    torch.testing.assert_close(imp.blocks["proj.weight"].G, g / 7, rtol=1e-11, atol=1e-14)


def test_other_layers_get_the_diagonal_of_the_same_fisher_in_the_same_pass():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.GroupNorm(2, 4), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).double()
    x, y = _data((2, 6, 6), n=10, classes=3)
    names = [n for n, _ in model.named_parameters()]
    imp = compute_importance(model, TensorDataset(x, y), "kfac", batch_size=4)
    diag = compute_importance(model, TensorDataset(x, y), "expected_fisher", batch_size=4)
    assert list(imp.blocks) == ["3.weight"]  # the grouped conv has no block
    assert sorted(imp.diagonal) == sorted(n for n in names if not n.startswith("3."))
    for n, v in imp.diagonal.items():
        torch.testing.assert_close(v, diag[n], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("columns", [None, 1, 2])
def test_engine_quantity_is_independent_of_batching_and_column_pieces(columns):
    torch.manual_seed(6)
    model = _cnn().double()
    x, y = _data((2, 4, 4), n=16)
    names = [n for n, _ in model.named_parameters()]
    ref = kfac(model, [(x, y)], names=names)
    policy = Policy().replace(columns_per_backward=columns, chunk_size=3)
    # batches of 5, 5, 5, 1: the first and the last are self-checked (new shapes), the others not,
    # and their cotangent columns come in pieces of other weights; every input counts once
    batches = [(x[s:s + 5], y[s:s + 5]) for s in range(0, 16, 5)]
    got = kfac(model, batches, names=names, policy=policy)
    for n, blk in ref.blocks.items():
        torch.testing.assert_close(got.blocks[n].A, blk.A, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(got.blocks[n].G, blk.G, rtol=1e-12, atol=1e-15)


def test_a_block_that_no_rule_can_take_is_refused_with_its_module_named():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = nn.Linear(4, 4)
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            return self.head(self.shared(torch.tanh(self.shared(x))))

    model = Twice()
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    with pytest.raises(RuntimeError, match=r"Kronecker factors: .*shared.*called more than once"):
        kfac(model, [(x, y)], names=[n for n, _ in model.named_parameters()])


def test_fisher_choice_is_validated():
    with pytest.raises(ValueError, match="fisher must be one of"):
        kfac(_mlp(), [], names=["1.weight"], fisher="true")


# ----------------------------------------------------------------------------- state and penalty
def _perturbed(model, scale, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _cnn_state_and_written_out(mode, decay, experiences, n, seed):
    """A float64 CNN's KronState after ``experiences`` merges (the model moved before each), the model
    moved once more, and the penalty written out with autograd ops from the blocks and anchors."""
    torch.manual_seed(seed)
    model = _cnn().double()
    names = [n for n, _ in model.named_parameters()]
    state, history = KronState(mode, decay), []
    for t in range(experiences):
        _perturbed(model, 0.3, t)
        imp = kfac(model, [_data((2, 4, 4), n=n, seed=t)], names=names)
        params = dict(model.named_parameters())
        history.append({k: (b, block_matrix(params[b.weight], params[b.bias]).clone()) for k, b in imp.blocks.items()})
        state = state.merged(imp, params)
    _perturbed(model, 0.3, 9)
    params = dict(model.named_parameters())
    ref = 0
    for t, h in enumerate(history):
        for k, (blk, anchor) in h.items():
            w = params[blk.weight]
            theta = torch.cat([w.reshape(w.shape[0], -1), params[blk.bias][:, None]], 1)  # with autograd
            if mode == "separate":
                ref = ref + blk.quadratic(theta - anchor)
            else:
                ref = ref + decay ** (experiences - 1 - t) * blk.quadratic(theta - history[-1][k][1])
    return state, params, ref


@pytest.mark.parametrize("mode", ["separate", "online"])
def test_penalty_value_and_gradient_equal_the_sum_over_experiences(mode):
    state, params, ref = _cnn_state_and_written_out(mode, 0.6, experiences=3, n=11, seed=7)
    value = state.penalty(params, 2.5)
    grads = torch.autograd.grad(value, list(params.values()))
    ref = 2.5 * ref
    ref_grads = torch.autograd.grad(ref, list(params.values()))
    assert value.item() == pytest.approx(ref.item(), rel=1e-12)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-11, atol=1e-13)


def _block(a, g, weight="w", bias="b"):
    return KronFactors(A=a, G=g, weight=weight, bias=bias)


def test_nearest_merge_is_exact_when_inputs_do_not_change_and_approximate_otherwise():
    g = torch.Generator().manual_seed(8)

    def spd(k):
        m = torch.randn(k, k, generator=g, dtype=torch.float64)
        return m @ m.t() / k + torch.eye(k, dtype=torch.float64) * 0.1

    w = torch.zeros(3, 4, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    a1, a2, g1, g2 = spd(5), spd(5), spd(3), spd(3)
    for same_a, equal in ((True, True), (False, False)):
        states = {m: KronState("online", 0.5, m) for m in ("exact", "nearest")}
        for a, gg in ((a1, g1), (a1 if same_a else a2, g2)):
            imp = KroneckerImportance({"w": _block(a, gg)}, {})
            states = {k: s.merged(imp, {"w": w, "b": b}) for k, s in states.items()}
        assert len(states["exact"].layers["w"].pairs) == 2 and len(states["nearest"].layers["w"].pairs) == 1
        with torch.no_grad():
            w.copy_(torch.randn(3, 4, generator=g, dtype=torch.float64))
        vals = {k: s.penalty({"w": w, "b": b}, 1.0).item() for k, s in states.items()}
        assert (vals["nearest"] == pytest.approx(vals["exact"], rel=1e-12)) is equal
        with torch.no_grad():
            w.zero_()


def test_growing_head_keeps_old_entries_and_frees_new_ones():
    torch.manual_seed(9)
    model = _mlp().double()
    names = [n for n, _ in model.named_parameters()]
    state = ConsolidatedState("separate")
    state = state.consolidated(kfac(model, [_data((12,), n=10)], names=names), dict(model.named_parameters()))
    _perturbed(model, 0.2, 1)
    before = state.penalty(model, 1.0).item()
    old = model[3]
    grown = nn.Linear(7, 6).double()
    with torch.no_grad():
        grown.weight[:4].copy_(old.weight)
        grown.bias[:4].copy_(old.bias)
    model[3] = grown
    aligned = state.aligned(dict(model.named_parameters()))
    assert aligned.penalty(model, 1.0).item() == pytest.approx(before, rel=1e-12)
    with torch.no_grad():
        grown.weight[4:].add_(5.0)  # the new outputs are free
        grown.bias[4:].add_(5.0)
    assert aligned.penalty(model, 1.0).item() == pytest.approx(before, rel=1e-12)
    assert state.penalty(model, 1.0).item() == pytest.approx(before, rel=1e-12)  # padded on the fly too


def test_checkpoint_round_trip_keeps_value_and_gradient():
    torch.manual_seed(10)
    model = _cnn()
    names = [n for n, _ in model.named_parameters()]
    state = ConsolidatedState("online", decay=0.9, kfac_merge="exact")
    for t in range(2):
        x, y = _data((2, 4, 4), n=8, seed=t)
        state = state.consolidated(kfac(model, [(x.float(), y)], names=names), dict(model.named_parameters()))
        _perturbed(model, 0.1, t)
    buf = __import__("io").BytesIO()
    torch.save(state.state_dict(), buf)
    buf.seek(0)
    loaded = ConsolidatedState.from_state_dict(torch.load(buf, weights_only=True))
    assert len(loaded.kron.layers["0.weight"].pairs) == 2
    v1, v2 = state.penalty(model, 3.0), loaded.penalty(model, 3.0)
    g1 = torch.autograd.grad(v1, list(model.parameters()))
    g2 = torch.autograd.grad(v2, list(model.parameters()))
    assert v1.item() == v2.item() and v1.item() > 0
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


@pytest.mark.parametrize("mode", ["separate", "online"])
def test_second_derivatives_equal_those_of_the_sum_written_out(mode):
    """Under create_graph=True the kernel's gradient is differentiable: Hessian-vector products (and
    the gradient itself) equal those of the quadratic written with autograd ops, over two experiences
    (separate mode's re-anchored linear and constant terms included)."""
    state, params, ref = _cnn_state_and_written_out(mode, 0.7, experiences=2, n=9, seed=11)
    vec = [torch.randn_like(p) for p in params.values()]
    hvps = []
    for value in (state.penalty(params, 1.5), 1.5 * ref):
        grads = torch.autograd.grad(value, list(params.values()), create_graph=True)
        dot = sum((g * v).sum() for g, v in zip(grads, vec))
        hvps.append((grads, torch.autograd.grad(dot, list(params.values()), allow_unused=True)))
    (g_ours, h_ours), (g_ref, h_ref) = hvps
    assert all(h.abs().sum() > 0 for h in h_ref)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13)
    for a, b in zip(h_ours, h_ref):  # every parameter of this model is in a block
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13)


def test_kron_block_packing_round_trip():
    q = KroneckerFactors().for_param(nn.Linear(3, 2), "weight", {"weight", "bias"})
    assert isinstance(q, KronBlock) and (q.out, q.inp, q.bias) == (2, 3, True)
    gs, as_ = torch.arange(4.).reshape(2, 2), torch.arange(16.).reshape(4, 4)
    g2, a2, rows = q.unpack(q.pack(gs, as_, 7))
    assert torch.equal(g2, gs) and torch.equal(a2, as_) and rows.item() == 7
    assert KroneckerFactors().for_param(nn.Conv2d(2, 2, 3, groups=2), "weight", {"weight"}) == KroneckerFactors().rest


def test_nearest_kronecker_product_is_the_frobenius_optimum():
    """Against the best rank-one approximation of the rearranged matrix, by a full SVD."""
    from avalanche_pcreg.kron_state import nearest_kronecker

    g = torch.Generator().manual_seed(11)
    pairs = []
    for _ in range(3):
        a, gg = torch.randn(4, 4, generator=g, dtype=torch.float64), torch.randn(3, 3, generator=g, dtype=torch.float64)
        pairs.append((a @ a.t(), gg @ gg.t()))
    a, gg = nearest_kronecker(pairs)
    r = sum(torch.outer(x.reshape(-1), y.reshape(-1)) for x, y in pairs)
    u, s, vh = torch.linalg.svd(r)
    torch.testing.assert_close(torch.outer(a.reshape(-1), gg.reshape(-1)), s[0] * torch.outer(u[:, 0], vh[0]),
                               rtol=1e-10, atol=1e-12)
    assert bool((torch.linalg.eigvalsh(a) > -1e-12).all()) and bool((torch.linalg.eigvalsh(gg) > -1e-12).all())


# ----------------------------------------------------------------------------- the plugin
def _plugin_run(importance="kfac", mode="separate", n_experiences=2, model=None, dtype=torch.float32, **kw):
    from avalanche.training.supervised import Naive

    from avalanche_pcreg import ParameterChangePlugin
    from helpers import mlp, tiny_nc

    bench = tiny_nc(n_experiences=n_experiences)
    model = (model or mlp()).to(dtype)
    plugin = ParameterChangePlugin(factor=3.0, importance=importance, mode=mode, warn_frozen=False, **kw)
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                     criterion=nn.CrossEntropyLoss(), train_mb_size=32, train_epochs=1, plugins=[plugin],
                     evaluator=None)
    return bench, model, plugin, strategy


def test_plugin_penalty_after_one_experience_is_the_curvlinops_quadratic_form():
    """The contract: after one experience, plugin.penalty(model) at W* + Δ equals
    factor · Σ ⟨Δ, G Δ A⟩ with curvlinops' type-2 factors (mean reduction), to 1e-6 relative."""
    from avalanche.benchmarks import nc_benchmark

    from helpers import make_tensor_classification_dataset, tensor_data

    x, y = tensor_data()
    train = make_tensor_classification_dataset(x.double(), y)
    bench = nc_benchmark(train, train, n_experiences=2, task_labels=False, seed=0, shuffle=False)
    _, model, plugin, strategy = _plugin_run(dtype=torch.float64)
    exp = bench.train_stream[0]
    strategy.train(exp)
    anchor = [p.detach().clone() for p in model.parameters()]
    g = torch.Generator().manual_seed(0)
    delta = [0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64) for p in model.parameters()]
    with torch.no_grad():
        for p, a, d in zip(model.parameters(), anchor, delta):
            p.copy_(a + d)
    got = plugin.penalty(model).item()
    with torch.no_grad():
        for p, a in zip(model.parameters(), anchor):
            p.copy_(a)
    ds = exp.dataset
    data = [(torch.stack([ds[i][0] for i in range(len(ds))]), torch.tensor([int(ds[i][1]) for i in range(len(ds))]))]
    assert data[0][0].dtype == torch.float64 and len(ds) == 120
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        oracle = KFACLinearOperator(model, nn.CrossEntropyLoss(reduction="mean"), list(model.parameters()), data,
                                    fisher_type="type-2", separate_weight_and_bias=False, check_deterministic=False)
    kd = oracle @ delta
    want = 3.0 * sum(float((d * k).sum()) for d, k in zip(delta, kd))
    assert got == pytest.approx(want, rel=1e-6) and want > 0


@pytest.mark.parametrize("mode,merge", [("separate", None), ("online", "exact"), ("online", None)])
def test_plugin_trains_with_kfac_and_checkpoints(mode, merge, tmp_path):
    from avalanche_pcreg import ParameterChangePlugin

    bench, model, plugin, strategy = _plugin_run(mode=mode, n_experiences=3, kfac_merge=merge)
    for exp in bench.train_stream[:2]:
        strategy.train(exp)
    layers = plugin.state.kron.layers
    assert sorted(layers) == ["0.weight", "2.weight", "4.weight"] and not plugin.importances
    assert len(layers["0.weight"].pairs) == (1 if mode == "online" and merge is None else 2)  # online: nearest
    assert plugin.history[-1]["state_bytes"] == plugin.state.nbytes() > 0
    torch.save(plugin.state_dict(), tmp_path / "p.pt")
    fresh = ParameterChangePlugin(factor=3.0, importance="kfac", mode=mode, kfac_merge=merge)
    fresh.load_state_dict(torch.load(tmp_path / "p.pt", weights_only=False))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05)
    assert fresh.penalty(model).item() == plugin.penalty(model).item() > 0
    strategy.train(bench.train_stream[2])  # the penalty is in the loss of every step: it trains on


def test_plugin_kfac_with_a_growing_head_and_norm_layers():
    from avalanche.models import IncrementalClassifier

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(12, 16), nn.LayerNorm(16), nn.ReLU())
            self.head = IncrementalClassifier(16, initial_out_features=2)

        def forward(self, x):
            return self.head(self.body(x))

    bench, model, plugin, strategy = _plugin_run(model=Net(), n_experiences=3)
    for exp in bench.train_stream:
        strategy.train(exp)
    assert sorted(plugin.state.kron.layers) == ["body.0.weight", "head.classifier.weight"]
    assert sorted(plugin.importances) == ["body.1.bias", "body.1.weight"]  # the diagonal, same pass
    assert plugin.state.kron.layers["head.classifier.weight"].mu.shape == (6, 17)


def test_plugin_kfac_merge_is_checked():
    from avalanche_pcreg import ParameterChangePlugin

    with pytest.raises(ValueError, match="unknown kfac_merge 'sum'; expected one of 'exact', 'nearest'"):
        ParameterChangePlugin(factor=1.0, importance="kfac", kfac_merge="sum")


def test_a_layer_that_sees_no_input_has_a_zero_block():
    """A head of another task (not called on this data): no curvature, and no NaN from 0 / 0."""

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3), nn.Linear(5, 3)

        def forward(self, x):
            return self.a(torch.tanh(self.body(x)))

    model = TwoHeads()
    imp = compute_importance(model, TensorDataset(torch.randn(8, 4), torch.randint(0, 3, (8,))), "kfac", batch_size=4)
    assert torch.equal(imp.blocks["b.weight"].A, torch.zeros(6, 6)) and torch.equal(imp.blocks["b.weight"].G, torch.zeros(3, 3))
    assert float(imp.blocks["a.weight"].A[-1, -1]) == 1.0  # the bias column's mean of 1 * 1


@pytest.mark.parametrize("pairs", [1, 3])
def test_a_step_costs_two_matrix_products_a_pair_and_no_more(pairs):
    """The penalty's forward and backward together: 2 products per kept pair, none in the backward."""
    g = torch.Generator().manual_seed(12)
    w = torch.randn(5, 4, generator=g, requires_grad=True)
    b = torch.randn(5, generator=g, requires_grad=True)
    state = KronState("separate")
    for t in range(pairs):
        a_, g_ = torch.randn(5, 5, generator=g), torch.randn(5, 5, generator=g)
        imp = KroneckerImportance({"w": _block(a_ @ a_.t(), g_ @ g_.t())}, {})
        state = state.merged(imp, {"w": w + 0.1 * t, "b": b})
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        state.penalty({"w": w, "b": b}, 2.0).backward()
    products = [e.name for e in prof.events() if e.name in ("aten::mm", "aten::bmm", "aten::addmm", "aten::matmul")]
    assert products.count("aten::mm") == 2 * pairs and len([p for p in products if p != "aten::matmul"]) == 2 * pairs


def test_tied_weights_keep_the_diagonal_and_the_other_layers_their_blocks():
    """An output layer tied to the embedding: a weight of two modules has no Kronecker block; it
    gets the exact diagonal (the whole-model path), the other layers their blocks."""

    class TiedLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(7, 5)
            self.mid = nn.Linear(5, 5)
            self.out = nn.Linear(5, 7, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, x):
            return self.out(torch.tanh(self.mid(self.emb(x).mean(1))))

    torch.manual_seed(13)
    model = TiedLM().double()
    x, y = torch.randint(0, 7, (9, 3)), torch.randint(0, 7, (9,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tied weight's fallback is announced
        imp = compute_importance(model, TensorDataset(x, y), "kfac", batch_size=4)
        diag = compute_importance(model, TensorDataset(x, y), "expected_fisher", batch_size=4)
    assert list(imp.blocks) == ["mid.weight"] and sorted(imp.diagonal) == ["emb.weight"]
    torch.testing.assert_close(imp.diagonal["emb.weight"], diag["emb.weight"], rtol=1e-10, atol=1e-14)


def test_bf16_model_keeps_float32_factors_and_trains():
    from avalanche.benchmarks import nc_benchmark

    from helpers import make_tensor_classification_dataset, tensor_data

    x, y = tensor_data()
    train = make_tensor_classification_dataset(x.to(torch.bfloat16), y)
    bench = nc_benchmark(train, train, n_experiences=2, task_labels=False, seed=0, shuffle=False)
    _, model, plugin, strategy = _plugin_run(dtype=torch.bfloat16)
    for exp in bench.train_stream:
        strategy.train(exp)
    layer = plugin.state.kron.layers["0.weight"]
    assert all(a.dtype == torch.float32 and g.dtype == torch.float32 for a, g in layer.pairs)
    assert layer.mu.dtype == torch.float32
    value = plugin.penalty(model)
    (grad,) = torch.autograd.grad(value, [model[0].weight])
    assert value.dtype == torch.bfloat16 and grad.dtype == torch.bfloat16 and torch.isfinite(value)


# ----------------------------------------------------------------------------- SGD stability
def test_curvatures_bound_the_top_eigenvalue_of_the_kronecker_sum():
    """One pair: λ(G)·λ(A) (eigvalsh in float64); several: at most the top eigenvalue of the dense
    Σ G_t ⊗ A_t and at least each pair's own product."""
    g = torch.Generator().manual_seed(12)

    def spd(k):
        m = torch.randn(k, k, generator=g, dtype=torch.float64)
        return m @ m.t() / k + 0.05 * torch.eye(k, dtype=torch.float64)

    w = torch.zeros(3, 4, dtype=torch.float64)
    b = torch.zeros(3, dtype=torch.float64)
    pairs = [(spd(5), spd(3)), (spd(5), spd(3))]
    state = KronState("separate", merge="exact")
    for a, gg in pairs[:1]:
        state = state.merged(KroneckerImportance({"w": _block(a, gg)}, {}), {"w": w, "b": b})
    top = torch.linalg.eigvalsh(pairs[0][1])[-1] * torch.linalg.eigvalsh(pairs[0][0])[-1]
    curv = state.curvatures()
    assert set(curv) == {"w", "b"} and curv["w"] == pytest.approx(top.item(), rel=1e-6) and curv["w"] <= top * (1 + 1e-12)
    state = state.merged(KroneckerImportance({"w": _block(*pairs[1])}, {}), {"w": w, "b": b})
    dense = sum(torch.kron(gg, a) for a, gg in pairs)
    true = torch.linalg.eigvalsh(dense)[-1].item()
    each = [(torch.linalg.eigvalsh(gg)[-1] * torch.linalg.eigvalsh(a)[-1]).item() for a, gg in pairs]
    assert max(each) * 0.99 <= state.curvatures()["w"] <= true * (1 + 1e-12)  # power iterations: from below
    scaled = state.scaled({"w": 0.25})  # the whole quadratic, the linear and constant terms too
    with torch.no_grad():
        w.copy_(torch.randn(3, 4, generator=g, dtype=torch.float64))
    assert scaled.penalty({"w": w, "b": b}, 1.0).item() == pytest.approx(
        0.25 * state.penalty({"w": w, "b": b}, 1.0).item(), rel=1e-12)
    assert torch.equal(state.layers["w"].pairs[0][1], pairs[0][1])  # the stored state is left as it is


def _sgd_kfac_run(factor, **kw):
    from avalanche_pcreg import ParameterChangePlugin
    from helpers import mlp, run_naive, tiny_nc
    plugin = ParameterChangePlugin(factor=factor, importance="kfac", mode="online", decay=0.5, warn_frozen=False,
                                   **kw)
    return plugin, run_naive(tiny_nc(3), mlp(), [plugin], momentum=0.9, epochs=3, lr=0.05)


def test_sgd_stability_check_reads_the_kronecker_blocks():
    """With plain SGD the largest curvature of a Kronecker block counts as max(A): a factor above
    the limit is named (without the guard the run stops at its first non-finite penalty), the
    guard scales the block down and the run stays finite, and a factor below the limit says
    nothing."""
    with pytest.warns(RuntimeWarning, match=r"max\(A\) is the top eigenvalue of the Kronecker block of") as rec, \
            pytest.raises(FloatingPointError, match="not finite"):
        _sgd_kfac_run(1e4)
    msg = next(str(w.message) for w in rec if "unstable" in str(w.message))
    assert "Use factor <" in msg
    with pytest.warns(RuntimeWarning, match=r"Kronecker block scaled down to that curvature"):
        plugin, (_, losses) = _sgd_kfac_run(1e4, stability_guard=True)
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.losses)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        _sgd_kfac_run(1e-3)


def test_curvatures_are_kept_until_a_layer_changes(monkeypatch):
    from avalanche_pcreg import kron_state
    calls = []
    real = kron_state.top_eigenvalue
    monkeypatch.setattr(kron_state, "top_eigenvalue", lambda m, iters=50: calls.append(1) or real(m, iters))
    eye = torch.eye(3, dtype=torch.float64)
    w, b = torch.zeros(2, 2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    state = KronState("online", 0.5, "nearest").merged(
        KroneckerImportance({"w": _block(2 * eye, torch.eye(2, dtype=torch.float64))}, {}), {"w": w, "b": b})
    assert state.curvatures()["w"] == pytest.approx(2.0) and len(calls) == 2
    assert state.curvatures()["b"] == pytest.approx(2.0) and len(calls) == 2  # kept
    grown = state.merged(KroneckerImportance({"w": _block(4 * eye, torch.eye(2, dtype=torch.float64))}, {}),
                         {"w": w, "b": b})
    assert grown.curvatures()["w"] == pytest.approx(0.5 * 2 + 4) and len(calls) == 4  # a new layer: again
