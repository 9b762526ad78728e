"""Train a recipe: `python train.py [recipe=<name>] [config=configs/x.yaml] [key=value ...]`, or the same after `accelerate launch`."""

import sys

from disttrain.preflight import config_or_exit


def main() -> None:
    cfg = config_or_exit(sys.argv[1:])  # before any heavy import or process group: fast --help and errors

    from disttrain.trainer import run

    sys.exit(run(cfg))


if __name__ == "__main__":
    main()
