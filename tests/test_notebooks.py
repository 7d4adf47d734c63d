"""Execute both notebooks on their tiny configuration (PCREG_NB_SMALL=1); any cell error fails.

The kernel is this interpreter (sys.executable), from a kernel spec written to a temporary
directory, so no installed Jupyter kernel is needed and a fresh `make test` works. The kernel runs
in the repository root, so the package imports from the checkout.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402
from jupyter_client.manager import KernelManager  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ["quickstart.ipynb", "compare_with_ewc.ipynb"]


@pytest.fixture(scope="module")
def kernel_dirs(tmp_path_factory):
    d = tmp_path_factory.mktemp("kernels")
    spec = d / "pcreg-test"
    spec.mkdir()
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "pcreg test kernel", "language": "python",
        "env": {"PCREG_NB_SMALL": "1", "PYTHONWARNINGS": "ignore", "MPLBACKEND": "Agg"},
    }))
    return [str(d)]


def _code(nb):
    return "\n".join(c.source for c in nb.cells if c.cell_type == "code")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_on_the_small_config(name, kernel_dirs, monkeypatch):
    monkeypatch.setenv("PCREG_NB_SMALL", "1")
    nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    assert "PCREG_NB_SMALL" in _code(nb)
    km = KernelManager(kernel_name="pcreg-test", kernel_spec_manager=KernelSpecManager(kernel_dirs=kernel_dirs))
    client = nbclient.NotebookClient(nb, km=km, timeout=300, allow_errors=False,
                                     resources={"metadata": {"path": str(ROOT)}})
    client.execute()  # raises CellExecutionError on the first failing cell
    texts = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "Traceback" not in texts
    if name == "quickstart.ipynb":
        assert "ParameterChange/importance_mean" in texts
        # the estimators are listed from the registry (a fresh interpreter's: this one may hold the tests' own)
        assert "valid_methods()" in _code(nb)
        registered = subprocess.run([sys.executable, "-c", "from avalanche_pcreg.importance import valid_methods; "
                                     "print(' '.join(valid_methods()))"], cwd=ROOT, capture_output=True, text=True,
                                    check=True).stdout.split()
        listed = [l.split()[0] for l in texts.splitlines() if l.endswith((" data pass", " trajectory"))]
        assert listed == registered and {"avalanche_si", "rwalk", "rwalk_fisher", "si"} <= set(listed)
        # the reloaded plugin gives the same penalty as the one that was saved
        line = next(l for l in texts.splitlines() if l.startswith("penalty before/after reload:"))
        a, b = (float(v) for v in line.split(":")[1].split())
        assert a == b > 0
    else:
        assert "small=True" in texts
        # Avalanche's EWCPlugin.compute_importances equals our minibatch_fisher on the same model
        line = next(l for l in texts.splitlines() if l.startswith("max |Avalanche - minibatch_fisher|"))
        assert float(line.split("=")[1]) <= 1e-6
        # equal penalties, Avalanche's separate EWC and ours, at every T
        # section 4: the long-stream table on the embedded digits (4 experiences in the small config)
        assert "regularizer MB after exp 4" in texts and "| Avalanche EWC |" in texts
        rows = [l for l in texts.splitlines() if l.startswith("T=")]
        assert len(rows) == 2
        for l in rows:
            pa, po = (float(v) for v in l.split("penalties")[1].split("/"))
            assert po == pytest.approx(pa, rel=1e-5) and pa > 0


def test_stored_notebooks_have_small_outputs():
    for name in NOTEBOOKS:
        path = ROOT / "notebooks" / name
        nb = nbformat.read(path, as_version=4)
        pngs = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
        assert pngs <= 4, name
        assert path.stat().st_size < 400_000, name
