"""broken: a small recipe with seeded mistakes (`broken.bug=...`, several joined by `+`), for
`python -m disttrain.check`.

bug=none is correct. mean: the loss is a mean, not a sum. count: item_counts() gives a fixed number.
unfrozen: the second model's phase leaves gradients in the first (a GAN that forgets to freeze D).
random: a sample changes between calls for the same index. unused: a parameter gets no gradient and
the recipe does not say so. nan: the critic's loss is NaN. world: the critic's loss is divided by the
number of processes. Not mistakes: `broken.batchnorm=true` puts a BatchNorm layer in the critic;
`broken.shift=true` a learned shift that a per-sample centring cancels, so its gradient is zero but
for float32 rounding (as a bias before a normalisation layer), which RMSprop amplifies.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from disttrain.config import Config as RunConfig
from disttrain.config import OptimizerConfig, one_of, section, setting
from disttrain.optim import build_group
from disttrain.recipe import Phase, Recipe

RUN_DEFAULTS = {"steps": 3}
BUGS = ("none", "mean", "count", "unfrozen", "random", "unused", "nan", "world")


@dataclass
class Config:
    bug: str = setting("none", f"the seeded mistake(s), joined by '+': {', '.join(BUGS)}")
    batchnorm: bool = setting(False, "a BatchNorm layer in the critic")
    shift: bool = setting(False, "a learned shift in the critic that a per-sample centring cancels")
    optimizer: OptimizerConfig = section(lambda: OptimizerConfig(name="sgd", lr=0.1, momentum=0.9), "optimizer")

    def validate(self, run: RunConfig) -> None:
        for bug in self.bug.split("+"):
            one_of(f"{run.recipe_section}.bug", bug, BUGS)


class Critic(nn.Module):
    def __init__(self, unused: bool, batchnorm: bool, shift: bool):
        super().__init__()
        normalised = [nn.BatchNorm1d(8)] if batchnorm else []
        self.body = nn.Sequential(nn.Linear(3, 8), *normalised, nn.Tanh(), nn.Linear(8, 1))
        self.spare = nn.Linear(3, 1) if unused else None
        self.shift = nn.Parameter(torch.zeros(1)) if shift else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shift is None:
            return self.body(x)
        h = self.body[0](x) + self.shift
        return self.body[1:](h - h.mean(1, keepdim=True))


class BrokenRecipe(Recipe):
    def __init__(self, run: RunConfig):
        c: Config = run.recipe_config
        self.bugs = set(c.bug.split("+"))
        g = torch.Generator().manual_seed(run.seed)
        self.x = torch.randn(200, 3, generator=g)
        self.y = torch.sin(self.x.sum(1, keepdim=True))
        critic, maker = Critic("unused" in self.bugs, c.batchnorm, c.shift), nn.Linear(3, 3)
        groups = [
            build_group("critic", critic.parameters(), c.optimizer, run.steps),
            build_group("maker", maker.parameters(), c.optimizer, run.steps),
        ]
        super().__init__({"critic": critic, "maker": maker}, groups)

    @property
    def num_train(self) -> int:
        return len(self.x)

    def train_batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        x = self.x[indices]
        if "random" in self.bugs:
            x = x + 0.01 * torch.randn(x.shape)
        return {"x": x, "y": self.y[indices]}

    def phases(self, step: int) -> list[Phase]:
        def critic_losses(models: dict[str, nn.Module], batch: dict) -> Iterator[tuple[str, torch.Tensor]]:
            error = (models["critic"](batch["x"]) - batch["y"]).pow(2)
            if "nan" in self.bugs:
                error = error * float("nan")
            if "world" in self.bugs and torch.distributed.is_initialized():
                error = error / torch.distributed.get_world_size()
            yield "fit", error.mean() if "mean" in self.bugs else error.sum()

        def maker_losses(models: dict[str, nn.Module], batch: dict) -> Iterator[tuple[str, torch.Tensor]]:
            # the critic it does not train is called as the plain module, not through its DDP or
            # DeepSpeed wrapper (as the GAN recipe does)
            yield "make", self.models["critic"](models["maker"](batch["x"])).pow(2).sum()

        def make_batch(plan):
            return self.train_batch(plan.indices)

        counts = (lambda batch: {"fit": 4}) if "count" in self.bugs else (lambda batch: {"fit": len(batch["x"])})
        return [
            Phase("critic", ("critic",), [self.groups[0]], ("fit",), counts, critic_losses, make_batch, step),
            Phase(
                "maker",
                ("maker",),
                [self.groups[1]],
                ("make",),
                lambda batch: {"make": len(batch["x"])},
                maker_losses,
                make_batch,
                step,
                frozen=() if "unfrozen" in self.bugs else (self.models["critic"],),
            ),
        ]

    def evaluate(self, models: dict[str, nn.Module], rank: int, world_size: int) -> dict[str, torch.Tensor]:
        one = torch.ones((), dtype=torch.float64)
        return {"nothing": torch.stack([one, one])}


def build(run: RunConfig) -> BrokenRecipe:
    return BrokenRecipe(run)
