"""RWalk (``rwalk``, ``rwalk_fisher``) on a model that returns a tuple, with ``output_transform``.

``rwalk`` runs an extra forward/backward of the strategy's criterion at every iteration (the task
gradient), under the plugin's ``output_transform`` as the importance pass is; ``rwalk_fisher`` adds
the per-sample empirical Fisher, whose pass needs the logits. The tuple model is the plain-tensor
model with its hidden features returned too: both runs must give identical importances, anchors
and losses.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from avalanche.training.supervised import Naive

from avalanche_pcreg import ParameterChangePlugin
from helpers import LossRecorder, tiny_nc


class TupleNet(nn.Module):
    def __init__(self, tuple_output: bool):
        super().__init__()
        torch.manual_seed(0)
        self.tuple_output = tuple_output
        self.body = nn.Sequential(nn.Linear(12, 16), nn.Tanh())
        self.head = nn.Linear(16, 6)

    def forward(self, x):
        h = self.body(x)
        z = self.head(h)
        return (z, h) if self.tuple_output else z


def criterion(out, y):
    """The user's criterion for the tuple model (it also takes plain logits)."""
    return F.cross_entropy(out[0] if isinstance(out, tuple) else out, y)


def _train(method, tuple_output, **kw):
    # rwalk_fisher's Fisher pass: cross-entropy on the logits (the strategy's criterion is a function)
    plugin_kw = dict(mode="online", decay=0.0) if method == "rwalk" else dict(mode="separate",
                                                                             criterion=nn.CrossEntropyLoss())
    plugin = ParameterChangePlugin(5.0, method, batch_size=16, estimator_options={"delta_t": 3}, **plugin_kw, **kw)
    model = TupleNet(tuple_output)
    torch.manual_seed(0)
    rec = LossRecorder()
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05), criterion=criterion,
                     train_mb_size=16, train_epochs=2, eval_mb_size=64, device="cpu", plugins=[plugin, rec],
                     evaluator=None, eval_every=-1)
    for exp in tiny_nc(2).train_stream:
        strategy.train(exp)
    return plugin, rec


@pytest.mark.parametrize("method", ["rwalk", "rwalk_fisher"])
def test_rwalk_on_tuple_output_model_with_output_transform(method):
    ref, ref_rec = _train(method, tuple_output=False)
    got, rec = _train(method, tuple_output=True, output_transform=lambda out: out[0])
    assert got.num_consolidations == ref.num_consolidations == 2
    assert len(rec.losses) == len(ref_rec.losses) > 0
    assert rec.losses == ref_rec.losses
    assert set(got.importances) == set(ref.importances) == {"body.0.weight", "body.0.bias", "head.weight", "head.bias"}
    for n, a in ref.importances.items():
        assert float(a.max()) > 0, n
        assert torch.equal(got.importances[n], a), n
        assert torch.equal(got.anchors[n], ref.anchors[n]), n


def test_rwalk_fisher_on_tuple_output_model_without_transform_says_what_to_do():
    with pytest.raises(TypeError, match="output_transform"):
        _train("rwalk_fisher", tuple_output=True)
