"""Every attention implementation equals the reference (values and gradients), "auto" picks the right
one, and the blockwise kernel's memory stays linear in the sequence length, backward pass included.

Tolerances (float32): the implementations differ from the reference only in summation order (the
blockwise kernel rescales partial sums block by block; XLA's fused softmax groups differently), i.e. by a
few float32 ulps per accumulated term. With unit-scale inputs and at most ~100 keys, outputs and gradients
are O(1-10), so an absolute tolerance of 2e-5 (about 100 ulps at 1.0) passes rounding and fails any
masking or indexing error, which moves entries by O(0.1).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lfm2vl_jax import kernels
from lfm2vl_jax.kernels.blockwise import blockwise_attention
from lfm2vl_jax.nn.attention import attention, reference_attention

ATOL = 2e-5
# Small blocks so that every case spans several query and key blocks, with partial last blocks.
BLOCKWISE = functools.partial(blockwise_attention, block_q=8, block_k=16)


def inputs(batch=2, q_len=21, kv_len=37, heads=4, kv_heads=2, head_dim=16, cached=False, seed=0):
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32)

    arrays = {
        "q": normal(batch, q_len, heads, head_dim),
        "k": normal(batch, kv_heads, kv_len, head_dim),
        "v": normal(batch, kv_heads, kv_len, head_dim),
    }
    if cached:
        arrays |= {
            "new_k": normal(batch, kv_heads, q_len, head_dim),
            "new_v": normal(batch, kv_heads, q_len, head_dim),
        }
    return arrays


def masking(batch, q_len, kv_len, causal, cached):
    """Ragged rows: the second row has fewer valid keys; cached queries sit right after each row's keys."""
    lengths = np.array([kv_len, kv_len // 2 + 1], np.int32)[:batch]
    if cached:
        positions = lengths[:, None] + np.arange(q_len)[None, :]
    else:
        positions = np.broadcast_to(np.arange(q_len), (batch, q_len))
    return {
        "kv_lengths": jnp.asarray(lengths),
        "q_positions": jnp.asarray(positions, jnp.int32),
        "causal": causal,
    }


def values_and_grads(fn, arrays, options):
    names = sorted(arrays)
    weights = jnp.asarray(np.random.default_rng(1).normal(size=arrays["q"].shape), jnp.float32)

    def loss(*xs):
        kwargs = dict(zip(names, xs, strict=True))
        q, k, v = kwargs.pop("q"), kwargs.pop("k"), kwargs.pop("v")
        out = fn(q, k, v, **options, new_k=kwargs.get("new_k"), new_v=kwargs.get("new_v"))
        return jnp.sum(out * weights), out

    gradient = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(names))), has_aux=True))
    (_, out), grads = gradient(*(arrays[n] for n in names))
    return out, dict(zip(names, grads, strict=True))


def assert_same(fn, arrays, options):
    expected, expected_grads = values_and_grads(reference_attention, arrays, options)
    out, grads = values_and_grads(fn, arrays, options)
    np.testing.assert_allclose(out, expected, atol=ATOL, rtol=0)
    for name in expected_grads:
        np.testing.assert_allclose(grads[name], expected_grads[name], atol=ATOL, rtol=0, err_msg=name)


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 4)], ids=["gqa", "mha"])
def test_blockwise_equals_reference(causal, heads, kv_heads):
    arrays = inputs(heads=heads, kv_heads=kv_heads)
    assert_same(BLOCKWISE, arrays, masking(2, 21, 37, causal, cached=False))


@pytest.mark.parametrize("q_len", [1, 19], ids=["decode", "chunk"])
def test_blockwise_equals_reference_with_a_cache(q_len):
    """Cached decoding: the queries' own keys (new_k/new_v) share one softmax with the cache's."""
    arrays = inputs(q_len=q_len, kv_len=40, cached=True)
    assert_same(BLOCKWISE, arrays, masking(2, q_len, 40, causal=True, cached=True))


def test_blockwise_default_blocks_equal_reference():
    """The production block sizes (one query block, one key block at this length)."""
    arrays = inputs(q_len=37, kv_len=37)
    assert_same(blockwise_attention, arrays, masking(2, 37, 37, causal=True, cached=False))


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_jax_nn_wrapper_equals_reference(causal):
    """The `jax.nn.dot_product_attention` wrapper (the cuDNN path's argument mapping) on XLA's
    implementation: keys transposed to sequence-major, padding as key lengths, the causal mask."""
    arrays = inputs(q_len=37, kv_len=37)
    options = masking(2, 37, 37, causal, cached=False)
    assert_same(kernels.get("xla"), arrays, options)
    # through the entry point (default positions), as the text tower's prefill calls it
    entry = jax.jit(
        lambda q, k, v: attention(
            q, k, v, kv_lengths=options["kv_lengths"], causal=causal, implementation="xla"
        )
    )
    out = entry(**arrays)
    np.testing.assert_allclose(
        out, reference_attention(**arrays, **options, new_k=None, new_v=None), atol=ATOL
    )


def test_blockwise_in_bfloat16_matches_the_float32_reference():
    arrays = inputs()
    options = masking(2, 21, 37, causal=True, cached=False)
    expected = reference_attention(**arrays, **options, new_k=None, new_v=None)
    low = {name: x.astype(jnp.bfloat16) for name, x in arrays.items()}
    out = jax.jit(lambda q, k, v: BLOCKWISE(q, k, v, **options, new_k=None, new_v=None))(**low)
    assert out.dtype == jnp.bfloat16
    # bf16 inputs carry 2**-8 relative error; outputs are averages of unit-scale values
    np.testing.assert_allclose(out.astype(jnp.float32), expected, atol=3e-2)


def call(**changes) -> kernels.Call:
    facts = dict(
        backend="cpu",
        dtype=jnp.dtype(jnp.float32),
        batch=1,
        q_len=300,
        kv_len=300,
        num_heads=16,
        num_kv_heads=8,
        head_dim=64,
        causal=True,
        cached=False,
        default_positions=True,
    )
    return kernels.Call(**(facts | changes))


def auto(**changes) -> str:
    return kernels.choose("auto", call(**changes))


def test_auto_picks_reference_for_short_inputs_and_blockwise_for_long_ones():
    assert auto(q_len=128, kv_len=128) == "reference"
    assert auto(q_len=300, kv_len=300) == "blockwise"  # on the CPU
    assert auto(q_len=4096, kv_len=4096) == "blockwise"
    assert auto(q_len=16384, kv_len=16384, dtype=jnp.dtype(jnp.bfloat16)) == "blockwise"
    assert auto(q_len=1024, kv_len=1024, num_heads=12, num_kv_heads=12, causal=False, batch=3) == "blockwise"
    assert auto(q_len=1, kv_len=32768, cached=True, batch=32) == "reference"  # decoding
    assert auto(q_len=2048, kv_len=8192, cached=True) == "blockwise"  # a long chunk onto a cache


def test_auto_picks_cudnn_only_where_it_runs():
    gpu = dict(backend="cuda", dtype=jnp.dtype(jnp.bfloat16))
    assert auto(**gpu) == "cudnn"
    assert auto(**gpu, q_len=64, kv_len=64, causal=False) == "cudnn"  # vision
    assert auto(backend="cuda", q_len=64, kv_len=64) == "reference"  # float32
    assert auto(backend="cuda", q_len=4096, kv_len=4096) == "blockwise"
    assert auto(**gpu, q_len=1, cached=True) == "reference"
    assert auto(**gpu, default_positions=False) == "reference"
    assert auto(**gpu, head_dim=76) == "reference"
    assert auto(backend="rocm", dtype=jnp.dtype(jnp.bfloat16)) == "reference"


def test_a_named_implementation_that_cannot_run_a_call_says_why():
    with pytest.raises(kernels.UnsupportedAttentionError, match="'cudnn': needs an NVIDIA GPU"):
        kernels.choose("cudnn", call())
    with pytest.raises(kernels.UnsupportedAttentionError, match="cached decoding"):
        kernels.choose("xla", call(cached=True))
    with pytest.raises(kernels.UnknownImplementationError, match="'flash' is not one of auto, reference"):
        kernels.choose("flash", call())
    assert kernels.choose("blockwise", call(q_len=1, cached=True)) == "blockwise"


def test_auto_falls_back_when_a_kernel_is_unavailable_while_tracing(monkeypatch):
    """cuDNN missing or too old on a GPU: "auto" warns and runs the next choice; a named one fails."""

    def unavailable(*args, **kwargs):
        raise kernels.KernelUnavailableError("cudnn attention is unavailable here: cuDNN is not detected")

    monkeypatch.setitem(kernels.REGISTRY, "cudnn", kernels.Kernel(unavailable, lambda call: None))
    arrays = inputs()
    options = masking(2, 21, 37, causal=True, cached=False)
    with pytest.warns(UserWarning, match="cuDNN is not detected; attention uses 'reference' instead"):
        out = attention(**arrays, **options)
    np.testing.assert_allclose(
        out, reference_attention(**arrays, **options, new_k=None, new_v=None), atol=ATOL
    )
    with pytest.raises(kernels.KernelUnavailableError):
        attention(**arrays, **options, implementation="cudnn")


def test_blockwise_memory_is_linear_in_length_forward_and_backward():
    """Compiled (not run): the temporaries of the blockwise kernel's gradient at 8k tokens are a small
    fraction of one (heads x T x T) score matrix, which the reference's gradient holds several of."""
    length, heads = 8192, 4
    q = jax.ShapeDtypeStruct((1, length, heads, 32), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, 2, length, 32), jnp.float32)
    scores = heads * length * length * 4

    def temp_bytes(implementation: str) -> int:
        def loss(q, k, v):
            return attention(q, k, v, causal=True, implementation=implementation).sum()

        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    assert temp_bytes("blockwise") < scores / 16
    assert temp_bytes("reference") > scores  # what the test would catch
