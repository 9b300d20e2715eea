"""The memory protocol the decoder and likelihood scorer talk to, so neither knows which method
runs. `NoMemory` is the frozen baseline: the same code path with every hook a no-op.

Call order for one batch:

    memory.begin(backbone, input_ids, attention_mask, prompt_mask, seeds)
    for every forward:                      # each denoising step / each MC likelihood pass
        memory.before_forward(step_info)    # e.g. MetaState: set time conditioner, arm hooks
        logits = backbone.logits(...)
        memory.after_forward(step_info)     # e.g. MetaState: Mixer read -> Updater -> new state
    memory.end()                            # remove hooks / fast weights

`StepInfo` tells the memory what is being forwarded. Rows are independent: state is per row,
and `select(rows)` keeps a subset when finished rows leave the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StepInfo:
    """What the decoder is about to forward.

    Attributes:
        step: global denoising step index (0-based) within this batch.
        mask_ratio: [B] float, fraction of the generation region still masked (1 at the start).
        window: (start, end) canvas positions being forwarded (the whole canvas without cache).
        input_ids: [B, L] the current canvas.
        full: True when this forward covers the whole canvas (no cache, or a cache refresh).
    """

    step: int
    mask_ratio: torch.Tensor
    window: tuple[int, int]
    input_ids: torch.Tensor
    full: bool = True


class Memory:
    """Base class: every hook is a no-op (this *is* the frozen baseline)."""

    name = "none"

    def begin(self, backbone, input_ids, attention_mask, prompt_mask, seeds=None) -> None:
        """Reset per-request state for a new batch. input_ids/attention_mask/prompt_mask [B, L];
        prompt_mask is True on prompt tokens. seeds: list[int] per row (reproducibility)."""

    def before_forward(self, info: StepInfo) -> None:
        pass

    def after_forward(self, info: StepInfo) -> None:
        pass

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the given batch rows (LongTensor of indices)."""

    def end(self) -> None:
        """Remove hooks / adapters; the backbone is exactly the frozen model again."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.end()
        return False


class NoMemory(Memory):
    pass
