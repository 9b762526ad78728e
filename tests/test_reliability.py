"""Reliability: one run per run directory, checkpoints that cannot be silently wrong, every stop
saves a checkpoint and says so in its exit status, and a full disk is named as such."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from disttrain.checkpoint import CheckpointError
from disttrain.preflight import resolve_config
from disttrain.trainer import Trainer
from tests.cases import RECIPES
from tests.launcher import REPO, accelerate, kill_when, launch

CLASSIFIER = [*RECIPES["classifier"], "classifier.num_train=40", "global_batch_size=16", "micro_batch_size=4"]
QUIET = ["progress_bar=false", "tracker=none"]


def train_py(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def status(run_dir) -> dict:
    return json.loads((run_dir / "status.json").read_text())


# --------------------------------------------------------------------------- one run per run directory


@pytest.mark.slow
def test_a_run_directory_in_use_is_refused_and_left_intact(tmp_path):
    args = [*CLASSIFIER, *QUIET, "steps=100000", "checkpoint_every=5", f"output_dir={tmp_path}", "run_name=shared"]
    first = subprocess.Popen(
        [sys.executable, "train.py", *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "shared" / "checkpoints" / "step-00000010").exists():
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()[0]
            time.sleep(0.05)
        # The first run is writing checkpoints: a second one may not delete, overwrite or mix them.
        second = train_py(*args, "seed=1")
        assert second.returncode == 2
        assert second.stderr.strip().splitlines() == [
            line for line in second.stderr.strip().splitlines() if line.startswith("run directory error: ")
        ]
        assert f"is in use by process {first.pid} on {socket.gethostname()}" in second.stderr
        first.send_signal(signal.SIGTERM)
        out, _ = first.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            first.kill()
    assert first.returncode == 3, out[-2000:]  # stopped and resumable
    assert "seed: 0" in (tmp_path / "shared" / "config.yaml").read_text(), "the refused run wrote nothing"
    assert status(tmp_path / "shared")["state"] == "stopped"
    assert not (tmp_path / "shared" / "run.lock").exists(), "the lock goes with its run"

    never = train_py(*args, "resume=never")
    assert never.returncode == 2 and "holds checkpoints of an earlier run and resume=never would mix" in never.stderr

    # A lock its process left behind (killed) is taken over, and the run says so.
    (tmp_path / "shared" / "run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": 2**22 + 1}))
    again = train_py(*[a for a in args if not a.startswith("steps=")], "steps=12", "resume=auto")
    assert f"took over the lock of process {2**22 + 1} on {socket.gethostname()}, which is gone" in again.stdout
    assert again.returncode == 2 and "checkpoint error" in again.stderr  # steps changed: refused, lock released
    assert not (tmp_path / "shared" / "run.lock").exists()


# --------------------------------------------------------------------------- checksums


def flip_a_bit(file) -> None:
    """One bit in the middle of the file: its size stays the same."""
    data = bytearray(file.read_bytes())
    data[len(data) * 2 // 3] ^= 0x40
    file.write_bytes(bytes(data))


@pytest.fixture
def checkpointed(tmp_path):
    args = [*CLASSIFIER, *QUIET, "steps=4", "checkpoint_every=2", f"output_dir={tmp_path}"]
    trainer = Trainer(resolve_config([*args, "run_name=run"], world_size=1))
    trainer.fit()
    trainer.close()
    return args, tmp_path / "run" / "checkpoints"


def resume_error(args, *more) -> str:
    with pytest.raises(CheckpointError) as e:
        Trainer(resolve_config([*args, *more], world_size=1))
    return str(e.value)


@pytest.mark.slow
@pytest.mark.parametrize("file", ["models/model.safetensors", "optimizers.pt"])
def test_a_flipped_bit_is_refused_naming_the_file(checkpointed, file):
    args, checkpoints = checkpointed
    flip_a_bit(checkpoints / "step-00000004" / file)
    message = resume_error(args, "run_name=other", f"resume={checkpoints / 'step-00000004'}")
    assert f"{file} does not match its recorded checksum" in message
    assert f"resume={checkpoints / 'step-00000002'}" in message


@pytest.mark.slow
def test_resume_auto_never_falls_back_silently(checkpointed):
    args, checkpoints = checkpointed
    flip_a_bit(checkpoints / "step-00000004" / "models" / "model.safetensors")
    message = resume_error(args, "run_name=run")
    assert message.endswith(
        f"the newest intact one is {checkpoints / 'step-00000002'}; continue from it with "
        f"resume={checkpoints / 'step-00000002'}"
    )
    assert status(checkpoints.parent)["state"] == "refused", "not the earlier attempt's finished"
    assert status(checkpoints.parent)["step"] == 4
    flip_a_bit(checkpoints / "step-00000002" / "trainer.pt")
    assert "no older checkpoint of this run is intact" in resume_error(args, "run_name=run")


@pytest.mark.slow
def test_following_the_damage_hint_resumes_before_the_later_checkpoints_and_ends_as_if_undamaged(checkpointed, capsys):
    args, checkpoints = checkpointed
    undamaged = load_file(checkpoints / "step-00000004" / "models" / "model.safetensors")
    flip_a_bit(checkpoints / "step-00000004" / "optimizers.pt")
    older = resume_error(args, "run_name=run").rsplit("resume=", 1)[1]
    assert older == str(checkpoints / "step-00000002")

    trainer = Trainer(resolve_config([*args, "run_name=run", f"resume={older}"], world_size=1))
    trainer.fit()  # writes step-00000004 again, where the damaged one was
    trainer.close()
    rewritten = load_file(checkpoints / "step-00000004" / "models" / "model.safetensors")
    assert rewritten.keys() == undamaged.keys()
    assert all(torch.equal(rewritten[k], undamaged[k]) for k in undamaged), "resumed exactly"
    (aside,) = checkpoints.glob("superseded-*")
    assert sorted(p.name for p in aside.iterdir()) == ["step-00000004"], "set aside, not deleted"
    assert f"moved them to {aside}" in capsys.readouterr().out

    # resume=auto now continues the branch just written, not the damaged one set aside.
    again = Trainer(resolve_config([*args, "run_name=run"], world_size=1))
    assert (again.resumed_from, again.start_step) == (str(checkpoints / "step-00000004"), 4)
    again.close()


# --------------------------------------------------------------------------- every stop saves

STOP_SHAPE = ["steps=300", "global_batch_size=16", "micro_batch_size=4", "log_every=50", *QUIET]
# dropout on: the resume must restore every process's random generator too
STOP_CASE = [*RECIPES["seq2seq"], "seq2seq.dropout=0.2", "seq2seq.num_train=40", "seq2seq.num_eval=8", *STOP_SHAPE]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict:
    runs = tmp_path_factory.mktemp("straight")
    launch(accelerate(), *STOP_CASE, f"output_dir={runs}", "run_name=straight")
    return load_file(runs / "straight" / "seq2seq.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sent", "caught"),
    [
        (signal.SIGINT, "SIGINT"),  # Ctrl-C: the launcher passes it to the ranks
        (signal.SIGHUP, "SIGHUP"),  # the terminal or SSH session went away
        (signal.SIGUSR1, "SIGTERM (the launcher ended)"),  # kills the launcher: the ranks hear of it
    ],
)
def test_a_signal_to_the_launcher_stops_with_a_checkpoint_and_resumes_exactly(tmp_path, straight, sent, caught):
    args = [*STOP_CASE, f"output_dir={tmp_path}", "run_name=stopped", "checkpoint_every=0"]
    started = tmp_path / "stopped" / "config.yaml"
    stopped = kill_when(accelerate(), *args, ready=started.exists, delay=1.0, sig=sent, timeout=120)
    run_dir = tmp_path / "stopped"
    assert f"on {caught}: checkpoint" in stopped.stdout, stopped.stdout[-3000:]
    assert status(run_dir)["state"] == "stopped"
    assert not (run_dir / "seq2seq.safetensors").exists(), "stopped before the end"

    resumed = launch(accelerate(), *args)
    assert "resuming from" in resumed.stdout and status(run_dir)["state"] == "finished"
    again = load_file(run_dir / "seq2seq.safetensors")
    assert straight.keys() == again.keys()
    for name, value in straight.items():
        assert torch.equal(value, again[name]), f"{name} differs after a stop on {caught}"


# --------------------------------------------------------------------------- disks


@contextlib.contextmanager
def tmpfs(path, *options: str):
    """A small file system of its own (root only), unmounted afterwards."""
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip() or 'not root'})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_full_disk_is_named_on_every_process(tmp_path):
    with tmpfs(tmp_path / "disk", "size=16k") as disk:
        args = [*CLASSIFIER, *QUIET, "steps=4", "checkpoint_every=1", f"output_dir={disk}", "run_name=full"]
        full = launch(accelerate(), *args, ok=False)
        out = full.stdout + full.stderr
        assert full.returncode != 0
        assert "process 0: checkpoint step-00000001 not written: no space left on device writing" in out, out[-3000:]
        assert "MiB free there" in out
        assert "process 1: checkpoint step-00000001 not written: process 0 failed: no space left on device" in out
        assert "another process died or hung" not in out and "Connection closed" not in out, out[-3000:]
        assert not list((disk / "full" / "checkpoints").iterdir()), "nothing half-written is left"
    with tmpfs(tmp_path / "readonly", "ro") as readonly:
        refused = train_py(*args, f"output_dir={readonly}")
        assert refused.returncode == 2
        assert refused.stderr.strip() == (
            f"config error: output_dir={readonly} is not writable by this user; choose another output_dir"
        )


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_disk_that_fails_mid_run_ends_it_in_one_line_with_nothing_partial_left(tmp_path):
    from disttrain.safe_files import write_bytes

    with tmpfs(tmp_path / "disk", "size=64m") as disk:
        args = [*CLASSIFIER, *QUIET, "steps=200", "checkpoint_every=100", f"output_dir={disk}", "run_name=ro"]
        run = subprocess.Popen(
            [sys.executable, "train.py", *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            deadline = time.monotonic() + 120
            while not (disk / "ro" / "config.yaml").exists():
                assert run.poll() is None and time.monotonic() < deadline, run.communicate()
                time.sleep(0.02)
            subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)  # training, not yet at step 100
            _, err = run.communicate(timeout=120)
        finally:
            with contextlib.suppress(ProcessLookupError):
                run.kill()
        # One process: no "process 0:" prefix; status.json cannot be written there, and is not a second error.
        assert run.returncode == 1 and err.strip().splitlines() == [
            f"checkpoint step-00000100 not written: Read-only file system writing {disk / 'ro' / 'checkpoints'}"
        ], err
    with tmpfs(tmp_path / "small", "size=16k") as small:  # the final weights on a disk that fills
        with pytest.raises(OSError) as e:
            write_bytes(str(small / "model.safetensors.tmp"), bytes(1 << 20))
        assert e.value.errno == errno.ENOSPC and not list(small.iterdir()), "no partial file left"


def test_a_second_signal_while_a_finished_run_releases_its_resources_keeps_its_status():
    ended = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os, signal, time\n"
            "from disttrain.preemption import teardown_signals\n"
            "with teardown_signals(3):\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    time.sleep(30)\n",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ended.returncode == 3 and ended.stdout == "SIGTERM while releasing the run's resources: exit status 3\n"
