"""ROUGE-L exactly as LongBench scores it: `rouge.Rouge().get_scores([pred], [ref], avg=True)
["rouge-l"]["f"]` from the `rouge` package (pltrdy, 1.0.1), re-implemented here.

That package's ROUGE-L is not the textbook one, and not what `rouge-score`'s `rougeL` computes:

- sentences are the pieces of `text.split(".")` (so Chinese text, which ends sentences with "。",
  is one sentence); words are split on single spaces after collapsing whitespace, with no
  lower-casing and no punctuation removal;
- for each reference sentence, the words of the longest common subsequence with every hypothesis
  sentence are added to a running *set* (the "union LCS"), and `m`, `n` are the numbers of
  *distinct* words in the reference and the hypothesis;
- R = |union| / m, P = |union| / n, F = 2PR / (P + R + 1e-8);
- an empty hypothesis or reference (nothing left after the split) raises in the package, which
  LongBench scores 0.

Which LCS is reconstructed when several exist matters (the union is a set of words), so the
backtracking below breaks ties as the package does. One difference remains: the package
reconstructs recursively and, for a sentence pair longer than about 1,000 words, hits Python's
recursion limit, which LongBench's bare `except` turns into a score of 0; here such pairs are scored.
"""

from __future__ import annotations


def _sentences(text: str) -> list[str]:
    return [" ".join(piece.split()) for piece in text.split(".") if len(piece) > 0]


def lcs_words(ref: list[str], hyp: list[str]) -> list[str]:
    """The words of one longest common subsequence of `ref` and `hyp` (package tie-breaking)."""
    if not set(ref) & set(hyp):
        return []
    n, m = len(ref), len(hyp)
    table = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        row, prev, word = table[i], table[i - 1], ref[i - 1]
        for j in range(1, m + 1):
            row[j] = prev[j - 1] + 1 if word == hyp[j - 1] else max(prev[j], row[j - 1])
    out, i, j = [], n, m
    while i > 0 and j > 0:
        if ref[i - 1] == hyp[j - 1]:
            out.append(ref[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return out[::-1]


def rouge_l_f(hypothesis: str, reference: str) -> float:
    """ROUGE-L F of the `rouge` package (summary level, union LCS over word sets), 0..1.

    Returns:
        The F value, or 0.0 where the package raises (empty hypothesis or reference).
    """
    hyp, ref = _sentences(hypothesis), _sentences(reference)
    if not hyp or not ref:
        return 0.0
    hyp_words = [s.split(" ") for s in hyp]
    m = len({w for s in ref for w in s.split(" ")})
    n = len({w for s in hyp_words for w in s})
    union: set[str] = set()
    for sentence in ref:
        words = sentence.split(" ")
        for h in hyp_words:
            union.update(lcs_words(words, h))
    recall, precision = len(union) / m, len(union) / n
    return 2.0 * ((precision * recall) / (precision + recall + 1e-8))
