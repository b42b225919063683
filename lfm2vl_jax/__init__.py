"""LFM2-VL vision-language models in pure JAX."""

from .api import CausalLMOutput, Lfm2VlForConditionalGeneration
from .config import Lfm2VlConfig, TextConfig, VisionConfig, load_config

__all__ = [
    "CausalLMOutput",
    "Lfm2VlConfig",
    "Lfm2VlForConditionalGeneration",
    "TextConfig",
    "VisionConfig",
    "load_config",
]
