"""Supervised fine-tuning: `SFTConfig` (the run's options) and `SFTTrainer` (the loop), over `data` (JSONL
conversations -> batches), `loss` (chunked cross-entropy), `optimizer` (AdamW per component), `lora`,
`step` (the jitted train step and its state), `checkpointing` (orbax) and `metrics`."""

from .config import SFTConfig, TrainingError
from .trainer import SFTTrainer

__all__ = ["SFTConfig", "SFTTrainer", "TrainingError"]
