"""`--model_args` parsed into one typed config, at one boundary.

lm-eval hands model args over as a dict whose values were guessed from strings (`-1` arrives as
the float -1.0, `none` as None or "none", `true` as bool). `ModelArgs.from_kwargs` casts every
value to its field's type, rejects unknown keys with the list of valid ones, and validates.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import os
import typing
from dataclasses import dataclass, field

import torch

from .checks import NON_NEGATIVE, POSITIVE, Range, check_batch_size
from .decoding.config import DECODE_RANGES, DecodeConfig
from .decoding.strategies import REGISTRY, check_strategy_fits, fitting_strategies
from .memory.fast_weights import MemDLMConfig

log = logging.getLogger(__name__)

# Keys lm-eval itself passes to every model constructor (from --batch_size, --max_batch_size,
# --device), with the values its command line sends when the flag is not given.
HARNESS_KEYS = {"batch_size", "max_batch_size", "device"}
HARNESS_DEFAULTS = {"batch_size": 1, "max_batch_size": None, "device": "cuda:0"}
# Keys that only make sense for HFLM's backends; accepted for compatibility with HFLM commands
# but rejected with an explanation when they would change behaviour.
_NO_OFFLOAD = ("CPU/disk offload is not supported (every layer must sit on a GPU); to fit a large model use "
               "load_in_4bit=True or load_in_8bit=True, or parallelize=True to spread it over the visible GPUs.")
REJECTED = {
    "backend": "diffusion models are neither causal nor seq2seq; drop backend=.",
    "max_memory_per_gpu": _NO_OFFLOAD,
    "max_cpu_memory": _NO_OFFLOAD,
    "offload_folder": _NO_OFFLOAD,
}
# Accepted and ignored, with one warning saying why (official LLaDA/Dream commands carry it;
# lm-eval's --trust_remote_code also adds it to the model args).
TRUST_REMOTE_CODE_WARNING = ("trust_remote_code=True is ignored: lm_eval_dlmem ships its own LLaDA/Dream/LLaDA-MoE "
                             "code, so no remote code is run.")
ALIASES = {"cfg": "cfg_scale", "model_path": "pretrained", "torch_dtype": "dtype", "peft": "adapter",
           "max_new_tokens": "gen_length", "block_size": "block_length", "diffusion_steps": "steps",
           "is_check_greedy": "check_greedy", "use_cache": "cache_legacy"}
# Every numeric model arg and the values it may take; None (unset) is always allowed. Decoding
# args share DecodeConfig's ranges, except that 0 is not "nothing to decode" but a typo here.
RANGES = {
    **DECODE_RANGES,
    "gen_length": Range(0, lo_open=True, hint="(leave it unset to use the task's max_gen_toks)"),
    "steps": Range(0, lo_open=True, hint="(leave it unset for one step per token)"),
    "steps_per_block": Range(0, lo_open=True, hint="(leave it unset for one step per token)"),
    "block_length": Range(0, lo_open=True, hint="(leave it unset for a single block)"),
    "max_length": POSITIVE,
    "max_batch_size": Range(0, lo_open=True, hint="(the largest batch batch_size=auto tries)"),
    "mc_num": POSITIVE,
    "mc_batch_size": POSITIVE,
    "likelihood_cfg": Range(0, hint="(0 disables guidance)"),
    "inner_steps": Range(0, hint="(0 disables inference adaptation)"),
    "inner_lr": NON_NEGATIVE,
    "inner_rank": Range(1),
    "inner_alpha": POSITIVE,
    "inner_layer_fraction": Range(0, 1, lo_open=True),
    "inner_mask_ratio": Range(0, 1, lo_open=True),
}


_DECODE = DecodeConfig()  # DecodeConfig's defaults are the decoding model args' defaults
_MEMDLM = MemDLMConfig()  # and MemDLMConfig's the inner_* ones


@dataclass
class LoadArgs:
    """Loading and batching: pretrained, revision, family, tokenizer, dtype, device, parallelize,
    load_in_4bit, load_in_8bit, strict_weights, max_length, add_bos_token, truncation_side,
    batch_size, max_batch_size."""

    pretrained: str = ""
    revision: str | None = None
    family: str | None = None
    tokenizer: str | None = None
    dtype: str = "auto"
    device: str | None = None
    parallelize: bool = False
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    strict_weights: bool = True
    max_length: int | None = None
    add_bos_token: bool | None = None
    truncation_side: str = "middle"
    batch_size: str = "1"
    max_batch_size: int | None = None


@dataclass
class DecodeArgs:
    """Decoding (see `DecodeConfig`). The length and sampling args default to None: the task's
    request decides (`max_gen_toks`, one step per token, one block; its temperature/top_p/top_k).
    The others override `DecodeConfig`'s field of the same name and default to it."""

    strategy: str | None = None  # none: the family's `default_strategy`, else DecodeConfig's
    gen_length: int | None = None
    steps: int | None = None
    steps_per_block: int | None = None
    block_length: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    remasking: str = _DECODE.remasking
    alg: str = _DECODE.alg
    alg_temp: float | None = _DECODE.alg_temp
    eps: float = _DECODE.eps
    threshold: float | None = None  # none: the strategy's default (DecodeConfig resolves it)
    editing_threshold: float = _DECODE.editing_threshold
    max_post_steps: int = _DECODE.max_post_steps
    cfg_scale: float = _DECODE.cfg_scale
    cache: str = _DECODE.cache
    logits_eos_inf: bool = _DECODE.logits_eos_inf
    confidence_eos_eot_inf: bool = _DECODE.confidence_eos_eot_inf
    stop_early: bool = _DECODE.stop_early


@dataclass
class LikelihoodArgs:
    """Monte Carlo log-likelihood (`decoding.likelihood`): mc_num, mc_batch_size, check_greedy,
    likelihood_cfg."""

    mc_num: int = 128
    mc_batch_size: int = 32
    check_greedy: bool = False
    likelihood_cfg: float = 0.0


@dataclass
class MemoryArgs:
    """Memory: metastate (path, hub id or none), adapter (PEFT LoRA), and MemDLM's inference inner
    loop (`MemDLMConfig`'s inner_* fields, with its defaults, except inner_steps: 0 here, so a run
    adapts only when asked)."""

    metastate: str | None = None
    metastate_carry: str = "full"  # full | none | first_block: the no-carry ablations (memory/carry.py)
    adapter: str | None = None
    inner_steps: int = 0
    inner_lr: float = _MEMDLM.inner_lr
    inner_rank: int = _MEMDLM.inner_rank
    inner_alpha: float = _MEMDLM.inner_alpha
    inner_layer_fraction: float = _MEMDLM.inner_layer_fraction
    inner_mask_ratio: float = _MEMDLM.inner_mask_ratio
    inner_targets: str = _MEMDLM.inner_targets  # fast-weight targets: released (the released code's) or ffn
    inner_adapter_dropout: bool = _MEMDLM.inner_adapter_dropout  # outer LoRA dropout on while adapting


GROUPS = {"load": LoadArgs, "decode": DecodeArgs, "likelihood": LikelihoodArgs, "memory": MemoryArgs}
# flat model arg (as users type it) -> the group that holds it
GROUP_OF = {f.name: group for group, cls in GROUPS.items() for f in dataclasses.fields(cls)}


@dataclass
class ModelArgs:
    """Every model arg of `metastate-llada`, `metastate-dream`, `memdlm-llada-moe`, `memdlm-llada2` (and `dlm`),
    parsed into one typed config per concern: `load`, `decode`, `likelihood`, `memory` (their
    docstrings list the args), plus `seed` (requests, decoding and the inner loop).

    Users type flat names (`steps=64`), and every flat name reads and writes through to its group
    (`args.steps is args.decode.steps`).
    """

    load: LoadArgs = field(default_factory=LoadArgs)
    decode: DecodeArgs = field(default_factory=DecodeArgs)
    likelihood: LikelihoodArgs = field(default_factory=LikelihoodArgs)
    memory: MemoryArgs = field(default_factory=MemoryArgs)
    seed: int = 1234
    # field -> the key the user typed for it (an alias such as max_new_tokens), so errors name it
    typed_names: dict = field(default_factory=dict, repr=False, compare=False)
    # pretrained= / tokenizer= given as objects (a loaded Backbone or model, a tokenizer) from
    # Python; the string fields then hold their labels (`loading.loaded_label`)
    objects: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def source(self):
        """What to load: the loaded model passed as pretrained=, else the `pretrained` string."""
        return self.objects.get("pretrained", self.pretrained)

    @property
    def tokenizer_source(self):
        """The tokenizer object passed as tokenizer=, else the `tokenizer` string (or None)."""
        return self.objects.get("tokenizer", self.tokenizer)

    def __getattr__(self, name):
        group = GROUP_OF.get(name)
        if group is None:
            raise AttributeError(f"{type(self).__name__!s} has no model arg {name!r}")
        return getattr(self.__dict__[group], name)

    def __setattr__(self, name, value):
        group = GROUP_OF.get(name)
        if group is None:
            object.__setattr__(self, name, value)
        else:
            setattr(self.__dict__[group], name, value)

    def __post_init__(self):
        if not self.pretrained:
            raise ValueError("pretrained= is required: a checkpoint directory or hub id "
                             "(e.g. pretrained=GSAI-ML/LLaDA-8B-Instruct).")
        if self.truncation_side not in ("middle", "left", "right"):
            raise ValueError(f"truncation_side={self.truncation_side!r}; choose middle, left or right.")
        if self.metastate is not None and self.metastate.lower() == "none":
            self.metastate = None
        if self.adapter is not None and self.adapter.lower() == "none":
            self.adapter = None
        self._check_carry()
        if self.metastate and (self.adapter or self.inner_steps):
            raise ValueError("metastate= and MemDLM (adapter=/inner_steps=) cannot be combined in one run; "
                             "evaluate them as separate runs.")
        for name, allowed in RANGES.items():
            allowed.check(self.typed_names.get(name, name), getattr(self, name))
        check_batch_size(self.typed_names.get("batch_size", "batch_size"), self.batch_size)
        if str(self.batch_size).startswith("auto:"):
            log.warning("batch_size=%s: the N of auto:N is ignored. batch_size=auto is never recomputed: it "
                        "starts at the memory plan's largest batch (at most max_batch_size) and halves on "
                        "out-of-memory for the rest of the run.", self.batch_size)

    def _check_carry(self) -> None:
        """metastate_carry= is one of the modes, and only given with a MetaState to ablate."""
        from .memory.carry import CARRY_MODES

        if self.metastate_carry not in CARRY_MODES:
            raise ValueError(f"metastate_carry={self.metastate_carry!r}; choose one of {', '.join(CARRY_MODES)}.")
        if self.metastate_carry != "full" and not self.metastate:
            raise ValueError(f"metastate_carry={self.metastate_carry} ablates a MetaState's carry, but no metastate= "
                             "is given; pass metastate=PATH or drop metastate_carry.")

    @classmethod
    def from_kwargs(cls, defaults: dict | None = None, **kwargs) -> "ModelArgs":
        """Build from lm-eval's model-args dict: alias, reject, cast, then validate."""
        valid = set(GROUP_OF) | {"seed"}
        values = dict(defaults or {})
        typed = {}
        for typed_key, value in kwargs.items():
            key = ALIASES.get(typed_key, typed_key)
            if key != typed_key:
                typed[key] = typed_key
            if key == "trust_remote_code":
                if _cast(key, value, bool):
                    log.warning(TRUST_REMOTE_CODE_WARNING)
                continue
            if key in REJECTED:
                raise ValueError(f"Model arg {key}={value!r} is not supported: {REJECTED[key]}")
            if key == "device_map":  # HFLM's spelling of parallelize=True
                if str(value).strip().lower() != "auto":
                    raise ValueError(f"Model arg device_map={value!r} is not supported: only device_map=auto "
                                     "(= parallelize=True, one model over the visible GPUs); for one device "
                                     "pass device= (or --device).")
                values["parallelize"] = True
                continue
            if key == "cache_legacy":  # Fast-dLLM's use_cache=True,dual_cache=True spelling
                if value:
                    values.setdefault("cache", "prefix")
                continue
            if key == "dual_cache":
                if value:
                    values["cache"] = "dual"
                continue
            if key not in valid:
                close = difflib.get_close_matches(key, sorted(valid), n=3)
                hint = f" Did you mean {', '.join(close)}?" if close else ""
                raise ValueError(
                    f"Unknown model arg {key!r}.{hint} Valid model args: {', '.join(sorted(valid))}."
                )
            values[key] = value
        objects = take_objects(values)
        hints = {**typing.get_type_hints(cls), **{k: v for c in GROUPS.values() for k, v in typing.get_type_hints(c).items()}}
        cast = {k: _cast(typed.get(k, k), v, hints[k]) for k, v in values.items()}
        groups = {group: c(**{k: v for k, v in cast.items() if GROUP_OF.get(k) == group}) for group, c in GROUPS.items()}
        return cls(**groups, **{k: v for k, v in cast.items() if k not in GROUP_OF}, typed_names=typed,
                   objects=objects)

    def flat(self) -> dict:
        """Every model arg under the name users type."""
        out = {name: value for group in GROUPS for name, value in dataclasses.asdict(getattr(self, group)).items()}
        return {**out, "seed": self.seed}

    def fingerprint_fields(self) -> dict:
        """Everything that can change a model output (for cache namespacing)."""
        skip = {"batch_size", "max_batch_size", "device", "parallelize"}
        if self.metastate_carry == "full":  # the method itself: runs keep the fingerprint they had
            skip.add("metastate_carry")
        return {k: v for k, v in self.flat().items() if k not in skip}


def take_objects(values: dict) -> dict:
    """Move a loaded model (pretrained=) and a tokenizer object (tokenizer=) out of `values`,
    leaving string labels in their place (casting would turn them into their repr).

    A loaded model also sets `device=` to where it sits unless one was given, so the harness puts
    inputs beside the model instead of moving it (HFLM keeps a loaded model on its device)."""
    from .backbones.loading import is_loaded_model, loaded_label

    objects = {}
    model = values.get("pretrained")
    if isinstance(model, os.PathLike):
        values["pretrained"] = model = os.fspath(model)
    if model is not None and not isinstance(model, (str, int, float)):
        if not is_loaded_model(model):
            raise ValueError(f"pretrained= got a {type(model).__name__}: pass a checkpoint directory, hub id or "
                             "embedded name, a lm_eval_dlmem Backbone, or a loaded model of our classes.")
        objects["pretrained"], values["pretrained"] = model, loaded_label(model)
        if values.get("device") is None:
            values["device"] = str(next(model.parameters()).device) if isinstance(model, torch.nn.Module) \
                else str(model.device)
    tok = values.get("tokenizer")
    if tok is not None and not isinstance(tok, str):
        objects["tokenizer"], values["tokenizer"] = tok, getattr(tok, "name_or_path", "") or type(tok).__name__
    return objects


# DecodeArgs fields that DecodeConfig takes as they are (the rest come from the request, below)
DECODE_PASSTHROUGH = tuple(f.name for f in dataclasses.fields(DecodeArgs)
                           if f.name in {g.name for g in dataclasses.fields(DecodeConfig)}
                           and f.name not in ("gen_length", "steps", "block_length", "temperature", "top_p", "top_k"))


def decode_config(args: ModelArgs, max_gen_toks: int, gen_kwargs: dict) -> DecodeConfig:
    """A task's generation request under these model args (see README: decoding args).

    The canvas is `gen_length` (else the task's max_gen_toks) rounded up to whole blocks;
    `steps` is rounded up to a multiple of the block count (at most one step per token),
    `steps_per_block` gives each block that many, neither means one step per token. A model
    arg's temperature/top_p/top_k wins over the task's; the other args left at None (`strategy=none`)
    keep DecodeConfig's default.
    """
    d = args.decode
    gen = d.gen_length or max_gen_toks
    block = d.block_length or gen
    rounded = math.ceil(gen / block) * block
    blocks = rounded // block
    if d.steps:
        steps = min(max(blocks, math.ceil(d.steps / blocks) * blocks), rounded)
    elif d.steps_per_block:
        steps = blocks * min(d.steps_per_block, block)
    else:
        steps = rounded
    if d.strategy is not None and REGISTRY[d.strategy].owns_loop:
        # block diffusion: each row's canvas is whole blocks from its own prompt start (no rounding
        # of gen here) and `steps` is the official per-block budget
        steps, rounded = steps // blocks, gen
    gen = rounded
    temperature = d.temperature if d.temperature is not None else float(gen_kwargs.get("temperature", 0.0))
    top_p = d.top_p if d.top_p is not None else gen_kwargs.get("top_p")
    top_k = d.top_k if d.top_k is not None else gen_kwargs.get("top_k")
    given = {name: getattr(d, name) for name in DECODE_PASSTHROUGH if getattr(d, name) is not None}
    return DecodeConfig(**given, gen_length=gen, steps=steps,
                        block_length=block, temperature=temperature, top_p=top_p, top_k=top_k, seed=args.seed)


def merge_harness_args(model_args: dict, harness: dict) -> dict:
    """Model args plus what lm-eval passes from --batch_size / --max_batch_size / --device.

    lm-eval calls `cls(**model_args, **harness)`, which is a TypeError when a key is in both. A value
    given in --model_args wins over the flag's default (lm-eval sends `--device cuda:0` and
    `--batch_size 1` when the flags are absent); two different explicit values are refused.
    """
    merged = dict(model_args)
    for key, value in harness.items():
        if value is None:
            continue
        if key not in merged or str(merged[key]) == str(value):
            merged[key] = value
        elif str(value) == str(HARNESS_DEFAULTS.get(key)):
            log.info("--model_args %s=%s is used (lm-eval's --%s default %s is ignored).", key, merged[key], key, value)
        else:
            raise ValueError(f"--model_args {key}={merged[key]} and --{key} {value} disagree; give {key} only once.")
    return merged


def _cast(name: str, value, hint):
    """Cast one value to the field type; lm-eval sends '8', 8.0, -1.0, 'none', 'True'..."""
    if value is None:
        return None
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    target = args[0] if args else hint
    optional = type(None) in typing.get_args(hint)
    if isinstance(value, str) and value.strip().lower() in ("none", "null", "") and optional:
        return None
    try:
        if target is bool:
            if isinstance(value, str):
                low = value.strip().lower()
                if low in ("true", "1", "yes", "on"):
                    return True
                if low in ("false", "0", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if target is int:
            f = float(value)  # "8", 8.0 and -1.0 are ints; "inf" raises OverflowError below
            if f != int(f):
                raise ValueError(value)
            return int(f)
        if target is float:
            return float(value)
        if target is str:
            if isinstance(value, float) and value == int(value):
                value = int(value)
            return str(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(
            f"Model arg {name}={value!r} is malformed: expected {getattr(target, '__name__', target)}."
        ) from None
    return value


def resolve_strategy(args: ModelArgs, spec, preset: dict | None = None, given=()) -> None:
    """Fix the decoding strategy before any request: `strategy=` (or the preset's), else the
    family's `default_strategy` (LLaDA2.x: `llada2`), else DecodeConfig's; `threshold=None`
    becomes the strategy's default, so the run fingerprint holds what decoding uses. A preset's
    strategy is a default for its own family: on a checkpoint whose attention it does not fit
    (a LLaDA2.x checkpoint under `metastate-llada`) the family's default replaces it, unless
    `strategy=` was given (`given`: the model args as typed). `block_length=None` becomes the
    family's `default_block_length` (LLaDA2.x: 32; the others keep one block).

    Raises:
        ValueError: the strategy's attention pattern is not the family's (a bidirectional
            strategy on LLaDA2.x would decode with attention the model was not trained for).
    """
    from_preset = "strategy" not in given and args.strategy == (preset or {}).get("strategy")
    if args.strategy is None or (from_preset and args.strategy not in fitting_strategies(spec)):
        args.strategy = spec.default_strategy or DecodeConfig.strategy
    check_strategy_fits(args.strategy, spec, arg=args.typed_names.get("strategy", "strategy"))
    if args.threshold is None:
        args.threshold = DecodeConfig.default_threshold(args.strategy)
    if args.block_length is None:
        args.block_length = spec.default_block_length
