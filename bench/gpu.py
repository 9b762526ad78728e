"""GPU throughput: samples per second and model FLOPs utilisation of each recipe in bf16, DDP against
DeepSpeed ZeRO 2, the two engines taking turns in the same processes (one per GPU).

Model FLOPs are counted, not estimated: `torch.utils.flop_counter.FlopCounterMode` around one
optimizer step on each process (matrix products and attention of forward and backward, padding
included, optimizer arithmetic not), summed over processes. MFU = those FLOPs per second over the
GPUs' dense bf16 peak (a table of known GPUs, or BENCH_PEAK_TFLOPS per GPU). Samples are the
template's own count (`StepResult.samples`: a GAN step counts its D and G phases' batches).

`torchrun --nproc_per_node <GPUs> -m bench.gpu --out gpu.json --recipe seq2seq`
(`--cpu-smoke` runs the same code on CPU with tiny models, to check it where there is no GPU.)
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

from bench.harness import build_trainer, finish, interleave, job_parser, quiet_args, scratch_dir, write_result

# Dense bf16 tensor-core peak per GPU, TFLOP/s, by a fragment of torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}

MICRO_BATCH = {"seq2seq": 64, "classifier": 4096, "gan": 4096}
ACCUMULATION = 2
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
    # R1 is refused under DeepSpeed: off on both engines, so that they do the same work.
    "gan": ["recipe=gan", "gan.z_dim=64", "gan.hidden=1024", "gan.layers=4", "gan.r1_gamma=0"],
}
SMOKE_ARGS = {  # --cpu-smoke: the same code path on tiny models
    "seq2seq": ["recipe=seq2seq", "seq2seq.d_model=16", "seq2seq.n_heads=2", "seq2seq.ffn_dim=32"],
    "classifier": ["recipe=classifier", "classifier.hidden=32"],
    "gan": ["recipe=gan", "gan.hidden=32", "gan.r1_gamma=0"],
}
ENGINES = {"ddp": [], "zero2": ["deepspeed_config=configs/deepspeed/zero2.json"]}


def peak_flops() -> float | None:
    """Dense bf16 peak of one GPU in FLOP/s, if known."""
    if os.environ.get("BENCH_PEAK_TFLOPS"):
        return float(os.environ["BENCH_PEAK_TFLOPS"]) * 1e12
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((tflops * 1e12 for key, tflops in PEAK_BF16_TFLOPS.items() if key in name), None)


def step_flops(trainer: Any, step: int) -> float | None:
    """Model FLOPs of optimizer step `step` over all processes (runs that step)."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with FlopCounterMode(display=False) as counter:
            trainer.train_step(step)
        flops = torch.tensor([float(counter.get_total_flops())], dtype=torch.float64, device=trainer.accelerator.device)
    except Exception as e:  # the counter does not cover every engine's internals: say so, keep the timing
        print(f"FLOP count failed ({type(e).__name__}: {e}); MFU left out", flush=True)
        return None
    if dist.is_initialized():
        dist.all_reduce(flops)
    return float(flops)


def main() -> None:
    parser = job_parser(__doc__)
    parser.add_argument("--recipe", choices=sorted(RECIPE_ARGS), required=True)
    parser.add_argument("--engine", choices=sorted(ENGINES), required=True)
    parser.add_argument("--steps-per-rep", type=int, default=10)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny models on CPU, to check the code path")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.cpu_smoke:
        raise SystemExit("no GPU: this benchmark measures GPUs (--cpu-smoke checks the code on CPU)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    micro = 4 if args.cpu_smoke else MICRO_BATCH[args.recipe]
    global_batch = micro * world * ACCUMULATION
    recipe_args = SMOKE_ARGS[args.recipe] if args.cpu_smoke else RECIPE_ARGS[args.recipe]
    warmup = 3
    trainer = build_trainer(
        [
            *recipe_args,
            "mixed_precision=bf16",
            f"global_batch_size={global_batch}",
            f"micro_batch_size={micro}",
            f"{args.recipe}.num_train={global_batch * (2 + warmup + args.reps * args.steps_per_rep)}",
            "steps=100000",
            f"output_dir={scratch_dir()}/runs",
            "progress_bar=false",
            *quiet_args(),
            *ENGINES[args.engine],
        ],
        f"gpu-{args.recipe}-{args.engine}",
    )
    flops = step_flops(trainer, 0)
    samples_per_step = trainer.train_step(1).samples

    def run(block: range) -> None:
        for step in block:
            trainer.train_step(step)
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    times = interleave({args.engine: run}, args.reps, args.steps_per_rep, warmup=warmup, first_step=2)
    write_result(
        args.out,
        {
            "recipe": args.recipe,
            "engine": args.engine,
            "args": recipe_args,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (smoke)",
            "world_size": world,
            "micro_batch": micro,
            "accumulation": ACCUMULATION,
            "samples_per_step": samples_per_step,
            "flops_per_step": flops,
            "peak_flops_per_gpu": peak_flops(),
            "steps_per_rep": args.steps_per_rep,
            "seconds": times["seconds"][args.engine],
        },
    )
    finish()


def measure(reps: int, rounds: int, cpu_smoke: bool = False) -> dict[str, Any]:
    """Every recipe on both engines, one job per (recipe, engine), engines alternating job by job.

    One process cannot hold both: DeepSpeed casts to bf16 itself, so its Accelerator runs without
    mixed precision, and Accelerate keeps one precision setting per process.
    """
    from bench.harness import run_job

    nproc = torch.cuda.device_count() if not cpu_smoke else 2
    extra = ["--cpu-smoke", "--steps-per-rep", "2"] if cpu_smoke else []
    results: dict[str, Any] = {}
    for recipe in RECIPE_ARGS:
        for r in range(rounds):
            for engine in ENGINES if r % 2 == 0 else reversed(ENGINES):
                key = f"{recipe}/{engine}"
                try:
                    out = run_job(
                        "bench.gpu", ["--recipe", recipe, "--engine", engine, "--reps", str(reps), *extra], nproc
                    )
                except RuntimeError as e:  # one failing cell (an engine that refuses a recipe) keeps the others
                    results[key] = {"error": str(e).strip().splitlines()[-1]}
                    continue
                if "error" in results.get(key, {}):
                    continue
                if key in results:
                    results[key]["seconds"] += out["seconds"]
                else:
                    results[key] = out
    return results


if __name__ == "__main__":
    main()
