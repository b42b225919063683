"""Convert a transformers LFM2-VL checkpoint (directory or hub id) to an orbax checkpoint directory.

    python convert/hf_to_orbax.py SRC DST [--dtype bfloat16] [--overwrite] [--quiet]

DST gets config.json, the tokenizer/processor/generation files of SRC, and the params under DST/params.
"""

from __future__ import annotations

import sys

from lfm2vl_jax.export import hf_to_orbax_main


def main(argv: list[str] | None = None) -> int:
    return hf_to_orbax_main(argv)


if __name__ == "__main__":
    sys.exit(main())
