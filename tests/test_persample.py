"""PerSampleGradNorms against a brute-force per-sample loop (float64)."""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from avalanche_pcreg.importance.persample import (PerSampleGradNorms, Policy, PowerSum, Request, default_policy,
                                                  using_policy)

TOL = dict(rtol=1e-10, atol=1e-10)
POWERS = pytest.mark.parametrize("power", [1, 2])


def per_sample_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A loss whose output-gradient differs per sample (nonlinear in the output)."""
    out = out.flatten(1)
    c = y.shape[-1]
    return F.cross_entropy(out[:, :c], y.argmax(-1), reduction="none") + 0.3 * out.tanh().pow(2).sum(1)


def loss_fn_for(model, x, y):
    def losses(params=None):
        out = model(x) if params is None else functional_call(model, params, (x,))
        return per_sample_loss(out, y)
    return losses


def brute(model, names, losses_fn, power, weights=(None,)):
    params = dict(model.named_parameters())
    ref = {n: torch.zeros_like(params[n]) for n in names}
    for w in weights:
        losses = losses_fn()
        if w is not None:
            losses = losses * w
        for i in range(losses.shape[0]):
            gs = torch.autograd.grad(losses[i], [params[n] for n in names], retain_graph=True,
                                     allow_unused=True)
            for n, g in zip(names, gs):
                if g is not None:
                    ref[n] += g.abs() if power == 1 else g * g
    return ref


def fast(model, names, losses_fn, power, chunk_size=3, with_fallback=False, weights=(None,)):
    with PerSampleGradNorms(model, names, power=power, chunk_size=chunk_size) as acc:
        losses = losses_fn()
        for k, w in enumerate(weights):
            lw = losses if w is None else losses * w
            fb = None
            if with_fallback:
                fb = (lambda params, w=w: losses_fn(params) if w is None else losses_fn(params) * w)
            acc.backward(lw, retain_graph=k < len(weights) - 1, fallback=fb)
        fallback_names = acc.fallback_names
    return acc.sums, fallback_names


def check(model, x, n_out, power, names=None, chunk_size=3, with_fallback=False, expect_fb=()):
    torch.manual_seed(123)
    model = model.double().eval()
    y = F.one_hot(torch.randint(0, n_out, (x.shape[0],)), n_out).double()
    names = names or [n for n, _ in model.named_parameters()]
    lf = loss_fn_for(model, x, y)
    ref = brute(model, names, lf, power)
    got, fbn = fast(model, names, lf, power, chunk_size=chunk_size, with_fallback=with_fallback)
    assert sorted(fbn) == sorted(expect_fb)
    for n in names:
        assert got[n].shape == ref[n].shape and got[n].dtype == torch.float64
        assert ref[n].abs().sum() > 0, n  # the reference is non-trivial
        torch.testing.assert_close(got[n], ref[n], **TOL, msg=lambda m: f"{n}: {m}")
    for p in model.parameters():
        assert p.grad is None
    return got, ref


# ----------------------------------------------------------------------------- single rules
@POWERS
def test_linear_2d(power):
    torch.manual_seed(0)
    check(nn.Linear(6, 5), torch.randn(9, 6, dtype=torch.float64), 5, power)


@POWERS
def test_linear_sequence(power):
    torch.manual_seed(1)
    # [N, T, in] and [N, A, B, in]; chunk_size 3 < N exercises chunking.
    check(nn.Sequential(nn.Linear(4, 3), nn.Flatten()), torch.randn(7, 5, 4, dtype=torch.float64), 3, power)
    check(nn.Sequential(nn.Linear(4, 3), nn.Flatten()), torch.randn(5, 2, 3, 4, dtype=torch.float64), 3, power)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@POWERS
def test_conv1d(power):
    torch.manual_seed(2)
    check(nn.Conv1d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2), torch.randn(7, 4, 11, dtype=torch.float64),
          6, power)
    check(nn.Conv1d(3, 4, 4, padding="same"), torch.randn(5, 3, 9, dtype=torch.float64), 4, power)


@POWERS
def test_conv2d_strided_dilated_grouped(power):
    torch.manual_seed(3)
    conv = nn.Conv2d(4, 6, (3, 2), stride=2, padding=1, dilation=2, groups=2, bias=True)
    check(conv, torch.randn(6, 4, 9, 8, dtype=torch.float64), 6, power)
    check(nn.Conv2d(2, 3, (2, 3), padding="same", dilation=(1, 2)), torch.randn(4, 2, 5, 6, dtype=torch.float64),
          3, power, chunk_size=64)


def _randomize_affine(m):
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p))
    return m


@POWERS
def test_layernorm(power):
    torch.manual_seed(4)
    check(_randomize_affine(nn.LayerNorm(5)), torch.randn(6, 3, 5, dtype=torch.float64) * 2 + 1, 5, power)
    check(_randomize_affine(nn.LayerNorm((3, 4))), torch.randn(5, 2, 3, 4, dtype=torch.float64), 3, power)


@POWERS
def test_groupnorm(power):
    torch.manual_seed(5)
    check(_randomize_affine(nn.GroupNorm(2, 6)), torch.randn(7, 6, 4, 3, dtype=torch.float64) + 0.5, 6, power)


@POWERS
def test_batchnorm2d_eval(power):
    torch.manual_seed(6)
    bn = _randomize_affine(nn.BatchNorm2d(4))
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(4))
        bn.running_var.copy_(torch.rand(4) + 0.5)
    check(bn, torch.randn(6, 4, 3, 5, dtype=torch.float64), 4, power)
    bn1 = _randomize_affine(nn.BatchNorm1d(5))
    with torch.no_grad():
        bn1.running_mean.copy_(torch.randn(5))
        bn1.running_var.copy_(torch.rand(5) + 0.5)
    check(bn1, torch.randn(6, 5, dtype=torch.float64), 5, power)


class EmbBag(nn.Module):
    def __init__(self, padding_idx=None):
        super().__init__()
        self.emb = nn.Embedding(9, 4, padding_idx=padding_idx)

    def forward(self, idx):
        return self.emb(idx).mean(1)


@POWERS
@pytest.mark.parametrize("padding_idx", [None, 2])
def test_embedding_repeated_indices(power, padding_idx):
    torch.manual_seed(7)
    idx = torch.tensor([[1, 1, 3, 1, 2], [0, 5, 5, 2, 6], [4, 4, 4, 4, 4], [2, 3, 1, 1, 0]])
    got, ref = check(EmbBag(padding_idx), idx, 4, power)
    used = set(idx.flatten().tolist()) - {padding_idx}
    for row in range(9):
        assert (got["emb.weight"][row].abs().sum() > 0) == (row in used)


# ----------------------------------------------------------------------------- whole model
class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.ReLU(inplace=True)  # in-place after the hooked BatchNorm output
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(self.drop(self.act(self.bn(self.conv(x)))).flatten(1))


def _cnn():
    m = SmallCNN()
    _randomize_affine(m.bn)
    with torch.no_grad():
        m.bn.running_mean.copy_(torch.randn(4) * 0.1)
        m.bn.running_var.copy_(torch.rand(4) + 0.5)
    return m


@POWERS
def test_small_cnn_whole_model(power):
    torch.manual_seed(8)
    check(_cnn(), torch.randn(10, 3, 4, 4, dtype=torch.float64), 5, power, chunk_size=4)


# ----------------------------------------------------------------------------- fallback
class LSTMRoot(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(3, 4, batch_first=True)
        self.scale = nn.Parameter(torch.randn(4))
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h, _ = self.lstm(x)
        return self.head(h[:, -1] * self.scale)


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 4)
        self.shared = nn.Linear(4, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        return self.out(self.shared(torch.tanh(self.shared(self.inp(x)))))


@POWERS
def test_fallback_lstm_and_root_parameter(power):
    torch.manual_seed(9)
    names = [n for n, _ in LSTMRoot().named_parameters()]
    fb = [n for n in names if n.startswith("lstm.") or n == "scale"]
    check(LSTMRoot(), torch.randn(6, 5, 3, dtype=torch.float64), 3, power, with_fallback=True, expect_fb=fb)


@POWERS
def test_fallback_weight_shared_linear(power):
    torch.manual_seed(10)
    check(Shared(), torch.randn(7, 4, dtype=torch.float64), 3, power, with_fallback=True,
          expect_fb=["shared.weight", "shared.bias"])


class DirectUse(nn.Module):
    """fc.weight used via F.linear without calling fc: must be detected and go to the fallback."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(F.linear(x, self.fc.weight, self.fc.bias)))


def test_fallback_direct_parameter_use_detected():
    torch.manual_seed(11)
    check(DirectUse(), torch.randn(5, 4, dtype=torch.float64), 3, 2, with_fallback=True,
          expect_fb=["fc.weight", "fc.bias"])


def test_fallback_batchnorm_with_batch_statistics():
    torch.manual_seed(12)
    # train mode / no running stats: BatchNorm couples the samples -> its parameters go to the fallback
    for bn in (nn.BatchNorm1d(4, track_running_stats=False).eval(), nn.BatchNorm1d(4).train()):
        model = nn.Sequential(nn.Linear(3, 4), _randomize_affine(bn), nn.Linear(4, 3)).double()
        x = torch.randn(6, 3, dtype=torch.float64)
        y = F.one_hot(torch.randint(0, 3, (6,)), 3).double()
        names = ["1.weight", "1.bias"]
        buffers = {k: v.clone() for k, v in model.named_buffers()}

        def lf(params=None):  # running stats (if any) are not mutated: use local copies
            local = {k: v.clone() for k, v in buffers.items()}
            return per_sample_loss(functional_call(model, {**(params or {}), **local}, (x,)), y)

        ref = brute(model, names, lf, 2)
        got, fbn = fast(model, names, lf, 2, with_fallback=True)
        assert fbn == names
        for n in names:
            assert ref[n].abs().sum() > 0
            torch.testing.assert_close(got[n], ref[n], **TOL)


def test_fallback_without_vmap_loops_over_samples(monkeypatch):
    """If vmap cannot batch the fallback's backward, samples are done one at a time (same result)."""
    import torch.func

    def broken_vmap(*args, **kwargs):
        raise RuntimeError("no batching rule")

    monkeypatch.setattr(torch.func, "vmap", broken_vmap)
    torch.manual_seed(9)
    names = [n for n, _ in LSTMRoot().named_parameters()]
    fb = [n for n in names if n.startswith("lstm.") or n == "scale"]
    check(LSTMRoot(), torch.randn(5, 4, 3, dtype=torch.float64), 3, 1, with_fallback=True, expect_fb=fb)


def test_fallback_none_raises():
    torch.manual_seed(13)
    model = LSTMRoot().double().eval()
    x = torch.randn(4, 5, 3, dtype=torch.float64)
    y = F.one_hot(torch.randint(0, 3, (4,)), 3).double()
    names = [n for n, _ in model.named_parameters()]
    with PerSampleGradNorms(model, names) as acc:
        losses = per_sample_loss(model(x), y)
        assert "scale" in acc.fallback_names and "lstm.weight_ih_l0" in acc.fallback_names
        assert "head.weight" not in acc.fallback_names
        with pytest.raises(ValueError, match="scale"):
            acc.backward(losses)
        assert all(s.abs().sum() == 0 for s in acc.sums.values())
    with PerSampleGradNorms(Shared().double().eval(), ["shared.weight"]) as acc2:
        m = acc2.model
        losses = per_sample_loss(m(torch.randn(3, 4, dtype=torch.float64)), y[:3])
        assert acc2.fallback_names == ["shared.weight"]
        with pytest.raises(ValueError, match="shared.weight"):
            acc2.backward(losses)


# ----------------------------------------------------------------------------- multiple backward calls
@POWERS
def test_multiple_backward_calls_retain_graph(power):
    torch.manual_seed(14)
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3)).double().eval()
    _randomize_affine(model[1])
    x = torch.randn(8, 4, dtype=torch.float64)
    y = F.one_hot(torch.randint(0, 3, (8,)), 3).double()
    names = [n for n, _ in model.named_parameters()]
    lf = loss_fn_for(model, x, y)
    weights = (torch.rand(8, dtype=torch.float64).sqrt(), torch.rand(8, dtype=torch.float64).sqrt())
    ref = brute(model, names, lf, power, weights=weights)
    single = brute(model, names, lf, power, weights=weights[:1])
    got, _ = fast(model, names, lf, power, weights=weights)
    for n in names:
        torch.testing.assert_close(got[n], ref[n], **TOL)
        assert (got[n] - single[n]).abs().max() > 1e-6  # the second call really added something


def test_multiple_batches_accumulate_and_reset():
    torch.manual_seed(15)
    model = _cnn().double().eval()
    names = [n for n, _ in model.named_parameters()]
    xs = [torch.randn(5, 3, 4, 4, dtype=torch.float64) for _ in range(2)]
    ys = [F.one_hot(torch.randint(0, 5, (5,)), 5).double() for _ in range(2)]
    ref = {n: 0 for n in names}
    for x, y in zip(xs, ys):
        r = brute(model, names, loss_fn_for(model, x, y), 2)
        ref = {n: ref[n] + r[n] for n in names}
    with PerSampleGradNorms(model, names, power=2) as acc:
        for x, y in zip(xs, ys):
            acc.backward(per_sample_loss(model(x), y))
        for n in names:
            torch.testing.assert_close(acc.sums[n], ref[n], **TOL)
        acc.reset()
        assert all(s.abs().sum() == 0 for s in acc.sums.values())


# ----------------------------------------------------------------------------- hygiene
def test_grad_untouched_hooks_removed_outputs_unchanged():
    torch.manual_seed(16)
    model = _cnn().double().eval()
    x = torch.randn(4, 3, 4, 4, dtype=torch.float64)
    y = F.one_hot(torch.randint(0, 5, (4,)), 5).double()
    expected = model(x)
    names = [n for n, _ in model.named_parameters()]
    with PerSampleGradNorms(model, names) as acc:
        out = model(x)
        assert torch.equal(out, expected)
        assert any(m._forward_hooks for m in model.modules())
        acc.backward(per_sample_loss(out, y))
    assert all(p.grad is None for p in model.parameters())
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
    # the context manager also cleans up when the body raises
    with pytest.raises(RuntimeError, match="boom"):
        with PerSampleGradNorms(model, names):
            model(x)
            raise RuntimeError("boom")
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
    # existing .grad is left exactly as it was
    loss = per_sample_loss(model(x), y).sum()
    loss.backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    with PerSampleGradNorms(model, names) as acc:
        acc.backward(per_sample_loss(model(x), y))
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, before[n])


def test_unused_head_zero_and_validation():
    torch.manual_seed(17)

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(3, 4)
            self.head_a = nn.Linear(4, 2)
            self.head_b = nn.Linear(4, 2)

        def forward(self, x):
            return self.head_a(torch.tanh(self.body(x)))

    model = TwoHeads().double().eval()
    x = torch.randn(5, 3, dtype=torch.float64)
    y = F.one_hot(torch.randint(0, 2, (5,)), 2).double()
    names = [n for n, _ in model.named_parameters()]
    with PerSampleGradNorms(model, names) as acc:
        acc.backward(per_sample_loss(model(x), y))
        assert acc.fallback_names == []
    assert acc.sums["head_b.weight"].abs().sum() == 0 and acc.sums["head_b.bias"].abs().sum() == 0
    ref = brute(model, ["body.weight"], loss_fn_for(model, x, y), 2)
    torch.testing.assert_close(acc.sums["body.weight"], ref["body.weight"], **TOL)

    model.head_b.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="head_b.weight"):
        PerSampleGradNorms(model, names)
    with pytest.raises(ValueError):
        PerSampleGradNorms(model, ["body.weight"], power=3)
    with pytest.raises(ValueError, match="nope"):
        PerSampleGradNorms(model, ["nope"])


@POWERS
def test_conv2d_large_maps(power):
    """Feature maps of 17 x 18 positions, 'same' padding, a kernel larger than the stride."""
    torch.manual_seed(18)
    x = torch.randn(5, 3, 17, 18, dtype=torch.float64)
    check(nn.Conv2d(3, 4, 3, padding=1), x, 4, power)
    check(nn.Conv2d(3, 4, (3, 2), padding="same"), x, 4, power)
    check(nn.Conv2d(3, 2, 5), x, 2, power, chunk_size=2)


class _Branchy(nn.Module):
    """A skip connection (δ accumulated from two uses), an in-place op after a layer, and a
    layer whose output is computed but does not reach the loss."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 6)
        self.aux = nn.Linear(6, 2)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = self.a(x)
        h2 = self.b(torch.tanh(h))
        h2.mul_(0.5)  # in place after the layer: δ is taken at the layer's own output
        self.aux(h2)  # called, unused
        return self.head(h + h2)


@POWERS
def test_streamed_backward_is_exact_and_requests_only_the_last_layers(power, monkeypatch):
    """Each layer's δ is consumed by a node pre-hook as the backward reaches it; autograd.grad is
    asked only for layers below which no other hooked layer lies (here: `a`, the first)."""
    torch.manual_seed(31)
    model = _Branchy().double().eval()
    names = [n for n, _ in model.named_parameters()]
    asked = []
    real = torch.autograd.grad

    def spy(outputs, inputs, *args, **kwargs):  # how many tensors/edges each backward is asked for
        asked.append(len(inputs))
        return real(outputs, inputs, *args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", spy)
    xs = [torch.randn(5, 4, dtype=torch.float64) for _ in range(3)]
    ys = [F.one_hot(torch.randint(0, 3, (5,)), 3).double() for _ in range(3)]
    with PerSampleGradNorms(model, names, power=power) as acc:
        for x, y in zip(xs, ys):
            acc.backward(per_sample_loss(model(x), y), fallback=lambda p: None)
        assert acc.fallback_names == []
    # checked batch: r-weighted pass (1 edge) + pass with the 8 parameters (+ 1 edge); then 1 edge each
    assert asked == [1, len(names) + 1, 1, 1]
    for n in ("aux.weight", "aux.bias"):
        assert acc.sums[n].abs().sum() == 0
    ref = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for x, y in zip(xs, ys):
        part = brute(model, names, loss_fn_for(model, x, y), power)
        for n in names:
            ref[n] += part[n]
    for n in names:
        torch.testing.assert_close(acc.sums[n], ref[n], **TOL, msg=lambda m: f"{n}: {m}")


class _ColumnsNet(nn.Module):
    """A conv with a 3x3 output map (9 positions: the Gram form for 5 columns), eval-mode
    BatchNorm, a Linear on [N, T, D] sequences and a Linear on [N, D] rows."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.seq = nn.Linear(3, 4)
        self.head = nn.Linear(4 * 9, 4)

    def forward(self, x):
        h = torch.tanh(self.bn(self.conv(x)))  # [N, 3, 3, 3]
        h = torch.tanh(self.seq(h.flatten(2).transpose(1, 2)))  # [N, 9, 4]
        return self.head(h.flatten(1))


class _Scale(nn.Module):
    """A layer without a rule: its parameter goes to the per-layer fallback."""

    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, n))

    def forward(self, x):
        return x * self.weight


@POWERS
@pytest.mark.parametrize("accumulators", [True, False])
@pytest.mark.parametrize("step", [5, 2, 1])
@pytest.mark.parametrize("model_fallback", [True, False])
def test_backward_batched_any_cotangents_exact(power, step, accumulators, model_fallback):
    """K = 5 arbitrary cotangents per sample, backpropagated in one piece, in pieces of 2 or one
    streamed column at a time, with the rules' column accumulators or without them (each piece
    through ``column_sums``), with a whole-model fallback given or not (then every sum is held to
    the end of the batch), and with a layer that takes the per-layer fallback, against a loop over
    (column, sample) in float64. The first batch is checked (its check's sums count 1/5 with
    power 2), the second is not."""
    policy = default_policy(torch.device("cpu")).replace(columns_per_backward=step, column_accumulators=accumulators)
    torch.manual_seed(5)
    model = nn.Sequential(_ColumnsNet(), _Scale(4)).double().eval()
    with torch.no_grad():
        model[0].bn.running_mean.normal_(0, 0.3)
        model[0].bn.running_var.uniform_(0.5, 1.5)
    xs = [torch.randn(6, 2, 5, 5, dtype=torch.float64) for _ in range(2)]
    cots = [torch.randn(5, 6, 4, dtype=torch.float64) for _ in range(2)]
    names = [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    ref = {n: torch.zeros_like(p) for n, p in params.items()}
    for x, cot in zip(xs, cots):
        out = model(x)
        for k in range(5):
            for i in range(6):
                gs = torch.autograd.grad(out[i] @ cot[k, i], list(params.values()), retain_graph=True)
                for n, g in zip(names, gs):
                    ref[n] += g.abs() if power == 1 else g * g
    with PerSampleGradNorms(model, names, power=power, chunk_size=4, policy=policy) as acc:
        for x, cot in zip(xs, cots):
            fb = (lambda p, x=x: functional_call(model, p, (x,))) if model_fallback else None
            acc.backward_batched(model(x), cot, fallback=fb)
        assert acc.fallback_names == ["1.weight"] and acc.model_fallback_names == []
        assert acc.checked_batches == 1
    for n in names:
        assert ref[n].abs().sum() > 0, n
        torch.testing.assert_close(acc.sums[n], ref[n], **TOL, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("piece", [None, 1000, "gpu"])
def test_float64_reductions_in_pieces(piece):
    """The check's reductions run piece by piece (no float64 copy of a large tensor) and equal
    the one-shot float64 reductions, across piece boundaries; a GPU's pieces (its chunk budget)
    make one reduction of a tensor this size, CPU pieces several."""
    from avalanche_pcreg.importance.persample import sums as ps

    assert Policy.gpu().reduction_piece == Policy.gpu().chunk_bytes // 8
    pc = {None: default_policy(torch.device("cpu")).reduction_piece, 1000: 1000,
          "gpu": Policy.gpu().reduction_piece}[piece]
    torch.manual_seed(6)
    g = torch.randn(7, 33, 21, 19)  # > 2**16 elements, no dimension a multiple of the piece
    h = g + 1e-3 * torch.randn_like(g)
    g64 = g.double()
    for axis in range(4):
        want = g64.abs().sum([d for d in range(4) if d != axis])
        with _OpCounter() as ops:
            got = ps.abs_sums64(g, axis, pc)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
        n_pieces = ops.counts["abs"]
        if piece == 1000:  # one slice along the split dimension a piece (7 or 33 of them)
            assert n_pieces >= 7, n_pieces
        else:
            # the CPU's pieces: 2 (1 where the GPU paths are forced on the CPU)
            assert n_pieces == (1 if piece == "gpu" or pc >= g.numel() else 2), (piece, axis, n_pieces)
    torch.testing.assert_close(float(ps.sum64(g, pc)), float(g64.sum()), rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(float(ps.diff_norm(g, h, pc)), float((g64 - h.double()).norm()), rtol=1e-6, atol=0)
    assert bool(ps.all_finite(g, pc))
    for at in (0, -1):  # a non-finite value in the first piece and in the last
        bad = g.clone()
        bad.view(-1)[at] = float("nan")
        assert not bool(ps.all_finite(bad, pc)), at


class _OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the aten ops run inside it, by name without overload (``counts["abs"]``)."""

    def __enter__(self):
        import collections

        self.counts = collections.Counter()
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _conv_brute(conv, a, d, power):
    """Σ over (column, sample) of |g|^power and Σ g for weight and bias, and the per-sample
    weight gradients of column 0, by autograd on one sample at a time in float64."""
    import copy

    c64 = copy.deepcopy(conv).double()
    a64, d64 = a.double(), d.double()
    ds = d64 if d64.dim() == a64.dim() + 1 else d64.unsqueeze(0)
    pows = {n: torch.zeros_like(p) for n, p in c64.named_parameters()}
    tots = {n: torch.zeros_like(p) for n, p in c64.named_parameters()}
    first = []
    for j in range(ds.shape[0]):
        for i in range(a64.shape[0]):
            gs = torch.autograd.grad(c64(a64[i:i + 1]), [c64.weight, c64.bias], ds[j, i:i + 1])
            for n, g in zip(("weight", "bias"), gs):
                pows[n] += g.abs() if power == 1 else g * g
                tots[n] += g
            if j == 0:
                first.append(gs[0])
    return pows, tots, torch.stack(first)


def conv_sums(rule, conv, a, d, power, chunk, k, policy=None):
    """The rule's power sums and totals through its public interface: ``sums`` with one
    cotangent per sample (``k`` None), ``column_sums`` with K in front of ``d``."""
    policy = (policy or default_policy(a.device)).replace(chunk_size=chunk)
    req = Request(PowerSum(power), frozenset({"weight", "bias"}), totals=True, policy=policy)
    return rule.sums(conv, a, d, req) if k is None else rule.column_sums(conv, a, d, req)


def _assert_conv_sums(rule, conv, a, d, power, chunk, k, tol, to=None, policy=None):
    """The rule's power sums and totals (and, with one cotangent, per_sample()) of ``conv`` on
    ``a``, ``d`` -- moved by ``to`` first, e.g. to a GPU -- against :func:`_conv_brute`."""
    dev = conv if to is None else to(conv)
    da, dd = (a, d) if to is None else (to(a), to(d))
    pows, tots = conv_sums(rule, dev, da, dd, power, chunk, k, policy)
    ref_p, ref_t, ref_first = _conv_brute(conv, a, d, power)
    for n in ("weight", "bias"):
        assert pows[n].dtype == a.dtype and pows[n].device == da.device and ref_p[n].abs().sum() > 0
        torch.testing.assert_close(pows[n].cpu().double(), ref_p[n], **tol)
        torch.testing.assert_close(tots[n].cpu().double(), ref_t[n], **tol)
    if k is None:  # per_sample() takes its path from the policy of passes given none
        with using_policy(policy) if policy is not None else contextlib.nullcontext():
            first = rule.per_sample(dev, da, dd)["weight"]
        torch.testing.assert_close(first.cpu().double(), ref_first, **tol)


def _conv_cases():
    """Convolutions with stride, dilation, groups and 'same' padding, and their input shapes."""
    return [(nn.Conv2d(4, 6, (3, 2), stride=2, padding=1, dilation=2, groups=2), (6, 4, 9, 8)),
            (nn.Conv2d(2, 3, (2, 3), padding="same", dilation=(1, 2)), (4, 2, 5, 6)),
            (nn.Conv1d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2), (7, 4, 11)),
            (nn.Conv1d(3, 4, 4, padding="same"), (5, 3, 9))]


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("chunk", [2, 16])
@POWERS
def test_conv_grouped_weight_gradient_path_exact(chunk, power):
    """The GPU path -- one weight-gradient call per chunk, the chunk's samples as the groups of
    one convolution -- chosen by the policy on the CPU, against float64 loops: the cases above, one
    cotangent or K = 3 per sample, chunks of 2 samples (several per batch, the last one short) or all."""
    from avalanche_pcreg.importance.persample.rules import conv as C

    policy = Policy.cpu().replace(conv_path="wgrad")
    torch.manual_seed(43)
    for conv, shape in _conv_cases():
        rule = C.Conv1dRule() if isinstance(conv, nn.Conv1d) else C.Conv2dRule()
        conv = conv.double()
        a = torch.randn(shape, dtype=torch.float64)
        out_shape = tuple(conv(a).shape)
        for k in (None, 3):
            d = torch.randn(((k,) if k else ()) + out_shape, dtype=torch.float64)
            _assert_conv_sums(rule, conv, a, d, power, chunk, k, TOL, policy=policy)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("path", ["kernel", "matmul"])
@POWERS
def test_conv_one_sample_at_a_time_paths_exact(path, power, monkeypatch):
    """The CPU paths that form per-sample conv gradients one sample at a time -- the convolution
    library's weight-gradient kernel (float32) and unfold + one matmul into a reused buffer --
    against float64 loops: Conv1d and Conv2d with stride, dilation, groups and 'same' padding,
    one cotangent or K = 3 per sample, power sums and totals, and per_sample() (whose samples
    must not share that buffer). And the CPU policy's choice ("auto") between them."""
    from avalanche_pcreg.importance.persample.rules import conv as C

    forced = Policy.cpu().replace(conv_path=path)
    auto = Policy.cpu().replace(per_sample_call_min_macs=0)
    dt = torch.float32 if path == "kernel" else torch.float64
    tol = dict(rtol=2e-5, atol=1e-5) if dt == torch.float32 else TOL
    torch.manual_seed(41)
    for conv, shape in _conv_cases():
        rule = C.Conv1dRule() if isinstance(conv, nn.Conv1d) else C.Conv2dRule()
        conv = conv.to(dt)
        a = torch.randn(shape, dtype=dt)
        out_shape = tuple(conv(a).shape)
        for k in (None, 3):
            d = torch.randn(((k,) if k else ()) + out_shape, dtype=dt)
            assert rule.path(conv, a, d, Request(PowerSum(), frozenset(), policy=forced), k) == path
            _assert_conv_sums(rule, conv, a, d, power, 2, k, tol, policy=forced)
            # the CPU's own choice: a float32 sample of these sizes is below ATen's library threshold,
            # float64 never goes there; no CPU convolution library: matmul
            assert rule.path(conv, a, d, Request(PowerSum(), frozenset(), policy=auto), k) == "matmul"
            with monkeypatch.context() as mp:
                mp.setattr(torch.backends.mkldnn, "is_available", lambda: False)
                assert rule.path(conv, a, d, Request(PowerSum(), frozenset(), policy=auto), k) == "matmul"
        # another device: one weight-gradient call per chunk; too little work per sample: batched
        meta = Request(PowerSum(), frozenset(), policy=auto)
        assert rule.path(conv, a.to("meta"), d.to("meta"), meta, k) == "wgrad"
        few = Request(PowerSum(), frozenset(), policy=Policy.cpu().replace(per_sample_call_min_macs=10 ** 9))
        assert rule.path(conv, a, d, few, k) is None
    if torch.backends.mkldnn.is_available():  # a float32 sample above ATen's threshold: the library's kernel
        big = torch.empty(1, 3, 100, 100)
        conv = nn.Conv2d(3, 4, 3)
        assert auto.conv_path_for(conv, big, conv.weight.numel(), 98 * 98) == "kernel"
        assert auto.conv_path_for(conv, big.double(), conv.weight.numel(), 98 * 98) == "matmul"


@pytest.mark.parametrize("k", [2, 3, 9])
def test_sum_first_is_an_orthogonal_change_of_the_columns(k):
    """The K - 1 columns left by _sum_first and Σ_k c_k (counted 1/K) have the same Σ c cᵀ per
    sample as the K columns given: the power-2 sums of a K-cotangent check batch stay exact."""
    from avalanche_pcreg.importance.persample.sums import sum_first as _sum_first

    torch.manual_seed(k)
    c = torch.randn(k, 5, 7, dtype=torch.float64)
    rest = _sum_first(c)
    assert rest.shape == (k - 1, 5, 7) and rest.dtype == c.dtype
    s = c.sum(0)
    got = torch.einsum("kni,knj->nij", rest, rest) + torch.einsum("ni,nj->nij", s, s) / k
    torch.testing.assert_close(got, torch.einsum("kni,knj->nij", c, c), rtol=1e-12, atol=1e-12)
    c32 = c.float()
    assert _sum_first(c32).dtype == torch.float32


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_gpu_chunking_exact_on_the_cpu(chunk_size):
    """What a GPU's policy changes, given on the CPU: chunks of 256 samples under a 256 MiB budget
    when chunk_size is None, and a chunk's squares summed in one launch (with the CPU's choice of
    conv paths). Every estimator through the conv paths (unfold + bmm on small and large maps, Gram with the
    expected Fisher's columns) and sequences against the float64 loop."""
    from torch.utils.data import TensorDataset

    from avalanche_pcreg import compute_importance
    from test_importance import assert_matches, brute_force

    policy = Policy.gpu().replace(conv_path="auto")
    assert policy.squares_at_once and policy.chunk_size == 256
    torch.manual_seed(3)
    seq = nn.Sequential(nn.Conv1d(3, 4, 3, padding=1), nn.Tanh(), nn.Flatten(1), nn.Unflatten(1, (4, 6)),
                        nn.Linear(6, 5), nn.Tanh(), nn.Flatten(1), nn.Linear(20, 6)).double()
    cases = [
        (_ColumnsNet().double(), torch.randn(9, 2, 5, 5, dtype=torch.float64), 4),  # Gram, sequences
        (nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                       nn.Linear(16, 5)).double(), torch.randn(7, 3, 17, 18, dtype=torch.float64), 5),  # large maps
        (seq, torch.randn(8, 3, 6, dtype=torch.float64), 6),  # Conv1d (unfold + bmm), Linear on [N, T, D]
    ]
    for model, x, classes in cases:
        y = torch.randint(0, classes, (x.shape[0],))
        for method in ("empirical_fisher", "expected_fisher", "mas"):
            ref = brute_force(model, x, y, method, batch_size=4)
            got = compute_importance(model, TensorDataset(x, y), method, batch_size=4, chunk_size=chunk_size,
                                     policy=policy)
            assert_matches(got, ref)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@POWERS
def test_conv_matmul_path_in_float32(power):
    """The one-sample-at-a-time matmul path of the conv rule in float32: power sums and totals
    against float64 loops (Conv1d and Conv2d, stride, dilation, 'same' padding, one cotangent or
    K = 3 per sample)."""
    from avalanche_pcreg.importance.persample.rules import conv as C

    policy = Policy.cpu().replace(conv_path="matmul")
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
            pows, tots = conv_sums(rule, conv, a, d, power, 2, k, policy)
            ref_p, ref_t, _ = _conv_brute(conv, a, d, power)
            for n in ("weight", "bias"):
                assert pows[n].dtype == torch.float32 and ref_p[n].abs().sum() > 0
                torch.testing.assert_close(pows[n].double(), ref_p[n], rtol=2e-5, atol=1e-5)
                torch.testing.assert_close(tots[n].double(), ref_t[n], rtol=2e-5, atol=1e-5)


def test_conv_gram_form_in_float32():
    """The Gram form (forced for K = 5 columns on a 4x4 output map by the policy) in float32: Σ over
    the columns and the samples of the squared weight gradients, given in two pieces, against
    float64 loops; in chunks of 4 and 2 samples."""
    from avalanche_pcreg.importance.persample.rules import conv as C

    policy = Policy.cpu().replace(chunk_size=4, gram_positions_per_column=4)
    torch.manual_seed(6)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    a = torch.randn(6, 3, 4, 4)
    d = torch.randn(5, 6, 4, 4, 4)
    assert Policy.cpu().use_gram(16, 5) is False and policy.use_gram(16, 5)
    req = Request(PowerSum(2), frozenset({"weight"}), policy=policy, columns=5)
    acc = C.Conv2dRule().column_accumulator(conv, a, tuple(conv(a).shape), req)
    acc.add(d[:2])
    acc.add(d[2:])
    got = acc.result()["weight"]
    ref_p, _, _ = _conv_brute(conv, a, d, 2)
    torch.testing.assert_close(got.double(), ref_p["weight"], rtol=2e-5, atol=1e-5)
