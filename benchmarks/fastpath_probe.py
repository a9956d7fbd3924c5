"""Find what makes the padded, bounds-check-free FlexAttention path fault (seen 2026-11-29 with a key padding
mask, fp32, B=2, 700/1000 tokens). Each case runs in its own process, so a CUDA fault cannot end the probe.

Cases: key padding mask or not, per-sequence pattern (BlockMask batch 2) or shared, TMA on or off, fp32 or bf16.
Usage (GPU): ``python benchmarks/fastpath_probe.py``; prints one line per case: ok with the error against the
reference backend, or the failure.
"""

import itertools
import subprocess
import sys

CASE = r'''
import sys, torch
sys.path.insert(0, "src")
from sparsa import BlockPattern
from sparsa.ops import block_sparse_attention
import sparsa.ops.flex as F
pad_on, per_seq, tma, dtype = sys.argv[1] == "1", sys.argv[2] == "1", sys.argv[3] == "1", getattr(torch, sys.argv[4])
F.fast_path = lambda pattern, key_padding_mask, device: True  # force the fast path
orig = F.kernel_options
F.kernel_options = lambda p, dev, fast=False: {k: v for k, v in (orig(p, dev, True) or {}).items()
                                               if tma or k != "USE_TMA"}
torch.manual_seed(0)
b, lq, lk = 2, 700, 1000
q = torch.randn(b, 8, lq, 64, device="cuda", dtype=dtype)
k = torch.randn(b, 2, lk, 64, device="cuda", dtype=dtype)
v = torch.randn(b, 2, lk, 64, device="cuda", dtype=dtype)
pad = None
if pad_on:
    pad = torch.ones(b, lk, dtype=torch.bool, device="cuda"); pad[1, :200] = False
p = BlockPattern.dense(lq, lk, device="cuda")
if per_seq:
    p = p.expand(b, 1)
    p = BlockPattern(p.kv_num_blocks.contiguous(), p.kv_indices.contiguous(), p.block_q, p.block_k, lq, lk)
o = block_sparse_attention(q, k, v, p, key_padding_mask=pad, backend="flex")
r = block_sparse_attention(q, k, v, p, key_padding_mask=pad, backend="reference")
torch.cuda.synchronize()
print("ok", float((o.float() - r.float()).norm() / r.float().norm()))
'''

# fp32 (where the fault was seen) for every combination, then the faulting combination in bf16.
CASES = [(*c, "float32") for c in itertools.product("01", "01", "10")] + [("1", "0", "1", "bfloat16")]
for pad_on, per_seq, tma, dtype in CASES:
    try:
        r = subprocess.run([sys.executable, "-c", CASE, pad_on, per_seq, tma, dtype], capture_output=True,
                           text=True, timeout=120)
        lines = (r.stdout + r.stderr).strip().splitlines()
        result = next((line for line in reversed(lines) if line.startswith("ok") or "Error" in line),
                      lines[-1] if lines else f"rc={r.returncode}")
    except subprocess.TimeoutExpired:
        result = "timeout"
    print(f"pad={pad_on} per_sequence_mask={per_seq} tma={tma} {dtype}: {result[:160]}", flush=True)
