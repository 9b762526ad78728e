"""Which samples each process sees in each micro-step: a function of (seed, step) and nothing else.

The global batch of step `s` is a slice of a per-epoch permutation of the dataset. It is then cut
into `micro_steps x world_size` slots. The union of all slots is the global batch whatever the
world size, so one process and sixty-four see the same data in the same optimizer step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MicroBatchPlan:
    indices: list[int]  # dataset indices
    start: int = 0  # position of the first of them in the global batch (keys per-sample noise)
    # A process with nothing to do in a micro-step still has to run forward and backward, or the
    # collective at the boundary would wait for it forever: it reruns a real sample with weight 0.
    stand_in: bool = False
    epoch: int = 0  # the pass over the data set this window belongs to (keys per-sample randomness)


class WindowSampler:
    """Global batches by step, epoch after epoch; the last window of an epoch may be shorter."""

    def __init__(self, num_samples: int, global_batch_size: int, micro_batch_size: int, seed: int):
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.steps_per_epoch = math.ceil(num_samples / global_batch_size)
        self._epoch_cache: tuple[int, torch.Tensor] | None = None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch_cache = (epoch, torch.randperm(self.num_samples, generator=g))
        return self._epoch_cache[1]

    def global_batch(self, step: int) -> list[int]:
        """Dataset indices of optimizer step `step` (0-based), independent of the world size."""
        epoch, position = divmod(step, self.steps_per_epoch)
        start = position * self.global_batch_size
        return self._permutation(epoch)[start : start + self.global_batch_size].tolist()

    def window(self, step: int, rank: int, world_size: int) -> list[MicroBatchPlan]:
        """This process's micro-batches for step `step`. Every process gets the same count."""
        epoch = step // self.steps_per_epoch
        return split_window(self.global_batch(step), rank, world_size, self.micro_batch_size, epoch)


def split_window(
    indices: list[int], rank: int, world_size: int, micro_batch_size: int, epoch: int = 0
) -> list[MicroBatchPlan]:
    """Cut one global batch into micro-step-major slots and return those of `rank`.

    A full window fills every slot with exactly `micro_batch_size` samples. A shorter one uses as few
    micro-steps as fit it and spreads the samples evenly, so slot sizes differ by at most one.
    """
    micro_steps = math.ceil(len(indices) / (world_size * micro_batch_size))
    slots = micro_steps * world_size
    base, extra = divmod(len(indices), slots)
    plans = []
    for k in range(micro_steps):
        slot = k * world_size + rank
        start = slot * base + min(slot, extra)
        size = base + (slot < extra)
        if size:
            plans.append(MicroBatchPlan(indices[start : start + size], start, epoch=epoch))
        else:
            plans.append(MicroBatchPlan(indices[:1], 0, stand_in=True, epoch=epoch))
    return plans
