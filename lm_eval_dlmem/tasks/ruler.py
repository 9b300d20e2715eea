"""RULER (NVIDIA/RULER) for lm-eval: 13 tasks, any context length, sized with the model's tokenizer.

YAML entry points: `load(ruler_task=..., ruler_length=..., **metadata)` (the `custom_dataset`) and
`score_all` / `score_part` (`process_results`). Every sample is built so that its prompt
(input + answer prefix) plus the task's generation budget fits the target length in the
evaluated model's tokens, as upstream: the haystack size is found by binary search on one probe
sample, then each sample is checked and shrunk until it fits.

Metadata knobs (`--metadata`): `tokenizer` (else `pretrained`), `num_samples` (default 500, as
upstream), `data_seed` (default 42), `essay_source` (see `text.py`), `ruler_qa_dir` (see `ruler_qa.py`),
`template_tokens` (default 0: tokens left free for a chat template, which upstream counts in the length).
Scores are on RULER's 0-100 scale: `string_match_all` (fraction of references found in the
prediction) for niah/vt/cwe/fwe and `string_match_part` (1 if any reference is found) for QA;
both are also reported as `score`, which the groups average like RULER's per-length average.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Callable

from . import ruler_niah as niah
from . import ruler_qa as qa
from . import ruler_synthetic as syn
from .common import (
    key_request_cache_by_metadata,
    TaskDataError,
    TokenCounter,
    clean_prediction,
    data_seed,
    int_option,
    largest_fitting,
    load_sizing_tokenizer,
    option,
    require_tokenizer_name,
    sample_bar,
    sample_rng,
    to_dataset,
)
from .metrics import string_match_all, string_match_part

log = logging.getLogger(__name__)

TASKS = (*niah.NIAH_TASKS, "vt", "cwe", "fwe", "qa_squad", "qa_hotpot")
LENGTHS = {"256": 256, "512": 512, "1k": 1024, "2k": 2048, "4k": 4096, "8k": 8192, "16k": 16384, "32k": 32768}
# Below 1k only the needle tasks are registered: vt's in-context example alone is ~500 tokens
# (upstream builds it at 500), cwe's 10 x 30 words and 120-token budget do not fit either, and QA
# documents are longer than the whole context. niah_multikey_3's smallest haystack of UUID needles
# is ~310 tokens, so it starts at 512.
SHORT_TASKS = tuple(niah.NIAH_TASKS)
SHORT_MIN_LENGTH = {"niah_multikey_3": 512}
TOKENS_TO_GENERATE = {**{t: niah.TOKENS_TO_GENERATE for t in niah.NIAH_TASKS},
                      "vt": 30, "cwe": 120, "fwe": 50, "qa_squad": qa.TOKENS_TO_GENERATE,
                      "qa_hotpot": qa.TOKENS_TO_GENERATE}
# Short contexts shrink the generation budget to an eighth of the length (32 tokens at 256, 64 at
# 512): a 7-digit needle is a few tokens, and upstream's 128 would leave half of 256 for the prompt.
# At 1k and above min() keeps upstream's budgets unchanged.
GEN_BUDGET_FRACTION = 8


def tokens_to_generate(task: str, length: int) -> int:
    """The generation budget of `task` at `length` tokens: upstream's, capped at length / 8."""
    return min(TOKENS_TO_GENERATE[task], length // GEN_BUDGET_FRACTION)


def tasks_at(length_name: str) -> tuple[str, ...]:
    """The RULER tasks registered at one of `LENGTHS` (every task from 1k on, NIAH below)."""
    tokens = LENGTHS[length_name]
    return TASKS if tokens >= 1024 else tuple(t for t in SHORT_TASKS if SHORT_MIN_LENGTH.get(t, 0) <= tokens)


METRIC = {t: ("string_match_part" if t.startswith("qa_") else "string_match_all") for t in TASKS}
DEFAULT_NUM_SAMPLES = 500
VT_EXAMPLE_LENGTH = 500  # upstream builds the vt example at max_seq_length=500
# A sample is resized when it is more than 1% (or one haystack unit, if larger) short of its budget.
FIT_TOLERANCE, REFIT_STEPS = 0.01, 4


@dataclass(frozen=True)
class Options:
    """Everything besides task and length that changes the generated data (the cache key)."""

    tokenizer: str
    num_samples: int
    seed: int
    essay_source: str
    qa_dir: str | None
    template_tokens: int = 0  # left free for a chat template (upstream counts the model template)

    @classmethod
    def from_meta(cls, meta: dict, tokenizer: str) -> "Options":
        return cls(tokenizer=tokenizer, num_samples=int_option(meta, "num_samples", DEFAULT_NUM_SAMPLES, 1),
                   seed=data_seed(meta), essay_source=str(option(meta, "essay_source", default="auto")),
                   qa_dir=option(meta, "ruler_qa_dir", env="LM_EVAL_DLMEM_RULER_QA_DIR"),
                   template_tokens=int_option(meta, "template_tokens", 0))


@dataclass
class Generator:
    """A task at one length: `make(rng, units, index) -> (input, prefix, answers)` and its sizes."""

    make: Callable[[random.Random, int, int], tuple[str, str, list[str]]]
    min_units: Callable[[int], int]
    max_units: int
    haystack: str


def _generator(task: str, length: int, opts: Options, count: TokenCounter) -> Generator:
    seed, cap = opts.seed, 50 * length
    if task in niah.NIAH_TASKS:
        cfg = niah.NIAH_TASKS[task]
        make = partial(niah.make_sample, cfg, seed=seed, essay_source=opts.essay_source)
        label = cfg.haystack if cfg.haystack != "essay" else "essay:" + _essay_label(opts.essay_source)
        return Generator(lambda r, n, i: make(r, n), lambda i: niah.min_units(cfg), cap, label)
    if task == "vt":
        example = _vt_example(opts, count)
        return Generator(lambda r, n, i: syn.make_vt(r, n, example), lambda i: syn.VT_MIN_UNITS, cap, "noise")
    if task == "cwe":
        make = partial(syn.make_cwe, seed=seed, short=length < 4096)
        return Generator(lambda r, n, i: make(r, n), lambda i: syn.CWE_NUM_COMMON + 1, syn.cwe_max_units(), "words")
    if task == "fwe":
        make = partial(syn.make_fwe, seed=seed, vocab_size=syn.fwe_vocab_size(length))
        return Generator(lambda r, n, i: make(r, n), lambda i: 10, cap, "coded words")
    data = qa.load_qa("squad" if task == "qa_squad" else "hotpotqa", opts.qa_dir)
    return Generator(partial(qa.make_qa, data, seed=seed), partial(qa.min_units, data), cap, data.source)


def _essay_label(source: str) -> str:
    from .text import essay_words

    return essay_words(source)[1]


def _vt_example(opts: Options, count: TokenCounter) -> str:
    """The vt example: as many noise sentences as fit in 500 tokens (no generation budget)."""
    rng_for = lambda: sample_rng(opts.seed, "vt-example")  # noqa: E731
    units = largest_fitting(lambda n: count(syn.vt_example(rng_for(), n)), VT_EXAMPLE_LENGTH, syn.VT_MIN_UNITS, 2000)
    return syn.vt_example(rng_for(), units or syn.VT_MIN_UNITS)


def _search_units(measure: Callable[[int], int], budget: int, lo: int, cap: int) -> int | None:
    """Largest unit count whose probe fits: doubling to bracket it, then binary search."""
    if measure(lo) > budget:
        return None
    hi = lo
    while hi < cap and measure(min(2 * hi, cap)) <= budget:
        hi = min(2 * hi, cap)
    if hi == cap:
        return cap
    return largest_fitting(measure, budget, hi, min(2 * hi, cap))


def _refit(gen: Generator, i: int, rng_for, count: TokenCounter, budget: int, slack: float, units: int, size: int):
    """Resize sample i, whose tokens per unit differ from the probe's (e.g. fwe's random words):
    a few secant steps towards [budget - slack, budget], then shrink until it fits."""
    n, lo = units, gen.min_units(i)
    draft = gen.make(rng_for(i), n, i)
    for _ in range(REFIT_STEPS):
        if budget - slack <= size <= budget:
            return draft, size
        moved = n + int((budget - size) / max(size / n, 1e-6))
        moved = moved if moved != n else n + (1 if size < budget else -1)
        moved = min(max(moved, lo), gen.max_units)
        if moved == n:
            break
        n = moved
        draft = gen.make(rng_for(i), n, i)
        size = count(draft[0] + draft[1])
    step = max(1, n // 100)
    while size > budget and n > lo:
        n = max(lo, n - step)
        draft = gen.make(rng_for(i), n, i)
        size = count(draft[0] + draft[1])
    return draft, size


def generate(task: str, length: int, opts: Options, count: TokenCounter) -> list[dict]:
    """All samples of `task` at `length` tokens (prompt + generation budget <= length)."""
    gen = _generator(task, length, opts, count)
    reserve = tokens_to_generate(task, length)
    budget = length - reserve - opts.template_tokens
    rng_for = lambda i: sample_rng(opts.seed, task, length, i)  # noqa: E731
    text = lambda i, n: "".join(gen.make(rng_for(i), n, i)[:2])  # noqa: E731
    units = _search_units(lambda n: count(text(0, n)), budget, gen.min_units(0), gen.max_units)
    oversized = units is None
    if oversized:
        # Only a very inefficient tokenizer gets here (e.g. a tiny test checkpoint's): keep the
        # smallest haystack and say that the samples are longer than asked.
        units = gen.min_units(0)
        log.warning("RULER %s: even the smallest haystack needs %d prompt tokens + %d to generate, more than the "
                    "%d-token target; its samples are longer than the target.", task, count(text(0, units)),
                    reserve, length)
    lo = gen.min_units(0)
    unit_tokens = (count(text(0, units)) - count(text(0, lo))) / (units - lo) if units > lo else 0.0
    slack = max(FIT_TOLERANCE * budget, unit_tokens)
    drafts = [gen.make(rng_for(i), units, i) for i in range(opts.num_samples)]
    sizes = count.many([d[0] + d[1] for d in drafts])
    rows, skipped = [], []
    with sample_bar(f"RULER {task} at {length} tokens", opts.num_samples) as bar:
        for i, (draft, size) in enumerate(zip(drafts, sizes)):
            if not oversized and not budget - slack <= size <= budget:
                draft, size = _refit(gen, i, rng_for, count, budget, slack, units, size)
            bar.update(1)
            if not oversized and size > budget:
                skipped.append(i)
                continue
            rows.append({"index": i, "input": draft[0], "gen_prefix": draft[1], "outputs": list(draft[2]),
                         "target": ", ".join(draft[2]), "length": size + reserve,
                         "max_length": length, "haystack": gen.haystack})
    if skipped:
        # e.g. cwe with a small-vocabulary tokenizer: even the fewest words overflow some samples
        log.warning("RULER %s: %d of %d samples do not fit %d tokens even at their smallest and are skipped "
                    "(first: %s).", task, len(skipped), opts.num_samples, length, skipped[:5])
    if not rows:
        raise TaskDataError(f"RULER {task}: no sample fits {length} tokens.")
    return rows


@lru_cache(maxsize=32)
def _cached(task: str, length: int, opts: Options):
    return to_dataset(generate(task, length, opts, TokenCounter(load_sizing_tokenizer(opts.tokenizer))))


def parse_length(value) -> int:
    """4096, "4096" or "4k" -> 4096."""
    text = str(value).strip().lower()
    if text in LENGTHS:
        return LENGTHS[text]
    try:
        return int(float(text))
    except ValueError:
        raise ValueError(f"ruler_length={value!r}: give tokens (4096) or one of {sorted(LENGTHS)}.") from None


def load(ruler_task: str, ruler_length, **meta) -> dict:
    """lm-eval `custom_dataset`: `{"test": Dataset}` of one RULER task at one length.

    Args:
        ruler_task: one of `TASKS`.
        ruler_length: target length in the model's tokens (prompt + generation budget).
        **meta: the run's metadata (model args, `--metadata`); see the module docstring.
    """
    key_request_cache_by_metadata()
    if ruler_task not in TASKS:
        raise ValueError(f"ruler_task={ruler_task!r}; choose one of {', '.join(TASKS)}.")
    opts = Options.from_meta(meta, require_tokenizer_name(meta, "RULER"))
    return {"test": _cached(ruler_task, parse_length(ruler_length), opts)}


def _score(doc: dict, results: list[str], metric: Callable, name: str) -> dict:
    value = metric(clean_prediction(results[0]), list(doc["outputs"]))
    return {"score": value, name: value}


def score_all(doc: dict, results: list[str]) -> dict:
    """`process_results` of niah/vt/cwe/fwe: RULER's string_match_all, 0-100."""
    return _score(doc, results, string_match_all, "string_match_all")


def score_part(doc: dict, results: list[str]) -> dict:
    """`process_results` of the QA tasks: RULER's string_match_part (any reference), 0-100."""
    return _score(doc, results, string_match_part, "string_match_part")
