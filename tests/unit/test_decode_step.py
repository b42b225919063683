"""The compiled decode step stays lean: at the real LFM2-VL-450M shapes (compiled from shapes only, nothing
runs), one step launches a bounded number of kernels and copies nothing of size: no cache buffer, no
weight (XLA used to transpose the value cache and two weights of every attention layer each step, 51 MB of
copies per token), no (batch, vocab) record of seen tokens without a repetition penalty, no random-key
split when greedy.

The kernel budget is today's count (per-layer layout, batch 1, CPU) with a little slack: a change that
adds kernels to every step fails here and must either remove them or raise the budget knowingly.
"""

from __future__ import annotations

import functools

import jax
import pytest
from hlo_stats import step_stats
from processor_fixtures import reference_dir

from lfm2vl_jax.config import load_config
from lfm2vl_jax.inference.sampling import SamplingParams
from lfm2vl_jax.inference.step import decode_step, empty_rows
from lfm2vl_jax.nn.params import abstract_params

KERNEL_BUDGET = 480  # measured 464 on XLA:CPU (jax 0.10.2); 570 before the copies were removed
CAPACITY = 1024


@functools.cache
def compiled_step(
    repetition_penalty: float | None = None, do_sample: bool = False, fused: bool = False
) -> str:
    config = load_config(reference_dir("lfm2-vl-450m"))
    config = config.with_runtime(scan_layers=False, fused_projections=fused)
    batch = 1
    sampling = SamplingParams(do_sample=do_sample, repetition_penalty=repetition_penalty)
    state = jax.eval_shape(lambda: empty_rows(config, batch, CAPACITY, sampling, (2,), per_row=False))
    lowered = decode_step.lower(abstract_params(config), config, state)
    return lowered.compile().as_text()


def test_greedy_step_copies_nothing_and_keeps_to_its_kernel_budget():
    stats = step_stats(compiled_step())
    cache_buffer = 8 * CAPACITY * 64 * 4  # one layer's keys (heads x capacity x head dim, float32)
    assert stats.largest_copy_bytes() < cache_buffer / 64, [c.line for c, _ in stats.copies]
    assert stats.copied_bytes < 64 * 1024
    assert stats.unknown_trip_counts == 0
    assert stats.total_kernels <= KERNEL_BUDGET, stats.kernels


def test_fused_projections_save_two_products_per_attention_layer_and_one_per_mlp():
    separate, fused = step_stats(compiled_step()), step_stats(compiled_step(fused=True))
    text = load_config(reference_dir("lfm2-vl-450m")).text
    attention_layers = sum(kind == "full_attention" for kind in text.layer_types)
    saved = 2 * attention_layers + len(text.layer_types)  # 28 of 99 at the 450M shapes
    assert fused.kernels["dot"] == separate.kernels["dot"] - saved
    assert fused.total_kernels <= separate.total_kernels - saved  # measured 436 against 464
    assert fused.copied_bytes == separate.copied_bytes


def test_greedy_step_neither_tracks_seen_tokens_nor_splits_keys():
    hlo = compiled_step()
    assert "pred[1,65536]" not in hlo  # no (batch, vocab) record
    assert "threefry" not in hlo
    penalised = compiled_step(repetition_penalty=1.05)
    assert "pred[1,65536]" in penalised  # what the first assertion would catch
    assert "threefry" in compiled_step(do_sample=True)


@pytest.mark.parametrize("repetition_penalty", [None, 1.05])
def test_sampling_options_keep_the_step_copy_free(repetition_penalty):
    stats = step_stats(compiled_step(repetition_penalty, do_sample=True))
    assert stats.copied_bytes < 512 * 1024, [c.line for c, _ in stats.copies if c.bytes > 4096]
