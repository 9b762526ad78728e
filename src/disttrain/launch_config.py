"""Can `accelerate launch` start a run from this config file?

A malformed file makes the launcher itself fail with a traceback, before train.py (and its one-line
refusals) ever runs; under SLURM that happens after the job waited in the queue for its nodes. This
check reads the file the way the launcher does, with the launcher's own field types, and names the
first problem in one line. The SLURM scripts run it before `srun`; run it yourself before you submit:

    .venv/bin/python -m disttrain.launch_config configs/accelerate/my_cluster.yaml
"""

from __future__ import annotations

import dataclasses
import enum
import json
import sys
import typing
from typing import Any

import yaml

from disttrain.config import ConfigError

# What each field of the launcher's config takes, in words a user can act on.
_KIND_WORDS = {int: "a whole number", bool: "true or false", str: "a string", dict: "a mapping", list: "a list"}


def check_launch_config(path: str) -> None:
    """Raise ConfigError naming the file, the key and the fix for the first problem found."""
    settings = _read(path)
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.utils import PrecisionType

    fields = {f.name: f for f in dataclasses.fields(ClusterConfig)}
    hints = typing.get_type_hints(ClusterConfig)
    for key, value in settings.items():
        if key not in fields:
            raise ConfigError(
                f"{path}: unknown key '{key}' (the installed accelerate has no such setting); remove it "
                "or correct its name (`accelerate config` writes a valid file)"
            )
        if key == "mixed_precision":
            _check_choice(path, key, value, PrecisionType.list())
            continue
        _check_kind(path, key, value, hints[key])
    _check_counts(path, settings)
    try:  # what the launcher checks beyond the fields' types, in its own words
        load_config_from_file(path)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{path}: accelerate cannot read it: {first_line}") from e


def _read(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: no such accelerate config file; give an existing one (configs/accelerate/)"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the accelerate config file ({e})") from None
    try:
        settings = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); fix the file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML ({problem}{where}); fix the file") from None
    if not isinstance(settings, dict):
        found = "is empty" if settings is None else f"holds a {type(settings).__name__}"
        raise ConfigError(
            f"{path}: the file {found}, an accelerate config is a mapping of settings (key: value); "
            "start from configs/accelerate/ddp.yaml"
        )
    return settings


def _check_kind(path: str, key: str, value: Any, hint: Any) -> None:
    """The value against the launcher's own type for the field (optional fields take null)."""
    args = typing.get_args(hint)
    if type(None) in args and value is None:
        return
    kinds = [a for a in args if a is not type(None)] if args and typing.get_origin(hint) is not list else [hint]
    enums = [k for k in kinds if isinstance(k, type) and issubclass(k, enum.Enum)]
    if enums:
        _check_choice(path, key, value, sorted({member.value for e in enums for member in e}))
        return
    kind = typing.get_origin(kinds[0]) or kinds[0]
    # YAML's `8` is an int and `true` a bool; a bool is an int to Python, not to a user.
    fits = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if not fits:
        raise ConfigError(
            f"{path}: {key}: {value!r} is not {_KIND_WORDS.get(kind, kind.__name__)}; "
            f"give {key} {_KIND_WORDS.get(kind, 'a ' + kind.__name__)}"
        )


def _check_choice(path: str, key: str, value: Any, choices: list[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{path}: {key}: {value!r} is not one of {', '.join(map(str, choices))}; choose one")


def _check_counts(path: str, settings: dict[str, Any]) -> None:
    for key in ("num_processes", "num_machines"):
        if key in settings and settings[key] < 1:
            raise ConfigError(f"{path}: {key}: {settings[key]} is below 1; give at least 1")
    machines = settings.get("num_machines", 1)
    rank = settings.get("machine_rank", 0)
    if not 0 <= rank < machines:
        raise ConfigError(
            f"{path}: machine_rank: {rank} is not between 0 and num_machines - 1 ({machines - 1}); "
            "the SLURM scripts set it per node, leave it 0"
        )


def main(argv: list[str]) -> int:
    if not argv or any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip())
        return 0 if argv else 2
    failed = False
    for path in argv:
        try:
            check_launch_config(path)
        except ConfigError as e:
            print(f"config error: {e}", file=sys.stderr)
            failed = True
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
