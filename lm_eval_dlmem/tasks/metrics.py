"""The upstream scoring rules of RULER, BABILong and LongBench, one function per rule.

Per-sample functions; the task YAMLs average them. Where lm-eval 0.4.13's own versions differ
from upstream, upstream wins (docs/tasks.md lists the differences):

- RULER `string_match_part` is "1 if *any* reference is in the prediction" (lm-eval computes the
  fraction of references found), and both RULER scores are 0-100 (lm-eval: 0-1).
- BABILong uses `babilong/metrics.py::compare_answers` (the target must be the only task label in
  the first sentence of the answer, labels named in the question excluded); lm-eval only checks
  that the target is a substring.
- LongBench scores are 0-100 and the prediction is not stripped before scoring (lm-eval strips
  it, which changes `code_sim_score` on answers that open with a blank line).
"""

from __future__ import annotations

import difflib
import logging
import re
import string
from collections import Counter

from .rouge import rouge_l_f

# ---------------------------------------------------------------------------------------------
# RULER (scripts/eval/synthetic/constants.py)
# ---------------------------------------------------------------------------------------------


def string_match_all(prediction: str, references: list[str]) -> float:
    """100 x the fraction of references contained in the prediction (case-insensitive)."""
    pred = prediction.lower()
    return 100.0 * sum(r.lower() in pred for r in references) / len(references)


def string_match_part(prediction: str, references: list[str]) -> float:
    """100 if any reference is contained in the prediction (case-insensitive), else 0."""
    pred = prediction.lower()
    return 100.0 * max(float(r.lower() in pred) for r in references)


# ---------------------------------------------------------------------------------------------
# BABILong (babilong/metrics.py)
# ---------------------------------------------------------------------------------------------

_ROOMS = ["bathroom", "bedroom", "garden", "hallway", "kitchen", "office"]
TASK_LABELS = {
    "qa1": _ROOMS, "qa2": _ROOMS, "qa3": _ROOMS, "qa4": _ROOMS,
    "qa5": ["Bill", "Fred", "Jeff", "Mary", "apple", "football", "milk"],
    "qa6": ["no", "yes"], "qa7": ["none", "one", "three", "two"], "qa8": ["apple", "football", "milk", "nothing"],
    "qa9": ["no", "yes"], "qa10": ["maybe", "no", "yes"], "qa11": _ROOMS, "qa12": _ROOMS, "qa13": _ROOMS,
    "qa14": ["bedroom", "cinema", "kitchen", "office", "park", "school"], "qa15": ["cat", "mouse", "sheep", "wolf"],
    "qa16": ["gray", "green", "white", "yellow"], "qa17": ["no", "yes"], "qa18": ["no", "yes"],
    "qa19": ["e,e", "e,n", "e,s", "n,e", "n,n", "n,w", "s,e", "s,s", "s,w", "w,n", "w,s", "w,w"],
    "qa20": ["bedroom", "bored", "garden", "hungry", "kitchen", "thirsty", "tired"],
}


def babilong_preprocess(output: str) -> str:
    """Lower-case, keep the first sentence, cut where the model starts a new example.

    The last cut looks for "Question" in the lower-cased text and so never fires; that is
    upstream's behaviour and is kept.
    """
    output = output.lower().split(".")[0]
    for marker in ("<context>", "<example>", "Question"):
        output = output.split(marker)[0]
    return output


def compare_answers(target: str, output: str, question: str, task_labels: list[str]) -> bool:
    """BABILong's official check: the target is the only label (not named in the question) in
    the answer's first sentence; for multi-answer targets ("apple,milk") all and only those."""
    output = babilong_preprocess(output)
    target = target.lower()
    labels = {label.lower() for label in task_labels}
    in_question = {label for label in labels if label in question.lower()}
    in_output = {label for label in labels if label in output} - in_question
    if "," in target and len(target) > 3:
        parts = target.split(",")
        return all(p in in_output for p in parts) and len(in_output) == len(parts)
    return target in in_output and len(in_output) == 1


# ---------------------------------------------------------------------------------------------
# LongBench (LongBench/metrics.py); each returns 0..1 like upstream, tasks scale by 100
# ---------------------------------------------------------------------------------------------

_ZH_PUNCT = (
    "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣"
    "､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
)
_ALL_PUNCT = frozenset(string.punctuation + _ZH_PUNCT)
_EN_PUNCT = frozenset(string.punctuation)


def _jieba_cut(text: str) -> list[str]:
    from ..extras import require

    jieba = require("jieba", "LongBench's Chinese metrics")
    jieba.setLogLevel(logging.WARNING)
    return list(jieba.cut(text, cut_all=False))


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lower, drop punctuation, drop articles, collapse whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in _EN_PUNCT)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())


def normalize_zh_answer(s: str) -> str:
    """Lower, drop English and Chinese punctuation, remove all whitespace."""
    return "".join("".join(ch for ch in s.lower() if ch not in _ALL_PUNCT).split())


def token_f1(prediction: list[str], ground_truth: list[str]) -> float:
    same = sum((Counter(prediction) & Counter(ground_truth)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(prediction), same / len(ground_truth)
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str, **_) -> float:
    return token_f1(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def qa_f1_zh_score(prediction: str, ground_truth: str, **_) -> float:
    """Token F1 over jieba words, each normalised, empties dropped."""
    pred = [t for t in (normalize_zh_answer(w) for w in _jieba_cut(prediction)) if t]
    gold = [t for t in (normalize_zh_answer(w) for w in _jieba_cut(ground_truth)) if t]
    return token_f1(pred, gold)


def rouge_score(prediction: str, ground_truth: str, **_) -> float:
    return rouge_l_f(prediction, ground_truth)


def rouge_zh_score(prediction: str, ground_truth: str, **_) -> float:
    return rouge_l_f(" ".join(_jieba_cut(prediction)), " ".join(_jieba_cut(ground_truth)))


def _number_share(prediction: str, wanted: str) -> float:
    numbers = re.findall(r"\d+", prediction)
    return 0.0 if not numbers else sum(n == str(wanted) for n in numbers) / len(numbers)


def count_score(prediction: str, ground_truth: str, **_) -> float:
    """Share of the numbers in the prediction that equal the true count."""
    return _number_share(prediction, ground_truth)


def retrieval_score(prediction: str, ground_truth: str, **_) -> float:
    """Share of the numbers in the prediction that equal the paragraph id in "Paragraph N"."""
    return _number_share(prediction, re.findall(r"Paragraph (\d+)", ground_truth)[0])


def retrieval_zh_score(prediction: str, ground_truth: str, **_) -> float:
    return _number_share(prediction, re.findall(r"段落(\d+)", ground_truth)[0])


def fuzz_ratio(a: str, b: str) -> int:
    """fuzzywuzzy's `fuzz.ratio` as LongBench and lm-eval's `longbench` extra install it (without
    python-Levenshtein): round(100 x `difflib.SequenceMatcher(None, a, b).ratio()`), with
    fuzzywuzzy's guards: equal strings 100 (even two empty ones), one empty string 0.

    Not the Indel similarity of python-Levenshtein/rapidfuzz: difflib matches greedily (longest
    block first, autojunk on for strings of 200+ characters) and can score lower ("bcb" vs
    "cc/=b": 25, Indel 50).
    """
    if a == b:
        return 100
    if not a or not b:
        return 0
    return int(round(100 * difflib.SequenceMatcher(None, a, b).ratio()))


def code_sim_score(prediction: str, ground_truth: str, **_) -> float:
    """Similarity of the first code line of the prediction (after leading newlines; lines with
    `, # or // are skipped) to the true next line: `fuzz_ratio` / 100, as upstream."""
    line = next((ln for ln in prediction.lstrip("\n").split("\n")
                 if "`" not in ln and "#" not in ln and "//" not in ln), "")
    return fuzz_ratio(line, ground_truth) / 100


def classification_score(prediction: str, ground_truth: str, *, all_classes, **_) -> float:
    """1/k when the true class is among the k classes named in the prediction, else 0.

    Classes that are substrings of the true class are discarded first, with upstream's quirk:
    it removes items from the list it is iterating over, so the item right after a removed one
    is never checked. That is reproduced here, because it changes scores.
    """
    matches = [c for c in all_classes if c in prediction]
    i = 0
    while i < len(matches):
        if matches[i] in ground_truth and matches[i] != ground_truth:
            del matches[i]
        i += 1
    return 1.0 / len(matches) if ground_truth in matches else 0.0


LONGBENCH_METRICS = {
    "qa_f1_score": qa_f1_score, "qa_f1_zh_score": qa_f1_zh_score, "rouge_score": rouge_score,
    "rouge_zh_score": rouge_zh_score, "classification_score": classification_score,
    "retrieval_score": retrieval_score, "retrieval_zh_score": retrieval_zh_score,
    "count_score": count_score, "code_sim_score": code_sim_score,
}
