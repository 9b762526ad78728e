"""The accumulation core: one optimizer step from a window of micro-batches, exact on any world size.

The update must equal what one device computes on the whole global batch:

    grad = d/dθ [ Σ_items loss_item ] / N_global            for each loss term

so each micro-batch's summed loss is multiplied by `world_size / N_global` before backward. The
world size cancels the mean that DDP takes over processes; N_global is counted over the whole
window on all processes with one all-reduce before the first forward. Nothing here divides by the
configured accumulation count, which is wrong for a shorter last window and for uneven token counts.

Gradient sync is disabled (forward included) for every micro-batch but the last, and for every loss
term of the last micro-batch but its last, so the gradients cross the network once per window. The
engine (disttrain.engines) says how: `no_sync` for DDP, the accumulation boundary for DeepSpeed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

ItemCounts = Callable[[Any], dict[str, Any]]
BatchLosses = Callable[[Any], Iterator[tuple[str, torch.Tensor]]]


@dataclass
class MicroBatch:
    batch: Any
    stand_in: bool = False  # runs forward/backward for the collective's sake, contributes nothing


@dataclass
class WindowResult:
    loss_sums: torch.Tensor  # this process's summed loss per term (float64, detached)
    counts: torch.Tensor  # items per term over the window on all processes (float64)


@dataclass
class OptimizerGroup:
    """One optimizer with its schedule and clip threshold; `name` labels its logs."""

    name: str
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    clip_grad_norm: float = 0.0  # 0: report the norm, do not clip

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]


@dataclass
class UpdateResult:
    grad_norms: dict[str, torch.Tensor]
    skipped: bool  # fp16 overflow: no optimizer stepped, the loss scale was lowered
    nonfinite: bool = False  # a NaN/inf gradient without fp16 loss scaling: no optimizer stepped


class WindowEngine(Protocol):
    """What the core needs of an engine (disttrain.engines.base.Engine has it)."""

    world_size: int
    device: torch.device

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor: ...

    def sync_context(self, models: Sequence[nn.Module], sync: bool) -> contextlib.AbstractContextManager: ...

    def backward(self, loss: torch.Tensor, models: Sequence[nn.Module]) -> None: ...


def accumulate_window(
    engine: WindowEngine,
    models: Sequence[nn.Module],
    micro_batches: Sequence[MicroBatch],
    terms: Sequence[str],
    item_counts: ItemCounts,
    losses: BatchLosses,
    on_micro_batch: Callable[[int], None] | None = None,
) -> WindowResult:
    """Forward and backward every micro-batch of one window, leaving the exact window gradient.

    `models` are those trained by this window (their sync is controlled). `item_counts(batch)` gives
    each loss term's item count without a forward (samples, or valid tokens); `losses(batch)` yields
    `(term, summed loss)` in the order of `terms`, each backpropagated at once so that its graph is
    freed before the next term is computed. `on_micro_batch(i)` is called before micro-batch i's
    forward (the trainer records its progress there for the watchdog).

    Everything that does not depend on the micro-batch is done once per window: the loop adds one
    multiply per loss term to a plain training loop (measured in bench/).
    """
    device = engine.device
    zero = torch.zeros((), dtype=torch.float64, device=device)
    counted = [item_counts(mb.batch) for mb in micro_batches if not mb.stand_in]
    local_counts = torch.stack(
        [
            torch.stack([torch.as_tensor(c[t], device=device) for c in counted]).double().sum() if counted else zero
            for t in terms
        ]
    )
    global_counts = engine.reduce_sum(local_counts)
    scales = engine.world_size / global_counts.clamp(min=1.0)
    weights: dict[torch.dtype, tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]] = {}  # (real, stand-in)

    sums: list[list[torch.Tensor]] = [[] for _ in terms]
    last_micro, last_term = len(micro_batches) - 1, len(terms) - 1
    for i, mb in enumerate(micro_batches):
        if on_micro_batch is not None:
            on_micro_batch(i)
        stream = losses(mb.batch)
        for j, term in enumerate(terms):
            with engine.sync_context(models, sync=(i == last_micro and j == last_term)):
                name, loss = next(stream)
                if name != term:
                    raise RuntimeError(f"the recipe yielded loss '{name}' where '{term}' was expected (order: {terms})")
                if loss.dtype not in weights:
                    typed = scales.to(loss.dtype)
                    weights[loss.dtype] = (typed.unbind(), (typed * 0.0).unbind())
                engine.backward(loss * weights[loss.dtype][mb.stand_in][j], models)
            if not mb.stand_in:
                sums[j].append(loss.detach())
        if next(stream, None) is not None:
            raise RuntimeError(f"the recipe yielded more losses than its terms {tuple(terms)}")
    loss_sums = torch.stack([torch.stack(s).double().sum() if s else zero for s in sums])
    return WindowResult(loss_sums=loss_sums, counts=global_counts)
