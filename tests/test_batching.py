"""batching.py: batch size and batch_size=auto's backoff, request seeds, prompt/pair fitting and
answer cutting, without a model (a stub tokenizer and spec)."""

import json
import logging
import zlib
from types import SimpleNamespace

import pytest
import torch

from lm_eval_dlmem.batching import BatchSize, GenerationRequests, fit_pair, seed_of
from lm_eval_dlmem.model_args import ModelArgs

EOS, MASK, PAD = 2, 9, 0


def args(**kw) -> ModelArgs:
    return ModelArgs.from_kwargs(pretrained="x", **kw)


class Tokenizer:
    """Token t decodes to chr(ord('a') + t); EOS decodes to '<eos>' and is special."""

    pad_token_id = PAD

    def decode(self, tokens, skip_special_tokens=True):
        return "".join("" if t == EOS and skip_special_tokens else "<eos>" if t == EOS else chr(97 + t) for t in tokens)


def requests(**kw) -> GenerationRequests:
    spec = SimpleNamespace(eos_id=EOS, mask_id=MASK, stop_ids=(EOS,))
    return GenerationRequests(args(**kw), SimpleNamespace(spec=spec, tokenizer=Tokenizer()), max_length=16)


# ---- batch size -----------------------------------------------------------------------------
def oom_above(limit, calls):
    def fn(part):
        calls.append(len(part))
        if len(part) > limit:
            raise torch.OutOfMemoryError("simulated")
        return [x * 10 for x in part]
    return fn


def test_auto_halves_on_out_of_memory_keeps_order_and_remembers(caplog):
    a = args(batch_size="auto", max_batch_size=8)
    sizer, calls = BatchSize(a), []
    assert sizer.n() == 8
    with caplog.at_level(logging.WARNING, logger="lm_eval_dlmem"):
        out = sizer.run(oom_above(2, calls), list(range(8)))
    assert out == [x * 10 for x in range(8)]
    assert calls == [8, 4, 2, 2, 2, 2] and a.max_batch_size == 2 and sizer.n() == 2
    assert "retrying with batch size 4" in caplog.text and "retrying with batch size 2" in caplog.text


def test_out_of_memory_is_raised_at_batch_one_and_with_a_fixed_batch_size():
    with pytest.raises(torch.OutOfMemoryError):
        BatchSize(args(batch_size="auto", max_batch_size=4)).run(oom_above(0, []), [1, 2, 3, 4])
    calls = []
    with pytest.raises(torch.OutOfMemoryError):
        BatchSize(args(batch_size=4)).run(oom_above(2, calls), [1, 2, 3, 4])
    assert calls == [4]  # a fixed batch size is the user's: no silent retry


def test_batch_size_reads_the_args_at_each_call():
    a = args(batch_size=3)
    sizer = BatchSize(a)
    assert sizer.n() == 3
    a.batch_size = "5"
    assert sizer.n() == 5
    assert BatchSize(args(batch_size="auto")).n() == 64  # max_batch_size unset


# ---- seeds ----------------------------------------------------------------------------------
def test_request_seed_is_the_crc_of_the_json_content():
    gk = {"until": ["\n"], "max_gen_toks": 8}
    blob = json.dumps(("ctx", gk), sort_keys=True, default=str).encode()
    assert seed_of(1234, "ctx", gk) == (1234 * 1_000_003 + zlib.crc32(blob)) % (2**31 - 1)
    assert seed_of(1234, "ctx", gk, repeat=0) == seed_of(1234, "ctx", gk)
    assert len({seed_of(1234, "ctx", gk, repeat=k) for k in range(4)}) == 4


# ---- fitting --------------------------------------------------------------------------------
def test_fit_pair_drops_the_oldest_context_tokens():
    assert fit_pair([1, 2, 3, 4], [5, 6], max_length=4) == ([3, 4], [5, 6])
    assert fit_pair([1], [5, 6], max_length=4) == ([1], [5, 6])
    with pytest.raises(ValueError, match="A continuation of 4 tokens does not fit max_length=4; raise max_length="):
        fit_pair([1], [5, 6, 7, 8], max_length=4)


def test_fit_prompt_truncates_on_the_side_counts_and_fills_an_empty_prompt(caplog):
    req = requests(truncation_side="left")
    assert req.fit_prompt([1, 2, 3, 4, 5], 3, empty=7) == [3, 4, 5]
    assert req.fit_prompt([1, 2], 3, empty=7) == [1, 2]
    assert req.fit_prompt([], 3, empty=7) == [7]
    with caplog.at_level(logging.WARNING, logger="lm_eval_dlmem"):
        req.warn_truncated()
        req.warn_truncated()  # the count restarts: one warning per generate_until call
    assert caplog.text.count("1 prompt(s) were longer than max_length - gen_length and were left-truncated") == 1


# ---- plan and answer ------------------------------------------------------------------------
def test_plan_reads_the_task_request():
    plan = requests(block_length=4).plan({"until": ["x"], "max_gen_toks": 3})
    assert plan.config.gen_length == 4 and plan.limit == 3 and plan.budget == 12
    assert plan.until == ["x", "<eos>"]
    assert requests().plan({"until": [], "max_gen_toks": 0}) is None
    with pytest.raises(ValueError, match="leaves no room for the prompt within max_length=16"):
        requests().plan({"until": [], "max_gen_toks": 16})


def test_ignored_gen_kwargs_are_named_once(caplog):
    req = requests()
    with caplog.at_level(logging.WARNING, logger="lm_eval_dlmem"):
        req.plan({"until": [], "max_gen_toks": 2, "num_beams": 4})
        req.plan({"until": [], "max_gen_toks": 2, "num_beams": 4})
    assert caplog.text.count("gen_kwargs num_beams are ignored") == 1


def test_answer_stops_at_eos_or_a_leftover_mask_then_at_until():
    req = requests()
    assert req.answer([0, 1, EOS, 3], until=[]) == "ab"
    assert req.answer([0, 1, MASK, 3], until=[]) == "ab"
    assert req.answer([0, 1, 3, 4], until=["d"]) == "ab"


# ---- text -> ids ----------------------------------------------------------------------------
class WordTokenizer:
    """ids are word lengths; a template that refuses a system role, as some chat templates do."""

    def encode(self, text, add_special_tokens=False):
        return [len(w) for w in text.split()]

    def apply_chat_template(self, history, **kw):
        if any(m["role"] == "system" for m in history):
            raise ValueError("System role not supported")
        return "|".join(f"{m['role']}:{m['content']}" for m in history)


@pytest.mark.parametrize("bos_by_default, add_bos, text, expected", [
    (False, None, "ab c", [2, 1]),
    (True, None, "ab c", [7, 2, 1]),
    (True, False, "ab c", [2, 1]),
    (False, True, "ab c", [7, 2, 1]),
    (False, True, "abcdefg c", [7, 1]),  # already starts with BOS: not doubled
])
def test_encode_adds_the_familys_bos(bos_by_default, add_bos, text, expected):
    from lm_eval_dlmem.batching import encode

    spec = SimpleNamespace(bos_id=7, bos_by_default=bos_by_default)
    assert encode(WordTokenizer(), spec, text, add_bos) == expected


def test_chat_prompt_folds_the_system_message_into_the_first_turn_when_the_template_refuses_it():
    from lm_eval_dlmem.batching import chat_prompt

    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert chat_prompt(WordTokenizer(), history) == "user:Be brief.\n\nHi"
    assert chat_prompt(WordTokenizer(), history[1:]) == "user:Hi"


def test_score_in_chunks_stores_each_chunk_in_order_under_inference_mode():
    """Likelihood requests are scored LIKELIHOOD_CHUNK at a time; every result reaches the
    --use_cache store as its chunk finishes, results keep the request order, the bar is closed."""
    from lm_eval_dlmem.batching import LIKELIHOOD_CHUNK, score_in_chunks

    parts, stored = [], []

    def score(part, bar):
        assert torch.is_inference_mode_enabled() and bar is progress
        parts.append(len(part))
        stored_before = len(stored)
        assert stored_before == sum(parts[:-1])  # the previous chunk was stored before this one ran
        return [x * 10 for x in part]

    progress = SimpleNamespace(closed=False)
    progress.close = lambda: setattr(progress, "closed", True)
    items = list(range(2 * LIKELIHOOD_CHUNK + 3))
    out = score_in_chunks(items, score, progress, store=lambda item, res: stored.append((item, res)))
    assert out == [x * 10 for x in items] and stored == list(zip(items, out))
    assert parts == [LIKELIHOOD_CHUNK, LIKELIHOOD_CHUNK, 3] and progress.closed


def test_likelihood_options_read_the_likelihood_and_block_args():
    from lm_eval_dlmem.batching import likelihood_options

    args = ModelArgs.from_kwargs(pretrained="x", mc_num=3, mc_batch_size=5, likelihood_cfg=0.5, block_length=16)
    memory = object()
    assert likelihood_options(args, memory) == dict(mc_num=3, batch_size=5, cfg_scale=0.5, memory=memory,
                                                    block_length=16)
