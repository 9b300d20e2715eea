"""Short contexts (RULER at 256/512 tokens, BABILong at 512) and the log-likelihood variants of the
retrieval tasks (`*_mc`): sizing with a real tokenizer, the registered names, the candidate
answers, and the scores lm-eval computes from them end to end."""

import random
import re

import pytest
from test_tasks_generators import babi_answer
from test_tasks_lm_eval import oracle

from lm_eval_dlmem.embedded import resolve_embedded
from lm_eval_dlmem.tasks import babilong, choices, configs, ruler, tasks_path
from lm_eval_dlmem.tasks import ruler_niah as niah
from lm_eval_dlmem.tasks.common import TokenCounter, load_sizing_tokenizer
from lm_eval_dlmem.tasks.metrics import TASK_LABELS


@pytest.fixture(scope="module")
def tiny_tok():
    """The shipped tiny default's tokenizer: the one the short lengths are made for."""
    return str(resolve_embedded("tiny-llada"))


@pytest.fixture(scope="module")
def count(tiny_tok):
    return TokenCounter(load_sizing_tokenizer(tiny_tok))


def ruler_rows(task, length, tok, count, n=3):
    opts = ruler.Options(tokenizer=tok, num_samples=n, seed=42, essay_source="synthetic", qa_dir=None)
    return ruler.generate(task, length, opts, count)


# ------------------------------------------------------------------------------ short lengths


@pytest.mark.parametrize("length", [256, 512])
@pytest.mark.parametrize("task", ruler.SHORT_TASKS)
def test_ruler_short_samples_fit_their_length(task, length, tiny_tok, count):
    if task not in ruler.tasks_at(str(length)):
        assert ruler.SHORT_MIN_LENGTH[task] > length  # not registered below its smallest haystack
        return
    budget = ruler.tokens_to_generate(task, length)
    assert budget == length // 8
    for row in ruler_rows(task, length, tiny_tok, count):
        total = count(row["input"] + row["gen_prefix"]) + budget
        assert total <= length and total == row["length"], (task, total)
        grain = 80 if niah.NIAH_TASKS[task].haystack == "needle" else 0.1 * length  # whole needles: ~60 tokens each
        assert total >= length - grain, (task, total)  # a haystack, not just the template
        assert all(answer in row["input"] for answer in row["outputs"])


def test_generation_budgets_from_1k_up_are_upstreams():
    for length in (1024, 4096, 32768):
        assert {t: ruler.tokens_to_generate(t, length) for t in ruler.TASKS} == ruler.TOKENS_TO_GENERATE


@pytest.mark.parametrize("task", babilong.TASKS)
def test_babilong_512_fits_and_answers(task, tiny_tok, count):
    rows = [babilong.generate_sample(task, 512, i, 42, count) for i in range(3)]
    for row in rows:
        assert 0.95 * 512 <= count(row["prompt"]) <= 512, (task, count(row["prompt"]))  # within a filler sentence
        if task in ("qa1", "qa2"):
            assert babi_answer(row["input"], row["question"]) == row["target"]


def test_babilong_512_is_generated_and_hub_says_so(tiny_tok):
    rows = babilong.load("qa1", "512", pretrained=tiny_tok, num_samples=2, babilong_source="auto")["test"]
    assert rows[0]["source"] == "generated"
    with pytest.raises(ValueError, match="babilong_length='512'.*babilong_source=generate"):
        babilong.load("qa1", "512", pretrained=tiny_tok, babilong_source="hub")


def test_short_lengths_register_the_needle_tasks_and_their_mc_variants():
    from lm_eval.tasks import TaskManager

    names = set(TaskManager(include_path=tasks_path(), include_defaults=False).all_tasks)
    for length in ("256", "512"):
        short = {f"dlmem_ruler_{t}_{length}" for t in ruler.tasks_at(length)}
        assert set(ruler.tasks_at(length)) == set(niah.NIAH_TASKS) - ({"niah_multikey_3"} if length == "256" else set())
        assert short | {f"{n}_mc" for n in short} | {f"dlmem_ruler_{length}", f"dlmem_ruler_niah_{length}"} <= names
        assert not {f"dlmem_ruler_{t}_{length}" for t in ("vt", "cwe", "fwe", "qa_squad")} & names
        assert f"dlmem_ruler_all_{length}" not in names
    babi = {f"dlmem_babilong_{t}_512" for t in babilong.TASKS}
    assert babi | {f"{n}_mc" for n in babi} | {"dlmem_babilong_512"} <= names
    files = configs.all_files()
    assert "max_gen_toks: 32" in files["ruler/256/dlmem_ruler_niah_single_1_256.yaml"]
    assert "max_gen_toks: 128" in files["ruler/1k/dlmem_ruler_niah_single_1_1k.yaml"]


# ----------------------------------------------------------------------------- candidates


def test_ruler_choices_use_the_haystacks_other_needles(tiny_tok, count):
    for task in ("niah_single_1", "niah_multikey_1", "niah_multivalue"):
        for i, row in enumerate(ruler_rows(task, 512, tiny_tok, count)):
            options, label = choices.ruler_choices(task, row, random.Random(i))
            assert len(set(options)) == choices.NUM_CHOICES
            assert options[label] == " " + ", ".join(row["outputs"]) + "."
            for option in options:
                assert option.startswith(" ") and not option.startswith("  ") and option.endswith(".")
                assert option.count(",") == len(row["outputs"]) - 1
            if task == "niah_multikey_1":  # the three other keys' values, all in the haystack
                assert all(o.strip(" .") in row["input"] for o in options)
            if task == "niah_single_1":  # one needle: the others are fresh 7-digit numbers
                assert all(re.fullmatch(r" \d{7}\.", o) for o in options)
                assert sum(o.strip(" .") in row["input"] for o in options) == 1
    row = ruler_rows("niah_multikey_1", 512, tiny_tok, count, n=1)[0]
    assert choices.ruler_choices("niah_multikey_1", row, random.Random(5)) == \
        choices.ruler_choices("niah_multikey_1", row, random.Random(5))


def test_babilong_choices_prefer_labels_named_in_the_story():
    row = {"task": "qa1", "target": "garden",
           "input": "Mary went to the kitchen. John moved to the office. Mary went to the garden."}
    options, label = choices.babilong_choices(row, random.Random(0))
    assert options[label] == " garden." and len(options) == choices.NUM_CHOICES
    assert {" kitchen.", " office."} <= set(options)  # both named rooms before any unnamed one
    assert set(o.strip(" .") for o in options) <= set(TASK_LABELS["qa1"])


def test_score_reads_the_gold_choice():
    assert choices.score({"label": 2}, [(-3.0, False), (-1.0, False), (-0.5, True), (-9.0, False)]) == \
        {"acc": 1.0, "answer_ll": -0.5}
    assert choices.score({"label": 0}, [(-3.0, False), (-1.0, False)]) == {"acc": 0.0, "answer_ll": -3.0}


def test_load_ruler_rejects_tasks_without_needles(tiny_tok):
    with pytest.raises(ValueError, match="ruler_task='vt'"):
        choices.load_ruler("vt", 256, pretrained=tiny_tok)


# ------------------------------------------------------------------------- through lm-eval


MC_TASKS = ["dlmem_ruler_niah_single_1_256_mc", "dlmem_ruler_niah_multikey_1_256_mc",
            "dlmem_ruler_niah_multivalue_512_mc", "dlmem_babilong_qa1_512_mc"]


def _scripted(right: float, wrong: float):
    """An LM whose log-likelihood is `right` for the answer an oracle reads out of the prompt
    (the continuation exactly as the training data writes answers) and `wrong` otherwise."""
    from lm_eval.api.model import LM

    class Scripted(LM):
        def __init__(self):
            super().__init__()
            self.seen = []

        def loglikelihood(self, requests, disable_tqdm=False):
            self.seen += [r.args for r in requests]
            return [(right if _same(cont, _gold(ctx)) else wrong, False) for ctx, cont in (r.args for r in requests)]

        def generate_until(self, requests, disable_tqdm=False):
            raise NotImplementedError

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            raise NotImplementedError

    return Scripted()


def _same(continuation: str, gold: str) -> bool:
    """Equal up to the order of the values (multi-value needles are asked as a set); the
    leading single space and the final period must match exactly."""
    canon = lambda text: (text[:1], text[1:2] != " ", text.endswith("."), sorted(text.strip(" .").split(", ")))  # noqa: E731
    return canon(continuation) == canon(gold)


def _gold(prompt: str) -> str:
    if "<context>" in prompt:  # BABILong: the bare label, as `training.synthetic` writes it
        story = prompt[prompt.rindex("<context>"):]
        return f" {babi_answer(story, re.search(r'Question: (.+)$', story).group(1))}."
    return oracle(prompt, {})


def _evaluate(lm, tok):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=tasks_path(), include_defaults=False, metadata={"pretrained": tok, "num_samples": 4})
    return simple_evaluate(model=lm, tasks=MC_TASKS, task_manager=tm, limit=4, bootstrap_iters=0)["results"]


def test_mc_tasks_through_lm_eval(tiny_tok):
    lm = _scripted(-0.25, -5.0)
    results = _evaluate(lm, tiny_tok)
    for task in MC_TASKS:
        assert results[task]["acc,none"] == 1.0, task
        assert results[task]["answer_ll,none"] == -0.25, task
    assert len(lm.seen) == 4 * choices.NUM_CHOICES * len(MC_TASKS)
    contexts = {ctx for ctx, _ in lm.seen}
    assert any(c.endswith("mentioned in the provided text is") for c in contexts)
    inverted = _evaluate(_scripted(-5.0, -0.25), tiny_tok)
    for task in MC_TASKS:
        assert inverted[task]["acc,none"] == 0.0 and inverted[task]["answer_ll,none"] == -5.0
