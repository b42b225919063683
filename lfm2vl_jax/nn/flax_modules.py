"""Thin, stateless `flax.linen` modules over the plain model functions, for Flax users who compose the model
with their own modules (a reward or value head, a classifier on the hidden states, ...).

Each module's `params` collection is exactly our params pytree (the matching subtree of
`nn.params.param_specs`), so checkpoints load straight into it, and `init` boxes every leaf with its
logical axes (`nn.LogicallyPartitioned`), so `nn.get_partition_spec` and `nn.logical_to_mesh_sharding`
with `parallel.rules.DEFAULT_RULES.rules` shard it as the rest of the project does. `__call__` runs the
existing functions: no layer is implemented twice.

    model = Lfm2VlModel(config)
    variables = model.init(jax.random.key(0), input_ids, attention_mask)   # or {"params": params}
    hidden = model.apply(variables, input_ids, attention_mask, method="hidden_states")
    logits = model.apply(variables, input_ids, attention_mask, pixel_values, ...)
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from ..config import Lfm2VlConfig
from . import model
from .params import Params, init_from_specs, is_spec, param_specs
from .projector import project
from .text import text_forward
from .vision import vision_tower


def _declare(module: nn.Module, specs: dict[str, Any]) -> Params:
    """Declares one param per top-level key of `specs` (each value a pytree of arrays), initialised as
    `init_params` draws it and boxed with its logical axes; returns the unboxed values."""
    dtype = module.config.runtime.dtypes.params

    def initializer(spec_tree: Any) -> Any:
        def init(key: jax.Array) -> Any:
            values = init_from_specs(spec_tree, key, dtype)
            return jax.tree.map(
                lambda spec, value: nn.LogicallyPartitioned(value, spec.axes),
                spec_tree,
                values,
                is_leaf=is_spec,
            )

        return init

    return {name: module.param(name, initializer(tree)) for name, tree in specs.items()}


class VisionTower(nn.Module):
    """(images, patches, C*p*p) pixel patches -> (images, patches, E) features (`nn.vision.vision_tower`)."""

    config: Lfm2VlConfig

    @nn.compact
    def __call__(self, pixel_values: jax.Array, pixel_attention_mask: jax.Array, spatial_shapes: jax.Array):
        params = _declare(self, param_specs(self.config)["vision"])
        c = self.config
        return vision_tower(params, c.vision, c.runtime, pixel_values, pixel_attention_mask, spatial_shapes)


class Projector(nn.Module):
    """Vision features -> (images, tokens, D) image token embeddings (`nn.projector.project`)."""

    config: Lfm2VlConfig

    @nn.compact
    def __call__(self, features: jax.Array, spatial_shapes: jax.Array) -> jax.Array:
        params = _declare(self, param_specs(self.config)["projector"])
        return project(params, features, spatial_shapes, self.config.downsample_factor)


class TextTower(nn.Module):
    """(B, T, D) input embeddings -> final-normed hidden states (`nn.text.text_forward`, no cache)."""

    config: Lfm2VlConfig

    @nn.compact
    def __call__(self, embeds: jax.Array, attention_mask: jax.Array) -> jax.Array:
        params = _declare(self, param_specs(self.config)["text"])
        hidden, _ = text_forward(params, self.config.text, self.config.runtime, embeds, attention_mask)
        return hidden


class Lfm2VlModel(nn.Module):
    """The whole model (`nn.model.forward`): logits (B, S, V) in float32; `hidden_states` as a method."""

    config: Lfm2VlConfig

    def setup(self):
        self.params_tree = _declare(self, param_specs(self.config))

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        pixel_values: jax.Array | None = None,
        pixel_attention_mask: jax.Array | None = None,
        spatial_shapes: jax.Array | None = None,
    ) -> jax.Array:
        return model.forward(
            self.params_tree,
            self.config,
            input_ids,
            attention_mask,
            pixel_values,
            pixel_attention_mask,
            spatial_shapes,
        )

    def hidden_states(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        pixel_values: jax.Array | None = None,
        pixel_attention_mask: jax.Array | None = None,
        spatial_shapes: jax.Array | None = None,
    ) -> jax.Array:
        return model.hidden_states(
            self.params_tree,
            self.config,
            input_ids,
            attention_mask,
            pixel_values,
            pixel_attention_mask,
            spatial_shapes,
        )
