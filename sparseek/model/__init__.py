"""Model definitions: DeepSeek-V4 (``v4.py``) and the V3/V2 MLA family (``v3.py``)."""

from __future__ import annotations

import torch

from sparseek.config import ModelArgs
from sparseek.model.cache import Cache


def build_model(args: ModelArgs, dtype: torch.dtype | None = None):
    """An uninitialized model of the right family (parameters hold whatever torch allocated)."""
    if args.is_v4:
        from sparseek.model.v4 import DeepSeekV4

        return DeepSeekV4(args, dtype=dtype)
    from sparseek.model.v3 import DeepSeekV3

    return DeepSeekV3(args, dtype=dtype)


__all__ = ["Cache", "build_model"]
