"""Checkpoint I/O: sharded safetensors in DeepSeek's / transformers' layouts, FP8/FP4 dequantization."""

from sparseek.checkpoint.io import CheckpointError, checkpoint_state, load_model, save_model

__all__ = ["CheckpointError", "load_model", "save_model", "checkpoint_state"]
