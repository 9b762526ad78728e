"""The accumulation core: one optimizer step from a window of micro-batches, exact on any world size.

The update must equal what one device computes on the whole global batch:

    grad = d/dθ [ Σ_items loss_item ] / N_global            for each loss term

so each micro-batch's summed loss is multiplied by `world_size / N_global` before backward. The
world size cancels the mean that DDP takes over processes; N_global is counted over the whole
window on all processes with one all-reduce before the first forward. Nothing here divides by the
configured accumulation count, which is wrong for a shorter last window and for uneven token counts.

Gradient sync is disabled (forward included) for every micro-batch but the last, and for every loss
term of the last micro-batch but its last, so the gradients cross the network once per window.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
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


def sync_context(accelerator: Accelerator, models: Sequence[nn.Module], sync: bool) -> contextlib.ExitStack:
    """Enter `no_sync` for every model unless this pass must synchronise.

    Accelerate's `no_sync` covers DDP, FSDP2 and DeepSpeed, but is a no-op for a single process
    even when it wrapped the model in DDP (a distributed launch with one process): then a second
    loss term of a micro-step would start a new DDP iteration before the first one reduced. A DDP
    model therefore gets its own `no_sync`.
    """
    return _sync_context(accelerator, models, [is_deepspeed_engine(m) for m in models], sync)


def _sync_context(
    accelerator: Accelerator, models: Sequence[nn.Module], engine: Sequence[bool], sync: bool
) -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    for model, is_engine in zip(models, engine, strict=True):
        if is_engine:
            # The engine reduces (ZeRO 1) or steps only at a boundary it is told of; its own count
            # of micro-steps is switched off (gradient_accumulation_steps 1).
            model.set_gradient_accumulation_boundary(sync)
        elif not sync:
            ddp = isinstance(model, nn.parallel.DistributedDataParallel)
            stack.enter_context(model.no_sync() if ddp else accelerator.no_sync(model))
    return stack


def is_deepspeed_engine(model: nn.Module) -> bool:
    return hasattr(model, "set_gradient_accumulation_boundary")


def accumulate_window(
    accelerator: Accelerator,
    models: Sequence[nn.Module],
    micro_batches: Sequence[MicroBatch],
    terms: Sequence[str],
    item_counts: ItemCounts,
    losses: BatchLosses,
) -> WindowResult:
    """Forward and backward every micro-batch of one window, leaving the exact window gradient.

    `models` are those trained by this window (their sync is controlled). `item_counts(batch)` gives
    each loss term's item count without a forward (samples, or valid tokens); `losses(batch)` yields
    `(term, summed loss)` in the order of `terms`, each backpropagated at once so that its graph is
    freed before the next term is computed.

    Everything that does not depend on the micro-batch is done once per window: the loop adds one
    multiply per loss term to a plain training loop (measured in bench/).
    """
    device = accelerator.device
    zero = torch.zeros((), dtype=torch.float64, device=device)
    counted = [item_counts(mb.batch) for mb in micro_batches if not mb.stand_in]
    local_counts = torch.stack(
        [
            torch.stack([torch.as_tensor(c[t], device=device) for c in counted]).double().sum() if counted else zero
            for t in terms
        ]
    )
    global_counts = accelerator.reduce(local_counts, reduction="sum")
    scales = accelerator.num_processes / global_counts.clamp(min=1.0)
    weights: dict[torch.dtype, tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]] = {}  # (real, stand-in)

    engine = [is_deepspeed_engine(m) for m in models]
    engines = [m for m, e in zip(models, engine, strict=True) if e]  # one per window (the trainer checks)
    plain = not engines and accelerator.scaler is None  # Accelerate's backward would only divide by 1
    sums: list[list[torch.Tensor]] = [[] for _ in terms]
    last_micro, last_term = len(micro_batches) - 1, len(terms) - 1
    for i, mb in enumerate(micro_batches):
        stream = losses(mb.batch)
        for j, term in enumerate(terms):
            with _sync_context(accelerator, models, engine, sync=(i == last_micro and j == last_term)):
                name, loss = next(stream)
                if name != term:
                    raise RuntimeError(f"the recipe yielded loss '{name}' where '{term}' was expected (order: {terms})")
                if loss.dtype not in weights:
                    typed = scales.to(loss.dtype)
                    weights[loss.dtype] = (typed.unbind(), (typed * 0.0).unbind())
                scaled = loss * weights[loss.dtype][mb.stand_in][j]
                if plain:
                    scaled.backward()
                elif engines:
                    engines[0].backward(scaled, scale_wrt_gas=False)
                else:
                    accelerator.backward(scaled)
            if not mb.stand_in:
                sums[j].append(loss.detach())
        if next(stream, None) is not None:
            raise RuntimeError(f"the recipe yielded more losses than its terms {tuple(terms)}")
    loss_sums = torch.stack([torch.stack(s).double().sum() if s else zero for s in sums])
    return WindowResult(loss_sums=loss_sums, counts=global_counts)


def apply_update(
    accelerator: Accelerator, groups: Sequence[OptimizerGroup], models: Sequence[nn.Module]
) -> UpdateResult:
    """At the boundary: unscale once (fp16), clip each group, step every optimizer and schedule, zero."""
    if any(is_deepspeed_engine(m) for m in models):
        return _engine_update(groups, models)
    scaler = accelerator.scaler
    if scaler is not None:
        for g in groups:
            scaler.unscale_(unwrap_optimizer(g.optimizer))
    norms = {
        g.name: nn.utils.clip_grad_norm_(g.params, g.clip_grad_norm if g.clip_grad_norm > 0 else math.inf)
        for g in groups
    }
    skipped = nonfinite = False
    if scaler is not None:
        # One decision for all optimizers: torch's scaler decides per optimizer, which would move
        # one model of a pair and not the other. Accelerate's optimizer wrapper also calls
        # scaler.update() after each optimizer, which unscales the next one a second time.
        skipped = not all(bool(torch.isfinite(n)) for n in norms.values())
        if not skipped:
            for g in groups:
                scaler.step(unwrap_optimizer(g.optimizer))
        scaler.update()
    else:
        # After the all-reduce every process holds the same gradients, so this local check is the
        # same decision everywhere, with no communication.
        nonfinite = not all(bool(torch.isfinite(n)) for n in norms.values())
        if not nonfinite:
            for g in groups:
                g.optimizer.step()
    if not (skipped or nonfinite):
        for g in groups:
            g.scheduler.step()
    for model in models:
        model.zero_grad(set_to_none=True)
    return UpdateResult(grad_norms=norms, skipped=skipped, nonfinite=nonfinite)


def unwrap_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # AcceleratedOptimizer keeps the torch one here


def _engine_update(groups: Sequence[OptimizerGroup], engines: Sequence[nn.Module]) -> UpdateResult:
    """DeepSpeed: each engine unscales, clips (one global norm), steps and zeroes; we step the schedules."""
    skipped_before = [e.skipped_steps for e in engines]
    for engine in engines:
        engine.step()
    skipped = any(e.skipped_steps != s for e, s in zip(engines, skipped_before, strict=True))
    if not skipped:
        for g in groups:
            g.scheduler.step()
    norms = {
        g.name: torch.as_tensor(float(e.get_global_grad_norm() or 0.0)) for g, e in zip(groups, engines, strict=True)
    }
    return UpdateResult(grad_norms=norms, skipped=skipped)
