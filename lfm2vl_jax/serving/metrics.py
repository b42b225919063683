"""`GET /metrics`: Prometheus counters and histograms of the server (names as vLLM's, prefix `lfm2vl_`)."""

from __future__ import annotations

from collections.abc import Callable

from jax import monitoring
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Seconds: from a few milliseconds (a small model on an accelerator) to minutes (a long queue on a CPU).
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # JAX's event for one XLA compilation
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)


class ServerMetrics:
    """One registry per server (several servers in one process, as in the tests, do not mix)."""

    def __init__(self, running: Callable[[], int], waiting: Callable[[], int]):
        self.registry = CollectorRegistry()
        r = self.registry
        Gauge("lfm2vl_num_requests_running", "Requests holding a decode slot", registry=r).set_function(
            running
        )
        Gauge("lfm2vl_num_requests_waiting", "Requests waiting for a slot", registry=r).set_function(waiting)
        self.prompt_tokens = Counter("lfm2vl_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("lfm2vl_generation_tokens", "Tokens generated", registry=r)
        self.requests = Counter(
            "lfm2vl_request_success", "Finished requests by finish reason", ["finished_reason"], registry=r
        )
        self.errors = Counter(
            "lfm2vl_request_errors", "Refused or failed requests by status", ["status"], registry=r
        )
        self.time_to_first_token = Histogram(
            "lfm2vl_time_to_first_token_seconds",
            "From the request's arrival to its first token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            "lfm2vl_inter_token_latency_seconds",
            "Between consecutive tokens of a request (tokens decoded together share the interval)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e_latency = Histogram(
            "lfm2vl_e2e_request_latency_seconds",
            "From the request's arrival to its last token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        # A request whose shapes (prompt length bucket, images, prefill group) are new compiles programs
        # while every stream waits: on a CPU, seconds each.
        self.compilations = Counter(
            "lfm2vl_xla_compilations", "XLA programs compiled by this process", registry=r
        )
        self.compile_seconds = Counter(
            "lfm2vl_xla_compile_seconds", "Seconds spent compiling XLA programs", registry=r
        )

    def _on_duration(self, event: str, duration: float, **kwargs: object) -> None:
        if event == COMPILE_EVENT:
            self.compilations.inc()
            self.compile_seconds.inc(duration)

    def watch_compilations(self) -> None:
        """Counts the process's compilations (from the server's start to `unwatch_compilations`)."""
        monitoring.register_event_duration_secs_listener(self._on_duration)

    def unwatch_compilations(self) -> None:
        monitoring.unregister_event_duration_listener(self._on_duration)

    def observe_tokens(self, new: int, interval: float) -> None:
        """`new` tokens arrived `interval` seconds after the previous ones."""
        self.generation_tokens.inc(new)
        for _ in range(new):
            self.inter_token_latency.observe(interval / new)

    def render(self) -> bytes:
        return generate_latest(self.registry)
