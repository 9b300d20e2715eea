"""Requests to batches and decoded rows back to answers: the request logic of the lm-eval adapter.

`DlmLM` (harness.py) reads lm-eval `Instance`s and hands this module plain token ids and
gen_kwargs. Here: how many requests go in one batch (and, with `batch_size=auto`, halving it on
out-of-memory), how a task's gen_kwargs become a `DecodeConfig` plus stop strings, how prompts and
likelihood pairs are fitted into `max_length`, how a decoded row is cut into an answer, and each
request's seed and repeat index. Nothing here computes a model output.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass

import torch
from lm_eval.models.utils import (handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text,
                                  truncate_tokens)

from .decoding.config import DecodeConfig
from .decoding.seeds import request_seed
from .model_args import ModelArgs, decode_config

log = logging.getLogger(__name__)

LIKELIHOOD_CHUNK = 64  # requests per likelihood call: results reach the --use_cache db per chunk
DEFAULT_MAX_GEN_TOKS = 256  # the generation length when a task names no max_gen_toks (a preset may change it)
DEFAULT_AUTO_BATCH = 64  # the batch batch_size=auto starts from when max_batch_size is unset
# generate_until's gen_kwargs keys (after lm-eval's normalize_gen_kwargs) that decoding reads
USED_GEN_KWARGS = frozenset({"until", "max_gen_toks", "do_sample", "temperature", "top_p", "top_k"})


def seed_of(base: int, *parts, repeat: int = 0) -> int:
    """A request's seed from its content (`parts`, JSON-encoded) and its repeat index.

    Independent of batch size, order and rank. `repeat` k > 0 (the k-th copy of a `repeats: K`
    request) mixes k in, so sampled repeats differ; repeat 0 keeps the content-only seed of a
    single request (cached and published runs stay comparable)."""
    if repeat:
        parts = (*parts, {"repeat": int(repeat)})
    return request_seed(base, json.dumps(parts, sort_keys=True, default=str).encode())


def encode(tokenizer, spec, text: str, add_bos: bool | None) -> list[int]:
    """A text's token ids, with the family's BOS in front when `add_bos` (None: the family's
    default, `FamilySpec.bos_by_default`) and the text does not already start with it."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if add_bos is None:
        add_bos = spec.bos_by_default and spec.bos_id is not None
    if add_bos and spec.bos_id is not None and (not ids or ids[0] != spec.bos_id):
        ids = [spec.bos_id] + ids
    return ids


def chat_prompt(tokenizer, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
    """The tokenizer's chat template applied to lm-eval's chat history. A template without a
    system role gets the system message prepended to the first remaining turn instead."""
    kw = dict(tokenize=False, add_generation_prompt=add_generation_prompt,
              continue_final_message=not add_generation_prompt)
    try:
        return tokenizer.apply_chat_template(chat_history, **kw)
    except Exception:  # templates without a system role (jinja raises its own types)
        history = [m for m in chat_history if m["role"] != "system"]
        if chat_history and chat_history[0]["role"] == "system" and history:
            history[0] = {**history[0], "content": chat_history[0]["content"] + "\n\n" + history[0]["content"]}
        return tokenizer.apply_chat_template(history, **kw)


def repeat_indices(requests) -> list[int]:
    """k for the k-th copy of a request in the list, 0 for a request that appears once.

    lm-eval runs a task's `repeats: K` by passing each `Instance` K times in a row to
    generate_until (evaluator: `cloned_reqs.extend([req] * req.repeats)`); the copies are equal in
    content and metadata. Keyed on (task, doc_id, idx, arguments), so two documents that happen
    to share a prompt are both repeat 0 and keep the same seed, as do re-ordered or re-batched
    requests."""
    seen: dict = {}
    out = []
    for req in requests:
        key = (req.task_name, req.doc_id, req.idx, json.dumps(req.args, sort_keys=True, default=str))
        out.append(seen.get(key, 0))
        seen[key] = out[-1] + 1
    return out


def warn_is_greedy_not_computed(undecided: int, total: int) -> None:
    """lm-eval turns is_greedy into `acc` of loglikelihood tasks and `exact_match` of
    multiple-choice tasks; an uncomputed one must not pass for a model that is never right."""
    log.warning(
        "is_greedy was NOT computed for %d of %d loglikelihood requests (continuations of two or more "
        "tokens need one forward per token): they are reported as not greedy, so the `acc` metric of "
        "loglikelihood tasks (lambada-style) and the `exact_match` metric of multiple-choice tasks "
        "read 0 for them. Pass check_greedy=True in --model_args to compute it.", undecided, total)


def fit_pair(ctx_ids: list[int], cont_ids: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """A loglikelihood (context, continuation) within max_length: the context loses its oldest
    tokens; a continuation that alone does not fit is an error (its score would be of another text)."""
    if len(cont_ids) >= max_length:
        raise ValueError(
            f"A continuation of {len(cont_ids)} tokens does not fit max_length={max_length}; raise max_length=."
        )
    keep = max_length - len(cont_ids)
    return (ctx_ids[-keep:] if len(ctx_ids) > keep else ctx_ids), cont_ids


@dataclass
class GenerationPlan:
    """How one gen_kwargs group is decoded.

    config: the DecodeConfig (canvas rounded up to whole blocks); until: lm-eval's stop strings
    (EOS text included); budget: prompt tokens that fit beside the canvas in max_length; limit:
    answer tokens kept (gen_length= if given, else the task's max_gen_toks)."""

    config: DecodeConfig
    until: list[str]
    budget: int
    limit: int


class BatchSize:
    """`batch_size=` / `max_batch_size=`: requests per batch, and batch_size=auto's backoff.

    Reads `args` at each call, so a changed `args.batch_size` takes effect on the next batch."""

    def __init__(self, args: ModelArgs, plan=None):
        self.args = args
        self._plan = plan  # () -> batch size: the memory model's, asked once, at the first batch
        self._planned: int | None = None

    @property
    def auto(self) -> bool:
        return str(self.args.batch_size).startswith("auto")

    def n(self) -> int:
        """Requests per batch: the fixed size, or for auto the memory plan's largest batch (without
        a plan, max_batch_size or 64), lowered by earlier out-of-memory backoffs."""
        if not self.auto and int(float(self.args.batch_size)) <= 0:
            raise ValueError(f"batch_size={self.args.batch_size} must be a positive integer or 'auto'.")
        if self._plan is not None and self._planned is None:
            self._planned = int(self._plan())  # also for a fixed size: the plan line is printed
        if not self.auto:
            return int(float(self.args.batch_size))
        if self._planned is None:
            return int(self.args.max_batch_size or DEFAULT_AUTO_BATCH)
        return min(self._planned, int(self.args.max_batch_size or self._planned))

    def run(self, fn, chunk: list) -> list:
        """fn(chunk) -> one result per item; with batch_size=auto an out-of-memory halves the
        batch and retries (the smaller size is kept for later batches)."""
        if not self.auto:
            return fn(chunk)
        n = len(chunk)
        while True:
            try:
                out = []
                for i in range(0, len(chunk), n):
                    out.extend(fn(chunk[i:i + n]))
                return out
            except torch.OutOfMemoryError:
                if n == 1:
                    raise
                n = max(1, n // 2)
                self.args.max_batch_size = n
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                log.warning("Out of memory: retrying with batch size %d.", n)


def memory_plan(backbone, memory, args: ModelArgs, max_length: int, device, rank: int):
    """`BatchSize`'s plan: () -> the memory model's batch size for this run
    (`memory_plan.harness_batch`), its one-line plan (model, dtype, memory per request, batch size)
    printed to stderr on rank 0."""

    def plan() -> int:
        from .memory_plan import harness_batch

        batch, line = harness_batch(backbone, memory, args, max_length, device, args.pretrained)
        if rank == 0:
            print(line, file=sys.stderr)
        return batch

    return plan


def likelihood_options(args: ModelArgs, memory) -> dict:
    """The keyword arguments `decoding.loglikelihood` and `loglikelihood_rolling` take from the
    model args (block-causal families score per block of `block_length`)."""
    return dict(mc_num=args.mc_num, batch_size=args.mc_batch_size, cfg_scale=args.likelihood_cfg,
                memory=memory, block_length=args.block_length)


def score_in_chunks(items: list, score, bar, store) -> list:
    """score(part, bar) -> one result per item, over LIKELIHOOD_CHUNK items at a time under
    inference mode; store(item, result) gets each result as soon as its chunk is done (the
    --use_cache hook), so an interrupted run keeps what it scored. Closes `bar`."""
    results = []
    for start in range(0, len(items), LIKELIHOOD_CHUNK):
        part = items[start:start + LIKELIHOOD_CHUNK]
        with torch.inference_mode():
            out = score(part, bar)
        for item, res in zip(part, out):
            store(item, res)
            results.append(res)
    bar.close()
    return results


class GenerationRequests:
    """generate_until's request logic for one model: gen_kwargs -> plan, prompt fitting, answers.

    Keeps two run-level notes: how many prompts were truncated (one warning per call of
    `generate_until`) and which ignored gen_kwargs keys were already named (each once per model)."""

    def __init__(self, args: ModelArgs, backbone, max_length: int, default_max_gen_toks: int = DEFAULT_MAX_GEN_TOKS):
        self.args, self.spec, self.tokenizer, self.max_length = args, backbone.spec, backbone.tokenizer, max_length
        self.default_max_gen_toks = default_max_gen_toks  # when a task's gen_kwargs name no max_gen_toks
        self.truncated = 0
        self._ignored: set[str] = set()

    def plan(self, raw_gen_kwargs: dict) -> GenerationPlan | None:
        """A gen_kwargs group's plan; None when nothing is to be generated (max_gen_toks <= 0 and
        no gen_length=): the answers are empty.

        Raises:
            ValueError: the canvas leaves no room for a prompt within max_length.
        """
        gen_kwargs = normalize_gen_kwargs(raw_gen_kwargs, default_max_gen_toks=self.default_max_gen_toks)
        eos_text = self.tokenizer.decode([self.spec.eos_id], skip_special_tokens=False)
        until = handle_stop_sequences(gen_kwargs.pop("until", None), eos=eos_text)
        self._warn_ignored(gen_kwargs)
        max_gen = int(gen_kwargs.get("max_gen_toks", self.default_max_gen_toks))
        if max_gen <= 0 and not self.args.gen_length:
            return None
        config = decode_config(self.args, max_gen, gen_kwargs)
        budget = self.max_length - config.gen_length
        if budget < 1:
            raise ValueError(
                f"The generation length {config.gen_length} (max_gen_toks={max_gen} rounded up to the block "
                f"length) leaves no room for the prompt within max_length={self.max_length}; raise max_length= "
                "or lower the task's max_gen_toks."
            )
        # the canvas is rounded up to whole blocks; the answer is at most the requested length
        return GenerationPlan(config, until, budget, self.args.gen_length or max_gen)

    def _warn_ignored(self, gen_kwargs: dict) -> None:
        """One warning naming the task's / --gen_kwargs keys that diffusion decoding does not use
        (repetition_penalty, num_beams, ...), instead of dropping them silently; each key once."""
        ignored = sorted(set(gen_kwargs) - USED_GEN_KWARGS - self._ignored)
        if ignored:
            self._ignored.update(ignored)
            log.warning("gen_kwargs %s are ignored: diffusion decoding uses only %s (set steps, block_length, "
                        "strategy, ... as model args).", ", ".join(ignored), ", ".join(sorted(USED_GEN_KWARGS)))

    def fit_prompt(self, ids: list[int], budget: int, empty: int) -> list[int]:
        """A prompt within `budget` tokens (truncated on truncation_side, counted for the warning);
        an empty prompt becomes [empty] (lm-eval's prefix token, as for an empty loglikelihood
        context): the decoder needs one real token per row to left-pad against."""
        if len(ids) > budget:
            self.truncated += 1
            ids = truncate_tokens(ids, budget, side=self.args.truncation_side)
        return ids or [empty]

    def batch(self, prompts: list[list[int]], plan: GenerationPlan, empty: int, device):
        """A batch's prompt ids -> (input_ids, attention_mask) on `device`: each fitted into
        `plan.budget` (`fit_prompt`), then left-padded (`left_pad`)."""
        return self.left_pad([self.fit_prompt(ids, plan.budget, empty) for ids in prompts], device)

    def warn_truncated(self) -> None:
        """The one warning of a generate_until call about truncated prompts (then the count restarts)."""
        if self.truncated:
            log.warning("%d prompt(s) were longer than max_length - gen_length and were %s-truncated.",
                        self.truncated, self.args.truncation_side)
        self.truncated = 0

    def left_pad(self, rows: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prompt rows -> (input_ids [B, W], attention_mask [B, W] or None) on `device`, padded with
        the tokenizer's pad id (EOS when it has none)."""
        from .decoding.engine import left_pad

        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.spec.eos_id
        ids, attention_mask = left_pad(rows, pad)
        return ids.to(device), None if attention_mask is None else attention_mask.to(device)

    def answer(self, tokens: list[int], until: list[str]) -> str:
        """A decoded row's text: cut at the first stop id or leftover mask, then at `until`."""
        stop = set(self.spec.stop_ids)
        cut = next((i for i, t in enumerate(tokens) if t in stop or t == self.spec.mask_id), len(tokens))
        text = self.tokenizer.decode(tokens[:cut], skip_special_tokens=True)
        return postprocess_generated_text(text, until, None)
