"""sparsa.tasks: determinism, sizing in the model's tokens, needle placement, scorers, JSONL, MQAR."""

import collections
import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from sparsa import tasks
from sparsa.models.tokenizer import byte_tokenizer
from sparsa.tasks import LengthError, words
from sparsa.tasks.base import fit
from sparsa.tasks.mqar import labels

NIAH = ["niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery"]
TEXT_TASKS = ["passkey", *NIAH, "vt", "cwe", "fwe", "perplexity"]
# (keys, values per key, queried keys), as RULER's variants define them
SHAPES = {"niah_single": (1, 1, 1), "niah_multikey": (4, 1, 1), "niah_multivalue": (1, 4, 1),
          "niah_multiquery": (4, 1, 4)}
NEEDLE = re.compile(r"One of the special magic numbers for ([a-z]+-[a-z]+) is: (\d{7})\.")


@pytest.fixture(scope="module")
def byte_tok():
    return byte_tokenizer()


def _corpus():
    out = [s["prompt"] for name in ("niah_single", "niah_multivalue", "vt", "cwe", "fwe", "passkey")
           for s in tasks.get(name).generate(1, 4000, 99)]
    return out + [s["prompt"] for s in tasks.get("niah_single", haystack="prose").generate(2, 8000, 99)]


@pytest.fixture(scope="module")
def word_tok():
    """Word-level: one token per word or punctuation run; unseen words (values, coded words) are [UNK]."""
    vocab = {"[UNK]": 0}
    for text in _corpus():
        for piece in re.findall(r"\w+|[^\w\s]+", text):
            vocab.setdefault(piece, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", model_max_length=1 << 20)


@pytest.fixture(scope="module")
def bpe_tok():
    """A small byte-level BPE trained on task text, GPT-2 style."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    core.train_from_iterator(_corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, model_max_length=1 << 20)


def _in_window(sample, tok, length):
    total = sample["n_tokens"] + sample["max_new_tokens"]
    assert 0.98 * length <= total <= length, (sample["task"], length, sample["n_tokens"], sample["max_new_tokens"])
    assert sample["n_tokens"] == len(tok.encode(sample["prompt"], add_special_tokens=False))


# ---------------------------------------------------------------- registry


def test_names():
    assert tasks.names() == sorted([*TEXT_TASKS, "mqar"])


def test_unknown_task_and_params():
    with pytest.raises(ValueError, match=r"unknown task 'niah'.*allowed values: \['cwe'"):
        tasks.get("niah")
    with pytest.raises(ValueError, match=r"unknown parameter 'hay'.*allowed: \['haystack', 'same_length_keys'\]"):
        tasks.get("niah_single", hay="noise")
    with pytest.raises(ValueError, match=r"unknown haystack 'essay'.*\['noise', 'prose', 'needle'\]"):
        tasks.get("niah_multikey", haystack="essay")
    with pytest.raises(ValueError, match="hops"):
        tasks.get("vt", hops=0)
    with pytest.raises(ValueError, match="depths must be fractions"):
        tasks.get("passkey").generate(1, 1000, 0, depths=[1.5])
    with pytest.raises(ValueError, match="has no needle depth"):
        tasks.get("cwe").generate(1, 2000, 0, depths=[0.5])


def test_too_short_is_a_clear_error():
    with pytest.raises(LengthError, match="niah_multivalue at length 512"):
        tasks.get("niah_multivalue").generate(1, 512, 0)
    with pytest.raises(LengthError, match="fwe at length 512"):
        tasks.get("fwe").generate(1, 512, 0)


# ---------------------------------------------------------------- determinism and sizing


@pytest.mark.parametrize("name", TEXT_TASKS + ["mqar"])
def test_deterministic(name, byte_tok):
    task = tasks.get(name)
    a = task.generate(3, 2048, 7, byte_tok)
    assert a == task.generate(3, 2048, 7, byte_tok)
    assert a[1] == task.generate(2, 2048, 7, byte_tok)[1]  # a sample does not depend on n
    b = task.generate(3, 2048, 8, byte_tok)
    field = "input_ids" if name == "mqar" else "prompt"
    assert all(x[field] != y[field] for x, y in zip(a, b))
    assert len({s[field] if name != "mqar" else tuple(s[field]) for s in a}) == 3


@pytest.mark.parametrize("haystack", ["noise", "prose"])
@pytest.mark.parametrize("length", [512, 2000, 8192, 32768])
def test_niah_size_byte(haystack, length, byte_tok):
    for name in NIAH if length > 512 else ["niah_single"]:
        for sample in tasks.get(name, haystack=haystack).generate(2, length, 1, byte_tok):
            _in_window(sample, byte_tok, length)


@pytest.mark.parametrize("length", [2000, 8192, 32768])
@pytest.mark.parametrize("name", ["passkey", "vt", "cwe", "fwe", "perplexity"])
def test_size_byte(name, length, byte_tok):
    for sample in tasks.get(name).generate(2, length, 1, byte_tok):
        _in_window(sample, byte_tok, length)


def test_byte_count_shortcut_matches_byte_tokenizer(byte_tok):
    # tokenizer=None counts UTF-8 bytes, which must be what the project's byte tokenizer gives.
    assert tasks.get("niah_single").generate(2, 4000, 3) == tasks.get("niah_single").generate(2, 4000, 3, byte_tok)


@pytest.mark.parametrize("length", [2000, 8192])
@pytest.mark.parametrize("name", ["passkey", "niah_single", "niah_multiquery", "vt", "cwe", "fwe", "perplexity"])
def test_size_other_tokenizers(name, length, word_tok, bpe_tok):
    for tok in (word_tok, bpe_tok):
        for haystack in ("noise", "prose") if name.startswith("niah") else (None,):
            task = tasks.get(name, haystack=haystack) if haystack else tasks.get(name)
            for sample in task.generate(2, length, 2, tok):
                _in_window(sample, tok, length)


def test_128k_sizing(byte_tok):
    (sample,) = tasks.get("niah_single", haystack="prose").generate(1, 131072, 0, byte_tok)
    _in_window(sample, byte_tok, 131072)


# ---------------------------------------------------------------- needles


@pytest.mark.parametrize("haystack", ["noise", "prose", "needle"])
@pytest.mark.parametrize("name", NIAH)
def test_niah_needles(name, haystack):
    n_keys, n_values, n_queries = SHAPES[name]
    for sample in tasks.get(name, haystack=haystack).generate(4, 3000, 5):
        prompt, keys, answers = sample["prompt"], sample["keys"], sample["answers"]
        found = NEEDLE.findall(prompt)
        ours = [(k, v) for k, v in found if k in keys]
        # exactly the recipe's needles: n_keys keys with n_values distinct values each
        assert len(ours) == n_keys * n_values and len({v for _, v in ours}) == len(ours)
        assert collections.Counter(k for k, _ in ours) == {k: n_values for k in keys}
        if haystack == "needle":
            distractors = [(k, v) for k, v in found if k not in keys]
            assert len(distractors) > 10
            assert not {v for _, v in distractors} & set(answers)
        else:
            assert len(found) == n_keys * n_values
        # the answers are exactly the queried keys' values, each appearing once
        assert len(sample["queries"]) == n_queries and set(sample["queries"]) <= set(keys)
        assert sorted(answers) == sorted(v for k, v in ours if k in sample["queries"])
        assert all(prompt.count(v) == 1 for v in answers)
        question = prompt[prompt.rindex("\n") + 1:]
        assert all(q in question for q in sample["queries"])
        one = n_values * n_queries == 1
        assert prompt.startswith("A special magic number is" if one else "Some special magic numbers are")
        # the answer's leading space is in the prompt: with bytes it is a token of its own (open_answer)
        assert prompt.endswith("mentioned in the provided text " + ("is " if one else "are "))


def _context_fraction(prompt, needle):
    start, end = prompt.index("\n") + 1, prompt.rindex("\n")
    return (prompt.index(needle) - start) / (end - start)


@pytest.mark.parametrize("haystack", ["noise", "prose"])
@pytest.mark.parametrize("name", ["niah_single", "niah_multikey"])
def test_niah_depth(name, haystack):
    depths = [0.0, 0.25, 0.5, 0.75, 1.0]
    for sample in tasks.get(name, haystack=haystack).generate(5, 8192, 0, depths=depths):
        target = next(n for n in sample["needles"] if sample["answers"][0] in n)
        assert sample["depth"] == depths[sample["index"]]
        assert _context_fraction(sample["prompt"], target) == pytest.approx(sample["depth"], abs=0.04)


def test_vt_depth():
    for sample in tasks.get("vt").generate(3, 8192, 0, depths=[0.0, 0.5, 1.0]):
        first = f"VAR {sample['answers'][0]} = {sample['value']}."
        assert _context_fraction(sample["prompt"], first) == pytest.approx(sample["depth"], abs=0.04)


def test_passkey_layout_and_depth():
    for sample in tasks.get("passkey").generate(3, 4000, 0, depths=[0.0, 0.5, 1.0]):
        key = sample["answers"][0]
        parts = sample["prompt"].split("\n")
        assert len(parts) == 5
        assert parts[0].startswith("There is an important info hidden") and parts[4].endswith("The pass key is ")
        assert parts[2] == f"The pass key is {key}. Remember it. {key} is the pass key."
        assert 1 <= int(key) <= 50000
        prefix, suffix = len(parts[1]), len(parts[3])
        assert prefix / (prefix + suffix) == pytest.approx(sample["depth"], abs=0.01)
        assert parts[1] == words.NOISE[:prefix] or parts[1].startswith(words.NOISE)


def test_vt_chain():
    for task in (tasks.get("vt"), tasks.get("vt", chains=2)):
        for sample in task.generate(3, 3000, 4):
            lines = [ln for ln in sample["prompt"].split("\n") if ln.startswith("VAR ")]
            assert len(lines) == 5 * task.chains
            names, value = sample["answers"], sample["value"]
            chain = [ln for ln in lines if any(f"VAR {n} =" in ln for n in names)]
            assert chain == [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
            assert all(re.fullmatch(r"[A-Z]{5}", n) for n in names) and len(set(names)) == 5
            assert f"assigned the value {value} in the text above" in sample["prompt"]
            assert sample["prompt"].count(value) == 3  # the chain's first line, the question, the answer prefix


def test_cwe_counts():
    for length, (common, uncommon) in ((2000, (6, 1)), (8192, (30, 3))):
        for sample in tasks.get("cwe").generate(2, length, 0):
            context = sample["prompt"].split("\n")[1]
            numbers = [int(n) for n in re.findall(r"(\d+)\. ", context)]
            assert numbers == list(range(1, len(numbers) + 1))
            counts = collections.Counter(re.findall(r"\d+\. (\S+)", context))
            assert len(sample["answers"]) == 10
            assert all(counts[w] == common for w in sample["answers"])
            assert max(c for w, c in counts.items() if w not in sample["answers"]) <= uncommon


def test_fwe_counts():
    for sample in tasks.get("fwe").generate(2, 6000, 0):
        context = sample["prompt"].split("coded words. ", 1)[1].split("\n")[0]
        counts = collections.Counter(context.split(" ")).most_common()
        assert counts[0][0] == "..."
        assert [w for w, _ in counts[1:4]] == sample["answers"]
        assert counts[3][1] > counts[4][1]


def test_prose_is_varied_and_clean():
    rng = random.Random(0)
    sentences = [words.sentence(rng) for _ in range(300)]
    assert len(set(sentences)) == 300
    assert len({s.split(" ")[0] for s in sentences}) > 20
    text = " ".join(sentences)
    assert not re.search(r"[\d\-]|\b[A-Z]{2,}\b|special magic|pass key", text)
    assert all(s[0].isupper() and s[-1] in ".?" for s in sentences)


# ---------------------------------------------------------------- scorers


def test_string_match_all_scores():
    task = tasks.get("niah_multivalue")
    (sample,) = task.generate(1, 2000, 0)
    a, b, c, d = sample["answers"]
    assert task.score(sample, f"{a}, {b}, {c} and {d}.") == 1.0
    assert task.score(sample, f"{d} then {b}") == 0.5
    assert task.score(sample, "1234567") == 0.0
    (cwe,) = tasks.get("cwe").generate(1, 2000, 0)
    assert tasks.score(cwe, " ".join(w.upper() for w in cwe["answers"][:3])) == pytest.approx(0.3)
    (vt,) = tasks.get("vt").generate(1, 2000, 0)
    assert tasks.score(vt, ", ".join(vt["answers"]).lower()) == 1.0
    with pytest.raises(ValueError, match="from task 'vt'"):
        task.score(vt, "")


def test_passkey_score():
    task = tasks.get("passkey")
    (sample,) = task.generate(1, 1000, 0)
    key = sample["answers"][0]
    assert task.score(sample, f" {key}. Remember it.") == 1.0
    assert task.score(sample, f"{key}0") == 0.0
    assert task.score(sample, f"1 and then {key}") == 0.0  # only the first integer counts
    assert task.score(sample, "I do not know") == 0.0


def test_perplexity_sample():
    task = tasks.get("perplexity", tail=0.25)
    (sample,) = task.generate(1, 4096, 0)
    assert sample["text"] == sample["prompt"] and sample["max_new_tokens"] == 0
    assert sample["loss_start"] == sample["n_tokens"] - -(-sample["n_tokens"] // 4)
    with pytest.raises(NotImplementedError, match="runner"):
        task.score(sample, "")


# ---------------------------------------------------------------- MQAR


def test_mqar_asserts():
    with pytest.raises(ValueError, match="even"):
        tasks.get("mqar").generate(1, 63, 0)
    with pytest.raises(ValueError, match="exceed T"):
        tasks.get("mqar", vocab_size=64).generate(1, 64, 0)
    with pytest.raises(ValueError, match=r"4 \* num_kv_pairs <= T"):
        tasks.get("mqar", num_kv_pairs=17).generate(1, 64, 0)


@pytest.mark.parametrize("T,P", [(64, 4), (128, 8), (256, 16), (256, 64), (1024, 256)])
def test_mqar_targets(T, P):
    task = tasks.get("mqar", num_kv_pairs=P)
    V = task.vocab_size
    for sample in task.generate(3, T, 0):
        ids = sample["input_ids"]
        assert len(ids) == T and all(0 <= t < V for t in ids)
        keys, values = ids[0:2 * P:2], ids[1:2 * P:2]
        assert len(set(keys)) == P and len(set(values)) == P
        assert all(1 <= k < V // 2 for k in keys) and all(V // 2 <= v < V for v in values)
        pairs = dict(zip(keys, values))
        positions, targets = sample["target_positions"], sample["targets"]
        assert len(positions) == P and positions == sorted(set(positions))
        assert all(p >= 2 * P and (p - 2 * P) % 2 == 0 for p in positions)
        assert sorted(ids[p] for p in positions) == sorted(keys)  # every key is queried once
        assert all(pairs[ids[p]] == t for p, t in zip(positions, targets))
        lab = labels(sample)
        assert [i for i, t in enumerate(lab) if t != -100] == positions
        perfect = lab[:]
        assert task.score_ids(sample, perfect) == 1.0
        perfect[positions[0]] += 1
        assert tasks.score_ids(sample, perfect) == (P - 1) / P
    with pytest.raises(ValueError, match="one prediction per input position"):
        task.score_ids(sample, [0])
    with pytest.raises(TypeError, match="score_ids"):
        task.score(sample, "")


def test_mqar_gaps_favour_early_slots():
    # p(g) ~ (g + 1) ** -0.99: most queries sit near the start of the query region
    gaps = [(p - 32) // 2 for s in tasks.get("mqar", num_kv_pairs=16).generate(50, 1024, 0)
            for p in s["target_positions"]]
    space = (1024 - 32) // 2
    assert sorted(gaps)[len(gaps) // 2] < space / 4


# ---------------------------------------------------------------- grid and JSONL


def test_grid():
    cells = tasks.grid("passkey", [1000, 2000], [0.0, 0.5, 1.0], 2, seed=0)
    assert len(cells) == 12
    assert collections.Counter((s["length"], s["depth"]) for s in cells) == {
        (L, d): 2 for L in (1000, 2000) for d in (0.0, 0.5, 1.0)}
    assert all(s["cell"] == {"length": s["length"], "depth": s["depth"]} for s in cells)
    assert len({s["seed"] for s in cells}) == 6  # one seed per cell
    assert cells == tasks.grid("passkey", [1000, 2000], [0.0, 0.5, 1.0], 2, seed=0)
    # a cell's samples do not depend on the other cells
    assert tasks.grid("passkey", [2000], [0.5], 2, seed=0) == [s for s in cells if s["cell"] == {"length": 2000, "depth": 0.5}]
    assert tasks.grid("passkey", [1000], [0.5], 1, seed=1)[0]["prompt"] != cells[2]["prompt"]
    no_depth = tasks.grid("cwe", [2000, 4096], [0.0, 0.5], 2, seed=0)
    assert len(no_depth) == 4 and all(s["depth"] is None for s in no_depth)


def test_jsonl_roundtrip(tmp_path):
    samples = [s for name in TEXT_TASKS + ["mqar"] for s in tasks.get(name).generate(2, 2048, 0)]
    samples += tasks.grid("niah_multiquery", [3000], [0.3], 1, seed=0)
    path = tmp_path / "samples.jsonl"
    tasks.save_jsonl(samples, path)
    loaded = tasks.load_jsonl(path)
    assert loaded == samples
    for sample in loaded:
        assert {"task", "index", "seed", "length", "n_tokens", "depth", "prompt", "answers",
                "max_new_tokens"} <= set(sample)
        assert tasks.task_of(sample).name == sample["task"]


@settings(max_examples=60)
@given(base=st.integers(0, 500), step=st.integers(1, 120), jitter=st.integers(0, 3), length=st.integers(600, 40000))
def test_fit_window_or_largest(base, step, jitter, length):
    # count(u) ~ base + step * u (+ a small deterministic wobble, as tokenizers give)
    def count(text):
        u = int(text)
        return base + step * u + (u * 7919 % (jitter + 1))

    limit, floor = length, int(0.98 * length)
    if base > limit:
        with pytest.raises(LengthError):
            fit(str, count, limit, floor)
        return
    u, text, tokens = fit(str, count, limit, floor)
    assert text == str(u) and tokens == count(text) <= limit
    # inside the window, or the window holds no unit count and u is the last one that fits
    assert tokens >= floor or count(str(u + 1)) > limit


def test_same_length_keys_for_training():
    """niah_multikey with same_length_keys: every key of a sample has the same length (the reference model
    matched keys by length); the default draws keys freely, so some samples mix lengths."""
    free = tasks.get("niah_multikey").generate(30, 1500, 0)
    same = tasks.get("niah_multikey", same_length_keys=True).generate(30, 1500, 0)
    assert all(len({len(k) for k in s["keys"]}) == 1 and len(set(s["keys"])) == 4 for s in same)
    assert any(len({len(k) for k in s["keys"]}) > 1 for s in free)
    for s in same:
        assert sum(needle in s["prompt"] for needle in s["needles"]) == 4
        assert tasks.score(s, " " + s["answers"][0] + ".") == 1.0


# ------------------------------------------------------------------------------------------------ open_answer
class _Tok:
    """A stand-in tokenizer: ``merge=True`` joins a space with the next character (GPT-style BPE), else every
    character is a token (bytes, or SentencePiece splitting digits)."""

    def __init__(self, merge):
        self.merge = merge

    def encode(self, text, add_special_tokens=False):
        out, i = [], 0
        while i < len(text):
            if self.merge and text[i] == " " and i + 1 < len(text):
                out.append(text[i:i + 2])
                i += 2
            else:
                out.append(text[i])
                i += 1
        return out


@pytest.mark.parametrize("name", ["passkey", "niah_single", "niah_multikey", "cwe", "fwe"])
def test_prompt_ends_where_the_answer_starts(name):
    """Byte-level tokens: the completion's leading space ends the prompt, so the first generated token is the
    answer's (computed by the prefill's last position, not by a decode step); the total length is unchanged."""
    from sparsa.tasks import open_answer

    sample = tasks.get(name).generate(1, 2048, 3)[0]
    assert sample["prompt"].endswith(" ") and not sample["prompt"].endswith("  ")
    assert sample["n_tokens"] == len(sample["prompt"].encode())
    before = dict(sample, prompt=sample["prompt"][:-1], n_tokens=sample["n_tokens"] - 1,
                  max_new_tokens=sample["max_new_tokens"] + 1)
    assert open_answer(dict(before)) == sample


def test_open_answer_follows_the_tokenizer():
    from sparsa.tasks import open_answer

    base = {"prompt": "The pass key is", "answers": ["123"], "n_tokens": 15, "max_new_tokens": 10}
    split = open_answer(dict(base), _Tok(merge=False))
    assert (split["prompt"], split["n_tokens"], split["max_new_tokens"]) == ("The pass key is ", 16, 9)
    assert open_answer(dict(base), _Tok(merge=True)) == base  # " 1" is one token: RULER's prompt stays
    assert open_answer(dict(base, prompt="they are: ")) == dict(base, prompt="they are: ")  # vt ends with a space
    assert tasks.get("vt").generate(1, 2048, 3)[0]["prompt"].endswith(": ")
    assert not tasks.get("vt").generate(1, 2048, 3)[0]["prompt"].endswith("  ")
