"""Which samples go in which batch: one function shared by every loader, so all loaders see
the same order for the same (seed, epoch), shard it the same way across ranks, and can be
resumed at any batch."""

from __future__ import annotations

import numpy as np


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The sample order of one epoch: a permutation that depends only on (seed, epoch)."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(n)


def shard(order: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """This rank's share: every world_size-th sample; together the ranks cover each sample once."""
    return order[rank::world_size]


def batch_count(n: int, batch_size: int, drop_last: bool, world_size: int = 1) -> int:
    """Batches per rank per epoch. Equal on every rank (DDP needs that): sized by the largest shard."""
    largest = -(-n // world_size)
    return largest // batch_size if drop_last else -(-largest // batch_size)


def epoch_batches(n: int, batch_size: int, *, seed: int, epoch: int, shuffle: bool, drop_last: bool,
                  rank: int = 0, world_size: int = 1) -> list[np.ndarray]:
    """Index arrays of this rank's batches for one epoch (the last one may be smaller)."""
    indices = shard(epoch_order(n, seed, epoch, shuffle), rank, world_size)
    count = batch_count(n, batch_size, drop_last, world_size)
    return [indices[i * batch_size:(i + 1) * batch_size] for i in range(count)]


def batch_seed(seed: int, epoch: int, batch: int, rank: int = 0) -> int:
    """A seed for one batch's augmentation, independent of worker count and resumable."""
    return int(np.random.default_rng([seed, epoch, batch, rank, 0xA06]).integers(2**31 - 1))
