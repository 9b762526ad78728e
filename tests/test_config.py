"""Configuration: merging, and every refused combination with its one-line message."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

from disttrain.config import ConfigError, lr_multiplier
from disttrain.preflight import check_device_support, check_launcher_env, resolve_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def refused(args: list[str], world_size: int = 1) -> str:
    with pytest.raises(ConfigError) as e:
        resolve_config(args, world_size=world_size)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_defaults_yaml_and_overrides_merge_in_order(tmp_path):
    yaml = tmp_path / "run.yaml"
    yaml.write_text("steps: 7\nseq2seq:\n  encoder:\n    lr: 0.5\n")
    cfg = resolve_config(
        [f"config={yaml}", "seq2seq.encoder.lr=0.25", "global_batch_size=32", "micro_batch_size=16"],
        world_size=1,
    )
    assert cfg.steps == 7  # from the file
    assert cfg.seq2seq.encoder.lr == 0.25  # the command line wins over the file
    assert cfg.seq2seq.decoder.lr == 2e-3  # untouched default
    assert cfg.global_batch_size == 32


def test_string_values_yaml_reads_as_booleans_stay_as_written(tmp_path):
    """Unquoted `no` and `false` are booleans to YAML; a string key keeps the word, in a file and on
    the command line. A boolean key still reads them as booleans."""
    yaml = tmp_path / "run.yaml"
    yaml.write_text("mixed_precision: no\ncompile_dynamic: false\ncompile: false\n")
    from_file = resolve_config([f"config={yaml}"], world_size=1)
    from_command_line = resolve_config(["mixed_precision=no", "compile_dynamic=false", "compile=no"], world_size=1)
    for cfg in from_file, from_command_line:
        assert (cfg.mixed_precision, cfg.compile_dynamic, cfg.compile) == ("no", "false", False)
    assert resolve_config([f"config={yaml}", "compile_dynamic=true"], world_size=1).compile_dynamic == "true"


def test_a_path_from_home_is_expanded(tmp_path, monkeypatch):
    """The shell leaves ~ after key= alone: output_dir=~/runs must not make a folder named "~"."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "run.yaml").write_text("steps: 7\n")
    cfg = resolve_config(["config=~/run.yaml", "output_dir=~/runs"], world_size=1)
    assert (cfg.steps, cfg.output_dir) == (7, str(tmp_path / "runs"))


def test_accumulation_follows_from_world_size():
    cfg = resolve_config(["global_batch_size=64", "micro_batch_size=8"], world_size=4)
    assert [cfg.accumulation_steps(w) for w in (1, 2, 4, 8)] == [8, 4, 2, 1]


@pytest.mark.parametrize(("scaling", "expected"), [("none", 1.0), ("linear", 4.0), ("sqrt", 2.0)])
def test_learning_rate_scaling_rules(scaling, expected):
    cfg = resolve_config(
        ["global_batch_size=256", "micro_batch_size=32", "reference_batch_size=64", f"lr_scaling={scaling}"],
        1,
    )
    assert lr_multiplier(cfg) == expected


def test_unknown_key_suggests_the_close_one():
    assert (
        refused(["global_bach_size=8"])
        == "unknown key 'global_bach_size' on the command line; did you mean 'global_batch_size'?"
    )
    assert "did you mean 'seq2seq.encoder.lr'" in refused(["seq2seq.encoder.lrr=1"])
    assert "see `python train.py --help`" in refused(["completely_unrelated=1"])


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    yaml = tmp_path / "bad.yaml"
    yaml.write_text("seq2seq:\n  d_modle: 32\n")
    assert refused([f"config={yaml}"]) == f"unknown key 'seq2seq.d_modle' in {yaml}; did you mean 'seq2seq.d_model'?"


def test_wrong_type_names_the_key():
    message = refused(["micro_batch_size=lots"])
    assert message.startswith("micro_batch_size:") and "'lots'" in message


def test_global_batch_must_divide_into_micro_batches_on_every_process():
    assert refused(["global_batch_size=48", "micro_batch_size=5"]) == (
        "global_batch_size=48 is not divisible by micro_batch_size x world size = 5 x 1 = 5; choose a multiple of 5"
    )
    assert "= 8 x 4 = 32; choose a multiple of 32" in refused(
        ["global_batch_size=48", "micro_batch_size=8"], world_size=4
    )


def test_accumulation_below_one_is_refused():
    message = refused(["global_batch_size=16", "micro_batch_size=8"], world_size=4)
    assert message.startswith("global_batch_size=16 is smaller than micro_batch_size x world size = 8 x 4 = 32")
    assert "accumulation would be < 1" in message


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["micro_batch_size=0"], "micro_batch_size=0 must be >= 1"),
        (["steps=0"], "steps=0 must be >= 1"),
        (["recipe=gpt"], "recipe='gpt' is not one of: causal_lm, classifier, gan, seq2seq"),
        (["mixed_precision=fp8"], "mixed_precision='fp8' is not one of: no, bf16, fp16"),
        (["lr_scaling=cubic"], "lr_scaling='cubic' is not one of: none, linear, sqrt"),
        (["lr_scaling=linear"], "lr_scaling=linear needs reference_batch_size"),
        (
            ["seq2seq.encoder.schedule=step"],
            "seq2seq.encoder.schedule='step' is not one of: constant, linear, cosine",
        ),
        (["seq2seq.decoder.name=lion"], "seq2seq.decoder.name='lion' is not one of: adamw, sgd"),
        (["seq2seq.decoder.lr=0"], "seq2seq.decoder.lr=0.0 must be > 0"),
        (["seq2seq.encoder.clip_grad_norm=-1"], "seq2seq.encoder.clip_grad_norm=-1.0 must be >= 0"),
        (["steps=10", "seq2seq.encoder.warmup_steps=20"], "seq2seq.encoder.warmup_steps=20 exceeds steps=10"),
        (
            ["seq2seq.d_model=30", "seq2seq.n_heads=4"],
            "seq2seq.d_model=30 must be divisible by seq2seq.n_heads=4",
        ),
        (["seq2seq.min_len=5", "seq2seq.max_len=3"], "seq2seq.max_len=3 is below seq2seq.min_len=5"),
        (["recipe=classifier", "classifier.num_classes=1"], "classifier.num_classes=1 must be >= 2"),
        (
            ["recipe=classifier", "classifier.optimizer.min_lr_ratio=2"],
            "classifier.optimizer.min_lr_ratio=2.0 must lie in [0, 1]",
        ),
        (["recipe=gan", "gan.loss=wasserstein"], "gan.loss='wasserstein' is not one of: nonsaturating, hinge"),
        (["recipe=gan", "gan.dataset=moons"], "gan.dataset='moons' is not one of: ring, grid"),
        (["recipe=gan", "gan.d_steps=0"], "gan.d_steps=0 must be >= 1"),
        (["recipe=gan", "gan.r1_every=0"], "gan.r1_every=0 must be >= 1"),
        (["recipe=gan", "gan.ema_decay=1"], "gan.ema_decay=1.0 must lie in [0, 1)"),
        (["stall_timeout_s=-1"], "stall_timeout_s=-1 must be >= 0"),
        (["data_timeout_s=-5"], "data_timeout_s=-5 must be >= 0"),
        (["stop_grace_s=-1"], "stop_grace_s=-1 must be >= 0"),
        (["stall_timeout_s=0", "data_timeout_s=0", "stop_grace_s=0"], None),  # 0 turns each off
        (["recipe=gan", "steps=10", "gan.d_steps=2", "gan.discriminator.warmup_steps=15"], None),
        (
            ["recipe=gan", "steps=10", "gan.d_steps=2", "gan.discriminator.warmup_steps=25"],
            "gan.discriminator.warmup_steps=25 exceeds steps=20",
        ),
    ],
)
def test_impossible_values_are_refused(args, expected):
    if expected is None:  # the boundary case next to a refused one is accepted
        resolve_config(args, world_size=1)
    else:
        assert expected in refused(args)


def test_malformed_arguments():
    assert refused(["--steps", "3"]).startswith("argument '--steps' is not of the form key=value")
    assert refused(["config=/nonexistent.yaml"]) == "config=/nonexistent.yaml: no such file"


def test_launcher_config_may_not_override_the_run_config(monkeypatch):
    cfg = resolve_config([], world_size=1)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with pytest.raises(ConfigError, match="accelerate launch config says mixed_precision: bf16"):
        check_launcher_env(cfg)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # the launcher's default does not conflict
    check_launcher_env(resolve_config(["mixed_precision=bf16"], world_size=1))
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4")
    with pytest.raises(ConfigError, match="gradient_accumulation_steps: 4; remove it"):
        check_launcher_env(cfg)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU-only refusals")
def test_gpu_only_features_are_refused_on_cpu():
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        check_device_support(resolve_config(["mixed_precision=fp16"], world_size=1), 1)
    with pytest.raises(ConfigError, match="sync_batchnorm=true needs GPUs"):
        check_device_support(resolve_config(["sync_batchnorm=true", "micro_batch_size=32"], world_size=2), 2)


def run_train(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "train.py", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_bad_config_exits_before_any_process_group():
    # Rank 0 of a 2-process launch with no peer and no rendezvous: any attempt to start the process
    # group would fail or hang; the config error must come first, as one line.
    result = run_train("global_batch_size=20", "micro_batch_size=4", env={"WORLD_SIZE": "2", "RANK": "0"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "config error: global_batch_size=20 is not divisible by micro_batch_size x world size = 4 x 2 = 8; choose a multiple of 8"
    ]


def test_other_ranks_stay_quiet_on_config_errors():
    result = run_train("stepz=1", env={"WORLD_SIZE": "2", "RANK": "1"})
    assert result.returncode == 2 and result.stderr == ""


def help_output(*args: str) -> str:
    code = f"import runpy, sys; sys.argv = ['train.py', *{list(args)!r}, '--help']\ntry:\n    runpy.run_path('train.py', run_name='__main__')\nexcept SystemExit:\n    pass\nprint('TORCH' if 'torch' in sys.modules else 'NO-TORCH')"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.stdout.strip().endswith("NO-TORCH"), result.stdout + result.stderr
    return result.stdout


def test_help_lists_keys_without_importing_torch():
    out = help_output()
    for key in ("global_batch_size=64", "micro_batch_size=32", "seq2seq.encoder.lr=0.002"):
        assert key in out
    assert "classifier.optimizer" not in out, "only the chosen recipe's keys"
    assert "Other built-in recipes: causal_lm, classifier, gan" in out


def test_help_for_a_recipe_shows_its_keys_and_its_run_defaults():
    out = help_output("recipe=classifier")
    assert "classifier.optimizer.clip_grad_norm=1.0" in out and "seq2seq." not in out
    assert "steps=600" in out and "global_batch_size=128" in out  # the recipe's own run defaults
    assert "Other built-in recipes: causal_lm, gan, seq2seq" in out


@pytest.mark.slow
def test_launcher_and_device_refusals_are_one_line_before_any_process_group():
    # Once checked inside the trainer, these escaped as a traceback on every process.
    env = {"WORLD_SIZE": "2", "RANK": "0", "ACCELERATE_MIXED_PRECISION": "bf16"}
    result = run_train("global_batch_size=16", "micro_batch_size=4", env=env)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "accelerate launch config says" in result.stderr
    assert run_train("global_batch_size=16", "micro_batch_size=4", env={**env, "RANK": "1"}).stderr == ""
    fp16 = run_train("mixed_precision=fp16", env={"WORLD_SIZE": "1", "RANK": "0"})
    if not __import__("torch").cuda.is_available():
        assert fp16.returncode == 2 and fp16.stderr.strip().splitlines() == [
            "config error: mixed_precision=fp16 needs a GPU (CPU has no fp16 loss scaling); use bf16 on CPU"
        ]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["seq2seq.n_heads=0"], "seq2seq.n_heads=0 must be >= 1"),
        (["seq2seq.n_heads=-2"], "seq2seq.n_heads=-2 must be >= 1"),
        (["seed=-1"], "seed=-1 must be >= 0"),
        (["seq2seq.encoder.lr=nan"], "seq2seq.encoder.lr=nan must be a finite number"),
        (["recipe=classifier", "classifier.optimizer.lr=inf"], "classifier.optimizer.lr=inf must be a finite number"),
        (["seq2seq.max_len=100000"], "seq2seq.num_train=50000 x seq2seq.max_len=100000 needs about"),
        (["run_name=/tmp/elsewhere"], "run_name=/tmp/elsewhere must name a directory inside output_dir"),
        (["run_name=../escaped"], "run_name=../escaped must name a directory inside output_dir"),
        (
            ["recipe=classifier", "classifier.optimizer.learning_rate=0.1"],
            "unknown key 'classifier.optimizer.learning_rate' on the command line; did you mean 'classifier.optimizer.lr'?",
        ),
        (["max_steps=5"], "did you mean 'steps'?"),
        (
            ["gradient_accumulation_steps=4"],
            "accumulation follows from global_batch_size / (micro_batch_size x processes)",
        ),
    ],
)
def test_bad_values_are_refused_before_launch(args, expected):
    assert expected in refused(args)


C = ["recipe=classifier"]
OPT = "classifier.optimizer"
# Each once ended in a traceback (the allocator, torch's optimizer, numpy's seeding) or was accepted.
VALUES_REFUSED_IN_ONE_LINE = {
    "model too big": ([*C, "classifier.hidden=1000000000"], "classifier.hidden=1000000000 and classifier.depth=2"),
    "data too big": ([*C, "classifier.num_train=100000000000"], "classifier.num_train=100000000000 and"),
    "seq2seq too wide": (["seq2seq.d_model=65536"], "seq2seq.d_model=65536, seq2seq.ffn_dim=256"),
    "gan too wide": (["recipe=gan", "gan.hidden=1000000000"], "gan.hidden=1000000000 and gan.layers=3"),
    "causal_lm too wide": (
        ["recipe=causal_lm", "causal_lm.width=1000000"],
        "causal_lm.width=1000000, causal_lm.layers",
    ),
    "seed too big": (["seed=100000000000000000000"], "seed=100000000000000000000 must be <= 4294967295"),
    "beta1": ([*C, f"{OPT}.beta1=1.5"], f"{OPT}.beta1=1.5 must lie in [0, 1)"),
    "beta2": ([*C, f"{OPT}.beta2=-0.1"], f"{OPT}.beta2=-0.1 must lie in [0, 1)"),
    "momentum": ([*C, f"{OPT}.name=sgd", f"{OPT}.momentum=-1"], f"{OPT}.momentum=-1.0 must be >= 0"),
    "nesterov": ([*C, f"{OPT}.name=sgd", f"{OPT}.kwargs.nesterov=true"], f"{OPT}.kwargs.nesterov=True: the optimizer"),
    "radam betas": ([*C, f"{OPT}.name=torch.optim.RAdam", f"{OPT}.kwargs.betas=5"], f"{OPT}.kwargs.betas=5: the optim"),
    "unknown kwarg": ([*C, f"{OPT}.kwargs.foo=1"], f"{OPT}.kwargs.foo=1: the optimizer refuses them (AdamW"),
    "target accuracy": ([*C, "classifier.target_accuracy=2"], "classifier.target_accuracy=2.0 must lie in [0, 1]"),
    "batch beyond the data": (
        [*C, "classifier.num_train=512", "micro_batch_size=1000000000", "global_batch_size=1000000000"],
        "global_batch_size=1000000000 exceeds classifier.num_train=512",
    ),
}


@pytest.mark.parametrize("case", VALUES_REFUSED_IN_ONE_LINE)
def test_values_that_cannot_train_are_refused_in_one_line_naming_the_key(case):
    args, named = VALUES_REFUSED_IN_ONE_LINE[case]
    assert named in refused(args)


def test_a_size_in_a_yaml_file_is_refused_as_on_the_command_line(tmp_path):
    yaml = tmp_path / "big.yaml"
    yaml.write_text("classifier:\n  hidden: 1000000000\n")
    assert "classifier.hidden=1000000000 and classifier.depth=2 need about" in refused([*C, f"config={yaml}"])


def test_bad_config_files_are_refused_with_the_reason(tmp_path):
    listed, empty, broken = tmp_path / "list.yaml", tmp_path / "empty.yaml", tmp_path / "broken.yaml"
    listed.write_text("- steps\n- 3\n")
    empty.write_text("# nothing but a comment\n")
    broken.write_text("steps: 3\n  seed: [1\n")
    assert (
        refused([f"config={listed}"])
        == f"config={listed}: the top level must be a mapping of keys (key: value), not a list"
    )
    assert refused([f"config={empty}"]) == f"config={empty} is empty; give it keys (key: value) or leave config= out"
    assert refused([f"config={broken}"]) == (
        f"config={broken}: not valid YAML at line 2, column 7: mapping values are not allowed in this context"
    )


def test_help_into_a_closed_pipe_is_quiet():
    # `true` reads nothing and exits at once: the help text meets a closed pipe (`--help | head`)
    result = subprocess.run(
        f"{sys.executable} train.py --help | true", shell=True, cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and result.stderr == ""


DDP_LAUNCH = pathlib.Path(REPO, "configs", "accelerate", "ddp.yaml").read_text()
# Each of these makes `accelerate launch` itself fail with a traceback, before train.py runs.
LAUNCH_CONFIGS_REFUSED_IN_ONE_LINE = {
    "not YAML": ("a: [1, 2\n", "not valid YAML (expected ',' or ']', but got '<stream end>' at line 2, column 1)"),
    "a list": ("- 1\n- 2\n", "the file holds a list, an accelerate config is a mapping"),
    "empty": ("", "the file is empty, an accelerate config is a mapping"),
    "unknown key": (DDP_LAUNCH + "bogus_key: 3\n", "unknown key 'bogus_key'"),
    "distributed type": (DDP_LAUNCH.replace("MULTI_GPU", "MULTI_GPUS"), "distributed_type: 'MULTI_GPUS' is not one of"),
    "process count": (
        DDP_LAUNCH.replace("num_processes: 2", "num_processes: two"),
        "num_processes: 'two' is not a whole number",
    ),
    "no processes": (DDP_LAUNCH.replace("num_processes: 2", "num_processes: 0"), "num_processes: 0 is below 1"),
    "precision": (DDP_LAUNCH + "mixed_precision: fp32\n", "mixed_precision: 'fp32' is not one of no, fp8, fp16, bf16"),
    "boolean": (DDP_LAUNCH.replace("use_cpu: false", "use_cpu: maybe"), "use_cpu: 'maybe' is not true or false"),
    "machine rank": (DDP_LAUNCH.replace("machine_rank: 0", "machine_rank: 3"), "machine_rank: 3 is not between 0 and"),
}


@pytest.mark.parametrize("case", LAUNCH_CONFIGS_REFUSED_IN_ONE_LINE)
def test_a_malformed_accelerate_config_is_refused_in_one_line_naming_the_key(case, tmp_path, capsys):
    from disttrain import launch_config

    text, named = LAUNCH_CONFIGS_REFUSED_IN_ONE_LINE[case]
    path = tmp_path / "launch.yaml"
    path.write_text(text)
    assert launch_config.main([str(path)]) == 2
    printed = capsys.readouterr().err
    assert printed.count("\n") == 1 and printed.startswith(f"config error: {path}: ")
    assert named in printed


def test_every_shipped_accelerate_config_passes_the_launch_check(capsys):
    from disttrain import launch_config

    shipped = os.path.join(REPO, "configs", "accelerate")
    paths = [os.path.join(shipped, name) for name in sorted(os.listdir(shipped))]
    assert launch_config.main(paths) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("script", ["single_node", "multi_node"])
def test_slurm_scripts_refuse_a_malformed_accelerate_config_before_starting_anything(script, tmp_path):
    bad = tmp_path / "launch.yaml"
    bad.write_text(LAUNCH_CONFIGS_REFUSED_IN_ONE_LINE["process count"][0])
    # No Slurm here: were the check passed, the script would go on to scontrol/srun and fail otherwise.
    env = {**os.environ, "ACCELERATE_CONFIG": str(bad), "SLURM_JOB_ID": "7", "SLURM_NNODES": "2"}
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), "/usr/bin", "/bin"])
    result = subprocess.run(
        ["bash", f"slurm/{script}.sbatch", "recipe=seq2seq"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert (
        result.stderr
        == f"config error: {bad}: num_processes: 'two' is not a whole number; give num_processes a whole number\n"
    )
    assert result.stdout == ""  # nothing after the check ran: not even the job's banner


def test_the_start_up_line_names_the_cpu_threads_and_where_their_count_comes_from(monkeypatch):
    import torch

    from disttrain.summary import threads_words

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert threads_words() == f"{torch.get_num_threads()} CPU thread(s) per process (OMP_NUM_THREADS=1)"
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert "torch's default: every core; set OMP_NUM_THREADS to share" in threads_words()


def test_an_empty_mapping_on_the_command_line_empties_what_a_file_set(tmp_path):
    # A merge adds keys and never removes one: without the rule, kwargs={} kept the file's amsgrad,
    # which SGD then refused at its first step.
    (tmp_path / "run.yaml").write_text(
        "recipe: classifier\nclassifier:\n  optimizer:\n    kwargs:\n      amsgrad: true\n"
    )
    config = f"config={tmp_path / 'run.yaml'}"
    assert dict(resolve_config([config], world_size=1).classifier.optimizer.kwargs) == {"amsgrad": True}
    emptied = resolve_config([config, "classifier.optimizer.name=sgd", "classifier.optimizer.kwargs={}"], world_size=1)
    assert emptied.classifier.optimizer.name == "sgd" and dict(emptied.classifier.optimizer.kwargs) == {}
