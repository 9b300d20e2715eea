"""The lm-eval adapter: `DlmLM(TemplateLM)` and the three registered presets.

This is the only module that sees lm-eval `Instance`s. It turns requests into length-sorted
batches (lm-eval's Collator), token ids and seeds, and hands them to `decoding.generate` /
`decoding.likelihood`; the numbers come from there. Memory (MetaState, MemDLM fast weights) is
built once from the model args and passed to every decode, so `metastate=none` / `inner_steps=0`
is the frozen baseline through the same code path.
"""

from __future__ import annotations

import json
import logging
import sys

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import (
    Collator,
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
    truncate_tokens,
)
from tqdm import tqdm

from .backbones.loading import load_backbone
from .decoding.config import DecodeConfig
from .decoding.strategies import check_strategy_fits
from .devices import place
from .memory.build import build_memory
from .model_args import ModelArgs, decode_config, merge_harness_args
from .run_cache import fingerprint, namespace_cache
from .decoding.seeds import request_seed

log = logging.getLogger(__name__)

LIKELIHOOD_CHUNK = 64  # requests per likelihood call: results reach the --use_cache db per chunk


# generate_until's gen_kwargs keys (after lm-eval's normalize_gen_kwargs) that decoding reads
USED_GEN_KWARGS = frozenset({"until", "max_gen_toks", "do_sample", "temperature", "top_p", "top_k"})


class DlmLM(TemplateLM):
    """lm-eval LM for discrete diffusion backbones, optionally with memory.

    Model args: see `ModelArgs` (README lists them all). `preset` holds the defaults of a
    registered name; `family` is the family the preset is meant for (others work, with a note).
    """

    family: str | None = None
    preset: dict = {}

    def __init__(self, **kwargs):
        super().__init__()
        self.args = ModelArgs.from_kwargs(self.preset, **kwargs)
        a = self.args
        placement = place(a.device, a.parallelize)
        self.accelerator, self._device = placement.accelerator, placement.device
        self._rank, self._world_size = placement.rank, placement.world_size
        backbone = load_backbone(
            a.pretrained, family=a.family, dtype=a.dtype, device=None if a.parallelize else self._device,
            load_in_4bit=a.load_in_4bit, load_in_8bit=a.load_in_8bit, revision=a.revision,
            device_map="auto" if a.parallelize else None, tokenizer=a.tokenizer,
            strict_weights=a.strict_weights,
        )
        if self.family and backbone.family != self.family:
            log.warning("%s is set up for %s checkpoints; %s is a %s checkpoint. Proceeding with its own "
                        "family defaults.", type(self).__name__, self.family, a.pretrained, backbone.family)
        # an adapter= gives a new backbone: spec and tokenizer are taken from the one decoding runs on
        self.backbone, self.memory = build_memory(a, backbone)
        self.spec = self.backbone.spec
        self.tokenizer = self.backbone.tokenizer
        self._resolve_strategy()
        self._max_length = a.max_length or self.spec.max_length(self.backbone.config)
        self._batch_size = a.batch_size
        self._truncated_warned = 0
        self._ignored_gen_kwargs: set[str] = set()  # named once each in a warning

    def _resolve_strategy(self) -> None:
        """Fix the decoding strategy before any request: `strategy=` (or the preset's), else the
        family's `default_strategy` (LLaDA2.x: `llada2`), else DecodeConfig's; `threshold=None`
        becomes the strategy's default, so the run fingerprint holds what decoding uses.

        Raises:
            ValueError: the strategy's attention pattern is not the family's (a bidirectional
                strategy on LLaDA2.x would decode with attention the model was not trained for).
        """
        a = self.args
        if a.strategy is None:
            a.strategy = self.spec.default_strategy or DecodeConfig.strategy
        check_strategy_fits(a.strategy, self.spec, arg=a.typed_names.get("strategy", "strategy"))
        if a.threshold is None:
            a.threshold = DecodeConfig.default_threshold(a.strategy)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """lm-eval's entry point: `--model_args` plus --batch_size/--max_batch_size/--device, merged
        (see `merge_harness_args`) instead of lm-eval's TypeError when a key comes from both."""
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        return cls(**merge_harness_args(arg_dict, additional_config or {}))

    # ---- lm-eval plumbing -------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.spec.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.spec.bos_id if self.spec.bos_id is not None else self.spec.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return self.args.pretrained.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        ids = self.tokenizer.encode(string, add_special_tokens=False)
        add_bos = self.args.add_bos_token
        if add_special_tokens is False:
            add_bos = False
        elif add_bos is None:
            add_bos = self.spec.bos_by_default and self.spec.bos_id is not None
        bos = self.spec.bos_id
        if add_bos and bos is not None and (not ids or ids[0] != bos):
            ids = [bos] + ids
        return ids

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        kw = dict(tokenize=False, add_generation_prompt=add_generation_prompt,
                  continue_final_message=not add_generation_prompt)
        try:
            return self.tokenizer.apply_chat_template(chat_history, **kw)
        except Exception:  # templates without a system role (jinja raises its own types)
            history = [m for m in chat_history if m["role"] != "system"]
            if chat_history and chat_history[0]["role"] == "system" and history:
                history[0] = {**history[0], "content": chat_history[0]["content"] + "\n\n" + history[0]["content"]}
            return self.tokenizer.apply_chat_template(history, **kw)

    def all_gather(self, tensor):
        return self.accelerator.gather(tensor) if self.accelerator is not None else tensor

    def gather_object(self, obj, dst: int = 0):
        if self._world_size == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self._world_size if self._rank == dst else None
        dist.gather_object(obj, out, dst=dst)
        return out

    def barrier(self):
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

    def set_cache_hook(self, cache_hook) -> None:
        """Namespace `--use_cache` by model args: lm-eval's cache key is only (method, request),
        so two runs that differ in metastate= or decoding args would otherwise share answers."""
        db = getattr(cache_hook, "dbdict", None)
        if db is not None:
            namespace_cache(db, self.fingerprint())
        super().set_cache_hook(cache_hook)

    def fingerprint(self) -> str:
        """This configuration's identity: model args and local checkpoint files (see `run_cache`)."""
        return fingerprint(self.args.fingerprint_fields())

    def get_model_info(self) -> dict:
        return {"family": self.backbone.family, "pretrained": self.args.pretrained,
                "memory": type(self.memory).__name__, "args_fingerprint": self.fingerprint(),
                "model_args": {k: v for k, v in self.args.fingerprint_fields().items() if v is not None}}

    # ---- generation ----------------------------------------------------------------------------
    def decode_config(self, max_gen_toks: int, gen_kwargs: dict) -> DecodeConfig:
        """Map a task's generation request onto a DecodeConfig (`model_args.decode_config`)."""
        return decode_config(self.args, max_gen_toks, gen_kwargs)

    def request_seed(self, *parts, repeat: int = 0) -> int:
        """Seed from the request's content and its repeat index: independent of batch size,
        order and rank. `repeat` k > 0 (the k-th copy of a `repeats: K` request) mixes k in, so
        sampled repeats differ; repeat 0 keeps the content-only seed of a single request."""
        if repeat:
            parts = (*parts, {"repeat": int(repeat)})
        blob = json.dumps(parts, sort_keys=True, default=str).encode()
        return request_seed(self.args.seed, blob)

    def _fit_prompt(self, ids: list[int], budget: int) -> list[int]:
        if len(ids) <= budget:
            return ids
        self._truncated_warned += 1
        return truncate_tokens(ids, budget, side=self.args.truncation_side)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from .decoding.engine import generate

        if not requests:
            return []
        items = [(req.args[0], req.args[1]) for req in requests]
        repeats = repeat_indices(requests)
        encoded = {i: self.tok_encode(ctx) for i, (ctx, _) in enumerate(items)}
        collator = Collator(
            list(enumerate(items)),
            sort_fn=lambda x: (-len(encoded[x[0]]), x[1][0]),
            group_fn=lambda x: x[1][1],
            group_by="gen_kwargs",
        )
        results = []
        bar = tqdm(total=len(items), disable=disable_tqdm or self.rank != 0, desc="generate_until")
        self._truncated_warned = 0
        for chunk in collator.get_batched(n=self._batch_n(), batch_fn=None):
            texts = self._run_with_backoff(lambda part: self._generate_chunk(part, encoded, repeats, generate), chunk)
            for (idx, (ctx, gk)), text in zip(chunk, texts):
                self.cache_hook.add_partial("generate_until", (ctx, gk), text)
                results.append(text)
            bar.update(len(chunk))
        bar.close()
        if self._truncated_warned:
            log.warning("%d prompt(s) were longer than max_length - gen_length and were %s-truncated.",
                        self._truncated_warned, self.args.truncation_side)
        return collator.get_original(results)

    def _warn_ignored_gen_kwargs(self, gen_kwargs: dict) -> None:
        """One warning naming the task's / --gen_kwargs keys that diffusion decoding does not use
        (repetition_penalty, num_beams, ...), instead of dropping them silently; each key once."""
        ignored = sorted(set(gen_kwargs) - USED_GEN_KWARGS - self._ignored_gen_kwargs)
        if ignored:
            self._ignored_gen_kwargs.update(ignored)
            log.warning("gen_kwargs %s are ignored: diffusion decoding uses only %s (set steps, block_length, "
                        "strategy, ... as model args).", ", ".join(ignored), ", ".join(sorted(USED_GEN_KWARGS)))

    def _generate_chunk(self, chunk, encoded, repeats, generate) -> list[str]:
        gen_kwargs = normalize_gen_kwargs(chunk[0][1][1], default_max_gen_toks=256)
        eos_text = self.tokenizer.decode([self.spec.eos_id], skip_special_tokens=False)
        until = handle_stop_sequences(gen_kwargs.pop("until", None), eos=eos_text)
        self._warn_ignored_gen_kwargs(gen_kwargs)
        max_gen = int(gen_kwargs.get("max_gen_toks", 256))
        if max_gen <= 0 and not self.args.gen_length:
            return [""] * len(chunk)
        config = self.decode_config(max_gen, gen_kwargs)
        budget = self.max_length - config.gen_length
        if budget < 1:
            raise ValueError(
                f"The generation length {config.gen_length} (max_gen_toks={max_gen} rounded up to the block "
                f"length) leaves no room for the prompt within max_length={self.max_length}; raise max_length= "
                "or lower the task's max_gen_toks."
            )
        # an empty prompt becomes [prefix token] (as lm-eval does for an empty loglikelihood context):
        # the decoder needs one real token per row to left-pad against
        prompts = [self._fit_prompt(encoded[idx], budget) or [self.prefix_token_id] for idx, _ in chunk]
        input_ids, attention_mask = self._left_pad(prompts)
        seeds = [self.request_seed(ctx, gk, repeat=repeats[idx]) for idx, (ctx, gk) in chunk]
        stops = [s for s in until if s]
        with torch.inference_mode():
            out = generate(self.backbone, input_ids, attention_mask, config, self.memory,
                           seeds=seeds, stop_sequences=stops)
        # the canvas is rounded up to whole blocks; the answer is at most the requested length
        limit = self.args.gen_length or max_gen
        return [self._postprocess(row[:limit].tolist(), until) for row in out]

    def _postprocess(self, tokens: list[int], until: list[str]) -> str:
        stop = set(self.spec.stop_ids)
        cut = next((i for i, t in enumerate(tokens) if t in stop or t == self.spec.mask_id), len(tokens))
        text = self.tokenizer.decode(tokens[:cut], skip_special_tokens=True)
        return postprocess_generated_text(text, until, None)

    def _left_pad(self, rows: list[list[int]]):
        from .decoding.engine import left_pad

        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.spec.eos_id
        ids, attention_mask = left_pad(rows, pad)
        return ids.to(self.device), None if attention_mask is None else attention_mask.to(self.device)

    # ---- batch size ----------------------------------------------------------------------------
    def _batch_n(self) -> int:
        bs = str(self._batch_size)
        if not bs.startswith("auto") and int(float(bs)) <= 0:
            raise ValueError(f"batch_size={bs} must be a positive integer or 'auto'.")
        if getattr(self, "_planned_batch", None) is None:
            from .memory_plan import harness_batch

            self._planned_batch, line = harness_batch(self.backbone, self.memory, self.args, self.max_length,
                                                      self.device, self.args.pretrained)
            if self.rank == 0:
                print(line, file=sys.stderr)
        if not bs.startswith("auto"):
            return self._planned_batch
        # batch_size=auto: the memory plan's batch, lowered for good by the out-of-memory backoff
        return min(self._planned_batch, self.args.max_batch_size or self._planned_batch)

    def _run_with_backoff(self, fn, chunk):
        """batch_size=auto: on out-of-memory, halve the batch and retry (remembered for later)."""
        if not str(self._batch_size).startswith("auto"):
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

    # ---- likelihood ----------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        from .decoding.likelihood import loglikelihood

        results, undecided = [], 0
        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="loglikelihood")
        for start in range(0, len(requests), LIKELIHOOD_CHUNK):
            part = requests[start:start + LIKELIHOOD_CHUNK]
            pairs, seeds = [], []
            for (ctx, cont), ctx_ids, cont_ids in part:
                pairs.append(self._fit_pair(ctx_ids, cont_ids))
                seeds.append(self.request_seed(ctx, cont))
            with torch.inference_mode():
                out = loglikelihood(
                    self.backbone, pairs, mc_num=self.args.mc_num, batch_size=self.args.mc_batch_size,
                    seeds=seeds, cfg_scale=self.args.likelihood_cfg, check_greedy=self.args.check_greedy,
                    memory=self.memory, progress=bar,  # moves per finished request, not per chunk
                )
            for ((ctx, cont), _, _), res in zip(part, out):
                undecided += res[1] is None
                res = (float(res[0]), bool(res[1]))
                self.cache_hook.add_partial("loglikelihood", (ctx, cont), res)
                results.append(res)
        bar.close()
        if undecided:
            warn_is_greedy_not_computed(undecided, len(requests))
        return results

    def _fit_pair(self, ctx_ids: list[int], cont_ids: list[int]):
        if len(cont_ids) >= self.max_length:
            raise ValueError(
                f"A continuation of {len(cont_ids)} tokens does not fit max_length={self.max_length}; "
                "raise max_length=."
            )
        keep = self.max_length - len(cont_ids)
        return (ctx_ids[-keep:] if len(ctx_ids) > keep else ctx_ids), cont_ids

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-text log-likelihoods: the windows of up to LIKELIHOOD_CHUNK texts are packed
        into forwards together (`decoding.loglikelihood_rolling`), with `likelihood_cfg`."""
        from .decoding.likelihood import loglikelihood_rolling

        strings = [req.args[0] for req in requests]
        results = []
        bar = tqdm(total=len(strings), disable=disable_tqdm or self.rank != 0, desc="loglikelihood_rolling")
        for start in range(0, len(strings), LIKELIHOOD_CHUNK):
            part = strings[start:start + LIKELIHOOD_CHUNK]
            with torch.inference_mode():
                scores = loglikelihood_rolling(
                    self.backbone, [self.tok_encode(s, add_special_tokens=False) for s in part],
                    max_length=self.max_length, mc_num=self.args.mc_num, batch_size=self.args.mc_batch_size,
                    seeds=[self.request_seed(s) for s in part], cfg_scale=self.args.likelihood_cfg,
                    memory=self.memory, progress=bar,
                )
            for string, score in zip(part, scores):
                self.cache_hook.add_partial("loglikelihood_rolling", (string,), float(score))
                results.append(float(score))
        bar.close()
        return results


def warn_is_greedy_not_computed(undecided: int, total: int) -> None:
    """lm-eval turns is_greedy into `acc` of loglikelihood tasks and `exact_match` of
    multiple-choice tasks; an uncomputed one must not pass for a model that is never right."""
    log.warning(
        "is_greedy was NOT computed for %d of %d loglikelihood requests (continuations of two or more "
        "tokens need one forward per token): they are reported as not greedy, so the `acc` metric of "
        "loglikelihood tasks (lambada-style) and the `exact_match` metric of multiple-choice tasks "
        "read 0 for them. Pass check_greedy=True in --model_args to compute it.", undecided, total)


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


class MetaStateLLaDA(DlmLM):
    """`metastate-llada`: LLaDA-8B (Base/Instruct/1.5); `metastate=none` is the frozen baseline."""

    family = "llada"
    preset = {"strategy": "llada", "block_length": 32}


class MetaStateDream(DlmLM):
    """`metastate-dream`: Dream-v0-7B with Dream's sampler (`alg=entropy`), one block by default."""

    family = "dream"
    preset = {"strategy": "dream", "alg": "entropy"}


class MemDLMLLaDAMoE(DlmLM):
    """`memdlm-llada-moe`: LLaDA-MoE-7B-A1B as MemDLM evaluates it: one block, one token per step
    (steps = block = max_gen_toks), `adapter=` for the outer LoRA, `inner_steps=` for inference
    adaptation."""

    family = "llada_moe"
    preset = {"strategy": "llada"}


__all__ = ["DlmLM", "MetaStateLLaDA", "MetaStateDream", "MemDLMLLaDAMoE"]
