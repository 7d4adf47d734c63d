"""Models that return tuples, dicts or objects (Hugging Face style outputs): ``output_transform``.

Each non-tensor model is the same network as a plain-tensor model (same seed, same weights); the
importances must be identical for every estimator, through ``compute_importance`` and through the
plugin in a Naive strategy whose criterion handles the dict.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from avalanche_pcreg import ParameterChangePlugin, compute_importance
from helpers import LossRecorder, tensor_data, tiny_nc

from avalanche.benchmarks.utils.classification_dataset import \
    _make_taskaware_tensor_classification_dataset as make_tensor_dataset
from avalanche.training.supervised import Naive

ESTIMATORS = ("uniform", "empirical_fisher", "fisher", "expected_fisher", "minibatch_fisher", "mas")


class Output:
    """An object with attributes, like a ``transformers`` ModelOutput without the mapping part."""

    def __init__(self, logits, hidden):
        self.logits = logits
        self.hidden_states = hidden


class Net(nn.Module):
    """An MLP whose output is ``kind``-wrapped. ``scale`` is used outside any module call, so its
    importance goes through the functional fallback (``functional_forward``) as well."""

    def __init__(self, kind: str, features=12, hidden=16, classes=6, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.kind = kind
        self.body = nn.Sequential(nn.Linear(features, hidden), nn.Tanh())
        self.head = nn.Linear(hidden, classes)
        self.scale = nn.Parameter(1.0 + 0.1 * torch.randn(classes))

    def forward(self, x):
        h = self.body(x)
        z = self.head(h) * self.scale
        if self.kind == "tensor":
            return z
        if self.kind == "dict":  # several entries, one of them "logits": unambiguous
            return {"logits": z, "hidden": h}
        if self.kind == "ordered_dict":  # a ModelOutput is an OrderedDict with attributes
            return OrderedDict(hidden=h, logits=z)
        if self.kind == "single_dict":  # one tensor, under any key
            return {"out": z}
        if self.kind == "dict_no_logits":  # two tensors, none called logits: ambiguous
            return {"scores": z, "hidden": h}
        if self.kind == "tuple":
            return z, h
        if self.kind == "object":
            return Output(z, h)
        raise AssertionError(self.kind)


# kind -> output_transform (None: the automatic rules must find the logits)
CASES = {
    "dict": None,
    "ordered_dict": None,
    "single_dict": None,
    "object": None,
    "dict_no_logits": lambda out: out["scores"],
    "tuple": lambda out: out[0],
    "dict_transform": lambda out: out["logits"],
}


def _model(case):
    return Net("dict" if case == "dict_transform" else case)


@pytest.fixture(scope="module")
def data():
    x, y = tensor_data(n=40, features=12, classes=6, seed=3)
    return make_tensor_dataset(x, y)


@pytest.fixture(scope="module")
def reference(data):
    """Importances of the plain-tensor model, per estimator."""
    model = Net("tensor")
    return {m: compute_importance(model, data, m, batch_size=16, chunk_size=4) for m in ESTIMATORS}


def test_reference_is_informative(reference):
    """The comparisons below are only meaningful if the estimates are not trivial."""
    for m, imp in reference.items():
        assert set(imp) == {"body.0.weight", "body.0.bias", "head.weight", "head.bias", "scale"}
        for name, t in imp.items():
            assert torch.isfinite(t).all() and (t >= 0).all()
            if m == "uniform":
                assert torch.equal(t, torch.ones_like(t))
            else:
                assert t.max() > 1e-6, (m, name)
                assert not torch.allclose(t, t.flatten()[0].expand_as(t)), (m, name)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("method", ESTIMATORS)
def test_same_importances_as_plain_tensor_head(data, reference, case, method):
    model = _model(case)
    got = compute_importance(model, data, method, batch_size=16, chunk_size=4, output_transform=CASES[case])
    assert set(got) == set(reference[method])
    for name, ref in reference[method].items():
        torch.testing.assert_close(got[name], ref, rtol=1e-6, atol=0, msg=f"{case} {method} {name}")


def test_criterion_sees_the_logits(data):
    """A user criterion gets what output_transform returns (empirical_fisher and minibatch_fisher)."""
    seen = []

    def crit(out, y):
        seen.append(type(out))
        return F.cross_entropy(out, y, reduction="none")

    ref = compute_importance(Net("tensor"), data, "empirical_fisher", batch_size=16, criterion=crit)
    got = compute_importance(Net("tuple"), data, "empirical_fisher", batch_size=16, criterion=crit,
                             output_transform=lambda out: out[0])
    assert seen and all(t is torch.Tensor for t in seen)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-6, atol=0)


@pytest.mark.parametrize("kind, shown", [("tuple", "tuple of 2 items (Tensor, Tensor)"),
                                         ("dict_no_logits", "dict with keys ['scores', 'hidden']")])
@pytest.mark.parametrize("method", ["empirical_fisher", "minibatch_fisher", "mas"])
def test_ambiguous_output_needs_a_transform(data, kind, shown, method):
    with pytest.raises(TypeError) as err:
        compute_importance(Net(kind), data, method, batch_size=16)
    msg = str(err.value)
    assert shown in msg and "output_transform" in msg and "lambda out:" in msg


def test_transform_must_be_callable_and_return_a_tensor(data):
    with pytest.raises(TypeError, match="output_transform must be a callable"):
        compute_importance(Net("tuple"), data, "empirical_fisher", output_transform=0)
    with pytest.raises(TypeError, match="output_transform must be a callable"):
        ParameterChangePlugin(1.0, output_transform="logits")
    with pytest.raises(TypeError, match=r"output_transform must return the logits as a Tensor.*returned a tuple"):
        compute_importance(Net("tuple"), data, "empirical_fisher", output_transform=lambda out: out[:1])


def test_transform_is_not_left_behind(data):
    """After a pass with a transform (even a failing one), a plain model runs as before."""
    with pytest.raises(TypeError):
        compute_importance(Net("tuple"), data, "mas", output_transform=lambda out: None)
    compute_importance(Net("tensor"), data, "mas", batch_size=16)


def dict_criterion(out, y):
    """A user's criterion for a model returning a dict (also accepts plain logits)."""
    logits = out["logits"] if isinstance(out, Mapping) else out
    return F.cross_entropy(logits, y)


def train_naive(bench, model, plugin, criterion):
    """Naive strategy (as ``helpers.run_naive``) with a user's criterion."""
    torch.manual_seed(0)
    rec = LossRecorder()
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05), criterion=criterion,
                     train_mb_size=16, train_epochs=1, eval_mb_size=64, device="cpu", plugins=[plugin, rec],
                     evaluator=None, eval_every=-1)
    for exp in bench.train_stream:
        strategy.train(exp)
    return rec


@pytest.mark.parametrize("method, kind, transform", [
    ("empirical_fisher", "dict", None),
    ("expected_fisher", "dict", lambda out: out["logits"]),
    ("minibatch_fisher", "dict", lambda out: out["logits"]),  # the strategy's criterion gets the raw dict
    ("mas", "tuple", lambda out: out[0]),
])
def test_plugin_in_naive_strategy(method, kind, transform):
    """Training with the dict/tuple model and its criterion gives the plain model's importances,
    anchors and losses (penalty included) at every step."""
    bench = tiny_nc(n_experiences=2, n=96)
    ref_plugin = ParameterChangePlugin(5.0, method, batch_size=16)
    ref_rec = train_naive(bench, Net("tensor"), ref_plugin, dict_criterion)
    crit = (lambda out, y: F.cross_entropy(out[0], y)) if kind == "tuple" else dict_criterion
    plugin = ParameterChangePlugin(5.0, method, batch_size=16, output_transform=transform)
    rec = train_naive(bench, Net(kind), plugin, crit)
    assert plugin.num_consolidations == ref_plugin.num_consolidations == 2
    assert len(rec.losses) == len(ref_rec.losses) > 0
    assert rec.losses == pytest.approx(ref_rec.losses, rel=1e-6, abs=0)
    for name, ref in ref_plugin.importances.items():
        assert ref.max() > 0
        torch.testing.assert_close(plugin.importances[name], ref, rtol=1e-6, atol=0)
        torch.testing.assert_close(plugin.anchors[name], ref_plugin.anchors[name], rtol=1e-6, atol=0)


def test_plugin_without_transform_on_a_tuple_model_says_what_to_do():
    bench = tiny_nc(n_experiences=2, n=96)
    plugin = ParameterChangePlugin(1.0, "empirical_fisher", batch_size=16)
    with pytest.raises(TypeError, match="output_transform"):
        train_naive(bench, Net("tuple"), plugin, lambda out, y: F.cross_entropy(out[0], y))
