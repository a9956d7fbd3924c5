"""Where a whole forward pass spends its time, per method: wall time against GPU kernel time, the top CPU-side
ops, and the top Python functions (cProfile).

At short prompts a small model's forward pass is launch-bound: the kernels of one layer finish before the CPU has
issued the next layer's. Then what costs time is the CPU side of each attention call, which the attention-call
timings of prefill_speed.py hide (there the GPU work of 32 heads covers it). This script finds that CPU cost.

Usage (GPU): ``python benchmarks/profile_forward.py --length 16384 --methods "none;biformer:dense_below=0"``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import sparsa  # noqa: E402
from sparsa.bench.runner import load_model, parse_method, resolve_model  # noqa: E402
from sparsa.tasks import get as get_task  # noqa: E402


def configure(model, name: str):
    if name == "none":
        sparsa.configure(model)
        return
    spec = parse_method(name)
    sparsa.configure(model, prefill=spec.name, **spec.params)


@torch.no_grad()
def profile(model, ids, name: str, passes: int, out):
    configure(model, name)
    forward = lambda: model(ids, use_cache=True, logits_to_keep=1)  # noqa: E731
    for _ in range(3):
        forward()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(passes):
        forward()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / passes * 1e3
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(passes):
            forward()
        torch.cuda.synchronize()
    events = prof.key_averages()
    # kernel rows only: an op's row and its kernels' rows both carry the same device time
    gpu = sum(e.self_device_time_total for e in events
              if e.device_type == torch.autograd.DeviceType.CUDA) / passes / 1e3
    print(f"\n## {name}: {wall:.2f} ms wall per forward pass, {gpu:.2f} ms of GPU kernels", file=out)
    print(events.table(sort_by="self_cpu_time_total", row_limit=22, max_name_column_width=60), file=out)
    print(events.table(sort_by="self_device_time_total", row_limit=10, max_name_column_width=60), file=out)
    stats = cProfile.Profile()
    stats.enable()
    for _ in range(passes):
        forward()
    torch.cuda.synchronize()
    stats.disable()
    text = io.StringIO()
    pstats.Stats(stats, stream=text).sort_stats("tottime").print_stats(30)
    pstats.Stats(stats, stream=text).sort_stats("cumulative").print_stats(70)
    print(text.getvalue(), file=out)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="ref-small")
    ap.add_argument("--length", type=int, default=16384)
    ap.add_argument("--methods", default="none;biformer:dense_below=0")
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    model, tokenizer = load_model(resolve_model(args.model), "cuda")
    sample = get_task("niah_single").generate(1, args.length, 11, tokenizer)[0]
    ids = torch.tensor([tokenizer.encode(sample["prompt"], add_special_tokens=False)], device=model.device)
    out = open(args.out, "w") if args.out else sys.stdout
    print(f"# {args.model}, {ids.shape[1]} tokens, B = 1", file=out)
    for name in args.methods.split(";"):
        profile(model, ids, name, args.passes, out)
    if args.out:
        out.close()


if __name__ == "__main__":
    main()
