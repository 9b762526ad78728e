"""The independent single-process reference: whole global batch, plain PyTorch, no accumulation.

It shares the recipes' models and data with the code under test, but none of the accumulation
core: its losses are torch's own means over the whole global batch, so a wrong count, scale or
missing sync in the core cannot cancel out here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from torch import nn

from disttrain.config import Config
from disttrain.data.windows import WindowSampler
from disttrain.recipes import build_recipe
from disttrain.recipes.seq2seq import PAD


def to_float64(recipe) -> None:
    """Run a recipe in float64 so that the comparisons can be tight."""
    for model in recipe.models.values():
        model.double()
    if hasattr(recipe, "train_x"):
        recipe.train_x = recipe.train_x.double()
        recipe.eval_x = recipe.eval_x.double()


def whole_batch_loss(cfg: Config, models: dict[str, nn.Module], batch) -> torch.Tensor:
    if cfg.recipe == "classifier":
        x, y = batch
        return F.cross_entropy(models["model"](x), y)
    model = models["seq2seq"]
    logits = model(batch["src"], batch["tgt_in"])
    loss = F.cross_entropy(logits.flatten(0, 1), batch["tgt_out"].flatten(), ignore_index=PAD)
    if cfg.seq2seq.aux_length_weight > 0:
        loss = loss + cfg.seq2seq.aux_length_weight * F.cross_entropy(model(batch["src"]), batch["lengths"])
    return loss


def reference_run(cfg: Config, steps: int) -> dict:
    """Gradients before each step and parameters after `steps` steps, on one process in float64."""
    set_seed(cfg.seed)
    recipe = build_recipe(cfg)
    to_float64(recipe)
    sampler = WindowSampler(recipe.num_train, cfg.global_batch_size, cfg.micro_batch_size, cfg.seed)
    grads = []
    for step in range(steps):
        batch = recipe.train_batch(sampler.global_batch(step))
        whole_batch_loss(cfg, recipe.models, batch).backward()
        grads.append(named_grads(recipe.models))
        for g in recipe.groups:
            if g.clip_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(g.params, g.clip_grad_norm)
            g.optimizer.step()
            g.scheduler.step()
        for model in recipe.models.values():
            model.zero_grad(set_to_none=True)
    return {"grads": grads, "params": named_params(recipe.models)}


def named_grads(models: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    return {
        f"{m}.{n}": p.grad.detach().clone().cpu()
        for m, model in models.items()
        for n, p in unwrap(model).named_parameters()
        if p.grad is not None
    }


def named_params(models: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    return {
        f"{m}.{n}": p.detach().clone().cpu() for m, model in models.items() for n, p in unwrap(model).named_parameters()
    }


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)
