"""gan: generator and discriminator on 2-D toy data, alternating phases that each stay exact.

The default run (8 Gaussians on a ring) covers 8 of 8 modes with over 90% high-quality samples in
about 1-2 minutes on 2 CPU cores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from disttrain.config import (
    TRAINING_BYTES_PER_PARAMETER,
    ConfigError,
    OptimizerConfig,
    at_least,
    between,
    fits_in_memory,
    fits_the_data,
    mlp_parameters,
    one_of,
    section,
    setting,
)
from disttrain.deepspeed_config import zero_stage

if TYPE_CHECKING:
    from disttrain.config import Config as RunConfig
    from disttrain.recipe import Recipe

# One micro-batch per process on one process; set micro_batch_size=128 for 2 processes.
RUN_DEFAULTS = {"steps": 5000, "global_batch_size": 256, "micro_batch_size": 256, "log_every": 250}


@dataclass
class Config:
    dataset: str = setting("ring", "real data: 'ring' (8 Gaussians on a circle) or 'grid' (5x5 Gaussians)")
    num_train: int = setting(16_384, "real training samples, generated from the seed")
    num_eval: int = setting(2_500, "generated samples scored at evaluation")
    z_dim: int = setting(16, "latent size")
    hidden: int = setting(256, "hidden width of both networks")
    layers: int = setting(3, "hidden layers of both networks")
    loss: str = setting("nonsaturating", "adversarial loss: nonsaturating or hinge")
    d_steps: int = setting(1, "discriminator updates per generator update")
    r1_gamma: float = setting(1.0, "R1 penalty weight on real data; 0 turns it off")
    r1_every: int = setting(4, "apply R1 lazily, every N discriminator updates (weighted by N)")
    ema_decay: float = setting(0.99, "decay of the moving average of G's weights used for evaluation; 0 turns it off")
    min_modes: int = setting(0, "modes the run is expected to cover; 0 means all of them")
    min_high_quality: float = setting(0.9, "share of high-quality samples the run is expected to reach")
    generator: OptimizerConfig = section(
        lambda: OptimizerConfig(lr=2e-3, beta1=0.5, beta2=0.99, clip_grad_norm=0.0), "generator optimizer"
    )
    discriminator: OptimizerConfig = section(
        lambda: OptimizerConfig(lr=2e-3, beta1=0.5, beta2=0.99, clip_grad_norm=0.0), "discriminator optimizer"
    )

    def validate(self, run: RunConfig) -> None:
        k = run.recipe_section
        one_of(f"{k}.dataset", self.dataset, ("ring", "grid"))
        one_of(f"{k}.loss", self.loss, ("nonsaturating", "hinge"))
        at_least(f"{k}.num_train", self.num_train, 1)
        at_least(f"{k}.num_eval", self.num_eval, 1)
        at_least(f"{k}.z_dim", self.z_dim, 1)
        at_least(f"{k}.layers", self.layers, 1)
        at_least(f"{k}.hidden", self.hidden, 1)
        at_least(f"{k}.d_steps", self.d_steps, 1)
        at_least(f"{k}.r1_gamma", self.r1_gamma, 0)
        at_least(f"{k}.r1_every", self.r1_every, 1)
        h = self.hidden
        parameters = mlp_parameters(self.z_dim, h, self.layers, 2) + mlp_parameters(2, h, self.layers, 1)  # G, D
        fits_in_memory(f"{k}.hidden={h} and {k}.layers={self.layers}", parameters * TRAINING_BYTES_PER_PARAMETER)
        fits_the_data(run, f"{k}.num_train", self.num_train)
        between(f"{k}.min_high_quality", self.min_high_quality, 0, 1)
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"{k}.ema_decay={self.ema_decay} must lie in [0, 1)")
        self.generator.validate(f"{k}.generator", run.steps)
        self.discriminator.validate(f"{k}.discriminator", run.steps * self.d_steps)
        stage = zero_stage(run)
        if self.r1_gamma > 0 and stage is not None and stage >= 3:
            # R1 takes its input gradient with torch.func, which keeps DeepSpeed's end-of-backward
            # reduction out of that pass; ZeRO 3's partitioned parameters crash the process there.
            raise ConfigError(
                f"{k}.r1_gamma>0 is not supported under ZeRO stage {stage} (its partitioned parameters crash "
                f"R1's input-gradient pass); use ZeRO 1 or 2 (configs/deepspeed/zero2.json), {k}.r1_gamma=0, or DDP"
            )


def build(run: RunConfig) -> Recipe:
    from .recipe import GANRecipe

    return GANRecipe(run)
