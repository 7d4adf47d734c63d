"""Layers that couple the samples of a batch, and the errors of models torch.func cannot run.

The per-sample truth is the gradient of sample n's loss with the model evaluated on sample n
alone (what a training step on a batch of one would take). References: float64 loops over the
samples, one at a time, ``torch.autograd.grad``, squared and averaged. Where no per-sample value
exists (BatchNorm with batch statistics on ``[N, C]``) the importances are taken within the batch
and a warning names the module. The parity estimators take gradients as Avalanche does
(``loss.backward()``), so they run through reentrant activation checkpointing.
"""

import copy
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from torch import nn
from torch.utils.data import TensorDataset

from avalanche_pcreg import ParameterChangePlugin, compute_importance
from avalanche_pcreg.importance.persample import PerSampleGradNorms
from helpers import run_naive, tiny_nc

F64 = torch.float64
TOL = dict(rtol=1e-9, atol=1e-12)
# torch's notice that vmap runs nn.EmbeddingBag one sample at a time (no batching rule)
NO_BATCHING_RULE = "ignore:There is a performance drop"


def _randomize(m):
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p))
    return m


def alone(model, x, y, names=None):
    """Mean over samples of the squared gradient of each sample's cross-entropy with the model
    evaluated on that sample alone (a batch of one)."""
    params = dict(model.named_parameters())
    names = names or list(params)
    ref = {n: torch.zeros_like(params[n]) for n in names}
    for i in range(x.shape[0]):
        loss = F.cross_entropy(model(x[i:i + 1]), y[i:i + 1])
        for n, g in zip(names, torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)):
            if g is not None:
                ref[n] += (g.to_dense() if g.is_sparse else g) ** 2
    return {n: r / x.shape[0] for n, r in ref.items()}


def within_batch(model, x, y, names=None):
    """The same with every sample's loss taken on the whole batch's forward."""
    params = dict(model.named_parameters())
    names = names or list(params)
    ref = {n: torch.zeros_like(params[n]) for n in names}
    losses = F.cross_entropy(model(x), y, reduction="none")
    for i in range(x.shape[0]):
        gs = torch.autograd.grad(losses[i], [params[n] for n in names], retain_graph=True, allow_unused=True)
        for n, g in zip(names, gs):
            if g is not None:
                ref[n] += g ** 2
    return {n: r / x.shape[0] for n, r in ref.items()}


def importances(model, x, y, batch_size, **kw):
    return compute_importance(model, TensorDataset(x, y), "empirical_fisher", batch_size=batch_size, **kw)


def assert_close(got, ref, names=None):
    for n in names or ref:
        assert ref[n].abs().sum() > 0, n
        torch.testing.assert_close(got[n], ref[n], **TOL, msg=lambda m: f"{n}: {m}")


def coupling_warnings(record):
    return [str(w.message) for w in record if "couples the samples" in str(w.message)
            or "depend on the batch" in str(w.message)]


# ----------------------------------------------------------------------------- scale_grad_by_freq
class EmbMean(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.emb = nn.Embedding(7, 4, **kw)
        self.head = nn.Linear(4, 3)

    def forward(self, idx):
        return self.head(torch.tanh(self.emb(idx)).mean(1))


@pytest.mark.parametrize("padding_idx", [None, 2])
def test_embedding_scale_grad_by_freq_is_per_sample(padding_idx):
    torch.manual_seed(0)
    model = EmbMean(scale_grad_by_freq=True, padding_idx=padding_idx).double().eval()
    x = torch.randint(0, 7, (10, 6))
    y = torch.randint(0, 3, (10,))
    ref = alone(model, x, y)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        small = importances(model, x, y, batch_size=3)
        large = importances(model, x, y, batch_size=10)
    assert not [w for w in rec if issubclass(w.category, RuntimeWarning)]
    assert_close(small, ref)
    assert_close(large, ref)
    # the batch-frequency gradient (what a batch's backward gives) is far from it
    batch = within_batch(model, x, y, ["emb.weight"])["emb.weight"]
    assert (batch.sum() / ref["emb.weight"].sum()) < 0.5


class Bag(nn.Module):
    """nn.EmbeddingBag over [N, L] indices, as a 2-D input or flattened with offsets."""

    def __init__(self, flat=False, **kw):
        super().__init__()
        self.bag = nn.EmbeddingBag(7, 4, **kw)
        self.head = nn.Linear(4, 3)
        self.flat = flat

    def forward(self, idx):
        if self.flat:
            offsets = torch.arange(0, idx.numel(), idx.shape[1])
            return self.head(torch.tanh(self.bag(idx.reshape(-1), offsets)))
        return self.head(torch.tanh(self.bag(idx)))


@pytest.mark.filterwarnings(NO_BATCHING_RULE)
@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("flat,padding_idx", [(False, None), (False, 3), (True, None)])
def test_embedding_bag_scale_grad_by_freq_is_per_sample(mode, flat, padding_idx):
    torch.manual_seed(1)
    model = Bag(flat, mode=mode, scale_grad_by_freq=True, padding_idx=padding_idx).double().eval()
    x = torch.randint(0, 7, (8, 5))
    y = torch.randint(0, 3, (8,))
    ref = alone(model, x, y)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        got = importances(model, x, y, batch_size=8)
    assert not coupling_warnings(rec)
    assert_close(got, ref)
    batch = within_batch(model, x, y, ["bag.weight"])["bag.weight"]
    assert (batch.sum() / ref["bag.weight"].sum()) < 0.5


class WeightedBag(nn.Module):
    """Flat indices with offsets (include_last_offset or not) and per-sample weights that
    depend on parameters."""

    def __init__(self, include_last_offset):
        super().__init__()
        self.bag = nn.EmbeddingBag(7, 4, mode="sum", scale_grad_by_freq=True, include_last_offset=include_last_offset)
        self.weigh = nn.Linear(1, 1)
        self.head = nn.Linear(4, 3)

    def forward(self, idx):
        psw = torch.sigmoid(self.weigh(idx.reshape(-1, 1).to(self.weigh.weight.dtype))).reshape(-1)
        end = idx.numel() + (idx.shape[1] if self.bag.include_last_offset else 0)
        offsets = torch.arange(0, end, idx.shape[1])
        return self.head(torch.tanh(self.bag(idx.reshape(-1), offsets, per_sample_weights=psw)))


@pytest.mark.filterwarnings(NO_BATCHING_RULE)
@pytest.mark.parametrize("include_last_offset", [False, True])
def test_embedding_bag_with_per_sample_weights_is_per_sample(include_last_offset):
    torch.manual_seed(14)
    model = WeightedBag(include_last_offset).double().eval()
    x, y = torch.randint(0, 7, (6, 5)), torch.randint(0, 3, (6,))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        got = importances(model, x, y, batch_size=3)
    assert_close(got, alone(model, x, y))


COUPLED_MODELS = {
    "embedding": (lambda: EmbMean(scale_grad_by_freq=True), lambda: torch.randint(0, 7, (8, 5))),
    "embedding-bag": (lambda: Bag(mode="mean", scale_grad_by_freq=True), lambda: torch.randint(0, 7, (8, 5))),
    "batchnorm": (lambda: ConvNormNet(_randomize(nn.BatchNorm2d(3, track_running_stats=False))),
                  lambda: torch.randn(8, 2, 4, 4, dtype=F64)),
}


@pytest.mark.filterwarnings(NO_BATCHING_RULE)
@pytest.mark.parametrize("method", ["expected_fisher", "fisher", "mas"])
@pytest.mark.parametrize("case", list(COUPLED_MODELS))
def test_other_estimators_do_not_depend_on_the_batch_size(case, method):
    """A batch of one is the per-sample definition itself: every estimator gives the same
    importances with batches of 8."""
    make_model, make_x = COUPLED_MODELS[case]
    torch.manual_seed(15)
    model = make_model().double().eval()
    x, y = make_x(), torch.randint(0, 3, (8,))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        one = compute_importance(model, TensorDataset(x, y), method, batch_size=1)
        eight = compute_importance(model, TensorDataset(x, y), method, batch_size=8)
    assert_close(eight, one)


class TiedLM(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.emb = nn.Embedding(9, 5, **kw)
        self.hidden = nn.Linear(5, 5)

    def forward(self, idx):
        h = torch.tanh(self.hidden(self.emb(idx))).mean(1)
        return F.linear(h, self.emb.weight)


def test_tied_embedding_with_scale_grad_by_freq_warns_batch_dependence():
    """A tied weight needs the whole-model fallback, whose gradient counts frequencies over the
    batch: the warning names the parameter and the module, and never calls the value exact."""
    torch.manual_seed(2)
    model = TiedLM(scale_grad_by_freq=True).double().eval()
    x, y = torch.randint(0, 9, (6, 4)), torch.randint(0, 9, (6,))
    with pytest.warns(RuntimeWarning, match=r"parameter 'emb\.weight' of module 'emb' \(Embedding\).*"
                                             r"frequencies of its rows over the whole batch") as rec:
        got = importances(model, x, y, batch_size=6)
    assert not any("exact" in str(w.message) for w in rec)
    # what it computes: the per-sample gradients within the batch
    assert_close(got, within_batch(model, x, y))


class BagsPerSample(nn.Module):
    """Two bags per sample: bags are not samples."""

    def __init__(self):
        super().__init__()
        self.bag = nn.EmbeddingBag(7, 4, mode="sum", scale_grad_by_freq=True)
        self.head = nn.Linear(8, 3)

    def forward(self, idx):  # [N, 2, L]
        return self.head(torch.tanh(self.bag(idx.flatten(0, 1))).reshape(idx.shape[0], 8))


@pytest.mark.filterwarnings(NO_BATCHING_RULE)
def test_embedding_bag_with_bags_that_are_not_samples_warns():
    torch.manual_seed(3)
    model = BagsPerSample().double().eval()
    x, y = torch.randint(0, 7, (5, 2, 3)), torch.randint(0, 3, (5,))
    with pytest.warns(RuntimeWarning, match=r"module 'bag' \(EmbeddingBag\) couples the samples.*10 bags are not "
                                             r"the 5 samples.*depend on the batch size"):
        got = importances(model, x, y, batch_size=5)
    assert_close(got, within_batch(model, x, y))


# ----------------------------------------------------------------------------- batch statistics
class ConvNormNet(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1, bias=False)  # a bias before a norm has no gradient
        self.norm = norm
        self.fc = nn.Linear(3 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.norm(self.conv(x))).flatten(1))


class SeqNormNet(nn.Module):
    """BatchNorm1d on [N, C, L]."""

    def __init__(self, norm):
        super().__init__()
        self.inp = nn.Conv1d(2, 3, 3, padding=1, bias=False)
        self.norm = norm
        self.fc = nn.Linear(3 * 5, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.norm(self.inp(x))).flatten(1))


BATCH_STAT_CASES = {
    "bn2d-no-running-stats-eval": (ConvNormNet, lambda: nn.BatchNorm2d(3, track_running_stats=False), False, (2, 4, 4)),
    "bn2d-train-mode": (ConvNormNet, lambda: nn.BatchNorm2d(3, track_running_stats=False), True, (2, 4, 4)),
    "bn1d-on-sequences": (SeqNormNet, lambda: nn.BatchNorm1d(3, track_running_stats=False), False, (2, 5)),
}


@pytest.mark.parametrize("case", list(BATCH_STAT_CASES))
def test_batchnorm_with_batch_statistics_is_evaluated_per_sample(case):
    net, make_norm, train, shape = BATCH_STAT_CASES[case]
    torch.manual_seed(4)
    model = net(_randomize(make_norm())).double().eval()
    x, y = torch.randn(9, *shape, dtype=F64), torch.randint(0, 3, (9,))
    ref = alone(model.train(train), x, y)
    names = list(ref)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        with PerSampleGradNorms(model.train(train), names, chunk_size=4) as acc:
            for s in range(0, 9, 4):  # batches of 4, 4, 1
                xb, yb = x[s:s + 4], y[s:s + 4]
                acc.backward(F.cross_entropy(model(xb), yb, reduction="none"),
                             fallback=lambda p, xb=xb, yb=yb: F.cross_entropy(
                                 torch.func.functional_call(model, p, (xb,)), yb, reduction="none"))
            assert acc.model_fallback_names == []
    assert not [w for w in rec if issubclass(w.category, RuntimeWarning)]
    assert_close({n: s / 9 for n, s in acc.sums.items()}, ref)
    # within a batch, the per-sample gradients of every layer are other numbers
    batch = within_batch(model.train(train), x, y)
    assert max(float((batch[n] - ref[n]).abs().max() / ref[n].abs().max()) for n in names) > 0.05
    # and through compute_importance (eval mode: batch statistics only without running ones)
    if not train:
        assert_close(importances(model, x, y, batch_size=4), ref)


@pytest.mark.parametrize("track", [False, True])
def test_instance_norm_is_per_sample_without_warning(track):
    torch.manual_seed(5)
    norm = _randomize(nn.InstanceNorm2d(3, affine=True, track_running_stats=track))
    if track:
        with torch.no_grad():
            norm.running_mean.copy_(torch.randn(3))
            norm.running_var.copy_(torch.rand(3) + 0.5)
    model = ConvNormNet(norm).double().eval()
    x, y = torch.randn(7, 2, 4, 4, dtype=F64), torch.randint(0, 3, (7,))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        got = importances(model, x, y, batch_size=3)
    assert_close(got, alone(model, x, y))


class FlatBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.bn = _randomize(nn.BatchNorm1d(4, track_running_stats=False))
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.bn(self.inp(x))))


def test_batchnorm_on_flat_features_warns_that_importances_depend_on_the_batch():
    """[N, C] with batch statistics: one sample alone cannot be normalised, so there is no
    per-sample value. Every parameter's per-sample gradient is taken within the batch (the
    whole-model fallback), and the warning names the module and says so."""
    torch.manual_seed(6)
    model = FlatBN().double().eval()
    x, y = torch.randn(6, 3, dtype=F64), torch.randint(0, 3, (6,))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        alone(model, x, y)  # no per-sample truth exists
    names = [n for n, _ in model.named_parameters()]
    with pytest.warns(RuntimeWarning, match=r"module 'bn' \(BatchNorm1d\) couples the samples of a batch: it "
                                             r"normalises with the statistics of the whole batch "
                                             r"\(track_running_stats=False\).*depend on the batch size \(6\)") as rec:
        with PerSampleGradNorms(model, names) as acc:
            acc.backward(F.cross_entropy(model(x), y, reduction="none"),
                         fallback=lambda p: F.cross_entropy(torch.func.functional_call(model, p, (x,)), y,
                                                            reduction="none"))
            assert acc.model_fallback_names == names  # every layer, not only the BatchNorm
    assert not any("exact" in str(w.message) for w in rec)
    assert_close({n: s / 6 for n, s in acc.sums.items()}, within_batch(model, x, y))


# ----------------------------------------------------------------------------- sparse gradients
def test_sparse_embedding_is_exact_through_its_rule():
    torch.manual_seed(7)
    model = EmbMean(sparse=True).double().eval()
    x, y = torch.randint(0, 7, (8, 5)), torch.randint(0, 3, (8,))
    assert_close(importances(model, x, y, batch_size=3), alone(model, x, y))


def test_sparse_embedding_in_the_whole_model_fallback_is_a_clear_error():
    torch.manual_seed(8)
    model = TiedLM(sparse=True).double().eval()
    x, y = torch.randint(0, 9, (6, 4)), torch.randint(0, 9, (6,))
    with pytest.raises(RuntimeError, match=r"parameter 'emb\.weight' of module 'emb' \(Embedding\) needs per-sample "
                                           r"gradients of the whole model by torch\.func.*sparse=False"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the tied weight's own fallback notice
            importances(model, x, y, batch_size=6)


# ----------------------------------------------------------------------------- torch.func failures
class PackedLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(3, 4, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        lengths = torch.full((x.shape[0],), x.shape[1])
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        _, (h, _) = self.lstm(packed)
        return self.head(h[-1])


def test_packed_sequence_is_a_clear_error_naming_the_module():
    torch.manual_seed(9)
    model = PackedLSTM()
    x, y = torch.randn(6, 5, 3), torch.randint(0, 3, (6,))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no raw per-layer failure notice first
        with pytest.raises(RuntimeError, match=r"\['lstm\.weight_ih_l0', .*\] of module 'lstm' \(LSTM\) need "
                                               r"per-sample gradients by torch\.func.*called with a PackedSequence.*"
                                               r"padded tensor"):
            importances(model, x, y, batch_size=3)
    # Avalanche's estimator needs no per-sample gradients
    assert compute_importance(model, TensorDataset(x, y), "minibatch_fisher", batch_size=3)["lstm.weight_ih_l0"].sum() > 0


class Square(torch.autograd.Function):
    """A custom Function in the old style (no setup_context): torch.func cannot transform it."""

    @staticmethod
    def forward(ctx, a):
        ctx.save_for_backward(a)
        return a * a

    @staticmethod
    def backward(ctx, g):
        (a,) = ctx.saved_tensors
        return 2 * a * g


class SquareAct(nn.Module):
    def forward(self, x):
        return Square.apply(x)


class NeedsWholeModel(nn.Module):
    """``scale`` is owned by the root module, so it always needs the whole-model fallback."""

    def __init__(self, block):
        super().__init__()
        self.inp = nn.Linear(4, 5)
        self.block = block
        self.scale = nn.Parameter(torch.ones(5))
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(self.block(self.inp(x)) * self.scale)


class Checkpointed(nn.Module):
    def __init__(self, reentrant):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 5), nn.Tanh())
        self.reentrant = reentrant

    def forward(self, x):
        return cp.checkpoint(self.body, x, use_reentrant=self.reentrant)


def test_custom_autograd_function_in_the_fallback_is_a_clear_error():
    torch.manual_seed(10)
    model = NeedsWholeModel(SquareAct())
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    with pytest.raises(RuntimeError, match=r"\['scale'\] need per-sample gradients of the whole model by torch\.func "
                                           r".*failed in module 'block' \(SquareAct\).*custom torch\.autograd\.Function "
                                           r"'Square'.*setup_context"):
        importances(model, x, y, batch_size=3)


def test_activation_checkpointing_in_the_fallback_is_a_clear_error():
    torch.manual_seed(11)
    model = NeedsWholeModel(Checkpointed(reentrant=False))
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    with pytest.raises(RuntimeError, match=r"\['scale'\] need per-sample gradients of the whole model by torch\.func"
                                           r".*module 'block' \(Checkpointed\) uses saved-tensor hooks -- activation "
                                           r"checkpointing.*turn activation checkpointing off"):
        importances(model, x, y, batch_size=3)
    # without a parameter that needs torch.func, non-reentrant checkpointing works and is exact
    plain = nn.Sequential(nn.Linear(4, 5), Checkpointed(reentrant=False), nn.Linear(5, 3)).double()
    xd = x.double()
    assert_close(importances(plain, xd, y, batch_size=3), alone(plain, xd, y))


@pytest.mark.parametrize("method", ["empirical_fisher", "expected_fisher", "fisher", "mas"])
def test_reentrant_checkpointing_in_per_sample_estimators_asks_for_use_reentrant_false(method):
    torch.manual_seed(12)
    model = nn.Sequential(nn.Linear(4, 5), Checkpointed(reentrant=True), nn.Linear(5, 3))
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    with pytest.raises(RuntimeError, match=r"reentrant activation checkpointing around module '1\.body' "
                                           r"\(Sequential\).*use_reentrant=False"):
        compute_importance(model, TensorDataset(x, y), method, batch_size=3)


# ----------------------------------------------------------------------------- gradient mode
def test_no_grad_is_lifted_and_inference_mode_is_a_clear_error():
    torch.manual_seed(13)
    model = EmbMean().double()
    x, y = torch.randint(0, 7, (6, 5)), torch.randint(0, 3, (6,))
    ref = importances(model, x, y, batch_size=3)
    for method in ("empirical_fisher", "minibatch_fisher"):
        with torch.no_grad():
            got = compute_importance(model, TensorDataset(x, y), method, batch_size=3)
        if method == "empirical_fisher":
            assert_close(got, ref)
        assert all(v.sum() > 0 for v in got.values())
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match=r"compute_importance cannot run under torch\.inference_mode\(\)"):
            importances(model, x, y, batch_size=3)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_engine_names_a_forward_without_gradients(mode):
    model = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    with PerSampleGradNorms(model, ["weight"]) as acc:
        with (torch.no_grad() if mode == "no_grad" else torch.inference_mode()):
            losses = model(x).sum(1)
        with pytest.raises(RuntimeError, match=re.escape(f"the model's forward ran under torch.{mode}()")):
            acc.backward(losses)


def test_parity_estimator_names_a_forward_without_gradients():
    from avalanche_pcreg.importance.minibatch import minibatch_fisher

    model = nn.Linear(3, 2)
    data = torch.utils.data.DataLoader(TensorDataset(torch.randn(4, 3), torch.randint(0, 2, (4,))), batch_size=2)
    with torch.no_grad():
        with pytest.raises(RuntimeError, match=r"estimator 'minibatch_fisher' needs gradients.*torch\.no_grad\(\)"):
            minibatch_fisher(model, data, names=["weight"])


# ----------------------------------------------------------------------------- parity through checkpointing
def checkpointed_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 16), Checkpointed16(), nn.Linear(16, 6))


class Checkpointed16(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.ReLU(), nn.Linear(16, 16), nn.ReLU())

    def forward(self, x):
        return cp.checkpoint(self.body, x, use_reentrant=True)


def test_parity_estimators_through_reentrant_checkpointing_equal_avalanche():
    from avalanche.training.plugins import EWCPlugin, MASPlugin
    from types import SimpleNamespace

    bench = tiny_nc(3)
    dataset = bench.train_stream[0].dataset
    model = checkpointed_mlp()
    twin = copy.deepcopy(model)
    # existing .grad is kept
    model(torch.randn(2, 12)).sum().backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    ours = compute_importance(model, dataset, "minibatch_fisher", batch_size=32)
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, before[n])
    theirs = EWCPlugin(ewc_lambda=1.0).compute_importances(
        twin, nn.CrossEntropyLoss(), torch.optim.SGD(twin.parameters(), lr=0.1), dataset, "cpu", 32)
    assert set(ours) == set(theirs)
    for n in ours:
        assert torch.equal(ours[n], theirs[n].data), n
        assert ours[n].sum() > 0, n

    model.train()
    ours = compute_importance(model, dataset, "avalanche_mas", batch_size=32)
    twin = copy.deepcopy(model)
    strategy = SimpleNamespace(model=twin, experience=bench.train_stream[0], train_mb_size=32,
                               optimizer=torch.optim.SGD(twin.parameters(), lr=0.1), device="cpu")
    theirs = MASPlugin()._get_importance(strategy)
    for n in ours:
        assert torch.equal(ours[n], theirs[n].data), n
        assert ours[n].sum() > 0, n


def test_parity_run_with_ewc_plugin_on_a_reentrant_checkpointed_model():
    from avalanche.training.plugins import EWCPlugin

    bench = tiny_nc(3)
    m1, m2 = checkpointed_mlp(), checkpointed_mlp()
    _, rec_a = run_naive(bench, m1, [EWCPlugin(ewc_lambda=20.0)])
    _, rec_o = run_naive(bench, m2, [ParameterChangePlugin(20.0, "minibatch_fisher", batch_size=32)])
    la, lo = torch.tensor(rec_a.losses, dtype=F64), torch.tensor(rec_o.losses, dtype=F64)
    assert len(la) == len(lo) > 0
    assert ((la - lo).abs() / la.abs()).max().item() <= 2e-6  # as tests/test_parity.py
    for (n, p1), (_, p2) in zip(m1.named_parameters(), m2.named_parameters()):
        assert (p1 - p2).abs().max().item() <= 1e-6, n
