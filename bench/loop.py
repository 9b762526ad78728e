"""Loop overhead: the template's trainer against a hand-written DDP loop and Accelerate's
`accumulate` loop doing the same work, taking turns in the same 2 processes.

Run by `python -m bench` (one job per workload); by hand:
`torchrun --nproc_per_node 2 -m bench.loop --out loop.json --workload 1m`.
"""

from __future__ import annotations

import os

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
        "hand": HandLoop(work).run,
        "accelerate": AccelerateLoop(work, args.accumulation).run,
        # A second, identical hand loop: its ratio to the first is the noise floor of this run.
        "hand_copy": HandLoop(work).run,
    }
    times = interleave(sides, args.reps, steps, warmup=1 if args.quick else 2)
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
            **times,
        },
    )
    finish()


if __name__ == "__main__":
    main()
