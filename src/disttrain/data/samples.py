"""Loading samples from a map-style data set, with per-sample randomness that does not depend on who loads.

A data set's augmentation, random crop or random chunking must give sample `i` of epoch `e` the
same draw whether 1 or 64 processes train, whether 0 or 8 DataLoader workers load it, and after a
resume. So just before `dataset[i]` the global random generators (`torch`, `random`, and `numpy`
when it is imported) are seeded from `(seed, epoch, i)`, and restored afterwards: the training
process's own random state (dropout) is untouched whoever loaded the sample. A data set that keeps
its own generator gets the same number from `sample_seed()` while its `__getitem__` runs.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Sequence
from typing import Any

import torch

_current: int | None = None  # the seed of the sample being loaded, while its __getitem__ runs


def seed_of(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for sample `index` of `epoch` in a run seeded with `seed` (a hash, not a sum:
    neighbouring samples and epochs get unrelated streams)."""
    mixed = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & (2**64 - 1)
    mixed ^= mixed >> 31
    mixed = (mixed * 0xD6E8FEB86659FD93) & (2**64 - 1)
    return (mixed ^ (mixed >> 32)) & (2**63 - 1)


def sample_seed() -> int:
    """The seed of the sample being loaded; call it inside your data set's `__getitem__`, e.g.
    `g = torch.Generator().manual_seed(sample_seed())`."""
    if _current is None:
        raise RuntimeError("sample_seed() is only known while the trainer loads a sample (inside __getitem__)")
    return _current


def load_samples(dataset: Any, indices: Sequence[int], seed: int, epoch: int) -> list[Any]:
    """`[dataset[i] for i in indices]`, each drawn under its own seed; the caller's random state is kept."""
    global _current
    numpy = sys.modules.get("numpy")  # seeded only where the data set could be using it
    saved = (torch.get_rng_state(), random.getstate(), numpy.random.get_state() if numpy else None)
    try:
        samples = []
        for i in indices:
            _current = seed_of(seed, epoch, int(i))
            torch.default_generator.manual_seed(_current)  # not the GPU's: dropout there is not ours
            random.seed(_current)
            if numpy:
                numpy.random.seed(_current & (2**32 - 1))
            samples.append(dataset[int(i)])
        return samples
    finally:
        _current = None
        torch.set_rng_state(saved[0])
        random.setstate(saved[1])
        if numpy:
            numpy.random.set_state(saved[2])
