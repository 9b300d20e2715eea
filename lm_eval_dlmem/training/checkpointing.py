"""Activation checkpointing of a frozen backbone's decoder blocks for memory training.

The backbone's own `gradient_checkpointing_enable` wraps each block's `__call__`, so forward
hooks run inside the recomputed region: a MetaState Injector hook would be re-run in backward,
after its step has ended (it then adds nothing, and the recomputed activations differ from the
forward's). Here each block's `forward` is wrapped instead: the hooks stay outside, their
outputs are saved normally, and only the frozen block bodies are recomputed (one extra forward
of the blocks in backward, for activations of one [B, l, C] block input per block).

The cache modes' window forwards write into the `DiffusionCache` inside the block; a recompute
in backward would see the cache as later steps left it, so the trainer refuses checkpointing
with cache=prefix/dual (`check_checkpointing`).
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint


def _run(forward, *args, **kwargs):
    """One block: under checkpoint when a gradient is being recorded, else plain."""
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def checkpoint_blocks(backbone) -> int:
    """Wrap every decoder block's `forward` of `backbone` in `torch.utils.checkpoint`
    (non-reentrant). Idempotent. Returns the number of blocks wrapped."""
    layers = backbone.layers
    for layer in layers:
        if not isinstance(layer.forward, functools.partial):
            layer.forward = functools.partial(_run, layer.forward)
    return len(layers)


def check_checkpointing(decode) -> None:
    """Refuse checkpointing with a cache mode (see the module docstring)."""
    if decode is not None and decode.cache != "none":
        raise ValueError(f"--gradient-checkpointing with --match-decode cache={decode.cache}: a recomputed block "
                         "would read the cache as later steps left it. Use cache=none for checkpointed "
                         "training, or drop --gradient-checkpointing.")
