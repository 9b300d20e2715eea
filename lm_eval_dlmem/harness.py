"""The lm-eval adapter: `DlmLM(TemplateLM)`, lm-eval `Instance`s <-> batches, and the registered
presets (docs/architecture.md: the data flow of a request)."""

from __future__ import annotations

import logging

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import Collator
from tqdm import tqdm

from .backbones.loading import load_backbone
from .batching import (BatchSize, GenerationRequests, chat_prompt, encode, fit_pair, likelihood_options, memory_plan,
                       repeat_indices, score_in_chunks, seed_of, warn_is_greedy_not_computed)
from .devices import place
from .memory.build import build_memory
from .model_args import ModelArgs, merge_harness_args, resolve_strategy
from .run_cache import fingerprint, namespace_cache_hook

log = logging.getLogger(__name__)


class DlmLM(TemplateLM):
    """lm-eval LM for discrete diffusion backbones, optionally with memory. Model args: `ModelArgs`;
    `preset`: a registered name's defaults, for `family` checkpoints (others work, with a note)."""

    family: str | None = None
    preset: dict = {}
    default_max_gen_toks = 256  # a task's generation length when its gen_kwargs name none

    def __init__(self, **kwargs):
        super().__init__()
        self.args = a = ModelArgs.from_kwargs(self.preset, **kwargs)
        self.placement = p = place(a.device, a.parallelize)
        self._device, self._rank, self._world_size, self.accelerator = p.device, p.rank, p.world_size, p.accelerator
        backbone = load_backbone(a.source, family=a.family, dtype=a.dtype, load_in_4bit=a.load_in_4bit,
                                 load_in_8bit=a.load_in_8bit, revision=a.revision, tokenizer=a.tokenizer_source,
                                 strict_weights=a.strict_weights, **p.model_placement(a.parallelize))
        if self.family and backbone.family != self.family:
            log.warning("%s is set up for %s checkpoints; %s is a %s checkpoint. Proceeding with its own "
                        "family defaults.", type(self).__name__, self.family, a.pretrained, backbone.family)
        # an adapter= gives a new backbone: spec and tokenizer are taken from the one decoding runs on
        self.backbone, self.memory = build_memory(a, backbone)
        self.spec, self.tokenizer = self.backbone.spec, self.backbone.tokenizer
        resolve_strategy(a, self.spec, self.preset, given=kwargs)
        self._max_length = a.max_length or self.spec.max_length(self.backbone.config)
        self.batch_sizer = BatchSize(a, plan=memory_plan(self.backbone, self.memory, a, self._max_length,
                                                         self._device, self._rank))
        self.generation = GenerationRequests(a, self.backbone, self._max_length, self.default_max_gen_toks)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """lm-eval's entry point; `merge_harness_args` merges --batch_size/--device into the model args."""
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
        namespace_cache_hook(cache_hook, self.fingerprint())  # --use_cache: one table per configuration
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
        input_ids, attention_mask = self.generation.batch([encoded[idx] for idx, _ in chunk], plan,
                                                          self.prefix_token_id, self.device)
        seeds = [self.request_seed(ctx, gk, repeat=repeats[idx]) for idx, (ctx, gk) in chunk]
        with torch.inference_mode():
            out = generate(self.backbone, input_ids, attention_mask, plan.config, self.memory,
                           seeds=seeds, stop_sequences=[s for s in plan.until if s])
        return [self.generation.answer(row[:plan.limit].tolist(), plan.until) for row in out]

    # ---- likelihood ----------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        from .decoding.likelihood import loglikelihood

        undecided = []

        def score(part, bar):  # the bar moves per finished request, not per chunk
            out = loglikelihood(
                self.backbone, [fit_pair(ctx_ids, cont_ids, self.max_length) for _, ctx_ids, cont_ids in part],
                seeds=[self.request_seed(ctx, cont) for (ctx, cont), _, _ in part],
                check_greedy=self.args.check_greedy, progress=bar, **likelihood_options(self.args, self.memory))
            undecided.extend(greedy is None for _, greedy in out)
            return [(float(logp), bool(greedy)) for logp, greedy in out]

        results = self._score_in_chunks("loglikelihood", requests, lambda req: req[0], score, disable_tqdm)
        if any(undecided):
            warn_is_greedy_not_computed(sum(undecided), len(requests))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-text log-likelihoods; a chunk's texts are windowed and packed into forwards together."""
        from .decoding.likelihood import loglikelihood_rolling

        def score(part, bar):
            return [float(logp) for logp in loglikelihood_rolling(
                self.backbone, [self.tok_encode(s, add_special_tokens=False) for s in part],
                max_length=self.max_length, seeds=[self.request_seed(s) for s in part], progress=bar,
                **likelihood_options(self.args, self.memory))]

        strings = [req.args[0] for req in requests]
        return self._score_in_chunks("loglikelihood_rolling", strings, lambda s: (s,), score, disable_tqdm)

    def _score_in_chunks(self, method: str, items: list, cache_key, score, disable_tqdm: bool) -> list:
        """`batching.score_in_chunks`, each result stored under (method, cache_key(item))."""
        return score_in_chunks(items, score, self._bar(len(items), disable_tqdm, method),
                               store=lambda item, res: self.cache_hook.add_partial(method, cache_key(item), res))


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
    """`memdlm-llada-moe`: LLaDA-MoE-7B-A1B as MemDLM evaluates it: one block, one token per step."""

    family = "llada_moe"
    preset = {"strategy": "llada"}


class MemDLMLLaDA2(DlmLM):
    """`memdlm-llada2`: LLaDA2.1-mini as MemDLM evaluates it (`memdlm/eval/llada21.py`): the LLaDA2.0
    block sampler, 32 steps per block of 32, threshold 0.95, 512 new tokens by default."""

    family = "llada2"
    preset = {"strategy": "llada2", "block_length": 32, "steps_per_block": 32, "threshold": 0.95}
    default_max_gen_toks = 512


__all__ = ["DlmLM", "MetaStateLLaDA", "MetaStateDream", "MemDLMLLaDAMoE", "MemDLMLLaDA2",
           "repeat_indices", "warn_is_greedy_not_computed"]
