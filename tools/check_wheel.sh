#!/usr/bin/env bash
# Build the wheel, check that it holds the library only (not the repository's experiment harness), install it
# with --no-deps into a fresh virtual environment that sees only the torch and avalanche-lib of BASE_PYTHON's
# environment, and run the README's usage example there (outside the checkout).
#
#   tools/check_wheel.sh [BASE_PYTHON]
#
# BASE_PYTHON: a Python whose environment already has torch and avalanche-lib (the usage example needs nothing
# else); default .venv/bin/python. Point it at another environment (e.g. one with an older torch) to check the
# declared ranges. BUILD_PYTHON (environment variable) builds the wheel; it needs setuptools>=77, default:
# BASE_PYTHON if it has it, else .venv/bin/python.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BASE_PYTHON="${1:-$ROOT/.venv/bin/python}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/pcreg-wheel.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

has_setuptools77() {
    "$1" - <<'EOF' 2>/dev/null
import sys
from importlib.metadata import version
sys.exit(0 if int(version("setuptools").split(".")[0]) >= 77 else 1)
EOF
}
if [[ -z "${BUILD_PYTHON:-}" ]]; then
    if has_setuptools77 "$BASE_PYTHON"; then BUILD_PYTHON="$BASE_PYTHON"; else BUILD_PYTHON="$ROOT/.venv/bin/python"; fi
fi
has_setuptools77 "$BUILD_PYTHON" || { echo "BUILD_PYTHON=$BUILD_PYTHON needs setuptools>=77" >&2; exit 2; }

echo "== build the wheel (from a copy of the package's files, the harness beside it as in a checkout)"
mkdir -p "$WORK/src" "$WORK/dist"
cp -r "$ROOT/pyproject.toml" "$ROOT/README.md" "$ROOT/LICENSE" "$ROOT/avalanche_pcreg" "$ROOT/pcreg_experiments" \
    "$WORK/src/"
find "$WORK/src" -name __pycache__ -prune -exec rm -rf {} +
"$BUILD_PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$WORK/dist" "$WORK/src"
WHEEL="$(ls "$WORK"/dist/avalanche_pcreg-*.whl)"
echo "   $(basename "$WHEEL")"
# the library only: no experiment harness (pcreg_experiments, formerly the library's subpackage experiments),
# no scripts
"$BUILD_PYTHON" - "$WHEEL" <<'EOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
harness = [n for n in names if n.startswith(("pcreg_experiments", "/".join(("avalanche_pcreg", "experiments"))))]
assert not harness, f"the wheel ships the experiment harness: {harness[:5]}"
assert not [n for n in names if n.endswith(".dist-info/entry_points.txt")], "the wheel declares entry points"
assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"avalanche_pcreg"}, names
print(f"   {len(names)} files, all under avalanche_pcreg/ and its .dist-info/")
EOF

echo "== fresh venv on top of $BASE_PYTHON's site-packages"
"$BASE_PYTHON" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
BASE_SITE="$("$BASE_PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
BASE_PLAT="$("$BASE_PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["platlib"])')"
VENV_SITE="$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
printf '%s\n%s\n' "$BASE_SITE" "$BASE_PLAT" > "$VENV_SITE/_base_env.pth"
"$VPY" -m pip install -q --no-deps --no-index "$WHEEL"

echo "== installed package"
cd "$WORK"   # not the checkout: the package must come from the wheel
"$VPY" - "$VENV_SITE" <<'EOF'
import sys
from importlib import metadata
from pathlib import Path

import avalanche
import torch

import avalanche_pcreg

site = Path(sys.argv[1]).resolve()
where = Path(avalanche_pcreg.__file__).resolve()
assert site in where.parents, f"avalanche_pcreg imported from {where}, not from the wheel in {site}"
assert (where.parent / "py.typed").is_file(), "py.typed is not installed"
assert metadata.version("avalanche-pcreg") == avalanche_pcreg.__version__
dist = metadata.distribution("avalanche-pcreg")
try:  # the harness stays in the repository
    import pcreg_experiments
except ModuleNotFoundError:
    pass
else:
    raise AssertionError(f"pcreg_experiments is importable from the wheel's environment: {pcreg_experiments.__file__}")
print(f"   avalanche-pcreg {avalanche_pcreg.__version__} from {where.parent}")
print(f"   torch {torch.__version__}, avalanche-lib {metadata.version('avalanche-lib')}")
print(f"   Requires-Dist: {dist.requires}")
EOF
# the declared ranges accept the base environment's torch and avalanche-lib
if "$VPY" -m pip check > "$WORK/pip-check.txt" 2>&1; then :; fi
if grep -i '^avalanche-pcreg' "$WORK/pip-check.txt"; then echo "pip check: requirements not met" >&2; exit 1; fi

echo "== the README's usage example"
"$VPY" - "$ROOT/README.md" > "$WORK/example.py" <<'EOF'
import re, sys
text = open(sys.argv[1]).read()
usage = text.split("\n## Usage", 1)[1]
print(re.search(r"```python\n(.*?)```", usage, re.S).group(1))
EOF
"$VPY" "$WORK/example.py"
echo "check-wheel: OK"
