"""A pytest plugin (``-p gpu_paths_plugin``, with ``tests/`` on the path) that runs every pass given
no policy with a GPU's policy on the CPU (``using_policy``): every convolution through one
weight-gradient call per chunk, a chunk's squares summed at once, 256-sample chunks under a 256 MiB
budget, the self-check's float64 reductions in pieces of that budget. ``test_gpu_paths_on_cpu.py``
reruns the rule and estimator suites under it, so the GPU paths meet every model those suites hold
(tied weights, hooks, bf16, torch.compile, ...) on a machine without a GPU. At the end it prints how
often the policy chose each convolution path."""

from __future__ import annotations

import collections

from avalanche_pcreg.importance.persample import Policy, using_policy

CALLS: collections.Counter = collections.Counter()


class CountingGpuPolicy(Policy):
    """A GPU's policy that counts the convolution paths it chooses."""

    def conv_path_for(self, module, a, weight_numel, positions):
        path = super().conv_path_for(module, a, weight_numel, positions)
        CALLS[str(path)] += 1
        return path


_context = None


def pytest_configure(config):
    global _context
    gpu = Policy.gpu()
    _context = using_policy(CountingGpuPolicy(**{f: getattr(gpu, f) for f in gpu.__dataclass_fields__}))
    _context.__enter__()


def pytest_unconfigure(config):
    if _context is not None:
        _context.__exit__(None, None, None)


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line("gpu paths forced: " + " ".join(f"{k}={v}" for k, v in sorted(CALLS.items())))
