"""LoRA against peft (live transformers + peft, float32): our adapters written in peft's format load in
`PeftModel.from_pretrained` with logits equal to our unmerged forward, the gradients of every A and B
equal peft's on the same weights and batch, and the adapter peft itself saves reads back as ours.

The batch is ours; peft's model gets the same conversations as transformers' processor lays them out
(`training_fixtures.reference_batch`), as in test_training_parity.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch
from peft import PeftModel
from training_fixtures import reference_batch
from transformers import Lfm2VlForConditionalGeneration as HfModel

from lfm2vl_jax.checkpoint.hf import load_hf_checkpoint
from lfm2vl_jax.config import RuntimeConfig
from lfm2vl_jax.nn.model import forward
from lfm2vl_jax.processing.processor import Lfm2VlProcessor
from lfm2vl_jax.training.data import read_conversations
from lfm2vl_jax.training.lora import LoraConfig, init_adapters
from lfm2vl_jax.training.peft_adapter import load_peft_adapter, peft_tensors, save_peft_adapter
from lfm2vl_jax.training.step import Trainable, token_loss_sum

GRAD_RTOL = 1e-4  # per tensor, relative to its largest entry: float32 backward passes in other orders
LOGITS_RTOL = 1e-5  # relative to the largest logit, as the merged-export test


def _torch(batch: dict) -> dict:
    out = {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}
    out["pixel_attention_mask"] = out["pixel_attention_mask"].bool()
    return out


def test_gradients_logits_and_adapter_files_match_peft(tmp_path, tiny_checkpoint, tiny_conversations):
    processor = Lfm2VlProcessor.from_pretrained(tiny_checkpoint)
    examples = read_conversations(tiny_conversations, processor, 1024).examples
    batch = reference_batch(processor, examples)
    labels = batch.pop("labels")
    config, params = load_hf_checkpoint(tiny_checkpoint, RuntimeConfig(), progress=False)
    trainable = Trainable(config, ("vision", "text"), LoraConfig(rank=4, alpha=16.0))
    fresh = init_adapters(trainable.adapted, trainable.lora, jax.random.key(0))
    # B drawn too (fresh B = 0 would make every A's gradient zero and the adapters a no-op).
    adapters = {
        name: {"a": a["a"], "b": 0.05 * jax.random.normal(jax.random.key(i), a["b"].shape)}
        for i, (name, a) in enumerate(sorted(fresh.items()))
    }
    save_peft_adapter(tmp_path / "ours", config, jax.device_get(adapters), trainable.adapted, trainable.lora)

    # Our loss: the mean over the tokens transformers' labels select (the shifted loss mask).
    ours_batch = {k: jnp.asarray(v) for k, v in batch.items()}
    ours_batch["loss_mask"] = jnp.asarray(labels != -100)
    tokens = float((labels[:, 1:] != -100).sum())

    def mean_loss(a):
        return token_loss_sum(trainable, a, params, ours_batch, 64) / tokens

    loss, grads = jax.jit(jax.value_and_grad(mean_loss))(adapters)
    logits = jax.jit(forward, static_argnames="config")(trainable.assemble(adapters, params), config, **batch)

    base = HfModel.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "ours", is_trainable=True)
    peft_model.train()  # lora_dropout 0: identical to eval, and gradients on
    out = peft_model(**_torch(batch), labels=torch.from_numpy(labels))
    out.loss.backward()

    real = batch["attention_mask"].astype(bool)
    expected = out.logits.detach().numpy()[real]
    assert np.abs(np.asarray(logits)[real] - expected).max() <= LOGITS_RTOL * np.abs(expected).max()
    assert abs(float(loss) - out.loss.item()) <= 1e-5 * out.loss.item()

    reference = {
        name.replace(".default", ""): p.grad.numpy()
        for name, p in peft_model.named_parameters()
        if "lora_" in name
    }
    ours = dict(peft_tensors(config, jax.device_get(grads), trainable.adapted, 4))
    assert set(ours) == set(reference) and len(ours) == 2 * 36  # every adapted module (36), A and B
    for name, expected in reference.items():
        scale = np.abs(expected).max()
        assert scale > 0, name
        error = np.abs(ours[name] - expected).max() / scale
        assert error <= GRAD_RTOL, (name, error)

    # peft's own save_pretrained reads back as the adapters it was given.
    peft_model.save_pretrained(tmp_path / "peft")
    loaded = load_peft_adapter(tmp_path / "peft", config, trainable.adapted, trainable.lora)
    for name, adapter in adapters.items():
        for part in ("a", "b"):
            np.testing.assert_array_equal(loaded[name][part], np.asarray(adapter[part]), err_msg=name)
