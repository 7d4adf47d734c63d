"""The data of an importance pass: a DataLoader over a Dataset (or a seeded subset of it), this
rank's shard of it under ``torch.distributed``, and the uniforms drawn for the sampled Fisher."""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ._common import dist_rank_world

__all__ = ["Shard", "make_loader", "shard_uniforms"]


class Shard(NamedTuple):
    """Which global samples a loader holds: ``rank::world`` of ``total`` (0, 1 without sharding)."""

    total: int
    rank: int
    world: int


def _take(dataset, idx):
    """The samples ``idx`` of ``dataset``; Avalanche datasets keep their collate_fn and transforms."""
    if hasattr(dataset, "subset"):
        return dataset.subset(idx)
    return torch.utils.data.Subset(dataset, idx)


def _subset(dataset, num_samples: int, seed: int):
    n = len(dataset)
    gen = torch.Generator()
    gen.manual_seed(int(seed))
    return _take(dataset, torch.randperm(n, generator=gen)[: min(num_samples, n)].tolist())


def make_loader(data, batch_size: int, num_samples: Optional[int], seed: int, *, shuffle_rng: bool = True,
                shard: bool = False) -> Tuple[DataLoader, Optional[int], Optional[Shard]]:
    """A DataLoader (no shuffling) over ``data`` or a seeded random subset of it.

    ``shuffle_rng=True`` gives the loader its own generator so that iterating it does not
    advance the global RNG (training stays reproducible with and without the plugin);
    ``minibatch_fisher`` passes False to draw exactly as Avalanche's ``EWCPlugin`` does.
    ``shard=True`` under ``torch.distributed`` keeps this rank's share (indices rank::world).
    Returns ``(loader, limit, shard)``: ``limit`` caps samples when ``data`` is already a
    DataLoader; ``shard`` says which global samples the loader holds (None for a DataLoader given).
    """
    if isinstance(data, DataLoader):
        return data, num_samples, None
    if not isinstance(data, Dataset) and not hasattr(data, "__getitem__"):
        raise TypeError(f"data must be a Dataset or a DataLoader, got {type(data).__name__}")
    if len(data) == 0:
        raise ValueError("data is empty: no samples to estimate importances from")
    if num_samples is not None:
        data = _subset(data, num_samples, seed)
    total = len(data)
    rank, world = dist_rank_world()
    if shard and world > 1:
        data = _take(data, list(range(rank, total, world)))
    else:
        rank, world = 0, 1
    collate = getattr(data, "collate_fn", None)
    gen = torch.Generator() if shuffle_rng else None
    if gen is not None:
        gen.manual_seed(int(seed))
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=collate, generator=gen)
    return loader, None, Shard(total, rank, world)


def shard_uniforms(shard: Shard, seed: int) -> Tensor:
    """One uniform per global sample (float64), drawn up front from a generator seeded with
    ``seed`` and sharded with the data, so that sampled labels do not depend on how the data is
    split across ranks: this rank's share."""
    gen = torch.Generator()
    gen.manual_seed(int(seed))
    return torch.rand(shard.total, generator=gen, dtype=torch.float64)[shard.rank::shard.world]
