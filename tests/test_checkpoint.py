"""Checkpoints in one process: exact resume, atomic publication, and refusals that name the problem."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from disttrain.checkpoint import CheckpointError, complete_checkpoints, prune
from disttrain.preflight import resolve_config
from disttrain.rundir import RunDirError
from disttrain.safe_files import file_sha256
from disttrain.trainer import Trainer
from tests.cases import RECIPES, TINY_GAN
from tests.launcher import REPO, launch

SHAPE = ["steps=6", "global_batch_size=16", "micro_batch_size=4", "log_every=2", "progress_bar=false"]
CASES = {
    # dropout on: the random generator must come back with the weights
    "seq2seq": [*RECIPES["seq2seq_aux"], "seq2seq.dropout=0.2", "seq2seq.num_train=40", "seq2seq.num_eval=8"],
    "gan": ["recipe=gan", *TINY_GAN, "gan.num_train=40", "gan.d_steps=2", "gan.r1_every=2"],
}
# The same through DeepSpeed engines (their own checkpoints), one stage per recipe not covered by
# test_resume.py's ZeRO 3 seq2seq run
CASES["gan-zero1"] = [*CASES["gan"], "deepspeed_config=configs/deepspeed/zero1.json"]
CASES["classifier-zero2"] = [
    *RECIPES["classifier"],
    "classifier.num_train=40",
    "deepspeed_config=configs/deepspeed/zero2.json",
]


def train(tmp_path, name: str, *args: str) -> Trainer:
    cfg = resolve_config([*args, f"output_dir={tmp_path}", f"run_name={name}"], world_size=1)
    trainer = Trainer(cfg)
    try:
        trainer.fit()
    finally:
        trainer.close()  # as train.py does: DeepSpeed's process group goes with its run
    # A one-process DeepSpeed run sets these for DeepSpeed; left set, the next run would be distributed.
    assert not {"RANK", "LOCAL_RANK", "WORLD_SIZE"} & os.environ.keys()
    return trainer


def weights(run_dir) -> dict[str, dict[str, torch.Tensor]]:
    return {f: load_file(os.path.join(run_dir, f)) for f in sorted(os.listdir(run_dir)) if f.endswith(".safetensors")}


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for file, tensors in a.items():
        for name, value in tensors.items():
            assert torch.equal(value, b[file][name]), f"{file}:{name} differs"


@pytest.mark.parametrize("case", list(CASES))
def test_resume_from_a_middle_checkpoint_is_bit_identical(tmp_path, case):
    args = [*CASES[case], *SHAPE, "checkpoint_every=3"]
    straight = train(tmp_path, "straight", *args)
    assert [os.path.basename(p) for p in complete_checkpoints(straight.run_dir)] == ["step-00000003", "step-00000006"]
    resumed = train(tmp_path, "resumed", *args, f"resume={tmp_path}/straight/checkpoints/step-00000003")
    assert resumed.resumed_from and resumed.start_step == 3
    assert_identical(weights(tmp_path / "straight"), weights(tmp_path / "resumed"))

    # Resuming a finished run trains nothing and leaves the weights as they were.
    again = train(tmp_path, "straight", *args)
    assert again.start_step == 6
    assert_identical(weights(tmp_path / "straight"), weights(tmp_path / "resumed"))


def test_resume_auto_and_never(tmp_path):
    args = [*CASES["seq2seq"], *SHAPE, "checkpoint_every=2", "steps=4"]
    assert train(tmp_path, "a", *args).resumed_from is None  # nothing to resume yet
    cfg = resolve_config([*args, f"output_dir={tmp_path}", "run_name=a"], world_size=1)
    assert Trainer(cfg).start_step == 4  # auto: the newest complete checkpoint
    cfg = resolve_config([*args, f"output_dir={tmp_path}", "run_name=b", "resume=never"], world_size=1)
    assert Trainer(cfg).start_step == 0
    # never, into a directory with checkpoints, would mix two runs' checkpoints: refused (issue 15)
    cfg = resolve_config([*args, f"output_dir={tmp_path}", "run_name=a", "resume=never"], world_size=1)
    with pytest.raises(RunDirError, match="holds checkpoints of an earlier run and resume=never would mix"):
        Trainer(cfg)


# The training script with checkpoint publication of step 3 stalled: the test kills it there.
STALLED_AT_STEP_3 = """
import runpy, sys, time
import disttrain.checkpoint as checkpoint
fsync = checkpoint._fsync
def stalled(path):
    if "step-00000003.tmp" in path:
        print("stalled in the write of step 3", flush=True)
        time.sleep(600)
    fsync(path)
checkpoint._fsync = stalled
sys.argv = sys.argv[1:]  # drop "-c": the launcher passes train.py and its arguments
runpy.run_path("train.py", run_name="__main__")
"""


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_one(tmp_path):
    from tests.launcher import kill_when

    args = [*CASES["seq2seq"], *SHAPE, "checkpoint_every=1", f"output_dir={tmp_path}"]
    launch([sys.executable], *args, "run_name=straight")
    partial = tmp_path / "killed" / "checkpoints" / "step-00000003.tmp" / "manifest.json"
    killed = kill_when([sys.executable, "-c", STALLED_AT_STEP_3], *args, "run_name=killed", ready=partial.exists)
    assert killed.returncode == -9 and "stalled in the write of step 3" in killed.stdout
    # Everything of step 3 was written, but it was not published: it is not a checkpoint.
    assert [os.path.basename(p) for p in complete_checkpoints(tmp_path / "killed")][-1] == "step-00000002"

    resumed = launch([sys.executable], *args, "run_name=killed")
    assert "resuming from" in resumed.stdout and "step-00000002 at step 2" in resumed.stdout
    assert not list((tmp_path / "killed" / "checkpoints").glob("*.tmp"))
    assert_identical(weights(tmp_path / "straight"), weights(tmp_path / "killed"))


@pytest.fixture
def finished(tmp_path):
    """A finished 4-step run with checkpoints at steps 2 and 4, built once per test."""
    args = [*CASES["seq2seq"], *SHAPE, "checkpoint_every=2", "steps=4"]
    train(tmp_path, "run", *args)
    return args, tmp_path / "run" / "checkpoints" / "step-00000004"


def resume_error(tmp_path, args, *more) -> str:
    cfg = resolve_config([*args, f"output_dir={tmp_path}", "run_name=other", *more], world_size=1)
    with pytest.raises(CheckpointError) as e:
        Trainer(cfg)
    return str(e.value)


def test_a_truncated_file_is_named(tmp_path, finished):
    args, path = finished
    file = path / "models" / "seq2seq.safetensors"
    file.write_bytes(file.read_bytes()[:-10])
    message = resume_error(tmp_path, args, f"resume={path}")
    assert "models/seq2seq.safetensors" in message and "damaged" in message and "step-00000002" in message


def test_a_checkpoint_of_other_settings_is_refused_naming_them(tmp_path, finished):
    args, path = finished
    message = resume_error(tmp_path, args, f"resume={path}", "seq2seq.d_model=32", "global_batch_size=32")
    assert "seq2seq.d_model: 16 -> 32" in message and "global_batch_size: 16 -> 32" in message
    # Settings that do not change the update may differ: the accumulation follows micro_batch_size.
    cfg = resolve_config(
        [*args, f"output_dir={tmp_path}", "run_name=other", f"resume={path}", "micro_batch_size=8", "log_every=1"],
        world_size=1,
    )
    assert Trainer(cfg).start_step == 4


class Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_pickled_object_is_not_run(tmp_path, finished, monkeypatch):
    args, path = finished
    monkeypatch.chdir(tmp_path)
    state = path / "trainer.pt"
    torch.save({"step": 4, "evil": Payload()}, state)
    manifest = json.loads((path / "manifest.json").read_text())
    # the manifest agrees (size and checksum): only the loader protects
    manifest["files"]["trainer.pt"] = {"bytes": state.stat().st_size, "sha256": file_sha256(state)}
    (path / "manifest.json").write_text(json.dumps(manifest))
    message = resume_error(tmp_path, args, f"resume={path}")
    assert "trainer.pt is unreadable" in message
    assert not (tmp_path / "pwned").exists()


def test_old_checkpoints_are_pruned_and_unpublished_ones_removed(tmp_path):
    args = [*CASES["seq2seq"], *SHAPE, "checkpoint_every=1", "keep_checkpoints=2"]
    trainer = train(tmp_path, "run", *args)
    assert [os.path.basename(p) for p in complete_checkpoints(trainer.run_dir)] == ["step-00000005", "step-00000006"]
    prune(trainer.run_dir, 1)
    assert [os.path.basename(p) for p in complete_checkpoints(trainer.run_dir)] == ["step-00000006"]
    leftover = tmp_path / "run" / "checkpoints" / "step-00000007.tmp"
    leftover.mkdir()
    cfg = resolve_config([*args, f"output_dir={tmp_path}", "run_name=run"], world_size=1)
    Trainer(cfg)
    assert not leftover.exists()


def test_checkpoint_files_load_without_pickles(tmp_path, finished):
    _, path = finished
    for file in ("optimizers.pt", "trainer.pt", "rng/rank-0.pt"):
        torch.load(path / file, weights_only=True)  # raises on anything but tensors and plain containers
    assert json.loads((path / "manifest.json").read_text())["step"] == 4
    assert subprocess.run([sys.executable, "-c", "import disttrain.checkpoint"], cwd=REPO).returncode == 0


def test_a_checkpoint_round_trip_needs_no_trainer(tmp_path):
    """Explicit state in, the same state out: an engine, models and a plain dict, no Trainer."""
    from disttrain.checkpoint import load_checkpoint, save_checkpoint
    from disttrain.config import OptimizerConfig
    from disttrain.engines.ddp import DDPEngine
    from disttrain.optim import build_group

    cfg = resolve_config([*RECIPES["classifier"], f"output_dir={tmp_path}", "tracker=none"], world_size=1)

    def built() -> tuple[DDPEngine, torch.nn.Module]:
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)
        engine = DDPEngine(cfg)
        engine.wrap({"m": model}, [build_group("m", model.parameters(), OptimizerConfig(), total_steps=4)])
        return engine, model

    engine, model = built()
    model(torch.randn(5, 3)).sum().backward()
    engine.update(["m"], engine.groups, None)  # one Adam step: the optimizer state is not empty
    path = save_checkpoint(str(tmp_path), 1, engine, {"m": model}, {"step": 1, "anything": [2, 3]}, cfg)
    random_after_save = torch.rand(3)

    other_engine, other = built()
    torch.rand(7)  # the random generator moves on before the load
    restored = load_checkpoint(path, other_engine, {"m": other}, cfg)
    assert restored.state == {"step": 1, "anything": [2, 3]} and restored.note == ""
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True))
    saved_adam = engine.groups[0].optimizer.state_dict()["state"]
    loaded_adam = other_engine.groups[0].optimizer.state_dict()["state"]
    assert saved_adam.keys() == loaded_adam.keys() and all(
        torch.equal(saved_adam[k]["exp_avg"], loaded_adam[k]["exp_avg"]) for k in saved_adam
    )
    assert torch.equal(torch.rand(3), random_after_save), "the random generators come back as saved"
