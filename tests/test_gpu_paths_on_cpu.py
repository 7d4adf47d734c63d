"""The code paths a GPU takes, checked on the CPU: the per-sample rule and estimator suites rerun
in a subprocess with ``gpu_paths_plugin`` (a GPU's policy for every pass given none: every
convolution through one weight-gradient call per chunk, squares summed per chunk, GPU chunk sizes),
against the same float64 references."""

from __future__ import annotations

import os
import re
import subprocess
import sys

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)


def test_rule_and_estimator_suites_pass_through_the_gpu_paths():
    env = dict(os.environ, PYTHONPATH=TESTS + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONWARNINGS="ignore")
    # the one test that asserts which CPU path a layer takes is left out (it gives its own policies)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "gpu_paths_plugin",
                        "tests/test_persample.py", "tests/test_realworld_models.py", "tests/test_importance.py",
                        "tests/test_rules.py", "-k", "not one_sample_at_a_time_paths"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    (passed,) = [int(x) for x in re.findall(r"(\d+) passed", r.stdout)]
    assert passed > 150
    counts = dict(re.findall(r"(\w+)=(\d+)", r.stdout.split("gpu paths forced:")[1].splitlines()[0]))
    assert int(counts["wgrad"]) > 50 and set(counts) == {"wgrad"}, counts
