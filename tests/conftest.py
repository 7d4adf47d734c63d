"""Test-wide settings and markers.

The models here are tiny, and one intra-op thread is faster for them on a loaded 2-core machine than
two fighting threads.

Markers (registered in pyproject.toml) are applied here, by rule, so that test modules need not carry
them:

* ``slow``: more than about 3 s on a 2-core CPU (``pytest --durations=0``). ``make test-fast`` runs
  ``-m "not slow"``; ``make test`` runs everything.
* ``upstream``: the test checks a behaviour (or a known bug) of Avalanche itself, not of this library;
  every ``xfail`` whose reason names an Avalanche bug is one.
"""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)

# Modules that are slow as a whole.
SLOW_MODULES = {
    "test_notebooks.py",  # runs both notebooks in a Jupyter kernel
    "test_gpu_paths_on_cpu.py",  # reruns the rule and estimator suites in a subprocess
}
# (module, fixture): every test using this expensive module-scoped fixture is slow (the fixture's cost is
# charged to whichever of its tests runs first).
SLOW_FIXTURES = {
    ("test_checkpoint.py", "runs"),  # trains, stops and resumes a run in fresh processes
    ("test_distributed.py", "ranks"),  # spawns two gloo processes
}
# (module, test function name): single slow tests.
SLOW_TESTS = {
    ("test_compare.py", "test_run_one_is_reproducible_and_the_same_in_a_worker_pool"),  # a process pool
    ("test_reliability.py", "test_long_stream_memory_flat"),  # a long stream of experiences
}
# (module, test function name): tests of Avalanche's own behaviour that are not xfails.
UPSTREAM_TESTS: set = set()


def _is_upstream_xfail(item) -> bool:
    for mark in item.iter_markers("xfail"):
        reason = str(mark.kwargs.get("reason", mark.args[1] if len(mark.args) > 1 else "")).lower()
        if "avalanche" in reason and "bug" in reason:
            return True
    return False


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.path.name
        func = getattr(item, "originalname", None) or item.name.split("[")[0]
        fixtures = set(getattr(item, "fixturenames", ()))
        if (module in SLOW_MODULES or (module, func) in SLOW_TESTS
                or any(m == module and f in fixtures for m, f in SLOW_FIXTURES)):
            item.add_marker(pytest.mark.slow)
        if (module, func) in UPSTREAM_TESTS or _is_upstream_xfail(item):
            item.add_marker(pytest.mark.upstream)
