"""Inputs that used to be accepted silently and give wrong numbers: sampled repeats that collapse
to one sample, a tokenizer or weights that do not fit the checkpoint, an adapter whose keys do
not match, and a resume state that runs code. Each case now differs, or stops with one message
naming what is wrong and the fix."""

import json
import os
import shutil

import pytest
import torch
from _harness_runs import TESTS_DIR, lm_eval_runner, responses
from safetensors.torch import load_file, save_file


@pytest.fixture
def quick_lm_eval(monkeypatch):
    yield from lm_eval_runner(monkeypatch)


def make_lm(ckpt, cls_name="MetaStateLLaDA", **args):
    from lm_eval_dlmem import harness

    return getattr(harness, cls_name)(pretrained=ckpt, device="cpu", **args)


def repeats_task(tmp_path, do_sample: bool):
    """A copy of the t_gen test task with `repeats: 4`, sampled or greedy."""
    root = tmp_path / ("sampled" if do_sample else "greedy")
    root.mkdir()
    shutil.copy(TESTS_DIR / "tasks" / "utils.py", root / "utils.py")
    sampling = "do_sample: true\n  temperature: 1.0" if do_sample else "do_sample: false"
    (root / "t_rep.yaml").write_text(
        "task: t_rep\ndataset_path: ''\ncustom_dataset: !function utils.load\ntest_split: test\n"
        "output_type: generate_until\nrepeats: 4\n"
        "doc_to_text: \"{{context}}\\nQuestion: {{question}}\\nAnswer:\"\ndoc_to_target: \"{{answer}}\"\n"
        f"generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 8\n  {sampling}\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
        "metadata:\n  version: 1.0\n"
    )
    return str(root)


# ---- 1. repeats with sampling ---------------------------------------------------------------
def test_sampled_repeats_differ_and_are_reproducible(tiny_ckpts, quick_lm_eval, tmp_path):
    """lm-eval passes a `repeats: 4` request four times; each copy must get its own seed
    (pass@k and majority vote need four samples, not one sample four times)."""
    tasks = repeats_task(tmp_path, do_sample=True)
    run = lambda bs: responses(quick_lm_eval(ckpt=tiny_ckpts["llada"], tasks=["t_rep"], include_paths=(tasks,),
                                             batch_size=bs, log_samples=True), "t_rep")
    first = run(4)
    assert all(len(doc) == 1 and len(doc[0]) == 4 for doc in first)  # one request, four answers
    distinct = [len(set(doc[0])) for doc in first]
    assert min(distinct) > 1, f"repeats collapsed to identical samples: {first}"
    assert run(3) == first  # same seeds again, whatever the batch size


def test_greedy_repeats_keep_the_single_request_answer(tiny_ckpts, quick_lm_eval, tmp_path):
    """Greedy decoding: every repeat is the answer the task gives without repeats."""
    tasks = repeats_task(tmp_path, do_sample=False)
    rep = responses(quick_lm_eval(ckpt=tiny_ckpts["llada"], tasks=["t_rep"], include_paths=(tasks,),
                                  log_samples=True), "t_rep")
    single = responses(quick_lm_eval(ckpt=tiny_ckpts["llada"], log_samples=True), "t_gen")
    assert [doc[0] for doc in rep] == [s[0] * 4 for s in single]


def test_repeat_zero_keeps_the_content_seed(tiny_ckpts):
    """Seeds of requests that are not repeated are what they were (cached and published runs
    stay comparable); only copies 1..K-1 get new ones."""
    from lm_eval.api.instance import Instance

    from lm_eval_dlmem.harness import repeat_indices

    lm = make_lm(tiny_ckpts["llada"])
    gk = {"until": ["\n"], "max_gen_toks": 8}
    assert lm.request_seed("ctx", gk, repeat=0) == lm.request_seed("ctx", gk)
    assert len({lm.request_seed("ctx", gk, repeat=k) for k in range(4)}) == 4
    a = Instance("generate_until", doc={}, arguments=("p", gk), idx=0, metadata=("t", 0, 3))
    b = Instance("generate_until", doc={}, arguments=("p", gk), idx=0, metadata=("t", 1, 3))  # same prompt, other doc
    assert repeat_indices([a, a, a, b, b, b]) == [0, 1, 2, 0, 1, 2]
