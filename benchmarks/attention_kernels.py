"""The attention kernel alone, per backend: sparsa's Triton kernel against FlexAttention on the same patterns.

For each length, q/k/v come from ref-small's activations (``prefill_speed.model_activations``: 32 query / 8 KV
heads, D = 128, bf16), each method's pattern is selected once, and then only ``block_sparse_attention`` is timed
with ``backend="flex"`` and ``backend="triton"`` (and Triton tile configurations given by ``--configs``), next
to SDPA flash and cuDNN on the dense causal problem. Each Triton row also reports its largest difference from
the flex output (the check that the two kernels agree on the GPU).

Usage (GPU): ``python benchmarks/attention_kernels.py --lengths 8192,32768,131072 --methods dense,biformer,hip
--configs 128x64x8x3,128x128x8x2`` (BLOCK_M x BLOCK_N x warps x stages).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from prefill_speed import median_ms, model_activations  # noqa: E402

from sparsa import BlockPattern, registry  # noqa: E402
from sparsa.bench.runner import load_model, resolve_model  # noqa: E402
from sparsa.ops import block_sparse_attention  # noqa: E402
from sparsa.ops.triton_attention import block_sparse_attention_triton  # noqa: E402


def parse_config(text: str) -> dict:
    m, n, warps, stages = (int(x) for x in text.split("x"))
    return dict(BLOCK_M=m, BLOCK_N=n, num_warps=warps, num_stages=stages)


def rows(q, k, v, methods, configs, length):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    base = {}
    for backend, name in ((SDPBackend.FLASH_ATTENTION, "sdpa_flash"), (SDPBackend.CUDNN_ATTENTION, "sdpa_cudnn")):
        def sdpa():
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        base[name] = median_ms(sdpa)
        yield dict(length=length, method=name, backend="sdpa", ms=base[name])
    scale = q.shape[-1] ** -0.5
    for name in methods:
        if name == "dense":
            pattern = BlockPattern.dense(q.shape[2], k.shape[2], device=q.device)
        else:
            pattern = registry.create("prefill", name, dense_below=0).pattern(q, k, layer_idx=0)
        density = pattern.density()
        flex_out = block_sparse_attention(q, k, v, pattern, backend="flex", validate=False)
        flex_ms = median_ms(lambda: block_sparse_attention(q, k, v, pattern, backend="flex", validate=False))
        yield dict(length=length, method=name, backend="flex", density=density, ms=flex_ms,
                   x_sdpa_flash=base["sdpa_flash"] / flex_ms)
        for cfg in [None] + configs:
            def call(cfg=cfg):
                if cfg is None:
                    return block_sparse_attention(q, k, v, pattern, backend="triton", validate=False)
                return block_sparse_attention_triton(q, k, v, pattern, causal=True, scale=scale,
                                                     key_padding_mask=None, options=cfg)[0]
            try:
                diff = float((call().float() - flex_out.float()).abs().max())
                ms = median_ms(call)
                yield dict(length=length, method=name, backend="triton", config=cfg or "default", density=density,
                           ms=ms, x_flex=flex_ms / ms, x_sdpa_flash=base["sdpa_flash"] / ms, max_diff_vs_flex=diff)
            except Exception as e:  # one failing configuration must not stop the table
                yield dict(length=length, method=name, backend="triton", config=cfg or "default",
                           error=f"{type(e).__name__}: {str(e)[:300]}")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="ref-small")
    ap.add_argument("--lengths", default="8192,32768,131072")
    ap.add_argument("--methods", default="dense,biformer,hip,longheads,vertical_slash")
    ap.add_argument("--configs", default="",
                    help="Triton tile configurations BLOCK_MxBLOCK_NxWARPSxSTAGES, comma-separated")
    ap.add_argument("--jsonl", default=os.path.join(os.environ.get("OUT", "."), "attention_kernels.jsonl"))
    args = ap.parse_args(argv)
    model, tokenizer = load_model(resolve_model(args.model), "cuda")
    configs = [parse_config(c) for c in args.configs.split(",") if c]
    info = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, date=time.strftime("%Y-%m-%d %H:%M"))
    with open(args.jsonl, "a") as out, torch.no_grad():
        for length in [int(x) for x in args.lengths.split(",") if x]:
            q, k, v = model_activations(model, tokenizer, length)
            for row in rows(q, k, v, args.methods.split(","), configs, q.shape[2]):
                out.write(json.dumps({**info, **row}) + "\n")
                out.flush()
                print({key: (round(val, 4) if isinstance(val, float) else val) for key, val in row.items()},
                      flush=True)
            del q, k, v
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
