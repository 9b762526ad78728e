"""A user's recipe outside the package, found by module path: keys, help, one and two processes.

Also the run's output as a user reads it: one line per event, and a final loss that does not
depend on `log_every`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from disttrain.config import ConfigError
from disttrain.preflight import resolve_config
from tests.launcher import PYTHON, REPO, accelerate, launch

USER_RECIPE = "recipe=tests.fixture_recipes.regression"


@pytest.mark.slow
def test_user_recipe_keys_are_checked_and_listed_in_help():
    def train(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "train.py", USER_RECIPE, *args], cwd=REPO, capture_output=True, text=True, timeout=60
        )

    shown = train("--help")
    assert shown.returncode == 0 and "regression.noise=0.05" in shown.stdout and "steps=12" in shown.stdout
    assert "seq2seq." not in shown.stdout
    refused = train("regression.nosie=1")
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        "config error: unknown key 'regression.nosie' on the command line; did you mean 'regression.noise'?"
    ]
    assert train("regression.noise=-1").stderr.strip() == "config error: regression.noise=-1.0 must be >= 0"
    missing = train("recipe=tests.fixture_recipes.nothing_here")
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1
    assert (
        "recipe='tests.fixture_recipes.nothing_here' is not one of: causal_lm, classifier, gan, seq2seq"
        in missing.stderr
    )


@pytest.mark.slow
def test_user_recipe_trains_alike_on_one_and_two_processes(tmp_path):
    runs = tmp_path / "runs"
    args = (USER_RECIPE, "regression.noise=0.1", f"output_dir={runs}", "tracker=none")
    two = launch(accelerate(), *args, "run_name=two")
    one = launch(PYTHON, *args, "run_name=one")
    assert "2 process(es) x micro-batch 8 x accumulation 2 = global batch 32; 12 steps" in two.stdout
    assert "noise: 0.1" in (runs / "one" / "config.yaml").read_text()
    w1, w2 = load_file(runs / "one" / "model.safetensors"), load_file(runs / "two" / "model.safetensors")
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-5, atol=1e-6)
    for out in (one.stdout + one.stderr, two.stdout + two.stderr):
        assert "[RANK" not in out
        assert out.count("done: 12 steps") == 1


@pytest.mark.slow
def test_final_loss_does_not_depend_on_log_every(tmp_path):
    finals = []
    for every in (1, 5):
        out = launch(PYTHON, USER_RECIPE, f"log_every={every}", f"output_dir={tmp_path}", f"run_name=l{every}").stdout
        assert len(re.findall(r"^step \d+: loss", out, flags=re.M)) == len(range(every, 13, every)) + (12 % every > 0)
        finals.append(re.search(r"final loss (\S+) \(mean over all items of the last 12 steps\)", out).group(1))
    assert finals[0] == finals[1]


@pytest.mark.slow
def test_a_copied_builtin_recipe_trains_under_its_new_name(tmp_path):
    """The README's way: copy a recipe folder into your own package; no file of the template changes."""
    recipes = tmp_path / "myproject" / "recipes"
    shutil.copytree(os.path.join(REPO, "src", "disttrain", "recipes", "classifier"), recipes / "mymodel")
    (tmp_path / "myproject" / "__init__.py").write_text("")
    (recipes / "__init__.py").write_text("")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    args = ["recipe=myproject.recipes.mymodel", "mymodel.hidden=8", "steps=3", "tracker=none", "progress_bar=false"]
    result = subprocess.run(
        [sys.executable, "train.py", *args, f"output_dir={tmp_path / 'runs'}", "run_name=mine"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "done: 3 steps" in result.stdout
    assert (
        "mymodel:\n  num_features: 16\n  num_classes: 4\n  hidden: 8"
        in (tmp_path / "runs" / "mine" / "config.yaml").read_text()
    )
    refused = subprocess.run(
        [sys.executable, "train.py", "recipe=myproject.recipes.mymodel", "mymodel.depth=0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert refused.stderr.strip() == "config error: mymodel.depth=0 must be >= 1"


def test_a_top_level_module_is_a_recipe_too(tmp_path, monkeypatch):
    """`recipe=myreg`: a module path without a dot (a built-in name would come first)."""
    shutil.copytree(os.path.join(REPO, "src", "disttrain", "recipes", "classifier"), tmp_path / "myreg")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = resolve_config(["recipe=myreg", "myreg.hidden=8"], world_size=1)
    assert cfg.recipe_config.hidden == 8 and cfg.recipe_section == "myreg"
    with pytest.raises(ConfigError, match="recipe='nosuchrecipe' is not one of: causal_lm, classifier"):
        resolve_config(["recipe=nosuchrecipe"], world_size=1)
