import os

import pytest

pytest_plugins = [
    "tests.slurm_cluster",  # the real SLURM cluster fixture, started only by tests that use it
    "tests.stop_on_signals",  # SIGTERM unwinds the suite like Ctrl-C: daemons and clusters are stopped
]

os.environ.setdefault("WANDB_MODE", "disabled")


@pytest.fixture(autouse=True)
def _own_environment(tmp_path):
    """Each test starts from the session's environment and leaves it as it found it: a variable a
    run sets in-process (RANK, MASTER_PORT, ...) would make later runs in this process distributed.
    Launchers and torch write scratch files under TMPDIR: the test's own, not the shared /tmp."""
    before = dict(os.environ)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    os.environ["TMPDIR"] = str(scratch)
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
        os.environ.pop(var, None)
    yield
    os.environ.clear()
    os.environ.update(before)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Accelerate keeps one state per process; tests that build Trainers in-process need a new one."""
    yield
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()


# Tests whose work is mostly waiting (downloads) or single-threaded: started in the background as
# soon as they are collected, and run last, so that the suite's time is not the sum of both.
BACKGROUND = {
    "tests/test_docker.py::test_cpu_image_builds_and_runs_tests_and_training": ("tests.test_docker", "PREBUILD"),
    "tests/test_quality.py::test_default_seq2seq_run_reaches_its_target": ("tests.test_quality", "SEQ2SEQ"),
    "tests/test_quality.py::test_gan_run_covers_all_modes_with_high_quality_samples": ("tests.test_quality", "GAN"),
    "tests/test_quality.py::test_classifier_run_reaches_its_target": ("tests.test_quality", "CLASSIFIER"),
}


@pytest.hookimpl(trylast=True)  # after -m/-k have deselected what will not run
def pytest_collection_modifyitems(config, items):
    import importlib

    chosen = [item for item in items if item.nodeid in BACKGROUND]
    items[:] = [item for item in items if item.nodeid not in BACKGROUND] + chosen
    for item in chosen:
        module, name = BACKGROUND[item.nodeid]
        getattr(importlib.import_module(module), name).start()


def pytest_sessionfinish(session, exitstatus):
    import sys

    for module, name in set(BACKGROUND.values()):
        if module in sys.modules:
            getattr(sys.modules[module], name).close()  # a daemon the tests started, a run still going
