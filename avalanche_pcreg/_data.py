"""What the importance pass of ``ParameterChangePlugin`` reads: its data and its criterion.

Kept apart from the math modules: these read attributes of an Avalanche strategy and
experience (``dataloader.datasets``, ``adapted_dataset``, ``origin_experience``, ``_criterion``),
but import nothing from Avalanche.
"""

from __future__ import annotations

from typing import Callable, Optional

from .importance._common import StrategyCriterion

__all__ = ["IMPORTANCE_DATA", "importance_dataset", "importance_criterion"]

IMPORTANCE_DATA = ("experience", "adapted")


def importance_dataset(strategy, experience, importance_data: str):
    """The dataset of the importance pass, with eval transforms.

    * ``"experience"``: the experience's dataset; on an online stream with task boundaries, the
      whole origin experience (the task), not only the last mini-experience;
    * ``"adapted"``: what the strategy trained on; Avalanche's multi-dataset loaders
      (``ReplayDataLoader``: the experience plus the replay buffer) keep their parts in
      ``.datasets``, which are concatenated.
    """
    if importance_data == "adapted":
        parts = getattr(getattr(strategy, "dataloader", None), "datasets", None)
        if parts and all(hasattr(d, "concat") for d in parts):
            data = parts[0]
            for part in parts[1:]:
                data = data.concat(part)
        else:
            data = strategy.adapted_dataset
    else:
        origin = getattr(experience, "origin_experience", None)
        use_origin = origin is not None and getattr(experience, "access_task_boundaries", False)
        data = origin.dataset if use_origin else experience.dataset
    if data is not None and hasattr(data, "eval"):
        data = data.eval()
    return data


def importance_criterion(strategy, criterion: Optional[Callable], strategy_criterion: bool) -> Optional[Callable]:
    """The user's criterion; else the strategy's, wrapped in a
    :class:`~avalanche_pcreg.importance._common.StrategyCriterion`, when the estimator's record
    asks for it (``strategy_criterion``: ``empirical_fisher``, ``fisher``, ``expected_fisher``,
    ``minibatch_fisher``); else None (the estimator's own default)."""
    if criterion is not None:
        return criterion
    if strategy_criterion:
        own = getattr(strategy, "_criterion", None)
        return StrategyCriterion(own) if own is not None else None
    return None
