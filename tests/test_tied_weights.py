"""Tied weights (one tensor under two names, as GPT-2's `lm_head.weight is transformer.wte.weight`):
stored once with their aliases, loadable by plain safetensors and transformers, loaded back with the
tie intact, resumed bit-identically on every engine, exported from a DeepSpeed checkpoint.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from safetensors.torch import load, load_file
from torch import nn

from disttrain.checkpoint import CheckpointError, _load_weights
from disttrain.weights import deduplicated, file_aliases, read_weights, weights_bytes, write_weights
from tests.fixture_recipes.tied import TiedLM
from tests.test_checkpoint import train

TIED = ["recipe=tests.fixture_recipes.tied", "tracker=none", "progress_bar=false"]
KEPT, ALIAS = "token_embedding.weight", "output.weight"  # first in state_dict order; alphabetically first


class OneProcess:
    """What `write_weights` asks of an engine, for one process with whole weights."""

    is_main_process = True

    def full_weights(self, module: nn.Module) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


def tied_model(seed: int) -> TiedLM:
    torch.manual_seed(seed)
    return TiedLM(16, 8)


def assert_same_weights(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys() and got
    for name, value in expected.items():
        assert torch.equal(got[name], value), f"{name} differs"


def test_a_tied_tensor_is_stored_once_and_loads_back_tied(tmp_path):
    model = tied_model(0)
    write_weights({"model": model}, str(tmp_path), OneProcess())
    file = tmp_path / "model.safetensors"
    assert sorted(load_file(file)) == ["mix.bias", "mix.weight", KEPT]  # what a plain safetensors user reads
    assert file_aliases(file) == {ALIAS: KEPT}
    state = read_weights(file)
    assert state[ALIAS] is state[KEPT]
    assert_same_weights(state, model.state_dict())

    other = tied_model(1)
    other.load_state_dict(read_weights(file))  # strict: every name is there
    assert other.is_tied()
    assert_same_weights(other.state_dict(), model.state_dict())
    other = tied_model(2)
    _load_weights(other, str(file), str(tmp_path))  # the checkpoint's loader
    assert other.is_tied()
    assert_same_weights(other.state_dict(), model.state_dict())

    # A model without the tie would train two tensors where the saved run trained one: refused.
    untied = tied_model(3)
    untied.output.weight = nn.Parameter(untied.output.weight.detach().clone())
    with pytest.raises(CheckpointError, match=f"ties {ALIAS} = {KEPT}, the model ties nothing"):
        _load_weights(untied, str(file), str(tmp_path))
    write_weights({"untied": untied}, str(tmp_path), OneProcess())
    assert file_aliases(tmp_path / "untied.safetensors") == {}
    with pytest.raises(CheckpointError, match=f"ties nothing, the model ties {ALIAS} = {KEPT}"):
        _load_weights(tied_model(4), str(tmp_path / "untied.safetensors"), str(tmp_path))


def test_shared_names_are_one_view_of_one_tensor_not_any_shared_buffer():
    # DeepSpeed's export gives a tie back as one tensor object under both names...
    shared, other = torch.randn(4, 3), torch.randn(2)
    tensors, metadata = deduplicated({"b": shared, "a": shared, "c": other})
    assert list(tensors) == ["b", "c"] and metadata["aliases"] == '{"a": "b"}'
    # ...while ZeRO 1/2 keeps every parameter as a view into one flat buffer: not ties.
    flat = torch.arange(10.0)
    assert load(weights_bytes({"x": flat[:4], "y": flat[4:]})).keys() == {"x", "y"}


def test_a_tied_model_resumes_bit_identically_with_its_tie(tmp_path):
    args = [*TIED, "checkpoint_every=3"]
    straight = train(tmp_path, "straight", *args)
    middle = tmp_path / "straight" / "checkpoints" / "step-00000003"
    assert file_aliases(middle / "models" / "model.safetensors") == {ALIAS: KEPT}
    resumed = train(tmp_path, "resumed", *args, f"resume={middle}")
    assert resumed.start_step == 3
    assert straight.recipe.models["model"].is_tied() and resumed.recipe.models["model"].is_tied()
    final = read_weights(tmp_path / "straight" / "model.safetensors")
    assert final[ALIAS] is final[KEPT]
    assert_same_weights(read_weights(tmp_path / "resumed" / "model.safetensors"), final)
    assert_same_weights(final, straight.recipe.models["model"].state_dict())


# --------------------------------------------------------------------------- DeepSpeed, 2 processes

STAGES = ("2", "3")


def train_under_each_engine(output_dir: str) -> dict:
    """On every rank of one process group: for ZeRO 2 and 3, a straight run with a checkpoint at
    step 3 and a run resumed from it; a straight DDP run to compare with. Reports the ties."""
    from disttrain.config import world_size_from_env
    from disttrain.preflight import resolve_config
    from disttrain.trainer import Trainer

    def trainer(name: str, *args: str) -> Trainer:
        cfg = resolve_config([*TIED, *args, f"output_dir={output_dir}/{name}"], world_size=world_size_from_env())
        return Trainer(cfg)

    ties = {}
    for stage in STAGES:
        args = [f"deepspeed_config=configs/deepspeed/zero{stage}.json", "checkpoint_every=3"]
        straight = trainer(f"zero{stage}", *args, "run_name=straight")
        straight.fit()
        middle = f"{output_dir}/zero{stage}/straight/checkpoints/step-00000003"
        resumed = trainer(f"zero{stage}", *args, "run_name=resumed", f"resume={middle}")
        tied_on_resume = resumed.recipe.models["model"].is_tied()
        resumed.fit()
        ties[stage] = {
            "start": resumed.start_step,
            "straight": straight.recipe.models["model"].is_tied(),
            "on resume": tied_on_resume,
            "resumed": resumed.recipe.models["model"].is_tied(),
        }
    trainer("ddp", "run_name=straight", "checkpoint_every=0").fit()
    return ties


@pytest.fixture(scope="module")
def deepspeed_runs(tmp_path_factory) -> tuple:
    pytest.importorskip("deepspeed", reason="DeepSpeed is an extra: pip install -e '.[deepspeed]'")
    from tests.dist import run_distributed

    out = tmp_path_factory.mktemp("tied-deepspeed")
    # Set up before any test's own environment (conftest): the ranks' scratch files go here, not to /tmp.
    (out / "scratch").mkdir()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TMPDIR", str(out / "scratch"))
        return out, run_distributed(train_under_each_engine, 2, str(out), timeout=300)[0]


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_a_tied_model_resumes_bit_identically_under_zero(deepspeed_runs, stage):
    out, ties = deepspeed_runs
    assert ties[stage] == {"start": 3, "straight": True, "on resume": True, "resumed": True}
    run = out / f"zero{stage}"
    for file in (
        run / "straight" / "checkpoints" / "step-00000003" / "models" / "model.safetensors",
        run / "straight" / "model.safetensors",
    ):
        assert file_aliases(file) == {ALIAS: KEPT}
    final = read_weights(run / "straight" / "model.safetensors")
    assert final[ALIAS] is final[KEPT]
    assert_same_weights(read_weights(run / "resumed" / "model.safetensors"), final)
    # Both uses of the tied tensor reach its gradient, partitioned or not: the DDP path's weights.
    ddp = read_weights(out / "ddp" / "straight" / "model.safetensors")
    for name, value in ddp.items():
        torch.testing.assert_close(final[name], value, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_a_deepspeed_checkpoint_of_a_tied_model_exports_to_its_final_weights(deepspeed_runs, stage, capsys):
    from disttrain.export import main

    out, _ = deepspeed_runs
    run = out / f"zero{stage}" / "straight"
    exported = out / f"zero{stage}-export.safetensors"
    main([str(run / "checkpoints" / "step-00000006" / "deepspeed" / "model"), str(exported), "--tag", "state"])
    assert (
        capsys.readouterr().out.splitlines()[-1] == f"wrote 3 tensors to {exported}; 1 tied name(s) recorded as aliases"
    )
    assert file_aliases(exported) == {ALIAS: KEPT}
    assert_same_weights(read_weights(exported), read_weights(run / "model.safetensors"))


@pytest.mark.slow
def test_a_gpt2_model_keeps_its_tie_and_its_file_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")

    def gpt2(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32)
        return transformers.GPT2LMHeadModel(config)

    model = gpt2(0)
    assert model.lm_head.weight is model.transformer.wte.weight
    write_weights({"model": model}, str(tmp_path), OneProcess())
    assert file_aliases(tmp_path / "model.safetensors") == {"lm_head.weight": "transformer.wte.weight"}
    other = gpt2(1)
    _load_weights(other, str(tmp_path / "model.safetensors"), str(tmp_path))
    assert other.lm_head.weight is other.transformer.wte.weight
    assert_same_weights(other.state_dict(), model.state_dict())

    # transformers keeps the same name of the tie (it drops lm_head.weight): from_pretrained reads the file.
    model.config.save_pretrained(tmp_path)
    loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    assert_same_weights(loaded.state_dict(), model.state_dict())
