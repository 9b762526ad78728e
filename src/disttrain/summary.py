"""The lines a run prints about itself: what it is about to do, and what it did."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from disttrain.accumulation import OptimizerGroup
from disttrain.config import Config, lr_multiplier
from disttrain.metrics import FINAL_STEPS, format_losses


def startup_line(
    cfg: Config, world_size: int, accumulation: int, groups: Sequence[OptimizerGroup], epochs: float, run_dir: str
) -> str:
    scale = lr_multiplier(cfg)
    lrs = ", ".join(f"{g.name} {g.scheduler.base_lrs[0]:.3g}" for g in groups)
    scaling = (
        f" ({cfg.lr_scaling} scaling x{scale:.3g} from reference batch {cfg.reference_batch_size})"
        if scale != 1
        else ""
    )
    return (
        f"{cfg.recipe}: {world_size} process(es) x micro-batch {cfg.micro_batch_size} x accumulation "
        f"{accumulation} = global batch {cfg.global_batch_size}; {cfg.steps} steps ({epochs:.2f} epochs); "
        f"peak lr {lrs}{scaling}; {threads_words()}; run directory {run_dir}"
    )


def threads_words() -> str:
    """The CPU threads each process computes with: torch takes every core by default, which
    oversubscribes a machine where other processes run (launchers set OMP_NUM_THREADS per process)."""
    given = os.environ.get("OMP_NUM_THREADS")
    source = f"OMP_NUM_THREADS={given}" if given else "torch's default: every core; set OMP_NUM_THREADS to share"
    return f"{torch.get_num_threads()} CPU thread(s) per process ({source})"


def speed_lines(cfg: Config, checkpointed_blocks: int, run_dir: str) -> list[str]:
    """What the speed features will do, said before the first step (a compilation is a long pause)."""
    lines = []
    if cfg.compile:
        mode = f", mode {cfg.compile_mode}" if cfg.compile_mode != "default" else ""
        lines.append(
            f"compile: models compiled with torch.compile ({cfg.compile_backend}{mode}, dynamic {cfg.compile_dynamic}); "
            "the first step runs eagerly to count the model FLOPs, the second compiles (tens of seconds on CPU with "
            "inductor, minutes for large models), the third may compile again for other shapes; each step that "
            "compiles is reported"
        )
    if cfg.activation_checkpointing:
        lines.append(
            f"activation checkpointing: {checkpointed_blocks} block(s) recompute their activations in backward "
            f"(every {cfg.activation_checkpointing_every}. block)"
        )
    if cfg.profile:
        first, last = cfg.profile_start + 1, cfg.profile_start + cfg.profile_steps
        who = "every process" if cfg.profile_all_processes else "the main process"
        lines.append(
            f"profile: steps {first} to {last} of this run recorded on {who} into {run_dir}/profile "
            "(open the .pt.trace.json in https://ui.perfetto.dev)"
        )
    return lines


def compile_line(step: int, graphs: int, compile_s: float, step_s: float) -> str:
    return f"step {step}: compiled {graphs} graph(s) in {compile_s:.1f}s; the step took {step_s:.1f}s"


def throughput_phrase(throughput: dict[str, float]) -> str:
    """samples/s, tokens/s, FLOP/s and MFU, those the run has."""
    parts = [f"{throughput['samples_per_s']:.1f} samples/s"]
    if "tokens_per_s" in throughput:
        parts.append(f"{throughput['tokens_per_s']:.0f} tokens/s")
    if "flops_per_s" in throughput:
        parts.append(f"{throughput['flops_per_s'] / 1e9:.3g} GFLOP/s")
    if "mfu" in throughput:
        parts.append(f"MFU {throughput['mfu']:.1%}")
    return ", ".join(parts)


def final_line(
    steps_run: int,
    seconds: float,
    resumed_at: int | None,
    losses: dict[str, float],
    quality: str,
    overflow_steps: int,
    nonfinite_steps: int,
    data_wait_share: float,
    where: str,
    throughput: dict[str, float] | None = None,
) -> str:
    last = min(steps_run, FINAL_STEPS)
    return (
        f"done: {steps_run} steps in {seconds:.1f}s ({steps_run / max(seconds, 1e-9):.2f} steps/s"
        + (f", {throughput_phrase(throughput)}" if throughput else "")
        + ")"
        + (f" after resuming at step {resumed_at}" if resumed_at is not None else "")
        + (f", final {format_losses(losses)} (mean over all items of the last {last} steps)" if losses else "")
        + (f", {quality}" if quality else "")
        + f", {data_wait_share:.1%} of the time waiting for data"
        + (f", {overflow_steps} steps skipped on fp16 overflow" if overflow_steps else "")
        + (f", {nonfinite_steps} updates skipped on non-finite gradients" if nonfinite_steps else "")
        + f"; {where}"
    )


def warn_batchnorm(models: dict[str, nn.Module], cfg: Config, world_size: int, accumulation: int) -> None:
    """BatchNorm's statistics come from micro-batches: the update then differs from the whole-batch one."""
    if accumulation == 1 and (world_size == 1 or cfg.sync_batchnorm):
        return
    for name, model in models.items():
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            warnings.warn(
                f"model '{name}' has BatchNorm: its statistics come from micro-batches of "
                f"{cfg.micro_batch_size} samples, not the global batch of {cfg.global_batch_size}, so "
                "the update differs from the whole-batch one. Consider sync_batchnorm=true (GPUs), a lower "
                "BatchNorm momentum, or GroupNorm/LayerNorm.",
                stacklevel=3,
            )
