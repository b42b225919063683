"""`Lfm2VlForConditionalGeneration`: the model in Hugging Face's vocabulary, over plain functions."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from .checkpoint.hf import load_hf_checkpoint
from .checkpoint.hub import resolve_checkpoint_dir
from .config import ConfigError, DTypePolicy, Lfm2VlConfig, RuntimeConfig
from .inference import engine
from .inference.sampling import SamplingParams
from .inputs import (
    MODEL_INPUTS,
    OptionError,
    as_numpy_inputs,
    check_generation_fits,
    check_inputs,
    check_int,
    check_logits_fit,
    resolve_generation_options,
)
from .nn.model import forward
from .nn.params import Params
from .parallel.sharding import batch_sharding

if TYPE_CHECKING:
    from .inference.batching import BatchEngine

# The plain forward pass, jitted here, at its entry point (the config is static: it picks the program).
_forward = jax.jit(forward, static_argnames=("config",))

INT32_MAX = 2**31 - 1  # token counts and positions are int32 on the device


def _named_inputs(*arrays: Any) -> dict[str, Any]:
    return dict(zip(MODEL_INPUTS, arrays, strict=True))


def _read_generation_config(directory: Path) -> dict[str, Any]:
    """The checkpoint's generation_config.json (its values are checked when a generation uses them)."""
    path = directory / "generation_config.json"
    if not path.exists():
        return {}
    try:
        generation = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(generation, dict):
        raise ConfigError(f"{path} must hold a JSON object, not a {type(generation).__name__}")
    return generation


class CausalLMOutput(NamedTuple):
    logits: jax.Array  # (batch, seq, vocab), float32


class Lfm2VlForConditionalGeneration:
    """An LFM2-VL model: a frozen config, a params pytree, and generation defaults.

    >>> model = Lfm2VlForConditionalGeneration.from_pretrained("LiquidAI/LFM2-VL-450M", dtype=jnp.bfloat16)
    >>> inputs = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
    ...                                        return_dict=True)
    >>> new_tokens = model.generate(**inputs, max_new_tokens=64)
    >>> processor.batch_decode(new_tokens, skip_special_tokens=True)
    """

    def __init__(
        self,
        config: Lfm2VlConfig,
        params: Params,
        generation_config: dict[str, Any] | None = None,
        source_dir: Path | None = None,
    ):
        self.config = config  # with its runtime: layout, dtypes, mesh
        self.params = params
        self.generation_config = generation_config or {}
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
        """
        if runtime is None:
            dtypes = DTypePolicy.uniform(dtype)
            runtime = RuntimeConfig(dtypes=dtypes, scan_layers=bool(scan_layers), mesh=mesh)
        directory = resolve_checkpoint_dir(path_or_hub_id)
        config, params = load_hf_checkpoint(directory, runtime=runtime, progress=progress)
        return cls(config, params, _read_generation_config(directory), directory)

    @property
    def dtype(self) -> Any:
        return self.config.runtime.dtypes.params

    def __call__(
        self,
        input_ids: Any,
        attention_mask: Any = None,
        pixel_values: Any = None,
        pixel_attention_mask: Any = None,
        spatial_shapes: Any = None,
    ) -> CausalLMOutput:
        """The reference's forward pass on right-padded inputs (numpy or jax arrays)."""
        inputs = as_numpy_inputs(
            **_named_inputs(input_ids, attention_mask, pixel_values, pixel_attention_mask, spatial_shapes)
        )
        check_inputs(self.config, **inputs)
        check_logits_fit(self.config, inputs["input_ids"])
        if inputs["attention_mask"] is None:
            inputs["attention_mask"] = np.ones_like(inputs["input_ids"])
        return CausalLMOutput(logits=_forward(self.params, self.config, **inputs))

    # Generation -------------------------------------------------------------------------------------------

    def decoding_options(self, options: dict[str, Any]) -> tuple[SamplingParams, tuple[int, ...], int]:
        """(sampling parameters, stop token ids, pad id) of a generation call's `options` (transformers'
        names, plus `stop_token_ids`), filled from the checkpoint's generation_config.json, then
        transformers' defaults; each checked for type and range."""
        return resolve_generation_options(self.config, options, self.generation_config)

    def request(
        self, inputs: dict[str, Any], max_new_tokens: int, seed: int, options: dict[str, Any]
    ) -> engine.Request:
        """Validates and prepares one generation call: bucketed inputs (sharded over the mesh's `data`
        axis when there is one) and the decoding options, filled from the checkpoint's
        generation_config.json, then transformers' defaults. Every option is checked for type and range,
        and the request's length and memory against what the model and the machine hold, before anything
        is allocated."""
        max_new_tokens = check_int("max_new_tokens", max_new_tokens, 1, INT32_MAX)
        seed = check_int("seed", seed, -(2**63), 2**63 - 1)
        sampling, stop, pad = self.decoding_options(options)
        inputs = as_numpy_inputs(**inputs)
        check_inputs(self.config, **inputs)
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
                input_ids=jax.device_put(batch.input_ids, batch_sharding(self.config, batch.input_ids.shape)),
                attention_mask=jax.device_put(
                    batch.attention_mask, batch_sharding(self.config, batch.attention_mask.shape)
                ),
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
        input_ids: Any,
        attention_mask: Any = None,
        pixel_values: Any = None,
        pixel_attention_mask: Any = None,
        spatial_shapes: Any = None,
        *,
        max_new_tokens: int = 128,
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
        for streaming; see `generate.py` for why). Unset options come from the
        checkpoint's generation_config.json, then transformers' defaults. Rows may differ in length and in
        number and size of images: each gets exactly the tokens it would get alone.
        """
        if loop is not None and not (isinstance(loop, str) and loop in ("host", "device")):
            raise OptionError(f"loop must be 'host', 'device' or None, got {loop!r}")
        if streamer is not None and not callable(streamer):
            raise OptionError(
                f"streamer must be callable (it is called with each step's tokens), got {streamer!r}"
            )
        inputs = _named_inputs(input_ids, attention_mask, pixel_values, pixel_attention_mask, spatial_shapes)
        request = self.request(inputs, max_new_tokens, seed, options)
        return engine.generate(self.params, self.config, request, loop, streamer)

    def stream(
        self,
        input_ids: Any,
        attention_mask: Any = None,
        pixel_values: Any = None,
        pixel_attention_mask: Any = None,
        spatial_shapes: Any = None,
        *,
        max_new_tokens: int = 128,
        seed: int = 0,
        **options: Any,
    ) -> Iterator[np.ndarray]:
        """Like `generate`, yielding each step's new tokens (batch,) as they are produced; stops when every
        row has emitted a stop token."""
        inputs = _named_inputs(input_ids, attention_mask, pixel_values, pixel_attention_mask, spatial_shapes)
        request = self.request(inputs, max_new_tokens, seed, options)
        for state in engine.run(self.params, self.config, request, "host"):
            yield engine.latest_tokens(state, request.batch.num_rows)
            if np.asarray(state.done).all():
                return

    def batch_engine(
        self,
        processor: Any = None,
        *,
        slots: int = 64,
        max_length: int = 4096,
        max_new_tokens: int = 256,
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
        from .inference.batching import BatchEngine

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
