"""The shape-constant cache: made once per key, never for fake tensors, bounded in entries and bytes."""

import torch

from sparsa import _shapes


def test_made_once_per_key_and_bounded(monkeypatch):
    _shapes.clear()
    calls = []

    def make(n):
        calls.append(n)
        return torch.zeros(n, dtype=torch.uint8)

    a = _shapes.shape_constant(("t", 10), lambda: make(10))
    assert _shapes.shape_constant(("t", 10), lambda: make(10)) is a and calls == [10]
    monkeypatch.setattr(_shapes, "MAX_BYTES", 100)
    for n in range(40, 100, 20):  # 40, 60, 80 bytes: the oldest go once the total passes 100
        _shapes.shape_constant(("t", n), lambda n=n: make(n))
    assert _shapes._bytes <= 100 and list(_shapes._CACHE) == [("t", 80)]
    monkeypatch.setattr(_shapes, "MAX_ENTRIES", 2)
    for n in (1, 2, 3):
        _shapes.shape_constant(("u", n), lambda n=n: make(n))
    assert list(_shapes._CACHE) == [("u", 2), ("u", 3)]
    assert _shapes._bytes == 5
    _shapes.clear()


def test_fake_tensors_are_not_cached():
    from torch._subclasses.fake_tensor import FakeTensorMode

    _shapes.clear()
    with FakeTensorMode():
        _shapes.shape_constant(("fake",), lambda: torch.arange(4))
    assert ("fake",) not in _shapes._CACHE


def test_patterns_and_tuples_count_their_tensors():
    from sparsa import BlockPattern

    p = BlockPattern.dense(256, block_q=64)
    assert _shapes._size(p) == p.kv_num_blocks.nbytes + p.kv_indices.nbytes
    assert _shapes._size((torch.zeros(3), [torch.zeros(2, dtype=torch.int8)], 7)) == 14


def test_a_pattern_of_fake_tensors_is_not_cached():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from sparsa import BlockPattern

    _shapes.clear()
    with FakeTensorMode():
        _shapes.shape_constant(("fake pattern",), lambda: BlockPattern.dense(256, block_q=64))
    assert ("fake pattern",) not in _shapes._CACHE


def test_entries_a_cuda_graph_reads_are_pinned(monkeypatch):
    """While a graph is captured: a cached entry is used and never evicted after; a new one is not cached."""
    _shapes.clear()
    kept = _shapes.shape_constant(("read by a graph",), lambda: torch.zeros(64, dtype=torch.uint8))
    monkeypatch.setattr(_shapes, "_capturing", lambda: True)
    assert _shapes.shape_constant(("read by a graph",), lambda: torch.ones(64)) is kept
    _shapes.shape_constant(("made in the graph",), lambda: torch.zeros(8))
    assert ("made in the graph",) not in _shapes._CACHE
    monkeypatch.setattr(_shapes, "_capturing", lambda: False)
    monkeypatch.setattr(_shapes, "MAX_BYTES", 100)
    for n in range(5):
        _shapes.shape_constant(("filler", n), lambda: torch.zeros(60, dtype=torch.uint8))
    assert _shapes._CACHE[("read by a graph",)] is kept  # everything else came and went
    _shapes.clear()
    assert list(_shapes._CACHE) == [("read by a graph",)]
    _shapes._PINNED.clear()
    _shapes.clear()
