"""seq2seq: a Transformer encoder/decoder on a synthetic variable-length task, separate optimizers.

The encoder and the decoder each have their own learning rate, weight decay, schedule and clip
threshold. The token loss is averaged over every valid target token of the global batch, not per
micro-batch. The default run reaches 100% held-out exact-match in about a minute on 2 CPU cores.
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
    memory_bytes,
    one_of,
    section,
    setting,
)

if TYPE_CHECKING:
    from disttrain.config import Config as RunConfig
    from disttrain.recipe import Recipe

RUN_DEFAULTS = {"steps": 1000, "global_batch_size": 64, "micro_batch_size": 32}


@dataclass
class Config:
    task: str = setting("reverse", "synthetic task: reverse or sort a random-length token sequence")
    vocab_size: int = setting(16, "number of content tokens (padding, start and end come on top)")
    min_len: int = setting(2, "shortest source sequence")
    max_len: int = setting(16, "longest source sequence")
    num_train: int = setting(50_000, "training sequences, generated from the seed")
    num_eval: int = setting(512, "held-out sequences for exact-match evaluation")
    d_model: int = setting(64, "Transformer width")
    n_heads: int = setting(4, "attention heads")
    encoder_layers: int = setting(2, "encoder layers")
    decoder_layers: int = setting(2, "decoder layers")
    ffn_dim: int = setting(256, "feed-forward width")
    dropout: float = setting(0.0, "dropout probability")
    aux_length_weight: float = setting(
        0.0,
        "weight of an auxiliary per-sample loss (predict the length from the encoder), backpropagated separately",
    )
    target_exact_match: float = setting(0.95, "exact-match the run is expected to reach; the summary says if it did")
    encoder: OptimizerConfig = section(lambda: OptimizerConfig(lr=2e-3, weight_decay=0.01), "encoder optimizer")
    decoder: OptimizerConfig = section(lambda: OptimizerConfig(lr=2e-3, weight_decay=0.01), "decoder optimizer")

    def validate(self, run: RunConfig) -> None:
        k = run.recipe_section
        one_of(f"{k}.task", self.task, ("reverse", "sort"))
        at_least(f"{k}.vocab_size", self.vocab_size, 2)
        at_least(f"{k}.min_len", self.min_len, 1)
        if self.max_len < self.min_len:
            raise ConfigError(f"{k}.max_len={self.max_len} is below {k}.min_len={self.min_len}")
        at_least(f"{k}.num_train", self.num_train, 1)
        at_least(f"{k}.num_eval", self.num_eval, 1)
        for size in ("d_model", "n_heads", "encoder_layers", "decoder_layers", "ffn_dim"):
            at_least(f"{k}.{size}", getattr(self, size), 1)
        # The sequences are generated in memory: refuse what cannot fit before trying.
        needed = (self.num_train + self.num_eval) * (self.max_len + 2) * 8 * 2  # int64 sources and targets
        if needed > memory_bytes() // 2:
            raise ConfigError(
                f"{k}.num_train={self.num_train} x {k}.max_len={self.max_len} needs about {needed / 2**30:.1f} GiB "
                f"for the sequences alone, more than half of this machine's {memory_bytes() / 2**30:.0f} GiB; lower them"
            )
        d, f, layers = self.d_model, self.ffn_dim, self.encoder_layers + 2 * self.decoder_layers  # cross-attention
        parameters = layers * 4 * d * d + (self.encoder_layers + self.decoder_layers) * 2 * d * f
        fits_in_memory(
            f"{k}.d_model={d}, {k}.ffn_dim={f} and the layers", (parameters + 4 * d * d) * TRAINING_BYTES_PER_PARAMETER
        )
        fits_the_data(run, f"{k}.num_train", self.num_train)
        between(f"{k}.target_exact_match", self.target_exact_match, 0, 1)
        if self.d_model % self.n_heads:
            raise ConfigError(f"{k}.d_model={self.d_model} must be divisible by {k}.n_heads={self.n_heads}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"{k}.dropout={self.dropout} must lie in [0, 1)")
        at_least(f"{k}.aux_length_weight", self.aux_length_weight, 0)
        self.encoder.validate(f"{k}.encoder", run.steps)
        self.decoder.validate(f"{k}.decoder", run.steps)
        if run.deepspeed_config:
            # DeepSpeed runs one optimizer per model: encoder and decoder become two parameter groups
            # of it (own learning rate, weight decay, schedule), clipped together by one global norm.
            e, d = self.encoder, self.decoder
            if e.name != d.name:
                raise ConfigError(
                    f"DeepSpeed runs one optimizer per model: {k}.encoder.name={e.name} and "
                    f"{k}.decoder.name={d.name} cannot share it; use one optimizer class for both"
                )
            if e.clip_grad_norm != d.clip_grad_norm:
                raise ConfigError(
                    f"DeepSpeed clips one global norm per model: {k}.encoder.clip_grad_norm={e.clip_grad_norm} "
                    f"and {k}.decoder.clip_grad_norm={d.clip_grad_norm} differ; set them equal"
                )


def build(run: RunConfig) -> Recipe:
    from .recipe import Seq2SeqRecipe

    return Seq2SeqRecipe(run)
