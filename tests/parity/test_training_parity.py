"""Fine-tuning against transformers: the loss and every gradient of a batch (images, system and second
turns, padding), and LoRA's merged export.

The batch is ours (loader: rows right-padded to a length bucket, image tiles padded with empty tiles and
trimmed to a patch bucket); transformers gets the same conversations as its processor would lay them out,
with labels = ids on our loss tokens and -100 elsewhere, so its loss is the mean over the same tokens.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import torch
from training_fixtures import reference_batch
from transformers import Lfm2VlForConditionalGeneration as HfModel

from lfm2vl_jax.checkpoint.hf import iter_hf_tensors, load_hf_checkpoint
from lfm2vl_jax.config import RuntimeConfig
from lfm2vl_jax.nn.model import forward
from lfm2vl_jax.parallel.mesh import make_mesh
from lfm2vl_jax.processing.processor import Lfm2VlProcessor
from lfm2vl_jax.training.config import SFTConfig
from lfm2vl_jax.training.data import BatchLoader, BatchPlan, RowSlice, read_conversations
from lfm2vl_jax.training.step import Trainable, loss_token_count, token_loss_sum
from lfm2vl_jax.training.trainer import SFTTrainer

LOSS_RTOL = 1e-5  # fp32 loss: sums of a few hundred token losses, reordered
GRAD_RTOL = 1e-4  # per tensor, relative to its largest entry: float32 backward passes in other orders


def _torch(batch: dict) -> dict:
    out = {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}
    if "pixel_attention_mask" in out:
        out["pixel_attention_mask"] = out["pixel_attention_mask"].bool()
    return out


def test_loss_and_gradients_match_transformers(tiny_checkpoint, tiny_conversations):
    processor = Lfm2VlProcessor.from_pretrained(tiny_checkpoint)
    dataset = read_conversations(tiny_conversations, processor, 1024)
    plan = BatchPlan(
        dataset.examples, 4, max_length=1024, max_patches=processor.image_processor.max_num_patches
    )
    local = next(BatchLoader(dataset, plan, processor, RowSlice(0, 4), 1024, 1).iterator(1))
    examples = [dataset.examples[i] for i in plan.step(0).rows[0]]
    assert local["input_ids"].shape[2] > max(e.length for e in examples)  # padded rows
    assert (local["spatial_shapes"][0].prod(axis=1) == 1).any()  # padding tiles
    assert sum(len(e.images) > 1 for e in examples) and any(
        (e.input_ids == processor.tokenizer.token_to_id("<|im_start|>")).sum() > 4 for e in examples
    )  # two images in a row; a second turn

    config, params = load_hf_checkpoint(tiny_checkpoint, RuntimeConfig(mesh=make_mesh()), progress=False)
    trainable = Trainable(config, ("vision", "projector", "text"))
    batch = jax.tree.map(lambda x: jnp.asarray(x[0]), local)

    def mean_loss(p):
        return token_loss_sum(trainable, p, {}, batch, 64) / loss_token_count(batch)

    loss, grads = jax.jit(jax.value_and_grad(mean_loss))(params)

    reference = HfModel.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    out = reference(**_torch(reference_batch(processor, examples)))
    out.loss.backward()
    assert abs(float(loss) - out.loss.item()) <= LOSS_RTOL * abs(out.loss.item())

    reference_grads = {name: p.grad.numpy() for name, p in reference.named_parameters()}
    ours = dict(iter_hf_tensors(config, jax.device_get(grads)))
    assert set(ours) == set(reference_grads)
    largest = max(np.abs(g).max() for g in reference_grads.values())
    for name, expected in reference_grads.items():
        if name.endswith("self_attn.k_proj.bias"):
            # Exactly zero in exact arithmetic (a key bias adds the same q.b to every score of a query,
            # which the softmax cancels): both sides hold rounding noise only.
            assert max(np.abs(expected).max(), np.abs(ours[name]).max()) <= 1e-6 * largest, name
            continue
        scale = np.abs(expected).max()
        assert scale > 0, name  # every weight gets a gradient: nothing is silently cut off
        error = np.abs(ours[name] - expected).max() / scale
        assert error <= GRAD_RTOL, (name, error)


def test_lora_merged_export_matches_ours_with_adapters(tmp_path, tiny_checkpoint, tiny_conversations):
    """Fresh adapters leave the model as it was (step 1's loss is the base model's); after training, the
    merged export loaded by transformers gives our logits with the adapters applied."""
    trainer = SFTTrainer(
        SFTConfig(
            model=str(tiny_checkpoint),
            data=str(tiny_conversations),
            output=str(tmp_path / "run"),
            steps=3,
            batch_size=4,
            learning_rate=1e-2,
            lora_rank=4,
            save_every=3,
            progress=False,
        )
    )
    trainer.train()
    run = trainer.run
    assert all(float(jnp.abs(adapter["b"]).max()) > 0 for adapter in run.state.params.values())

    processor = Lfm2VlProcessor.from_pretrained(tiny_checkpoint)
    dataset = read_conversations(tiny_conversations, processor, 1024)
    batch = reference_batch(processor, dataset.examples)  # step 1 trained on all four
    base = HfModel.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        base_out = base(**_torch(batch))
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(first["loss"] - base_out.loss.item()) <= LOSS_RTOL * base_out.loss.item()

    del batch["labels"]
    merged = run.trainable.assemble(run.state.params, run.frozen)
    ours = np.asarray(jax.jit(forward, static_argnames="config")(merged, run.config, **batch))
    reference = HfModel.from_pretrained(tmp_path / "run" / "final", dtype=torch.float32).eval()
    with torch.no_grad():
        logits = reference(**_torch(batch)).logits.numpy()
    real = batch["attention_mask"].astype(bool)
    assert np.abs(ours[real] - logits[real]).max() <= 1e-5 * np.abs(logits[real]).max()
    # The adapters changed the model.
    before = base_out.logits.numpy()
    assert np.abs(before[real] - logits[real]).max() > 1e-3
