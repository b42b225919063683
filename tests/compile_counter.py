"""Counts XLA compilations while alive (every program: ours and any incidental one). Used by the tests
that bound recompilation and by the benchmarks that report it."""

from __future__ import annotations

from jax import monitoring


class CompileCounter:
    def __init__(self):
        self.count = 0
        self.names: list[str] = []  # the compiled functions' names, in order
        monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event: str, duration: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            self.count += 1
            self.names.append(str(kwargs.get("fun_name", "?")))
