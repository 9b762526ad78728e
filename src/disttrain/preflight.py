"""Everything checked before a process group starts: the config, then what spans modules.

`resolve_config` loads the config (`disttrain.config`), runs the recipe's own validation, checks the
launcher's variables, the device, the DeepSpeed file and the tracker package, and resolves derived
values (the DeepSpeed file a launcher names), so that the trainer runs the config it is given
without changing it. `train.py` calls `config_or_exit`: one line per run for any refusal.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import fields, is_dataclass
from typing import Any

from disttrain.config import (
    Config,
    ConfigError,
    OptimizerConfig,
    exit_with_config_error,
    help_text,
    load_config,
    world_size_from_env,
)
from disttrain.deepspeed_config import check_against_run, deepspeed_config_path, load_user_config
from disttrain.tracking import check_tracker


def resolve_config(argv: list[str], world_size: int | None = None) -> Config:
    """The run's config, checked as a whole; raises ConfigError naming the key and the fix."""
    world = world_size_from_env() if world_size is None else world_size
    cfg = load_config(argv, world)
    cfg.deepspeed_config = deepspeed_config_path(cfg)  # `accelerate launch` may name it in its variables
    cfg.fsdp.enabled = cfg.fsdp.enabled or launcher_selects_fsdp()
    validate_recipe = getattr(cfg.recipe_config, "validate", None)
    if validate_recipe is not None:
        validate_recipe(cfg)
    from disttrain.optim import check_optimizer  # imports torch: not at the top, --help loads this module

    for key, optimizer in optimizer_configs(cfg.recipe_config, cfg.recipe_section):
        check_optimizer(key, optimizer)
    check_tracker(cfg)
    check_deepspeed(cfg, world)
    check_fsdp(cfg)
    check_launcher_env(cfg)
    check_device_support(cfg, world)
    check_compile(cfg)
    check_output_dir(cfg)
    return cfg


def config_or_exit(argv: list[str]) -> Config:
    """train.py's entry: print help or a one-line config error and exit, else return the config."""
    try:
        if any(a in ("-h", "--help", "help") for a in argv):
            print_to_stdout(help_text(argv))
            sys.exit(0)
        return resolve_config(argv)
    except ConfigError as e:
        exit_with_config_error(e)
        raise  # not reached: exit_with_config_error exits


def optimizer_configs(node: Any, key: str) -> Iterator[tuple[str, OptimizerConfig]]:
    """Every optimizer section of a recipe's config, with its key."""
    for f in fields(node):
        value = getattr(node, f.name)
        if isinstance(value, OptimizerConfig):
            yield f"{key}.{f.name}", value
        elif is_dataclass(value):
            yield from optimizer_configs(value, f"{key}.{f.name}")


def print_to_stdout(text: str) -> None:
    """Print, also into a pipe its reader closed early (`--help | head`): no BrokenPipeError."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # Python flushes stdout again at exit: point it at nothing so that flush cannot fail.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def check_deepspeed(cfg: Config, world_size: int) -> None:
    if not cfg.deepspeed_config:
        return
    user = load_user_config(cfg.deepspeed_config)
    check_against_run(user, cfg.deepspeed_config, cfg, world_size)
    if cfg.checkpoint_async:
        raise ConfigError(
            "checkpoint_async=true is not supported under DeepSpeed (its engines write their partitions "
            "themselves, with collectives on the training process group, so the write cannot leave the "
            "step); set checkpoint_async=false, or train with the ddp or fsdp2 launch config"
        )
    if cfg.on_nonfinite == "skip":
        raise ConfigError(
            "on_nonfinite=skip is not supported under DeepSpeed (its engines keep the reduced gradients "
            "until they step); use on_nonfinite=stop, which checkpoints the state before the bad step"
        )


def launcher_selects_fsdp() -> bool:
    """Whether `accelerate launch` runs an FSDP config (configs/accelerate/fsdp2.yaml): Accelerate
    announces it in its variables, and the FSDP engine wraps the models itself (also on CPU, where
    Accelerate would not)."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return False
    version = os.environ.get("FSDP_VERSION", "1")
    if version != "2":
        raise ConfigError(
            f"the accelerate config selects FSDP version {version}; disttrain trains with FSDP2: "
            "set fsdp_version: 2 in its fsdp_config (see configs/accelerate/fsdp2.yaml)"
        )
    return True


def check_fsdp(cfg: Config) -> None:
    if not cfg.fsdp.enabled:
        return
    if cfg.deepspeed_config:
        raise ConfigError(
            f"fsdp.enabled=true together with deepspeed_config={cfg.deepspeed_config}: choose one engine "
            "(drop deepspeed_config, or set fsdp.enabled=false)"
        )
    if cfg.mixed_precision == "fp16":
        raise ConfigError(
            "mixed_precision=fp16 is not supported with FSDP (it would need a sharded loss scaler); "
            "use mixed_precision=bf16: FSDP keeps float32 sharded weights and reduces in float32"
        )
    import torch

    if cfg.fsdp.cpu_offload and not torch.cuda.is_available():
        raise ConfigError(
            "fsdp.cpu_offload=true needs GPUs: on this CPU machine the sharded state already lives in CPU memory; "
            "set fsdp.cpu_offload=false"
        )


def check_compile(cfg: Config) -> None:
    """A backend torch knows, and for inductor on CPU the C++ compiler it generates code for."""
    if not cfg.compile:
        return
    import torch

    backends = torch._dynamo.list_backends(exclude_tags=())
    if cfg.compile_backend not in backends:
        raise ConfigError(f"compile_backend={cfg.compile_backend} is not one of: {', '.join(sorted(backends))}")
    if cfg.compile_backend == "inductor" and not torch.cuda.is_available():
        compiler = os.environ.get("CXX", "g++")
        if shutil.which(compiler) is None:
            raise ConfigError(
                f"compile=true with compile_backend=inductor on CPU generates C++ and needs a compiler ({compiler} "
                "is not on PATH): install g++, or set compile_backend=aot_eager (no code generation)"
            )


def check_output_dir(cfg: Config) -> None:
    """The run directory's parent must be a writable directory (or creatable in one)."""
    path = os.path.abspath(cfg.output_dir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"output_dir={cfg.output_dir} is a file, not a directory; choose another output_dir")
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        what = "is not writable" if existing == path else f"cannot be created: {existing} is not writable"
        raise ConfigError(f"output_dir={cfg.output_dir} {what} by this user; choose another output_dir")


def check_launcher_env(cfg: Config) -> None:
    """Refuse launcher settings that would silently override this run's config.

    `accelerate launch` exports its config file's values, and Accelerate reads them over the
    arguments it is given: a second source for settings that decide the update.
    """
    # The launcher exports "no" when its config file names no precision: its default, which cannot be
    # told from `--mixed_precision no` given on purpose. Only a precision it was given can disagree.
    launcher_precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launcher_precision not in ("no", cfg.mixed_precision):
        raise ConfigError(
            f"mixed_precision={cfg.mixed_precision} but the accelerate launch config says "
            f"mixed_precision: {launcher_precision}; set it once, in the run config (mixed_precision=...), "
            "and remove it from the accelerate config"
        )
    launcher_accumulation = os.environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "1")
    if launcher_accumulation != "1":
        raise ConfigError(
            f"the accelerate launch config sets gradient_accumulation_steps: {launcher_accumulation}; "
            "remove it: accumulation follows from global_batch_size / (micro_batch_size x processes)"
        )


def check_device_support(cfg: Config, world_size: int) -> None:
    import torch

    if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("mixed_precision=fp16 needs a GPU (CPU has no fp16 loss scaling); use bf16 on CPU")
    if cfg.sync_batchnorm and world_size > 1 and not torch.cuda.is_available():
        raise ConfigError("sync_batchnorm=true needs GPUs (torch's SyncBatchNorm does not run on CPU); set it to false")
