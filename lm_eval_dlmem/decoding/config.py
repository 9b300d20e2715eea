"""`DecodeConfig`: every knob of diffusion decoding, validated in one place."""

from __future__ import annotations

from dataclasses import dataclass

from ..checks import NON_NEGATIVE, POSITIVE, UNIT, Range
from .strategies import REGISTRY

STRATEGIES = tuple(REGISTRY)  # the names DecodeConfig.strategy accepts
LLADA_REMASKING = ("low_confidence", "random")
DREAM_ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")
CACHE_MODES = ("none", "prefix", "dual")
# DecodeConfig's numeric fields. gen_length 0 is allowed here: the harness never decodes for it.
DECODE_RANGES = {
    "gen_length": NON_NEGATIVE,
    "steps": POSITIVE,
    "block_length": POSITIVE,
    "alg_temp": Range(0, hint="(None: Dream's default)"),
    "eps": Range(0, 1, lo_open=True, hi_open=True),
    "temperature": Range(0, hint="(0 is greedy)"),
    "top_p": Range(0, 1, lo_open=True),
    "top_k": Range(1, hint="(or None for no top-k filter)"),
    "threshold": UNIT,
    "editing_threshold": UNIT,
    "max_post_steps": NON_NEGATIVE,
    "cfg_scale": Range(0, hint="(0 disables guidance)"),
}


@dataclass
class DecodeConfig:
    """How to turn a masked canvas into text.

    Args:
        gen_length: tokens in the generation region (the masked canvas after the prompt).
        steps: total denoising steps over the whole generation (LLaDA semantics: divided evenly
            over the blocks). For `dream`, the number of steps of its single schedule. For
            `llada2`, the steps of *each* block (the official `steps_per_block`, at most
            `gen_length`; its default 32 with blocks of 32, and any value >= block_length decodes
            the same); `llada21` has no step budget and ignores it.
        block_length: semi-autoregressive block size; `gen_length` must be a multiple of it.
            `dream` with block_length == gen_length reproduces `diffusion_generate`. For
            `llada2`/`llada21` it need not be (each row's canvas is rounded up to whole blocks
            counted from its prompt start, as in the official samplers).
        strategy: `llada` (fixed commit count per step, `remasking`), `dream` (`alg`,
            `alg_temp`, `eps`, top_p/top_k), or `threshold` (Fast-dLLM: commit every masked
            position of the block whose confidence is >= `threshold`, and at least the LLaDA
            schedule's count (>= 1) per step, so a block never takes more than its share of
            `steps`; with steps == gen_length this is exactly "at least one per step").
            `llada2` (LLaDA2.0's block-diffusion sampler, dllm `LLaDA2Sampler`): the canvas is
            a whole number of blocks counted from each prompt's first token (the prompt's last
            block is shared with generated tokens), attention is block-causal; per step it
            commits every masked position of the block with probability > `threshold`, or else
            the schedule's count of the most confident ones. `llada21` (LLaDA2.1, dllm
            `LLaDA21Sampler`): the same commits (at least one per step, no step budget) plus
            an editing phase that rewrites already placed tokens of the block.
        remasking: LLaDA confidence: `low_confidence` (probability of the argmax) or `random`.
        alg / alg_temp / eps: Dream's confidence (`origin`, `maskgit_plus`, `topk_margin`,
            `entropy`), position-sampling temperature, and final timestep.
        temperature / top_p / top_k: token sampling. temperature 0 is greedy.
        threshold: confidence threshold for `threshold`, `llada2`, `llada21`; None = the
            strategy's default (0.9 for `threshold`, the official 0.95 for `llada2`/`llada21`).
        editing_threshold: `llada21`: an already placed, non-prompt token of the active block is
            replaced when the model's new token differs and has probability > this.
        max_post_steps: `llada21`: forwards per block after its last mask is filled in which
            edits may still happen.
        cfg_scale: classifier-free guidance; 0 disables (unconditional pass masks the prompt).
        cache: `none` (full forward every step: reference behaviour), `prefix` or `dual`
            (Fast-dLLM: full forward once per block, then only the suffix / active block).
        logits_eos_inf: forbid EOS as a predicted token (LLaDA `logits_eos_inf`).
        confidence_eos_eot_inf: never commit EOS/EoT by confidence (LLaDA Instruct option).
        stop_early: finish a row once EOS (or a stop sequence, see `generate`) is committed in
            its decoded prefix; the batch exits when every row is finished, per block.
        seed: base seed; each row draws from its own generator seeded with `seed + row_seed`.
    """

    gen_length: int = 128
    steps: int = 128
    block_length: int = 32
    strategy: str = "llada"
    remasking: str = "low_confidence"
    alg: str = "entropy"
    alg_temp: float | None = None
    eps: float = 1e-3
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    threshold: float | None = None
    editing_threshold: float = 0.9
    max_post_steps: int = 16
    cfg_scale: float = 0.0
    cache: str = "none"
    logits_eos_inf: bool = False
    confidence_eos_eot_inf: bool = False
    stop_early: bool = True
    seed: int = 0

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy={self.strategy!r}; choose one of {STRATEGIES}.")
        if self.threshold is None:
            self.threshold = self.default_threshold(self.strategy)
        if self.remasking not in LLADA_REMASKING:
            raise ValueError(f"remasking={self.remasking!r}; choose one of {LLADA_REMASKING}.")
        if self.alg not in DREAM_ALGS:
            raise ValueError(f"alg={self.alg!r}; choose one of {DREAM_ALGS}.")
        if self.cache not in CACHE_MODES:
            raise ValueError(f"cache={self.cache!r}; choose one of {CACHE_MODES}.")
        for name, allowed in DECODE_RANGES.items():
            allowed.check(name, getattr(self, name))
        own_loop = REGISTRY[self.strategy].owns_loop
        if not own_loop and self.gen_length % self.block_length:
            raise ValueError(
                f"gen_length={self.gen_length} is not a multiple of block_length={self.block_length}; "
                "round gen_length up or pick a block length that divides it."
            )
        if own_loop:
            self._check_block_strategy()
        elif self.num_blocks and self.steps % self.num_blocks:
            raise ValueError(
                f"steps={self.steps} must be a multiple of the number of blocks "
                f"(gen_length / block_length = {self.num_blocks}): steps are split evenly over blocks."
            )

    @staticmethod
    def default_threshold(strategy: str) -> float:
        """What `threshold=None` means for `strategy`: the official 0.95 for `llada2`/`llada21`,
        Fast-dLLM's 0.9 otherwise (`Strategy.default_threshold`). The one place it is resolved;
        the harness asks here so its run fingerprint holds the number."""
        return REGISTRY[strategy].default_threshold

    def _check_block_strategy(self) -> None:
        """What `llada2`/`llada21` use differs from the other strategies' rules (no multiple of
        block_length, steps per block); options they do not have are refused, not ignored."""
        unsupported = [f"{k}={getattr(self, k)}" for k, off in
                       (("cfg_scale", 0.0), ("confidence_eos_eot_inf", False)) if getattr(self, k) != off]
        if unsupported:
            raise ValueError(
                f"strategy={self.strategy} has no {', '.join(unsupported)} (the LLaDA2.x samplers do not); "
                "drop the option or use strategy=llada/threshold on a bidirectional backbone."
            )

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length if self.gen_length else 0
