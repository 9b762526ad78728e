"""Speed features: eager against compiled steps/s on the 1 M-parameter seq2seq model and on causal_lm
(GPT-2 from its config, 4 layers of width 128, on the default byte corpus; needs `transformers`),
compilation time apart, and peak memory with and without activation checkpointing at accumulation 1
and 8.

One process (`python -m bench.speed --out speed.json [--quick]`). Throughput: the eager and the
compiled trainer take turns on the same optimizer steps after their warm-up steps (the compiled one's
include its compilations, reported apart from the timed blocks). Memory: each setting in a fresh
process, measured as bench/memory.py measures (peak resident set during two steps minus the resident
set before them). On a GPU the same command measures the GPU (steps/s); `--backend aot_eager`
compiles without code generation where there is no C++ compiler.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from typing import Any

from bench.harness import REPO, interleave, job_env, job_parser, quiet_args, run_args, spread, write_result

WORKLOAD = "1m"
CAUSAL_LM_MICRO_BATCH = 8  # windows of the default 128 bytes: 1024 tokens a step
MEMORY_GLOBAL_BATCH = 192
MEMORY_ACCUMULATIONS = (1, 8)


def seq2seq_args(runs: str) -> list[str]:
    return run_args(WORKLOAD, 1, 1, runs)


def causal_lm_args(runs: str) -> list[str]:
    return [
        "recipe=causal_lm",
        f"global_batch_size={CAUSAL_LM_MICRO_BATCH}",
        f"micro_batch_size={CAUSAL_LM_MICRO_BATCH}",
        "steps=100000",
        "causal_lm.sample_tokens=0",
        f"output_dir={runs}",
        "progress_bar=false",
        *quiet_args(),
    ]


def throughput(reps: int, steps_per_rep: int, backend: str, recipe_args=seq2seq_args) -> dict[str, Any]:
    from bench.harness import build_trainer
    from disttrain.speed.compiling import Compilation

    with tempfile.TemporaryDirectory() as runs:
        args = recipe_args(runs)
        eager = build_trainer(args, "eager")
        compiled = build_trainer([*args, "compile=true", f"compile_backend={backend}"], "compiled")
        warmup = 3  # the compiled trainer compiles here: first shapes, then dynamic ones
        compilation = Compilation().start()
        for step in range(warmup):
            compiled.train_step(step)
        compilation.stop()
        for step in range(warmup):
            eager.train_step(step)
        sides = {
            name: lambda block, trainer=trainer: [trainer.train_step(s) for s in block]
            for name, trainer in (("eager", eager), ("compiled", compiled))
        }
        seconds = interleave(sides, reps, steps_per_rep, warmup=0, first_step=warmup)["seconds"]
        return {
            "backend": backend,
            "compile_s": compilation.seconds,
            "warmup_wall_s": compilation.wall_seconds,
            "graphs": compilation.graphs,
            "steps_per_s": {k: spread([steps_per_rep / s for s in v]) for k, v in seconds.items()},
        }


def causal_lm_throughput(reps: int, steps_per_rep: int, backend: str) -> dict[str, Any]:
    """causal_lm's eager against compiled steps/s, or why there is none (the other figures stay)."""
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        return {"skipped": "transformers is not installed (make install EXTRAS=bench installs it)"}
    try:
        return throughput(reps, steps_per_rep, backend, causal_lm_args)
    except Exception as e:  # a recipe the compiler cannot take must not lose the seq2seq figures
        return {"error": f"{type(e).__name__}: {e}"[-600:]}


def memory_child(accumulation: int, checkpointing: bool, out: str) -> None:
    from bench.harness import build_trainer
    from bench.memory import _status_kib

    with tempfile.TemporaryDirectory() as runs:
        args = run_args(WORKLOAD, accumulation, 1, runs, MEMORY_GLOBAL_BATCH // accumulation, windows=4)
        trainer = build_trainer([*args, f"activation_checkpointing={str(checkpointing).lower()}"], "memory")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident set to the current one
        before = _status_kib("VmRSS")
        for step in range(2):
            trainer.train_step(step)
        peak = _status_kib("VmHWM")
    with open(out, "w") as f:
        json.dump({"training_peak_mib": (peak - before) / 1024}, f)


def memory(repeats: int) -> dict[str, Any]:
    raw: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="disttrain-bench-") as scratch:
        out = f"{scratch}/memory.json"
        for _ in range(repeats):
            for accumulation in MEMORY_ACCUMULATIONS:
                for checkpointing in (False, True):
                    cmd = [sys.executable, "-m", "bench.speed", "--out", out, "--memory-child", str(accumulation)]
                    cmd += ["--checkpointing"] if checkpointing else []
                    subprocess.run(cmd, cwd=REPO, env=job_env(scratch), check=True, timeout=300)
                    with open(out) as f:
                        key = f"accumulation {accumulation}, checkpointing {'on' if checkpointing else 'off'}"
                        raw.setdefault(key, []).append(json.load(f)["training_peak_mib"])
    return {"global_batch": MEMORY_GLOBAL_BATCH, "training_peak_mib": {k: spread(v) for k, v in raw.items()}}


if __name__ == "__main__":
    parser = job_parser(__doc__.split("\n")[0])
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--memory-child", type=int, default=0)
    parser.add_argument("--checkpointing", action="store_true")
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, args.checkpointing, args.out)
    else:
        reps, steps_per_rep = (3, 5) if args.quick else (args.reps, 20)
        result = {
            "throughput": throughput(reps, steps_per_rep, args.backend),
            "causal_lm": causal_lm_throughput(reps, steps_per_rep, args.backend),
            "memory": memory(1 if args.quick else 3),
        }
        write_result(args.out, result)
        print(json.dumps(result, indent=1))
