"""The decode loop's forward pass under the three cache modes, with CFG and the memory hooks.

- `none`: every step forwards the whole canvas (the reference behaviour); only the LM head is
  restricted to the active block, which changes no logit of that block.
- `prefix` (Fast-dLLM): the first step of a block forwards the whole canvas and fills a
  `DiffusionCache`; later steps forward the block and everything after it, `[s, L)`, against the
  cached prefix keys/values.
- `dual` (Fast-dLLM): as `prefix`, but later steps forward only the block `[s, e)`; the masked
  suffix's keys/values are also reused from the block's first step.

Both caches are refreshed at every block start, so rows may leave the batch between blocks
without reordering a cache. With CFG (`cfg_scale > 0`) the forward batch is `[cond; uncond]`
(2B rows, the prompt masked in the unconditional half); the memory holds the B conditional rows
and applies row b's state to both copies (the guidance convention of `memory/`).
"""

from __future__ import annotations

import torch

from ..backbones.common import DiffusionCache
from ..memory.base import StepInfo
from .config import DecodeConfig


class BlockForward:
    """Callable `(x, attn, block, refresh) -> logits [B, n, V]` for the active block.

    Args:
        backbone: the `Backbone` (its `logits` contract: logits[:, j] predicts token j).
        config: `cache`, `cfg_scale`.
        memory: the `Memory` whose `before_forward` / `after_forward` wrap every forward.
        prompt_len: P, the padded prompt length (positions < P are the prompt).
    """

    def __init__(self, backbone, config: DecodeConfig, memory, prompt_len: int):
        self.backbone = backbone
        self.mode = config.cache
        self.cfg_scale = config.cfg_scale
        self.memory = memory
        self.P = prompt_len
        self.mask_id = backbone.spec.mask_id
        self.shift = 1 if backbone.spec.logit_shift else 0
        self.cache: DiffusionCache | None = None
        self.step = 0

    @property
    def guided(self) -> bool:
        return self.cfg_scale > 0

    def inputs(self, x: torch.Tensor, attn: torch.Tensor | None):
        """The forward batch: x [B, L] or, with CFG, [x; x with the prompt masked] [2B, L]."""
        if not self.guided:
            return x, attn
        uncond = x.clone()
        uncond[:, : self.P] = self.mask_id
        attn2 = None if attn is None else torch.cat([attn, attn])
        return torch.cat([x, uncond]), attn2

    def __call__(self, x, attn, block: tuple[int, int], refresh: bool) -> torch.Tensor:
        s, e = block
        L = x.shape[1]
        xs, attns = self.inputs(x, attn)
        if self.mode == "none":
            cache, window, span = None, None, (0, L)
        elif refresh or self.cache is None:
            self.cache = DiffusionCache()
            cache, window, span = self.cache, None, (0, L)
        else:
            cache, window = self.cache, ((s, L) if self.mode == "prefix" else (s, e))
            span = (max(s - self.shift, 0), window[1])  # a shifted model also forwards s - 1
        info = StepInfo(
            step=self.step,
            mask_ratio=(xs[:, self.P :] == self.mask_id).float().mean(-1),
            window=span,
            input_ids=xs,
            full=window is None,
        )
        self.memory.before_forward(info)
        logits = self.backbone.logits(xs, attns, cache=cache, window=window, keep=(s, e))
        self.memory.after_forward(info)
        self.step += 1
        if self.guided:
            cond, uncond = logits.chunk(2, dim=0)
            logits = uncond + (self.cfg_scale + 1) * (cond - uncond)
        return logits
