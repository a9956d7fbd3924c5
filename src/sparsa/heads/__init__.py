"""Head analysis and calibration: capture a model's own queries, keys and values; per-head statistics."""

from .capture import capture_qkv

__all__ = ["capture_qkv"]
