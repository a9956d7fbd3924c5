"""One registry of methods: prefill selectors (emit a BlockPattern) and decode policies, by name."""

from __future__ import annotations

import dataclasses
import difflib

_PREFILL: dict[str, type] = {}
_DECODE: dict[str, type] = {}
_KINDS = {"prefill": _PREFILL, "decode": _DECODE}


def register(kind: str, name: str):
    """Class decorator: ``@register("prefill", "streaming")``."""
    table = _KINDS[kind]

    def wrap(cls):
        if name in table and table[name] is not cls:
            raise ValueError(f"{kind} method {name!r} is already registered by {table[name].__name__}")
        cls.name = name
        table[name] = cls
        return cls

    return wrap


def methods() -> dict[str, list[str]]:
    """Registered method names: ``{"prefill": [...], "decode": [...]}``."""
    _load_builtin()
    return {kind: sorted(table) for kind, table in _KINDS.items()}


def method_class(kind: str, name: str) -> type:
    _load_builtin()
    table = _KINDS[kind]
    if name not in table:
        hint = difflib.get_close_matches(name, table, n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ValueError(f"unknown {kind} method {name!r}{extra}; allowed values: {sorted(table)}")
    return table[name]


def create(kind: str, method, **params):
    """A method object from a name and parameters, or the object itself (then ``params`` must be empty)."""
    if method is None:
        if params:
            raise ValueError(f"parameters {sorted(params)} were given but no {kind} method")
        return None
    if not isinstance(method, str):
        if params:
            raise ValueError(f"parameters {sorted(params)} can only be given with a {kind} method name, "
                             f"not with a {type(method).__name__} object; set them on the object")
        return method
    cls = method_class(kind, method)
    allowed = {f.name for f in dataclasses.fields(cls) if f.init}
    for key in params:
        if key not in allowed:
            raise ValueError(f"unknown parameter {key!r} for {kind} method {method!r}; allowed: {sorted(allowed)}")
    return cls(**params)


def _load_builtin():
    # Importing the packages runs their @register decorators.
    from . import decode, prefill  # noqa: F401
