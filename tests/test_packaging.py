"""The package as a user installs it: declared ranges and pins, the wheel's contents and metadata, what the
math modules import, and the markers that conftest.py applies.

The wheel holds the library (``avalanche_pcreg``) only: the repository's experiment harness
(``pcreg_experiments``) runs from the checkout, and the library never imports it.

``tools/check_wheel.sh`` (``make check-wheel``) goes further: it installs the wheel into a fresh environment
and runs the README's usage example there.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from email.parser import Parser
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "avalanche_pcreg"
HARNESS = ROOT / "pcreg_experiments"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]

# import name -> distribution name, for the third-party imports the package may use
DIST_OF_IMPORT = {"torch": "torch", "avalanche": "avalanche-lib", "numpy": "numpy", "matplotlib": "matplotlib",
                  "sklearn": "scikit-learn", "tqdm": "tqdm", "torchvision": "torchvision"}
MATH_MODULES = ["avalanche_pcreg.penalty", "avalanche_pcreg.state", "avalanche_pcreg.regularizer",
                "avalanche_pcreg.importance"]


def _reqs(lines):
    return {Requirement(r).name: Requirement(r) for r in lines}


def _pins():
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"constraints.txt pins exactly, got {line!r}"
            pins[req.name] = Version(spec.version)
    return pins


def _package_version() -> str:
    tree = ast.parse((PKG / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__version__" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("avalanche_pcreg/__init__.py defines no __version__")


def test_dependencies_are_ranges_and_the_pins_satisfy_them():
    deps = _reqs(PROJECT["dependencies"])
    assert set(deps) == {"torch", "avalanche-lib", "numpy"}
    for req in deps.values():
        assert not any(s.operator in ("==", "===") for s in req.specifier), f"{req} is an exact pin"
    # a compatible range: a floor for torch, the 0.6 series of avalanche-lib
    assert {s.operator for s in deps["torch"].specifier} == {">="}
    assert Version("2.14.2") in deps["torch"].specifier and Version("2.15.0") in deps["torch"].specifier
    assert Version("0.6.1") in deps["avalanche-lib"].specifier
    assert Version("0.7.0") not in deps["avalanche-lib"].specifier
    assert Version("0.5.1") not in deps["avalanche-lib"].specifier
    # the reproducible set-up: exact pins, inside the declared ranges
    pins = _pins()
    assert pins == {"torch": Version("2.14.1"), "torchvision": Version("0.29.1"), "avalanche-lib": Version("0.6.0"),
                    "curvlinops-for-pytorch": Version("3.0.1")}  # the Kronecker factors' test oracle
    for name, version in pins.items():
        if name in deps:
            assert version in deps[name].specifier, (name, version)


def test_extras_and_makefile_use_the_constraints():
    extras = PROJECT["optional-dependencies"]
    assert set(_reqs(extras["experiments"])) == {"matplotlib", "scikit-learn", "tqdm", "torchvision"}
    assert "avalanche-pcreg" in _reqs(extras["test"])  # the test extra includes the experiments extra
    assert _reqs(extras["test"])["avalanche-pcreg"].extras == {"experiments"}
    make = (ROOT / "Makefile").read_text()
    assert "-c constraints.txt" in make
    assert "'.[test]'" in make and "'.[experiments]'" in make
    assert re.search(r"^clean:\n\trm -rf .*\bbuild\b.*\bdist\b.*\*\.egg-info", make, re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_version_has_one_source():
    assert "version" not in PROJECT and "version" in PROJECT["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "avalanche_pcreg.__version__"}
    Version(_package_version())  # a valid version


def _third_party_imports(path: Path) -> set:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in ("avalanche_pcreg", "pcreg_experiments")}


def test_every_import_is_declared_and_every_declared_package_is_imported():
    """The library imports only the required dependencies; the harness also the experiments extra."""
    core = set(_reqs(PROJECT["dependencies"]))
    experiments = set(_reqs(PROJECT["optional-dependencies"]["experiments"]))
    used_core, used_exp = set(), set()
    for path in [*PKG.rglob("*.py"), *HARNESS.rglob("*.py")]:
        imports = _third_party_imports(path)
        unknown = imports - set(DIST_OF_IMPORT)
        assert not unknown, f"{path.relative_to(ROOT)} imports {sorted(unknown)}: declare them and extend this test"
        dists = {DIST_OF_IMPORT[i] for i in imports}
        if HARNESS in path.parents:
            used_exp |= dists
        else:
            used_core |= dists
    assert used_core <= core, f"core modules import undeclared {sorted(used_core - core)}"
    assert used_exp <= core | experiments, f"the harness imports undeclared {sorted(used_exp - core - experiments)}"
    assert core <= used_core | used_exp and experiments <= used_exp, "a declared dependency is never imported"


def test_the_library_never_imports_the_harness():
    """``pcreg_experiments`` is not in the wheel: no module of ``avalanche_pcreg`` may import it, not even lazily."""
    assert HARNESS.is_dir() and not (PKG / "experiments").exists()
    for path in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] if node.level == 0 else []
            else:
                continue
            assert not [n for n in names if n.split(".")[0] == "pcreg_experiments"], \
                f"{path.relative_to(ROOT)}:{node.lineno} imports the harness"
        assert "pcreg_experiments" not in path.read_text(), f"{path.relative_to(ROOT)} names the harness"


def test_no_wheel_script_points_at_the_harness():
    """A console script of the wheel could only name the library; the harness's CLI is ./pcreg-compare."""
    assert "scripts" not in PROJECT and "entry-points" not in PROJECT and "gui-scripts" not in PROJECT
    script = ROOT / "pcreg-compare"
    assert script.is_file() and script.stat().st_mode & 0o111, "pcreg-compare is not an executable script"
    assert script.read_text().startswith("#!/usr/bin/env python3\n")


def test_math_modules_import_neither_avalanche_nor_plotting():
    # one fresh interpreter imports them one by one and looks at sys.modules after each
    # (not for tqdm: torch.hub imports it with torch)
    code = ("import importlib, sys\n"
            "for module in sys.argv[1:]:\n"
            "    importlib.import_module(module)\n"
            "    bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('avalanche', 'matplotlib', 'sklearn', 'torchvision'))\n"
            "    print(module, ','.join(bad[:3]))\n")
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code, *MATH_MODULES], cwd=ROOT, capture_output=True, text=True,
                         env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:-1] == [f"{m} " for m in MATH_MODULES], out.stdout
    # and the check can fail: the plugin does import avalanche
    out = subprocess.run([sys.executable, "-c", code, "avalanche_pcreg.plugin"], cwd=ROOT, capture_output=True,
                         text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("avalanche_pcreg.plugin avalanche"), out.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    try:
        setuptools_major = int(metadata.version("setuptools").split(".")[0])
    except metadata.PackageNotFoundError:
        setuptools_major = 0
    if setuptools_major < 77:
        pytest.skip("building the wheel offline needs setuptools>=77 in this environment (the test extra has it)")
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE", "pcreg-compare"):
        shutil.copy(ROOT / name, src / name)
    # the harness is copied too, as it lies next to the library in a checkout: the wheel must leave it out
    for package in (PKG, HARNESS):
        shutil.copytree(package, src / package.name, ignore=shutil.ignore_patterns("__pycache__"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                          "-w", str(work / "dist"), str(src)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "deprecat" not in (out.stdout + out.stderr).lower(), out.stdout + out.stderr
    (path,) = (work / "dist").glob("avalanche_pcreg-*.whl")
    return path


def test_wheel_files(wheel):
    version = _package_version()
    assert wheel.name == f"avalanche_pcreg-{version}-py3-none-any.whl"
    names = zipfile.ZipFile(wheel).namelist()
    assert "avalanche_pcreg/py.typed" in names
    assert f"avalanche_pcreg-{version}.dist-info/licenses/LICENSE" in names
    for module in ("penalty", "state", "regularizer", "plugin", "importance/__init__"):
        assert f"avalanche_pcreg/{module}.py" in names
    # the library only: not the repository's experiment harness, under its name or its former one
    assert not [n for n in names if n.startswith((HARNESS.name, f"{PKG.name}/experiments"))]
    assert not [n for n in names if not n.startswith(("avalanche_pcreg/", f"avalanche_pcreg-{version}.dist-info/"))]
    assert not [n for n in names if "tests/" in n or n.endswith(".pyc") or "__pycache__" in n]


def test_wheel_metadata(wheel):
    with zipfile.ZipFile(wheel) as z:
        info = Parser().parsestr(z.read(f"avalanche_pcreg-{_package_version()}.dist-info/METADATA").decode())
        names = z.namelist()
    assert info["Name"] == "avalanche-pcreg" and info["Version"] == _package_version()
    assert info["License-Expression"] == "MIT"
    assert info.get_all("License-File") == ["LICENSE"]
    requires = {str(Requirement(r)) for r in info.get_all("Requires-Dist")}
    # required: torch, avalanche-lib and numpy, nothing else; everything more is an extra
    assert {r for r in requires if "extra ==" not in r} == {"torch>=2.4", "avalanche-lib<0.7,>=0.6", "numpy"}
    assert {'matplotlib; extra == "experiments"', 'scikit-learn; extra == "experiments"',
            'tqdm; extra == "experiments"'} <= requires
    # torchvision only for the harness's --download; no exact pins in the metadata
    assert [r for r in requires if Requirement(r).name == "torchvision"] == ['torchvision; extra == "experiments"']
    assert not [r for r in requires if any(s.operator == "==" for s in Requirement(r).specifier)]
    assert set(info.get_all("Provides-Extra")) == {"experiments", "test", "bench"}
    assert {r for r in requires if r.endswith("extra == \"bench\"")} >= {
        'backpack-for-pytorch>=1.7.1; extra == "bench"', 'opacus>=1.6.0; extra == "bench"'}
    # no console script: the harness's CLI (./pcreg-compare) is not in the wheel
    assert f"avalanche_pcreg-{_package_version()}.dist-info/entry_points.txt" not in names


def test_slow_tier_is_measured_and_names_existing_tests():
    """The slow tier comes from tests/durations.json (make durations): every test it marks slow was
    measured above the threshold, and every measured test still exists (a renamed test would drop out
    of the slow tier silently)."""
    import json

    import conftest

    data = json.loads(conftest.DURATIONS.read_text())
    tests = data["tests"]
    assert tests and data["seconds_slow"] == conftest.SLOW_SECONDS
    slow = [k for k, v in tests.items() if v > conftest.SLOW_SECONDS]
    assert slow, "nothing measured slow: the tier would be empty"
    for nodeid in tests:
        path, _, name = nodeid.partition("::")
        text = (ROOT / path).read_text() if (ROOT / path).is_file() else ""
        func = name.split("[")[0].split("::")[-1]
        assert re.search(rf"^\s*(async )?def {func}\(", text, re.M), f"durations.json names {nodeid}, which does not exist"
    for key in data["fixtures"]:
        module, _, fixture = key.partition("::")
        if module != "*":
            assert re.search(rf"^def {fixture}\(", (ROOT / "tests" / module).read_text(), re.M), key


def test_pytest_markers_are_registered():
    markers = {m.split(":")[0] for m in PYPROJECT["tool"]["pytest"]["ini_options"]["markers"]}
    assert markers == {"slow", "upstream"}
    assert "--strict-markers" in PYPROJECT["tool"]["pytest"]["ini_options"]["addopts"]
