"""Importing the package prints no "no QP solver found" warning.

Avalanche imports qpsolvers (for GEM), which warns at its import when no QP solver is installed
(quadprog, ...). The plugin solves no QP, so our imports of Avalanche silence that one warning. Each
case runs in a fresh interpreter where quadprog and every other qpsolvers backend are unimportable,
and reaches Avalanche first through one of our entry points.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# makes quadprog and qpsolvers' solver modules (qpsolvers/solvers/<name>_.py) unimportable
NO_SOLVERS = '''
import sys
class _NoSolvers:
    def find_spec(self, name, path=None, target=None):
        if name == "quadprog" or (name.startswith("qpsolvers.solvers.") and name.endswith("_")):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, _NoSolvers())
'''

CHECK = '''
import warnings
import qpsolvers
assert qpsolvers.available_solvers == [], qpsolvers.available_solvers
assert not any(f[1] is not None and "QP" in f[1].pattern for f in warnings.filters), "a filter was left behind"
print("imported")
'''


def _run(code: str) -> subprocess.CompletedProcess:
    # -W default: every warning is shown once, whatever PYTHONWARNINGS the test run has
    return subprocess.run([sys.executable, "-W", "default", "-c", NO_SOLVERS + code], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_qpsolvers_warns_without_solvers():
    """The set-up works: without our imports, qpsolvers warns."""
    control = _run("import avalanche.training\n" + CHECK)
    assert control.returncode == 0, control.stderr
    assert "no QP solver found" in control.stderr


@pytest.mark.parametrize("entry", [
    "import avalanche_pcreg\nfrom avalanche_pcreg import ParameterChangePlugin",
    "from avalanche_pcreg.training import EWC",
    "from pcreg_experiments.data import make_benchmark",
    "import torch\nfrom avalanche_pcreg import compute_importance\n"
    "x, y = torch.randn(8, 3), torch.arange(8) % 2\n"
    "compute_importance(torch.nn.Linear(3, 2), torch.utils.data.TensorDataset(x, y), 'empirical_fisher')",
])
def test_no_qp_solver_warning_at_import(entry):
    r = _run(entry + "\nimport avalanche.training\n" + CHECK)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("imported")
    assert "no QP solver found" not in r.stderr, r.stderr
