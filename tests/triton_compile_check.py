"""Compile every Triton kernel of sparsa for an H100/H200 (sm_90) without a GPU, with the arguments its launch
code really passes at the reference model's shapes.

Triton's CPU interpreter (which runs the kernels in the tests) executes the kernel body as NumPy, so a kernel
that the GPU compiler rejects -- a ``tl.dot`` of a bf16 and an fp32 operand, say -- passes every interpreted
test and fails on the first GPU call (session 7). Here each op's launch function runs on CPU tensors with its
kernel swapped for a recorder; each recorded launch is then compiled to PTX and cubin for sm_90.

Run as a script in a process *without* ``TRITON_INTERPRET`` (tests/test_triton_compile.py does): the kernels must
be real ``JITFunction``s. Prints one line per compiled launch and exits non-zero on the first failure.
"""

from __future__ import annotations

import importlib
import os
import sys

import torch

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64",
         torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}
OPTIONS = ("num_warps", "num_stages")


class Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **kwargs)`` records the call instead of launching it."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((args, kwargs))


def signature(kernel, args, kwargs):
    """Triton's ``(signature, constexprs, options)`` for one recorded launch."""
    bound = dict(zip(kernel.arg_names, args))
    bound.update({k: v for k, v in kwargs.items() if k not in OPTIONS})
    sig, constexprs = {}, {}
    for i, param in enumerate(kernel.params):
        value = bound[param.name] if param.name in bound else param.default
        if param.is_constexpr:
            sig[param.name] = "constexpr"
            constexprs[(i,)] = value
        elif isinstance(value, torch.Tensor):
            sig[param.name] = "*" + TYPES[value.dtype]
        elif isinstance(value, bool):
            sig[param.name] = "i1"
        elif isinstance(value, int) and value == 1:
            # Triton's launcher turns an int argument equal to 1 into a constant (a sink or a head count of 1,
            # say), so the kernel is compiled with it folded in: compile it that way here too.
            sig[param.name] = "constexpr"
            constexprs[(i,)] = 1
        elif isinstance(value, int):
            sig[param.name] = "i32" if -2**31 <= value < 2**31 else "i64"
        elif isinstance(value, float):
            sig[param.name] = "fp32"
        else:
            raise TypeError(f"{kernel.__name__}: cannot type argument {param.name}={value!r}")
    return sig, constexprs, {k: kwargs[k] for k in OPTIONS if k in kwargs}


def record(module: str, names: list[str], run) -> list:
    """Run ``run()`` with the named kernels of ``module`` replaced by recorders; the recorded launches."""
    mod = importlib.import_module(module)
    saved = {n: getattr(mod, n) for n in names}
    recorders = {n: Recorder(k) for n, k in saved.items()}
    for n, r in recorders.items():
        setattr(mod, n, r)
    try:
        run()
    finally:
        for n, k in saved.items():
            setattr(mod, n, k)
    return [(saved[n], call) for n, r in recorders.items() for call in r.calls]


def launches():
    """Each op's launches at ref-small's shapes (32 query / 8 KV heads, D = 128, bf16) and a few variants."""
    from sparsa.ops import quest, topk_blocks, vertical_slash, vertical_slash_blocks
    from sparsa.ops import flex, sale_estimate
    from sparsa.prefill.hip import HiP

    bf = torch.bfloat16
    q = torch.randn(1, 32, 1000, 128, dtype=bf)
    k = torch.randn(1, 8, 1000, 128, dtype=bf)
    real = torch.ones(2, 1000, dtype=torch.bool)
    out = []
    out += record("sparsa.ops._quest_kernels", ["bounds_kernel", "scores_kernel"], lambda: (
        quest._quest_scores_triton(q, k, 128, 16, None, None, False, 1),  # biformer
        quest._quest_scores_triton(q, k[:, :, :768], 128, 16, None, None, True, 2),  # longheads
        quest._quest_scores_triton(q.float()[:2].expand(2, -1, -1, -1), k.float().expand(2, -1, -1, -1), 64, 8,
                                   real, real, False, 1)))  # fp32, padding
    scores = torch.randn(1, 8, 8, 8)
    out += record("sparsa.ops._topk_kernels", ["topk_rows_kernel"], lambda: (
        topk_blocks._topk_blocks_triton(scores, 4, 1000, 1000, 128, 1, 2),
        topk_blocks._topk_blocks_triton(torch.randn(1, 8, 1, 1019), 16, 100, 130396, 128, 1, 2)))
    lines = torch.rand(1, 32, 32)  # column / band scores of 32 query heads over 4K keys in 128-token blocks
    budgets = torch.randint(8, 33, (1, 32, 1))  # FlexPrefill's per-head budgets (int64 [B, H, 1])
    out += record("sparsa.ops._vs_select_kernels", ["select_lines_kernel", "tiles_kernel"], lambda: (
        vertical_slash_blocks._vertical_slash_blocks_triton(lines, lines, 8, 32, 1, 1, 4096, 4096, 128, None),
        vertical_slash_blocks._vertical_slash_blocks_triton(lines, lines.bfloat16(), budgets, budgets, 0, 0, 4096,
                                                            4096, 128, torch.rand(1, 32, 32, 32) < 0.1),
        vertical_slash_blocks._vertical_slash_blocks_triton(torch.rand(1, 8, 1019), torch.rand(1, 8, 1019), 8, 48,
                                                            1, 1, 100, 130396, 128, None),  # chunked, wide rows
        vertical_slash_blocks._vertical_slash_blocks_triton(lines, lines, 8, 32, 1, 2, 4096, 4096, 128, None,
                                                            band_tiles=1)))  # one tile per band
    num = torch.ones(1, 8, 8, dtype=torch.int32)
    idx = torch.zeros(1, 8, 8, 8, dtype=torch.int32)
    out += record("sparsa.ops._split_kernels", ["split_rows_kernel"], lambda: flex.split_lists_triton(
        num, idx, None, None, torch.arange(32) // 4, True, 128, 128, 0, 1000, 8))
    probes = q[:, :, -64:]
    out += record("sparsa.ops._vertical_slash_kernels", ["stats_pass", "column_pass"],
                  lambda: (vertical_slash._vertical_slash_triton(probes, k, torch.arange(936, 1000), 0.088, None, 64),
                           vertical_slash._vertical_slash_triton(q[:, :, -200:], k, torch.arange(800, 1000), 0.088,
                                                                 None, 128, column_partials=True)))
    qi = torch.randint(-7, 8, (1, 32, 1000, 128), dtype=torch.int8)
    ki = torch.randint(-7, 8, (1, 8, 1000, 128), dtype=torch.int8)
    f = lambda *s: torch.rand(*s)  # noqa: E731
    out += record("sparsa.ops._sale_kernels", ["passing_tiles_kernel"], lambda: sale_estimate._passing_tiles_triton(
        qi, f(1, 32, 1000), ki, f(1, 8, 16), f(1, 32, 1000), f(1, 8, 1000), f(1, 32, 1000), 0.088, 64))
    out += record("sparsa.ops._hip_kernels", ["table_kernel", "search_kernel"], lambda: (
        hip_select(HiP(), q[:, :, :1].expand(-1, -1, 4096, -1), k[:, :, :1].expand(-1, -1, 4096, -1)),  # defaults
        hip_select(HiP(block=64, mask_k=256, sliding_window=0), q.float()[:2, :8].expand(2, -1, -1, -1),
                   k.float()[:, :2].expand(2, -1, -1, -1), real)))  # fp32, padding, no window
    from sparsa.ops import chunk_blocks

    out += record("sparsa.ops._chunk_kernels", ["chunk_rows_kernel"], lambda: (
        chunk_blocks._chunk_blocks_triton(torch.randn(1, 32, 64, 32), 8192, 8192, 128, 2, 16, 4096),  # defaults
        chunk_blocks._chunk_blocks_triton(torch.randn(2, 8, 2, 509), 200, 130396, 128, 2, 16, 0)))  # chunked
    from sparsa.ops import index_lists

    out += record("sparsa.ops._compact", ["sort_rows_kernel"], lambda: (
        index_lists._index_lists_triton(torch.zeros(1, 8, 64, 20, dtype=torch.long),
                                        torch.ones(1, 8, 64, 20, dtype=torch.bool), 8192, 128),))
    from sparsa.ops import triton_attention
    from sparsa.pattern import BlockPattern

    v = torch.randn(1, 8, 1000, 128, dtype=bf)
    dense = BlockPattern.dense(1000, 1000)
    per_q = BlockPattern.dense(1000, 1000).expand(1, 32)
    out += record("sparsa.ops._attention_kernels", ["sparse_attention_kernel"], lambda: (
        triton_attention.block_sparse_attention_triton(q, k, v, dense, causal=True, scale=0.088,
                                                       key_padding_mask=None),  # bf16, D 128, 128-blocks
        triton_attention.block_sparse_attention_triton(
            q.float()[:, :8].expand(2, -1, -1, -1), k.float()[:, :2].expand(2, -1, -1, -1),
            v.float()[:, :2, :, :64].expand(2, -1, -1, -1), BlockPattern.dense(1000, 1000, block_q=64, block_k=64),
            causal=False, scale=0.088, key_padding_mask=real),  # fp32, padding, Dv 64, 64-blocks
        triton_attention.block_sparse_attention_triton(
            q[..., :64].half(), k[..., :64].half(), v[..., :64].half(), per_q, causal=True, scale=0.125,
            key_padding_mask=None)))  # fp16, D 64, a pattern per query head
    return out


def hip_select(sel, q, k, real=None):
    """``sel.select`` with its search on the Triton path (launches recorded), the pattern from the reference."""
    from sparsa.ops import hip_search

    saved = hip_search.hip_search

    def both(*args, **kwargs):
        saved(*args, **{**kwargs, "backend": "triton"})
        return kwargs["reference"]()

    hip_search.hip_search = both
    try:
        sel.select(q, k, key_padding_mask=real)
    finally:
        hip_search.hip_search = saved


def main() -> int:
    target = GPUTarget("cuda", 90, 32)
    for kernel, (args, kwargs) in launches():
        sig, constexprs, options = signature(kernel, args, kwargs)
        src = ASTSource(fn=kernel, signature=sig, constexprs=constexprs)
        try:
            triton.compile(src, target=target, options=options)
        except Exception as error:  # report the kernel and the compiler's own message (its cause)
            cause = error.__cause__ or error
            print(f"FAILED {kernel.__name__} {options}: {type(error).__name__}: {str(error)[-1200:]}\n"
                  f"caused by {type(cause).__name__}: {str(cause)[-400:]}")
            return 1
        print(f"ok {kernel.__name__} {options}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
