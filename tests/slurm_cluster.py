"""A real SLURM cluster on this machine for the tests: munged, slurmctld and two slurmd (nodes n1, n2).

Debian's packages (slurm 22.05, munge) are installed if missing and the daemons started by hand (no
systemd), as root, with every file they write under one temporary directory. The `slurm_cluster`
fixture starts it once per session, skips with the reason where it cannot (not root, no packages,
a daemon that does not come up: its log tail is in the reason), and stops everything at the end.

Jobs see the submitting environment, with this checkout's virtualenv first on PATH, so `python` and
`accelerate` in a job script are the ones the tests run with.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.dist import free_port
from tests.launcher import end_marked

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = os.path.dirname(sys.executable)
PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
NODES = ("n1", "n2")
# The daemons live in sbin; a root shell usually has it on PATH, a CI runner's environment may not.
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin"])
READY_TIMEOUT = 60.0
MARK = "DISTTRAIN_SLURM_CLUSTER"  # in the environment of every process of the cluster: its root


class SlurmCluster:
    """A running two-node cluster: submit, watch and inspect jobs with its own slurm.conf."""

    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.daemons: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, list[Path]] = {}  # each daemon's log file (if it has one) and its output

    def env(self, **extra: str) -> dict[str, str]:
        """The environment for Slurm commands and the jobs they submit (sbatch exports it whole). It
        marks every process of the cluster, daemons and jobs alike (MARK), for `stop` to find."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}  # e.g. CI itself in a job
        env.update(SLURM_CONF=str(self.conf), PATH=os.pathsep.join([VENV_BIN, SEARCH_PATH]), PYTHONUNBUFFERED="1")
        return {**env, MARK: str(self.root), **extra}

    def command(self, *args: str, check: bool = True, **env: str) -> subprocess.CompletedProcess:
        """Run a Slurm command in the repository root; `env` adds to the environment a job inherits."""
        result = subprocess.run(args, capture_output=True, text=True, env=self.env(**env), cwd=REPO, timeout=60)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr or result.stdout}")
        return result

    def submit(self, script: str, *sbatch_args: str, train_args: tuple[str, ...] = (), **env: str) -> int:
        """sbatch `script` (relative to the repository root, which is also the job's directory)."""
        out = self.command("sbatch", "--parsable", *sbatch_args, script, *train_args, **env).stdout
        return int(out.strip().split(";")[0])

    def active(self, job: int) -> bool:
        """Pending, running, completing or waiting to be requeued: anything but finished."""
        return bool(self.command("squeue", "-h", "-j", str(job), "-o", "%T", check=False).stdout.strip())

    def job(self, job: int) -> dict[str, str]:
        """`scontrol show job` as a dict (the record stays MinJobAge seconds after the job ends)."""
        fields = self.command("scontrol", "-o", "show", "job", str(job)).stdout.split()
        return dict(f.split("=", 1) for f in fields if "=" in f)

    def wait(self, job: int, log: Path, timeout: float = 300) -> dict[str, str]:
        """Poll until `job` has finished (squeue answers at once; `sbatch --wait` polls every 2 to 32 s)."""
        deadline = time.monotonic() + timeout
        while self.active(job):
            if time.monotonic() > deadline:
                self.command("scancel", str(job), check=False)
                raise AssertionError(f"job {job} still not done after {timeout}s\n{self.report(log)}")
            time.sleep(0.25)
        return self.job(job)

    def report(self, log: Path | None = None) -> str:
        """The job's log and the daemons' log tails, for failure messages."""
        parts = [f"--- {log}:\n{_tail(log, 60)}"] if log else []
        for name, paths in self.logs.items():
            parts += [f"--- {name} ({path.name}):\n{_tail(path, 15)}" for path in paths if path.exists()]
        return "\n".join(parts)

    # ------------------------------------------------------------------ life cycle

    def start(self) -> None:
        munge_dir, munge_private = self.root / "munge", self.root / "munge" / "private"
        munge_private.mkdir(parents=True)
        # munged refuses a socket directory others cannot enter, and a key or log others can read.
        munge_dir.chmod(0o755)
        munge_private.chmod(0o700)
        key = munge_private / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o600)
        munge = pwd.getpwnam("munge")
        for path in (munge_dir, munge_private, key):
            os.chown(path, munge.pw_uid, munge.pw_gid)
        socket_path = munge_dir / "munge.socket"
        self._daemon(
            "munged",
            [
                _binary("munged"),
                "--foreground",
                f"--socket={socket_path}",
                f"--key-file={key}",
                f"--pid-file={munge_dir / 'munged.pid'}",
                f"--seed-file={munge_private / 'munged.seed'}",
            ],
            user="munge",
        )
        self._until(socket_path.exists, "munged to open its socket")

        for sub in ("state", "log", "gpu", *(f"spool/{node}" for node in NODES)):
            (self.root / sub).mkdir(parents=True)
        # Two fake GPUs per node, so that job scripts request GPUs as on a real cluster. Slurm wants
        # a character device per GPU and only stats it (no cgroups here): links to /dev/null.
        for i in range(2):
            os.symlink("/dev/null", self.root / "gpu" / f"gpu{i}")
        ports = [free_port() for _ in range(1 + len(NODES))]
        self.conf.write_text(_slurm_conf(self.root, socket_path, ports))
        (self.root / "gres.conf").write_text(f"NodeName=n[1-2] Name=gpu File={self.root}/gpu/gpu[0-1]\n")

        self._daemon("slurmctld", [_binary("slurmctld"), "-D", "-i", "-f", str(self.conf)], "slurmctld.log")
        for node in NODES:
            self._daemon(
                f"slurmd {node}", [_binary("slurmd"), "-D", "-f", str(self.conf), "-N", node], f"slurmd-{node}.log"
            )
        self._until(self._nodes_idle, "both nodes to be idle")

    def stop(self) -> None:
        # Jobs first: their step daemons outlive slurmd, and their trainings would go on running.
        with contextlib.suppress(Exception):
            self.command("scancel", f"--user={pwd.getpwuid(os.getuid()).pw_name}", check=False)
            deadline = time.monotonic() + 20
            while self.command("squeue", "-h", check=False).stdout.strip() and time.monotonic() < deadline:
                time.sleep(0.25)
        for name in reversed(list(self.daemons)):
            proc = self.daemons[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        # A job still running (its step daemons outlive slurmd) would train on with nobody to end it.
        end_marked(str(self.root), MARK)
        shutil.rmtree(self.root, ignore_errors=True)

    def _daemon(self, name: str, args: list[str], log: str | None = None, user: str | None = None) -> None:
        output = open(self.root / f"{name.replace(' ', '-')}.out", "w")  # noqa: SIM115 (the daemon keeps it)
        self.daemons[name] = subprocess.Popen(
            args,
            stdout=output,
            stderr=subprocess.STDOUT,
            env=self.env(),
            user=user,
            group=user,
            start_new_session=True,  # out of pytest's process group: a Ctrl-C reaches pytest, which stops them
        )
        self.logs[name] = [*([self.root / "log" / log] if log else []), Path(output.name)]

    def _nodes_idle(self) -> bool:
        states = self.command("sinfo", "-h", "-N", "-o", "%N %T", check=False).stdout.split("\n")
        return sorted({line.strip() for line in states if line.strip()}) == [f"{n} idle" for n in NODES]

    def _until(self, ready, what: str) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while not ready():
            dead = [name for name, proc in self.daemons.items() if proc.poll() is not None]
            if dead or time.monotonic() > deadline:
                problem = f"{', '.join(dead)} exited" if dead else f"no result after {READY_TIMEOUT:.0f}s"
                raise ClusterError(f"waiting for {what}: {problem}\n{self.report()}")
            time.sleep(0.2)


class ClusterError(RuntimeError):
    pass


def _slurm_conf(root: Path, munge_socket: Path, ports: list[int]) -> str:
    host = socket.gethostname().split(".")[0]
    nodes = "\n".join(
        # One host, several slurmd (Debian builds with MULTIPLE_SLURMD): each node its own port,
        # and %n in every path a slurmd writes. config_overrides: a node may claim CPUs the host lacks.
        f"NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs=2 Gres=gpu:2 State=UNKNOWN"
        for node, port in zip(NODES, ports[1:], strict=True)
    )
    return f"""\
ClusterName=disttrain-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ports[0]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job waits this long + 1 s before it may start again (default 120 s).
AuthInfo=socket={munge_socket},cred_expire=10
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
# No cgroups, no accounting database, no MPI, no mail: nothing but the daemons themselves.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
MailProg=/bin/true
SlurmdParameters=config_overrides
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
ReturnToService=2
# Finished jobs stay visible to `scontrol show job` (there is no sacct without a database).
MinJobAge=600
# Seconds between SIGTERM and SIGKILL when a job ends, is cancelled or requeued (default 30).
KillWait=10
# The main scheduling pass runs on events and every sched_interval seconds (default 60); a requeued
# job becomes eligible cred_expire seconds later with no event, so it waited for that pass.
SchedulerParameters=sched_interval=1
# Preemption from the high-priority partition requeues the job; GraceTime is how long its tasks
# have, after the first SIGTERM, before the batch shell and srun are signalled as well.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
{nodes}
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=60
PartitionName=urgent Nodes=n[1-2] MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF
"""


def _binary(name: str) -> str:
    path = shutil.which(name, path=SEARCH_PATH)
    if path is None:
        raise ClusterError(f"{name} not found")
    return path


def _tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as e:
        return f"({e})"


def _install() -> str | None:
    """Install the Debian packages if a command is missing; the reason it cannot, or None."""
    if all(shutil.which(b, path=SEARCH_PATH) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return None
    if shutil.which("apt-get") is None:
        return "slurmctld, slurmd or munged is missing and there is no apt-get to install them"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "-o", "DPkg::Lock::Timeout=120", *PACKAGES]
    result = subprocess.run(install, capture_output=True, text=True, env=env)
    if result.returncode != 0:  # package lists missing or stale: only then the slow update
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, text=True, env=env)
        result = subprocess.run(install, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        return f"apt-get install {' '.join(PACKAGES)} failed:\n{(result.stdout + result.stderr)[-1500:]}"
    return None


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        pytest.skip("the SLURM cluster needs root on Linux (munged runs as the munge user, slurmd as root)")
    reason = _install()
    if reason:
        pytest.skip(f"no SLURM packages: {reason}")
    try:
        pwd.getpwnam("munge")
    except KeyError:
        pytest.skip("the munge package did not create its munge user")
    # Not under pytest's tmp_path: munged, as the munge user, must reach its socket directory.
    root = Path(tempfile.mkdtemp(prefix="disttrain-slurm-", dir="/tmp"))
    root.chmod(0o755)
    cluster = SlurmCluster(root)
    try:
        cluster.start()
    except ClusterError as e:
        cluster.stop()
        pytest.skip(f"the SLURM cluster did not start: {e}")
    try:
        yield cluster
    finally:
        cluster.stop()
