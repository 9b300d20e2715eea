"""The diffusion decode loop: one function for every family, strategy, cache mode and memory.

    canvas = [left-padded prompt | mask * gen_length]
    for each semi-autoregressive block [s, e):
        for each step (schedule of the strategy):
            logits = forward(canvas, block)          # forward.py: cache window, CFG, memory step
            tokens, commit = strategy.commit(logits, ...)   # strategies.py: REGISTRY[config.strategy]
            canvas[:, s:e] = where(commit, tokens, canvas[:, s:e])
        rows whose committed prefix holds EOS/EoT or a stop string are finished: they leave the
        batch, their remaining positions become EOS; the loop ends when no row is left.

A strategy with `owns_loop` (LLaDA2.x block diffusion, `block_diffusion.py`) decodes the batch in
its own `generate` under the same contract; `generate` dispatches to it through the registry.

Shapes: B rows, P padded prompt length, G = gen_length, L = P + G, n = block_length, V vocab.
Rows never interact: each has its own generator and draws only for its own positions, so a row's
output does not depend on the batch it is in, on padding, or on rows leaving early.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..memory.base import NoMemory
from .config import DecodeConfig
from .forward import BlockForward
from .seeds import row_seeds
from .strategies import REGISTRY, RowRandom, StepContext, check_strategy_fits


@dataclass
class Canvas:
    """The rows still being decoded. x [b, L]; attn [b, L] or None (no padding); pad: left
    padding per row; rows: each row's index in the caller's batch."""

    x: torch.Tensor
    attn: torch.Tensor | None
    pad: list[int]
    rows: list[int]

    @classmethod
    def build(cls, input_ids, attention_mask, gen_length: int, mask_id: int) -> "Canvas":
        B, P = input_ids.shape
        x = torch.cat([input_ids, input_ids.new_full((B, gen_length), mask_id)], dim=1)
        attn, pad = None, [0] * B
        if attention_mask is not None:
            attention_mask = attention_mask.to(input_ids.device)
            if P and not bool(attention_mask[:, -1].all()):
                raise ValueError(
                    "generate() needs left-padded prompts (the last prompt position of every row "
                    "must be a real token); set tokenizer.padding_side = 'left'."
                )
            pad = (P - attention_mask.long().sum(-1)).tolist()
            if any(pad):  # an all-ones mask is no mask: keep the fast unmasked attention path
                attn = torch.cat([attention_mask.long(), attention_mask.new_ones((B, gen_length)).long()], 1)
        return cls(x=x, attn=attn, pad=pad, rows=list(range(B)))

    def select(self, keep: list[int]) -> "Canvas":
        index = torch.tensor(keep, device=self.x.device)
        return Canvas(
            x=self.x.index_select(0, index),
            attn=None if self.attn is None else self.attn.index_select(0, index),
            pad=[self.pad[k] for k in keep],
            rows=[self.rows[k] for k in keep],
        )


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.LongTensor, torch.LongTensor | None]:
    """Token-id rows -> (input_ids [B, W] left-padded with `pad_id`, attention_mask [B, W] or None
    when no row is padded), the prompt layout `generate` expects."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
    return ids, None if bool(mask.all()) else mask


def session_masks(x: torch.Tensor, attn: torch.Tensor | None, P: int):
    """What a memory's session reads of a canvas x [B, L] whose first P columns are the
    (left-padded) prompt: the attention mask (all ones without padding) and the prompt mask
    (True on real prompt tokens)."""
    attn = attn if attn is not None else torch.ones_like(x)
    prompt_mask = torch.zeros_like(x, dtype=torch.bool)
    prompt_mask[:, :P] = attn[:, :P].bool()
    return attn, prompt_mask


@torch.no_grad()
def generate(backbone, input_ids, attention_mask, config: DecodeConfig, memory=None, *,
             seeds: list[int] | None = None, stop_sequences: list[str] | None = None) -> torch.LongTensor:
    """Decode `config.gen_length` tokens after each prompt.

    Args:
        backbone: a loaded `Backbone` (any family).
        input_ids: [B, P] left-padded prompts.
        attention_mask: [B, P], 1 on real tokens, 0 on left padding; None = no padding.
        config: the decoding knobs (`DecodeConfig`).
        memory: a `Memory` (MetaState, MemDLM, ...); None = the frozen backbone (`NoMemory`).
        seeds: one seed per row (default `config.seed + i`); row i draws only from its own
            generator, so its output does not depend on the other rows.
        stop_sequences: strings that end a row once they appear in the decoded committed prefix
            (checked after each block, like EOS/EoT, when `config.stop_early`).

    Returns:
        LongTensor [B, gen_length] on the backbone's device: the generation region. Rows that
        finished early hold `spec.eos_id` after their last decoded block.
    """
    spec = backbone.spec
    device = backbone.device
    input_ids = input_ids.to(device)
    B, P = input_ids.shape
    G, n = config.gen_length, config.block_length
    out = torch.full((B, G), spec.eos_id, dtype=torch.long, device=device)
    if G == 0 or B == 0:
        return out
    seeds = check_row_seeds(seeds, B, config.seed)
    check_strategy_fits(config.strategy, spec)
    strategy = REGISTRY[config.strategy]
    if strategy.owns_loop:  # block diffusion (LLaDA2.x): per-row block geometry, its own loop
        return strategy.generate(backbone, input_ids, attention_mask, config, memory, seeds=seeds,
                                 stop_sequences=stop_sequences)
    canvas = Canvas.build(input_ids, attention_mask, G, spec.mask_id)
    rng = RowRandom.from_seeds(seeds, device)
    memory = memory if memory is not None else NoMemory()
    forward = BlockForward(backbone, config, memory, P)
    attn, prompt_mask = session_masks(canvas.x, canvas.attn, P)
    with memory.session(backbone, canvas.x, attn, prompt_mask, seeds):
        for b in range(config.num_blocks):
            block = (P + b * n, P + (b + 1) * n)
            decode_block(canvas, rng, forward, config, spec, block)
            if not config.stop_early or b == config.num_blocks - 1:
                continue
            done = finished_rows(canvas.x[:, P : block[1]], spec.stop_ids, stop_sequences, backbone.tokenizer)
            if not any(done):
                continue
            for j, d in enumerate(done):
                if d:
                    out[canvas.rows[j], : block[1] - P] = canvas.x[j, P : block[1]]
            keep = [j for j, d in enumerate(done) if not d]
            if not keep:
                break
            memory.select(torch.tensor(keep, device=device))
            canvas, rng = canvas.select(keep), rng.select(keep)
        else:
            out[torch.tensor(canvas.rows, device=device)] = canvas.x[:, P:]
    check_no_mask(out, spec.mask_id)
    return out


def check_no_mask(out: torch.Tensor, mask_id: int) -> None:
    """The schedules commit every position and never choose the mask token; fail loudly if not."""
    if bool((out == mask_id).any()):
        raise RuntimeError("A mask token survived decoding; this is a bug in the decoding schedule.")


def decode_block(canvas: Canvas, rng: RowRandom, forward: BlockForward, config: DecodeConfig,
                 spec, block: tuple[int, int]) -> None:
    """Run one block's steps, committing tokens into `canvas.x[:, s:e]` in place."""
    s, e = block
    strategy = REGISTRY[config.strategy]
    steps = config.steps // config.num_blocks
    counts = strategy.counts(e - s, steps, config)
    L = canvas.x.shape[1]
    spans = [(L - p, s - p) for p in canvas.pad]  # each row's unpadded canvas length, block start
    ctx = StepContext(config=config, spec=spec, rng=rng, spans=spans, steps=steps)
    for i in range(steps):
        region = canvas.x[:, s:e]
        masked = region == spec.mask_id
        if strategy.stops_when_unmasked and i > 0 and not bool(masked.any()):
            break  # the block finished early: the only host sync of the step loop
        logits = forward(canvas.x, canvas.attn, block, refresh=i == 0)
        x0, commit = strategy.commit(logits, masked, counts[i], i, ctx)
        canvas.x[:, s:e] = torch.where(commit & masked, x0, region)


def finished_rows(generated: torch.Tensor, stop_ids, stop_sequences, tokenizer) -> list[bool]:
    """Per row: does the committed generation [b, l] contain a stop id, or, decoded with its
    special tokens, one of `stop_sequences`?"""
    stop_ids = set(stop_ids)
    done = []
    for row in generated.tolist():
        hit = any(t in stop_ids for t in row)
        if not hit and stop_sequences:
            text = tokenizer.decode(row, skip_special_tokens=False)
            hit = any(s in text for s in stop_sequences if s)
        done.append(hit)
    return done


def check_row_seeds(seeds, batch: int, base: int) -> list[int]:
    """The caller's per-row seeds, checked, or the defaults `base + i`."""
    if seeds is None:
        return row_seeds(base, batch)
    seeds = [int(s) for s in seeds]
    if len(seeds) != batch:
        raise ValueError(f"Got {len(seeds)} seeds for a batch of {batch} prompts; pass one per row.")
    return seeds
