"""Typed run configuration: dataclass defaults <- `config=<yaml>` <- `key=value` overrides.

Everything here is checked before any process group starts, and this module imports no torch so
that `train.py --help` stays fast.
"""

from __future__ import annotations

import difflib
import math
import os
import sys
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key and the fix."""


def opt(default: Any, help: str) -> Any:
    """A dataclass field with a help text for `--help`."""
    if is_dataclass(default) or isinstance(default, (list, dict)):
        return field(default_factory=lambda: default, metadata={"help": help})
    return field(default=default, metadata={"help": help})


def section(factory: type, help: str) -> Any:
    return field(default_factory=factory, metadata={"help": help})


SCHEDULES = ("constant", "linear", "cosine")
OPTIMIZERS = ("adamw", "sgd")
LR_SCALINGS = ("none", "linear", "sqrt")
MIXED_PRECISIONS = ("no", "bf16", "fp16")
NONFINITE_ACTIONS = ("skip", "stop")
TRACKERS = ("wandb", "tensorboard", "none")


@dataclass
class OptimizerConfig:
    name: str = opt("adamw", f"optimizer class: {', '.join(OPTIMIZERS)}")
    lr: float = opt(1e-3, "peak learning rate, stated for `reference_batch_size`")
    weight_decay: float = opt(0.0, "decoupled weight decay (AdamW) or L2 (SGD)")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.98, "AdamW beta2")
    momentum: float = opt(0.0, "SGD momentum")
    clip_grad_norm: float = opt(1.0, "clip this optimizer's gradient norm at the step boundary; 0 turns it off")
    schedule: str = opt("cosine", f"learning-rate schedule after warmup: {', '.join(SCHEDULES)}")
    warmup_steps: int = opt(0, "linear warmup, in optimizer steps")
    min_lr_ratio: float = opt(0.0, "final learning rate as a fraction of the peak (linear, cosine)")


@dataclass
class Seq2SeqConfig:
    task: str = opt("reverse", "synthetic task: reverse or sort a random-length token sequence")
    vocab_size: int = opt(16, "number of content tokens (padding, start and end come on top)")
    min_len: int = opt(2, "shortest source sequence")
    max_len: int = opt(16, "longest source sequence")
    num_train: int = opt(50_000, "training sequences, generated from the seed")
    num_eval: int = opt(512, "held-out sequences for exact-match evaluation")
    d_model: int = opt(64, "Transformer width")
    n_heads: int = opt(4, "attention heads")
    encoder_layers: int = opt(2, "encoder layers")
    decoder_layers: int = opt(2, "decoder layers")
    ffn_dim: int = opt(256, "feed-forward width")
    dropout: float = opt(0.0, "dropout probability")
    aux_length_weight: float = opt(
        0.0,
        "weight of an auxiliary per-sample loss (predict the length from the encoder), backpropagated separately",
    )
    target_exact_match: float = opt(0.95, "exact-match the run is expected to reach; the summary says if it did")
    encoder: OptimizerConfig = section(lambda: OptimizerConfig(lr=2e-3, weight_decay=0.01), "encoder optimizer")
    decoder: OptimizerConfig = section(lambda: OptimizerConfig(lr=2e-3, weight_decay=0.01), "decoder optimizer")


@dataclass
class ClassifierConfig:
    num_features: int = opt(16, "input features of the synthetic task")
    num_classes: int = opt(4, "classes of the synthetic task")
    hidden: int = opt(64, "hidden width of the MLP")
    depth: int = opt(2, "hidden layers of the MLP")
    batchnorm: bool = opt(False, "add BatchNorm1d after each hidden layer")
    num_train: int = opt(8192, "training samples, generated from the seed")
    num_eval: int = opt(1024, "held-out samples")
    optimizer: OptimizerConfig = section(lambda: OptimizerConfig(lr=3e-3), "the model's optimizer")


@dataclass
class GANConfig:
    dataset: str = opt("ring", "real data: 'ring' (8 Gaussians on a circle) or 'grid' (5x5 Gaussians)")
    num_train: int = opt(16_384, "real training samples, generated from the seed")
    num_eval: int = opt(2_500, "generated samples scored at evaluation")
    z_dim: int = opt(16, "latent size")
    hidden: int = opt(256, "hidden width of both networks")
    layers: int = opt(3, "hidden layers of both networks")
    loss: str = opt("nonsaturating", "adversarial loss: nonsaturating or hinge")
    d_steps: int = opt(1, "discriminator updates per generator update")
    r1_gamma: float = opt(1.0, "R1 penalty weight on real data; 0 turns it off")
    r1_every: int = opt(4, "apply R1 lazily, every N discriminator updates (weighted by N)")
    ema_decay: float = opt(0.99, "decay of the moving average of G's weights used for evaluation; 0 turns it off")
    min_modes: int = opt(0, "modes the run is expected to cover; 0 means all of them")
    min_high_quality: float = opt(0.9, "share of high-quality samples the run is expected to reach")
    generator: OptimizerConfig = section(
        lambda: OptimizerConfig(lr=2e-3, beta1=0.5, beta2=0.99, clip_grad_norm=0.0), "generator optimizer"
    )
    discriminator: OptimizerConfig = section(
        lambda: OptimizerConfig(lr=2e-3, beta1=0.5, beta2=0.99, clip_grad_norm=0.0), "discriminator optimizer"
    )


@dataclass
class WandbConfig:
    project: str = opt("disttrain", "W&B project")
    entity: str = opt("", "W&B entity (team or user); empty uses the API key's default")
    group: str = opt("", "W&B group; empty uses the SLURM job id when there is one")
    tags: list = opt([], "W&B tags, e.g. wandb.tags=[baseline,zero2]")
    notes: str = opt("", "W&B notes")
    mode: str = opt("", "online, offline or disabled; empty: WANDB_MODE, else offline when no API key is set")


@dataclass
class Config:
    recipe: str = opt("seq2seq", "what to train: a name from disttrain.recipes")
    seed: int = opt(0, "seeds model initialisation and the data order")
    steps: int = opt(1000, "optimizer steps to train")
    global_batch_size: int = opt(64, "samples per optimizer step over all processes (the batch the update is for)")
    micro_batch_size: int = opt(32, "samples per forward/backward on one process; accumulation follows")
    reference_batch_size: int = opt(0, "global batch the learning rates are stated for; 0 means global_batch_size")
    lr_scaling: str = opt("none", f"learning-rate rule when the global batch differs: {', '.join(LR_SCALINGS)}")
    mixed_precision: str = opt("no", f"{', '.join(MIXED_PRECISIONS)} (fp16 uses loss scaling and needs a GPU)")
    sync_batchnorm: bool = opt(False, "convert BatchNorm layers to SyncBatchNorm when running on several processes")
    deepspeed: str = opt(
        "", "DeepSpeed JSON (configs/deepspeed/*.json); `accelerate launch` with a DeepSpeed config file sets it"
    )
    eval_every: int = opt(0, "evaluate every N optimizer steps; 0 evaluates at the end only")
    log_every: int = opt(25, "report the global loss every N optimizer steps")
    output_dir: str = opt("runs", "parent of run directories")
    run_name: str = opt("", "run directory name under output_dir; empty picks <recipe>-<timestamp>")
    save_weights: bool = opt(True, "write the final weights to the run directory as safetensors")
    progress_bar: bool = opt(True, "show a progress bar on the main process")
    checkpoint_every: int = opt(
        250, "write a resumable checkpoint every N optimizer steps; 0 only on signals and at the end"
    )
    keep_checkpoints: int = opt(3, "complete checkpoints kept in <run directory>/checkpoints; older ones are deleted")
    resume: str = opt(
        "auto",
        "auto: continue from the run directory's newest complete checkpoint, if any; never; or a checkpoint path",
    )
    on_nonfinite: str = opt(
        "stop", f"a NaN/inf loss or gradient: {' or '.join(NONFINITE_ACTIONS)} (stop writes a checkpoint first)"
    )
    collective_timeout_s: int = opt(
        600, "a collective that waits longer (dead or hung process) ends the run with an error"
    )
    tracker: str = opt("wandb", f"experiment tracker: {', '.join(TRACKERS)}")
    wandb: WandbConfig = section(WandbConfig, "Weights & Biases run settings")
    seq2seq: Seq2SeqConfig = section(Seq2SeqConfig, "seq2seq recipe")
    classifier: ClassifierConfig = section(ClassifierConfig, "classifier recipe")
    gan: GANConfig = section(GANConfig, "gan recipe")

    def world_size(self) -> int:
        return world_size_from_env()

    def accumulation_steps(self, world_size: int | None = None) -> int:
        """Micro-batches per process in a full window: follows from the batch sizes and world size."""
        world = self.world_size() if world_size is None else world_size
        return self.global_batch_size // (self.micro_batch_size * world)


def world_size_from_env() -> int:
    """The world size a launcher announced, read before any process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def lr_multiplier(cfg: Config) -> float:
    """How much the configured learning rates are scaled for this run's global batch."""
    reference = cfg.reference_batch_size or cfg.global_batch_size
    ratio = cfg.global_batch_size / reference
    return {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[cfg.lr_scaling]


# --------------------------------------------------------------------------- loading


def _schema_keys(cls: type, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> dataclass field, for every leaf and section of the schema."""
    keys: dict[str, Any] = {}
    for f in fields(cls):
        key = prefix + f.name
        keys[key] = f
        nested = _nested_type(cls, f)
        if nested is not None:
            keys.update(_schema_keys(nested, key + "."))
    return keys


def _nested_type(cls: type, f: Any) -> type | None:
    if f.default_factory is MISSING:
        return None
    value = f.default_factory()
    return type(value) if is_dataclass(value) else None


def flat_items(node: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> leaf value of a nested dict (a loaded YAML file, a resolved config)."""
    out: dict[str, Any] = {}
    for k, v in node.items():
        if isinstance(v, dict):
            out.update(flat_items(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _check_known(keys: list[str], origin: str) -> None:
    known = _schema_keys(Config)
    for key in keys:
        if key in known:
            continue
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else "; see `python train.py --help` for the keys"
        raise ConfigError(f"unknown key '{key}' {origin}{hint}")


def parse_args(argv: list[str]) -> tuple[str | None, list[str]]:
    config_path = None
    overrides = []
    for arg in argv:
        if "=" not in arg or arg.startswith("-"):
            raise ConfigError(f"argument '{arg}' is not of the form key=value (or config=<file.yaml>)")
        key, value = arg.split("=", 1)
        if key == "config":
            if config_path is not None:
                raise ConfigError("config= given twice; pass one YAML file and override keys with key=value")
            config_path = value
        else:
            overrides.append(arg)
    return config_path, overrides


def load_config(argv: list[str], world_size: int | None = None) -> Config:
    """Build and validate the run's config from command-line arguments."""
    config_path, overrides = parse_args(argv)
    merged = OmegaConf.structured(Config)
    layers = []
    if config_path is not None:
        if not os.path.isfile(config_path):
            raise ConfigError(f"config={config_path}: no such file")
        try:
            file_cfg = OmegaConf.load(config_path)
        except Exception as e:  # a YAML syntax error names the line
            raise ConfigError(f"config={config_path}: not valid YAML ({str(e).splitlines()[0]})") from e
        _check_known(list(flat_items(OmegaConf.to_container(file_cfg))), f"in {config_path}")
        layers.append((file_cfg, config_path))
    for item in overrides:
        key = item.split("=", 1)[0]
        _check_known([key], "on the command line")
        try:
            layers.append((OmegaConf.from_dotlist([item]), "the command line"))
        except OmegaConfBaseException as e:
            raise ConfigError(f"{key}: cannot parse '{item}' ({_first_line(e)})") from e
    for layer, origin in layers:
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as e:
            key = getattr(e, "full_key", None) or "?"
            raise ConfigError(f"{key}: {_first_line(e)} (from {origin})") from e
    cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    validate(cfg, world_size_from_env() if world_size is None else world_size)
    return cfg


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0]


# --------------------------------------------------------------------------- validation


def _one_of(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}='{value}' is not one of: {', '.join(choices)}")


def _at_least(key: str, value: float, low: float) -> None:
    if value < low:
        raise ConfigError(f"{key}={value} must be >= {low}")


def _validate_optimizer(key: str, o: OptimizerConfig, steps: int) -> None:
    _one_of(f"{key}.name", o.name, OPTIMIZERS)
    _one_of(f"{key}.schedule", o.schedule, SCHEDULES)
    if o.lr <= 0:
        raise ConfigError(f"{key}.lr={o.lr} must be > 0")
    _at_least(f"{key}.weight_decay", o.weight_decay, 0)
    _at_least(f"{key}.clip_grad_norm", o.clip_grad_norm, 0)
    _at_least(f"{key}.warmup_steps", o.warmup_steps, 0)
    if o.warmup_steps > steps:
        raise ConfigError(f"{key}.warmup_steps={o.warmup_steps} exceeds steps={steps}; lower it or train longer")
    if not 0 <= o.min_lr_ratio <= 1:
        raise ConfigError(f"{key}.min_lr_ratio={o.min_lr_ratio} must lie in [0, 1]")


def validate(cfg: Config, world_size: int) -> None:
    """Refuse configurations that cannot give the promised update, naming the key and the fix."""
    from disttrain.recipes import RECIPES  # registry of names only; imports no torch

    _one_of("recipe", cfg.recipe, tuple(sorted(RECIPES)))
    _at_least("steps", cfg.steps, 1)
    _at_least("micro_batch_size", cfg.micro_batch_size, 1)
    _at_least("global_batch_size", cfg.global_batch_size, 1)
    per_round = cfg.micro_batch_size * world_size
    if cfg.global_batch_size < per_round:
        raise ConfigError(
            f"global_batch_size={cfg.global_batch_size} is smaller than micro_batch_size x world size "
            f"= {cfg.micro_batch_size} x {world_size} = {per_round}, so accumulation would be < 1; "
            f"raise global_batch_size or lower micro_batch_size"
        )
    if cfg.global_batch_size % per_round:
        raise ConfigError(
            f"global_batch_size={cfg.global_batch_size} is not divisible by micro_batch_size x world size "
            f"= {cfg.micro_batch_size} x {world_size} = {per_round}; choose a multiple of {per_round}"
        )
    _one_of("lr_scaling", cfg.lr_scaling, LR_SCALINGS)
    _at_least("reference_batch_size", cfg.reference_batch_size, 0)
    if cfg.lr_scaling != "none" and cfg.reference_batch_size == 0:
        raise ConfigError(
            f"lr_scaling={cfg.lr_scaling} needs reference_batch_size: the global batch the learning rates were tuned for"
        )
    _one_of("mixed_precision", cfg.mixed_precision, MIXED_PRECISIONS)
    _at_least("eval_every", cfg.eval_every, 0)
    _at_least("log_every", cfg.log_every, 1)
    _at_least("checkpoint_every", cfg.checkpoint_every, 0)
    _at_least("keep_checkpoints", cfg.keep_checkpoints, 1)
    if cfg.resume not in ("auto", "never") and not os.path.isdir(cfg.resume):
        raise ConfigError(f"resume={cfg.resume}: no such checkpoint directory; use auto, never or a checkpoint path")
    _one_of("on_nonfinite", cfg.on_nonfinite, NONFINITE_ACTIONS)
    _at_least("collective_timeout_s", cfg.collective_timeout_s, 1)
    _one_of("tracker", cfg.tracker, TRACKERS)
    from disttrain.tracking import check_tracker  # here, not at the top: tracking imports this module

    check_tracker(cfg)
    if cfg.wandb.mode:
        _one_of("wandb.mode", cfg.wandb.mode, ("online", "offline", "disabled"))

    s = cfg.seq2seq
    _one_of("seq2seq.task", s.task, ("reverse", "sort"))
    _at_least("seq2seq.vocab_size", s.vocab_size, 2)
    _at_least("seq2seq.min_len", s.min_len, 1)
    if s.max_len < s.min_len:
        raise ConfigError(f"seq2seq.max_len={s.max_len} is below seq2seq.min_len={s.min_len}")
    _at_least("seq2seq.num_train", s.num_train, 1)
    _at_least("seq2seq.num_eval", s.num_eval, 1)
    if s.d_model % s.n_heads:
        raise ConfigError(f"seq2seq.d_model={s.d_model} must be divisible by seq2seq.n_heads={s.n_heads}")
    if not 0 <= s.dropout < 1:
        raise ConfigError(f"seq2seq.dropout={s.dropout} must lie in [0, 1)")
    _at_least("seq2seq.aux_length_weight", s.aux_length_weight, 0)
    _validate_optimizer("seq2seq.encoder", s.encoder, cfg.steps)
    _validate_optimizer("seq2seq.decoder", s.decoder, cfg.steps)

    c = cfg.classifier
    _at_least("classifier.num_features", c.num_features, 1)
    _at_least("classifier.num_classes", c.num_classes, 2)
    _at_least("classifier.depth", c.depth, 1)
    _at_least("classifier.num_train", c.num_train, 1)
    _at_least("classifier.num_eval", c.num_eval, 1)
    _validate_optimizer("classifier.optimizer", c.optimizer, cfg.steps)

    _validate_deepspeed(cfg, world_size)

    g = cfg.gan
    _one_of("gan.dataset", g.dataset, ("ring", "grid"))
    _one_of("gan.loss", g.loss, ("nonsaturating", "hinge"))
    _at_least("gan.num_train", g.num_train, 1)
    _at_least("gan.num_eval", g.num_eval, 1)
    _at_least("gan.z_dim", g.z_dim, 1)
    _at_least("gan.layers", g.layers, 1)
    _at_least("gan.d_steps", g.d_steps, 1)
    _at_least("gan.r1_gamma", g.r1_gamma, 0)
    _at_least("gan.r1_every", g.r1_every, 1)
    if not 0 <= g.ema_decay < 1:
        raise ConfigError(f"gan.ema_decay={g.ema_decay} must lie in [0, 1)")
    _validate_optimizer("gan.generator", g.generator, cfg.steps)
    _validate_optimizer("gan.discriminator", g.discriminator, cfg.steps * g.d_steps)


def _validate_deepspeed(cfg: Config, world_size: int) -> None:
    from disttrain.deepspeed_config import check_against_run, deepspeed_config_path, load_user_config

    path = deepspeed_config_path(cfg)
    if not path:
        return
    user = load_user_config(path)
    check_against_run(user, path, cfg, world_size)
    if cfg.on_nonfinite == "skip":
        raise ConfigError(
            "on_nonfinite=skip is not supported under DeepSpeed (its engines keep the reduced gradients "
            "until they step); use on_nonfinite=stop, which checkpoints the state before the bad step"
        )
    stage = int(user.get("zero_optimization", {}).get("stage", 0))
    if cfg.recipe == "gan" and cfg.gan.r1_gamma > 0 and stage >= 3:
        # R1 takes its input gradient with torch.func, which keeps DeepSpeed's end-of-backward
        # reduction out of that pass; ZeRO 3's partitioned parameters crash the process there.
        raise ConfigError(
            f"gan.r1_gamma>0 is not supported under ZeRO stage {stage} (its partitioned parameters crash "
            "R1's input-gradient pass); use ZeRO 1 or 2 (configs/deepspeed/zero2.json), gan.r1_gamma=0, or DDP"
        )
    if cfg.recipe == "seq2seq":
        # DeepSpeed runs one optimizer per model: encoder and decoder become two parameter groups
        # of it (own learning rate, weight decay, schedule), clipped together by one global norm.
        e, d = cfg.seq2seq.encoder, cfg.seq2seq.decoder
        if e.name != d.name:
            raise ConfigError(
                f"DeepSpeed runs one optimizer per model: seq2seq.encoder.name={e.name} and "
                f"seq2seq.decoder.name={d.name} cannot share it; use one optimizer class for both"
            )
        if e.clip_grad_norm != d.clip_grad_norm:
            raise ConfigError(
                f"DeepSpeed clips one global norm per model: seq2seq.encoder.clip_grad_norm={e.clip_grad_norm} "
                f"and seq2seq.decoder.clip_grad_norm={d.clip_grad_norm} differ; set them equal"
            )


# --------------------------------------------------------------------------- help


def help_text() -> str:
    lines = [
        "usage: python train.py [config=<file.yaml>] [key=value ...]",
        "       accelerate launch [--config_file configs/accelerate/<x>.yaml] train.py [same arguments]",
        "",
        "Keys (default) and meaning; nested keys use dots, e.g. seq2seq.encoder.lr=1e-3:",
    ]
    defaults = OmegaConf.structured(Config)
    for key, f in _schema_keys(Config).items():
        value = OmegaConf.select(defaults, key)
        if OmegaConf.is_config(value):
            lines.append(f"  {f'{key}.*':<34} {f.metadata.get('help', '')}")
            continue
        lines.append(f"  {f'{key}={value}':<34} {f.metadata.get('help', '')}")
    return "\n".join(lines)


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def main_or_exit(argv: list[str]) -> Config:
    """train.py's entry: print help or a one-line config error and exit, else return the config."""
    if any(a in ("-h", "--help", "help") for a in argv):
        print(help_text())
        sys.exit(0)
    try:
        return load_config(argv)
    except ConfigError as e:
        if os.environ.get("RANK", "0") == "0":  # one message, not one per process
            print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
