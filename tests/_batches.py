"""Batches and checkpoint copies the backbone tests share (imported as `from _batches import ...`,
like _harness_runs)."""

import json
import shutil

import torch


def left_padded_batch(bb, lengths=(24, 17, 9), seed=0):
    """Left-padded random batch: ids [B, L], mask [B, L]."""
    g = torch.Generator().manual_seed(seed)
    L = max(lengths)
    ids = torch.randint(0, 380, (len(lengths), L), generator=g)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, L - n :] = 1
    ids[mask == 0] = bb.tokenizer.pad_token_id
    return ids, mask


@torch.no_grad()
def logits(bb, ids, mask=None, **kw):
    return bb.logits(ids, mask, **kw)


def copy_with_config(src, dst, **changes) -> str:
    """A copy of checkpoint `src` at `dst` whose config.json has `changes` applied."""
    shutil.copytree(src, dst)
    with open(f"{dst}/config.json") as f:
        config = json.load(f)
    config.update(changes)
    with open(f"{dst}/config.json", "w") as f:
        json.dump(config, f)
    return str(dst)
