"""Tracking: real Accelerators and the real wandb (offline) and TensorBoard, read back from their files."""

from __future__ import annotations

import logging
import os
import sys

import pytest
import torch
from accelerate import Accelerator

from disttrain.config import Config, ConfigError
from disttrain.preflight import resolve_config
from disttrain.recipes.gan.recipe import save_scatter
from disttrain.tracking import Tracking, accelerator_kwargs, has_wandb_api_key, log_with, wandb_mode
from tests.dist import run_distributed
from tests.tracking_files import tensorboard_events, wandb_runs

_WANDB_VARS = (
    "WANDB_MODE",
    "WANDB_API_KEY",
    "WANDB_IDENTITY_TOKEN_FILE",
    "WANDB_BASE_URL",
    "WANDB_DIR",
    "NETRC",
    "SLURM_JOB_ID",
    "SLURM_ARRAY_JOB_ID",
    "XDG_CONFIG_HOME",
    "XDG_CACHE_HOME",
    "XDG_DATA_HOME",
)


@pytest.fixture(autouse=True)
def clean_wandb_env(tmp_path, monkeypatch):
    """No key, no mode (conftest's `disabled` removed), and a HOME with no netrc or wandb settings."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in _WANDB_VARS:
        monkeypatch.delenv(var, raising=False)


def make_config(tmp_path, *overrides: str) -> Config:
    return resolve_config([f"output_dir={tmp_path / 'runs'}", *overrides], world_size=1)


def start(cfg: Config, run_dir: str, run_id: str | None = None) -> Tracking:
    """What the trainer does: the Accelerator built with tracking's arguments, then the run started."""
    accelerator = Accelerator(cpu=True, **accelerator_kwargs(cfg))
    os.makedirs(run_dir, exist_ok=True)
    return Tracking.start(cfg, accelerator, run_dir, run_id=run_id)


LOGGED = {"loss", "lr/encoder", "grad_norm/encoder", "samples_per_s", "eval/exact_match"}


def log_steps(tracking: Tracking, steps: range) -> None:
    """What the trainer logs: per optimizer step, and evaluation metrics every second step."""
    for step in steps:
        tracking.log(
            {"loss": 1.0 / step, "lr/encoder": 1e-3, "grad_norm/encoder": torch.tensor(0.5), "samples_per_s": 64.0},
            step=step,
        )
        if step % 2 == 0:
            tracking.log({"eval/exact_match": step / 10}, step=step)


def scatter_png(path: str) -> str:
    return save_scatter(torch.randn(200, 2), torch.randn(200, 2), path)


def test_offline_wandb_run_holds_metrics_per_step_config_and_image(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("SLURM_JOB_ID", "4243")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "4242")  # an array's tasks share one group
    cfg = make_config(tmp_path, "wandb.mode=offline", "wandb.tags=[baseline,zero2]", "wandb.notes=first try")
    run_dir = str(tmp_path / "runs" / "seq2seq-1")
    with caplog.at_level(logging.WARNING), start(cfg, run_dir) as tracking:
        log_steps(tracking, range(1, 5))
        tracking.log_image("samples", scatter_png(str(tmp_path / "samples.png")), step=4)
    assert not caplog.records  # the mode was chosen: no line

    [run] = wandb_runs(run_dir)
    assert run.run_id == tracking.run_id and run.exit_code == 0 and not run.resumed
    assert (run.project, run.name, run.group) == ("disttrain", "seq2seq-1", "4242")
    assert (run.tags, run.notes) == (["baseline", "zero2"], "first try")
    assert set(run.history) == LOGGED | {"samples"}
    assert run.steps("loss") == run.steps("grad_norm/encoder") == [1, 2, 3, 4]
    assert run.steps("eval/exact_match") == [2, 4] and run.steps("samples") == [4]
    assert run.history["loss"][4] == 0.25 and run.history["grad_norm/encoder"][1] == 0.5
    assert run.history["eval/exact_match"][4] == pytest.approx(0.4)
    assert run.config["global_batch_size"] == cfg.global_batch_size
    assert run.config["seq2seq"]["encoder"]["lr"] == cfg.seq2seq.encoder.lr  # the nested config, resolved
    image = run.history["samples"][4]
    assert image["_type"] == "image-file" and image["format"] == "png"
    assert os.path.isfile(os.path.join(os.path.dirname(run.path), "files", image["path"]))


def test_a_resumed_run_continues_the_same_wandb_run(tmp_path):
    cfg = make_config(tmp_path, "wandb.mode=offline", "wandb.group=ablation")
    run_dir = str(tmp_path / "runs" / "requeued")
    with pytest.raises(RuntimeError, match="preempted"), start(cfg, run_dir) as first:
        log_steps(first, range(1, 4))
        raise RuntimeError("preempted")
    stored = first.run_id  # what a checkpoint keeps
    with start(cfg, run_dir, run_id=stored) as resumed:
        log_steps(resumed, range(4, 6))
    assert resumed.run_id == stored

    before, after = wandb_runs(run_dir)  # one file per start, both of one run
    assert before.run_id == after.run_id == stored
    assert (before.resumed, after.resumed) == (False, True)
    assert (before.exit_code, after.exit_code) == (1, 0)  # the crash is marked failed
    assert before.steps("loss") == [1, 2, 3] and after.steps("loss") == [4, 5]
    assert (after.name, after.group) == ("requeued", "ablation") and after.config["wandb"]["mode"] == "offline"


def test_no_api_key_and_no_mode_runs_offline_with_one_line(tmp_path, caplog):
    cfg = make_config(tmp_path)  # tracker=wandb is the default
    assert wandb_mode(cfg) == ("offline", "no API key")
    run_dir = str(tmp_path / "runs" / "nokey")
    with caplog.at_level(logging.WARNING), start(cfg, run_dir) as tracking:
        tracking.log({"loss": 1.0}, step=1)
    lines = [r.getMessage() for r in caplog.records if r.name == "disttrain"]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert "no API key" in lines[0] and f"wandb sync {run_dir}/wandb/offline-run-*" in lines[0]
    [run] = wandb_runs(run_dir)
    assert run.steps("loss") == [1] and run.exit_code == 0


def test_mode_follows_config_then_env_then_key(tmp_path, monkeypatch):
    cfg = make_config(tmp_path)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    (tmp_path / "netrc").write_text("machine example.com login user password other\n")
    assert wandb_mode(cfg) == ("offline", "no API key")
    (tmp_path / "netrc").write_text(f"machine api.wandb.ai login user password {'a' * 40}\n")
    assert wandb_mode(cfg) == ("online", "API key")
    monkeypatch.delenv("NETRC")
    (tmp_path / "home" / ".netrc").write_text(f"machine api.wandb.ai login user password {'b' * 40}\n")
    assert has_wandb_api_key()
    # wandb's own reader finds the same entry (skipped where that internal module moved)
    wbauth = pytest.importorskip("wandb.sdk.lib.wbauth")
    assert wbauth.read_netrc_auth(host="https://api.wandb.ai") == "b" * 40
    os.remove(tmp_path / "home" / ".netrc")
    monkeypatch.setenv("WANDB_API_KEY", "c" * 40)
    assert wandb_mode(cfg) == ("online", "API key")
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_mode(cfg) == ("offline", "WANDB_MODE")
    assert wandb_mode(make_config(tmp_path, "wandb.mode=disabled")) == ("disabled", "wandb.mode")


@pytest.mark.parametrize("overrides", [["tracker=none"], ["wandb.mode=disabled"]])
def test_no_tracking_creates_nothing(tmp_path, overrides):
    cfg = make_config(tmp_path, *overrides)
    assert log_with(cfg) is None
    run_dir = str(tmp_path / "runs" / "quiet")
    with start(cfg, run_dir) as tracking:
        tracking.log({"loss": 1.0}, step=1)
        tracking.log_image("samples", scatter_png(str(tmp_path / "samples.png")), step=1)
    assert tracking.run_id is None and tracking.accelerator.trackers == []
    assert os.listdir(run_dir) == []


def test_tensorboard_writes_scalars_and_image_under_the_run_directory(tmp_path):
    cfg = make_config(tmp_path, "tracker=tensorboard")
    run_dir = str(tmp_path / "runs" / "tb")
    with start(cfg, run_dir) as tracking:
        log_steps(tracking, range(1, 5))
        tracking.log_image("samples", scatter_png(str(tmp_path / "samples.png")), step=4)
    assert tracking.run_id is None
    scalars, images = tensorboard_events(os.path.join(run_dir, "tensorboard"))
    assert set(scalars) == LOGGED
    assert sorted(scalars["loss"]) == [1, 2, 3, 4] and sorted(scalars["eval/exact_match"]) == [2, 4]
    assert scalars["loss"][4] == pytest.approx(0.25) and scalars["grad_norm/encoder"][1] == pytest.approx(0.5)
    assert images == {"samples": [4]}


@pytest.mark.parametrize("tracker, packages", [("tensorboard", ["tensorboard", "tensorboardX"]), ("wandb", ["wandb"])])
def test_a_missing_tracker_package_is_one_line_naming_the_install(tmp_path, monkeypatch, tracker, packages):
    for name in packages:
        monkeypatch.setitem(sys.modules, name, None)  # what Python does for a package that cannot be imported
    # refused while the config is validated, before any process group or import of torch's stack
    install = "make install EXTRAS=tensorboard " if tracker == "tensorboard" else "make install "
    with pytest.raises(ConfigError, match=install) as error:
        make_config(tmp_path, f"tracker={tracker}")
    assert "\n" not in str(error.value)


def test_an_accelerator_built_without_the_tracker_is_refused(tmp_path):
    cfg = make_config(tmp_path, "tracker=tensorboard")
    with pytest.raises(RuntimeError, match=r"accelerator_kwargs\(cfg\)"):
        Tracking.start(cfg, Accelerator(cpu=True), str(tmp_path))


def _two_process_run(output_dir: str, run_dir: str) -> str | None:
    cfg = resolve_config([f"output_dir={output_dir}", "wandb.mode=offline"], world_size=2)
    accelerator = Accelerator(cpu=True, **accelerator_kwargs(cfg))
    assert accelerator.num_processes == 2
    with Tracking.start(cfg, accelerator, run_dir) as tracking:
        tracking.log({"loss": float(accelerator.process_index)}, step=1)  # only rank 0's value arrives
    return tracking.run_id


def test_only_the_main_process_creates_a_run_and_all_know_its_id(tmp_path):
    run_dir = str(tmp_path / "runs" / "two")
    os.makedirs(run_dir)
    ids = run_distributed(_two_process_run, 2, str(tmp_path / "runs"), run_dir)
    [run] = wandb_runs(run_dir)
    assert ids == [run.run_id, run.run_id]
    assert run.history["loss"] == {1: 0.0}


def test_a_training_run_tracks_every_metric_and_a_stopped_run_resumes_it(tmp_path, monkeypatch):
    """Through the trainer: metrics per logged optimizer step, evaluation, and after a stop signal
    (as SLURM sends before the time limit) the resumed run continues the same W&B run."""
    import signal

    from disttrain.trainer import Trainer

    args = ["config=configs/debug.yaml", "steps=6", "log_every=2", "eval_every=4", "checkpoint_every=0",
            "wandb.mode=offline", "progress_bar=false", f"output_dir={tmp_path}", "run_name=run"]  # fmt: skip
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    first = Trainer(resolve_config(args, world_size=1))
    losses = first.recipe.losses

    def stop_at_step_3(models, batch):
        if step[0] == 2:
            os.kill(os.getpid(), signal.SIGUSR1)
        yield from losses(models, batch)

    step = [0]
    train_step = first.train_step
    first.train_step = lambda s, *batches: (step.__setitem__(0, s), train_step(s, *batches))[1]
    first.recipe.losses = stop_at_step_3
    assert first.fit() == {} and first.stop_reason == "SIGUSR1"
    assert os.path.isdir(tmp_path / "run" / "checkpoints" / "step-00000003")

    resumed = Trainer(resolve_config(args, world_size=1))
    assert resumed.start_step == 3 and resumed.tracker_run_id == first.tracker_run_id
    resumed.fit()

    before, after = wandb_runs(str(tmp_path / "run"))
    assert before.run_id == after.run_id == first.tracker_run_id and after.resumed
    per_step = ["loss", "samples_per_s", "tokens_per_s", "step_time_s", "lr/encoder", "lr/decoder",
                "grad_norm/encoder", "grad_norm/decoder"]  # fmt: skip
    for name in per_step:
        assert before.steps(name) == [2] and after.steps(name) == [4, 6], name
    assert after.steps("eval/exact_match") == [4, 6]
    assert after.config["global_batch_size"] == 16


def test_the_logged_learning_rate_is_the_one_each_step_used(tmp_path):
    """A schedule steps after its update: read at the log, it is the next step's rate (a one-step
    cosine run logged 0 though its update used the peak)."""
    from disttrain.trainer import Trainer

    args = ["config=configs/debug.yaml", "steps=3", "log_every=1", "checkpoint_every=0", "tracker=none"]
    trainer = Trainer(resolve_config([*args, "progress_bar=false", f"output_dir={tmp_path}"], world_size=1))
    used: dict[int, float] = {}
    for g in trainer.groups:
        step = g.optimizer.step

        def recording(*a, step=step, g=g, **k):
            used.setdefault(len(used) + 1, g.optimizer.param_groups[0]["lr"])
            return step(*a, **k)

        g.optimizer.step = recording
        break  # the encoder's optimizer
    logged: dict[int, float] = {}
    log = trainer._log
    trainer._log = lambda step, report: (logged.__setitem__(step, report["lr/encoder"]), log(step, report))
    trainer.fit()
    assert logged == used and len(set(used.values())) == 3, (logged, used)
