"""Checkpoints: transformers safetensors import (`hf`) and export (`export`), the numpy safetensors codec,
orbax checkpoints in a canonical per-layer layout (`orbax`, `canonical`), and hub resolution (`hub`)."""
