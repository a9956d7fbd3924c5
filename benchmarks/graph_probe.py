"""How much would replaying a dynamic method's whole attention call as a CUDA graph buy at short lengths?

At 8K tokens the estimation and the BlockMask cost more in kernel launches (~27 us each on the H200) than in
arithmetic, so no dynamic method reaches 1.5x SDPA flash there (BENCHMARKS.md, session 3). This probe captures
``selector.attend`` (estimation + BlockMask + attention) into one ``torch.cuda.CUDAGraph`` per method and
length, and times the replay against eager calls on the same inputs, before anything is built on it. The
inputs are random (the cost of a call does not depend on their values); replay includes copying fresh q/k/v
into the graph's input buffers, as a real forward pass would. Every replayed output is compared with the eager
one: a graph that replays stale work would show here.

Usage (GPU): ``python benchmarks/graph_probe.py [--lengths 8192,16384] [--methods biformer,hip,...]``
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from sparsa import registry  # noqa: E402
from sparsa.bench.speed import measure  # noqa: E402

METHODS = "vertical_slash,flexprefill,hip,longheads,biformer"


def qkv(length: int, seed: int, device):
    g = torch.Generator(device=device).manual_seed(seed)
    shapes = ((1, 32, length, 128), (1, 8, length, 128), (1, 8, length, 128))
    return [torch.randn(s, generator=g, device=device, dtype=torch.bfloat16) for s in shapes]


def ms(fn, device) -> float:
    return measure(fn, device, warmup=3, reps=30, min_reps=10)[0]


def probe(method: str, length: int, device) -> dict:
    row = {"method": method, "length": length}
    sel = registry.create("prefill", method, dense_below=0)
    q, k, v = qkv(length, 0, device)
    row["eager_ms"] = ms(lambda: sel.attend(q, k, v, layer_idx=0), device)
    static = [t.clone() for t in (q, k, v)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph: compiles, caches, allocator pools
        for _ in range(3):
            sel.attend(*static, layer_idx=0)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            out, _ = sel.attend(*static, layer_idx=0)
    except Exception as error:  # what stops capture is the finding
        row["capture_error"] = f"{type(error).__name__}: {str(error)[:300]}"
        return row
    fresh = qkv(length, 1, device)

    def replay():
        for buffer, value in zip(static, fresh):
            buffer.copy_(value)
        graph.replay()

    row["graph_ms"] = ms(replay, device)
    replay()
    want, _ = sel.attend(*fresh, layer_idx=0)
    row["max_abs_diff"] = float((out.float() - want.float()).abs().max())
    row["speedup"] = row["eager_ms"] / row["graph_ms"]
    return row


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="8192,16384")
    ap.add_argument("--methods", default=METHODS)
    ap.add_argument("--jsonl", default=os.path.join(os.environ.get("OUT", "."), "graph_probe.jsonl"))
    args = ap.parse_args(argv)
    device = torch.device("cuda")
    with open(args.jsonl, "a") as out:
        for length in [int(x) for x in args.lengths.split(",")]:
            q, k, v = qkv(length, 0, device)
            flash = torch.nn.attention.SDPBackend.FLASH_ATTENTION
            with torch.nn.attention.sdpa_kernel(flash):
                sdpa = ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                                   enable_gqa=True), device)
            for method in args.methods.split(","):
                try:
                    row = probe(method, length, device)
                except Exception as error:
                    row = {"method": method, "length": length, "error": f"{type(error).__name__}: {error}"[:300]}
                row["sdpa_flash_ms"] = sdpa
                for key in ("eager_ms", "graph_ms"):
                    if key in row:
                        row[key.replace("_ms", "_x_flash")] = sdpa / row[key]
                out.write(json.dumps(row) + "\n")
                out.flush()
                print(row, flush=True)


if __name__ == "__main__":
    main()
