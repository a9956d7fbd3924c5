"""BiFormer bi-level routing: the causal 1-D prefill selector and the non-causal 2-D op."""

import pytest
import torch

import sparsa
import sparsa.prefill.biformer  # noqa: F401  (registers "biformer")
from selector_checks import assert_padding_ignored
from dense_reference import dense_attention, token_mask_of
from sparsa.ops import block_sparse_attention
from sparsa.prefill.biformer import BiFormer, biformer_attention_2d, from_region_major, to_region_major


def _qkv(b, hq, hkv, lq, lk, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, lq, d, generator=g), torch.randn(b, hkv, lk, d, generator=g),
            torch.randn(b, hkv, lk, d, generator=g))


def _routing(**params):
    """The selector as these routing tests were written for: the paper's mean routing without forced sink and
    local blocks unless the test asks for them (the defaults are bound scoring, 1 sink and 2 local blocks)."""
    return BiFormer(**{"scoring": "mean", "sink_blocks": 0, "local_blocks": 0, **params})


def _causal(lq, lk):
    return torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)


def _dense(q, k, v):
    return dense_attention(q, k, v, _causal(q.shape[2], k.shape[2]).expand(q.shape[0], q.shape[1], -1, -1))[0]


# ------------------------------------------------------------------------------------------------ 1-D
def test_bound_routing_matches_brute_force():
    """scoring="bound": per KV head and query block, the topk visible key blocks with the highest
    max over sampled queries (all heads of the group) of sum_d max(q_d max_j k_jd, q_d min_j k_jd), plus the
    diagonal; checked with loops in float64, GQA, Lq < Lk, a length that is not a multiple of the block, and
    chunked scoring (query_samples=4 of 16)."""
    from sparsa.prefill.estimate import sample_rows

    b, hq, hkv, lq, lk, block, topk = 2, 8, 2, 150, 333, 16, 3
    q, k, _ = _qkv(b, hq, hkv, lq, lk, seed=7)
    sel = _routing(topk=topk, block=block, query_samples=4, scoring="bound")
    got = sel.select(q, k).validate().to_block_mask()
    group, offset = hq // hkv, lk - lq
    rows = sample_rows(lq, block, 4, "cpu")
    qb, kb = -(-lq // block), -(-lk // block)
    want = torch.zeros(b, hkv, qb, kb, dtype=torch.bool)
    for r in range(qb):
        last = (min((r + 1) * block, lq) - 1 + offset) // block
        for bb in range(b):
            for h in range(hkv):
                qs = q[bb, h * group:(h + 1) * group, rows[r]].double().reshape(-1, q.shape[-1])
                scores = []
                for c in range(last + 1):
                    keys = k[bb, h, c * block:(c + 1) * block].double()
                    hi, lo = keys.max(0).values, keys.min(0).values
                    scores.append(torch.maximum(qs * hi, qs * lo).sum(-1).max())
                for c in torch.topk(torch.stack(scores), min(topk, last + 1)).indices.tolist():
                    want[bb, h, r, c] = True
                want[bb, h, r, last] = True
    assert torch.equal(got, want)


def test_bound_routing_finds_a_needle_the_means_miss():
    """One key far back matches the last queries strongly, among keys of little variance (as real keys are, with
    a few large channels); another block's keys all lean the queries' way a little. The bound routes the last
    query block to the needle's block; the block means, where one key is diluted 64-fold, prefer the other."""
    g = torch.Generator().manual_seed(11)
    d, length, block = 64, 1024, 64
    q, v = (torch.randn(1, 2, length, d, generator=g) for _ in range(2))
    k = 0.1 * torch.randn(1, 2, length, d, generator=g)
    direction = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
    q[:, :, -block:] = 0.2 * q[:, :, -block:] + 4.0 * direction
    k[:, :, 3 * block + 17] += 3.0 * direction  # the needle, inside key block 3
    k[:, :, 6 * block:7 * block] += 0.5 * direction  # a block of mild matches
    last = length // block - 1
    for scoring, want in (("bound", 3), ("mean", 6)):
        blocks = _routing(topk=1, block=block, scoring=scoring).select(q, k).to_block_mask()
        picked = blocks[0, :, last, :last].nonzero()[:, 1]
        assert picked.tolist() == [want, want], scoring


def test_defaults_with_full_budget_equal_dense_and_small_budget_differs():
    """The defaults (bound routing, sink and local blocks, 128-token blocks): a budget covering every block is
    dense causal attention; one routed block is not. GQA, batch 2, Lq < Lk, lengths off the block grid."""
    q, k, v = _qkv(2, 8, 2, 700, 1100, seed=3)
    full = BiFormer(topk=100).select(q, k).validate()
    assert full.density() == 1.0
    out = block_sparse_attention(q, k, v, full, backend="reference")
    torch.testing.assert_close(out.double(), _dense(q, k, v), atol=1e-5, rtol=1e-5)
    small = BiFormer(topk=1).select(q, k).validate()
    assert small.density() < 0.8
    sparse = block_sparse_attention(q, k, v, small, backend="reference")
    assert float((sparse.double() - _dense(q, k, v)).norm() / _dense(q, k, v).norm()) > 1e-3


@pytest.mark.parametrize("scoring", ["mean", "bound"])
@pytest.mark.parametrize("b,hq,hkv,lq,lk", [(2, 4, 4, 203, 203), (1, 8, 2, 150, 333), (2, 4, 1, 96, 96)])
def test_full_topk_equals_dense_causal(b, hq, hkv, lq, lk, scoring):
    q, k, v = _qkv(b, hq, hkv, lq, lk)
    pattern = _routing(topk=100, block=16, scoring=scoring).select(q, k).validate()
    assert pattern.density() == 1.0
    out = block_sparse_attention(q, k, v, pattern, backend="reference")
    torch.testing.assert_close(out.double(), _dense(q, k, v), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2)])
@pytest.mark.parametrize("lq,lk", [(300, 300), (130, 300)])
def test_small_topk_routes_by_pooled_scores(hq, hkv, lq, lk):
    """Per KV head, each query block keeps the topk visible key blocks with the highest mean(q_group) . mean(k)
    plus its diagonal block; the kernel computes exactly those tiles; the output differs from dense."""
    b, block, topk = 2, 16, 3
    q, k, v = _qkv(b, hq, hkv, lq, lk, seed=1)
    sel = _routing(topk=topk, block=block, scoring="mean")
    pattern = sel.select(q, k).validate()
    assert pattern.heads == hkv and pattern.batch == b
    assert pattern.density() < 0.6

    # independent routing: loops over blocks, float64
    group, offset = hq // hkv, lk - lq
    qb, kb = -(-lq // block), -(-lk // block)
    want = torch.zeros(b, hkv, qb, kb, dtype=torch.bool)
    for r in range(qb):
        rows = slice(r * block, min((r + 1) * block, lq))
        last = (min((r + 1) * block, lq) - 1 + offset) // block
        for bb in range(b):
            for h in range(hkv):
                q_r = q[bb, h * group:(h + 1) * group, rows].double().mean(1).mean(0)
                scores = torch.stack([q_r @ k[bb, h, c * block:(c + 1) * block].double().mean(0)
                                      for c in range(last + 1)])
                for c in torch.topk(scores, min(topk, last + 1)).indices.tolist():
                    want[bb, h, r, c] = True
                want[bb, h, r, last] = True
    assert torch.equal(pattern.to_block_mask(), want)

    out = block_sparse_attention(q, k, v, pattern, backend="reference")
    mask = token_mask_of(pattern, b, hq, hkv, causal=True)
    torch.testing.assert_close(out.double(), dense_attention(q, k, v, mask)[0], atol=1e-5, rtol=1e-5)
    assert (out.double() - _dense(q, k, v)).abs().max() > 1e-2


def test_planted_far_block_is_selected():
    """Later queries match one far key block strongly: with topk=1 it is the block they route to (the paper's
    mean routing; with keys this noisy, 32 dims of unit variance, the Quest bound is loose for every block)."""
    scoring = "mean"
    b, hq, hkv, length, block, far = 1, 4, 2, 512, 32, 3
    q, k, v = _qkv(b, hq, hkv, length, length, d=32, seed=2)
    direction = torch.nn.functional.normalize(torch.randn(32), dim=0)
    q = 0.3 * q + 6.0 * direction
    keys = slice(far * block, (far + 1) * block)
    k[:, :, keys] = 0.3 * k[:, :, keys] + 6.0 * direction
    pattern = _routing(topk=1, block=block, scoring=scoring).select(q, k)
    blocks = pattern.to_block_mask()
    assert bool(blocks[:, :, far + 1:, far].all()), "every later query block must read the planted block"
    assert int(blocks[:, :, far + 1:].sum(-1).max()) == 2  # the planted block plus the diagonal
    assert not bool(blocks[:, :, far + 2:, 0].any())  # no sink block is forced in
    assert pattern.density() < 0.25  # 2 of the 1..16 visible blocks per row
    out = block_sparse_attention(q, k, v, pattern, backend="reference")[:, :, (far + 1) * block:]
    ref = _dense(q, k, v)[:, :, (far + 1) * block:]
    assert float((out.double() - ref).norm() / ref.norm()) < 0.05


def test_selector_parameters_and_registration():
    assert "biformer" in sparsa.methods()["prefill"]
    d = BiFormer()
    assert (d.topk, d.block, d.scoring, d.sink_blocks, d.local_blocks) == (16, 128, "bound", 1, 2)
    with pytest.raises(ValueError, match="topk"):
        BiFormer(topk=0)
    with pytest.raises(ValueError, match="block"):
        BiFormer(block=48)
    with pytest.raises(ValueError, match="scoring"):
        BiFormer(scoring="max")
    with pytest.raises(ValueError, match="query_samples"):
        BiFormer(block=16, query_samples=17)
    with pytest.raises(ValueError, match="dense_below"):
        BiFormer(dense_below=-1)
    q, k, _ = _qkv(1, 3, 2, 64, 64)
    with pytest.raises(ValueError, match="multiple"):
        BiFormer(block=16).select(q, k)
    q, k, _ = _qkv(1, 2, 2, 80, 64)
    with pytest.raises(ValueError, match="more positions"):
        BiFormer(block=16).select(q, k)


@pytest.mark.parametrize("scoring", ["mean", "bound"])
@pytest.mark.parametrize("lq", [400, 300])
def test_ignores_padded_keys(lq, scoring):
    """A left-padded second sequence: real query blocks never route to key blocks made only of padding, while
    the unmasked routing does; an unpadded sequence keeps its pattern."""
    lk, bs, n_pad = 400, 16, 128  # key blocks 0-7 of sequence 1 are padding
    q, k, v = _qkv(2, 8, 2, lq, lk, seed=23)
    pad = torch.ones(2, lk, dtype=torch.bool)
    pad[1, :n_pad] = False
    sel = _routing(topk=4, block=bs, scoring=scoring)
    pattern = sel.select(q, k, key_padding_mask=pad).validate()
    assert pattern.batch == 2 and pattern.heads == 2
    rows = torch.arange(-(-lq // bs)) * bs + (lk - lq) >= n_pad  # real query blocks whose diagonal is real
    assert int(rows.sum()) > 10
    padded_only = slice(0, n_pad // bs)
    assert_padding_ignored(sel, q, k, v, pad, rows, padded_only, n_pad)


def test_hf_smoke_left_padding():
    from test_hf import _inputs, _pair

    ref, ours = _pair("llama", seed=21)
    sparsa.configure(ours, prefill="biformer", topk=2, block=16, dense_below=0)
    ids, mask = _inputs(length=160, pad=37)
    with torch.no_grad():
        a = ref(ids, attention_mask=mask).logits
        b = ours(ids, attention_mask=mask).logits
    real = mask.bool()
    assert torch.isfinite(b).all()
    assert (a - b)[real].abs().max() > 1e-4  # sparse: not the dense result
    st = sparsa.stats(ours)
    assert st["methods"] == ["biformer"] and not st["fallbacks"]
    assert 0.0 < st["density"] < 1.0


# ------------------------------------------------------------------------------------------------ 2-D
def _routing_reference(q, k, height, width, n_win, topk, per_head=False):
    """Brute force, row-major: region of every pixel, region means by loops, top-k regions per region, and the
    token mask [B, Hq, HW, HW] built from the routing result directly."""
    b, hq, n, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    rh, rw = height // n_win, width // n_win
    region_of = torch.tensor([(y // rh) * n_win + (x // rw) for y in range(height) for x in range(width)])
    regions = n_win * n_win
    q_r = torch.stack([q[:, :, region_of == r].double().mean(2) for r in range(regions)], 2)  # [B, Hq, R, D]
    k_r = torch.stack([k[:, :, region_of == r].double().mean(2) for r in range(regions)], 2)  # [B, Hkv, R, D]
    k_r = k_r.repeat_interleave(group, 1)
    scores = torch.einsum("bhqd,bhkd->bhqk", q_r, k_r)  # per query head
    if per_head:
        scores = scores.view(b, hkv, group, regions, regions).sum(2).repeat_interleave(group, 1)
    else:
        scores = scores.sum(1, keepdim=True).expand(b, hq, regions, regions)
    chosen = torch.zeros(b, hq, regions, regions, dtype=torch.bool)
    chosen.scatter_(-1, torch.topk(scores, topk, dim=-1).indices, True)
    mask = chosen[:, :, region_of][:, :, :, region_of]  # [B, Hq, HW, HW]
    return mask


@pytest.mark.parametrize("b,hq,hkv,height,width,n_win,topk,per_head", [
    (2, 4, 4, 12, 8, 4, 3, False),
    (1, 4, 2, 8, 8, 2, 2, False),
    (2, 8, 2, 12, 12, 3, 4, True),
    (1, 2, 2, 6, 9, 3, 9, False),  # full: every region
])
def test_2d_matches_brute_force(b, hq, hkv, height, width, n_win, topk, per_head):
    n = height * width
    q, k, v = _qkv(b, hq, hkv, n, n, seed=3)
    out, pattern = biformer_attention_2d(q, k, v, height, width, n_win, topk, backend="reference",
                                         per_head=per_head, return_pattern=True)
    assert pattern.block_q == (height // n_win) * (width // n_win)
    mask = _routing_reference(q, k, height, width, n_win, topk, per_head)
    want = dense_attention(q, k, v, mask)[0]
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    if topk == n_win * n_win:
        full = dense_attention(q, k, v, torch.ones(b, hq, n, n, dtype=torch.bool))[0]
        torch.testing.assert_close(out.double(), full, atol=1e-5, rtol=1e-5)
    else:
        assert pattern.density(causal=False) < 1.0


def test_2d_region_major_round_trip():
    x = torch.arange(2 * 3 * 12 * 8 * 2, dtype=torch.float32).view(2, 3, 96, 2)
    y = to_region_major(x, 12, 8, 4)
    # first region: rows 0..2, columns 0..1 of the 12 x 8 grid, row-major inside the region
    assert y[0, 0, :6, 0].tolist() == [x[0, 0, p, 0].item() for p in (0, 1, 8, 9, 16, 17)]
    assert torch.equal(from_region_major(y, 12, 8, 4), x)


def test_2d_errors():
    q, k, v = _qkv(1, 2, 2, 48, 48)
    with pytest.raises(ValueError, match=r"height \(8\) and width \(6\).*n_win \(4\)"):
        biformer_attention_2d(q, k, v, 8, 6, 4, 2)
    with pytest.raises(ValueError, match="topk"):
        biformer_attention_2d(q, k, v, 8, 6, 2, 5)
    with pytest.raises(ValueError, match="topk"):
        biformer_attention_2d(q, k, v, 8, 6, 2, 0)
    with pytest.raises(ValueError, match="height\\*width"):
        biformer_attention_2d(q, k, v, 8, 8, 2, 2)
    with pytest.raises(ValueError, match="n_win"):
        biformer_attention_2d(q, k, v, 8, 6, 0, 1)


@pytest.mark.parametrize("scoring", ["mean", "bound"])
def test_sink_and_local_blocks_come_on_top_of_the_routed_ones(scoring):
    """sink_blocks / local_blocks are always computed and do not use the topk budget; GQA, Lq < Lk, batch 2."""
    b, hq, hkv, lq, lk, block, topk = 2, 8, 2, 300, 517, 16, 3
    q, k, v = _qkv(b, hq, hkv, lq, lk, seed=4)
    plain = _routing(topk=topk, block=block, scoring=scoring).select(q, k).to_block_mask()
    sel = _routing(topk=topk, block=block, scoring=scoring, sink_blocks=1, local_blocks=2)
    pattern = sel.select(q, k).validate()
    blocks = pattern.to_block_mask()
    offset = lk - lq
    for r in range(blocks.shape[2]):
        last = (min((r + 1) * block, lq) - 1 + offset) // block
        forced = {0} | set(range(max(last - 2, 0), last + 1))
        row = blocks[:, :, r]
        assert bool(row[..., sorted(forced)].all())
        routed = row.clone()
        routed[..., sorted(forced)] = False
        assert int(routed.sum(-1).max()) <= topk  # the budget goes to blocks beyond the forced ones
        assert not bool(row[..., last + 1:].any())
    assert bool((blocks & ~plain).any())  # the forced blocks add tiles
    out = block_sparse_attention(q, k, v, pattern, backend="reference")
    mask = token_mask_of(pattern, b, hq, hkv, causal=True)
    torch.testing.assert_close(out.double(), dense_attention(q, k, v, mask)[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="local_blocks"):
        _routing(local_blocks=-1)


def test_topk_fraction_grows_the_budget_with_the_context():
    sel = BiFormer(topk=8, topk_fraction=1 / 16)
    assert [sel.budget(n) for n in (8192, 16384, 32768, 131072, 100)] == [8, 8, 16, 64, 8]
    assert BiFormer(topk=8).budget(131072) == 8
    for bad in (-0.1, 1.5, "0.1", True):
        with pytest.raises(ValueError, match="topk_fraction"):
            BiFormer(topk_fraction=bad)

    torch.manual_seed(5)
    bs, lk = 16, 16 * 40
    q, k = torch.randn(1, 4, lk, 32), torch.randn(1, 2, lk, 32)
    base = dict(topk=2, block=bs, query_samples=4, sink_blocks=0, local_blocks=0)
    small = BiFormer(**base).select(q, k)
    grown = BiFormer(**base, topk_fraction=0.25).select(q, k)  # 10 of 40 key blocks
    last_row = grown.kv_num_blocks[0, :, -1]
    assert ((last_row >= 10) & (last_row <= 11)).all()  # the budget, plus the diagonal when it was not picked
    assert grown.density() > small.density()
    full = BiFormer(**base, topk_fraction=1.0).select(q, k)
    assert full.density() == pytest.approx(1.0)
