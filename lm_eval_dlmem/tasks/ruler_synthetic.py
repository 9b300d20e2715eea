"""RULER's variable tracking (vt), common words (cwe) and frequent words (fwe) generators.

Re-implemented from the upstream descriptions (`scripts/data/synthetic/variable_tracking.py`,
`common_words_extraction.py`, `freq_words_extraction.py`), with the upstream templates, answer
prefixes, few-shot examples and fixed-seed shuffles. Each `make_*` takes a per-sample RNG and a
size in units (noise sentences, distinct words, coded words) and returns
(input, answer_prefix, answers).
"""

from __future__ import annotations

import random
import string

from .ruler_niah import noise_lines
from .text import common_words

VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
    "Question: Find all variables that are assigned the value {query} in the text above."
)
VT_PREFIX = (
    " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables "
    "are assigned the value {query}, they are: "
)
CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n{context}\n"
    "Question: What are the 10 most common words in the above list?"
)
CWE_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
FWE_TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. Find the three most "
    "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore "
    "the dots '....'. What are the three most frequently appeared words in the above coded text?"
)
FWE_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"

VT_HOPS, VT_CHAINS = 4, 1
VT_MIN_UNITS = 5 * VT_HOPS + 1  # noise sentences giving the hops + 1 lines a chain needs
CWE_NUM_COMMON, CWE_FREQ_COMMON, CWE_FREQ_UNCOMMON = 10, 30, 3
FWE_ALPHA, FWE_WORD_LEN = 2.0, 6


# ---------------------------------------------------------------------------------------------
# Variable tracking
# ---------------------------------------------------------------------------------------------


def _chains(rng: random.Random, icl: bool) -> tuple[list[list[str]], list[list[str]]]:
    k, hops = (3, min(10, VT_HOPS)) if icl else (5, VT_HOPS)
    need = (hops + 1) * VT_CHAINS
    names = ["".join(rng.choices(string.ascii_uppercase, k=k)) for _ in range(need)]
    while len(set(names)) < need:
        names.append("".join(rng.choices(string.ascii_uppercase, k=k)))
    # a repeated name is drawn again, as upstream does; keeping the repeat (upstream) would leave a
    # short last group and a chain that reuses a variable
    names = list(dict.fromkeys(names))
    groups, chains = [], []
    for i in range(0, len(names), hops + 1):
        group = names[i:i + hops + 1]
        value = "12345" if icl else str(rng.randint(10000, 99998))
        groups.append(group)
        chains.append([f"VAR {group[0]} = {value}"] + [f"VAR {group[j + 1]} = VAR {group[j]} " for j in range(hops)])
    return groups, chains


def vt_body(rng: random.Random, units: int, icl: bool = False) -> tuple[str, str, list[str]]:
    """The task text (no example) with `units` noise sentences: (input, prefix, answers)."""
    groups, chains = _chains(rng, icl)
    value = chains[0][0].split("=")[-1].strip()
    lines = noise_lines(units)
    for chain in chains:
        positions = sorted(rng.sample(range(len(lines)), len(chain)))
        for j, pos in enumerate(positions):
            lines.insert(pos + j, chain[j])
    context = "\n".join(lines).replace(". \n", ".\n")
    return (VT_TEMPLATE.format(context=context, query=value),
            VT_PREFIX.format(num_v=VT_HOPS + 1, query=value), groups[0])


def vt_example(rng: random.Random, units: int) -> str:
    """The one in-context example (3-letter names, value 12345), answered, as upstream builds it."""
    text, prefix, answers = vt_body(rng, units, icl=True)
    return text + prefix + " " + " ".join(answers) + "\n"


def randomize_example(example: str, rng: random.Random) -> str:
    """Fresh names and value for the example of each sample (upstream `randomize_icl`)."""
    for name in example.strip().split()[-(VT_HOPS + 1):]:
        example = example.replace(name, "".join(rng.choices(string.ascii_uppercase, k=len(name))))
    return example.replace("12345", str(rng.randint(10000, 99998)))


def make_vt(rng: random.Random, units: int, example: str) -> tuple[str, str, list[str]]:
    text, prefix, answers = vt_body(rng, units)
    return randomize_example(example, rng) + "\n" + text, prefix, answers


# ---------------------------------------------------------------------------------------------
# Common words extraction
# ---------------------------------------------------------------------------------------------


def _cwe_pool(seed: int) -> list[str]:
    words = list(common_words())
    random.Random(seed).shuffle(words)
    return words


def _cwe_list(rng, pool, seed, num_words, freq_common, freq_uncommon) -> tuple[str, list[str]]:
    chosen = rng.sample(pool, num_words)
    common, uncommon = chosen[:CWE_NUM_COMMON], chosen[CWE_NUM_COMMON:]
    listing = common * freq_common + uncommon * freq_uncommon
    random.Random(seed).shuffle(listing)
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(listing)), common


def cwe_max_units() -> int:
    return len(common_words())


def make_cwe(rng: random.Random, units: int, *, seed: int, short: bool) -> tuple[str, str, list[str]]:
    """`units` distinct words; `short` (contexts under 4096 tokens) uses upstream's 6/1 and 3/1 repeats."""
    pool = _cwe_pool(seed)
    if units > len(pool):
        raise ValueError(f"CWE needs {units} distinct words but wonderwords has {len(pool)}.")
    example_size, example_freq, freq = ((20, (3, 1), (6, 1)) if short else
                                        (40, (10, 3), (CWE_FREQ_COMMON, CWE_FREQ_UNCOMMON)))
    ex_context, ex_answer = _cwe_list(rng, pool, seed, example_size, *example_freq)
    context, answer = _cwe_list(rng, pool, seed, units, *freq)
    example = (CWE_TEMPLATE.format(context=ex_context) + CWE_PREFIX + " "
               + " ".join(f"{i + 1}. {w}" for i, w in enumerate(ex_answer)))
    return example + "\n" + CWE_TEMPLATE.format(context=context), CWE_PREFIX, answer


# ---------------------------------------------------------------------------------------------
# Frequent words extraction
# ---------------------------------------------------------------------------------------------


def zeta(s: float, terms: int = 100) -> float:
    """Riemann zeta for s > 1 (Euler-Maclaurin tail after `terms` terms; error < 1e-12 here)."""
    if s <= 1:
        raise ValueError("zeta(s) needs s > 1")
    n = float(terms)
    head = sum(k ** -s for k in range(1, terms))
    tail = n ** (1 - s) / (s - 1) + n ** -s / 2 + s * n ** (-s - 1) / 12
    return head + tail - s * (s + 1) * (s + 2) * n ** (-s - 3) / 720


def fwe_vocab_size(length: int) -> int:
    """Upstream: (max_seq_length - tokens_to_generate) // 50."""
    return (length - 50) // 50


def make_fwe(rng: random.Random, units: int, *, seed: int, vocab_size: int) -> tuple[str, str, list[str]]:
    """`units` scales a zeta(2) distribution of word counts over a synthetic 6-letter vocabulary;
    the most frequent word is replaced by '...' (noise) and the answer is ranks 2-4."""
    vocab = ["".join(rng.choices(string.ascii_lowercase, k=FWE_WORD_LEN)) for _ in range(vocab_size)]
    while len(set(vocab)) < vocab_size:
        vocab.append("".join(rng.choices(string.ascii_lowercase, k=FWE_WORD_LEN)))
    vocab = sorted(set(vocab))
    random.Random(seed).shuffle(vocab)
    vocab[0] = "..."
    z = zeta(FWE_ALPHA)
    words = [w for k, w in enumerate(vocab, start=1) for _ in range(int(units * k ** -FWE_ALPHA / z))]
    random.Random(seed).shuffle(words)
    return FWE_TEMPLATE.format(context=" ".join(words)), FWE_PREFIX, vocab[1:4]
