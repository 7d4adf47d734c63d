"""Tiny benchmarks, models and a recording plugin shared by the tests."""

from __future__ import annotations

import torch
from torch import nn

from avalanche.benchmarks import nc_benchmark
from avalanche.benchmarks.utils.classification_dataset import _make_taskaware_tensor_classification_dataset as make_tensor_classification_dataset
from avalanche.core import SupervisedPlugin
from avalanche.models import MultiHeadClassifier, MultiTaskModule
from avalanche.training.supervised import Naive


def tensor_data(n=240, features=12, classes=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, features, generator=g) * 2.0
    y = torch.arange(n) % classes
    x = centers[y] + torch.randn(n, features, generator=g)
    return x.float(), y.long()


def tiny_nc(n_experiences=3, task_labels=False, seed=0, n=240, features=12, classes=6):
    x, y = tensor_data(n, features, classes, seed)
    xt, yt = tensor_data(n // 2, features, classes, seed + 100)
    train = make_tensor_classification_dataset(x, y)
    test = make_tensor_classification_dataset(xt, yt)
    return nc_benchmark(train, test, n_experiences=n_experiences, task_labels=task_labels,
                        seed=seed, class_ids_from_zero_in_each_exp=task_labels, shuffle=False)


def mlp(features=12, hidden=16, classes=6, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, classes))


class MultiHeadMLP(MultiTaskModule):
    def __init__(self, features=12, hidden=16, head=2, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.trunk = nn.Sequential(nn.Linear(features, hidden), nn.ReLU())
        self.classifier = MultiHeadClassifier(hidden, initial_out_features=head)

    def forward_single_task(self, x, task_label):
        return self.classifier(self.trunk(x), task_label)


class LossRecorder(SupervisedPlugin):
    """Records strategy.loss after the backward (penalty included) of every iteration."""

    def __init__(self):
        super().__init__()
        self.losses = []
        self.exp_of_loss = []

    def after_backward(self, strategy, **kw):
        self.losses.append(float(strategy.loss.detach()))
        self.exp_of_loss.append(strategy.clock.train_exp_counter)


def run_naive(benchmark, model, plugins, *, epochs=2, mb=32, lr=0.05, seed=0, momentum=0.0, eval_every=-1,
              device="cpu"):
    torch.manual_seed(seed)
    rec = LossRecorder()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    strategy = Naive(model=model, optimizer=opt, criterion=nn.CrossEntropyLoss(), train_mb_size=mb,
                     train_epochs=epochs, eval_mb_size=64, device=device, plugins=[*plugins, rec],
                     evaluator=None, eval_every=eval_every)
    for exp in benchmark.train_stream:
        strategy.train(exp)
    return strategy, rec
