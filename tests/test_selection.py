"""Selecting parameters by the module that holds them: ``include_modules`` / ``exclude_modules`` and
``norm_layers`` (avalanche_pcreg.selection), alone and through ParameterChangePlugin."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

from avalanche_pcreg import ParameterChangePlugin, norm_layers
from avalanche_pcreg.selection import ModuleTypes, ParameterSelection, module_selector, named_parameters


class Net(nn.Module):
    """Normalization layers under names no pattern of the README's kind (``*.bn*``) catches."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.down = nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4))  # like downsample.1
        self.gn = nn.GroupNorm(2, 4)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(4 * 4 * 4, 8)
        self.ln = nn.LayerNorm(8)
        self.rms = nn.RMSNorm(8)
        self.inorm = nn.InstanceNorm2d(1, affine=True)
        self.head = nn.Linear(8, 6)

    def forward(self, x):
        h = self.gn(self.down(self.bn(self.conv(self.inorm(x)))))
        return self.head(self.rms(self.ln(self.fc(self.flat(h)))))


NORMS = {"bn.weight", "bn.bias", "down.1.weight", "down.1.bias", "gn.weight", "gn.bias", "ln.weight", "ln.bias",
         "rms.weight", "inorm.weight", "inorm.bias"}
OTHERS = {"conv.weight", "conv.bias", "down.0.weight", "fc.weight", "fc.bias", "head.weight", "head.bias"}


def _selected(model, **kw):
    sel = ParameterSelection(**kw)
    sel.check_patterns(named_parameters(model), model)
    return set(sel.select(named_parameters(model), model))


def test_norm_layers_recognises_every_normalization_layer():
    model = Net()
    assert {n for n, _ in model.named_parameters()} == NORMS | OTHERS
    for m in (nn.BatchNorm1d(3), nn.BatchNorm2d(3), nn.BatchNorm3d(3), nn.SyncBatchNorm(3), nn.InstanceNorm1d(3),
              nn.GroupNorm(1, 3), nn.LayerNorm(3), nn.RMSNorm(3), nn.LazyBatchNorm1d()):
        assert norm_layers(m), type(m).__name__
    for m in (nn.Linear(2, 2), nn.Conv2d(1, 1, 1), nn.Embedding(3, 2), nn.Sequential(nn.BatchNorm1d(2)), model):
        assert not norm_layers(m), type(m).__name__


def test_exclude_and_include_modules():
    model = Net()
    assert _selected(model, exclude_modules=norm_layers) == OTHERS
    assert _selected(model) == NORMS | OTHERS
    # a type, a tuple or a list of types, or a predicate
    assert _selected(model, include_modules=nn.Linear) == {"fc.weight", "fc.bias", "head.weight", "head.bias"}
    assert _selected(model, include_modules=(nn.Conv2d, nn.LayerNorm)) == {
        "conv.weight", "conv.bias", "down.0.weight", "ln.weight", "ln.bias"}
    assert _selected(model, exclude_modules=[nn.BatchNorm2d]) == (NORMS | OTHERS) - {
        "bn.weight", "bn.bias", "down.1.weight", "down.1.bias"}
    # the parameters a module holds directly: a container selects none of its children's
    assert _selected(model, exclude_modules=nn.Sequential) == NORMS | OTHERS
    # with the name filters and the (name, param) predicate
    assert _selected(model, exclude="*.bias", exclude_modules=norm_layers) == {
        "conv.weight", "down.0.weight", "fc.weight", "head.weight"}
    assert _selected(model, include="head.*", include_modules=nn.Linear) == {"head.weight", "head.bias"}
    assert _selected(model, exclude_modules=norm_layers, parameters=lambda n, p: p.ndim > 1) == {
        "conv.weight", "down.0.weight", "fc.weight", "head.weight"}
    # frozen parameters are never selected
    model.fc.weight.requires_grad_(False)
    assert "fc.weight" not in _selected(model, include_modules=nn.Linear)


def test_module_selection_looks_through_wrappers():
    model = Net()
    for wrapped in (nn.DataParallel(model), nn.DataParallel(nn.DataParallel(model))):
        assert _selected(wrapped, exclude_modules=norm_layers) == OTHERS
        assert _selected(wrapped, include_modules=nn.Linear) == {"fc.weight", "fc.bias", "head.weight", "head.bias"}


def test_module_selector_arguments():
    assert module_selector("exclude_modules", None) is None
    assert module_selector("exclude_modules", norm_layers) is norm_layers
    assert module_selector("include_modules", nn.Linear) == ModuleTypes((nn.Linear,))
    assert module_selector("include_modules", [nn.Linear, nn.Conv2d]) == ModuleTypes((nn.Linear, nn.Conv2d))
    for bad in ((), [], (nn.Linear, int), int, "Linear", 3):
        with pytest.raises(TypeError, match="include_modules must be an nn.Module subclass"):
            module_selector("include_modules", bad)
    with pytest.raises(TypeError, match="exclude_modules must be"):
        ParameterChangePlugin(1.0, exclude_modules="BatchNorm2d")


def test_include_modules_that_hold_nothing_is_an_error_exclude_is_not():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"include_modules ModuleTypes\(Conv2d\) selects no module that holds a "
                                         r"parameter; the model's modules with parameters are \['Linear'\]"):
        _selected(model, include_modules=nn.Conv2d)
    # the same policy serves models without normalization layers
    assert _selected(model, exclude_modules=norm_layers) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    with pytest.raises(TypeError, match="pass the model"):
        ParameterSelection(exclude_modules=norm_layers).select(named_parameters(model))


def test_plugin_selects_by_module_and_pickles():
    model = Net()
    plugin = ParameterChangePlugin(1.0, exclude_modules=norm_layers)
    assert plugin.exclude_modules is norm_layers and plugin.include_modules is None
    assert set(plugin.selected_parameters(model)) == OTHERS
    other = ParameterChangePlugin(1.0, include_modules=(nn.Linear,), exclude="*.bias")
    assert set(other.selected_parameters(nn.DataParallel(model))) == {"fc.weight", "head.weight"}
    for p in (plugin, other):  # the plugin pickles with the strategy (Avalanche's checkpoints)
        again = pickle.loads(pickle.dumps(p))
        assert set(again.selected_parameters(model)) == set(p.selected_parameters(model))


def test_plugin_trains_without_the_normalization_layers():
    from avalanche.benchmarks import nc_benchmark
    from avalanche.benchmarks.utils.classification_dataset import (
        _make_taskaware_tensor_classification_dataset as make_dataset,
    )
    from avalanche.training.supervised import Naive

    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(96, 1, 4, 4, generator=g), torch.arange(96) % 6
    bench = nc_benchmark(make_dataset(x, y), make_dataset(x[:24], y[:24]), n_experiences=2, task_labels=False,
                         seed=0, shuffle=False)
    model = Net()
    plugin = ParameterChangePlugin(1.0, exclude_modules=norm_layers)
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
                     criterion=nn.CrossEntropyLoss(), train_mb_size=16, train_epochs=1, device="cpu",
                     plugins=[plugin], evaluator=None)
    for exp in bench.train_stream:
        strategy.train(exp)
    assert plugin.num_consolidations == 2
    assert set(plugin.importances) == OTHERS
    assert plugin.penalty(model).item() >= 0
    bad = ParameterChangePlugin(1.0, include_modules=nn.Embedding)
    strategy = Naive(model=Net(), optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
                     criterion=nn.CrossEntropyLoss(), train_mb_size=16, train_epochs=1, device="cpu",
                     plugins=[bad], evaluator=None)
    with pytest.raises(ValueError, match="include_modules ModuleTypes\\(Embedding\\) selects no module"):
        strategy.train(bench.train_stream[0])
