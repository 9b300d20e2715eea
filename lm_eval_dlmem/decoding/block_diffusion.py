"""Block-diffusion decoding for LLaDA2.x: the `llada2` and `llada21` strategies.

The official samplers (dllm `LLaDA2Sampler` / `LLaDA21Sampler`, LLaDA2's `model.generate`) lay a
row out as whole blocks of n tokens counted from its first prompt token; decoding starts at the
block holding the prompt's end (shared with the first generated tokens) and attention is
block-causal. Left-padded rows keep that per-row geometry inside one canvas:

    canvas [B, L] = [left-padded prompt (P) | masks up to each row's last block]
    row r: pad_r, prompt p_r = P - pad_r, blocks start at pad_r + k * n,
           block step j decodes its block k0_r + j (k0_r = p_r // n) at a_r = pad_r + (k0_r + j) n

so in one block step the rows' active blocks sit at different columns, all inside the window
[min a, max a + n) of at most 2n - 1 positions. A forward covers the canvas up to that window's
end (later columns cannot be seen by it under block-causal attention): the whole prefix with
`cache=none`, or only the window against a KV cache filled at the block step's first forward
(`prefix` and `dual` coincide here and are exact, since finished blocks never change).

Rows never interact: each has its own generator and block geometry, rows whose blocks are done
commit nothing while batch-mates finish, and rows leave the batch when their last block is done or
a stop id / stop string appears in their decoded text (`stop_early`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..backbones.common import DiffusionCache
from ..memory.base import NoMemory
from .config import DecodeConfig
from .forward import forward_step
from .schedule import llada_transfer_counts
from .strategies import RowRandom, argmax_without, filter_top_k, filter_top_p, suppress, topk_rows


@dataclass
class BlockRows:
    """The rows still decoding. x [b, L]; attn [b, L] or None; pad / first_block / n_blocks per
    row (ints); rows: index in the caller's batch."""

    x: torch.Tensor
    attn: torch.Tensor | None
    pad: list[int]
    first_block: list[int]
    n_blocks: list[int]
    rows: list[int]

    @classmethod
    def build(cls, input_ids, attention_mask, gen_length: int, n: int, mask_id: int) -> "BlockRows":
        B, P = input_ids.shape
        pad = [0] * B
        if attention_mask is not None:
            attention_mask = attention_mask.to(input_ids.device)
            if P and not bool(attention_mask[:, -1].all()):
                raise ValueError("generate() needs left-padded prompts (the last prompt position of every row "
                                 "must be a real token); set tokenizer.padding_side = 'left'.")
            pad = (P - attention_mask.long().sum(-1)).tolist()
        prompt = [P - p for p in pad]
        n_blocks = [-(-(p + gen_length) // n) for p in prompt]
        L = max(d + k * n for d, k in zip(pad, n_blocks))
        x = torch.cat([input_ids, input_ids.new_full((B, L - P), mask_id)], dim=1)
        attn = None
        if any(pad):
            attn = torch.cat([attention_mask.long(), attention_mask.new_ones((B, L - P)).long()], 1)
        return cls(x, attn, pad, [p // n for p in prompt], n_blocks, list(range(B)))

    def starts(self, j: int, n: int) -> list[int]:
        """Canvas column where each row's active block of block step j starts."""
        return [d + (k + j) * n for d, k in zip(self.pad, self.first_block)]

    def select(self, keep: list[int]) -> "BlockRows":
        index = torch.tensor(keep, dtype=torch.long, device=self.x.device)
        pick = lambda v: [v[k] for k in keep]  # noqa: E731
        return BlockRows(self.x.index_select(0, index),
                         None if self.attn is None else self.attn.index_select(0, index),
                         pick(self.pad), pick(self.first_block), pick(self.n_blocks), pick(self.rows))


class BlockStepForward:
    """Callable `(rows, starts, refresh) -> logits [b, n, V]` of each row's active block.

    Forwards the canvas up to the end of the rows' common window; with a cache mode other than
    `none` the first forward of a block step fills a `DiffusionCache` and later ones forward only
    the window. Every forward is `forward.forward_step` (the memory's step wraps it), as in
    `forward.BlockForward`.
    """

    def __init__(self, backbone, config: DecodeConfig, memory, prompt_len: int):
        self.backbone, self.memory = backbone, memory
        self.n, self.mode, self.P = config.block_length, config.cache, prompt_len
        self.mask_id = backbone.spec.mask_id
        self.cache: DiffusionCache | None = None
        self.step = 0
        self.block = -1  # a block's first forward (refresh) starts the next block

    def __call__(self, rows: BlockRows, starts: torch.Tensor, refresh: bool, live=None) -> torch.Tensor:
        """`live` [b] bool: rows still decoding their block (None = all); the others only wait."""
        ws, we = int(starts.min()), int(starts.max()) + self.n
        self.block += refresh
        x = rows.x[:, :we]
        attn = None if rows.attn is None else rows.attn[:, :we]
        if self.mode == "none":
            cache, window = None, None
        elif refresh or self.cache is None:
            self.cache = cache = DiffusionCache()
            window = None
        else:
            cache, window = self.cache, (ws, we)
        visible = self.visible(rows, starts, live, windowed=window is not None)
        if cache is not None:
            cache.fresh = visible if window is not None else None
        logits = forward_step(
            self.backbone, self.memory, x, attn, step=self.step, mask_ratio=self.mask_ratio(rows),
            cache=cache, window=window, span=window or (0, we), keep=(ws, we), block_length=self.n,
            visible=visible, block_index=self.block,
        )
        self.step += 1
        index = (starts - ws)[:, None] + torch.arange(self.n, device=starts.device)  # [b, n]
        return logits[torch.arange(len(starts), device=starts.device)[:, None], index]

    def visible(self, rows: BlockRows, starts, live, windowed: bool) -> torch.Tensor:
        """[b, L] bool: the columns each row forwards when decoded alone (its canvas up to the
        active block's end; only that block in a windowed step; nothing while it waits)."""
        col = torch.arange(rows.x.shape[1], device=starts.device)[None]
        seen = col < starts[:, None] + self.n
        if windowed:
            seen = seen & (col >= starts[:, None])
        return seen if live is None else seen & live.to(seen.device)[:, None]

    def mask_ratio(self, rows: BlockRows) -> torch.Tensor:
        """[b] masked fraction of each row's own generation region (prompt end to its last block),
        as the row alone has it (the shared canvas runs on to the longest row's last block)."""
        end = torch.tensor([d + k * self.n for d, k in zip(rows.pad, rows.n_blocks)], device=rows.x.device)
        col = torch.arange(rows.x.shape[1], device=rows.x.device)[None]
        region = (col >= self.P) & (col < end[:, None])
        return ((rows.x == self.mask_id) & region).sum(-1).float() / region.sum(-1).clamp_min(1)


def sample_tokens(logits, config: DecodeConfig, spec, rng: RowRandom, active: list[int]):
    """The samplers' `sample_tokens`: temperature 0 takes the argmax of the float32 softmax; else
    logits / T, top-k, top-p, softmax and one categorical draw per position (only rows in
    `active` draw, so a waiting row's generator is untouched). The mask token is never chosen
    (see `argmax_without`). Returns tokens [b, n] and their probabilities [b, n] (float32)."""
    logits = logits.float()
    if config.logits_eos_inf:
        suppress(logits, (spec.eos_id,))
    if config.temperature == 0:
        probs = F.softmax(logits, dim=-1)
        p, x0 = argmax_without(probs, spec.mask_id, values=True)
        return x0, p
    logits = logits / config.temperature
    if config.top_k is not None:
        logits = filter_top_k(logits, config.top_k)
    if config.top_p is not None and config.top_p < 1:
        logits = filter_top_p(logits, config.top_p)
    probs = F.softmax(logits, dim=-1)
    x0 = probs.argmax(-1)
    if active:
        no_mask = probs[active].index_fill(-1, torch.tensor([spec.mask_id], device=probs.device), 0)
        x0[active] = rng.select(active).categorical(no_mask)
    return x0, probs.gather(-1, x0[..., None]).squeeze(-1)


def confident_commits(p, masked, k: int, threshold: float) -> torch.Tensor:
    """[b, n] bool: every masked position with p > threshold if there are at least k of them,
    else the min(k, masked) most probable masked ones (torch.topk over the block, as the
    samplers break ties)."""
    confidence = p.masked_fill(~masked, -torch.inf)
    high = (confidence > threshold) & masked
    n_high, n_masked = high.sum(-1).tolist(), masked.sum(-1).tolist()
    counts = [min(k, m) if h < k else 0 for h, m in zip(n_high, n_masked)]  # rows short of k high ones
    short = torch.tensor([c > 0 for c in counts], device=p.device)
    return torch.where(short[:, None], topk_rows(confidence, counts), high)


def gather_blocks(x, starts, n):
    """x [b, L] -> the rows' active blocks [b, n] and their column index [b, n]."""
    index = starts[:, None] + torch.arange(n, device=x.device)
    return x.gather(1, index), index


def llada2_block(rows: BlockRows, starts, forward, config: DecodeConfig, spec, rng: RowRandom, G: int):
    """LLaDA2.0: at most `min(steps, gen_length)` steps; step i commits the confident masked
    positions or the even schedule's count (`llada_transfer_counts(n, steps)`)."""
    n = config.block_length
    steps = min(config.steps, G)
    counts = llada_transfer_counts(n, steps)
    for i in range(steps):
        block, index = gather_blocks(rows.x, starts, n)
        masked = block == spec.mask_id
        if not bool(masked.any()):
            break
        logits = forward(rows, starts, refresh=i == 0, live=masked.any(-1))
        active = masked.any(-1).nonzero().squeeze(-1).tolist()
        x0, p = sample_tokens(logits, config, spec, rng, active)
        commit = confident_commits(p, masked, counts[i], config.threshold)
        rows.x.scatter_(1, index, torch.where(commit, x0, block))


def llada21_block(rows: BlockRows, starts, forward, config: DecodeConfig, spec, rng: RowRandom, P: int):
    """LLaDA2.1: each step commits the confident masked positions (at least one) and edits every
    placed, non-prompt token whose new prediction differs with probability > editing_threshold.
    A row's block ends after a step that had no mask left and edited nothing, or once
    `max_post_steps` forwards found no mask left."""
    n = config.block_length
    b = rows.x.shape[0]
    post = torch.zeros(b, dtype=torch.long, device=rows.x.device)
    done = torch.zeros(b, dtype=torch.bool, device=rows.x.device)
    first = True
    while True:
        block, index = gather_blocks(rows.x, starts, n)
        masked = block == spec.mask_id
        post += (~masked.any(-1)).long()
        done |= post > config.max_post_steps
        if bool(done.all()):
            break
        logits = forward(rows, starts, refresh=first, live=~done)
        first = False
        active = (~done).nonzero().squeeze(-1).tolist()
        x0, p = sample_tokens(logits, config, spec, rng, active)
        commit = confident_commits(p, masked, 1, config.threshold)
        editable = ~masked & (index >= P)  # the prompt's columns end at P in every row
        edit = editable & (p > config.editing_threshold) & (x0 != block)
        write = (commit | edit) & ~done[:, None]
        rows.x.scatter_(1, index, torch.where(write, x0, block))
        done |= ~masked.any(-1) & ~edit.any(-1)


@torch.no_grad()
def generate_blocks(backbone, input_ids, attention_mask, config: DecodeConfig, memory=None, *,
                    seeds: list[int], stop_sequences=None, edits: bool = False) -> torch.LongTensor:
    """`engine.generate` for `strategy=llada2` (`edits=False`) or `llada21` (`edits=True`), with
    its arguments and return contract (called through `REGISTRY[...].generate`, after the
    family's attention pattern was checked): [B, G] generation region; rows that stopped early
    hold `spec.eos_id` after their last block."""
    from .engine import check_no_mask, finished_rows, session_masks

    spec = backbone.spec
    device = backbone.device
    B, P = input_ids.shape  # engine.generate moved them to the device and handled empty batches
    G, n = config.gen_length, config.block_length
    out = torch.full((B, G), spec.eos_id, dtype=torch.long, device=device)
    rows = BlockRows.build(input_ids, attention_mask, G, n, spec.mask_id)
    rng = RowRandom.from_seeds(seeds, device)
    memory = memory if memory is not None else NoMemory()
    forward = BlockStepForward(backbone, config, memory, P)
    attn, prompt_mask = session_masks(rows.x, rows.attn, P)
    decode, extra = (llada21_block, P) if edits else (llada2_block, G)
    with memory.session(backbone, rows.x, attn, prompt_mask, seeds):
        j = 0
        while rows.rows:
            starts = rows.starts(j, n)
            decode(rows, torch.tensor(starts, device=device), forward, config, spec, rng, extra)
            ends = [s + n for s in starts]
            last = [k + j + 1 >= m for k, m in zip(rows.first_block, rows.n_blocks)]
            stopped = [False] * len(ends)
            if config.stop_early:
                stopped = [finished_rows(rows.x[r : r + 1, P:e], spec.stop_ids, stop_sequences,
                                         backbone.tokenizer)[0] for r, e in enumerate(ends)]
            for r, (e, fin) in enumerate(zip(ends, map(any, zip(last, stopped)))):
                if fin:
                    m = min(e - P, G)
                    out[rows.rows[r], :m] = rows.x[r, P : P + m]
            keep = [r for r, fin in enumerate(map(any, zip(last, stopped))) if not fin]
            if len(keep) < len(rows.rows):
                if keep:
                    memory.select(torch.tensor(keep, device=device))
                rows, rng = rows.select(keep), rng.select(keep)
            j += 1
    check_no_mask(out, spec.mask_id)
    return out
