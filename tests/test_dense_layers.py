"""``dense_layers``: layers a method leaves dense, through Hugging Face and through ``Selector.attend``."""

import warnings

import pytest
import torch

import sparsa
from sparsa import registry
from sparsa.bench.runner import parse_method

SMALL_STREAMING = dict(sink=4, window=32, block=16, dense_below=0)


def test_validation_names_the_argument():
    assert registry.create("prefill", "hip", dense_layers=[3, 0, 3]).dense_layers == (0, 3)
    assert registry.create("prefill", "hip", dense_layers=2).dense_layers == (2,)
    for bad in ([-1], [1.5], "0", [True]):
        with pytest.raises(ValueError, match="dense_layers"):
            registry.create("prefill", "hip", dense_layers=bad)


def test_bench_spec_takes_a_list():
    spec = parse_method("streaming:dense_layers=[0,2],window=64")
    assert spec.params == {"dense_layers": [0, 2], "window": 64}
    assert '"dense_layers": [0, 2]' in spec.config


@pytest.mark.parametrize("lq", [150, 61])  # whole prompt, and a chunk of prefill over prefix keys
def test_attend_on_a_dense_layer_is_dense(lq):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, lq, 16), torch.randn(2, 2, 150, 16), torch.randn(2, 2, 150, 16)
    sel = registry.create("prefill", "streaming", dense_layers=[1], **SMALL_STREAMING)
    dense = registry.create("prefill", "dense")
    want, _ = dense.attend(q, k, v, layer_idx=1, backend="reference")
    got, density = sel.attend(q, k, v, layer_idx=1, backend="reference")
    assert float(density) == 1.0
    assert (got - want).abs().max() <= 1e-5
    other, density = sel.attend(q, k, v, layer_idx=0, backend="reference")
    assert float(density) < 1.0 and (other - want).abs().max() > 1e-2


def test_hf_dense_layers_run_sdpa_and_count_in_stats():
    from test_hf import _inputs, _pair

    ref, ours = _pair("llama", seed=3)  # two layers
    ids, mask = _inputs(length=150, pad=20, seed=4)
    real = mask.bool()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # a configured dense layer is not a fallback: no warning
        want = ref(ids, attention_mask=mask).logits
        sparsa.configure(ours, prefill="streaming", dense_layers=[0, 1], **SMALL_STREAMING)
        all_dense = ours(ids, attention_mask=mask).logits
        stats = sparsa.stats(ours)
        assert stats["methods"] == ["sdpa"] and stats["density"] == 1.0 and not stats["fallbacks"]
        assert (all_dense - want)[real].abs().max() <= 1e-5

        sparsa.configure(ours, prefill="streaming", dense_layers=[0], **SMALL_STREAMING)
        ours(ids, attention_mask=mask)
        layers = sparsa.stats(ours)["layers"]
        assert [r["method"] for r in layers] == ["sdpa", "streaming"]
        assert layers[0]["density"] == 1.0 and layers[1]["density"] < 1.0


def test_configure_refuses_layers_the_model_lacks():
    from test_hf import _pair

    _, model = _pair("llama", seed=3)  # layers 0 and 1
    with pytest.raises(ValueError, match=r"dense_layers \[2\]"):
        sparsa.configure(model, prefill="streaming", dense_layers=[0, 2], **SMALL_STREAMING)
