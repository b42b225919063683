"""The train step: one jitted function per run (compiled once per padded batch shape), the train state
donated, its shardings fixed by the logical-axis rules.

What trains is a `Trainable` value (static): either whole components of the params (the others frozen),
or LoRA adapters on a frozen base. The state holds only what trains (`TrainState.params`) and its
optimizer state; the frozen params are a separate, non-donated argument.

A step takes a batch with a leading micro-batch axis (K, rows, ...) and accumulates the gradients of
the K micro-batches in a `lax.scan`; the loss is the mean over all loss tokens of the step (the sum of
every micro-batch's token losses divided by the step's loss-token count), as transformers computes it with
`labels=-100` elsewhere. The metrics are computed with the weights before the update.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec

from ..config import Lfm2VlConfig
from ..nn.model import hidden_states
from ..nn.params import Params, ParamSpec, is_spec, param_shardings, param_specs
from .lora import LoraConfig, adapted_weights, adapter_axes, adapter_shardings, attach, merge
from .loss import cross_entropy_sum, shifted_targets

Batch = dict[str, jax.Array]
IMAGE_INPUTS = ("pixel_values", "pixel_attention_mask", "spatial_shapes")


class TrainState(struct.PyTreeNode):
    """Flax's `TrainState` pattern without `apply_fn`: the update count, what trains, its optimizer
    state and a raw PRNG key (uint32 (2,)), checkpointed with the rest. LFM2-VL has no dropout of its own;
    LoRA dropout draws its masks from `step_key(rng, step)`, so a resumed run draws the same masks."""

    step: jax.Array
    params: Params
    opt_state: optax.OptState
    rng: jax.Array
    tx: optax.GradientTransformation = struct.field(pytree_node=False)

    @classmethod
    def create(cls, params: Params, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=rng, tx=tx)

    def apply_gradients(self, grads: Params) -> TrainState:
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        return self.replace(
            step=self.step + 1, params=optax.apply_updates(self.params, updates), opt_state=opt_state
        )


@dataclasses.dataclass(frozen=True)
class Trainable:
    """What trains: the params components (top-level keys) that train, and LoRA (then the components
    get adapters and their weights stay frozen)."""

    config: Lfm2VlConfig
    components: tuple[str, ...]
    lora: LoraConfig | None = None

    @functools.cached_property
    def adapted(self) -> dict:
        return adapted_weights(self.config, self.lora, self.components)

    def split(self, params: Params) -> tuple[Params, Params]:
        """(trainable, frozen) parts of full params (LoRA: no trainable part; adapters come separately)."""
        if self.lora is not None:
            return {}, params
        return (
            {k: v for k, v in params.items() if k in self.components},
            {k: v for k, v in params.items() if k not in self.components},
        )

    def assemble(self, trainable: Params, frozen: Params, key: jax.Array | None = None) -> Params:
        """The full params the model functions run on (LoRA: each adapted weight a `LoraWeight`, applied
        unmerged; `key` draws its dropout masks, None: no dropout)."""
        if self.lora is not None:
            return attach(frozen, trainable, self.adapted, self.lora, key)
        return {**frozen, **trainable}

    def merged(self, trainable: Params, frozen: Params) -> Params:
        """The full params with the adapters merged into their weights (LoRA), for export."""
        if self.lora is not None:
            return merge(frozen, trainable, self.adapted, self.lora)
        return {**frozen, **trainable}

    def specs(self) -> Params:
        """`ParamSpec`s shaped like the trainable tree (for labels and shardings)."""
        specs = param_specs(self.config)
        if self.lora is None:
            return {k: specs[k] for k in self.components}
        out = {}
        for name, w in self.adapted.items():
            axes = adapter_axes(w)
            out[name] = {
                "a": ParamSpec((*w.shape[: w.stacked], *w.input_shape, self.lora.rank), axes["a"]),
                "b": ParamSpec((*w.shape[: w.stacked], self.lora.rank, *w.output_shape), axes["b"]),
            }
        return out

    def shardings(self) -> tuple[Params, Params]:
        """NamedShardings of the (trainable, frozen) trees under `config.runtime.mesh`."""
        full = param_shardings(self.config)
        if self.lora is None:
            return self.split(full)
        runtime = self.config.runtime
        return adapter_shardings(self.adapted, self.lora, runtime.mesh, runtime.rules), full


def replicated(config: Lfm2VlConfig) -> NamedSharding:
    return NamedSharding(config.runtime.mesh, PartitionSpec())


def state_shardings(trainable: Trainable, tx: optax.GradientTransformation, abstract: TrainState) -> Any:
    """The state's shardings: optimizer moments like their params, counts and the rest replicated."""
    params, _ = trainable.shardings()
    rep = replicated(trainable.config)
    masked = optax.MaskedNode  # `multi_transform` puts it where another label's params are

    def like_param(x: Any, sharding: NamedSharding) -> Any:
        return x if isinstance(x, masked) else sharding

    opt = optax.tree_utils.tree_map_params(
        tx,
        like_param,
        abstract.opt_state,
        params,
        transform_non_params=lambda _: rep,
        is_leaf=lambda x: isinstance(x, masked),
    )
    return abstract.replace(step=rep, params=params, opt_state=opt, rng=rep)


def token_loss_sum(
    trainable: Trainable,
    params: Params,
    frozen: Params,
    batch: Batch,
    chunk_tokens: int,
    key: jax.Array | None = None,
) -> jax.Array:
    """Summed cross-entropy over the loss tokens of one micro-batch (rows, ...); `key`: the micro-batch's
    dropout key (LoRA dropout; None: none, as in evaluation)."""
    config = trainable.config
    full = trainable.assemble(params, frozen, key)
    images = {k: batch[k] for k in IMAGE_INPUTS if k in batch}
    hidden = hidden_states(full, config, batch["input_ids"], batch["attention_mask"], **images)
    targets, weights = shifted_targets(batch["input_ids"], batch["loss_mask"])
    return cross_entropy_sum(full["text"], hidden, targets, weights, chunk_tokens)


def step_key(rng: jax.Array, step: jax.Array) -> jax.Array:
    """The dropout key of update `step`: a function of the run's key and the update count only, so a run
    resumed from a checkpoint draws what the uninterrupted run drew. Micro-batch i folds in i."""
    return jax.random.fold_in(rng, step)


def loss_token_count(batch: Batch) -> jax.Array:
    """Loss tokens that a position predicts (the first token of a row never is one)."""
    return jnp.sum(batch["loss_mask"][..., 1:], dtype=jnp.int32)


def make_train_step(
    trainable: Trainable,
    schedule: optax.Schedule,
    shardings: Any,
    chunk_tokens: int,
    skip_nonfinite: bool = False,
) -> Callable[[TrainState, Params, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """`step(state, frozen, batch) -> (state, metrics)`, jitted with the state donated. metrics: loss,
    grad_norm (before clipping), tokens (loss tokens), learning_rate (of this update). skip_nonfinite: an
    update whose loss or gradient norm is not finite leaves params and optimizer state as they were (the
    update count still advances, as the data does); metrics["skipped"] says whether it was skipped."""

    def train_step(state: TrainState, frozen: Params, batch: Batch) -> tuple[TrainState, dict]:
        tokens = loss_token_count(batch)
        scale = 1.0 / jnp.maximum(tokens, 1).astype(jnp.float32)

        key = step_key(state.rng, state.step)

        def micro_loss(params: Params, micro: Batch, index: jax.Array) -> jax.Array:
            micro_key = jax.random.fold_in(key, index)
            return token_loss_sum(trainable, params, frozen, micro, chunk_tokens, micro_key) * scale

        grad_fn = jax.value_and_grad(micro_loss)
        micro_batches = batch["input_ids"].shape[0]
        if micro_batches == 1:
            loss, grads = grad_fn(state.params, jax.tree.map(lambda x: x[0], batch), 0)
        else:

            def accumulate(carry: tuple, xs: tuple[Batch, jax.Array]) -> tuple[tuple, None]:
                loss, grads = grad_fn(state.params, *xs)
                return jax.tree.map(jnp.add, carry, (loss, grads)), None

            zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.params))
            indices = jnp.arange(micro_batches, dtype=jnp.int32)
            (loss, grads), _ = jax.lax.scan(accumulate, zeros, (batch, indices))
        metrics = {
            "loss": loss,
            "grad_norm": optax.tree.norm(grads),
            "tokens": tokens,
            "learning_rate": schedule(state.step),
        }
        updated = state.apply_gradients(grads)
        if skip_nonfinite:
            finite = jnp.isfinite(loss) & jnp.isfinite(metrics["grad_norm"])
            keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
            updated = updated.replace(
                params=jax.tree.map(keep, updated.params, state.params),
                opt_state=jax.tree.map(keep, updated.opt_state, state.opt_state),
            )
            metrics["skipped"] = ~finite
        return updated, metrics

    return jax.jit(train_step, donate_argnums=(0,), out_shardings=(shardings, None))


def make_eval_step(
    trainable: Trainable, chunk_tokens: int
) -> Callable[[Params, Params, Batch], tuple[jax.Array, jax.Array]]:
    """`eval_step(params, frozen, batch) -> (summed token loss, loss tokens)` over a (1, rows, ...) batch."""

    def eval_step(params: Params, frozen: Params, batch: Batch) -> tuple[jax.Array, jax.Array]:
        micro = jax.tree.map(lambda x: x[0], batch)
        return token_loss_sum(trainable, params, frozen, micro, chunk_tokens), loss_token_count(batch)

    return jax.jit(eval_step)


def abstract_state(trainable: Trainable, tx: optax.GradientTransformation) -> TrainState:
    """The state's shapes and dtypes (no allocation): params in the policy's params dtype."""
    dtype = trainable.config.runtime.dtypes.params
    params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), trainable.specs(), is_leaf=is_spec)
    return jax.eval_shape(lambda p: TrainState.create(p, tx, jax.random.PRNGKey(0)), params)
