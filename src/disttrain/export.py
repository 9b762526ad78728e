"""Turn a checkpoint into safetensors files of full float32 weights, on one CPU process without a
process group:

    python -m disttrain.export CHECKPOINT_DIR OUT.safetensors [--tag TAG]     # DeepSpeed
    python -m disttrain.export STEP_DIR/fsdp OUT_DIR [--model NAME]           # FSDP2

DeepSpeed: CHECKPOINT_DIR is the directory given to `engine.save_checkpoint` (it holds `latest` and
one folder per tag), any ZeRO stage and number of processes. FSDP2: a run checkpoint's `fsdp/`
folder (torch.distributed.checkpoint's shards, any number of processes) or the `step-XXXXXXXX/`
folder holding it; each model becomes `OUT_DIR/<model>.safetensors` (or one model, `--model` or the
only one, goes to a file named `*.safetensors`). Inside a run checkpoint (either engine) every file
of the checkpoint is checked against its manifest's sha256 first; nothing is unpickled beyond
tensors and DCP's own records.

Files are written aside and renamed, so a reader never sees half of one. Tied weights are stored
once, their other names recorded as aliases, as in the files training writes (disttrain.weights):
DeepSpeed gives them back as one tensor under each name; DCP stores each name apart, so the ties
are those the checkpoint's own `models/<model>.safetensors` records.
"""

from __future__ import annotations

import argparse
import os
import warnings


def verify_run_checkpoint(path: str) -> None:
    """If `path` lies in a run checkpoint (`step-XXXXXXXX/` or a folder in it), check every file of
    that checkpoint against its manifest before anything is read: a changed byte in an optimizer's
    shard is refused, not exported as slightly wrong weights."""
    from disttrain.checkpoint import MANIFEST, CheckpointDamaged, verify

    folder = os.path.abspath(path)
    for _ in range(3):  # step-X/, step-X/fsdp, step-X/deepspeed/<model>
        if os.path.isfile(os.path.join(folder, MANIFEST)):
            try:
                verify(folder)
            except CheckpointDamaged as e:
                raise SystemExit(f"export: {e}") from e
            return
        folder = os.path.dirname(folder)


def export_checkpoint(checkpoint_dir: str, out: str, tag: str | None = None, verified: bool = False) -> int:
    """Write the checkpoint's full weights to `out`; returns the number of tensors it stores."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if not verified:
        verify_run_checkpoint(checkpoint_dir)
    tag = tag or _only_tag(checkpoint_dir)
    return _write(get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=tag), out)


def _only_tag(checkpoint_dir: str) -> str | None:
    """The tag to export when none is given: the one `latest` names, else the directory's only tag
    (a run's checkpoint keeps its DeepSpeed state under `state` and writes no `latest`)."""
    if os.path.exists(os.path.join(checkpoint_dir, "latest")):
        return None
    if not os.path.isdir(checkpoint_dir):
        raise SystemExit(f"export: {checkpoint_dir} is not a directory; give a checkpoint directory")
    if any(name.endswith(".distcp") for name in os.listdir(checkpoint_dir)):
        raise SystemExit(
            f"export: {checkpoint_dir} holds FSDP shards (.distcp) but no .metadata: the checkpoint is incomplete"
        )
    tags = sorted(d for d in os.listdir(checkpoint_dir) if os.path.isdir(os.path.join(checkpoint_dir, d)))
    tags = [t for t in tags if any(f.endswith("model_states.pt") for f in os.listdir(os.path.join(checkpoint_dir, t)))]
    if len(tags) != 1:
        raise SystemExit(
            f"export: {checkpoint_dir} names no `latest` tag and holds {len(tags)} DeepSpeed tags"
            + (f" ({', '.join(tags)})" if tags else "")
            + "; pass --tag TAG, or give the directory that holds the tag"
        )
    return tags[0]


def fsdp_state_dir(path: str) -> str | None:
    """The DCP folder `path` names (itself, or the `fsdp/` folder of a run checkpoint), or None."""
    from disttrain.engines.fsdp import STATE_DIR

    for folder in (path, os.path.join(path, STATE_DIR)):
        if os.path.isfile(os.path.join(folder, ".metadata")):
            return folder
    return None


def export_fsdp_checkpoint(
    state_dir: str, out: str, model: str | None = None, verified: bool = False
) -> dict[str, str]:
    """Write each model's full weights from an FSDP checkpoint's DCP folder; returns {model: file}."""
    import torch
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    from disttrain.safe_files import dcp_reader
    from disttrain.weights import file_aliases

    if not verified:
        verify_run_checkpoint(state_dir)
    step_dir = os.path.dirname(os.path.normpath(state_dir))
    with warnings.catch_warnings():
        # "torch.distributed is unavailable or uninitialized": one process, on purpose.
        warnings.filterwarnings("ignore", message="torch.distributed is unavailable or uninitialized")
        models: dict[str, dict[str, torch.Tensor]] = _load_state_dict_from_keys(
            {"models"}, storage_reader=dcp_reader(state_dir)
        )["models"]
    names = [model] if model else sorted(models)
    if model and model not in models:
        raise SystemExit(f"export: {state_dir} holds no model {model!r}; it holds {', '.join(sorted(models))}")
    single = out.endswith(".safetensors")
    if single and len(names) != 1:
        raise SystemExit(
            f"export: {state_dir} holds {len(names)} models ({', '.join(names)}); give a folder as OUT, "
            "or choose one with --model NAME"
        )
    if not single:
        os.makedirs(out, exist_ok=True)
    written = {}
    for name in names:
        state = models[name]
        weights_file = os.path.join(step_dir, "models", f"{name}.safetensors")
        for alias, kept in (file_aliases(weights_file) if os.path.isfile(weights_file) else {}).items():
            if not torch.equal(state[alias], state[kept]):
                raise SystemExit(f"export: {alias} and {kept} of {name} are tied in {weights_file} but differ here")
            state[alias] = state[kept]  # one tensor again: stored once, the other name an alias
        written[name] = out if single else os.path.join(out, f"{name}.safetensors")
        _write(state, written[name])
    return written


def _write(state: dict, out: str) -> int:
    from safetensors.torch import save_file

    from disttrain.weights import deduplicated

    # Written from the tensors, not from bytes in memory: a large model's weights fit only once.
    tensors, metadata = deduplicated(state)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save_file(tensors, out + ".tmp", metadata=metadata)
    os.replace(out + ".tmp", out)
    return len(tensors)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m disttrain.export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint_dir", help="a DeepSpeed checkpoint directory, or an FSDP checkpoint's fsdp/ folder")
    parser.add_argument("out", help="a .safetensors file, or (FSDP, several models) a folder")
    parser.add_argument("--tag", default=None, help="DeepSpeed checkpoint tag; default: the one named in `latest`")
    parser.add_argument("--model", default=None, help="FSDP: export this model only")
    args = parser.parse_args(argv)
    from disttrain.weights import file_aliases  # after parsing: --help imports no torch

    verify_run_checkpoint(args.checkpoint_dir)  # first: a missing file is named, not mistaken for another layout
    state_dir = fsdp_state_dir(args.checkpoint_dir)
    if state_dir is None:
        files = {"": args.out}
        count = {"": export_checkpoint(args.checkpoint_dir, args.out, args.tag, verified=True)}
    else:
        files = export_fsdp_checkpoint(state_dir, args.out, args.model, verified=True)
        count = {name: len(safe_keys(file)) for name, file in files.items()}
    for name, file in files.items():
        tied = len(file_aliases(file))
        print(f"wrote {count[name]} tensors to {file}" + (f"; {tied} tied name(s) recorded as aliases" if tied else ""))


def safe_keys(file: str) -> list[str]:
    from safetensors import safe_open

    with safe_open(file, framework="pt") as f:
        return list(f.keys())


if __name__ == "__main__":
    main()
