"""A processor and a model whose image tokens disagree are refused before anything runs, naming both ids
(the batch engine here; the CLI and the trainer make the same check)."""

from __future__ import annotations

import pytest
from tiny_checkpoints import numpy_params, tiny_config

from lfm2vl_jax import Lfm2VlForConditionalGeneration
from lfm2vl_jax.processing.image_processor import ProcessorError


def test_image_token_ids_that_disagree_are_named(processor):
    config = tiny_config()
    assert config.image_token_id == processor.image_token_id  # 396: the pair belongs together
    processor.check_model(config.image_token_id)
    other = config.replace(image_token_id=395)
    model = Lfm2VlForConditionalGeneration(other, numpy_params(other))
    message = r"tokenizer's <image> is id 396 but the model's config.json says image_token_id 395"
    with pytest.raises(ProcessorError, match=message):
        model.batch_engine(processor, slots=1, max_length=8)
    with pytest.raises(ProcessorError, match=r"config.json says image_token_id 124907"):
        processor.check_model(124907, "config.json")
