"""The state of the Kronecker-factored layers: their blocks, anchors and consolidated terms.

For each layer, the penalty of all past experiences is one quadratic in Δ = [W | b] − μ
(:mod:`.kron_penalty`): ⟨Δ, Σ_t G_t Δ A_t⟩ + 2⟨Δ, B⟩ + c, μ the latest anchor.

* **separate** (one penalty per experience, each at its own anchor W*_t): Σ_t ⟨W − W*_t,
  G_t (W − W*_t) A_t⟩. Re-anchoring at a new μ' = μ + s leaves it exact with
  B' = B + Q(s), c' = c + ⟨s, Q(s)⟩ + 2⟨s, B⟩ (float64), then the new pair joins at μ'.
* **online** (Ritter, Botev & Barber 2018): the old precision decays by γ and the new one is added,
  all anchored at the latest parameters: Σ_t γ^(T−t) ⟨Δ, G_t Δ A_t⟩, B = 0, c = 0.

A sum of Kronecker products is not a Kronecker product. ``merge="exact"`` keeps every pair (memory
and step cost grow with the number of experiences: two products a pair). ``merge="nearest"`` keeps
one pair a layer: at each merge, the nearest Kronecker product in Frobenius norm (Van Loan &
Pitsianis 1993) to the old pair plus the new one, A' ⊗ G' ≈ A ⊗ G + A_new ⊗ G_new. It is exact when
the layer's input statistics (all A_t equal) or its cotangent statistics (all G_t equal) do not
change between experiences; its error against the exact form is measured in
``benchmarks/bench_kfac.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, List, Mapping, Optional, Tuple

import torch
from torch import Tensor

from .importance.kfac import KronFactors, KroneckerImportance
from .kron_penalty import kron_apply, kron_penalty

__all__ = ["KronLayer", "KronState", "KRON_MERGES", "block_matrix", "nearest_kronecker"]

#: how the blocks of several experiences are kept
KRON_MERGES = ("exact", "nearest")


def _wide(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def block_matrix(weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """[W | b]: the weight as a matrix [out, in·kernel], the bias as its last column."""
    w = weight.detach().reshape(weight.shape[0], -1)
    return w if bias is None else torch.cat([w, bias.detach().reshape(-1, 1)], 1)


@dataclass
class KronLayer:
    """One layer's consolidated penalty: ``pairs`` [(A_t, G_t)], anchor ``mu`` [out, in'], linear
    term ``lin`` (None: zero) and constant ``const`` (float64)."""

    weight: str
    bias: Optional[str]
    pairs: List[Tuple[Tensor, Tensor]]
    mu: Tensor
    lin: Optional[Tensor] = None
    const: Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.float64))

    def quadratic(self, delta: Tensor) -> Tensor:
        """Σ_t ⟨Δ, G_t Δ A_t⟩ (in Δ's dtype)."""
        return (delta * kron_apply(delta, [(a.to(delta.dtype), g.to(delta.dtype)) for a, g in self.pairs])).sum()

    def nbytes(self) -> int:
        ts = [t for p in self.pairs for t in p] + [self.mu] + ([self.lin] if self.lin is not None else [])
        return sum(t.numel() * t.element_size() for t in ts)


class KronState:
    """The Kronecker-factored layers of a regularizer, by weight name.

    :param mode: ``"separate"`` or ``"online"``.
    :param decay: γ of online mode (1.0 if None).
    :param merge: ``"exact"`` (every pair kept) or ``"nearest"`` (one pair; see the module docstring).
    """

    def __init__(self, mode: str = "separate", decay: Optional[float] = None, merge: str = "exact"):
        if merge not in KRON_MERGES:
            raise ValueError(f"kfac_merge must be one of {KRON_MERGES}, got {merge!r}")
        self.mode = mode
        self.decay = 1.0 if decay is None else float(decay)
        self.merge = merge
        self.layers: Dict[str, KronLayer] = {}
        self._curvatures = None  # (iters, the layers they were computed for, {name: curvature})

    @property
    def names(self) -> List[str]:
        return [n for layer in self.layers.values() for n in (layer.weight, layer.bias) if n]

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers.values())

    # ------------------------------------------------------------------ merging
    def merged(self, importance: KroneckerImportance, params: Mapping[str, Tensor]) -> "KronState":
        """A new state with the blocks of ``importance`` added, anchored at ``params`` (this one
        is left as it is)."""
        new = KronState(self.mode, self.decay, self.merge)
        new.layers = dict(self.layers)
        for wname, blk in importance.blocks.items():
            theta = block_matrix(params[wname], params[blk.bias] if blk.bias else None)
            old = self.layers.get(wname)
            if old is not None and (old.bias != blk.bias or tuple(old.mu.shape) != tuple(theta.shape)):
                raise ValueError(f"kfac state of {wname!r}: its block was {tuple(old.mu.shape)} with bias "
                                 f"{old.bias!r}, the new one {tuple(theta.shape)} with bias {blk.bias!r}")
            new.layers[wname] = self._merge_layer(old, blk, theta)
        return new

    def _merge_layer(self, old: Optional[KronLayer], blk: KronFactors, theta: Tensor) -> KronLayer:
        dt = _wide(theta.dtype)
        a_new, g_new = blk.A.to(dt), blk.G.to(dt)
        mu_new = theta.to(dt).clone()
        if old is None:
            return KronLayer(blk.weight, blk.bias, [(a_new, g_new)], mu_new, None,
                             torch.zeros((), dtype=torch.float64, device=theta.device))
        gamma = self.decay if self.mode == "online" else 1.0
        pairs = [(a, g * gamma) for a, g in old.pairs] if gamma != 1.0 else list(old.pairs)
        lin, const = None, torch.zeros((), dtype=torch.float64, device=theta.device)
        if self.mode == "separate":  # re-anchor the old terms exactly at the new anchor (float64)
            s = (mu_new.to(torch.float64) - old.mu.to(torch.float64))
            qs = kron_apply(s, [(a.double(), g.double()) for a, g in pairs])
            lin64 = qs if old.lin is None else qs + old.lin.double()
            const = old.const + (s * qs).sum() + (2 * (s * old.lin.double()).sum() if old.lin is not None else 0.0)
            lin = lin64.to(dt)
        pairs = pairs + [(a_new, g_new)]
        if self.merge == "nearest":
            pairs = [nearest_kronecker(pairs)]
        return KronLayer(blk.weight, blk.bias, pairs, mu_new, lin, const)

    # ------------------------------------------------------------------ growing layers
    def aligned(self, params: Mapping[str, Tensor]) -> "KronState":
        """The state for layers that grew (a head with more outputs, more inputs): new rows of G and
        columns of A are zero, new anchor entries the current values (so they start free)."""
        new = None
        for wname, layer in self.layers.items():
            if wname not in params:
                continue
            theta = block_matrix(params[wname], params[layer.bias] if layer.bias else None)
            if tuple(theta.shape) == tuple(layer.mu.shape) and layer.mu.device == theta.device:
                continue
            new = new or self._copy()
            if layer.mu.device != theta.device:
                layer = KronState._moved(layer, theta.device)
            if tuple(theta.shape) != tuple(layer.mu.shape):
                layer = _grown(layer, theta)
            new.layers[wname] = layer
        return new or self

    def _copy(self) -> "KronState":
        new = KronState(self.mode, self.decay, self.merge)
        new.layers = dict(self.layers)
        return new

    # ------------------------------------------------------------------ curvature
    def curvatures(self, iters: int = 50) -> Dict[str, float]:
        """A lower bound of each layer's largest curvature, the top eigenvalue of Σ_t G_t ⊗ A_t (the
        penalty's Hessian is 2 · factor times it), under the layer's weight and bias names: the
        largest λ(G_t)·λ(A_t) of its pairs (each term is positive semi-definite), every λ a
        Rayleigh quotient of :func:`top_eigenvalue`. Exact up to that iteration for one pair. Kept
        until a layer changes (an online stream asks at every mini-experience)."""
        layers = tuple(self.layers.values())
        kept = self._curvatures
        if kept is not None and kept[0] == iters and len(kept[1]) == len(layers) \
                and all(x is y for x, y in zip(kept[1], layers)):
            return dict(kept[2])
        out: Dict[str, float] = {}
        for layer in layers:
            top = max(top_eigenvalue(g, iters) * top_eigenvalue(a, iters) for a, g in layer.pairs)
            out.update({n: top for n in (layer.weight, layer.bias) if n})
        self._curvatures = (iters, layers, out)
        return dict(out)

    def scaled(self, scales: Mapping[str, float]) -> "KronState":
        """A copy whose layers named in ``scales`` (by weight name) have their whole quadratic
        multiplied by the scale (same minimum point, curvature times the scale)."""
        new = self._copy()
        for wname, c in scales.items():
            layer = new.layers[wname]
            new.layers[wname] = replace(layer, pairs=[(a, g * c) for a, g in layer.pairs],
                                        lin=None if layer.lin is None else layer.lin * c, const=layer.const * c)
        return new

    # ------------------------------------------------------------------ penalty
    def penalty(self, params: Mapping[str, Tensor], factor: float) -> Optional[Tensor]:
        """factor · Σ_layers R_layer over the layers present in ``params``, or None with none. A
        layer that grew since its last merge is padded on the fly (its new entries are free; call
        :meth:`aligned` once per experience to avoid that)."""
        total = None
        for wname, layer in self.layers.items():
            w = params.get(wname)
            b = params.get(layer.bias) if layer.bias else None
            if w is None or (layer.bias and b is None):
                continue
            if (w.shape[0], w[0].numel() + (b is not None)) != tuple(layer.mu.shape):
                layer = _grown(layer, block_matrix(w, b))
            if layer.mu.device != w.device:  # the model moved (call aligned() to move the state once)
                layer = self._moved(layer, w.device)
            term = kron_penalty(factor, layer.pairs, layer.mu, layer.lin, layer.const, w, b)
            total = term if total is None else total + term
        return total

    @staticmethod
    def _moved(layer: KronLayer, device) -> KronLayer:
        return replace(layer, pairs=[(a.to(device), g.to(device)) for a, g in layer.pairs], mu=layer.mu.to(device),
                       lin=None if layer.lin is None else layer.lin.to(device), const=layer.const.to(device))

    def to(self, device) -> "KronState":
        new = self._copy()
        new.layers = {k: self._moved(layer, device) for k, layer in self.layers.items()}
        return new

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {"mode": self.mode, "decay": self.decay, "merge": self.merge,
                "layers": {k: {"weight": v.weight, "bias": v.bias, "A": [a for a, _ in v.pairs],
                               "G": [g for _, g in v.pairs], "mu": v.mu, "lin": v.lin, "const": v.const}
                           for k, v in self.layers.items()}}

    @classmethod
    def from_state_dict(cls, sd: Mapping, map_location=None) -> "KronState":
        st = cls(sd["mode"], sd["decay"], sd["merge"])
        for k, v in sd["layers"].items():
            def mv(t):
                return t if t is None or map_location is None else t.to(map_location)
            if len(v["A"]) != len(v["G"]) or not v["A"]:
                raise ValueError(f"kfac state of {k!r}: {len(v['A'])} A factors and {len(v['G'])} G factors")
            st.layers[k] = KronLayer(v["weight"], v["bias"], [(mv(a), mv(g)) for a, g in zip(v["A"], v["G"])],
                                     mv(v["mu"]), mv(v["lin"]), mv(v["const"]))
        return st


def top_eigenvalue(m: Tensor, iters: int = 50) -> float:
    """The Rayleigh quotient of the symmetric positive semi-definite ``m`` after ``iters`` power
    iterations from a fixed random start: a lower bound of its largest eigenvalue that converges to
    it (one matrix-vector product an iteration)."""
    g = torch.Generator().manual_seed(0)
    v = torch.randn(m.shape[0], generator=g, dtype=torch.float64).to(device=m.device, dtype=m.dtype)
    tiny = torch.finfo(m.dtype).tiny
    for _ in range(iters):  # no host synchronisation inside the loop
        w = m @ v
        v = w / w.norm().clamp_min(tiny)  # a zero matrix leaves v = 0 and the quotient 0
    return max(0.0, float(v @ (m @ v)))


def nearest_kronecker(pairs: List[Tuple[Tensor, Tensor]]) -> Tuple[Tensor, Tensor]:
    """(A, G) whose A ⊗ G is nearest in Frobenius norm to Σ_t A_t ⊗ G_t (Van Loan & Pitsianis).

    Σ_t A_t ⊗ G_t rearranges to the matrix R = Σ_t vec(A_t) vec(G_t)ᵀ = P Qᵀ, and A ⊗ G to
    vec(A) vec(G)ᵀ: the best rank-one approximation of R. Its left vector is P c with c the top
    eigenvector of (QᵀQ)(PᵀP), a T × T matrix of inner products of the factors (non-negative for
    positive semi-definite factors, so c ≥ 0 and A, G stay positive semi-definite)."""
    if len(pairs) == 1:
        return pairs[0]
    dt = pairs[0][0].dtype
    p = torch.stack([a.reshape(-1).double() for a, _ in pairs], 1)
    q = torch.stack([g.reshape(-1).double() for _, g in pairs], 1)
    ma, mg = p.t() @ p, q.t() @ q
    vals, vecs = torch.linalg.eig(mg @ ma)
    c = vecs[:, vals.real.argmax()].real
    c = c * torch.sign(c.sum())
    d = (ma @ c) / (c @ ma @ c)
    a = sum(ci * ai.double() for ci, (ai, _) in zip(c.tolist(), pairs))
    g = sum(di * gi.double() for di, (_, gi) in zip(d.tolist(), pairs))
    return a.to(dt), g.to(dt)


def _grown(layer: KronLayer, theta: Tensor) -> KronLayer:
    """``layer`` padded to the block shape of ``theta`` (outputs and inputs may only grow)."""
    out0, in0 = layer.mu.shape
    out1, in1 = theta.shape
    has_b = layer.bias is not None
    if out1 < out0 or in1 < in0:
        raise ValueError(f"kfac state of {layer.weight!r}: the layer shrank from {(out0, in0)} to {(out1, in1)}")
    # the columns of the old block within the new one (the bias column stays last)
    w0 = in0 - has_b
    cols = list(range(w0)) + ([in1 - 1] if has_b else [])
    cols_t = torch.tensor(cols, device=theta.device)

    def pad_a(a):
        out = a.new_zeros(in1, in1)
        out[cols_t.unsqueeze(1), cols_t.unsqueeze(0)] = a
        return out

    def pad_g(g):
        out = g.new_zeros(out1, out1)
        out[:out0, :out0] = g
        return out

    mu = theta.to(layer.mu.dtype).clone()
    mu[:out0, cols_t] = layer.mu
    lin = None
    if layer.lin is not None:
        lin = layer.lin.new_zeros(out1, in1)
        lin[:out0, cols_t] = layer.lin
    return replace(layer, pairs=[(pad_a(a), pad_g(g)) for a, g in layer.pairs], mu=mu, lin=lin)
