"""Exact parity with Avalanche 0.6's EWCPlugin (minibatch Fisher), and the consolidated form."""

import copy

import pytest
import torch
from avalanche.training.plugins import EWCPlugin
from avalanche.models import IncrementalClassifier

from avalanche_pcreg import ParameterChangePlugin
from helpers import MultiHeadMLP, mlp, run_naive, tiny_nc

LAMBDA = 50.0


def _compare(bench, make_model, ours, theirs):
    m1, m2 = make_model(), make_model()
    _, rec_a = run_naive(bench, m1, [theirs])
    _, rec_o = run_naive(bench, m2, [ours])
    assert len(rec_a.losses) == len(rec_o.losses) > 0
    la, lo = torch.tensor(rec_a.losses, dtype=torch.float64), torch.tensor(rec_o.losses, dtype=torch.float64)
    rel = ((la - lo).abs() / la.abs().clamp_min(1e-12)).max().item()
    p1, p2 = dict(m1.named_parameters()), dict(m2.named_parameters())
    assert p1.keys() == p2.keys()
    maxdiff = max((p1[k] - p2[k]).abs().max().item() for k in p1)
    # the penalty really mattered: losses on later experiences differ from a run without it
    m3 = make_model()
    _, rec_n = run_naive(bench, m3, [])
    later = [i for i, e in enumerate(rec_o.exp_of_loss) if e > 0]
    assert max(abs(rec_o.losses[i] - rec_n.losses[i]) for i in later) > 1e-3
    return rel, maxdiff


def test_parity_separate_class_incremental():
    bench = tiny_nc(3)
    rel, maxdiff = _compare(
        bench, lambda: mlp(),
        ParameterChangePlugin(LAMBDA, "minibatch_fisher", "separate", batch_size=32),
        EWCPlugin(ewc_lambda=LAMBDA, mode="separate"),
    )
    print(f"separate: max rel loss diff {rel:.2e}, max abs param diff {maxdiff:.2e}")
    assert rel <= 1e-5 and maxdiff <= 1e-5


def test_parity_online():
    bench = tiny_nc(3)
    rel, maxdiff = _compare(
        bench, lambda: mlp(),
        ParameterChangePlugin(LAMBDA, "minibatch_fisher", "online", decay=0.7, batch_size=32),
        EWCPlugin(ewc_lambda=LAMBDA, mode="online", decay_factor=0.7),
    )
    print(f"online: max rel loss diff {rel:.2e}, max abs param diff {maxdiff:.2e}")
    assert rel <= 1e-5 and maxdiff <= 1e-5


def test_parity_separate_multi_head_task_incremental():
    bench = tiny_nc(3, task_labels=True)
    rel, maxdiff = _compare(
        bench, lambda: MultiHeadMLP(),
        ParameterChangePlugin(LAMBDA, "minibatch_fisher", "separate", batch_size=32),
        EWCPlugin(ewc_lambda=LAMBDA, mode="separate"),
    )
    print(f"multi-head: max rel loss diff {rel:.2e}, max abs param diff {maxdiff:.2e}")
    assert rel <= 1e-5 and maxdiff <= 1e-5


class _IncMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU())
        self.head = IncrementalClassifier(16, initial_out_features=2, masking=False)

    def forward(self, x):
        return self.head(self.trunk(x))


def test_parity_separate_growing_head():
    """An IncrementalClassifier grows between experiences: old rows regularized, new rows free."""
    bench = tiny_nc(3)
    rel, maxdiff = _compare(
        bench, _IncMLP,
        ParameterChangePlugin(LAMBDA, "minibatch_fisher", "separate", batch_size=32),
        EWCPlugin(ewc_lambda=LAMBDA, mode="separate"),
    )
    print(f"growing head: max rel loss diff {rel:.2e}, max abs param diff {maxdiff:.2e}")
    assert rel <= 1e-5 and maxdiff <= 1e-5
