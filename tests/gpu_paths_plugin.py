"""A pytest plugin (``-p gpu_paths_plugin``, with ``tests/`` on the path) that makes the per-sample
engine take, on the CPU, the code paths it takes on a GPU: every convolution through one
weight-gradient call per chunk, a chunk's squares summed at once, 256-sample chunks under a
256 MiB budget, the self-check's float64 reductions in pieces of that budget. ``test_gpu_paths_on_cpu.py`` reruns the rule and estimator suites under it, so
the GPU paths meet every model those suites hold (tied weights, hooks, bf16, torch.compile, ...)
on a machine without a GPU. At the end it prints how often each forced path ran."""

from __future__ import annotations

import collections

from avalanche_pcreg.importance import _persample
from avalanche_pcreg.importance.rules import _registry, conv, linear

CALLS: collections.Counter = collections.Counter()
_wgrad_chunks = conv._wgrad_chunks


def _path(m, a, d, k):
    CALLS["path"] += 1
    return "wgrad"


def _counted_wgrad(*args, **kwargs):
    CALLS["wgrad"] += 1
    yield from _wgrad_chunks(*args, **kwargs)


def _squares(device):
    CALLS["squares_at_once"] += 1
    return True


def pytest_configure(config):
    conv._per_sample_path = _path
    conv._wgrad_chunks = _counted_wgrad
    conv._squares_at_once = _squares
    conv.chunk_bytes = linear.chunk_bytes = lambda device: _registry.GPU_CHUNK_BYTES
    _persample.default_chunk = lambda device: _persample.GPU_DEFAULT_CHUNK
    _persample._piece = lambda x: _registry.GPU_CHUNK_BYTES // 8


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line("gpu paths forced: " + " ".join(f"{k}={v}" for k, v in sorted(CALLS.items())))
