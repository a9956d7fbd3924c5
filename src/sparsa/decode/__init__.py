"""Decode-time cache policies; importing this package registers them."""

from .base import DecodePolicy, DenseDecode

__all__ = ["DecodePolicy", "DenseDecode"]
