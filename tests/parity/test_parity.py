"""End-to-end parity: random-weight transformers models saved with `save_pretrained`, loaded with our
`from_pretrained`, fed identical inputs; float32 logits compared.

Tolerance: relative error = max|ours - reference| / max|reference| <= 1e-5. Both sides compute in float32;
the differences come from summation order and transcendental-function rounding only, observed at ~1e-6
for these models. A real bug (a wrong index, a missing bias, a mask leak) moves the logits by O(1).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image
from reference_models import (
    TEST_DATA,
    A,
    C,
    build_reference,
    prompt_with_images,
    random_images,
    reference_logits,
    save_reference,
    tiny_config,
)
from safetensors.numpy import load_file, save_file

from lfm2vl_jax import Lfm2VlForConditionalGeneration

RTOL = 1e-5


def relative_error(ours, reference) -> float:
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


def assert_logits_match(model, reference, inputs, rtol=RTOL):
    expected = reference_logits(reference, inputs)
    ours = np.asarray(model(**inputs).logits)
    assert ours.shape == expected.shape
    error = relative_error(ours, expected)
    assert error <= rtol, f"relative error {error:.2e} > {rtol:.0e}"


class Pair:
    """A reference model and ours, loaded from the reference's saved checkpoint."""

    def __init__(self, directory: Path, seed: int = 0, **config_overrides):
        self.config = tiny_config(**config_overrides)
        self.reference = build_reference(self.config, seed=seed)
        save_reference(self.reference, directory)
        self.directory = directory
        self.model = Lfm2VlForConditionalGeneration.from_pretrained(directory, progress=False)


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> Pair:
    return Pair(tmp_path_factory.mktemp("tiny"))


def text_inputs(ids: np.ndarray) -> dict:
    return {"input_ids": ids[None], "attention_mask": np.ones_like(ids)[None]}


def image_inputs(config, segments, max_patches=64, seed=0) -> dict:
    shapes = [s for s in segments if isinstance(s, tuple)]
    ids = prompt_with_images(config, segments, seed=seed)
    return {**text_inputs(ids), **random_images(config, shapes, max_patches, seed=seed)}


def test_text_only(pair):
    assert_logits_match(pair.model, pair.reference, text_inputs(prompt_with_images(pair.config, [17])))


def test_one_small_image(pair):
    assert_logits_match(pair.model, pair.reference, image_inputs(pair.config, [3, (4, 6), 5]))


def test_both_layer_layouts_match(pair):
    """Scanned (stacked motifs, the accelerators' default) and per-layer (the CPU's default) layouts."""
    for scan_layers in (True, False):
        model = Lfm2VlForConditionalGeneration.from_pretrained(
            pair.directory, scan_layers=scan_layers, progress=False
        )
        assert isinstance(model.params["text"]["blocks"][0][0], dict) == scan_layers
        assert_logits_match(model, pair.reference, image_inputs(pair.config, [3, (4, 6), 5]))


def test_two_images_in_one_prompt(pair):
    inputs = image_inputs(pair.config, [2, (6, 4), 3, (8, 8), 4])  # an upscale and the grid's own size
    assert_logits_match(pair.model, pair.reference, inputs)


def test_tiled_image_with_thumbnail(pair):
    """A real photo through transformers' image processor (tiles + thumbnail), scaled to the tiny tower."""
    from transformers import Lfm2VlImageProcessor

    processor = Lfm2VlImageProcessor(
        encoder_patch_size=4, tile_size=32, max_image_tokens=16, min_image_tokens=4, use_thumbnail=True
    )
    image = Image.open(TEST_DATA / "images" / "grace_hopper.jpg")
    pixels = processor(images=[[image]], return_tensors="np")
    shapes = [tuple(s) for s in pixels["spatial_shapes"].tolist()]
    assert len(shapes) > 2, "expected several tiles and a thumbnail"
    ids = prompt_with_images(pair.config, [4, *shapes, 6])
    inputs = {
        **text_inputs(ids),
        **{k: pixels[k] for k in ("pixel_values", "pixel_attention_mask", "spatial_shapes")},
    }
    assert_logits_match(pair.model, pair.reference, inputs)


def test_batch_of_two_with_different_images_and_right_padding(pair):
    cfg = pair.config
    row0 = prompt_with_images(cfg, [3, (4, 6), 9], seed=1)
    row1 = prompt_with_images(cfg, [2, (2, 8), 1, (6, 6), 2], seed=2)
    length = max(len(row0), len(row1)) + 3
    ids = np.zeros((2, length), np.int64)
    mask = np.zeros((2, length), np.int64)
    for i, row in enumerate((row0, row1)):
        ids[i, : len(row)], mask[i, : len(row)] = row, 1
    inputs = {
        "input_ids": ids,
        "attention_mask": mask,
        **random_images(cfg, [(4, 6), (2, 8), (6, 6)], 64, seed=3),
    }
    # Padding positions' logits are meaningless but deterministic; compare real positions only.
    expected = reference_logits(pair.reference, inputs)
    ours = np.asarray(pair.model(**inputs).logits)
    valid = mask.astype(bool)
    assert relative_error(ours[valid], expected[valid]) <= RTOL


@pytest.mark.parametrize(
    "layer_types",
    [(A, A, A), (C, C, C, C, A), (A, C, C, A, A, C, A, C)],
    ids=["all-attention", "conv-heavy", "irregular"],
)
def test_layer_patterns(tmp_path, layer_types):
    p = Pair(tmp_path, seed=1, layer_types=layer_types)
    assert_logits_match(p.model, p.reference, image_inputs(p.config, [2, (4, 4), 7], seed=4))


def test_no_projector_layernorm_untied_head_and_conv_bias(tmp_path):
    p = Pair(
        tmp_path, seed=2, projector_use_layernorm=False, tie_word_embeddings=False, text={"conv_bias": True}
    )
    assert "ln" not in p.model.params["projector"]
    assert "lm_head" in p.model.params["text"]
    assert_logits_match(p.model, p.reference, image_inputs(p.config, [5, (6, 2), 3]))


def to_custom_code_layout(directory: Path, extra_vision_layers: int = 0) -> None:
    """Rewrites a 5.x save into the released custom-code layout: old config keys, hub tensor names."""
    raw = json.loads((directory / "config.json").read_text())
    text = raw["text_config"]
    layer_types = text.pop("layer_types")
    text["full_attn_idxs"] = [i for i, kind in enumerate(layer_types) if kind == A]
    text["block_ff_dim"] = text.pop("intermediate_size")
    text["rope_theta"] = text.pop("rope_parameters")["rope_theta"]
    text.pop("tie_word_embeddings")
    old = {
        "model_type": "lfm2-vl",
        "image_token_index": raw["image_token_id"],
        "tie_embedding": raw["tie_word_embeddings"],
        "vision_feature_layer": -1 if not extra_vision_layers else -1 - extra_vision_layers,
        "downsample_factor": raw["downsample_factor"],
        "projector_hidden_size": raw["projector_hidden_size"],
        "projector_bias": raw["projector_bias"],
        "projector_hidden_act": raw["projector_hidden_act"],
        "text_config": text,
        "vision_config": {
            **raw["vision_config"],
            "num_hidden_layers": raw["vision_config"]["num_hidden_layers"] + extra_vision_layers,
        },
    }
    (directory / "config.json").write_text(json.dumps(old))
    tensors = load_file(directory / "model.safetensors")
    prefix = "model.vision_tower."
    renamed = {
        k.replace(prefix, prefix + "vision_model.") if k.startswith(prefix) else k: v
        for k, v in tensors.items()
    }
    save_file(renamed, directory / "model.safetensors")


def test_custom_code_config_and_hub_key_layout(tmp_path):
    """The released layout: `lfm2-vl`, block_ff_dim, full_attn_idxs, tie_embedding, rope_theta, no
    projector_use_layernorm, `vision_model.` keys; and a config that counts one more vision layer than the
    checkpoint holds with `vision_feature_layer: -2` (the 1.6B situation)."""
    p = Pair(tmp_path, seed=3)
    to_custom_code_layout(tmp_path, extra_vision_layers=1)
    model = Lfm2VlForConditionalGeneration.from_pretrained(tmp_path, progress=False)
    assert model.config.vision.num_layers == p.config.vision_config.num_hidden_layers
    assert model.config.text == p.model.config.text
    assert_logits_match(model, p.reference, image_inputs(p.config, [1, (4, 6), 5]))


def test_bf16_top1_agreement_with_fp32_reference(pair, record_property):
    model = Lfm2VlForConditionalGeneration.from_pretrained(pair.directory, dtype=jnp.bfloat16, progress=False)
    inputs = image_inputs(pair.config, [3, (4, 6), 40, (8, 8), 30], seed=5)
    expected = reference_logits(pair.reference, inputs)[0]
    ours = np.asarray(model(**inputs).logits)[0]
    agreement = float((ours.argmax(-1) == expected.argmax(-1)).mean())
    record_property("bf16_top1_agreement", agreement)
    print(f"bf16 top-1 agreement with the fp32 reference: {agreement:.3f} over {len(ours)} positions")
    # bf16 keeps ~3 significant digits; near-ties between the top two logits may flip, nothing more.
    assert agreement >= 0.9


@pytest.mark.parametrize("name", ["lfm2-vl-450m", "lfm2.5-vl-450m"])
def test_real_450m_shapes_from_pretrained_image_prompt(tmp_path, name):
    """The released 450M configs, LFM2-VL's and LFM2.5-VL's (random weights of the real shapes) saved by
    transformers, loaded through `from_pretrained`, on a prompt with a 24x32-patch image."""
    from transformers import Lfm2VlConfig as HfConfig
    from transformers import Lfm2VlForConditionalGeneration as HfModel

    raw = json.loads((TEST_DATA / "reference" / name / "config.json").read_text())
    config = HfConfig(**{k: v for k, v in raw.items() if k != "model_type"})
    torch.manual_seed(0)
    reference = HfModel(config).float().eval()  # the file says bfloat16
    from reference_models import randomize_weights

    randomize_weights(reference, seed=0)
    reference.save_pretrained(tmp_path)
    model = Lfm2VlForConditionalGeneration.from_pretrained(tmp_path, progress=False)
    inputs = image_inputs(config, [5, (24, 32), 9], max_patches=1024, seed=6)
    assert_logits_match(model, reference, inputs)
