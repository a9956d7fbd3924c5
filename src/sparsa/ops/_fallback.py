"""How an op with a Triton fast path and a PyTorch reference picks one (:func:`dispatch`), and one rule for the
fast path chosen automatically: a kernel that fails (a compile error on a GPU or Triton version the tests never
saw) must not take attention down. The op warns once, names the failure, and uses its PyTorch reference from
then on. An explicit ``backend="triton"`` still raises."""

from __future__ import annotations

import warnings

import torch

_failed: dict[str, str] = {}


BACKENDS = ("auto", "triton", "naive")


def dispatch(op: str, backend: str, *, on_gpu: bool, fast, reference, supported: bool = True):
    """``backend`` "naive": ``reference()``; "triton": ``fast()``; "auto": ``fast()`` when ``on_gpu`` (the op's
    tensors are on CUDA and within its kernel's limits) and Triton is installed, through
    :func:`triton_or_reference`, else ``reference()``. ``supported=False`` (a case the kernel does not take,
    e.g. float64) runs ``reference()`` whatever the backend."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto', 'triton' or 'naive', got {backend!r}")
    if backend == "naive" or not supported:
        return reference()
    if backend == "triton":
        return fast()
    from .vertical_slash import triton_available

    if not (on_gpu and triton_available()):
        return reference()
    return triton_or_reference(op, fast, reference)


def triton_or_reference(op: str, fast, reference, instead: str = "the PyTorch reference"):
    """``fast()``, or ``reference()`` once ``fast`` has failed for ``op`` in this process (``instead`` names it
    in the warning)."""
    if op in _failed:
        return reference()
    try:
        return fast()
    except torch.cuda.OutOfMemoryError:
        raise  # the reference would not fit either
    except Exception as error:  # noqa: BLE001 -- any kernel failure: the reference gives the same answer
        _failed[op] = f"{type(error).__name__}: {str(error)[:300]}"
        warnings.warn(f"sparsa: the Triton kernel of {op} failed ({_failed[op]}); using {instead} "
                      "from now on", stacklevel=3)
        return reference()


def failed_ops() -> dict[str, str]:
    """The ops whose Triton kernel failed in this process, with the error."""
    return dict(_failed)
