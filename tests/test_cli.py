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
    assert_batch_1_equals_4(model, f"pretrained={tiny_ckpts[MODELS[model]]},mc_num=8,mc_batch_size=8,block_length=8",
                            tmp_path, model)


def assert_batch_1_equals_4(model: str, args: str, tmp_path, label: str) -> None:
    """`lm_eval --model MODEL` on the generate (t_gen) and multiple-choice (t_mc) test tasks at
    batch size 1 and 4: identical logged samples, a results table, an accuracy in [0, 1]."""
    proc = run_lm_eval(model, args, tmp_path / "bs1", 1)
    run_lm_eval(model, args, tmp_path / "bs4", 4)
    assert "t_gen" in proc.stdout and "t_mc" in proc.stdout  # lm-eval's results table
    for task in ("t_gen", "t_mc"):
        one, four = load_samples(tmp_path / "bs1", task), load_samples(tmp_path / "bs4", task)
        assert len(one) == 6
        assert one == four, f"{label} {task}: batch size changed the outputs"
    res = load_results(tmp_path / "bs1")
    assert 0.0 <= res["t_mc"]["acc,none"] <= 1.0


def test_registered_names_resolve_in_lm_eval_process():
    code = ("import sys; sys.argv=['lm_eval']; import lm_eval_dlmem._autoload as a; a._autoload();"
            "from lm_eval.api.registry import get_model;"
            "print([get_model(n).__name__ for n in ('metastate-llada','metastate-dream','memdlm-llada-moe','memdlm-llada2','hf','dummy')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "['MetaStateLLaDA', 'MetaStateDream', 'MemDLMLLaDAMoE', 'MemDLMLLaDA2', 'HFLM', 'DummyLM']" in out.stdout


# memdlm-llada2 on a tiny LLaDA2.x checkpoint: each variant's model args on top of the common ones,
# as a string or a callable (checkpoint, tmp_path) -> string, so the MemDLM variant is one more
# entry, e.g. "memdlm": lambda ckpt, tmp: f"adapter={train_adapter(ckpt, tmp)},inner_steps=2"
def _memdlm_adapter(ckpt, tmp_path) -> str:
    """An outer LoRA trained by `lm-eval-dlmem train memdlm` (two steps on toy pairs) on `ckpt`,
    evaluated with two inner steps: the issue's `adapter=...,inner_steps=2` run."""
    from lm_eval_dlmem.training import memdlm
    from lm_eval_dlmem.training.data import toy_pairs

    data = tmp_path / "toy.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": p, "response": r}) for p, r in toy_pairs(16, seed=0)) + "\n")
    out = tmp_path / "adapter"
    argv = ["--backbone", ckpt, "--data", str(data), "--output-dir", str(out), "--batch-size", "2", "--max-length", "96",
            "--lr", "1e-3", "--max-steps", "2", "--eval-batches", "1", "--eval-every", "100", "--eval-fraction", "0.1"]
    assert memdlm.main(argv) == 0
    return f"adapter={out},inner_steps=2"


LLADA2_VARIANTS = {"frozen": "", "llada21": "strategy=llada21", "adapter_inner": _memdlm_adapter}


@pytest.fixture(scope="module")
def llada2_ckpt(tmp_path_factory):
    from lm_eval_dlmem.testing import make_tiny_checkpoint

    return make_tiny_checkpoint("llada2", tmp_path_factory.mktemp("cli-llada2") / "llada2", seed=5,
                                initializer_range=0.25)


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(LLADA2_VARIANTS))
def test_cli_memdlm_llada2_batch_size_invariance(variant, llada2_ckpt, tmp_path):
    """generate_until (block-diffusion sampler, several blocks of 4 from each prompt's start) and
    multiple choice (block-wise likelihood) through `lm_eval --model memdlm-llada2`: batch 1 == 4."""
    extra = LLADA2_VARIANTS[variant]
    extra = extra(llada2_ckpt, tmp_path) if callable(extra) else extra
    args = ",".join(a for a in (f"pretrained={llada2_ckpt},mc_num=4,mc_batch_size=4,block_length=4", extra) if a)
    assert_batch_1_equals_4("memdlm-llada2", args, tmp_path, f"memdlm-llada2 {variant}")
