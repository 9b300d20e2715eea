"""`DecodeConfig`: every knob of diffusion decoding, validated in one place."""

from __future__ import annotations

from dataclasses import dataclass, field

STRATEGIES = ("llada", "dream", "threshold", "llada2", "llada21")
# block-diffusion samplers (LLaDA2.x): blocks aligned to each prompt's start, block-causal attention
BLOCK_STRATEGIES = ("llada2", "llada21")
OFFICIAL_THRESHOLD = {"llada2": 0.95, "llada21": 0.95}  # the samplers' defaults; others 0.9
LLADA_REMASKING = ("low_confidence", "random")
DREAM_ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")
CACHE_MODES = ("none", "prefix", "dual")


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
        block_length: for `llada2`/`llada21` `gen_length` need not be a multiple of it (the
            canvas is rounded up to whole blocks, as in the official samplers).
        block_length: semi-autoregressive block size; `gen_length` must be a multiple of it.
            `dream` with block_length == gen_length reproduces `diffusion_generate`.
        strategy: `llada` (fixed commit count per step, `remasking`), `dream` (`alg`,
            `alg_temp`, `eps`, top_p/top_k), or `threshold` (Fast-dLLM: commit every masked
            position of the block whose confidence is >= `threshold`, and at least the LLaDA
            schedule's count (>= 1) per step, so a block never takes more than its share of
            `steps`; with steps == gen_length this is exactly "at least one per step").
        remasking: LLaDA confidence: `low_confidence` (probability of the argmax) or `random`.
        alg / alg_temp / eps: Dream's confidence (`origin`, `maskgit_plus`, `topk_margin`,
            `entropy`), position-sampling temperature, and final timestep.
        temperature / top_p / top_k: token sampling. temperature 0 is greedy.
            `llada2` (LLaDA2.0's block-diffusion sampler, dllm `LLaDA2Sampler`): the canvas is
            a whole number of blocks counted from each prompt's first token (the prompt's last
            block is shared with generated tokens), attention is block-causal; per step it
            commits every masked position of the block with probability > `threshold`, or else
            the schedule's count of the most confident ones. `llada21` (LLaDA2.1, dllm
            `LLaDA21Sampler`): the same commits (at least one per step, no step budget) plus
            an editing phase that rewrites already placed tokens of the block.
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
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy={self.strategy!r}; choose one of {STRATEGIES}.")
        if self.remasking not in LLADA_REMASKING:
            raise ValueError(f"remasking={self.remasking!r}; choose one of {LLADA_REMASKING}.")
        if self.alg not in DREAM_ALGS:
            raise ValueError(f"alg={self.alg!r}; choose one of {DREAM_ALGS}.")
        if self.cache not in CACHE_MODES:
            raise ValueError(f"cache={self.cache!r}; choose one of {CACHE_MODES}.")
        if self.gen_length < 0:
            raise ValueError(f"gen_length={self.gen_length} must be >= 0.")
        if self.block_length <= 0:
            raise ValueError(f"block_length={self.block_length} must be > 0.")
        if self.threshold is None:
            self.threshold = OFFICIAL_THRESHOLD.get(self.strategy, 0.9)
        block = self.strategy in BLOCK_STRATEGIES
        if not block and self.gen_length % self.block_length:
            raise ValueError(
                f"gen_length={self.gen_length} is not a multiple of block_length={self.block_length}; "
                "round gen_length up or pick a block length that divides it."
            )
        if self.steps <= 0:
            raise ValueError(f"steps={self.steps} must be > 0.")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold={self.threshold} must be in [0, 1].")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0.")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1].")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k={self.top_k} must be >= 1 (or None for no top-k filter).")
        if self.alg_temp is not None and self.alg_temp < 0:
            raise ValueError(f"alg_temp={self.alg_temp} must be >= 0 (or None).")
        if not 0.0 < self.eps < 1.0:
            raise ValueError(f"eps={self.eps} must be in (0, 1).")
        if self.cfg_scale < 0:
            raise ValueError(f"cfg_scale={self.cfg_scale} must be >= 0 (0 disables guidance).")
        if block:
            self._check_block_strategy()
        elif self.num_blocks and self.steps % self.num_blocks:
            raise ValueError(
                f"steps={self.steps} must be a multiple of the number of blocks "
                f"(gen_length / block_length = {self.num_blocks}): steps are split evenly over blocks."
            )

    def _check_block_strategy(self) -> None:
        """What `llada2`/`llada21` use differs from the other strategies' rules (no multiple of
        block_length, steps per block); options they do not have are refused, not ignored."""
        if not 0.0 <= self.editing_threshold <= 1.0:
            raise ValueError(f"editing_threshold={self.editing_threshold} must be in [0, 1].")
        if self.max_post_steps < 0:
            raise ValueError(f"max_post_steps={self.max_post_steps} must be >= 0.")
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
