"""Peer libraries computing the same diagonal Fisher estimates as ours, for ``bench_importance.py --peers``.

Every function takes ``(model, data, batch, device)`` and returns ``{parameter name: Tensor}`` (the
mean over samples), so that its result is compared with ours before it is timed. A peer that is
not installed (or fails on a model) is reported and skipped; none of them is a dependency of the
library (``pip install backpack-for-pytorch opacus nngeometry``).

* BackPACK (Dangel et al. 2020): ``SumGradSquared`` and ``BatchGrad`` (squared, summed) for the
  empirical Fisher, ``DiagGGNExact`` for the exact expected Fisher (for softmax cross-entropy the
  generalized Gauss-Newton is the Fisher), ``DiagGGNMC(mc_samples=1)`` for the sampled one.
* Opacus (Yousefpour et al. 2021): ``GradSampleModule`` per-sample gradients, squared and summed;
  for the expected Fisher one forward and backward per class of ``sqrt(p_c) * -log p_c``
  (its hooks keep one forward's activations per backward).
* nngeometry (George 2021): ``FIM(..., PMatDiag)`` (exact expected Fisher, closed form), and a
  ``PMatDiag`` of the Jacobian of the per-sample loss for the empirical Fisher.
"""

from __future__ import annotations

import importlib.metadata
import weakref
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

PEERS = {"backpack": "backpack-for-pytorch", "opacus": "opacus", "nngeometry": "nngeometry"}

# What a peer prepares once per model (BackPACK's extended/converted module, Opacus's wrapper), so
# that timed passes measure the pass, not the set-up.
_PREPARED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def peer_version(peer: str) -> Optional[str]:
    """The installed version of a peer's distribution, or None when it is not installed."""
    try:
        return importlib.metadata.version(PEERS[peer])
    except importlib.metadata.PackageNotFoundError:
        return None


def _loader(data, batch):
    return DataLoader(data, batch_size=batch, shuffle=False, collate_fn=getattr(data, "collate_fn", None))


def _names(model):
    return [n for n, p in model.named_parameters() if p.requires_grad]


# ------------------------------------------------------------------------------------------ BackPACK
def _backpack(model, data, batch, device, make_ext, attr, square_sum=False, converter=False):
    from backpack import backpack, extend

    model.eval()
    if model not in _PREPARED:
        for m in model.modules():  # BackPACK needs each module's output untouched: no in-place ReLU
            if getattr(m, "inplace", False):
                m.inplace = False
        _PREPARED[model] = (extend(model, use_converter=converter), extend(nn.CrossEntropyLoss(reduction="sum")))
    net, lossf = _PREPARED[model]
    net.eval()
    names = _names(model)
    params = dict(net.named_parameters())
    # the converter (torch.fx) may rename parameters: match by position
    pmap = dict(zip(names, [p for p in params.values() if p.requires_grad]))
    sums = {n: torch.zeros_like(p) for n, p in pmap.items()}
    count = 0
    ext = make_ext()
    for x, y, *_ in _loader(data, batch):
        x, y = x.to(device), y.to(device)
        net.zero_grad(set_to_none=True)
        loss = lossf(net(x), y)
        with backpack(ext):
            loss.backward()
        for n, p in pmap.items():
            v = getattr(p, attr)
            sums[n] += v.square().sum(0) if square_sum else v
            delattr(p, attr)
        count += x.shape[0]
    net.zero_grad(set_to_none=True)
    return {n: s / count for n, s in sums.items()}


def backpack_sum_grad_squared(model, data, batch, device):
    from backpack.extensions import SumGradSquared

    return _backpack(model, data, batch, device, SumGradSquared, "sum_grad_squared",
                     converter=_needs_converter(model))


def backpack_batch_grad(model, data, batch, device):
    from backpack.extensions import BatchGrad

    return _backpack(model, data, batch, device, BatchGrad, "grad_batch", square_sum=True,
                     converter=_needs_converter(model))


def backpack_diag_ggn_exact(model, data, batch, device):
    from backpack.extensions import DiagGGNExact

    return _backpack(model, data, batch, device, DiagGGNExact, "diag_ggn_exact",
                     converter=_needs_converter(model))


def backpack_diag_ggn_mc(model, data, batch, device):
    from backpack.extensions import DiagGGNMC

    return _backpack(model, data, batch, device, lambda: DiagGGNMC(mc_samples=1), "diag_ggn_mc",
                     converter=_needs_converter(model))


def _needs_converter(model):
    """BackPACK needs its torch.fx converter for non-sequential models (a ResNet's residual
    ``out += identity`` modifies a hooked module's output in place)."""
    return not isinstance(model, nn.Sequential)


# ------------------------------------------------------------------------------------------ Opacus
def _opacus(model, data, batch, device, expected: bool):
    from opacus import GradSampleModule

    # Opacus's hooks capture activations only in train mode; the normalization layers stay in
    # eval mode (running statistics), as in every other variant.
    # Opacus has no per-sample rule for BatchNorm (it refuses layers with buffers): their affine
    # parameters are frozen for this run and left out of its result and of the comparison.
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)
    names = _names(model)
    if model not in _PREPARED:
        _PREPARED[model] = GradSampleModule(model, loss_reduction="sum", strict=False)
    gsm = _PREPARED[model]
    params = dict(model.named_parameters())
    sums = {n: torch.zeros_like(params[n]) for n in names}
    count = 0

    def collect():
        for n in names:
            p = params[n]
            if p.grad_sample is not None:
                sums[n] += p.grad_sample.square().sum(0)
            p.grad_sample = None
            p.grad = None

    for x, y, *_ in _loader(data, batch):
        x, y = x.to(device), y.to(device)
        if not expected:
            F.cross_entropy(gsm(x), y, reduction="sum").backward()
            collect()
        else:
            classes = None
            c = 0
            while classes is None or c < classes:
                logp = torch.log_softmax(gsm(x), dim=-1)
                classes = logp.shape[-1]
                (-(logp[:, c].detach().exp().sqrt() * logp[:, c]).sum()).backward()
                collect()
                c += 1
        count += x.shape[0]
    return {n: s / count for n, s in sums.items()}


def opacus_empirical(model, data, batch, device):
    return _opacus(model, data, batch, device, expected=False)


def opacus_expected(model, data, batch, device):
    return _opacus(model, data, batch, device, expected=True)


# ------------------------------------------------------------------------------------------ nngeometry
def _nngeometry(model, data, batch, device, expected: bool):
    from nngeometry.backend import TorchHooksJacobianBackend
    from nngeometry.layercollection import LayerCollection
    from nngeometry.metrics import FIM
    from nngeometry.object import PMatDiag, PVector

    model.eval()
    lc = LayerCollection.from_model(model)
    loader = _loader(data, batch)
    if expected:
        fim = FIM(model, loader, PMatDiag, variant="classif_logits", device=device, layer_collection=lc)
    else:
        def per_sample_loss(x, y, *_):
            return F.cross_entropy(model(x.to(device)), y.to(device), reduction="none").unsqueeze(1)

        gen = TorchHooksJacobianBackend(layer_collection=lc, model=model, function=per_sample_loss)
        fim = PMatDiag(generator=gen, examples=loader)
    parts = PVector(lc, vector_repr=fim.get_diag()).to_dict()
    out = {}
    for layer_id, tensors in parts.items():
        out[f"{layer_id}.weight"] = tensors[0]
        if len(tensors) > 1 and tensors[1] is not None:
            out[f"{layer_id}.bias"] = tensors[1]
    missing = set(_names(model)) - set(out)
    if missing:
        raise RuntimeError(f"nngeometry left out parameters {sorted(missing)[:4]}")
    return out


def nngeometry_empirical(model, data, batch, device):
    return _nngeometry(model, data, batch, device, expected=False)


def nngeometry_expected(model, data, batch, device):
    return _nngeometry(model, data, batch, device, expected=True)


# estimator -> column -> [(label, function)]
PEER_VARIANTS: Dict[str, Dict[str, list]] = {
    "empirical_fisher": {
        "backpack": [("SumGradSquared", backpack_sum_grad_squared), ("BatchGrad", backpack_batch_grad)],
        "opacus": [("GradSampleModule", opacus_empirical)],
        "nngeometry": [("PMatDiag", nngeometry_empirical)],
    },
    "expected_fisher": {
        "backpack": [("DiagGGNExact", backpack_diag_ggn_exact)],
        "opacus": [("GradSampleModule, C passes", opacus_expected)],
        "nngeometry": [("FIM PMatDiag", nngeometry_expected)],
    },
    "fisher": {  # one label per sample drawn from p(.|x): Monte Carlo, so results differ by sampling noise
        "backpack": [("DiagGGNMC", backpack_diag_ggn_mc)],
    },
}


def available(peer: str) -> bool:
    return peer_version(peer) is not None

