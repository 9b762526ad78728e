"""What a run reports: losses over all items of all processes, throughput, learning rates, norms.

`Meter` collects each step's per-term loss sums and global item counts, and turns an interval of
steps into one report (every `log_every` steps). It also keeps the last `FINAL_STEPS` steps apart, so
that the summary's final loss means the same thing whatever `log_every` is.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from disttrain.accumulation import OptimizerGroup, UpdateResult, WindowResult

FINAL_STEPS = 20  # the summary's final loss: the mean over all items of this many last steps


@dataclass
class PhaseResult:
    phase: str
    terms: tuple[str, ...]
    window: WindowResult
    update: UpdateResult


@dataclass
class StepResult:
    phases: list[PhaseResult]
    samples: int  # global samples through the models in this step (fewer in the last window of an epoch)
    data_wait_s: float = 0.0  # this process's time blocked waiting for the step's micro-batches
    halted: bool = False  # a non-finite gradient stopped the step (on_nonfinite=stop)
    untouched: bool = True  # no phase of the step had updated a model before it halted


Pairs = dict[tuple[str, str], torch.Tensor]  # (phase, term) -> [local loss sum, global count]


def _add(into: Pairs, pairs: Pairs) -> None:
    for key, pair in pairs.items():
        into[key] = into[key] + pair if key in into else pair


class Meter:
    """Loss sums and counts per (phase, term), samples and time, from one report to the next.

    `reduce_sum` sums a tensor over processes (the loss sums are local, the counts already global).
    """

    def __init__(
        self,
        reduce_sum: Callable[[torch.Tensor], torch.Tensor],
        world_size: int = 1,
        device: torch.device | str = "cpu",
    ):
        self.reduce_sum, self.world_size, self.device = reduce_sum, world_size, device
        self.interval: Pairs = {}
        self.recent: deque[Pairs] = deque(maxlen=FINAL_STEPS)
        self.samples = self.steps = 0
        self.data_wait = 0.0  # this process's seconds blocked on data in the interval
        self.started = time.perf_counter()
        self.run_data_wait = 0.0  # this process's seconds blocked on data in the whole run
        self.run_samples = 0
        self.run_tokens = torch.zeros((), dtype=torch.float64)  # a tensor: no device sync per step
        # Set once the run's first step was counted (disttrain.speed.flops): model FLOPs per global
        # sample, and the peak FLOP/s of all devices together where it is known.
        self.flops_per_sample = 0.0
        self.peak_flops: float | None = None

    def add(self, result: StepResult) -> None:
        pairs: Pairs = {}
        for r in result.phases:
            for j, term in enumerate(r.terms):
                _add(pairs, {(r.phase, term): torch.stack([r.window.loss_sums[j], r.window.counts[j]])})
        _add(self.interval, pairs)
        self.recent.append(pairs)
        self.samples += result.samples
        self.data_wait += result.data_wait_s
        self.run_data_wait += result.data_wait_s
        self.run_samples += result.samples
        for (_, term), pair in pairs.items():
            if term == "tokens":
                self.run_tokens = self.run_tokens + pair[1].detach().to("cpu", non_blocking=True)
        self.steps += 1

    def report(self, learning_rates: dict[str, float], last: StepResult) -> dict[str, float]:
        """The interval's report, then a new interval: a collective (every process calls it).
        `learning_rates`: those the last step's updates used (`learning_rates`, read before it)."""
        elapsed = time.perf_counter() - self.started
        tokens = sum(float(pair[1]) for (_, term), pair in self.interval.items() if term == "tokens")
        report = self._losses(self.interval)
        report["samples_per_s"] = self.samples / elapsed
        if tokens:
            report["tokens_per_s"] = tokens / elapsed
        report.update(self._compute(self.samples / elapsed))
        report["step_time_s"] = elapsed / self.steps
        # The mean over processes: each waits on its own workers, and all wait for the slowest at the
        # window's first collective, so a high share anywhere idles every device.
        wait = (
            float(self.reduce_sum(torch.tensor([self.data_wait], dtype=torch.float64, device=self.device))[0])
            / self.world_size
        )
        report["data_wait_s"] = wait / self.steps
        report["data_wait_share"] = wait / elapsed
        report.update(learning_rates)
        for r in last.phases:
            report.update({f"grad_norm/{k}": float(v) for k, v in r.update.grad_norms.items()})
        self.interval, self.samples, self.steps, self.data_wait = {}, 0, 0, 0.0
        self.started = time.perf_counter()
        return report

    def _compute(self, samples_per_s: float) -> dict[str, float]:
        """Achieved model FLOP/s over all processes, and MFU where the devices' peak is known."""
        if not self.flops_per_sample:
            return {}
        flops_per_s = self.flops_per_sample * samples_per_s
        out = {"flops_per_s": flops_per_s}
        if self.peak_flops:
            out["mfu"] = flops_per_s / self.peak_flops
        return out

    def run_throughput(self, seconds: float) -> dict[str, float]:
        """The whole run's samples/s, tokens/s (recipes with a token loss), FLOP/s and MFU."""
        seconds = max(seconds, 1e-9)
        out = {"samples_per_s": self.run_samples / seconds}
        if float(self.run_tokens):
            out["tokens_per_s"] = float(self.run_tokens) / seconds
        return {**out, **self._compute(out["samples_per_s"])}

    def final_losses(self) -> dict[str, float]:
        """The losses over all items of the last FINAL_STEPS steps (a collective)."""
        window: Pairs = {}
        for pairs in self.recent:
            _add(window, pairs)
        return self._losses(window) if window else {}

    def _losses(self, pairs: Pairs) -> dict[str, float]:
        """Each term's mean over all its items on all processes, summed per phase."""
        stacked = torch.stack(list(pairs.values()))
        sums = self.reduce_sum(stacked[:, 0].contiguous())
        means = (sums / stacked[:, 1].clamp(min=1)).tolist()
        phases = list(dict.fromkeys(phase for phase, _ in pairs))
        report: dict[str, float] = {}
        for phase in phases:
            terms = {t: m for (p, t), m in zip(pairs, means, strict=True) if p == phase}
            prefix = "loss" if len(phases) == 1 else f"loss/{phase}"
            report[prefix] = sum(terms.values())
            if len(terms) > 1:
                report.update({f"{prefix}/{t}": m for t, m in terms.items()})
        return report


def format_losses(losses: dict[str, float]) -> str:
    shown = {k: v for k, v in losses.items() if k.startswith("loss") and k.count("/") <= 1}
    return ", ".join(f"{k.replace('/', ' ')} {v:.4g}" for k, v in shown.items()) or "loss n/a"


def learning_rates(groups: Sequence[OptimizerGroup]) -> dict[str, float]:
    """`lr/<group>` of every optimizer's parameter groups, as the next update will use them (a
    schedule steps after its update: read after it, this is the rate of the step after)."""
    rates: dict[str, float] = {}
    for g in groups:
        for group, lr in zip(g.optimizer.param_groups, g.scheduler.get_last_lr(), strict=True):
            rates.setdefault(f"lr/{group.get('name', g.name)}", lr)
    return rates
