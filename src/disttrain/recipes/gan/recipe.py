"""The GAN's models, data, phases and evaluation (its keys and defaults are in __init__.py).

Each optimizer step runs `d_steps` discriminator phases, then one generator phase; every phase is
its own accumulation window with its own update, as exact as the core's:

- D phase: real data and fakes from G under `no_grad` (detached: G gets nothing). The optional R1
  penalty on real data is a separate loss term, lazily every `r1_every` D updates, backpropagated
  before the adversarial term so that its double-backward graph is freed first.
- G phase: D is frozen (`requires_grad_(False)`) and called without its DDP wrapper, so it is never
  synchronised and no gradient reaches it (otherwise D would also train on G's loss, a mistake
  peers' GAN examples make). DDP was built with D trainable, as it must be.

Fakes are keyed by their position in the global batch, like the real samples by their index, so
the data of a step does not depend on the world size. Evaluation uses an exponential moving
average of G's weights.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from disttrain.config import Config, lr_multiplier
from disttrain.optim import build_group
from disttrain.recipe import Phase, Recipe

from . import Config as GANConfig

STD = {"ring": 0.02, "grid": 0.05}


def mode_centers(dataset: str) -> torch.Tensor:
    if dataset == "ring":
        angles = torch.arange(8) * (2 * math.pi / 8)
        return 2.0 * torch.stack([angles.cos(), angles.sin()], dim=1)
    grid = torch.arange(-4.0, 5.0, 2.0)
    return torch.cartesian_prod(grid, grid)


def sample_mixture(dataset: str, count: int, generator: torch.Generator) -> torch.Tensor:
    centers = mode_centers(dataset)
    which = torch.randint(len(centers), (count,), generator=generator)
    return centers[which] + STD[dataset] * torch.randn(count, 2, generator=generator)


def mlp(inputs: int, hidden: int, layers: int, outputs: int, activation: type[nn.Module]) -> nn.Sequential:
    parts: list[nn.Module] = []
    width = inputs
    for _ in range(layers):
        parts += [nn.Linear(width, hidden), activation()]
        width = hidden
    parts.append(nn.Linear(width, outputs))
    return nn.Sequential(*parts)


def score_samples(fake: torch.Tensor, dataset: str) -> tuple[int, float]:
    """Modes covered and the share of high-quality samples (within 3 standard deviations of a mode).

    A mode counts as covered when it holds at least 5% of its fair share of high-quality samples,
    which keeps a single stray sample from counting as coverage.
    """
    centers = mode_centers(dataset).to(fake)
    distance, nearest = torch.cdist(fake, centers).min(dim=1)
    good = distance <= 3 * STD[dataset]
    per_mode = torch.bincount(nearest[good], minlength=len(centers))
    covered = int((per_mode >= 0.05 * len(fake) / len(centers)).sum())
    return covered, float(good.float().mean())


class GANRecipe(Recipe):
    def __init__(self, cfg: Config):
        g: GANConfig = cfg.recipe_config
        self.cfg, self.seed = g, cfg.seed
        self.real = sample_mixture(g.dataset, g.num_train, torch.Generator().manual_seed(cfg.seed))
        generator = mlp(g.z_dim, g.hidden, g.layers, 2, nn.ReLU)
        discriminator = mlp(2, g.hidden, g.layers, 1, lambda: nn.LeakyReLU(0.2))
        self.ema = copy.deepcopy(generator).requires_grad_(False) if g.ema_decay > 0 else generator
        scale = lr_multiplier(cfg)
        self.g_group = build_group("generator", generator.parameters(), g.generator, cfg.steps, scale)
        self.d_group = build_group(
            "discriminator", discriminator.parameters(), g.discriminator, cfg.steps * g.d_steps, scale
        )
        self.window_size = cfg.global_batch_size
        self._noise_cache: tuple[tuple[int, int], torch.Tensor] | None = None
        super().__init__({"generator": generator, "discriminator": discriminator}, [self.g_group, self.d_group])

    # ------------------------------------------------------------------ data

    @property
    def num_train(self) -> int:
        return len(self.real)

    def train_batch(self, indices: list[int]) -> torch.Tensor:
        return self.real[indices]

    def noise(self, data_step: int, phase: int, plan) -> torch.Tensor:
        """Latent codes of a micro-batch: row i of the window's table belongs to global position i."""
        key = (data_step, phase)
        if self._noise_cache is None or self._noise_cache[0] != key:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + data_step * 2 + phase)
            table = torch.randn(self.window_size, self.cfg.z_dim, generator=g).to(self.real.dtype)
            self._noise_cache = (key, table)
        return self._noise_cache[1][plan.start : plan.start + len(plan.indices)]

    def data_steps(self, steps: int) -> int:
        return steps * self.cfg.d_steps

    # ------------------------------------------------------------------ phases

    def phases(self, step: int) -> list[Phase]:
        g = self.cfg
        phases = []
        for k in range(g.d_steps):
            data_step = step * g.d_steps + k
            with_r1 = g.r1_gamma > 0 and data_step % g.r1_every == 0

            def d_batch(plan, data_step=data_step):
                return {"real": self.real[plan.indices], "z": self.noise(data_step, 0, plan)}

            phases.append(
                Phase(
                    name="discriminator",
                    models=("discriminator",),
                    groups=[self.d_group],
                    terms=("r1", "d_loss") if with_r1 else ("d_loss",),
                    item_counts=lambda batch: {"r1": len(batch["real"]), "d_loss": len(batch["real"])},
                    losses=lambda trained, batch, with_r1=with_r1: self.d_losses(trained, batch, with_r1),
                    make_batch=d_batch,
                    data_step=data_step,
                )
            )
        last = step * g.d_steps + g.d_steps - 1

        def g_batch(plan):
            # The G window has the shape of the last D window: shorter at the end of an epoch too.
            return {"z": self.noise(last, 1, plan)}

        phases.append(
            Phase(
                name="generator",
                models=("generator",),
                groups=[self.g_group],
                terms=("g_loss",),
                item_counts=lambda batch: {"g_loss": len(batch["z"])},
                losses=self.g_losses,
                make_batch=g_batch,
                data_step=last,
                frozen=(self.models["discriminator"],),
                after_update=self.update_ema,
            )
        )
        return phases

    # ------------------------------------------------------------------ losses

    # `trained` are the trainer's wrapped models (synchronised); `self.models` the plain modules, used
    # where a model takes part without training: G making fakes for D, frozen D judging G.

    def d_losses(self, trained: dict[str, nn.Module], batch: dict, with_r1: bool) -> Iterator[tuple[str, torch.Tensor]]:
        d = trained["discriminator"]
        real = batch["real"]
        if with_r1:
            # torch.func, not torch.autograd.grad: DeepSpeed's ZeRO 2 runs its gradient reduction at
            # the end of every autograd pass, an input-gradient pass too, but skips functorch's.
            # The result is differentiable in D's parameters all the same (the penalty's backward).
            forward = self.input_gradient_forward(d)
            grad = torch.func.grad(lambda x: forward(x).sum())(real.detach())
            weight = 0.5 * self.cfg.r1_gamma * self.cfg.r1_every  # lazy: rarer, proportionally stronger
            yield "r1", weight * grad.pow(2).sum()
        with torch.no_grad():
            fake = self.models["generator"](batch["z"])
        logits = d(torch.cat([real, fake])).squeeze(1)
        real_logits, fake_logits = logits[: len(real)], logits[len(real) :]
        if self.cfg.loss == "hinge":
            loss = F.relu(1 - real_logits) + F.relu(1 + fake_logits)
        else:
            loss = F.softplus(-real_logits) + F.softplus(fake_logits)
        yield "d_loss", loss.sum()

    def g_losses(self, trained: dict[str, nn.Module], batch: dict) -> Iterator[tuple[str, torch.Tensor]]:
        logits = self.models["discriminator"](trained["generator"](batch["z"])).squeeze(1)
        loss = -logits if self.cfg.loss == "hinge" else F.softplus(-logits)
        yield "g_loss", loss.sum()

    def images(self) -> list[str]:
        path = os.path.join(self.run_dir or "", "samples.png")
        return [path] if self.run_dir and os.path.exists(path) else []

    def exported_models(self) -> dict[str, nn.Module]:
        ema = {} if self.ema is self.models["generator"] else {"generator_ema": self.ema}
        return {**self.models, **ema}

    @torch.no_grad()
    def update_ema(self) -> None:
        if self.ema is self.models["generator"]:
            return
        live = self.models["generator"]
        with self.full_weights(live):  # ZeRO 3 partitions the live weights
            if next(self.ema.parameters()).device != next(live.parameters()).device:
                self.ema.to(next(live.parameters()).device)
            # Under DeepSpeed bf16 the live weights are bf16 copies of the engine's fp32 master weights.
            weights = [p.to(e.dtype) for e, p in zip(self.ema.parameters(), live.parameters(), strict=True)]
            torch._foreach_lerp_(list(self.ema.parameters()), weights, 1.0 - self.cfg.ema_decay)

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self, models: dict[str, nn.Module], rank: int, world_size: int) -> dict[str, torch.Tensor]:
        # Every process scores the same samples (cheap in 2-D): the sum over processes divided by
        # the summed count is then the value itself.
        device = next(models["generator"].parameters()).device
        z = torch.randn(self.cfg.num_eval, self.cfg.z_dim, generator=torch.Generator().manual_seed(self.seed + 17))
        ema = self.ema.to(device)
        ema.eval()
        fake = ema(z.to(device)).float()
        covered, quality = score_samples(fake, self.cfg.dataset)
        if self.main_process and self.run_dir is not None:
            save_scatter(self.real[:2000], fake.cpu(), os.path.join(self.run_dir, "samples.png"))
        one = torch.ones((), dtype=torch.float64, device=device)
        return {"modes_covered": torch.stack([covered * one, one]), "high_quality": torch.stack([quality * one, one])}

    def summary(self, metrics: dict[str, float]) -> str:
        modes = len(mode_centers(self.cfg.dataset))
        wanted = self.cfg.min_modes or modes
        ok = metrics["modes_covered"] >= wanted and metrics["high_quality"] >= self.cfg.min_high_quality
        return (
            f"{metrics['modes_covered']:.0f} of {modes} modes covered, {metrics['high_quality']:.1%} high-quality "
            f"samples ({'reached' if ok else 'below'} the target of {wanted} modes and "
            f"{self.cfg.min_high_quality:.0%})"
        )


def save_scatter(real: torch.Tensor, fake: torch.Tensor, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    ax.scatter(real[:, 0], real[:, 1], s=2, alpha=0.5, label="real")
    ax.scatter(fake[:, 0], fake[:, 1], s=2, alpha=0.5, label="generated (EMA)")
    ax.set_aspect("equal")
    ax.legend(loc="upper right", markerscale=4)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png")
    plt.close(fig)
    os.replace(path + ".tmp.png", path)
    return path
