"""The training loop: windows of micro-batches in, exact optimizer steps out. Reads top to bottom.

`fit` is the run: train step, metrics, evaluation if due, checkpoint if due, stop if asked.
`train_step` is one optimizer step: for each phase of the recipe, the accumulation window
(`backward_window`) then the update (`optimizer_step`). The parts it composes live in their own
modules: the engine (engines/), the accumulation core, checkpoints, metrics, stopping and SLURM,
the run directory and the printed summaries.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
import uuid
from collections.abc import Iterable, Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import send_to_device, set_seed
from torch import nn
from tqdm.auto import tqdm

from disttrain.accumulation import MicroBatch, UpdateResult, WindowResult, accumulate_window
from disttrain.background_checkpoint import BackgroundWriter
from disttrain.checkpoint import (
    DISK_ERRNOS,
    CheckpointDamaged,
    CheckpointWriteError,
    complete_checkpoints,
    damaged_hint,
    disk_error,
    load_checkpoint,
    remove_unpublished,
    save_checkpoint,
    set_aside_later,
    stage_checkpoint,
)
from disttrain.config import Config, ConfigError, exit_with_config_error, is_main_launch_process
from disttrain.data.loader import Loaded, plan_loader
from disttrain.data.windows import WindowSampler
from disttrain.data.workers import DataLoaderFailed, forked_accounts, loading
from disttrain.engines import build_engine
from disttrain.engines.base import Engine
from disttrain.metrics import Meter, PhaseResult, StepResult, learning_rates
from disttrain.preemption import (
    EXIT_FAILED,
    EXIT_FINISHED,
    EXIT_REFUSED,
    EXIT_STOPPED,
    how_to_continue,
    stop_reason,
    stop_signals_caught,
    stop_with_the_launcher,
    teardown_signals,
)
from disttrain.recipe import Phase, Recipe, build_recipe
from disttrain.resilience.progress import (
    CHECKPOINT,
    COUNTS,
    DATA,
    EVALUATION,
    EXPORT,
    FORWARD,
    OPTIMIZER,
    STARTUP,
    STEP_END,
    Progress,
)
from disttrain.resilience.watchdog import CollectiveFailure, Limits, Watchdog, exit_after
from disttrain.restarts import attempt_words, restart_count
from disttrain.run_status import read_status, stalled_at, write_status
from disttrain.rundir import RunDirError, make_run_dir, release_lock, write_run_config
from disttrain.safe_files import CheckpointError
from disttrain.speed.activation_checkpointing import checkpoint_blocks
from disttrain.speed.compiling import Compilation, compile_models, compiled_graphs
from disttrain.speed.flops import counting_flops, device_peak_flops
from disttrain.speed.profiling import profiled
from disttrain.summary import compile_line, final_line, speed_lines, startup_line, warn_batchnorm
from disttrain.tracking import Tracking
from disttrain.weights import write_weights


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


def average_running_stats(models: Iterable[nn.Module], engine: Engine) -> None:
    """Average the running statistics of normalisation layers (BatchNorm, InstanceNorm tracking them)
    over the processes, in place; a collective when there are any. Each process updates its own from
    its own micro-batches, while the weights file holds one process's: averaged, the evaluated, the
    checkpointed and the exported model are one and the same (timm's `distribute_bn`, reduce=True)."""
    if engine.world_size == 1:
        return
    seen: dict[int, torch.Tensor] = {}  # each tensor once: the exported models are mostly the trained ones
    for model in models:
        for m in model.modules():
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
                for stat in (m.running_mean, m.running_var):  # None unless track_running_stats
                    if stat is not None:
                        seen[id(stat)] = stat
    if not seen:
        return
    stats = list(seen.values())
    # Summed in float64: float32 statistics already equal on every process come back exactly, so
    # averaging again (evaluation right after a checkpoint) changes nothing.
    flat = torch.cat([s.detach().reshape(-1).to(engine.device, torch.float64) for s in stats])
    mean = engine.reduce_sum(flat) / engine.world_size
    with torch.no_grad():
        for stat, value in zip(stats, mean.split([s.numel() for s in stats]), strict=True):
            stat.copy_(value.view_as(stat))


class Trainer:
    def __init__(self, cfg: Config, recipe: Recipe | None = None):
        """Build recipe, engine and run directory, and resume. A built `recipe` may be passed (tests do).

        `cfg` comes from `disttrain.preflight.resolve_config` and is not changed here.
        """
        self.cfg = cfg
        self.bar: tqdm | None = None  # the main process's progress bar, while fit() runs
        self.progress = Progress()  # where this process is: the watchdog reads it
        self.watchdog: Watchdog | None = None  # while fit() runs
        set_seed(cfg.seed)  # identical initialisation on every process
        self.recipe = recipe or build_recipe(cfg)
        self.recipe.seed = cfg.seed
        self.recipe.check_data()
        self.engine = build_engine(cfg, self.recipe.find_unused_parameters)
        self.rank, self.world_size = self.engine.rank, self.engine.world_size
        self.accumulation = cfg.accumulation_steps(self.world_size)
        warn_batchnorm(self.recipe.models, cfg, self.world_size, self.accumulation)
        if cfg.sync_batchnorm and self.world_size > 1:
            self.recipe.models = {k: nn.SyncBatchNorm.convert_sync_batchnorm(m) for k, m in self.recipe.models.items()}
        # Blocks are checkpointed before the engine wraps them, models compiled after (speed/).
        self.checkpointed_blocks = self._checkpoint_activations()
        self.engine.block_classes = self.recipe.shard_blocks
        self.engine.wrap(self.recipe.models, self.recipe.groups)
        if cfg.compile:
            compile_models(self.recipe.models, cfg)
        self.models, self.groups = self.engine.models, self.engine.groups
        self.sampler = WindowSampler(self.recipe.num_train, cfg.global_batch_size, cfg.micro_batch_size, cfg.seed)
        self.run_dir, taken_over = make_run_dir(cfg, self.engine)
        # What the attempt before left (main process): its stall, carried in the running status (SLURM
        # requeues once per step), and when it last recorded progress (what a restart cost).
        self.earlier_status = read_status(self.run_dir) if self.engine.is_main_process else {}
        self.earlier_stall = stalled_at(self.earlier_status)
        self.board_key = self.engine.share_from_main(uuid.uuid4().hex[:16])  # this run's keys in the job's store
        self.background = (
            BackgroundWriter(
                self.engine,
                cfg.keep_checkpoints,
                cfg.collective_timeout_s,
                (cfg.debug.slow_write_at, cfg.debug.slow_write_s),
            )
            if cfg.checkpoint_async
            else None
        )
        if taken_over:
            self.say(taken_over)
        self.recipe.run_dir, self.recipe.main_process = self.run_dir, self.engine.is_main_process
        self.recipe.full_weights = self.engine.full_weights
        self.recipe.input_gradient_forward = self.engine.input_gradient_forward
        self.overflow_steps = 0  # fp16 steps skipped on overflow (the loss scale was too high)
        self.nonfinite_steps = 0  # updates skipped on a NaN/inf gradient (on_nonfinite=skip)
        self.tracker_run_id: str | None = None
        self.start_step = 0
        self.step = 0  # optimizer steps done
        self.stopped = False  # a stop signal ended the run early, with a checkpoint
        self.stop_reason: str | None = None  # the signal, on the process that caught it
        # A group that `accelerate launch --max_restarts` started again: when its failed attempt last
        # recorded progress (status.json), to say how much time the failure cost.
        self.restarted_after: float | None = None
        try:
            self.resumed_from = self._resume()
        except BaseException as e:
            if self.engine.is_main_process:  # not the earlier run's `finished`: this attempt's outcome
                with contextlib.suppress(OSError):
                    write_status(self.run_dir, "refused", self.earlier_status.get("step", 0), f"{e}")
                release_lock(self.run_dir)  # a refused resume leaves the directory to the next run
            raise
        self.step = self.start_step
        write_run_config(self.run_dir, cfg, self.engine)
        self.tracking = Tracking.start(cfg, self.engine.accelerator, self.run_dir, run_id=self.tracker_run_id)
        self.tracker_run_id = self.tracking.run_id  # kept in checkpoints: a resumed run continues it

    @property
    def accelerator(self) -> Accelerator:
        return self.engine.accelerator

    # ------------------------------------------------------------------ one optimizer step

    def train_step(self, step: int, batches: Iterator[Loaded] | None = None) -> StepResult:
        """One optimizer step; its micro-batches come from `batches` (the run's DataLoader), in plan
        order, or are loaded here when none is given."""
        results, samples, waited = [], 0, 0.0
        for i, phase in enumerate(self.recipe.phases(step)):
            plans = self.sampler.window(phase.data_step, self.rank, self.world_size)
            self.progress.window(step, i, len(plans))
            if batches is None:
                loaded = [self._make_batch(phase, p, k) for k, p in enumerate(plans)]
            else:
                started = time.perf_counter()
                loaded = [self._next_batch(batches, step, i, k) for k in range(len(plans))]
                waited += time.perf_counter() - started
            micro_batches = [MicroBatch(b, p.stand_in) for b, p in zip(loaded, plans, strict=True)]
            window = self.backward_window(phase, micro_batches)
            update = self.optimizer_step(phase, window)
            results.append(PhaseResult(phase.name, phase.terms, window, update))
            samples += len(self.sampler.global_batch(phase.data_step))
            if update.nonfinite and self.cfg.on_nonfinite == "stop":
                return StepResult(results, samples, waited, halted=True, untouched=i == 0)
        return StepResult(results, samples, waited)

    def _make_batch(self, phase: Phase, plan: object, micro: int) -> object:
        self.progress.at(DATA, micro)
        return phase.make_batch(plan)

    def _next_batch(self, batches: Iterator[Loaded], step: int, phase: int, micro: int) -> object:
        self.progress.at(DATA, micro)
        loaded = next(batches)
        if (loaded.request.step, loaded.request.phase) != (step, phase):  # the walk and the loop disagree
            raise RuntimeError(f"step {step} phase {phase} got the micro-batch planned for {loaded.request}")
        return loaded.batch

    def backward_window(self, phase: Phase, micro_batches: list[MicroBatch] | None = None) -> WindowResult:
        """Forward and backward this process's micro-batches of `phase`; its gradients are then exact."""
        if micro_batches is None:
            plans = self.sampler.window(phase.data_step, self.rank, self.world_size)
            micro_batches = [MicroBatch(phase.make_batch(p), p.stand_in) for p in plans]
        micro_batches = [MicroBatch(send_to_device(mb.batch, self.engine.device), mb.stand_in) for mb in micro_batches]
        self.progress.at(COUNTS)
        with frozen(phase.frozen), self.engine.precision():
            window = accumulate_window(
                self.engine,
                [self.models[name] for name in phase.models],
                micro_batches,
                phase.terms,
                phase.item_counts,
                lambda batch: self._losses(phase, batch),
                self._forward,
            )
        self._check_no_stray_gradients(phase)
        return window

    def _forward(self, micro: int) -> None:
        self.progress.at(FORWARD, micro)

    def _losses(self, phase: Phase, batch: object) -> Iterator[tuple[str, torch.Tensor]]:
        """The recipe's losses of a micro-batch; each one's backward follows it (watchdog's progress)."""
        for term, loss in phase.losses(self.models, batch):
            self.progress.backward()
            yield term, loss

    def optimizer_step(self, phase: Phase, window: WindowResult | None = None) -> UpdateResult:
        """Update the phase's models unless the window's gradient is not finite."""
        self.progress.at(OPTIMIZER)
        update = self.engine.update(phase.models, phase.groups, window)
        self.overflow_steps += update.skipped
        self.nonfinite_steps += update.nonfinite
        if update.nonfinite:
            self.say(f"phase '{phase.name}': non-finite loss or gradient, update skipped ({self.cfg.on_nonfinite})")
        if phase.after_update is not None and not (update.skipped or update.nonfinite):
            phase.after_update()
        return update

    def _measured_step(self, step: int, batches: Iterator[Loaded], meter: Meter) -> StepResult:
        """One optimizer step. The run's first counts the model FLOPs (once: for FLOP/s and MFU), and
        runs eagerly to do so: Dynamo does not compile under the counting mode, and would never try that
        code again. A step that compiles says what it cost (the first compiled one, a recompilation)."""
        compilation = Compilation().start() if self.cfg.compile else None
        if step != self.start_step:
            result = self.train_step(step, batches)
        else:
            eager = torch.compiler.set_stance("force_eager") if self.cfg.compile else contextlib.nullcontext()
            with eager, counting_flops() as counted:
                result = self.train_step(step, batches)
            local = torch.tensor([float(counted.total)], dtype=torch.float64, device=self.engine.device)
            meter.flops_per_sample = float(self.engine.reduce_sum(local)[0]) / max(result.samples, 1)
            peak = device_peak_flops(self.engine.device)
            meter.peak_flops = peak * self.world_size if peak else None
        if compilation is not None and compilation.stop().graphs:
            self.say(compile_line(step + 1, compilation.graphs, compilation.seconds, compilation.wall_seconds))
        return result

    def _checkpoint_activations(self) -> int:
        cfg = self.cfg
        if not cfg.activation_checkpointing:
            return 0
        if not self.recipe.shard_blocks:
            raise ConfigError(
                f"activation_checkpointing=true: recipe {cfg.recipe} names no blocks (Recipe.shard_blocks, e.g. its "
                "Transformer layer classes) to checkpoint; name them in the recipe, or set activation_checkpointing=false"
            )
        blocks = checkpoint_blocks(self.recipe.models, self.recipe.shard_blocks, cfg.activation_checkpointing_every)
        if not blocks:
            raise ConfigError(
                f"activation_checkpointing_every={cfg.activation_checkpointing_every} exceeds the number of blocks "
                "of every model: nothing would be checkpointed; lower it"
            )
        return blocks

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
        cfg = self.cfg
        epochs = self.recipe.data_steps(cfg.steps) / self.sampler.steps_per_epoch
        self.progress.window(self.start_step, 0, 0)  # start-up, before the first step this run trains
        self.say(startup_line(cfg, self.world_size, self.accumulation, self.groups, epochs, self.run_dir))
        for line in speed_lines(cfg, self.checkpointed_blocks, self.run_dir):
            self.say(line)
        self.bar = tqdm(
            total=cfg.steps,
            initial=self.start_step,
            disable=not (self.engine.is_main_process and cfg.progress_bar),
            dynamic_ncols=True,
        )
        meter, start = Meter(self.engine.reduce_sum, self.world_size, self.engine.device), time.perf_counter()
        with (
            self.watched() as watchdog,
            stop_signals_caught(self._stop_requested, watchdog.signal_fd, watchdog.main_thread_stops),
            self._collective_failures_explained(),
            self._tracking_closed(),
            self.bar,
            self._micro_batches() as batches,
            self._profiled() as profiler,
        ):
            for step in range(self.start_step, cfg.steps):
                if cfg.debug.fail_at_step == step + 1:
                    self._rehearsed_failure(step + 1)
                logged = (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps
                rates = learning_rates(self.groups) if logged else {}  # those this step's updates use
                result = self._measured_step(step, batches, meter)  # train_step, FLOPs counted once
                profiler.step()
                self.progress.at(STEP_END)
                if result.halted:
                    self._halt_on_nonfinite(step, result)
                done = self.step = step + 1
                if self.restarted_after is not None:
                    self._restart_cost(done)
                meter.add(result)
                self.bar.update(1)
                if logged:
                    self._log(done, meter.report(rates, result))
                if cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.steps:
                    metrics = self.evaluate(step=done)
                    self.say(f"step {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
                saved = None
                if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done != cfg.steps:
                    saved = self.save_checkpoint(done, background=cfg.checkpoint_async)
                self.progress.at(STEP_END)
                if self.accelerator.check_trigger():  # a process caught a stop signal: all stop here
                    self.stopped = True
                    watchdog.boundary_reached()
                    self.checkpoint_written()  # this step's, or an earlier one still in flight
                    self._stop_on_signal(done, saved or self.save_checkpoint(done))
                    return {}
            train_time = time.perf_counter() - start
            watchdog.boundary_reached()
            self.bar.close()
            if self.start_step < cfg.steps:
                self.save_checkpoint(cfg.steps)
            metrics = self.evaluate(step=cfg.steps)
            weights = self.save_weights() if cfg.save_weights else []
            losses = meter.final_losses()
            data_wait_share = meter.run_data_wait / max(train_time, 1e-9)
            if self.engine.is_main_process:
                write_status(self.run_dir, "finished", cfg.steps)
        self.say(
            final_line(
                cfg.steps - self.start_step,
                train_time,
                self.start_step if self.resumed_from else None,
                losses,
                self.recipe.summary(metrics),
                self.overflow_steps,
                self.nonfinite_steps,
                data_wait_share,
                f"weights in {', '.join(weights)}" if weights else f"run directory {self.run_dir}",
                meter.run_throughput(train_time),
            )
        )
        if cfg.compile:
            self.say(f"compile: {compiled_graphs()} graph(s) compiled in this process, evaluation included")
        return metrics

    def _profiled(self) -> contextlib.AbstractContextManager:
        cfg = self.cfg
        enabled = cfg.profile and (self.engine.is_main_process or cfg.profile_all_processes)
        return profiled(enabled, cfg.profile_start, cfg.profile_steps, self.run_dir, self.rank)

    @contextlib.contextmanager
    def watched(self) -> Iterator[Watchdog]:
        """fit() under the watchdog (disttrain.resilience.watchdog): a process that stops making
        progress ends with a report instead of waiting forever. bench/loop.py runs steps under it."""
        cfg = self.cfg
        self.progress.at(STARTUP)  # the watch starts now, not when the trainer was built
        self.watchdog = Watchdog(
            Limits(cfg.stall_timeout_s, cfg.data_timeout_s, cfg.stop_grace_s),
            self.progress,
            self.rank,
            self.world_size,
            cfg.steps,
            self.run_dir,
            self.board_key,
        )
        try:
            with self.watchdog.running():
                yield self.watchdog
        finally:
            self.watchdog = None

    @contextlib.contextmanager
    def _micro_batches(self) -> Iterator[Iterator[Loaded]]:
        """The run's micro-batches from here to the last step, loaded ahead by the DataLoader's workers;
        the workers end with the block. A worker that dies fails it, named with what it said."""
        data = self.cfg.data
        accounts = forked_accounts(data.num_workers)
        loader = plan_loader(
            self.recipe.phases,
            self.sampler,
            self.start_step,
            self.cfg.steps,
            self.rank,
            self.world_size,
            data.num_workers,
            data.prefetch_factor,
            data.pin_memory,
            self.accumulation * len(self.recipe.phases(self.start_step)),
            accounts,
        )
        with loading(loader, accounts) as workers:
            if self.watchdog is not None:
                self.watchdog.workers = workers
            try:
                yield workers.iterator
            finally:
                if self.watchdog is not None:
                    self.watchdog.workers = None

    def say(self, line: str) -> None:
        """One line from the whole run, on the global main process (Accelerate's print is per node),
        written above the progress bar rather than onto it."""
        if not self.engine.is_main_process:
            return
        if self.bar is not None and not self.bar.disable:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def _log(self, step: int, report: dict[str, float]) -> None:
        headline = next(iter(report))
        assert self.bar is not None
        self.bar.set_postfix(
            {headline: f"{report[headline]:.4f}", "samples/s": f"{report['samples_per_s']:.0f}"}, refresh=False
        )
        self.say(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in report.items()))
        if self.engine.is_main_process:  # the progress a restart measures its cost from
            with contextlib.suppress(OSError):
                carried = {} if self.earlier_stall is None else {"stalled_at": self.earlier_stall}
                write_status(self.run_dir, "running", step, **carried)
        self.tracking.log(
            {**report, "overflow_steps": self.overflow_steps, "nonfinite_steps": self.nonfinite_steps}, step=step
        )
        if self.cfg.compile:  # a recompilation mid-run shows here (a new shape, a graph break)
            self.tracking.log({"compiled_graphs": compiled_graphs()}, step=step)

    # ------------------------------------------------------------------ checkpoints and stopping

    def state_dict(self, step: int) -> dict:
        """The trainer's own state after `step` optimizer steps (models and optimizers are the engine's)."""
        scaler = self.accelerator.scaler
        return {
            "step": step,
            "overflow_steps": self.overflow_steps,
            "nonfinite_steps": self.nonfinite_steps,
            "schedulers": {g.name: g.scheduler.state_dict() for g in self.groups},
            "scaler": scaler.state_dict() if scaler is not None else None,
            "tracker_run_id": self.tracker_run_id,
        }

    def load_state_dict(self, state: dict) -> None:
        self.start_step = state["step"]
        self.overflow_steps, self.nonfinite_steps = state["overflow_steps"], state["nonfinite_steps"]
        self.tracker_run_id = state["tracker_run_id"]
        for g in self.groups:
            g.scheduler.load_state_dict(state["schedulers"][g.name])
            # The schedule's current value, also where an engine restored its own copy of the groups.
            for group, lr in zip(g.optimizer.param_groups, g.scheduler.get_last_lr(), strict=True):
                group["lr"] = lr
        if self.accelerator.scaler is not None and state.get("scaler"):
            self.accelerator.scaler.load_state_dict(state["scaler"])

    def _average_running_stats(self) -> None:
        # Only at evaluation, checkpoints and export: every process reaches them together, and a
        # resumed run averages at the same steps as a straight one, so resuming stays bit-identical.
        average_running_stats([*self.recipe.models.values(), *self.recipe.exported_models().values()], self.engine)

    def save_checkpoint(self, step: int, background: bool = False) -> str:
        """The checkpoint after `step`, published; with `background` (checkpoint_async) its path, while
        a thread writes it. Either waits for the checkpoint in flight first."""
        self.progress.at(CHECKPOINT)
        self.checkpoint_written()
        self._average_running_stats()
        models, state = self.recipe.exported_models(), self.state_dict(step)
        if not background:
            return save_checkpoint(self.run_dir, step, self.engine, models, state, self.cfg)
        assert self.background is not None
        staged = stage_checkpoint(self.run_dir, step, self.engine, models, state, self.cfg, True, self.background.group)
        return self.background.start(staged)

    def checkpoint_written(self) -> str | None:
        """The checkpoint written in the background, once published (None if none is in flight)."""
        if self.background is None:
            return None
        self.progress.at(CHECKPOINT)
        return self.background.wait()

    def _resume(self) -> str | None:
        """Load the checkpoint `resume` names (auto: the run directory's newest complete one)."""
        cfg = self.cfg
        resume = cfg.resume
        if restart_count():
            # A restart continues this run whatever `resume` says: from its own newest checkpoint, or
            # from where its first attempt started when it wrote none.
            self.restarted_after = self.engine.share_from_main(self.earlier_status.get("time", time.time()))
            own = complete_checkpoints(self.run_dir)
            resume = "auto" if own or resume == "never" else resume
            if not own and resume == "auto":
                self.say(f"{attempt_words()}: the failed attempt wrote no checkpoint, starting again from step 0")
        if resume == "never":
            return None
        if self.engine.is_main_process:
            remove_unpublished(self.run_dir)  # what a killed run left half-written
        self.engine.wait_for_everyone()
        if resume == "auto":
            found = complete_checkpoints(self.run_dir)
            if not found:
                return None
            path = found[-1]
        else:
            path = resume
        try:
            restored = load_checkpoint(path, self.engine, self.recipe.exported_models(), cfg)
        except CheckpointDamaged as e:
            raise CheckpointDamaged(f"{e}; {damaged_hint(path, self.engine, resume == 'auto')}") from e
        self.load_state_dict(restored.state)
        if restored.note:
            self.say(restored.note)
        aside = set_aside_later(self.run_dir, path, self.start_step) if self.engine.is_main_process else None
        if aside:
            later = ", ".join(sorted(os.listdir(aside)))
            self.say(
                f"resuming before the run's later checkpoints ({later}): moved them to {aside}, to write them anew"
            )
        attempt = f"{attempt_words()}: " if restart_count() else ""
        self.say(f"{attempt}resuming from {path} at step {self.start_step} of {cfg.steps}")
        return path

    def _restart_cost(self, step: int) -> None:
        """Once, at the first step a restarted group finishes: the time from the failed attempt's last
        recorded progress (its last log line, or its own report of the failure) to this step."""
        lost = time.time() - (self.restarted_after or time.time())
        self.restarted_after = None
        self.say(f"{attempt_words()}: step {step} done {lost:.1f}s after the failed attempt's last recorded progress")
        self.tracking.log({"restarts": restart_count(), "restart_time_lost_s": lost}, step=step)

    def _rehearsed_failure(self, step: int) -> None:
        """debug.fail_at_step: this process fails as a real one would, on the attempt chosen."""
        debug = self.cfg.debug
        if self.rank != debug.fail_rank or restart_count() != debug.fail_attempt:
            return
        print(f"process {self.rank}: debug.fail_how={debug.fail_how} at step {step} (a rehearsed failure)", flush=True)
        if debug.fail_how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if debug.fail_how == "raise":
            raise RuntimeError(f"debug.fail_at_step={step}: a rehearsed failure on process {self.rank}")
        while True:  # hang: only the watchdog (stall_timeout_s) ends this process
            time.sleep(3600)

    def _stop_requested(self, reason: str) -> None:
        self.stop_reason = reason
        self.accelerator.set_trigger()

    def _stop_on_signal(self, step: int, checkpoint: str) -> None:
        """After the checkpoint, under SLURM, the main process requeues the job unless it was cancelled."""
        if not self.engine.is_main_process:
            return
        reason = stop_reason(self.stop_reason)
        write_status(self.run_dir, "stopped", step, f"{reason}; checkpoint {checkpoint}")
        after = how_to_continue(checkpoint, self.run_dir, reason)
        self.say(f"stopped at step {step} of {self.cfg.steps} on {reason}: checkpoint {checkpoint}; {after}")

    def _halt_on_nonfinite(self, step: int, result: StepResult) -> None:
        """on_nonfinite=stop: keep the state before the bad step where it is still intact, then stop."""
        phase = result.phases[-1].phase
        if result.untouched:
            saved = self.save_checkpoint(step)
        else:  # an earlier phase of this step already updated its model: not the state of any step
            self.checkpoint_written()
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
            raise CollectiveFailure(
                f"process {self.rank}: a collective failed ({text.splitlines()[0][:200]}): another process died "
                f"or hung for more than collective_timeout_s={self.cfg.collective_timeout_s}; see its log"
            ) from e

    # ------------------------------------------------------------------ evaluation and weights

    def evaluate(self, step: int | None = None) -> dict[str, float]:
        """The recipe's metrics on held-out data, each process scoring its share with the running
        statistics averaged over the processes first; tracked at `step`."""
        self.progress.at(EVALUATION)
        self._average_running_stats()
        models = self.recipe.models  # the modules inside the wrappers: no collective in evaluation
        rank, world = self.engine.evaluation_share(models)
        with contextlib.ExitStack() as full:
            full.enter_context(self.engine.precision())
            for m in models.values():
                full.enter_context(self.engine.full_weights(m))
                m.eval()
            parts = self.recipe.evaluate(models, rank, world)
            for m in models.values():
                m.train()
        totals = parts if world == 1 else {k: self.engine.reduce_sum(v) for k, v in parts.items()}
        metrics = {k: float(v[0] / v[1]) for k, v in totals.items()}
        if step is not None:
            self.tracking.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
            for image in self.recipe.images():
                self.tracking.log_image(f"eval/{os.path.splitext(os.path.basename(image))[0]}", image, step=step)
        return metrics

    def save_weights(self) -> list[str]:
        """Full weights of each exported model as `<run dir>/<name>.safetensors`."""
        self.progress.at(EXPORT)
        self.engine.wait_for_everyone()
        self._average_running_stats()
        models = self.recipe.exported_models()
        write_weights(models, self.run_dir, self.engine)
        paths = [os.path.join(self.run_dir, f"{name}.safetensors") for name in models]
        self.engine.wait_for_everyone()
        return paths

    def close(self, failed: bool = False) -> None:
        """Release the run directory, then the process group cleanly (gloo may abort or hang at exit
        otherwise). After a failure there is no last meeting: a process that died would turn it
        into a second error printed after the one that explains the failure."""
        if self.engine.is_main_process:
            with contextlib.suppress(OSError):  # a disk gone read-only: the next run takes the lock over
                release_lock(self.run_dir)
        self.engine.release(meet=not failed)


# After fit() the process only releases what it holds and exits, with the watchdog stopped. A hang
# there (gloo's destructor holding the GIL after a failed collective: docs/gloo-exit-hang.md) would
# keep it forever: faulthandler's timer thread, which needs no GIL, prints every thread's stack and
# ends the process with status 1 after this long.
TEARDOWN_S = 60


def run(cfg: Config) -> int:
    """train.py's run: build, fit, release. Returns the exit status (preemption.EXIT_*): a refused
    config, resume or run directory is one line on the main process, not a traceback per process."""
    stop_with_the_launcher()
    main = is_main_launch_process()
    try:
        trainer = Trainer(cfg)
    except ConfigError as e:
        exit_with_config_error(e)
    except (CheckpointError, RunDirError) as e:
        if main:
            kind = "checkpoint error" if isinstance(e, CheckpointError) else "run directory error"
            print(f"{kind}: {e}", file=sys.stderr)
        return EXIT_REFUSED
    try:
        trainer.fit()
    except BaseException as e:
        exit_after(TEARDOWN_S)
        if trainer.engine.is_main_process:
            with contextlib.suppress(OSError):  # the disk that failed may refuse this too: the first error tells
                write_status(trainer.run_dir, "failed", trainer.step, f"{type(e).__name__}: {e}")
        trainer.close(failed=True)
        if isinstance(e, KeyboardInterrupt):  # a second stop signal: one line, not a traceback
            if trainer.engine.is_main_process:
                print(f"stopped at step {trainer.step}: {e}", file=sys.stderr)
            return EXIT_FAILED
        who = f"process {trainer.rank}: " if trainer.world_size > 1 else ""
        # A checkpoint write's own reason (or whose), a worker's last words, a disk that failed:
        # one line says more than a traceback. Every process says it.
        if isinstance(e, (CheckpointWriteError, DataLoaderFailed)):
            print(f"{who}{e}", file=sys.stderr)
            return EXIT_FAILED
        if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
            print(
                f"{who}{disk_error(e, trainer.run_dir)}: the run ended at step {trainer.step}; once the disk takes "
                "writes again, resume=auto continues from the newest checkpoint",
                file=sys.stderr,
            )
            return EXIT_FAILED
        raise
    exit_after(TEARDOWN_S)
    with teardown_signals(EXIT_STOPPED if trainer.stopped else EXIT_FINISHED):
        trainer.close()
    return EXIT_STOPPED if trainer.stopped else EXIT_FINISHED
