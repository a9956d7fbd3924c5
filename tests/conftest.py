"""Shared test setup: import path for the dense reference, hypothesis defaults, output poisoning."""

import glob
import os
import sys

# Triton kernels run in Triton's CPU interpreter when there is no GPU. The switch is read when kernels are
# defined, so it must be set before anything imports Triton. (Checked without importing torch: any NVIDIA device
# node counts, since a container may expose its GPU as /dev/nvidia3 and no /dev/nvidia0. Under the interpreter
# every Triton test fed CUDA tensors fails, as the first GPU run of these tests showed.)
if not glob.glob("/dev/nvidia[0-9]*"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))  # tests/dense_reference.py

# Property tests run small shapes on a slow CI box: no per-example deadline (the first call of a shape can be
# slow), and each test bounds its own example count with @settings(max_examples=...).
settings.register_profile("sparsa", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("sparsa")


class _PoisonedTorch:
    """Stands in for the ``torch`` module inside ``sparsa.ops.naive``: output buffers start as NaN, so any
    element the kernel forgets to write shows up. Everything else is the real torch."""

    def __init__(self):
        self.allocations = 0

    def __getattr__(self, name):
        return getattr(torch, name)

    def zeros(self, *size, **kwargs):
        self.allocations += 1
        return torch.full_like(torch.zeros(*size, **kwargs), float("nan"))

    def empty(self, *size, **kwargs):
        return self.zeros(*size, **kwargs)

    def full(self, size, fill_value, **kwargs):
        self.allocations += 1
        return torch.full(size, float("nan"), **kwargs)


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Make the reference backend allocate its ``out`` and ``lse`` buffers filled with NaN."""
    from sparsa.ops import naive

    fake = _PoisonedTorch()
    monkeypatch.setattr(naive, "torch", fake)
    return fake
