"""BABILong (booydar/babilong) qa1-qa5 for lm-eval, from the hub or generated offline.

Prompt: upstream's default template (`babilong/prompts.py`): instruction, in-context examples and
post-prompt, then the story inside `<context>` tags and "Question: ...", as one user turn with
no answer prefix; 20 new tokens, greedy. Scoring: upstream's `compare_answers` (`metrics.py`).

Data (`--metadata babilong_source=auto|hub|generate`, default auto):

- hub: `RMT-team/babilong` (100 samples per task and length, the official set) or, with
  `--metadata babilong_dataset=RMT-team/babilong-1k-samples`, the 1000-sample set lm-eval uses.
  Its lengths are in GPT-2 tokens (upstream's unit).
- generate: bAbI-style stories (`babi.py`) hidden in filler prose (`text.prose_sentences`), sized
  so the whole rendered prompt fills the length (1k = 1000 tokens, as upstream) in the evaluated
  model's tokens to within a few tokens; "0k" is the facts alone. `num_samples` (default 100) and
  `data_seed` (default 42) set the amount and the draw; `template_tokens` (default 0) leaves
  room for a chat template.
- auto: the hub when it is reachable, else generate (a warning says so; each doc records its
  `source`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache

from .babi import TASKS, make_story
from .common import (
    key_request_cache_by_metadata,
    metadata_hint,
    TaskDataError,
    TokenCounter,
    data_seed,
    from_hub,
    hub_known_unreachable,
    int_option,
    load_sizing_tokenizer,
    option,
    require_tokenizer_name,
    sample_bar,
    sample_rng,
    to_dataset,
)
from .metrics import TASK_LABELS, compare_answers
from .text import prose_sentences

log = logging.getLogger(__name__)

# "512" (tokens, for smoke-testing small models) is the shortest length with room for filler: the
# instructions and examples of qa1-qa5 alone are 170-330 tokens of the tiny default's tokenizer.
LENGTHS = {"0k": 0, "512": 512, "1k": 1000, "2k": 2000, "4k": 4000, "8k": 8000, "16k": 16000, "32k": 32000}
HUB_DATASETS = ("RMT-team/babilong", "RMT-team/babilong-1k-samples")
GENERATED_ONLY = ("512",)  # lengths the hub sets do not have: always generated
MAX_NEW_TOKENS = 20
DEFAULT_NUM_SAMPLES = 100
FILLER_POOL = 20000  # filler starts at a random one of this many prose sentences
_WARNED: set[tuple] = set()  # warnings already given in this process
TEMPLATE = "{instruction}\n\n{examples}\n\n{post_prompt}\n\n<context>\n{context}\n</context>\n\nQuestion: {question}"


@dataclass(frozen=True)
class BabilongPrompt:
    instruction: str
    examples: str
    post_prompt: str


# Upstream DEFAULT_PROMPTS for qa1-qa5, verbatim (typos, missing spaces and ’ quotes included).
PROMPTS = {
    "qa1": BabilongPrompt(
        instruction=(
            'I will give you context with the facts about positions of different persons hidden '
            'in some random text and a question. You need to answer the question based only on '
            'the information from the facts. If a person was in different locations, use the latest '
            'location to answer the question.'
        ),
        examples=(
            '<example>\n'
            'Charlie went to the hallway. Judith come back to the kitchen. Charlie travelled to '
            'balcony. Where is Charlie?\n'
            'Answer: The most recent location of Charlie is balcony.\n'
            '</example>\n'
            '\n'
            '<example>\n'
            'Alan moved to the garage. Charlie went to the beach. Alan went to the shop. Rouse '
            'travelled to balcony. Where is Alan?\n'
            'Answer: The most recent location of Alan is shop.\n'
            '</example>'
        ),
        post_prompt=(
            'Always return your answer in the following format: The most recent location of ’person’ '
            'is ’location’. Do not write anything else after that.'
        ),
    ),
    "qa2": BabilongPrompt(
        instruction=(
            'I give you context with the facts about locations and actions of different persons '
            'hidden in some random text and a question.You need to answer the question based only '
            'on the information from the facts.\n'
            'If a person got an item in the first location and travelled to the second location '
            'the item is also in the second location. If a person dropped an item in the first '
            'location and moved to the second location the item remains in the first location.'
        ),
        examples=(
            '<example>\n'
            'Charlie went to the kitchen. Charlie got a bottle. Charlie moved to the balcony. '
            'Where is the bottle?\n'
            'Answer: The bottle is in the balcony.\n'
            '</example>\n'
            '<example>\n'
            'Alan moved to the garage. Alan got a screw driver. Alan moved to the kitchen. Where '
            'is the screw driver?\n'
            'Answer: The screw driver is in the kitchen.\n'
            '</example>'
        ),
        post_prompt=(
            'Always return your answer in the following format: The ’item’ is in ’location’. Do '
            'not write anything else after that.'
        ),
    ),
    "qa3": BabilongPrompt(
        instruction=(
            'I give you context with the facts about locations and actions of different persons '
            'hidden in some random text and a question. You need to answer the question based '
            'only on the information from the facts.\n'
            'If a person got an item in the first location and travelled to the second location '
            'the item is also in the second location. If a person dropped an item in the first '
            'location and moved to the second location the item remains in the first location.'
        ),
        examples=(
            '<example>\n'
            'John journeyed to the bedroom. Mary grabbed the apple. Mary went back to the bathroom. '
            'Daniel journeyed to the bedroom. Daniel moved to the garden. Mary travelled to the '
            'kitchen. Where was the apple before the kitchen?\n'
            'Answer: Before the kitchen the apple was in the bathroom.\n'
            '</example>\n'
            '<example>\n'
            'John went back to the bedroom. John went back to the garden. John went back to the '
            'kitchen. Sandra took the football. Sandra travelled to the garden. Sandra journeyed '
            'to the bedroom. Where was the football before the bedroom?\n'
            'Answer: Before the bedroom the football was in the garden.\n'
            '</example>'
        ),
        post_prompt=(
            'Always return your answer in the following format: Before the $location_1$ the $item$ '
            'was in the $location_2$. Do not write anything else after that.'
        ),
    ),
    "qa4": BabilongPrompt(
        instruction=(
            'I will give you context with the facts about different people, their location and '
            'actions, hidden in some random text and a question. You need to answer the question '
            'based only on the information from the facts.'
        ),
        examples=(
            '<example>\n'
            'The hallway is south of the kitchen. The bedroom is north of the kitchen. What is '
            'the kitchen south of?\n'
            'Answer: bedroom\n'
            '</example>\n'
            '<example>\n'
            'The garden is west of the bedroom. The bedroom is west of the kitchen. What is west '
            'of the bedroom?\n'
            'Answer: garden\n'
            '</example>'
        ),
        post_prompt=(
            'Your answer should contain only one word - location. Do not write anything else after '
            'that.'
        ),
    ),
    "qa5": BabilongPrompt(
        instruction=(
            'I will give you context with the facts about locations and their relations hidden '
            'in some random text and a question. You need to answer the question based only on '
            'the information from the facts.'
        ),
        examples=(
            '<example>\n'
            'Mary picked up the apple there. Mary gave the apple to Fred. Mary moved to the bedroom. '
            'Bill took the milk there. Who did Mary give the apple to?\n'
            'Answer: Fred\n'
            '</example>\n'
            '<example>\n'
            'Jeff took the football there. Jeff passed the football to Fred. Jeff got the milk '
            'there. Bill travelled to the bedroom. Who gave the football?\n'
            'Answer: Jeff\n'
            '</example>\n'
            '<example>\n'
            'Fred picked up the apple there. Fred handed the apple to Bill. Bill journeyed to '
            'the bedroom. Jeff went back to the garden. What did Fred give to Bill?\n'
            'Answer: apple\n'
            '</example>'
        ),
        post_prompt=(
            'Your answer should contain only one word. Do not write anything else after that. '
            'Do not explain your answer.'
        ),
    ),}


def render(task: str, context: str, question: str) -> str:
    """The full prompt, as upstream `get_formatted_input` (context and result stripped)."""
    p = PROMPTS[task]
    return TEMPLATE.format(instruction=p.instruction, examples=p.examples, post_prompt=p.post_prompt,
                           context=context.strip(), question=question).strip()


# ---------------------------------------------------------------------------------------------
# Offline generation
# ---------------------------------------------------------------------------------------------


def _interleave(facts: tuple[str, ...], filler: list[str], rng) -> str:
    """Facts at sorted random positions between filler sentences (upstream NoiseInjectionDataset)."""
    slots: list[list[str]] = [[] for _ in range(len(filler) + 1)]
    for fact, pos in zip(facts, sorted(rng.choices(range(len(filler) + 1), k=len(facts)))):
        slots[pos].append(fact)
    for i, sentence in enumerate(filler):
        slots[i].append(sentence)
    return "".join(" " + s for slot in slots for s in slot).strip()


def _filler(room: int, start: int, count: TokenCounter) -> list[str]:
    """Prose sentences from sentence `start` on, filling `room` tokens; the last one is cut to fit,
    as upstream's `SentenceSampler` cuts the tokens of its last sentence."""
    filler, used, pos, chunk = [], 0, start, 64
    while True:
        pool = prose_sentences(pos + chunk)[pos:]
        for sentence, size in zip(pool, count.many([" " + s for s in pool])):
            if used + size > room:
                cut = count.decode(count.encode(" " + sentence)[:max(room - used, 0)]).strip()
                return filler + ([cut] if cut else [])
            filler.append(sentence)
            used += size
        pos, chunk = pos + len(pool), 2 * chunk


def generate_sample(task: str, length: int, index: int, seed: int, count: TokenCounter, reserve: int = 0) -> dict:
    """One story hidden in filler prose; the rendered prompt fills `length - reserve` tokens
    (`reserve`: tokens left free for a chat template), never more."""
    rng = sample_rng(seed, "babilong", task, length, index)
    story = make_story(task, rng)
    if length == 0:
        return _row(task, " ".join(story.facts), story.question, story.answer, count, "generated")
    target = length - reserve
    room = target - count(render(task, "", story.question)) - sum(count.many([" " + f for f in story.facts]))
    if room < 0 and (task, length) not in _WARNED:
        _WARNED.add((task, length))
        log.warning("BABILong %s: instructions, examples and facts alone exceed %d tokens for some samples; "
                    "those samples have no filler and are longer than the target.", task, length)
    filler = _filler(room, rng.randrange(FILLER_POOL), count)
    positions_rng = lambda: sample_rng(seed, "babilong-positions", task, length, index)  # noqa: E731
    context = _interleave(story.facts, filler, positions_rng())
    while filler and count(render(task, context, story.question)) > target:
        filler.pop()  # joined text can take a token more than its sentences counted apart
        context = _interleave(story.facts, filler, positions_rng())
    return _row(task, context, story.question, story.answer, count, "generated")


def _row(task: str, context: str, question: str, target: str, count: TokenCounter | None, source: str) -> dict:
    prompt = render(task, context, question)
    return {"task": task, "input": context, "question": question, "target": target, "prompt": prompt,
            "length": count(prompt) if count else -1, "source": source}


@lru_cache(maxsize=64)
def _generated(task: str, length: int, num_samples: int, seed: int, tokenizer: str, reserve: int):
    count = TokenCounter(load_sizing_tokenizer(tokenizer))
    rows = []
    with sample_bar(f"BABILong {task} at {length} tokens", num_samples) as bar:
        for i in range(num_samples):
            rows.append(generate_sample(task, length, i, seed, count, reserve))
            bar.update(1)
    return to_dataset(rows)


# ---------------------------------------------------------------------------------------------
# Hub data and the lm-eval entry points
# ---------------------------------------------------------------------------------------------


@lru_cache(maxsize=64)
def _from_hub(task: str, length_name: str, dataset: str):
    import datasets

    hint = f"Use {metadata_hint('babilong_source', 'generate')} to build the samples offline."
    rows = from_hub(dataset, lambda: datasets.load_dataset(dataset, length_name, split=task), hint)
    return to_dataset(_row(task, r["input"], r["question"], r["target"], None, f"hub:{dataset}") for r in rows)


def load(babilong_task: str, babilong_length: str, **meta) -> dict:
    """lm-eval `custom_dataset`: `{"test": Dataset}` of one BABILong task at one length.

    Args:
        babilong_task: "qa1".."qa5".
        babilong_length: "0k", "512", "1k", "2k", "4k", "8k", "16k" or "32k".
        **meta: the run's metadata; see the module docstring for the knobs.
    """
    key_request_cache_by_metadata()
    if babilong_task not in TASKS:
        raise ValueError(f"babilong_task={babilong_task!r}; choose one of {', '.join(TASKS)}.")
    if babilong_length not in LENGTHS:
        raise ValueError(f"babilong_length={babilong_length!r}; choose one of {', '.join(LENGTHS)}.")
    source = str(option(meta, "babilong_source", env="LM_EVAL_DLMEM_BABILONG_SOURCE", default="auto"))
    if source not in ("auto", "hub", "generate"):
        raise ValueError(f"--metadata babilong_source={source!r}; choose auto, hub or generate.")
    dataset = str(option(meta, "babilong_dataset", default=HUB_DATASETS[0]))
    if babilong_length in GENERATED_ONLY:
        if source == "hub":
            raise ValueError(f"babilong_length={babilong_length!r} has no hub data ({dataset} starts at 0k, 1k); "
                             "use --metadata babilong_source=generate (or auto).")
        source = "generate"
    if source == "hub" or (source == "auto" and not hub_known_unreachable(dataset)):
        try:
            return {"test": _from_hub(babilong_task, babilong_length, dataset)}
        except TaskDataError:
            if source == "hub":
                raise
            log.warning("BABILong: %s is not reachable; generating bAbI-style samples offline instead.", dataset)
    elif source == "auto" and ("auto", dataset) not in _WARNED:
        _WARNED.add(("auto", dataset))
        log.warning("BABILong: the hub is switched off; generating bAbI-style samples offline instead of %s.", dataset)
    tokenizer = require_tokenizer_name(meta, "BABILong (offline generation)")
    rows = _generated(babilong_task, LENGTHS[babilong_length], int_option(meta, "num_samples", DEFAULT_NUM_SAMPLES, 1),
                      data_seed(meta), tokenizer, int_option(meta, "template_tokens", 0))
    return {"test": rows}


def score(doc: dict, results: list[str]) -> dict:
    """`process_results`: upstream compare_answers, 0-100."""
    ok = compare_answers(doc["target"], results[0], doc["question"], TASK_LABELS[doc["task"]])
    return {"score": 100.0 * ok}
