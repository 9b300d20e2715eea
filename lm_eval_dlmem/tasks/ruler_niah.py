"""RULER's eight needle-in-a-haystack tasks (upstream `scripts/data/synthetic/niah.py`).

A needle is "One of the special magic {numbers|uuids} for {key} is: {value}."; keys are
wonderwords adjective-noun pairs, 7-digit numbers or UUIDs. Haystacks: `noise` (a fixed line of five
sentences, repeated), `needle` (distractor needles with random keys and values) or `essay` (see
`text.essay_words`). The size of a haystack is counted in *units*: essay words, noise sentences or
distractor needles. Noise is counted in sentences, not lines, so the haystack can end in a partial
line and the prompt lands within a sentence (~10 tokens) of the target length; everything else
follows upstream.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass

from .text import NOISE_LINE, NOISE_SENTENCES, haystack_words, random_key, split_sentences

TEMPLATE = (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
    "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?"
)
ANSWER_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
TOKENS_TO_GENERATE = 128
# Needle depths in percent: round(linspace(0, 100, 40)) as upstream.
DEPTHS = tuple(round(i * 100 / 39) for i in range(40))


@dataclass(frozen=True)
class NiahConfig:
    """One upstream niah task (`scripts/synthetic.yaml`)."""

    haystack: str  # noise | needle | essay
    key_type: str = "words"  # words | numbers | uuids
    value_type: str = "numbers"
    num_keys: int = 1
    num_values: int = 1
    num_queries: int = 1

    def __post_init__(self):
        if self.haystack not in ("noise", "needle", "essay"):
            raise ValueError(f"haystack={self.haystack!r}; choose noise, needle or essay.")
        for t in (self.key_type, self.value_type):
            if t not in ("words", "numbers", "uuids"):
                raise ValueError(f"needle type {t!r}; choose words, numbers or uuids.")
        if self.num_queries > self.num_keys:
            raise ValueError("num_queries cannot exceed num_keys (upstream raises num_keys to num_queries).")

    @property
    def num_needles(self) -> int:
        return self.num_keys * self.num_values


NIAH_TASKS = {
    "niah_single_1": NiahConfig("noise"),
    "niah_single_2": NiahConfig("essay"),
    "niah_single_3": NiahConfig("essay", value_type="uuids"),
    "niah_multikey_1": NiahConfig("essay", num_keys=4),
    "niah_multikey_2": NiahConfig("needle"),
    "niah_multikey_3": NiahConfig("needle", key_type="uuids", value_type="uuids"),
    "niah_multivalue": NiahConfig("essay", num_values=4),
    "niah_multiquery": NiahConfig("essay", num_keys=4, num_queries=4),
}


def random_item(kind: str, rng: random.Random) -> str:
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "words":
        return random_key(rng)
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def noise_lines(num_sentences: int) -> list[str]:
    """`num_sentences` noise sentences as full lines plus one partial last line."""
    full, rest = divmod(num_sentences, len(NOISE_SENTENCES))
    return [NOISE_LINE] * full + ([" ".join(NOISE_SENTENCES[:rest])] if rest else [])


def _insert_between_lines(lines: list[str], needles: list[str], rng: random.Random) -> str:
    if len(lines) < len(needles):
        raise ValueError("fewer haystack lines than needles")
    for index, needle in zip(sorted(rng.sample(range(len(lines)), len(needles)), reverse=True), needles):
        lines.insert(index, needle)
    return "\n".join(lines)


def _insert_at_depths(text: str, needles: list[str], rng: random.Random) -> str:
    sentences = split_sentences(text.strip())
    cuts = [int(len(sentences) * d / 100) for d in rng.sample(DEPTHS, len(needles))]
    bounds = [0, *sorted(cuts), len(sentences)]
    parts = []
    for i in range(1, len(bounds)):
        parts.append(" ".join(sentences[bounds[i - 1]:bounds[i]]))
        if i - 1 < len(needles):
            parts.append(needles[i - 1])
    return " ".join(parts)


def _template(cfg: NiahConfig) -> tuple[str, str, str]:
    """(template, answer prefix, needle value type) with upstream's singular rewrite."""
    template, type_v = TEMPLATE + ANSWER_PREFIX, cfg.value_type
    if cfg.num_queries * cfg.num_values == 1:
        for old, new in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
            template = template.replace(old, new)
        type_v = type_v[:-1]
    cut = template.rindex(" The special magic")
    return template[:cut], template[cut:], type_v


def make_sample(cfg: NiahConfig, rng: random.Random, units: int, *, seed: int, essay_source: str = "auto"):
    """One niah sample with a haystack of `units` units.

    Returns:
        (input, answer_prefix, answers): the prompt without the answer prefix, the prefix
        (the start of the answer, lm-eval's `gen_prefix`) and the values the answer must name.
    """
    keys, values, needles = [], [], []
    for _ in range(cfg.num_keys):
        keys.append(random_item(cfg.key_type, rng))
        values.append([random_item(cfg.value_type, rng) for _ in range(cfg.num_values)])
        needles += [NEEDLE.format(type_needle_v=cfg.value_type, key=keys[-1], value=v) for v in values[-1]]
    random.Random(seed).shuffle(needles)  # upstream shuffles with a fixed seed

    if cfg.haystack == "essay":
        context = _insert_at_depths(" ".join(haystack_words(essay_source, units)), needles, rng)
    elif cfg.haystack == "noise":
        context = _insert_between_lines(noise_lines(units), needles, rng)
    else:
        distractors = [
            NEEDLE.format(type_needle_v=cfg.value_type, key=random_item(cfg.key_type, rng),
                          value=random_item(cfg.value_type, rng))
            for _ in range(units)
        ]
        context = _insert_between_lines(distractors, needles, rng)

    picked = rng.sample(range(cfg.num_keys), cfg.num_queries)
    queries = [keys[i] for i in picked]
    answers = [v for i in picked for v in values[i]]
    query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
    template, prefix, type_v = _template(cfg)
    return (template.format(type_needle_v=type_v, context=context, query=query),
            prefix.format(type_needle_v=type_v, query=query), answers)


def min_units(cfg: NiahConfig) -> int:
    """Smallest haystack that can hold the needles (noise: one line per needle)."""
    if cfg.haystack == "noise":
        return len(NOISE_SENTENCES) * (cfg.num_needles - 1) + 1
    return 1 if cfg.haystack == "essay" else cfg.num_needles
