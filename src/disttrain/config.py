"""Typed run configuration: defaults <- the recipe's run defaults <- `config=<yaml>` <- `key=value`.

The run keys are declared here; a recipe brings its own keys as one section named after it
(`seq2seq.*`, `mymodel.*` for `recipe=myproject.recipes.mymodel`), declared in the recipe's module.
This module is a leaf: it knows no recipe, engine or tracker module (a recipe module is found by its
name at run time), and it imports no torch, so that `train.py --help` stays fast. The checks that
span modules run in `disttrain.preflight`.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import math
import os
import pkgutil
import sys
from dataclasses import MISSING, dataclass, field, fields, is_dataclass, make_dataclass
from types import ModuleType
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key and the fix."""


def setting(default: Any, help: str) -> Any:
    """A config key: a dataclass field with its default and a help text for `--help`."""
    if is_dataclass(default) or isinstance(default, (list, dict)):
        return field(default_factory=lambda: default, metadata={"help": help})
    return field(default=default, metadata={"help": help})


def section(factory: Any, help: str) -> Any:
    """A nested group of keys (an optimizer, W&B settings): `factory` builds its defaults."""
    return field(default_factory=factory, metadata={"help": help})


SCHEDULES = ("constant", "linear", "cosine")
OPTIMIZERS = ("adamw", "sgd")
LR_SCALINGS = ("none", "linear", "sqrt")
MIXED_PRECISIONS = ("no", "bf16", "fp16")
NONFINITE_ACTIONS = ("skip", "stop")
TRACKERS = ("wandb", "tensorboard", "none")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
COMPILE_DYNAMIC = ("auto", "true", "false")


def one_of(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}='{value}' is not one of: {', '.join(choices)}")


def at_least(key: str, value: float, low: float) -> None:
    if value < low:
        raise ConfigError(f"{key}={value} must be >= {low}")


@dataclass
class OptimizerConfig:
    """One optimizer with its schedule: a building block for recipe configs."""

    name: str = setting(
        "adamw",
        f"optimizer: {', '.join(OPTIMIZERS)}, or an importable optimizer class (torch.optim.RAdam, mypackage.Lion)",
    )
    lr: float = setting(1e-3, "peak learning rate, stated for `reference_batch_size`")
    weight_decay: float = setting(0.0, "decoupled weight decay (AdamW) or L2 (SGD)")
    beta1: float = setting(0.9, "AdamW beta1")
    beta2: float = setting(0.98, "AdamW beta2")
    momentum: float = setting(0.0, "SGD momentum")
    clip_grad_norm: float = setting(1.0, "clip this optimizer's gradient norm at the step boundary; 0 turns it off")
    schedule: str = setting("cosine", f"learning-rate schedule after warmup: {', '.join(SCHEDULES)}")
    warmup_steps: int = setting(0, "linear warmup, in optimizer steps")
    min_lr_ratio: float = setting(0.0, "final learning rate as a fraction of the peak (linear, cosine)")
    kwargs: dict = setting({}, "more keyword arguments for the optimizer class, e.g. kwargs.nesterov=true")

    def validate(self, key: str, steps: int) -> None:
        """Refuse values this optimizer cannot train with; `steps` is how often it steps in the run.
        A class by module path is checked in pre-flight (importing it needs torch)."""
        if "." not in self.name:
            one_of(f"{key}.name", self.name, OPTIMIZERS)
        one_of(f"{key}.schedule", self.schedule, SCHEDULES)
        if self.lr <= 0:
            raise ConfigError(f"{key}.lr={self.lr} must be > 0")
        at_least(f"{key}.weight_decay", self.weight_decay, 0)
        for beta in ("beta1", "beta2"):
            if not 0 <= getattr(self, beta) < 1:
                raise ConfigError(f"{key}.{beta}={getattr(self, beta)} must lie in [0, 1)")
        at_least(f"{key}.momentum", self.momentum, 0)
        at_least(f"{key}.clip_grad_norm", self.clip_grad_norm, 0)
        at_least(f"{key}.warmup_steps", self.warmup_steps, 0)
        if self.warmup_steps > steps:
            raise ConfigError(f"{key}.warmup_steps={self.warmup_steps} exceeds steps={steps}; lower it or train longer")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"{key}.min_lr_ratio={self.min_lr_ratio} must lie in [0, 1]")


@dataclass
class WandbConfig:
    project: str = setting("disttrain", "W&B project")
    entity: str = setting("", "W&B entity (team or user); empty uses the API key's default")
    group: str = setting("", "W&B group; empty uses the SLURM job id when there is one")
    tags: list = setting([], "W&B tags, e.g. wandb.tags=[baseline,zero2]")
    notes: str = setting("", "W&B notes")
    mode: str = setting("", "online, offline or disabled; empty: WANDB_MODE, else offline when no API key is set")


@dataclass
class DataLoaderConfig:
    """How the trainer's torch DataLoader loads micro-batches; the window plan does not depend on it."""

    num_workers: int = setting(
        0, "worker processes loading and collating the next micro-batches while this window computes; 0 loads inline"
    )
    prefetch_factor: int = setting(0, "micro-batches each worker loads ahead; 0 picks enough for the next two windows")
    pin_memory: bool = setting(True, "page-locked batches for faster copies to a GPU (ignored on CPU)")

    def validate(self) -> None:
        at_least("data.num_workers", self.num_workers, 0)
        at_least("data.prefetch_factor", self.prefetch_factor, 0)
        if self.prefetch_factor and not self.num_workers:
            raise ConfigError(
                f"data.prefetch_factor={self.prefetch_factor} needs data.num_workers > 0 "
                "(without workers nothing loads ahead); set data.num_workers"
            )


FAULTS = ("kill", "raise", "hang")


@dataclass
class DebugConfig:
    """Faults injected on purpose, through the real code paths: a fire drill for restarts, the
    watchdog and SLURM requeue before a long run depends on them."""

    fail_at_step: int = setting(
        0, "at the start of this optimizer step, process fail_rank fails as fail_how says; 0: never"
    )
    fail_rank: int = setting(1, "the process that fails")
    fail_how: str = setting(
        "kill",
        "kill (SIGKILL to itself), raise (an exception) or hang (stops making progress: the watchdog ends it "
        "after stall_timeout_s)",
    )
    fail_attempt: int = setting(
        0, "the attempt it fails in: 0 the first, k the k-th restart by accelerate launch --max_restarts"
    )
    slow_write_at: int = setting(
        0,
        "with checkpoint_async: the background write of this step's checkpoint waits slow_write_s before it "
        "publishes (a slow disk); 0: never",
    )
    slow_write_s: float = setting(60.0, "how long that write waits")

    def validate(self, world_size: int) -> None:
        at_least("debug.fail_at_step", self.fail_at_step, 0)
        at_least("debug.fail_attempt", self.fail_attempt, 0)
        at_least("debug.slow_write_at", self.slow_write_at, 0)
        at_least("debug.slow_write_s", self.slow_write_s, 0)
        one_of("debug.fail_how", self.fail_how, FAULTS)
        if self.fail_at_step and not 0 <= self.fail_rank < world_size:
            raise ConfigError(
                f"debug.fail_rank={self.fail_rank} is not a process of this run (0 to {world_size - 1}); choose one"
            )


@dataclass
class FsdpConfig:
    """FSDP2 (`torch.distributed.fsdp.fully_shard`): parameters, gradients and optimizer state sharded
    over the processes. Precision comes from the run's `mixed_precision`, never from here."""

    enabled: bool = setting(
        False,
        "train with FSDP2 (fully_shard per block and per model); `accelerate launch` with "
        "configs/accelerate/fsdp2.yaml sets it",
    )
    reshard_after_forward: bool = setting(
        True, "free the gathered parameters after each forward and gather them again in backward (less memory)"
    )
    sync_every_micro_batch: bool = setting(
        False,
        "reduce-scatter gradients after every micro-batch instead of once per window: sharded gradients "
        "between micro-batches (less memory), more communication; the update is the same",
    )
    cpu_offload: bool = setting(False, "keep sharded parameters, gradients and optimizer state in CPU memory (GPUs)")


BUILTIN_RECIPES = "disttrain.recipes"
DEFAULT_RECIPE = "seq2seq"


@dataclass
class Config:
    """The run keys. `load_config` returns a subclass that adds the chosen recipe's section."""

    recipe: str = setting(
        DEFAULT_RECIPE, "what to train: a built-in recipe's name or a module path (myproject.recipes.mymodel)"
    )
    seed: int = setting(0, "seeds model initialisation and the data order")
    steps: int = setting(1000, "optimizer steps to train")
    global_batch_size: int = setting(64, "samples per optimizer step over all processes (the batch the update is for)")
    micro_batch_size: int = setting(32, "samples per forward/backward on one process; accumulation follows")
    reference_batch_size: int = setting(0, "global batch the learning rates are stated for; 0 means global_batch_size")
    lr_scaling: str = setting("none", f"learning-rate rule when the global batch differs: {', '.join(LR_SCALINGS)}")
    mixed_precision: str = setting("no", f"{', '.join(MIXED_PRECISIONS)} (fp16 uses loss scaling and needs a GPU)")
    sync_batchnorm: bool = setting(False, "convert BatchNorm layers to SyncBatchNorm when running on several processes")
    deepspeed_config: str = setting(
        "",
        "train with DeepSpeed, configured by this JSON (configs/deepspeed/*.json); "
        "`accelerate launch` with a DeepSpeed config file sets it",
    )
    fsdp: FsdpConfig = section(FsdpConfig, "FSDP2: sharded parameters, gradients and optimizer state")
    compile: bool = setting(
        False, "compile each model's forward (and backward) with torch.compile; the first step pays the compilation"
    )
    compile_mode: str = setting("default", f"torch.compile mode (inductor backend): {', '.join(COMPILE_MODES)}")
    compile_backend: str = setting(
        "inductor", "torch.compile backend: inductor (needs a C++ compiler on CPU), aot_eager (no code generation)"
    )
    compile_dynamic: str = setting(
        "auto",
        "shapes compiled as dynamic: auto (static first, dynamic after a shape changes: variable-length batches "
        "compile twice, not per length), true (dynamic from the start), false (one compilation per shape)",
    )
    activation_checkpointing: bool = setting(
        False,
        "recompute the activations of the recipe's blocks (its shard_blocks) in backward instead of keeping them: "
        "less memory, about one more forward of those blocks; gradients unchanged (dropout replayed)",
    )
    activation_checkpointing_every: int = setting(
        1, "with activation_checkpointing: checkpoint every N-th block of each model (1: all of them)"
    )
    profile: bool = setting(
        False, "write a torch.profiler trace of profile_steps steps to <run directory>/profile (Perfetto, TensorBoard)"
    )
    profile_start: int = setting(3, "with profile: optimizer steps run before recording (warm-up, compilation)")
    profile_steps: int = setting(3, "with profile: optimizer steps recorded")
    profile_all_processes: bool = setting(False, "with profile: every process writes its trace, not only the main one")
    eval_every: int = setting(0, "evaluate every N optimizer steps; 0 evaluates at the end only")
    log_every: int = setting(25, "report the global loss every N optimizer steps")
    output_dir: str = setting("runs", "parent of run directories")
    run_name: str = setting("", "run directory name under output_dir; empty picks <recipe>-<timestamp>")
    save_weights: bool = setting(True, "write the final weights to the run directory as safetensors")
    progress_bar: bool = setting(True, "show a progress bar on the main process")
    checkpoint_every: int = setting(
        250, "write a resumable checkpoint every N optimizer steps; 0 only on signals and at the end"
    )
    keep_checkpoints: int = setting(
        3, "complete checkpoints kept in <run directory>/checkpoints; older ones are deleted"
    )
    checkpoint_async: bool = setting(
        False,
        "write periodic checkpoints in the background: training stops only to copy the state to host "
        "memory (one copy per process); DDP and FSDP2, not DeepSpeed",
    )
    resume: str = setting(
        "auto",
        "auto: continue from the run directory's newest complete checkpoint, if any; never; or a checkpoint path",
    )
    on_nonfinite: str = setting(
        "stop", f"a NaN/inf loss or gradient: {' or '.join(NONFINITE_ACTIONS)} (stop writes a checkpoint first)"
    )
    collective_timeout_s: int = setting(
        2400,
        "a collective that waits longer (a dead or hung process) ends the run with an error; the backstop "
        "behind stall_timeout_s, which ends a stall first and says where it is",
    )
    stall_timeout_s: int = setting(
        1800,
        "the watchdog ends a process that makes no progress (no micro-batch, no phase moves) for longer, with a "
        "report in <run directory>/stalls/ and exit status 4; 0 turns it off",
    )
    data_timeout_s: int = setting(
        300, "the same for a wait for one micro-batch (a stuck DataLoader worker, a hung file system); 0: off"
    )
    stop_grace_s: int = setting(
        120,
        "after a stop signal, a process that makes no progress for longer before the step boundary stops without "
        "a checkpoint (with a report) instead of waiting forever; 0: off",
    )
    data: DataLoaderConfig = section(DataLoaderConfig, "the DataLoader feeding the micro-batches")
    tracker: str = setting("wandb", f"experiment tracker: {', '.join(TRACKERS)}")
    wandb: WandbConfig = section(WandbConfig, "Weights & Biases run settings")
    debug: DebugConfig = section(DebugConfig, "fault injection, to rehearse failures (restarts, the watchdog)")

    @property
    def recipe_section(self) -> str:
        return recipe_section(self.recipe)

    @property
    def recipe_config(self) -> Any:
        """The chosen recipe's own keys (the `<recipe>.*` section)."""
        return getattr(self, self.recipe_section)

    def world_size(self) -> int:
        return world_size_from_env()

    def accumulation_steps(self, world_size: int | None = None) -> int:
        """Micro-batches per process in a full window: follows from the batch sizes and world size."""
        world = self.world_size() if world_size is None else world_size
        return self.global_batch_size // (self.micro_batch_size * world)


def world_size_from_env() -> int:
    """The world size a launcher announced, read before any process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def processes(count: int) -> str:
    """A world size in words: "1 process", "8 processes"."""
    return f"{count} process" if count == 1 else f"{count} processes"


def lr_multiplier(cfg: Config) -> float:
    """How much the configured learning rates are scaled for this run's global batch."""
    reference = cfg.reference_batch_size or cfg.global_batch_size
    ratio = cfg.global_batch_size / reference
    return {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[cfg.lr_scaling]


# --------------------------------------------------------------------------- recipes by name


def builtin_recipes() -> list[str]:
    """The recipes that ship in disttrain/recipes: every module or package there."""
    package = importlib.import_module(BUILTIN_RECIPES)
    return sorted(m.name for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_"))


def recipe_section(recipe: str) -> str:
    """The key prefix of a recipe's own settings: its module's last name."""
    return recipe.rsplit(".", 1)[-1]


def recipe_module(recipe: str) -> ModuleType:
    """The module a `recipe=` value names: a built-in recipe, or any importable module path.

    A recipe module defines `Config` (a dataclass of its keys) and `build(cfg)`, and may define
    `RUN_DEFAULTS` (its defaults for run keys: steps, batch sizes...). Keep its top level free of
    torch imports (built-in recipes build their models in a submodule) so that --help stays fast.
    """
    # A built-in name first; any other name is a module path, a top-level module included.
    path = f"{BUILTIN_RECIPES}.{recipe}" if "." not in recipe and recipe in builtin_recipes() else recipe
    try:
        module = importlib.import_module(path)
    except ModuleNotFoundError as e:
        if e.name is None or not path.startswith(e.name):
            raise ConfigError(f"recipe={recipe}: importing {path} failed ({e}); install what it needs") from e
        raise ConfigError(
            f"recipe='{recipe}' is not one of: {', '.join(builtin_recipes())}, nor an importable module path "
            "(e.g. recipe=myproject.recipes.mymodel, with the folder that holds myproject on PYTHONPATH)"
        ) from e
    except SyntaxError as e:  # the user's file, not ours: where, not a traceback through importlib
        raise ConfigError(f"recipe={recipe}: {e.msg} in {e.filename}, line {e.lineno}; fix the recipe file") from e
    for name in ("Config", "build"):
        if not hasattr(module, name):
            raise ConfigError(
                f"recipe={recipe}: module {path} defines no `{name}`; a recipe module defines Config "
                "(a dataclass of its keys) and build(cfg) (see README, 'Add your own recipe')"
            )
    if not is_dataclass(module.Config):
        raise ConfigError(f"recipe={recipe}: {path}.Config must be a dataclass of the recipe's keys")
    return module


@functools.cache
def config_class(recipe: str) -> type[Config]:
    """The run's config type for `recipe`: the run keys plus the recipe's section."""
    module = recipe_module(recipe)
    name = recipe_section(recipe)
    if name in {f.name for f in fields(Config)}:
        raise ConfigError(f"recipe={recipe}: a recipe may not be named like the run key '{name}'; rename its module")
    doc = (module.__doc__ or f"{name} recipe").strip().splitlines()[0]
    cls = make_dataclass("Config", [(name, module.Config, section(module.Config, doc))], bases=(Config,))
    cls.__module__ = __name__
    return cls


def run_defaults(recipe: str) -> dict[str, Any]:
    """The recipe's own defaults for run keys, checked against the run schema."""
    defaults = dict(getattr(recipe_module(recipe), "RUN_DEFAULTS", {}))
    _check_known(config_class(recipe), list(flat_items(defaults)), f"in {recipe}.RUN_DEFAULTS")
    return defaults


# --------------------------------------------------------------------------- loading


def schema_keys(cls: type, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> dataclass field, for every leaf and section of the schema."""
    keys: dict[str, Any] = {}
    for f in fields(cls):
        key = prefix + f.name
        keys[key] = f
        nested = _nested_type(f)
        if nested is not None:
            keys.update(schema_keys(nested, key + "."))
    return keys


def _nested_type(f: Any) -> type | None:
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


# Names other tools use for a key, by meaning: a did-you-mean by spelling would miss them.
ALIASES = {
    "learning_rate": "lr",
    "batch_size": "global_batch_size",
    "train_batch_size": "global_batch_size",
    "per_device_train_batch_size": "micro_batch_size",
    "epochs": "steps",
    "max_steps": "steps",
    "num_steps": "steps",
    "max_grad_norm": "clip_grad_norm",
    "grad_clip": "clip_grad_norm",
    "gradient_clipping": "clip_grad_norm",
    "wd": "weight_decay",
    "warmup": "warmup_steps",
    "scheduler": "schedule",
    "lr_scheduler": "schedule",
    "lr_schedule": "schedule",
    "precision": "mixed_precision",
    "save_every": "checkpoint_every",
    "eval_interval": "eval_every",
    "log_interval": "log_every",
    "torch_compile": "compile",
    "gradient_checkpointing": "activation_checkpointing",
}


def _meant(key: str, known: dict[str, Any]) -> str | None:
    """The known key an alias stands for, in the same section (`encoder.learning_rate` -> `encoder.lr`)."""
    prefix, _, last = key.rpartition(".")
    alias = ALIASES.get(last)
    if alias is None:
        return None
    candidate = f"{prefix}.{alias}" if prefix else alias
    return candidate if candidate in known else None


def _free_form(key: str, known: dict[str, Any]) -> bool:
    """Whether `key` lies under a dict-typed key (an optimizer's kwargs), whose keys are free."""
    parts = key.split(".")
    return any(
        known.get(".".join(parts[:i])) is not None and known[".".join(parts[:i])].type in (dict, "dict")
        for i in range(1, len(parts))
    )


def _check_known(cls: type, keys: list[str], origin: str) -> None:
    known = schema_keys(cls)
    for key in keys:
        if key in known or _free_form(key, known):
            continue
        if key.rpartition(".")[2] == "gradient_accumulation_steps":
            raise ConfigError(
                f"unknown key '{key}' {origin}; accumulation follows from global_batch_size / "
                "(micro_batch_size x processes): set those two instead"
            )
        if key.rpartition(".")[2] == "persistent_workers":
            raise ConfigError(
                f"unknown key '{key}' {origin}: the DataLoader workers already live for the whole run "
                "(one pass over the plan spans every epoch); set data.num_workers only"
            )
        close = _meant(key, known) or next(iter(difflib.get_close_matches(key, known, n=1, cutoff=0.6)), None)
        hint = f"; did you mean '{close}'?" if close else "; see `python train.py --help` for the keys"
        prefix = key.split(".", 1)[0]
        if not close and "." in key and prefix in builtin_recipes():
            hint = f"; {prefix}.* keys belong to recipe={prefix}, and this run's recipe has no section '{prefix}'"
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
            config_path = os.path.expanduser(value)
        else:
            overrides.append(arg)
    return config_path, overrides


def _load_file(config_path: str) -> Any:
    if not os.path.isfile(config_path):
        raise ConfigError(f"config={config_path}: no such file")
    try:
        loaded = OmegaConf.load(config_path)
    except Exception as e:  # PyYAML's errors carry the line and column of the problem
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).strip().splitlines()[0]
        raise ConfigError(f"config={config_path}: not valid YAML{where}: {problem}") from e
    if not OmegaConf.is_dict(loaded):
        raise ConfigError(f"config={config_path}: the top level must be a mapping of keys (key: value), not a list")
    if not loaded:
        raise ConfigError(f"config={config_path} is empty; give it keys (key: value) or leave config= out")
    return loaded


def chosen_recipe(argv: list[str]) -> str:
    """The recipe the arguments choose: the command line's, else the config file's, else the default."""
    config_path, overrides = parse_args(argv)
    chosen = [item.split("=", 1)[1] for item in overrides if item.split("=", 1)[0] == "recipe"]
    if chosen:
        return chosen[-1]
    if config_path is not None:
        return str(_load_file(config_path).get("recipe", DEFAULT_RECIPE))
    return DEFAULT_RECIPE


def load_config(argv: list[str], world_size: int | None = None) -> Config:
    """Build the run's config from command-line arguments and check the run keys.

    The checks that need other modules (the recipe's own, DeepSpeed, trackers, the launcher) are in
    `disttrain.preflight.resolve_config`, which calls this first.
    """
    config_path, overrides = parse_args(argv)
    recipe = chosen_recipe(argv)
    cls = config_class(recipe)
    merged = OmegaConf.structured(cls)
    # YAML reads an unquoted no/yes/off/on/false/true as a boolean, which a string key would then hold
    # as 'False' or 'True': mixed_precision=no must stay "no". String keys keep what was written.
    string_keys = {k for k, v in flat_items(OmegaConf.to_container(merged)).items() if isinstance(v, str)}
    layers = [(OmegaConf.create(run_defaults(recipe)), f"{recipe}.RUN_DEFAULTS")]
    if config_path is not None:
        file_cfg = _load_file(config_path)
        parsed = flat_items(OmegaConf.to_container(file_cfg))
        _check_known(cls, list(parsed), f"in {config_path}")
        booleans = [key for key, value in parsed.items() if key in string_keys and isinstance(value, bool)]
        if booleans:
            written = flat_items(_written_scalars(config_path))
            for key in booleans:
                OmegaConf.update(file_cfg, key, written[key])
        layers.append((file_cfg, config_path))
    emptied: list[str] = []
    for item in overrides:
        key, value = item.split("=", 1)
        _check_known(cls, [key], "on the command line")
        try:
            layer = OmegaConf.from_dotlist([item])
        except OmegaConfBaseException as e:
            raise ConfigError(f"{key}: cannot parse '{item}' ({_first_line(e)})") from e
        if key in string_keys and isinstance(OmegaConf.select(layer, key), bool):
            OmegaConf.update(layer, key, value)
        layers.append((layer, "the command line"))
        if value.strip() == "{}":  # a merge adds keys and never removes one: `key={}` empties it
            emptied.append(key)
    for layer, origin in layers:
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as e:
            key = getattr(e, "full_key", None) or "?"
            raise ConfigError(f"{key}: {_first_line(e)} (from {origin})") from e
    for key in emptied:
        OmegaConf.update(merged, key, {}, merge=False)
    for key, value in flat_items(OmegaConf.to_container(merged)).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}={value} must be a finite number")
        if isinstance(value, str) and (value == "~" or value.startswith("~/")):
            # The shell leaves ~ alone after key= (output_dir=~/runs): it would name a folder "~" here.
            OmegaConf.update(merged, key, os.path.expanduser(value))
    cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    validate(cfg, world_size_from_env() if world_size is None else world_size)
    return cfg


def _written_scalars(config_path: str) -> dict[str, Any]:
    """A config file's values as written, every scalar a string (YAML's base loader)."""
    import yaml

    with open(config_path) as f:
        return yaml.load(f, Loader=yaml.BaseLoader)


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0]


def validate(cfg: Config, world_size: int) -> None:
    """Refuse run keys that cannot give the promised update, naming the key and the fix."""
    at_least("seed", cfg.seed, 0)
    if cfg.seed > 2**32 - 1:
        raise ConfigError(f"seed={cfg.seed} must be <= {2**32 - 1}: numpy's generator, seeded from it, takes no more")
    at_least("steps", cfg.steps, 1)
    at_least("micro_batch_size", cfg.micro_batch_size, 1)
    at_least("global_batch_size", cfg.global_batch_size, 1)
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
    one_of("lr_scaling", cfg.lr_scaling, LR_SCALINGS)
    at_least("reference_batch_size", cfg.reference_batch_size, 0)
    if cfg.lr_scaling != "none" and cfg.reference_batch_size == 0:
        raise ConfigError(
            f"lr_scaling={cfg.lr_scaling} needs reference_batch_size: the global batch the learning rates were tuned for"
        )
    one_of("mixed_precision", cfg.mixed_precision, MIXED_PRECISIONS)
    one_of("compile_mode", cfg.compile_mode, COMPILE_MODES)
    one_of("compile_dynamic", cfg.compile_dynamic, COMPILE_DYNAMIC)
    if cfg.compile_mode != "default" and cfg.compile_backend != "inductor":
        raise ConfigError(
            f"compile_mode={cfg.compile_mode} is an inductor mode and compile_backend={cfg.compile_backend}; "
            "use compile_backend=inductor or compile_mode=default"
        )
    at_least("activation_checkpointing_every", cfg.activation_checkpointing_every, 1)
    at_least("profile_start", cfg.profile_start, 0)
    at_least("profile_steps", cfg.profile_steps, 1)
    if cfg.profile and cfg.profile_start + cfg.profile_steps > cfg.steps:
        raise ConfigError(
            f"profile_start={cfg.profile_start} + profile_steps={cfg.profile_steps} exceeds steps={cfg.steps}: "
            "the recorded steps would not all run; lower them"
        )
    at_least("eval_every", cfg.eval_every, 0)
    at_least("log_every", cfg.log_every, 1)
    at_least("checkpoint_every", cfg.checkpoint_every, 0)
    at_least("keep_checkpoints", cfg.keep_checkpoints, 1)
    if os.path.isabs(cfg.run_name) or ".." in cfg.run_name.split(os.sep):
        raise ConfigError(
            f"run_name={cfg.run_name} must name a directory inside output_dir (no absolute path, no '..'); "
            "choose the parent with output_dir="
        )
    if cfg.resume not in ("auto", "never") and not os.path.isdir(cfg.resume):
        raise ConfigError(f"resume={cfg.resume}: no such checkpoint directory; use auto, never or a checkpoint path")
    one_of("on_nonfinite", cfg.on_nonfinite, NONFINITE_ACTIONS)
    at_least("collective_timeout_s", cfg.collective_timeout_s, 1)
    for key in ("stall_timeout_s", "data_timeout_s", "stop_grace_s"):
        at_least(key, getattr(cfg, key), 0)
    cfg.data.validate()
    cfg.debug.validate(world_size)
    one_of("tracker", cfg.tracker, TRACKERS)
    if cfg.wandb.mode:
        one_of("wandb.mode", cfg.wandb.mode, ("online", "offline", "disabled"))


# --------------------------------------------------------------------------- help and output


def help_text(argv: list[str]) -> str:
    """The run keys and the chosen recipe's keys, with defaults (the recipe's own included)."""
    recipe = chosen_recipe([a for a in argv if "=" in a and not a.startswith("-")])
    cls = config_class(recipe)
    section_name = recipe_section(recipe)
    defaults = OmegaConf.merge(OmegaConf.structured(cls), OmegaConf.create({**run_defaults(recipe), "recipe": recipe}))
    lines = [
        "usage: python train.py [recipe=<name or module>] [config=<file.yaml>] [key=value ...]",
        "       accelerate launch [--config_file configs/accelerate/<x>.yaml] train.py [same arguments]",
        "",
        f"Keys (default) and meaning for recipe={recipe}; nested keys use dots, e.g. {section_name}.<key>=...:",
    ]
    for key, f in schema_keys(cls).items():
        value = OmegaConf.select(defaults, key)
        shown = f"{key}.*" if OmegaConf.is_config(value) else f"{key}={value}"
        lines.append(f"  {shown:<34} {f.metadata.get('help', '')}")
    others = [r for r in builtin_recipes() if r != recipe]
    lines += [
        "",
        f"Other built-in recipes: {', '.join(others)}; `python train.py recipe=<name> --help` lists their keys.",
    ]
    return "\n".join(lines)


def memory_bytes() -> int:
    """This machine's physical memory, for refusing sizes that cannot fit before they are tried."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# float32 weights, their gradients and two optimizer moments (Adam)
TRAINING_BYTES_PER_PARAMETER = 16


def mlp_parameters(inputs: int, hidden: int, layers: int, outputs: int) -> int:
    """Weights and biases of an MLP of `layers` hidden layers of width `hidden` (the built-in recipes')."""
    return (inputs + 1) * hidden + (layers - 1) * (hidden + 1) * hidden + (hidden + 1) * outputs


def fits_in_memory(keys: str, needed: int, what: str = "to train") -> None:
    """Refuse sizes whose tensors alone need more than half of this machine's memory, before any is
    allocated (a traceback from the allocator, or the OOM killer, otherwise)."""
    if needed > memory_bytes() // 2:
        raise ConfigError(
            f"{keys} need about {needed / 2**30:.1f} GiB {what}, more than half of this machine's "
            f"{memory_bytes() / 2**30:.0f} GiB; lower them"
        )


def fits_the_data(cfg: Config, key: str, samples: int) -> None:
    """A recipe with `samples` training samples (its key `key`): one step may not need more."""
    if cfg.global_batch_size > samples:
        raise ConfigError(
            f"global_batch_size={cfg.global_batch_size} exceeds {key}={samples}: one step would hold samples more "
            f"than once; lower global_batch_size or raise {key}"
        )


def between(key: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ConfigError(f"{key}={value} must lie in [{low}, {high}]")


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def is_main_launch_process() -> bool:
    """Rank 0 as the launcher announced it, before any process group: where one-line errors go."""
    return os.environ.get("RANK", "0") == "0"


def exit_with_config_error(e: ConfigError) -> None:
    """One line on the main process, none on the others, exit status 2."""
    if is_main_launch_process():
        print(f"config error: {e}", file=sys.stderr)
    sys.exit(2)
