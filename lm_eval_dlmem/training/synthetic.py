"""Synthetic training data for the tiny default: short RULER-style retrieval and bAbI-style stories.

Every example is a (prompt, answer) pair in the exact text format of our evaluation tasks (RULER
templates and answer prefixes, BABILong's prompt), so a model trained on it can be scored by the
`dlmem_ruler_*` / `dlmem_babilong_*` tasks. The prompt ends with the task's answer prefix (what
lm-eval feeds as `gen_prefix`); the answer is what a perfect model writes next.

Disjoint from the evaluation data by construction: every example draws from its own RNG, seeded
with ("dlmem-train", seed, task, index), while the tasks seed theirs with ("42", task, length,
index); filler prose comes from a separately seeded stream, so even the haystack text differs
from the one the essay-haystack tasks use.

Training tasks (`TASKS`), each `make(rng, units) -> (prompt, answer)` where `units` sizes the
haystack (noise sentences, prose sentences or distractor needles):

    niah_noise       one needle in RULER's noise haystack                   (niah_single_1)
    niah_prose       one needle in prose                                    (niah_single_2)
    niah_multikey    four needles, one asked                                (niah_multikey_1)
    niah_needles     a haystack of distractor needles                       (niah_multikey_2)
    niah_multivalue  one key with four values                               (niah_multivalue)
    niah_multiquery  four keys asked together                               (niah_multiquery)
    vt               variable tracking, one chain of four hops              (vt)
    babi_qa1..5      bAbI-style stories hidden in prose                     (babilong qa1-qa5)
    copy             repeat a list of needle keys and numbers               (no task: a lookup drill)

`copy` teaches the lookup itself with a loss on every answer token: answer item j is prompt item
j, the same position-aligned copy a needle's seven digits need, at a tenth of the examples.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Iterator

from ..tasks import babi
from ..tasks import babilong
from ..tasks import ruler_niah as niah
from ..tasks import ruler_synthetic as syn
from ..tasks.text import _prose_sentence, wonderwords_list

TRAIN_NAMESPACE = "dlmem-train"


# ---------------------------------------------------------------------------------------------
# Haystacks
# ---------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _prose_pool() -> tuple[str, ...]:
    """Training filler: 4096 prose sentences from a stream seeded apart from the tasks' essay."""
    rng = random.Random(f"{TRAIN_NAMESPACE}-prose")
    return tuple(_prose_sentence(rng) for _ in range(4096))


def prose(rng: random.Random, sentences: int) -> list[str]:
    """`sentences` consecutive filler sentences from a random offset of the training pool."""
    pool = _prose_pool()
    start = rng.randrange(len(pool))
    return [pool[(start + i) % len(pool)] for i in range(sentences)]


def insert_in_order(units: list[str], items: list[str], rng: random.Random, sep: str) -> str:
    """Insert `items`, keeping their order, between `units` at random positions; join with `sep`."""
    slots = sorted(rng.choices(range(len(units) + 1), k=len(items)))
    parts, j = [], 0
    for i in range(len(units) + 1):
        while j < len(items) and slots[j] == i:
            parts.append(items[j])
            j += 1
        if i < len(units):
            parts.append(units[i])
    return sep.join(parts)


# ---------------------------------------------------------------------------------------------
# Needle in a haystack
# ---------------------------------------------------------------------------------------------


def random_item(kind: str, rng: random.Random) -> str:
    """A needle key or value. Word keys are drawn as RULER's (a uniform adjective-noun pair)
    without building the tasks' sorted table of all 6.2M pairs, which takes seconds."""
    if kind == "words":
        return f"{rng.choice(wonderwords_list('adjectivelist.txt'))}-{rng.choice(wonderwords_list('nounlist.txt'))}"
    return niah.random_item(kind, rng)


def _answer(values: list[str]) -> str:
    return " " + ", ".join(values) + "."


def make_niah(cfg: niah.NiahConfig, rng: random.Random, units: int) -> tuple[str, str]:
    """One RULER needle task in its upstream template; `prose` replaces the essay haystack."""
    keys, values, needles = [], [], []
    for _ in range(cfg.num_keys):
        keys.append(random_item(cfg.key_type, rng))
        values.append([random_item(cfg.value_type, rng) for _ in range(cfg.num_values)])
        needles += [niah.NEEDLE.format(type_needle_v=cfg.value_type, key=keys[-1], value=v) for v in values[-1]]
    rng.shuffle(needles)
    if cfg.haystack == "noise":
        context = insert_in_order(niah.noise_lines(units), needles, rng, "\n")
    elif cfg.haystack == "needle":
        distractors = [niah.NEEDLE.format(type_needle_v=cfg.value_type, key=random_item(cfg.key_type, rng),
                                          value=random_item(cfg.value_type, rng)) for _ in range(units)]
        context = insert_in_order(distractors, needles, rng, "\n")
    else:
        context = insert_in_order(prose(rng, units), needles, rng, " ")
    picked = rng.sample(range(cfg.num_keys), cfg.num_queries)
    queries = [keys[i] for i in picked]
    query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
    template, prefix, type_v = niah._template(cfg)
    prompt = template.format(type_needle_v=type_v, context=context, query=query)
    return prompt + prefix.format(type_needle_v=type_v, query=query), _answer([v for i in picked for v in values[i]])


def make_vt(rng: random.Random, units: int) -> tuple[str, str]:
    """Variable tracking with upstream's one in-context example; the `units` noise sentences are
    split evenly between the example and the task (at 1k tokens upstream's are ~500 and ~400)."""
    half = max(units // 2, syn.VT_MIN_UNITS)
    text, prefix, answers = syn.make_vt(rng, half, syn.vt_example(rng, half))
    return text + prefix, " ".join(answers)


def make_copy(rng: random.Random, units: int) -> tuple[str, str]:
    """A list of `units` needle keys and seven-digit numbers, then the same list as the answer."""
    items = [random_item(rng.choice(("words", "numbers")), rng) for _ in range(max(1, units))]
    listed = ", ".join(items)
    return f"Memorize this list: {listed}.\nRepeat the list exactly. The list is:", f" {listed}."


# ---------------------------------------------------------------------------------------------
# BABILong
# ---------------------------------------------------------------------------------------------


def babilong_answer(task: str, story: babi.Story) -> str:
    """The answer as the bare label (" kitchen."): BABILong's `compare_answers` scores the one
    label named in the first sentence, and a two-token answer is what a model this small can
    learn to place; the long form the prompt asks for ("The most recent location of Mary is
    kitchen.") scores the same."""
    return f" {story.answer}."


def make_babilong(task: str, rng: random.Random, units: int) -> tuple[str, str]:
    """A bAbI story (the tasks' own generator) hidden in `units` training prose sentences, in
    BABILong's prompt."""
    story = babi.make_story(task, rng)
    context = insert_in_order(prose(rng, units), list(story.facts), rng, " ")
    return babilong.render(task, context, story.question), babilong_answer(task, story)


# ---------------------------------------------------------------------------------------------
# Registry and sizing
# ---------------------------------------------------------------------------------------------


def _niah(name: str, **overrides) -> Callable[[random.Random, int], tuple[str, str]]:
    cfg = niah.NiahConfig(**overrides)
    return lambda rng, units: make_niah(cfg, rng, units)


TASKS: dict[str, Callable[[random.Random, int], tuple[str, str]]] = {
    "niah_noise": _niah("niah_noise", haystack="noise"),
    "niah_prose": _niah("niah_prose", haystack="essay"),
    "niah_multikey": _niah("niah_multikey", haystack="essay", num_keys=4),
    "niah_needles": _niah("niah_needles", haystack="needle"),
    "niah_multivalue": _niah("niah_multivalue", haystack="essay", num_values=4),
    "niah_multiquery": _niah("niah_multiquery", haystack="essay", num_keys=4, num_queries=4),
    "vt": make_vt,
    "copy": make_copy,
    **{f"babi_{t}": (lambda t: lambda rng, units: make_babilong(t, rng, units))(t) for t in babi.TASKS},
}
# Drills: trainable by name, not evaluation tasks, so `all`, the tokenizer corpus and the held-out
# task list leave them out (and the tiny default's recipe and tokenizer stay as they were).
DRILLS = frozenset({"copy"})
EVAL_TASKS = tuple(name for name in TASKS if name not in DRILLS)
# Haystack units that are ~10 tokens each (noise/prose sentences) vs ~25 (distractor needles)
UNIT_TOKENS = {"niah_needles": 25, "copy": 14}


@dataclass
class SyntheticConfig:
    """Which tasks, how long, from which seed.

    Args:
        tasks: task name -> sampling weight (names from `TASKS`).
        min_tokens / max_tokens: prompt + answer length range in the model's tokens; each example
            draws a target uniformly from it and is built to land at or under the target.
        seed: data seed; training uses one seed, held-out evaluation another.
    """

    tasks: dict[str, float] = field(default_factory=lambda: {name: 1.0 for name in TASKS})
    min_tokens: int = 256
    max_tokens: int = 1024
    seed: int = 0

    def __post_init__(self):
        unknown = sorted(set(self.tasks) - set(TASKS))
        if unknown:
            raise ValueError(f"Unknown synthetic task(s) {unknown}; choose from {sorted(TASKS)}.")
        if not self.tasks or any(w < 0 for w in self.tasks.values()) or sum(self.tasks.values()) <= 0:
            raise ValueError(f"tasks={self.tasks} needs at least one positive weight and no negative ones.")
        if not 32 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"Need 32 <= min_tokens ({self.min_tokens}) <= max_tokens ({self.max_tokens}).")


def parse_tasks(spec: str) -> dict[str, float]:
    """`"niah_noise:2,vt,babi_qa1:0.5"` -> {"niah_noise": 2.0, "vt": 1.0, "babi_qa1": 0.5}; `all` = every
    evaluation task (drills such as `copy` only by name)."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, weight = part.partition(":")
        names = list(EVAL_TASKS) if name == "all" else [name]
        for n in names:
            out[n] = float(weight) if weight else 1.0
    return out


def example_rng(seed: int, task: str, index: int) -> random.Random:
    return random.Random(f"{TRAIN_NAMESPACE}/{seed}/{task}/{index}")


def build_example(task: str, index: int, target: int, tokenizer, seed: int) -> dict:
    """One example of `task` of at most `target` tokens, prompt + answer, and at least 90% of it
    when a few haystack sizes get there. Tokens grow about linearly with haystack units on top
    of a fixed prompt, so each new size comes from the line through the last two measurements.
    When even the smallest haystack is longer than `target`, that smallest example is returned.

    Returns:
        {"input_ids": list[int], "prompt_len": int, "task": str, "prompt": str, "answer": str}.
    """
    make = TASKS[task]
    units, best, smallest, seen = max(1, target // UNIT_TOKENS.get(task, 10)), None, None, {}
    for _ in range(8):
        prompt, answer = make(example_rng(seed, task, index), units)
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        n = seen[units] = len(p_ids) + len(a_ids)
        example = {"input_ids": p_ids + a_ids, "prompt_len": len(p_ids), "task": task,
                   "prompt": prompt, "answer": answer}
        if n <= target and (best is None or n > len(best["input_ids"])):
            best = example
        if smallest is None or n < len(smallest["input_ids"]):
            smallest = example
        if target * 0.9 <= n <= target or (n > target and units == 1):
            break
        units = _next_units(seen, units, 0.95 * target)
    return best if best is not None else smallest  # the task's minimum is longer than `target`


def _next_units(seen: dict[int, int], last: int, goal: float) -> int:
    """Haystack size expected to give `goal` tokens, from the two latest (units, tokens) points."""
    pts = sorted(seen.items(), key=lambda kv: abs(kv[0] - last))[:2]
    if len(pts) == 2 and pts[0][0] != pts[1][0] and pts[0][1] != pts[1][1]:
        (u0, n0), (u1, n1) = pts
        slope = (n1 - n0) / (u1 - u0)
        guess = u0 + (goal - n0) / slope if slope > 0 else u0 * goal / n0
    else:
        guess = last * goal / seen[last]
    guess = max(1, int(guess))
    if guess in seen:  # never measure the same size twice: step away, in one direction
        step = 1 if seen[guess] < goal else -1
        while guess in seen and guess + step >= 1:
            guess += step
    return guess


def iter_examples(cfg: SyntheticConfig, tokenizer, start: int = 0) -> Iterator[dict]:
    """Endless deterministic stream of examples: example i depends only on (cfg, i)."""
    names = sorted(cfg.tasks)
    weights = [cfg.tasks[n] for n in names]
    i = start
    while True:
        rng = random.Random(f"{TRAIN_NAMESPACE}/{cfg.seed}/pick/{i}")
        task = rng.choices(names, weights)[0]
        target = rng.randint(cfg.min_tokens, cfg.max_tokens)
        yield build_example(task, i, target, tokenizer, cfg.seed)
        i += 1


def corpus_texts(n: int, seed: int = 0) -> list[str]:
    """Raw texts (prompt + answer) for training the tokenizer: n examples over every task."""
    texts = []
    for i in range(n):
        task = sorted(EVAL_TASKS)[i % len(EVAL_TASKS)]
        prompt, answer = TASKS[task](example_rng(seed, f"tok-{task}", i), 20)
        texts.append(prompt + answer)
    return texts
