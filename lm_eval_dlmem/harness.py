"""The lm-eval adapter: `DlmLM(TemplateLM)` and the registered presets.

This is the only module that sees lm-eval `Instance`s. It turns requests into length-sorted
batches (lm-eval's Collator), token ids and seeds, and hands them to `decoding.generate` /
`decoding.likelihood`; the numbers come from there. Memory (MetaState, MemDLM fast weights) is
built once from the model args and passed to every decode, so `metastate=none` / `inner_steps=0`
is the frozen baseline through the same code path.
"""

from __future__ import annotations

import logging
import sys

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import Collator
from tqdm import tqdm

from .backbones.loading import load_backbone
from .batching import (LIKELIHOOD_CHUNK, BatchSize, GenerationRequests, chat_prompt, encode, fit_pair, repeat_indices,
                       seed_of, warn_is_greedy_not_computed)
from .devices import place
from .memory.build import build_memory
from .model_args import ModelArgs, merge_harness_args, resolve_strategy
from .run_cache import fingerprint, namespace_cache

log = logging.getLogger(__name__)


class DlmLM(TemplateLM):
    """lm-eval LM for discrete diffusion backbones, optionally with memory.

    Model args: see `ModelArgs` (README lists them all). `preset` holds the defaults of a
    registered name; `family` is the family the preset is meant for (others work, with a note).
    Request logic (batch size, prompt fitting, answers, seeds) lives in `batching.py`.
    """

    family: str | None = None
    preset: dict = {}
    default_max_gen_toks = 256  # a task's generation length when its gen_kwargs name none

    def __init__(self, **kwargs):
        super().__init__()
        self.args = a = ModelArgs.from_kwargs(self.preset, **kwargs)
        self.placement = place(a.device, a.parallelize)
        p = self.placement
        self._device, self._rank, self._world_size, self.accelerator = p.device, p.rank, p.world_size, p.accelerator
        backbone = load_backbone(
            a.source, family=a.family, dtype=a.dtype, device=None if a.parallelize else self._device,
            load_in_4bit=a.load_in_4bit, load_in_8bit=a.load_in_8bit, revision=a.revision,
            device_map="auto" if a.parallelize else None, tokenizer=a.tokenizer_source,
            strict_weights=a.strict_weights,
        )
        if self.family and backbone.family != self.family:
            log.warning("%s is set up for %s checkpoints; %s is a %s checkpoint. Proceeding with its own "
                        "family defaults.", type(self).__name__, self.family, a.pretrained, backbone.family)
        # an adapter= gives a new backbone: spec and tokenizer are taken from the one decoding runs on
        self.backbone, self.memory = build_memory(a, backbone)
        self.spec, self.tokenizer = self.backbone.spec, self.backbone.tokenizer
        resolve_strategy(a, self.spec, self.preset, given=kwargs)
        self._max_length = a.max_length or self.spec.max_length(self.backbone.config)
        self.batch_sizer = BatchSize(a, plan=self._memory_plan)
        self.generation = GenerationRequests(a, self.backbone, self._max_length, self.default_max_gen_toks)

    def _memory_plan(self) -> int:
        """The memory model's batch size for this run (`memory_plan.harness_batch`); its one-line
        plan (model, dtype, memory per request, batch size) goes to stderr on rank 0."""
        from .memory_plan import harness_batch

        batch, line = harness_batch(self.backbone, self.memory, self.args, self.max_length, self.device,
                                    self.args.pretrained)
        if self.rank == 0:
            print(line, file=sys.stderr)
        return batch

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
        add_bos = False if add_special_tokens is False else self.args.add_bos_token
        return encode(self.tokenizer, self.spec, string, add_bos)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        return chat_prompt(self.tokenizer, chat_history, add_generation_prompt)

    def all_gather(self, tensor):
        return self.placement.gather(tensor)

    def gather_object(self, obj, dst: int = 0):
        return self.placement.gather_object(obj, dst)

    def barrier(self):
        self.placement.barrier()

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
        """Merged by lm-eval into the results' `config` beside the user's `model_args` (`model_info`)."""
        from .model_info import model_info

        return model_info(self)

    def request_seed(self, *parts, repeat: int = 0) -> int:
        """Seed of a request from its content and repeat index (`batching.seed_of`)."""
        return seed_of(self.args.seed, *parts, repeat=repeat)

    def _bar(self, total: int, disable: bool, desc: str):
        return tqdm(total=total, disable=disable or self.rank != 0, desc=desc)

    # ---- generation ----------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        if not requests:
            return []
        items = [(req.args[0], req.args[1]) for req in requests]
        repeats = repeat_indices(requests)
        encoded = {i: self.tok_encode(ctx) for i, (ctx, _) in enumerate(items)}
        collator = Collator(list(enumerate(items)), sort_fn=lambda x: (-len(encoded[x[0]]), x[1][0]),
                            group_fn=lambda x: x[1][1], group_by="gen_kwargs")
        results = []
        bar = self._bar(len(items), disable_tqdm, "generate_until")
        for chunk in collator.get_batched(n=self.batch_sizer.n(), batch_fn=None):
            texts = self.batch_sizer.run(lambda part: self._generate_chunk(part, encoded, repeats), chunk)
            for (_, (ctx, gk)), text in zip(chunk, texts):
                self.cache_hook.add_partial("generate_until", (ctx, gk), text)
                results.append(text)
            bar.update(len(chunk))
        bar.close()
        self.generation.warn_truncated()
        return collator.get_original(results)

    def _generate_chunk(self, chunk, encoded, repeats) -> list[str]:
        """One batch of (index, (context, gen_kwargs)) sharing gen_kwargs -> their answers."""
        from .decoding.engine import generate

        plan = self.generation.plan(chunk[0][1][1])
        if plan is None:
            return [""] * len(chunk)
        prompts = [self.generation.fit_prompt(encoded[idx], plan.budget, self.prefix_token_id) for idx, _ in chunk]
        input_ids, attention_mask = self.generation.left_pad(prompts, self.device)
        seeds = [self.request_seed(ctx, gk, repeat=repeats[idx]) for idx, (ctx, gk) in chunk]
        with torch.inference_mode():
            out = generate(self.backbone, input_ids, attention_mask, plan.config, self.memory,
                           seeds=seeds, stop_sequences=[s for s in plan.until if s])
        return [self.generation.answer(row[:plan.limit].tolist(), plan.until) for row in out]

    # ---- likelihood ----------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        from .decoding.likelihood import loglikelihood

        undecided = []

        def score(part, bar):
            out = loglikelihood(
                self.backbone, [fit_pair(ctx_ids, cont_ids, self.max_length) for _, ctx_ids, cont_ids in part],
                mc_num=self.args.mc_num, batch_size=self.args.mc_batch_size,
                seeds=[self.request_seed(ctx, cont) for (ctx, cont), _, _ in part],
                cfg_scale=self.args.likelihood_cfg, check_greedy=self.args.check_greedy,
                memory=self.memory, progress=bar,  # moves per finished request, not per chunk
                block_length=self.args.block_length,  # block-causal families score per block
            )
            undecided.extend(greedy is None for _, greedy in out)
            return [(float(logp), bool(greedy)) for logp, greedy in out]

        results = self._score_in_chunks("loglikelihood", requests, lambda req: req[0], score, disable_tqdm)
        if any(undecided):
            warn_is_greedy_not_computed(sum(undecided), len(requests))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-text log-likelihoods: the windows of up to LIKELIHOOD_CHUNK texts are packed
        into forwards together (`decoding.loglikelihood_rolling`), with `likelihood_cfg`."""
        from .decoding.likelihood import loglikelihood_rolling

        def score(part, bar):
            return [float(logp) for logp in loglikelihood_rolling(
                self.backbone, [self.tok_encode(s, add_special_tokens=False) for s in part],
                max_length=self.max_length, mc_num=self.args.mc_num, batch_size=self.args.mc_batch_size,
                seeds=[self.request_seed(s) for s in part], cfg_scale=self.args.likelihood_cfg,
                memory=self.memory, progress=bar, block_length=self.args.block_length)]

        strings = [req.args[0] for req in requests]
        return self._score_in_chunks("loglikelihood_rolling", strings, lambda s: (s,), score, disable_tqdm)

    def _score_in_chunks(self, method: str, items: list, cache_key, score, disable_tqdm: bool) -> list:
        """score(part, bar) over LIKELIHOOD_CHUNK items at a time, each result handed to the
        --use_cache hook under (method, cache_key(item)) as soon as its chunk is done."""
        results = []
        bar = self._bar(len(items), disable_tqdm, method)
        for start in range(0, len(items), LIKELIHOOD_CHUNK):
            part = items[start:start + LIKELIHOOD_CHUNK]
            with torch.inference_mode():
                out = score(part, bar)
            for item, res in zip(part, out):
                self.cache_hook.add_partial(method, cache_key(item), res)
                results.append(res)
        bar.close()
        return results


# ---- registered presets: a family and its defaults (README: model names) ---------------------
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


class MemDLMLLaDA2(DlmLM):
    """`memdlm-llada2`: LLaDA2.1-mini as MemDLM evaluates it (`memdlm/eval/llada21.py`): its
    LLaDA2.0 block sampler (`strategy=llada2`; `strategy=llada21` adds LLaDA2.1's editing), blocks
    of 32, 32 steps per block, threshold 0.95, 512 new tokens when the task names no
    max_gen_toks; `adapter=` for the outer LoRA, `inner_steps=` for inference adaptation."""

    family = "llada2"
    preset = {"strategy": "llada2", "block_length": 32, "steps_per_block": 32, "threshold": 0.95}
    default_max_gen_toks = 512


__all__ = ["DlmLM", "MetaStateLLaDA", "MetaStateDream", "MemDLMLLaDAMoE", "MemDLMLLaDA2",
           "repeat_indices", "warn_is_greedy_not_computed"]
