"""LongBench v1 (THUDM/LongBench) and LongBench-E for lm-eval, scored like upstream `eval.py`.

- Prompts: `longbench_prompts.PROMPTS`; generation budgets: `TASKS[name].max_gen`
  (`dataset2maxlen.json`); greedy; no stop strings. samsum's newline stop is applied when scoring:
  upstream adds "\\n" as an EOS but with `min_length` = prompt + 1, so a leading newline never ends
  the answer and the first line after it is scored; a stop string "\\n" would cut such an answer
  to "" (score 0), so the task leaves the text whole and `score` takes that line.
- Middle truncation (upstream `pred.py`): a prompt longer than `max_length - max_gen` tokens of
  the evaluated model keeps its first and last halves. `max_length` comes from `--model_args`
  (our models take it) or `--metadata max_length=N`; without one, prompts are left whole and the
  model's own limit applies (our harness also middle-truncates as a safety net).
- Scoring: the upstream metric per task, max over the reference answers, x100; the four
  few-shot tasks (trec, triviaqa, samsum, lsht) score the first line of the prediction only.
- Chat template: upstream applies the model's chat format to every task except trec, triviaqa,
  samsum, lsht, lcc and repobench-p. lm-eval applies `--apply_chat_template` to a whole run, so
  run the `dlmem_longbench_chat` group with it and `dlmem_longbench_nochat` without it.

Data: `--metadata longbench_data_dir=DIR` (or `LM_EVAL_DLMEM_LONGBENCH_DIR`) with upstream's
`{task}.jsonl` / `{task}_e.jsonl` files (the unpacked `data.zip`), else the hub's parquet mirror
`Xnhyacinth/LongBench` (config = task name, split `test`).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from functools import lru_cache

from .common import (
    key_request_cache_by_metadata,
    metadata_hint,
    TaskDataError,
    TokenCounter,
    from_hub,
    int_option,
    load_sizing_tokenizer,
    option,
    require_tokenizer_name,
    to_dataset,
)
from .longbench_prompts import PROMPTS
from .metrics import LONGBENCH_METRICS

log = logging.getLogger(__name__)

HUB_REPO = "Xnhyacinth/LongBench"
DATA_DIR_ENV = "LM_EVAL_DLMEM_LONGBENCH_DIR"
BUCKETS = (("score_0_4k", 0, 4000), ("score_4_8k", 4000, 8000), ("score_8k_plus", 8000, float("inf")))


@dataclass(frozen=True)
class LongBenchTask:
    """One LongBench dataset: category, metric, generation budget and prompt handling."""

    category: str
    metric: str
    max_gen: int
    in_e: bool = False  # part of LongBench-E
    chat: bool = True  # upstream wraps the prompt in the chat format
    first_line: bool = False  # upstream scores only the first line of the prediction


_FEW = dict(chat=False, first_line=True)
TASKS = {
    "narrativeqa": LongBenchTask("single", "qa_f1_score", 128),
    "qasper": LongBenchTask("single", "qa_f1_score", 128, in_e=True),
    "multifieldqa_en": LongBenchTask("single", "qa_f1_score", 64, in_e=True),
    "multifieldqa_zh": LongBenchTask("single", "qa_f1_zh_score", 64),
    "hotpotqa": LongBenchTask("multi", "qa_f1_score", 32, in_e=True),
    "2wikimqa": LongBenchTask("multi", "qa_f1_score", 32, in_e=True),
    "musique": LongBenchTask("multi", "qa_f1_score", 32),
    "dureader": LongBenchTask("multi", "rouge_zh_score", 128),
    "gov_report": LongBenchTask("summarization", "rouge_score", 512, in_e=True),
    "qmsum": LongBenchTask("summarization", "rouge_score", 512),
    "multi_news": LongBenchTask("summarization", "rouge_score", 512, in_e=True),
    "vcsum": LongBenchTask("summarization", "rouge_zh_score", 512),
    "trec": LongBenchTask("fewshot", "classification_score", 64, in_e=True, **_FEW),
    "triviaqa": LongBenchTask("fewshot", "qa_f1_score", 32, in_e=True, **_FEW),
    "samsum": LongBenchTask("fewshot", "rouge_score", 128, in_e=True, **_FEW),
    "lsht": LongBenchTask("fewshot", "classification_score", 64, **_FEW),
    "passage_count": LongBenchTask("synthetic", "count_score", 32, in_e=True),
    "passage_retrieval_en": LongBenchTask("synthetic", "retrieval_score", 32, in_e=True),
    "passage_retrieval_zh": LongBenchTask("synthetic", "retrieval_zh_score", 32),
    "lcc": LongBenchTask("code", "code_sim_score", 64, in_e=True, chat=False),
    "repobench-p": LongBenchTask("code", "code_sim_score", 64, in_e=True, chat=False),
}


def task_of(name: str) -> LongBenchTask:
    """The task of a dataset name, with or without the LongBench-E `_e` suffix."""
    base = name[:-2] if name.endswith("_e") else name
    if base not in TASKS or (name.endswith("_e") and not TASKS[base].in_e):
        raise ValueError(f"longbench_task={name!r}; choose one of {', '.join(TASKS)} "
                         f"or their LongBench-E variants ({', '.join(t + '_e' for t in TASKS if TASKS[t].in_e)}).")
    return TASKS[base]


def _normalize(row: dict) -> dict:
    # Upstream calls the question `input`; the parquet mirror calls it `question`.
    question = row.get("input") if row.get("input") is not None else row.get("question", "")
    answers = row.get("answers") or []
    return {"input": question or "", "context": row.get("context") or "", "answers": list(answers),
            "all_classes": list(row.get("all_classes") or []), "length": int(row.get("length") or 0),
            "_id": str(row.get("_id", ""))}


@lru_cache(maxsize=64)
def _raw_rows(name: str, data_dir: str | None) -> tuple[dict, ...]:
    if data_dir:
        path = os.path.join(data_dir, f"{name}.jsonl")
        if not os.path.isfile(path):
            raise TaskDataError(f"longbench_data_dir={data_dir!r} has no {name}.jsonl (upstream data.zip layout).")
        with open(path, encoding="utf-8") as f:
            return tuple(_normalize(json.loads(line)) for line in f if line.strip())
    import datasets

    hint = (f"Pass {metadata_hint('longbench_data_dir', 'DIR')} holding {name}.jsonl (LongBench's data.zip), "
            f"or set {DATA_DIR_ENV}.")
    rows = from_hub(HUB_REPO, lambda: datasets.load_dataset(HUB_REPO, name, split="test"), hint)
    return tuple(_normalize(r) for r in rows)


def truncate_middle(prompt: str, limit: int, count: TokenCounter) -> str:
    """Upstream's middle truncation: first and last `limit // 2` tokens, decoded and joined."""
    ids = count.encode(prompt)
    if len(ids) <= limit:
        return prompt
    half = limit // 2
    return count.decode(ids[:half]) + count.decode(ids[len(ids) - half:])


@lru_cache(maxsize=64)
def _prompted(name: str, data_dir: str | None, max_length: int | None, tokenizer: str | None):
    task = task_of(name)
    template = PROMPTS[name[:-2] if name.endswith("_e") else name]
    count = TokenCounter(load_sizing_tokenizer(tokenizer)) if max_length else None
    limit = (max_length or 0) - task.max_gen
    if max_length and limit <= 0:
        raise ValueError(f"max_length={max_length} leaves no room for a prompt after {task.max_gen} generated tokens.")
    rows = []
    for row in _raw_rows(name, data_dir):
        prompt = template.format(context=row["context"], input=row["input"])
        if count is not None:
            prompt = truncate_middle(prompt, limit, count)
        rows.append({**row, "prompt": prompt, "target": row["answers"][0] if row["answers"] else "",
                     "dataset": name})
    return to_dataset(rows)


def load(longbench_task: str, **meta) -> dict:
    """lm-eval `custom_dataset`: `{"test": Dataset}` of one LongBench(-E) dataset, prompts built
    and middle-truncated to `max_length - max_gen` tokens of the evaluated model."""
    key_request_cache_by_metadata()
    task_of(longbench_task)
    data_dir = option(meta, "longbench_data_dir", env=DATA_DIR_ENV)
    max_length = int_option(meta, "max_length", 0) or None
    if max_length is None:
        log.info("LongBench %s: no max_length given; prompts are not truncated by the task.", longbench_task)
    tokenizer = require_tokenizer_name(meta, "LongBench truncation") if max_length else None
    return {"test": _prompted(longbench_task, data_dir, max_length, tokenizer)}


def score(doc: dict, results: list[str]) -> dict:
    """`process_results`: the task's upstream metric, best over the answers, 0-100; for
    LongBench-E also the score in the sample's length bucket (others get -1, skipped)."""
    name = doc["dataset"]
    task = task_of(name)
    prediction = results[0]
    if task.first_line:
        prediction = prediction.lstrip("\n").split("\n")[0]
    metric = LONGBENCH_METRICS[task.metric]
    value = 100.0 * max([metric(prediction, gt, all_classes=doc["all_classes"]) for gt in doc["answers"]] or [0.0])
    out = {"score": value, task.metric: value}
    if name.endswith("_e"):
        out.update({key: (value if lo <= doc["length"] < hi else -1.0) for key, lo, hi in BUCKETS})
    return out


def mean_present(values: list[float]) -> float:
    """Aggregation of the LongBench-E bucket scores: the mean over samples in the bucket."""
    kept = [v for v in values if v >= 0]
    return sum(kept) / len(kept) if kept else float("nan")
