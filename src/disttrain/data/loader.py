"""Micro-batches through a torch DataLoader: the window plan says which samples, workers load them ahead.

The plan (disttrain.data.windows) fixes every micro-batch of every step from the seed alone. The
DataLoader's batch sampler walks it in training order, one request per micro-batch, so workers load
and collate the next window's micro-batches while this one computes, and the batches arrive in
plan order whatever `num_workers` is. Nothing about which samples a process sees depends on the
workers: 0 or 8 give the same batches, and a resumed run starts the walk at its step.

One iterator serves the whole run, across epochs, so the workers live as long as the run (there is
no `persistent_workers` to set).

What the workers do besides loading, so that none leaves its process waiting: disttrain.data.workers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from disttrain.data.windows import MicroBatchPlan, WindowSampler
from disttrain.data.workers import FORKED, WorkerAccounts, WorkerStart


@dataclass(frozen=True)
class Request:
    """One micro-batch of the plan: phase `phase` of optimizer step `step`."""

    step: int
    phase: int
    plan: MicroBatchPlan


class Loaded(NamedTuple):  # a named tuple: pin_memory pins its batch and passes the request through
    request: Request
    batch: Any


Phases = Callable[[int], list]  # step -> the recipe's phases (each has make_batch and data_step)


class _PlanOrder(Sampler):
    """Requests for steps `start`..`stop`-1 in the order the trainer consumes them."""

    def __init__(self, phases: Phases, windows: WindowSampler, start: int, stop: int, rank: int, world: int):
        self.phases, self.windows = phases, windows
        self.start, self.stop, self.rank, self.world = start, stop, rank, world

    def __iter__(self) -> Iterator[list[Request]]:
        for step in range(self.start, self.stop):
            for p, phase in enumerate(self.phases(step)):
                for plan in self.windows.window(phase.data_step, self.rank, self.world):
                    yield [Request(step, p, plan)]


class _Fetch(Dataset):
    """Runs the phase's `make_batch` for a request, in a worker (or inline without workers)."""

    def __init__(self, phases: Phases):
        self.phases = phases
        self._cached: tuple[int, list] | None = None

    def __getitem__(self, request: Request) -> Loaded:
        if self._cached is None or self._cached[0] != request.step:
            self._cached = (request.step, self.phases(request.step))
        return Loaded(request, self._cached[1][request.phase].make_batch(request.plan))


def _only(items: list[Loaded]) -> Loaded:
    return items[0]


def plan_loader(
    phases: Phases,
    windows: WindowSampler,
    start: int,
    stop: int,
    rank: int,
    world: int,
    num_workers: int,
    prefetch_factor: int,
    pin_memory: bool,
    window_micro_batches: int,
    accounts: WorkerAccounts | None = None,
) -> DataLoader:
    """A DataLoader yielding `Loaded` micro-batches of steps `start`..`stop`-1 in plan order.

    `prefetch_factor` 0 loads two windows ahead (`window_micro_batches` micro-batches per step).
    `accounts` (one per worker, see `forked_accounts`) let the process read its workers' stacks.
    """
    workers = {}
    if num_workers:
        workers = {
            "prefetch_factor": prefetch_factor or max(2, math.ceil(2 * window_micro_batches / num_workers)),
            "worker_init_fn": WorkerStart(accounts),
            # Forked, where the platform can: a worker then inherits the recipe as built instead of
            # unpickling it (its schedules hold lambdas), whatever start method the process was
            # given (a spawned rank, Python 3.14's forkserver default).
            "multiprocessing_context": "fork" if FORKED else None,
        }
    return DataLoader(
        _Fetch(phases),
        batch_sampler=_PlanOrder(phases, windows, start, stop, rank, world),
        collate_fn=_only,
        num_workers=num_workers,
        pin_memory=pin_memory and torch.cuda.is_available(),
        # Its own generator: drawing the workers' base seed from the global one would shift the
        # training process's dropout by one draw per loader, which a resumed run could not replay.
        generator=torch.Generator().manual_seed(0),
        **workers,
    )
