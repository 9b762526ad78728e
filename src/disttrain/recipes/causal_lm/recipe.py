"""The causal_lm model, losses and evaluation (its keys and defaults are in __init__.py, its samples
in data.py).

The loss of a micro-batch is the cross-entropy summed over its scored tokens, and `item_counts`
says how many there are: the accumulation core divides by the count of the whole global window on
all processes. (Averaging each micro-batch's loss over its own tokens first, then over micro-batches,
weighs a token of a short micro-batch more than one of a long micro-batch: the bug transformers'
Trainer had with gradient accumulation until 4.46.)
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from disttrain.config import Config, lr_multiplier
from disttrain.data.tokens import BYTES, TokenSplit, read_meta
from disttrain.optim import build_group
from disttrain.prepare import ensure_default_data
from disttrain.recipe import Recipe

from . import Config as CausalLMConfig
from .data import IGNORE, DocumentWindows, PackedBlocks, eval_batches, eval_documents

MODEL = "model"  # the weights become <run dir>/model.safetensors: with config.json, a from_pretrained directory


def build_model(c: CausalLMConfig, vocab_size: int, bos: int) -> nn.Module:
    """A transformers causal LM from a config (random initialisation, seeded by the caller) or a
    local directory; float32, no cache (a cache object would switch off the packed-document mask)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if c.pretrained:
        model = AutoModelForCausalLM.from_pretrained(
            c.pretrained, local_files_only=True, attn_implementation=c.attention
        )
        model = model.float()
    else:
        ffn = c.ffn_width or 4 * c.width
        sizes: dict[str, Any] = {
            "gpt2": {
                "n_layer": c.layers,
                "n_embd": c.width,
                "n_head": c.heads,
                "n_inner": ffn,
                "n_positions": c.block_size,
                "resid_pdrop": c.dropout,
                "embd_pdrop": c.dropout,
                "attn_pdrop": c.dropout,
            },
            "llama": {
                "num_hidden_layers": c.layers,
                "hidden_size": c.width,
                "num_attention_heads": c.heads,
                "num_key_value_heads": c.heads,
                "intermediate_size": ffn,
                "max_position_embeddings": c.block_size,
                "attention_dropout": c.dropout,
            },
        }[c.model]
        config = AutoConfig.for_model(
            c.model, vocab_size=vocab_size, bos_token_id=bos, eos_token_id=bos, pad_token_id=None, **sizes
        )
        model = AutoModelForCausalLM.from_config(config, attn_implementation=c.attention)
    model.config.use_cache = False
    return model


def block_classes(model: nn.Module) -> tuple[type[nn.Module], ...]:
    """The model's decoder layer classes (GPT2Block, LlamaDecoderLayer): those its `_no_split_modules`
    names, which transformers keeps whole when it places a model; FSDP makes each one a unit."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return tuple(dict.fromkeys(type(m) for m in model.modules() if type(m).__name__ in names))


class CausalLMRecipe(Recipe):
    terms = ("tokens",)

    def __init__(self, cfg: Config):
        c: CausalLMConfig = cfg.recipe_config
        self.cfg = c
        self.seed = cfg.seed
        # Printed by the one process that prepares (not always the main one: whoever locks first).
        self.data_dir = c.data or ensure_default_data(print)
        self.meta = read_meta(self.data_dir)
        train, self.eval_split = TokenSplit(self.data_dir, "train"), TokenSplit(self.data_dir, "eval")
        self.train_dataset = (PackedBlocks if c.packing else DocumentWindows)(train, c.block_size)
        self.eval_docs = eval_documents(self.eval_split, c.eval_tokens)
        model = build_model(c, int(self.meta["vocab_size"]), int(self.meta["bos_token"]))
        group = build_group(MODEL, model.parameters(), c.optimizer, cfg.steps, lr_multiplier(cfg))
        super().__init__({MODEL: model}, [group])
        self.shard_blocks = block_classes(model)  # per architecture, so per instance
        self._tokenizer: Any = None

    def item_counts(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"tokens": (batch["labels"] != IGNORE).sum()}

    def losses(
        self, models: dict[str, nn.Module], batch: dict[str, torch.Tensor]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        yield "tokens", token_loss(models[MODEL], batch)

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, models: dict[str, nn.Module], rank: int, world_size: int) -> dict[str, torch.Tensor]:
        model = models[MODEL]
        device = next(model.parameters()).device
        documents = self.eval_docs[rank::world_size]
        nats = torch.zeros((), dtype=torch.float64, device=device)
        tokens = torch.zeros((), dtype=torch.float64, device=device)
        with torch.no_grad():
            for batch in eval_batches(self.eval_split, documents, self.cfg.block_size, self.cfg.eval_batch_size):
                batch = {k: v.to(device) for k, v in batch.items()}
                nats += token_loss(model, batch).double()
                tokens += (batch["labels"] != IGNORE).sum()
        text_bytes = float(sum(self.eval_split.document_bytes(d) for d in documents))
        writes = self.main_process and self.run_dir is not None
        if writes:  # beside model.safetensors: the run directory loads with from_pretrained
            self._write(os.path.join(self.run_dir, "config.json"), model.config.to_json_string())
        if rank == 0 and self.cfg.sample_tokens:  # under ZeRO 3 every process has share 0 and generates alike
            sample = self.generate(model, device)
            if writes:
                self._write(os.path.join(self.run_dir, "sample.txt"), sample)
        return {
            "loss": torch.stack([nats, tokens]),
            "bits_per_byte": torch.stack(
                [nats / math.log(2), torch.tensor(text_bytes, dtype=torch.float64, device=device)]
            ),
        }

    @torch.no_grad()
    def generate(self, model: nn.Module, device: torch.device) -> str:
        """The prompt and up to `sample_tokens` tokens after it, sampled under the run seed (the
        training's random state is left as it was). Past the model's context, generation goes on
        from the last half block."""
        c, bos = self.cfg, int(self.meta["bos_token"])
        text = self.encode(c.sample_prompt)
        prompt = len(text)
        how = {"do_sample": True, "temperature": c.sample_temperature, "top_k": 0} if c.sample_temperature else {}
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.seed)
            while len(text) - prompt < c.sample_tokens:
                ids = [bos, *text]
                context = ids if len(ids) < c.block_size else ids[-(c.block_size // 2) :]
                room = min(c.block_size - len(context), c.sample_tokens - (len(text) - prompt))
                out = model.generate(
                    torch.tensor([context], device=device),
                    max_new_tokens=room,
                    use_cache=True,
                    eos_token_id=bos,  # the model would start another document: this one is done
                    pad_token_id=bos,
                    **({"do_sample": False} | how),
                )
                new = out[0, len(context) :].tolist()
                text += [t for t in new if t != bos]
                if bos in new or len(new) < room:
                    break
        return self.decode(text)

    def encode(self, text: str) -> list[int]:
        if self.meta["tokenizer"] == BYTES:
            return list(text.encode())
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        if self.meta["tokenizer"] == BYTES:
            return bytes(ids).decode("utf-8", errors="replace")
        return self.tokenizer.decode(ids)

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.meta["tokenizer"], local_files_only=True)
        return self._tokenizer

    @staticmethod
    def _write(path: str, text: str) -> None:
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)

    def summary(self, metrics: dict[str, float]) -> str:
        bpb, target = metrics["bits_per_byte"], self.cfg.target_bits_per_byte
        entropy = self.meta["splits"]["eval"]["unigram_bits_per_byte"]
        verdict = "reached" if bpb <= target else "above"
        sample = (
            f"; sample in {os.path.join(self.run_dir, 'sample.txt')}" if self.run_dir and self.cfg.sample_tokens else ""
        )
        return (
            f"held-out {bpb:.3f} bits per byte ({verdict} the {target:g} target; unigram byte entropy "
            f"{entropy:.3f}), loss {metrics['loss']:.4f} per token{sample}"
        )


def token_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy summed over the batch's scored tokens (nats)."""
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE, reduction="sum")
