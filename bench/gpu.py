"""GPU throughput: samples per second and model FLOPs utilisation of each recipe in bf16 on DDP,
DeepSpeed ZeRO 2 and FSDP2, each eager and compiled (`compile=true`), on one process per GPU.

One job per (recipe, engine). Accelerate keeps one precision setting per process and DeepSpeed
casts to bf16 itself, so one process cannot hold two engines; it can hold one engine's eager and
compiled trainers, which then take turns on the same optimizer steps (bench/harness.py interleave),
so that their ratio is paired. Compilation happens in the warm-up steps, before any timed block:
its seconds and graphs are reported apart, and graphs compiled later (a recompilation inside the
timed blocks) are counted so that a figure that includes one says so.

Model FLOPs are counted as the trainer counts them for its own MFU line (disttrain.speed.flops:
`FlopCounterMode` around one optimizer step, matrix products and attention of forward and backward,
padding included, optimizer arithmetic not; a compiled trainer runs that step eagerly), summed over
processes. MFU = those FLOPs per second over the GPUs' dense bf16 peak (disttrain.speed.flops'
table, or BENCH_PEAK_TFLOPS per GPU). Samples are the template's own count (`StepResult.samples`:
a GAN step counts its D and G phases' batches).

`torchrun --nproc_per_node <GPUs> -m bench.gpu --out gpu.json --recipe seq2seq --engine fsdp2`
(`--cpu-smoke` runs the same code on CPU with tiny models, compiled with aot_eager unless
`--compile-backend` says otherwise, to check it where there is no GPU.)
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any

import torch

from bench.harness import build_trainer, finish, interleave, job_parser, quiet_args, scratch_dir, write_result

MICRO_BATCH = {"seq2seq": 64, "classifier": 4096, "gan": 4096}
ACCUMULATION = 2
WARMUP_STEPS = 3  # after the counted step: the compiled trainer compiles here (first shapes, then dynamic ones)
RECIPE_ARGS = {
    "seq2seq": [
        "recipe=seq2seq",
        "seq2seq.max_len=32",
        "seq2seq.d_model=512",
        "seq2seq.n_heads=8",
        "seq2seq.ffn_dim=2048",
        "seq2seq.encoder_layers=3",
        "seq2seq.decoder_layers=3",
    ],
    "classifier": [
        "recipe=classifier",
        "classifier.num_features=256",
        "classifier.num_classes=16",
        "classifier.hidden=4096",
        "classifier.depth=4",
    ],
    # R1 off on every engine, so that all cells do the same work: under FSDP its input-gradient pass
    # runs eager on a gathered copy of D, outside the compiled forward.
    "gan": ["recipe=gan", "gan.z_dim=64", "gan.hidden=1024", "gan.layers=4", "gan.r1_gamma=0"],
}
SMOKE_ARGS = {  # --cpu-smoke: the same code path on tiny models
    "seq2seq": ["recipe=seq2seq", "seq2seq.d_model=16", "seq2seq.n_heads=2", "seq2seq.ffn_dim=32"],
    "classifier": ["recipe=classifier", "classifier.hidden=32"],
    "gan": ["recipe=gan", "gan.hidden=32", "gan.r1_gamma=0"],
}
ENGINES = {
    "ddp": [],
    "zero2": ["deepspeed_config=configs/deepspeed/zero2.json"],
    "fsdp2": ["fsdp.enabled=true"],
}
MODES = ("eager", "compiled")
# `make bench`'s run: one round (every job once) fits one 10-minute window on one GPU.
REPS, QUICK_REPS, STEPS_PER_REP = 5, 3, 10


def peak_flops() -> float | None:
    """Dense bf16 peak of one GPU in FLOP/s, if known."""
    from disttrain.speed.flops import device_peak_flops

    if os.environ.get("BENCH_PEAK_TFLOPS"):
        return float(os.environ["BENCH_PEAK_TFLOPS"]) * 1e12
    if not torch.cuda.is_available():
        return None
    return device_peak_flops(torch.device("cuda", torch.cuda.current_device()))


def counted_first_step(trainer: Any) -> tuple[float | None, int]:
    """Runs step 0 with its model FLOPs counted as the trainer counts its run's first step; returns
    those FLOPs summed over processes (None where the counter fails) and the step's samples."""
    from disttrain.speed.flops import counting_flops

    # Dynamo neither compiles under the counting mode nor tries that code again later: eager here.
    eager = torch.compiler.set_stance("force_eager") if trainer.cfg.compile else contextlib.nullcontext()
    try:
        with eager, counting_flops() as counted:
            samples = trainer.train_step(0).samples
    except Exception as e:  # the counter does not cover every engine's internals: say so, keep the timing
        print(f"FLOP count failed ({type(e).__name__}: {e}); MFU left out", flush=True)
        with eager:
            return None, trainer.train_step(0).samples
    flops = torch.tensor([float(counted.total)], dtype=torch.float64, device=trainer.engine.device)
    return float(trainer.engine.reduce_sum(flops)[0]), samples


def main() -> None:
    parser = job_parser(__doc__)
    parser.add_argument("--recipe", choices=sorted(RECIPE_ARGS), required=True)
    parser.add_argument("--engine", choices=sorted(ENGINES), required=True)
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--steps-per-rep", type=int, default=STEPS_PER_REP)
    parser.add_argument("--compile-backend", help="torch.compile backend (inductor; aot_eager with --cpu-smoke)")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny models on CPU, to check the code path")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.cpu_smoke:
        raise SystemExit("no GPU: this benchmark measures GPUs (--cpu-smoke checks the code on CPU)")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - set(MODES):
        parser.error(f"--modes: some of {', '.join(MODES)}")
    backend = args.compile_backend or ("aot_eager" if args.cpu_smoke else "inductor")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    micro = 4 if args.cpu_smoke else MICRO_BATCH[args.recipe]
    global_batch = micro * world * ACCUMULATION
    recipe_args = SMOKE_ARGS[args.recipe] if args.cpu_smoke else RECIPE_ARGS[args.recipe]
    common = [
        *recipe_args,
        "mixed_precision=bf16",
        f"global_batch_size={global_batch}",
        f"micro_batch_size={micro}",
        f"{args.recipe}.num_train={global_batch * (1 + WARMUP_STEPS + args.reps * args.steps_per_rep)}",
        "steps=100000",
        f"output_dir={scratch_dir()}/runs",
        "progress_bar=false",
        *quiet_args(),
        *ENGINES[args.engine],
    ]
    compiled_args = ["compile=true", f"compile_backend={backend}"]
    trainers = {
        mode: build_trainer([*common, *(compiled_args if mode == "compiled" else [])], f"gpu-{args.recipe}-{mode}")
        for mode in modes
    }
    from disttrain.speed.compiling import Compilation

    flops: float | None = None
    for trainer in trainers.values():
        counted, samples_per_step = counted_first_step(trainer)
        flops = flops if flops is not None else counted  # the same model and step: one count serves all modes

    def run(trainer: Any) -> Callable[[range], None]:
        def steps(block: range) -> None:
            for step in block:
                trainer.train_step(step)
            if torch.cuda.is_available():
                torch.cuda.synchronize()

        return steps

    sides = {mode: run(trainer) for mode, trainer in trainers.items()}
    warmup = Compilation().start()
    for steps in sides.values():
        steps(range(1, 1 + WARMUP_STEPS))
    warmup.stop()
    timed_blocks = Compilation().start()
    times = interleave(sides, args.reps, args.steps_per_rep, warmup=0, first_step=1 + WARMUP_STEPS)
    timed_blocks.stop()
    write_result(
        args.out,
        {
            "recipe": args.recipe,
            "engine": args.engine,
            "modes": modes,
            "args": recipe_args,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (smoke)",
            "world_size": world,
            "micro_batch": micro,
            "accumulation": ACCUMULATION,
            "samples_per_step": samples_per_step,
            "flops_per_step": flops,
            "peak_flops_per_gpu": peak_flops(),
            "steps_per_rep": args.steps_per_rep,
            "warmup_steps": 1 + WARMUP_STEPS,
            "seconds": times["seconds"],
            # Rank 0's compilations: the eager trainer compiles nothing, so these are the compiled one's.
            "compile": {
                "backend": backend,
                "warmup_graphs": warmup.graphs,
                "warmup_compile_s": warmup.seconds,
                "timed_graphs": timed_blocks.graphs,
            }
            if "compiled" in modes
            else None,
        },
    )
    finish()


def measure(reps: int, rounds: int, cpu_smoke: bool = False) -> dict[str, Any]:
    """Every recipe on every engine, eager and compiled: one job per (recipe, engine), engines in
    turn, their order reversed from one round to the next. A job whose compiled trainer fails is run
    again eager only, so that the eager figures stay and the compiled cell says why it is missing."""
    from bench.harness import run_job

    nproc = torch.cuda.device_count() if not cpu_smoke else 2
    extra = ["--cpu-smoke", "--steps-per-rep", "2"] if cpu_smoke else []
    results: dict[str, Any] = {}

    def job(recipe: str, engine: str, modes: tuple[str, ...]) -> dict[str, Any]:
        args = ["--recipe", recipe, "--engine", engine, "--modes", ",".join(modes), "--reps", str(reps), *extra]
        return run_job("bench.gpu", args, nproc)

    def last_line(error: Exception) -> str:
        line = str(error).strip().splitlines()[-1]
        return line.split("]: ", 1)[1] if line.startswith("[rank") and "]: " in line else line

    for recipe in RECIPE_ARGS:
        for r in range(rounds):
            for engine in ENGINES if r % 2 == 0 else reversed(ENGINES):
                key = f"{recipe}/{engine}"
                if "error" in results.get(key, {}):
                    continue
                modes = tuple(results[key]["modes"]) if key in results else MODES
                try:
                    out = job(recipe, engine, modes)
                except RuntimeError as e:
                    if "compiled" not in modes:  # one failing cell (an engine that refuses a recipe) keeps the others
                        results[key] = {"error": last_line(e)}
                        continue
                    compiled_error = last_line(e)
                    try:
                        out = job(recipe, engine, ("eager",))
                    except RuntimeError as eager_error:
                        results[key] = {"error": last_line(eager_error)}
                        continue
                    out["compiled_error"] = compiled_error
                if key not in results:
                    out["compile"] = [out["compile"]] if out["compile"] else []
                    results[key] = out
                    continue
                for mode, seconds in out["seconds"].items():
                    results[key]["seconds"][mode] += seconds
                if out["compile"]:
                    results[key]["compile"].append(out["compile"])
    return results


if __name__ == "__main__":
    main()
