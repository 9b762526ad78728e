"""causal_lm: a decoder-only transformers model (GPT-2 or Llama) trained on real text, next-token loss.

The token loss is summed over the scored tokens of each micro-batch and averaged over every scored
token of the global batch on all processes, so neither padding nor how documents fall into
micro-batches changes the update. The data is a directory prepared by `python -m disttrain.prepare`
(memory-mapped tokens); by default this Python's own standard library, as bytes, prepared into a
cache on first use (1-2 s). Evaluation: held-out loss and bits per byte beside the held-out text's
unigram byte entropy, and a generated sample in the run directory. The default run (GPT-2, 4 layers,
width 128, blocks of 128 bytes, 600 steps of 32 blocks) reaches 2.51 bits per byte on held-out
files, against a unigram byte entropy of 4.48, in about 3 minutes on 2 CPU cores (203 s of training
measured on a shared machine); the target is 2.6.

Needs the `transformers` extra. Models are built from a config or loaded from a local directory:
nothing is downloaded. To check exactness on a small model (the warmup must fit the check's 3 steps):
`python -m disttrain.check recipe=causal_lm causal_lm.layers=1 causal_lm.width=16 causal_lm.heads=2
causal_lm.block_size=16 causal_lm.optimizer.warmup_steps=0`.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from disttrain.config import (
    TRAINING_BYTES_PER_PARAMETER,
    ConfigError,
    OptimizerConfig,
    at_least,
    fits_in_memory,
    one_of,
    section,
    setting,
)

if TYPE_CHECKING:
    from disttrain.config import Config as RunConfig
    from disttrain.recipe import Recipe

RUN_DEFAULTS = {"steps": 600, "global_batch_size": 32, "micro_batch_size": 32, "log_every": 50}

MODELS = ("gpt2", "llama")
INSTALL = "make install EXTRAS=transformers"  # keeps the pinned torch
BYTE_VOCABULARY = 257  # the default data: 256 byte values and a begin-of-document token


@dataclass
class Config:
    data: str = setting(
        "",
        "prepared token directory (python -m disttrain.prepare corpus=... out=...); empty: this Python's "
        "standard library as bytes, prepared into a cache on first use",
    )
    packing: bool = setting(
        False,
        "false: a sample is one document's window (a random chunk of a long one, padding not counted); "
        "true: fixed blocks of the token stream, attention and loss kept inside each document",
    )
    model: str = setting("gpt2", f"transformers architecture built from its config: {', '.join(MODELS)}")
    pretrained: str = setting(
        "", "a local transformers model directory to start from (its sizes replace layers, width, heads)"
    )
    layers: int = setting(4, "transformer layers")
    width: int = setting(128, "hidden size")
    heads: int = setting(4, "attention heads")
    ffn_width: int = setting(0, "feed-forward width; 0: 4 x width")
    block_size: int = setting(128, "tokens per sample (the context the model learns on)")
    dropout: float = setting(0.0, "dropout probability (GPT-2's residual, embedding and attention dropout)")
    attention: str = setting("sdpa", "transformers attention implementation: sdpa, eager, or another it supports")
    eval_tokens: int = setting(131_072, "held-out tokens scored at evaluation (whole documents, a fixed choice)")
    eval_batch_size: int = setting(64, "windows per forward at evaluation")
    sample_tokens: int = setting(400, "tokens generated into <run dir>/sample.txt at evaluation; 0: none")
    sample_prompt: str = setting("", "text the sample continues; empty: the start of a document")
    sample_temperature: float = setting(0.8, "sampling temperature of the sample (seeded by the run seed); 0: greedy")
    target_bits_per_byte: float = setting(
        2.6, "held-out bits per byte the run is expected to reach (or beat); the summary says if it did"
    )
    optimizer: OptimizerConfig = section(
        lambda: OptimizerConfig(lr=3e-3, weight_decay=0.1, beta2=0.99, warmup_steps=20, min_lr_ratio=0.1),
        "the model's optimizer",
    )

    def validate(self, run: RunConfig) -> None:
        k = run.recipe_section
        if importlib.util.find_spec("transformers") is None:
            raise ConfigError(f"recipe={run.recipe} needs the transformers package: {INSTALL}")
        one_of(f"{k}.model", self.model, MODELS)
        for size in ("layers", "width", "heads", "eval_tokens", "eval_batch_size"):
            at_least(f"{k}.{size}", getattr(self, size), 1)
        at_least(f"{k}.block_size", self.block_size, 2)
        at_least(f"{k}.ffn_width", self.ffn_width, 0)
        at_least(f"{k}.sample_tokens", self.sample_tokens, 0)
        at_least(f"{k}.sample_temperature", self.sample_temperature, 0)
        if self.width % self.heads:
            raise ConfigError(f"{k}.width={self.width} must be divisible by {k}.heads={self.heads}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"{k}.dropout={self.dropout} must lie in [0, 1)")
        vocabulary = self._data_vocabulary(k)
        w, f = self.width, self.ffn_width or 4 * self.width
        parameters = self.layers * (4 * w * w + 2 * w * f) + (vocabulary + self.block_size) * w
        fits_in_memory(
            f"{k}.width={w}, {k}.layers={self.layers} and {k}.ffn_width", parameters * TRAINING_BYTES_PER_PARAMETER
        )
        if self.pretrained:
            self._check_pretrained(k, vocabulary)
        self.optimizer.validate(f"{k}.optimizer", run.steps)

    def _data_vocabulary(self, k: str) -> int:
        """The prepared data's vocabulary size (the default data is prepared later, as bytes)."""
        if not self.data:
            return BYTE_VOCABULARY
        from disttrain.data.tokens import FORMAT, is_prepared, read_meta

        if not is_prepared(self.data):
            found = os.path.isdir(self.data) and os.path.isfile(os.path.join(self.data, "meta.json"))
            problem = f"prepared in another format (not {FORMAT})" if found else "not a prepared directory"
            raise ConfigError(
                f"{k}.data={self.data}: {problem}; prepare it with: python -m disttrain.prepare "
                f"corpus=<folder of text files> out={self.data}"
            )
        return int(read_meta(self.data)["vocab_size"])

    def _check_pretrained(self, k: str, vocabulary: int) -> None:
        config_file = os.path.join(self.pretrained, "config.json")
        if not os.path.isfile(config_file):
            raise ConfigError(
                f"{k}.pretrained={self.pretrained}: no config.json there; give a local transformers model "
                "directory (save_pretrained's output)"
            )
        with open(config_file) as f:
            config = json.load(f)
        if config.get("vocab_size", vocabulary) < vocabulary:
            raise ConfigError(
                f"{k}.pretrained={self.pretrained} has a vocabulary of {config['vocab_size']}, the data's tokenizer "
                f"{vocabulary}; prepare the data with that model's tokenizer (python -m disttrain.prepare "
                f"tokenizer={self.pretrained} ...)"
            )
        positions = config.get("n_positions", config.get("max_position_embeddings", self.block_size))
        if positions < self.block_size:
            raise ConfigError(
                f"{k}.block_size={self.block_size} exceeds the {positions} positions of {k}.pretrained={self.pretrained}"
            )


def build(run: RunConfig) -> Recipe:
    from .recipe import CausalLMRecipe

    return CausalLMRecipe(run)
