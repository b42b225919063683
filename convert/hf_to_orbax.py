"""Convert a transformers LFM2-VL checkpoint (directory or hub id) to an orbax checkpoint directory.

    python convert/hf_to_orbax.py SRC DST [--dtype bfloat16] [--overwrite] [--quiet]

DST gets config.json, the tokenizer/processor/generation files of SRC, and the params under DST/params
(canonical per-layer layout). Same as `lfm2vl convert hf-to-orbax`.
"""

from __future__ import annotations

import argparse
import sys

from lfm2vl_jax.cli import add_hf_to_orbax_arguments, run_command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf_to_orbax", description=__doc__.splitlines()[0])
    add_hf_to_orbax_arguments(parser)
    return run_command(parser.parse_args(argv), "hf_to_orbax")


if __name__ == "__main__":
    sys.exit(main())
