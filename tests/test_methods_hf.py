"""Every registered prefill method through a Hugging Face model: batch 2 with left padding, chunked prefill
(Lq < Lk) and generate(). Small budgets so that every method really skips work at these lengths."""

import pytest
import torch

import sparsa

SMALL = {
    "dense": {},
    "streaming": dict(sink=4, window=32, block=16),
    "a_shape": dict(n_init=16, n_local=32, block=16),
    "sliding_window": dict(window=48, block=16),
    "s2": dict(local_blocks=2, vert_stride=4, block=16),
    "moa": dict(alpha=[32, 48], beta=[0.1, 0.05], sink=16, block=16),
    "vertical_slash": dict(vertical_size=16, slash_size=32, last_q=16, sink_columns=4, local_diagonals=16,
                           block=16),
    "flexprefill": dict(gamma=0.5, min_budget=32, block=16),
    "sale": dict(threshold=0.1, local_window=32, block=16),
    "hip": dict(mask_k=64, sliding_window=32, block=16),
    "longheads": dict(window_size=32, atten_length=96, begin_selective_length=64, block=16),
    "biformer": dict(topk=3, block=16),
    "hyper": dict(min_seq_len=64, block_size=32, sample_size=16),
}


def test_every_registered_method_is_covered():
    assert set(sparsa.methods()["prefill"]) == set(SMALL)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_method_through_hf(name):
    from test_hf import _inputs, _pair

    _, model = _pair("llama", seed=21)
    sparsa.configure(model, prefill=name, dense_below=0, **SMALL[name])
    ids, mask = _inputs(length=160, pad=30, seed=22)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
        assert torch.isfinite(logits[mask.bool()]).all()
        st = sparsa.stats(model, prefill=True)
        assert st["methods"] == [name] and not st["fallbacks"]
        # HyperAttention reports density in 128x128 tiles of work, which cannot drop below 1 at 160 tokens.
        if name not in ("dense", "hyper"):
            assert st["density"] < 1.0, f"{name} computed every tile at 160 tokens with a small budget"
        out = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, prefill_chunk_size=64)
    assert out.shape == (2, 163)
