"""The layer planner (`config.plan_segments`) is linear in depth and plans what the previous, cubic dynamic
programme planned: the same segments for every pattern it can compare on, the released configs included."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lfm2vl_jax.config import ATTENTION as A
from lfm2vl_jax.config import CONV as C
from lfm2vl_jax.config import MAX_MOTIF, Segment, config_from_dict, plan_segments

REFERENCE = Path(__file__).resolve().parents[1] / "data" / "reference"  # the released configs


def exhaustive_plan(layer_types: tuple[str, ...]) -> tuple[Segment, ...]:
    """The planner before issue 25, as the oracle: every (motif, repeats) from every layer, the first
    minimal (cost, segments) in order of motif length then repeats. Cubic: small patterns only."""
    n = len(layer_types)
    best: list[tuple[int, int, tuple[Segment, ...]]] = [(0, 0, ())] * (n + 1)
    for start in range(n - 1, -1, -1):
        candidates = []
        for motif_len in range(1, n - start + 1):
            motif = tuple(layer_types[start : start + motif_len])
            repeats = 1
            while layer_types[start + repeats * motif_len : start + (repeats + 1) * motif_len] == motif:
                repeats += 1
            for r in range(1, repeats + 1):
                rest_cost, rest_segments, rest_plan = best[start + r * motif_len]
                segment = Segment(motif=motif, repeats=r, first_layer=start)
                candidates.append((motif_len + rest_cost, 1 + rest_segments, (segment, *rest_plan)))
        best[start] = min(candidates, key=lambda c: (c[0], c[1]))
    return best[0][2]


def reference_layer_types() -> list[tuple[str, ...]]:
    patterns = []
    for path in sorted(REFERENCE.glob("*/config.json")):
        raw = json.loads(path.read_text(encoding="utf-8"))
        patterns.append(config_from_dict(raw, path).text.layer_types)
    return patterns


def test_released_patterns_are_planned_as_before():
    patterns = reference_layer_types()
    lfm2_3b = [2, 5, 9, 13, 17, 21, 24, 27]  # LFM2-VL-3B / LFM2.5-VL-3B (README of shared/reference)
    patterns.append(tuple(A if i in lfm2_3b else C for i in range(30)))
    assert len(patterns) >= 3
    for pattern in patterns:
        assert plan_segments(pattern) == exhaustive_plan(pattern)
    lfm2 = patterns[0]
    assert [(s.motif, s.repeats) for s in plan_segments(lfm2)] == [((C,), 1), ((C, A, C), 3), ((A, C), 3)]


def test_random_and_periodic_patterns_are_planned_as_before():
    rng = random.Random(25)
    patterns = [tuple(rng.choice([C, A]) for _ in range(rng.randint(1, 36))) for _ in range(300)]
    patterns += [tuple(rng.choice("abc") for _ in range(rng.randint(1, 24))) for _ in range(100)]
    for _ in range(100):  # motifs repeated with noise: where ties and long motifs matter
        motif = tuple(rng.choice([C, A]) for _ in range(rng.randint(1, 7)))
        pattern = list(motif * rng.randint(1, 6))
        for _ in range(rng.randint(0, 2)):
            pattern.insert(rng.randint(0, len(pattern)), rng.choice([C, A]))
        patterns.append(tuple(pattern))
    for pattern in patterns:
        assert plan_segments(pattern) == exhaustive_plan(pattern), pattern


@pytest.mark.parametrize(
    "pattern",
    [(A,) * 10_000, (C, C, A) * 3_333 + (C,), tuple(random.Random(0).choice([C, A]) for _ in range(10_000))],
    ids=["all-attention", "periodic", "random"],
)
def test_planning_ten_thousand_layers_takes_under_a_second(pattern):
    """1,000 layers took 11.6 s before (cubic); this is a complexity check with a generous bound, not a
    benchmark (CPU time of this process: other processes on a busy machine do not count)."""
    begin = time.process_time()
    segments = plan_segments(pattern)
    elapsed = time.process_time() - begin
    assert elapsed < 1.0, f"{elapsed:.2f} s"
    assert tuple(kind for s in segments for _ in range(s.repeats) for kind in s.motif) == pattern
    if len(set(pattern[:-1])) == 1 or pattern[:3] == (C, C, A):  # regular: one motif, whatever the depth
        assert sum(len(s.motif) for s in segments) <= 4


def test_a_config_of_100000_layers_without_layer_types_loads_at_once():
    """num_hidden_layers alone means every layer is attention (transformers' default): no hang."""
    raw = {
        "model_type": "lfm2_vl",
        "text_config": {"num_hidden_layers": 100_000},
        "vision_config": {},
    }
    begin = time.perf_counter()
    text = config_from_dict(raw).text
    assert text.segments == (Segment(motif=(A,), repeats=100_000, first_layer=0),)
    raw["text_config"]["full_attn_idxs"] = list(range(0, 100_000, 3))
    text = config_from_dict(raw).text
    assert [(s.motif, s.repeats) for s in text.segments] == [((A,), 1), ((C, C, A), 33_333)]
    assert time.perf_counter() - begin < 10


def test_motifs_longer_than_the_limit_are_planned_without_repeats():
    motif = tuple(C if i % 5 else A for i in range(MAX_MOTIF + 1))
    motif = (A, *motif[1:-1], C, C)  # primitive, longer than MAX_MOTIF
    segments = plan_segments(motif * 3)
    assert tuple(kind for s in segments for _ in range(s.repeats) for kind in s.motif) == motif * 3
    assert all(len(s.motif) <= MAX_MOTIF or s.repeats == 1 for s in segments)


@settings(deadline=None, derandomize=True, max_examples=300)
@given(pattern=st.lists(st.sampled_from([C, A, "other"]), min_size=0, max_size=30).map(tuple))
def test_any_pattern_is_planned_as_before(pattern):
    assert plan_segments(pattern) == exhaustive_plan(pattern)
