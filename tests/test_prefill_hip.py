"""HiP prefill selector: exact at a full budget, sparser as the budget shrinks, finds planted structure."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsa
import sparsa.prefill.hip  # noqa: F401  (registers "hip" until the package imports it)
from selector_checks import assert_padding_ignored, check_rows as _check_rows, dense_causal as _dense_causal, \
    random_qkv as _qkv
from dense_reference import dense_attention, token_mask_of
from sparsa.ops import block_sparse_attention
from sparsa.pattern import last_visible_block
from sparsa.prefill.hip import HiP


GEOMETRIES = [(333, 333), (300, 700), (77, 1000)]


@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("lq,lk", GEOMETRIES)
def test_full_budget_is_dense_causal(group, lq, lk):
    q, k, v = _qkv(2, 2 * group, 2, lq, lk, seed=group)
    sel = HiP(block=16, mask_k=lk, sliding_window=16, sink=4)
    pattern = sel.select(q, k)
    _check_rows(pattern)
    assert pattern.heads == 2 and pattern.batch == 2  # one pattern per KV head and sequence
    assert pattern.density() == 1.0
    out = block_sparse_attention(q, k, v, pattern, backend="reference")
    assert (out.double() - _dense_causal(q, k, v)).abs().max() <= 1e-5


@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("lq,lk", GEOMETRIES[1:])
def test_small_budget_is_sparse_and_exact_on_its_pattern(group, lq, lk):
    q, k, v = _qkv(2, 2 * group, 2, lq, lk, seed=10 + group)
    pattern = HiP(block=16, mask_k=32, sliding_window=16, sink=4).select(q, k)
    _check_rows(pattern)
    assert pattern.density() < 0.5
    out = block_sparse_attention(q, k, v, pattern, backend="reference")
    assert (out.double() - _dense_causal(q, k, v)).abs().max() > 1e-3
    # the kernel computes exactly the pattern's tiles
    mask = token_mask_of(pattern, 2, 2 * group, 2, causal=True)
    assert (out.double() - dense_attention(q, k, v, mask)[0]).abs().max() <= 1e-5


def test_selected_block_counts():
    """Per query block: the sink block, min(k, searchable) searched blocks and the local window blocks."""
    lq, lk, bs = 200, 800, 16
    q, k, _ = _qkv(2, 4, 2, lq, lk, seed=3)
    sel = HiP(block=bs, mask_k=48, sliding_window=32, sink=4)
    pattern = sel.select(q, k)
    last = last_visible_block(lq, lk, bs, bs)
    local_lo = (last - 2).clamp(min=0)
    searchable = (local_lo - 1).clamp(min=0)
    want = (local_lo > 0).long() + searchable.clamp(max=3) + (last - local_lo + 1)
    assert torch.equal(pattern.kv_num_blocks.long(), want.expand(2, 2, -1))


def test_density_decreases_with_budget():
    q, k, _ = _qkv(2, 4, 2, 1024, 1024, seed=4)
    densities = [HiP(block=16, mask_k=m, sliding_window=16).select(q, k).density() for m in (512, 256, 128, 32)]
    assert all(a > b for a, b in zip(densities, densities[1:])), densities
    assert densities[-1] < 0.25


@pytest.mark.parametrize("lq", [1024, 500])
def test_finds_planted_far_block(lq):
    """A far key region matching one query block's direction: HiP finds its peak block with k = 1.

    HiP judges a span of keys by its centre token, relying on attention locality (neighbouring keys score
    alike), so the plant is a bump: strongest in block ``c`` and decaying with distance from it.
    """
    lk, bs, dim, c = 1024, 16, 32, 20
    g = torch.Generator().manual_seed(5)
    u = torch.randn(dim, generator=g)
    u = u / u.norm() * math.sqrt(dim)
    q = torch.randn(1, 2, lq, dim, generator=g)
    k = 0.2 * torch.randn(1, 1, lk, dim, generator=g)
    r = (lq - 1) // bs - 2  # a query block near the end
    q[:, :, r * bs:(r + 1) * bs] += 2 * u
    t = torch.arange(lk, dtype=torch.float32)
    profile = torch.exp(-(t - (c * bs + bs / 2)).abs() / (8 * bs))
    k[0, 0] += 3 * profile[:, None] * u
    pattern = HiP(block=bs, mask_k=bs, sliding_window=bs, sink=4).select(q, k)
    _check_rows(pattern)
    row = pattern.to_block_mask()[0, 0, r]
    last = int(last_visible_block(lq, lk, bs, bs)[r])
    picked = set(row.nonzero().flatten().tolist())
    assert picked == {0, c, last - 1, last}
    # sanity: c is the block of the highest exact attention logit for that query block
    logits = (q[0, :, r * bs:(r + 1) * bs] @ k[0, 0, : (last - 1) * bs].T).amax((0, 1))
    assert int(logits.argmax()) // bs == c


@settings(max_examples=15)
@given(lq=st.integers(1, 400), extra=st.integers(0, 400), block=st.sampled_from([16, 32]),
       mask_k=st.integers(1, 200), window=st.integers(0, 100), sink=st.integers(0, 40),
       samples=st.integers(1, 16), group=st.sampled_from([1, 2]))
def test_any_geometry_gives_a_valid_pattern(lq, extra, block, mask_k, window, sink, samples, group):
    q, k, _ = _qkv(1, 2 * group, 2, lq, lq + extra, dim=8, seed=lq)
    pattern = HiP(block=block, mask_k=mask_k, sliding_window=window, sink=sink, query_samples=samples).select(q, k)
    _check_rows(pattern)


@pytest.mark.parametrize("params,field", [
    (dict(mask_k=0), "mask_k"),
    (dict(mask_k=1.5), "mask_k"),
    (dict(sliding_window=-1), "sliding_window"),
    (dict(sink=-4), "sink"),
    (dict(block=48), "block"),
    (dict(block=8), "block"),
    (dict(query_samples=0), "query_samples"),
    (dict(block=16, query_samples=32), "query_samples"),
    (dict(dense_below=-1), "dense_below"),
])
def test_bad_parameters(params, field):
    with pytest.raises(ValueError, match=field):
        HiP(**params)


def test_bad_head_counts():
    q, k, _ = _qkv(1, 3, 2, 64, 64)
    with pytest.raises(ValueError, match="multiple"):
        HiP(block=16).select(q, k)


@pytest.mark.parametrize("lq", [400, 300])
def test_ignores_padded_keys(lq):
    """A left-padded second sequence: real query blocks never pick key blocks made only of padding (besides the
    forced sink and window blocks), while the unmasked search does; an unpadded sequence keeps its pattern."""
    lk, bs, n_pad = 400, 16, 128  # key blocks 0-7 of sequence 1 are padding
    q, k, v = _qkv(2, 4, 2, lq, lk, seed=21)
    pad = torch.ones(2, lk, dtype=torch.bool)
    pad[1, :n_pad] = False
    sel = HiP(block=bs, mask_k=64, sliding_window=16, sink=4)
    pattern = sel.select(q, k, key_padding_mask=pad)
    _check_rows(pattern)
    assert pattern.batch == 2 and pattern.heads == 2
    last = last_visible_block(lq, lk, bs, bs)
    rows = last - 1 > n_pad // bs  # the window (blocks last-1, last) is past the padding
    assert int(rows.sum()) > 10
    padded_only = slice(1, n_pad // bs)  # block 0 is the forced sink
    assert_padding_ignored(sel, q, k, v, pad, rows, padded_only, n_pad)


# -------------------------------------------------------------------------------------- Hugging Face path
def test_through_hugging_face_with_left_padding():
    from test_hf import _inputs, _pair

    ref, ours = _pair("llama", seed=0)
    ids, mask = _inputs(length=150, pad=37, seed=1)
    sparsa.configure(ours, prefill="hip", dense_below=0, block=16, mask_k=32, sliding_window=16)
    with torch.no_grad():
        logits = ours(ids, attention_mask=mask).logits
    assert torch.isfinite(logits).all()
    stats = sparsa.stats(ours)
    assert stats["methods"] == ["hip"]
    assert stats["density"] < 1.0 and not stats["fallbacks"]
    # at a full budget the model reproduces sdpa on the real tokens
    sparsa.configure(ours, prefill="hip", dense_below=0, block=16, mask_k=4096)
    with torch.no_grad():
        full = ours(ids, attention_mask=mask).logits
        want = ref(ids, attention_mask=mask).logits
    assert (full - want)[mask.bool()].abs().max() <= 1e-5


@pytest.mark.parametrize("lq,lk", [(323, 323), (100, 323), (320, 320)])
def test_last_window_covers_the_short_last_block(lq, lk):
    """``last_window``: when the sequence's last query is not the last token of its key block, the last query block
    keeps one more window block (the block just outside ``sliding_window`` there); every other row, and every row
    of a length that is a multiple of ``block``, keeps its pattern."""
    bs, win = 16, 2
    q, k, _ = _qkv(2, 4, 2, lq, lk, seed=21)
    on = HiP(block=bs, mask_k=32, sliding_window=win * bs, sink=4).select(q, k).to_block_mask()
    off = HiP(block=bs, mask_k=32, sliding_window=win * bs, sink=4, last_window=False).select(q, k).to_block_mask()
    assert torch.equal(on[:, :, :-1], off[:, :, :-1])
    last = (lk - 1) // bs
    if lk % bs == 0:
        assert torch.equal(on, off)
    else:
        assert on[:, :, -1, last - win - 1].all()  # forced: never left to the search
        assert on[:, :, -1, last - win:last + 1].all()
        # the search range shrank by that block: the row holds one block more than the search's top-k, or as many
        grown = on[:, :, -1].sum(-1) - off[:, :, -1].sum(-1)
        assert ((grown == 0) | (grown == 1)).all()


def test_last_window_must_be_a_bool():
    with pytest.raises(ValueError, match="last_window must be a bool"):
        HiP(last_window=1)
