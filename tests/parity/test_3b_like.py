"""No LFM2-VL token id hard-coded anywhere: a 3B-like checkpoint (LFM2.5-VL-3B's 128,000-token vocabulary,
special-token ids and 30-layer pattern; small widths) whose stand-in tokenizer has ordinary tokens at
LFM2-VL's special ids 0-13 and 396-510, so that a stray LFM2-VL id would show. Greedy generation (alone
and through the batch engine) and one training step's loss equal transformers'.

Generation uses a repetition penalty of 2 on both sides (as test_generate: random weights otherwise fall
into one-token loops). Loss tolerance as test_training_parity (1e-5 relative, float32)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from checkpoint_layouts import make_small_checkpoint
from processor_fixtures import synthetic_image
from training_fixtures import image_conversations, reference_batch

from lfm2vl_jax import Lfm2VlForConditionalGeneration, Lfm2VlProcessor
from lfm2vl_jax.checkpoint.hf import load_hf_checkpoint
from lfm2vl_jax.config import RuntimeConfig
from lfm2vl_jax.parallel.mesh import make_mesh
from lfm2vl_jax.training.data import BatchLoader, BatchPlan, RowSlice, read_conversations
from lfm2vl_jax.training.step import Trainable, loss_token_count, token_loss_sum

NEW_TOKENS = 12
PENALTY = 2.0
LOSS_RTOL = 1e-5
LFM2_VL_SPECIAL_IDS = [*range(14), *range(396, 511)]


@pytest.fixture(scope="module")
def three_b(tmp_path_factory):
    directory, reference = make_small_checkpoint(tmp_path_factory.mktemp("3b-like"), "LFM2.5-VL-3B-like")
    processor = Lfm2VlProcessor.from_pretrained(directory)
    model = Lfm2VlForConditionalGeneration.from_pretrained(directory, progress=False)
    return directory, reference, processor, model


def _conversation(seed: int, text: str) -> list[dict]:
    image = synthetic_image(30 + 10 * seed, 50, seed=seed)
    return [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]},
    ]


def _reference_generate(reference, inputs: dict) -> list[int]:
    tensors = {key: torch.from_numpy(np.asarray(value)) for key, value in inputs.items()}
    tensors["pixel_attention_mask"] = tensors["pixel_attention_mask"].bool()
    with torch.no_grad():
        out = reference.generate(
            **tensors, max_new_tokens=NEW_TOKENS, do_sample=False, repetition_penalty=PENALTY
        )
    return out[0, tensors["input_ids"].shape[1] :].tolist()


def test_ids_come_from_the_checkpoint(three_b):
    _, reference, processor, model = three_b
    assert processor.image_token_id == model.config.image_token_id == 124907
    assert (processor.pad_token_id, processor.bos_token_id) == (124893, 124894)
    assert model.config.text.vocab_size == 128_000 and model.config.text.num_layers == 30
    inputs = processor.apply_chat_template(_conversation(1, "Describe this image in detail."), tokenize=True)
    # ordinary text tokens sit at LFM2-VL's special ids: a stray 396/498/499/7/... would be a real token
    assert np.isin(inputs, LFM2_VL_SPECIAL_IDS).any()
    assert not np.isin(inputs, [396, 497, 498, 499]).all()


def test_greedy_generation_alone_and_batched_equals_transformers(three_b):
    _, reference, processor, model = three_b
    conversations = [_conversation(1, "Describe this image in detail."), _conversation(2, "What is shown?")]
    alone = []
    for conversation in conversations:
        inputs = processor.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=True, return_dict=True
        )
        ours = model.generate(**inputs, max_new_tokens=NEW_TOKENS, repetition_penalty=PENALTY)
        alone.append(np.asarray(ours)[0].tolist())
        if not alone[1:]:  # transformers' generate is slow here: the first conversation only
            expected = _reference_generate(reference, inputs)
            assert len(set(expected)) > 4, "reference output too repetitive to be a strong test"
            assert alone[0][: len(expected)] == expected
    engine = model.batch_engine(
        processor, slots=2, max_length=512, max_new_tokens=NEW_TOKENS, repetition_penalty=PENALTY
    )
    results = engine.generate([{"id": i, "messages": c} for i, c in enumerate(conversations)])
    for result, tokens in zip(results, alone, strict=True):
        assert result.finish_reason in ("stop", "length"), result.error
        assert list(result.token_ids) == tokens[: len(result.token_ids)]
        assert len(result.token_ids) == NEW_TOKENS or result.token_ids[-1] == model.config.eos_token_id


def test_one_training_step_loss_equals_transformers(three_b, tmp_path):
    directory, reference, processor, _ = three_b
    dataset = read_conversations(image_conversations(tmp_path, 4), processor, 1024)
    plan = BatchPlan(
        dataset.examples, 4, max_length=1024, max_patches=processor.image_processor.max_num_patches
    )
    local = next(BatchLoader(dataset, plan, processor, RowSlice(0, 4), 1024, 1).iterator(1))
    examples = [dataset.examples[i] for i in plan.step(0).rows[0]]
    config, params = load_hf_checkpoint(directory, RuntimeConfig(mesh=make_mesh()), progress=False)
    trainable = Trainable(config, ("vision", "projector", "text"))
    batch = jax.tree.map(lambda x: jnp.asarray(x[0]), local)
    loss = jax.jit(lambda p: token_loss_sum(trainable, p, {}, batch, 64) / loss_token_count(batch))(params)
    tensors = {key: torch.from_numpy(value) for key, value in reference_batch(processor, examples).items()}
    tensors["pixel_attention_mask"] = tensors["pixel_attention_mask"].bool()
    with torch.no_grad():
        expected = reference(**tensors).loss.item()
    assert abs(float(loss) - expected) <= LOSS_RTOL * abs(expected)
