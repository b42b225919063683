"""A `flax.linen` classification head on the hidden states of a frozen LFM2-VL, trained with optax.

The backbone is `nn.modules.Lfm2VlModel` holding the checkpoint's weights (`module_params`); the head is an
ordinary `nn.Dense` on the mean of each row's final hidden states; only the head's params are trained.
By default it runs on a tiny random-weight model and two classes of synthetic images (bright and dark
patches), so it finishes in seconds anywhere:

    python examples/linen_head.py [--model DIR] [--steps 30]

With `--model DIR` (a transformers checkpoint, e.g. from `save_pretrained`) the same head trains on that
model's hidden states.
"""

from __future__ import annotations

import argparse
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lfm2vl_jax import Lfm2VlForConditionalGeneration
from lfm2vl_jax.config import Lfm2VlConfig, TextConfig, VisionConfig
from lfm2vl_jax.nn.modules import Lfm2VlModel, module_params
from lfm2vl_jax.nn.params import init_params


class Classifier(nn.Module):
    """LFM2-VL's final hidden states, averaged over each row's tokens, into `num_classes` logits."""

    config: Lfm2VlConfig
    num_classes: int

    def setup(self) -> None:
        self.backbone = Lfm2VlModel(self.config)
        self.head = nn.Dense(self.num_classes)

    def __call__(self, batch: dict[str, jax.Array]) -> jax.Array:
        hidden = self.backbone.hidden_states(**batch)  # (B, S, D)
        mask = batch["attention_mask"][..., None].astype(hidden.dtype)
        pooled = (hidden * mask).sum(axis=1) / mask.sum(axis=1)
        return self.head(pooled.astype(jnp.float32))


def tiny_model() -> tuple[Lfm2VlConfig, Any]:
    config = Lfm2VlConfig(
        vision=VisionConfig(hidden_size=48, intermediate_size=96, num_layers=2, num_heads=4, patch_size=4),
        text=TextConfig(
            vocab_size=512, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2, head_dim=16
        ),
        projector_hidden_size=80,
    )
    return config, init_params(config, jax.random.key(0))


def synthetic_batch(config: Lfm2VlConfig, size: int, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """`size` prompts of one 8x8-patch image each (class 1: bright patches, class 0: dark) and their
    labels, as the processor lays them out."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size)
    v, f = config.vision, config.downsample_factor
    patch = v.num_channels * v.patch_size**2
    pixels = rng.uniform(-1, 0.2, (size, 64, patch)).astype(np.float32) + 0.8 * labels[:, None, None]
    image_tokens = (8 // f) ** 2
    ids = np.concatenate(
        [np.full((size, image_tokens), config.image_token_id), rng.integers(10, 390, (size, 4))], axis=1
    )
    batch = {
        "input_ids": ids.astype(np.int32),
        "attention_mask": np.ones_like(ids, np.int32),
        "pixel_values": pixels,
        "pixel_attention_mask": np.ones((size, 64), np.int32),
        "spatial_shapes": np.full((size, 2), 8, np.int64),
    }
    return batch, labels


def train(config: Lfm2VlConfig, params: Any, steps: int, seed: int = 0) -> list[float]:
    """Trains the head for `steps` steps; returns the loss after each."""
    classifier = Classifier(config, num_classes=2)
    batch, labels = synthetic_batch(config, 16, seed)
    # The head alone (`classifier.init` would also draw, and compile, a whole backbone to throw away).
    hidden = jnp.zeros((1, config.text.hidden_size), jnp.float32)
    head = nn.Dense(classifier.num_classes).init(jax.random.key(seed), hidden)["params"]
    backbone = module_params(params)  # frozen: never differentiated or updated
    optimizer = optax.adam(1e-2)
    state = optimizer.init(head)

    # The frozen weights and the batch are arguments: closed over, they would be constants that XLA
    # spends the compilation folding through the whole backbone.
    @jax.jit
    def step(head: Any, state: Any, backbone: Any, batch: Any, labels: Any) -> tuple[Any, Any, jax.Array]:
        def loss_fn(head: Any) -> jax.Array:
            logits = classifier.apply({"params": {"backbone": backbone, "head": head}}, batch)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = jax.value_and_grad(loss_fn)(head)
        updates, state = optimizer.update(grads, state)
        return optax.apply_updates(head, updates), state, loss

    losses = []
    for _ in range(steps):
        head, state, loss = step(head, state, backbone, batch, labels)
        losses.append(float(loss))
    return losses


def main(argv: list[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a transformers checkpoint directory (default: a tiny random model)")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args(argv)
    if args.model:
        model = Lfm2VlForConditionalGeneration.from_pretrained(args.model)
        config, params = model.config, model.params
    else:
        config, params = tiny_model()
    losses = train(config, params, args.steps)
    print(f"head loss: {losses[0]:.4f} -> {losses[-1]:.4f} over {args.steps} steps")
    return losses


if __name__ == "__main__":
    main()
