"""The README's promises about the default runs, checked by running them (the longest tests)."""

from __future__ import annotations

import sys

import pytest

from tests.test_launch import launch

pytestmark = pytest.mark.slow


def test_default_seq2seq_run_reaches_its_target(tmp_path):
    out = launch(
        [sys.executable], "config=configs/seq2seq.yaml", f"output_dir={tmp_path}", "progress_bar=false", timeout=400
    ).stdout
    assert "on held-out sequences (reached the 95% target)" in out, out[-2000:]


def test_gan_run_covers_all_modes_with_high_quality_samples(tmp_path):
    out = launch(
        [sys.executable], "config=configs/gan.yaml", f"output_dir={tmp_path}", "progress_bar=false", timeout=400
    ).stdout
    assert "8 of 8 modes covered" in out and "(reached the target of 8 modes and 90%)" in out, out[-2000:]
