"""RULER's two QA tasks: SQuAD v2 (qa_1, `ruler_qa_squad`) and HotpotQA (qa_2, `ruler_qa_hotpot`).

Each sample is one question with its gold paragraphs plus distractor paragraphs (for SQuAD first
the other paragraphs of the same article), shuffled with the fixed seed and rendered
"Document {i}:\\n{text}" (upstream `scripts/data/synthetic/qa.py`). Data, in this order:

1. `--metadata ruler_qa_dir=DIR` (or `LM_EVAL_DLMEM_RULER_QA_DIR`): `squad.json` (the SQuAD v2.0
   dev file) and/or `hotpotqa.json` (the HotpotQA dev distractor file), the names RULER's own
   download script gives them;
2. the Hugging Face Hub: `rajpurkar/squad_v2` (validation) and the HotpotQA dev distractor JSON
   lm-eval also uses (`namlh2004/hotpotqa`);
3. otherwise loading fails with a message saying how to provide the data.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from functools import lru_cache

from .common import TaskDataError, from_hub, metadata_hint

TEMPLATE = (
    "Answer the question based on the given documents. Only give me the answer and do not output any "
    "other words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the "
    "given documents. Only give me the answer and do not output any other words.\n\nQuestion: {query}"
)
ANSWER_PREFIX = " Answer:"
DOCUMENT = "Document {i}:\n{document}"
TOKENS_TO_GENERATE = 32
SQUAD_REPO = "rajpurkar/squad_v2"
HOTPOT_REPO, HOTPOT_FILE = "namlh2004/hotpotqa", "hotpot_dev_distractor_v1.json"
HOTPOT_REVISION = "7e54db4656209750ff487f6fdf8e39a66dba136b"
FILES = {"squad": "squad.json", "hotpotqa": "hotpotqa.json"}


def data_hint(file: str) -> str:
    """What to do when the QA data is missing (worded for CLI and Python users)."""
    return (f"Download the data once and pass {metadata_hint('ruler_qa_dir', 'DIR')} with {file} in it (RULER's "
            "scripts/data/synthetic/json/download_qa_dataset.sh fetches it), or leave these two tasks out "
            "(dlmem_ruler_<len> groups the 11 offline tasks; dlmem_ruler_all_<len> adds these two).")


@dataclass(frozen=True)
class QAData:
    """Questions (`query`, `outputs`, gold `context` doc ids, `more_context` same-article ids) and docs."""

    qas: tuple[dict, ...]
    docs: tuple[str, ...]
    source: str


def read_squad(data: dict) -> tuple[list[dict], list[str]]:
    """SQuAD v2 JSON -> answerable questions and the sorted set of paragraphs."""
    docs = sorted({p["context"] for d in data["data"] for p in d["paragraphs"]})
    doc_id = {c: i for i, c in enumerate(docs)}
    qas = []
    for article in data["data"]:
        article_ids = [doc_id[p["context"]] for p in article["paragraphs"]]
        for p in article["paragraphs"]:
            gold = doc_id[p["context"]]
            for qa in p["qas"]:
                if not qa.get("is_impossible", False):
                    qas.append({"query": qa["question"], "outputs": [a["text"] for a in qa["answers"]],
                                "context": [gold], "more_context": [i for i in article_ids if i != gold]})
    return qas, docs


def read_hotpotqa(data: list) -> tuple[list[dict], list[str]]:
    """HotpotQA dev distractor JSON -> questions and the sorted set of "title\\nparagraph" docs."""
    render = lambda title, sents: f"{title}\n{''.join(sents)}"  # noqa: E731
    docs = sorted({render(t, p) for d in data for t, p in d["context"]})
    doc_id = {c: i for i, c in enumerate(docs)}
    qas = [{"query": d["question"], "outputs": [d["answer"]],
            "context": [doc_id[render(t, p)] for t, p in d["context"]], "more_context": []} for d in data]
    return qas, docs


def _squad_hub() -> dict:
    """`rajpurkar/squad_v2` rows regrouped into the SQuAD JSON layout (articles by title)."""
    import datasets

    rows = datasets.load_dataset(SQUAD_REPO, split="validation")
    articles: dict[str, dict[str, list]] = {}
    for row in rows:
        paragraphs = articles.setdefault(row["title"], {})
        paragraphs.setdefault(row["context"], []).append(
            {"question": row["question"], "answers": [{"text": t} for t in row["answers"]["text"]],
             "is_impossible": len(row["answers"]["text"]) == 0})
    return {"data": [{"title": t, "paragraphs": [{"context": c, "qas": q} for c, q in ps.items()]}
                     for t, ps in articles.items()]}


def _hotpot_hub() -> list:
    from huggingface_hub import hf_hub_download

    path = hf_hub_download(HOTPOT_REPO, HOTPOT_FILE, repo_type="dataset", revision=HOTPOT_REVISION)
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@lru_cache(maxsize=4)
def load_qa(dataset: str, data_dir: str | None) -> QAData:
    """The parsed questions and documents of `dataset` ("squad" or "hotpotqa")."""
    reader = read_squad if dataset == "squad" else read_hotpotqa
    if data_dir:
        path = os.path.join(data_dir, FILES[dataset])
        if not os.path.isfile(path):
            hint = data_hint(FILES[dataset])
            raise TaskDataError(f"ruler_qa_dir={data_dir!r} has no {FILES[dataset]}. {hint}")
        with open(path, encoding="utf-8") as f:
            qas, docs = reader(json.load(f))
        source = f"file:{path}"
    else:
        hint = data_hint(FILES[dataset])
        if dataset == "squad":
            qas, docs = reader(from_hub(SQUAD_REPO, _squad_hub, hint))
            source = f"hub:{SQUAD_REPO}"
        else:
            qas, docs = reader(from_hub(HOTPOT_REPO, _hotpot_hub, hint))
            source = f"hub:{HOTPOT_REPO}"
    return QAData(tuple(qas), tuple(docs), source)


def make_qa(data: QAData, rng: random.Random, units: int, index: int, *, seed: int) -> tuple[str, str, list[str]]:
    """Question `index` with `units` documents in total (gold ones always included)."""
    qa = data.qas[index % len(data.qas)]
    gold, more = list(qa["context"]), list(qa["more_context"])
    units = max(units, len(gold))  # a question always keeps all its gold documents
    if units < len(data.docs):
        if units - len(gold) > len(more):
            taken = set(gold) | set(more)
            others = [i for i in range(len(data.docs)) if i not in taken]
            picked = gold + more + rng.sample(others, max(0, units - len(gold) - len(more)))
        else:
            picked = gold + rng.sample(more, units - len(gold))
        documents = [data.docs[i] for i in picked]
    else:
        documents = (list(data.docs) * -(-units // len(data.docs)))[:units]
    random.Random(seed).shuffle(documents)
    context = "\n\n".join(DOCUMENT.format(i=i + 1, document=d) for i, d in enumerate(documents))
    return TEMPLATE.format(context=context, query=qa["query"]), ANSWER_PREFIX, list(qa["outputs"])


def min_units(data: QAData, index: int) -> int:
    return len(data.qas[index % len(data.qas)]["context"])
