"""Masked NLL of responses along two trajectories (MemDLM paper section 2.2):

- static: the ground-truth response with a random share r of its tokens masked; the loss is
  the mean NLL of the masked tokens given a pristine context (the training condition);
- sequential: the response starts fully masked and the model unmasks it itself, committing its
  most confident predictions, and the loss at ratio r is the NLL of the still-masked ground-truth
  tokens given its own earlier commits (the inference condition).

With a memory (MemDLM fast weights) the inner loop first adapts on the prompt of each row.
Batches are `training.data.collate` dicts (right padding); padding never counts as response.
Every row draws its masks from its own seed, so configurations compare on identical masks.
Shapes: B rows, L tokens, V vocab.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..decoding.forward import forward_step
from ..decoding.seeds import ratio_seed, row_seeds
from ..decoding.strategies import topk_rows
from ..memory.base import NoMemory


def response_mask(batch: dict) -> torch.Tensor:
    """bool [B, L]: real response tokens (not prompt, not padding)."""
    return batch["attention_mask"].bool() & ~batch["prompt_mask"]


def static_masks(maskable: torch.Tensor, ratio: float, seeds: list[int]) -> torch.Tensor:
    """Exactly max(1, floor(n * ratio)) random response tokens of each row (n its length)."""
    masked = torch.zeros_like(maskable)
    for i, seed in enumerate(seeds):
        idx = maskable[i].nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        k = min(idx.numel(), max(1, int(idx.numel() * ratio)))
        perm = torch.randperm(idx.numel(), generator=torch.Generator().manual_seed(seed)).to(idx.device)
        masked[i, idx[perm[:k]]] = True
    return masked


def masked_nll(logits: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Mean NLL over each row's masked positions, [B] (nan for a row with none)."""
    nll = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")
    return (nll * masked).sum(1) / masked.sum(1)


def session(backbone, batch: dict, memory, seeds: list[int]):
    """The memory's session on the batch (MemDLM: its inner loop on each row's prompt)."""
    memory = memory if memory is not None else NoMemory()
    return memory.session(backbone, batch["input_ids"], batch["attention_mask"], batch["prompt_mask"], seeds)


def forward(backbone, memory, canvas, attn, masked, maskable, step: int) -> torch.Tensor:
    """The guided forward step on `canvas` [B, L] -> logits [B, L, V]; the memory's time signal
    is each row's masked share of its response."""
    ratio = masked.sum(1).float() / maskable.sum(1).clamp_min(1).float()
    return forward_step(backbone, memory if memory is not None else NoMemory(), canvas, attn, step=step,
                        mask_ratio=ratio)


def _seeds(batch: dict, seed: int, seeds: list[int] | None) -> list[int]:
    return list(seeds) if seeds is not None else row_seeds(seed, batch["input_ids"].shape[0])


@torch.no_grad()
def static_nll(backbone, batch: dict, ratios, *, memory=None, seed: int = 0, seeds: list[int] | None = None) -> dict:
    """{ratio: [B] mean NLL of the masked response tokens} for the static trajectory.

    Args:
        backbone: the model (with or without an outer adapter).
        batch: a collated batch on the backbone's device.
        ratios: mask ratios to measure.
        memory: optional `FastWeightMemory`; its inner loop runs once on the prompts.
        seed / seeds: base seed, or one seed per row (default seed + row index).
    """
    seeds = _seeds(batch, seed, seeds)
    ids, attn = batch["input_ids"], batch["attention_mask"]
    maskable = response_mask(batch)
    out = {}
    with session(backbone, batch, memory, seeds):
        for j, ratio in enumerate(ratios):
            masked = static_masks(maskable, ratio, [ratio_seed(s, j) for s in seeds])
            logits = forward(backbone, memory, torch.where(masked, backbone.spec.mask_id, ids), attn, masked,
                             maskable, j)
            out[ratio] = masked_nll(logits, ids, masked)
    return out


@torch.no_grad()
def sequential_nll(backbone, batch: dict, ratios, *, memory=None, seed: int = 0, seeds: list[int] | None = None) -> dict:
    """{ratio: [B]} for the sequential trajectory: from a fully masked response, the NLL of the
    still-masked tokens at each ratio (descending), then low-confidence remasking down to the
    next ratio (the most confident predictions are committed). Arguments as `static_nll`."""
    seeds = _seeds(batch, seed, seeds)
    ids, attn = batch["input_ids"], batch["attention_mask"]
    maskable = response_mask(batch)
    n = maskable.sum(1)
    canvas = torch.where(maskable, backbone.spec.mask_id, ids)
    ratios = sorted(ratios, reverse=True)
    out = {}
    with session(backbone, batch, memory, seeds):
        for k, ratio in enumerate(ratios):
            masked = (canvas == backbone.spec.mask_id) & maskable
            if not masked.any():
                break
            logits = forward(backbone, memory, canvas, attn, masked, maskable, k)
            out[ratio] = masked_nll(logits, ids, masked)
            if k + 1 < len(ratios):
                canvas = _commit(canvas, logits, masked, n, ratios[k + 1])
    return out


def _commit(canvas, logits, masked, n, next_ratio: float) -> torch.Tensor:
    """The canvas with its most confident masked predictions committed (`topk_rows`), leaving
    int(n * next_ratio) of each row's n response tokens masked."""
    confidence, pred = logits.float().softmax(-1).max(-1)
    reveal = [int(m) - int(int(total) * next_ratio) for m, total in zip(masked.sum(1).tolist(), n.tolist())]
    return torch.where(topk_rows(confidence.masked_fill(~masked, -1.0), reveal), pred, canvas)
