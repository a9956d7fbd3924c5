"""A Triton helper shared by the selection kernels (imported only when Triton is used)."""

import triton
import triton.language as tl


@triton.jit
def store_row(keep, j, idx_ptr, num_ptr, row, KB, KB_P2: tl.constexpr):
    """Write one row of a BlockPattern: the kept key blocks ``j`` in increasing order (a stable compaction: an
    entry's slot is the number of kept entries before it), zeros after them up to ``KB``, and their count."""
    count = tl.sum(keep.to(tl.int32), 0)
    slot = tl.cumsum(keep.to(tl.int32), 0) - 1
    base = row * KB
    tl.store(idx_ptr + base + j, tl.zeros([KB_P2], tl.int32), mask=(j < KB) & (j >= count))
    tl.store(idx_ptr + base + slot, j.to(tl.int32), mask=keep)
    tl.store(num_ptr + row, count)
