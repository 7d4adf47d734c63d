"""Ratio of Avalanche's importance estimates to ours on the demo models (digits, CPU).

For each demo scenario and model size: train ``make_model`` with Naive on the first experience,
then report ``importance_ratio(model, exp0, a, b)`` for
(minibatch_fisher -> empirical_fisher) at the training minibatch size, and
(avalanche_mas -> mas). To keep an Avalanche lambda with our estimator, multiply our
importances by the ratio (``importance_scale=ratio``), or use ``lambda * ratio`` as the factor.

    python benchmarks/bench_lambda_transfer.py
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the harness, pcreg_experiments

import torch  # noqa: E402
from torch import nn  # noqa: E402

from avalanche.training.supervised import Naive  # noqa: E402

from avalanche_pcreg import importance_ratio  # noqa: E402
from pcreg_experiments.data import make_benchmark, make_model  # noqa: E402


def trained_on_first(scenario: str, hidden: int, mb: int, epochs: int, seed: int = 0):
    torch.manual_seed(seed)
    spec = make_benchmark(scenario, "digits", n_experiences=5, seed=seed)
    model = make_model(spec, hidden=hidden)
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                     criterion=nn.CrossEntropyLoss(), train_mb_size=mb, train_epochs=epochs, evaluator=None)
    exp0 = spec.benchmark.train_stream[0]
    strategy.train(exp0)
    return model, exp0.dataset.eval()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print("| scenario | model | train_mb_size | minibatch_fisher / empirical_fisher | avalanche_mas / mas |")
    print("|---|---|---|---|---|")
    for scenario in ("split-class", "split-task", "permuted"):
        for hidden in (100, 400):
            for mb in (10, 32, 128):
                model, data = trained_on_first(scenario, hidden, mb, args.epochs)
                r_f = importance_ratio(model, data, "minibatch_fisher", "empirical_fisher", batch_size=mb)
                r_m = importance_ratio(model, data, "avalanche_mas", "mas", batch_size=mb)
                print(f"| {scenario} | 64-{hidden}-{hidden}-out | {mb} | {r_f:.4g} (1/{1 / r_f:.3g}) | {r_m:.3g} |",
                      flush=True)


if __name__ == "__main__":
    main()
