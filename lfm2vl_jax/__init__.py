"""LFM2-VL vision-language models in pure JAX.

Layout: `nn/` (the model's math), `kernels/` (attention implementations), `parallel/` (sharding rules,
meshes), `inference/` (cache, sampling, engine), `checkpoint/` (transformers and orbax checkpoints),
`processing/` (image and chat processors), `training/` (fine-tuning); `api.py` and `cli.py` on top.
"""

from .api import CausalLMOutput, Lfm2VlForConditionalGeneration
from .compile_cache import enable_compile_cache
from .config import DTypePolicy, Lfm2VlConfig, RuntimeConfig, TextConfig, VisionConfig, load_config
from .inference.sampling import SamplingParams
from .parallel.mesh import make_mesh
from .parallel.rules import DEFAULT_RULES, ShardingRules
from .processing.image_processor import Lfm2VlImageProcessor, ProcessorError
from .processing.processor import Lfm2VlProcessor
from .processing.tool_calls import ToolCallError, parse_tool_calls
from .xla_flags import prefer_memory_scheduler

prefer_memory_scheduler()  # before JAX starts its backends: see xla_flags.py

__all__ = [
    "DEFAULT_RULES",
    "CausalLMOutput",
    "DTypePolicy",
    "Lfm2VlConfig",
    "Lfm2VlForConditionalGeneration",
    "Lfm2VlImageProcessor",
    "Lfm2VlProcessor",
    "ProcessorError",
    "RuntimeConfig",
    "SamplingParams",
    "ShardingRules",
    "TextConfig",
    "ToolCallError",
    "VisionConfig",
    "enable_compile_cache",
    "load_config",
    "make_mesh",
    "parse_tool_calls",
]
