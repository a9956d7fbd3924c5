"""The speed benchmark's plumbing on the CPU at tiny sizes (reference backend, no compilation)."""

import json

import pytest
import torch

from sparsa.bench import speed

SMALL = dict(q_heads=4, kv_heads=2, head_dim=32, device="cpu", backend="reference", check_lengths=(256, 300),
             sparse_check_length=512, reps=3, budget_s=0.01, progress=False)
TIME_FIELDS = ("length", "method", "density", "ms", "ratio_vs_sdpa", "ratio_vs_dense", "mask_ms", "device_name",
               "torch", "date")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("speed") / "rows.jsonl"
    rows = speed.run_speed([256, 300], [0.5, 0.25], out_jsonl=str(path), **SMALL)
    return rows, path


def test_rows_are_well_formed(run):
    rows, _ = run
    checks = [r for r in rows if r["kind"] == "check"]
    timed = [r for r in rows if r["kind"] == "time"]
    assert [c["method"] for c in checks] == ["dense_vs_sdpa", "dense_vs_sdpa", "sparse_vs_reference"]
    assert all(c["passed"] and c["rel_err"] < speed.CHECK_TOL for c in checks)
    # Per length: 3 SDPA backends, sparsa dense, 2 densities.
    assert len(timed) == 2 * (3 + 1 + 2)
    for r in timed:
        assert all(f in r for f in TIME_FIELDS)
        assert r["error"] if r.get("ms") is None else r["ms"] > 0
    sparsa = [r for r in timed if r["method"].startswith("sparsa")]
    assert all(r["ms"] > 0 and r["mask_ms"] > 0 and r["pattern_ms"] > 0 and 0 < r["density"] <= 1 for r in sparsa)
    dense = [r for r in sparsa if r["method"] == "sparsa_dense"]
    assert all(r["ratio_vs_dense"] == 1.0 and r["density"] == 1.0 for r in dense)
    flash = [r for r in timed if r["method"] == "sdpa_flash"]
    if all(r.get("ms") for r in flash):  # the CPU has a flash SDPA kernel; the ratios hang off it
        assert all(r["ratio_vs_sdpa"] == pytest.approx(1.0) for r in flash)
        assert all(r["ratio_vs_sdpa"] > 0 for r in sparsa)


def test_jsonl_has_every_row(run):
    rows, path = run
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == len(rows)
    assert [(r["kind"], r["method"], r["length"]) for r in lines] == [(r["kind"], r["method"], r["length"])
                                                                      for r in rows]
    assert speed.read_jsonl(str(path))[-1]["run_id"] == rows[-1]["run_id"]


def test_table_is_markdown(run):
    rows, _ = run
    table = speed.format_table(rows)
    body = [line for line in table.splitlines() if line.startswith("|")]
    assert len(body) == 2 + sum(r["kind"] == "time" for r in rows)
    assert len({line.count("|") for line in body}) == 1  # every row has the header's columns
    assert "dense_vs_sdpa" in table and "sparsa_sparse" in table
    assert "not measured" in speed.format_summary(rows)  # no 32K-128K rows at this size


def test_main_writes_files_and_fails_on_a_bad_check(tmp_path, monkeypatch, capsys):
    args = ["--device", "cpu", "--backend", "reference", "--lengths", "256", "--densities", "0.5", "--q-heads", "4",
            "--kv-heads", "2", "--head-dim", "32", "--check-lengths", "256", "--sparse-check-length", "256",
            "--sdpa-backends", "flash", "--reps", "3", "--budget", "0.01", "--no-progress"]
    jsonl, md = tmp_path / "out.jsonl", tmp_path / "out.md"
    assert speed.main(args + ["--jsonl", str(jsonl), "--markdown", str(md)]) == 0
    assert "| length |" in md.read_text() and len(jsonl.read_text().splitlines()) == 2 + 1 + 2
    assert speed.main(["--from-jsonl", str(jsonl)]) == 0
    monkeypatch.setattr(speed, "CHECK_TOL", -1.0)  # nothing passes
    assert speed.main(args) == 1
    assert "FAILED" in capsys.readouterr().out


def test_pick_topk_hits_the_density():
    length = 64 * 128
    for target in (0.5, 0.25, 0.1):
        build, topk = speed.sparse_builder(length, target, kv_heads=2, device="cpu")
        assert abs(build().density() - target) < 0.02, (target, topk)


def test_sdpa_call_expands_kv_when_needed():
    q, k, v = torch.randn(1, 4, 64, 16), torch.randn(1, 2, 64, 16), torch.randn(1, 2, 64, 16)
    fn, gqa = speed.sdpa_call(q, k, v, "math")
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                           is_causal=True)
    assert gqa in ("native", "expanded")
    torch.testing.assert_close(fn(), ref)
