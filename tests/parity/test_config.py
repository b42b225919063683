"""Config parsing (both layouts seen in the wild), parameter counts, and the layer-scan plan."""

from __future__ import annotations

import json
import math
import random

import jax
import pytest
import torch
from reference_models import REFERENCE_CONFIGS, A, C
from transformers import Lfm2VlConfig as HfConfig
from transformers import Lfm2VlForConditionalGeneration as HfModel

from lfm2vl_jax.config import ConfigError, config_from_dict, load_config, mlp_width, plan_segments
from lfm2vl_jax.nn.params import init_params

# Stated in the project's issue for the released 450M config and the reconstructed 1.6B config.
EXPECTED_COUNTS = {"lfm2-vl-450m": 450_822_656, "lfm2-vl-1.6b": 1_584_804_000}


def transformers_param_count(raw: dict) -> int:
    config = HfConfig(**{k: v for k, v in raw.items() if k != "model_type"})
    with torch.device("meta"):
        return sum(p.numel() for p in HfModel(config).parameters())


@pytest.mark.parametrize("name", sorted(EXPECTED_COUNTS))
def test_reference_configs_parse_and_count_like_transformers(name):
    raw = json.loads((REFERENCE_CONFIGS / name / "config.json").read_text())
    config = load_config(REFERENCE_CONFIGS / name)
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    count = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
    assert count == transformers_param_count(raw) == EXPECTED_COUNTS[name]


def test_450m_custom_code_layout_values():
    config = load_config(REFERENCE_CONFIGS / "lfm2-vl-450m")
    t = config.text
    assert config.image_token_id == 396  # from `image_token_index`
    assert t.intermediate_size == 4608  # block_ff_dim 6656 -> 2/3 -> rounded up to a multiple of 256
    assert t.layer_types.count(A) == 6 and t.layer_types[2] == A
    assert t.rope_theta == 1e6 and t.tie_word_embeddings
    assert config.projector_use_layernorm  # absent: the custom-code projector always had one


def test_custom_code_and_5x_layouts_give_the_same_config():
    new = {
        "model_type": "lfm2_vl",
        "image_token_id": 401,
        "projector_use_layernorm": False,
        "tie_word_embeddings": False,
        "text_config": {
            "hidden_size": 128,
            "intermediate_size": 768,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "layer_types": [C, A, C, A],
            "rope_parameters": {"rope_type": "default", "rope_theta": 5000.0},
        },
        "vision_config": {"hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4},
    }
    old = {
        "model_type": "lfm2-vl",
        "image_token_index": 401,
        "tie_embedding": False,
        "vision_feature_layer": -2,
        "text_config": {
            "hidden_size": 128,
            "intermediate_size": 1,  # overridden by block_ff_dim
            "block_ff_dim": 768,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "full_attn_idxs": [1, 3],
            "rope_theta": 5000.0,
        },
        "vision_config": {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4},
    }
    a, b = config_from_dict(new), config_from_dict(old)
    assert a.text == b.text
    assert a.vision == b.vision  # 4 layers cut after vision_feature_layer -2 -> 3
    assert a.image_token_id == b.image_token_id == 401
    assert b.projector_use_layernorm  # the layout decides when the key is absent; the loader checks tensors


def test_mlp_width_rule_matches_transformers():
    from transformers import Lfm2Config
    from transformers.models.lfm2.modeling_lfm2 import Lfm2MLP

    for size, multiplier, multiple, adjust in [
        (12288, 1.0, 256, True),
        (6656, 1.0, 256, True),
        (1000, 1.5, 64, True),
        (512, 1.0, 256, False),
    ]:
        hf = Lfm2Config(
            intermediate_size=size,
            block_ffn_dim_multiplier=multiplier,
            block_multiple_of=multiple,
            block_auto_adjust_ff_dim=adjust,
            hidden_size=64,
            num_attention_heads=4,
        )
        assert mlp_width(size, adjust, multiplier, multiple) == Lfm2MLP(hf).w1.out_features


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "llama"}, "not an LFM2-VL"),
        ({"text_config": None}, "text_config"),
        ({"projector_hidden_act": "relu"}, "projector_hidden_act"),
        ({"text_config": {"num_hidden_layers": 3, "layer_types": [C, A]}}, "layer_types"),
        (
            {"text_config": {"num_hidden_layers": 2, "layer_types": [C, "sliding_attention"]}},
            "sliding_attention",
        ),
        ({"text_config": {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1.0}}}, "yarn"),
        ({"text_config": {"num_attention_heads": 6, "num_key_value_heads": 4}}, "multiple"),
    ],
)
def test_bad_configs_name_the_problem(change, message):
    raw = {"model_type": "lfm2_vl", "text_config": {}, "vision_config": {}, **change}
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw)


def test_layer_plan_of_lfm2_pattern_traces_six_layers_not_sixteen():
    pattern = tuple(load_config(REFERENCE_CONFIGS / "lfm2-vl-450m").text.layer_types)
    segments = plan_segments(pattern)
    assert sum(len(s.motif) for s in segments) == 6
    assert len(segments) == 3


def test_layer_plan_reproduces_any_pattern_in_order():
    rng = random.Random(0)
    for _ in range(200):
        pattern = tuple(rng.choice([C, A]) for _ in range(rng.randint(1, 40)))
        segments = plan_segments(pattern)
        rebuilt = tuple(kind for s in segments for _ in range(s.repeats) for kind in s.motif)
        assert rebuilt == pattern
        assert all(s.layer_index(0, 0) == s.first_layer for s in segments)
        # never worse than one trace per layer, and a regular pattern costs one motif whatever its depth
        assert sum(len(s.motif) for s in segments) <= len(pattern)
    assert plan_segments((C, C, A, C) * 8) == plan_segments((C, C, A, C) * 8)[:1]
    assert len(plan_segments((C, C, A, C) * 8)[0].motif) == 4
