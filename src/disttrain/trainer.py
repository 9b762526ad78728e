"""The training loop: windows of micro-batches in, exact optimizer steps out. Reads top to bottom."""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import subprocess
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
from disttrain.checkpoint import (
    complete_checkpoints,
    load_checkpoint,
    remove_unpublished,
    save_checkpoint,
)
from disttrain.config import Config, lr_multiplier, to_yaml
from disttrain.data.windows import WindowSampler
from disttrain.deepspeed_config import deepspeed_config_path
from disttrain.engine import (
    build_accelerator,
    build_deepspeed_engines,
    check_device_support,
    check_launcher_env,
    gathered,
    release_process_group,
)
from disttrain.recipes import build_recipe
from disttrain.recipes.base import Phase, Recipe
from disttrain.tracking import Tracking

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
    halted: bool = False  # a non-finite gradient stopped the step (on_nonfinite=stop)
    untouched: bool = True  # no phase of the step had updated a model before it halted


def slurm_job() -> str:
    """This SLURM job as `scontrol` names it (`<array job>_<task>` in an array); empty outside SLURM."""
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{array_job}_{task}"
    return os.environ.get("SLURM_JOB_ID", "")


def slurm_run_name(recipe: str) -> str:
    """Under SLURM a run is named after its job (and array task), so a requeued job finds its own
    checkpoints; empty outside SLURM."""
    job = slurm_job()
    return f"{recipe}-{job}" if job else ""


def requeue(job: str, reason: str) -> str:
    """`scontrol requeue` the job, unless a SIGTERM came from its cancellation (scancel).

    Preemption (SIGTERM within the partition's GraceTime) and the warning before the time limit
    (SIGUSR1) requeue; a job whose tasks end first counts as completed, so the job must do it.
    SLURM then sends SIGTERM to the job, this call's process included: the call runs with SIGTERM
    ignored (the child inherits that).
    """
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        if reason == "SIGTERM":
            shown = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True)
            state = next((f.split("=", 1)[1] for f in shown.stdout.split() if f.startswith("JobState=")), "")
            if state == "CANCELLED":
                return f"job {job} was cancelled: not requeued"
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    except FileNotFoundError:
        return f"could not requeue job {job}: no scontrol on PATH"
    finally:
        signal.signal(signal.SIGTERM, previous)
    if done.returncode != 0:
        return f"scontrol requeue {job} failed ({(done.stderr or done.stdout).strip()})"
    return f"requeued job {job}, which resumes from it"


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
        self.recipe.main_process = acc.is_main_process
        self.overflow_steps = 0  # fp16 steps skipped on overflow (the loss scale was too high)
        self.nonfinite_steps = 0  # updates skipped on a NaN/inf gradient (on_nonfinite=skip)
        self.tracker_run_id: str | None = None
        self.start_step = 0
        self.stop_reason: str | None = None  # set when a signal or a non-finite loss ended the run early
        self.resumed_from = self._resume()
        self.tracking = Tracking.start(cfg, acc, self.run_dir, run_id=self.tracker_run_id)
        self.tracker_run_id = self.tracking.run_id  # kept in checkpoints: a resumed run continues it

    # ------------------------------------------------------------------ one optimizer step

    def train_step(self, step: int) -> StepResult:
        results, samples = [], 0
        for i, phase in enumerate(self.recipe.phases(step)):
            window = self.backward_window(phase)
            update = self.optimizer_step(phase, window)
            results.append(PhaseResult(phase.name, phase.terms, window, update))
            samples += len(self.sampler.global_batch(phase.data_step))
            if update.nonfinite and self.cfg.on_nonfinite == "stop":
                return StepResult(results, samples, halted=True, untouched=i == 0)
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
        with frozen(phase.frozen), self._engine_precision():
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

    def optimizer_step(self, phase: Phase, window: WindowResult | None = None) -> UpdateResult:
        """Update the phase's models unless the window's gradient is not finite."""
        models = [self.models[name] for name in phase.models]
        if self.cfg.deepspeed:
            # Engines keep the reduced gradients to themselves (partitioned), so the window's losses
            # decide; a NaN/inf reaches every gradient it touches. Skipping is refused at config time.
            if window is not None and self._any_process(~torch.isfinite(window.loss_sums).all()):
                update = UpdateResult(grad_norms={}, skipped=False, nonfinite=True)
            else:
                update = apply_update(self.accelerator, [self.engine_groups[n] for n in phase.models], models)
        else:
            update = apply_update(self.accelerator, phase.groups, models)
        self.overflow_steps += update.skipped
        self.nonfinite_steps += update.nonfinite
        if update.nonfinite:
            log.warning(f"phase '{phase.name}': non-finite loss or gradient, update skipped ({self.cfg.on_nonfinite})")
        if phase.after_update is not None and not (update.skipped or update.nonfinite):
            phase.after_update()
        return update

    def _engine_precision(self) -> contextlib.AbstractContextManager:
        """DeepSpeed's bf16 casts the model's weights but not its float inputs: autocast matches them
        (Accelerate does the same for its own bf16 models)."""
        if self.cfg.deepspeed and self.cfg.mixed_precision == "bf16":
            return torch.autocast(device_type=self.accelerator.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _any_process(self, flag: torch.Tensor) -> bool:
        return bool(self.accelerator.reduce(flag.float().reshape(1).to(self.accelerator.device), reduction="sum") > 0)

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
        progress = tqdm(
            total=cfg.steps,
            initial=self.start_step,
            disable=not (acc.is_main_process and cfg.progress_bar),
            dynamic_ncols=True,
        )
        interval: dict[tuple[str, str], torch.Tensor] = {}  # (phase, term) -> [local loss sum, global count]
        samples_in_interval, interval_start, start = 0, time.perf_counter(), time.perf_counter()
        report: dict[str, float] = {}
        steps_in_interval = 0
        with self._stop_signals_caught(), self._collective_failures_explained(), self._tracking_closed():
            for step in range(self.start_step, cfg.steps):
                result = self.train_step(step)
                if result.halted:
                    self._halt_on_nonfinite(step, result)
                done = step + 1
                for r in result.phases:
                    for j, term in enumerate(r.terms):
                        pair = torch.stack([r.window.loss_sums[j], r.window.counts[j]])
                        interval[r.phase, term] = (
                            interval[r.phase, term] + pair if (r.phase, term) in interval else pair
                        )
                samples_in_interval += result.samples
                steps_in_interval += 1
                progress.update(1)
                if done % cfg.log_every == 0 or done == cfg.steps:
                    elapsed = time.perf_counter() - interval_start
                    tokens = sum(float(pair[1]) for (_, term), pair in interval.items() if term == "tokens")
                    report = self._loss_report(interval)
                    report["samples_per_s"] = samples_in_interval / elapsed
                    if tokens:
                        report["tokens_per_s"] = tokens / elapsed
                    report["step_time_s"] = elapsed / steps_in_interval
                    for g in self.groups:
                        for group, lr in zip(g.optimizer.param_groups, g.scheduler.get_last_lr(), strict=True):
                            report.setdefault(f"lr/{group.get('name', g.name)}", lr)
                    for r in result.phases:
                        report.update({f"grad_norm/{k}": float(v) for k, v in r.update.grad_norms.items()})
                    headline = next(iter(report))
                    progress.set_postfix(
                        {headline: f"{report[headline]:.4f}", "samples/s": f"{report['samples_per_s']:.0f}"}
                    )
                    log.info(f"step {done}: " + ", ".join(f"{k} {v:.4g}" for k, v in report.items()))
                    self.tracking.log(
                        {**report, "overflow_steps": self.overflow_steps, "nonfinite_steps": self.nonfinite_steps},
                        step=done,
                    )
                    interval, samples_in_interval, steps_in_interval = {}, 0, 0
                    interval_start = time.perf_counter()
                if cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.steps:
                    metrics = self.evaluate(step=done)
                    log.info(f"step {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
                saved = None
                if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done != cfg.steps:
                    saved = save_checkpoint(self, done)
                if acc.check_trigger():  # a process caught a stop signal: all stop at this boundary
                    self._stop_on_signal(done, saved or save_checkpoint(self, done))
                    progress.close()
                    return {}
            train_time = time.perf_counter() - start
            progress.close()
            if self.start_step < cfg.steps:
                save_checkpoint(self, cfg.steps)
            metrics = self.evaluate(step=cfg.steps)
            weights = self.save_weights() if cfg.save_weights else []
        steps_run = cfg.steps - self.start_step
        self.say(
            f"done: {steps_run} steps in {train_time:.1f}s ({steps_run / max(train_time, 1e-9):.2f} steps/s)"
            + (f" after resuming at step {self.start_step}" if self.resumed_from else "")
            + f", final {self._format_losses(report)}, {self.recipe.summary(metrics)}"
            + (f", {self.overflow_steps} steps skipped on fp16 overflow" if self.overflow_steps else "")
            + (f", {self.nonfinite_steps} updates skipped on non-finite gradients" if self.nonfinite_steps else "")
            + (f"; weights in {', '.join(weights)}" if weights else f"; run directory {self.run_dir}")
        )
        return metrics

    def say(self, line: str) -> None:
        """One line from the whole run: the global main process only (Accelerate's print is per node)."""
        if self.accelerator.is_main_process:
            print(line, flush=True)

    # ------------------------------------------------------------------ stopping early

    def state_dict(self, step: int) -> dict:
        """The trainer's own state after `step` optimizer steps (models and optimizers are saved apart)."""
        scaler = self.accelerator.scaler
        return {
            "step": step,
            "overflow_steps": self.overflow_steps,
            "nonfinite_steps": self.nonfinite_steps,
            "schedulers": {g.name: g.scheduler.state_dict() for g in self.groups},
            "scaler": scaler.state_dict() if scaler is not None else None,
            "tracker_run_id": self.tracker_run_id,
        }

    def _resume(self) -> str | None:
        """Load the checkpoint `resume` names (auto: the run directory's newest complete one)."""
        cfg, acc = self.cfg, self.accelerator
        if cfg.resume == "never":
            return None
        if acc.is_main_process:
            remove_unpublished(self.run_dir)  # what a killed run left half-written
        acc.wait_for_everyone()
        if cfg.resume == "auto":
            found = complete_checkpoints(self.run_dir)
            if not found:
                return None
            path = found[-1]
        else:
            path = cfg.resume
        state = load_checkpoint(self, path)
        self.start_step = state["step"]
        self.overflow_steps, self.nonfinite_steps = state["overflow_steps"], state["nonfinite_steps"]
        self.tracker_run_id = state["tracker_run_id"]
        self.say(f"resuming from {path} at step {self.start_step} of {cfg.steps}")
        return path

    @contextlib.contextmanager
    def _stop_signals_caught(self) -> Iterator[None]:
        """SIGUSR1 (SLURM's warning before the time limit) and SIGTERM (preemption, scancel) stop
        the run at the next step boundary with a checkpoint, on every process together."""

        def catch(signum: int, frame: object) -> None:
            self.stop_reason = signal.Signals(signum).name
            self.accelerator.set_trigger()

        caught = (signal.SIGUSR1, signal.SIGTERM)
        try:
            previous = {s: signal.signal(s, catch) for s in caught}
        except ValueError:  # not the main thread: leave signals to whoever owns them
            previous = {}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _stop_on_signal(self, step: int, checkpoint: str) -> None:
        """After the checkpoint, under SLURM, the main process requeues the job unless it was cancelled."""
        if not self.accelerator.is_main_process:
            return
        reason = self.stop_reason or "a signal on another process"
        job = slurm_job()
        after = (
            f"{requeue(job, reason)}"
            if job
            else f"continue with resume={checkpoint}, or the same command with run_name={os.path.basename(self.run_dir)}"
        )
        self.say(f"stopped at step {step} of {self.cfg.steps} on {reason}: checkpoint {checkpoint}; {after}")

    def _halt_on_nonfinite(self, step: int, result: StepResult) -> None:
        """on_nonfinite=stop: keep the state before the bad step where it is still intact, then stop."""
        phase = result.phases[-1].phase
        if result.untouched:
            saved = save_checkpoint(self, step)
        else:  # an earlier phase of this step already updated its model: not the state of any step
            found = complete_checkpoints(self.run_dir)
            saved = found[-1] if found else None
        raise FloatingPointError(
            f"step {step + 1}: the '{phase}' loss or gradient is not finite; "
            + (f"the state before this step is in {saved}; " if saved else "no checkpoint holds a state before it; ")
            + "resume with on_nonfinite=skip to skip such updates, or look for the cause "
            "(learning rate, data, mixed precision)"
        )

    @contextlib.contextmanager
    def _tracking_closed(self) -> Iterator[None]:
        """The tracked run ends with the loop, marked failed if the loop raised."""
        try:
            yield
        except BaseException:
            self.tracking.finish(exit_code=1)
            raise
        self.tracking.finish()

    @contextlib.contextmanager
    def _collective_failures_explained(self) -> Iterator[None]:
        """A dead or hung process surfaces as an opaque backend error after the timeout: name it."""
        try:
            yield
        except (RuntimeError, torch.distributed.DistBackendError) as e:
            text = str(e)
            if not any(s in text for s in ("Timed out", "timed out", "Connection closed", "Connection reset")):
                raise
            raise RuntimeError(
                f"process {self.rank}: a collective failed ({text.splitlines()[0][:200]}): another process died "
                f"or hung for more than collective_timeout_s={self.cfg.collective_timeout_s}; see its log"
            ) from e

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

    def evaluate(self, step: int | None = None) -> dict[str, float]:
        """The recipe's metrics on held-out data, each process scoring its share; tracked at `step`."""
        models = self.recipe.models  # the modules inside the wrappers: no collective in evaluation
        # ZeRO 3 modules keep their gathering hooks even with whole weights, and those hooks must be
        # called alike on every process: there, each process scores all of the held-out data.
        partitioned = any(hasattr(p, "ds_id") for m in models.values() for p in m.parameters())
        rank, world = (0, 1) if partitioned else (self.rank, self.world_size)
        with contextlib.ExitStack() as full:
            full.enter_context(self._engine_precision())
            for m in models.values():
                full.enter_context(gathered(m))
                m.eval()
            parts = self.recipe.evaluate(models, rank, world)
            for m in models.values():
                m.train()
        totals = parts if partitioned else {k: self.accelerator.reduce(v, reduction="sum") for k, v in parts.items()}
        metrics = {k: float(v[0] / v[1]) for k, v in totals.items()}
        if step is not None:
            self.tracking.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
            for image in self.recipe.images():
                self.tracking.log_image(f"eval/{os.path.splitext(os.path.basename(image))[0]}", image, step=step)
        return metrics

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
        """Release the process group cleanly; gloo may abort or hang at exit otherwise."""
        release_process_group()

    # ------------------------------------------------------------------ set-up helpers

    def _make_run_dir(self) -> str:
        """One directory per run (never per process), named on the main process and shared."""
        name = [self.cfg.run_name or slurm_run_name(self.cfg.recipe)]
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
        self.say(
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
