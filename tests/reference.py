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
from disttrain.recipe import build_recipe
from disttrain.recipes.seq2seq.recipe import PAD


def to_float64(recipe) -> None:
    """Run a recipe in float64 so that the comparisons can be tight."""
    for model in recipe.models.values():
        model.double()
    if hasattr(recipe, "real"):
        recipe.real = recipe.real.double()
        if recipe.ema is not recipe.models["generator"]:
            recipe.ema.double()
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


def reference_run(cfg: Config, steps: int, clip_per_model: bool = False) -> dict:
    """Gradients before each step and parameters after `steps` steps, on one process in float64.

    `clip_per_model` clips all optimizers of a model by one global norm, as DeepSpeed does.
    """
    set_seed(cfg.seed)
    recipe = build_recipe(cfg)
    to_float64(recipe)
    sampler = WindowSampler(recipe.num_train, cfg.global_batch_size, cfg.micro_batch_size, cfg.seed)
    grads = []
    for step in range(steps):
        batch = recipe.train_batch(sampler.global_batch(step))
        whole_batch_loss(cfg, recipe.models, batch).backward()
        grads.append(named_grads(recipe.models))
        if clip_per_model and recipe.groups[0].clip_grad_norm > 0:
            for model in recipe.models.values():
                torch.nn.utils.clip_grad_norm_(list(model.parameters()), recipe.groups[0].clip_grad_norm)
        for g in recipe.groups:
            if clip_per_model:
                g.optimizer.step()
                g.scheduler.step()
            else:
                step_group(g)
        for model in recipe.models.values():
            model.zero_grad(set_to_none=True)
    return {"grads": grads, "params": named_params(recipe.models)}


def gan_reference_run(cfg: Config, steps: int) -> dict:
    """Alternating whole-batch D and G updates on one process in float64, written from the seed's
    correct ordering: zero before each phase, D frozen while G trains, fakes detached for D."""
    set_seed(cfg.seed)
    recipe = build_recipe(cfg)
    to_float64(recipe)
    g, G, D = cfg.gan, recipe.models["generator"], recipe.models["discriminator"]
    ema = recipe.ema
    sampler = WindowSampler(recipe.num_train, cfg.global_batch_size, cfg.micro_batch_size, cfg.seed)
    d_opt, g_opt = recipe.d_group, recipe.g_group
    grads = []
    for step in range(steps):
        for k in range(g.d_steps):
            data_step = step * g.d_steps + k
            indices = sampler.global_batch(data_step)
            real, z = recipe.real[indices], noise(recipe, data_step, 0, len(indices))
            with torch.no_grad():
                fake = G(z)
            real_logits, fake_logits = D(real).squeeze(1), D(fake).squeeze(1)
            if g.loss == "hinge":
                loss = F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
            else:
                loss = F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
            if g.r1_gamma > 0 and data_step % g.r1_every == 0:
                x = real.clone().requires_grad_(True)
                (grad,) = torch.autograd.grad(D(x).sum(), x, create_graph=True)
                loss = loss + g.r1_gamma / 2 * g.r1_every * grad.pow(2).sum(dim=1).mean()
            loss.backward()
            grads.append(named_grads({"discriminator": D}))
            step_group(d_opt)
            D.zero_grad(set_to_none=True)
        D.requires_grad_(False)
        z = noise(recipe, data_step, 1, len(indices))
        logits = D(G(z)).squeeze(1)
        (-logits.mean() if g.loss == "hinge" else F.softplus(-logits).mean()).backward()
        D.requires_grad_(True)
        grads.append(named_grads({"generator": G}))
        step_group(g_opt)
        G.zero_grad(set_to_none=True)
        with torch.no_grad():
            for e, p in zip(ema.parameters(), G.parameters(), strict=True):
                e.mul_(g.ema_decay).add_((1 - g.ema_decay) * p)
    return {"grads": grads, "params": {**named_params(recipe.models), **named_params({"generator_ema": ema})}}


def noise(recipe, data_step: int, phase: int, count: int) -> torch.Tensor:
    """The first `count` rows of a window's latent table: global positions 0..count-1."""
    g = torch.Generator().manual_seed(recipe.seed * 1_000_003 + data_step * 2 + phase)
    return torch.randn(recipe.window_size, recipe.cfg.z_dim, generator=g)[:count].double()


def step_group(group) -> None:
    if group.clip_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(group.params, group.clip_grad_norm)
    group.optimizer.step()
    group.scheduler.step()


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
