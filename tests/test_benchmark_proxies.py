"""The benchmark proxies (benchmarks/proxies.py) and the full-size script's --dry-run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import proxies  # noqa: E402


def test_llada_8b_proxy_is_the_trained_model_with_llada_8b_proportions(tmp_path):
    from lm_eval_dlmem import load_backbone

    path = proxies.build("llada-8b", str(tmp_path / "proxy"))
    shares = proxies.flop_shares(path)
    assert shares["head_share"] == pytest.approx(0.069, abs=0.005)  # LLaDA-8B: 0.518 / 7.50 B
    trained, proxy = load_backbone("tiny-llada", dtype="float32"), load_backbone(path)
    ids = trained.tokenizer("Mary went to the kitchen.\nQuestion: Where is Mary?\nAnswer:",
                            return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(trained.logits(ids), proxy.logits(ids), atol=1e-4)


def test_moe_proxy_has_the_released_active_fraction(tmp_path):
    shares = proxies.flop_shares(proxies.build("llada-moe", str(tmp_path / "moe")))
    assert shares["head_share"] == pytest.approx(0.23, abs=0.01)
    assert shares["active_ffn"] == 2 * 768  # top-2 of 16: LLaDA-MoE's 8 of 64


def test_fullsize_dry_run_runs_every_step(tmp_path):
    env = {**os.environ, "FULLSIZE_THREADS": "1", "FULLSIZE_LOG": str(tmp_path / "steps.jsonl")}
    done = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "fullsize.py"), "--dry-run",
                           "--root", str(tmp_path / "ckpt")], capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [json.loads(line) for line in open(tmp_path / "steps.jsonl")]
    assert [s["step"].split(",")[0].split(" ")[0] for s in steps] == [
        "write", "load_backbone(dtype=bfloat16)", "forward", "generate", "generate", "generate", "generate",
        "likelihood:", "MemDLM"]
    assert all(s["ok"] for s in steps), [s for s in steps if not s["ok"]]
    assert not os.path.exists(tmp_path / "ckpt" / "tiny-llada_moe")  # deleted after use
