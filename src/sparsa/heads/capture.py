"""Capture each layer's queries, keys and values (after RoPE, GQA not repeated) during a dense forward pass.

Calibration (SALE thresholds, MoA spans) and benchmarks on real activations need the tensors the attention
function sees. This runs the model through sparsa's attention function with a recording method attached, so
it needs a model loaded with ``attn_implementation="sparsa"``; the model's own configuration is restored.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class _Recorder:
    """A prefill method that records its inputs and computes dense causal attention."""

    name = "capture"
    dense_below: int = 0
    device: str | None = None
    layers: dict = field(default_factory=dict)

    def attend(self, q, k, v, *, scale=None, key_padding_mask=None, backend="auto", layer_idx=None):
        from ..ops import block_sparse_attention

        keep = (lambda t: t.detach().to(self.device)) if self.device else (lambda t: t.detach())
        self.layers[layer_idx] = (keep(q), keep(k), keep(v))
        out = block_sparse_attention(q, k, v, None, causal=True, scale=scale, key_padding_mask=key_padding_mask,
                                     backend=backend, validate=False)
        return out, 1.0


@torch.no_grad()
def capture_qkv(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                layers: list[int] | None = None, device: str | None = None) -> dict[int, tuple]:
    """``{layer_idx: (q [B, Hq, L, D], k [B, Hkv, L, D], v)}`` from one forward pass over ``input_ids``.

    ``device`` moves the captured tensors (e.g. ``"cpu"`` to keep GPU memory free); ``layers`` keeps only those.
    """
    from ..hf import SparsaState

    state = getattr(model, "sparsa_state", None)
    if getattr(model.config, "_attn_implementation", None) != "sparsa":
        raise ValueError("capture_qkv needs a model loaded with attn_implementation='sparsa'")
    recorder = _Recorder(device=device)
    temp = SparsaState(prefill=recorder)
    modules = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "num_key_value_groups")]
    saved = [getattr(m, "sparsa_state", None) for m in modules]
    try:
        for m in modules:
            m.sparsa_state = temp
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        for m, s in zip(modules, saved):
            m.sparsa_state = s
        if state is not None:
            model.sparsa_state = state
    captured = recorder.layers
    return {i: captured[i] for i in sorted(captured) if layers is None or i in layers}
