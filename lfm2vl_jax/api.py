"""`Lfm2VlForConditionalGeneration`: the model in Hugging Face's vocabulary, over plain functions."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from .checkpoint.hf import load_hf_checkpoint
from .checkpoint.hub import resolve_checkpoint_dir
from .config import ConfigError, DTypePolicy, Lfm2VlConfig, Quantization, RuntimeConfig, read_json_object
from .inference import engine
from .inference.batching import BatchEngine
from .inference.options import check_generation_fits, generation_length, resolve_generation_options
from .inference.sampling import SEED_RANGE, SamplingParams
from .inputs import (
    INT32_MAX,
    MODEL_INPUTS,
    InputError,
    OptionError,
    as_numpy_inputs,
    check_forward_options,
    check_images,
    check_inputs,
    check_int,
    check_logits_fit,
    is_right_padded,
)
from .nn.model import (
    causal_lm_loss,
    forward,
    forward_with_hidden_states,
    image_token_embedding,
    vision_and_image_features,
)
from .nn.params import Params, param_shardings, quantize_params
from .parallel.sharding import batch_sharding
from .xla_flags import FLAG, memory_scheduler_on

# The plain forward pass, jitted here, at its entry point (the config is static: it picks the program).
_forward = jax.jit(forward, static_argnames=("config", "any_mask"))
_forward_with_hidden_states = jax.jit(forward_with_hidden_states, static_argnames=("config", "any_mask"))
_image_features = jax.jit(vision_and_image_features, static_argnames=("config",))
_loss = jax.jit(causal_lm_loss)


def _named_inputs(*arrays: Any) -> dict[str, Any]:
    return dict(zip(MODEL_INPUTS, arrays, strict=True))


def _read_generation_config(directory: Path) -> dict[str, Any]:
    """The checkpoint's generation_config.json (its values are checked when a generation uses them)."""
    return read_json_object(directory / "generation_config.json") or {}


class CausalLMOutput(NamedTuple):
    logits: jax.Array  # (batch, seq, vocab), float32
    loss: jax.Array | None = None  # () float32, when `labels` were given
    # with output_hidden_states: the input embeddings, then each text layer's output (the last final-normed)
    hidden_states: tuple[jax.Array, ...] | None = None


class ImageFeatures(NamedTuple):
    """transformers' `get_image_features` output."""

    last_hidden_state: jax.Array  # (images, patches, vision width): the vision tower's output
    pooler_output: list[jax.Array]  # per image, its (tokens, hidden) embeddings for the text tower


class Lfm2VlForConditionalGeneration:
    """An LFM2-VL model: a frozen config, a params pytree, and generation defaults.

    >>> model = Lfm2VlForConditionalGeneration.from_pretrained("LiquidAI/LFM2-VL-450M", dtype=jnp.bfloat16)
    >>> inputs = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
    ...                                        return_dict=True)
    >>> new_tokens = model.generate(**inputs, max_new_tokens=64)
    >>> processor.batch_decode(new_tokens, skip_special_tokens=True)
    """

    # New tokens when neither the caller nor generation_config.json (max_new_tokens, max_length) says.
    default_max_new_tokens: int = 128

    def __init__(
        self,
        config: Lfm2VlConfig,
        params: Params,
        generation_config: dict[str, Any] | None = None,
        source_dir: Path | None = None,
    ):
        self.config = config  # with its runtime: layout, dtypes, mesh
        self.params = params
        if generation_config is not None and not isinstance(generation_config, dict):
            raise ConfigError(f"generation_config must be a dict, got a {type(generation_config).__name__}")
        self.generation_config = generation_config or {}
        quantized_on_cpu = config.runtime.quantization is not None and jax.default_backend() == "cpu"
        if quantized_on_cpu and not memory_scheduler_on():
            warnings.warn(
                "quantized weights on a CPU with XLA's concurrency-ordered programs: a per-layer program "
                "holds every weight dequantized in float32 at once, and decodes slower than float32. Import "
                f"lfm2vl_jax before JAX runs anything, or set XLA_FLAGS={FLAG}=false (see xla_flags.py)",
                stacklevel=2,
            )
        self.source_dir = source_dir  # the checkpoint directory it was loaded from, if any

    @property
    def mesh(self) -> Mesh | None:
        return self.config.runtime.mesh

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | Path,
        dtype: Any = jnp.float32,
        mesh: Mesh | None = None,
        scan_layers: bool | None = None,
        progress: bool = True,
        runtime: RuntimeConfig | None = None,
        check_finite: bool = True,
        quantize: str | None = None,
        quant_group_size: int | None = None,
        quantize_embeddings: bool = True,
    ) -> Lfm2VlForConditionalGeneration:
        """Loads a transformers checkpoint from a local directory or a Hugging Face Hub id.

        dtype: of the weights, the computation and the cache alike (`runtime` sets them apart).
        mesh: shard the weights over it as they load (see `parallel.mesh.make_mesh`); generation then
            shards the batch and cache over it too.
        scan_layers: stack the text layers of each repeated motif and run them with `lax.scan` (compile
            time independent of depth), or (False, the default on every backend) keep one array per
            layer, run by a Python loop. Per layer decodes about 2x faster on a CPU and on an H200 (see
            README): a scan slices each layer's weights out of the stack every step, and XLA materialises
            those slices (a copy of every weight, per token) before the matrix products.
        runtime: the whole `RuntimeConfig` (dtype policy, layout, attention implementation, mesh, rules);
            `dtype`, `mesh` and `scan_layers` are ignored when it is given.
        check_finite: refuse a checkpoint with a NaN or infinite value in any tensor (or one beyond the range
            of `dtype`), naming the first such tensor and its file; False skips this check.
        quantize: "int8" (one scale per output channel) or "int4" (one per `quant_group_size` inputs;
            default 64, or a smaller divisor of a weight's input width that 64 does not divide) weight-only
            quantization of every projection, done as the tensors stream in (peak
            host memory near the quantized size plus one float weight); `quantize_embeddings`: the
            embedding / LM head too (else kept in `dtype`). Sets `runtime.quantization` (see `Quantization`).
        """
        if runtime is None:
            dtypes = DTypePolicy.uniform(dtype)
            scan_layers = False if scan_layers is None else scan_layers  # checked: True or False
            runtime = RuntimeConfig(dtypes=dtypes, scan_layers=scan_layers, mesh=mesh)
        elif not isinstance(runtime, RuntimeConfig):
            raise ConfigError(f"runtime must be a RuntimeConfig, got a {type(runtime).__name__}")
        if quantize is not None or quant_group_size is not None:
            if runtime.quantization is not None:
                raise ConfigError("quantize: the runtime given already sets a quantization; pass one of them")
            if quantize is None:
                raise ConfigError("quant_group_size is for quantize='int4'")
            quantization = Quantization(quantize, quant_group_size, quantize_embeddings)
            runtime = runtime.replace(quantization=quantization)
        for name, value in (("progress", progress), ("check_finite", check_finite)):
            if not isinstance(value, bool):
                raise ConfigError(f"{name} must be True or False, got {value!r}")
        directory = resolve_checkpoint_dir(path_or_hub_id)
        config, params = load_hf_checkpoint(
            directory, runtime=runtime, progress=progress, check_finite=check_finite
        )
        return cls(config, params, _read_generation_config(directory), directory)

    def quantize(
        self, scheme: str, group_size: int | None = None, embeddings: bool = True
    ) -> Lfm2VlForConditionalGeneration:
        """A copy of this model with weight-only quantized projections (see `from_pretrained`'s
        `quantize`); this model is left as it is. A model quantized already is refused."""
        if self.config.runtime.quantization is not None:
            raise ConfigError(
                f"this model is already quantized ({self.config.runtime.quantization.scheme}): quantize a "
                "float model (load it again)"
            )
        config = self.config.with_runtime(quantization=Quantization(scheme, group_size, embeddings))
        params = quantize_params(self.params, config)
        params = jax.device_put(params, None if self.mesh is None else param_shardings(config))
        return type(self)(config, params, self.generation_config, self.source_dir)

    @property
    def dtype(self) -> Any:
        return self.config.runtime.dtypes.params

    def __call__(
        self,
        input_ids: Any = None,
        attention_mask: Any = None,
        pixel_values: Any = None,
        pixel_attention_mask: Any = None,
        spatial_shapes: Any = None,
        *,
        inputs_embeds: Any = None,
        position_ids: Any = None,
        labels: Any = None,
        output_hidden_states: bool = False,
    ) -> CausalLMOutput:
        """The reference's forward pass (numpy or jax arrays): logits (batch, seq, vocab) in float32, and
        with `labels` the loss.

        attention_mask: zeros anywhere (left or right padding, holes) are honoured as transformers honours
            them: a masked token is seen by no other token and feeds zeros into the short convolutions.
            The logits at masked positions are unspecified (finite). A row masking every token is refused.
        position_ids: (batch, seq) or (1, seq) rotary positions; default 0 .. seq-1 whatever the padding,
            as transformers. Positions that restart inside a row without an attention_mask (transformers'
            packed sequences, whose attention it confines to each sequence) are refused.
        inputs_embeds: (batch, seq, hidden_size) instead of `input_ids`; with images, the image tokens go
            where an embedding equals the `<image>` token's (as transformers finds them).
        labels: (batch, seq) token ids or -100; `loss` is transformers' causal-LM loss (position t predicts
            labels[:, t + 1]; the mean over labels that are not -100).
        output_hidden_states: also return transformers' `hidden_states`: the input embeddings, then each
            text layer's output, the last one final-normed (num_hidden_layers + 1 arrays).
        """
        if not isinstance(output_hidden_states, (bool, np.bool_)):
            raise OptionError(f"output_hidden_states must be True or False, got {output_hidden_states!r}")
        inputs = self._checked_inputs(
            _named_inputs(input_ids, attention_mask, pixel_values, pixel_attention_mask, spatial_shapes),
            inputs_embeds,
        )
        extra = as_numpy_inputs(position_ids=position_ids, labels=labels)
        embeds = inputs["inputs_embeds"]
        shape = (embeds if embeds is not None else inputs["input_ids"]).shape[:2]
        positions = check_forward_options(
            self.config, shape, inputs["attention_mask"], extra["position_ids"], extra["labels"]
        )
        check_logits_fit(self.config, shape)
        mask = inputs["attention_mask"]
        any_mask = mask is not None and not is_right_padded(mask)
        if mask is None:
            inputs["attention_mask"] = np.ones(shape, np.int32)
        states = None
        if output_hidden_states:
            logits, states = _forward_with_hidden_states(
                self.params, self.config, **inputs, position_ids=positions, any_mask=any_mask
            )
        else:
            logits = _forward(self.params, self.config, **inputs, position_ids=positions, any_mask=any_mask)
        loss = None if extra["labels"] is None else _loss(logits, extra["labels"])
        return CausalLMOutput(logits=logits, loss=loss, hidden_states=states)

    def get_image_features(
        self, pixel_values: Any, spatial_shapes: Any, pixel_attention_mask: Any
    ) -> ImageFeatures:
        """transformers' `get_image_features` (its argument order): the vision tower's output and each
        image's token embeddings as the text tower receives them."""
        arrays = as_numpy_inputs(
            pixel_values=pixel_values,
            pixel_attention_mask=pixel_attention_mask,
            spatial_shapes=spatial_shapes,
        )
        if arrays["pixel_values"] is None:
            raise InputError("get_image_features needs pixel_values")
        check_images(self.config, **arrays)
        vision, tokens, valid = _image_features(self.params, self.config, *arrays.values())
        counts = np.asarray(valid).sum(axis=1)
        return ImageFeatures(vision, [tokens[i, :n] for i, n in enumerate(counts.tolist())])

    def _checked_inputs(self, inputs: dict[str, Any], inputs_embeds: Any) -> dict[str, np.ndarray | None]:
        """The model inputs and `inputs_embeds` as numpy arrays, checked together (`inputs.check_inputs`)."""
        arrays = as_numpy_inputs(**inputs, inputs_embeds=inputs_embeds)
        image_embedding = None
        if arrays["inputs_embeds"] is not None:  # transformers finds image positions by this embedding
            image_embedding = np.asarray(image_token_embedding(self.params, self.config))
        check_inputs(self.config, **arrays, image_embedding=image_embedding)
        return arrays

    # Generation -------------------------------------------------------------------------------------------

    def decoding_options(self, options: dict[str, Any]) -> tuple[SamplingParams, tuple[int, ...], int]:
        """(sampling parameters, stop token ids, pad id) of a generation call's `options` (transformers'
        names, plus `stop_token_ids`), filled from the checkpoint's generation_config.json, then
        transformers' defaults; each checked for type and range."""
        return resolve_generation_options(self.config, options, self.generation_config)

    def request(
        self,
        inputs: dict[str, Any],
        max_new_tokens: int | None,
        seed: int,
        options: dict[str, Any],
        inputs_embeds: Any = None,
    ) -> engine.Request:
        """Validates and prepares one generation call: bucketed inputs (sharded over the mesh's `data`
        axis when there is one) and the decoding options, filled from the checkpoint's
        generation_config.json, then transformers' defaults. Every option is checked for type and range,
        and the request's length and memory against what the model and the machine hold, before anything
        is allocated. `max_new_tokens=None`: generation_config.json's max_new_tokens, else its max_length
        minus the longest prompt, else `default_max_new_tokens`."""
        if max_new_tokens is not None:
            max_new_tokens = check_int("max_new_tokens", max_new_tokens, 1, INT32_MAX)
        seed = check_int("seed", seed, *SEED_RANGE)
        sampling, stop, pad = self.decoding_options(options)
        inputs = self._checked_inputs(inputs, inputs_embeds)
        mask = inputs.get("attention_mask")
        source = inputs["input_ids"] if inputs["inputs_embeds"] is None else inputs["inputs_embeds"]
        prompt = source.shape[1] if mask is None else int(mask.astype(bool).sum(axis=1).max())
        max_new_tokens = generation_length(
            max_new_tokens, self.generation_config, prompt, self.default_max_new_tokens
        )
        rows = 1
        if self.mesh is not None:
            for axis in self.config.runtime.rules.mesh_axes("batch"):
                rows *= self.mesh.shape.get(axis, 1)
        batch = engine.prepare_batch(self.config, **inputs, pad_id=pad, row_multiple=rows)
        check_generation_fits(self.config, batch, max_new_tokens)
        if self.mesh is not None:  # rows over the batch axes; images (any number per row) replicated
            replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
            batch = dataclasses.replace(
                batch,
                **{
                    name: None
                    if getattr(batch, name) is None
                    else jax.device_put(
                        getattr(batch, name), batch_sharding(self.config, getattr(batch, name).shape)
                    )
                    for name in ("input_ids", "attention_mask", "inputs_embeds")
                },
                **{
                    name: None
                    if getattr(batch, name) is None
                    else jax.device_put(getattr(batch, name), replicated)
                    for name in ("pixel_values", "pixel_attention_mask", "spatial_shapes")
                },
            )
        return engine.Request(batch, sampling, stop, pad, max_new_tokens, seed)

    def generate(
        self,
        input_ids: Any = None,
        attention_mask: Any = None,
        pixel_values: Any = None,
        pixel_attention_mask: Any = None,
        spatial_shapes: Any = None,
        *,
        inputs_embeds: Any = None,
        max_new_tokens: int | None = None,
        seed: int = 0,
        streamer: Callable[[np.ndarray], Any] | None = None,
        loop: str | None = None,
        **options: Any,
    ) -> np.ndarray:
        """New tokens (batch, n), padded after each row's EOS/stop token.

        Options as transformers' `generate`: do_sample, temperature, top_k, top_p, min_p,
        repetition_penalty, eos_token_id, pad_token_id; plus `stop_token_ids` (extra stop tokens), `seed`,
        `streamer` (called with each step's new tokens, shape (batch,)), `loop` ("device": one
        `lax.while_loop`, the default without a streamer; "host": jitted steps driven from Python, needed
        for streaming; see `inference/engine.py` for why). Unset options come from the
        checkpoint's generation_config.json, then transformers' defaults; so does an unset
        `max_new_tokens` (its max_new_tokens, else its max_length minus the longest prompt, else
        `default_max_new_tokens`, 128). Sampling options without `do_sample=True` are ignored, with a
        warning (once), as in transformers. Rows may differ in length and in number and size of images:
        each gets exactly the tokens it would get alone. The attention mask may pad either side and hold
        zeros between a row's tokens (transformers' `generate` semantics: a masked token takes no position
        and feeds the convolutions a zero). `inputs_embeds` (batch, seq, hidden_size) may stand for
        `input_ids`, as in transformers (no prompt token then counts for a repetition penalty).
        """
        if loop is not None and not (isinstance(loop, str) and loop in ("host", "device")):
            raise OptionError(f"loop must be 'host', 'device' or None, got {loop!r}")
        if streamer is not None and not callable(streamer):
            raise OptionError(
                f"streamer must be callable (it is called with each step's tokens), got {streamer!r}"
            )
        inputs = _named_inputs(input_ids, attention_mask, pixel_values, pixel_attention_mask, spatial_shapes)
        request = self.request(inputs, max_new_tokens, seed, options, inputs_embeds)
        return engine.generate(self.params, self.config, request, loop, streamer)

    def stream(
        self,
        input_ids: Any = None,
        attention_mask: Any = None,
        pixel_values: Any = None,
        pixel_attention_mask: Any = None,
        spatial_shapes: Any = None,
        *,
        inputs_embeds: Any = None,
        max_new_tokens: int | None = None,
        seed: int = 0,
        **options: Any,
    ) -> Iterator[np.ndarray]:
        """Like `generate`, yielding each step's new tokens (batch,) as they are produced; stops when every
        row has emitted a stop token."""
        inputs = _named_inputs(input_ids, attention_mask, pixel_values, pixel_attention_mask, spatial_shapes)
        request = self.request(inputs, max_new_tokens, seed, options, inputs_embeds)
        num_rows, pad_id = request.batch.num_rows, request.pad_id
        for _, tokens in engine.run(self.params, self.config, request, "host"):
            yield np.where(tokens[:num_rows, 0] < 0, pad_id, tokens[:num_rows, 0])

    def batch_engine(
        self,
        processor: Any = None,
        *,
        slots: int = 64,
        max_length: int = 4096,
        max_new_tokens: int | None = None,
        seed: int = 0,
        **options: Any,
    ) -> BatchEngine:
        """A continuous-batching engine over this model (`inference.batching.BatchEngine`): `slots` rows
        decode together, each refilled with the next request as soon as its own finishes; each request
        gets exactly the tokens `generate` gives it alone.

        >>> engine = model.batch_engine(processor, slots=64, max_new_tokens=128)
        >>> for result in engine.run({"id": i, "messages": m} for i, m in enumerate(conversations)):
        ...     print(result.id, result.text)

        processor: renders requests' `messages` and decodes the text (an `Lfm2VlProcessor`).
        max_length: prompt + new tokens per request. Other arguments are the requests' defaults (options as
        `generate`); `prefill_batch`, `workers` and `chunk` tune the engine (see `BatchEngine`).
        """
        return BatchEngine(
            self,
            processor,
            slots=slots,
            max_length=max_length,
            max_new_tokens=max_new_tokens,
            seed=seed,
            **options,
        )

    # Export -----------------------------------------------------------------------------------------------

    def save_pretrained(
        self,
        out_dir: str | Path,
        dtype: Any = None,
        overwrite: bool = False,
        max_shard_size: int | str = "50GB",
        processor: Any = None,
        source_dir: str | Path | None = None,
        progress: bool = True,
        keep_other_files: bool = False,
    ) -> Path:
        """Writes a transformers checkpoint directory (config.json, model.safetensors or shards with an
        index, generation_config.json) that transformers' and our `from_pretrained` load; see
        `export.save_hf_checkpoint`. Crash-safe (written beside `out_dir`, verified, then renamed); an
        existing `out_dir`'s checkpoint files are replaced only with `overwrite=True`, and a directory
        holding other files is written into (keeping them) only with `keep_other_files=True`.

        dtype: weights' dtype on disk (default: as held). processor: e.g. an `Lfm2VlProcessor`, saved in
        too. source_dir: a checkpoint directory whose tokenizer, processor and chat-template files are
        copied over.
        """
        from .checkpoint.export import save_hf_checkpoint

        return save_hf_checkpoint(
            out_dir,
            self.config,
            self.params,
            dtype=dtype,
            overwrite=overwrite,
            max_shard_size=max_shard_size,
            source_dir=source_dir if source_dir is not None else self.source_dir,
            generation_config=self.generation_config,
            processor=processor,
            progress=progress,
            keep_other_files=keep_other_files,
        )
