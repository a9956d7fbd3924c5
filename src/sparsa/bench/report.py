"""Tables and plots from ``sparsa bench`` results (``sparsa bench report RESULTS [--out DIR]``).

The input is the benchmark's JSONL file: one row per finished cell (method x task x length x depth), appended as
cells finish, so a resumed run may repeat a cell (the last row per ``key`` wins) and a killed run may leave a
torn last line (skipped with a warning). ``summarize`` folds the depth grid into one cell per
(model, method, task, length); the Markdown tables and the score-vs-length and retention-vs-density plots are
built on those cells, the depth heatmaps on the raw rows.

Figures are drawn on bare ``matplotlib.figure.Figure`` objects with the Agg canvas: no pyplot, so no global
backend switch, no display needed and no figure left registered after saving.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from collections import defaultdict

REQUIRED = ("method", "task", "length", "score")
DEPTH_TASK_PREFIXES = ("niah", "passkey")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")


# ------------------------------------------------------------------------------------------------ loading
def load_results(path) -> list[dict]:
    """Rows of a results file, the last one per ``key`` kept, in the order cells first appeared.

    Blank lines are ignored; lines that do not parse (a run killed mid-write) and rows that are not results
    (missing method, task, length or score) are skipped with a warning rather than failing the whole report.
    """
    by_key: dict = {}
    bad = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                bad.append(number)
                continue
            if not isinstance(row, dict) or any(row.get(k) is None for k in REQUIRED):
                bad.append(number)
                continue
            by_key[_key(row)] = row
    if bad:
        warnings.warn(f"{path}: skipped {len(bad)} unreadable or incomplete line(s): {bad[:10]}", stacklevel=2)
    return list(by_key.values())


def _key(row: dict):
    # Rows always carry ``key``; the fallback only keeps hand-made rows from collapsing into one.
    if row.get("key") is not None:
        return row["key"]
    return (row.get("model"), row["method"], row["task"], row["length"], row.get("depth"), row.get("seed"))


def _is_dense(row: dict) -> bool:
    return row["method"] == "dense" or row.get("method_name") == "dense"


# ------------------------------------------------------------------------------------------------ aggregation
def summarize(rows: list[dict]) -> list[dict]:
    """One cell per (model, method, task, length), aggregated over depths.

    Scores and densities are means weighted by each row's sample count ``n`` (so a cell's score is the mean over
    all its samples). Retention is computed from the aggregates, over the rows that have a dense score:
    score / dense_score, None when the dense mean is 0 or there is none. Speed is total dense prefill time over
    the method's (whole-cell seconds for rows that predate ``prefill_ms``). Dense rows are their own baseline
    when the runner left their dense fields empty.
    """
    groups = defaultdict(list)
    for row in rows:
        groups[(row.get("model"), row["method"], row["task"], row["length"])].append(row)
    cells = [_aggregate(group) for group in groups.values()]
    models = _first_seen(r.get("model") for r in rows)
    methods = _method_order(rows)
    tasks = _first_seen(r["task"] for r in rows)
    cells.sort(key=lambda c: (models.index(c["model"]), methods.index(c["method"]), tasks.index(c["task"]),
                              c["length"]))
    return cells


def _aggregate(group: list[dict]) -> dict:
    first = group[0]
    dense_scores = [_dense_score(r) for r in group]
    paired = [(r, d) for r, d in zip(group, dense_scores) if d is not None]
    score = _weighted([(r["score"], _n(r)) for r in group])
    dense_score = _weighted([(d, _n(r)) for r, d in paired]) if paired else None
    paired_score = _weighted([(r["score"], _n(r)) for r, _ in paired]) if paired else None
    # Speed: dense prefill time over the method's on the same prompts (rows since 2026-11-29 session 2); older
    # rows only have whole-cell wall seconds (decoding and warm-up included).
    timed = [(r["prefill_ms"], _dense_field(r, "prefill_ms")) for r in group
             if r.get("prefill_ms") is not None and _dense_field(r, "prefill_ms") is not None]
    if not timed:
        timed = [(r["seconds"], _dense_seconds(r)) for r in group
                 if r.get("seconds") is not None and _dense_seconds(r) is not None]
    seconds = sum(r["seconds"] for r in group if r.get("seconds") is not None)
    densities = [(r["density"], _n(r)) for r in group if r.get("density") is not None]
    return {
        "model": first.get("model"),
        "method": first["method"],
        "method_name": first.get("method_name"),
        "params": first.get("params"),
        "task": first["task"],
        "length": first["length"],
        "depths": sorted(r["depth"] for r in group if r.get("depth") is not None),
        "cells": len(group),
        "n": sum(_n(r) for r in group),
        "score": score,
        "dense_score": dense_score,
        "retention": paired_score / dense_score if dense_score else None,
        "density": _weighted(densities) if densities else None,
        "seconds": seconds,
        "dense_seconds": sum(d for _, d in timed) if timed else None,
        "speed": _ratio(sum(d for _, d in timed), sum(s for s, _ in timed)) if timed else None,
    }


def _n(row: dict) -> int:
    return row.get("n") or 1


def _dense_score(row: dict):
    if row.get("dense_score") is None and _is_dense(row):
        return row["score"]
    return row.get("dense_score")


def _dense_seconds(row: dict):
    return _dense_field(row, "seconds")


def _dense_field(row: dict, field: str):
    if row.get(f"dense_{field}") is None and _is_dense(row):
        return row.get(field)
    return row.get(f"dense_{field}")


def _weighted(pairs) -> float:
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total


def _ratio(a: float, b: float):
    return a / b if b else None


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _first_seen(items) -> list:
    return list(dict.fromkeys(items))


def _method_order(rows) -> list[str]:
    # Dense first: it is the reference every other row is read against.
    methods = _first_seen(r["method"] for r in rows)
    dense = _first_seen(r["method"] for r in rows if _is_dense(r))
    return dense + [m for m in methods if m not in dense]


# ------------------------------------------------------------------------------------------------ tables
def markdown_table(rows: list[dict]) -> str:
    """A header line, the score table (method x task/length), retention and density by length, and the
    per-method summary, as Markdown."""
    cells = summarize(rows)
    return "\n\n".join([header_line(rows), score_table(cells), length_table(cells), method_table(cells)]) + "\n"


def header_line(rows: list[dict]) -> str:
    models = ", ".join(_first_seen(str(r.get("model")) for r in rows))
    devices = ", ".join(_first_seen(str(r.get("device")) for r in rows))
    dates = sorted(r["date"] for r in rows if r.get("date"))
    span = "?" if not dates else dates[0] if dates[0] == dates[-1] else f"{dates[0]} to {dates[-1]}"
    ns = sorted({_n(r) for r in rows})
    samples = str(ns[0]) if len(ns) == 1 else f"{ns[0]}-{ns[-1]}"
    return (f"**Model** {models} · **device** {devices} · **date** {span} · "
            f"**samples per cell** {samples} · **cells** {len(rows)}")


def score_table(cells: list[dict]) -> str:
    """One row per (task, method), one column per length; each entry is ``score (retention%)``.

    Lengths go across and tasks down (grouped, dense first in each group) because a grid of every (task,
    length) pair as columns is too wide to read once there are more than a few of each.
    """
    label_of = _labeler(cells)
    lengths = sorted({c["length"] for c in cells})
    by_cell = {(c["task"], label_of(c), c["length"]): c for c in cells}
    lines = [_md_row(["task", "method"] + [fmt_length(n) for n in lengths]),
             _md_row(["---", "---"] + ["---:"] * len(lengths))]
    for task, label in _first_seen((c["task"], label_of(c)) for c in _by_task(cells)):
        entries = [_score_entry(by_cell.get((task, label, n))) for n in lengths]
        lines.append(_md_row([task, label] + entries))
    return "\n".join(lines)


def _by_task(cells: list[dict]) -> list[dict]:
    # ``summarize`` orders by method first; the table wants tasks grouped, keeping that method order inside.
    tasks = _first_seen(c["task"] for c in cells)
    return sorted(cells, key=lambda c: tasks.index(c["task"]))


def length_table(cells: list[dict]) -> str:
    """Per sparse method and length, over all its tasks: ``retention @ density``, and the same over every length.

    Retention here is pooled: the method's summed scores over the dense scores of the same prompts, over the cells
    dense attention scores above 0 on (a task the model cannot do says nothing about a method), so tasks weigh by
    what dense attention gets right on them. Density is the mean over the cells.
    """
    label_of = _labeler(cells)
    lengths = sorted({c["length"] for c in cells})
    lines = [_md_row(["method"] + [fmt_length(n) for n in lengths] + ["all"]),
             _md_row(["---"] + ["---:"] * (len(lengths) + 1))]
    for label in _first_seen(label_of(c) for c in cells if not _is_dense(c)):
        mine = [c for c in cells if label_of(c) == label]
        groups = [[c for c in mine if c["length"] == n] for n in lengths] + [mine]
        lines.append(_md_row([label] + [_pooled_entry(group) for group in groups]))
    return "\n".join(lines)


def _pooled_entry(group: list[dict]) -> str:
    paired = [c for c in group if c["dense_score"]]  # a cell dense attention scores 0 on says nothing
    if not paired:
        return "-"
    dense = sum(c["dense_score"] * c["n"] for c in paired)
    kept = _ratio(sum(c["score"] * c["n"] for c in paired), dense)
    return f"{_fmt(kept, '{:.1%}')} @ {_fmt(_mean(c['density'] for c in group), '{:.3f}')}"


def method_table(cells: list[dict]) -> str:
    """Per method, plain means over its cells: score, retention (cells with a dense score), density, speed."""
    head = ["method", "cells", "mean score", "mean retention", "mean density", "mean prefill speed vs dense"]
    lines = [_md_row(head), _md_row(["---"] + ["---:"] * (len(head) - 1))]
    label_of = _labeler(cells)
    for label in _first_seen(label_of(c) for c in cells):
        mine = [c for c in cells if label_of(c) == label]
        lines.append(_md_row([
            label, str(len(mine)),
            _fmt(_mean(c["score"] for c in mine), "{:.3f}"),
            _fmt(_mean(c["retention"] for c in mine), "{:.1%}"),
            _fmt(_mean(c["density"] for c in mine), "{:.3f}"),
            _fmt(_mean(c["speed"] for c in mine), "{:.2f}x"),
        ]))
    return "\n".join(lines)


def _labeler(items):
    # Name the model only when the file mixes models; otherwise it is in the header line.
    mixed = len({i.get("model") for i in items}) > 1
    return lambda c: f"{c.get('model')} / {c['method']}" if mixed else c["method"]


def _score_entry(cell) -> str:
    if cell is None:
        return "-"
    score = f"{cell['score']:.2f}"
    if _is_dense(cell):
        return score
    return f"{score} ({_fmt(cell['retention'], '{:.0%}')})"


def _fmt(value, pattern: str) -> str:
    return "n/a" if value is None else pattern.format(value)


def _md_row(items) -> str:
    return "| " + " | ".join(str(i).replace("|", "\\|") for i in items) + " |"


def fmt_length(length: int) -> str:
    return f"{length // 1024}k" if length >= 1024 and length % 1024 == 0 else str(length)


# ------------------------------------------------------------------------------------------------ plots
def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _colors(labels) -> dict:
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if len(labels) <= 10 else "tab20"]
    return {label: cmap(i % cmap.N) for i, label in enumerate(labels)}


def _save(fig, path) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    return str(path)


def plot_score_vs_length(rows: list[dict], path):
    """One subplot per task: score (mean over depths) against length on a log2 axis, one line per method."""
    cells = summarize(rows)
    if not cells:
        return None
    tasks = _first_seen(c["task"] for c in cells)
    label_of = _labeler(cells)
    labels = _first_seen(label_of(c) for c in cells)
    colors = _colors(labels)
    ncols = min(3, len(tasks))
    nrows = math.ceil(len(tasks) / ncols)
    fig = _figure(4.2 * ncols, 3.2 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, task in zip(axes, tasks):
        mine = [c for c in cells if c["task"] == task]
        for label in labels:
            line = sorted((c for c in mine if label_of(c) == label), key=lambda c: c["length"])
            if not line:
                continue
            dense = _is_dense(line[0])
            ax.plot([c["length"] for c in line], [c["score"] for c in line], marker="o", label=label,
                    color="black" if dense else colors[label], linestyle="--" if dense else "-")
        lengths = sorted({c["length"] for c in mine})
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [fmt_length(n) for n in lengths])
        ax.minorticks_off()
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(task)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("score")
        ax.grid(alpha=0.3)
    for ax in axes[len(tasks):]:
        ax.set_visible(False)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside right upper", fontsize="small")
    return _save(fig, path)


def depth_grids(rows: list[dict]) -> dict:
    """{task: {method label: (depths, lengths, scores[depth][length] or None)}} for NIAH-like tasks with several
    depths; dense first among the methods. Repeated (depth, length) rows (other seeds) are averaged."""
    grids = {}
    label_of = _labeler(rows)
    labels = _first_seen(label_of(r) for r in sorted(rows, key=lambda r: not _is_dense(r)))
    for task in _first_seen(r["task"] for r in rows):
        mine = [r for r in rows if r["task"] == task and r.get("depth") is not None]
        depths = sorted({r["depth"] for r in mine})
        if not task.startswith(DEPTH_TASK_PREFIXES) or len(depths) < 2:
            continue
        lengths = sorted({r["length"] for r in mine})
        grids[task] = {}
        for label in labels:
            values = defaultdict(list)
            for r in mine:
                if label_of(r) == label:
                    values[(r["depth"], r["length"])].append(r["score"])
            if values:
                grid = [[_mean(values.get((d, n), [])) for n in lengths] for d in depths]
                grids[task][label] = (depths, lengths, grid)
    return grids


def plot_depth_heatmaps(rows: list[dict], path):
    """Per NIAH-like task with a depth grid, one heatmap per method (depth down, length across, score 0..1,
    values written in). Returns None, writing nothing, when no task has a depth grid."""
    grids = depth_grids(rows)
    if not grids:
        return None
    ncols = max(len(methods) for methods in grids.values())
    fig = _figure(3.0 * ncols + 1.0, 2.8 * len(grids))
    axes = fig.subplots(len(grids), ncols, squeeze=False)
    image = None
    for row_axes, (task, methods) in zip(axes, grids.items()):
        for ax, (method, (depths, lengths, grid)) in zip(row_axes, methods.items()):
            image = _heatmap(ax, depths, lengths, grid)
            ax.set_title(f"{task}\n{method}", fontsize="small")
        for ax in row_axes[len(methods):]:
            ax.set_visible(False)
    fig.colorbar(image, ax=axes.ravel().tolist(), label="score", shrink=0.8)
    return _save(fig, path)


def _heatmap(ax, depths, lengths, grid):
    import numpy as np

    values = np.array([[np.nan if v is None else v for v in line] for line in grid], dtype=float)
    image = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
    for i in range(len(depths)):
        for j in range(len(lengths)):
            if not np.isnan(values[i, j]):
                ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(lengths)), [fmt_length(n) for n in lengths], fontsize=7)
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths], fontsize=7)
    ax.set_xlabel("length", fontsize="small")
    ax.set_ylabel("needle depth", fontsize="small")
    return image


def plot_retention_vs_density(rows: list[dict], path):
    """Scatter of the summarized cells: prefill density against retention; colour = method, marker = task."""
    all_cells = summarize(rows)
    cells = [c for c in all_cells if c["retention"] is not None and c["density"] is not None]
    label_of = _labeler(all_cells)
    labels = _first_seen(label_of(c) for c in all_cells)
    tasks = _first_seen(c["task"] for c in all_cells)
    colors = _colors(labels)
    markers = {task: MARKERS[i % len(MARKERS)] for i, task in enumerate(tasks)}
    fig = _figure(7.5, 4.8)
    ax = fig.subplots()
    for c in cells:
        label = label_of(c)
        ax.scatter(c["density"], c["retention"], color="black" if _is_dense(c) else colors[label],
                   marker=markers[c["task"]], s=36, alpha=0.8)
    ax.axhline(1.0, color="grey", linestyle=":", linewidth=1)
    ax.set_xlim(0, 1.05)
    ax.set_xlabel("prefill density (fraction of causal blocks computed)")
    ax.set_ylabel("retention (score / dense score)")
    ax.grid(alpha=0.3)
    dense = {label_of(c) for c in all_cells if _is_dense(c)}
    _scatter_legends(fig, labels, colors, markers, dense)
    return _save(fig, path)


def _scatter_legends(fig, labels, colors, markers, dense):
    # Two keys in one legend: colour names the method, marker shape names the task.
    from matplotlib.lines import Line2D

    by_method = [Line2D([], [], color="black" if label in dense else colors[label], marker="o", linestyle="",
                        label=label) for label in labels]
    by_task = [Line2D([], [], color="grey", marker=m, linestyle="", label=task) for task, m in markers.items()]
    fig.legend(handles=by_method + by_task, loc="outside right upper", fontsize="small")


# ------------------------------------------------------------------------------------------------ report
def default_out_dir(results_path) -> str:
    root, _ = os.path.splitext(os.path.abspath(results_path))
    return root + "_report"


def write_report(results_path, out_dir=None) -> dict:
    """Write ``report.md`` and the PNGs into ``out_dir`` (default ``<results stem>_report/`` next to the
    results). Returns {"report", "score_vs_length", "depth_heatmaps", "retention_vs_density", "markdown"}:
    paths (None for a plot that had nothing to show) and the Markdown tables as text."""
    rows = load_results(results_path)
    if not rows:
        raise ValueError(f"{results_path}: no results rows")
    out_dir = out_dir or default_out_dir(results_path)
    os.makedirs(out_dir, exist_ok=True)
    plots = {
        "score_vs_length": plot_score_vs_length(rows, os.path.join(out_dir, "score_vs_length.png")),
        "depth_heatmaps": plot_depth_heatmaps(rows, os.path.join(out_dir, "depth_heatmaps.png")),
        "retention_vs_density": plot_retention_vs_density(rows, os.path.join(out_dir, "retention_vs_density.png")),
    }
    tables = markdown_table(rows)
    report = os.path.join(out_dir, "report.md")
    with open(report, "w") as f:
        f.write(_report_text(results_path, tables, plots))
    return {"report": report, **plots, "markdown": tables}


def _report_text(results_path, tables: str, plots: dict) -> str:
    titles = {"score_vs_length": "Score vs length", "depth_heatmaps": "Score by needle depth and length",
              "retention_vs_density": "Retention vs prefill density"}
    parts = [f"# sparsa bench: {os.path.basename(results_path)}", tables.rstrip()]
    for name, png in plots.items():
        if png:  # image links are relative so the folder can be moved or committed as is
            parts.append(f"## {titles[name]}\n\n![{titles[name]}]({os.path.basename(png)})")
    return "\n\n".join(parts) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsa bench report",
                                     description="Markdown tables and plots from a sparsa bench results file.")
    parser.add_argument("results", help="results JSONL written by `sparsa bench`")
    parser.add_argument("--out", default=None,
                        help="output folder (default: <results stem>_report/ next to the results file)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        paths = write_report(args.results, args.out)
    except (OSError, ValueError) as e:
        print(f"sparsa bench report: {e}", file=sys.stderr)
        return 1
    print(paths["markdown"])
    print(f"wrote {paths['report']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
