"""``Selector(cuda_graph=True)``: a method's whole attend() call replayed as a CUDA graph (sparsa.prefill.graphs).

On the CPU the option is a no-op; the graph policy (warm-up, capture, replay, one-warning fallback), the cache key
and the LRU bound are tested with stand-ins for the CUDA calls. The CUDA tests capture real methods."""

import copy
import warnings

import pytest
import torch

import sparsa
from sparsa import registry
from sparsa.bench.runner import parse_method
from sparsa.prefill import graphs
from sparsa.prefill.base import Selector
from sparsa.prefill.hyper import Hyper

# Small CPU settings under which each method is really sparse at a few hundred tokens.
CPU_METHODS = {
    "streaming": dict(sink=16, window=64, block=16),
    "biformer": dict(topk=3, block=16),
    "hip": dict(mask_k=64, sliding_window=32, block=16, query_samples=4),
    "vertical_slash": dict(vertical_size=32, slash_size=64, last_q=16, sink_columns=2, local_diagonals=16, block=16),
    "longheads": dict(window_size=32, atten_length=64, begin_selective_length=64, block=16, query_samples=4),
    "hyper": dict(min_seq_len=32, block_size=16, sample_size=16),
}


def _qkv(b, hq, hkv, length, d=16, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(b, h, length, d, generator=g, device=device, dtype=dtype) for h in (hq, hkv, hkv)]


def _left_pad(b, length, pads, device="cpu"):
    mask = torch.ones(b, length, dtype=torch.bool, device=device)
    for i, n in enumerate(pads):
        mask[i, :n] = False
    return mask


# ------------------------------------------------------------------------------------------------ CPU: no-op
@pytest.mark.parametrize("name", list(CPU_METHODS))
def test_cuda_graph_on_cpu_is_the_eager_result(name):
    q, k, v = _qkv(2, 4, 2, 200, seed=3)
    mask = _left_pad(2, 200, [0, 23])
    plain = registry.create("prefill", name, dense_below=0, **CPU_METHODS[name])
    graphed = registry.create("prefill", name, dense_below=0, cuda_graph=True, **CPU_METHODS[name])
    for layer in (0, 1, 0):
        want, want_density = plain.attend(q, k, v, key_padding_mask=mask, layer_idx=layer)
        got, got_density = graphed.attend(q, k, v, key_padding_mask=mask, layer_idx=layer)
        assert torch.equal(got, want)
        assert float(got_density) == float(want_density)
        assert name == "hyper" or float(got_density) < 1.0  # (hyper's work estimate is clipped to 1 this short)
    assert "_graphs" not in graphed.__dict__ and graphed.cuda_graph


@pytest.mark.parametrize("field,value", [("cuda_graph", 1), ("cuda_graph", "yes"), ("cuda_graph", None),
                                         ("graph_max_len", 0), ("graph_max_len", -5), ("graph_max_len", 1.5),
                                         ("graph_max_len", True), ("graph_max_len", "8192")])
def test_fields_are_validated(field, value):
    with pytest.raises(ValueError, match=field):
        registry.create("prefill", "hip", **{field: value})


def test_fields_reach_the_method_from_specs_and_configure():
    sel = registry.create("prefill", "biformer", cuda_graph=True, graph_max_len=8192)
    assert sel.cuda_graph is True and sel.graph_max_len == 8192
    assert registry.create("prefill", "biformer").cuda_graph is False
    assert parse_method("hip:cuda_graph=true,block=128").params == {"cuda_graph": True, "block": 128}
    with pytest.raises(ValueError, match="cuda_graph"):
        parse_method("hip:cuda_graph=1")
    import transformers

    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    plain = transformers.LlamaForCausalLM(config).eval()
    plain.set_attn_implementation("sparsa")
    graphed = copy.deepcopy(plain)
    sparsa.configure(plain, prefill="streaming", dense_below=0, **CPU_METHODS["streaming"])
    state = sparsa.configure(graphed, prefill="streaming", dense_below=0, cuda_graph=True,
                             **CPU_METHODS["streaming"])
    assert state.prefill.cuda_graph is True
    ids = torch.randint(0, 96, (2, 150), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 150, dtype=torch.long)
    mask[1, :20] = 0
    with torch.no_grad():
        assert torch.equal(plain(ids, attention_mask=mask).logits, graphed(ids, attention_mask=mask).logits)


def test_hyper_computes_in_attend_underscore():
    assert "_attend" in vars(Hyper) and "attend" not in vars(Hyper)
    q, k, v = _qkv(2, 4, 2, 150, seed=5)
    mask = _left_pad(2, 150, [0, 17])
    sel = Hyper(**CPU_METHODS["hyper"], seed=1, cuda_graph=True)
    out, density = sel.attend(q, k, v, key_padding_mask=mask, backend="reference", layer_idx=2)
    want, want_density = Hyper(**CPU_METHODS["hyper"], seed=1)._attend(q, k, v, key_padding_mask=mask,
                                                                        backend="reference", layer_idx=2)
    assert torch.equal(out, want) and density == want_density


def test_capture_module_recorder_still_attends():
    from sparsa.heads.capture import _Recorder

    q, k, v = _qkv(1, 4, 2, 40)
    out, density = _Recorder().attend(q, k, v, layer_idx=3)
    assert out.shape == q.shape and density == 1.0


# ------------------------------------------------------------------------------------------- helpers (CPU)
def test_graph_key_names_everything_but_the_values():
    q, k, v = _qkv(2, 4, 2, 64)
    mask = _left_pad(2, 64, [0, 5])
    base = graphs.graph_key((q, k, v, mask), scale=None, backend="auto", layer_idx=0)
    fresh = _qkv(2, 4, 2, 64, seed=9)
    assert graphs.graph_key((*fresh, _left_pad(2, 64, [3, 0])), scale=None, backend="auto", layer_idx=0) == base
    others = [
        graphs.graph_key((q, k, v, mask), scale=None, backend="auto", layer_idx=1),
        graphs.graph_key((q, k, v, mask), scale=0.5, backend="auto", layer_idx=0),
        graphs.graph_key((q, k, v, mask), scale=None, backend="flex", layer_idx=0),
        graphs.graph_key((q, k, v, None), scale=None, backend="auto", layer_idx=0),
        graphs.graph_key((q[:1], k[:1], v[:1], mask[:1]), scale=None, backend="auto", layer_idx=0),
        graphs.graph_key((q.half(), k.half(), v.half(), mask), scale=None, backend="auto", layer_idx=0),
        graphs.graph_key((q, k, v[..., :8], mask), scale=None, backend="auto", layer_idx=0),
        # same shape, another layout: the warm-up must have run on the layout the capture sees
        graphs.graph_key((q.transpose(1, 2).contiguous().transpose(1, 2), k, v, mask), scale=None, backend="auto",
                         layer_idx=0),
    ]
    assert len({base, *others}) == len(others) + 1


def test_dense_layouts():
    x = torch.randn(2, 4, 10, 8)
    assert graphs.dense(x) and graphs.dense(x.transpose(1, 2)) and graphs.dense(x[:1]) and graphs.dense(x[:1, :1])
    assert not graphs.dense(x[:, :1]) and not graphs.dense(x[:, :, :5]) and not graphs.dense(x[..., ::2])
    assert not graphs.dense(torch.ones(1, 10, dtype=torch.bool).expand(3, 10))
    assert graphs.dense(torch.empty(0, 3))


def test_cache_is_lru_bounded_and_drops_unused_buffers():
    cache = graphs.GraphCache(limit=3)
    a = (torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), None)
    b = (torch.zeros(4, 3), torch.zeros(4, 3), torch.zeros(4, 3), torch.ones(4, 3, dtype=torch.bool))
    static_a, static_b = cache.static_inputs(a), cache.static_inputs(b)
    again_b = cache.static_inputs(b)
    assert all(x is y for x, y in zip(again_b[:3], static_b[:3]))  # q, k, v: one set of buffers per layout
    assert again_b[3] is not static_b[3]  # the key padding mask: one buffer per graph
    assert [t.shape for t in static_b] == [(4, 3)] * 4 and static_b[3].dtype == torch.bool
    assert static_a[3] is None
    with torch.inference_mode():  # buffers made in inference mode must take copies outside it as well
        c = tuple(torch.zeros(3, 3) for _ in range(3)) + (None,)
        static_c = cache.static_inputs(c)
    assert not any(x.is_inference() for x in static_c[:3])
    cache.buffers.pop(graphs.layout(c[:3]))
    t = torch.randn(3, 5).t()
    assert cache.static_inputs((t, t, t, None))[0].stride() == t.stride()
    cache.buffers.pop(graphs.layout((t, t, t)))

    def captured(static):
        return graphs.Captured(graph=None, inputs=static, out=torch.zeros(1), density=1.0)

    cache.put("k1", captured(static_a))
    cache.put("k2", captured(static_b))
    cache.put("k3", graphs.WARM)
    assert cache.get("k1") is not None  # k1 is now the most recent: k2 goes first
    cache.put("k4", graphs.WARM)
    assert list(cache.entries) == ["k3", "k1", "k4"] and cache.captured() == 1
    assert list(cache.buffers.values()) == [static_a[:3]]  # static_b's last graph was dropped
    cache.put("k5", graphs.WARM)
    cache.put("k6", graphs.WARM)
    assert list(cache.entries) == ["k4", "k5", "k6"] and not cache.buffers and cache.captured() == 0
    assert graphs.GraphCache().limit == graphs.MAX_GRAPHS == 64


def test_applies_only_to_cuda_tensors():
    sel = registry.create("prefill", "hip", cuda_graph=True)
    q, k, v = _qkv(1, 4, 2, 32)
    assert not graphs.applies(sel, q, k, v, None)
    assert not graphs.applies(sel, "q", k, v, None)


class _Fake:
    """Stands in for the CUDA half of the policy: records which step ran and returns tagged results."""

    def __init__(self, monkeypatch, fail_capture=False):
        self.calls = []
        self.fail_capture = fail_capture
        monkeypatch.setattr(graphs, "warm_up", self.warm_up)
        monkeypatch.setattr(graphs, "capture", self.capture)
        monkeypatch.setattr(graphs, "replay", self.replay)

    def warm_up(self, run, inputs):
        assert all(t is None or graphs.dense(t) for t in inputs)
        self.calls.append("warm_up")
        return run(*inputs)

    def capture(self, run, inputs, cache):
        self.calls.append("capture")
        if self.fail_capture:
            raise RuntimeError("operation not permitted when stream is capturing")
        # the fake "graph" is the call itself, run on the static buffers at replay
        return graphs.Captured(graph=run, inputs=cache.static_inputs(inputs), out=None, density=None)

    def replay(self, entry, inputs):
        self.calls.append("replay")
        for buffer, value in zip(entry.inputs, inputs):
            if buffer is not None:
                buffer.copy_(value)
        return entry.graph(*entry.inputs)


def _call(sel, inputs, layer):
    q, k, v, mask = inputs
    return graphs.attend(sel, q, k, v, scale=None, key_padding_mask=mask, backend="reference", layer_idx=layer)


def test_policy_warm_up_then_capture_then_replay(monkeypatch):
    fake = _Fake(monkeypatch)
    sel = registry.create("prefill", "biformer", dense_below=0, cuda_graph=True, **CPU_METHODS["biformer"])
    inputs = (*_qkv(2, 4, 2, 96), _left_pad(2, 96, [0, 9]))
    want, _ = sel._attend(*inputs[:3], key_padding_mask=inputs[3], backend="reference", layer_idx=0)
    assert torch.equal(_call(sel, inputs, 0)[0], want)
    assert fake.calls == ["warm_up"]
    assert torch.equal(_call(sel, inputs, 0)[0], want)
    assert fake.calls == ["warm_up", "capture", "replay"]
    _call(sel, inputs, 0)
    assert fake.calls[3:] == ["replay"]
    _call(sel, inputs, 1)  # another layer: its own warm-up, then its own graph sharing the static buffers
    _call(sel, inputs, 1)
    assert fake.calls[4:] == ["warm_up", "capture", "replay"]
    cache = graphs.cache_of(sel)
    assert cache.captured() == 2 and len(cache.buffers) == 1
    # a sliced key tensor (keys from a preallocated cache) is packed first: same layout, same graph
    q, k, v, mask = inputs
    big_k = torch.cat([k, torch.randn_like(k)], 2)[:, :, :96]
    assert torch.equal(_call(sel, (q, big_k, v, mask), 0)[0], want)
    assert fake.calls[7:] == ["replay"] and cache.captured() == 2


def test_graphs_of_static_selectors_hold_their_pattern(monkeypatch):
    # Selector.pattern keeps a few static patterns; a graph reads its pattern's tensors and BlockMask on every replay,
    # so it holds the pattern itself.
    fake = _Fake(monkeypatch)
    sel = registry.create("prefill", "streaming", dense_below=0, cuda_graph=True, **CPU_METHODS["streaming"])
    inputs = (*_qkv(2, 4, 2, 96), _left_pad(2, 96, [0, 9]))
    _call(sel, inputs, 0)
    _call(sel, inputs, 0)
    (entry,) = graphs.cache_of(sel).entries.values()
    assert entry.keep is sel.pattern(inputs[0], inputs[1], layer_idx=0)
    assert fake.calls == ["warm_up", "capture", "replay"]


def test_capture_failure_warns_once_and_answers_eagerly(monkeypatch):
    fake = _Fake(monkeypatch, fail_capture=True)
    sel = registry.create("prefill", "hip", dense_below=0, cuda_graph=True, **CPU_METHODS["hip"])
    inputs = (*_qkv(2, 4, 2, 96, seed=4), _left_pad(2, 96, [0, 9]))
    want, want_density = sel._attend(*inputs[:3], key_padding_mask=inputs[3], backend="reference", layer_idx=0)
    _call(sel, inputs, 0)
    with pytest.warns(UserWarning, match=r"hip: CUDA graph capture of attend\(\) failed \(RuntimeError: operation"):
        out, density = _call(sel, inputs, 0)
    assert torch.equal(out, want) and float(density) == float(want_density)
    assert sel.cuda_graph is False and "_graphs" not in sel.__dict__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, _ = sel.attend(*inputs[:3], key_padding_mask=inputs[3], backend="reference", layer_idx=0)
    assert torch.equal(out, want) and fake.calls == ["warm_up", "capture"]


def test_selector_attend_dispatches_to_attend_underscore():
    calls = []

    class Probe(Selector):
        name = "probe"

        def _attend(self, q, k, v, *, scale=None, key_padding_mask=None, backend="auto", layer_idx=None):
            calls.append((scale, key_padding_mask, backend, layer_idx))
            return q, 0.5

    q, k, v = _qkv(1, 2, 2, 8)
    assert Probe(cuda_graph=True).attend(q, k, v, scale=0.3, backend="reference", layer_idx=7) == (q, 0.5)
    assert calls == [(0.3, None, "reference", 7)]


# ------------------------------------------------------------------------------------------------------ CUDA
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Sparse at 2000 tokens (checked on the CPU below: hip's defaults since session 6, 2048 keys in 128-token blocks,
# select every block of 2000 tokens, which the GPU test caught in session 8).
GPU_METHODS = {
    "biformer": dict(topk=8, block=64),
    "hip": dict(block=64, mask_k=512),
    "vertical_slash": dict(vertical_size=256, slash_size=256, local_diagonals=64, block=64),
    "longheads": dict(atten_length=1024, begin_selective_length=512),
}
LENGTH = 2000


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-12))


@pytest.mark.parametrize("name", list(GPU_METHODS))
def test_gpu_methods_are_sparse_at_the_test_length(name):
    """The CUDA test below asserts that each method is really sparse; a change of defaults must fail here, on CI."""
    sel = registry.create("prefill", name, dense_below=0, **GPU_METHODS[name])
    q, k, _ = _qkv(2, 8, 2, LENGTH, d=64, seed=3)
    assert sel.pattern(q, k, layer_idx=0, key_padding_mask=_left_pad(2, LENGTH, [0, 100])).density() < 0.9


@cuda
@pytest.mark.parametrize("name", list(GPU_METHODS))
def test_replay_matches_eager_on_fresh_inputs(name):
    sel = registry.create("prefill", name, dense_below=0, cuda_graph=True, **GPU_METHODS[name])
    pads = iter([100, 37, 250, 1, 64, 0, 300, 12, 90, 5])
    seeds = iter(range(100, 200))

    def fresh():
        q, k, v = _qkv(2, 8, 2, LENGTH, d=64, seed=next(seeds), dtype=torch.bfloat16, device="cuda")
        return q, k, v, _left_pad(2, LENGTH, [0, next(pads)], device="cuda")

    def call(inputs, layer):
        q, k, v, mask = inputs
        return sel.attend(q, k, v, key_padding_mask=mask, layer_idx=layer)

    def eager(inputs, layer):
        q, k, v, mask = inputs
        return sel._attend(q, k, v, key_padding_mask=mask, layer_idx=layer)

    kept = []  # (returned output, a private copy of it, eager reference): a later replay must not change them
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for layer in (0, 1):  # first call per layer: eager (the warm-up)
            inputs = fresh()
            out, density = call(inputs, layer)
            kept.append((out, out.clone(), eager(inputs, layer)[0]))
        cache = graphs.cache_of(sel)
        assert cache.captured() == 0 and len(cache.entries) == 2
        for round_ in range(3):  # second call per layer captures; later ones replay
            for layer in (0, 1):
                inputs = fresh()
                out, density = call(inputs, layer)
                torch.cuda.synchronize()
                want, want_density = eager(inputs, layer)
                assert _rel(out, want) < 1e-2, (name, round_, layer)
                assert abs(float(density) - float(want_density)) < 1e-2
                assert float(density) < 1.0  # the method is really sparse here
                kept.append((out, out.clone(), want))
    messages = [str(w.message) for w in caught if "CUDA graph" in str(w.message)]
    assert sel.cuda_graph and not messages, messages  # a capture failure falls back to eager and says so
    assert cache.captured() == 2 and len(cache.pools) == 1 and len(cache.buffers) == 1
    torch.cuda.synchronize()
    for out, copy_, want in kept:
        assert torch.equal(out, copy_)
        assert _rel(out, want) < 1e-2


@cuda
def test_graph_path_applies_only_where_it_should():
    sel = registry.create("prefill", "biformer", dense_below=0, cuda_graph=True, graph_max_len=64)
    q, k, v = _qkv(1, 4, 2, 64, device="cuda")
    assert graphs.applies(sel, q, k, v, None)
    long_q, long_k, long_v = _qkv(1, 4, 2, 65, device="cuda")
    assert not graphs.applies(sel, long_q, long_k, long_v, None)
    assert not graphs.applies(sel, q.requires_grad_(), k, v, None)
    with torch.no_grad():
        assert graphs.applies(sel, q, k, v, None)
    q.requires_grad_(False)
    graph, x = torch.cuda.CUDAGraph(), torch.zeros(1, device="cuda")
    with torch.cuda.graph(graph):  # inside someone else's capture the call runs as it is (it is being captured)
        inside = graphs.applies(sel, q, k, v, None)
        x += 1
    assert not inside
