"""The experiment harness behind ``pcreg-compare`` and the notebooks (needs the ``experiments`` extra).

``catalog`` names the scenarios, datasets, methods (a table: add a row to add a method), presets and
studies, without importing torch; ``files`` finds, checks and reads the dataset files with numpy only
(the CLI checks ``--data-root`` with it before importing torch); ``data`` builds benchmarks (embedded
scikit-learn digits, IDX files, CIFAR python-pickle files) and models (MLP, small conv net); ``runner`` trains methods over seeds and
factor grids, appends each finished run to a resumable results file and writes tables and plots;
``studies`` holds the tables and figures of the long-stream and Fisher-variants studies; ``compare`` is
the CLI. The library itself (``avalanche_pcreg``) never imports this package.
"""
