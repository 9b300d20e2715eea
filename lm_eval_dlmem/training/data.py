"""Supervised fine-tuning data for the trainers: (prompt, response) pairs from a local file or a
Hub dataset, tokenised with the model's chat template, and collated into right-padded batches.

Shapes: B batch, L longest example in the batch. The prompt is never masked by the trainers, so
every example carries `prompt_len` and every batch a `prompt_mask` [B, L].
"""

from __future__ import annotations

import json
import os

import torch

TRUNCATION = ("filter", "right")
_NAMES = ("Mary", "John", "Daniel", "Sandra", "Fred", "Bill")
_PLACES = ("bathroom", "hallway", "office", "garden", "kitchen", "bedroom")


def load_pairs(source: str, *, split: str = "train", limit: int | None = None) -> list[tuple[str, str]]:
    """Read (prompt, response) pairs.

    Args:
        source: a local `.jsonl` / `.json` file, or a Hub dataset id (e.g. `Yukang/LongAlpaca-12k`)
            read with `datasets.load_dataset`. Records may use `prompt`/`response`,
            Alpaca's `instruction` (+ `input`) / `output`, or chat `messages` (the last
            assistant message is the response, everything before it the prompt).
        split: dataset split for Hub ids (ignored for local files).
        limit: keep at most this many pairs (the first ones).

    Returns:
        list of (prompt, response) string pairs.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit={limit} must be >= 0 (or None for all pairs).")
    records = _read_records(source, split, limit)
    pairs = []
    for i, record in enumerate(records):
        if limit is not None and len(pairs) >= limit:
            break
        pairs.append(record_to_pair(record, where=f"{source} record {i}"))
    return pairs


def _read_records(source: str, split: str, limit: int | None):
    path = os.path.expanduser(source)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            if path.endswith(".jsonl"):
                return [json.loads(line) for line in f if line.strip()]
            data = json.load(f)
        if isinstance(data, dict):
            data = data.get("data", data.get(split))
        if not isinstance(data, list):
            raise ValueError(f"{source} must hold a JSON list of records (or {{'data': [...]}}).")
        return data
    if source.startswith((".", "/", "~")) or source.endswith((".json", ".jsonl")):
        raise FileNotFoundError(f"Data file {source!r} does not exist; pass a .jsonl/.json file or a Hub dataset id.")
    import datasets

    hub_split = f"{split}[:{limit}]" if limit is not None else split
    return datasets.load_dataset(source, split=hub_split)


def record_to_pair(record: dict, *, where: str = "record") -> tuple[str, str]:
    """One record in any supported layout -> (prompt, response)."""
    if "messages" in record:
        return _messages_to_pair(record["messages"], where)
    if "prompt" in record and "response" in record:
        return str(record["prompt"]), str(record["response"])
    if "instruction" in record and "output" in record:
        # Alpaca / LongAlpaca: instruction and optional input separated by a blank line.
        instruction = (record.get("instruction") or "").strip()
        extra = (record.get("input") or "").strip()
        prompt = f"{instruction}\n\n{extra}" if extra else instruction
        return prompt, (record.get("output") or "").strip()
    raise ValueError(
        f"{where} has keys {sorted(record)}; expected prompt/response, instruction(+input)/output, "
        "or a chat `messages` list."
    )


def _messages_to_pair(messages: list, where: str) -> tuple[str, str]:
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError(f"{where}: `messages` must end with an assistant message (the response).")
    history = [m for m in messages[:-1] if m.get("role") != "system"]
    if not history:
        raise ValueError(f"{where}: `messages` has no user message before the response.")
    if len(history) == 1:
        prompt = history[0]["content"]
    else:
        # Multi-turn history becomes one user turn, earlier turns labelled by role.
        prompt = "\n\n".join(f"{m['role']}: {m['content']}" for m in history)
    return prompt, messages[-1]["content"]


def tokenize_pairs(
    pairs,
    tokenizer,
    *,
    max_length: int,
    chat_template: bool = True,
    truncation: str = "filter",
) -> list[dict]:
    """Tokenise pairs as one user turn and the assistant's answer.

    The prompt and the response are tokenised separately and concatenated, so `prompt_len` is
    exact (no BPE merge across the boundary). Without a chat template the response ends with EOS.

    Args:
        pairs: iterable of (prompt, response).
        tokenizer: a HF tokenizer (with a chat template when `chat_template` is True).
        max_length: longest example kept, in tokens.
        chat_template: wrap the prompt in the chat template (user turn + generation prompt).
        truncation: `filter` drops over-long examples (the MemDLM paper's text); `right` cuts
            the response to fit and drops only examples whose prompt alone is longer than
            `max_length` (dllm's `post_process_dataset`, the released MemDLM training's default).

    Returns:
        list of {"input_ids": list[int], "prompt_len": int}.
    """
    if truncation not in TRUNCATION:
        raise ValueError(f"truncation={truncation!r}; choose one of {TRUNCATION}.")
    if max_length <= 0:
        raise ValueError(f"max_length={max_length} must be > 0.")
    examples = []
    for prompt, response in pairs:
        prompt_ids, response_ids = _encode_pair(prompt, response, tokenizer, chat_template)
        ids = prompt_ids + response_ids
        if len(ids) > max_length:
            if truncation == "filter" or len(prompt_ids) > max_length:
                continue
            ids = ids[:max_length]
        examples.append({"input_ids": ids, "prompt_len": len(prompt_ids)})
    return examples


def _encode_pair(prompt: str, response: str, tokenizer, chat_template: bool):
    if not chat_template:
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
        return prompt_ids, response_ids + [tokenizer.eos_token_id]
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("The tokenizer has no chat template; pass chat_template=False for plain text.")
    turn = [{"role": "user", "content": prompt}]
    prompt_text = tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(
        turn + [{"role": "assistant", "content": response}], tokenize=False
    )
    if not full_text.startswith(prompt_text):
        raise ValueError(
            "The chat template renders the prompt differently with and without the answer; "
            "pass chat_template=False or fix the template."
        )
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(full_text[len(prompt_text):], add_special_tokens=False)["input_ids"]
    return prompt_ids, response_ids


def collate(examples: list[dict], pad_id: int) -> dict:
    """Right-pad examples into a batch.

    Args:
        examples: dicts from `tokenize_pairs`.
        pad_id: padding token (EOS for the diffusion LMs: trainers learn to predict it).

    Returns:
        {"input_ids": Long [B, L], "attention_mask": Long [B, L] (1 on real tokens),
         "prompt_mask": bool [B, L] (True on prompt tokens)}.
    """
    if not examples:
        raise ValueError("collate() needs at least one example.")
    L = max(len(e["input_ids"]) for e in examples)
    B = len(examples)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(B, L, dtype=torch.long)
    prompt_mask = torch.zeros(B, L, dtype=torch.bool)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[i, :n] = torch.tensor(e["input_ids"], dtype=torch.long)
        attention_mask[i, :n] = 1
        prompt_mask[i, : e["prompt_len"]] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "prompt_mask": prompt_mask}


def toy_pairs(n: int, *, seed: int = 0, facts: int = 4) -> list[tuple[str, str]]:
    """An offline bAbI-style set for smoke runs and tests: a few "X moved to the Y." facts, a
    question about one person, and the answer, which only the prompt can tell.

    Args:
        n: number of pairs.
        seed: seed of the random stories.
        facts: sentences per story.
    """
    import random

    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        names = rng.sample(_NAMES, facts)
        where = {name: rng.choice(_PLACES) for name in names}
        story = " ".join(f"{name} moved to the {where[name]}." for name in names)
        who = rng.choice(names)
        pairs.append((f"{story} Where is {who}?", f"{who} is in the {where[who]}."))
    return pairs
