"""The engine thread: one thread runs `BatchEngine.serve` for the whole server; requests join and leave the
engine's slots between decode steps.

Other threads (the event loop) `submit` a request with a sink and `cancel` it; the sink is called on the
engine thread with ("tokens", tokens so far, time) as decoding progresses and ("done", BatchResult, time)
at the end, or ("failed", error, time) if the engine thread dies (a bug: it is logged, the server then
answers 503).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from ..inference.batch_io import BatchRequest
from ..inference.batching import BatchEngine, RequestInbox
from .protocol import RequestError

logger = logging.getLogger("lfm2vl_jax.serve")

Sink = Callable[[tuple[str, Any, float]], None]


class EngineDriver:
    def __init__(self, engine: BatchEngine):
        self.engine = engine
        self.inbox = RequestInbox()
        self.error: BaseException | None = None
        self._sinks: dict[Any, Sink] = {}
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="lfm2vl-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float = 30.0) -> None:
        self.inbox.close()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self.error is None and self._thread.is_alive()

    @property
    def in_flight(self) -> int:
        """Requests submitted and not finished (running or waiting for a slot)."""
        return len(self._sinks)

    def submit(self, tag: Any, request: BatchRequest, sink: Sink) -> None:
        with self._lock:
            if self.error is not None:
                raise RequestError(
                    "the engine has failed; the server cannot answer (see its log)",
                    status=503,
                    error_type="server_error",
                )
            self._sinks[tag] = sink
        self.inbox.put(tag, request)

    def cancel(self, tag: Any) -> None:
        """Frees the request's slot (within a decode chunk); its sink is not called again."""
        with self._lock:
            known = self._sinks.pop(tag, None) is not None
        if known:
            self.inbox.cancel(tag)

    def _on_tokens(self, tag: Any, tokens: list[int]) -> None:
        sink = self._sinks.get(tag)
        if sink is not None:
            sink(("tokens", tokens, time.perf_counter()))

    def _loop(self) -> None:
        try:
            for tag, result in self.engine.serve(self.inbox, self._on_tokens):
                with self._lock:
                    sink = self._sinks.pop(tag, None)
                if sink is not None:
                    sink(("done", result, time.perf_counter()))
        except Exception as error:  # a bug: every waiting request is answered, the server reports it
            logger.exception("the engine thread failed")
            with self._lock:
                self.error = error
                sinks, self._sinks = list(self._sinks.values()), {}
            for sink in sinks:
                sink(("failed", error, time.perf_counter()))
