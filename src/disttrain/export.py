"""Turn a DeepSpeed checkpoint (any ZeRO stage, any number of processes) into one safetensors file
of full float32 weights, on one CPU process:

    python -m disttrain.export CHECKPOINT_DIR OUT.safetensors [--tag TAG]

CHECKPOINT_DIR is the directory given to `engine.save_checkpoint` (it holds `latest` and one folder
per tag). The file is written aside and renamed, so a reader never sees half of it. Tied weights
(DeepSpeed gives them back as one tensor under each name) are stored once, their other names
recorded as aliases, as in the files training writes (disttrain.weights).
"""

from __future__ import annotations

import argparse
import os


def export_checkpoint(checkpoint_dir: str, out: str, tag: str | None = None) -> int:
    """Write the checkpoint's full weights to `out`; returns the number of tensors it stores."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import save_file

    from disttrain.weights import deduplicated

    tag = tag or _only_tag(checkpoint_dir)
    state = get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=tag)
    # Written from the tensors, not from bytes in memory: a large model's weights fit only once.
    tensors, metadata = deduplicated(state)
    save_file(tensors, out + ".tmp", metadata=metadata)
    os.replace(out + ".tmp", out)
    return len(tensors)


def _only_tag(checkpoint_dir: str) -> str | None:
    """The tag to export when none is given: the one `latest` names, else the directory's only tag
    (a run's checkpoint keeps its DeepSpeed state under `state` and writes no `latest`)."""
    if os.path.exists(os.path.join(checkpoint_dir, "latest")):
        return None
    tags = sorted(d for d in os.listdir(checkpoint_dir) if os.path.isdir(os.path.join(checkpoint_dir, d)))
    tags = [t for t in tags if any(f.endswith("model_states.pt") for f in os.listdir(os.path.join(checkpoint_dir, t)))]
    if len(tags) != 1:
        raise SystemExit(
            f"export: {checkpoint_dir} names no `latest` tag and holds {len(tags)} DeepSpeed tags"
            + (f" ({', '.join(tags)})" if tags else "")
            + "; pass --tag TAG, or give the directory that holds the tag"
        )
    return tags[0]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m disttrain.export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint_dir")
    parser.add_argument("out")
    parser.add_argument("--tag", default=None, help="checkpoint tag; default: the one named in `latest`")
    args = parser.parse_args(argv)
    from disttrain.weights import file_aliases  # after parsing: --help imports no torch

    count = export_checkpoint(args.checkpoint_dir, args.out, args.tag)
    tied = len(file_aliases(args.out))
    print(f"wrote {count} tensors to {args.out}" + (f"; {tied} tied name(s) recorded as aliases" if tied else ""))


if __name__ == "__main__":
    main()
