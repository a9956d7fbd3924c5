"""``sparsa bench``: methods x tasks x lengths (x depths) on a model, against dense attention on the same samples.

Each cell (method, task, length, depth) generates its samples from a fixed seed (the same for every method),
runs greedy generation with the method configured through ``sparsa.configure``, and appends one JSON row to
the results file as soon as it finishes: score, the dense score on the same samples, retention, the density
the prefill actually computed (``sparsa.stats``), wall time. A killed run resumes where it stopped (cells
already in the file are skipped), losing at most the cell that was running.

Methods are given as ``name`` or ``name:key=value,key=value`` (values parsed as JSON, else kept as text).
``dense`` is the baseline: the model's own dense attention (sparsa with nothing configured, identical to
``sdpa``). Selectors run with ``dense_below=0`` so that the method itself is measured at every length.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import tasks as task_lib

BUNDLED = Path(__file__).resolve().parent.parent / "models"
DEFAULT_MODEL = "ref-tiny"
# The default run: the CPU model at lengths it was trained for, with windows small enough that the
# selectors really skip work there (their paper defaults span more than 2K tokens).
DEFAULT_METHODS = ["dense", "streaming:window=128", "a_shape:n_init=64,n_local=192", "sliding_window:window=256"]
DEFAULT_TASKS = ["passkey", "niah_single", "niah_multikey"]
DEFAULT_LENGTHS = [1024, 2048]
DEFAULT_DEPTHS = [0.1, 0.5, 0.9]


@dataclass(frozen=True)
class MethodSpec:
    label: str
    name: str  # "dense" = the baseline (no prefill method)
    params: dict = field(default_factory=dict, hash=False)
    #: every parameter of the method as created, defaults included (JSON): part of a cell's key, so results
    #: made before a default changed are not resumed as if they were this method's
    config: str = field(default="", compare=False)

    @property
    def baseline(self) -> bool:
        return self.name == "dense"


def parse_method(text: str) -> MethodSpec:
    """``"streaming:window=256,sink=4"`` -> MethodSpec; unknown names and parameters are caught here. A value is
    JSON where it parses (``dense_layers=[0,5]``, ``threshold=0.01``), else a string."""
    from .. import registry

    name, _, rest = text.strip().partition(":")
    params = {}
    for item in filter(None, (p.strip() for p in split_outside_brackets(rest))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"method parameter {item!r} in {text!r} must look like key=value")
        try:
            params[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            params[key.strip()] = value.strip()
    config = ""
    if name != "dense" or params:
        method = registry.create("prefill", name, **params)  # validates the name and parameters now, not mid-run
        config = method_config(method)
    return MethodSpec(text.strip(), name, params, config)


def split_outside_brackets(text: str, sep: str = ",") -> list[str]:
    """Split at ``sep`` outside brackets, so that a list value (``dense_layers=[0,1]``) keeps its commas."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch in "[("
        depth -= ch in "])"
        if ch == sep and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return items


def method_config(method) -> str:
    """A method's parameters as created (its dataclass fields, defaults included), as canonical JSON."""
    values = {f.name: getattr(method, f.name) for f in dataclasses.fields(method)} if dataclasses.is_dataclass(method) \
        else {}
    return json.dumps(values, sort_keys=True, default=repr)


def model_fingerprint(path: Path) -> str:
    """A short hash of a model directory's config and weights (1 MiB from the middle of each weight file):
    a retrained checkpoint under the same name gets new cell keys, so its results are never mixed with the
    old ones on resume."""
    digest = hashlib.sha1()
    for file in sorted(path.iterdir()):
        if file.name == "config.json":
            digest.update(file.read_bytes())
        elif file.suffix in (".safetensors", ".bin"):
            size = file.stat().st_size
            with file.open("rb") as f:
                f.seek(max(size // 2 - (1 << 19), 0))
                digest.update(f.read(1 << 20))
            digest.update(str(size).encode())
    return digest.hexdigest()[:10]


def resolve_model(model: str | None) -> Path:
    """A bundled model name (``ref-tiny``, ``ref-small``) or a local Hugging Face model directory."""
    name = model or DEFAULT_MODEL
    path = Path(name)
    if path.is_dir():
        return path
    if (BUNDLED / name).is_dir():
        return BUNDLED / name
    known = sorted(p.name for p in BUNDLED.glob("ref-*") if p.is_dir())
    raise ValueError(f"--model {name!r} is neither a directory nor a bundled model; bundled: {known}")


def load_model(path: Path, device: str, dtype: str | None = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import sparsa  # noqa: F401  (registers the "sparsa" attention implementation)

    torch_dtype = getattr(torch, dtype) if dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sparsa", dtype=torch_dtype)
    model = model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


# ------------------------------------------------------------------------------------------------- cells
@dataclass(frozen=True)
class Cell:
    task: str
    length: int
    depth: float | None
    method: MethodSpec

    def key(self, model: str, n: int, seed: int) -> str:
        text = json.dumps([model, self.method.label, self.method.config, self.task, self.length, self.depth, n, seed,
                           task_lib.FORMAT])
        return hashlib.sha1(text.encode()).hexdigest()[:16]


def plan_cells(tasks, lengths, depths, methods) -> list[Cell]:
    """Every cell; for each (task, length, depth) the dense baseline comes first."""
    cells = []
    for name in tasks:
        task = task_lib.get(name)
        for length in lengths:
            for depth in (depths if depths and task.has_depth else [None]):
                ordered = sorted(methods, key=lambda m: not m.baseline)
                cells += [Cell(name, length, depth, m) for m in ordered]
    return cells


def cell_samples(cell: Cell, n: int, seed: int, tokenizer) -> list[dict]:
    task = task_lib.get(cell.task)
    depths = None if cell.depth is None else [cell.depth]
    return task.generate(n, cell.length, task_lib.cell_seed(seed, cell.length, cell.depth), tokenizer, depths)


def run_cell(model, tokenizer, cell: Cell, samples: list[dict], batch_size: int) -> dict:
    """Score one cell; returns the measured fields of its row."""
    import sparsa

    method = cell.method
    if method.baseline:
        sparsa.configure(model)
    else:
        # Sparse at every length unless the method string sets its own dense_below (then its fallback is measured)
        params = dict(method.params)
        sparsa.configure(model, prefill=method.name, dense_below=params.pop("dense_below", 0), **params)
    task = task_lib.get(cell.task)
    start = time.perf_counter()
    scores, densities, fallbacks = [], [], 0
    for i in range(0, len(samples), batch_size):
        batch = samples[i: i + batch_size]
        if cell.task == "perplexity":
            scores += [_perplexity_score(model, tokenizer, s) for s in batch]
        else:
            outputs = _generate(model, tokenizer, batch)
            scores += [task.score(s, o) for s, o in zip(batch, outputs)]
        st = sparsa.stats(model, prefill=True)
        densities.append(1.0 if method.baseline or st["density"] is None else st["density"])
        fallbacks += len(st["fallbacks"])
    seconds = time.perf_counter() - start
    prefill = None if cell.task == "perplexity" else prefill_ms(model, tokenizer, samples[:1])
    return {"score": sum(scores) / len(scores), "scores": scores, "density": sum(densities) / len(densities),
            "seconds": seconds, "prefill_ms": prefill, "fallbacks": fallbacks,
            "tokens": sum(s["n_tokens"] for s in samples) / len(samples)}


@torch.no_grad()
def prefill_ms(model, tokenizer, batch, reps: int = 3) -> float:
    """Median milliseconds of one prefill forward pass of the cell's first prompt (B=1): the cell's speed against
    dense on the same input, free of decoding and first-call compilation. One untimed pass first: generate()
    ran the batch's shape, and a new shape can compile (FlexAttention, Triton) on its first call."""
    enc = tokenizer([s["prompt"] for s in batch], return_tensors="pt", padding=True, add_special_tokens=False)
    enc = {k: v.to(model.device) for k, v in enc.items()}
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    model(**enc, use_cache=True, logits_to_keep=1)
    times = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        model(**enc, use_cache=True, logits_to_keep=1)
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


@torch.no_grad()
def _generate(model, tokenizer, batch) -> list[str]:
    enc = tokenizer([s["prompt"] for s in batch], return_tensors="pt", padding=True, add_special_tokens=False)
    enc = {k: v.to(model.device) for k, v in enc.items()}
    new = max(s["max_new_tokens"] for s in batch)
    out = model.generate(**enc, max_new_tokens=new, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return [tokenizer.decode(row, skip_special_tokens=True) for row in out[:, enc["input_ids"].shape[1]:]]


@torch.no_grad()
def _perplexity_score(model, tokenizer, sample) -> float:
    """exp(-mean NLL) over the scored tail: the geometric-mean token probability (higher is better), so that
    sparse / dense is exp(dense NLL - sparse NLL)."""
    ids = torch.tensor([tokenizer.encode(sample["prompt"], add_special_tokens=False)], device=model.device)
    logits = model(ids).logits[0, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
    start = max(int(sample.get("loss_start", 0)) - 1, 0)
    return float(torch.exp(-nll[start:].mean()))


# --------------------------------------------------------------------------------------------- results
def read_rows(path: Path) -> list[dict]:
    rows = []
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a killed run
    return rows


def append_row(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # A run killed mid-write leaves a partial last line: start on a fresh line so the new row stays whole.
    fresh = path.exists() and path.stat().st_size > 0 and not _ends_with_newline(path)
    with path.open("a") as f:
        f.write(("\n" if fresh else "") + json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def make_row(cell: Cell, measured: dict, model_name: str, n: int, seed: int, device: str, dense: dict | None):
    row = {"run": "bench", "model": model_name, "method": cell.method.label, "method_name": cell.method.name,
           "params": cell.method.params, "task": cell.task, "task_params": {}, "length": cell.length,
           "depth": cell.depth, "n": n, "seed": seed, **measured, "device": device,
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "key": cell.key(model_name, n, seed)}
    dense_score = measured["score"] if cell.method.baseline else (dense or {}).get("score")
    row["dense_score"] = dense_score
    row["dense_seconds"] = measured["seconds"] if cell.method.baseline else (dense or {}).get("seconds")
    row["dense_prefill_ms"] = measured["prefill_ms"] if cell.method.baseline else (dense or {}).get("prefill_ms")
    row["retention"] = measured["score"] / dense_score if dense_score else None
    return row


def _dense_key(cell: Cell, model_name, n, seed) -> str:
    return Cell(cell.task, cell.length, cell.depth, MethodSpec("dense", "dense")).key(model_name, n, seed)


# ------------------------------------------------------------------------------------------------ run
def run_bench(model=None, methods=None, tasks=None, lengths=None, depths=DEFAULT_DEPTHS, n: int = 4, seed: int = 0,
              out: str | Path = "results/bench.jsonl", device: str = "cpu", dtype: str | None = None,
              batch_size: int = 4, progress: bool = True, ray_address: str | None | bool = False) -> list[dict]:
    """Run (or resume) a benchmark; returns every row of the results file for this configuration."""
    path = resolve_model(model)
    model_name = f"{path.name}@{model_fingerprint(path)}"  # the checkpoint, not just its folder's name
    specs = [parse_method(m) for m in (methods or DEFAULT_METHODS)]
    if not any(s.baseline for s in specs):
        specs.insert(0, MethodSpec("dense", "dense"))  # retention needs the baseline on the same samples
    cells = plan_cells(tasks or DEFAULT_TASKS, lengths or DEFAULT_LENGTHS, depths, specs)
    out = Path(out)
    done = {r["key"]: r for r in read_rows(out)}
    todo = [c for c in cells if c.key(model_name, n, seed) not in done]
    if ray_address is not False:
        from .distributed import run_cells_ray

        run_cells_ray(todo, done, path, model_name, n, seed, out, device, dtype, batch_size, ray_address, progress)
    else:
        _run_local(todo, done, path, model_name, n, seed, out, device, dtype, batch_size, progress)
    keys = {c.key(model_name, n, seed) for c in cells}
    return [r for r in read_rows(out) if r.get("key") in keys]


def _run_local(todo, done, path, model_name, n, seed, out, device, dtype, batch_size, progress):
    if not todo:
        return
    from tqdm.auto import tqdm

    model, tokenizer = load_model(path, device, dtype)
    bar = tqdm(todo, desc="sparsa bench", unit="cell", disable=not progress)
    for cell in bar:
        bar.set_postfix_str(f"{cell.method.label} {cell.task} {cell.length}" +
                            ("" if cell.depth is None else f" d={cell.depth}"))
        row = evaluate_cell(model, tokenizer, cell, model_name, n, seed, device, batch_size, done)
        append_row(out, row)
        done[row["key"]] = row


def evaluate_cell(model, tokenizer, cell, model_name, n, seed, device, batch_size, done) -> dict:
    samples = cell_samples(cell, n, seed, tokenizer)
    measured = run_cell(model, tokenizer, cell, samples, batch_size)
    return make_row(cell, measured, model_name, n, seed, device, done.get(_dense_key(cell, model_name, n, seed)))


# ------------------------------------------------------------------------------------------------ CLI
def _csv(text, cast=str):
    return [cast(x) for x in text.split(",") if x.strip()] if text else None


def main(argv=None) -> int:
    if argv and argv[0] == "report":
        from .report import main as report_main

        return report_main(argv[1:]) or 0
    p = argparse.ArgumentParser(prog="sparsa bench", description="Accuracy retention and speed of attention "
                                "methods against dense attention, on the same samples. `sparsa bench report "
                                "RESULTS` writes tables and plots.")
    p.add_argument("--model", default=None, help=f"model directory, or a bundled model (default {DEFAULT_MODEL})")
    p.add_argument("--methods", default=None, help="comma-separated with ';' between methods, e.g. "
                   "'dense;streaming:window=256;a_shape' (default: %s)" % ";".join(DEFAULT_METHODS))
    p.add_argument("--tasks", default=None, help=f"comma-separated task names (default {','.join(DEFAULT_TASKS)}); "
                   f"available: {','.join(task_lib.names())}")
    p.add_argument("--lengths", default=None, help="comma-separated lengths in tokens (default "
                   f"{','.join(map(str, DEFAULT_LENGTHS))})")
    p.add_argument("--depths", default=",".join(map(str, DEFAULT_DEPTHS)),
                   help="needle depths for tasks that have one; 'none' for one random-depth cell per length")
    p.add_argument("-n", "--samples", type=int, default=4, help="samples per cell (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/bench.jsonl", help="results JSONL (appended; resumes)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="model dtype (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--ray", nargs="?", const=None, default=False, metavar="ADDRESS",
                   help="run cells as Ray tasks (one GPU each where there are GPUs); no ADDRESS: a local Ray")
    p.add_argument("--no-report", action="store_true", help="do not print the table at the end")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    methods = [m for m in args.methods.split(";")] if args.methods else None
    depths = None if args.depths.strip().lower() == "none" else _csv(args.depths, float)
    try:
        rows = run_bench(args.model, methods, _csv(args.tasks), _csv(args.lengths, int), depths, args.samples,
                         args.seed, args.out, args.device, args.dtype, args.batch_size, not args.no_progress,
                         args.ray)
    except ValueError as e:
        p.error(str(e))
    if not args.no_report:
        from .report import markdown_table

        print(markdown_table(rows))
        print(f"\nresults: {args.out}  (tables and plots: sparsa bench report {args.out})")
    return 0
