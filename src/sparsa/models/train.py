"""Train a reference model: a standard ``LlamaForCausalLM`` that can retrieve from long contexts.

Seeded and driven by a JSON config (``src/sparsa/models/configs/*.json``). The recipe follows what the
project measured on the H200 (shared/REFERENCE_MODELS.md):

1. bootstrap copying first (short samples built only to teach copying, densely supervised): a random list
   that is then repeated; a few needle lines followed by several questions in a row;
2. then the real tasks (``sparsa.tasks``, training seeds disjoint from evaluation seeds) mixed with those
   samples, the length growing from ``min_len`` to ``max_len`` over ``ramp_frac`` of training;
3. progress = max(step / steps, elapsed / max_minutes): the curriculum and the cosine learning rate follow
   the fraction of the time budget used, as in the recipe that worked (a fixed step count either overruns a
   GPU lease or stops mid-schedule);
4. loss = mean cross-entropy on answer tokens + ``prompt_weight`` x mean cross-entropy on prompt tokens, so
   long batches still carry answer signal; AdamW, warm-up, cosine.

Usage (GPU): ``python -m sparsa.models.train --config ref-small --out DIR``; data-parallel over the GPUs of one
machine: ``torchrun --nproc_per_node 2 -m sparsa.models.train ...`` (same global batch, more steps per
minute). Writes the model with
``save_pretrained`` (safetensors, bf16 or fp32 per config), the tokenizer, ``train_log.jsonl`` and
``eval.json`` (greedy accuracy of the dense model per task and length).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import string
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..tasks.words import key_word
from .tokenizer import byte_tokenizer

CONFIG_DIR = Path(__file__).parent / "configs"
TRAIN_SEED_BASE = 10_000_000  # evaluation uses small seeds; training never overlaps them


@dataclass
class TrainConfig:
    name: str
    model: dict
    seed: int = 0
    steps: int = 2000
    max_minutes: float = 9.0
    tokens_per_step: int = 131072
    min_len: int = 512
    max_len: int = 4096
    bootstrap_frac: float = 0.15
    ramp_frac: float = 0.4
    bootstrap_len: tuple = (128, 512)
    copy_share: float = 0.2  # share of copy samples after the bootstrap
    lr: float = 1.5e-3
    min_lr_frac: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    prompt_weight: float = 0.1
    save_dtype: str = "float32"
    tasks: dict = field(default_factory=dict)  # task name -> sampling weight
    task_params: dict = field(default_factory=dict)  # task name -> generator params
    eval_tasks: list = field(default_factory=list)
    eval_lengths: list = field(default_factory=list)
    eval_samples: int = 20
    workers: int = 8
    init_from: str | None = None  # continue from this checkpoint (a bundled model name or a directory)
    short_frac: float = 0.5  # task samples are drawn between short_frac * length and length tokens

    @classmethod
    def load(cls, name_or_path: str) -> "TrainConfig":
        path = Path(name_or_path)
        if not path.exists():
            path = CONFIG_DIR / f"{name_or_path}.json"
        if not path.exists():
            known = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
            raise ValueError(f"config {name_or_path!r} not found; known configs: {known}")
        return cls(**json.loads(path.read_text()))


# ------------------------------------------------------------------------------------------- samples
WORDS = ("apple river stone cloud amber maple violet copper lantern meadow falcon harbor silver canyon "
         "thunder willow orchid ember glacier cobalt saffron walnut quartz heron tundra cedar lotus").split()


def _number(rng, digits=7):
    return str(rng.randrange(10 ** (digits - 1), 10 ** digits))


def _list_item(rng):
    """A word, a number, or a random run of upper- or lowercase letters. The tasks' only random letters are
    vt's 5-letter uppercase names; with words and numbers alone the copy circuit learned to copy digits only
    (a teacher-forced vt answer stayed at ln 26 nats per letter), so vt never got off the ground."""
    r = rng.random()
    if r < 0.3:
        return rng.choice(WORDS)
    if r < 0.6:
        return _number(rng, rng.randint(2, 7))
    letters = string.ascii_uppercase if r < 0.85 else string.ascii_lowercase
    return "".join(rng.choices(letters, k=rng.randint(2, 7)))


def copy_list_sample(rng, length):
    """A random list, then the same list again: teaches the copy (induction) circuit, for letters as well as
    digits."""
    items = []
    while len(" ".join(items)) * 2 + 20 < length:
        items.append(_list_item(rng))
    items = items or ["x"]
    text = " ".join(items)
    return [(f"List: {text}\nRepeat the list: ", False), (text + "\n", True)]


def needle_questions_sample(rng, length):
    """Needle lines, then several questions in a row, each answered: dense supervision on retrieval.

    The keys are the evaluation tasks' "adjective-noun" keys, all of one length: a model can then find a needle
    only by its key's content (ref-small learnt to match keys by their length, which fails whenever two keys
    are as long; MODEL.md)."""
    keys, segs, lines = [], [], []
    budget = max(length - 40, 60)
    size, draws = len(key_word(rng)), 0
    while sum(len(s) for s in lines) < budget * 0.55 and draws < 20_000:  # a rare length may run out of keys
        key = key_word(rng)
        draws += 1
        if len(key) != size or any(key == k for k, _ in keys):
            continue
        value = _number(rng)
        keys.append((key, value))
        lines.append(f"One of the special magic numbers for {key} is: {value}.\n")
    segs.append(("".join(lines), False))
    asked = rng.sample(keys, k=min(len(keys), max(1, len(keys) // 2)))
    for key, value in asked:
        segs.append((f"What is the special magic number for {key} mentioned in the provided text? "
                     f"The special magic number for {key} mentioned in the provided text is", False))
        segs.append((f" {value}.\n", True))
    return segs


def task_sample(task, rng, length, tokenizer):
    """One sample of a real task, as (prompt, completion) segments."""
    seed = TRAIN_SEED_BASE + rng.randrange(1 << 30)
    sample = task.generate(1, length, seed, tokenizer)[0]
    return [(sample["prompt"], False), (completion_text(sample), True)]


def make_task(task_lib, cfg, name):
    """A task by config name; ``task_params[name]`` may name the real task (``{"task": "niah_single", ...}``)
    so that one task appears with several settings (e.g. noise and prose haystacks)."""
    params = dict(cfg.task_params.get(name, {}))
    return task_lib.get(params.pop("task", name), **params)


def completion_text(sample) -> str:
    """The canonical completion of a task sample: its answers, comma-separated, then a period."""
    if sample.get("target"):
        return sample["target"]
    sep = "" if sample["prompt"][-1:].isspace() else " "  # vt's prompt ends with "they are: "
    return sep + ", ".join(str(a) for a in sample["answers"]) + "."


def encode_segments(segments, tokenizer, max_len):
    """Token ids, and which of them are answer tokens; truncated from the left to ``max_len``."""
    ids, answer = [], []
    for text, is_answer in segments:
        piece = tokenizer.encode(text, add_special_tokens=False)
        ids += piece
        answer += [is_answer] * len(piece)
    return ids[-max_len:], answer[-max_len:]


class Batches(torch.utils.data.IterableDataset):
    """Training batches, one per step, generated in worker processes (step s by worker s mod W). With data
    parallelism each of ``world`` ranks makes its own share of a step: the same sample length, a
    ``1 / world`` share of ``tokens_per_step``, different samples."""

    def __init__(self, cfg: TrainConfig, progress=None, start_step: int = 0, rank: int = 0, world: int = 1):
        self.cfg = cfg
        self.progress = progress  # shared value in [0, 1] written by the training loop
        self.start = start_step
        self.rank, self.world = rank, world

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (0, 1) if info is None else (info.id, info.num_workers)
        from .. import tasks as task_lib

        tokenizer = byte_tokenizer()
        made = {name: make_task(task_lib, self.cfg, name) for name in self.cfg.tasks}
        for step in range(self.start + wid, self.cfg.steps, nw):
            yield step, self.make(step, made, tokenizer)

    def make(self, step, made, tokenizer):
        cfg = self.cfg
        rng = random.Random(cfg.seed * 1_000_003 + step)
        progress = step / cfg.steps if self.progress is None else max(self.progress.value, step / cfg.steps)
        length = length_at(cfg, progress)
        # One task-sample length per step, not per sample: rows of a step are then about as long as each other,
        # so right padding wastes little (per-sample lengths from length/8 to length padded half of every
        # long batch: 0.26 M real tokens/s on the H200, 2026-11-29), and the step holds tokens_per_step tokens.
        target = rng.randint(max(int(length * cfg.short_frac), min(1024, length)), length)
        count = max(1, cfg.tokens_per_step // self.world // target)
        if self.rank:  # same length on every rank (no rank waits for a longer one), different samples
            rng = random.Random((cfg.seed * 1_000_003 + step) * 1_009 + self.rank)
        rows = []
        for _ in range(count):
            segs = None
            if progress >= cfg.bootstrap_frac and rng.random() >= cfg.copy_share and made:
                name = rng.choices(list(cfg.tasks), weights=list(cfg.tasks.values()))[0]
                try:
                    segs = task_sample(made[name], rng, target - 16, tokenizer)
                except ValueError:  # too short for this task's fixed text: use a copy sample instead
                    segs = None
            if segs is None:
                maker = copy_list_sample if rng.random() < 0.4 else needle_questions_sample
                segs = maker(rng, rng.randint(min(cfg.bootstrap_len[0], target), target))
            rows.append(encode_segments(segs, tokenizer, length))
        return collate(rows, length)


def length_at(cfg: TrainConfig, progress: float) -> int:
    """Sequence length at a training progress in [0, 1]: bootstrap length, then a linear ramp from min_len to
    max_len over ``ramp_frac`` of training, then max_len."""
    if progress < cfg.bootstrap_frac:
        return cfg.bootstrap_len[1]
    frac = min((progress - cfg.bootstrap_frac) / max(cfg.ramp_frac, 1e-9), 1.0)
    length = cfg.min_len + frac * (cfg.max_len - cfg.min_len)
    return max(256, int(round(length / 256)) * 256)


def collate(rows, length):
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), 0, dtype=torch.long)
    answer = torch.zeros(len(rows), width, dtype=torch.bool)
    real = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, (row, ans) in enumerate(rows):  # right padding: causal attention never sees it
        ids[i, : len(row)] = torch.tensor(row)
        answer[i, : len(ans)] = torch.tensor(ans)
        real[i, : len(row)] = True
    return ids, answer, real


# ------------------------------------------------------------------------------------------------ loop
def build_model(cfg: TrainConfig):
    from transformers import LlamaConfig, LlamaForCausalLM

    from .tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE

    config = LlamaConfig(vocab_size=VOCAB_SIZE, pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                         **cfg.model)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config)


def load_weights(name_or_dir: str) -> dict:
    """fp32 state dict of a bundled model (``ref-small``) or a model directory, to continue training from."""
    from transformers import AutoModelForCausalLM

    from ..bench.runner import resolve_model

    try:
        path = resolve_model(name_or_dir)
    except ValueError as error:
        raise ValueError(f"init_from: {error}") from None
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()


def lr_at(cfg: TrainConfig, step: int, progress: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``min_lr_frac`` over the training progress."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = progress
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def loss_fn(logits, ids, answer, real, prompt_weight):
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten(),
                                           reduction="none").view(ids.shape[0], -1)
    ans = answer[:, 1:] & real[:, 1:]
    prompt = ~answer[:, 1:] & real[:, 1:]
    ans_loss = (ce * ans).sum() / ans.sum().clamp(min=1)
    prompt_loss = (ce * prompt).sum() / prompt.sum().clamp(min=1)
    return ans_loss + prompt_weight * prompt_loss, ans_loss.detach(), prompt_loss.detach()


def data_parallel(device: str) -> tuple[int, int, str]:
    """``(rank, world, device)``. Under ``torchrun`` (WORLD_SIZE > 1) this joins the process group -- NCCL with
    one GPU per rank, gloo on the CPU -- and returns this rank's device; otherwise ``(0, 1, device)``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        device = f"cuda:{local}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return rank, world, device


def _all_ranks_max(value: float, world: int, device: str) -> float:
    """The largest ``value`` over ranks: every rank stops at the same step, when the slowest clock says so."""
    if world == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def train(cfg: TrainConfig, out: Path, device: str = "cuda") -> Path:
    """Train (data-parallel under ``torchrun``: ``tokens_per_step`` is the global batch), save in rank 0."""
    rank, world, device = data_parallel(device)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    model = build_model(cfg)
    if cfg.init_from:
        model.load_state_dict(load_weights(cfg.init_from), strict=False)  # tied lm_head is not stored
    model = model.to(device)
    core = model
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[torch.device(device).index] if device.startswith("cuda") else None)
    params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95),
                            fused=device.startswith("cuda"))
    progress = torch.multiprocessing.get_context("fork").Value("d", 0.0)
    loader = torch.utils.data.DataLoader(Batches(cfg, progress, rank=rank, world=world), batch_size=None,
                                         num_workers=cfg.workers, prefetch_factor=4 if cfg.workers else None,
                                         persistent_workers=False)
    log = (out / "train_log.jsonl").open("w") if rank == 0 else None
    start = time.time()
    tokens = 0
    if rank == 0:
        print(f"[{cfg.name}] {params / 1e6:.2f}M parameters, {cfg.steps} steps planned, {world} rank(s)",
              flush=True)
    model.train()
    last_step = -1
    for step, (ids, answer, real) in loader:
        done = _all_ranks_max(max(step / cfg.steps, (time.time() - start) / (cfg.max_minutes * 60)), world, device)
        progress.value = done
        if done >= 1.0:
            if rank == 0:
                print(f"[{cfg.name}] training budget reached at step {step}", flush=True)
            break
        lr = lr_at(cfg, step, done)
        for group in opt.param_groups:
            group["lr"] = lr
        ids, answer, real = ids.to(device), answer.to(device), real.to(device)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
            logits = model(input_ids=ids).logits
        loss, ans_loss, prompt_loss = loss_fn(logits, ids, answer, real, cfg.prompt_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        tokens += int(real.sum()) * world  # ranks make equal shares of a step
        last_step = step
        elapsed = time.time() - start
        if rank == 0 and (step % 50 == 0 or step == cfg.steps - 1):
            row = {"step": step, "len": ids.shape[1], "batch": ids.shape[0], "loss": float(loss.detach()),
                   "answer_loss": float(ans_loss), "prompt_loss": float(prompt_loss), "lr": lr, "progress": done,
                   "tokens": tokens, "minutes": elapsed / 60}
            log.write(json.dumps(row) + "\n")
            log.flush()
            print(f"[{cfg.name}] " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                              for k, v in row.items()), flush=True)
    minutes = (time.time() - start) / 60
    core.eval()
    if rank == 0:
        save(core, cfg, out, {"steps_done": last_step + 1, "train_minutes": round(minutes, 2), "tokens": tokens,
                              "parameters": params, "ranks": world})
    return out


def save(model, cfg, out: Path, summary: dict):
    dtype = getattr(torch, cfg.save_dtype)
    model.to(dtype).save_pretrained(out, safe_serialization=True, max_shard_size="15MB")
    byte_tokenizer().save_pretrained(out)
    (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2))


@torch.no_grad()
def evaluate(model_dir: Path, cfg: TrainConfig, device: str = "cuda") -> dict:
    """Greedy accuracy of the dense model per task and length on evaluation seeds."""
    from transformers import AutoModelForCausalLM

    from .. import tasks as task_lib

    tokenizer = byte_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(device).eval()
    results = {}
    for name in cfg.eval_tasks:
        task = make_task(task_lib, cfg, name)
        for length in cfg.eval_lengths:
            samples = task.generate(cfg.eval_samples, length, 0, tokenizer)
            scores = [task.score(s, generate(model, tokenizer, s, device)) for s in samples]
            results[f"{name}@{length}"] = sum(scores) / len(scores)
            print(f"eval {name} {length}: {results[f'{name}@{length}']:.3f}", flush=True)
    (model_dir / "eval.json").write_text(json.dumps(results, indent=2))
    return results


def generate(model, tokenizer, sample, device) -> str:
    ids = torch.tensor([tokenizer.encode(sample["prompt"], add_special_tokens=False)], device=device)
    out = model.generate(ids, max_new_tokens=sample.get("max_new_tokens", 16), do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Train a sparsa reference model")
    parser.add_argument("--config", required=True, help="config name (src/sparsa/models/configs) or JSON path")
    parser.add_argument("--out", required=True, help="output model directory")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, help="override the config's steps (for smoke tests)")
    parser.add_argument("--no-eval", action="store_true")
    args = parser.parse_args(argv)
    cfg = TrainConfig.load(args.config)
    if args.steps is not None:
        cfg.steps = args.steps
    if args.device == "cpu":
        cfg.workers = min(cfg.workers, 0)
    out = train(cfg, Path(args.out), args.device)
    rank = int(os.environ.get("RANK", "0"))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist

        dist.barrier()  # rank 0 has saved
        dist.destroy_process_group()
    if rank == 0 and not args.no_eval and cfg.eval_tasks:
        evaluate(out, cfg, args.device)


if __name__ == "__main__":
    main()
