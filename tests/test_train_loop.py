"""The training loop runs end to end on the CPU: one process, and data-parallel over two (torchrun, gloo)."""

import json
import os
import subprocess
import sys

import pytest

TINY = {
    "name": "smoke",
    "model": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "num_key_value_heads": 1, "head_dim": 16, "max_position_embeddings": 1024,
              "tie_word_embeddings": True},
    "steps": 3, "max_minutes": 5.0, "tokens_per_step": 2048, "min_len": 512, "max_len": 512,
    "bootstrap_frac": 0.0, "warmup": 1, "workers": 0, "tasks": {"passkey": 1, "niah_single": 1},
}


def _run(tmp_path, launcher):
    config = tmp_path / "smoke.json"
    config.write_text(json.dumps(TINY))
    out = tmp_path / "model"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    cmd = [*launcher, "-m", "sparsa.models.train", "--config", str(config), "--out", str(out), "--device", "cpu",
           "--no-eval"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, json.loads((out / "train_summary.json").read_text())


def test_train_one_process(tmp_path):
    out, summary = _run(tmp_path, [sys.executable])
    assert summary["steps_done"] == 3 and summary["ranks"] == 1
    assert any(out.glob("*.safetensors")) and (out / "tokenizer.json").exists()
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert log and all(row["loss"] == row["loss"] for row in log)  # logged and not NaN


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo over localhost")
def test_train_data_parallel_two_ranks(tmp_path):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517"]
    out, summary = _run(tmp_path, launcher)
    assert summary["ranks"] == 2 and summary["steps_done"] == 3
    # tokens_per_step is the global batch: two ranks made about one step's worth between them
    assert 0.5 * 3 * TINY["tokens_per_step"] <= summary["tokens"] <= 1.1 * 3 * TINY["tokens_per_step"]
