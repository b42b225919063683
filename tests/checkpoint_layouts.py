"""The released checkpoint file layouts (tests/data/reference, see its README) and the two 3B ones no file
of which is available, built from what public sources state: their config.json values, their processor
files, and small-width versions of the same family member (vocabulary, special-token ids, layer pattern
and projector kept; widths small) for fast logits parity.

`LAYOUTS` maps a name to (config.json dict, reference directory of its processor files, 3B-like ids).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from processor_fixtures import REFERENCE_DIR, VOCAB_3B, ids_3b_like, make_checkpoint_dir
from training_fixtures import PROCESSOR_SETTINGS

ATTENTION_3B = (2, 5, 9, 13, 17, 21, 24, 27)  # LFM2.5-VL-3B's attention layers (of 30)


def _read(name: str) -> dict[str, Any]:
    return json.loads((REFERENCE_DIR / name / "config.json").read_text())


def _three_b(vocab_size: int, projector_layernorm: bool, ids: Any) -> dict[str, Any]:
    """A 3B config.json as the public sources state it (30 text layers, 8 of them attention, hidden 2048,
    32/8 heads, a 1152 x 27 vision tower, projector 2048); the MLP width, unstated, is the 1.6B's."""
    raw = copy.deepcopy(_read("lfm2.5-vl-1.6b"))
    raw.pop("transformers.js_config", None)
    text = raw["text_config"]
    text.update(
        vocab_size=vocab_size,
        num_hidden_layers=30,
        layer_types=["full_attention" if i in ATTENTION_3B else "conv" for i in range(30)],
        eos_token_id=ids(7),
        bos_token_id=ids(1),
        pad_token_id=ids(0),
    )
    raw.update(image_token_id=ids(396), projector_use_layernorm=projector_layernorm)
    return raw


LAYOUTS: dict[str, tuple[dict[str, Any], str, bool]] = {
    "LFM2-VL-450M": (_read("lfm2-vl-450m"), "lfm2-vl-450m", False),
    "LFM2-VL-1.6B": (_read("lfm2-vl-1.6b"), "lfm2-vl-1.6b", False),
    "LFM2.5-VL-450M": (_read("lfm2.5-vl-450m"), "lfm2.5-vl-450m", False),
    "LFM2.5-VL-1.6B": (_read("lfm2.5-vl-1.6b"), "lfm2.5-vl-450m", False),  # the family's processor files
    "LFM2.5-VL-3B-like": (_three_b(VOCAB_3B, False, ids_3b_like), "lfm2.5-vl-450m", True),
    "LFM2-VL-3B-like": (_three_b(65536, True, lambda i: i), "lfm2-vl-450m", False),
}

# Small widths with the layout's depths, vocabulary, ids and projector kept; tiny images (4x4-pixel
# patches, 16x16 tiles) so that the vision tower's 4x4 position grid covers them.
SMALL_TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    block_ff_dim=128,
    block_auto_adjust_ff_dim=False,
    num_attention_heads=4,
    num_heads=4,
    num_key_value_heads=2,
)
SMALL_VISION = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, patch_size=4, num_patches=16)
# the fine-tuning fixtures' tiny-image settings, with the layout's own thumbnail setting
SMALL_IMAGES = {key: value for key, value in PROCESSOR_SETTINGS.items() if key != "use_thumbnail"}


def small_widths(raw: dict[str, Any]) -> dict[str, Any]:
    raw = copy.deepcopy(raw)
    raw["text_config"].update(SMALL_TEXT)
    raw["vision_config"].update(SMALL_VISION)
    raw["projector_hidden_size"] = 48
    return raw


def hf_config(raw: dict[str, Any]) -> Any:
    from transformers import Lfm2VlConfig as HfConfig

    return HfConfig(**{key: value for key, value in raw.items() if key != "model_type"})


def make_small_checkpoint(directory: Path, name: str, seed: int = 0) -> tuple[Path, Any]:
    """The layout `name` at small widths: transformers' random model (realistic weight scales) saved by
    transformers, with the layout's config.json (small widths), processor files (tiny-image settings) and
    stand-in tokenizer."""
    import torch
    from reference_models import randomize_weights
    from transformers import Lfm2VlForConditionalGeneration as HfModel

    raw, processor_files, three_b_like = LAYOUTS[name]
    make_checkpoint_dir(directory, processor_files, three_b_like=three_b_like)
    for file in ("processor_config.json", "preprocessor_config.json"):
        path = directory / file
        if path.is_file():
            settings = json.loads(path.read_text())
            settings.update(SMALL_IMAGES)
            if isinstance(settings.get("image_processor"), dict):
                settings["image_processor"].update(SMALL_IMAGES)
            path.write_text(json.dumps(settings, indent=2))
    torch.manual_seed(seed)
    reference = randomize_weights(HfModel(hf_config(small_widths(raw))), seed=seed).float().eval()
    reference.save_pretrained(directory)
    # the layout's own config.json (its keys, not transformers' re-save), at the small widths
    (directory / "config.json").write_text(json.dumps(small_widths(raw), indent=2))
    return directory, reference
