"""The tests' two compile modes (tests/conftest.py): XLA's default, as users' programs and the parity tier
compile, and `jax_disable_most_optimizations` (LLVM at -O0, no expensive LLVM passes) everywhere else."""

from __future__ import annotations

import jax

FLAG = "jax_disable_most_optimizations"


def use_fast_compile(fast: bool) -> None:
    """Switches the mode; a change clears JAX's in-memory caches, which do not key the mode, so that no
    program compiled in one mode runs in the other (the persistent cache keys the modes apart)."""
    if jax.config.read(FLAG) != fast:
        jax.clear_caches()
        jax.config.update(FLAG, fast)
