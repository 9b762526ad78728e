"""Communication: all-reduce calls and bytes per optimizer step, and what skipping sync saves.

Counting: a DDP comm hook that wraps the default all-reduce sees every gradient bucket DDP
reduces; a wrapper around `torch.distributed.all_reduce` sees every all-reduce of the process,
so the rest (the template's item counts) is the difference. The template is compared with the
same hand-written loop synchronising on every micro-step, and with the floor: one reduction of
the gradients' size per optimizer step.

Timing: per optimizer step, the template and the hand loop with `no_sync` against the hand loop
synchronising every micro-step, at accumulation 1, 4 and 16, taking turns in the same processes.
Also the latency of the template's one extra all-reduce (the window's item counts).

`torchrun --nproc_per_node 2 -m bench.comm --out comm.json`
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from bench.baselines import HandLoop, seq2seq_work, template_loop
from bench.harness import (
    MICRO_BATCH,
    barrier,
    build_trainer,
    finish,
    interleave,
    job_parser,
    parameter_count,
    run_args,
    scratch_dir,
    spread,
    write_result,
)

WORKLOAD = "1m"
COUNT_ACCUMULATION = 8
GAIN_ACCUMULATIONS = (1, 4, 16)
MICRO_STEPS_PER_REP = 8  # about the same work per timed block whatever the accumulation (16 takes one step)


class Counter:
    """All-reduce calls and bytes: gradient buckets (through the hook) and all of them."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.bucket_calls = self.bucket_bytes = self.all_calls = self.all_bytes = 0

    # No annotations: DDP checks them against dist.GradBucket and this module's are strings.
    def hook(self, state, bucket):
        self.bucket_calls += 1
        self.bucket_bytes += bucket.buffer().numel() * bucket.buffer().element_size()
        return allreduce_hook(state, bucket)

    @contextlib.contextmanager
    def watching_all_reduce(self) -> Iterator[None]:
        original = dist.all_reduce

        def counted(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            self.all_calls += 1
            self.all_bytes += tensor.numel() * tensor.element_size()
            return original(tensor, *args, **kwargs)

        dist.all_reduce = counted
        try:
            yield
        finally:
            dist.all_reduce = original

    def per_step(self, steps: int) -> dict[str, float]:
        return {
            "gradient_calls": self.bucket_calls / steps,
            "gradient_bytes": self.bucket_bytes / steps,
            "other_calls": (self.all_calls - self.bucket_calls) / steps,
            "other_bytes": (self.all_bytes - self.bucket_bytes) / steps,
        }


def count(world: int, out_dir: str, steps: int) -> dict[str, Any]:
    trainer = build_trainer(run_args(WORKLOAD, COUNT_ACCUMULATION, world, out_dir), "comm-count")
    work = seq2seq_work(trainer)
    sync_every, no_sync = HandLoop(work, sync_every=True), HandLoop(work)
    sides = {
        "template": (template_loop(trainer), trainer.models["seq2seq"]),
        "hand_sync_every": (sync_every.run, sync_every.model),
        "hand_no_sync": (no_sync.run, no_sync.model),
    }
    counts = {}
    for name, (run, model) in sides.items():
        counter = Counter()
        model.register_comm_hook(None, counter.hook)
        run(range(1))  # DDP's first step builds its buckets
        counter.reset()
        with counter.watching_all_reduce():
            run(range(1, 1 + steps))
        counts[name] = counter.per_step(steps)
    params = parameter_count(trainer.recipe.models["seq2seq"])
    return {
        "accumulation": COUNT_ACCUMULATION,
        "parameters": params,
        "floor": {"gradient_calls": 1, "gradient_bytes": params * 4, "other_calls": 0, "other_bytes": 0},
        "sides": counts,
    }


def count_latency(repeats: int, calls: int = 200) -> dict[str, float]:
    """Seconds of one all-reduce of the item counts (one float64 per loss term), back to back."""
    counts = torch.ones(1, dtype=torch.float64)
    per_call = []
    for _ in range(repeats):
        barrier()
        start = time.perf_counter()
        for _ in range(calls):
            dist.all_reduce(counts)
        per_call.append((time.perf_counter() - start) / calls)
    return spread(per_call)


def gain(world: int, out_dir: str, reps: int, micro_steps: int) -> dict[str, Any]:
    out = {}
    for accumulation in GAIN_ACCUMULATIONS:
        trainer = build_trainer(run_args(WORKLOAD, accumulation, world, out_dir), f"comm-gain-{accumulation}")
        work = seq2seq_work(trainer)
        sides = {
            "template": template_loop(trainer),
            "hand_no_sync": HandLoop(work).run,
            "hand_sync_every": HandLoop(work, sync_every=True).run,
        }
        steps = max(1, micro_steps // accumulation)
        out[str(accumulation)] = {"steps_per_rep": steps, **interleave(sides, reps, steps, warmup=1)}
    return out


def main() -> None:
    parser = job_parser(__doc__)
    args = parser.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    out_dir = scratch_dir() + "/runs"
    result = {
        "workload": WORKLOAD,
        "world_size": world,
        "micro_batch": MICRO_BATCH[WORKLOAD],
        "counts": count(world, out_dir, steps=2),
        "count_allreduce_seconds": count_latency(repeats=3 if args.quick else 9),
        "gain": gain(world, out_dir, args.reps, MICRO_STEPS_PER_REP // (2 if args.quick else 1)),
        "reps": args.reps,
    }
    write_result(args.out, result)
    finish()


if __name__ == "__main__":
    main()
