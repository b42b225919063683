"""Material for the train/README.md walk-through, built offline: `lfm2vl example DIR --size 450m` (a
random-weight checkpoint with the LFM2-VL-450M shapes, processor files and a stand-in tokenizer, and
small JSONL files of conversations about drawn images). Extra arguments are passed on (--overwrite, ...).

    python train/make_example.py runs/example      # -> runs/example/{model,data}
"""

from __future__ import annotations

import sys

from lfm2vl_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["example", "--size", "450m", *(sys.argv[1:] or ["runs/example"])]))
