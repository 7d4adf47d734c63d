"""``python -m pcreg_experiments``: the comparison CLI (same as ``./pcreg-compare`` in the repository)."""

from .compare import main

if __name__ == "__main__":
    raise SystemExit(main())
