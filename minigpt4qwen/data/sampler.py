"""Sampling order for training: shuffled or length-grouped, sharded across processes, resumable mid-epoch.

The order is a pure function of (seed, epoch, dataset size, lengths), the same on every rank; each rank takes
its slice of every global batch. `set_epoch(epoch, start)` resumes exactly after `start` samples of this rank.
For packed rows, `balance_micro_batches` evens out the tokens of a global batch's micro-batches.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler


class ShardedSampler(Sampler[int]):
    """Indices for one rank's DataLoader, in global batches of `batch_size * num_replicas`.

    Without `lengths`: a random permutation per epoch (or 0..N-1 with shuffle off). With `lengths`: the
    permutation is cut into mega-batches of `megabatch_mult` global batches, each sorted by length, so a batch
    holds samples of similar length and pads little; the global batches are then shuffled and the one holding
    the longest sample goes first (an out-of-memory shows at step one, not hours in).

    Every rank gets the same number of samples: the order is padded by repeating its head (or, with
    drop_last, trimmed) to a multiple of `num_replicas`. Rank r takes the r-th slice of each global batch, so
    use a DataLoader with the same `batch_size` to keep the batches grouped.

    Args:
        num_samples: dataset size.
        batch_size: per-rank batch size of the DataLoader.
        lengths: per-sample lengths to group by; None for plain shuffling.
        num_replicas: number of processes (world size).
        rank: this process.
        shuffle: random order (False: 0..N-1, then grouped if lengths are given).
        seed: with the epoch, determines the order.
        drop_last: trim instead of pad to a multiple of num_replicas.
        megabatch_mult: global batches per length-sorted mega-batch (more: tighter grouping, less randomness).

    Raises:
        ValueError: inconsistent arguments.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        lengths: Sequence[int] | None = None,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        megabatch_mult: int = 50,
    ) -> None:
        if num_samples < 1 or batch_size < 1 or megabatch_mult < 1:
            raise ValueError("num_samples, batch_size and megabatch_mult must be >= 1")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside 0..{num_replicas - 1}")
        if lengths is not None and len(lengths) != num_samples:
            raise ValueError(f"{len(lengths)} lengths for {num_samples} samples")
        if drop_last and num_samples < num_replicas:
            raise ValueError(f"drop_last with {num_samples} samples for {num_replicas} replicas leaves none")
        self.num_samples, self.batch_size = num_samples, batch_size
        self.lengths = None if lengths is None else np.asarray(lengths, dtype=np.int64)
        self.num_replicas, self.rank = num_replicas, rank
        self.shuffle, self.seed, self.drop_last, self.megabatch_mult = shuffle, seed, drop_last, megabatch_mult
        self.epoch, self.start = 0, 0
        rounded = (num_samples // num_replicas if drop_last else -(-num_samples // num_replicas)) * num_replicas
        self.samples_per_rank = rounded // num_replicas

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch and where in it to begin.

        Args:
            epoch: the epoch number.
            start: samples of this rank's epoch already consumed (steps done x batch size): iteration skips them.

        Raises:
            ValueError: start is outside 0..samples_per_rank.
        """
        if not 0 <= start <= self.samples_per_rank:
            raise ValueError(f"start {start} is outside 0..{self.samples_per_rank} (samples per rank and epoch)")
        self.epoch, self.start = epoch, start

    def global_order(self) -> np.ndarray:
        """The epoch's order of all ranks' samples, before sharding (padded or trimmed).

        Returns:
            int64 array of length samples_per_rank * num_replicas.
        """
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(self.num_samples) if self.shuffle else np.arange(self.num_samples)
        if self.lengths is not None:
            order = self._group_by_length(order, rng)
        total = self.samples_per_rank * self.num_replicas
        if total > len(order):
            order = np.concatenate([order, np.resize(order, total - len(order))])
        return order[:total]

    def _group_by_length(self, order: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Sort within mega-batches, shuffle the global batches, and put the longest one first."""
        assert self.lengths is not None
        global_batch = self.batch_size * self.num_replicas
        mega = global_batch * self.megabatch_mult
        # Stable sort by descending length keeps equal lengths in the permutation's (random) order.
        megas = np.split(order, range(mega, len(order), mega))
        grouped = np.concatenate([chunk[np.argsort(-self.lengths[chunk], kind="stable")] for chunk in megas])
        batches = np.split(grouped, range(global_batch, len(grouped), global_batch))
        # A short tail batch stays last so that all ranks' full batches come first.
        full, tail = (batches[:-1], batches[-1:]) if len(batches[-1]) < global_batch else (batches, [])
        if self.shuffle:
            full = [full[i] for i in rng.permutation(len(full))]
        if full:
            longest = max(range(len(full)), key=lambda b: int(self.lengths[full[b]].max()))
            full[0], full[longest] = full[longest], full[0]
        return np.concatenate(full + tail)

    def __iter__(self) -> Iterator[int]:
        order = self.global_order()
        global_batch = self.batch_size * self.num_replicas
        mine = []
        for begin in range(0, len(order), global_batch):
            chunk = order[begin : begin + global_batch]
            share = len(chunk) // self.num_replicas
            mine.append(chunk[self.rank * share : (self.rank + 1) * share])
        return iter(np.concatenate(mine)[self.start :].tolist())

    def __len__(self) -> int:
        return self.samples_per_rank - self.start


def epoch_plan(num_samples: int, global_batch: int, seed: int, epoch: int,
               lengths: Sequence[int] | None = None) -> list[list[int]]:
    """The global batches (sample indices) of one epoch: a seeded permutation cut into full batches.

    With `lengths`, samples of similar length are grouped into the same batches (less padding; see
    `ShardedSampler`). A pure function of its arguments, so a resumed run recomputes it and skips the steps
    already done.
    """
    if lengths is not None:
        sampler = ShardedSampler(num_samples, global_batch, lengths=list(lengths), seed=seed)
        sampler.set_epoch(epoch)
        order = sampler.global_order().tolist()
    else:
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(num_samples, generator=generator).tolist()
    return [order[i : i + global_batch] for i in range(0, num_samples - global_batch + 1, global_batch)]


def balance_micro_batches(batch: Sequence[int], lengths: Sequence[int], micro_batch_size: int) -> list[int]:
    """One global batch reordered so that its consecutive micro-batches hold similar numbers of tokens.

    For packed rows (`data.packing`), where a micro-batch costs its tokens, not its longest sample times its size:
    every process of a step and every accumulation step then does about the same work. Each slice of
    `micro_batch_size` keeps that many samples; the longest samples are dealt first, each to the slice with the
    fewest tokens so far (ties: the first such slice), and each slice keeps the batch's order. A pure function of
    its arguments, so a resumed run recomputes the same micro-batches.

    Args:
        batch: the global batch's sample indices (a multiple of micro_batch_size).
        lengths: token length of every sample of the dataset.
        micro_batch_size: samples per micro-batch.

    Returns:
        The same indices, micro-batch after micro-batch.

    Raises:
        ValueError: a batch that is not a whole number of micro-batches.
    """
    if micro_batch_size < 1 or len(batch) % micro_batch_size:
        raise ValueError(f"a batch of {len(batch)} samples is not a whole number of micro-batches of "
                         f"{micro_batch_size}")
    slots = len(batch) // micro_batch_size
    tokens: list[int] = [0] * slots
    members: list[list[int]] = [[] for _ in range(slots)]
    for position in sorted(range(len(batch)), key=lambda p: (-lengths[batch[p]], p)):
        slot = min((s for s in range(slots) if len(members[s]) < micro_batch_size), key=lambda s: (tokens[s], s))
        tokens[slot] += lengths[batch[position]]
        members[slot].append(position)
    return [batch[p] for slot in members for p in sorted(slot)]
