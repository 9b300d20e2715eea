"""Log-likelihood variants of the retrieval tasks: `dlmem_ruler_<niah task>_<len>_mc` and
`dlmem_babilong_<task>_<len>_mc`.

Same documents as the generation task of the same name (same data seed, same sizing); instead of
decoding, the model scores `NUM_CHOICES` candidate answers after the prompt with lm-eval's
`multiple_choice` requests, i.e. the harness's Monte Carlo log-likelihood. Two metrics per
document, both averaged with lm-eval's standard error:

    acc        1 if the gold answer has the highest log-likelihood (chance: 1 / NUM_CHOICES)
    answer_ll  log-likelihood of the gold answer in nats (a held-out answer loss, negated)

Why: a model that has not learnt to write the answer can still put more probability on it, and
`answer_ll` is the task-level form of the held-out denoising loss the memory trainers report.

Candidates are written as the training data writes answers (`training.synthetic`): " v1, v2."
for needles and " label." for bAbI, and lm-eval's `target_delimiter` is "" so that leading space
is the only one. Distractors are the hard ones first: other needle values in the haystack
(`niah_multikey_*`), other task labels named in the story (bAbI); then fresh values of the same
kind (RULER) or the task's other labels (bAbI). Each document draws them from its own RNG.
"""

from __future__ import annotations

import re

from . import babilong, ruler
from . import ruler_niah as niah
from .common import data_seed, sample_rng, to_dataset
from .metrics import TASK_LABELS

NUM_CHOICES = 4
# "One of the special magic numbers for loud-mouse is: 1234567." -> the value
NEEDLE_VALUE = re.compile(r"One of the special magic \w+ for .+? is: (\S+?)\.(?=\s|$)")


def _answer(values: list[str]) -> str:
    return " " + ", ".join(values) + "."


def _shuffled(gold: str, distractors: list[str], rng) -> tuple[list[str], int]:
    """(choices, index of gold) with the gold answer at a random place."""
    choices = [gold, *distractors]
    rng.shuffle(choices)
    return choices, choices.index(gold)


def ruler_choices(task: str, row: dict, rng) -> tuple[list[str], int]:
    """Gold answer and NUM_CHOICES - 1 distractors with as many values each.

    Distractor values: the haystack's other needle values first (shuffled), then fresh values of
    the task's value type; each distractor takes len(gold) of them, none twice."""
    gold = list(row["outputs"])
    others = [v for v in dict.fromkeys(NEEDLE_VALUE.findall(row["input"])) if v not in gold]
    rng.shuffle(others)
    need = (NUM_CHOICES - 1) * len(gold)
    kind = niah.NIAH_TASKS[task].value_type
    seen = set(gold) | set(others)
    while len(others) < need:
        value = niah.random_item(kind, rng)
        if value not in seen:
            seen.add(value)
            others.append(value)
    distractors = [_answer(others[i * len(gold):(i + 1) * len(gold)]) for i in range(NUM_CHOICES - 1)]
    return _shuffled(_answer(gold), distractors, rng)


def babilong_choices(row: dict, rng) -> tuple[list[str], int]:
    """Gold label and NUM_CHOICES - 1 other labels of the task, those named in the story first."""
    labels = [x for x in TASK_LABELS[row["task"]] if x != row["target"]]
    words = set(re.findall(r"\w+", row["input"]))
    named = [x for x in labels if x in words]
    unnamed = [x for x in labels if x not in words]
    rng.shuffle(named)
    rng.shuffle(unnamed)
    picked = (named + unnamed)[:NUM_CHOICES - 1]
    return _shuffled(f" {row['target']}.", [f" {x}." for x in picked], rng)


def load_ruler(ruler_task: str, ruler_length, **meta) -> dict:
    """lm-eval `custom_dataset` of `dlmem_ruler_<task>_<len>_mc`: the generation task's documents
    with `context` (input + answer prefix), `choices` and `label`."""
    if ruler_task not in niah.NIAH_TASKS:
        raise ValueError(f"ruler_task={ruler_task!r}: the log-likelihood variant exists for the needle tasks "
                         f"{', '.join(niah.NIAH_TASKS)}.")
    rows, seed = ruler.load(ruler_task, ruler_length, **meta)["test"], data_seed(meta)
    out = []
    for row in rows:
        choices, label = ruler_choices(ruler_task, row, sample_rng(seed, "mc", ruler_task, ruler_length, row["index"]))
        out.append({**row, "context": row["input"] + row["gen_prefix"], "choices": choices, "label": label})
    return {"test": to_dataset(out)}


def load_babilong(babilong_task: str, babilong_length: str, **meta) -> dict:
    """lm-eval `custom_dataset` of `dlmem_babilong_<task>_<len>_mc`: the generation task's
    documents with `choices` and `label` (the context is the prompt, as generation sees it)."""
    rows, seed = babilong.load(babilong_task, babilong_length, **meta)["test"], data_seed(meta)
    out = []
    for i, row in enumerate(rows):
        choices, label = babilong_choices(row, sample_rng(seed, "mc", babilong_task, babilong_length, i))
        out.append({**row, "choices": choices, "label": label})
    return {"test": to_dataset(out)}


def score(doc: dict, results: list[tuple[float, bool]]) -> dict:
    """`process_results`: `results` holds one (log-likelihood, is_greedy) per choice."""
    lls = [float(r[0]) for r in results]
    best = max(range(len(lls)), key=lls.__getitem__)
    return {"acc": float(best == doc["label"]), "answer_ll": lls[doc["label"]]}
