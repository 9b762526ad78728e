"""tied: a tiny language model whose output layer is its input embedding (one tensor, two names).

`lm_head.weight is transformer.wte.weight` in GPT-2 and most language models; here the names are
`token_embedding.weight` (first in state_dict order, the one files keep) and `output.weight` (its
alias, and the alphabetically first: safetensors' `save_model` would keep that one). Synthetic
data: each token's target is a fixed function of it, so the loss falls.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from disttrain.config import Config as RunConfig
from disttrain.config import OptimizerConfig, at_least, lr_multiplier, section, setting
from disttrain.optim import build_group
from disttrain.recipe import Recipe

RUN_DEFAULTS = {"steps": 6, "global_batch_size": 16, "micro_batch_size": 4, "log_every": 2}
NUM_EVAL = 16


@dataclass
class Config:
    vocab_size: int = setting(16, "tokens")
    dim: int = setting(8, "embedding width")
    num_train: int = setting(64, "training tokens, generated from the seed")
    optimizer: OptimizerConfig = section(
        lambda: OptimizerConfig(name="sgd", lr=0.1, momentum=0.9, schedule="constant"), "the optimizer"
    )

    def validate(self, run: RunConfig) -> None:
        at_least(f"{run.recipe_section}.vocab_size", self.vocab_size, 2)
        at_least(f"{run.recipe_section}.dim", self.dim, 1)
        self.optimizer.validate(f"{run.recipe_section}.optimizer", run.steps)


class TiedLM(nn.Module):
    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, dim)
        nn.init.normal_(self.token_embedding.weight, std=0.3)
        self.mix = nn.Linear(dim, dim)
        self.output = nn.Linear(dim, vocab_size, bias=False)
        self.output.weight = self.token_embedding.weight  # the tie: one Parameter, two names

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.output(torch.tanh(self.mix(self.token_embedding(tokens))))

    def is_tied(self) -> bool:
        return self.output.weight is self.token_embedding.weight


class TiedRecipe(Recipe):
    def __init__(self, run: RunConfig):
        c: Config = run.recipe_config
        g = torch.Generator().manual_seed(run.seed)
        self.tokens = torch.randint(c.vocab_size, (c.num_train + NUM_EVAL,), generator=g)
        self.targets = (3 * self.tokens + 1) % c.vocab_size
        self.count = c.num_train
        model = TiedLM(c.vocab_size, c.dim)
        super().__init__(
            {"model": model}, [build_group("model", model.parameters(), c.optimizer, run.steps, lr_multiplier(run))]
        )

    @property
    def num_train(self) -> int:
        return self.count

    def train_batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tokens[indices], self.targets[indices]

    def item_counts(self, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, int]:
        return {"loss": len(batch[0])}

    def losses(
        self, models: dict[str, nn.Module], batch: tuple[torch.Tensor, torch.Tensor]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        tokens, targets = batch
        yield "loss", nn.functional.cross_entropy(models["model"](tokens), targets, reduction="sum")

    def evaluate(self, models: dict[str, nn.Module], rank: int, world_size: int) -> dict[str, torch.Tensor]:
        tokens, targets = self.tokens[self.count :][rank::world_size], self.targets[self.count :][rank::world_size]
        with torch.no_grad():
            loss = nn.functional.cross_entropy(models["model"](tokens), targets, reduction="sum").double()
        return {"loss": torch.stack([loss, torch.tensor(float(len(targets)), dtype=torch.float64)])}


def build(run: RunConfig) -> TiedRecipe:
    return TiedRecipe(run)
