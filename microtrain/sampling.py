"""Which samples go in which batch: one function shared by every loader, so all loaders see
the same order for the same (seed, epoch), shard it the same way across ranks, and can be
resumed at any batch."""

from __future__ import annotations

import numpy as np

from microtrain.errors import MicrotrainError


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The sample order of one epoch: a permutation that depends only on (seed, epoch)."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(n)


def shard(order: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """This rank's share: every world_size-th sample; together the ranks cover each sample once."""
    return order[rank::world_size]


def batch_count(n: int, batch_size: int, drop_last: bool, world_size: int = 1) -> int:
    """Batches per rank per epoch, equal on every rank (DDP runs one collective per step).

    drop_last: full batches only, counted on the smallest shard (``n // world_size``), so every
    batch of every rank is full. Otherwise: counted on the largest shard, so every sample is used;
    ``epoch_batches`` keeps a smaller shard's last batch from being empty."""
    if drop_last:
        return (n // world_size) // batch_size
    if world_size > 1 and 0 < n < world_size:
        raise MicrotrainError(f"a split of {n} samples cannot give each of {world_size} processes at least one; "
                              "use fewer processes or more data")
    if world_size > 1 and batch_size == 1 and n % world_size:
        raise MicrotrainError(f"batches of 1 cannot spread {n} samples evenly over {world_size} processes "
                              "(one would get an empty last batch); use a batch size of 2 or more, or drop_last: true")
    largest = -(-n // world_size)
    return -(-largest // batch_size)


def epoch_batches(n: int, batch_size: int, *, seed: int, epoch: int, shuffle: bool, drop_last: bool,
                  rank: int = 0, world_size: int = 1) -> list[np.ndarray]:
    """Index arrays of this rank's batches for one epoch: the last one may be smaller, never empty.

    Shards differ by at most one sample, so when the largest shard's last batch holds a single
    sample a smaller shard's would hold none (an empty batch breaks BatchNorm and the loss, and
    DDP then waits for that rank for ever). Such a rank moves the last sample of its previous
    batch into the last one: every rank still runs the same number of steps, every step of every
    rank has at least one sample, and every sample is used exactly once per epoch across ranks."""
    indices = shard(epoch_order(n, seed, epoch, shuffle), rank, world_size)
    count = batch_count(n, batch_size, drop_last, world_size)
    batches = [indices[i * batch_size:(i + 1) * batch_size] for i in range(count)]
    if count >= 2 and len(batches[-1]) == 0:  # batch_count guarantees batch_size >= 2 here
        batches[-1] = batches[-2][-1:]
        batches[-2] = batches[-2][:-1]
    return batches


def batch_seed(seed: int, epoch: int, batch: int, rank: int = 0) -> int:
    """A seed for one batch's augmentation, independent of worker count and resumable."""
    return int(np.random.default_rng([seed, epoch, batch, rank, 0xA06]).integers(2**31 - 1))


class EpochBatches:
    """The bookkeeping every loader shares: the epoch, where a resumed epoch starts, and this
    rank's index arrays. Loaders inherit it and implement ``__iter__`` over ``remaining_batches()``."""

    def __init__(self, context, *, batch_size: int, eval_batch_size: int, drop_last: bool):
        self.context = context
        self.train = context.train
        self.batch_size = batch_size if self.train else eval_batch_size
        self.drop_last = drop_last and self.train
        self.epoch = 1
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Shuffle and augment for ``epoch``; ``start_batch`` skips batches already trained (resume)."""
        self.epoch = epoch
        self.start_batch = start_batch

    def __len__(self) -> int:
        return batch_count(len(self.context.labels), self.batch_size, self.drop_last, self.context.world_size)

    def epoch_batches(self) -> list[np.ndarray]:
        """This epoch's index arrays, the same ones every loader uses."""
        c = self.context
        return epoch_batches(len(c.labels), self.batch_size, seed=c.seed, epoch=self.epoch, shuffle=self.train,
                             drop_last=self.drop_last, rank=c.rank, world_size=c.world_size)

    def remaining_batches(self) -> list[tuple[int, np.ndarray]]:
        """(batch number, indices) from ``start_batch`` on; a later pass starts at 0 again."""
        numbered = list(enumerate(self.epoch_batches()))[self.start_batch:]
        self.start_batch = 0
        return numbered


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split sample indices into (kept, held out): ``fraction`` of every class held out, chosen by ``seed`` alone.

    Per class, round(fraction * count) samples are held out (at least one when fraction > 0 and the class has
    two or more, so every class is validated; never all of a class, so every class is trained). The result
    depends only on (labels, fraction, seed): every rank, loader and resumed process gets the same split.
    Both index arrays are sorted, so the kept samples keep their order in the dataset."""
    labels = np.asarray(labels)
    rng = np.random.default_rng([seed, 0x7A11D])
    held: list[np.ndarray] = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = int(round(fraction * len(members)))
        if fraction > 0 and len(members) >= 2:
            count = min(max(count, 1), len(members) - 1)
        else:
            count = 0
        held.append(rng.permutation(members)[:count])
    holdout = np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
    kept = np.setdiff1d(np.arange(len(labels)), holdout, assume_unique=True)
    return kept, holdout
