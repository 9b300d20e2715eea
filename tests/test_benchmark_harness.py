"""benchmarks/harness.py: its reference-style pass (the official generate() / likelihood loop on the
same lm-eval requests) runs end to end on a tiny random LLaDA and, with no cache and the LLaDA
schedule, gives our answers exactly."""

from __future__ import annotations

import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import harness  # noqa: E402


def run_harness(ckpt, out, model_args: str) -> dict:
    harness.main(["--pretrained", str(ckpt), "--tasks", "dlmem_demo_gen,dlmem_demo_mc", "--limit", "4",
                  "--batch-sizes", "1,2", "--threads", "1", "--model_args", model_args,
                  "--out", str(out), "--name", "h"])
    with open(os.path.join(out, "h.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("model_args", [
    "",  # preset defaults: one block of 32, one token per step
    "gen_length=16,block_length=8,steps=8",  # two blocks, two tokens per step
])
def test_reference_pass_gives_our_answers_with_no_cache(tiny_ckpts, tmp_path, model_args):
    """Kills: a reference pass that decodes with other settings than the LM's resolved config
    (steps, block length, gen length), cuts answers differently, or scores likelihoods with
    other masks (stratum, seed) than the LM."""
    res = run_harness(tiny_ckpts["llada"], tmp_path, model_args)
    rows = {(r["method"], r["run"], r["batch_size"]): r for r in res["rows"]}
    assert rows[("generate_until", "reference-style", 1)]["requests"] == 4
    for bs in (1, 2):
        gen = rows[("generate_until", "ours", bs)]["agreement"]
        assert (gen["same_answers"], gen["of"], gen["same_tokens"]) == (4, 4, 1.0)
        ll = rows[("loglikelihood", "ours", bs)]["agreement"]
        assert ll["max_abs_delta"] < 1e-4
        assert ll["same_choice"] == ll["documents"] == 4
    assert rows[("loglikelihood", "ours", 1)]["x_reference"] > 0


def test_reference_pass_refuses_what_it_has_no_counterpart_for():
    from lm_eval_dlmem import DecodeConfig
    from lm_eval_dlmem.backbones.spec import DREAM, LLADA, LLADA2, LLADA_MOE

    with pytest.raises(ValueError, match=r"temperature=0.5 .*--no-reference"):
        harness.check_reference_config(DecodeConfig(temperature=0.5))
    harness.check_reference_config(DecodeConfig(strategy="threshold", cache="dual"))  # compared, not refused
    for spec in (DREAM, LLADA2):  # shifted logits / block-causal attention: not LLaDA's generate()
        with pytest.raises(ValueError, match="--no-reference"):
            harness.check_reference_family(spec)
    for spec in (LLADA, LLADA_MOE):
        harness.check_reference_family(spec)
