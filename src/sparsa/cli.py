"""The ``sparsa`` command line."""

from __future__ import annotations

import argparse
import sys


def _methods(args) -> int:
    from . import registry

    import dataclasses

    for kind, names in registry.methods().items():
        print(f"{kind}:")
        for name in names:
            cls = registry.method_class(kind, name)
            params = ", ".join(f"{f.name}={_default(f)}" for f in dataclasses.fields(cls) if f.init)
            summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
            print(f"  {name:<16} {params}")
            if args.verbose and summary:
                print(f"  {'':<16} {summary}")
    return 0


def _calibrate(args) -> int:
    import json

    import torch

    from .bench.runner import load_model, resolve_model
    from .prefill.sale import calibrate_thresholds
    from .tasks import get

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model(resolve_model(args.model), device)
    samples = get(args.task).generate(args.samples, args.length, 10_000, tokenizer)
    ids = [tokenizer.encode(s["prompt"], add_special_tokens=False) for s in samples]
    width = min(len(x) for x in ids)
    batch = torch.tensor([x[-width:] for x in ids], device=device)  # same length: no padding needed
    thresholds = calibrate_thresholds(model, batch, eps=args.eps)
    with open(args.out, "w") as f:
        json.dump({"method": "sale", "model": str(args.model or "ref-tiny"), "task": args.task,
                   "length": args.length, "eps": args.eps, "threshold": thresholds}, f, indent=1)
    dense = sum(t == 0 for row in thresholds for t in row)
    print(f"wrote {args.out}: {len(thresholds)} layers, {dense} dense heads")
    return 0


def _default(f):
    import dataclasses

    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return "?"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="sparsa", description="Block-sparse attention for long-context "
                                     "transformers, and the benchmark that shows what it costs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("methods", help="list registered prefill and decode methods with their defaults")
    p.add_argument("-v", "--verbose", action="store_true", help="also print each method's one-line summary")
    p.set_defaults(func=_methods)
    sub.add_parser("bench", help="accuracy retention and speed against dense attention on the same samples "
                   "(`sparsa bench --help`; `sparsa bench report RESULTS` for tables and plots)", add_help=False)
    sub.add_parser("speed", help="kernel timings against dense SDPA (run `sparsa speed --help`)", add_help=False)
    c = sub.add_parser("calibrate", help="per-head calibration of a method on a model (SALE thresholds)")
    c.add_argument("method", choices=["sale"])
    c.add_argument("--model", default=None, help="model directory or bundled model (default ref-tiny)")
    c.add_argument("--task", default="niah_multikey", help="task whose prompts calibrate (default niah_multikey)")
    c.add_argument("--length", type=int, default=2048)
    c.add_argument("--samples", type=int, default=2)
    c.add_argument("--eps", type=float, default=0.4, help="error tolerance per query (SALE's epsilon)")
    c.add_argument("--device", default=None)
    c.add_argument("--out", required=True, help="JSON file; use it as sale:threshold=FILE")
    c.set_defaults(func=_calibrate)
    args, rest = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "bench":
        from .bench.runner import main as bench_main

        return bench_main(rest) or 0
    if args.command == "speed":
        from .bench.speed import main as speed_main

        return speed_main(rest) or 0
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
