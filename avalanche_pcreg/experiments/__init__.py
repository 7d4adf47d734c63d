"""The experiment harness behind ``pcreg-compare`` and the notebooks (needs the ``experiments`` extra).

``data`` builds benchmarks (embedded scikit-learn digits, IDX files) and models; ``runner``
trains methods over seeds and factor grids and writes tables and plots; ``compare`` is the CLI.
The library itself (``avalanche_pcreg``) never imports this package.
"""
