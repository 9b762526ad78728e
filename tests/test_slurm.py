"""The sbatch scripts in slurm/ on a real two-node SLURM cluster (tests/slurm_cluster.py).

Two nodes train together to the weights of one process, with the DDP, a DeepSpeed and the FSDP2
config. A job that Slurm warns before its time limit (SIGUSR1) and then preempts (SIGTERM)
checkpoints, is requeued, resumes each time, and ends bit-identical to a job never stopped. The
scripts run unchanged, with the knobs a user sets on the sbatch line: CPU processes, one per (fake) GPU.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

if TYPE_CHECKING:
    from tests.slurm_cluster import SlurmCluster

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
# SGD keeps two runs that differ only in float32 rounding within rounding size (see test_launch.py).
SGD = [f"seq2seq.{part}.{key}" for part in ("encoder", "decoder") for key in ("name=sgd", "momentum=0.9", "lr=0.05")]
# Clipping off: DeepSpeed clips one norm per model, the DDP path one per optimizer.
NO_CLIP = ["seq2seq.encoder.clip_grad_norm=0", "seq2seq.decoder.clip_grad_norm=0"]
STEPS = 300  # enough that a signal sent at the first step, and the preemption after the resume, arrive long before the last (about 100 steps/s)
TRAIN = ("config=configs/debug.yaml", f"steps={STEPS}", "log_every=1", "progress_bar=false", *SGD, *NO_CLIP)
# The fake GPUs make a process each: one per node here, as a user sets the knobs on the sbatch line.
TWO_NODES = ("--nodes=2", "--gpus-per-node=1", "--cpus-per-task=1", "--time=10")
ONE_NODE_TWO_GPUS = ("--nodes=1", "--gpus-per-node=2", "--cpus-per-task=2", "--time=10")


@dataclass
class Job:
    id: int
    log: Path
    run_dir: Path
    info: dict[str, str]


def submit(
    cluster: SlurmCluster,
    script: str,
    sbatch_args: tuple[str, ...],
    workdir: Path,
    runs: Path,
    extra: tuple[str, ...] = (),
    **env: str,
) -> tuple[int, Path]:
    log = workdir / "job.out"
    job = cluster.submit(
        script,
        f"--output={log}",
        *sbatch_args,
        train_args=(*TRAIN, f"output_dir={runs}", *extra),
        TMPDIR=str(workdir),  # torch's launcher writes scratch files there
        **env,
    )
    return job, log


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "seq2seq.safetensors")


@pytest.fixture(scope="module")
def two_nodes(slurm_cluster: SlurmCluster, tmp_path_factory) -> tuple[dict[str, Job], Path]:
    """The multi-node script on both nodes, never interrupted, with the DDP, a DeepSpeed and the FSDP2
    config, and DDP once more where the process on the second node dies at step 120 and the job
    restarts its processes in place (MAX_RESTARTS=1); each node has two fake GPUs: the third job
    starts when one of the first two ends. Meanwhile one process with the same settings. Returns
    the jobs by name and the one process's run directory."""
    submitted = {}
    for engine, env, extra in (
        ("ddp", {}, ()),
        ("zero2", {"ACCELERATE_CONFIG": "configs/accelerate/deepspeed_zero2.yaml"}, ()),
        ("fsdp2", {"ACCELERATE_CONFIG": "configs/accelerate/fsdp2.yaml"}, ()),
        ("ddp_restarted", {"MAX_RESTARTS": "1"}, ("checkpoint_every=50", "debug.fail_at_step=120")),
    ):
        workdir = tmp_path_factory.mktemp(f"two_nodes_{engine}")
        # A space in an argument: it reaches train.py as one argument through sbatch, srun and the launcher.
        runs = workdir / "two nodes"
        job, log = submit(slurm_cluster, "slurm/multi_node.sbatch", TWO_NODES, workdir, runs, extra, **env)
        submitted[engine] = job, log, runs / f"seq2seq-{job}"
    workdir = tmp_path_factory.mktemp("one_process")
    one = subprocess.run(
        [sys.executable, "train.py", *TRAIN, f"output_dir={workdir}", "run_name=one"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},  # as torch's launcher sets it for ranks
    )
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    assert "1 process(es) x micro-batch 4 x accumulation 4 = global batch 16" in one.stdout
    jobs = {
        engine: Job(job, log, run_dir, slurm_cluster.wait(job, log))
        for engine, (job, log, run_dir) in submitted.items()
    }
    return jobs, workdir / "one"


@pytest.mark.parametrize("engine", ["ddp", "zero2", "fsdp2"])
def test_two_nodes_train_together_like_one_process(slurm_cluster: SlurmCluster, two_nodes, engine) -> None:
    jobs, one = two_nodes
    job = jobs[engine]
    log = job.log.read_text()
    assert job.info["JobState"] == "COMPLETED" and job.info["Restarts"] == "0", slurm_cluster.report(job.log)
    # SLURM_NODEID evaluated on each node: the first node is machine rank 0, the second rank 1.
    assert "(n1): machine rank 0 of 2" in log and "(n2): machine rank 1 of 2" in log, log
    assert "2 process(es) x micro-batch 4 x accumulation 2 = global batch 16" in log, log
    # One run directory for the whole job, named after it, none per node or per process.
    assert os.listdir(job.run_dir.parent) == [job.run_dir.name], log
    config = OmegaConf.load(job.run_dir / "config.yaml")
    # The run used the engine of the launcher's config.
    assert config.deepspeed_config == ("configs/deepspeed/zero2.json" if engine == "zero2" else ""), config
    assert config.fsdp.enabled == (engine == "fsdp2"), config

    two, single = weights(job.run_dir), weights(one)
    assert two.keys() == single.keys()
    for name in single:
        torch.testing.assert_close(two[name], single[name], rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_a_process_lost_on_one_node_restarts_the_job_in_place(slurm_cluster: SlurmCluster, two_nodes) -> None:
    jobs, _ = two_nodes
    job, straight = jobs["ddp_restarted"], jobs["ddp"]
    log = job.log.read_text()
    # Not requeued by SLURM: both nodes' launchers restarted their processes inside the job.
    assert job.info["JobState"] == "COMPLETED" and job.info["Restarts"] == "0", slurm_cluster.report(job.log)
    assert "process 1: debug.fail_how=kill at step 120" in log, log[-3000:]
    assert "restart 1 of 1: resuming from" in log and "step-00000100" in log, log[-3000:]
    status = json.loads((job.run_dir / "status.json").read_text())
    assert status["state"] == "finished" and status["restarts"] == 1, status
    restarted, never = weights(job.run_dir), weights(straight.run_dir)
    for name, value in never.items():
        assert torch.equal(restarted[name], value), name


def wait_for(cluster: SlurmCluster, job: int, log: Path, ready: Callable[[str], bool], what: str) -> None:
    """Poll the job's log until `ready(text)`; squeue now and then, to fail at once if the job ended."""
    deadline, checked = time.monotonic() + 300, time.monotonic()
    while not ready(log.read_text() if log.exists() else ""):
        if time.monotonic() - checked > 1:
            assert cluster.active(job) and time.monotonic() < deadline, f"job {job}: {what}\n{cluster.report(log)}"
            checked = time.monotonic()
        time.sleep(0.05)


def test_warned_and_preempted_job_resumes_as_if_never_stopped(
    slurm_cluster: SlurmCluster,
    two_nodes,
    tmp_path: Path,
) -> None:
    """The single-node script, two processes under one launcher, stopped twice: by the warning before
    the time limit (SIGUSR1), then by preemption from the high-priority partition (SIGTERM)."""
    job, log = submit(slurm_cluster, "slurm/single_node.sbatch", ONE_NODE_TWO_GPUS, tmp_path, tmp_path / "runs")
    wait_for(slurm_cluster, job, log, lambda text: "step 1:" in text, "never started training")
    # What `#SBATCH --signal=USR1@300` sends: SIGUSR1 to every process of the job's steps.
    slurm_cluster.command("scancel", "--signal=USR1", str(job))
    resumed_step = re.compile(r"^step \d+:", re.MULTILINE)
    wait_for(
        slurm_cluster, job, log, lambda text: resumed_step.search(text.partition("restart 1:")[2]), "never resumed"
    )
    # A job for every GPU of the cluster in the urgent partition: Slurm preempts this one and requeues it.
    urgent = slurm_cluster.command(
        "sbatch",
        "--parsable",
        "--partition=urgent",
        "--nodes=2",
        "--gpus-per-node=2",
        "--wrap=true",
        f"--output={tmp_path / 'urgent.out'}",
    )
    info = slurm_cluster.wait(job, log)
    text = log.read_text()

    assert slurm_cluster.wait(int(urgent.stdout), tmp_path / "urgent.out")["JobState"] == "COMPLETED"
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "2", slurm_cluster.report(log)
    assert "restart 1:" in text and "restart 2:" in text, "each requeued job sees its SLURM_RESTART_COUNT\n" + text
    stops = re.findall(
        r"^stopped at step (\d+) of \d+ on (SIGUSR1|SIGTERM): checkpoint (\S+?)(;.*)?$", text, re.MULTILINE
    )
    assert [signal for _, signal, _, _ in stops] == ["SIGUSR1", "SIGTERM"], "a rank caught each signal\n" + text
    assert 0 < int(stops[0][0]) < int(stops[1][0]) < STEPS, text
    assert "requeue" in stops[0][3], "the job requeues itself after the warning\n" + text
    for _, _, checkpoint, _ in stops:
        assert Path(checkpoint).parent.parent == tmp_path / "runs" / f"seq2seq-{job}", checkpoint
        assert f"resuming from {checkpoint}" in text, text
    # torch's launcher neither died of SIGUSR1 nor killed its ranks on SIGTERM (preemption, requeue).
    assert "death signal" not in text and "SignalException" not in text and "User defined signal" not in text, text

    straight, resumed = weights(two_nodes[0]["ddp"].run_dir), weights(tmp_path / "runs" / f"seq2seq-{job}")
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(resumed[name], straight[name]), f"{name} differs from the job that was never stopped"


def one_process_job(cluster: SlurmCluster, train: tuple[str, ...], workdir: Path) -> tuple[int, Path]:
    """The single-node script with one (fake) GPU: one process. Returns the job and its log."""
    log = workdir / "job.out"
    sbatch = ("--gpus-per-node=1", "--cpus-per-task=1", "--time=10")
    job = cluster.submit("slurm/single_node.sbatch", f"--output={log}", *sbatch, train_args=train, TMPDIR=str(workdir))
    return job, log


def test_a_cancelled_job_checkpoints_and_ends_without_a_requeue(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """scancel: SIGTERM, like a preemption, but the job must not come back. While its tasks run, a
    cancelled job reads COMPLETING (not CANCELLED), and was requeued before that was known."""
    train = (*TRAIN[:1], "steps=100000", *TRAIN[2:], f"output_dir={tmp_path / 'runs'}")
    job, log = one_process_job(slurm_cluster, train, tmp_path)
    wait_for(slurm_cluster, job, log, lambda text: "step 1:" in text, "never started training")
    slurm_cluster.command("scancel", str(job))
    info = slurm_cluster.wait(job, log)
    text = log.read_text()
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", slurm_cluster.report(log)
    assert re.search(
        rf"^stopped at step \d+ of 100000 on SIGTERM: checkpoint .*; job {job} was cancelled: not requeued$",
        text,
        re.MULTILINE,
    ), text


def test_a_stalled_job_is_requeued_once_and_stops_when_it_stalls_there_again(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    """A stall ends the job's processes (exit status 4) and requeues the job: a passing cause (a hung
    file system, a bad node) is then behind it. This fault strikes again at the same step: the second
    stall there is the run's own, and the job ends with that said instead of looping."""
    train = (
        "recipe=tests.fixture_recipes.stalling",
        "stalling.rank=0",
        "data.num_workers=1",
        "data_timeout_s=3",
        "stalling.after=60",  # in the third step: the requeued attempt logs (status.json) before it stalls again
        "log_every=1",
        "progress_bar=false",
        "tracker=none",
        f"output_dir={tmp_path / 'runs'}",
    )
    job, log = one_process_job(slurm_cluster, train, tmp_path)
    info = slurm_cluster.wait(job, log)
    text = log.read_text()
    assert info["Restarts"] == "1" and info["JobState"] == "FAILED", slurm_cluster.report(log)
    stalls = re.findall(r"^stalled: process 0 made no progress for \d+s in data at step (\d+) .*$", text, re.MULTILINE)
    assert len(stalls) == 2 and stalls[0] == stalls[1], text
    assert f"; requeued job {job}, which resumes from its newest checkpoint; exit status 4" in text, text
    assert f"; job {job} not requeued: its attempt before stalled at this step too; exit status 4" in text, text
