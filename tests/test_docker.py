"""The Docker images: both Dockerfiles lint clean and use the pinned torch, and the CPU image builds
from a base made here (no registry is reachable) and runs tests and a short training inside.

The build test needs a Docker daemon: the one that answers, or one this test starts as root
(tests/dockerd.py); elsewhere it is skipped with the reason. Between local runs it keeps the
debootstrap tarball, the torch wheel and the daemon's images in .cache/docker, so that a rerun
rebuilds only the layers whose inputs changed; CI starts from a clean clone and builds everything.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import re
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.dockerd import apt_install, docker_daemon

REPO = Path(__file__).resolve().parent.parent
DOCKERFILES = [REPO / "docker" / "Dockerfile", REPO / "docker" / "Dockerfile.cpu"]
CACHE = REPO / ".cache" / "docker"
SUITE = "bookworm"  # Debian 12: its python3 is 3.11, the Python of the torch wheel fetched below
PYTHON = "3.11"
BASE = f"disttrain-test-base:{SUITE}"  # what the CPU Dockerfile's BASE_IMAGE receives
IMAGE = "disttrain:cpu-test"
# A port of its own, so that the build argument naming the wheel index stays the same from run to
# run and the layers after it stay cached; another free port only if it is taken.
INDEX_PORT = 18477
# A representative part of the quick suite, inside the image: config checks, world-size-invariant
# data, and a 2-process gloo run against its reference. The whole quick suite
# took nearly 10 minutes inside the image on a busy 2-core machine, far over this test's budget; it
# runs outside the image anyway.
IN_IMAGE_TESTS = [
    "tests/test_config.py",
    "tests/test_windows.py",
    "tests/test_sync.py::test_ranks_differ_between_boundaries_and_agree_at_them[seq2seq_aux]",
]


def _hadolint() -> str:
    found = shutil.which("hadolint", path=os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]]))
    assert found, "hadolint comes with the test extra: pip install -e '.[test]'"
    return found


def test_dockerfiles_lint_clean():
    result = subprocess.run(
        [_hadolint(), "--failure-threshold", "style", *map(str, DOCKERFILES)], capture_output=True, text=True
    )
    assert result.returncode == 0, f"hadolint findings:\n{result.stdout}{result.stderr}"


def test_images_install_the_pinned_torch():
    pin = re.search(r"^TORCH_SPEC \?= torch==(\S+)", (REPO / "Makefile").read_text(), re.M)
    cpu = re.search(r"^ARG TORCH_VERSION=(\S+)", DOCKERFILES[1].read_text(), re.M)
    gpu = re.search(r"^ARG BASE_IMAGE=pytorch/pytorch:([^-\s]+)-cuda", DOCKERFILES[0].read_text(), re.M)
    assert pin and cpu and gpu, "the torch pin is no longer where this test reads it"
    assert cpu[1] == pin[1], f"docker/Dockerfile.cpu installs torch {cpu[1]}, the Makefile pins {pin[1]}"
    assert gpu[1] == pin[1], f"docker/Dockerfile's base image has torch {gpu[1]}, the Makefile pins {pin[1]}"


def _run(args: list[str], env: dict[str, str], timeout: float, what: str) -> subprocess.CompletedProcess:
    start = time.monotonic()
    try:
        result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"{what}: no result after {timeout}s; output so far:\n{e.stdout}\n{e.stderr}") from e
    assert result.returncode == 0, f"{what} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    print(f"{what}: {time.monotonic() - start:.0f}s")  # where the time goes, with pytest -s or -rP
    return result


def _image_exists(docker: str, name: str, env: dict[str, str]) -> bool:
    return subprocess.run([docker, "image", "inspect", name], env=env, capture_output=True).returncode == 0


def _ca_bundle() -> Path | None:
    """The CA bundle this machine trusts: where the network is behind a TLS proxy, pip inside the
    image needs it as much as pip here does."""
    candidates = [os.environ.get("PIP_CERT"), os.environ.get("SSL_CERT_FILE"), ssl.get_default_verify_paths().cafile]
    return next((Path(c) for c in [*candidates, "/etc/ssl/certs/ca-certificates.crt"] if c and Path(c).is_file()), None)


def _rootfs_tarball(tmp_path: Path) -> Path:
    """Debian minbase with python3 and venv, made by debootstrap once and kept in the cache."""
    tarball = CACHE / f"{SUITE}-python3.tar"
    if tarball.exists():
        return tarball
    if not shutil.which("debootstrap"):
        apt_install("debootstrap")
    root = tmp_path / "rootfs"
    _run(
        ["debootstrap", "--variant=minbase", "--include=python3,python3-venv", SUITE, str(root)],
        dict(os.environ),
        timeout=600,
        what="debootstrap",
    )
    shutil.rmtree(root / "var" / "cache" / "apt" / "archives", ignore_errors=True)  # the .debs, 50 MB
    partial = tarball.with_suffix(".partial")
    _run(["tar", "-C", str(root), "--numeric-owner", "-cf", str(partial), "."], dict(os.environ), 300, "tar")
    partial.rename(tarball)
    shutil.rmtree(root, ignore_errors=True)
    return tarball


def _base_image(docker: str, env: dict[str, str], tmp_path: Path) -> None:
    """The base image, made here: the debootstrap tree imported, plus this machine's CA bundle."""
    if _image_exists(docker, BASE, env):
        return  # a new import would get a new id and invalidate every cached layer built on it
    raw = f"disttrain-test-rootfs:{SUITE}"
    _run([docker, "import", str(_rootfs_tarball(tmp_path)), raw], env, 300, "docker import")
    context = tmp_path / "base"
    context.mkdir()
    lines = [f"FROM {raw}"]
    bundle = _ca_bundle()
    if bundle:
        shutil.copy(bundle, context / "ca-certificates.crt")
        cert = "/etc/ssl/certs/ca-certificates.crt"
        lines += [f"COPY ca-certificates.crt {cert}", f"ENV PIP_CERT={cert} SSL_CERT_FILE={cert}"]
    (context / "Dockerfile").write_text("\n".join(lines) + "\n")
    _run([docker, "build", "-q", "-t", BASE, str(context)], env, 300, "base image build")


def _torch_version() -> str:
    return re.search(r"^ARG TORCH_VERSION=(\S+)", DOCKERFILES[1].read_text(), re.M)[1]


def _local_torch_wheel() -> Path | None:
    """The CPU torch wheel for the image's Python, as pip finds it on this machine (a local wheel
    directory, pip's configuration), copied into the cache; None where pip finds none."""
    wheels = CACHE / "wheels" / "torch"
    wheels.mkdir(parents=True, exist_ok=True)
    requirement = f"torch=={_torch_version()}+cpu"
    args = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", PYTHON]
    result = subprocess.run([*args, "-d", str(wheels), requirement], capture_output=True, text=True, timeout=300)
    found = sorted(wheels.glob(f"torch-{_torch_version()}+cpu-*.whl"))
    return found[-1] if result.returncode == 0 and found else None


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def _wheel_index(directory: Path) -> Iterator[str]:
    """`directory` served as a simple package index (one folder per project) on 127.0.0.1."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    try:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", INDEX_PORT), handler)
    except OSError:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def _client(env: dict[str, str]) -> tuple[str, dict[str, str]]:
    """A docker client, and its environment, that builds with BuildKit where one can (clients up to
    22 carry it, later ones only with the buildx plugin). Here BuildKit built this image in 3.5
    minutes and the legacy builder, which commits every step as it goes, in 5.5."""
    found = [shutil.which("docker", path=env.get("PATH")), "/usr/bin/docker"]
    clients = [c for c in dict.fromkeys(found) if c and os.access(c, os.X_OK)]
    for client in clients:
        if subprocess.run([client, "buildx", "version"], env=env, capture_output=True).returncode == 0:
            return client, {**env, "DOCKER_BUILDKIT": "1"}
        version = subprocess.run([client, "version", "-f", "{{.Client.Version}}"], env=env, capture_output=True)
        major = version.stdout.decode().split(".")[0]
        if major.isdigit() and int(major) < 23:
            return client, {**env, "DOCKER_BUILDKIT": "1"}
    return clients[0], {**env, "DOCKER_BUILDKIT": "0"}


class Prebuild:
    """The daemon and the CPU image, prepared in a thread that conftest.py starts as soon as the
    session has collected the build test (and runs that test last): debootstrap's and pip's
    downloads then overlap the CPU-bound tests instead of adding to the suite's time."""

    def __init__(self) -> None:
        self.stack = contextlib.ExitStack()
        self.thread: threading.Thread | None = None
        self.ready: tuple[str, dict[str, str]] | None = None
        self.error: BaseException | None = None

    def start(self) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._prepare, name="docker-prebuild", daemon=True)
            self.thread.start()

    def _prepare(self) -> None:
        try:
            scratch = Path(tempfile.mkdtemp(prefix="disttrain-docker-"))
            self.stack.callback(shutil.rmtree, scratch, True)
            daemon = self.stack.enter_context(docker_daemon(CACHE / "data"))
            docker, env = _client(daemon.env)
            _base_image(docker, env, scratch)
            wheel = _local_torch_wheel()
            with _wheel_index(CACHE / "wheels") as index:
                build = [docker, "build", "--network", "host", "-f", str(DOCKERFILES[1]), "-t", IMAGE]
                build += ["--build-arg", f"BASE_IMAGE={BASE}"]
                if wheel:  # else the Dockerfile's default, PyTorch's CPU index
                    build += ["--build-arg", f"TORCH_INDEX_URL={index}"]
                _run([*build, str(REPO)], env, timeout=1200, what="docker build -f docker/Dockerfile.cpu")
            if daemon.started_here:  # what earlier builds left that nothing names any more
                subprocess.run([docker, "image", "prune", "-f"], env=env, capture_output=True)
                subprocess.run(
                    [docker, "builder", "prune", "-f", "--keep-storage", "6GB"], env=env, capture_output=True
                )
            self.ready = (docker, env)
        except BaseException as e:  # a skip (no daemon possible) included: the test re-raises it
            self.error = e

    def wait(self) -> tuple[str, dict[str, str]]:
        self.start()  # the test alone, or collected without conftest's hook
        assert self.thread is not None
        self.thread.join()
        if self.error is not None:
            raise self.error
        assert self.ready is not None
        return self.ready

    def close(self) -> None:
        self.stack.close()


PREBUILD = Prebuild()


@pytest.mark.slow
@pytest.mark.timeout(1800)  # from a clean clone: 4 to 6.5 minutes on a shared 2-core machine, alone
def test_cpu_image_builds_and_runs_tests_and_training():
    docker, env = PREBUILD.wait()
    # No network inside: the image has all it needs, and gloo runs on the container's loopback.
    run = [docker, "run", "--rm", "--network", "none", "--shm-size", "1g", IMAGE]
    tests = _run(
        [*run, "python", "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow", *IN_IMAGE_TESTS],
        env,
        timeout=600,
        what="the tests inside the image",
    )
    assert re.search(r"\d+ passed", tests.stdout) and " failed" not in tests.stdout, tests.stdout[-3000:]

    script = (
        "id -u; python -c 'import torch; print(torch.__version__, torch.version.cuda)'; "
        "pip list 2>/dev/null | grep -ci nvidia; "
        "python train.py config=configs/debug.yaml steps=3 output_dir=/tmp/runs run_name=smoke "
        "&& ls /tmp/runs/smoke"
    )
    train = _run([*run, "sh", "-c", script], env, timeout=300, what="a short training inside the image")
    uid, torch_build, nvidia_packages, *rest = train.stdout.splitlines()
    assert uid != "0", "the image runs as a non-root user"
    assert torch_build == f"{_torch_version()}+cpu None", f"not the CPU torch: {torch_build}"
    assert nvidia_packages == "0", "the CPU image holds nvidia packages"
    assert any(line.startswith("done: 3 steps") for line in rest), train.stdout[-3000:]
    assert "seq2seq.safetensors" in rest, train.stdout[-3000:]
