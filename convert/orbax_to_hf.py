"""Convert an orbax LFM2-VL checkpoint directory (written by hf_to_orbax.py) to a transformers checkpoint.

    python convert/orbax_to_hf.py SRC DST [--dtype bfloat16] [--max-shard-size 5GB] [--overwrite] [--quiet]

DST gets config.json, model.safetensors (sharded with an index above --max-shard-size) and SRC's
tokenizer/processor/generation files. Same as `lfm2vl convert orbax-to-hf`.
"""

from __future__ import annotations

import argparse
import sys

from lfm2vl_jax.cli import add_orbax_to_hf_arguments, run_command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="orbax_to_hf", description=__doc__.splitlines()[0])
    add_orbax_to_hf_arguments(parser)
    return run_command(parser.parse_args(argv), "orbax_to_hf")


if __name__ == "__main__":
    sys.exit(main())
