"""Training samples match what evaluation asks, and the copy bootstrap covers what the tasks copy."""

import random
import string

from sparsa import tasks
from sparsa.models.tokenizer import byte_tokenizer
from sparsa.models.train import copy_list_sample, encode_segments, task_sample


def test_vt_training_sample_is_eval_prompt_plus_answer():
    tok = byte_tokenizer()
    task = tasks.get("vt")
    segs = task_sample(task, random.Random(0), 1024, tok)
    (prompt, p_ans), (completion, c_ans) = segs
    assert (p_ans, c_ans) == (False, True)
    ev = task.generate(1, 1024, 0, tok)[0]
    # Same answer prefix, ending in exactly one space; the completion adds none.
    tail = prompt[prompt.rindex("\nQuestion:"):]
    assert tail.endswith(", they are: ") and ev["prompt"].endswith(", they are: ")
    assert tail.replace(tail.split("value ")[1][:5], "N") == \
        ev["prompt"][ev["prompt"].rindex("\nQuestion:"):].replace(ev["value"], "N")
    assert not completion[:1].isspace() and "  " not in prompt[-40:] + completion
    names = completion.rstrip(".").split(", ")
    assert len(names) == 5 and all(len(n) == 5 and n.isupper() for n in names)
    assert all(f"VAR {n} = " in prompt for n in names)  # the chain is in the (untruncated) prompt
    ids, answer = encode_segments(segs, tok, 4096)
    assert tok.decode([i for i, a in zip(ids, answer) if a]) == completion
    assert task.score(ev, ", ".join(ev["answers"]) + ".") == 1.0


def test_copy_bootstrap_copies_letters_not_only_digits():
    # vt's answers are random uppercase names: the copy samples must teach copying them.
    rng = random.Random(0)
    answers = "".join(seg for _ in range(50) for seg, is_answer in copy_list_sample(rng, 256) if is_answer)
    assert set(string.ascii_uppercase) <= set(answers)
    assert set(string.digits) <= set(answers)
    items = answers.split()
    assert sum(len(w) >= 5 and w.isalpha() and w.isupper() for w in items) >= 20


def test_a_step_holds_rows_of_similar_length():
    """One sample length per step: little right padding, and about tokens_per_step real tokens."""
    from sparsa import tasks as task_lib
    from sparsa.models.train import Batches, TrainConfig, make_task

    cfg = TrainConfig.load("ref-small-continue")
    cfg.tokens_per_step = 32768
    cfg.max_len = 8192
    cfg.min_len = 8192
    tok = byte_tokenizer()
    made = {name: make_task(task_lib, cfg, name) for name in cfg.tasks}
    batches = Batches(cfg)
    for step in (10, 20, 30):
        ids, answer, real = batches.make(step, made, tok)
        lengths = real.sum(-1)
        assert float(real.float().mean()) > 0.75, lengths.tolist()  # padding is under a quarter of the batch
        assert 0.5 * cfg.tokens_per_step <= int(lengths.sum()) <= 1.1 * cfg.tokens_per_step
