"""Train a recipe: `python train.py [config=configs/x.yaml] [key=value ...]`, or the same after `accelerate launch`."""

import os
import sys

from disttrain.config import main_or_exit


def main() -> None:
    cfg = main_or_exit(sys.argv[1:])  # before any heavy import or process group: fast --help and errors

    import logging

    from disttrain.checkpoint import CheckpointError
    from disttrain.trainer import Trainer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        trainer = Trainer(cfg)
    except CheckpointError as e:  # a resume that cannot be: one line, not a traceback per process
        if os.environ.get("RANK", "0") == "0":
            print(f"checkpoint error: {e}", file=sys.stderr)
        sys.exit(2)
    try:
        trainer.fit()
    finally:
        trainer.close()


if __name__ == "__main__":
    main()
