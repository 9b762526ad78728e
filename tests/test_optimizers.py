"""Any optimizer: `adamw`, `sgd`, or an importable class with its keyword arguments, on DDP and DeepSpeed."""

from __future__ import annotations

import tempfile

import pytest
import torch

from disttrain.config import ConfigError, OptimizerConfig
from disttrain.optim import build_group
from disttrain.preflight import resolve_config
from tests.dist import run_distributed
from tests.workers import run_engine_cases

STRICT = "tests.fixture_recipes.optimizers.StrictSGD"


def test_a_class_by_path_gets_its_keyword_arguments_and_decay_spares_biases():
    model = torch.nn.Linear(3, 2)
    o = OptimizerConfig(name="torch.optim.RAdam", lr=0.01, weight_decay=0.1, kwargs={"decoupled_weight_decay": True})
    group = build_group("m", model.parameters(), o, total_steps=4)
    assert type(group.optimizer) is torch.optim.RAdam and group.optimizer.defaults["decoupled_weight_decay"]
    decays = {tuple(p.shape): g["weight_decay"] for g in group.optimizer.param_groups for p in g["params"]}
    assert decays == {(2, 3): 0.1, (2,): 0.0}


def test_optimizer_classes_are_checked_before_launch():
    def refused(*args: str) -> str:
        with pytest.raises(ConfigError) as e:
            resolve_config(["recipe=classifier", *args], world_size=1)
        return str(e.value)

    assert "no such optimizer class" in refused("classifier.optimizer.name=torch.optim.Lion2")
    assert "is not a torch.optim.Optimizer subclass" in refused("classifier.optimizer.name=collections.OrderedDict")
    missing = refused(f"classifier.optimizer.name={STRICT}")
    assert "missing a required argument: 'damping'" in missing and "classifier.optimizer.kwargs.<name>" in missing
    unexpected = refused(f"classifier.optimizer.name={STRICT}", "classifier.optimizer.kwargs.damping=0.5",
                         "classifier.optimizer.kwargs.dampen=0.1")  # fmt: skip
    assert "unexpected keyword argument 'dampen'" in unexpected, unexpected
    assert "remove classifier.optimizer.kwargs.dampen (" in unexpected and "damping" in unexpected, unexpected
    assert "takes no weight_decay" in refused(
        f"classifier.optimizer.name={STRICT}",
        "classifier.optimizer.kwargs.damping=0.5",
        "classifier.optimizer.weight_decay=0.1",
    )
    cfg = resolve_config(
        ["recipe=classifier", f"classifier.optimizer.name={STRICT}", "classifier.optimizer.kwargs.damping=0.5"], 1
    )
    assert dict(cfg.classifier.optimizer.kwargs) == {"damping": 0.5}


@pytest.mark.slow
def test_any_optimizer_trains_alike_on_ddp_and_deepspeed():
    """RAdam with a keyword argument, and a class whose constructor requires every argument (DeepSpeed
    rebuilds it from its defaults): each trains to the same weights on DDP and ZeRO 2."""
    cases = [("classifier", "short", 4, "ddp"), ("classifier", "short", 4, "configs/deepspeed/zero2.json")]
    optimizers = {
        "radam": ["name=torch.optim.RAdam", "weight_decay=0.01", "kwargs.decoupled_weight_decay=true"],
        "strict": [f"name={STRICT}", "kwargs.damping=0.5", "lr=0.2"],
    }
    trained = {}
    with tempfile.TemporaryDirectory() as out:
        for name, settings in optimizers.items():
            extra = [f"classifier.optimizer.{o}" for o in settings]
            trained[name] = run_distributed(run_engine_cases, 2, cases, out, 3, *extra, timeout=300)[0]
    for got in trained.values():
        ddp, zero2 = got[cases[0]], got[cases[1]]
        for name, value in ddp.items():
            torch.testing.assert_close(zero2[name], value, rtol=1e-5, atol=1e-6)
    radam, strict = trained["radam"][cases[0]], trained["strict"][cases[0]]
    assert any(not torch.equal(value, strict[name]) for name, value in radam.items()), "each class was used"
