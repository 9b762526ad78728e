import os

import pytest

pytest_plugins = ["tests.slurm_cluster"]  # the real SLURM cluster fixture, started only by tests that use it

os.environ.setdefault("WANDB_MODE", "disabled")
# DeepSpeed compiles a C++ op on first use (30-80 s): build it once per checkout, not per test.
os.environ.setdefault(
    "TORCH_EXTENSIONS_DIR", os.path.join(os.path.dirname(os.path.dirname(__file__)), ".cache", "torch_extensions")
)
# Launchers and torch write scratch files under TMPDIR; keep them out of the shared /tmp.


@pytest.fixture(autouse=True)
def _own_tmpdir(tmp_path, monkeypatch):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    for var in (
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "ACCELERATE_MIXED_PRECISION",
        "ACCELERATE_GRADIENT_ACCUMULATION_STEPS",
        "SLURM_JOB_ID",  # names run directories: a suite run inside a SLURM job must not see its own
        "SLURM_ARRAY_JOB_ID",
        "SLURM_ARRAY_TASK_ID",
    ):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Accelerate keeps one state per process; tests that build Trainers in-process need a new one."""
    yield
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()


DOCKER_BUILD_TEST = "tests/test_docker.py::test_cpu_image_builds_and_runs_tests_and_training"


@pytest.hookimpl(trylast=True)  # after -m/-k have deselected what will not run
def pytest_collection_modifyitems(config, items):
    """The Docker image build is mostly downloads: start it now, in the background, and run its test
    last, so that the suite's time is not the sum of both."""
    build = [item for item in items if item.nodeid == DOCKER_BUILD_TEST]
    if build:
        items[:] = [item for item in items if item.nodeid != DOCKER_BUILD_TEST] + build
        from tests.test_docker import PREBUILD

        PREBUILD.start()


def pytest_sessionfinish(session, exitstatus):
    import sys

    docker = sys.modules.get("tests.test_docker")
    if docker is not None:
        docker.PREBUILD.close()  # stops a daemon the tests started
