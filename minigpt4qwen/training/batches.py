"""Which samples one process reads, in which order: its share of each global batch of an epoch's plan.

The plan (`data.sampler.epoch_plan`) depends only on the number of samples, the global batch, the seed and the
epoch, so every process, and a run resumed mid-epoch, derives the same one and takes its own slice of each batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from minigpt4qwen.data.sampler import balance_micro_batches, epoch_plan
from minigpt4qwen.training.config import TrainConfig
from minigpt4qwen.training.distributed import DistInfo


def rank_micro_batches(dataset: Dataset, collate: Callable[[list], dict], cfg: TrainConfig, info: DistInfo,
                       epoch: int, first_step: int, *, lengths: Sequence[int] | None = None,
                       packed_lengths: Sequence[int] | None = None, num_workers: int = 0) -> Iterator[dict]:
    """This rank's micro-batches of `epoch` from optimizer step `first_step` on, in order.

    Args:
        dataset, collate: the samples and the batch builder.
        cfg: micro_batch_size, grad_accum and seed.
        info: this process's rank, the world size and the device.
        epoch, first_step: where to start (a resumed run starts mid-epoch).
        lengths: per-sample token lengths: given, batches group samples of similar length.
        packed_lengths: per-sample token lengths of packed rows: each global batch's micro-batches then get
            similar numbers of tokens.
        num_workers: DataLoader workers.

    Returns:
        An iterator of collated micro-batches.
    """
    mb = cfg.micro_batch_size
    per_rank = mb * cfg.grad_accum
    lo = info.rank * per_rank
    plan = epoch_plan(len(dataset), per_rank * info.world_size, cfg.seed, epoch, lengths)[first_step:]
    if packed_lengths is not None:  # packed rows cost their tokens: spread them evenly
        plan = [balance_micro_batches(batch, packed_lengths, mb) for batch in plan]
    batches = [batch[lo + i : lo + i + mb] for batch in plan for i in range(0, per_rank, mb)]
    if hasattr(dataset, "set_epoch"):  # per-(epoch, sample) augmentation seeds: resumable with workers
        dataset.set_epoch(epoch)
    # An own generator: the loader's seed draw must not consume the global RNG, or a resumed run (whose
    # loader starts mid-epoch) would see different dropout masks than an uninterrupted one.
    generator = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch * 1009 + first_step)
    loader = DataLoader(dataset, batch_sampler=batches, collate_fn=collate, generator=generator,
                        num_workers=num_workers, pin_memory=info.device.type == "cuda")
    return iter(loader)
