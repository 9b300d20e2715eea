"""Task data: RULER and BABILong generators (deterministic, within 2% of the target length in the
model's tokens, answers recoverable from the text), LongBench loading and middle truncation, the
YAML configs, and the error messages for missing data or tokenizer."""

import os
import random
import re

import pytest
from conftest import TESTS_DIR

from lm_eval_dlmem.tasks import babilong, configs, longbench, ruler, tasks_path
from lm_eval_dlmem.tasks.common import TaskDataError, TokenCounter, load_sizing_tokenizer
from lm_eval_dlmem.tasks.metrics import TASK_LABELS

FIXTURES = os.path.join(TESTS_DIR, "fixtures")


@pytest.fixture(scope="module")
def tok_path(tiny_ckpts):
    return str(tiny_ckpts["llada"])


@pytest.fixture(scope="module")
def count(tok_path):
    return TokenCounter(load_sizing_tokenizer(tok_path))


def ruler_rows(task, length, tok_path, count, seed=42, n=3, **extra):
    opts = ruler.Options(tokenizer=tok_path, num_samples=n, seed=seed, essay_source=extra.get("essay", "synthetic"),
                         qa_dir=extra.get("qa_dir"))
    return ruler.generate(task, length, opts, count)


# ------------------------------------------------------------------------------------- configs


def test_tasks_path_is_the_checkout_tasks_dir():
    path = tasks_path()
    assert os.path.isfile(os.path.join(path, "ruler", "4k", "dlmem_ruler_vt_4k.yaml"))
    assert os.path.isfile(os.path.join(path, "longbench", "_longbench_common_yaml"))


def test_committed_yamls_match_the_tables():
    assert configs.stale(tasks_path()) == [], "run: python -m lm_eval_dlmem.tasks.configs"


def test_lm_eval_indexes_every_task_and_group():
    from lm_eval.tasks import TaskManager

    names = set(TaskManager(include_path=tasks_path(), include_defaults=False).all_tasks)
    for length in ruler.LENGTHS:
        assert {f"dlmem_ruler_{t}_{length}" for t in ruler.tasks_at(length)} | {f"dlmem_ruler_{length}"} <= names
        assert (f"dlmem_ruler_all_{length}" in names) == (ruler.LENGTHS[length] >= 1024)  # 256/512: needles only
    for length in babilong.LENGTHS:
        assert {f"dlmem_babilong_{t}_{length}" for t in babilong.TASKS} | {f"dlmem_babilong_{length}"} <= names
    assert {f"dlmem_longbench_{t}" for t in longbench.TASKS} <= names
    assert {f"dlmem_longbench_{t}_e" for t, cfg in longbench.TASKS.items() if cfg.in_e} <= names
    assert {"dlmem_longbench", "dlmem_longbench_chat", "dlmem_longbench_nochat", "dlmem_longbench_e",
            "dlmem_memdlm_table1", "dlmem_memdlm_table2", "dlmem_memdlm_table3"} <= names


# --------------------------------------------------------------------------------------- RULER

SYNTHETIC = [t for t in ruler.TASKS if not t.startswith("qa_")]


# Haystacks of whole needles (~40-70 tiny-tokenizer tokens each) need 4k for a 2% grain; CWE's
# long-context variant (10 words x 30 + an example) needs more than 4k tiny-tokenizer tokens.
RULER_TEST_LENGTH = {"niah_multikey_2": 4096, "niah_multikey_3": 4096, "cwe": 8192}


@pytest.mark.parametrize("task", SYNTHETIC)
def test_ruler_lengths_within_2_percent_of_target(task, tok_path, count):
    length = RULER_TEST_LENGTH.get(task, 2048)
    rows = ruler_rows(task, length, tok_path, count)
    assert len(rows) == 3
    for row in rows:
        total = count(row["input"] + row["gen_prefix"]) + ruler.TOKENS_TO_GENERATE[task]
        assert 0.98 * length <= total <= length, (task, total)
        assert total == row["length"]
        for answer in row["outputs"]:
            assert answer in row["input"], (task, answer)  # every answer is recoverable from the text


@pytest.mark.parametrize("task", ["niah_multikey_1", "niah_multikey_3", "vt", "cwe", "fwe"])
def test_ruler_deterministic_for_a_seed(task, tok_path, count):
    first = ruler_rows(task, 2048, tok_path, count, n=2)
    random.seed(12345)  # the generators must not depend on the global RNG
    assert ruler_rows(task, 2048, tok_path, count, n=2) == first
    other = ruler_rows(task, 2048, tok_path, count, seed=7, n=2)
    assert [r["input"] for r in other] != [r["input"] for r in first]


def test_ruler_niah_templates_and_haystacks(tok_path, count):
    single = ruler_rows("niah_single_1", 1024, tok_path, count, n=1)[0]
    assert single["input"].startswith("A special magic number is hidden within the following text.")
    assert single["gen_prefix"].endswith("mentioned in the provided text is")
    assert single["input"].count("The grass is green.") > 3 and single["haystack"] == "noise"
    multi_value = ruler_rows("niah_multivalue", 2048, tok_path, count, n=1)[0]
    assert multi_value["gen_prefix"].startswith(" The special magic numbers for ")
    assert multi_value["gen_prefix"].endswith(" are") and len(multi_value["outputs"]) == 4
    query = ruler_rows("niah_multiquery", 2048, tok_path, count, n=1)[0]
    assert re.search(r"for \S+, \S+, \S+, and \S+ mentioned in the provided text are$", query["gen_prefix"])
    uuids = ruler_rows("niah_multikey_3", 2048, tok_path, count, n=1)[0]
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", uuids["outputs"][0])
    assert uuids["input"].count("One of the special magic uuids for") > 5 and uuids["haystack"] == "needle"


def test_ruler_essay_source_from_a_directory(tmp_path, tok_path, count):
    (tmp_path / "b.txt").write_text("Second essay. It has two sentences.\n")
    (tmp_path / "a.txt").write_text("First essay begins here. " * 40)
    row = ruler_rows("niah_single_2", 1024, tok_path, count, n=1, essay=str(tmp_path))[0]
    assert row["haystack"] == f"essay:file:{tmp_path}"
    assert "First essay begins here." in row["input"] and "Second essay." in row["input"]
    synthetic = ruler_rows("niah_single_2", 1024, tok_path, count, n=1)[0]
    assert synthetic["haystack"] == "essay:synthetic" and "First essay" not in synthetic["input"]


def test_ruler_qa_from_local_files(tok_path, count):
    qa_dir = os.path.join(FIXTURES, "ruler_qa")
    rows = ruler_rows("qa_squad", 1024, tok_path, count, n=4, qa_dir=qa_dir)
    # the fixture has 6 answerable questions (the unanswerable ones are dropped), in file order
    assert [r["outputs"][0] for r in rows[:2]] == ["Edith Crane", "Ardent Valley"]
    assert rows[1]["outputs"] == ["Ardent Valley", "in Ardent Valley"]
    for row in rows:
        assert row["gen_prefix"] == " Answer:" and "Document 1:\n" in row["input"]
        assert row["length"] <= 1024 and row["outputs"][0] in row["input"]
    hotpot = ruler_rows("qa_hotpot", 1024, tok_path, count, n=2, qa_dir=qa_dir)
    assert hotpot[0]["outputs"] == ["1871"] and "Marlow Creek\nMarlow Creek is a town" in hotpot[0]["input"]


def test_ruler_errors_name_the_fix(tok_path, tmp_path):
    with pytest.raises(TaskDataError, match="pretrained="):
        ruler.load("vt", "1k", num_samples=1)  # no tokenizer anywhere
    with pytest.raises(TaskDataError, match="ruler_qa_dir"):
        ruler.load("qa_squad", "1k", pretrained=tok_path, num_samples=1)  # hub switched off
    with pytest.raises(TaskDataError, match="has no hotpotqa.json"):
        ruler.load("qa_hotpot", "1k", pretrained=tok_path, num_samples=1, ruler_qa_dir=str(tmp_path))
    with pytest.raises(ValueError, match="ruler_task="):
        ruler.load("niah", "1k", pretrained=tok_path)


def test_template_tokens_are_left_free(tok_path, count):
    opts = ruler.Options(tokenizer=tok_path, num_samples=2, seed=42, essay_source="synthetic", qa_dir=None,
                         template_tokens=200)
    for row in ruler.generate("vt", 2048, opts, count):
        assert 0.98 * (2048 - 200) <= row["length"] <= 2048 - 200
    row = babilong.generate_sample("qa1", 2000, 0, 42, count, reserve=200)
    assert 0.98 * 1800 <= count(row["prompt"]) <= 1800


def test_ruler_load_is_cached_and_reads_metadata(tok_path):
    meta = dict(pretrained=tok_path, num_samples=2, data_seed=3, batch_size=8, metastate="none")
    first = ruler.load("niah_single_1", "1k", **meta)["test"]
    assert len(first) == 2 and ruler.load("niah_single_1", 1024, **meta)["test"]["input"] == first["input"]


# ------------------------------------------------------------------------------------ BABILong

MOVE = r"(\w+) (?:moved|went back|went|travelled|journeyed) to the (\w+)\."


def babi_answer(facts: str, question: str) -> str:
    """An independent reading of a qa1/qa2 story: the person's or the object's last room."""
    events = re.findall(r"(\w+) (?:moved|went back|went|travelled|journeyed) to the (\w+)\."
                        r"|(\w+) (?:got|grabbed|picked up|took) the (\w+) there\."
                        r"|(\w+) (?:dropped|discarded|put down|left) the (\w+)\.", facts)
    where, holder, lying = {}, {}, {}
    for mover, room, taker, obj, dropper, dropped in events:
        if mover:
            where[mover] = room
        elif taker:
            holder[obj] = taker
        elif dropper:
            lying[dropped] = where[holder.pop(dropped)]
    asked = re.match(r"Where is (?:the )?(\w+)\?", question).group(1)
    if asked in where:
        return where[asked]
    return where[holder[asked]] if asked in holder else lying[asked]


@pytest.mark.parametrize("task", babilong.TASKS)
def test_babilong_generated_length_and_answers(task, tok_path, count):
    rows = [babilong.generate_sample(task, 2000, i, 42, count) for i in range(3)]
    for row in rows:
        assert 0.98 * 2000 <= count(row["prompt"]) <= 2000, (task, count(row["prompt"]))
        assert row["target"] in TASK_LABELS[task] and row["source"] == "generated"
        assert row["prompt"].endswith(f"</context>\n\nQuestion: {row['question']}")
        assert row["prompt"].startswith(babilong.PROMPTS[task].instruction)
        if task in ("qa1", "qa2"):
            assert babi_answer(row["input"], row["question"]) == row["target"]
    assert [babilong.generate_sample(task, 2000, i, 42, count) for i in range(3)] == rows


def test_babilong_stories_are_consistent():
    from lm_eval_dlmem.tasks.babi import make_story

    for i in range(200):
        for task in ("qa1", "qa2"):
            story = make_story(task, random.Random(f"{task}-{i}"))
            assert babi_answer(" ".join(story.facts), story.question) == story.answer
        qa4 = make_story("qa4", random.Random(i))
        assert len(qa4.facts) == 2 and qa4.answer in TASK_LABELS["qa4"] and qa4.answer not in qa4.question
        qa5 = make_story("qa5", random.Random(i))
        assert qa5.answer in TASK_LABELS["qa5"] and re.search(r" (gave|handed|passed) the ", " ".join(qa5.facts))


def test_babilong_0k_is_facts_only_and_sources(tok_path):
    rows = babilong.load("qa1", "0k", pretrained=tok_path, num_samples=2)["test"]  # auto: hub off -> generate
    assert rows[0]["source"] == "generated" and re.fullmatch(rf"({MOVE} ?)+", rows[0]["input"])
    with pytest.raises(TaskDataError, match="babilong_source=generate"):
        babilong.load("qa1", "1k", pretrained=tok_path, babilong_source="hub")
    with pytest.raises(ValueError, match="babilong_length="):
        babilong.load("qa1", "3k", pretrained=tok_path)


# ----------------------------------------------------------------------------------- LongBench

LB_DIR = os.path.join(FIXTURES, "longbench")


def test_longbench_fixture_loading_and_prompt(monkeypatch):
    rows = longbench.load("hotpotqa", longbench_data_dir=LB_DIR)["test"]
    assert len(rows) == 3 and rows[0]["target"] == "Edith Crane"
    assert rows[0]["prompt"].startswith("Answer the question based on the given passages.")
    assert rows[0]["prompt"].endswith("Question: Who founded the town that built the copper mill?\nAnswer:")
    monkeypatch.setenv("LM_EVAL_DLMEM_LONGBENCH_DIR", LB_DIR)
    assert longbench.load("trec")["test"][0]["all_classes"][0] == "Description"
    assert longbench.load("hotpotqa_e")["test"]["length"] == [1200, 5100, 9800]


def test_longbench_middle_truncation(tok_path, count):
    full = longbench.load("hotpotqa", longbench_data_dir=LB_DIR)["test"][0]["prompt"]
    meta = dict(longbench_data_dir=LB_DIR, max_length=332, pretrained=tok_path)
    cut = longbench.load("hotpotqa", **meta)["test"][0]["prompt"]
    limit = 332 - longbench.TASKS["hotpotqa"].max_gen
    assert count(full) > limit >= count(cut) - 2  # decode/encode may merge a token at the cut
    head, tail = full[:60], full[-80:]
    assert cut.startswith(head) and cut.endswith(tail) and len(cut) < len(full)  # instructions kept
    assert longbench.truncate_middle("short", 100, count) == "short"


def test_longbench_errors(tmp_path):
    with pytest.raises(TaskDataError, match="longbench_data_dir"):
        longbench.load("lcc")  # hub switched off, no directory
    with pytest.raises(TaskDataError, match="has no qmsum.jsonl"):
        longbench.load("qmsum", longbench_data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="LongBench-E"):
        longbench.load("lsht_e", longbench_data_dir=LB_DIR)  # lsht is not in LongBench-E
    with pytest.raises(TaskDataError, match="pretrained="):
        longbench.load("hotpotqa", longbench_data_dir=LB_DIR, max_length=1000)  # truncation needs a tokenizer


# ------------------------------------------------------------------ hub code paths, with fakes


@pytest.fixture
def fake_hub(monkeypatch):
    """The hub switched on, `datasets.load_dataset` answering from `tables` instead of the network."""
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    tables = {}
    monkeypatch.setattr(datasets, "load_dataset", lambda path, name=None, split=None: tables[(path, name, split)])
    yield tables
    from lm_eval_dlmem.tasks import ruler_qa

    for cached in (babilong._from_hub, longbench._raw_rows, ruler_qa.load_qa):
        cached.cache_clear()


def test_hub_rows_are_read_like_local_files(fake_hub, tok_path):
    import json

    from lm_eval_dlmem.tasks import ruler_qa

    squad = json.load(open(os.path.join(FIXTURES, "ruler_qa", "squad.json")))
    fake_hub[(ruler_qa.SQUAD_REPO, None, "validation")] = [
        {"title": a["title"], "context": p["context"], "question": q["question"],
         "answers": {"text": [x["text"] for x in q["answers"]]}}
        for a in squad["data"] for p in a["paragraphs"] for q in p["qas"]]
    assert ruler_qa.read_squad(ruler_qa._squad_hub()) == ruler_qa.read_squad(squad)

    story = {"input": " Mary got the milk there. ", "question": "Where is the milk?", "target": "kitchen"}
    fake_hub[("RMT-team/babilong", "4k", "qa2")] = [story]
    row = babilong.load("qa2", "4k", pretrained=tok_path)["test"][0]
    assert row["source"] == "hub:RMT-team/babilong"
    assert "<context>\nMary got the milk there.\n</context>" in row["prompt"]

    fake_hub[(longbench.HUB_REPO, "qmsum", "test")] = [{"question": "What was decided?", "context": "Minutes.",
                                                        "answers": ["A budget."], "length": 9, "all_classes": None}]
    row = longbench.load("qmsum")["test"][0]
    assert row["input"] == "What was decided?" and row["prompt"].endswith("Query: What was decided?\nAnswer:")


def test_vt_chain_names_are_distinct_when_the_draw_repeats_one():
    """Seed 35 draws 'OTT' twice among the in-context example's five names."""
    from lm_eval_dlmem.tasks.ruler_synthetic import _chains, vt_example

    groups, chains = _chains(random.Random(35), icl=True)
    assert len(groups) == 1 and len(groups[0]) == 5 and len(set(groups[0])) == 5
    assert len(chains[0]) == 5
    assert "VAR" in vt_example(random.Random(35), 30)
