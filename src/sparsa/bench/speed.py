"""Kernel speed on causal prefill: torch SDPA against sparsa dense and sparsa at several densities (``sparsa speed``).

One run does, in order:

1. correctness: sparsa dense against torch SDPA, and one sparse pattern against the ``reference`` backend; a
   failure stops the run (``main`` returns 1) before anything is timed;
2. per length: SDPA pinned to each requested backend (flash first: it is the baseline), sparsa dense, and sparsa
   at each density, with the time to build each pattern (``from_block_scores``) and its FlexAttention BlockMask;
3. optionally (``--kernel-options-sweep``): sparsa dense under a few FlexAttention ``kernel_options``.

Sparsa rows time the kernel on a prebuilt BlockMask -- the call ``ops.block_sparse_attention`` makes, minus
building the mask -- and report the mask and pattern construction apart (``mask_ms``, ``pattern_ms``): a model
can build them once per layer and sequence, and their cost against the attention is one of the targets.
Every row is appended to the JSONL file as soon as it is measured, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .. import ops
from ..ops import flex
from ..ops.attention import select_backend
from ..pattern import DEFAULT_BLOCK, BlockPattern

DEFAULT_LENGTHS = (4096, 8192, 16384, 32768, 65536, 131072)
DEFAULT_DENSITIES = (0.5, 0.25, 0.1, 0.05)
SDPA_BACKENDS = ("flash", "cudnn", "efficient")
_SDPA_ENUM = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
              "math": "MATH"}
CHECK_TOL = 2e-2  # relative error ||a - b|| / ||b|| allowed between two bf16 attentions
CHECK_LENGTHS = (4096, 3000)  # one multiple of the block and one not
SPARSE_CHECK_LENGTH = 2048
SPARSE_CHECK_DENSITY = 0.25

SWEEP_LENGTHS = (32768, 131072)
# Forward kernel options tried on sparsa dense. ``None`` is what sparsa passes today. Under automatic dynamic
# shapes inductor cannot prove that the lengths are multiples of 128 and compiles the bounds-checked variant;
# IS_DIVISIBLE=True (only valid when both lengths are) says otherwise, so the tile variants are tried with it.
SWEEP_OPTIONS = (
    None,
    {"IS_DIVISIBLE": True},
    {"IS_DIVISIBLE": True, "BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
    {"IS_DIVISIBLE": True, "BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2},
    {"IS_DIVISIBLE": True, "BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3},
    {"IS_DIVISIBLE": True, "USE_TMA": True},
)


class CheckFailed(RuntimeError):
    """A correctness check failed; ``rows`` holds everything recorded so far."""

    def __init__(self, message: str, rows: list[dict]):
        super().__init__(message)
        self.rows = rows


# ------------------------------------------------------------------------------------------------ setup
@dataclass
class Setup:
    batch: int
    q_heads: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    backend: str  # resolved: "flex" or "reference"
    warmup: int
    reps: int
    budget_s: float
    deadline: float | None = None

    def qkv(self, length: int, seed: int):
        """Random q, k, v (never zeros: a zero input would make every kernel trivially equal)."""
        gen = torch.Generator(device=self.device).manual_seed(seed)
        make = lambda heads: torch.randn(self.batch, heads, length, self.head_dim, generator=gen,  # noqa: E731
                                         device=self.device, dtype=self.dtype)
        return make(self.q_heads), make(self.kv_heads), make(self.kv_heads)

    def measure(self, fn) -> tuple[float, int]:
        return measure(fn, self.device, warmup=self.warmup, reps=self.reps, budget_s=self.budget_s)

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.perf_counter() > self.deadline

    def fields(self) -> dict:
        return {"batch": self.batch, "q_heads": self.q_heads, "kv_heads": self.kv_heads, "head_dim": self.head_dim,
                "dtype": str(self.dtype).removeprefix("torch."), "backend": self.backend, "block": DEFAULT_BLOCK}


def make_setup(batch, q_heads, kv_heads, head_dim, dtype, device, backend, warmup, reps, budget_s, time_limit_s):
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    backend = select_backend(backend, torch.empty(0, dtype=dtype, device=device))
    deadline = None if time_limit_s is None else time.perf_counter() + time_limit_s
    return Setup(batch, q_heads, kv_heads, head_dim, dtype, device, backend, warmup, reps, budget_s, deadline)


def environment(device: torch.device, run_id: str | None = None) -> dict:
    """Where and when: recorded in every row so that a JSONL file stands on its own. ``run_id`` ties together
    the rows of one command (the timings and the sweep share baselines)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine() or "cpu"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    now = datetime.datetime.now(datetime.timezone.utc)
    return {"device_name": name, "device": str(device), "torch": torch.__version__, "triton": triton_version,
            "cuda": torch.version.cuda, "date": now.strftime("%Y-%m-%d %H:%M UTC"),
            "run_id": run_id or new_run_id(), "command": _command_line()}


def new_run_id() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")


def _command_line() -> str:
    prog = sys.argv[0] if sys.argv else "python"
    if prog.endswith(".py"):
        return shlex.join(["python", prog, *sys.argv[1:]])
    return shlex.join([os.path.basename(prog), *sys.argv[1:]])


# ------------------------------------------------------------------------------------------------ timing
def measure(fn, device: torch.device, *, warmup: int = 1, reps: int = 50, budget_s: float = 1.0,
            min_reps: int = 5, warmup_s: float = 0.1) -> tuple[float, int]:
    """Median milliseconds of ``fn()``, and the number of timed calls.

    ``warmup`` untimed calls first (the first one compiles), then one call to size the run: about ``budget_s``
    seconds of calls, at least ``min_reps`` and at most ``reps`` -- a 128K dense call takes ~0.5 s, a 4K call
    well under a millisecond. Short calls also get ``warmup_s`` of extra warm-up so the clocks are up.
    """
    for _ in range(max(warmup, 1)):
        fn()
    estimate = max(_timed_calls(fn, device, 1)[0], 1e-3)
    for _ in range(min(reps, int(warmup_s * 1e3 / estimate))):
        fn()
    n = max(min_reps, min(reps, int(budget_s * 1e3 / estimate)))
    return statistics.median(_timed_calls(fn, device, n)), n


def _timed_calls(fn, device: torch.device, n: int) -> list[float]:
    if device.type == "cuda":
        # Back-to-back calls bracketed by events: GPU time per call, no host sync between calls.
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        torch.cuda.synchronize(device)
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) for start, end in events]
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ calls
def sdpa_call(q, k, v, backend: str):
    """``(fn, gqa)``: causal SDPA pinned to one backend.

    ``gqa`` is ``"native"`` when the backend takes ``enable_gqa``; otherwise K/V are expanded to the query heads
    here, outside the timed call, and ``gqa`` is ``"expanded"``. Raises when the backend cannot run the inputs.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    chosen = getattr(SDPBackend, _SDPA_ENUM[backend])

    def run(key, value, **kwargs):
        with sdpa_kernel(chosen):
            return F.scaled_dot_product_attention(q, key, value, is_causal=True, **kwargs)

    native = lambda: run(k, v, enable_gqa=True)  # noqa: E731
    try:
        _quietly(native)
        return native, "native"
    except RuntimeError:
        pass
    group = q.shape[1] // k.shape[1]
    k_all, v_all = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    expanded = lambda: run(k_all, v_all)  # noqa: E731
    _quietly(expanded)
    return expanded, "expanded"


def _quietly(fn):
    # SDPA warns at length about why a pinned backend cannot run; the error (if any) is what we record.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn()


def build_mask(setup: Setup, pattern: BlockPattern):
    """The FlexAttention BlockMask for a pattern, exactly as ``ops.block_sparse_attention`` builds it."""
    return flex.build_block_mask(pattern, setup.batch, setup.q_heads, setup.kv_heads, causal=True,
                                 key_padding_mask=None, device=setup.device)


def sparsa_call(setup: Setup, q, k, v, pattern: BlockPattern, kernel_options="default"):
    """The sparsa attention call to time.

    flex: the compiled kernel on a prebuilt BlockMask, with the arguments ``ops.block_sparse_attention`` passes
    (so it reuses the same compiled graphs); ``kernel_options`` overrides sparsa's choice in the sweep.
    reference: the public entry without validation.
    """
    if setup.backend != "flex":
        return lambda: ops.block_sparse_attention(q, k, v, pattern, backend=setup.backend, validate=False)
    mask = build_mask(setup, pattern)
    # The entry pads to multiples of 128 for the fast kernel; here inputs are used as they are, so the fast
    # options only apply when the lengths already divide.
    fast = flex.fast_path(pattern, None, q.device) and q.shape[2] % 128 == 0 and k.shape[2] % 128 == 0
    options = flex.kernel_options(pattern, q.device, fast) if kernel_options == "default" else kernel_options
    kernel = flex._flex()
    scale = 1.0 / math.sqrt(q.shape[-1])
    gqa = q.shape[1] != k.shape[1]
    return lambda: kernel(q, k, v, block_mask=mask, scale=scale, enable_gqa=gqa, return_lse=False,
                          kernel_options=options)


# ------------------------------------------------------------------------------------------------ patterns
def sparse_builder(length: int, density: float, kv_heads: int, device, seed: int = 0):
    """``(build, topk)``: ``build()`` makes a per-KV-head top-k pattern from fixed random block scores, with
    ``topk`` chosen so that the measured causal density is as close as it gets to ``density``."""
    blocks = -(-length // DEFAULT_BLOCK)
    gen = torch.Generator(device=device).manual_seed(seed)
    scores = torch.rand(1, kv_heads, blocks, blocks, generator=gen, device=device)

    def build_with(topk: int) -> BlockPattern:
        return BlockPattern.from_block_scores(scores, q_len=length, kv_len=length, topk=topk)

    topk = pick_topk(build_with, blocks, density)
    return (lambda: build_with(topk)), topk


def pick_topk(build_with, blocks: int, density: float) -> int:
    """The top-k whose pattern's density is closest to ``density``.

    Density only grows with k (top-k sets are nested; the diagonal and first block are always added), so
    bisect for the first k at or above the target, then keep whichever neighbour lands closer.
    """
    lo, hi = 1, blocks
    while lo < hi:
        mid = (lo + hi) // 2
        if build_with(mid).density() < density:
            lo = mid + 1
        else:
            hi = mid
    candidates = {lo, max(lo - 1, 1)}
    return min(sorted(candidates), key=lambda k: abs(build_with(k).density() - density))


def rel_error(out, ref) -> float:
    out, ref = out.float(), ref.float()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


# ------------------------------------------------------------------------------------------------ recording
# Every row of a kind has the same keys (None where not measured), so JSONL readers need no special cases.
TIME_FIELDS = ("kind", "length", "method", "nominal_density", "density", "topk", "ms", "reps", "ratio_vs_sdpa",
               "ratio_vs_best_sdpa", "ratio_vs_dense", "sdpa_baseline", "pattern_ms", "pattern_ratio", "mask_ms",
               "mask_ratio", "sdpa_gqa", "kernel_options", "rel_err", "error")
CHECK_FIELDS = ("kind", "length", "method", "density", "rel_err", "tol", "passed")


class Recorder:
    """Collects rows: adds the shared fields, appends each to the JSONL file and prints a line as it comes."""

    def __init__(self, common: dict, out_jsonl: str | None, progress: bool, total: int):
        self.common = common
        self.out_jsonl = out_jsonl
        self.rows: list[dict] = []
        self.bar = tqdm(total=total, disable=not progress, unit="cell", file=sys.stderr, mininterval=1.0,
                        dynamic_ncols=True)
        if out_jsonl:
            os.makedirs(os.path.dirname(os.path.abspath(out_jsonl)), exist_ok=True)

    def emit(self, row: dict) -> dict:
        blank = dict.fromkeys(CHECK_FIELDS if row["kind"] == "check" else TIME_FIELDS)
        row = {**self.common, **blank, **row}
        self.rows.append(row)
        add_ratios(self.rows)  # baselines come first in each length, so the later rows get their ratios now
        if self.out_jsonl:
            with open(self.out_jsonl, "a") as f:
                f.write(json.dumps(row) + "\n")
        if row["kind"] != "check":
            self.bar.update()
        tqdm.write(describe(row), file=sys.stdout)
        sys.stdout.flush()
        return row

    def close(self):
        self.bar.close()


def describe(row: dict) -> str:
    """One short line per row for the log."""
    if row["kind"] == "check":
        verdict = "ok" if row["passed"] else "FAILED"
        return f"check {row['method']} L={row['length']}: rel err {row['rel_err']:.2e} (tol {row['tol']:.0e}) {verdict}"
    head = f"{row['kind']} L={row['length']} {row['method']}"
    if row.get("kernel_options") is not None:
        head += f" opts={row['kernel_options']}"
    if row.get("error"):
        return f"{head}: {row['error']}"
    parts = [f"d={row['density']:.3f}", f"{row['ms']:.3f} ms"]
    if row.get("ratio_vs_sdpa") is not None:
        parts.append(f"{row['ratio_vs_sdpa']:.2f}x vs sdpa")
    if row.get("ratio_vs_dense") is not None:
        parts.append(f"{row['ratio_vs_dense']:.3f} of dense")
    if row.get("mask_ms") is not None:
        parts.append(f"mask {row['mask_ms']:.3f} ms")
    return f"{head}: " + ", ".join(parts)


def add_ratios(rows: list[dict]) -> list[dict]:
    """Fill the ratio fields from the medians; idempotent, also used on rows read back from JSONL.

    ratio_vs_sdpa = SDPA baseline ms / ms (> 1: faster than SDPA; the baseline is flash when it ran),
    ratio_vs_best_sdpa the same against the fastest SDPA backend, ratio_vs_dense = ms / sparsa dense ms (sweep
    rows: against the sweep's default options), mask_ratio and pattern_ratio = construction ms / attention ms.
    """
    sdpa, dense, sweep_default = {}, {}, {}
    for r in rows:
        if r.get("ms") is None:
            continue
        key = (r.get("run_id"), r["length"])
        if r["kind"] == "time" and r["method"].startswith("sdpa_"):
            sdpa.setdefault(key, {})[r["method"]] = r["ms"]
        elif r["kind"] == "time" and r["method"] == "sparsa_dense":
            dense[key] = r["ms"]
        elif r["kind"] == "sweep" and r.get("kernel_options") == "null":
            sweep_default[key] = r["ms"]
    for r in rows:
        if r.get("kind") not in ("time", "sweep") or r.get("ms") is None:
            continue
        key = (r.get("run_id"), r["length"])
        times = sdpa.get(key, {})
        baseline = "sdpa_flash" if "sdpa_flash" in times else next(iter(times), None)
        r["sdpa_baseline"] = baseline
        r["ratio_vs_sdpa"] = _ratio(times.get(baseline), r["ms"])
        r["ratio_vs_best_sdpa"] = _ratio(min(times.values(), default=None), r["ms"])
        r["ratio_vs_dense"] = _ratio(r["ms"], (dense if r["kind"] == "time" else sweep_default).get(key))
        r["mask_ratio"] = _ratio(r.get("mask_ms"), r["ms"])
        r["pattern_ratio"] = _ratio(r.get("pattern_ms"), r["ms"])
    return rows


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def _error_text(e: BaseException) -> str:
    # First sentence only: SDPA and inductor errors run to paragraphs, and this goes into a table cell.
    text = " ".join(str(e).split()) or type(e).__name__
    first = text.split(". ")[0]
    return f"{type(e).__name__}: {first[:120]}"


# ------------------------------------------------------------------------------------------------ the run
def run_speed(lengths=DEFAULT_LENGTHS, densities=DEFAULT_DENSITIES, batch: int = 1, q_heads: int = 32,
              kv_heads: int = 8, head_dim: int = 128, dtype="bfloat16", device="cuda", backend: str = "flex",
              check: bool = True, warmup: int = 1, reps: int = 50, out_jsonl: str | None = None,
              progress: bool = True, *, budget_s: float = 1.0, sdpa_backends=SDPA_BACKENDS, sparsa: bool = True,
              check_lengths=CHECK_LENGTHS, sparse_check_length: int = SPARSE_CHECK_LENGTH,
              time_limit_s: float | None = None, run_id: str | None = None) -> list[dict]:
    """Correctness checks, then timings for every length; returns the rows (also appended to ``out_jsonl``).

    Per length: the first SDPA backend (the baseline), sparsa dense, sparsa at each density. The other SDPA
    backends come after all lengths: a backend that faults on the GPU (an asynchronous error poisons the CUDA
    context) then costs only the rows after it, not the sparsa rows. ``sparsa=False`` times SDPA only.

    Raises :class:`CheckFailed` (after recording the check rows) when a check is off by more than CHECK_TOL.
    Cells that fail (a backend that cannot run, out of memory) are recorded with ``error`` and the run goes on;
    past ``time_limit_s`` the remaining cells are recorded as skipped.
    """
    setup = make_setup(batch, q_heads, kv_heads, head_dim, dtype, device, backend, warmup, reps, budget_s,
                       time_limit_s)
    first, rest = list(sdpa_backends[:1]), list(sdpa_backends[1:])
    per_length = len(sdpa_backends) + (1 + len(densities) if sparsa else 0)
    rec = Recorder({**environment(setup.device, run_id), **setup.fields()}, out_jsonl, progress,
                   len(lengths) * per_length)
    try:
        with torch.no_grad():
            if check:
                run_checks(setup, check_lengths, sparse_check_length, rec)
            for length in lengths:
                bench_length(setup, length, densities if sparsa else None, first, rec)
            for length in lengths if rest else ():
                bench_length(setup, length, None, rest, rec)
    finally:
        rec.close()
    return add_ratios(rec.rows)


def run_checks(setup: Setup, lengths, sparse_length: int, rec: Recorder) -> None:
    """Dense against SDPA (default backend choice) and one sparse pattern against the reference backend."""
    failed = []
    for length in lengths:
        q, k, v = setup.qkv(length, seed=1)
        out = ops.block_sparse_attention(q, k, v, BlockPattern.dense(length, device=setup.device),
                                         backend=setup.backend)
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        failed += _check_row(rec, "dense_vs_sdpa", length, rel_error(out, ref))
    q, k, v = setup.qkv(sparse_length, seed=2)
    build, _ = sparse_builder(sparse_length, SPARSE_CHECK_DENSITY, setup.kv_heads, setup.device, seed=2)
    pattern = build()
    out = ops.block_sparse_attention(q, k, v, pattern, backend=setup.backend)
    ref = ops.block_sparse_attention(q, k, v, pattern, backend="reference")
    failed += _check_row(rec, "sparse_vs_reference", sparse_length, rel_error(out, ref), density=pattern.density())
    del q, k, v, out, ref
    free_memory(setup.device)
    if failed:
        raise CheckFailed("correctness check failed: " + "; ".join(failed), rec.rows)


def _check_row(rec: Recorder, method: str, length: int, err: float, density: float = 1.0) -> list[str]:
    passed = err < CHECK_TOL  # NaN fails
    rec.emit({"kind": "check", "method": method, "length": length, "density": density, "rel_err": err,
              "tol": CHECK_TOL, "passed": passed})
    return [] if passed else [f"{method} at {length}: rel err {err:.3e} >= {CHECK_TOL}"]


def bench_length(setup: Setup, length: int, densities, sdpa_backends, rec: Recorder) -> None:
    """SDPA under each backend, then (unless ``densities`` is None) sparsa dense and sparsa at each density."""
    q, k, v = setup.qkv(length, seed=length)  # same seed, same inputs in every pass
    for name in sdpa_backends:
        row = {"kind": "time", "length": length, "method": f"sdpa_{name}", "density": 1.0}
        rec.emit(_timed_cell(setup, row, lambda: _time_sdpa(setup, q, k, v, name)))
    cells = [] if densities is None else [("sparsa_dense", None)] + [("sparsa_sparse", d) for d in densities]
    for method, nominal in cells:
        row = {"kind": "time", "length": length, "method": method, "nominal_density": nominal}
        rec.emit(_timed_cell(setup, row, lambda: _time_sparsa(setup, q, k, v, length, nominal)))
    del q, k, v
    free_memory(setup.device)


def _timed_cell(setup: Setup, row: dict, run) -> dict:
    """``row`` completed by ``run()``, or with the error that stopped it (the run goes on)."""
    if setup.out_of_time():
        return {**row, "error": "skipped: time limit"}
    try:
        return {**row, **run()}
    except Exception as e:  # noqa: BLE001 -- compile errors, OOM, unsupported backends: record and go on
        free_memory(setup.device)
        return {**row, "error": _error_text(e)}


def _time_sdpa(setup: Setup, q, k, v, name: str) -> dict:
    fn, gqa = sdpa_call(q, k, v, name)
    ms, n = setup.measure(fn)
    return {"ms": ms, "reps": n, "sdpa_gqa": gqa}


def _time_sparsa(setup: Setup, q, k, v, length: int, nominal) -> dict:
    if nominal is None:
        build, topk = (lambda: BlockPattern.dense(length, device=setup.device)), None
    else:
        build, topk = sparse_builder(length, nominal, setup.kv_heads, setup.device, seed=length)
    pattern = build()
    pattern_ms, _ = setup.measure(build)
    mask_ms = None
    if flex.flex_available():
        mask_ms, _ = setup.measure(lambda: build_mask(setup, pattern))
    ms, n = setup.measure(sparsa_call(setup, q, k, v, pattern))
    return {"density": pattern.density(), "topk": topk, "ms": ms, "reps": n, "pattern_ms": pattern_ms,
            "mask_ms": mask_ms}


def run_kernel_options_sweep(lengths=SWEEP_LENGTHS, options=SWEEP_OPTIONS, batch: int = 1, q_heads: int = 32,
                             kv_heads: int = 8, head_dim: int = 128, dtype="bfloat16", device="cuda",
                             warmup: int = 1, reps: int = 50, out_jsonl: str | None = None, progress: bool = True,
                             *, budget_s: float = 1.0, time_limit_s: float | None = None,
                             run_id: str | None = None) -> list[dict]:
    """Sparsa dense (flex) under each FlexAttention ``kernel_options`` dict, to tune sparsa's default.

    Each option's output is compared with the default's (``rel_err``): a fast wrong configuration is no use.
    """
    setup = make_setup(batch, q_heads, kv_heads, head_dim, dtype, device, "flex", warmup, reps, budget_s,
                       time_limit_s)
    rec = Recorder({**environment(setup.device, run_id), **setup.fields()}, out_jsonl, progress,
                   len(lengths) * len(options))
    try:
        with torch.no_grad():
            for length in lengths:
                _sweep_length(setup, length, options, rec)
                free_memory(setup.device)
    finally:
        rec.close()
    return add_ratios(rec.rows)


def _sweep_length(setup: Setup, length: int, options, rec: Recorder) -> None:
    q, k, v = setup.qkv(length, seed=length)
    pattern = BlockPattern.dense(length, device=setup.device)
    reference = None
    for opts in options:
        row = {"kind": "sweep", "length": length, "method": "sparsa_dense", "density": 1.0,
               "kernel_options": json.dumps(opts, sort_keys=True)}
        if opts and opts.get("IS_DIVISIBLE") and length % DEFAULT_BLOCK:
            rec.emit({**row, "error": "skipped: IS_DIVISIBLE needs a multiple of 128"})
            continue

        def run():
            nonlocal reference
            fn = sparsa_call(setup, q, k, v, pattern, kernel_options=opts)
            out = fn()  # compiles this configuration
            if reference is None:
                reference = out
            err = rel_error(out, reference)
            del out
            ms, n = setup.measure(fn)
            return {"ms": ms, "reps": n, "rel_err": err}

        rec.emit(_timed_cell(setup, row, run))
    del q, k, v, reference


# ------------------------------------------------------------------------------------------------ report
_TIME_HEADER = ("length", "method", "density", "ms", "vs SDPA", "vs best SDPA", "vs sparsa dense", "pattern ms",
                "mask ms", "mask / attn", "notes")
_SWEEP_HEADER = ("length", "kernel_options", "ms", "vs default", "vs SDPA", "rel err vs default", "notes")


def format_table(rows: list[dict]) -> str:
    """Markdown: a header (device, versions, date, command, shapes), the checks, the timings, the sweep."""
    rows = add_ratios([dict(r) for r in rows])
    if not rows:
        return "(no rows)"
    first = rows[0]
    gqa = f"{first['q_heads']} query heads, {first['kv_heads']} KV heads"
    clock = "CUDA-event timings" if first["device"].startswith("cuda") else "wall-clock timings"
    baselines = sorted({r["sdpa_baseline"] for r in rows if r.get("sdpa_baseline")}) or ["sdpa_flash"]
    lines = [
        f"**{first['device_name']}** · torch {first['torch']} · triton {first.get('triton') or '-'} · "
        f"CUDA {first.get('cuda') or '-'} · {first['date']}",
        "",
        f"Command: `{first['command']}`",
        "",
        f"Causal prefill, B={first['batch']}, {gqa}, D={first['head_dim']}, {first['dtype']}; sparsa backend "
        f"`{first['backend']}`, {first['block']}-token blocks; medians of {clock}. Sparsa ms is the "
        "kernel on a prebuilt BlockMask; pattern ms (from_block_scores) and mask ms (BlockMask) are timed apart. "
        f"vs SDPA = {' / '.join(baselines)} ms / ms (> 1 is faster); vs sparsa dense = ms / dense ms. "
        "Sparse patterns: per-KV-head top-k of random block scores; density is the measured causal density.",
    ]
    checks = [r for r in rows if r["kind"] == "check"]
    if checks:
        lines += ["", "Correctness (relative error ||a-b||/||b||):", ""]
        lines += [f"- {r['method']} at {r['length']}: {r['rel_err']:.2e} (tol {r['tol']:.0e}) "
                  f"{'ok' if r['passed'] else 'FAILED'}" for r in checks]
    timed = sorted((r for r in rows if r["kind"] == "time"), key=_row_order)  # extra SDPA rows come last in a run
    if timed:
        lines += ["", *_markdown(_TIME_HEADER, [_time_cells(r) for r in timed], left=(2, 11))]
    sweep = [r for r in rows if r["kind"] == "sweep"]
    if sweep:
        lines += ["", "Kernel options, sparsa dense:", "",
                  *_markdown(_SWEEP_HEADER, [_sweep_cells(r) for r in sweep], left=(2, 7))]
    return "\n".join(lines)


def _row_order(r: dict):
    method = r["method"]
    if method.startswith("sdpa_"):
        rank = list(_SDPA_ENUM).index(method[5:]) if method[5:] in _SDPA_ENUM else len(_SDPA_ENUM)
    else:
        rank = len(_SDPA_ENUM) + 1 + (method != "sparsa_dense")
    return r["length"], rank, -(r.get("nominal_density") or 1.0)


def _time_cells(r: dict) -> list[str]:
    notes = []
    if r.get("sdpa_gqa") == "expanded":
        notes.append("K/V expanded (no native GQA)")
    if r.get("topk") is not None:
        notes.append(f"top-{r['topk']} of {-(-r['length'] // r['block'])} blocks, nominal {r['nominal_density']:g}")
    if r.get("error"):
        notes.append(r["error"])
    return [_length(r["length"]), r["method"], _pct(r.get("density")), _num(r.get("ms")),
            _x(r.get("ratio_vs_sdpa")), _x(r.get("ratio_vs_best_sdpa")), _x(r.get("ratio_vs_dense"), 3),
            _num(r.get("pattern_ms")), _num(r.get("mask_ms")), _pct(r.get("mask_ratio"), 2), "; ".join(notes)]


def _sweep_cells(r: dict) -> list[str]:
    err = r.get("rel_err")
    return [_length(r["length"]), f"`{r['kernel_options']}`", _num(r.get("ms")), _x(r.get("ratio_vs_dense"), 3),
            _x(r.get("ratio_vs_sdpa")), "-" if err is None else f"{err:.1e}", r.get("error") or ""]


def _markdown(header, body, left=()) -> list[str]:
    align = ["---" if i + 1 in left else "---:" for i in range(len(header))]
    clean = lambda cells: [str(c).replace("|", "\\|") for c in cells]  # noqa: E731
    return ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|",
            *("| " + " | ".join(clean(cells)) + " |" for cells in body)]


def _length(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def _num(x) -> str:
    if x is None:
        return "-"
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def _x(x, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}x"


def _pct(x, digits: int = 1) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}%"


def format_summary(rows: list[dict]) -> str:
    """The issue's targets against the measured rows (only those that were measured)."""
    rows = add_ratios([dict(r) for r in rows if r["kind"] == "time" and r.get("ms") is not None])
    dense = [r for r in rows if r["method"] == "sparsa_dense" and 32768 <= r["length"] <= 131072]
    tenth = [r for r in rows if r.get("nominal_density") == 0.1 and 65536 <= r["length"] <= 131072]
    longest = [r for r in rows if r["method"].startswith("sparsa") and r["length"] >= 131072
               and r.get("mask_ratio") is not None]
    lines = ["Targets:"]
    lines.append(_target("sparsa dense vs SDPA flash, 32K-128K", dense, "ratio_vs_sdpa", ">=", 1.25, "x"))
    lines.append(_target("sparsa at 10% vs sparsa dense, 64K-128K", tenth, "ratio_vs_dense", "<=", 0.15, "x"))
    lines.append(_target("mask construction / attention at 128K", longest, "mask_ratio", "<=", 0.01, "%"))
    return "\n".join(lines)


def _target(label, rows, field, op, bound, unit) -> str:
    values = [(r, r.get(field)) for r in rows if r.get(field) is not None]
    if not values:
        return f"- {label}: not measured"
    show = (lambda v: f"{100 * v:.2f}%") if unit == "%" else (lambda v: f"{v:.3f}x")  # noqa: E731
    ok = all(v >= bound if op == ">=" else v <= bound for _, v in values)
    detail = ", ".join(f"{_length(r['length'])} {_tag(r)}{show(v)}" for r, v in values)
    return f"- {label}: {detail} (target {op} {show(bound)}): {'PASS' if ok else 'FAIL'}"


def _tag(row: dict) -> str:
    return "" if row["method"] != "sparsa_sparse" else f"({100 * row['density']:.0f}%) "


def read_jsonl(path: str, last_run_only: bool = True) -> list[dict]:
    """Rows from a JSONL file; by default only those of the last run in it (runs append)."""
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if last_run_only and rows:
        rows = [r for r in rows if r.get("run_id") == rows[-1].get("run_id")]
    return rows


# ------------------------------------------------------------------------------------------------ command line
def _int_list(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if part:
            out.append(int(part[:-1]) * 1024 if part.endswith("k") else int(part))
    return out


def _float_list(text: str) -> list[float]:
    return [float(p) for p in text.split(",") if p.strip()]


def _name_list(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    bad = [n for n in names if n not in _SDPA_ENUM]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown SDPA backend(s) {bad}; choose from {sorted(_SDPA_ENUM)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparsa speed", description="Kernel speed: torch SDPA vs sparsa dense vs "
                                "sparsa at several densities, causal prefill, after a correctness check.")
    p.add_argument("--lengths", type=_int_list, default=list(DEFAULT_LENGTHS),
                   help="comma-separated sequence lengths (e.g. 4096,8192 or 4k,128k)")
    p.add_argument("--densities", type=_float_list, default=list(DEFAULT_DENSITIES),
                   help="comma-separated target densities for the sparse patterns")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", default="flex", choices=list(ops.BACKENDS))
    p.add_argument("--sdpa-backends", type=_name_list, default=list(SDPA_BACKENDS),
                   help="SDPA backends to time, the first available one is the baseline (default flash,cudnn,"
                        "efficient)")
    p.add_argument("--no-check", action="store_true", help="skip the correctness checks")
    p.add_argument("--check-lengths", type=_int_list, default=list(CHECK_LENGTHS))
    p.add_argument("--sparse-check-length", type=int, default=SPARSE_CHECK_LENGTH)
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before timing (the first compiles)")
    p.add_argument("--reps", type=int, default=50, help="most timed calls per cell")
    p.add_argument("--budget", type=float, default=1.0, help="about this many seconds of timed calls per cell")
    p.add_argument("--time-limit", type=float, default=None,
                   help="seconds; cells not started by then are recorded as skipped (the table still prints)")
    p.add_argument("--jsonl", default=None, help="append each row to this JSONL file as it is measured")
    p.add_argument("--markdown", default=None, help="also write the final table to this file")
    p.add_argument("--kernel-options-sweep", action="store_true",
                   help="afterwards, time sparsa dense under a few FlexAttention kernel_options")
    p.add_argument("--sweep-lengths", type=_int_list, default=list(SWEEP_LENGTHS))
    p.add_argument("--sweep-only", action="store_true", help="only the kernel-options sweep (no checks)")
    p.add_argument("--from-jsonl", default=None, help="print the table of an earlier run's JSONL and exit")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: when stderr is a terminal)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.from_jsonl:
        rows = read_jsonl(args.from_jsonl)
        _report(rows, args.markdown)
        return 0
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    start = time.perf_counter()
    shape = dict(batch=args.batch, q_heads=args.q_heads, kv_heads=args.kv_heads, head_dim=args.head_dim,
                 dtype=args.dtype, device=args.device, warmup=args.warmup, reps=args.reps, out_jsonl=args.jsonl,
                 progress=progress, budget_s=args.budget, run_id=new_run_id())

    def remaining():
        return None if args.time_limit is None else args.time_limit - (time.perf_counter() - start)

    sweep = args.kernel_options_sweep or args.sweep_only
    first, rest = args.sdpa_backends[:1], args.sdpa_backends[1:]
    rows: list[dict] = []
    if not args.sweep_only:
        try:
            # With a sweep, the extra SDPA backends go last of all (see run_speed on faulting backends).
            rows += run_speed(args.lengths, args.densities, backend=args.backend, check=not args.no_check,
                              sdpa_backends=first if sweep else args.sdpa_backends,
                              check_lengths=args.check_lengths, sparse_check_length=args.sparse_check_length,
                              time_limit_s=remaining(), **shape)
        except CheckFailed as e:
            _report(e.rows, args.markdown)
            print(f"ABORTED: {e}", file=sys.stderr)
            return 1
    if sweep:
        rows += run_kernel_options_sweep(args.sweep_lengths, time_limit_s=remaining(), **shape)
        if not args.sweep_only and rest:
            rows += run_speed(args.lengths, (), backend=args.backend, check=False, sdpa_backends=rest,
                              sparsa=False, time_limit_s=remaining(), **shape)
    _report(rows, args.markdown)
    print(f"total {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return 0


def _report(rows: list[dict], markdown_path: str | None) -> None:
    text = format_table(rows) + "\n\n" + format_summary(rows) + "\n"
    print("\n" + text, flush=True)
    if markdown_path:
        os.makedirs(os.path.dirname(os.path.abspath(markdown_path)), exist_ok=True)
        with open(markdown_path, "w") as f:
            f.write(text)


if __name__ == "__main__":
    sys.exit(main())
