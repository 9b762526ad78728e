"""Sharding: peak memory per process and step time of DDP, DeepSpeed ZeRO 2 and FSDP2 (a window's
gradients kept whole until its last backward, or reduce-scattered after every micro-batch) on the
same model, at world size 2 and 4, accumulation 4, the same micro-batch per process.

Peak memory is per process, so each side needs processes of its own: every side is its own job
(`torchrun --nproc_per_node W ... -m bench.sharding --side S`), repetitions taking turns over the
world sizes and, within one, over the sides. Inside a job: the template's trainer is built (models
wrapped, sharded), the kernel's peak resident set is reset to the current one
(`/proc/self/clear_refs`, as bench/memory.py), then `steps` optimizer steps run. "training peak" is
the peak minus the resident set before the steps: gradients, optimizer state (made by the first
step), activations, communication buffers. Step time is the median of the steps after the first, on
the slowest process. On 2 cores, world 4 runs two processes per core: its memory is what it is on
any machine, its step times are those of an oversubscribed CPU.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any

from bench.harness import REPO, job_parser, run_args, run_job, spread, write_result
from bench.memory import _status_kib

# Wider than the 1m model, so that the state sharding divides (parameters, gradients, Adam moments,
# 4 bytes each per parameter) stands out from the process's fixed few hundred MiB.
WORKLOAD = [
    "seq2seq.d_model=384",
    "seq2seq.n_heads=4",
    "seq2seq.ffn_dim=1536",
    "seq2seq.encoder_layers=2",
    "seq2seq.decoder_layers=2",
]
ACCUMULATION = 4
MICRO_BATCH = 6  # per process, at every world size: the activations per process stay the same
WORLDS = (2, 4)
SIDES: dict[str, list[str]] = {
    "ddp": [],
    "zero2": [f"deepspeed_config={REPO / 'configs' / 'deepspeed' / 'zero2.json'}"],
    "fsdp": ["fsdp.enabled=true"],
    "fsdp_every": ["fsdp.enabled=true", "fsdp.sync_every_micro_batch=true"],
}


def child(side: str, steps: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    from bench.harness import build_trainer, finish, parameter_count

    with tempfile.TemporaryDirectory() as runs:
        args = run_args("1m", ACCUMULATION, int(os.environ["WORLD_SIZE"]), runs, MICRO_BATCH, windows=steps + 1)
        # run_args' 1m shapes, then this section's wider ones (later keys win).
        trainer = build_trainer([*args, *WORKLOAD, *SIDES[side]], f"sharding-{side}")
        parameters = sum(parameter_count(m) for m in trainer.recipe.models.values())
        dist.barrier()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak resident set starts again from the current one
        before = _status_kib("VmRSS")
        seconds = []
        for step in range(steps):
            dist.barrier()
            start = time.perf_counter()
            trainer.train_step(step)
            seconds.append(time.perf_counter() - start)
        peak = _status_kib("VmHWM")
        mine = torch.tensor([before, peak, *seconds], dtype=torch.float64)
        every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(every, mine)
    write_result(
        out,
        {
            "parameters": parameters,  # of the whole model: a DTensor counts its global shape
            "before_kib": [int(t[0]) for t in every],
            "peak_kib": [int(t[1]) for t in every],
            # The slowest process's time for each step after the first (which builds optimizer state).
            "step_seconds": [max(float(t[2 + i]) for t in every) for i in range(1, steps)],
        },
    )
    finish()


# glibc serves a freed large block's size from its heap from then on (its mmap threshold rises up
# to 32 MiB), and a heap seldom shrinks: the resident set would keep every gathered parameter and
# whole gradient FSDP has freed. A fixed threshold maps each large tensor on its own and unmaps it
# when freed, so that the peak resident set is the peak of live tensors.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def measure(repeats: int, steps: int, worlds: tuple[int, ...] = WORLDS) -> dict[str, Any]:
    """Each side at each world size `repeats` times, sides in turn; peaks in MiB, the larger process's."""
    raw: dict[int, dict[str, list[dict[str, Any]]]] = {w: {s: [] for s in SIDES} for w in worlds}
    saved = {k: os.environ.get(k) for k in MALLOC_ENV}
    os.environ.update(MALLOC_ENV)  # the jobs' environment is this process's (bench.harness.job_env)
    try:
        for _ in range(repeats):
            for world in worlds:
                for side in SIDES:
                    args = ["--side", side, "--steps", str(steps)]
                    raw[world][side].append(run_job("bench.sharding", args, nproc=world, timeout=900))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    out: dict[str, Any] = {"workload": WORKLOAD, "accumulation": ACCUMULATION, "micro_batch": MICRO_BATCH, **MALLOC_ENV}
    out.update(repeats=repeats, steps=steps, parameters=raw[worlds[0]]["ddp"][0]["parameters"], worlds={})
    out["cores"] = os.cpu_count()  # fewer cores than processes: step times of an oversubscribed CPU
    for world, sides in raw.items():
        out["worlds"][str(world)] = {"sides": {side: summary(runs) for side, runs in sides.items()}}
    return out


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One side's jobs: the larger process's peaks (MiB) and every timed step, as spreads."""
    return {
        "training_peak_mib": spread(
            [max(p - b for p, b in zip(r["peak_kib"], r["before_kib"], strict=True)) / 1024 for r in runs]
        ),
        "process_peak_mib": spread([max(r["peak_kib"]) / 1024 for r in runs]),
        "step_seconds": spread([t for r in runs for t in r["step_seconds"]]),
    }


if __name__ == "__main__":
    parser = job_parser(__doc__.splitlines()[0])
    parser.add_argument("--side", choices=list(SIDES), help="run one side (inside its torchrun job)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--worlds", default=",".join(map(str, WORLDS)), help="world sizes, from the shell")
    args = parser.parse_args()
    if args.side:
        child(args.side, args.steps, args.out)
    else:  # from the shell: every side at every world size, results as JSON
        result = measure(args.reps, args.steps, tuple(int(w) for w in args.worlds.split(",")))
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        medians = {
            w: {s: {k: v["median"] for k, v in d.items()} for s, d in r["sides"].items()}
            for w, r in result["worlds"].items()
        }
        print(json.dumps(medians, indent=1))
