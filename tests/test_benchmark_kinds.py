"""ParameterChangePlugin on every kind of Avalanche 0.6.0 benchmark.

For each kind: a tiny model trained with Naive and
``[PreProbe, ParameterChangePlugin, PostProbe]``; asserted:

* consolidations: one per experience (per task boundary for online streams with boundaries);
* the penalty reached the loss after the first consolidation: on every later iteration,
  ``strategy.loss`` grew by ``factor * (sum A (theta - mu)**2 + c)`` recomputed in float64 from the
  plugin's state, and it is > 0 (except on the very first iteration, where theta == mu);
* the first consolidation's importances equal a brute-force float64 per-sample empirical Fisher over
  that experience's samples (task labels routed to the right head), at the end-of-experience weights.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from avalanche.benchmarks import (
    benchmark_from_datasets,
    class_incremental_benchmark,
    dataset_benchmark,
    nc_benchmark,
    ni_benchmark,
    split_online_stream,
    task_incremental_benchmark,
    tensors_benchmark,
)
from avalanche.benchmarks.scenarios.supervised import with_classes_timeline
from avalanche.benchmarks.utils.classification_dataset import (
    _make_taskaware_tensor_classification_dataset as make_tensor_dataset,
)
from avalanche.core import SupervisedPlugin
from avalanche.models import IncrementalClassifier, MultiHeadClassifier, MultiTaskModule
from avalanche.training import Naive

from avalanche_pcreg import ParameterChangePlugin
from test_strategies import PostProbe, PreProbe

FEATURES, HIDDEN, CLASSES, N = 12, 16, 6, 240
FACTOR, LR, MB = 5.0, 0.05, 16
F64 = torch.float64
pytestmark = pytest.mark.filterwarnings("ignore:No loggers specified")


# ----------------------------------------------------------------------------- data and models
def data(n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(CLASSES, FEATURES, generator=torch.Generator().manual_seed(0)) * 2.0
    y = torch.arange(n) % CLASSES
    return (centers[y] + torch.randn(n, FEATURES, generator=g)).float(), y.long()


def split_by_class(x, y, groups=((0, 1), (2, 3), (4, 5))):
    return [(x[sum(y == c for c in grp).bool()], y[sum(y == c for c in grp).bool()]) for grp in groups]


def mlp(classes=CLASSES):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, classes))


class MultiHead(MultiTaskModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.ReLU())
        self.classifier = MultiHeadClassifier(HIDDEN, initial_out_features=2)

    def forward_single_task(self, x, task_label):
        return self.classifier(self.trunk(x), task_label)


class GrowingHead(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.ReLU())
        self.head = IncrementalClassifier(HIDDEN, initial_out_features=2, masking=False)

    def forward(self, x):
        return self.head(self.trunk(x))


# ----------------------------------------------------------------------------- benchmarks
def b_nc_class():
    (x, y), (xt, yt) = data(), data(N // 2, 100)
    return nc_benchmark(make_tensor_dataset(x, y), make_tensor_dataset(xt, yt), n_experiences=3, task_labels=False,
                        seed=0, shuffle=False)


def b_nc_task():
    (x, y), (xt, yt) = data(), data(N // 2, 100)
    return nc_benchmark(make_tensor_dataset(x, y), make_tensor_dataset(xt, yt), n_experiences=3, task_labels=True,
                        seed=0, shuffle=False, class_ids_from_zero_in_each_exp=True)


def b_ni():
    (x, y), (xt, yt) = data(), data(N // 2, 100)
    return ni_benchmark(make_tensor_dataset(x, y), make_tensor_dataset(xt, yt), n_experiences=3, seed=0)


def b_tensors():
    tr, te = split_by_class(*data()), split_by_class(*data(N // 2, 100))
    return tensors_benchmark(tr, te, task_labels=[0, 0, 0])


def b_dataset():
    tr, te = split_by_class(*data()), split_by_class(*data(N // 2, 100))
    return dataset_benchmark([make_tensor_dataset(*d) for d in tr], [make_tensor_dataset(*d) for d in te])


def b_from_datasets():
    tr, te = split_by_class(*data()), split_by_class(*data(N // 2, 100))
    return benchmark_from_datasets(train=[make_tensor_dataset(*d) for d in tr],
                                   test=[make_tensor_dataset(*d) for d in te])


def b_class_incremental():
    (x, y), (xt, yt) = data(), data(N // 2, 100)
    return class_incremental_benchmark({"train": make_tensor_dataset(x, y), "test": make_tensor_dataset(xt, yt)},
                                       class_order=list(range(CLASSES)), num_experiences=3)


def b_task_incremental():
    """Avalanche 0.6.0 quirks: task_incremental_benchmark rebuilds plain DatasetExperiences without
    ``classes_in_this_experience``, which MultiTaskModule.adaptation reads (AttributeError), and
    with_classes_timeline puts it back as a *set*, which MultiHeadClassifier uses as a tensor index
    (IndexError). Re-add the timeline, as sorted lists."""
    bm = with_classes_timeline(task_incremental_benchmark(b_class_incremental(), reset_task_labels=True))
    for stream in bm.streams.values():
        for exp in stream:
            for attr in ("classes_in_this_experience", "previous_classes", "classes_seen_so_far", "future_classes"):
                setattr(exp, attr, sorted(getattr(exp, attr)))
    return bm


def b_permuted():
    """Domain-incremental: the same 6 classes, each experience with its own fixed feature permutation."""
    (x, y), (xt, yt) = data(), data(N // 2, 100)
    g = torch.Generator().manual_seed(3)
    perms = [torch.arange(FEATURES)] + [torch.randperm(FEATURES, generator=g) for _ in range(2)]
    return benchmark_from_datasets(train=[make_tensor_dataset(x[:, p], y) for p in perms],
                                   test=[make_tensor_dataset(xt[:, p], yt) for p in perms])


# ----------------------------------------------------------------------------- references
def brute_fisher(model, dataset):
    """float64 loop: mean over samples of the squared per-sample CE gradient, eval mode, task-aware."""
    model = copy.deepcopy(model).double().eval()
    params = dict(model.named_parameters())
    acc = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(len(dataset)):
        x, y, t = dataset[i][0], dataset[i][1], dataset[i][-1]
        x = torch.as_tensor(x)[None].double()
        out = model(x, int(t)) if isinstance(model, MultiTaskModule) else model(x)  # (int: float64-safe path)
        grads = torch.autograd.grad(F.cross_entropy(out, torch.tensor([int(y)])), list(params.values()),
                                    allow_unused=True)
        for (n, _), g in zip(params.items(), grads):
            if g is not None:
                acc[n] += g ** 2
    return {n: a / len(dataset) for n, a in acc.items()}


class EndOfExperience(SupervisedPlugin):
    """Put BEFORE our plugin: the model and the experience's dataset at each consolidation point."""

    def __init__(self):
        super().__init__()
        self.snapshots = []

    def after_training_exp(self, strategy, **kw):
        exp = strategy.experience
        # With task boundaries, a task's importances come from the whole task (origin experience).
        if getattr(exp, "access_task_boundaries", False):
            exp = exp.origin_experience
        self.snapshots.append((copy.deepcopy(strategy.model), exp.dataset))


def train(stream, model, plugin, *, after=()):
    torch.manual_seed(1)
    pre = PreProbe()
    post = PostProbe(pre, plugin)
    end = EndOfExperience()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    common = dict(model=model, optimizer=opt, criterion=nn.CrossEntropyLoss(), train_mb_size=MB, eval_mb_size=64,
                  device="cpu", plugins=[end, pre, plugin, post, *after], evaluator=None, eval_every=-1)
    strategy = Naive(train_epochs=1, **common)  # (OnlineNaive is a deprecated alias of the same template)
    for exp in stream:
        strategy.train(exp)
    return strategy, post, end


def check_penalty_applied(post, plugin, first_exp_with_state=1):
    """Loss growth == reference penalty everywhere; zero before the first consolidation; > 0 after it."""
    assert post.records
    for exp, delta, ref, loss in post.records:
        assert abs(delta - ref) <= 1e-4 * ref + 2e-6 * (abs(loss) + 1.0), (exp, delta, ref)
    before = [r for r in post.records if r[0] < first_exp_with_state]
    after = [r for r in post.records if r[0] >= first_exp_with_state]
    assert before and all(r[1] == 0.0 for r in before)
    assert len(after) >= 2 and all(r[2] > 0 for r in after[1:]), [r[2] for r in after[:5]]
    return after


def check_first_importances(plugin_first_state, end, exp_index=0):
    model, dataset = end.snapshots[exp_index]
    ref = brute_fisher(model, dataset)
    got = plugin_first_state.importances
    assert set(got) == {n for n, p in model.named_parameters() if p.requires_grad}
    for n, a in got.items():
        if a.shape != ref[n].shape:  # a head that grew since: compare the old block, the rest must be free
            block = tuple(slice(0, k) for k in ref[n].shape)
            rest = torch.ones_like(a, dtype=torch.bool)
            rest[block] = False
            assert torch.all(a[rest] == 0), n
            a = a[block]
        scale = ref[n].abs().max().item()
        torch.testing.assert_close(a.to(F64), ref[n], rtol=1e-4, atol=1e-4 * scale + 1e-12, msg=lambda m: f"{n}: {m}")
    assert sum(float(a.sum()) for a in got.values()) > 0
    # anchors = the weights at the end of that experience
    for n, p in model.named_parameters():
        mu = plugin_first_state.anchors[n]
        assert torch.equal(mu[tuple(slice(0, k) for k in p.shape)], p.detach()), n


KINDS = {
    "nc_class_incremental": (b_nc_class, mlp),
    "nc_task_incremental_multihead": (b_nc_task, MultiHead),
    "ni_benchmark": (b_ni, mlp),
    "tensors_benchmark": (b_tensors, mlp),
    "dataset_benchmark": (b_dataset, mlp),
    "benchmark_from_datasets": (b_from_datasets, mlp),
    "class_incremental_benchmark": (b_class_incremental, mlp),
    "task_incremental_benchmark_multihead": (b_task_incremental, MultiHead),
    "permuted_domain_incremental": (b_permuted, mlp),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_benchmark_kind(kind):
    make_bench, make_model = KINDS[kind]
    bench = make_bench()
    stream = list(bench.train_stream)
    assert len(stream) == 3
    plugin = ParameterChangePlugin(FACTOR, "empirical_fisher")
    strategy, post, end = train(stream, make_model(), plugin)
    assert plugin.num_consolidations == 3
    check_penalty_applied(post, plugin)
    check_first_importances(post.first_state, end)
    if isinstance(strategy.model, MultiTaskModule):
        # one head per task; each task's head entered the state only once its task was consolidated
        heads = {n.split(".")[2] for n in plugin.importances if n.startswith("classifier.classifiers.")}
        assert heads == {"0", "1", "2"}
        assert not any(n.startswith("classifier.classifiers.") and n.split(".")[2] != "0"
                       for n in post.first_state.importances)


class HeadProbe(SupervisedPlugin):
    """Put AFTER our plugin: the plugin's (aligned) state and the head during experience 1."""

    def __init__(self, plugin):
        super().__init__()
        self.plugin, self.seen = plugin, None

    def before_backward(self, strategy, **kw):
        if strategy.clock.train_exp_counter == 1 and self.seen is None:
            head = strategy.model.head.classifier
            pen = self.plugin.penalty(strategy.model)
            gw, gb = torch.autograd.grad(pen, [head.weight, head.bias])
            self.seen = (self.plugin.state, head.weight.detach().clone(), gw, gb)


def test_incremental_classifier_growing_head():
    bench = b_nc_class()
    model = GrowingHead()
    plugin = ParameterChangePlugin(FACTOR, "empirical_fisher")
    probe = HeadProbe(plugin)
    strategy, post, end = train(list(bench.train_stream), model, plugin, after=[probe])
    assert model.head.classifier.weight.shape[0] == 6 and plugin.num_consolidations == 3
    check_penalty_applied(post, plugin)
    # the first consolidation is the brute-force Fisher of the 2-row head, anchored at exp-0 weights
    check_first_importances(post.first_state, end)
    state, w1, gw, gb = probe.seen
    A, mu = state.importances["head.classifier.weight"], state.anchors["head.classifier.weight"]
    Ab, mub = state.importances["head.classifier.bias"], state.anchors["head.classifier.bias"]
    w0 = dict(end.snapshots[0][0].named_parameters())
    # during experience 1 the head has 4 rows: old rows 0-1 regularized and anchored at exp-0 weights
    assert A.shape == (4, HIDDEN) and Ab.shape == (4,)
    assert (A[:2] > 0).any() and (Ab[:2] > 0).all()
    assert torch.equal(mu[:2], w0["head.classifier.weight"].detach())
    assert torch.equal(mub[:2], w0["head.classifier.bias"].detach())
    # new rows free: A == 0 there, so the penalty has no gradient on them
    assert torch.all(A[2:] == 0) and torch.all(Ab[2:] == 0)
    assert torch.all(gw[2:] == 0) and torch.all(gb[2:] == 0)
    # after the last consolidation every output unit that was trained has importance
    assert (plugin.importances["head.classifier.bias"] > 0).all()


class StateTap(SupervisedPlugin):
    """Put AFTER our plugin: (consolidations, state bytes, is_last_subexp) after every (mini-)experience."""

    def __init__(self, plugin):
        super().__init__()
        self.plugin, self.rows = plugin, []

    def after_training_exp(self, strategy, **kw):
        self.rows.append((self.plugin.num_consolidations, self.plugin.state.nbytes(),
                          bool(getattr(strategy.experience, "is_last_subexp", True))))


@pytest.mark.parametrize("boundaries", [True, False], ids=["access_task_boundaries", "no_boundaries"])
def test_online_stream(boundaries):
    """3 experiences -> 48 mini-experiences of 5 samples. ``drop_last=True``: see
    test_online_boundaries_with_even_split for why."""
    bench = b_nc_class()
    sub = list(split_online_stream(bench.train_stream, experience_size=5, access_task_boundaries=boundaries,
                                   drop_last=True, seed=0))
    assert len(sub) == 48  # 3 experiences x 80 samples / 5
    model = mlp()
    # Separate mode sums one Fisher per consolidation: 48 of them make A ~48x stiffer, so a smaller
    # factor keeps SGD stable (lr * 2 * factor * A < 2) without boundaries.
    plugin = ParameterChangePlugin(FACTOR if boundaries else 0.05, "empirical_fisher")
    tap = StateTap(plugin)
    strategy, post, end = train(sub, model, plugin, after=[tap])
    counts = [r[0] for r in tap.rows]
    full = 2 * sum(p.numel() * p.element_size() for p in model.parameters())  # A and mu, nothing else
    if boundaries:
        assert plugin.num_consolidations == 3
        # exactly at the last mini-experience of each experience
        assert [i for i, r in enumerate(tap.rows) if r[2]] == [15, 31, 47]
        assert counts == [0] * 15 + [1] * 16 + [2] * 16 + [3]
        first = 15
    else:
        assert plugin.num_consolidations == 48 and counts == list(range(1, 49))
        first = 0
    check_penalty_applied(post, plugin, first_exp_with_state=first + 1)
    # memory does not grow per mini-experience: one A and one mu per parameter, whatever the count
    assert {r[1] for r in tap.rows[first:]} == {full}
    assert {h["state_bytes"] for h in plugin.history} == {full} and len(plugin.history) == plugin.num_consolidations
    # With boundaries, a consolidation's importances come from the whole task that ends there
    # (strategy.experience.origin_experience: 80 samples); without, from the mini-experience (5).
    check_first_importances(post.first_state, end, exp_index=first)
    assert len(end.snapshots[first][1]) == (80 if boundaries else 5)


def test_online_boundaries_with_even_split():
    """Avalanche 0.6.0 bug: split_online_stream(drop_last=False) flags is_last_subexp only on a
    partial last chunk; when experience_size divides the experience no mini-experience is last.
    The plugin then consolidates the open task when the next task's first mini-experience starts."""
    bench = b_nc_class()
    sub = list(split_online_stream(bench.train_stream, experience_size=5, access_task_boundaries=True, seed=0))
    assert len(sub) == 48
    plugin = ParameterChangePlugin(FACTOR, "empirical_fisher")
    train(sub, mlp(), plugin)
    # the two task changes close tasks 0 and 1; the last task is never followed by another
    assert plugin.num_consolidations == 2
