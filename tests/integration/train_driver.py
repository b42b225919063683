"""`lfm2vl train` for the resume test, run as a subprocess. With LFM2VL_TEST_SLOW_SAVE="STEP:SECONDS",
the background part of step STEP's checkpoint save (grain's data-state handler, which orbax runs on its
async thread after `save` has returned) first prints "saving step STEP" and sleeps, so that the test can
kill the process in the middle of an asynchronous save."""

from __future__ import annotations

import os
import re
import sys
import time

import grain

from lfm2vl_jax.cli import main

if os.environ.get("LFM2VL_TEST_SLOW_SAVE"):
    step, seconds = os.environ["LFM2VL_TEST_SLOW_SAVE"].split(":")
    original = grain.checkpoint.CheckpointHandler.save

    def slow_save(self, directory, *args, **kwargs):
        if re.search(rf"checkpoints/{step}\b", str(directory)):
            print(f"saving step {step}", flush=True)
            time.sleep(float(seconds))
        return original(self, directory, *args, **kwargs)

    grain.checkpoint.CheckpointHandler.save = slow_save

sys.exit(main(["train", *sys.argv[1:]]))
