"""``nn.Conv1d`` / ``nn.Conv2d``: per-sample weight gradients, chunk by chunk.

g_i = Σ_positions δ_i[:, l] u_i[:, l]ᵀ with u = unfold(a) (the patches), per group. Formed the way
the policy chooses for the layer (``Policy.conv_path_for``): on a GPU one weight-gradient call per
chunk, the samples as groups ("wgrad"); on the CPU, for layers with enough work per sample, one
sample at a time with the convolution library's own weight-gradient kernel ("kernel") or one
matmul ("matmul"); otherwise batched: unfold + batched matmul. With K cotangent columns and small
maps, the squares are summed in Gram form (:class:`_GramSquares`).

Σ_n g_n² (power 2) need not go through per-sample gradients: elementwise over the weight,
Σ_n (Σ_l δ_nl u_nlᵀ)² = Σ_n Σ_{l,l'} (δ_nl ∘ δ_nl')(u_nl ∘ u_nl')ᵀ, one matrix product of depth
N·L(L+1)/2 over the pairs l ≤ l' of output positions (the position-Gram form, :func:`_gram_sums`;
with one position, (δ²)ᵀ(u²)). Its cost grows with L², the per-sample form's with the weight's
size: ``Policy.conv_sums_for`` picks one per layer and call.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..policy import default_policy
from ..quantity import GradientSum, Request, Sums
from ..sums import chunks, even_size
from .base import Rule, register_rule


def _positions(d, k) -> int:
    """Output positions of ``d`` ([N, C, *spatial], or [K, N, C, *spatial] with K columns)."""
    return d[0, 0].numel() if k is None else d[0, 0, 0].numel()


def _step(m, a, d, req, k=None) -> int:
    """Samples per chunk: ``req.chunk`` (per cotangent column), capped by the policy's byte budget
    (per-sample gradients and patches formed at once)."""
    kk = _unfold_args(m)[0]
    positions = _positions(d, k)
    per_sample = (m.weight.numel() * (k or 1) + m.in_channels * math.prod(kk) * positions) * a.element_size()
    step = req.chunk if k is None else req.chunk // k
    return max(1, min(step, req.policy.chunk_bytes // max(per_sample, 1)))


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

    def sums_form(self, m, a, d, req, k=None) -> str:
        """How this call forms the weight's sums: ``"gram"`` (power 2, :func:`_gram_sums`) or
        ``"per_sample"`` (every other quantity, or the policy's choice)."""
        if req.power != 2:
            return "per_sample"
        return req.policy.conv_sums_for(a.shape[0], _positions(d, k), m.weight[0].numel(), m.out_channels, k or 1)

    def path(self, m, a, d, req, k=None):
        """The policy's path for this layer and call (None: batched)."""
        return req.policy.conv_path_for(m, a, m.weight.numel(), _positions(d, k))

    def _weight_chunks(self, m, a, d, req, k=None, reuse=True):
        """Per-sample weight gradients chunk by chunk: [c, *w.shape], or [k, c, *w.shape] when
        ``d`` has K cotangents per sample in front (the patches are unfolded once for all K).
        With ``reuse``, a chunk may be a buffer that the next one overwrites."""
        path = self.path(m, a, d, req, k)
        if path == "kernel":
            yield from _kernel_per_sample(m, a, d, k)
            return
        if path == "wgrad":
            yield from _wgrad_chunks(m, a, d, req, k)
            return
        n = a.shape[0]
        groups, cout = m.groups, m.out_channels
        lead = () if k is None else (k,)
        dg = d.reshape(*lead, n, groups, cout // groups, -1)  # [(K,) N, G, o, L]
        step = _step(m, a, d, req, k)
        buf = None
        for s, e in chunks(n, step):
            c = e - s
            u = _patches(m, a[s:e])  # [c, Cin*K, L]
            u = u.reshape(c, groups, -1, u.shape[-1]).transpose(2, 3)  # [c, G, L, i]
            if path == "matmul":  # one sample (and column) at a time, into one buffer
                one = (1,) * (len(lead) + 1) + tuple(m.weight.shape)  # [(1,) 1, *w.shape]
                for i in range(c):
                    for j in range(k or 1):
                        if buf is None or not reuse:
                            buf = torch.empty(groups, cout // groups, u.shape[-1], dtype=a.dtype, device=a.device)
                        di = dg[s + i] if k is None else dg[j, s + i]
                        if groups == 1:
                            yield torch.mm(di[0], u[i, 0], out=buf[0]).view(one)
                        else:
                            torch.bmm(di, u[i], out=buf)
                            yield buf.view(one)
            elif k is None:
                g = torch.bmm(dg[s:e].reshape(c * groups, cout // groups, -1), u.reshape(c * groups, *u.shape[2:]))
                yield g.reshape(c, *m.weight.shape)
            else:
                yield torch.einsum("jngol,ngli->jngoi", dg[:, s:e], u).reshape(k, c, *m.weight.shape)

    def per_sample(self, module, a, d):
        req = Request(GradientSum(), frozenset(("weight",)), default_policy(a.device).replace(chunk_size=a.shape[0]))
        w = torch.cat(list(self._weight_chunks(module, a, d, req, reuse=False)))
        return {"weight": w, "bias": d.reshape(d.shape[0], d.shape[1], -1).sum(-1)}

    def _sums(self, module, a, d, req, k):
        want, power, of = req.attrs, req.power, req.quantity.of
        values, totals = {}, {}
        red = (0,) if k is None else (0, 1)
        if "weight" in want and self.sums_form(module, a, d, req, k) == "gram":
            values["weight"], tw = _gram_sums(module, a, d, req, k)
            if req.totals:
                totals["weight"] = tw
        elif "weight" in want:
            pw = torch.zeros(module.weight.shape, dtype=a.dtype, device=a.device)
            tw = torch.zeros_like(pw) if req.totals else None
            for g in self._weight_chunks(module, a, d, req, k):
                g = g.reshape(-1, *module.weight.shape)
                if req.totals:
                    tw += g[0] if g.shape[0] == 1 else g.sum(0)
                if power == 1:
                    pw += g.abs_().sum(0)  # g is ours: in place
                elif power == 2 and req.policy.squares_at_once:  # g is ours: in place
                    pw += g.square_().sum(0)
                elif power == 2:  # one sample at a time into the sum: a read of g, no squared copy
                    for gi in g:
                        pw.addcmul_(gi, gi)
                else:  # another quantity
                    pw += of(g).sum(0)
            values["weight"] = pw
            if req.totals:
                totals["weight"] = tw
        if "bias" in want:
            lead = d.shape[:len(red) + 1]  # [(K,) N, C]
            gb = d.reshape(*lead, -1).sum(-1)
            values["bias"] = of(gb).sum(red)
            if req.totals:
                totals["bias"] = gb.sum(red)
        return Sums(values, totals if req.totals else None)

    def sums(self, module, a, d, req):
        return self._sums(module, a, d, req, None)

    def column_sums(self, module, a, d, req):
        return self._sums(module, a, d, req, d.shape[0])

    def column_accumulator(self, module, a, out_shape, req):
        positions = math.prod(out_shape[2:])
        if not (req.power == 2 and module.groups == 1 and "weight" in req.attrs
                and req.policy.use_gram(positions, req.columns)):
            return None
        return _GramSquares(module, a, out_shape, req)


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


def _wgrad_chunks(m, a, d, req, k):
    """Per-sample weight gradients from one ``aten.convolution_backward`` (weight only) per chunk
    of c samples and per cotangent column: the chunk's samples are the groups of one convolution
    (input [1, c·Cin, ...], δ [1, c·Cout, ...], c·G groups), the form ``vmap`` gives that call.
    Yields [c, *w.shape], or [1, c, *w.shape] per column with K cotangent columns."""
    x, weight_grad = _weight_grad_call(m, a)
    cin, cout, w_shape = m.in_channels, m.out_channels, tuple(m.weight.shape)
    # the call's result and the weight it reads the shape of: two per-sample gradients a sample
    per_sample = 2 * m.weight.numel() * a.element_size()
    step = max(1, min(req.chunk, a.shape[0], req.policy.chunk_bytes // per_sample))
    w_all = torch.empty((step * cout,) + w_shape[1:], dtype=a.dtype, device=a.device)  # its shape is read
    for s, e in chunks(a.shape[0], step):
        c = e - s
        xc = x[s:e].reshape(1, c * cin, *x.shape[2:])
        w = w_all[:c * cout]
        for dj in ([d[s:e]] if k is None else [d[j, s:e] for j in range(k)]):
            g = weight_grad(dj.reshape(1, c * cout, *dj.shape[2:]), xc, w, c * m.groups).reshape(c, *w_shape)
            yield g if k is None else g.unsqueeze(0)


def _pairs(positions, device):
    """``(rows, cols, doubled)``: the P = L(L+1)/2 pairs l ≤ l' of L output positions, and each
    pair's index into [x, 2x] stacked along the positions (``cols``, plus L off the diagonal), so
    that x[rows] · [x, 2x][doubled] counts each off-diagonal pair twice."""
    iu = torch.triu_indices(positions, positions, device=device)
    rows, cols = iu[0], iu[1]
    return rows, cols, cols + positions * (rows != cols)


@functools.lru_cache(maxsize=256)
def _live_taps(kernel, stride, dilation, padding, in_size, out_size):
    """The kernel offsets (flat indices within the kernel) that reach the input at some output
    position, or None when all of them do. The others see only zero padding (a 3×3 kernel on a
    1×1 map: only its centre), so their weight gradients are exactly zero."""
    live = [[t for t in range(k) if any(0 <= o * s - p + t * dl < n for o in range(q))]
            for k, s, dl, p, n, q in zip(kernel, stride, dilation, padding, in_size, out_size)]
    if all(len(v) == k for v, k in zip(live, kernel)):
        return None
    flat = [0]
    for v, k in zip(live, kernel):
        flat = [f * k + t for f in flat for t in v]
    return tuple(flat)


def _live_offsets(m, a, d):
    """:func:`_live_taps` of this call: the layer's input ``a`` and output cotangent ``d``."""
    kernel, stride, dil, pad, pre_pad = _unfold_args(m)
    spatial = a.dim() - 2
    in_size, out_size = list(a.shape[2:]), list(d.shape[d.dim() - spatial:])
    for j in range(spatial if pre_pad else 0):  # 'same': F.pad's pairs, last dimension first
        in_size[-1 - j] += pre_pad[2 * j] + pre_pad[2 * j + 1]
    unit = [1] * (len(kernel) - spatial)  # Conv1d: unfolded as an image of one row
    return _live_taps(kernel, stride, dil, pad, tuple(unit + in_size), tuple(unit + out_size))


def _gram_sums(m, a, d, req, k):
    """``(Σ g², Σ g or None)`` of the weight in the position-Gram form: Σ over (columns and)
    samples of (δ_n u_nᵀ)² = Σ_{l ≤ l'} c_{ll'} (δ_nl ∘ δ_nl')(u_nl ∘ u_nl')ᵀ (c = 1 on the
    diagonal, 2 off it; with K columns the δ products summed over them first), one product per
    chunk of samples, per group. The products of a chunk, P·(K·C_out + C_in·kernel) values a
    sample, stay within ``Policy.chunk_bytes``; a sample that alone exceeds it goes in blocks
    of pairs. Kernel offsets that see only padding are left out (their sums are zero). Σ g (the
    self-check's) is the layer's ordinary weight gradient."""
    n, cout, groups = a.shape[0], m.out_channels, m.groups
    og, width = cout // groups, m.weight[0].numel()  # per group: out channels, patch values
    kernel = math.prod(_unfold_args(m)[0])
    cin_g = width // kernel
    patch_width = m.in_channels * kernel
    taps = _live_offsets(m, a, d)
    keep = None
    if taps is not None:  # the patch values of the live offsets: channel · kernel + offset
        taps = torch.tensor(taps, device=a.device)
        keep = (torch.arange(m.in_channels, device=a.device)[:, None] * kernel + taps).reshape(-1)
        width = cin_g * taps.numel()
    total_width = groups * width
    positions, nk = _positions(d, k), k or 1
    d_all = d.reshape(nk, n, cout, positions)
    rows, cols, doubled = _pairs(positions, a.device)
    pairs = rows.shape[0]
    elem = a.element_size()
    # bytes a sample: its patches and δ (with its doubled copy); a pair's products (two gathered
    # factors and their product, of the patches and of δ)
    fixed = (positions * (patch_width + total_width) + 3 * nk * positions * cout) * elem
    per_pair = 3 * (total_width + cout) * elem
    budget = req.policy.chunk_bytes
    if fixed + pairs * per_pair <= budget:
        step, block = budget // (fixed + pairs * per_pair), pairs
    else:
        step, block = 1, max(1, (budget - fixed) // per_pair)
    acc = torch.zeros(groups, og, width, dtype=a.dtype, device=a.device)
    for s, e in chunks(n, step):
        c = e - s
        u = _patches(m, a[s:e])  # [c, Cin·kernel, L]
        if keep is not None:
            u = u.index_select(1, keep)
        dc = d_all[:, s:e]  # [K, c, O, L]
        if positions == 1:  # one pair: (δ²)ᵀ(u²)
            _gram_product(acc, dc.reshape(nk, c, 1, cout).square().sum(0), u.reshape(c, 1, total_width).square(),
                          groups)
            continue
        u = u.transpose(1, 2)  # [c, L, W]
        dt = dc.transpose(2, 3)  # [K, c, L, O]
        dt = torch.cat([dt, dt * 2], dim=2)  # [K, c, 2L, O]: the off-diagonal pairs' factor 2
        for p0, p1 in chunks(pairs, block):
            r, dbl = rows[p0:p1], doubled[p0:p1]
            uu = u.index_select(1, r).mul_(u.index_select(1, cols[p0:p1]))  # [c, p, W]
            dd = dt[0].index_select(1, r).mul_(dt[0].index_select(1, dbl))  # [c, p, O]
            for j in range(1, nk):
                dd.addcmul_(dt[j].index_select(1, r), dt[j].index_select(1, dbl))
            _gram_product(acc, dd, uu, groups)
    if taps is not None:
        full = torch.zeros(groups, og, cin_g, kernel, dtype=a.dtype, device=a.device)
        acc = full.index_copy_(3, taps, acc.reshape(groups, og, cin_g, taps.numel()))
    tw = None
    if req.totals:
        x, weight_grad = _weight_grad_call(m, a)
        w = torch.empty(m.weight.shape, dtype=a.dtype, device=a.device)  # its shape is what is read
        tw = weight_grad(d if k is None else d.sum(0), x, w, groups)
    return acc.reshape(m.weight.shape), tw


def _gram_product(acc, dd, uu, groups):
    """acc[g] += dd[..., g]ᵀ uu[..., g]: ``dd`` [c, p, O] and ``uu`` [c, p, W] (the rows: samples
    × pairs), ``acc`` [G, O/G, W/G]."""
    rows = dd.shape[0] * dd.shape[1]
    if groups == 1:
        acc[0].addmm_(dd.reshape(rows, -1).t(), uu.reshape(rows, -1))
    else:
        d3 = dd.reshape(rows, groups, -1).permute(1, 2, 0)  # [G, O/G, rows]
        u3 = uu.reshape(rows, groups, -1).transpose(0, 1)  # [G, rows, W/G]
        acc.baddbmm_(d3, u3)


class _GramSquares:
    """Σ_{k,n} (δ_{k,n} u_nᵀ)² over K cotangent columns given piece by piece, without the K·N
    per-sample gradients.

    With L output positions, G_n = Σ_k δ_{k,n} δ_{k,n}ᵀ ([L, L] per output channel) and
    U_n[i] = u_n[i] u_n[i]ᵀ, the sum is Σ_n Σ_{l,l'} G_n[o,l,l'] U_n[i,l,l']. Both are symmetric in
    (l, l'): the P = L(L+1)/2 pairs l ≤ l' suffice (off-diagonal ones counted twice). Columns are
    buffered ``Policy.gram_fold`` at a time and folded into G by one batched product; the result is
    one GEMM of depth N·P (BackPACK's trick for small feature maps, halved by symmetry). Holds G
    (out_channels · N · P values) and the buffer (fold · out_channels · N · L)."""

    covers = ("weight",)

    def __init__(self, m, a, out_shape, req):
        self.m, self.a, self.chunk, self.budget = m, a, req.chunk, req.policy.chunk_bytes
        n, cout = a.shape[0], m.out_channels
        self.positions = positions = math.prod(out_shape[2:])
        iu = torch.triu_indices(positions, positions, device=a.device)
        self.rows, self.cols = iu[0], iu[1]
        self.flat = iu[0] * positions + iu[1]
        self.pairs = iu.shape[1]
        self.group = even_size(req.columns, req.policy.gram_fold)  # K in equal folds of at most gram_fold
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
        for s, e in chunks(n, max(1, self.budget // max(per_sample, 1))):
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
        for s, e in chunks(a.shape[0], max(1, min(self.chunk, self.budget // max(per_sample, 1)))):
            u = _patches(m, a[s:e]).transpose(1, 2)  # [c, L, I]
            uu = u.index_select(1, self.rows).mul_(u.index_select(1, self.cols))  # [c, P, I]
            acc.addmm_(self.g[:, s:e].reshape(cout, -1), uu.reshape(-1, width))
        self.g = None
        return {"weight": acc.reshape(m.weight.shape)}


@register_rule(nn.Conv2d)
class Conv2dRule(ConvRule):
    ndim = 2


@register_rule(nn.Conv1d)
class Conv1dRule(ConvRule):
    ndim = 1
