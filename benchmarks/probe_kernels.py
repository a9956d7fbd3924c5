"""The probe kernels of vertical_slash / flexprefill alone (``sparsa.ops.vertical_slash``): both passes timed on
ref-small's activations, for FlexPrefill's probes (four blocks of 128 spread over the sequence) and
MInference's (the last 64 queries), with the column pass at 4 and 8 warps, and with its column sums stored per probe
tile (``column_partials``) instead of added atomically; each variant's outputs compared with the first's.

Usage (GPU): ``python benchmarks/probe_kernels.py --lengths 32768,131072``
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from prefill_speed import median_ms, model_activations  # noqa: E402

from sparsa.bench.runner import load_model, resolve_model  # noqa: E402
from sparsa.ops.vertical_slash import _vertical_slash_triton  # noqa: E402
from sparsa.prefill.flexprefill import FlexPrefill  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="32768,131072")
    args = ap.parse_args(argv)
    model, tokenizer = load_model(resolve_model("ref-small"), "cuda")
    for length in [int(x) for x in args.lengths.split(",") if x]:
        q, k, _ = model_activations(model, tokenizer, length)
        lq = q.shape[2]
        scale = 1 / math.sqrt(q.shape[-1])
        probes = {"flexprefill 512": FlexPrefill()._probe_index(lq, q.device),
                  "vertical_slash 64": torch.arange(lq - 64, lq, device=q.device)}
        sdpa = median_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, k, is_causal=True,
                                                                                  enable_gqa=True))
        print(f"L={lq}: SDPA (default backend) {sdpa:.3f} ms")
        for name, index in probes.items():
            qp = q[:, :, index]
            first = None
            for warps, partials in ((4, False), (8, False), (8, True)):
                def call(warps=warps, partials=partials):
                    return _vertical_slash_triton(qp, k, index, scale, None, 128, num_warps=warps,
                                                  column_partials=partials)
                out = call()
                first = out if first is None else first
                diff = max(float((a - b).abs().max()) for a, b in zip(out, first))
                ms = median_ms(call)
                print(f"  {name} probes, column pass {warps} warps{', partials' if partials else ''}: {ms:.3f} ms "
                      f"({100 * ms / sdpa:.1f}% of SDPA), largest difference from the first {diff:.2e}")
        q = k = qp = None  # free the activations before the next length
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
