"""Recipes: the synthetic data, the BatchNorm warning and statistics, evaluation."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from disttrain.preflight import resolve_config
from disttrain.recipe import build_recipe
from disttrain.recipes.seq2seq.recipe import BOS, EOS, PAD, collate, generate_sequences
from disttrain.trainer import Trainer
from disttrain.weights import read_weights
from tests.cases import case_config
from tests.dist import run_distributed
from tests.workers import BATCHNORM_RUN, BATCHNORM_STEPS, batchnorm_runs


def test_seq2seq_batches_pad_per_micro_batch_and_end_with_eos():
    cfg = resolve_config(["seq2seq.min_len=1", "seq2seq.max_len=5"], world_size=1).seq2seq
    data = generate_sequences(cfg, 64, seed=0)
    short = int(data.lengths.argmin())
    batch = collate(data, "reverse", [short])
    n = int(data.lengths[short])
    assert batch["src"].shape == (1, n)  # padded to this batch's longest, not to max_len
    assert batch["tgt_in"][0].tolist() == [BOS, *data.tokens[short, :n].flip(0).tolist()]
    assert batch["tgt_out"][0].tolist() == [*data.tokens[short, :n].flip(0).tolist(), EOS]
    both = collate(data, "sort", [short, int(data.lengths.argmax())])
    assert (both["tgt_out"][0, n + 1 :] == PAD).all() and both["tgt_out"][0, n] == EOS
    assert both["tgt_out"][1, :-1].tolist() == sorted(both["tgt_out"][1, :-1].tolist())


def test_held_out_sequences_are_not_in_the_training_set():
    cfg = resolve_config(["seq2seq.vocab_size=3", "seq2seq.min_len=2", "seq2seq.max_len=5"], world_size=1).seq2seq
    train = generate_sequences(cfg, 500, seed=0)
    held_out = generate_sequences(cfg, 50, seed=1, exclude=train)
    assert not set(map(tuple, held_out.tokens.tolist())) & set(map(tuple, train.tokens.tolist()))
    assert generate_sequences(cfg, 500, seed=0).tokens.equal(train.tokens)  # deterministic from the seed


def test_batchnorm_with_accumulation_warns(tmp_path):
    cfg = resolve_config(
        [
            "recipe=classifier",
            "classifier.batchnorm=true",
            "global_batch_size=64",
            "micro_batch_size=16",
            f"output_dir={tmp_path}",
        ],
        world_size=1,
    )
    with pytest.warns(UserWarning, match="model 'model' has BatchNorm: its statistics come from micro-batches of 16"):
        Trainer(cfg)


def test_batchnorm_without_accumulation_is_quiet(tmp_path):
    cfg = resolve_config(["recipe=classifier", "classifier.batchnorm=true", f"output_dir={tmp_path}"], world_size=1)
    cfg.micro_batch_size = cfg.global_batch_size
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        Trainer(cfg)


@pytest.mark.slow
def test_batchnorm_accuracy_printed_on_two_processes_is_that_of_the_saved_weights(tmp_path):
    """Each process updates its BatchNorm statistics from its own micro-batches; the run averages them
    before evaluating and saving, so one process loading the weights file scores what the run said."""
    ranks = run_distributed(batchnorm_runs, 2, str(tmp_path))
    for mode in ("ddp", "fsdp"):
        run = ranks[0][mode]
        assert run["stats"], "the model has no BatchNorm statistics"
        for key, value in run["stats"].items():
            assert torch.equal(value, ranks[1][mode]["stats"][key]), f"{mode}: {key} differs between processes"
        cfg = case_config("classifier", "full", 1, 1, str(tmp_path), BATCHNORM_STEPS, *BATCHNORM_RUN)
        recipe = build_recipe(cfg)
        model = recipe.models["model"]
        saved = read_weights(f"{run['run_dir']}/model.safetensors")
        model.load_state_dict(saved)
        for key, value in run["stats"].items():
            assert torch.equal(saved[key], value), f"{mode}: the saved {key} is not the processes' one"
        model.eval()
        correct, count = recipe.evaluate({"model": model}, 0, 1)["accuracy"]
        assert float(correct / count) == run["metrics"]["accuracy"], mode


@pytest.mark.parametrize("recipe", ["classifier", "seq2seq"])
def test_evaluation_reports_a_fraction(tmp_path, recipe):
    trainer = Trainer(case_config(recipe, "full", 1, 1, str(tmp_path)))
    metrics = trainer.evaluate()
    assert len(metrics) == 1 and all(0.0 <= v <= 1.0 for v in metrics.values())
    assert all(m.training for m in trainer.models.values()), "evaluation must hand the models back in train mode"


def test_classifier_learns(tmp_path):
    cfg = resolve_config(
        ["config=configs/classifier.yaml", f"output_dir={tmp_path}", "progress_bar=false"], world_size=1
    )
    trainer = Trainer(cfg)
    before = trainer.evaluate()["accuracy"]
    metrics = trainer.fit()
    assert metrics["accuracy"] > max(0.85, before + 0.3)
    assert (tmp_path / trainer.run_dir.split("/")[-1] / "model.safetensors").exists()
    assert torch.isfinite(torch.tensor(metrics["accuracy"]))


@pytest.mark.parametrize(("dataset", "modes"), [("ring", 8), ("grid", 25)])
def test_gan_scores_coverage_and_quality(dataset, modes):
    from disttrain.recipes.gan.recipe import STD, mode_centers, sample_mixture, score_samples

    g = torch.Generator().manual_seed(0)
    real = sample_mixture(dataset, 5000, g)
    # Real samples score 1 - exp(-9/2): the distance of a 2-D Gaussian sample is Rayleigh distributed.
    assert score_samples(real, dataset) == (modes, pytest.approx(1 - math.exp(-4.5), abs=0.005))
    collapsed = mode_centers(dataset)[0] + STD[dataset] * torch.randn(5000, 2, generator=g)
    assert score_samples(collapsed, dataset)[0] == 1
    between = (mode_centers(dataset)[:1] + mode_centers(dataset)[1:2]) / 2 + torch.zeros(5000, 2)
    assert score_samples(between, dataset) == (0, 0.0)


def test_exported_classifier_weights_load_into_its_model_file_without_the_template(tmp_path):
    """The recipe layout the README shows: the model in a torch-only file, copied beside inference code."""
    import os
    import subprocess
    import sys

    args = ["recipe=classifier", "steps=2", "tracker=none", "progress_bar=false", f"output_dir={tmp_path}"]
    trainer = Trainer(resolve_config([*args, "run_name=run", "classifier.hidden=12"], world_size=1))
    trainer.fit()
    model_file = os.path.join(os.path.dirname(build_recipe.__code__.co_filename), "recipes", "classifier", "model.py")
    c = trainer.cfg.recipe_config
    script = f"""
import importlib.util, sys
sys.modules["disttrain"] = None  # importing the template now fails
spec = importlib.util.spec_from_file_location("model", {model_file!r})
model = importlib.util.module_from_spec(spec); spec.loader.exec_module(model)
from safetensors.torch import load_file
net = model.make_mlp({c.num_features}, {c.hidden}, {c.depth}, {c.num_classes}, {c.batchnorm})
net.load_state_dict(load_file({str(tmp_path / "run" / "model.safetensors")!r}), strict=True)
print("loaded", sum(p.numel() for p in net.parameters()))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("loaded"), done.stdout + done.stderr
