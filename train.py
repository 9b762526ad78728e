"""Train a recipe: `python train.py [config=configs/x.yaml] [key=value ...]`, or the same after `accelerate launch`."""

import sys

from disttrain.config import main_or_exit


def main() -> None:
    cfg = main_or_exit(sys.argv[1:])  # before any heavy import or process group: fast --help and errors

    import logging

    from disttrain.trainer import Trainer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    trainer = Trainer(cfg)
    try:
        trainer.fit()
    finally:
        trainer.close()


if __name__ == "__main__":
    main()
