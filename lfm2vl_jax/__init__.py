"""LFM2-VL vision-language models in pure JAX."""

from .api import CausalLMOutput, Lfm2VlForConditionalGeneration
from .config import Lfm2VlConfig, TextConfig, VisionConfig, load_config
from .image_processing import Lfm2VlImageProcessor, ProcessorError
from .processing import Lfm2VlProcessor
from .sampling import SamplingParams
from .sharding import make_mesh

__all__ = [
    "CausalLMOutput",
    "Lfm2VlConfig",
    "Lfm2VlForConditionalGeneration",
    "Lfm2VlImageProcessor",
    "Lfm2VlProcessor",
    "ProcessorError",
    "SamplingParams",
    "TextConfig",
    "VisionConfig",
    "load_config",
    "make_mesh",
]
