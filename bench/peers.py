"""Peers: PyTorch Lightning's `accumulate_grad_batches` on the template's work, against the template
and the hand-written DDP loop, taking turns in the same 2 processes.

Lightning drives its own loop, so the turns are taken from inside it: a callback stops Lightning's
clock at the end of each block of optimizer steps, runs the template and the hand loop on the
same steps, and restarts the clock. Lightning runs as such benchmarks usually set it up: no
logger, progress bar, model summary or checkpoints; DDP over the processes the launcher started.
Its automatic optimization takes one optimizer, so the encoder's and decoder's AdamW become
parameter groups of one (the same arithmetic), clipped per half as the others do.

`torchrun --nproc_per_node 2 -m bench.peers --out peers.json`
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from bench.baselines import HandLoop, Work, seq2seq_work, template_loop
from bench.harness import (
    MICRO_BATCH,
    barrier,
    build_trainer,
    finish,
    job_parser,
    run_args,
    scratch_dir,
    shuffled,
    timed,
    write_result,
)

WORKLOAD = "1m"
ACCUMULATION = 8
STEPS_PER_REP = 3
WARMUP = 2


def lightning_version() -> str | None:
    try:
        import lightning
    except ImportError:
        return None
    return lightning.__version__


def lightning_module(work: Work) -> Any:
    import lightning as L

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = work.build_model()
            self.clipped_steps = 0

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return work.mean_loss(self.model, batch)  # Lightning divides by accumulate_grad_batches

        def configure_optimizers(self) -> Any:
            groups, self.clips = [], []
            for select, o in work.parts.values():
                params = list(select(self.model))
                groups += [
                    {"params": [p for p in params if p.ndim >= 2], "weight_decay": o.weight_decay, "lr": o.lr},
                    {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, "lr": o.lr},
                ]
                self.clips.append((params, o.clip_grad_norm))
            first = next(iter(work.parts.values()))[1]
            optimizer = torch.optim.AdamW(groups, betas=(first.beta1, first.beta2), foreach=True)
            schedule = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(1.0, s / work.total_steps)))
            )
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

        def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: Any = None, **_: Any) -> None:
            self.clipped_steps += 1  # reported: shows the hook ran once per optimizer step
            for params, clip in self.clips:
                nn.utils.clip_grad_norm_(params, clip)

    return Module()


class MicroBatches(torch.utils.data.Dataset):
    """Item j: this process's micro-batch j % N of optimizer step j // N, collated when fetched."""

    def __init__(self, work: Work, accumulation: int, steps: int):
        self.work, self.accumulation, self.steps = work, accumulation, steps

    def __len__(self) -> int:
        return self.steps * self.accumulation

    def __getitem__(self, j: int) -> Any:
        step, micro = divmod(j, self.accumulation)
        return self.work.make_batch(self.work.plans(step)[micro])


def interleaved_with_lightning(work: Work, others: dict[str, Any], reps: int, steps: int) -> dict[str, Any]:
    """As `harness.interleave`, with Lightning's loop driving: wall and CPU seconds per block, and
    how many optimizer steps Lightning made and clipped (all of them, if it ran as configured)."""
    import lightning as L

    sides = ["lightning", *others]
    times: dict[str, dict[str, list[float]]] = {k: {s: [] for s in sides} for k in ("seconds", "cpu_seconds")}

    class TakeTurns(L.Callback):
        clock = cpu_clock = 0.0

        def on_train_start(self, trainer: Any, module: Any) -> None:
            for run in others.values():
                run(range(WARMUP))

        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            done = trainer.global_step
            if (batch_idx + 1) % ACCUMULATION or done < WARMUP or (done - WARMUP) % steps:
                return
            rep = (done - WARMUP) // steps - 1
            if rep >= 0:
                wall = torch.tensor([time.perf_counter() - self.clock], dtype=torch.float64)
                cpu = torch.tensor([time.process_time() - self.cpu_clock], dtype=torch.float64)
                dist.all_reduce(wall, op=dist.ReduceOp.MAX)
                dist.all_reduce(cpu)
                times["seconds"]["lightning"].append(float(wall))
                times["cpu_seconds"]["lightning"].append(float(cpu))
                block = range(done - steps, done)  # the steps Lightning just trained
                for name in shuffled(list(others), rep):
                    wall, cpu = timed(lambda run=others[name], block=block: run(block))
                    times["seconds"][name].append(wall)
                    times["cpu_seconds"][name].append(cpu)
            barrier()
            self.clock, self.cpu_clock = time.perf_counter(), time.process_time()

    total = WARMUP + reps * steps
    trainer = L.Trainer(
        accelerator="cpu",
        devices=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
        strategy="ddp",
        max_steps=total,
        accumulate_grad_batches=ACCUMULATION,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        default_root_dir=scratch_dir(),
        callbacks=[TakeTurns()],
    )
    loader = torch.utils.data.DataLoader(MicroBatches(work, ACCUMULATION, total + 1), batch_size=None)
    module = lightning_module(work)
    trainer.fit(module, loader)
    return {**times, "lightning_steps": trainer.global_step, "lightning_clipped_steps": module.clipped_steps}


def main() -> None:
    parser = job_parser(__doc__)
    args = parser.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    steps = max(1, STEPS_PER_REP // (2 if args.quick else 1))
    trainer = build_trainer(run_args(WORKLOAD, ACCUMULATION, world, scratch_dir() + "/runs"), "peers")
    work = seq2seq_work(trainer)
    others = {"template": template_loop(trainer), "hand": HandLoop(work).run}
    times = interleaved_with_lightning(work, others, args.reps, steps)
    write_result(
        args.out,
        {
            "workload": WORKLOAD,
            "world_size": world,
            "micro_batch": MICRO_BATCH[WORKLOAD],
            "accumulation": ACCUMULATION,
            "steps_per_rep": steps,
            "reps": args.reps,
            "lightning": lightning_version(),
            **times,
        },
    )
    finish()


if __name__ == "__main__":
    main()
