"""Kernel speed benchmark for BENCHMARKS.md: SDPA vs sparsa dense vs sparsa at 50/25/10/5% density, 4K-128K.

    PYTHONUNBUFFERED=1 python benchmarks/speed.py                          # the issue's grid
    PYTHONUNBUFFERED=1 python benchmarks/speed.py --kernel-options-sweep   # then tune FlexAttention options

Any ``sparsa speed`` flag works and overrides the defaults here (``--help``). When ``$OUT`` is set (the GPU
machine's result folder), rows also go to ``$OUT/speed.jsonl`` as they are measured and the final table to
``$OUT/speed.md``. A time limit keeps the run inside a 10-minute slot: cells not started by then are recorded
as skipped and the table still prints.
"""

import os
import sys

# Measure this checkout's code, installed or not (the GPU machine gets the working tree, not an install).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "src"))

from sparsa.bench.speed import main  # noqa: E402

DEFAULTS = ["--lengths", "4096,8192,16384,32768,65536,131072", "--densities", "0.5,0.25,0.1,0.05",
            "--time-limit", "540"]


def run(argv: list[str]) -> int:
    out = os.environ.get("OUT")
    extra = []
    if out and "--jsonl" not in argv:
        extra += ["--jsonl", os.path.join(out, "speed.jsonl")]
    if out and "--markdown" not in argv:
        extra += ["--markdown", os.path.join(out, "speed.md")]
    return main(DEFAULTS + extra + argv)  # later flags win, so the caller's override the defaults


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
