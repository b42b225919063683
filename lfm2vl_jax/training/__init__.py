"""Supervised fine-tuning (the next stage fills this package: data, train step, optimizer, checkpoints)."""
