"""Benchmarks: kernel speed (``speed``)."""
