"""The README's promises about the default runs, checked by running them (the longest tests).

Each run starts in the background as soon as the session has collected its test (conftest.py), on
one thread, so that it uses the CPU time the multi-process tests leave idle; its test, run last,
waits for it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from tests.launcher import REPO

pytestmark = pytest.mark.slow


class BackgroundRun:
    """`python train.py ARGS` in a fresh directory, started early and awaited by its test."""

    def __init__(self, *args: str) -> None:
        self.args = args
        self.proc: subprocess.Popen | None = None
        self.out_dir = ""

    def start(self) -> None:
        if self.proc is None:
            self.out_dir = tempfile.mkdtemp(prefix="disttrain-quality-")
            self.proc = subprocess.Popen(
                [sys.executable, "train.py", *self.args, f"output_dir={self.out_dir}", "progress_bar=false"],
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},
            )

    def output(self, timeout: float = 600) -> str:
        self.start()  # the test alone, or collected without conftest's hook
        assert self.proc is not None
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise AssertionError(f"no result after {timeout}s:\n{e.output}") from e
        assert self.proc.returncode == 0, out[-3000:]
        return out

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()
        shutil.rmtree(self.out_dir, ignore_errors=True)


# Each recipe alone, with nothing else: its own defaults must reach its stated target.
SEQ2SEQ = BackgroundRun("recipe=seq2seq")
GAN = BackgroundRun("recipe=gan")
CLASSIFIER = BackgroundRun("recipe=classifier")


def test_default_seq2seq_run_reaches_its_target():
    out = SEQ2SEQ.output()
    assert "on held-out sequences (reached the 95% target)" in out, out[-2000:]


def test_gan_run_covers_all_modes_with_high_quality_samples():
    out = GAN.output()
    assert "8 of 8 modes covered" in out and "(reached the target of 8 modes and 90%)" in out, out[-2000:]


def test_classifier_run_reaches_its_target():
    out = CLASSIFIER.output()
    assert "on held-out samples (reached the 85% target)" in out, out[-2000:]
