"""Synthetic training data (`training.synthetic`) and the tiny default's tokenizer."""

from __future__ import annotations

import pytest

from lm_eval_dlmem.training import synthetic as S
from lm_eval_dlmem.training.tokenizer import LLADA_SPECIALS, train_tokenizer


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(S.corpus_texts(40), vocab_size=512)


def test_tokenizer_has_llada_specials_and_splits_digits(tok):
    assert tok.convert_ids_to_tokens(list(range(6))) == list(LLADA_SPECIALS)
    assert (tok.bos_token, tok.eos_token, tok.mask_token) == ("<|startoftext|>", "<|endoftext|>", "<|mdm_mask|>")
    ids = tok("is: 4172839.", add_special_tokens=False)["input_ids"]
    assert [t for t in tok.convert_ids_to_tokens(ids) if t.isdigit()] == list("4172839")
    assert tok.decode(ids) == "is: 4172839."
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>" \
                   "<|start_header_id|>assistant<|end_header_id|>\n\n"


@pytest.mark.parametrize("task", sorted(S.TASKS))
def test_examples_are_deterministic_and_fit(tok, task):
    a = S.build_example(task, 3, 1024, tok, seed=0)
    assert a == S.build_example(task, 3, 1024, tok, seed=0)
    assert a != S.build_example(task, 3, 1024, tok, seed=1)
    assert a["input_ids"][: a["prompt_len"]] == tok(a["prompt"], add_special_tokens=False)["input_ids"]
    assert len(a["input_ids"]) > a["prompt_len"]
    assert 0.5 * 1024 <= len(a["input_ids"]) <= 1024


def test_needle_answers_are_in_the_context(tok):
    for i in range(5):
        ex = S.build_example("niah_multivalue", i, 300, tok, seed=0)
        values = ex["answer"].strip(" .").split(", ")
        assert len(values) == 4 and all(f"is: {v}." in ex["prompt"] for v in values)


def test_stream_and_mix_are_deterministic(tok):
    cfg = S.SyntheticConfig(S.parse_tasks("niah_noise:2,babi_qa1"), 128, 256, seed=5)
    first = [next(S.iter_examples(cfg, tok, start=i)) for i in range(4)]
    again = S.iter_examples(cfg, tok)
    assert [e["input_ids"] for e in first] == [next(again)["input_ids"] for _ in range(4)]
    assert {e["task"] for e in first} <= {"niah_noise", "babi_qa1"}
    with pytest.raises(ValueError, match="Unknown synthetic task"):
        S.SyntheticConfig({"niah_nope": 1.0})


def test_training_data_is_not_the_evaluation_data(tok):
    """Training seeds its examples in its own namespace: no needle value or prompt of the
    RULER evaluation samples (seed 42) shows up in a training stream."""
    from lm_eval_dlmem.tasks import ruler_niah
    from lm_eval_dlmem.tasks.common import sample_rng

    evals = [ruler_niah.make_sample(ruler_niah.NIAH_TASKS["niah_single_1"], sample_rng(42, "niah_single_1", 1024, i),
                                    20, seed=42)[0] for i in range(20)]
    train = [S.build_example("niah_noise", i, 256, tok, seed=0)["prompt"] for i in range(20)]
    assert not set(evals) & set(train)


def test_copy_drill_repeats_the_list_and_stays_out_of_all_and_the_corpus(tok):
    """`copy`: the answer is the prompt's list, item for item (what a needle's digits need);
    as a drill it is trainable by name but not part of `all`, the tokenizer corpus or the
    held-out task list, so the tiny default's recipe is unchanged by it."""
    ex = S.build_example("copy", 2, 128, tok, seed=0)
    listed = ex["answer"].strip()[:-1]
    assert f"Memorize this list: {listed}.\n" in ex["prompt"] and len(listed.split(", ")) > 1
    assert "copy" not in S.parse_tasks("all") and set(S.parse_tasks("all")) == set(S.TASKS) - {"copy"}
    assert S.parse_tasks("copy:2,niah_noise") == {"copy": 2.0, "niah_noise": 1.0}
    assert not any(t.startswith("Memorize this list") for t in S.corpus_texts(len(S.TASKS) * 2))
