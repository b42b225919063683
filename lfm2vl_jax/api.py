"""`Lfm2VlForConditionalGeneration`: the model in Hugging Face's vocabulary, over plain functions."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from .checkpoint import load_hf_checkpoint
from .config import Lfm2VlConfig
from .hub import resolve_checkpoint_dir
from .model import as_numpy_inputs, check_inputs, forward
from .params import Params


class CausalLMOutput(NamedTuple):
    logits: jax.Array  # (batch, seq, vocab), float32


class Lfm2VlForConditionalGeneration:
    """An LFM2-VL model: a frozen config and a params pytree.

    >>> model = Lfm2VlForConditionalGeneration.from_pretrained("LiquidAI/LFM2-VL-450M", dtype=jnp.bfloat16)
    >>> logits = model(**processor_outputs).logits
    """

    def __init__(self, config: Lfm2VlConfig, params: Params):
        self.config = config
        self.params = params

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | Path,
        dtype: Any = jnp.float32,
        shardings: Any = None,
        progress: bool = True,
    ) -> Lfm2VlForConditionalGeneration:
        """Loads a transformers checkpoint from a local directory or a Hugging Face Hub id."""
        directory = resolve_checkpoint_dir(path_or_hub_id)
        config, params = load_hf_checkpoint(directory, dtype=dtype, shardings=shardings, progress=progress)
        return cls(config, params)

    @property
    def dtype(self) -> Any:
        return self.params["text"]["embed"].dtype

    def __call__(
        self,
        input_ids: Any,
        attention_mask: Any = None,
        pixel_values: Any = None,
        pixel_attention_mask: Any = None,
        spatial_shapes: Any = None,
    ) -> CausalLMOutput:
        """The reference's forward pass on right-padded inputs (numpy or jax arrays)."""
        inputs = as_numpy_inputs(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            pixel_attention_mask=pixel_attention_mask,
            spatial_shapes=spatial_shapes,
        )
        check_inputs(self.config, **inputs)
        if inputs["attention_mask"] is None:
            inputs["attention_mask"] = inputs["input_ids"] * 0 + 1
        logits = forward(self.params, self.config, **inputs)
        return CausalLMOutput(logits=logits)
