"""Issue 25's silent failures and unnamed errors on the inference side: non-finite checkpoint tensors, seeds
that lost their high bits, tiny temperatures, sampling options without `do_sample`, generation_config.json
lengths, strings read as booleans, image paths that are not files, and malformed config files. Each case
gets one `Lfm2VlError` naming the tensor, option, key or file, or the documented behaviour."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from tiny_checkpoints import copy_checkpoint, replace_tensor, write_tiny_checkpoint

from lfm2vl_jax import Lfm2VlForConditionalGeneration
from lfm2vl_jax.checkpoint.hf import CheckpointError, load_hf_checkpoint
from lfm2vl_jax.inputs import OptionError

PROMPT = np.array([[1, 5, 9, 13, 17, 21]])
W1 = "model.language_model.layers.0.feed_forward.w1.weight"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """Vocabulary 512, 64 positions."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt")


@pytest.fixture(scope="module")
def model(tiny) -> Lfm2VlForConditionalGeneration:
    return Lfm2VlForConditionalGeneration.from_pretrained(tiny, progress=False)


# Non-finite checkpoint tensors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad, dtype, message",
    [
        (np.nan, np.float32, "holds 1 NaN and 0 infinite values"),
        (-np.inf, np.float32, "holds 0 NaN and 1 infinite values"),
        (np.nan, ml_dtypes.bfloat16, "holds 1 NaN and 0 infinite values"),
    ],
)
def test_a_non_finite_tensor_is_named_with_its_file(tiny, tmp_path, bad, dtype, message):
    directory = copy_checkpoint(tiny, tmp_path / "ckpt")
    weights = np.ones((64, 32), dtype)
    weights[3, 7] = bad
    replace_tensor(directory / "model.safetensors", W1, weights)
    expected = f"tensor '{W1}' in {directory / 'model.safetensors'} {message}"
    with pytest.raises(CheckpointError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        Lfm2VlForConditionalGeneration.from_pretrained(directory, progress=False)
    with pytest.raises(CheckpointError, match="check_finite=False"):
        load_hf_checkpoint(directory, progress=False)
    # the check can be skipped: the damaged value is loaded as it is
    model = Lfm2VlForConditionalGeneration.from_pretrained(directory, progress=False, check_finite=False)
    assert sum(int((~np.isfinite(np.asarray(leaf))).sum()) for leaf in jax.tree.leaves(model.params)) == 1


def test_values_beyond_the_params_dtype_are_named(tiny, tmp_path):
    directory = copy_checkpoint(tiny, tmp_path / "ckpt")
    replace_tensor(directory / "model.safetensors", W1, np.full((64, 32), 1e5, np.float32))
    with pytest.raises(CheckpointError, match=f"'{W1}' .* values up to 1e\\+05, beyond the range of float16"):
        Lfm2VlForConditionalGeneration.from_pretrained(directory, dtype=jnp.float16, progress=False)
    Lfm2VlForConditionalGeneration.from_pretrained(directory, dtype=jnp.bfloat16, progress=False)


def test_check_finite_must_be_a_boolean(tiny):
    with pytest.raises(CheckpointError, match="check_finite must be True or False, got 'no'"):
        Lfm2VlForConditionalGeneration.from_pretrained(tiny, progress=False, check_finite="no")


# Seeds: 64 bits --------------------------------------------------------------------------------------------


def test_seeds_differing_above_bit_32_sample_differently(model):
    def sample(seed: int) -> list[int]:
        options = {"do_sample": True, "temperature": 3.0, "eos_token_id": []}
        return model.generate(PROMPT, max_new_tokens=8, seed=seed, **options)[0].tolist()

    assert sample(0) != sample(2**32)
    assert sample(-1) == sample(2**64 - 1) != sample(2**32 - 1)  # negative: two's complement
    assert sample(5) == sample(5)


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1, 10**30])
def test_seeds_beyond_64_bits_are_refused_by_name(model, seed):
    expected = rf"seed must be an integer in \[-{2**63}, {2**64 - 1}\], got {seed}"
    with pytest.raises(OptionError, match=expected):
        model.generate(PROMPT, max_new_tokens=4, seed=seed)
