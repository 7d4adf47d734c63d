"""Estimator records: metadata is registration data, trajectory estimators are registered too."""

import pytest
import torch
from torch.utils.data import TensorDataset

from avalanche_pcreg import ParameterChangePlugin, compute_importance, register_importance
from avalanche_pcreg.importance import (ESTIMATORS, IMPORTANCE_ESTIMATORS, TRAJECTORY_ESTIMATORS,
                                        TrajectoryEstimator)
from helpers import mlp, run_naive, tensor_data, tiny_nc


def test_records_of_builtin_estimators():
    assert ESTIMATORS["empirical_fisher"].shardable and not ESTIMATORS["empirical_fisher"].uses_uniforms
    assert ESTIMATORS["fisher"].shardable and ESTIMATORS["fisher"].uses_uniforms
    assert not ESTIMATORS["minibatch_fisher"].own_rng and ESTIMATORS["minibatch_fisher"].strategy_criterion
    assert not ESTIMATORS["avalanche_mas"].eval_mode and not ESTIMATORS["avalanche_mas"].own_rng
    for name in ("si", "avalanche_si", "rwalk", "rwalk_fisher"):
        assert ESTIMATORS[name].trajectory and name in TRAJECTORY_ESTIMATORS and name not in IMPORTANCE_ESTIMATORS
    assert "mas" in IMPORTANCE_ESTIMATORS and "mas" not in TRAJECTORY_ESTIMATORS


def test_trajectory_estimator_names_are_refused_by_compute_importance():
    x, y = tensor_data(20)
    for name in ("si", "rwalk"):
        with pytest.raises(ValueError, match="path-based"):
            compute_importance(mlp(), TensorDataset(x, y), name)


class StepCounter(TrajectoryEstimator):
    """Importance = number of optimizer steps a parameter took with a gradient (on device)."""

    def begin(self, params):
        self.count = {n: torch.zeros_like(p) for n, p in params.items()}

    def after_update(self, params):
        for n, p in params.items():
            if p.grad is not None:
                self.count[n] += 1

    def importance(self, params, data_importance=None):
        return {n: c.clone() for n, c in self.count.items()}


def test_register_a_trajectory_estimator_and_use_it():
    name = "test_registry_step_counter"
    register_importance(name, tracker=StepCounter)
    try:
        with pytest.raises(ValueError, match="already registered"):
            register_importance(name, tracker=StepCounter)
        plugin = ParameterChangePlugin(1.0, name, "separate")
        run_naive(tiny_nc(2), mlp(), [plugin], epochs=2, mb=32)
        # 120 samples an experience, minibatches of 32: 4 steps an epoch; 2 epochs; 2 experiences summed
        assert all(torch.all(a == 16) for a in plugin.importances.values())
        # an instance works as well
        plugin = ParameterChangePlugin(1.0, StepCounter())
        run_naive(tiny_nc(2), mlp(), [plugin], epochs=1, mb=32)
        assert all(torch.all(a == 8) for a in plugin.importances.values())
    finally:
        del TRAJECTORY_ESTIMATORS[name]
    assert name not in ESTIMATORS


def test_register_fn_with_record_flags():
    name = "test_registry_flags"

    def ones(model, data, *, names, **_):
        p = dict(model.named_parameters())
        return {n: torch.ones_like(p[n]) for n in names}

    register_importance(name, ones, shardable=True, own_rng=False)
    try:
        assert ESTIMATORS[name].shardable and not ESTIMATORS[name].own_rng
        with pytest.raises(TypeError, match="either fn"):
            register_importance("x_test", ones, tracker=StepCounter)
    finally:
        IMPORTANCE_ESTIMATORS.pop(name)
    assert name not in ESTIMATORS


def test_estimator_options_checked():
    with pytest.raises(TypeError, match="estimator_options"):
        ParameterChangePlugin(1.0, "rwalk", estimator_options={"bogus": 1})
    with pytest.raises(ValueError, match="takes none"):
        ParameterChangePlugin(1.0, "empirical_fisher", estimator_options={"eps": 1})
    with pytest.raises(ValueError, match="running_average"):
        ParameterChangePlugin(1.0, "mas", running_average=True)
    with pytest.raises(ValueError, match="importance_scale"):
        ParameterChangePlugin(1.0, "mas", importance_scale=0.0)


def test_rwalk_fisher_without_closed_windows_is_the_normalized_fisher():
    """delta_t larger than the run: no path score, so each experience's importance is the
    per-sample empirical Fisher of that experience over its maximum (separate mode)."""
    bench = tiny_nc(1)
    plugin = ParameterChangePlugin(1.0, "rwalk_fisher", "separate", estimator_options={"delta_t": 10 ** 6})
    model = mlp()
    run_naive(bench, model, [plugin], epochs=1, mb=32)
    f = compute_importance(model, bench.train_stream[0].dataset.eval(), "empirical_fisher", batch_size=32,
                           seed=plugin.seed)
    top = max(v.max() for v in f.values())
    for n, a in plugin.importances.items():
        assert torch.allclose(a, f[n] / top, rtol=1e-5, atol=1e-8), n


def test_rwalk_fisher_score_matches_rwalk_score_for_the_same_gradients():
    """With plain SGD and no penalty (first experience) and a model without dropout, the
    training gradient is the criterion's gradient: both trackers accumulate the same path score."""
    bench = tiny_nc(1)
    p1 = ParameterChangePlugin(1.0, "rwalk", "online", decay=0.0, estimator_options={"delta_t": 2})
    p2 = ParameterChangePlugin(1.0, "rwalk_fisher", "separate", estimator_options={"delta_t": 2})
    m1, m2 = mlp(), mlp()

    def scores_at_consolidation(plugin):
        """The tracker's path score as it is when turned into importances."""
        seen = {}
        orig = plugin._tracker.importance

        def spy(params, data_importance=None):
            seen.update({n: t.clone() for n, t in plugin._tracker.score.items()})
            return orig(params, data_importance)

        plugin._tracker.importance = spy
        return seen

    s1, s2 = scores_at_consolidation(p1), scores_at_consolidation(p2)
    run_naive(bench, m1, [p1], epochs=2, mb=16)
    run_naive(bench, m2, [p2], epochs=2, mb=16)
    assert s1 and s1.keys() == s2.keys()
    assert max(float(s1[n].abs().max()) for n in s1) > 0
    for n in s1:
        assert torch.allclose(s1[n], s2[n], rtol=1e-4, atol=1e-6), n
