"""Mask states of MemDLM's inner loop ("progressive memory-consistent", the released default).

The anchor is the masked state the model should denoise well (at inference: each prompt token
masked with probability p; in training: the outer loss's x_t). The pre-anchor masks more of the
same positions; intermediate states reveal the extra positions in even random portions, so every
state contains the next (nested) and the last one is the anchor itself.

All randomness comes from one generator per row (or one shared by all rows), so a row's masks do
not depend on the other rows of its batch. Masks are bool [B, L].
"""

from __future__ import annotations

import math

import torch


def _row_generator(generators: list[torch.Generator], i: int) -> torch.Generator:
    return generators[i] if len(generators) > 1 else generators[0]


def prompt_anchor(maskable: torch.Tensor, p: float, generators: list[torch.Generator]) -> torch.Tensor:
    """Each maskable token of row i masked with probability p, drawn from row i's generator over
    that row's maskable tokens only (so padding and batch width do not change the draw)."""
    anchor = torch.zeros_like(maskable)
    for i in range(maskable.shape[0]):
        idx = maskable[i].nonzero().squeeze(1)
        g = _row_generator(generators, i)
        u = torch.rand(idx.numel(), generator=g, device=g.device).to(idx.device)
        anchor[i, idx[u < p]] = True
    return anchor


def anchor_states(
    maskable: torch.Tensor,
    anchor: torch.Tensor,
    steps: int,
    scale: float,
    generators: list[torch.Generator],
) -> list[torch.Tensor]:
    """The `steps` nested mask states of the inner loop, pre-anchor first, anchor last.

    Args:
        maskable: [B, L] positions that may be masked.
        anchor: [B, L] the anchor mask (subset of maskable).
        steps: number of states; 1 gives only the pre-anchor (as the released code does).
        scale: the pre-anchor's ratio is clip(scale * anchor ratio, anchor ratio, 1).
        generators: one per row, or a single shared one.

    Returns:
        list of `steps` bool masks [B, L].
    """
    if steps <= 0:
        return []
    anchor = anchor & maskable
    states = [pre_anchor(maskable, anchor, scale, generators)]
    for k in range(steps - 1):
        remaining = steps - 1 - k  # reveal the extra masks in `remaining` even portions
        states.append(anchor.clone() if remaining == 1 else _reveal(states[-1], anchor, remaining, generators))
    return states


def pre_anchor(maskable, anchor, scale: float, generators) -> torch.Tensor:
    """Anchor plus uniformly random extra maskable positions up to floor(n * start_ratio)."""
    pre = anchor.clone()
    for i in range(maskable.shape[0]):
        total = int(maskable[i].sum())
        n_final = int(anchor[i].sum())
        if total == 0:
            continue
        extra = min(total, max(n_final, int(total * start_ratio(n_final, total, scale)))) - n_final
        candidates = (maskable[i] & ~anchor[i]).nonzero().squeeze(1)
        extra = min(extra, candidates.numel())
        if extra > 0:
            pre[i, candidates[_perm(candidates.numel(), generators, i, candidates.device)[:extra]]] = True
    return pre


def start_ratio(n_final: int, total: int, scale: float) -> float:
    """The pre-anchor's mask ratio clip(scale * n_final / total, n_final / total, 1), computed in
    float32 as the released code does (its ratios are float32 tensors). In float64 floor(total *
    ratio) is one token off for about 15% of (n_final, total) pairs: 6 of 14 masked gives
    14 * 1.5 * 6/14 = 9.0 in float64 but 8.99999 in float32, so the released code masks 8."""
    ratio = torch.tensor(n_final, dtype=torch.float32) / torch.tensor(total, dtype=torch.float32)
    start = torch.minimum(torch.maximum(ratio * scale, ratio), torch.ones_like(ratio))
    return float(start)


def _reveal(state, anchor, remaining: int, generators) -> torch.Tensor:
    nxt = state.clone()
    for i in range(state.shape[0]):
        extra = (state[i] & ~anchor[i]).nonzero().squeeze(1)
        n = math.ceil(extra.numel() / remaining)
        if n > 0:
            nxt[i, extra[_perm(extra.numel(), generators, i, extra.device)[:n]]] = False
    return nxt


def _perm(n: int, generators, i: int, device) -> torch.Tensor:
    g = _row_generator(generators, i)
    return torch.randperm(n, generator=g, device=g.device).to(device)
