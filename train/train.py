"""Fine-tuning entry script: the same as `lfm2vl train` (see train/README.md).

python train/train.py --config train/configs/example-450m.yaml [--steps N] [--resume] ...
"""

import sys

from lfm2vl_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
