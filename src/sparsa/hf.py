"""Hugging Face integration: ``attn_implementation="sparsa"``, without monkeypatching.

``import sparsa`` registers two functions under the name ``"sparsa"``:

- a mask function (``AttentionMaskInterface``) that returns a small :class:`SparsaMask` describing the mask
  (causal, key padding, sliding window) instead of a ``[B, 1, Lq, Lk]`` tensor, so long prompts never
  materialise a token-by-token mask. Masks it cannot describe (packed sequences, bidirectional or custom
  overlays) keep their exact definition and are materialised through ``sdpa_mask``;
- an attention function (``AttentionInterface``) that runs the configured prefill selector and kernel, or
  dense attention identical to the ``sdpa`` implementation when nothing is configured or a method must fall
  back (too short, a sliding-window layer, a custom mask), recording what it did for :func:`stats`.

``configure(model, prefill=..., decode=..., dense_below=..., **params)`` attaches the methods to the model's
attention modules.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from torch import Tensor

from . import registry
from .ops.attention import block_sparse_attention
from .pattern import BlockPattern, visible_tiles

NAME = "sparsa"
# Above this many mask elements (B * Lq * Lk) the dense path stops materialising masks for SDPA and runs
# sparsa's own kernel with a dense pattern instead, whose memory is linear in length.
MATERIALIZE_LIMIT = 1 << 24
# Keyword arguments that change attention math in ways sparsa does not implement.
_UNSUPPORTED_KWARGS = {"softcap": "attention logit softcapping", "s_aux": "learned attention sinks (s_aux)",
                       "position_bias": "an additive position bias"}


# ------------------------------------------------------------------------------------------------- masks
@dataclass
class SparsaMask:
    """What the model's mask means, kept compact. Query ``i`` sits at position ``q_offset + i``; key ``j`` at
    ``kv_offset + j``. ``padding`` is ``[B, kv_offset + kv_length]`` bool (True = real token) or None."""

    batch_size: int
    q_length: int
    kv_length: int
    q_offset: int
    kv_offset: int
    padding: Tensor | None
    window: int | None
    standard: bool  # causal (+ sliding window) + padding, nothing else
    sdpa_args: dict = field(repr=False, default_factory=dict)
    # transformers slices 4-D masks in places; we are not a tensor, so say what we are.
    ndim: int = 0

    def materialize(self) -> Tensor | None:
        """The ``[B, 1, Lq, Lk]`` bool mask ``sdpa`` would get (None when SDPA's ``is_causal`` suffices)."""
        from transformers.masking_utils import sdpa_mask

        return sdpa_mask(**self.sdpa_args)


def _standard_mask_kind(mask_function, local_size):
    """('causal', None) or ('sliding', window) for transformers' own mask functions; None for anything else."""
    from transformers.masking_utils import causal_mask_function

    if mask_function is causal_mask_function:
        return "causal", None
    if local_size is not None and getattr(mask_function, "__qualname__", "") == "and_masks.<locals>.and_mask":
        inner = _closure_value(mask_function, "mask_functions") or ()
        names = sorted(getattr(f, "__qualname__", "") for f in inner)
        if len(inner) == 2 and causal_mask_function in inner and names[1].startswith("sliding_window_overlay"):
            overlay = next(f for f in inner if f is not causal_mask_function)
            window = _closure_value(overlay, "sliding_window")
            if window == local_size:
                return "sliding", int(window)
    return None


def _closure_value(fn, name):
    code = getattr(fn, "__code__", None)
    if code is None or fn.__closure__ is None or name not in code.co_freevars:
        return None
    return fn.__closure__[code.co_freevars.index(name)].cell_contents


def sparsa_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                mask_function=None, attention_mask: Tensor | None = None, local_size: int | None = None,
                allow_is_causal_skip: bool = True, device="cpu", **kwargs):
    """Mask function registered as ``"sparsa"``: same inputs as ``transformers.masking_utils.sdpa_mask``."""
    from transformers.masking_utils import causal_mask_function, prepare_padding_mask

    mask_function = causal_mask_function if mask_function is None else mask_function
    sdpa_args = dict(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                     local_size=local_size, allow_is_causal_skip=allow_is_causal_skip, device=device)
    sdpa_args.update({k: v for k, v in kwargs.items() if k in ("allow_is_bidirectional_skip", "use_vmap")})
    kind = _standard_mask_kind(mask_function, local_size)
    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    q_offset = int(q_offset) if not isinstance(q_offset, Tensor) else int(q_offset.item())
    if kind is not None and allow_is_causal_skip:
        # Same rule as sdpa: plain causal, no padding, keys aligned with queries -> no mask at all.
        no_pad = padding is None or bool(padding[:, kv_offset: kv_offset + kv_length].all())
        aligned = q_length == 1 or kv_length == q_length
        if no_pad and aligned and (local_size is None or kv_length < local_size):
            return None
    return SparsaMask(batch_size, q_length, kv_length, q_offset, int(kv_offset), padding,
                      window=None if kind is None else kind[1], standard=kind is not None, sdpa_args=sdpa_args)


# ------------------------------------------------------------------------------------------------ config
@dataclass
class SparsaState:
    """What ``configure`` attached to a model: its methods and the record of the last forward pass."""

    prefill: object = None
    decode: object = None
    dense_below: int | None = None
    backend: str = "auto"
    records: dict = field(default_factory=dict)
    prefill_records: dict = field(default_factory=dict)  # the last forward pass with more than one query
    fallbacks_warned: set = field(default_factory=set)

    def threshold(self) -> int:
        if self.dense_below is not None:
            return self.dense_below
        return getattr(self.prefill, "dense_below", 0)


def configure(model, prefill=None, decode=None, *, dense_below: int | None = None, backend: str = "auto",
              **params) -> SparsaState:
    """Attach prefill and decode methods to every attention layer of ``model``.

    ``prefill``/``decode``: ``None`` (dense), a registered name (``sparsa.methods()``) or a method object.
    ``params`` go to the prefill method (``decode_params={...}`` to the decode policy). ``dense_below``: key
    length under which dense attention is used (default: the method's own). Returns the shared state.
    """
    decode_params = params.pop("decode_params", {}) or {}
    _check_servable(model.config)
    if getattr(model.config, "_attn_implementation", None) != NAME:
        raise ValueError(f"the model's attention implementation is {model.config._attn_implementation!r}; load it "
                         f"with attn_implementation='{NAME}' (after `import sparsa`) or call "
                         f"model.set_attn_implementation('{NAME}')")
    if dense_below is not None and (not isinstance(dense_below, int) or dense_below < 0):
        raise ValueError(f"dense_below must be an int >= 0, got {dense_below!r}")
    from .ops.attention import BACKENDS

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    state = SparsaState(prefill=registry.create("prefill", prefill, **params),
                        decode=registry.create("decode", decode, **decode_params),
                        dense_below=dense_below, backend=backend)
    layers = [m for m in model.modules() if _is_attention(m)]
    if not layers:
        raise ValueError("found no attention layers (modules with a layer_idx and a config) in the model")
    known = {m.layer_idx for m in layers}
    unknown = sorted(set(getattr(state.prefill, "dense_layers", ())) - known)
    if unknown:
        raise ValueError(f"dense_layers {unknown} are not layers of this model (its attention layers are "
                         f"{min(known)}..{max(known)})")
    for module in layers:
        module.sparsa_state = state
    model.sparsa_state = state
    return state


def _is_attention(module) -> bool:
    return hasattr(module, "layer_idx") and hasattr(module, "config") and hasattr(module, "num_key_value_groups")


def _check_servable(config):
    text = getattr(config, "get_text_config", lambda: config)()
    for attr in ("attn_logit_softcapping",):
        if getattr(text, attr, None) is not None:
            raise ValueError(f"sparsa cannot serve this model: it uses attention logit softcapping "
                             f"({attr}={getattr(text, attr)}), which sparsa's kernels do not implement")


def stats(model, prefill: bool = False) -> dict:
    """What the last forward pass computed: per layer the method, density and any fallback, and overall.

    ``prefill=True``: the last pass with more than one query (the prompt), even if decode steps came after.
    """
    state = getattr(model, "sparsa_state", None)
    table = {} if state is None else (state.prefill_records if prefill else state.records)
    return _summarize([table[k] for k in sorted(table, key=lambda x: -1 if x is None else x)])


def _summarize(records: list) -> dict:
    for r in records:  # densities are recorded as device tensors (no sync per layer); read them once here
        if isinstance(r["density"], Tensor):
            r["density"] = float(r["density"])
    visible = sum(r["visible_blocks"] for r in records)
    computed = sum(r["visible_blocks"] * r["density"] for r in records)
    return {
        "layers": records,
        "density": computed / visible if visible else None,
        "methods": sorted({r["method"] for r in records}),
        "fallbacks": [{"layer": r["layer"], "reason": r["fallback"]} for r in records if r["fallback"]],
    }


# ------------------------------------------------------------------------------------------- attention
def sparsa_attention_forward(module, query: Tensor, key: Tensor, value: Tensor, attention_mask, *,
                             scaling: float | None = None, dropout: float = 0.0, **kwargs):
    """Attention function registered as ``"sparsa"``: ``(out [B, Lq, Hq, D], None)``."""
    for name, what in _UNSUPPORTED_KWARGS.items():
        if kwargs.get(name) is not None:
            raise ValueError(f"sparsa cannot serve this model: it uses {what} ({name}=...)")
    state = getattr(module, "sparsa_state", None) or _DEFAULT_STATE
    layer = getattr(module, "layer_idx", None)
    lq, lk = query.shape[2], key.shape[2]
    method = state.prefill if lq > 1 else None  # decode steps: dense until a decode policy takes them
    if method is not None and getattr(method, "is_dense_layer", lambda i: False)(layer):
        method = None  # a layer the method keeps dense (its dense_layers): sdpa, as configured, not a fallback
    reason = _fallback_reason(state, module, attention_mask, lq, lk, dropout) if method is not None else None
    label = "sdpa" if lq > 1 else f"decode:{getattr(state.decode, 'name', 'dense')}"
    record = {"layer": layer, "q_len": lq, "kv_len": lk, "method": label, "density": 1.0, "fallback": reason,
              "visible_blocks": _visible_blocks(lq, lk)}
    if method is None or reason is not None:
        out = _dense(module, query, key, value, attention_mask, scaling, dropout, state, kwargs)
        if reason is not None and method is not None:
            _warn_fallback(state, reason)
    else:
        out, density = _sparse(method, module, query, key, value, attention_mask, scaling, state)
        record.update(method=method.name, density=density)
    if state is not _DEFAULT_STATE:
        _record(state.records, layer, record)
        if lq > 1:
            _record(state.prefill_records, layer, record)
    return out, None


def _record(records: dict, layer, record: dict) -> None:
    # A new forward pass starts when a layer index comes again that is not above the last one seen.
    if records and layer is not None and layer <= max(records):
        records.clear()
    records[layer] = record


_DEFAULT_STATE = SparsaState()


def _visible_blocks(lq: int, lk: int, block_q: int = 128, block_k: int = 128) -> int:
    """Causally visible tiles: the weight of a layer in the overall density."""
    return visible_tiles(lq, lk, block_q, block_k, True)



def _fallback_reason(state, module, mask, lq, lk, dropout) -> str | None:
    if lk < state.threshold():
        return f"kv_len {lk} < dense_below {state.threshold()}"
    if dropout and module.training:
        return "training with attention dropout"
    if isinstance(mask, SparsaMask):
        if not mask.standard:
            return "custom attention mask (packed sequences or mask overlays)"
        if mask.window is not None:
            return f"sliding-window layer (window {mask.window})"
    elif mask is not None:
        return "custom 4-D attention mask"
    return None


def _warn_fallback(state, reason):
    key = reason.split(" ")[0]
    if key not in state.fallbacks_warned:
        state.fallbacks_warned.add(key)
        warnings.warn(f"sparsa: falling back to dense attention: {reason}", stacklevel=4)


def _kernel_inputs(mask, key, value, lq):
    """Keys/values aligned so that queries are their last positions, and the key padding mask (or None)."""
    if mask is None:
        return key, value, None
    used = mask.q_offset + lq - mask.kv_offset  # keys up to the last query; static caches hold more slots
    if used > key.shape[2] or used < lq:
        raise ValueError(f"sparsa: cache returned {key.shape[2]} keys but the mask covers {used}")
    key, value = key[:, :, :used], value[:, :, :used]
    # One padding tensor per mask (i.e. per forward pass), shared by all layers: no per-layer slicing or
    # device sync, and the kernel's cached BlockMask for a static pattern is reused across layers.
    cache = mask.__dict__.setdefault("_pads", {})
    slot = (used, str(key.device))
    if slot not in cache:
        pad = None
        if mask.padding is not None:
            pad = mask.padding[:, mask.kv_offset: mask.kv_offset + used].to(key.device)
            pad = None if bool(pad.all()) else pad
        cache[slot] = pad
    return key, value, cache[slot]


def _sparse(method, module, query, key, value, mask, scaling, state):
    key, value, pad = _kernel_inputs(mask, key, value, query.shape[2])
    out, density = method.attend(query, key, value, scale=scaling, key_padding_mask=pad, backend=state.backend,
                                 layer_idx=getattr(module, "layer_idx", None))
    return out.transpose(1, 2).contiguous(), density


def _dense(module, query, key, value, mask, scaling, dropout, state, kwargs):
    """Dense attention, identical to the ``sdpa`` implementation where its mask is affordable."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kwargs = {k: v for k, v in kwargs.items() if k not in _UNSUPPORTED_KWARGS and k != "is_causal"}
    if mask is None or isinstance(mask, Tensor):
        return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling,
                                      **kwargs)[0]
    lq = query.shape[2]
    big = mask.batch_size * lq * mask.kv_length > MATERIALIZE_LIMIT
    if not big or not mask.standard or dropout:
        return sdpa_attention_forward(module, query, key, value, mask.materialize(), dropout=dropout,
                                      scaling=scaling, **kwargs)[0]
    # Long and padded (or windowed): sparsa's kernel with a dense (or windowed) pattern, linear memory.
    key, value, pad = _kernel_inputs(mask, key, value, lq)
    lk = key.shape[2]
    if mask.window is not None:
        pattern = BlockPattern.sliding_window(lq, lk, window=mask.window, device=query.device)
    else:
        pattern = BlockPattern.dense(lq, lk, device=query.device)
    out = block_sparse_attention(query, key, value, pattern, causal=True, scale=scaling, key_padding_mask=pad,
                                 backend=state.backend, validate=False)
    return out.transpose(1, 2).contiguous()


# ---------------------------------------------------------------------------------------------- register
def register() -> None:
    """Register the attention and mask functions under ``"sparsa"`` (idempotent; run by ``import sparsa``)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, sparsa_attention_forward)
    AttentionMaskInterface.register(NAME, sparsa_mask)


__all__ = ["configure", "stats", "register", "sparsa_attention_forward", "sparsa_mask", "SparsaMask",
           "SparsaState"]
