"""BlockPattern: layout checks, validate(), density, union and the constructors."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dense_reference import block_map_of, token_mask_of
from sparsa import BlockPattern, Neighborhood1D, SinkWindow
from sparsa.pattern import causal_block_mask, last_visible_block


def cdiv(a, b):
    return -(-a // b)


def brute_visible_tiles(q_len, kv_len, block_q, block_k):
    """[Qb, Kb]: tiles holding a causally visible pair, from token positions."""
    qb, kb = cdiv(q_len, block_q), cdiv(kv_len, block_k)
    out = torch.zeros(qb, kb, dtype=torch.bool)
    for qi in range(q_len):
        pos = qi + kv_len - q_len
        for k in range(0, pos + 1):
            out[qi // block_q, k // block_k] = True
    return out


def pattern_from_rows(rows, q_len, kv_len, block_q, block_k=None, width=None):
    """Hand-written pattern from nested lists ``rows[b][h][r] = [key blocks]``."""
    block_k = block_q if block_k is None else block_k
    width = width or max(1, max(len(r) for b in rows for h in b for r in h))
    num = torch.tensor([[[len(r) for r in h] for h in b] for b in rows], dtype=torch.int32)
    idx = torch.tensor([[[list(r) + [0] * (width - len(r)) for r in h] for h in b] for b in rows],
                       dtype=torch.int32)
    return BlockPattern(num, idx, block_q, block_k, q_len, kv_len)


# ------------------------------------------------------------------------------------------- layout
def test_post_init_rejects_bad_layouts():
    num = torch.ones(1, 1, 2, dtype=torch.int32)
    idx = torch.zeros(1, 1, 2, 1, dtype=torch.int32)
    BlockPattern(num, idx, 4, 4, 8, 8)
    with pytest.raises(ValueError, match="kv_num_blocks"):
        BlockPattern(num.long(), idx, 4, 4, 8, 8)
    with pytest.raises(ValueError, match="kv_indices"):
        BlockPattern(num, idx.long(), 4, 4, 8, 8)
    with pytest.raises(ValueError, match="kv_indices"):
        BlockPattern(num, idx[..., 0], 4, 4, 8, 8)
    with pytest.raises(ValueError, match="disagree"):
        BlockPattern(num, torch.zeros(1, 2, 2, 1, dtype=torch.int32), 4, 4, 8, 8)
    with pytest.raises(ValueError, match="query blocks"):  # q_len 9 needs 3 query blocks of 4
        BlockPattern(num, idx, 4, 4, 9, 9)
    with pytest.raises(ValueError, match="q_len"):
        BlockPattern(num, idx, 4, 4, 8, 7)
    with pytest.raises(ValueError, match="block_q"):
        BlockPattern(num, idx, 0, 4, 8, 8)
    with pytest.raises(ValueError, match="kv_full"):
        BlockPattern(num, idx, 4, 4, 8, 8, kv_full=torch.zeros(1, 1, 2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="kernel_size"):  # the token mask is checked against the lengths
        BlockPattern(num, idx, 4, 4, 8, 8, token_mask=Neighborhood1D(3, 3, False, 8))


def test_validate_catches_bad_values():
    ok = pattern_from_rows([[[[0], [0, 2]]]], 8, 10, 4, width=3)
    assert ok.validate() is ok
    cases = {
        "must lie in": ([[[-1, 1]]], [[[[0, 0], [0, 1]]]]),
        "must lie in \\[0, 2\\]": ([[[3, 1]]], [[[[0, 1], [0, 1]]]]),
        "out of range": ([[[1, 2]]], [[[[0, 9], [0, 3]]]]),
        "out of range.*-1": ([[[1, 2]]], [[[[-1, 0], [0, 1]]]]),
        "strictly increasing": ([[[1, 2]]], [[[[0, 0], [2, 1]]]]),
        "strictly increasing ": ([[[1, 2]]], [[[[0, 0], [1, 1]]]]),
    }
    for message, (num, idx) in cases.items():
        p = BlockPattern(torch.tensor(num, dtype=torch.int32), torch.tensor(idx, dtype=torch.int32), 4, 4, 8, 10)
        with pytest.raises(ValueError, match=message.strip()):
            p.validate()
    # entries past kv_num_blocks are ignored, whatever they hold
    p = BlockPattern(torch.tensor([[[1, 2]]], dtype=torch.int32),
                     torch.tensor([[[[1, -7, 99], [0, 2, 2]]]], dtype=torch.int32), 4, 4, 8, 10)
    p.validate()
    assert torch.equal(block_map_of(p), p.to_block_mask())


@settings(max_examples=40)
@given(st.data())
def test_from_block_mask_round_trip(data):
    q_len = data.draw(st.integers(1, 30))
    kv_len = data.draw(st.integers(q_len, 40))
    block_q, block_k = data.draw(st.integers(1, 9)), data.draw(st.integers(1, 9))
    bp, hp = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3))
    qb, kb = cdiv(q_len, block_q), cdiv(kv_len, block_k)
    seed = data.draw(st.integers(0, 2**31 - 1))
    density = data.draw(st.sampled_from([0.0, 0.2, 0.6, 1.0]))
    mask = torch.rand(bp, hp, qb, kb, generator=torch.Generator().manual_seed(seed)) < density
    p = BlockPattern.from_block_mask(mask, q_len=q_len, kv_len=kv_len, block_q=block_q, block_k=block_k)
    p.validate()
    assert (p.batch, p.heads, p.num_q_blocks, p.num_kv_blocks) == (bp, hp, qb, kb)
    assert torch.equal(p.kv_num_blocks, mask.sum(-1, dtype=torch.int32))
    assert torch.equal(block_map_of(p), mask)
    assert torch.equal(p.to_block_mask(), mask)
    assert p.kv_full is None
    # 2-D maps mean one pattern for the batch and heads
    p2 = BlockPattern.from_block_mask(mask[0, 0], q_len=q_len, kv_len=kv_len, block_q=block_q, block_k=block_k)
    assert (p2.batch, p2.heads) == (1, 1) and torch.equal(block_map_of(p2)[0, 0], mask[0, 0])


def test_from_block_mask_errors():
    with pytest.raises(ValueError, match="mask must be bool"):
        BlockPattern.from_block_mask(torch.ones(2, 2), q_len=8, kv_len=8, block_q=4)
    with pytest.raises(ValueError, match="mask must be bool \\[..., 2, 3\\]"):
        BlockPattern.from_block_mask(torch.ones(2, 2, dtype=torch.bool), q_len=8, kv_len=12, block_q=4)
    with pytest.raises(ValueError, match="mask must have 2 to 4 dims"):
        BlockPattern.from_block_mask(torch.ones(1, 1, 1, 2, 2, dtype=torch.bool), q_len=8, kv_len=8, block_q=4)
    with pytest.raises(ValueError, match="mask must be a tensor"):
        BlockPattern.from_block_mask([[True]], q_len=8, kv_len=8, block_q=8)


def test_from_block_mask_with_token_mask_and_no_full_map_claims_no_full_tile():
    """Without a full map nothing is known to be fully visible (kernels would skip the token mask there)."""
    mask = causal_block_mask(20, 20, 4, 4)
    p = BlockPattern.from_block_mask(mask, q_len=20, kv_len=20, block_q=4, token_mask=SinkWindow(1, 3))
    assert p.kv_full is not None and not p.kv_full.any()


def test_expand_and_to():
    p = BlockPattern.dense(20, 30, block_q=8)
    e = p.expand(3, 4)
    assert (e.batch, e.heads) == (3, 4)
    assert torch.equal(block_map_of(e), block_map_of(p).expand(3, 4, -1, -1))
    assert p.to("cpu").device == torch.device("cpu")


# ------------------------------------------------------------------------------------------- density
def test_density_hand_checked():
    # 8 x 8, blocks of 4: causally visible tiles (0,0), (1,0), (1,1)
    diag = BlockPattern.from_block_mask(torch.tensor([[True, False], [False, True]]), q_len=8, kv_len=8, block_q=4)
    assert diag.density() == pytest.approx(2 / 3)
    assert diag.density(causal=False) == pytest.approx(2 / 4)
    upper = BlockPattern.from_block_mask(torch.tensor([[False, True], [False, True]]), q_len=8, kv_len=8, block_q=4)
    assert upper.density() == pytest.approx(1 / 3)  # tile (0, 1) is above the diagonal: not counted
    assert upper.density(causal=False) == pytest.approx(2 / 4)
    # prefix KV: 4 queries at positions 6..9 of 10 keys see all 3 key blocks
    first = BlockPattern.from_block_mask(torch.tensor([[True, False, False]]), q_len=4, kv_len=10, block_q=4)
    assert first.density() == pytest.approx(1 / 3)
    # unequal blocks: 10 x 10, block_q 4, block_k 3 -> visible tiles per row 2, 3, 4 (9 in all)
    dense = BlockPattern.dense(10, 10, block_q=4, block_k=3)
    col0 = BlockPattern.from_block_mask(torch.tensor([[True, False, False, False]] * 3), q_len=10, kv_len=10,
                                        block_q=4, block_k=3)
    assert dense.density() == 1.0
    assert dense.density(causal=False) == pytest.approx(9 / 12)
    assert col0.density() == pytest.approx(3 / 9)
    both = torch.stack([dense.to_block_mask()[0, 0], col0.to_block_mask()[0, 0]])[None]  # [1, 2, Qb, Kb]
    per_head = BlockPattern.from_block_mask(both, q_len=10, kv_len=10, block_q=4, block_k=3)
    assert torch.allclose(per_head.density_per_head(), torch.tensor([[1.0, 3 / 9]], dtype=torch.float64))
    assert per_head.density() == pytest.approx(12 / 18)
    per_batch = BlockPattern.from_block_mask(both.transpose(0, 1), q_len=10, kv_len=10, block_q=4, block_k=3)
    assert per_batch.density_per_head().shape == (2, 1)
    assert per_batch.density() == pytest.approx(12 / 18)


@pytest.mark.parametrize("q_len,kv_len,block_q,block_k", [(1, 1, 1, 1), (37, 37, 8, 8), (13, 100, 16, 5),
                                                          (100, 130, 7, 11), (64, 64, 128, 128)])
def test_dense_is_every_visible_tile(q_len, kv_len, block_q, block_k):
    p = BlockPattern.dense(q_len, kv_len, block_q=block_q, block_k=block_k).validate()
    assert p.density() == 1.0
    assert torch.equal(block_map_of(p)[0, 0], brute_visible_tiles(q_len, kv_len, block_q, block_k))
    assert torch.equal(causal_block_mask(q_len, kv_len, block_q, block_k), block_map_of(p)[0, 0])
    nc = BlockPattern.dense(q_len, kv_len, causal=False, block_q=block_q, block_k=block_k).validate()
    assert nc.density(causal=False) == 1.0 and nc.density() == 1.0
    assert block_map_of(nc).all()


# --------------------------------------------------------------------------------------------- union
def _random_pattern(seed, shape, q_len, kv_len, block_q, block_k, density=0.4, token_mask=None):
    qb, kb = cdiv(q_len, block_q), cdiv(kv_len, block_k)
    mask = torch.rand(*shape, qb, kb, generator=torch.Generator().manual_seed(seed)) < density
    return BlockPattern.from_block_mask(mask, q_len=q_len, kv_len=kv_len, block_q=block_q, block_k=block_k,
                                       token_mask=token_mask)


@pytest.mark.parametrize("shapes", [((1, 1), (1, 1)), ((1, 3), (2, 1)), ((2, 3), (2, 3)), ((1, 1), (2, 4))])
def test_union(shapes):
    a = _random_pattern(1, shapes[0], 45, 61, 8, 6)
    b = _random_pattern(2, shapes[1], 45, 61, 8, 6)
    ab, ba = a.union(b), b.union(a)
    ab.validate()
    ma, mb = block_map_of(a), block_map_of(b)
    shape = torch.broadcast_shapes(ma.shape, mb.shape)
    assert block_map_of(ab).shape == shape
    assert torch.equal(block_map_of(ab), block_map_of(ba))
    assert torch.equal(block_map_of(ab), ma.expand(shape) | mb.expand(shape))
    assert not (ma.expand(shape) & ~block_map_of(ab)).any() and not (mb.expand(shape) & ~block_map_of(ab)).any()
    assert ab.density() >= max(a.density(), b.density())


def test_union_with_token_masks_keeps_full_tiles_honest():
    tm = SinkWindow(2, 9)
    stream = BlockPattern.streaming(30, 30, sink=2, window=9, block_q=4)
    extra = _random_pattern(3, (1, 2), 30, 30, 4, 4, token_mask=tm)  # no full map: no tile known full
    u = stream.union(extra).validate()
    assert u.token_mask == tm and u.kv_full is not None
    full = torch.zeros_like(block_map_of(u))
    for h, r in itertools.product(range(u.heads), range(u.num_q_blocks)):
        for j in range(int(u.kv_num_blocks[0, h, r])):
            full[0, h, r, int(u.kv_indices[0, h, r, j])] = bool(u.kv_full[0, h, r, j])
    # a tile is "full" only where every query of the row sees every key of the block
    vis = token_mask_of(BlockPattern.dense(30, 30, block_q=4, block_k=4), 1, 1, 1, True)[0, 0] & \
        tm(torch.arange(30)[:, None], torch.arange(30)[None])
    for r, c in zip(*torch.nonzero(full[0, 0], as_tuple=True)):
        assert vis[r * 4:(r + 1) * 4, c * 4:(c + 1) * 4].all()
    assert full.any()  # the streaming pattern's own full tiles survive the union
    # a hand-made pattern with a token mask and no full map: nothing may be claimed full
    raw = BlockPattern(stream.kv_num_blocks, stream.kv_indices, 4, 4, 30, 30, token_mask=tm)
    assert not raw.union(raw).kv_full.any()
    assert torch.equal(raw.union(stream).kv_full, stream.kv_full)


def test_union_errors():
    a = _random_pattern(1, (1, 2), 40, 40, 8, 8)
    for other, name in ((_random_pattern(1, (1, 2), 39, 40, 8, 8), "q_len"),
                        (_random_pattern(1, (1, 2), 40, 41, 8, 8), "kv_len"),
                        (_random_pattern(1, (1, 2), 40, 40, 4, 8), "block_q"),
                        (_random_pattern(1, (1, 2), 40, 40, 8, 5), "block_k"),
                        (_random_pattern(1, (1, 3), 40, 40, 8, 8), "broadcast"),
                        (BlockPattern.streaming(40, 40, sink=1, window=4, block_q=8), "token mask")):
        with pytest.raises(ValueError, match=name):
            a.union(other)
        with pytest.raises(ValueError, match=name):
            other.union(a)


# ---------------------------------------------------------------------------------- from_block_scores
def _rows_of(p, b, h):
    return [set(p.kv_indices[b, h, r, : int(p.kv_num_blocks[b, h, r])].tolist()) for r in range(p.num_q_blocks)]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("topk", [1, 2, 5, 50])
def test_from_block_scores_topk(causal, topk):
    q_len, kv_len, block_q, block_k = 37, 53, 8, 7
    qb, kb = cdiv(q_len, block_q), cdiv(kv_len, block_k)
    g = torch.Generator().manual_seed(topk)
    # distinct scores, so the top set is unique
    scores = torch.stack([torch.randperm(qb * kb, generator=g).float() for _ in range(6)]).view(2, 3, qb, kb)
    last = last_visible_block(q_len, kv_len, block_q, block_k).tolist()
    plain = BlockPattern.from_block_scores(scores, q_len=q_len, kv_len=kv_len, block_q=block_q, block_k=block_k,
                                           topk=topk, causal=causal, keep_diagonal=False, keep_first=False)
    kept = BlockPattern.from_block_scores(scores, q_len=q_len, kv_len=kv_len, block_q=block_q, block_k=block_k,
                                          topk=topk, causal=causal)
    plain.validate(), kept.validate()
    for b, h in itertools.product(range(2), range(3)):
        for r, (sel, sel_kept) in enumerate(zip(_rows_of(plain, b, h), _rows_of(kept, b, h))):
            visible = list(range(last[r] + 1)) if causal else list(range(kb))
            best = sorted(visible, key=lambda c: -float(scores[b, h, r, c]))[:topk]
            assert sel == set(best)
            extra = {0} | ({last[r]} if causal else set())
            assert sel_kept == set(best) | extra


def test_from_block_scores_mass_hand_checked():
    scores = torch.tensor([[1.0, 4.0, 2.0, 3.0]])  # one query block, four visible key blocks, total 10
    kw = dict(q_len=1, kv_len=4, block_q=1, keep_diagonal=False, keep_first=False)
    assert _rows_of(BlockPattern.from_block_scores(scores, mass=0.4, **kw), 0, 0) == [{1}]
    assert _rows_of(BlockPattern.from_block_scores(scores, mass=0.41, **kw), 0, 0) == [{1, 3}]
    assert _rows_of(BlockPattern.from_block_scores(scores, mass=0.7, **kw), 0, 0) == [{1, 3}]
    assert _rows_of(BlockPattern.from_block_scores(scores, mass=0.71, **kw), 0, 0) == [{1, 3, 2}]
    assert _rows_of(BlockPattern.from_block_scores(scores, mass=1.0, **kw), 0, 0) == [{0, 1, 2, 3}]
    # the fraction is not rounded to float32 (0.3f * 90 > 27 would take a fourth block)
    nines = torch.full((1, 10), 9.0)
    assert len(_rows_of(BlockPattern.from_block_scores(nines, mass=0.3, q_len=1, kv_len=10, block_q=1,
                                                       keep_diagonal=False, keep_first=False), 0, 0)[0]) == 3
    # a row whose visible scores are all <= 0 still keeps one visible tile (and never an invisible one)
    zeros = torch.full((4, 4), -1.0)
    zeros[0, 1:] = 5.0  # invisible tiles of row 0
    p = BlockPattern.from_block_scores(zeros, mass=0.5, q_len=16, kv_len=16, block_q=4, keep_diagonal=False,
                                       keep_first=False)
    assert [len(r) for r in _rows_of(p, 0, 0)] == [1, 1, 1, 1] and _rows_of(p, 0, 0)[0] == {0}
    scores = torch.randint(-2, 10, (1, 2, 19, 19), generator=torch.Generator().manual_seed(1)).float()
    p = BlockPattern.from_block_scores(scores, mass=0.05, q_len=38, kv_len=38, block_q=2, keep_diagonal=False,
                                       keep_first=False)  # (found by test_from_block_scores_mass_property)
    assert (p.kv_num_blocks >= 1).all() and p.density() <= 1.0
    # zero and negative scores carry no mass
    assert _rows_of(BlockPattern.from_block_scores(torch.tensor([[0.0, 5.0, -3.0, 0.0]]), mass=1.0, **kw),
                    0, 0) == [{1}]
    # the diagonal (last visible) and the first key block are kept by default
    kept = BlockPattern.from_block_scores(torch.tensor([[1.0, 9.0, 2.0, 3.0]]), mass=0.5, q_len=1, kv_len=4, block_q=1)
    assert _rows_of(kept, 0, 0) == [{0, 1, 3}]


@settings(max_examples=30)
@given(st.data())
def test_from_block_scores_mass_property(data):
    q_len = data.draw(st.integers(1, 40))
    kv_len = data.draw(st.integers(q_len, 50))
    block = data.draw(st.integers(2, 9))
    mass = data.draw(st.sampled_from([0.05, 0.3, 0.5, 0.9, 1.0]))
    causal = data.draw(st.booleans())
    seed = data.draw(st.integers(0, 2**31 - 1))
    qb, kb = cdiv(q_len, block), cdiv(kv_len, block)
    scores = torch.randint(-2, 10, (1, 2, qb, kb), generator=torch.Generator().manual_seed(seed)).float()
    p = BlockPattern.from_block_scores(scores, q_len=q_len, kv_len=kv_len, block_q=block, mass=mass, causal=causal,
                                       keep_diagonal=False, keep_first=False).validate()
    last = last_visible_block(q_len, kv_len, block, block).tolist()
    for h in range(2):
        for r, sel in enumerate(_rows_of(p, 0, h)):
            visible = list(range(last[r] + 1)) if causal else list(range(kb))
            vals = {c: max(float(scores[0, h, r, c]), 0.0) for c in visible}
            total = sum(vals.values())
            assert sel and sel <= set(visible)
            ranked = sorted(vals.values(), reverse=True)
            need = next((n for n in range(1, len(ranked) + 1) if sum(ranked[:n]) >= mass * total), len(ranked))
            assert len(sel) == max(need, 1), (sel, vals, mass)  # the fewest blocks reaching the fraction
            rest = [vals[c] for c in visible if c not in sel]
            assert not rest or min(vals[c] for c in sel) >= max(rest)  # ... and they are the top ones


def test_from_block_scores_errors():
    s = torch.rand(2, 2)
    kw = dict(q_len=8, kv_len=8, block_q=4)
    for bad, match in ((dict(), "exactly one"), (dict(topk=1, mass=0.5), "exactly one"),
                       (dict(topk=0), "topk"), (dict(topk=1.5), "topk"), (dict(mass=0.0), "mass"),
                       (dict(mass=1.5), "mass")):
        with pytest.raises(ValueError, match=match):
            BlockPattern.from_block_scores(s, **kw, **bad)
    with pytest.raises(ValueError, match="scores must be"):
        BlockPattern.from_block_scores(torch.rand(2, 3), topk=1, **kw)


# ------------------------------------------------------------------------------------- S2, MoA, stream
@pytest.mark.parametrize("heads,vert_stride,local", [(8, 8, 1), (12, 4, 2), (4, 4, 1), (16, 8, 3), (2, 8, 2),
                                                     (3, 8, 1)])
def test_strided(heads, vert_stride, local):
    q_len, kv_len, block = 300, 420, 16
    p = BlockPattern.strided(q_len, kv_len, heads=heads, local_blocks=local, vert_stride=vert_stride,
                             block=block).validate()
    maps = block_map_of(p)[0]  # [H, Qb, Kb]
    assert p.heads == heads
    visible = brute_visible_tiles(q_len, kv_len, block, block)
    if heads >= vert_stride:  # heads read different residues: together they cover every visible tile
        assert torch.equal(maps.any(0), visible)
    assert not (maps & ~visible).any()
    last = last_visible_block(q_len, kv_len, block, block).tolist()
    step = max(1, vert_stride // heads)
    for h, r in itertools.product(range(heads), range(p.num_q_blocks)):
        band = set(range(max(0, last[r] - local + 1), last[r] + 1))
        vertical = {c for c in range(last[r] + 1) if (c + h * step) % vert_stride == 0}
        assert set(torch.nonzero(maps[h, r]).flatten().tolist()) == band | vertical
    # each head alone is sparse
    assert (p.density_per_head() < 0.7).all()


def test_strided_few_heads_do_not_cover():
    p = BlockPattern.strided(512, heads=2, local_blocks=1, vert_stride=8, block=16)
    assert not torch.equal(block_map_of(p)[0].any(0), brute_visible_tiles(512, 512, 16, 16))


def test_spans_band_widths_hand_checked():
    # spans 16, 40, 1 + 0.2 * 100 = 21 tokens -> bands of 1, 3 and 2 blocks of 16; sink = key block 0
    p = BlockPattern.spans(100, alpha=[16, 40, 1], beta=[0, 0, 0.2], sink=16, block=16).validate()
    assert p.heads == 3
    assert p.kv_num_blocks[0].tolist() == [[1, 2, 2, 2, 2, 2, 2], [1, 2, 3, 4, 4, 4, 4], [1, 2, 3, 3, 3, 3, 3]]
    rows = _rows_of(p, 0, 1)
    assert rows[5] == {0, 3, 4, 5} and rows[6] == {0, 4, 5, 6}
    # a prefix-KV chunk: the band hangs off each query block's last visible key block
    q = BlockPattern.spans(30, 100, alpha=[40], beta=[0], sink=32, block=16).validate()
    assert _rows_of(q, 0, 0) == [{0, 1, 3, 4, 5}, {0, 1, 4, 5, 6}]  # positions 70..85 and 86..99


def test_spans_errors():
    with pytest.raises(ValueError, match="alpha and beta"):
        BlockPattern.spans(64, alpha=[1, 2], beta=[0.1], block=16)
    with pytest.raises(ValueError, match="span"):
        BlockPattern.spans(64, alpha=[-10], beta=[0.1], block=16)


@pytest.mark.parametrize("q_len,kv_len,sink,window,block", [(50, 50, 4, 9, 8), (21, 70, 3, 16, 6),
                                                            (33, 33, 0, 5, 4), (40, 40, 45, 3, 8)])
def test_streaming_exact_per_token(q_len, kv_len, sink, window, block):
    p = BlockPattern.streaming(q_len, kv_len, sink=sink, window=window, block_q=block).validate()
    got = token_mask_of(p, 1, 1, 1, causal=True)[0, 0]
    want = torch.zeros(q_len, kv_len, dtype=torch.bool)
    for qi in range(q_len):
        pos = qi + kv_len - q_len
        for k in range(pos + 1):
            want[qi, k] = k < sink or pos - k < window
    assert torch.equal(got, want)
    if window < q_len // 2 and sink < kv_len // 2:
        assert p.density() < 1.0
