"""``nn.Conv1d`` / ``nn.Conv2d``: per-sample weight gradients, chunk by chunk.

g_i = Σ_positions δ_i[:, l] u_i[:, l]ᵀ with u = unfold(a) (the patches), per group. Formed whichever
way is fastest for the layer. On a GPU: one weight-gradient call per chunk, the samples as groups.
On the CPU: unfold + batched matmul; one grouped convolution over the samples (large maps); or, for
layers with enough work per sample, one sample at a time, with the convolution library's own
weight-gradient kernel or one matmul (oneDNN's where it applies, :mod:`._gemm`). With K cotangent
columns and small maps, the squares are summed in Gram form (:class:`_GramSquares`).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ._gemm import addmm_, mm
from ._registry import Rule, _chunks, _even_size, _pow, chunk_bytes, register_rule


# Output positions from which a stride-1 Conv2d forms per-sample gradients by grouped convolution.
GROUPED_MIN_POSITIONS = 256
# Multiply-adds per sample from which a CPU layer forms its per-sample gradients one sample at a
# time (_per_sample_path): 1.2-3.4x faster than the batched paths on ResNet-18's layers (19M-38M
# multiply-adds per sample), and still ahead at 3.6M; below about this size the per-call cost wins
# (docs/persample-rules.md, "Convolution speed"). A GPU takes one weight-gradient call per chunk instead.
PER_SAMPLE_CALL_MIN_MACS = 2_500_000
# Input values of one sample above which ATen sends a batch-1 float32 convolution to the CPU
# convolution library (below it, to im2col + GEMM).
KERNEL_MIN_INPUT = 20480


def _positions(d, k) -> int:
    """Output positions of ``d`` ([N, C, *spatial], or [K, N, C, *spatial] with K columns)."""
    return d[0, 0].numel() if k is None else d[0, 0, 0].numel()


def _step(m, a, d, chunk, k=None) -> int:
    """Samples per chunk: ``chunk`` (per cotangent column), capped by the device's byte budget
    (``chunk_bytes``: per-sample gradients and patches formed at once)."""
    kk = _unfold_args(m)[0]
    positions = _positions(d, k)
    per_sample = (m.weight.numel() * (k or 1) + m.in_channels * math.prod(kk) * positions) * a.element_size()
    step = chunk if k is None else chunk // k
    return max(1, min(step, chunk_bytes(a.device) // max(per_sample, 1)))


def _squares_at_once(device) -> bool:
    """Whether a chunk's squared per-sample gradients go into the sum in one launch (a GPU, where a
    launch per sample leaves it idle) rather than one sample at a time (the CPU: no squared copy)."""
    return device.type != "cpu"


def _padding(m):
    """(numeric padding, or zeros with ``pre_pad`` for ``F.pad`` when the module says 'same')."""
    k, dil = tuple(m.kernel_size), tuple(m.dilation)
    pad, pre_pad = m.padding, None
    if isinstance(pad, str):
        if pad == "same":  # left = total // 2, right = total - left (as ATen does)
            tot = [di * (ki - 1) for di, ki in zip(dil, k)]
            pre_pad = []
            for t in reversed(tot):
                pre_pad += [t // 2, t - t // 2]
        pad = (0,) * len(k)
    return tuple(pad), pre_pad


def _unfold_args(m):
    k, stride, dil = tuple(m.kernel_size), tuple(m.stride), tuple(m.dilation)
    pad, pre_pad = _padding(m)
    if isinstance(m, nn.Conv1d):
        k, stride, dil, pad = (1,) + k, (1,) + stride, (1,) + dil, (0,) + pad
    return k, stride, dil, pad, pre_pad


def _patches(m, x):
    """The patches of ``x`` (a chunk of the layer's input) that the kernel sees: [c, Cin·kernel, L]."""
    kk, stride, dil, pad, pre_pad = _unfold_args(m)
    if pre_pad is not None:
        x = F.pad(x, pre_pad)
    if isinstance(m, nn.Conv1d):
        x = x.unsqueeze(2)
    return F.unfold(x, kk, dilation=dil, padding=pad, stride=stride)


class ConvRule(Rule):
    params = ("weight", "bias")
    ndim = 2

    def supports(self, module, x):
        return x.is_floating_point() and x.dim() == self.ndim + 2 and module.padding_mode == "zeros"

    def _weight_chunks(self, m, a, d, chunk, k=None, reuse=True):
        """Per-sample weight gradients chunk by chunk: [c, *w.shape], or [k, c, *w.shape] when
        ``d`` has K cotangents per sample in front (the patches are unfolded once for all K).
        With ``reuse``, a chunk may be a buffer that the next one overwrites."""
        path = _per_sample_path(m, a, d, k)
        if path == "kernel":
            yield from _kernel_per_sample(m, a, d, k)
            return
        if path == "wgrad":
            yield from _wgrad_chunks(m, a, d, chunk, k)
            return
        n = a.shape[0]
        kk, stride, dil, pad, pre_pad = _unfold_args(m)
        groups, cout = m.groups, m.out_channels
        lead = () if k is None else (k,)
        dg = d.reshape(*lead, n, groups, cout // groups, -1)  # [(K,) N, G, o, L]
        step = _step(m, a, d, chunk, k)
        # Large feature maps, stride 1: per-sample weight gradients as one grouped convolution
        # over the samples (input channels as the batch, the samples' δ as the filters) -- the
        # convolution kernels beat unfold + bmm there; unfold + bmm elsewhere.
        grouped = (path is None and k is None and isinstance(m, nn.Conv2d) and groups == 1 and stride == (1, 1)
                   and dil == (1, 1) and d.shape[-1] * d.shape[-2] >= GROUPED_MIN_POSITIONS)
        buf = None
        for s, e in _chunks(n, step):
            c = e - s
            if grouped:
                x = a[s:e] if pre_pad is None else F.pad(a[s:e], pre_pad)
                w = d[s:e].reshape(c * cout, 1, *d.shape[-2:])
                g = F.conv2d(x.transpose(0, 1), w, padding=pad, groups=c)  # [Cin, c*Cout, kh, kw]
                yield g.reshape(m.in_channels, c, cout, *kk).permute(1, 2, 0, 3, 4)
                continue
            u = _patches(m, a[s:e])  # [c, Cin*K, L]
            u = u.reshape(c, groups, -1, u.shape[-1]).transpose(2, 3)  # [c, G, L, i]
            if path == "matmul":  # one sample (and column) at a time, into one buffer
                one = (1,) * (len(lead) + 1) + tuple(m.weight.shape)  # [(1,) 1, *w.shape]
                for i in range(c):
                    for j in range(k or 1):
                        if buf is None or not reuse:
                            buf = torch.empty(groups, cout // groups, u.shape[-1], dtype=a.dtype, device=a.device)
                        di = dg[s + i] if k is None else dg[j, s + i]
                        if groups == 1:  # oneDNN's matmul where it applies (_gemm)
                            yield mm(di[0], u[i, 0], out=buf[0]).view(one)
                        else:
                            torch.bmm(di, u[i], out=buf)
                            yield buf.view(one)
            elif k is None:
                g = torch.bmm(dg[s:e].reshape(c * groups, cout // groups, -1), u.reshape(c * groups, *u.shape[2:]))
                yield g.reshape(c, *m.weight.shape)
            else:
                yield torch.einsum("jngol,ngli->jngoi", dg[:, s:e], u).reshape(k, c, *m.weight.shape)

    def per_sample(self, module, a, d):
        w = torch.cat(list(self._weight_chunks(module, a, d, a.shape[0], reuse=False)))
        return {"weight": w, "bias": d.reshape(d.shape[0], d.shape[1], -1).sum(-1)}

    def _sums(self, module, a, d, want, power, chunk, total, k):
        want = set(want)
        pows, tots = {}, {}
        red = (0,) if k is None else (0, 1)
        if "weight" in want:
            pw = torch.zeros(module.weight.shape, dtype=a.dtype, device=a.device)
            tw = torch.zeros_like(pw) if total else None
            for g in self._weight_chunks(module, a, d, chunk, k):
                g = g.reshape(-1, *module.weight.shape)
                if total:
                    tw += g[0] if g.shape[0] == 1 else g.sum(0)
                if power == 1:
                    pw += g.abs_().sum(0)  # g is ours: in place
                elif _squares_at_once(a.device):  # g is ours: in place
                    pw += g.square_().sum(0)
                else:  # one sample at a time into the sum: a read of g, no squared copy
                    for gi in g:
                        pw.addcmul_(gi, gi)
            pows["weight"] = pw
            if total:
                tots["weight"] = tw
        if "bias" in want:
            lead = d.shape[:len(red) + 1]  # [(K,) N, C]
            gb = d.reshape(*lead, -1).sum(-1)
            pows["bias"] = _pow(gb, power).sum(red)
            if total:
                tots["bias"] = gb.sum(red)
        return pows, (tots if total else None)

    def sums(self, module, a, d, want, power, chunk, total):
        return self._sums(module, a, d, want, power, chunk, total, None)

    def sums_multi(self, module, a, d, want, power, chunk, total):
        return self._sums(module, a, d, want, power, chunk, total, d.shape[0])

    def column_accumulator(self, module, a, out_shape, want, power, chunk, k, max_bytes):
        if not (power == 2 and module.groups == 1 and "weight" in want and _use_gram(math.prod(out_shape[2:]), k)):
            return None
        acc = _GramSquares(module, a, out_shape, chunk, k)
        return acc if acc.nbytes <= max_bytes else None


def _per_sample_path(m, a, d, k) -> Optional[str]:
    """How a layer forms its per-sample gradients. On a GPU, "wgrad": one weight-gradient call per
    chunk with the samples as groups (:func:`_wgrad_chunks`). On the CPU, a layer with at least
    :data:`PER_SAMPLE_CALL_MIN_MACS` multiply-adds per sample goes one sample at a time: "kernel"
    (the weight-gradient kernel of the CPU convolution library, which ATen uses for a batch of
    one float32 sample above :data:`KERNEL_MIN_INPUT` input values) or "matmul" (unfold + one
    matmul: oneDNN's for float32 where it applies, else into a reused buffer -- what ATen's own
    fallback does, without a fresh zero-filled result per call); smaller CPU layers get None
    (the batched paths)."""
    if a.device.type != "cpu":
        return "wgrad"
    if m.weight.numel() * _positions(d, k) < PER_SAMPLE_CALL_MIN_MACS:
        return None
    library = torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
    return "kernel" if library and a.dtype == torch.float32 and a[0].numel() > KERNEL_MIN_INPUT else "matmul"


def _weight_grad_call(m, a):
    """``(x, grad)``: the layer's input as it convolves it (``a``, pre-padded for 'same'), and
    ``grad(δ, x_part, w, groups)``, the weight gradient of ``aten.convolution_backward`` (weight
    only, ``w`` read for its shape) with the layer's stride, padding and dilation."""
    pad, pre_pad = _padding(m)
    x = a if pre_pad is None else F.pad(a, pre_pad)
    stride, dil, out_pad = tuple(m.stride), tuple(m.dilation), (0,) * len(pad)

    def grad(di, xi, w, groups):
        return torch.ops.aten.convolution_backward(di, xi, w, None, stride, pad, dil, False, out_pad, groups,
                                                   (False, True, False))[1]

    return x, grad


def _kernel_per_sample(m, a, d, k):
    """Per-sample weight gradients from ``aten.convolution_backward`` (weight only) on one sample
    at a time: [1, *w.shape] per sample, or [k, 1, *w.shape] with K cotangent columns."""
    x, weight_grad = _weight_grad_call(m, a)
    w = torch.empty(m.weight.shape, dtype=a.dtype, device=a.device)  # its shape is what is read

    def grad(di, xi):
        return weight_grad(di, xi, w, m.groups)

    for i in range(a.shape[0]):
        xi = x[i:i + 1]
        if k is None:
            yield grad(d[i:i + 1], xi).unsqueeze(0)
        else:
            yield torch.stack([grad(d[j, i:i + 1], xi) for j in range(k)]).unsqueeze(1)


def _wgrad_chunks(m, a, d, chunk, k):
    """Per-sample weight gradients from one ``aten.convolution_backward`` (weight only) per chunk
    of c samples and per cotangent column: the chunk's samples are the groups of one convolution
    (input [1, c·Cin, ...], δ [1, c·Cout, ...], c·G groups), the form ``vmap`` gives that call.
    Yields [c, *w.shape], or [1, c, *w.shape] per column with K cotangent columns."""
    x, weight_grad = _weight_grad_call(m, a)
    cin, cout, w_shape = m.in_channels, m.out_channels, tuple(m.weight.shape)
    # the call's result and the weight it reads the shape of: two per-sample gradients a sample
    per_sample = 2 * m.weight.numel() * a.element_size()
    step = max(1, min(chunk, a.shape[0], chunk_bytes(a.device) // per_sample))
    w_all = torch.empty((step * cout,) + w_shape[1:], dtype=a.dtype, device=a.device)  # its shape is read
    for s, e in _chunks(a.shape[0], step):
        c = e - s
        xc = x[s:e].reshape(1, c * cin, *x.shape[2:])
        w = w_all[:c * cout]
        for dj in ([d[s:e]] if k is None else [d[j, s:e] for j in range(k)]):
            g = weight_grad(dj.reshape(1, c * cout, *dj.shape[2:]), xc, w, c * m.groups).reshape(c, *w_shape)
            yield g if k is None else g.unsqueeze(0)


def _use_gram(positions: int, k: int) -> bool:
    """Whether K cotangent columns at L output positions take the Gram form: its GEMM depth per
    sample is L(L+1)/2, against K·L for the direct products (which also write K·|w| values per
    sample); measured on ResNet-18's layers, the Gram form wins from L/2 ≤ K."""
    return positions <= 2 * k


class _GramSquares:
    """Σ_{k,n} (δ_{k,n} u_nᵀ)² over K cotangent columns given piece by piece, without the K·N
    per-sample gradients.

    With L output positions, G_n = Σ_k δ_{k,n} δ_{k,n}ᵀ ([L, L] per output channel) and
    U_n[i] = u_n[i] u_n[i]ᵀ, the sum is Σ_n Σ_{l,l'} G_n[o,l,l'] U_n[i,l,l']. Both are symmetric in
    (l, l'): the P = L(L+1)/2 pairs l ≤ l' suffice (off-diagonal ones counted twice). Columns are
    buffered ``GROUP`` at a time and folded into G by one batched product; the result is one GEMM
    of depth N·P (BackPACK's trick for small feature maps, halved by symmetry). Holds G
    (out_channels · N · P values) and the buffer (GROUP · out_channels · N · L)."""

    covers = ("weight",)
    GROUP = 8

    def __init__(self, m, a, out_shape, chunk, k):
        self.m, self.a, self.chunk = m, a, chunk
        n, cout = a.shape[0], m.out_channels
        self.positions = positions = math.prod(out_shape[2:])
        iu = torch.triu_indices(positions, positions, device=a.device)
        self.rows, self.cols = iu[0], iu[1]
        self.flat = iu[0] * positions + iu[1]
        self.pairs = iu.shape[1]
        self.group = _even_size(k, self.GROUP)  # K in equal folds of at most GROUP columns
        self.nbytes = cout * n * (self.pairs + self.group * positions) * a.element_size()
        self.g = None  # [o, N, P]
        self.buf = None  # [o, N, group, L]
        self.filled = 0

    def add(self, d):
        """``d``: [k, N, out_channels, *spatial], k columns of this piece."""
        k, n, cout = d.shape[0], d.shape[1], d.shape[2]
        if self.g is None:
            self.g = torch.zeros(cout, n, self.pairs, dtype=self.a.dtype, device=self.a.device)
            self.buf = torch.empty(cout, n, self.group, self.positions, dtype=self.a.dtype, device=self.a.device)
        d = d.reshape(k, n, cout, self.positions).permute(2, 1, 0, 3)  # [o, N, k, L]
        j = 0
        while j < k:
            take = min(k - j, self.group - self.filled)
            self.buf[:, :, self.filled:self.filled + take].copy_(d[:, :, j:j + take])
            self.filled += take
            j += take
            if self.filled == self.group:
                self._fold()

    def _fold(self):
        """G += Σ over the buffered columns of δ δᵀ (pairs l ≤ l' only)."""
        cout, n, f, positions = self.buf.shape[0], self.buf.shape[1], self.filled, self.positions
        per_sample = cout * positions * positions * self.buf.element_size()
        for s, e in _chunks(n, max(1, chunk_bytes(self.buf.device) // max(per_sample, 1))):
            x = self.buf[:, s:e, :f].reshape(cout * (e - s), f, positions)  # [(o c), f, L]
            gc = torch.bmm(x.transpose(1, 2), x).reshape(cout, e - s, positions * positions)
            self.g[:, s:e] += gc.index_select(2, self.flat)
        self.filled = 0

    def result(self) -> dict:
        m, a = self.m, self.a
        cout = m.out_channels
        width = m.weight[0].numel()  # Cin/G · kernel
        acc = torch.zeros(cout, width, dtype=a.dtype, device=a.device)
        if self.g is None:
            return {"weight": acc.reshape(m.weight.shape)}
        if self.filled:
            self._fold()
        self.buf = None
        self.g[:, :, self.rows != self.cols] *= 2
        per_sample = (self.pairs + 2 * self.positions) * width * a.element_size()
        for s, e in _chunks(a.shape[0], max(1, min(self.chunk, chunk_bytes(a.device) // max(per_sample, 1)))):
            u = _patches(m, a[s:e]).transpose(1, 2)  # [c, L, I]
            uu = u.index_select(1, self.rows).mul_(u.index_select(1, self.cols))  # [c, P, I]
            addmm_(acc, self.g[:, s:e].reshape(cout, -1), uu.reshape(-1, width))
        self.g = None
        return {"weight": acc.reshape(m.weight.shape)}


@register_rule(nn.Conv2d)
class Conv2dRule(ConvRule):
    ndim = 2


@register_rule(nn.Conv1d)
class Conv1dRule(ConvRule):
    ndim = 1
