"""Convert an orbax LFM2-VL checkpoint directory (written by hf_to_orbax.py) to a transformers checkpoint.

    python convert/orbax_to_hf.py SRC DST [--dtype bfloat16] [--max-shard-size 5GB] [--overwrite] [--quiet]

DST gets config.json, model.safetensors (sharded with an index above --max-shard-size) and SRC's
tokenizer/processor/generation files.
"""

from __future__ import annotations

import sys

from lfm2vl_jax.export import orbax_to_hf_main


def main(argv: list[str] | None = None) -> int:
    return orbax_to_hf_main(argv)


if __name__ == "__main__":
    sys.exit(main())
