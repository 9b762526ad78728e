"""Checkpoints: training time lost per checkpoint, written synchronously against in the background
(`checkpoint_async=true`), DDP and FSDP2, on the 1 M model and on the largest that fits comfortably
here (seq2seq at width 768, about 30 M parameters: 2 processes, each with its Adam state and a copy).

Each job (`torchrun --nproc_per_node 2 -m bench.checkpointing --engine E --workload W`) builds the
template's trainer once and runs blocks of optimizer steps, the three sides taking turns within a
repetition: no checkpoint, one synchronous checkpoint, one background checkpoint, each after the
same step of its block. A block ends once its checkpoint is published, so a write that outlasts the
block's steps counts. "Lost per checkpoint" is a block's time minus the same repetition's block
without one; "in the step" is the time the trainer's call took (what the step waits for). The
slowest process's time counts. Nothing here asserts anything about time.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from bench.harness import WORKLOADS, job_parser, run_args, run_job, spread, write_result

SIDES = ("none", "sync", "async")
ENGINES = {"ddp": [], "fsdp2": ["fsdp.enabled=true"]}
SIZES = {
    "1m": WORKLOADS["1m"],
    "30m": [
        "seq2seq.d_model=768",
        "seq2seq.n_heads=8",
        "seq2seq.ffn_dim=3072",
        "seq2seq.encoder_layers=2",
        "seq2seq.decoder_layers=2",
    ],
}
STEPS_PER_BLOCK = 6
CHECKPOINT_AFTER = 2  # steps of the block before its checkpoint: 4 more may overlap a background write
MICRO_BATCH = 4


def child(engine: str, workload: str, reps: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    from bench.harness import build_trainer, finish, parameter_count

    world = int(os.environ["WORLD_SIZE"])
    blocks = (reps + 1) * len(SIDES)
    runs = os.path.join(os.path.dirname(os.path.abspath(out)), "runs")  # the job's scratch: one for all processes
    args = run_args("1m", 1, world, runs, MICRO_BATCH, windows=blocks * STEPS_PER_BLOCK + 1)
    extra = [*SIZES[workload], *ENGINES[engine], "checkpoint_async=true", "keep_checkpoints=1"]
    trainer = build_trainer([*args, *extra], f"checkpointing-{engine}-{workload}")
    parameters = sum(parameter_count(m) for m in trainer.recipe.models.values())
    step = 0

    def block(side: str) -> tuple[float, float]:
        nonlocal step
        dist.barrier()
        start, in_step = time.perf_counter(), 0.0
        for i in range(STEPS_PER_BLOCK):
            trainer.train_step(step)
            step += 1
            if i == CHECKPOINT_AFTER and side != "none":
                called = time.perf_counter()
                trainer.save_checkpoint(step, background=side == "async")
                in_step = time.perf_counter() - called
        trainer.checkpoint_written()
        return time.perf_counter() - start, in_step

    for side in SIDES:  # warm-up: optimizer state, allocator, the first checkpoint's directories
        block(side)
    mine: list[float] = []
    for rep in range(reps):
        order = SIDES[rep % len(SIDES) :] + SIDES[: rep % len(SIDES)]
        measured = {side: block(side) for side in order}
        mine += [v for side in SIDES for v in measured[side]]
    every = [torch.zeros(len(mine), dtype=torch.float64) for _ in range(world)]
    dist.all_gather(every, torch.tensor(mine, dtype=torch.float64))
    slowest = torch.stack(every).max(dim=0).values.tolist()
    checkpoint = sorted(os.listdir(os.path.join(trainer.run_dir, "checkpoints")))[-1]
    size = sum(
        os.path.getsize(os.path.join(d, f))
        for d, _, fs in os.walk(os.path.join(trainer.run_dir, "checkpoints", checkpoint))
        for f in fs
    )
    per_rep = 2 * len(SIDES)
    result: dict[str, Any] = {"parameters": parameters, "checkpoint_mib": size / 2**20, "block": {}, "in_step": {}}
    for k, side in enumerate(SIDES):
        result["block"][side] = [slowest[r * per_rep + 2 * k] for r in range(reps)]
        result["in_step"][side] = [slowest[r * per_rep + 2 * k + 1] for r in range(reps)]
    write_result(out, result)
    finish()


def measure(reps: int) -> dict[str, Any]:
    """Every engine on every model, each its own job."""
    out: dict[str, Any] = {"steps_per_block": STEPS_PER_BLOCK, "checkpoint_after": CHECKPOINT_AFTER, "runs": {}}
    for workload in SIZES:
        for engine in ENGINES:
            raw = run_job("bench.checkpointing", ["--engine", engine, "--workload", workload, "--reps", str(reps)])
            out["runs"][f"{engine}/{workload}"] = summary(raw)
    return out


def summary(raw: dict[str, Any]) -> dict[str, Any]:
    """Lost per checkpoint and time in the step, per side, and async / sync of each."""
    block, in_step = raw["block"], raw["in_step"]
    lost = {side: [b - n for b, n in zip(block[side], block["none"], strict=True)] for side in ("sync", "async")}
    lost_sync, lost_async = spread(lost["sync"]), spread(lost["async"])
    step_sync, step_async = spread(in_step["sync"]), spread(in_step["async"])
    return {
        "parameters": raw["parameters"],
        "checkpoint_mib": raw["checkpoint_mib"],
        "block_none": spread(block["none"]),
        "lost": {"sync": lost_sync, "async": lost_async},
        "in_step": {"sync": step_sync, "async": step_async},
        "lost_ratio": lost_async["median"] / lost_sync["median"] if lost_sync["median"] > 0 else float("nan"),
        "in_step_ratio": step_async["median"] / step_sync["median"],
    }


if __name__ == "__main__":
    parser = job_parser(__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=list(ENGINES))
    parser.add_argument("--workload", choices=list(SIZES), default="1m")
    args = parser.parse_args()
    if args.engine:
        child(args.engine, args.workload, args.reps, args.out)
    else:  # from the shell: everything, results as JSON
        result = measure(args.reps)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(json.dumps({k: (v["lost_ratio"], v["in_step_ratio"]) for k, v in result["runs"].items()}, indent=1))
