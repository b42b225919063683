"""serving/text.py: a streamed choice's text, decoded incrementally, equals the decoding of all its
tokens (deltas concatenated), with characters split over tokens and stop strings across updates; and a
long stream decodes each token a bounded number of times, not once per update."""

from __future__ import annotations

import random

from lfm2vl_jax.serving.text import CompletionText

TEXT = "Héllo wörld — 日本語 🙂 don't stop, it's 3.14! What? yes. "


def stream(text: CompletionText, tokens: list[int], rng: random.Random) -> str:
    """Feeds `tokens` in updates of 1..9 new tokens (the engine's chunks), then the final one."""
    out, k = "", 0
    while k < len(tokens):
        k = min(len(tokens), k + rng.randint(1, 9))
        out += text.update(tokens[:k])
    return out + text.update(tokens, final=True)


def test_incremental_deltas_equal_the_whole_decoding(processor):
    def decode(tokens):
        return processor.decode(tokens, skip_special_tokens=True)

    words = processor.tokenizer.encode(TEXT * 3).ids
    assert any(decode([t]).endswith("\ufffd") for t in words)  # some characters span tokens
    for seed in range(200):
        rng = random.Random(seed)
        # Real text, and random ids (byte tokens: bytes of characters in any order).
        tokens = (
            words if seed == 0 else [rng.choice(words + list(range(1000))) for _ in range(rng.randint(1, 90))]
        )
        text = CompletionText(decode, [])
        assert stream(text, tokens, rng) == text.text == decode(tokens), seed


def test_stop_string_across_updates(processor):
    def decode(tokens):
        return processor.decode(tokens, skip_special_tokens=True)

    tokens = processor.tokenizer.encode(TEXT).ids
    for seed, stop in enumerate(["wörld", "日本", "it's 3", "? yes"]):
        text = CompletionText(decode, [stop])
        out = stream(text, tokens, random.Random(seed))
        assert text.stopped and out == text.text == TEXT[: TEXT.index(stop)]
        assert stop in decode(tokens[: text.tokens_used]) and stop not in decode(
            tokens[: text.tokens_used - 1]
        )


def test_a_long_stream_decodes_each_token_a_few_times(processor):
    decoded = 0

    def decode(tokens):
        nonlocal decoded
        decoded += len(tokens)
        return processor.decode(tokens, skip_special_tokens=True)

    tokens = processor.tokenizer.encode(TEXT * 60).ids
    assert len(tokens) > 2000
    text = CompletionText(decode, [])
    assert stream(text, tokens, random.Random(0)) == processor.decode(tokens, skip_special_tokens=True)
    # Each update decodes its new tokens and the previous update's, twice (with and without the new ones);
    # the final one decodes all of them: about 5 times the length. Decoding the whole list at each of the
    # ~560 updates would be ~280 times.
    assert decoded < 6 * len(tokens)
