"""Scoring rules of RULER, BABILong and LongBench against their upstream definitions, on crafted
cases, including the cases where lm-eval 0.4.13's own versions give a different answer."""

import math

import pytest

from lm_eval_dlmem.tasks import babilong, longbench, ruler
from lm_eval_dlmem.tasks.common import clean_prediction
from lm_eval_dlmem.tasks.metrics import (
    TASK_LABELS,
    classification_score,
    code_sim_score,
    compare_answers,
    count_score,
    fuzz_ratio,
    qa_f1_score,
    qa_f1_zh_score,
    retrieval_score,
    retrieval_zh_score,
    rouge_score,
    rouge_zh_score,
    string_match_all,
    string_match_part,
)
from lm_eval_dlmem.tasks.rouge import lcs_words, rouge_l_f

# ------------------------------------------------------------------------------------- RULER


def test_ruler_string_match_all_is_fraction_of_references_0_100():
    refs = ["1234567", "7654321", "1111111", "2222222"]
    assert string_match_all("Values: 1234567 and 7654321.", refs) == 50.0
    assert string_match_all("APPLE-tree", ["apple-TREE"]) == 100.0  # case-insensitive
    assert string_match_all("nothing", refs) == 0.0


def test_ruler_string_match_part_is_any_match_where_lm_eval_takes_the_fraction():
    from lm_eval.tasks.ruler.common_utils import string_match_part as lm_eval_part

    pred, refs = "Denver Broncos won", ["Denver Broncos", "the Broncos team"]
    assert string_match_part(pred, refs) == 100.0  # RULER: one paraphrase is enough (NVIDIA/RULER#15)
    assert lm_eval_part([pred], [refs]) == 0.5  # lm-eval: fraction found, on a 0-1 scale
    assert string_match_part("no idea", refs) == 0.0


def test_ruler_process_results_cleans_control_characters_and_reports_score():
    assert clean_prediction("\x00 1234567\tand\x1f ") == "1234567\nand"
    doc = {"outputs": ["1234567"]}
    assert ruler.score_all(doc, [" 1234567."]) == {"score": 100.0, "string_match_all": 100.0}
    assert ruler.score_part({"outputs": ["a", "b"]}, ["B"]) == {"score": 100.0, "string_match_part": 100.0}


# ----------------------------------------------------------------------------------- BABILong

QA1, QA5 = TASK_LABELS["qa1"], TASK_LABELS["qa5"]


@pytest.mark.parametrize("target,output,question,labels,ours,lm_eval", [
    # two rooms named: upstream rejects, lm-eval's substring check accepts
    ("bathroom", "The most recent location of Mary is bathroom or kitchen.", "Where is Mary?", QA1, False, True),
    # only the first sentence counts
    ("bathroom", "Mary is in the bathroom. Before that, the kitchen.", "Where is Mary?", QA1, True, True),
    ("kitchen", "Mary was in the bathroom. Now the kitchen.", "Where is Mary?", QA1, False, True),
    # labels named in the question never count
    ("garden", "Before the kitchen the apple was in the garden.", "Where was the apple before the kitchen?",
     QA1, True, True),
    ("Fred", "Bill gave the milk to Fred.", "Who did Bill give the milk to?", QA5, True, True),
    # multi-answer targets: all parts, and only them (lm-eval wants the literal "apple,milk")
    ("apple,milk", "Mary carries the apple and the milk.", "What is Mary carrying?", TASK_LABELS["qa8"], True, False),
    ("apple,milk", "The apple, the milk and the football.", "What is Mary carrying?", TASK_LABELS["qa8"], False, False),
])
def test_babilong_compare_answers_against_lm_eval(target, output, question, labels, ours, lm_eval):
    from lm_eval.tasks.babilong.common_utils import process_results

    assert compare_answers(target, output, question, labels) is ours
    assert process_results({"target": target}, [output])["acc"] == float(lm_eval)


def test_babilong_score_is_0_100_with_the_task_labels():
    doc = {"task": "qa1", "target": "office", "question": "Where is John?"}
    assert babilong.score(doc, ["The most recent location of John is office."]) == {"score": 100.0}
    assert babilong.score(doc, ["office or hallway"]) == {"score": 0.0}


# ---------------------------------------------------------------------------------- LongBench


def test_qa_f1_normalises_like_squad():
    assert qa_f1_score("The Eiffel Tower!", "eiffel tower") == 1.0
    # pred tokens [paris, france], gold [paris]: P=1/2, R=1 -> F1=2/3
    assert qa_f1_score("Paris, France", "Paris") == pytest.approx(2 / 3)
    assert qa_f1_score("", "Paris") == 0.0


def test_qa_f1_zh_uses_jieba_words():
    # jieba: 北京/是/中国/的/首都 vs 首都/是/北京 -> 3 shared words, P=3/5, R=1
    assert qa_f1_zh_score("北京是中国的首都", "首都是北京") == pytest.approx(0.75)
    assert qa_f1_zh_score("，。", "北京") == 0.0


def test_rouge_l_is_the_rouge_packages_union_lcs_over_word_sets():
    # sentences split on "."; LCS words per reference sentence collected into a set:
    # ref [the cat was on the mat] vs hyp sentences [the cat sat], [on the mat] -> {the, cat, on, mat}
    # m = n = 5 distinct words -> R = P = 4/5
    assert rouge_l_f("the cat sat. on the mat", "the cat was on the mat") == pytest.approx(0.8, abs=1e-7)
    # word sets: a repeated word counts once (rouge-score's rougeL would give 0.4 here)
    assert rouge_l_f("the the the", "the cat") == pytest.approx(2 / 3, abs=1e-7)
    # several LCS of length 1 exist ([a], [b], [c]); the package's backtracking returns [c]
    assert lcs_words("a b c".split(), "c b a".split()) == ["c"]
    assert lcs_words("a b c a".split(), "b a c".split()) == ["b", "a"]
    # the package raises on empty input, which LongBench scores 0
    assert rouge_score("...", "a summary") == 0.0 and rouge_score("", "x") == 0.0
    assert rouge_zh_score("会议讨论了预算", "会议讨论了预算") == pytest.approx(1.0, abs=1e-7)


def test_rouge_l_differs_from_rouge_score_package():
    from rouge_score import rouge_scorer

    hyp, ref = "the cat sat. on the mat", "the cat was on the mat"
    textbook = rouge_scorer.RougeScorer(["rougeL"]).score(ref, hyp)["rougeL"].fmeasure
    assert textbook == pytest.approx(5 / 6)  # one LCS over the token sequences
    assert rouge_l_f(hyp, ref) != pytest.approx(textbook)


def test_classification_reproduces_upstreams_skip_after_removal():
    classes = ["Numeric", "value", "Numeric value", "Entity"]
    # upstream removes "Numeric" and then skips "value" (list mutated while iterating): 1/2
    assert classification_score("Numeric value", "Numeric value", all_classes=classes) == 0.5
    assert classification_score("Entity", "Entity", all_classes=classes) == 1.0
    assert classification_score("Entity or Location", "Location", all_classes=classes + ["Location"]) == 0.5
    assert classification_score("no class", "Entity", all_classes=classes) == 0.0


def test_retrieval_and_count_scores_share_of_right_numbers():
    assert retrieval_score("Paragraph 12", "Paragraph 12") == 1.0
    assert retrieval_score("Paragraph 3 or Paragraph 12", "Paragraph 12") == 0.5
    assert retrieval_zh_score("段落2", "段落2") == 1.0
    assert count_score("There are 7 unique paragraphs, not 9.", "7") == 0.5
    assert count_score("none", "7") == 0.0


def test_code_sim_first_code_line_and_fuzzywuzzy_difflib_ratio():
    gold = "    return 2 * (width + height)"
    assert code_sim_score("```python\n# perimeter\n" + gold + "\n", gold) == 1.0
    # fuzzywuzzy without python-Levenshtein (what LongBench installs) is difflib's greedy ratio:
    # "bcb" vs "cc/=b" matches one block of 1 -> 2*1/8 = 0.25 (the Indel/rapidfuzz ratio says 0.5)
    assert code_sim_score("bcb", "cc/=b") == 0.25
    assert code_sim_score("abcdefg", "abcdxyz") == round(100 * 8 / 14) / 100
    # upstream only strips leading newlines: a whitespace-only first line is the prediction,
    # whereas lm-eval skips blank lines and would score this 1.0
    assert code_sim_score("\n    \n" + gold, gold) == round(100 * 2 * 4 / (4 + len(gold))) / 100
    assert code_sim_score("", gold) == 0.0
    assert fuzz_ratio("", "") == 100 and fuzz_ratio("a", "") == 0  # fuzzywuzzy's guards, in order


def test_fuzz_ratio_is_difflib_sequence_matcher_with_autojunk():
    import difflib
    import random

    rng = random.Random(0)
    for n in (5, 40, 300):  # 300: difflib's autojunk (strings of 200+) is part of the definition
        for _ in range(50):
            a = "".join(rng.choice("ab c=(") for _ in range(rng.randint(1, n)))
            b = "".join(rng.choice("ab c=(") for _ in range(rng.randint(1, n)))
            want = 100 if a == b else round(100 * difflib.SequenceMatcher(None, a, b).ratio())
            assert fuzz_ratio(a, b) == want


def test_samsum_leading_newline_does_not_end_the_answer():
    """Upstream stops samsum at a newline token but never at the first generated one
    (min_length = prompt + 1), then scores the first line after leading newlines: an answer that
    opens with a newline is scored on its next line, not as ""."""
    from lm_eval.models.utils import postprocess_generated_text

    from lm_eval_dlmem.tasks import configs

    until = configs._longbench_task("samsum")["generation_kwargs"]["until"]
    assert until == configs._longbench_task("samsum_e")["generation_kwargs"]["until"]
    doc = {"dataset": "samsum", "answers": ["Tom will bring the cake."], "all_classes": [], "length": 10}
    generated = "\nTom will bring the cake.\nDialogue: Ann: hi"
    returned = postprocess_generated_text(generated, until, None)  # what the harness returns
    assert longbench.score(doc, [returned])["score"] == pytest.approx(100.0)
    # and the line after the answer never counts
    assert longbench.score(doc, ["Tom will bring the cake.\nTom will bring the cake. Extra"])["score"] == pytest.approx(100.0)


def test_longbench_score_first_line_cut_for_few_shot_tasks():
    doc = {"dataset": "trec", "answers": ["Human"], "all_classes": ["Human", "Location", "Entity"], "length": 10}
    # trec scores only the first line (after leading newlines): "Human" -> 100, not 1/2
    assert longbench.score(doc, ["\n\nHuman\nQuestion: Where is X?\nType: Location"])["score"] == 100.0
    hotpot = {"dataset": "hotpotqa", "answers": ["E. Crane", "Edith Crane"], "all_classes": [], "length": 10}
    assert longbench.score(hotpot, ["Edith Crane"]) == {"score": 100.0, "qa_f1_score": 100.0}  # best answer
    # not a few-shot task: the whole prediction counts ([edith, crane, more, lines] vs [edith, crane])
    assert longbench.score(hotpot, ["Edith Crane\nmore lines"])["score"] == pytest.approx(200 / 3)


def test_longbench_e_length_buckets():
    doc = {"dataset": "hotpotqa_e", "answers": ["x"], "all_classes": [], "length": 5100}
    out = longbench.score(doc, ["x"])
    assert out["score_4_8k"] == 100.0 and out["score_0_4k"] == -1.0 and out["score_8k_plus"] == -1.0
    assert longbench.mean_present([-1.0, 50.0, 100.0]) == 75.0
    assert math.isnan(longbench.mean_present([-1.0]))
