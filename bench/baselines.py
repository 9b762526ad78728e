"""The loops the template is measured against, doing the same work: a hand-written DDP loop and
Accelerate's documented `accumulate` loop.

"The same work": the same model class with the same initialisation, this process's same
micro-batches of each optimizer step (collated by the recipe's own function, inside the loop, as
the template does), the same optimizers (AdamW, decay on matrices only, one per model half),
schedules and clip thresholds. They use the usual mean loss of each micro-batch divided by the
accumulation count, which is what these loops are written with; the template's exact scaling
(and its one extra all-reduce of the window's item count) is what is being priced.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from disttrain.config import OptimizerConfig


@dataclass
class Work:
    """What each side of a comparison trains: model, data, loss and optimizers."""

    build_model: Callable[[], nn.Module]  # a fresh model, initialised as the template's
    parts: dict[str, tuple[Callable[[nn.Module], Iterable[nn.Parameter]], OptimizerConfig]]  # one optimizer each
    plans: Callable[[int], list[Any]]  # this process's micro-batch plans of optimizer step `step`
    make_batch: Callable[[Any], Any]
    mean_loss: Callable[[nn.Module, Any], torch.Tensor]
    total_steps: int  # the schedules' length


def seq2seq_work(trainer: Any) -> Work:
    """The template trainer's seq2seq run, as a hand-written loop would train it."""
    from disttrain.recipes.seq2seq.recipe import PAD, Seq2Seq

    cfg, recipe, sampler = trainer.cfg, trainer.recipe, trainer.sampler

    def build_model() -> nn.Module:
        torch.manual_seed(cfg.seed)  # the template seeds the same way before building its recipe
        return Seq2Seq(cfg.seq2seq)

    def mean_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(batch["src"], batch["tgt_in"])
        return F.cross_entropy(logits.flatten(0, 1), batch["tgt_out"].flatten(), ignore_index=PAD)

    return Work(
        build_model=build_model,
        parts={
            "encoder": (lambda m: m.encoder.parameters(), cfg.seq2seq.encoder),
            "decoder": (lambda m: m.decoder.parameters(), cfg.seq2seq.decoder),
        },
        plans=lambda step: sampler.window(step, trainer.rank, trainer.world_size),
        make_batch=lambda plan: recipe.train_batch(plan.indices),
        mean_loss=mean_loss,
        total_steps=cfg.steps,
    )


def adamw_with_cosine(
    params: Iterable[nn.Parameter], o: OptimizerConfig, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """Plain torch: AdamW with weight decay on matrices only, cosine schedule without warmup."""
    if o.name != "adamw" or o.schedule != "cosine" or o.warmup_steps:
        raise ValueError("the baselines implement the workloads' AdamW with a cosine schedule and no warmup")
    params = list(params)
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": o.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=o.lr,
        betas=(o.beta1, o.beta2),
        foreach=True,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(1.0, s / total_steps)))
    )
    return optimizer, schedule


def distributed() -> bool:
    return torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


class HandLoop:
    """The minimal hand-written DDP loop: `no_sync` around forward and backward of every micro-batch
    but the last, mean loss over the accumulation count, then clip, step and zero.

    `sync_every=True` drops the `no_sync` (gradients all-reduced on every micro-step), the
    baseline of what skipping sync gains.
    """

    def __init__(self, work: Work, sync_every: bool = False):
        self.work, self.sync_every = work, sync_every
        model = work.build_model()
        self.groups = []
        for select, o in work.parts.values():
            params = list(select(model))
            optimizer, schedule = adamw_with_cosine(params, o, work.total_steps)
            self.groups.append((params, o.clip_grad_norm, optimizer, schedule))
        self.model = DistributedDataParallel(model) if distributed() else model

    def run(self, steps: range) -> None:
        for step in steps:
            plans = self.work.plans(step)
            for i, plan in enumerate(plans):
                batch = self.work.make_batch(plan)
                skip_sync = (
                    i < len(plans) - 1 and not self.sync_every and isinstance(self.model, DistributedDataParallel)
                )
                with self.model.no_sync() if skip_sync else contextlib.nullcontext():
                    loss = self.work.mean_loss(self.model, batch) / len(plans)
                    loss.backward()
            for params, clip, optimizer, schedule in self.groups:
                nn.utils.clip_grad_norm_(params, clip)
                optimizer.step()
                schedule.step()
            for _, _, optimizer, _ in self.groups:
                optimizer.zero_grad(set_to_none=True)


class AccelerateLoop:
    """Accelerate's documented loop: `with accelerator.accumulate(model)` around each micro-batch,
    `accelerator.backward`, clipping when `sync_gradients`, and optimizer/schedule calls on every
    micro-batch that Accelerate turns into no-ops until the boundary.

    The micro-batches are fed as the other sides get them (no prepared DataLoader, which would
    shard the data its own way). Accelerate keeps one gradient state per process, shared with the
    template's Accelerator, so the accumulation count is set on entry and given back on exit.
    """

    def __init__(self, work: Work, accumulation: int):
        from accelerate import Accelerator

        self.work, self.accumulation = work, accumulation
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available(), gradient_accumulation_steps=accumulation)
        model = work.build_model()
        objects, self.clips = [], []
        for select, o in work.parts.values():
            params = list(select(model))
            objects += adamw_with_cosine(params, o, work.total_steps)
            self.clips.append((params, o.clip_grad_norm))
        self.model, *prepared = self.accelerator.prepare(model, *objects)
        self.optimizers, self.schedules = prepared[0::2], prepared[1::2]
        self._give_back()

    def _give_back(self) -> None:
        self.accelerator.gradient_accumulation_steps = 1
        self.accelerator.gradient_state._set_sync_gradients(True)

    def run(self, steps: range) -> None:
        acc = self.accelerator
        acc.gradient_accumulation_steps = self.accumulation
        try:
            for step in steps:
                plans = self.work.plans(step)
                if len(plans) != self.accumulation:  # its boundary is every N-th micro-batch, windows must be full
                    raise ValueError(f"step {step} has {len(plans)} micro-batches, not {self.accumulation}")
                for plan in plans:
                    batch = self.work.make_batch(plan)
                    with acc.accumulate(self.model):
                        loss = self.work.mean_loss(self.model, batch)
                        acc.backward(loss)
                        if acc.sync_gradients:
                            for params, clip in self.clips:
                                acc.clip_grad_norm_(params, clip)
                        for optimizer in self.optimizers:
                            optimizer.step()
                        for schedule in self.schedules:
                            schedule.step()
                        for optimizer in self.optimizers:
                            optimizer.zero_grad()
        finally:
            self._give_back()


class _Unrecorded:
    """Progress that records nothing (disttrain.resilience.progress.Progress's interface)."""

    def window(self, step: int, part: int, micro_batches: int) -> None:
        pass

    def at(self, phase: str, micro: int = -1) -> None:
        pass

    def backward(self) -> None:
        pass


def template_loop(trainer: Any, watched: bool = True) -> Callable[[range], None]:
    """The template side: its trainer's `train_step`, one per optimizer step; with `watched` off, the
    trainer records no progress for the watchdog meanwhile."""

    def run(steps: range) -> None:
        recorded = trainer.progress
        if not watched:
            trainer.progress = _Unrecorded()
        try:
            for step in steps:
                trainer.train_step(step)
        finally:
            trainer.progress = recorded

    return run
