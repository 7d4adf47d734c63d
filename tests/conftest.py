"""Test-wide settings and markers.

The models here are tiny, and one intra-op thread is faster for them on a loaded 2-core machine than
two fighting threads.

Markers (registered in pyproject.toml) are applied here, by rule, so that test modules need not carry
them:

* ``slow``: by measurement. ``tests/durations.json`` holds each test's measured time (setup, call and
  teardown) and the module- or session-scoped fixtures whose setup alone took long; a test is slow when
  its time, or the setup of a fixture it uses, exceeded :data:`SLOW_SECONDS`. ``make durations``
  measures the whole suite again and rewrites the file (``pytest --store-durations``). A test not yet
  measured counts as fast. ``make test-fast`` runs ``-m "not slow"``; ``make test`` runs everything.
* ``upstream``: the test checks a behaviour (or a known bug) of Avalanche itself, not of this library;
  every ``xfail`` whose reason names an Avalanche bug is one.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

DURATIONS = Path(__file__).with_name("durations.json")
# 3 s on the 2-core CPU the suite is measured on
SLOW_SECONDS = 3.0
# (module, test function name): tests of Avalanche's own behaviour that are not xfails.
UPSTREAM_TESTS: set = set()


def pytest_addoption(parser):
    parser.addoption("--store-durations", action="store_true",
                     help=f"measure every test (and each module/session fixture's setup) into {DURATIONS.name}")


def _measured() -> dict:
    try:
        data = json.loads(DURATIONS.read_text())
    except (OSError, ValueError):
        return {"tests": {}, "fixtures": {}}
    return {"tests": data.get("tests", {}), "fixtures": data.get("fixtures", {})}


def _fixture_key(module: str, argname: str) -> str:
    return f"{module}::{argname}"


def _is_upstream_xfail(item) -> bool:
    for mark in item.iter_markers("xfail"):
        reason = str(mark.kwargs.get("reason", mark.args[1] if len(mark.args) > 1 else "")).lower()
        if "avalanche" in reason and "bug" in reason:
            return True
    return False


def pytest_collection_modifyitems(config, items):
    measured = _measured()
    tests, fixtures = measured["tests"], measured["fixtures"]
    for item in items:
        module = item.path.name
        func = getattr(item, "originalname", None) or item.name.split("[")[0]
        slow_fixture = any(fixtures.get(_fixture_key(module, f), 0.0) > SLOW_SECONDS
                           or fixtures.get(_fixture_key("*", f), 0.0) > SLOW_SECONDS
                           for f in getattr(item, "fixturenames", ()))
        if tests.get(item.nodeid, 0.0) > SLOW_SECONDS or slow_fixture:
            item.add_marker(pytest.mark.slow)
        if (module, func) in UPSTREAM_TESTS or _is_upstream_xfail(item):
            item.add_marker(pytest.mark.upstream)


class _Recorder:
    """``--store-durations``: each test's setup + call + teardown, and each module/session fixture's setup."""

    def __init__(self):
        self.tests: dict = {}
        self.fixtures: dict = {}

    @pytest.hookimpl(hookwrapper=True)
    def pytest_fixture_setup(self, fixturedef, request):
        t0 = time.perf_counter()
        yield
        if fixturedef.scope in ("module", "session"):
            module = request.node.path.name if fixturedef.scope == "module" else "*"
            key = _fixture_key(module, fixturedef.argname)
            self.fixtures[key] = max(self.fixtures.get(key, 0.0), time.perf_counter() - t0)

    def pytest_runtest_logreport(self, report):
        self.tests[report.nodeid] = self.tests.get(report.nodeid, 0.0) + report.duration

    def pytest_sessionfinish(self, session):
        old = _measured()  # a partial run (-k, one file) updates only what it measured
        tests = {**old["tests"], **{k: round(v, 3) for k, v in self.tests.items()}}
        fixtures = {**old["fixtures"], **{k: round(v, 3) for k, v in self.fixtures.items()}}
        DURATIONS.write_text(json.dumps({"seconds_slow": SLOW_SECONDS, "tests": dict(sorted(tests.items())),
                                         "fixtures": dict(sorted(fixtures.items()))}, indent=0) + "\n")


def pytest_configure(config):
    if config.getoption("--store-durations"):
        config.pluginmanager.register(_Recorder(), "pcreg-durations")
