"""hf_datasets: a user's recipe whose training data is a Hugging Face `datasets.Dataset` read from a local file.

`python train.py recipe=tests.fixture_recipes.hf_datasets hf_datasets.data_file=rows.jsonl` trains a
small MLP on JSON lines `{"x": [x1, ..., xn], "y": y}` (needs the `datasets` extra). The data set is
map-style (`__getitem__` and `__len__`), so it goes straight into `train_dataset`: the trainer picks
each window's samples by index and the default `collate` stacks the samples' tensors. The last
`num_eval` rows are held out for evaluation.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import datasets
import torch
from torch import nn

from disttrain.config import Config as RunConfig
from disttrain.config import ConfigError, OptimizerConfig, at_least, lr_multiplier, section, setting
from disttrain.optim import build_group
from disttrain.recipe import Recipe

RUN_DEFAULTS = {"steps": 12, "global_batch_size": 16, "micro_batch_size": 4, "log_every": 4}


@dataclass
class Config:
    data_file: str = setting("", 'JSON-lines file of {"x": [floats], "y": float} rows (required)')
    num_eval: int = setting(8, "rows at the end of the file held out for evaluation")
    hidden: int = setting(8, "width of the hidden layer")
    optimizer: OptimizerConfig = section(
        lambda: OptimizerConfig(name="sgd", lr=0.05, momentum=0.9, schedule="constant", clip_grad_norm=0.5),
        "the optimizer",
    )

    def validate(self, run: RunConfig) -> None:
        key = run.recipe_section
        if not self.data_file:
            raise ConfigError(f"{key}.data_file is required: a JSON-lines file of {{'x': [floats], 'y': float}} rows")
        if not os.path.isfile(self.data_file):
            raise ConfigError(f"{key}.data_file={self.data_file}: no such file")
        at_least(f"{key}.num_eval", self.num_eval, 1)
        at_least(f"{key}.hidden", self.hidden, 1)
        self.optimizer.validate(f"{key}.optimizer", run.steps)


class HFDatasetsRecipe(Recipe):
    def __init__(self, run: RunConfig):
        c: Config = run.recipe_config
        rows = datasets.load_dataset("json", data_files=c.data_file, split="train").with_format("torch")
        if len(rows) <= c.num_eval:
            raise ValueError(f"{c.data_file} has {len(rows)} rows: more than num_eval={c.num_eval} are needed")
        self.train_dataset = rows.select(range(len(rows) - c.num_eval))
        held_out = rows.select(range(len(rows) - c.num_eval, len(rows)))[:]  # one dict of stacked tensors
        self.eval_x, self.eval_y = held_out["x"], held_out["y"]
        model = nn.Sequential(nn.Linear(self.eval_x.shape[1], c.hidden), nn.Tanh(), nn.Linear(c.hidden, 1))
        super().__init__(
            {"model": model}, [build_group("model", model.parameters(), c.optimizer, run.steps, lr_multiplier(run))]
        )

    # `collate` is the default: the samples {"x": tensor, "y": tensor} become {"x": [B, n], "y": [B]}.

    def item_counts(self, batch: dict[str, torch.Tensor]) -> dict[str, int]:
        return {"loss": len(batch["y"])}

    def losses(
        self, models: dict[str, nn.Module], batch: dict[str, torch.Tensor]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        model = models["model"]
        dtype = next(model.parameters()).dtype  # the file's floats arrive as float32
        prediction = model(batch["x"].to(dtype)).squeeze(-1)
        yield "loss", (prediction - batch["y"].to(dtype)).pow(2).sum()

    def evaluate(self, models: dict[str, nn.Module], rank: int, world_size: int) -> dict[str, torch.Tensor]:
        model = models["model"]
        dtype, device = next(model.parameters()).dtype, next(model.parameters()).device
        x, y = self.eval_x[rank::world_size].to(device, dtype), self.eval_y[rank::world_size].to(device, dtype)
        with torch.no_grad():
            error = (model(x).squeeze(-1) - y).pow(2).sum().double()
        return {"mse": torch.stack([error, torch.tensor(float(len(y)), dtype=torch.float64, device=device)])}


def build(run: RunConfig) -> HFDatasetsRecipe:
    return HFDatasetsRecipe(run)
