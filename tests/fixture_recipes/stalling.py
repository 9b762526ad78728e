"""stalling: the augmented recipe with a fault on one process, for the watchdog's tests.

`stalling.fault` chooses it: `getitem` (a sample that never loads: the dataset's `__getitem__`
blocks), `forward` (the model's forward sleeps), `unpicklable` (a DataLoader worker's batch cannot
be pickled back to its process), `none` (only the marker). It strikes on process `stalling.rank`, at
the `stalling.after`-th call there (loads count per worker), and is announced by a file
`stalling.marker` (if set, holding the pid) when it strikes, so that a test can act at that moment.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from disttrain.config import Config as RunConfig
from disttrain.config import section, setting
from tests.fixture_recipes import augmented

RUN_DEFAULTS = {**augmented.RUN_DEFAULTS, "steps": 1000}


@dataclass
class Config(augmented.Config):
    fault: str = setting("getitem", "getitem, forward, unpicklable or none")
    rank: int = setting(1, "the process it strikes on")
    after: int = setting(8, "calls on that process before it strikes")
    marker: str = setting("", "a file written when it strikes")
    optimizer: augmented.OptimizerConfig = section(augmented.Config().optimizer.__class__, "the optimizer")


def _strikes(c: Config, calls: list[int]) -> bool:
    if int(os.environ.get("RANK", "0")) != c.rank:
        return False
    calls[0] += 1
    if calls[0] != c.after:
        return False
    if c.marker:
        with open(c.marker, "w") as f:
            f.write(str(os.getpid()))
    return True


class FaultyPoints(augmented.NoisyPoints):
    def __init__(self, base: augmented.NoisyPoints, c: Config):
        super().__init__(base.x, base.y)
        self.c, self.calls, self.poisoned = c, [0], False

    def __getitem__(self, i: int) -> dict:
        if self.c.fault in ("getitem", "unpicklable") and _strikes(self.c, self.calls):
            if self.c.fault == "getitem":
                threading.Event().wait()  # a read that never returns
            self.poisoned = True  # its micro-batch carries what pickle cannot send
        return super().__getitem__(i)


class StallingRecipe(augmented.AugmentedRecipe):
    def __init__(self, run: RunConfig):
        super().__init__(run)
        c: Config = run.recipe_config
        self.c, self.calls = c, [0]
        self.train_dataset = FaultyPoints(self.train_dataset, c)

    def collate(self, samples: list) -> dict:
        batch = super().collate(samples)
        if self.train_dataset.poisoned:
            self.train_dataset.poisoned = False
            batch["lock"] = threading.Lock()
        return batch

    def losses(
        self, models: dict[str, nn.Module], batch: dict[str, torch.Tensor]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        if self.c.fault in ("forward", "none") and _strikes(self.c, self.calls) and self.c.fault == "forward":
            time.sleep(3600)
        yield from super().losses(models, batch)


def build(run: RunConfig) -> StallingRecipe:
    return StallingRecipe(run)
