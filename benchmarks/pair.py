"""Ours and transformers' LFM2-VL on the same random weights, for the benchmarks.

The real LFM2-VL-450M shapes (released config) or 1.6B shapes (reconstructed config), or "tiny" (the 450M's
files and vocabulary around a 4-layer text tower of width 64 and a 2-layer vision tower: smoke runs);
processor files of the released checkpoints with the tests' stand-in tokenizer. Weights of realistic scale
are drawn by transformers (`randomize_weights`), saved, and loaded by both; with `ours_only` no torch is
imported: the weights come from our `init_params`.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from processor_fixtures import REFERENCE_DIR, make_checkpoint_dir  # noqa: E402

from lfm2vl_jax import Lfm2VlForConditionalGeneration, Lfm2VlProcessor  # noqa: E402
from lfm2vl_jax.checkpoint.canonical import from_canonical, to_canonical  # noqa: E402
from lfm2vl_jax.config import DTypePolicy, RuntimeConfig, config_from_dict  # noqa: E402
from lfm2vl_jax.nn.params import init_params  # noqa: E402

MODELS = {"450m": "lfm2-vl-450m", "1.6b": "lfm2-vl-1.6b", "tiny": "lfm2-vl-450m"}
DTYPES = ("float32", "bfloat16")
TINY = {
    "projector_hidden_size": 128,
    "text_config": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "block_auto_adjust_ff_dim": False,
        "num_attention_heads": 4,
        "num_heads": 4,
        "num_key_value_heads": 2,
        "num_hidden_layers": 4,
        "layer_types": ["conv", "full_attention", "conv", "full_attention"],
    },
    "vision_config": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
    },
}


def raw_config(name: str) -> dict:
    """The checkpoint's config.json of model `name` (a key of MODELS)."""
    raw = json.loads((REFERENCE_DIR / MODELS[name] / "config.json").read_text())
    if name == "tiny":
        for key, value in TINY.items():
            raw[key] = {**raw[key], **value} if isinstance(value, dict) else value
    return raw


class ModelPair:
    """A checkpoint directory (processor files + weights) and the models: `ours`, `reference` (None with
    `ours_only`), `processor` (ours; identical outputs to transformers', as the parity tests show)."""

    def __init__(
        self, name: str, directory: Path, dtype: str, scan_layers: bool = False, ours_only: bool = False
    ):
        make_checkpoint_dir(directory, MODELS[name])
        raw = raw_config(name)
        runtime = RuntimeConfig(dtypes=DTypePolicy.uniform(jnp.dtype(dtype)), scan_layers=scan_layers)
        self.reference = None
        self.device = "cpu"
        if ours_only:
            config = config_from_dict(raw).replace(runtime=runtime)
            self.ours = Lfm2VlForConditionalGeneration(config, init_params(config, jax.random.key(0)))
        else:
            import torch
            from reference_models import randomize_weights
            from transformers import Lfm2VlConfig as HfConfig
            from transformers import Lfm2VlForConditionalGeneration as HfModel

            config = HfConfig(**{k: v for k, v in raw.items() if k != "model_type"})
            torch.manual_seed(0)
            reference = randomize_weights(HfModel(config).float(), seed=0)
            reference.save_pretrained(directory)
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
            self.reference = reference.to(self.device, getattr(torch, dtype)).eval()
            self.ours = Lfm2VlForConditionalGeneration.from_pretrained(
                directory, runtime=runtime, progress=False
            )
        self.processor = Lfm2VlProcessor.from_pretrained(directory)
        self.directory = directory

    def with_layout(self, scan_layers: bool) -> Lfm2VlForConditionalGeneration:
        """Our model with the same weights in the other text-layer layout."""
        config = self.ours.config.with_runtime(scan_layers=scan_layers)
        params = from_canonical(to_canonical(self.ours.params, self.ours.config), config)
        return Lfm2VlForConditionalGeneration(config, params)

    def torch_inputs(self, inputs: dict) -> dict:
        import torch

        tensors = {k: torch.as_tensor(np.asarray(v)).to(self.device) for k, v in inputs.items()}
        if "pixel_attention_mask" in tensors:
            tensors["pixel_attention_mask"] = tensors["pixel_attention_mask"].bool()
        return tensors

    def sync(self, result: object) -> object:
        jax.block_until_ready(result)
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
        return result


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds of each call, the callables alternating (a, b, a, b, ...) after one warm-up call each, so
    that a change in the machine's load hits all of them alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times
