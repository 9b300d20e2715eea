"""End to end through the real `lm_eval` CLI: each registered model on a generate_until and a
multiple-choice task (tests/tasks), at batch size 1 and 4, which must agree exactly."""

import glob
import json
import os
import subprocess
import sys

import pytest

from conftest import TESTS_DIR

MODELS = {"metastate-llada": "llada", "metastate-dream": "dream", "memdlm-llada-moe": "llada_moe"}


def run_lm_eval(model, model_args, out_dir, batch_size, tasks="t_gen,t_mc", extra=()):
    cmd = [
        "lm_eval", "--model", model, "--model_args", model_args,
        "--include_path", os.path.join(TESTS_DIR, "tasks"), "--tasks", tasks,
        "--batch_size", str(batch_size), "--device", "cpu",
        "--output_path", str(out_dir), "--log_samples", *extra,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def load_samples(out_dir, task):
    (path,) = glob.glob(os.path.join(str(out_dir), "**", f"samples_{task}_*.jsonl"), recursive=True)
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    return {r["doc_id"]: r["resps"] for r in sorted(rows, key=lambda r: r["doc_id"])}


def load_results(out_dir):
    (path,) = glob.glob(os.path.join(str(out_dir), "**", "results_*.json"), recursive=True)
    with open(path) as f:
        return json.load(f)["results"]


@pytest.mark.slow
@pytest.mark.parametrize("model", sorted(MODELS))
def test_cli_batch_size_invariance(model, tiny_ckpts, tmp_path):
    args = f"pretrained={tiny_ckpts[MODELS[model]]},mc_num=8,mc_batch_size=8,block_length=8"
    proc = run_lm_eval(model, args, tmp_path / "bs1", 1)
    run_lm_eval(model, args, tmp_path / "bs4", 4)
    assert "t_gen" in proc.stdout and "t_mc" in proc.stdout  # lm-eval's results table
    for task in ("t_gen", "t_mc"):
        one, four = load_samples(tmp_path / "bs1", task), load_samples(tmp_path / "bs4", task)
        assert len(one) == 6
        assert one == four, f"{model} {task}: batch size changed the outputs"
    res = load_results(tmp_path / "bs1")
    assert 0.0 <= res["t_mc"]["acc,none"] <= 1.0


def test_registered_names_resolve_in_lm_eval_process():
    code = ("import sys; sys.argv=['lm_eval']; import lm_eval_dlmem._autoload as a; a._autoload();"
            "from lm_eval.api.registry import get_model;"
            "print([get_model(n).__name__ for n in ('metastate-llada','metastate-dream','memdlm-llada-moe','memdlm-llada2','hf','dummy')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "['MetaStateLLaDA', 'MetaStateDream', 'MemDLMLLaDAMoE', 'MemDLMLLaDA2', 'HFLM', 'DummyLM']" in out.stdout
