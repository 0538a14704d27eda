"""Quantization: DeepSeek's FP8 / FP4 weight formats kept in memory (module swaps) and written as
checkpoints (``sparseek quantize``), with a quality report against the unquantized model."""

from sparseek.quant.modules import QuantExperts, QuantLinear, quantize_model_, quantized_bytes

__all__ = ["QuantLinear", "QuantExperts", "quantize_model_", "quantized_bytes"]
