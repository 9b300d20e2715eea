"""The outer adapter's LoRA dropout during MemDLM's inference inner loop (`seeded_adapter_dropout`).

Loading and creating outer adapters moved to `lm_eval_dlmem.backbones.adapters` (an adapter
changes the backbone); their names are re-exported here so `from lm_eval_dlmem.memory.adapters
import apply_adapter` keeps working (deprecated path, see the README).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from ..backbones.adapters import (  # noqa: F401  (re-exported from the old path)
    ADAPTER_WEIGHT_FILES,
    AdapterKeysError,
    add_outer_lora,
    apply_adapter,
    check_adapter_keys,
    linear_targets,
)

# ---- the outer adapter's dropout during the inference inner loop ------------------------------
# The released evaluator runs its inner loop with the model in train() mode (it switches gradient
# checkpointing on that way), so the outer LoRA's dropout (0.05) is active while the fast weights
# adapt, and only then. Here the dropout modules are swapped for `SeededDropout` for the inner loop
# only: same p, but the mask is a hash of (row seed, layer, stage, token position, feature), so a
# row's result does not depend on its batch, a rerun is identical, and a checkpointed block
# recomputes the very same mask in the backward.

_M32 = 0xFFFFFFFF


def _mix32(h: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply) on int64 tensors holding values < 2**32."""
    h = (((h >> 16) ^ h) * 0x45D9F3B) & _M32
    h = (((h >> 16) ^ h) * 0x45D9F3B) & _M32
    return (h >> 16) ^ h


class DropoutRows:
    """Which row and position each token of a LoRA input belongs to, and the rows' seeds.

    Args:
        seeds: [B] per-row seeds (any ints).
        offsets: [B] index of each row's first real token (left padding is not counted, so
            positions and masks do not depend on the batch's longest prompt).
    """

    def __init__(self, seeds: list[int], offsets: torch.Tensor):
        self.seeds = torch.tensor([int(s) & _M32 ^ (int(s) >> 32) & _M32 for s in seeds], device=offsets.device)
        self.offsets = offsets.long()
        self.stage = 0

    def locate(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(row [N], position [N]) of the N tokens of x, flattened to [N, features]."""
        from ..backbones.llada_moe import EXPERT_TOKENS

        B, device = self.seeds.shape[0], x.device
        if x.dim() == 3:  # [B, L, C]
            idx = torch.arange(x.shape[0] * x.shape[1], device=device)
            seq_len = x.shape[1]
        elif EXPERT_TOKENS.get() is not None:  # [N_e, C]: the tokens routed to one expert
            idx, seq_len = EXPERT_TOKENS.get()
        else:  # [B * L, C], e.g. the MoE router's input
            idx, seq_len = torch.arange(x.shape[0], device=device), x.shape[0] // B
        row = torch.div(idx, seq_len, rounding_mode="floor") % B
        return row, idx % seq_len - self.offsets.to(device)[row]


class SeededDropout(nn.Module):
    """Inverted dropout with probability p whose keep mask is a hash (see above), never the
    global RNG. `salt` tells the adapter's dropout modules apart."""

    def __init__(self, p: float, salt: int, rows: DropoutRows):
        super().__init__()
        self.p, self.salt, self.rows = p, salt, rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        row, pos = self.rows.locate(x)
        flat = x.reshape(-1, x.shape[-1])
        base = _mix32((self.rows.seeds.to(x.device) + self.salt * 0x9E3779B1 + self.rows.stage * 0x85EBCA6B) & _M32)
        token = _mix32(base[row] ^ (pos & _M32))  # [N]
        feature = _mix32(torch.arange(flat.shape[1], device=x.device) + 0x27D4EB2F)  # [C]
        keep = _mix32(token[:, None] ^ feature[None, :]) >= int(self.p * 2**32)
        return (flat * keep.to(flat.dtype) / (1.0 - self.p)).view_as(x)


@contextlib.contextmanager
def seeded_adapter_dropout(model: nn.Module, seeds: list[int], offsets: torch.Tensor):
    """Within the block, every PEFT LoRA dropout of `model` (p > 0) is a `SeededDropout`, active
    whatever the train/eval mode. Yields the `DropoutRows` (set `.stage` per inner step), or None
    when the model has no LoRA dropout (no outer adapter, or dropout 0). Always restores."""
    found = [(m.lora_dropout, k, d) for m in model.modules() if isinstance(getattr(m, "lora_dropout", None), nn.ModuleDict)
             for k, d in m.lora_dropout.items() if isinstance(d, nn.Dropout) and d.p > 0]
    rows = DropoutRows(seeds, offsets) if found else None
    try:
        for salt, (holder, key, drop) in enumerate(found):
            holder[key] = SeededDropout(drop.p, salt, rows)
        yield rows
    finally:
        for holder, key, drop in found:
            holder[key] = drop
