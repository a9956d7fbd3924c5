"""Where a dynamic method's prefill time goes: a CUDA profile of ``attend()`` (estimation and attention) on
ref-small's activations, as ``benchmarks/prefill_speed.py`` builds them.

Prints, per method and length, the kernel count of one call, the summed GPU kernel time against the eager wall
time (their gap is launch overhead, what CUDA graphs remove), and the kernels taking the most GPU time.

Usage (GPU): ``python benchmarks/profile_select.py --lengths 8192 --methods "biformer;hip" [--top 15]``
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from prefill_speed import median_ms, method_params, model_activations  # noqa: E402

from sparsa import registry  # noqa: E402
from sparsa.bench.runner import load_model, resolve_model  # noqa: E402


def profile_call(fn, reps: int = 5):
    """(kernels per call, GPU kernel ms per call, the profiler's kernel table) over ``reps`` calls."""
    fn()
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    acts = [ProfilerActivity.CUDA] if torch.cuda.is_available() else [ProfilerActivity.CPU]  # CPU: a dry run
    with profile(activities=acts) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize() if torch.cuda.is_available() else None
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_ms = sum(e.device_time for e in kernels) / 1000 / reps
    return len(kernels) / reps, gpu_ms, prof.key_averages()


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="ref-small")
    ap.add_argument("--lengths", default="8192")
    ap.add_argument("--methods", default="biformer;hip")
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args(argv)
    model, tokenizer = load_model(resolve_model(args.model), "cuda" if torch.cuda.is_available() else "cpu")
    for length in [int(x) for x in args.lengths.split(",") if x]:
        q, k, v = model_activations(model, tokenizer, length)
        for name in [m for m in args.methods.split(";") if m]:
            base_name, params = method_params(name)
            sel = registry.create("prefill", base_name, dense_below=0, **params)
            for what, fn in (("attend", lambda: sel.attend(q, k, v, layer_idx=0)),
                             ("pattern", lambda: sel.pattern(q, k, layer_idx=0))):
                wall = median_ms(fn)
                n, gpu_ms, table = profile_call(fn)
                print(f"\n== {name} {what} L={q.shape[2]}: {n:.0f} kernels, GPU {gpu_ms:.3f} ms, eager wall {wall:.3f} ms")
                if what == "attend":
                    print(table.table(sort_by="self_device_time_total", row_limit=args.top, max_name_column_width=70))


if __name__ == "__main__":
    main()
