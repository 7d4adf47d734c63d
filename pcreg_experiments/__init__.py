"""The repository's experiment harness: ``python -m pcreg_experiments`` (``./pcreg-compare``, ``make demo``),
the notebooks and some benchmarks use it. It needs the ``experiments`` extra and is not part of the
library's wheel; the library itself (``avalanche_pcreg``) never imports it.

``catalog`` names the scenarios, datasets, methods (a table: add a row to add a method), presets and
studies, without importing torch; ``files`` finds, checks and reads the dataset files with numpy only
(the CLI checks ``--data-root`` with it before importing torch); ``data`` builds benchmarks (embedded
scikit-learn digits, IDX files, CIFAR python-pickle files) and models (MLP, small conv net).

A sweep, by job: ``runner`` trains one run (``run_one``) and a whole sweep (``run_comparison``:
methods over seeds and factor grids); ``pool`` executes the runs, over worker processes;
``store`` appends each finished run to the resumable results file ``runs.jsonl``; ``selection``
chooses each method's factor on validation accuracy; ``tables`` summarizes and formats the results
and writes the output files; ``figures`` draws the comparison's plots and ``studies`` the tables and
figures of the long-stream and Fisher-variants studies. ``compare`` is the CLI.
"""
