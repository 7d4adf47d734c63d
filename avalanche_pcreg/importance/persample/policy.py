"""The execution policy of a per-sample pass: every tuning choice, in one frozen object.

A pass builds one :class:`Policy` from its device (:func:`default_policy`) unless it is given one
(``compute_importance(..., policy=...)``, ``PerSampleGradNorms(..., policy=...)``). Nothing else
in the engine or the rules holds a tuning constant: they read the policy they are handed. A policy
changes speed and memory, never a result beyond floating-point rounding. Each default names the
section of ``benchmarks/RESULTS.md`` that measured it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

__all__ = ["Policy", "default_policy", "using_policy", "CONV_PATHS", "CONV_SUMS", "conv_sums_costs"]

MiB = 2 ** 20

#: values of :attr:`Policy.conv_path`
CONV_PATHS = ("auto", "kernel", "matmul", "wgrad", "batched")

#: values of :attr:`Policy.conv_sums`
CONV_SUMS = ("auto", "per_sample", "gram")

# Input values of one float32 sample above which ATen sends a batch-of-one convolution to the CPU
# convolution library (oneDNN), and below which to its own im2col + GEMM (``use_mkldnn`` in ATen's
# Convolution.cpp). Not a tuning choice of ours: the "kernel" path is only fast where ATen takes it.
ATEN_ONEDNN_MIN_INPUT = 20480


@dataclass(frozen=True)
class Policy:
    """How a per-sample pass runs: chunk sizes, byte budgets, reduction pieces, convolution paths.

    :param chunk_size: samples whose per-sample gradients are formed at once (convolutions,
        sequences, the fallbacks). CPU 16: RESULTS.md section 2b (ResNet-18's peak memory 2.54x a
        training step at 16 against 4.0x at 64, before streaming); GPU 256: section 5b (runs A and
        B: 0.53 -> 0.40 s a ResNet-18 pass).
    :param chunk_bytes: the most bytes of per-sample gradients and patches formed at once; also the
        least state the column accumulators may hold. CPU 16 MiB: section 2b, item 4; GPU 256 MiB:
        section 5b, run B.
    :param column_bytes: the most bytes of δ that one vmapped backward of K cotangent columns
        returns (``PerSampleGradNorms(max_bytes=...)``): 64 MiB, section 2b, item 5.
    :param columns_per_backward: cotangent columns per vmapped backward; None: as many as
        ``column_bytes`` and the size of the running sums allow (1: one streamed column at a time).
    :param column_accumulators: let rules sum the K columns together (``Rule.column_accumulator``:
        ``nn.Linear``'s Σ_k δ², the convolutions' Gram form); False: every piece of columns
        through ``Rule.column_sums``.
    :param reduction_piece: elements per piece of the self-check's float64 reductions (a float64
        reduction of a float32 tensor first makes a float64 copy of it). CPU 64 Ki: section 2a
        (peak memory); GPU one chunk's bytes / 8: section 5b (one launch per piece).
    :param conv_path: how convolutions form per-sample weight gradients. ``"auto"``: on the CPU one
        sample at a time for layers of at least ``per_sample_call_min_macs`` multiply-adds a sample
        (``"kernel"`` where ATen gives a batch of one float32 sample to the convolution library,
        else ``"matmul"``), the batched paths below that; on another device ``"wgrad"``.
        ``"kernel"``, ``"matmul"``, ``"wgrad"`` (one weight-gradient call per chunk, the samples as
        groups; GPU default, section 5b run C) and ``"batched"`` (unfold + batched matmul) force
        one path.
    :param per_sample_call_min_macs: see ``conv_path``: 2.5 M, section 2c.
    :param squares_at_once: a chunk's squared per-sample gradients go into the sum in one launch
        (GPU: section 5b, run B) rather than one sample at a time with no squared copy (CPU:
        section 2b, item 4).
    :param gram_positions_per_column: the convolutions' Gram form sums K columns when the output
        positions are at most this many times K: 2, section 2c.
    :param gram_fold: columns buffered per batched product of the Gram form: 8, section 2d (one
        column a product: 6-17% slower a 10-class ResNet-18 expected Fisher pass; 32: no faster).
    :param conv_sums: how a convolution's Σ_n g_n² (power 2) is formed. ``"per_sample"``: from each
        sample's weight gradient, through ``conv_path``; ``"gram"``: the position-Gram form, one
        matrix product of depth N·L(L+1)/2 over the pairs of output positions, no per-sample
        gradient (one output position: one product of the squares); ``"auto"``: the cheaper of
        the two for the layer's shapes by :func:`conv_sums_costs` (:meth:`conv_sums_for`). Other
        quantities (power 1) always take the per-sample form. CPU ``"auto"``: section "Convolution
        sums by a cost model" (torchvision's ResNet-18 at 32×32, empirical Fisher: 0.32x -> 0.60x a
        minibatch forward + backward; the CIFAR-stem ResNet-18 unchanged). GPU ``"per_sample"``:
        the Gram form has not been measured on a GPU.
    :param value_macs: the cost model's price of a value formed in memory and read back, in
        multiply-adds of a large matrix product: 27, the median over the layers of at most 16
        output positions of both ResNet-18s (section "Convolution sums by a cost model"; any
        price from 7 to 170 makes the same choices there).
    """

    chunk_size: int = 16
    chunk_bytes: int = 16 * MiB
    column_bytes: int = 64 * MiB
    columns_per_backward: Optional[int] = None
    column_accumulators: bool = True
    reduction_piece: int = 2 ** 16
    conv_path: str = "auto"
    per_sample_call_min_macs: int = 2_500_000
    squares_at_once: bool = False
    gram_positions_per_column: int = 2
    gram_fold: int = 8
    conv_sums: str = "auto"
    value_macs: int = 27

    def __post_init__(self):
        for name in ("chunk_size", "chunk_bytes", "column_bytes", "reduction_piece", "gram_fold",
                     "columns_per_backward", "per_sample_call_min_macs",
                     "gram_positions_per_column", "value_macs"):
            value = getattr(self, name)
            optional = name == "columns_per_backward"
            low = 0 if name in ("per_sample_call_min_macs", "gram_positions_per_column", "value_macs") else 1
            if value is None and optional:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"Policy.{name} must be an int >= {low}{' or None' if optional else ''}, "
                                 f"got {value!r}")
        if self.conv_path not in CONV_PATHS:
            raise ValueError(f"Policy.conv_path must be one of {CONV_PATHS}, got {self.conv_path!r}")
        if self.conv_sums not in CONV_SUMS:
            raise ValueError(f"Policy.conv_sums must be one of {CONV_SUMS}, got {self.conv_sums!r}")

    # ------------------------------------------------------------------ the defaults
    @classmethod
    def cpu(cls) -> "Policy":
        """The CPU's policy: small chunks that stay in cache, one sample at a time for large layers."""
        return cls()

    @classmethod
    def gpu(cls) -> "Policy":
        """A GPU's policy: large chunks and one launch per chunk (small ones leave the device idle)."""
        return cls(chunk_size=256, chunk_bytes=256 * MiB, reduction_piece=256 * MiB // 8, conv_path="wgrad",
                   squares_at_once=True, conv_sums="per_sample")

    @classmethod
    def for_device(cls, device) -> "Policy":
        """:meth:`cpu` for the CPU, :meth:`gpu` for any other device (``torch.device`` or str)."""
        return cls.cpu() if torch.device(device).type == "cpu" else cls.gpu()

    def replace(self, **changes) -> "Policy":
        """A copy with ``changes`` (checked), e.g. ``policy.replace(chunk_size=64)``."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ decisions
    def conv_path_for(self, module, a, weight_numel: int, positions: int) -> Optional[str]:
        """The convolution path for a layer with ``weight_numel`` weights and ``positions`` output
        positions on input ``a``: ``"kernel"``, ``"matmul"``, ``"wgrad"``, or None (batched)."""
        if self.conv_path != "auto":
            return None if self.conv_path == "batched" else self.conv_path
        if a.device.type != "cpu":
            return "wgrad"
        if weight_numel * positions < self.per_sample_call_min_macs:
            return None
        library = torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
        return ("kernel" if library and a.dtype == torch.float32 and a[0].numel() > ATEN_ONEDNN_MIN_INPUT
                else "matmul")

    def conv_sums_for(self, n: int, positions: int, width: int, out_channels: int, columns: int = 1) -> str:
        """How a convolution forms Σ g² (power 2): ``"gram"`` or ``"per_sample"``, for ``n``
        samples, ``positions`` output positions, ``width`` = C_in/groups · kernel values a patch
        (a weight row), ``out_channels`` and ``columns`` cotangents a sample. ``conv_sums`` unless
        it is ``"auto"``; then the cheaper form by :func:`conv_sums_costs`."""
        if self.conv_sums != "auto":
            return self.conv_sums
        per_sample, gram = conv_sums_costs(n, positions, width, out_channels, columns, self.value_macs)
        return "gram" if gram < per_sample else "per_sample"

    def use_gram(self, positions: int, columns: int) -> bool:
        """Whether K = ``columns`` cotangent columns at ``positions`` output positions take the
        convolutions' Gram form (GEMM depth L(L+1)/2 a sample against K·L for the direct products)."""
        return positions <= self.gram_positions_per_column * columns


def conv_sums_costs(n: int, positions: int, width: int, out_channels: int, columns: int = 1,
                    value_macs: int = 27):
    """``(per-sample form, Gram form)``: the cost, in multiply-adds, of a convolution's Σ g² over
    ``n`` samples × ``columns`` cotangents, a weight of ``out_channels`` × ``width`` (per group; the
    groups scale both alike), ``positions`` = L output positions. A value written to memory and
    read back costs ``value_macs`` multiply-adds.

    * per sample: each gradient is a product of depth L (K·N·O·I·L multiply-adds) whose K·N·O·I
      values are written and read back to be squared;
    * Gram: over the P = L(L+1)/2 pairs of positions, the products of δ (K·N·P·O) and of the
      patches (N·P·I) are formed, written and read by one product of depth N·P (N·P·O·I).
    """
    k, n, o, i, L = columns, n, out_channels, width, positions
    pairs = L * (L + 1) // 2
    per_sample = k * n * o * i * L + value_macs * k * n * o * i
    gram = n * pairs * o * i + (1 + value_macs) * n * pairs * (k * o + i)
    return per_sample, gram


# The policy of passes given none, when one is installed (see using_policy).
_installed: list = []


def default_policy(device) -> Policy:
    """The policy of a pass on ``device`` that is given none: the one installed by
    :func:`using_policy`, else :meth:`Policy.for_device`."""
    return _installed[-1] if _installed else Policy.for_device(device)


@contextlib.contextmanager
def using_policy(policy: Policy) -> Iterator[Policy]:
    """Within the block, every pass that is given no policy runs with ``policy``, whatever its
    device (e.g. a GPU's policy on the CPU, to test the GPU's code paths there). Not thread-safe:
    meant for tests and benchmarks; pass ``policy=`` where you can."""
    if not isinstance(policy, Policy):
        raise TypeError(f"using_policy needs a Policy, got {type(policy).__name__}")
    _installed.append(policy)
    try:
        yield policy
    finally:
        _installed.pop()

