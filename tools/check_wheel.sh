#!/usr/bin/env bash
# Build the wheel, install it with --no-deps into a fresh virtual environment that sees only the torch and
# avalanche-lib of BASE_PYTHON's environment, and run the README's usage example there (outside the checkout).
#
#   tools/check_wheel.sh [BASE_PYTHON]
#
# BASE_PYTHON: a Python whose environment already has torch, avalanche-lib (and scikit-learn, which the
# example's digits benchmark reads); default .venv/bin/python. Point it at another environment (e.g. one with
# an older torch) to check the declared ranges. BUILD_PYTHON (environment variable) builds the wheel; it needs
# setuptools>=77, default: BASE_PYTHON if it has it, else .venv/bin/python.
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

echo "== build the wheel (from a copy of the package's files)"
mkdir -p "$WORK/src" "$WORK/dist"
cp -r "$ROOT/pyproject.toml" "$ROOT/README.md" "$ROOT/LICENSE" "$ROOT/avalanche_pcreg" "$WORK/src/"
find "$WORK/src" -name __pycache__ -prune -exec rm -rf {} +
"$BUILD_PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$WORK/dist" "$WORK/src"
WHEEL="$(ls "$WORK"/dist/avalanche_pcreg-*.whl)"
echo "   $(basename "$WHEEL")"

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

echo "== pcreg-compare --help"
"$WORK/venv/bin/pcreg-compare" --help > /dev/null
echo "check-wheel: OK"
