"""The seq2seq model, data, losses and evaluation (its keys and defaults are in __init__.py).

An optional auxiliary loss (predict the target length from the encoder) is computed and
backpropagated on its own before the token loss, freeing its graph early.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from disttrain.config import Config, lr_multiplier
from disttrain.optim import build_group
from disttrain.recipe import Recipe

from . import Config as Seq2SeqConfig

PAD, BOS, EOS = 0, 1, 2
FIRST_TOKEN = 3


# --------------------------------------------------------------------------- data


@dataclass
class SequenceSet:
    """Source sequences (right-padded) and their lengths."""

    tokens: torch.Tensor  # [N, max_len] int64, PAD after each length
    lengths: torch.Tensor  # [N]


def generate_sequences(cfg: Seq2SeqConfig, count: int, seed: int, exclude: SequenceSet | None = None) -> SequenceSet:
    """`count` random sequences from `seed`; with `exclude`, none that appear there (held-out data)."""
    g = torch.Generator().manual_seed(seed)
    seen = set(map(tuple, exclude.tokens.tolist())) if exclude is not None else set()
    batches, have = [], 0
    while have < count:
        n = max(count, 1024)
        lengths = torch.randint(cfg.min_len, cfg.max_len + 1, (n,), generator=g)
        tokens = torch.randint(FIRST_TOKEN, FIRST_TOKEN + cfg.vocab_size, (n, cfg.max_len), generator=g)
        tokens[torch.arange(cfg.max_len) >= lengths[:, None]] = PAD
        if seen:
            keep = torch.tensor([tuple(row) not in seen for row in tokens.tolist()])
            tokens, lengths = tokens[keep], lengths[keep]
        batches.append((tokens, lengths))
        have += len(lengths)
        if exclude is not None and have == 0 and len(batches) > 50:
            raise ValueError("every held-out candidate is in the training set: raise seq2seq.max_len or vocab_size")
    tokens = torch.cat([t for t, _ in batches])[:count]
    lengths = torch.cat([n for _, n in batches])[:count]
    return SequenceSet(tokens, lengths)


def targets_of(task: str, src: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The answer for each source row, padded the same way."""
    tgt = torch.full_like(src, PAD)
    for i, n in enumerate(lengths.tolist()):
        row = src[i, :n]
        tgt[i, :n] = row.flip(0) if task == "reverse" else row.sort().values
    return tgt


def collate(data: SequenceSet, task: str, indices: list[int]) -> dict[str, torch.Tensor]:
    """Pad to the longest sequence of this micro-batch (so token counts differ between micro-batches)."""
    lengths = data.lengths[indices]
    width = int(lengths.max())
    src = data.tokens[indices, :width]
    answer = targets_of(task, src, lengths)
    batch_size = len(indices)
    # Decoder reads BOS + answer and predicts answer + EOS.
    tgt_in = torch.cat([torch.full((batch_size, 1), BOS), answer], dim=1)
    tgt_out = torch.cat([answer, torch.full((batch_size, 1), PAD)], dim=1)
    tgt_out[torch.arange(batch_size), lengths] = EOS
    return {"src": src, "tgt_in": tgt_in, "tgt_out": tgt_out, "lengths": lengths}


# --------------------------------------------------------------------------- model


class Encoder(nn.Module):
    def __init__(self, cfg: Seq2SeqConfig, with_length_head: bool):
        super().__init__()
        vocab = FIRST_TOKEN + cfg.vocab_size
        self.embed = nn.Embedding(vocab, cfg.d_model, padding_idx=PAD)
        self.position = nn.Embedding(cfg.max_len + 1, cfg.d_model)
        layer = nn.TransformerEncoderLayer(
            cfg.d_model, cfg.n_heads, cfg.ffn_dim, cfg.dropout, batch_first=True, norm_first=True
        )
        self.layers = nn.TransformerEncoder(layer, cfg.encoder_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.d_model)
        self.length_head = nn.Linear(cfg.d_model, cfg.max_len + 1) if with_length_head else None

    def forward(self, src: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(src.shape[1], device=src.device)
        x = self.embed(src) + self.position(positions)
        return self.norm(self.layers(x, src_key_padding_mask=src == PAD))

    def length_logits(self, memory: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        valid = (src != PAD).unsqueeze(-1).to(memory.dtype)
        pooled = (memory * valid).sum(1) / valid.sum(1)
        return self.length_head(pooled)


class Decoder(nn.Module):
    def __init__(self, cfg: Seq2SeqConfig):
        super().__init__()
        vocab = FIRST_TOKEN + cfg.vocab_size
        self.embed = nn.Embedding(vocab, cfg.d_model, padding_idx=PAD)
        self.position = nn.Embedding(cfg.max_len + 2, cfg.d_model)
        layer = nn.TransformerDecoderLayer(
            cfg.d_model, cfg.n_heads, cfg.ffn_dim, cfg.dropout, batch_first=True, norm_first=True
        )
        self.layers = nn.TransformerDecoder(layer, cfg.decoder_layers)
        self.norm = nn.LayerNorm(cfg.d_model)
        self.out = nn.Linear(cfg.d_model, vocab)

    def forward(self, tgt_in: torch.Tensor, memory: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        width = tgt_in.shape[1]
        positions = torch.arange(width, device=tgt_in.device)
        x = self.embed(tgt_in) + self.position(positions)
        causal = torch.ones(width, width, dtype=torch.bool, device=tgt_in.device).triu(1)
        h = self.layers(
            x,
            memory,
            tgt_mask=causal,
            tgt_is_causal=True,
            tgt_key_padding_mask=tgt_in == PAD,
            memory_key_padding_mask=src == PAD,
        )
        return self.out(self.norm(h))


class Seq2Seq(nn.Module):
    """Both halves in one module, so DDP wraps (and syncs) them together."""

    def __init__(self, cfg: Seq2SeqConfig):
        super().__init__()
        self.encoder = Encoder(cfg, with_length_head=cfg.aux_length_weight > 0)
        self.decoder = Decoder(cfg)

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor | None = None) -> torch.Tensor:
        """Token logits for `tgt_in`, or length logits when no decoder input is given."""
        memory = self.encoder(src)
        if tgt_in is None:
            return self.encoder.length_logits(memory, src)
        return self.decoder(tgt_in, memory, src)

    @torch.no_grad()
    def greedy_decode(self, src: torch.Tensor, max_new: int) -> torch.Tensor:
        memory = self.encoder(src)
        out = torch.full((src.shape[0], 1), BOS, device=src.device)
        for _ in range(max_new):
            logits = self.decoder(out, memory, src)[:, -1]
            out = torch.cat([out, logits.argmax(-1, keepdim=True)], dim=1)
        return out[:, 1:]


# --------------------------------------------------------------------------- recipe


class Seq2SeqRecipe(Recipe):
    shard_blocks = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)  # FSDP: one unit per layer

    def __init__(self, cfg: Config):
        s: Seq2SeqConfig = cfg.recipe_config
        self.cfg = s
        self.aux_weight = s.aux_length_weight
        self.terms = ("length", "tokens") if self.aux_weight > 0 else ("tokens",)
        # The length head is not reached by the last (token) term, so DDP must look for it.
        self.find_unused_parameters = self.aux_weight > 0
        self.train_set = generate_sequences(s, s.num_train, seed=cfg.seed)
        self.eval_set = generate_sequences(s, s.num_eval, seed=cfg.seed + 7_919, exclude=self.train_set)
        model = Seq2Seq(s)
        scale = lr_multiplier(cfg)
        groups = [
            build_group("encoder", model.encoder.parameters(), s.encoder, cfg.steps, scale),
            build_group("decoder", model.decoder.parameters(), s.decoder, cfg.steps, scale),
        ]
        super().__init__({"seq2seq": model}, groups)

    @property
    def num_train(self) -> int:
        return len(self.train_set.lengths)

    def train_batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return collate(self.train_set, self.cfg.task, indices)

    def item_counts(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"tokens": (batch["tgt_out"] != PAD).sum(), "length": batch["src"].shape[0]}

    def losses(
        self, models: dict[str, nn.Module], batch: dict[str, torch.Tensor]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        model = models["seq2seq"]
        if self.aux_weight > 0:
            length_logits = model(batch["src"])
            yield (
                "length",
                self.aux_weight * F.cross_entropy(length_logits, batch["lengths"], reduction="sum"),
            )
        logits = model(batch["src"], batch["tgt_in"])
        yield (
            "tokens",
            F.cross_entropy(logits.flatten(0, 1), batch["tgt_out"].flatten(), ignore_index=PAD, reduction="sum"),
        )

    def items_per_sample(self) -> str:
        return "tokens"

    def evaluate(self, models: dict[str, nn.Module], rank: int, world_size: int) -> dict[str, torch.Tensor]:
        model: Seq2Seq = models["seq2seq"]
        device = next(model.parameters()).device
        shard = list(range(rank, len(self.eval_set.lengths), world_size))
        correct = torch.zeros((), dtype=torch.float64, device=device)
        for start in range(0, len(shard), 256):
            batch = collate(self.eval_set, self.cfg.task, shard[start : start + 256])
            src, expected = batch["src"].to(device), batch["tgt_out"].to(device)
            predicted = model.greedy_decode(src, max_new=expected.shape[1])
            # A sequence is right when every position up to and including EOS matches.
            matches = (predicted == expected) | (expected == PAD)
            correct += matches.all(dim=1).sum()
        total = torch.tensor(float(len(shard)), dtype=torch.float64, device=device)
        return {"exact_match": torch.stack([correct, total])}

    def summary(self, metrics: dict[str, float]) -> str:
        em = metrics["exact_match"]
        verdict = "reached" if em >= self.cfg.target_exact_match else "below"
        return f"exact-match {em:.1%} on held-out sequences ({verdict} the {self.cfg.target_exact_match:.0%} target)"
