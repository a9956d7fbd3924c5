"""Dynamic prefill selectors that estimate from q and k: vertical_slash (MInference) and flexprefill."""

import pytest
import torch

import sparsa
from dense_reference import dense_attention, token_mask_of
from sparsa.ops import block_sparse_attention
from sparsa.prefill.flexprefill import FlexPrefill
from sparsa.prefill.sale import SALE
from sparsa.prefill.vertical_slash import VerticalSlash

FULL = {
    "vertical_slash": dict(vertical_size=10_000, slash_size=10_000, block=32),
    "flexprefill": dict(gamma=1.0, min_budget=32, block=32),
    "sale": dict(threshold=0.0, block=32),
}
SMALL = {
    "vertical_slash": dict(vertical_size=4, slash_size=8, last_q=16, sink_columns=2, local_diagonals=8, block=32),
    "flexprefill": dict(gamma=0.3, min_budget=32, block=32),
    "sale": dict(threshold=0.9, local_window=32, block=32),
}
CLASSES = {"vertical_slash": VerticalSlash, "flexprefill": FlexPrefill, "sale": SALE}
NAMES = list(CLASSES)


def _qkv(b, hq, hkv, lq, lk, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, lq, d, generator=g), torch.randn(b, hkv, lk, d, generator=g),
            torch.randn(b, hkv, lk, d, generator=g))


def _dense(q, k, v):
    mask = torch.arange(k.shape[2])[None, :] <= torch.arange(q.shape[2])[:, None] + (k.shape[2] - q.shape[2])
    return dense_attention(q, k, v, mask.expand(q.shape[0], q.shape[1], -1, -1))[0]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("b,hq,hkv,lq,lk", [(2, 4, 4, 333, 333), (1, 8, 2, 200, 517), (2, 8, 1, 450, 450)])
def test_full_budget_equals_dense(name, b, hq, hkv, lq, lk):
    q, k, v = _qkv(b, hq, hkv, lq, lk)
    pattern = CLASSES[name](**FULL[name]).select(q, k).validate()
    assert pattern.density() == 1.0
    out = block_sparse_attention(q, k, v, pattern, backend="reference")
    torch.testing.assert_close(out.double(), _dense(q, k, v), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["vertical_slash", "flexprefill"])
def test_weighted_slash_tiles_with_a_full_budget_equal_dense(name):
    q, k, v = _qkv(2, 8, 2, 333, 400)
    pattern = CLASSES[name](**FULL[name], slash_tiles="weighted").select(q, k).validate()
    assert pattern.density() == 1.0


@pytest.mark.parametrize("name", NAMES)
def test_small_budget_differs_and_is_sparse(name):
    q, k, v = _qkv(2, 8, 2, 600, 700, seed=1)
    pattern = CLASSES[name](**SMALL[name]).select(q, k).validate()
    assert pattern.density() < 0.7
    out = block_sparse_attention(q, k, v, pattern, backend="reference")
    assert (out.double() - _dense(q, k, v)).abs().max() > 1e-2
    # The computed pairs are exactly those the pattern names (the kernel is right for this pattern).
    mask = token_mask_of(pattern, 2, 8, 2, causal=True)
    torch.testing.assert_close(out.double(), dense_attention(q, k, v, mask)[0], atol=1e-5, rtol=1e-5)


def _planted(b=1, hq=4, hkv=2, length=640, d=32, far_block=3, block=32, seed=2):
    """Every query attends strongly to one far key block; the rest is noise."""
    q, k, v = _qkv(b, hq, hkv, length, length, d, seed)
    direction = torch.randn(d)
    direction = direction / direction.norm()
    q = 0.3 * q + 6.0 * direction
    keys = slice(far_block * block, (far_block + 1) * block)
    k[:, :, keys] = 0.3 * k[:, :, keys] + 6.0 * direction
    return q, k, v


@pytest.mark.parametrize("name", NAMES)
def test_planted_far_block_is_found(name):
    q, k, v = _planted()
    pattern = CLASSES[name](**SMALL[name]).select(q, k)
    blocks = pattern.to_block_mask()  # [B, H, Qb, Kb]
    assert pattern.density() < 0.5
    assert bool(blocks[:, :, 4:, 3].all()), "every later query block must read the far block"
    out = block_sparse_attention(q, k, v, pattern, backend="reference")[:, :, 5 * 32:]
    ref = _dense(q, k, v)[:, :, 5 * 32:]  # rows that see the planted block, where it holds the mass
    assert float((out.double() - ref).norm() / ref.norm()) < 0.05


def test_flexprefill_probe_blocks_spread_over_the_sequence():
    sel = FlexPrefill(block=32, probe_blocks=4)
    idx = sel._probe_index(640, "cpu")
    starts = sorted(set((idx // 32).tolist()))
    assert len(idx) == 4 * 32 and starts[-1] == 19 and starts[0] == 0
    assert FlexPrefill(block=32, probe_blocks=1)._probe_index(640, "cpu").tolist() == list(range(608, 640))


def test_flexprefill_short_inputs_are_dense():
    q, k, _ = _qkv(1, 2, 2, 100, 100)
    assert FlexPrefill(block=32, min_budget=1024).select(q, k).density() == 1.0


def test_flexprefill_query_aware_and_vertical_slash_heads_both_run():
    q, k, _ = _qkv(1, 4, 2, 500, 500, seed=3)
    qa = FlexPrefill(gamma=0.5, tau=1.0, min_budget=32, block=32).select(q, k)  # every head query-aware
    vs = FlexPrefill(gamma=0.5, tau=0.0, min_budget=32, block=32).select(q, k)  # every head vertical-slash
    assert not torch.equal(qa.to_block_mask(), vs.to_block_mask())


@pytest.mark.parametrize("name", ["vertical_slash", "flexprefill"])
@pytest.mark.parametrize("mode", [1, "weighted"])
def test_one_tile_per_band_is_sparser_and_keeps_the_local_diagonals(name, mode):
    q, k, v = _qkv(2, 8, 2, 600, 700, seed=4)
    small = dict(SMALL[name], **({"gamma": 0.1} if name == "flexprefill" else {}))
    two = CLASSES[name](**small, slash_tiles=2).select(q, k)
    one = CLASSES[name](**small, slash_tiles=mode).select(q, k)
    assert one.density() < two.density()
    if mode == 1:
        assert not (one.to_block_mask() & ~two.to_block_mask()).any()  # a subset: the same bands, fewer tiles
    # every query sees its own block and the one before it (the forced local diagonals, whole)
    tiles = one.to_block_mask()
    rows = torch.arange(tiles.shape[2])
    last = (torch.clamp((rows + 1) * 32, max=600) - 1 + 100) // 32
    assert tiles[..., rows, last].all() and tiles[..., rows, last - 1].all()


def test_block_diagonal_scores_split_each_diagonal_by_its_entries_in_each_tile():
    from sparsa.prefill.estimate import block_diagonal_scores

    g = torch.Generator().manual_seed(6)
    block, lk = 32, 300
    slash = torch.rand(2, 3, lk, generator=g)
    got = block_diagonal_scores(slash, 1, lk, block)
    o = torch.arange(lk, dtype=torch.float64)
    t = torch.arange(-(-lk // block), dtype=torch.float64)
    weight = (1 - (o[None, :] - block * t[:, None]).abs() / block).clamp(min=0)  # [Kb, Lk]
    torch.testing.assert_close(got.double(), slash.double() @ weight.T, rtol=1e-5, atol=1e-5)
    # Half-band sums give the same scores when the mass is even within each half band.
    even = slash.view(2, 3, -1)[..., :lk // 16 * 16].reshape(2, 3, -1, 16).mean(-1, keepdim=True)
    flat = even.expand(-1, -1, -1, 16).reshape(2, 3, -1)
    halves = flat.view(2, 3, -1, 16).sum(-1)
    torch.testing.assert_close(block_diagonal_scores(halves, 16, flat.shape[-1], block),
                               block_diagonal_scores(flat, 1, flat.shape[-1], block))
    # Each diagonal's mass is split, nothing made up: only the last block-diagonal's far side is lost.
    last = (-(-lk // block) - 1) * block
    lost = (slash[..., last:] * (o[last:] - last).float() / block).sum(-1)
    torch.testing.assert_close(got.sum(-1), slash.sum(-1) - lost)


def _diagonal_attention(offset, b=1, hq=2, hkv=1, length=640, d=64, seed=7):
    """q and k where every query attends almost only to the key ``offset`` positions before it."""
    g = torch.Generator().manual_seed(seed)
    k = torch.nn.functional.normalize(torch.randn(b, hkv, length, d, generator=g), dim=-1)
    q = torch.cat([torch.zeros(b, hkv, offset, d), 200 * k[:, :, : length - offset]], 2).repeat_interleave(hq // hkv, 1)
    v = torch.randn(b, hkv, length, d, generator=g)
    return q, k, v


@pytest.mark.parametrize("name", ["vertical_slash", "flexprefill"])
def test_weighted_slash_tiles_go_where_the_diagonal_mass_is(name):
    """All attention on token diagonal 90 = 2 * 32 + 26: the band holding it is band 2, but a tile on
    block-diagonal 2 holds 6 of each query block's 32 entries of it, one on block-diagonal 3 holds 26. With one
    tile per band (``slash_tiles=1``) band 2's tile is computed; ``"weighted"`` computes block-diagonal 3's."""
    q, k, v = _diagonal_attention(90)
    params = (dict(vertical_size=32, slash_size=32, sink_columns=0, local_diagonals=1, last_q=64, block=32)
              if name == "vertical_slash" else dict(gamma=0.5, tau=0.0, min_budget=32, block=32))
    one = CLASSES[name](**params, slash_tiles=1).select(q, k)
    weighted = CLASSES[name](**params, slash_tiles="weighted").select(q, k)
    rows = torch.arange(5, 20)
    assert weighted.to_block_mask()[..., rows, rows - 3].all()
    assert not one.to_block_mask()[..., rows, rows - 3].all()
    dense = _dense(q, k, v)
    err = {mode: (block_sparse_attention(q, k, v, p, backend="reference").double() - dense).abs().mean()
           for mode, p in (("one", one), ("weighted", weighted))}
    assert err["weighted"] < 0.5 * err["one"]


def test_vertical_slash_local_bands():
    from sparsa.prefill.vertical_slash import local_bands

    assert [local_bands(n, 128, 2) for n in (0, 1, 100, 128, 129)] == [0, 1, 1, 1, 2]
    assert [local_bands(n, 128, 1) for n in (0, 1, 100, 128, 129, 257)] == [0, 1, 2, 2, 2, 3]


def test_flexprefill_slash_count_diagonals_needs_fewer_bands():
    """The official budget counts the token diagonals covering gamma (then // block + 1), not whole bands: mass
    on three diagonals in three different bands is one band's worth of diagonals, but three bands."""
    sel = FlexPrefill(gamma=0.9, min_budget=32, block=32)
    vertical = torch.full((1, 1, 640), 1 / 640)
    slash = torch.zeros(1, 1, 640)
    slash[..., [5, 100, 300]] = 1 / 3
    none = torch.zeros(1, 1, dtype=torch.bool)
    pooled = slash.view(1, 1, 20, 32).sum(-1)
    sorted_desc = (lambda x: torch.sort(x, dim=-1, descending=True).values)
    assert int(sel._budgets(vertical, sorted_desc(pooled), none)[1]) == 3
    sel.slash_count = "diagonals"
    assert int(sel._budgets(vertical, sorted_desc(slash), none)[1]) == 1


@pytest.mark.parametrize("bad", [dict(gamma=0.0), dict(gamma=1.5), dict(tau=-1), dict(min_budget=0),
                                 dict(block=48), dict(probe_blocks=0), dict(slash_tiles=3),
                                 dict(slash_tiles="bands"),
                                 dict(slash_count="tokens")])
def test_flexprefill_bad_parameters(bad):
    with pytest.raises(ValueError):
        FlexPrefill(**bad)


@pytest.mark.parametrize("bad", [dict(vertical_size=0), dict(slash_size=-1), dict(last_q=0), dict(block=100),
                                 dict(slash_tiles=0)])
def test_vertical_slash_bad_parameters(bad):
    with pytest.raises(ValueError):
        VerticalSlash(**bad)


@pytest.mark.parametrize("name", NAMES)
def test_through_hugging_face(name):
    from test_hf import _inputs, _pair

    ref, ours = _pair("llama", seed=5)
    sparsa.configure(ours, prefill=name, dense_below=0, **SMALL[name])
    ids, mask = _inputs(length=300, pad=40)
    with torch.no_grad():
        logits = ours(ids, attention_mask=mask).logits
    assert torch.isfinite(logits[mask.bool()]).all()
    st = sparsa.stats(ours)
    assert st["methods"] == [name] and 0 < st["density"] < 1


def _estimated_logits(q, k, bits):
    from sparsa.prefill.sale import _estimate_inputs

    q_int, q_scale, k_int, k_scale, row, col = _estimate_inputs(q, k, 32, bits)
    group = q.shape[1] // k.shape[1]
    k_hat = (k_int.float() * k_scale.repeat_interleave(32, -1)[..., : k.shape[2], None]).repeat_interleave(group, 1)
    q_hat = q_int.float() * q_scale[..., None]
    return q_hat @ k_hat.transpose(-1, -2) + row[..., None] + col[:, :, None, :]


def test_sale_estimate_tracks_exact_logits():
    q, k, _ = _qkv(1, 4, 2, 300, 300, seed=7)
    exact = q @ k.repeat_interleave(2, 1).transpose(-1, -2)
    assert float((_estimated_logits(q, k, 4) - exact).norm() / exact.norm()) < 0.25  # int4 with smoothing
    assert float((_estimated_logits(q, k, 8) - exact).norm() / exact.norm()) < 0.02


def test_sale_thresholds_per_head_and_layer():
    sel = SALE(threshold=[[0.0, 0.5], [0.1, 0.2]])
    assert sel.thresholds(4, 1, "cpu").tolist() == pytest.approx([0.1, 0.1, 0.2, 0.2])
    with pytest.raises(ValueError, match="layer 2"):
        sel.thresholds(4, 2, "cpu")
    q, k, _ = _qkv(1, 4, 2, 400, 400, seed=8)
    dense_head = SALE(threshold=[0.0, 0.9], local_window=32, block=32).select(q, k)
    per_head = dense_head.density_per_head()[0]
    assert per_head[0] == per_head[1] == 1.0 and per_head[2] < 1.0  # heads 0-1 read KV head 0, threshold 0


@pytest.mark.parametrize("bad", [dict(threshold=1.0), dict(threshold=-0.1), dict(threshold=[]), dict(bits=5),
                                 dict(local_window=-1), dict(block=24)])
def test_sale_bad_parameters(bad):
    with pytest.raises(ValueError):
        SALE(**bad)


def test_sale_calibration_on_the_reference_model():
    """Calibrated thresholds keep each head's error under eps * q_len on the calibration prompt."""
    from sparsa.bench.runner import load_model, resolve_model
    from sparsa.prefill.sale import calibrate_thresholds
    from sparsa.tasks import get

    model, tok = load_model(resolve_model("ref-tiny"), "cpu")
    sample = get("niah_multikey").generate(1, 768, 123, tok)[0]
    ids = torch.tensor([tok.encode(sample["prompt"], add_special_tokens=False)])
    loose = calibrate_thresholds(model, ids, eps=10.0, local_window=64, block=64)
    tight = calibrate_thresholds(model, ids, eps=0.05, local_window=64, block=64)
    assert len(loose) == len(tight) == model.config.num_hidden_layers
    assert all(t == 0.008 for row in loose for t in row)  # a huge tolerance keeps the starting threshold
    assert all(a >= b for ra, rb in zip(loose, tight) for a, b in zip(ra, rb))
    assert any(b < 0.008 for row in tight for b in row)
    sparsa.configure(model, prefill="sale", threshold=tight, local_window=64, block=64, dense_below=0)
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_sale_ignores_padded_keys():
    """With left padding, the sink block is padding: anchors and estimates must skip it, and no padded-only
    tile is selected except the forced first block."""
    q, k, v = _qkv(2, 4, 2, 400, 400, seed=9)
    pad = torch.ones(2, 400, dtype=torch.bool)
    pad[1, :128] = False
    sel = SALE(threshold=0.05, local_window=32, block=32)
    p = sel.select(q, k, key_padding_mask=pad).validate()
    blocks = p.to_block_mask()[1]  # second sequence, [Hq, Qb, Kb]
    # Real query blocks past the local window never read key blocks made only of padding (1-3; block 0 is
    # always computed, and the kernel masks its padded keys).
    assert not bool(blocks[:, 5:, 1:4].any()), "blocks made only of padding are never selected"
    assert bool(SALE(threshold=0.05, local_window=32, block=32).select(q, k).to_block_mask()[1, :, 5:, 1:4].any())
    out = block_sparse_attention(q, k, v, p, key_padding_mask=pad, backend="reference")
    assert torch.isfinite(out[1, :, 128:]).all()


def test_sale_calibration_cli_and_file(tmp_path):
    from sparsa.cli import main

    out = tmp_path / "cal.json"
    assert main(["calibrate", "sale", "--length", "768", "--samples", "1", "--eps", "0.05", "--out", str(out)]) == 0
    sel = SALE(threshold=str(out))
    assert len(sel.threshold) == 4 and all(len(row) == 4 for row in sel.threshold)
    with pytest.raises(ValueError, match="no file"):
        SALE(threshold=str(tmp_path / "missing.json"))


@pytest.mark.slow
def test_compiled_select_matches_eager():
    """``compile=True`` runs select() through torch.compile (CUDA only in use; forced onto the CPU here): the
    same tiles as eager at two lengths, with key padding, and one compile reused for the second length."""
    from sparsa.prefill.biformer import BiFormer

    sel = BiFormer(compile=True, block=32)
    sel.__dict__["_compile_on_cpu"] = True
    eager = BiFormer(block=32)
    for b, lq, lk, seed in ((2, 300, 300, 0), (2, 410, 410, 1)):
        q, k, _ = _qkv(b, 8, 2, lq, lk, seed=seed)
        pad = torch.ones(b, lk, dtype=torch.bool)
        pad[1, :37] = False
        got = sel.pattern(q, k, key_padding_mask=pad)
        want = eager.pattern(q, k, key_padding_mask=pad)
        assert torch.equal(got.to_block_mask(), want.to_block_mask())
    assert sel.compile  # no fallback happened
    with pytest.raises(ValueError, match="compile"):
        BiFormer(compile="fast")


@pytest.mark.parametrize("name", ["vertical_slash", "flexprefill", "sale", "hip", "longheads", "biformer"])
def test_selection_never_waits_on_the_device(name):
    """Estimation must not read tensor values on the host (``.item()``, ``bool()``, ``nonzero``...): each is a
    device sync that stalls the forward pass. On the meta device every such read raises."""
    from sparsa import registry

    sel = registry.create("prefill", name, dense_below=0)
    q = torch.empty(2, 8, 1500, 64, device="meta")
    k = torch.empty(2, 2, 1500, 64, device="meta")
    pad = torch.empty(2, 1500, dtype=torch.bool, device="meta")
    pattern = sel.pattern(q, k, key_padding_mask=pad)
    pattern.density_tensor()
