"""Kernels: one entry, several backends (``flex``: compiled FlexAttention; ``reference``: plain PyTorch)."""

from .attention import BACKENDS, block_sparse_attention, merge_attention
from .naive import block_sparse_attention_naive

__all__ = ["BACKENDS", "block_sparse_attention", "block_sparse_attention_naive", "merge_attention"]
