"""Our tasks end to end in lm-eval, offline: through `simple_evaluate` with an oracle model that
reads the answers out of the prompts (every task scores 100, a wrong model 0), and through the
real `lm_eval` CLI with the `metastate-llada` model on a tiny checkpoint."""

import glob
import json
import os
import re
import subprocess

import pytest
from conftest import TESTS_DIR
from test_tasks_generators import babi_answer

from lm_eval_dlmem.tasks import tasks_path

LB_DIR = os.path.join(TESTS_DIR, "fixtures", "longbench")
QA_DIR = os.path.join(TESTS_DIR, "fixtures", "ruler_qa")


def _lookup_answers():
    answers = {}
    with open(os.path.join(LB_DIR, "hotpotqa.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            answers[row["input"]] = row["answers"][0]
    for article in json.load(open(os.path.join(QA_DIR, "squad.json")))["data"]:
        for p in article["paragraphs"]:
            answers.update({qa["question"]: qa["answers"][0]["text"] for qa in p["qas"] if qa["answers"]})
    return answers


def oracle(prompt: str, answers: dict) -> str:
    """The right answer to one of our prompts, found in the prompt itself."""
    if "special magic" in prompt:
        needles = re.findall(r"One of the special magic \w+ for (.+?) is: (\S+)\.", prompt)
        keys = re.search(r"The special magic \w+ for (.+) mentioned in the provided text (?:is|are)$", prompt).group(1)
        wanted = re.split(r", and |, ", keys)
        return " " + ", ".join(v for k, v in needles if k in wanted) + "."
    if "<context>" in prompt:
        story = prompt[prompt.rindex("<context>"):]
        question = re.search(r"Question: (.+)$", story).group(1)
        return f" The most recent location is {babi_answer(story, question)}."
    question = re.search(r"Question: (.+?)\n?(?:Answer:)?$", prompt).group(1)
    return " " + answers[question.strip()]


def make_lm(answer_fn):
    from lm_eval.api.model import LM

    class ScriptedLM(LM):
        """Answers generate_until requests with `answer_fn(prompt)`, recording the requests."""

        def __init__(self):
            super().__init__()
            self.seen = []

        def generate_until(self, requests, disable_tqdm=False):
            self.seen += [r.args for r in requests]
            return [answer_fn(r.args[0]) for r in requests]

        def loglikelihood(self, requests, disable_tqdm=False):
            raise NotImplementedError

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            raise NotImplementedError

    return ScriptedLM()


TASKS = ["dlmem_ruler_niah_1k", "dlmem_ruler_qa_squad_1k", "dlmem_babilong_qa1_1k", "dlmem_babilong_qa2_2k",
         "dlmem_longbench_hotpotqa"]


def evaluate(lm, tiny_ckpts):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    meta = {"pretrained": str(tiny_ckpts["llada"]), "num_samples": 3, "ruler_qa_dir": QA_DIR,
            "longbench_data_dir": LB_DIR, "babilong_source": "generate"}
    tm = TaskManager(include_path=tasks_path(), include_defaults=False, metadata=meta)
    return simple_evaluate(model=lm, tasks=TASKS, task_manager=tm, limit=3, bootstrap_iters=0)["results"]


def test_oracle_scores_100_and_wrong_answers_0(tiny_ckpts):
    answers = _lookup_answers()
    lm = make_lm(lambda prompt: oracle(prompt, answers))
    results = evaluate(lm, tiny_ckpts)
    niah = [t for t in results if t.startswith("dlmem_ruler_niah_") and t != "dlmem_ruler_niah_1k"]
    assert len(niah) == 8
    for task in niah + ["dlmem_ruler_qa_squad_1k", "dlmem_babilong_qa1_1k", "dlmem_babilong_qa2_2k",
                        "dlmem_longbench_hotpotqa"]:
        assert results[task]["score,none"] == 100.0, task
    assert results["dlmem_ruler_niah_1k"]["score,none"] == 100.0  # the group average
    assert results["dlmem_ruler_niah_multivalue_1k"]["string_match_all,none"] == 100.0
    assert results["dlmem_ruler_qa_squad_1k"]["string_match_part,none"] == 100.0
    budgets = {args[1]["max_gen_toks"] for args in lm.seen}
    assert budgets == {128, 32, 20}  # niah, qa / hotpotqa, babilong
    ruler_prompts = [a[0] for a in lm.seen if "special magic" in a[0]]
    assert all(p.endswith("mentioned in the provided text is") or p.endswith("are") for p in ruler_prompts)

    wrong = evaluate(make_lm(lambda prompt: " I do not know."), tiny_ckpts)
    assert all(wrong[t]["score,none"] == 0.0 for t in niah + ["dlmem_babilong_qa1_1k", "dlmem_longbench_hotpotqa"])


@pytest.mark.slow
def test_lm_eval_cli_offline_with_tiny_checkpoint(tiny_ckpts, tmp_path):
    """`lm_eval --model metastate-llada ... --include_path $(lm-eval-dlmem tasks-path)` on one
    RULER, one BABILong and one LongBench task, with no network."""
    tasks = "dlmem_ruler_niah_single_1_1k,dlmem_babilong_qa1_1k,dlmem_longbench_hotpotqa"
    meta = json.dumps({"num_samples": 2, "babilong_source": "generate", "longbench_data_dir": LB_DIR})
    path = subprocess.run(["lm-eval-dlmem", "tasks-path"], capture_output=True, text=True, check=True).stdout.strip()
    assert path == tasks_path()
    cmd = ["lm_eval", "--model", "metastate-llada", "--model_args", f"pretrained={tiny_ckpts['llada']},steps=4",
           "--device", "cpu", "--include_path", path, "--tasks", tasks, "--limit", "2", "--metadata", meta,
           "--output_path", str(tmp_path), "--log_samples"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result_file,) = glob.glob(os.path.join(str(tmp_path), "**", "results_*.json"), recursive=True)
    results = json.load(open(result_file))["results"]
    for task in tasks.split(","):
        assert 0.0 <= results[task]["score,none"] <= 100.0
    (samples,) = glob.glob(os.path.join(str(tmp_path), "**", "samples_dlmem_ruler_*.jsonl"), recursive=True)
    first = json.loads(open(samples).readline())
    assert first["arguments"]["gen_args_0"]["arg_0"].endswith("mentioned in the provided text is")
