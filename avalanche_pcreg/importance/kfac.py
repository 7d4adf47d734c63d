"""Kronecker-factored importance (KFAC): one block A ⊗ G per layer instead of a diagonal.

For a layer y = W a (``nn.Linear``; ``nn.Conv1d``/``nn.Conv2d`` with a the unfolded patches) and
the Fisher's cotangents δ at y, the curvature of vec(W) is approximated by A ⊗ G (Martens & Grosse
2015) with

* A = mean over samples and positions of ā āᵀ, ā = (a, 1) when the bias is in the block;
* G = mean over samples of Σ_positions δ δᵀ ("expand" for weight sharing, Eschenhagen et al. 2023).

Its quadratic form is vec(ΔW)ᵀ (A ⊗ G) vec(ΔW) = ⟨ΔW, G ΔW A⟩ with ΔW = [W − W* | b − b*]. The
Fisher behind G is a choice, as for the diagonal estimators: ``fisher="expected"`` (exact: the
columns of the likelihood's Hessian square root, as :func:`~.fisher.expected_fisher`),
``"sampled"`` (labels drawn from the model) or ``"empirical"`` (the true labels). Every other
parameter (norm layers, embeddings, grouped convolutions, layers without Kronecker rows) gets the
diagonal of the same Fisher in the same pass. The factors come from the per-sample engine with
:class:`~.persample.quantity.KroneckerFactors`: the same hooks, the same backward.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, Optional

import torch
from torch import Tensor, nn

from .fisher import empirical_fisher, expected_fisher, fisher
from .persample.quantity import KronBlock, KroneckerFactors

__all__ = ["KronFactors", "KroneckerImportance", "kfac", "check_blocks", "KFAC_FISHERS"]

#: the Fisher behind G: the diagonal estimator whose pass also gives the factors
KFAC_FISHERS = {"expected": expected_fisher, "sampled": fisher, "empirical": empirical_fisher}


@dataclass
class KronFactors:
    """One layer's block A ⊗ G, for the weight ``weight`` (as a matrix [out, in·kernel]) and, when
    ``bias`` names it, the bias as the last column of [W | b]."""

    A: Tensor
    G: Tensor
    weight: str
    bias: Optional[str] = None

    def quadratic(self, delta: Tensor) -> Tensor:
        """⟨Δ, G Δ A⟩ for Δ = [ΔW | Δb] of shape [out, in'] (float64 for a reference)."""
        return (delta * (self.G.to(delta.dtype) @ delta @ self.A.to(delta.dtype))).sum()

    @property
    def names(self):
        return (self.weight,) + ((self.bias,) if self.bias else ())


@dataclass
class KroneckerImportance:
    """What :func:`kfac` returns: ``blocks`` by weight name and ``diagonal`` importances of every
    other requested parameter (``{name: Tensor}``, as the diagonal estimators return)."""

    blocks: Dict[str, KronFactors]
    diagonal: Dict[str, Tensor]

    @property
    def names(self):
        return [n for b in self.blocks.values() for n in b.names] + list(self.diagonal)

    def scaled(self, scale: float) -> "KroneckerImportance":
        """The importance times ``scale`` (G and the diagonal; A is a mean of inputs)."""
        return KroneckerImportance({k: replace(b, G=b.G * scale) for k, b in self.blocks.items()},
                                   {n: v * scale for n, v in self.diagonal.items()})

    def renamed(self, rename) -> "KroneckerImportance":
        """The names mapped by ``rename`` (e.g. to canonical names)."""
        return KroneckerImportance(
            {rename(k): replace(b, weight=rename(b.weight), bias=b.bias and rename(b.bias)) for k, b in self.blocks.items()},
            {rename(n): v for n, v in self.diagonal.items()})

    def to(self, device) -> "KroneckerImportance":
        return KroneckerImportance({k: replace(b, A=b.A.to(device, copy=True), G=b.G.to(device, copy=True))
                                    for k, b in self.blocks.items()},
                                   {n: v.to(device, copy=True) for n, v in self.diagonal.items()})

    def diagonal_view(self, params) -> Dict[str, Tensor]:
        """Per-parameter diagonals: those of the blocks, diag(A ⊗ G), in the shapes of ``params``,
        and the diagonal importances (for summaries that read one number per parameter entry)."""
        out = dict(self.diagonal)
        for b in self.blocks.values():
            a, g = b.A.diagonal(), b.G.diagonal()
            w = params[b.weight]
            out[b.weight] = torch.outer(g, a[:w[0].numel()]).reshape(w.shape)
            if b.bias:
                out[b.bias] = g * a[-1]
        return out


def kfac(model: nn.Module, data, *, names, fisher: str = "expected", **kw) -> KroneckerImportance:
    """Kronecker factors of the layers among ``names`` that have Kronecker rows, and the diagonal
    Fisher of the rest, in one pass over ``data`` (the keyword arguments of the diagonal
    estimator of ``fisher``: ``criterion``, ``device``, ``limit``, ``policy``, ...).

    A layer's bias joins its block when both are requested. Factors are accumulated in float32
    (float64 for float64 models) and stay in that dtype."""
    if fisher not in KFAC_FISHERS:
        raise ValueError(f"fisher must be one of {sorted(KFAC_FISHERS)}, got {fisher!r}")
    quantity = KroneckerFactors()
    sums = KFAC_FISHERS[fisher](model, data, names=names, quantity=quantity, **kw)
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    blocks: Dict[str, KronFactors] = {}
    covered = set()
    for name in names:
        prefix, _, attr = name.rpartition(".")
        if attr != "weight" or prefix not in modules:
            continue
        module = modules[prefix]
        bias = f"{prefix}.bias" if f"{prefix}.bias" in names and getattr(module, "bias", None) is params.get(f"{prefix}.bias") else None
        q = quantity.for_param(module, "weight", {"weight"} | ({"bias"} if bias else set()))
        if not isinstance(q, KronBlock) or sums[name].shape != q.value_shape("weight", params[name]):
            continue
        gsum, asum, rows = q.unpack(sums[name])
        # a layer that saw no input (a head of another task) has no curvature: G = 0, and A = 0
        a = asum / rows if float(rows) > 0 else torch.zeros_like(asum)
        blocks[name] = KronFactors(A=a.contiguous(), G=gsum.contiguous(), weight=name, bias=bias if q.bias else None)
        covered.update(blocks[name].names)
    diagonal = {n: v for n, v in sums.items() if n not in covered}
    return KroneckerImportance(blocks, diagonal)


def check_blocks(importance: KroneckerImportance, params, estimator: str) -> None:
    """ValueError unless every block names parameters of the model and has finite, square factors
    of its layer's sizes with a non-negative diagonal."""
    for wname, blk in importance.blocks.items():
        for n in blk.names:
            if n not in params:
                raise ValueError(f"importance estimator {estimator!r} returned a block for parameter {n!r}, "
                                 "which the model does not have")
        w = params[blk.weight]
        want = {"A": w[0].numel() + (blk.bias is not None), "G": w.shape[0]}
        for what, t in (("A", blk.A), ("G", blk.G)):
            if not isinstance(t, Tensor) or t.dim() != 2 or tuple(t.shape) != (want[what], want[what]):
                got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"Kronecker factor {what} of {wname!r} from estimator {estimator!r} must be "
                                 f"[{want[what]}, {want[what]}], got {got}")
            if not bool(torch.isfinite(t).all()) or bool((t.diagonal() < 0).any()):
                raise ValueError(f"Kronecker factor {what} of {wname!r} from estimator {estimator!r} has "
                                 "NaN/inf entries or a negative diagonal")
