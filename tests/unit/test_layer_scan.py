"""The text tower's program does not grow with depth: each segment's motif is traced and lowered once,
whatever its number of repeats (compile time follows; `benchmarks/compile_time.py` measures it)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lfm2vl_jax.config import ATTENTION as A
from lfm2vl_jax.config import CONV as C
from lfm2vl_jax.config import Lfm2VlConfig, RuntimeConfig, TextConfig
from lfm2vl_jax.nn.params import abstract_params
from lfm2vl_jax.nn.text import text_forward


def lowered_size(layer_types: tuple[str, ...], scan_layers: bool = True) -> int:
    """Lines of the StableHLO program of a text-tower forward pass."""
    text = TextConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        layer_types=layer_types,
    )
    runtime = RuntimeConfig(scan_layers=scan_layers)
    params = abstract_params(Lfm2VlConfig(text=text, runtime=runtime))["text"]
    embeds = jax.ShapeDtypeStruct((2, 8, 32), jnp.float32)
    mask = jax.ShapeDtypeStruct((2, 8), jnp.bool_)
    forward = jax.jit(lambda p, e, m: text_forward(p, text, runtime, e, m))
    return len(forward.lower(params, embeds, mask).as_text().splitlines())


def test_program_size_is_independent_of_depth_for_a_repeated_motif():
    sizes = [lowered_size((C, C, A, C) * repeats) for repeats in (2, 4, 8, 16)]  # 8 to 64 layers
    assert len(set(sizes)) == 1, sizes
    # ...whereas the per-layer layout's Python loop lowers every layer.
    assert (
        lowered_size((C, C, A, C) * 8, scan_layers=False)
        > lowered_size((C, C, A, C) * 4, scan_layers=False)
        > sizes[0]
    )


def test_lfm2_pattern_lowers_each_motif_once():
    lfm2 = (C, C, A) * 3 + (C, A) * 3 + (C,)  # LFM2-350M / 1.2B: attention at 2, 5, 8, 10, 12, 14
    deeper = (C, C, A) * 9 + (C, A) * 9 + (C,)  # 46 layers of the same motifs
    assert lowered_size(deeper) == lowered_size(lfm2)
