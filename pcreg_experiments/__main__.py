"""``python -m avalanche_pcreg.experiments``: the comparison CLI (same as ``pcreg-compare``)."""

from .compare import main

if __name__ == "__main__":
    raise SystemExit(main())
