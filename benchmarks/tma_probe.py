"""Which FlexAttention kernel options fault: probe dtype x head dim x options on padded lengths (one process per case)."""
import subprocess, sys
CASE = '''
import torch, sys
sys.path.insert(0, "src")
from sparsa import BlockPattern
from sparsa.ops import block_sparse_attention
import sparsa.ops.flex as F
dt = getattr(torch, sys.argv[1]); d = int(sys.argv[2]); tma = sys.argv[3] == "1"; b = int(sys.argv[4])
orig = F.kernel_options
F.kernel_options = lambda p, dev: {k: v for k, v in orig(p, dev).items() if tma or k != "USE_TMA"}
q = torch.randn(b, 8, 768, d, device="cuda", dtype=dt); k = torch.randn(b, 2, 1024, d, device="cuda", dtype=dt)
p = BlockPattern.dense(768, 1024, device="cuda")
o = block_sparse_attention(q, k, k, p, backend="flex"); r = block_sparse_attention(q, k, k, p, backend="reference")
torch.cuda.synchronize(); print("ok", float((o.float() - r.float()).norm() / r.float().norm()))
'''
for dt in ("float32", "bfloat16"):
    for d in ("64", "128"):
        for tma in ("1", "0"):
            for b in ("1", "2"):
                r = subprocess.run([sys.executable, "-c", CASE, dt, d, tma, b], capture_output=True, text=True, timeout=60)
                last = (r.stdout + r.stderr).strip().splitlines()
                print(dt, "D=" + d, "TMA=" + tma, "B=" + b, "->", last[-1][:120] if last else r.returncode, flush=True)
