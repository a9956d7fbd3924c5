"""Dynamic prefill methods on a model's own activations: speed against SDPA, and time to first token.

For issue 4's targets: attention including estimation, as a ratio to SDPA (flash and cuDNN) in the same run,
at B=1, 32 query / 8 KV heads, D=128, bf16, on q/k/v taken from the reference model rather than noise.

ref-small has 6 query / 2 KV heads of dimension 64 in each of 6 layers, so the 32/8/128 shape is assembled
from its activations on a long NIAH prompt: KV head j concatenates the features of one (layer, KV head)
with the same head of the next layer (D = 64 + 64), and its 4 query heads do the same with that group's
query heads (3 real ones, the 4th repeating the first). A concatenated head's logits are the sum of the two
layers' logits, so its attention has real (sharpened) structure: sinks, locality, retrieval.

Then the model itself: time to first token of ref-small at 64K and 128K with each method against dense.

Usage (GPU): ``python benchmarks/prefill_speed.py [--lengths 8192,...] [--methods ...] [--ttft 65536,131072]``;
methods are named as ``sparsa bench`` names them (``hip:block=128``); ``NAME+compile`` runs with
``compile=True`` (its select() through torch.compile), ``NAME+reduce-overhead`` with that compile mode, and
``NAME+graph`` with ``cuda_graph=True`` (the whole attend() call replayed as a CUDA graph; the first call of a
shape runs eagerly, the second captures, both before the timed calls), ``NAME+flex`` / ``NAME+triton`` with that
attention backend (default ``auto``). Suffixes combine: ``hip+compile+graph``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import sparsa  # noqa: E402
from sparsa import registry  # noqa: E402
from sparsa.bench.runner import load_model, resolve_model  # noqa: E402
from sparsa.heads import capture_qkv  # noqa: E402
from sparsa.tasks import get as get_task  # noqa: E402

METHODS = ["dense", "streaming", "a_shape", "vertical_slash", "flexprefill", "sale", "hip", "longheads",
           "biformer", "hyper"]


def median_ms(fn, reps=10, warmup=2):
    """Median milliseconds (CUDA events on the GPU, wall clock on the CPU) via sparsa.bench.speed.measure."""
    from sparsa.bench.speed import measure

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return measure(fn, device, warmup=warmup, reps=reps, min_reps=min(reps, 3))[0]


def method_params(name: str) -> tuple[str, dict]:
    """A method as ``sparsa bench`` names it (``"hip:block=128"``), optionally ``+compile``, ``+MODE`` (a
    torch.compile mode) and ``+graph``: ``"hip:block=128+compile+graph"`` -> ``("hip", {"block": 128,
    "compile": True, "cuda_graph": True})``."""
    from sparsa.bench.runner import parse_method

    text, *suffixes = name.split("+")
    spec = parse_method(text)
    params = dict(spec.params)
    for suffix in suffixes:
        if suffix in ("flex", "triton", "reference"):
            params["backend"] = suffix  # not a method parameter: attend()'s / configure()'s backend
        elif suffix == "graph":
            params["cuda_graph"] = True
        else:
            params["compile"] = True if suffix == "compile" else suffix
    return spec.name, params


def model_activations(model, tokenizer, length: int):
    """q [1, 32, L, 128], k/v [1, 8, L, 128] assembled from ref-small's layers on a multi-key NIAH prompt."""
    sample = get_task("niah_multikey").generate(1, length, 7, tokenizer)[0]
    ids = torch.tensor([tokenizer.encode(sample["prompt"], add_special_tokens=False)], device=model.device)
    layers = capture_qkv(model, ids)
    qs, ks, vs = [], [], []
    order = sorted(layers)
    for i in range(0, len(order) - 1):
        (q1, k1, v1), (q2, k2, v2) = layers[order[i]], layers[order[i + 1]]
        for g in range(k1.shape[1]):
            group = q1.shape[1] // k1.shape[1]
            heads = [g * group + j for j in range(group)] + [g * group]
            qs += [torch.cat([q1[:, h], q2[:, h]], -1) for h in heads[:4]]
            ks.append(torch.cat([k1[:, g], k2[:, g]], -1))
            vs.append(torch.cat([v1[:, g], v2[:, g]], -1))
    q, k, v = torch.stack(qs[:32], 1), torch.stack(ks[:8], 1), torch.stack(vs[:8], 1)
    return q.contiguous(), k.contiguous(), v.contiguous()


def attention_rows(q, k, v, methods, length):
    """Rows one at a time (a slow compile must not hide the rows before it): the SDPA baselines first, then
    each method with its ratios to them."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    baselines = []
    for backend, name in ((SDPBackend.FLASH_ATTENTION, "sdpa_flash"), (SDPBackend.CUDNN_ATTENTION, "sdpa_cudnn")):
        def sdpa():
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        try:
            baselines.append(dict(length=length, method=name, ms=median_ms(sdpa), density=1.0))
        except RuntimeError as e:
            baselines.append(dict(length=length, method=name, error=str(e)[:200]))
    base = next((r["ms"] for r in baselines if r["method"] == "sdpa_flash" and "ms" in r), None)
    best = min((r["ms"] for r in baselines if "ms" in r), default=None)

    def with_ratios(row):
        if "ms" in row and base:
            row["x_sdpa_flash"] = base / row["ms"]
            row["x_best_sdpa"] = best / row["ms"]
        return row

    yield from map(with_ratios, baselines)
    reference = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    for name in methods:
        base_name, params = method_params(name)
        backend = params.pop("backend", "auto")
        # dense_below=0 unless the name sets it: these rows time the sparse path itself
        sel = registry.create("prefill", base_name, **{"dense_below": 0, **params})
        try:
            sel.attend(q, k, v, layer_idx=0, backend=backend)  # compiles; with cuda_graph, the eager warm-up
            # median_ms's two untimed warm-up calls come next: with cuda_graph the first of them captures
            total = median_ms(lambda: sel.attend(q, k, v, layer_idx=0, backend=backend), warmup=2)
            # with cuda_graph, a replay: its error is the one shown
            out, density = sel.attend(q, k, v, layer_idx=0, backend=backend)
            err = float((out.float() - reference.float()).norm() / reference.float().norm())
            estimate = median_ms(lambda: sel.pattern(q, k, layer_idx=0)) if base_name != "hyper" else None
            yield with_ratios(dict(length=length, method=name, ms=total, estimate_ms=estimate,
                                   density=float(density), rel_err=err))
        except Exception as e:  # a method that fails at one size must not stop the table
            yield dict(length=length, method=name, error=f"{type(e).__name__}: {str(e)[:200]}")


@torch.no_grad()
def ttft_rows(model, tokenizer, methods, length, own_dense_below=False):
    sample = get_task("niah_single").generate(1, length, 11, tokenizer)[0]
    ids = torch.tensor([tokenizer.encode(sample["prompt"], add_special_tokens=False)], device=model.device)
    rows = []
    # SDPA is timed first and again last: the two bracket any drift of the machine over the run (at short lengths
    # the forward pass of a small model is launch-bound, a few ms, and such drift is not small)
    for i, name in enumerate(["none"] + methods + ["none"]):
        params = {}
        if name == "none":
            sparsa.configure(model)
        else:
            base_name, params = method_params(name)
            if not own_dense_below:  # time the sparse path, not the method's dense fallback
                params = {"dense_below": 0, **params}
            sparsa.configure(model, prefill=base_name, **params)  # params may hold backend
        try:
            # with cuda_graph the first pass warms up and the second captures: both before the timed passes
            warmup = 2 if params.get("cuda_graph") else 1
            reps = 3 if length > 16384 else 30  # short prompts: a few ms each, so more repetitions
            ms = median_ms(lambda: model(ids, use_cache=True, logits_to_keep=1), reps=reps, warmup=warmup)
            label = name if name != "none" else ("sdpa" if i == 0 else "sdpa (again)")
            rows.append(dict(length=length, ttft_method=label, ttft_ms=ms,
                             density=sparsa.stats(model, prefill=True)["density"]))
        except Exception as e:
            rows.append(dict(length=length, ttft_method=name, error=f"{type(e).__name__}: {str(e)[:200]}"))
    sparsa.configure(model)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="ref-small")
    ap.add_argument("--lengths", default="4096,8192,16384,32768,65536,131072")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--ttft", default="65536,131072")
    ap.add_argument("--own-dense-below", action="store_true",
                    help="time to first token with each method's own dense_below (its dense fallback below it), "
                         "not 0: shows what a user of the defaults gets at short lengths")
    ap.add_argument("--jsonl", default=os.path.join(os.environ.get("OUT", "."), "prefill_speed.jsonl"))
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_model(resolve_model(args.model), device)
    # ';' separates methods when one has several parameters ("biformer:scoring=bound,local_blocks=2"), as in bench
    from sparsa.bench.runner import split_outside_brackets

    methods = [m for m in split_outside_brackets(args.methods, ";" if ";" in args.methods else ",") if m]
    info = dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu", torch=torch.__version__, date=time.strftime("%Y-%m-%d %H:%M"))
    out = open(args.jsonl, "a")
    for length in [int(x) for x in args.lengths.split(",") if x]:
        q, k, v = model_activations(model, tokenizer, length)
        for row in attention_rows(q, k, v, methods, q.shape[2]):
            out.write(json.dumps({**info, **row}) + "\n")
            out.flush()
            print(row, flush=True)
        del q, k, v
        torch.cuda.empty_cache()
    for length in [int(x) for x in args.ttft.split(",") if x]:
        for row in ttft_rows(model, tokenizer, methods, length, args.own_dense_below):
            out.write(json.dumps({**info, **row}) + "\n")
            out.flush()
            print(row, flush=True)


if __name__ == "__main__":
    main()
