"""The run-time package never imports torch: importing lfm2vl_jax and running the processor on every kind
of image input it takes (arrays in both channel layouts, a jax array, a file, a conversation) leaves
`torch` out of `sys.modules`. Run in a fresh interpreter, since the test session itself imports torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from training_fixtures import subprocess_env

TESTS = Path(__file__).resolve().parents[1]

SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from pathlib import Path
import jax.numpy as jnp
import numpy as np
from processor_fixtures import image_path, make_checkpoint_dir, synthetic_image
import lfm2vl_jax
from lfm2vl_jax import Lfm2VlProcessor

processor = Lfm2VlProcessor.from_pretrained(make_checkpoint_dir(Path({out!r}), "lfm2-vl-450m"))
image = synthetic_image(60, 80)
inputs = [image, image.transpose(2, 0, 1), jnp.asarray(image), str(image_path("grace_hopper.jpg"))]
result = processor(images=inputs, text="<image>" * len(inputs), max_image_tokens=64)
conversation = [{{"role": "user", "content": [{{"type": "image", "image": jnp.asarray(image)}}]}}]
processor.apply_chat_template(conversation, tokenize=True, return_dict=True)
assert result["pixel_values"].shape[0] >= len(inputs)
loaded = sorted(name for name in sys.modules if name == "torch" or name.startswith("torch."))
print("torch modules:", loaded)
sys.exit(1 if loaded else 0)
"""


def test_package_and_processor_never_import_torch(tmp_path: Path) -> None:
    script = SCRIPT.format(tests=str(TESTS), out=str(tmp_path / "checkpoint"))
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=subprocess_env(tmp_path / "cache"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "torch modules: []" in result.stdout
