"""A choice's text as its tokens arrive: deltas that never split a character, and stop strings."""

from __future__ import annotations

from collections.abc import Callable

INCOMPLETE = "\ufffd"  # what the tokenizer decodes the bytes of an unfinished UTF-8 character to


class CompletionText:
    """Decodes a growing token list to text, incrementally: each update decodes only the tokens that
    arrived since the previous one, with the previous update's tokens as context (a token's text can
    depend on its neighbours: merged bytes of a character, a space the decoder strips or cleans up).
    Decoding the whole list each time would cost a stream of n tokens O(n^2) on the event loop: seconds
    for a few thousand tokens. Where the context's text changes once the new tokens follow it, that
    update decodes the whole list; the final update always does (the text returned at the end is exactly
    the tokens' decoding).

    `update` returns the text not yet sent that is final: not ending in an unfinished character, and not
    possibly the start of a stop string. When a stop string appears, the text ends before it (the stop
    string is not returned, as OpenAI does), `stopped` is set and `tokens_used` counts the tokens up to the
    one that completed it. Concatenated deltas equal `text` at the end.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: list[str]):
        self.decode, self.stop = decode, stop
        self.sent = ""  # text already handed out
        self.text = ""  # text so far (up to a stop string)
        self.stopped = False
        self.tokens_used = 0
        # decode(tokens[:read]) == stable; the tokens from `context` to `read` are decoded again with the
        # next ones (vLLM's incremental detokenization).
        self._stable, self._context, self._read = "", 0, 0

    def _find_stop(self, text: str) -> int | None:
        found = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        return min(found) if found else None

    def _decoded(self, tokens: list[int], final: bool) -> str:
        """decode(tokens), from the text of the tokens decoded before and the new ones."""
        if final or len(tokens) < self._read:
            return self.decode(tokens)
        context = self.decode(tokens[self._context : self._read])
        window = self.decode(tokens[self._context :])
        if not window.startswith(context):  # the new tokens changed their context's text
            text = self.decode(tokens)
            if not text.endswith(INCOMPLETE):
                self._stable, self._context, self._read = text, len(tokens), len(tokens)
            return text
        text = self._stable + window[len(context) :]
        if not text.endswith(INCOMPLETE):  # a character may continue in the next tokens: not yet
            self._stable, self._context, self._read = text, self._read, len(tokens)
        return text

    def update(self, tokens: list[int], final: bool = False) -> str:
        """The delta to send after `tokens` (all of them so far); `final`: no more will come."""
        if self.stopped:
            return ""
        text = self._decoded(tokens, final)
        self.tokens_used = len(tokens)
        cut = self._find_stop(text)
        if cut is not None and not final:  # where the completion ends: from the exact text
            text = self.decode(tokens)
            cut = self._find_stop(text)
        if cut is not None:
            self.stopped = True
            # The first token whose text completes the stop string ends the completion.
            while (
                self.tokens_used > 1
                and self._find_stop(self.decode(tokens[: self.tokens_used - 1])) is not None
            ):
                self.tokens_used -= 1
            text = text[:cut]
            final = True
        self.text = text
        if not final:
            text = text.rstrip(INCOMPLETE)
            held = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            text = text[: len(text) - held]
        if not text.startswith(self.sent):  # the decoding of earlier tokens changed: wait for the end
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta
