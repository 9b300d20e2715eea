"""The one guided forward step every caller runs: the decode loop, the likelihood, MetaState
training and the NLL analysis.

    forward_step:  rows [B, L] -> (CFG: [cond; uncond] [2B, L]) -> StepInfo
                   -> with memory.step(info): backbone.logits(...) -> guidance -> logits [B, l, V]

Guidance (`cfg_scale > 0`): the unconditional copy has the `uncond_mask` positions (the prompt)
replaced by the mask token; logits = uncond + (cfg_scale + 1) (cond - uncond), LLaDA's formula.
The memory sees the forwarded batch, conditional rows first, and applies row b's state to both
copies (the guidance convention of `memory/`).

`BlockForward` is the decode loop's cache-window policy on top of it, under the three cache modes:

- `none`: every step forwards the whole canvas (the reference behaviour); only the LM head is
  restricted to the active block, which changes no logit of that block.
- `prefix` (Fast-dLLM): the first step of a block forwards the whole canvas and fills a
  `DiffusionCache`; later steps forward the block and everything after it, `[s, L)`, against the
  cached prefix keys/values.
- `dual` (Fast-dLLM): as `prefix`, but later steps forward only the block `[s, e)`; the masked
  suffix's keys/values are also reused from the block's first step.

Both caches are refreshed at every block start, so rows may leave the batch between blocks
without reordering a cache.

Shapes: B rows, L canvas, P padded prompt length, l returned positions (`keep`), V vocabulary.
"""

from __future__ import annotations

import torch

from ..backbones.common import DiffusionCache
from ..memory.base import StepInfo
from .config import DecodeConfig


def guidance_batch(ids, attn, uncond_mask, mask_id: int):
    """[ids; ids with `uncond_mask` set to `mask_id`] [2B, L] and the attention mask doubled
    (or None). uncond_mask: bool [B, L] (or broadcastable to it)."""
    uncond = ids.masked_fill(uncond_mask, mask_id)
    return torch.cat([ids, uncond]), None if attn is None else torch.cat([attn, attn])


def guide(logits: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """[cond; uncond] logits [2B, l, V] -> uncond + (cfg_scale + 1) (cond - uncond) [B, l, V]."""
    cond, uncond = logits.chunk(2, dim=0)
    return uncond + (cfg_scale + 1) * (cond - uncond)


def forward_step(backbone, memory, ids, attn, *, step: int, mask_ratio: torch.Tensor, cfg_scale: float = 0.0,
                 uncond_mask=None, cache=None, window=None, span=None, keep=None, upcast: bool = False,
                 block_length: int | None = None, visible=None):
    """One forward of `ids` inside the memory's step, with classifier-free guidance.

    Args:
        backbone: the `Backbone` (its `logits` contract: logits[:, j] predicts token j).
        memory: the `Memory` whose session is open (`NoMemory` for the frozen model).
        ids: [B, L] canvas rows; attn: [B, L] attention mask or None (no padding).
        step: the forward's index within the memory session.
        mask_ratio: [B] float, each row's masked fraction (the memory's time signal).
        cfg_scale: guidance scale; 0 forwards the B rows only.
        uncond_mask: bool [B, L] (or broadcastable): what the unconditional copy masks.
        cache / window / keep: as `Backbone.logits`.
        span: the canvas positions the forward covers, for `StepInfo.window` (default all).
        upcast: float32 logits before guidance (the likelihood's precision); False keeps the
            model dtype (the decode strategies choose their own precision).
        block_length: block-causal attention with blocks of this many tokens (block-causal
            families, LLaDA2.x decoding); None attends bidirectionally.
        visible: `StepInfo.visible` ([B, L] bool: what each row forwards alone), or None.

    Returns:
        logits [B, keep_len, V].
    """
    guided = cfg_scale > 0
    if guided:
        ids, attn = guidance_batch(ids, attn, uncond_mask, backbone.spec.mask_id)
        mask_ratio = torch.cat([mask_ratio, mask_ratio])
    info = StepInfo(step=step, mask_ratio=mask_ratio, window=span or (0, ids.shape[1]), input_ids=ids,
                    full=window is None, visible=visible)
    blocks = {} if block_length is None else {"block_length": block_length}
    with memory.step(info):
        logits = backbone.logits(ids, attn, cache=cache, window=window, keep=keep, **blocks)
    if upcast:
        logits = logits.float()
    return guide(logits, cfg_scale) if guided else logits


class BlockForward:
    """Callable `(x, attn, block, refresh) -> logits [B, n, V]` for the active block.

    Args:
        backbone: the `Backbone`.
        config: `cache`, `cfg_scale`.
        memory: the `Memory` (session open) whose step wraps every forward.
        prompt_len: P, the padded prompt length (positions < P are the prompt).
    """

    def __init__(self, backbone, config: DecodeConfig, memory, prompt_len: int):
        self.backbone = backbone
        self.mode = config.cache
        self.cfg_scale = config.cfg_scale
        self.memory = memory
        self.P = prompt_len
        self.mask_id = backbone.spec.mask_id
        self.cache: DiffusionCache | None = None
        self.step = 0

    def window(self, L: int, block: tuple[int, int], refresh: bool):
        """(cache, window, span) of this step: a full forward filling a fresh cache at a block's
        first step, otherwise the mode's window against the cached keys/values."""
        s, e = block
        if self.mode == "none":
            return None, None, self.backbone.forwarded(L)
        if refresh or self.cache is None:
            self.cache = DiffusionCache()
            return self.cache, None, self.backbone.forwarded(L)
        window = (s, L) if self.mode == "prefix" else (s, e)
        return self.cache, window, self.backbone.forwarded(L, window, cached=True)

    def __call__(self, x, attn, block: tuple[int, int], refresh: bool) -> torch.Tensor:
        cache, window, span = self.window(x.shape[1], block, refresh)
        prompt = torch.zeros(1, x.shape[1], dtype=torch.bool, device=x.device)
        prompt[:, : self.P] = True  # the unconditional copy masks every prompt column, padding too
        logits = forward_step(
            self.backbone, self.memory, x, attn, step=self.step,
            mask_ratio=(x[:, self.P :] == self.mask_id).float().mean(-1), cfg_scale=self.cfg_scale,
            uncond_mask=prompt, cache=cache, window=window, span=span, keep=block,
        )
        self.step += 1
        return logits
