"""Inference engine: continuous batching, sampling, streaming (knows the model, not the trainer)."""

from sparseek.engine.llm import LLM, RequestOutput, StreamDelta
from sparseek.engine.sampling import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "StreamDelta"]
