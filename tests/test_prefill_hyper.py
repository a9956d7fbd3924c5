"""HyperAttention: exact where it should be, close on clustered inputs, honest about padding, reproducible."""

import math

import pytest
import torch

import sparsa
import sparsa.prefill.hyper  # noqa: F401  (registers "hyper")
from dense_reference import dense_attention
from sparsa.prefill.hyper import Hyper, _gray_rank, _Run

SMALL = dict(min_seq_len=32, block_size=16, sample_size=16)


def _qkv(b, hq, hkv, lq, lk, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, lq, d, generator=g), torch.randn(b, hkv, lk, d, generator=g),
            torch.randn(b, hkv, lk, d, generator=g))


def _clustered(b, hq, hkv, lq, lk, d=16, clusters=4, seed=0):
    """Tokens near one of a few far-apart directions; values constant per cluster (plus noise): attention stays
    inside the cluster, a structure HyperAttention's buckets and samples capture."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(clusters, d, generator=g), dim=-1) * 6.0
    label = torch.randint(0, clusters, (b, 1, lk), generator=g)
    values = torch.randn(clusters, d, generator=g)
    k = centres[label.expand(b, hkv, lk)] + 0.1 * torch.randn(b, hkv, lk, d, generator=g)
    v = values[label.expand(b, hkv, lk)] + 0.01 * torch.randn(b, hkv, lk, d, generator=g)
    q = centres[label[:, :, lk - lq:].expand(b, hq, lq)] + 0.1 * torch.randn(b, hq, lq, d, generator=g)
    return q, k, v


def _dense(q, k, v, pad=None, causal=True):
    lq, lk = q.shape[2], k.shape[2]
    mask = torch.ones(lq, lk, dtype=torch.bool)
    if causal:
        mask = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
    mask = mask.expand(q.shape[0], q.shape[1], lq, lk)
    if pad is not None:
        mask = mask & pad[:, None, None, :]
    return dense_attention(q, k, v, mask)


def _left_pad(b, lk, pads):
    mask = torch.ones(b, lk, dtype=torch.bool)
    for i, n in enumerate(pads):
        mask[i, :n] = False
    return mask


# ------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("b,hq,hkv,lq,lk", [(2, 4, 4, 203, 203), (1, 8, 2, 150, 333), (2, 4, 1, 96, 96)])
def test_below_min_seq_len_is_exact_causal(b, hq, hkv, lq, lk):
    q, k, v = _qkv(b, hq, hkv, lq, lk)
    out, density = Hyper(min_seq_len=lk, block_size=16, sample_size=8).attend(q, k, v, backend="reference")
    assert density == 1.0
    torch.testing.assert_close(out.double(), _dense(q, k, v)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("min_seq_len,b,hq,hkv,lq,lk", [
    (32, 2, 4, 4, 203, 203), (32, 2, 8, 2, 150, 331), (5, 2, 8, 2, 150, 331),
    (2, 2, 8, 2, 37, 60),  # 37 -> 32 leaves of 2 (64 rows): the end padding reaches into first halves (masked)
])
def test_recursion_with_exact_parts_is_exact(min_seq_len, b, hq, hkv, lq, lk):
    """Blocks covering every quadrant make each non-causal core exact: the unrolled recursion (leaves, levels,
    odd lengths, prefix, GQA, batch) then must reproduce causal attention, with padding honoured."""
    q, k, v = _qkv(b, hq, hkv, lq, lk, seed=1)
    sel = Hyper(min_seq_len=min_seq_len, block_size=512, sample_size=8)
    out, _ = sel.attend(q, k, v, backend="reference")
    torch.testing.assert_close(out.double(), _dense(q, k, v)[0], atol=1e-5, rtol=1e-5)
    pad = _left_pad(b, lk, [0, min(41, lk - 5)][:b])
    out, _ = sel.attend(q, k, v, key_padding_mask=pad, backend="reference")
    want = _dense(q, k, v, pad)[0]
    rows = pad[:, lk - lq:]  # queries that see at least one key
    torch.testing.assert_close(out.double()[rows[:, None].expand(-1, hq, -1)], want[rows[:, None].expand(-1, hq, -1)],
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("hq,hkv,lq,lk", [(4, 4, 200, 200), (8, 2, 260, 90)])
def test_noncausal_core_with_one_block_is_dense(hq, hkv, lq, lk):
    q, k, v = _qkv(2, hq, hkv, lq, lk, seed=2)
    out, lse = Hyper(min_seq_len=1, block_size=256, sample_size=16).attend_noncausal(q, k, v, backend="reference")
    want, want_lse = _dense(q, k, v, causal=False)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=1e-5)


def test_core_block_diagonal_part_is_the_sorted_buckets():
    """Without samples, each query attends exactly the keys of its diagonal block in LSH-sorted order (built
    here token by token from the hashes)."""
    b, hq, hkv, n, bs = 2, 4, 2, 96, 16
    q, k, v = _qkv(b, hq, hkv, n, n, seed=3)
    sel = Hyper(min_seq_len=1, block_size=bs, sample_size=0, seed=5)
    out, _ = sel.attend_noncausal(q, k, v, backend="reference", layer_idx=3)
    run = _Run(sel, q, 0.25, "reference", 3)
    # sorted position of each token
    q_pos = torch.argsort(torch.argsort(run.hash(q, None), dim=-1, stable=True), dim=-1)
    k_pos = torch.argsort(torch.argsort(run.hash(k, None), dim=-1, stable=True), dim=-1)
    k_pos = k_pos.repeat_interleave(hq // hkv, 1)
    mask = (q_pos[..., :, None] // bs) == (k_pos[..., None, :] // bs)
    torch.testing.assert_close(out.double(), dense_attention(q, k, v, mask)[0], atol=1e-5, rtol=1e-5)


def test_many_samples_converge_to_dense():
    """Samples outside the diagonal block with weight n/m estimate the rest of the softmax without bias: with
    many samples the non-causal core approaches dense attention (double counting the diagonal would not)."""
    q, k, v = _qkv(1, 2, 2, 128, 128, d=8, seed=4)
    q = q * 0.5
    want = _dense(q, k, v, causal=False)[0]
    out, _ = Hyper(min_seq_len=1, block_size=16, sample_size=40_000).attend_noncausal(q, k, v, backend="reference")
    assert float((out.double() - want).abs().max()) < 0.03
    out, _ = Hyper(min_seq_len=1, block_size=16, sample_size=16).attend_noncausal(q, k, v, backend="reference")
    assert float((out.double() - want).abs().max()) > 0.05


# ------------------------------------------------------------------------------------------ approximation
@pytest.mark.parametrize("b,hq,hkv,lq,lk", [(2, 4, 4, 300, 300), (2, 8, 2, 301, 301), (1, 4, 1, 250, 400)])
def test_recursion_close_on_clustered_and_not_on_random(b, hq, hkv, lq, lk):
    sel = Hyper(**SMALL)
    q, k, v = _clustered(b, hq, hkv, lq, lk, seed=5)
    out, _ = sel.attend(q, k, v, backend="reference")
    assert _relative_error(out, _dense(q, k, v)[0]) < 0.02
    q, k, v = _qkv(b, hq, hkv, lq, lk, seed=5)
    out, _ = sel.attend(q, k, v, backend="reference")
    assert _relative_error(out, _dense(q, k, v)[0]) > 0.3


def _relative_error(out, want):
    return float((out.double() - want).norm() / want.norm())


def test_deterministic_per_seed_and_layer():
    q, k, v = _qkv(2, 4, 2, 257, 257, seed=6)
    a, _ = Hyper(**SMALL, seed=1).attend(q, k, v, backend="reference", layer_idx=0)
    again, _ = Hyper(**SMALL, seed=1).attend(q, k, v, backend="reference", layer_idx=0)
    assert torch.equal(a, again)
    other_seed, _ = Hyper(**SMALL, seed=2).attend(q, k, v, backend="reference", layer_idx=0)
    other_layer, _ = Hyper(**SMALL, seed=1).attend(q, k, v, backend="reference", layer_idx=1)
    assert not torch.equal(a, other_seed) and not torch.equal(a, other_layer)


def test_padded_keys_get_no_weight_anywhere():
    """Changing the padded tokens (queries, keys and values, to huge values) leaves every real row unchanged:
    they are out of the buckets, the block-diagonal part and the samples, at every level and in the prefix."""
    b, hq, hkv, lq, lk = 2, 4, 2, 270, 330
    q, k, v = _qkv(b, hq, hkv, lq, lk, seed=7)
    pad = _left_pad(b, lk, [30, 100])  # sequence 1: padding covers all the prefix and the start of the queries
    sel = Hyper(**SMALL)
    out, _ = sel.attend(q, k, v, key_padding_mask=pad, backend="reference")
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    k2[~pad[:, None].expand_as(k2[..., 0])] = 1e3
    v2[~pad[:, None].expand_as(v2[..., 0])] = 1e4
    q2[~pad[:, None, lk - lq:].expand_as(q2[..., 0])] = -1e3
    out2, _ = sel.attend(q2, k2, v2, key_padding_mask=pad, backend="reference")
    rows = pad[:, None, lk - lq:].expand(b, hq, lq)
    assert torch.isfinite(out).all() and torch.isfinite(out2).all()
    torch.testing.assert_close(out[rows], out2[rows], atol=1e-6, rtol=1e-6)
    # and padding is not ignored: the padded result is close to the dense padded one on clustered data
    q, k, v = _clustered(b, hq, hkv, lq, lk, seed=7)
    out, _ = sel.attend(q, k, v, key_padding_mask=pad, backend="reference")
    assert _relative_error(out[rows], _dense(q, k, v, pad)[0][rows]) < 0.02


def test_density_counts_the_work():
    q, k, v = _qkv(1, 2, 2, 1024, 1024, seed=8)
    _, density = Hyper(min_seq_len=128, block_size=32, sample_size=32).attend(q, k, v, backend="reference")
    # leaves 8 x 1 tile; cores 512 + 2*256 + 4*128 query rows x (32 + 32) keys = 6 tiles; of 36 causal tiles
    assert density == pytest.approx(14 / 36)


def test_gray_rank_orders_buckets_one_sign_apart():
    rank = _gray_rank(5)
    order = torch.argsort(rank)  # bucket at each position of the order
    assert sorted(rank.tolist()) == list(range(32))
    flips = [bin(int(a) ^ int(c)).count("1") for a, c in zip(order[:-1], order[1:])]
    assert flips == [1] * 31


def test_parameters():
    sel = Hyper()
    assert (sel.lsh_num_projs, sel.block_size, sel.sample_size, sel.min_seq_len) == (7, 256, 256, 4096)
    for bad in (dict(lsh_num_projs=0), dict(lsh_num_projs=17), dict(block_size=100), dict(block_size=8),
                dict(sample_size=-1), dict(min_seq_len=0), dict(seed=-1), dict(seed=1.5), dict(dense_below=-1)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            Hyper(**bad)
    q, k, v = _qkv(1, 3, 2, 40, 40)
    with pytest.raises(ValueError, match="multiple"):
        Hyper(**SMALL).attend(q, k, v)
    q, k, v = _qkv(1, 2, 2, 50, 40)
    with pytest.raises(ValueError, match="more positions"):
        Hyper(**SMALL).attend(q, k, v)
    q, k, v = _qkv(1, 2, 2, 40, 40)
    with pytest.raises(ValueError, match="key_padding_mask"):
        Hyper(**SMALL).attend(q, k, v, key_padding_mask=torch.ones(1, 39, dtype=torch.bool))
    with pytest.raises(NotImplementedError, match="attend"):
        Hyper().select(q, k)


def test_hf_smoke_left_padding():
    from test_hf import _inputs, _pair

    assert "hyper" in sparsa.methods()["prefill"]
    ref, ours = _pair("llama", seed=22)
    sparsa.configure(ours, prefill="hyper", dense_below=0, min_seq_len=32, block_size=16, sample_size=8)
    ids, mask = _inputs(length=160, pad=37)
    with torch.no_grad():
        a = ref(ids, attention_mask=mask).logits
        b = ours(ids, attention_mask=mask).logits
        again = ours(ids, attention_mask=mask).logits
    assert torch.isfinite(b).all()
    assert torch.equal(b, again)
    real = mask.bool()
    assert (a - b)[real].abs().max() > 1e-4  # approximate, not the dense result
    st = sparsa.stats(ours)
    assert st["methods"] == ["hyper"] and not st["fallbacks"]
    assert 0.0 < st["density"] <= 1.0
    # the padded sequence's real tokens do not depend on what sits in the padding
    ids2 = ids.clone()
    ids2[1, :37] = (ids[1, :37] + 1) % ids.max()
    with torch.no_grad():
        c = ours(ids2, attention_mask=mask).logits
    assert float((b - c)[real].abs().max()) < 1e-5
    assert not math.isnan(float(c.sum()))
