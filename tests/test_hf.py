"""Hugging Face integration: with nothing configured sparsa reproduces the sdpa implementation."""

import copy
import warnings

import pytest
import torch
import transformers

import sparsa
from sparsa import hf

VOCAB = 96


def _small(arch: str, **extra):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, **extra)
    if arch == "llama":
        return transformers.LlamaConfig(**common), transformers.LlamaForCausalLM
    if arch == "qwen2":
        return transformers.Qwen2Config(**common), transformers.Qwen2ForCausalLM
    if arch == "qwen3":
        return transformers.Qwen3Config(head_dim=16, **common), transformers.Qwen3ForCausalLM
    if arch == "mistral":
        return transformers.MistralConfig(**common), transformers.MistralForCausalLM
    raise KeyError(arch)


def _pair(arch, seed=0, **extra):
    """The same random model twice: one on sdpa, one on sparsa."""
    torch.manual_seed(seed)
    config, cls = _small(arch, **extra)
    config._attn_implementation = "sdpa"
    ref = cls(config).eval()
    ours = copy.deepcopy(ref)
    ours.set_attn_implementation("sparsa")
    return ref, ours


def _inputs(batch=2, length=150, pad=37, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, :pad] = 0  # left padding
    return ids, mask


ARCHS = ["llama", "qwen2", "qwen3", "mistral"]


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_sdpa_with_left_padding(arch):
    ref, ours = _pair(arch)
    ids, mask = _inputs()
    with torch.no_grad():
        a = ref(ids, attention_mask=mask).logits
        b = ours(ids, attention_mask=mask).logits
    real = mask.bool()
    assert (a - b)[real].abs().max() <= 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_and_chunked_prefill_match_sdpa(arch):
    ref, ours = _pair(arch, seed=2)
    ids, mask = _inputs(length=90, pad=11, seed=3)
    kw = dict(max_new_tokens=8, do_sample=False, attention_mask=mask)
    with torch.no_grad():
        want = ref.generate(ids, **kw)
        assert torch.equal(ours.generate(ids, **kw), want)
        assert torch.equal(ours.generate(ids, prefill_chunk_size=32, **kw), want)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_chunked_prefill_logits_match(arch):
    """Forward in chunks through a cache (Lq < Lk with a real mask) equals one full forward."""
    ref, ours = _pair(arch, seed=4)
    ids, mask = _inputs(length=120, pad=20, seed=5)
    with torch.no_grad():
        full = ref(ids, attention_mask=mask).logits
        cache = transformers.DynamicCache(config=ours.config)
        parts = []
        for start in range(0, 120, 50):
            end = min(start + 50, 120)
            out = ours(ids[:, start:end], attention_mask=mask[:, :end], past_key_values=cache, use_cache=True)
            parts.append(out.logits)
        chunked = torch.cat(parts, 1)
    assert (full - chunked)[mask.bool()].abs().max() <= 1e-5


def test_sliding_window_model_matches_sdpa():
    """Mistral with a window shorter than the prompt: the window mask is honoured."""
    ref, ours = _pair("mistral", seed=6, sliding_window=40)
    ids, mask = _inputs(length=130, pad=25, seed=7)
    with torch.no_grad():
        a = ref(ids, attention_mask=mask).logits
        b = ours(ids, attention_mask=mask).logits
    assert (a - b)[mask.bool()].abs().max() <= 1e-5


@pytest.mark.parametrize("window", [None, 40])
def test_long_padded_prompts_use_linear_memory_path(monkeypatch, window):
    """Above MATERIALIZE_LIMIT the dense path runs sparsa's own kernel (no [B, Lq, Lk] mask) and still matches."""
    extra = {} if window is None else {"sliding_window": window}
    ref, ours = _pair("mistral", seed=8, **extra)
    monkeypatch.setattr(hf, "MATERIALIZE_LIMIT", 100)
    calls = []
    real = hf.block_sparse_attention
    monkeypatch.setattr(hf, "block_sparse_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    ids, mask = _inputs(length=140, pad=33, seed=9)
    with torch.no_grad():
        a = ref(ids, attention_mask=mask).logits
        b = ours(ids, attention_mask=mask).logits
    assert calls, "the linear-memory path was not taken"
    assert (a - b)[mask.bool()].abs().max() <= 1e-5


def test_configured_dense_kernel_matches_sdpa():
    ref, ours = _pair("llama", seed=10)
    sparsa.configure(ours, prefill="dense")
    ids, mask = _inputs(length=200, pad=45)
    with torch.no_grad():
        a = ref(ids, attention_mask=mask).logits
        b = ours(ids, attention_mask=mask).logits
    assert (a - b)[mask.bool()].abs().max() <= 1e-5
    st = sparsa.stats(ours)
    assert st["methods"] == ["dense"] and st["density"] == pytest.approx(1.0) and not st["fallbacks"]
    assert [r["layer"] for r in st["layers"]] == [0, 1]


def test_sparse_method_changes_output_and_reports_density():
    ref, ours = _pair("llama", seed=11)
    sparsa.configure(ours, prefill="streaming", sink=4, window=32, block=16, dense_below=0)
    ids, mask = _inputs(length=200, pad=45)
    with torch.no_grad():
        a = ref(ids, attention_mask=mask).logits
        b = ours(ids, attention_mask=mask).logits
    assert (a - b)[mask.bool()].abs().max() > 1e-3
    st = sparsa.stats(ours)
    assert st["methods"] == ["streaming"]
    assert 0.0 < st["density"] < 0.6
    # Decode steps run dense (no decode policy yet) and are not fallbacks.
    with torch.no_grad():
        ours.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False)
    st = sparsa.stats(ours)
    assert st["methods"] == ["decode:dense"] and not st["fallbacks"]


def test_dense_below_falls_back_with_one_warning():
    ref, ours = _pair("llama", seed=12)
    sparsa.configure(ours, prefill="streaming", window=16, block=16, dense_below=10_000)
    ids, mask = _inputs(length=100, pad=10)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            a = ref(ids, attention_mask=mask).logits
            b = ours(ids, attention_mask=mask).logits
            ours(ids, attention_mask=mask)
    assert (a - b)[mask.bool()].abs().max() <= 1e-5
    mine = [w for w in caught if "sparsa" in str(w.message)]
    assert len(mine) == 1 and "dense_below" in str(mine[0].message)
    st = sparsa.stats(ours)
    assert len(st["fallbacks"]) == 2 and st["methods"] == ["sdpa"]


def test_sliding_window_layer_falls_back_for_sparse_methods():
    ref, ours = _pair("mistral", seed=13, sliding_window=50)
    sparsa.configure(ours, prefill="streaming", window=16, block=16, dense_below=0)
    ids, mask = _inputs(length=120, pad=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            a = ref(ids, attention_mask=mask).logits
            b = ours(ids, attention_mask=mask).logits
    assert (a - b)[mask.bool()].abs().max() <= 1e-5
    assert "sliding-window" in sparsa.stats(ours)["fallbacks"][0]["reason"]


def test_softcapping_model_is_refused():
    torch.manual_seed(0)
    config = transformers.Gemma2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    model = transformers.Gemma2ForCausalLM(config).eval()
    model.set_attn_implementation("sparsa")
    with pytest.raises(ValueError, match="softcapping"):
        sparsa.configure(model, prefill="dense")
    with pytest.raises(ValueError, match="softcapping"):
        with torch.no_grad():
            model(torch.randint(0, VOCAB, (1, 20)))


def test_configure_errors():
    ref, ours = _pair("llama")
    with pytest.raises(ValueError, match="attn_implementation"):
        sparsa.configure(ref, prefill="dense")
    with pytest.raises(ValueError, match="allowed values"):
        sparsa.configure(ours, prefill="nope")
    with pytest.raises(ValueError, match="windw"):
        sparsa.configure(ours, prefill="streaming", windw=3)
    with pytest.raises(ValueError, match="window"):
        sparsa.configure(ours, prefill="streaming", window=0)
    with pytest.raises(ValueError, match="dense_below"):
        sparsa.configure(ours, prefill="streaming", dense_below=-1)
    with pytest.raises(ValueError, match="decode"):
        sparsa.configure(ours, decode="nope")


def test_methods_lists_registered_names():
    names = sparsa.methods()
    assert {"dense", "streaming", "a_shape", "sliding_window", "s2", "moa"} <= set(names["prefill"])
    assert "dense" in names["decode"]
