"""``sparsa bench report`` on a small synthetic results file: loading, aggregation math, tables, plots, CLI."""

import json

import pytest

from sparsa.bench import report

MODEL = "ref-tiny"
STREAM = "streaming:window=256"
TOPK = "topk:k=8"


def cell(method, task, length, score, *, depth=None, dense=1.0, density=0.5, seconds=2.0, dense_seconds=3.0, n=4,
         date="2026-11-29T19:10:00Z"):
    """One results row as ``sparsa bench`` writes it; dense rows are their own baseline."""
    is_dense = method == "dense"
    retention = None if not dense else score / dense
    return {
        "run": "bench", "model": MODEL, "method": method, "method_name": method.split(":")[0],
        "params": {}, "task": task, "task_params": {}, "length": length, "depth": depth, "n": n, "seed": 0,
        "score": score, "scores": [score] * n, "dense_score": dense, "retention": 1.0 if is_dense else retention,
        "density": 1.0 if is_dense else density, "seconds": seconds,
        "dense_seconds": seconds if is_dense else dense_seconds, "tokens": length - 10.0, "device": "cpu",
        "date": date, "fallbacks": 0, "key": f"{method}|{task}|{length}|{depth}",
    }


# niah_single: depth grid 0/0.5/1 at 1k and 2k. Dense per depth at 2k: 1, 1, 0.5 (mean 5/6).
DENSE_NIAH = {1024: (1.0, 1.0, 1.0), 2048: (1.0, 1.0, 0.5)}
STREAM_NIAH = {1024: (1.0, 0.5, 1.0), 2048: (1.0, 0.5, 0.0)}
DEPTHS = (0.0, 0.5, 1.0)


def synthetic_rows():
    rows = []
    for length in (1024, 2048):
        for depth, d, s in zip(DEPTHS, DENSE_NIAH[length], STREAM_NIAH[length]):
            rows.append(cell("dense", "niah_single", length, d, depth=depth, dense=d, seconds=3.0))
            rows.append(cell(STREAM, "niah_single", length, s, depth=depth, dense=d, density=0.3))
    # vt: one cell per length (depth null); topk only runs here.
    for length, d, s, t in ((1024, 1.0, 0.75, 1.0), (2048, 0.5, 0.25, 0.5)):
        rows.append(cell("dense", "vt", length, d, dense=d, seconds=4.0))
        rows.append(cell(STREAM, "vt", length, s, dense=d, density=0.4, seconds=1.0, dense_seconds=4.0))
        rows.append(cell(TOPK, "vt", length, t, dense=d, density=0.2, seconds=2.0, dense_seconds=4.0,
                         date="2026-11-30T08:00:00Z"))
    # qa: dense scores 0 at 1k, so retention there is undefined.
    rows.append(cell("dense", "qa", 1024, 0.0, dense=0.0, seconds=3.0))
    rows.append(cell(STREAM, "qa", 1024, 0.25, dense=0.0, density=0.5))
    return rows


@pytest.fixture
def results(tmp_path):
    """The synthetic file as a resumed, then killed run leaves it: a stale duplicate and a torn last line."""
    rows = synthetic_rows()
    stale = dict(rows[3], score=0.0, scores=[0.0] * 4)  # an earlier attempt at the same cell, superseded below
    path = tmp_path / "bench.jsonl"
    lines = [json.dumps(stale)] + [json.dumps(r) for r in rows] + ["", '{"run": "bench", "model": "ref-ti']
    path.write_text("\n".join(lines))
    return path


def by_cell(cells):
    return {(c["method"], c["task"], c["length"]): c for c in cells}


def test_load_dedupes_and_skips_torn_line(results):
    with pytest.warns(UserWarning, match="skipped 1"):
        rows = report.load_results(results)
    assert len(rows) == len(synthetic_rows())
    assert len({r["key"] for r in rows}) == len(rows)
    # The last row per key wins: the stale 0.0 was replaced by the real score.
    assert rows[0]["key"] == synthetic_rows()[3]["key"] and rows[0]["score"] == STREAM_NIAH[1024][1]


def test_summarize_depth_grid():
    cells = by_cell(report.summarize(synthetic_rows()))
    c = cells[(STREAM, "niah_single", 2048)]
    assert c["depths"] == [0.0, 0.5, 1.0] and c["cells"] == 3 and c["n"] == 12
    assert c["score"] == pytest.approx(0.5)
    assert c["dense_score"] == pytest.approx(5 / 6)
    assert c["retention"] == pytest.approx(0.5 / (5 / 6))  # ratio of means, not mean of ratios
    assert c["density"] == pytest.approx(0.3)
    assert c["seconds"] == pytest.approx(6.0)
    assert c["speed"] == pytest.approx(9.0 / 6.0)
    dense = cells[("dense", "niah_single", 2048)]
    assert dense["retention"] == pytest.approx(1.0) and dense["speed"] == pytest.approx(1.0)


def test_summarize_null_depth_and_zero_dense():
    cells = by_cell(report.summarize(synthetic_rows()))
    vt = cells[(STREAM, "vt", 2048)]
    assert vt["depths"] == [] and vt["cells"] == 1
    assert vt["retention"] == pytest.approx(0.5) and vt["speed"] == pytest.approx(4.0)
    assert cells[(STREAM, "qa", 1024)]["retention"] is None
    assert cells[("dense", "qa", 1024)]["retention"] is None


def test_summarize_weights_by_samples_and_orders_dense_first():
    rows = [cell(STREAM, "niah_single", 1024, 1.0, depth=0.0, n=2),
            cell(STREAM, "niah_single", 1024, 0.0, depth=1.0, n=6),
            cell("dense", "niah_single", 1024, 1.0, depth=0.0, n=8)]
    cells = report.summarize(rows)
    assert [c["method"] for c in cells] == ["dense", STREAM]
    assert cells[1]["score"] == pytest.approx(0.25) and cells[1]["n"] == 8


def test_summarize_missing_dense_fields():
    rows = [cell(STREAM, "vt", 1024, 0.5, dense=None, dense_seconds=None)]
    (c,) = report.summarize(rows)
    assert c["dense_score"] is None and c["retention"] is None and c["speed"] is None


def test_speed_prefers_prefill_time_over_wall_seconds():
    """Rows with prefill_ms (timed after warm-up) give the speed; whole-cell seconds only for older rows."""
    sparse = cell(STREAM, "vt", 1024, 0.5, seconds=10.0, dense_seconds=2.0)
    sparse.update(prefill_ms=20.0, dense_prefill_ms=50.0)
    dense = cell("dense", "vt", 1024, 1.0, seconds=2.0)
    dense.update(prefill_ms=50.0, dense_prefill_ms=50.0)
    cells = by_cell(report.summarize([dense, sparse]))
    assert cells[(STREAM, "vt", 1024)]["speed"] == pytest.approx(2.5)  # not 2 / 10 from the wall seconds
    assert cells[("dense", "vt", 1024)]["speed"] == pytest.approx(1.0)


def test_markdown_table():
    text = report.markdown_table(synthetic_rows())
    header, scores, lengths, methods = text.strip().split("\n\n")
    assert "ref-tiny" in header and "cpu" in header and "samples per cell** 4" in header
    assert "2026-11-29T19:10:00Z to 2026-11-30T08:00:00Z" in header
    assert scores.splitlines() == [
        "| task | method | 1k | 2k |",
        "| --- | --- | ---: | ---: |",
        "| niah_single | dense | 1.00 | 0.83 |",
        f"| niah_single | {STREAM} | 0.83 (83%) | 0.50 (60%) |",
        "| vt | dense | 1.00 | 0.50 |",
        f"| vt | {STREAM} | 0.75 (75%) | 0.25 (50%) |",
        f"| vt | {TOPK} | 1.00 (100%) | 0.50 (100%) |",
        "| qa | dense | 0.00 | - |",
        f"| qa | {STREAM} | 0.25 (n/a) | - |",
    ]
    # Pooled by length (qa, which dense scores 0 on, left out): streaming at 1k (0.8333 * 12 + 0.75 * 4) / 16,
    # at 2k (0.5 * 12 + 0.25 * 4) / (5/6 * 12 + 0.5 * 4) = 7/12, over both 20/28; densities are cell means.
    assert lengths.splitlines() == [
        "| method | 1k | 2k | all |",
        "| --- | ---: | ---: | ---: |",
        f"| {STREAM} | 81.2% @ 0.400 | 58.3% @ 0.350 | 71.4% @ 0.380 |",
        f"| {TOPK} | 100.0% @ 0.200 | 100.0% @ 0.200 | 100.0% @ 0.200 |",
    ]
    # streaming: retentions 5/6, 0.6, 0.75, 0.5 (qa has none) -> mean 0.6708; density (0.3*2+0.4*2+0.5)/5.
    stream_summary = next(line for line in methods.splitlines() if line.startswith(f"| {STREAM} "))
    assert stream_summary.startswith(f"| {STREAM} | 5 | 0.517 | 67.1% | 0.380 |")


def test_plots(tmp_path):
    rows = synthetic_rows()
    paths = [report.plot_score_vs_length(rows, tmp_path / "a.png"),
             report.plot_depth_heatmaps(rows, tmp_path / "b.png"),
             report.plot_retention_vs_density(rows, tmp_path / "c.png")]
    for path in paths:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_heatmaps_skip_without_depth_grid(tmp_path):
    rows = [r for r in synthetic_rows() if r["depth"] is None]
    assert report.plot_depth_heatmaps(rows, tmp_path / "h.png") is None
    assert not (tmp_path / "h.png").exists()
    grids = report.depth_grids(synthetic_rows())
    assert list(grids) == ["niah_single"] and list(grids["niah_single"]) == ["dense", STREAM]
    depths, lengths, grid = grids["niah_single"][STREAM]
    assert depths == list(DEPTHS) and lengths == [1024, 2048] and grid[2] == [1.0, 0.0]


def test_main_default_out_dir(results, capsys):
    with pytest.warns(UserWarning):
        assert report.main([str(results)]) == 0
    out_dir = results.parent / "bench_report"
    md = (out_dir / "report.md").read_text()
    for png in ("score_vs_length.png", "depth_heatmaps.png", "retention_vs_density.png"):
        assert (out_dir / png).stat().st_size > 0
        assert f"]({png})" in md
    assert "0.50 (60%)" in md and "0.50 (60%)" in capsys.readouterr().out


def test_main_out_and_errors(results, tmp_path, capsys):
    out_dir = tmp_path / "elsewhere"
    with pytest.warns(UserWarning):
        paths = report.write_report(results, out_dir)
    assert paths["report"] == str(out_dir / "report.md") and paths["depth_heatmaps"].endswith(".png")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert report.main([str(empty), "--out", str(out_dir)]) == 1
    assert report.main([str(tmp_path / "missing.jsonl")]) == 1
    assert "no results rows" in capsys.readouterr().err
