"""The training loop: windows of micro-batches in, exact optimizer steps out. Reads top to bottom."""

from __future__ import annotations

import contextlib
import datetime
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from accelerate.logging import get_logger
from accelerate.utils import broadcast_object_list, send_to_device, set_seed
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from disttrain.accumulation import MicroBatch, UpdateResult, WindowResult, accumulate_window, apply_update
from disttrain.config import Config, lr_multiplier, to_yaml
from disttrain.data.windows import WindowSampler
from disttrain.deepspeed_config import deepspeed_config_path
from disttrain.engine import (
    build_accelerator,
    build_deepspeed_engines,
    check_device_support,
    check_launcher_env,
    gathered,
)
from disttrain.recipes import build_recipe
from disttrain.recipes.base import Phase, Recipe

log = get_logger("disttrain")


@contextlib.contextmanager
def frozen(modules: tuple[nn.Module, ...]) -> Iterator[None]:
    """Parameters of `modules` take no gradient inside the block; their flags are restored after it."""
    params = [p for m in modules for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)


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


class Trainer:
    def __init__(self, cfg: Config, recipe: Recipe | None = None):
        """Build recipe, engine and run directory. A prepared `recipe` may be passed (tests do)."""
        check_launcher_env(cfg)
        check_device_support(cfg, cfg.world_size())
        cfg.deepspeed = deepspeed_config_path(cfg)  # resolved once: the launcher's variable is consumed below
        self.cfg = cfg
        set_seed(cfg.seed)  # identical initialisation on every process
        self.recipe = recipe or build_recipe(cfg)
        self.accelerator = build_accelerator(cfg, self.recipe.find_unused_parameters)
        acc = self.accelerator
        self.rank, self.world_size = acc.process_index, acc.num_processes
        self.accumulation = cfg.accumulation_steps(self.world_size)
        self._warn_batchnorm()
        if cfg.sync_batchnorm and self.world_size > 1:
            self.recipe.models = {k: nn.SyncBatchNorm.convert_sync_batchnorm(m) for k, m in self.recipe.models.items()}
        if cfg.deepspeed:
            self.models, self.engine_groups = build_deepspeed_engines(
                cfg, self.recipe.models, self.recipe.groups, self.world_size
            )
            self.groups = list(self.engine_groups.values())
        else:
            self.models = {name: acc.prepare_model(m) for name, m in self.recipe.models.items()}
            for group in self.recipe.groups:
                group.optimizer = acc.prepare_optimizer(group.optimizer)
            self.groups = self.recipe.groups
        self.sampler = WindowSampler(self.recipe.num_train, cfg.global_batch_size, cfg.micro_batch_size, cfg.seed)
        self.run_dir = self._make_run_dir()
        self.recipe.run_dir = self.run_dir
        self.overflow_steps = 0

    # ------------------------------------------------------------------ one optimizer step

    def train_step(self, step: int) -> StepResult:
        results, samples = [], 0
        for phase in self.recipe.phases(step):
            window = self.backward_window(phase)
            update = self.optimizer_step(phase)
            results.append(PhaseResult(phase.name, phase.terms, window, update))
            samples += len(self.sampler.global_batch(phase.data_step))
        return StepResult(results, samples)

    def backward_window(self, phase: Phase) -> WindowResult:
        """Forward and backward this process's micro-batches of `phase`; its gradients are then exact."""
        if self.cfg.deepspeed and len(phase.models) != 1:
            raise RuntimeError(f"phase '{phase.name}' trains {phase.models}: under DeepSpeed a phase trains one model")
        device = self.accelerator.device
        micro_batches = [
            MicroBatch(send_to_device(phase.make_batch(p), device), p.stand_in)
            for p in self.sampler.window(phase.data_step, self.rank, self.world_size)
        ]
        with frozen(phase.frozen):
            window = accumulate_window(
                self.accelerator,
                [self.models[name] for name in phase.models],
                micro_batches,
                phase.terms,
                phase.item_counts,
                lambda batch: phase.losses(self.models, batch),
            )
        self._check_no_stray_gradients(phase)
        return window

    def optimizer_step(self, phase: Phase) -> UpdateResult:
        groups = [self.engine_groups[name] for name in phase.models] if self.cfg.deepspeed else phase.groups
        update = apply_update(self.accelerator, groups, [self.models[name] for name in phase.models])
        self.overflow_steps += update.skipped
        if phase.after_update is not None and not update.skipped:
            phase.after_update()
        return update

    def _check_no_stray_gradients(self, phase: Phase) -> None:
        """Gradients in a model this phase does not train would leak into that model's next update."""
        for name, model in self.models.items():
            if name not in phase.models and any(p.grad is not None for p in model.parameters()):
                raise RuntimeError(
                    f"phase '{phase.name}' left gradients in '{name}', which it does not train: "
                    f"freeze it for the phase (Phase.frozen) or detach its outputs"
                )

    # ------------------------------------------------------------------ the run

    def fit(self) -> dict[str, float]:
        cfg, acc = self.cfg, self.accelerator
        self._announce()
        progress = tqdm(total=cfg.steps, disable=not (acc.is_main_process and cfg.progress_bar), dynamic_ncols=True)
        interval: dict[tuple[str, str], torch.Tensor] = {}  # (phase, term) -> [local loss sum, global count]
        samples_in_interval, interval_start, start = 0, time.perf_counter(), time.perf_counter()
        report: dict[str, float] = {}
        for step in range(cfg.steps):
            result = self.train_step(step)
            for r in result.phases:
                for j, term in enumerate(r.terms):
                    pair = torch.stack([r.window.loss_sums[j], r.window.counts[j]])
                    interval[r.phase, term] = interval[r.phase, term] + pair if (r.phase, term) in interval else pair
            samples_in_interval += result.samples
            progress.update(1)
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                elapsed = time.perf_counter() - interval_start
                report = self._loss_report(interval)
                report["samples_per_s"] = samples_in_interval / elapsed
                report.update({f"lr/{g.name}": g.scheduler.get_last_lr()[0] for g in self.groups})
                for r in result.phases:
                    report.update({f"grad_norm/{k}": float(v) for k, v in r.update.grad_norms.items()})
                headline = next(iter(report))
                progress.set_postfix(
                    {headline: f"{report[headline]:.4f}", "samples/s": f"{report['samples_per_s']:.0f}"}
                )
                log.info(f"step {step + 1}: " + ", ".join(f"{k} {v:.4g}" for k, v in report.items()))
                interval, samples_in_interval, interval_start = {}, 0, time.perf_counter()
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 != cfg.steps:
                log.info(f"step {step + 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in self.evaluate().items()))
        progress.close()
        train_time = time.perf_counter() - start
        metrics = self.evaluate()
        weights = self.save_weights() if cfg.save_weights else []
        acc.print(
            f"done: {cfg.steps} steps in {train_time:.1f}s ({cfg.steps / train_time:.2f} steps/s), "
            f"final {self._format_losses(report)}, {self.recipe.summary(metrics)}"
            + (f", {self.overflow_steps} steps skipped on fp16 overflow" if self.overflow_steps else "")
            + (f"; weights in {', '.join(weights)}" if weights else f"; run directory {self.run_dir}")
        )
        return metrics

    def _loss_report(self, interval: dict[tuple[str, str], torch.Tensor]) -> dict[str, float]:
        """Each term's mean over all its items of the interval on all processes, summed per phase."""
        pairs = torch.stack(list(interval.values()))
        sums = self.accelerator.reduce(pairs[:, 0].contiguous(), reduction="sum")  # counts are global already
        means = (sums / pairs[:, 1].clamp(min=1)).tolist()
        phases = list(dict.fromkeys(phase for phase, _ in interval))
        report: dict[str, float] = {}
        for phase in phases:
            terms = {t: m for (p, t), m in zip(interval, means, strict=True) if p == phase}
            prefix = "loss" if len(phases) == 1 else f"loss/{phase}"
            report[prefix] = sum(terms.values())
            if len(terms) > 1:
                report.update({f"{prefix}/{t}": m for t, m in terms.items()})
        return report

    @staticmethod
    def _format_losses(report: dict[str, float]) -> str:
        losses = {k: v for k, v in report.items() if k.startswith("loss") and k.count("/") <= 1}
        return ", ".join(f"{k.replace('/', ' ')} {v:.4g}" for k, v in losses.items()) or "loss n/a"

    def evaluate(self) -> dict[str, float]:
        """The recipe's metrics on held-out data, each process scoring its share."""
        models = self.recipe.models  # the modules inside the wrappers: no collective in evaluation
        with contextlib.ExitStack() as full:
            for m in models.values():
                full.enter_context(gathered(m))  # ZeRO 3: whole weights, so processes may differ in work
                m.eval()
            parts = self.recipe.evaluate(models, self.rank, self.world_size)
            for m in models.values():
                m.train()
        totals = {k: self.accelerator.reduce(v, reduction="sum") for k, v in parts.items()}
        return {k: float(v[0] / v[1]) for k, v in totals.items()}

    def save_weights(self) -> list[str]:
        """Full weights of each model as `<name>.safetensors`, written aside then renamed."""
        self.accelerator.wait_for_everyone()
        paths = []
        for name, model in self.recipe.exported_models().items():  # the recipe's modules: unwrapped
            path = os.path.join(self.run_dir, f"{name}.safetensors")
            paths.append(path)
            with gathered(model):
                if self.accelerator.is_main_process:
                    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
                    save_file(state, path + ".tmp")
                    os.replace(path + ".tmp", path)
        self.accelerator.wait_for_everyone()
        return paths

    def close(self) -> None:
        """Release the process group cleanly; gloo may abort at exit otherwise."""
        self.accelerator.wait_for_everyone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    # ------------------------------------------------------------------ set-up helpers

    def _make_run_dir(self) -> str:
        """One directory per run (never per process), named on the main process and shared."""
        name = [self.cfg.run_name]
        if not name[0] and self.accelerator.is_main_process:
            stamp = f"{self.cfg.recipe}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
            name[0] = next(
                f"{stamp}{suffix}"
                for suffix in ["", *(f"-{i}" for i in range(1, 1000))]
                if not os.path.exists(os.path.join(self.cfg.output_dir, f"{stamp}{suffix}"))
            )
        broadcast_object_list(name, from_process=0)
        run_dir = os.path.join(self.cfg.output_dir, name[0])
        if self.accelerator.is_main_process:
            os.makedirs(run_dir, exist_ok=True)
            with open(os.path.join(run_dir, "config.yaml"), "w") as f:
                f.write(to_yaml(self.cfg))
        self.accelerator.wait_for_everyone()
        return run_dir

    def _announce(self) -> None:
        cfg = self.cfg
        scale = lr_multiplier(cfg)
        lrs = ", ".join(f"{g.name} {g.scheduler.base_lrs[0]:.3g}" for g in self.groups)
        scaling = (
            f" ({cfg.lr_scaling} scaling x{scale:.3g} from reference batch {cfg.reference_batch_size})"
            if scale != 1
            else ""
        )
        epochs = self.recipe.data_steps(cfg.steps) / self.sampler.steps_per_epoch
        self.accelerator.print(
            f"{cfg.recipe}: {self.world_size} process(es) x micro-batch {cfg.micro_batch_size} x accumulation "
            f"{self.accumulation} = global batch {cfg.global_batch_size}; {cfg.steps} steps ({epochs:.2f} epochs); "
            f"peak lr {lrs}{scaling}; run directory {self.run_dir}"
        )

    def _warn_batchnorm(self) -> None:
        if self.accumulation == 1 and (self.world_size == 1 or self.cfg.sync_batchnorm):
            return
        for name, model in self.recipe.models.items():
            if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
                warnings.warn(
                    f"model '{name}' has BatchNorm: its statistics come from micro-batches of "
                    f"{self.cfg.micro_batch_size} samples, not the global batch of {self.cfg.global_batch_size}, so "
                    "the update differs from the whole-batch one. Consider sync_batchnorm=true (GPUs), a lower "
                    "BatchNorm momentum, or GroupNorm/LayerNorm.",
                    stacklevel=2,
                )
