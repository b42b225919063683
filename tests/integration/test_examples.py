"""The examples run, and do what they say."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_linen_head_on_a_frozen_model_learns():
    spec = importlib.util.spec_from_file_location("linen_head", EXAMPLES / "linen_head.py")
    example = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = example  # its linen (data)classes look their module up
    spec.loader.exec_module(example)
    losses = example.main(["--steps", "12"])
    assert len(losses) == 12 and losses[-1] < 0.5 * losses[0], losses
