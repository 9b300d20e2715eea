"""SFT data: record layouts, exact prompt lengths under the chat template, filtering, collation."""

import json

import pytest
import torch

from lm_eval_dlmem.testing import build_tokenizer
from lm_eval_dlmem.training.data import collate, load_pairs, record_to_pair, tokenize_pairs


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("llada")


@pytest.mark.parametrize(
    "record, pair",
    [
        ({"prompt": "Where is Mary?", "response": "kitchen"}, ("Where is Mary?", "kitchen")),
        ({"instruction": "Answer.", "input": "Where is Mary?", "output": " kitchen "},
         ("Answer.\n\nWhere is Mary?", "kitchen")),
        ({"instruction": "Answer.", "input": "", "output": "yes"}, ("Answer.", "yes")),
        ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                       {"role": "assistant", "content": "a"}]}, ("q", "a")),
        ({"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                       {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]},
         ("user: q1\n\nassistant: a1\n\nuser: q2", "a2")),
    ],
)
def test_record_layouts(record, pair):
    assert record_to_pair(record) == pair


def test_bad_record_names_the_layouts():
    with pytest.raises(ValueError, match="instruction"):
        record_to_pair({"question": "q", "answer": "a"})


def test_load_local_files(tmp_path):
    rows = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(5)]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    as_json = tmp_path / "d.json"
    as_json.write_text(json.dumps({"data": rows}))
    assert load_pairs(str(jsonl), limit=3) == [("p0", "r0"), ("p1", "r1"), ("p2", "r2")]
    assert len(load_pairs(str(as_json))) == 5
    with pytest.raises(FileNotFoundError):
        load_pairs(str(tmp_path / "missing.jsonl"))


def test_tokenize_prompt_len_and_truncation(tokenizer):
    pairs = [("Where is Mary?", "Mary is in the bathroom."), ("The grass is " * 40, "green")]
    ex = tokenize_pairs(pairs, tokenizer, max_length=64)
    assert len(ex) == 1  # the long one is filtered out
    ids, n = ex[0]["input_ids"], ex[0]["prompt_len"]
    prompt_text = tokenizer.decode(ids[:n])
    assert prompt_text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert tokenizer.decode(ids[n:]).startswith("Mary is in the bathroom.")
    right = tokenize_pairs([("Where is Mary?", "the answer is " * 30)], tokenizer, max_length=40, truncation="right")
    assert len(right[0]["input_ids"]) == 40 and right[0]["prompt_len"] < 40
    # dllm's right truncation drops only prompts longer than max_length (prompt_len <= max_length kept)
    n_prompt = tokenize_pairs([("Where is Mary?", "x")], tokenizer, max_length=999)[0]["prompt_len"]
    exact = tokenize_pairs([("Where is Mary?", "x")], tokenizer, max_length=n_prompt, truncation="right")
    assert [e["prompt_len"] for e in exact] == [n_prompt]
    assert tokenize_pairs([("Where is Mary?", "x")], tokenizer, max_length=n_prompt - 1, truncation="right") == []
    plain = tokenize_pairs([("q", "a")], tokenizer, max_length=16, chat_template=False)
    assert plain[0]["input_ids"][-1] == tokenizer.eos_token_id and plain[0]["prompt_len"] == 1


def test_collate_right_pads():
    batch = collate([{"input_ids": [5, 6, 7], "prompt_len": 2}, {"input_ids": [8], "prompt_len": 1}], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["prompt_mask"].dtype == torch.bool
    assert batch["prompt_mask"].tolist() == [[True, True, False], [True, False, False]]


def test_toy_pairs_answer_is_in_the_prompt():
    from lm_eval_dlmem.training.data import toy_pairs

    pairs = toy_pairs(20, seed=3)
    assert pairs == toy_pairs(20, seed=3) and pairs != toy_pairs(20, seed=4)
    for prompt, response in pairs:
        who, place = response.split(" is in the ")
        assert f"{who} moved to the {place[:-1]}." in prompt and prompt.endswith(f"Where is {who}?")
