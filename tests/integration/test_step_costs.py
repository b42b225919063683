"""The decoding core pays only for what its rows ask (`inference/step.py`): the batch engine carries a table
of seen tokens only while a running request asks for a repetition penalty (two decode programs at most), a
new number of stop ids compiles nothing new, and growing the cache keeps everything but the K/V in place."""

from __future__ import annotations

import warnings

import jax
import numpy as np
import pytest
from compile_counter import CompileCounter
from tiny_model import prompt_inputs, tiny_config, tiny_params

from lfm2vl_jax import Lfm2VlForConditionalGeneration
from lfm2vl_jax.errors import Lfm2VlError
from lfm2vl_jax.inference import step
from lfm2vl_jax.inference.buckets import stop_width
from lfm2vl_jax.inference.cache import init_cache
from lfm2vl_jax.inference.options import decoding_bytes
from lfm2vl_jax.inference.sampling import SamplingParams

EOS = 2


@pytest.fixture(scope="module")
def model() -> Lfm2VlForConditionalGeneration:
    config = tiny_config(scan_layers=True)  # test_batching.py's model: its programs are shared
    return Lfm2VlForConditionalGeneration(
        config, tiny_params(config), {"eos_token_id": EOS, "pad_token_id": 0}
    )


def request(model, i: int, **options) -> dict:
    inputs = prompt_inputs(model.config, [5 + i % 3])
    return {"id": i, "inputs": inputs, "max_new_tokens": 6, "seed": i, "eos_token_id": [], **options}


def spy_on_decoding(monkeypatch) -> list[bool]:
    """Records, for each decode call of the engine (every slot, or the busy ones), whether it ran with a
    table of seen tokens."""
    from lfm2vl_jax.inference import batching

    calls = []
    for name in ("decode_steps", "decode_steps_on"):
        original = getattr(step, name)

        def spy(params, config, state, *args, original=original, **kwargs):
            calls.append(state.seen is not None)
            return original(params, config, state, *args, **kwargs)

        monkeypatch.setattr(batching, name, spy)
    return calls


def test_the_engine_carries_a_penalty_table_only_while_a_request_asks_for_one(model, monkeypatch):
    engine = model.batch_engine(slots=3, chunk=4, max_length=64, prefill_batch=1, workers=1)
    calls = spy_on_decoding(monkeypatch)
    plain = [request(model, i) for i in range(3)]
    engine.generate(plain)
    assert calls and not any(calls)  # penalty-free requests: no (slots, vocab) table in any step
    calls.clear()
    mixed = [request(model, 3, repetition_penalty=1.3), *[request(model, i) for i in range(4, 10)]]
    results = engine.generate(mixed)
    assert calls[0] and not calls[-1]  # added for the penalised request, dropped once it finished
    for item, result in zip(mixed, results, strict=True):  # and every request still gets its tokens
        options = {k: v for k, v in item.items() if k not in ("id", "inputs", "max_new_tokens", "seed")}
        alone = model.generate(**item["inputs"], max_new_tokens=6, seed=item["seed"], **options)[0]
        assert result.token_ids == alone.tolist()


def test_a_new_number_of_stop_ids_compiles_nothing_new(model):
    inputs = prompt_inputs(model.config, [7])
    model.generate(**inputs, max_new_tokens=4, eos_token_id=[EOS])
    counter = CompileCounter()
    for stops in ([EOS, 3], [EOS, 3, 4, 5, 6, 7, 8, 9]):
        model.generate(**inputs, max_new_tokens=4, eos_token_id=stops)
    assert counter.count == 0
    assert stop_width(9) == 16  # past 8, the next bucket


def test_growing_the_cache_keeps_everything_but_the_cache_in_place(model):
    config = model.config
    sampling = SamplingParams(do_sample=True, repetition_penalty=1.1)
    state = jax.eval_shape(lambda: step.empty_rows(config, 8, 256, sampling, (2,), per_row=True))
    rest = state.replace(cache=state.cache.replace(blocks=None))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "donated buffers were not usable" at each growth
        compiled = step._grown.lower(config, state.cache.blocks, rest, 512).compile()
    memory = compiled.memory_analysis()

    def nbytes(tree) -> int:
        return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))

    old_cache, new_cache = (
        nbytes(state.cache.blocks),
        nbytes(jax.eval_shape(lambda: init_cache(config, 8, 512))),
    )
    assert memory.alias_size_in_bytes >= nbytes(rest)  # the seen table, keys, options: reused in place
    # the peak is the old state, the new cache and temporaries: no second copy of the old state
    assert memory.output_size_in_bytes - memory.alias_size_in_bytes <= new_cache + 1024  # + small vectors
    assert memory.temp_size_in_bytes < old_cache / 8


def test_the_engine_refuses_slots_and_lengths_it_could_never_hold(model):
    """One memory estimate (`options.decoding_bytes`) for `generate` and the engine: a cache that could not
    grow to `max_length` for every slot is refused when the engine is made, naming both options."""
    positions = model.config.text.max_position_embeddings
    with pytest.raises(Lfm2VlError, match=f"max_length={positions + 1} is more than the model's {positions}"):
        model.batch_engine(slots=2, max_length=positions + 1)
    with pytest.raises(Lfm2VlError, match="slots=4194304, max_length=4096: decoding 4194304 row"):
        model.batch_engine(slots=2**22, max_length=4096)
    rows, capacity = 3, 512
    expected = sum(
        x.size * x.dtype.itemsize for x in jax.tree.leaves(init_cache(model.config, rows, capacity))
    )
    assert decoding_bytes(model.config, rows, capacity, penalty=False) >= expected


def test_the_engine_decodes_only_its_busy_slots(model, monkeypatch):
    """With one request in eight slots a step computes one row (gathered, decoded, written back), and the
    request still gets `generate`'s tokens for it alone."""
    from lfm2vl_jax.inference import batching

    rows = []
    original = step.decode_steps_on

    def spy(params, config, state, chosen, *args, **kwargs):
        rows.append(len(chosen))
        return original(params, config, state, chosen, *args, **kwargs)

    monkeypatch.setattr(batching, "decode_steps_on", spy)
    item = request(model, 1, repetition_penalty=1.3)
    [result] = model.batch_engine(slots=8, chunk=4, max_length=64).generate([item])
    assert rows and set(rows) == {1}
    alone = model.generate(
        **item["inputs"], max_new_tokens=6, seed=1, eos_token_id=[], repetition_penalty=1.3
    )
    assert result.token_ids == alone[0].tolist()
