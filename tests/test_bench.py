"""`sparsa bench` on the bundled ref-tiny: a CI-sized run, resume after a crash, and Ray."""

import json

import pytest

from sparsa.bench import runner

SMALL = dict(model="ref-tiny", methods=["dense", "streaming:window=64"], tasks=["passkey", "niah_single"],
             lengths=[512, 1024], depths=None, n=2, seed=0, device="cpu", batch_size=2, progress=False)


def test_ci_sized_run(tmp_path):
    out = tmp_path / "bench.jsonl"
    rows = runner.run_bench(out=out, **SMALL)
    assert len(rows) == 2 * 2 * 2
    by = {(r["method"], r["task"], r["length"]): r for r in rows}
    for (method, task, length), r in by.items():
        dense = by[("dense", task, length)]
        assert r["dense_score"] == dense["score"]
        assert 0.0 <= r["score"] <= 1.0 and r["seconds"] > 0 and r["tokens"] <= length
        if method == "dense":
            assert r["density"] == 1.0 and r["retention"] in (1.0, None)
        else:
            assert 0.0 < r["density"] < 1.0  # a 64-token window really skips work at 512+ tokens
            assert r["fallbacks"] == 0
    # The bundled model retrieves at these lengths with dense attention.
    assert by[("dense", "passkey", 1024)]["score"] == 1.0
    # ... and the instrument can fail: a 64-token window cannot see the needle, and as the prompt ends where the
    # answer starts, the sparse prefill (not a dense decode step) must produce the answer's first token. With the
    # space left to the model, this window kept every needle of the default run (session 5).
    lost = [by[("streaming:window=64", t, 1024)]["score"] for t in ("passkey", "niah_single")]
    assert sum(lost) < 1.0, lost


def test_resume_after_crash(tmp_path, monkeypatch):
    out = tmp_path / "bench.jsonl"
    real = runner.evaluate_cell
    calls = {"n": 0}

    def crashing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "evaluate_cell", crashing)
    with pytest.raises(KeyboardInterrupt):
        runner.run_bench(out=out, **SMALL)
    assert len(out.read_text().splitlines()) == 3
    with out.open("a") as f:
        f.write('{"run": "bench", "cut by the crash')  # a half-written line
    monkeypatch.setattr(runner, "evaluate_cell", lambda *a, **k: calls.__setitem__("n", calls["n"] + 1) or real(*a, **k))
    calls["n"] = 0
    rows = runner.run_bench(out=out, **SMALL)
    assert calls["n"] == 8 - 3  # only the missing cells ran
    assert len(rows) == 8 and len({r["key"] for r in rows}) == 8


def test_method_spec_errors():
    with pytest.raises(ValueError, match="allowed values"):
        runner.parse_method("nope")
    with pytest.raises(ValueError, match="windw"):
        runner.parse_method("streaming:windw=3")
    spec = runner.parse_method("a_shape:n_init=64,n_local=448")
    assert spec.name == "a_shape" and spec.params == {"n_init": 64, "n_local": 448}
    with pytest.raises(ValueError, match="bundled"):
        runner.resolve_model("no-such-model")


def test_ray_local(tmp_path):
    ray = pytest.importorskip("ray")
    out = tmp_path / "bench.jsonl"
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
        args = dict(SMALL, tasks=["passkey"], lengths=[512])
        rows = runner.run_bench(out=out, ray_address=None, **args)
    finally:
        ray.shutdown()
    assert len(rows) == 2
    local = runner.run_bench(out=tmp_path / "local.jsonl", **dict(SMALL, tasks=["passkey"], lengths=[512]))
    assert sorted((r["method"], r["score"], r["density"]) for r in rows) == \
        sorted((r["method"], r["score"], r["density"]) for r in local)
    assert all(json.loads(line)["key"] for line in out.read_text().splitlines())


def test_cell_keys_follow_method_defaults_and_checkpoint(tmp_path):
    """Results are resumed only for the same method configuration and the same checkpoint: a changed default,
    or a retrained model saved under the same name, gets new keys instead of the old rows."""
    import shutil

    from sparsa.bench import runner
    from sparsa.prefill.hip import HiP

    cell = lambda spec: runner.Cell("vt", 4096, None, spec)  # noqa: E731
    spec = runner.parse_method("hip")
    before = cell(spec).key("m", 4, 0)
    assert cell(runner.parse_method("hip")).key("m", 4, 0) == before  # stable
    # the config holds the defaults too; a new default (same label, same params) is a new configuration
    assert f'"mask_k": {HiP().mask_k}' in spec.config and '"scoring"' in spec.config
    changed = runner.MethodSpec("hip", "hip", {}, runner.method_config(HiP(mask_k=HiP().mask_k * 2)))
    assert cell(changed).key("m", 4, 0) != before

    model = tmp_path / "ref-tiny"
    shutil.copytree(runner.resolve_model("ref-tiny"), model)
    first = runner.model_fingerprint(model)
    assert runner.model_fingerprint(model) == first
    weights = next(model.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte of the weights
    weights.write_bytes(bytes(data))
    assert runner.model_fingerprint(model) != first
