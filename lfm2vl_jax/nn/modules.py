"""`flax.linen` modules for every block of LFM2-VL, mirroring transformers' module tree, for research code
that composes, probes and swaps blocks (a head on the hidden states, a modified MLP, per-layer probes).

    Lfm2VlModel
      vision:     VisionTower = VisionEmbeddings (patch_embed, position_grid; in the tower's scope)
                  + layers: nn.scan over VisionEncoderLayer (ln1, attn: VisionAttention, ln2, mlp: VisionMLP)
                  + post_ln
      projector:  Projector (optional LayerNorm, pixel unshuffle, MLP)
      text:       TextModel = embed, blocks (one entry per segment of `config.plan_segments`: nn.scan over a
                  Motif of DecoderLayers, or one DecoderLayer per layer), final_norm, lm_head (untied)
                  DecoderLayer = operator_norm, conv: ShortConv | attn: Attention, ffn_norm, mlp: TextMLP

Each module declares its weights from the ParamSpec table (`nn.params`, boxed with their logical axes, so
`nn.get_partition_spec` and the project's `ShardingRules` shard them) and runs the layer functions of
`nn.text` / `nn.vision` / `nn.projector` with them: the math lives there once (`text.residual_layer` takes
the layer's norms, operator and MLP as callables, so the functions and these modules run one layer the same
way). The modules' `params` tree is our params layout (per-layer or scanned, as `config.runtime.scan_layers`
says) except that the text blocks' lists are dicts keyed "0", "1", ... (Flax names submodules by
strings): `module_params` and `functional_params` convert without copying an array.

Stateless: a cache is an explicit argument and the new cache entries a result (fold them in with
`inference.cache.append`). Per-layer hidden states are sown into "intermediates" (`DecoderLayer`), and
`capture_intermediates=True` records every module's output. Block classes are attributes
(`mlp_cls`, `conv_cls`, `attention_cls`), so a subclass replaces one kind of block everywhere.

    model = Lfm2VlModel(config)
    variables = {"params": module_params(params)}     # or model.init(key, input_ids, attention_mask)
    logits, _ = model.apply(variables, input_ids, attention_mask)
    hidden = model.apply(variables, input_ids, attention_mask, method="hidden_states")
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ..config import CONV, Lfm2VlConfig
from ..parallel.sharding import constrain
from .layers import cast, layer_norm, matmul_precision, remat_policy, rms_norm
from .model import merge_image_features
from .params import Params, init_from_specs, is_spec, param_specs, text_layer_specs, vision_layer_specs
from .projector import image_tokens_per_image, project
from .short_conv import gated_short_conv
from .text import (
    RESIDUAL_AXES,
    StepContext,
    attention_block,
    embed_tokens,
    lm_logits,
    mlp,
    residual_layer,
    step_context,
)
from .vision import embed_patches, vision_attention, vision_mlp, vision_residual_layer


def declare(module: nn.Module, specs: dict[str, Any]) -> Params:
    """Declares one param per key of `specs` (a ParamSpec, or a dict of them), initialised as
    `init_params` draws it and boxed with its logical axes; returns the (unboxed) values."""
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


def module_params(params: Params) -> Params:
    """Our params tree (`from_pretrained`, orbax) as the modules' `params` collection: the text blocks'
    lists become dicts keyed "0", "1", ...; no array is copied."""

    def keyed(x: Any) -> Any:
        return {str(i): keyed(item) for i, item in enumerate(x)} if isinstance(x, list) else x

    return {**params, "text": {**params["text"], "blocks": keyed(params["text"]["blocks"])}}


def functional_params(variables_params: Params) -> Params:
    """The modules' `params` collection back as our params tree (the inverse of `module_params`)."""
    params = dict(nn.unbox(variables_params))

    def listed(x: Any) -> Any:
        if isinstance(x, dict) and x and all(k.isdigit() for k in x):
            return [listed(x[str(i)]) for i in range(len(x))]
        return x

    return {**params, "text": {**params["text"], "blocks": listed(params["text"]["blocks"])}}


# Text -----------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """LFM2's RMSNorm (`scale`), in the compute dtype."""

    config: Lfm2VlConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        t = self.config.text
        p = declare(self, text_layer_specs(t, CONV)["operator_norm"])
        return rms_norm(x, p["scale"].astype(self.config.runtime.dtypes.compute), t.norm_eps)


class TextMLP(nn.Module):
    """SwiGLU MLP (`gate`, `up`, `down`): `text.mlp`."""

    config: Lfm2VlConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        runtime = self.config.runtime
        p = declare(self, text_layer_specs(self.config.text, CONV, runtime.fused_projections)["mlp"])
        return mlp(cast(p, runtime.dtypes.compute), x, runtime.fused_projections)


class ShortConv(nn.Module):
    """The gated short convolution (`short_conv.gated_short_conv`); returns its output and new state."""

    config: Lfm2VlConfig

    @nn.compact
    def __call__(self, x: jax.Array, ctx: StepContext, cached: Any = None) -> tuple[jax.Array, Any]:
        p = declare(self, text_layer_specs(self.config.text, CONV)["conv"])
        p = cast(p, self.config.runtime.dtypes.compute)
        return gated_short_conv(p, x, ctx.token_mask, ctx.num_new, cached)


class Attention(nn.Module):
    """GQA attention with q/k norms and RoPE (`text.attention_block`); returns its output and new k/v."""

    config: Lfm2VlConfig

    @nn.compact
    def __call__(self, x: jax.Array, ctx: StepContext, cached: Any = None) -> tuple[jax.Array, Any]:
        c = self.config
        specs = text_layer_specs(c.text, "full_attention", c.runtime.fused_projections)["attn"]
        p = cast(declare(self, specs), c.runtime.dtypes.compute)
        return attention_block(p, x, ctx, cached, c.text, c.runtime)


class DecoderLayer(nn.Module):
    """One LFM2 layer (`text.residual_layer`): `operator_norm`, `conv` or `attn`, `ffn_norm`, `mlp`. Sows
    its output hidden state as intermediates["hidden_state"]."""

    config: Lfm2VlConfig
    kind: str
    mlp_cls: type[nn.Module] = TextMLP
    conv_cls: type[nn.Module] = ShortConv
    attention_cls: type[nn.Module] = Attention

    @nn.compact
    def __call__(self, h: jax.Array, ctx: StepContext, cached: Any = None) -> tuple[jax.Array, Any]:
        c = self.config
        operator = self.conv_cls(c, name="conv") if self.kind == CONV else self.attention_cls(c, name="attn")
        h, entry = residual_layer(
            h,
            RMSNorm(c, name="operator_norm"),
            lambda x: operator(x, ctx, cached),
            RMSNorm(c, name="ffn_norm"),
            self.mlp_cls(c, name="mlp"),
        )
        h = constrain(h, RESIDUAL_AXES, c.runtime)
        self.sow("intermediates", "hidden_state", h)
        return h, entry


class Motif(nn.Module):
    """One repeat of a segment's motif of layers (named "0", "1", ... by position): the body `nn.scan`
    runs over the stacked layout."""

    config: Lfm2VlConfig
    motif: tuple[str, ...]
    classes: tuple[type[nn.Module], type[nn.Module], type[nn.Module]]  # mlp, conv, attention

    @nn.compact
    def __call__(self, h: jax.Array, ctx: StepContext, cached: Any = None) -> tuple[jax.Array, list]:
        entries = []
        for i, kind in enumerate(self.motif):
            layer = DecoderLayer(self.config, kind, *self.classes, name=str(i))
            h, entry = layer(h, ctx, None if cached is None else cached[i])
            entries.append(entry)
        return h, entries


class LayerStack(nn.Module):
    """The per-layer layout of one motif position: a segment's repeats of it, one module each ("0", ...)."""

    config: Lfm2VlConfig
    kind: str
    repeats: int
    classes: tuple[type[nn.Module], type[nn.Module], type[nn.Module]]

    def setup(self) -> None:
        self.layers = [
            DecoderLayer(self.config, self.kind, *self.classes, name=str(r)) for r in range(self.repeats)
        ]

    def __call__(
        self, repeat: int, h: jax.Array, ctx: StepContext, cached: Any = None
    ) -> tuple[jax.Array, Any]:
        return self.layers[repeat](h, ctx, cached)


class Blocks(nn.Module):
    """Every segment of the layer plan, as `text.run_layers` runs it: `nn.scan` over a `Motif` (stacked
    weights, `nn.remat` with the runtime's policy) or a loop over `LayerStack`s (per-layer weights)."""

    config: Lfm2VlConfig
    classes: tuple[type[nn.Module], type[nn.Module], type[nn.Module]]

    @nn.compact
    def __call__(self, h: jax.Array, ctx: StepContext, cache_blocks: list | None) -> tuple[jax.Array, list]:
        runtime = self.config.runtime
        entries = []
        for s, segment in enumerate(self.config.text.segments):
            seg_cache = None if cache_blocks is None else cache_blocks[s]
            if runtime.scan_layers:
                body = Motif
                if runtime.remat != "none":
                    body = nn.remat(body, policy=remat_policy(runtime.remat), prevent_cse=False)
                scanned = nn.scan(
                    body,
                    variable_axes={"params": 0, "intermediates": 0},
                    split_rngs={"params": True},
                    in_axes=(nn.broadcast, 0),
                    length=segment.repeats,
                    metadata_params={nn.PARTITION_NAME: "layers"},
                )
                h, seg_entries = scanned(self.config, segment.motif, self.classes, name=str(s))(
                    h, ctx, seg_cache
                )
            else:
                segment_module = PerLayerSegment(
                    self.config, segment.motif, segment.repeats, self.classes, name=str(s)
                )
                h, seg_entries = segment_module(h, ctx, seg_cache)
            entries.append(seg_entries)
        return h, entries


class PerLayerSegment(nn.Module):
    """One segment in the per-layer layout: per motif position a `LayerStack` ("0", "1", ...), run repeat
    by repeat (the order of the checkpoint's layers)."""

    config: Lfm2VlConfig
    motif: tuple[str, ...]
    repeats: int
    classes: tuple[type[nn.Module], type[nn.Module], type[nn.Module]]

    @nn.compact
    def __call__(self, h: jax.Array, ctx: StepContext, seg_cache: Any) -> tuple[jax.Array, list]:
        stacks = [
            LayerStack(self.config, kind, self.repeats, self.classes, name=str(m))
            for m, kind in enumerate(self.motif)
        ]
        entries: list[list] = [[] for _ in self.motif]
        for r in range(self.repeats):
            for m, stack in enumerate(stacks):
                cached = None if seg_cache is None else seg_cache[m][r]
                h, entry = stack(r, h, ctx, cached)
                entries[m].append(entry)
        return h, entries


class TextModel(nn.Module):
    """The LFM2 text tower (`text.text_forward`): `embed`, `blocks`, `final_norm`, `lm_head` when untied."""

    config: Lfm2VlConfig
    mlp_cls: type[nn.Module] = TextMLP
    conv_cls: type[nn.Module] = ShortConv
    attention_cls: type[nn.Module] = Attention

    def setup(self) -> None:
        specs = param_specs(self.config)["text"]
        self.weights = declare(self, {k: v for k, v in specs.items() if k in ("embed", "lm_head")})
        self.blocks = Blocks(self.config, (self.mlp_cls, self.conv_cls, self.attention_cls))
        self.final_norm = RMSNorm(self.config)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        return embed_tokens(self.weights, input_ids, self.config.runtime)

    def logits(self, hidden: jax.Array) -> jax.Array:
        return lm_logits(self.weights, hidden)

    def __call__(
        self,
        embeds: jax.Array,
        token_mask: jax.Array,
        cache: Any = None,
        positions: jax.Array | None = None,
        any_mask: bool = False,
    ) -> tuple[jax.Array, list]:
        """Final-normed hidden states and new cache entries, as `text.text_forward` (same arguments)."""
        runtime = self.config.runtime
        ctx = step_context(token_mask, cache, positions, any_mask)
        h = constrain(embeds.astype(runtime.dtypes.compute), RESIDUAL_AXES, runtime)
        with matmul_precision(runtime.dtypes.compute):
            h, entries = self.blocks(h, ctx, None if cache is None else cache.blocks)
        return self.final_norm(h), entries


# Vision and projector --------------------------------------------------------------------------------------


class VisionEmbeddings(nn.Module):
    """Patch embedding plus each image's resized position grid (`vision.embed_patches`); its weights sit
    in the vision tower's scope (`patch_embed`, `position_grid`), as in our layout."""

    config: Lfm2VlConfig

    @nn.compact
    def __call__(self, pixel_values: jax.Array, spatial_shapes: jax.Array) -> jax.Array:
        specs = param_specs(self.config)["vision"]
        p = declare(self, {k: specs[k] for k in ("patch_embed", "position_grid")})
        return embed_patches(p, pixel_values, spatial_shapes, self.config.runtime.dtypes.compute)


class LayerNorm(nn.Module):
    """LayerNorm (`scale`, `bias`) over the vision width."""

    config: Lfm2VlConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        v = self.config.vision
        p = declare(self, vision_layer_specs(v)["ln1"])
        return layer_norm(x, cast(p, self.config.runtime.dtypes.compute), v.layer_norm_eps)


class VisionAttention(nn.Module):
    """Bidirectional attention over each image's valid patches (`vision.vision_attention`)."""

    config: Lfm2VlConfig

    @nn.compact
    def __call__(self, y: jax.Array, num_patches: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The output projection and its bias, apart (see `vision.vision_residual_layer`)."""
        c = self.config
        p = cast(declare(self, vision_layer_specs(c.vision)["attn"]), c.runtime.dtypes.compute)
        return vision_attention(p, y, num_patches, c.runtime)


class VisionMLP(nn.Module):
    """`fc1`, activation, `fc2` (`vision.vision_mlp`)."""

    config: Lfm2VlConfig

    @nn.compact
    def __call__(self, y: jax.Array) -> jax.Array:
        c = self.config
        p = cast(declare(self, vision_layer_specs(c.vision)["mlp"]), c.runtime.dtypes.compute)
        return vision_mlp(p, y, c.vision)


class VisionEncoderLayer(nn.Module):
    """One pre-LN encoder layer (`vision.vision_residual_layer`): `ln1`, `attn`, `ln2`, `mlp`."""

    config: Lfm2VlConfig

    @nn.compact
    def __call__(self, x: jax.Array, num_patches: jax.Array) -> tuple[jax.Array, None]:
        c = self.config
        attn = VisionAttention(c, name="attn")
        x = vision_residual_layer(
            x,
            LayerNorm(c, name="ln1"),
            lambda y: attn(y, num_patches),
            LayerNorm(c, name="ln2"),
            VisionMLP(c, name="mlp"),
        )
        return x, None


class VisionTower(nn.Module):
    """SigLIP2-NaFlex tower (`vision.vision_tower`): embeddings, `layers` (nn.scan over the encoder layers,
    `nn.remat` with the runtime's policy), `post_ln`."""

    config: Lfm2VlConfig

    @nn.compact
    def __call__(
        self, pixel_values: jax.Array, pixel_attention_mask: jax.Array, spatial_shapes: jax.Array
    ) -> jax.Array:
        c = self.config
        dtype = c.runtime.dtypes.compute
        num_patches = pixel_attention_mask.astype(jnp.int32).sum(axis=1)
        body = VisionEncoderLayer
        if c.runtime.remat != "none":
            body = nn.remat(body, policy=remat_policy(c.runtime.remat), prevent_cse=False)
        layers = nn.scan(
            body,
            variable_axes={"params": 0, "intermediates": 0},
            split_rngs={"params": True},
            in_axes=nn.broadcast,
            length=c.vision.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(c, name="layers")
        embeddings = VisionEmbeddings(c)
        nn.share_scope(self, embeddings)
        with matmul_precision(dtype):
            x = embeddings(pixel_values, spatial_shapes)
            x, _ = layers(x, num_patches)
        return LayerNorm(c, name="post_ln")(x)


class Projector(nn.Module):
    """Pixel unshuffle and MLP (`projector.project`): `ln` (when the checkpoint has one), `fc1`, `fc2`."""

    config: Lfm2VlConfig

    @nn.compact
    def __call__(self, features: jax.Array, spatial_shapes: jax.Array) -> jax.Array:
        p = declare(self, param_specs(self.config)["projector"])
        return project(p, features, spatial_shapes, self.config.downsample_factor)


# The whole model -------------------------------------------------------------------------------------------


class Lfm2VlModel(nn.Module):
    """LFM2-VL (`nn.model.forward`): `vision`, `projector`, `text`. `__call__` returns the logits (B, S, V)
    in float32 and the new cache entries; `hidden_states` and `image_features` as methods."""

    config: Lfm2VlConfig
    mlp_cls: type[nn.Module] = TextMLP
    conv_cls: type[nn.Module] = ShortConv
    attention_cls: type[nn.Module] = Attention

    def setup(self) -> None:
        self.vision = VisionTower(self.config)
        self.projector = Projector(self.config)
        self.text = TextModel(self.config, self.mlp_cls, self.conv_cls, self.attention_cls)

    def image_features(
        self, pixel_values: jax.Array, pixel_attention_mask: jax.Array, spatial_shapes: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """Image token embeddings (I, T, D) and which of the T slots are real tokens (I, T)."""
        features = self.vision(pixel_values, pixel_attention_mask, spatial_shapes)
        tokens = self.projector(features, spatial_shapes)
        counts = image_tokens_per_image(spatial_shapes, self.config.downsample_factor)
        return tokens, jnp.arange(tokens.shape[1])[None, :] < counts[:, None]

    def embed(
        self,
        input_ids: jax.Array,
        pixel_values: jax.Array | None = None,
        pixel_attention_mask: jax.Array | None = None,
        spatial_shapes: jax.Array | None = None,
    ) -> jax.Array:
        """Token embeddings with the images' tokens at the `<image>` positions (`nn.model.embed_inputs`)."""
        if pixel_values is None:
            return self.text.embed(input_ids)
        features, valid = self.image_features(pixel_values, pixel_attention_mask, spatial_shapes)
        is_image = input_ids == self.config.image_token_id
        return merge_image_features(self.text.embed(input_ids), is_image, features, valid)

    def hidden_states(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        pixel_values: jax.Array | None = None,
        pixel_attention_mask: jax.Array | None = None,
        spatial_shapes: jax.Array | None = None,
        cache: Any = None,
    ) -> jax.Array:
        """Final-normed hidden states (B, S, D) (`nn.model.hidden_states`)."""
        embeds = self.embed(input_ids, pixel_values, pixel_attention_mask, spatial_shapes)
        return self.text(embeds, attention_mask, cache)[0]

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        pixel_values: jax.Array | None = None,
        pixel_attention_mask: jax.Array | None = None,
        spatial_shapes: jax.Array | None = None,
        cache: Any = None,
    ) -> tuple[jax.Array, list]:
        """Logits (B, S, V) in float32 and this call's cache entries (with a `cache`, the new tokens sit
        after each row's cached ones, as `text.text_forward`; `inference.cache.append` folds them in)."""
        embeds = self.embed(input_ids, pixel_values, pixel_attention_mask, spatial_shapes)
        hidden, entries = self.text(embeds, attention_mask, cache)
        return self.text.logits(hidden), entries
