"""Isolate the CUDA fault seen when ref-small prefills 64K tokens under some methods (prefill_speed.py's TTFT).

One method per process (a CUDA fault ends the process), with the padded fast path of the flex backend on or off,
under CUDA_LAUNCH_BLOCKING=1 so the traceback names the faulting call.
Usage (GPU): ``CUDA_LAUNCH_BLOCKING=1 python benchmarks/ttft_probe.py METHOD FAST(0|1) [LENGTH]``
"""

import os
import sys
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import sparsa  # noqa: E402
import sparsa.ops.flex as flex  # noqa: E402
from sparsa.bench.runner import load_model, resolve_model  # noqa: E402
from sparsa.tasks import get as get_task  # noqa: E402

method, fast = sys.argv[1], sys.argv[2] == "1"
length = int(sys.argv[3]) if len(sys.argv) > 3 else 65536
if not fast:
    flex.fast_path = lambda *a, **k: False
model, tok = load_model(resolve_model("ref-small"), "cuda")
sample = get_task("niah_single").generate(1, length, 11, tok)[0]
ids = torch.tensor([tok.encode(sample["prompt"], add_special_tokens=False)], device="cuda")
sparsa.configure(model, prefill=method, dense_below=0)
try:
    with torch.no_grad():
        model(ids, use_cache=True, logits_to_keep=1)
    torch.cuda.synchronize()
    print(f"{method} fast={int(fast)}: ok density={sparsa.stats(model, prefill=True)['density']:.3f}")
except Exception as e:
    frames = [f"{f.filename.split('/')[-1]}:{f.lineno}:{f.name}" for f in traceback.extract_tb(e.__traceback__)][-6:]
    print(f"{method} fast={int(fast)}: {type(e).__name__}: {str(e)[:120]} | {' <- '.join(reversed(frames))}")
