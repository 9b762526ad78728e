"""Tiny configurations shared by the multi-process tests."""

from __future__ import annotations

from disttrain.config import Config
from disttrain.preflight import resolve_config

GLOBAL_BATCH = 48  # divisible by world size x accumulation for worlds 1, 2, 4 and accumulations 1, 3, 4

# Epoch sizes that make the second window full, shorter, or shorter than the world size.
WINDOWS = {"full": 3 * GLOBAL_BATCH, "short": GLOBAL_BATCH + 13, "tiny": GLOBAL_BATCH + 3}

TINY_SEQ2SEQ = [
    "seq2seq.vocab_size=6",
    "seq2seq.min_len=1",
    "seq2seq.max_len=7",
    "seq2seq.num_eval=8",
    "seq2seq.d_model=16",
    "seq2seq.n_heads=2",
    "seq2seq.encoder_layers=1",
    "seq2seq.decoder_layers=1",
    "seq2seq.ffn_dim=32",
    # The two optimizers differ in every knob, and the clip thresholds are low enough to bite.
    "seq2seq.encoder.lr=0.01",
    "seq2seq.encoder.clip_grad_norm=0.05",
    "seq2seq.encoder.warmup_steps=1",
    "seq2seq.decoder.lr=0.003",
    "seq2seq.decoder.weight_decay=0.1",
    "seq2seq.decoder.clip_grad_norm=0.4",
    "seq2seq.decoder.schedule=linear",
]
TINY_CLASSIFIER = [
    "classifier.num_features=6",
    "classifier.num_classes=3",
    "classifier.hidden=16",
    "classifier.num_eval=8",
    "classifier.optimizer.name=sgd",
    "classifier.optimizer.momentum=0.9",
    "classifier.optimizer.lr=0.2",
    "classifier.optimizer.clip_grad_norm=0.15",
]
TINY_GAN = [
    "gan.z_dim=4",
    "gan.hidden=16",
    "gan.layers=2",
    "gan.num_eval=64",
    "gan.ema_decay=0.9",
    "gan.generator.lr=0.003",
    "gan.generator.clip_grad_norm=0.06",
    # SGD for D: Adam would turn float64 rounding in near-zero gradients (hinge-loss biases) into steps.
    "gan.discriminator.name=sgd",
    "gan.discriminator.momentum=0.9",
    "gan.discriminator.lr=0.05",
    "gan.discriminator.weight_decay=0.01",
    "gan.discriminator.clip_grad_norm=0.25",
    "gan.discriminator.schedule=linear",
]
GAN_RECIPES = {
    "gan": ["recipe=gan", *TINY_GAN, "gan.r1_gamma=0"],
    # R1 on every other D update, two D updates per G update, hinge loss
    "gan_r1": ["recipe=gan", *TINY_GAN, "gan.r1_gamma=1.0", "gan.r1_every=2", "gan.d_steps=2", "gan.loss=hinge"],
}
RECIPES = {
    "classifier": ["recipe=classifier", *TINY_CLASSIFIER],
    "seq2seq": ["recipe=seq2seq", *TINY_SEQ2SEQ],
    "seq2seq_aux": ["recipe=seq2seq", *TINY_SEQ2SEQ, "seq2seq.aux_length_weight=0.5"],
    # The equivalence matrix with the Transformer layers recomputed in backward.
    "seq2seq_ac": ["recipe=seq2seq", *TINY_SEQ2SEQ, "activation_checkpointing=true"],
}


def case_config(
    recipe: str, window: str, world_size: int, accumulation: int, output_dir: str, steps: int = 3, *extra: str
) -> Config:
    micro = GLOBAL_BATCH // (world_size * accumulation)
    num_train = WINDOWS[window]
    section = recipe.split("_")[0]
    args = [
        *{**RECIPES, **GAN_RECIPES}[recipe],
        f"steps={steps}",
        f"global_batch_size={GLOBAL_BATCH}",
        f"micro_batch_size={micro}",
        f"{section}.num_train={num_train}",
        f"output_dir={output_dir}",
        f"run_name={recipe}-{window}-w{world_size}-a{accumulation}",
        "progress_bar=false",
        *extra,
    ]
    return resolve_config(args, world_size=world_size)
