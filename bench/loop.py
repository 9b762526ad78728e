"""Loop overhead: the template's trainer against a hand-written DDP loop and Accelerate's
`accumulate` loop doing the same work, taking turns in the same 2 processes.

Run by `python -m bench` (one job per workload); by hand:
`torchrun --nproc_per_node 2 -m bench.loop --out loop.json --workload 1m`.
"""

from __future__ import annotations

import os
import time

from bench.baselines import AccelerateLoop, HandLoop, seq2seq_work, template_loop
from bench.harness import (
    MICRO_BATCH,
    WORKLOADS,
    build_trainer,
    finish,
    interleave,
    job_parser,
    parameter_count,
    run_args,
    scratch_dir,
    write_result,
)

# Optimizer steps per timed block: under a second of work per side on this machine kind, so that
# the sides of a repetition see nearly the same load from other processes.
STEPS_PER_REP = {"1m": 3, "tiny": 10}


def progress_records(trainer: object, step: int) -> dict[str, float]:
    """What the watchdog costs a step, without noise: how many progress records one step makes, and
    the CPU time of one record (the median of a million, in this process)."""
    from disttrain.resilience.progress import Progress

    counted = [0]

    class Counting(Progress):
        def at(self, phase: str, micro: int = -1) -> None:
            counted[0] += 1
            super().at(phase, micro)

    recorded, trainer.progress = trainer.progress, Counting()  # type: ignore[attr-defined]
    try:
        trainer.train_step(step)  # type: ignore[attr-defined]
    finally:
        trainer.progress = recorded  # type: ignore[attr-defined]
    progress, per_record = Progress(), []
    for _ in range(10):
        started = time.process_time()
        for _ in range(100_000):
            progress.at("forward", 1)
        per_record.append((time.process_time() - started) / 100_000)
    return {"records_per_step": counted[0], "seconds_per_record": sorted(per_record)[len(per_record) // 2]}


def main() -> None:
    parser = job_parser(__doc__)
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="1m")
    parser.add_argument("--accumulation", type=int, default=8)
    parser.add_argument("--steps-per-rep", type=int, help="optimizer steps per timed block")
    args = parser.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    steps = args.steps_per_rep or max(1, STEPS_PER_REP[args.workload] // (3 if args.quick else 1))

    trainer = build_trainer(run_args(args.workload, args.accumulation, world, scratch_dir() + "/runs"), "loop")
    work = seq2seq_work(trainer)
    sides = {
        "template": template_loop(trainer),
        # The same trainer recording no progress: its ratio to the template is the watchdog's cost per
        # step (the watchdog's thread runs beside every side, as in a run, and sleeps between beats).
        "template_unwatched": template_loop(trainer, watched=False),
        "hand": HandLoop(work).run,
        "accelerate": AccelerateLoop(work, args.accumulation).run,
        # A second, identical hand loop: its ratio to the first is the noise floor of this run.
        "hand_copy": HandLoop(work).run,
    }
    with trainer.watched():
        times = interleave(sides, args.reps, steps, warmup=1 if args.quick else 2)
    records = progress_records(trainer, 0)
    write_result(
        args.out,
        {
            "workload": args.workload,
            "parameters": parameter_count(trainer.recipe.models["seq2seq"]),
            "world_size": world,
            "micro_batch": MICRO_BATCH[args.workload],
            "accumulation": args.accumulation,
            "steps_per_rep": steps,
            "reps": args.reps,
            "progress": records,
            **times,
        },
    )
    finish()


if __name__ == "__main__":
    main()
