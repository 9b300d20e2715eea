"""Pieces every training script shares: the warmup-cosine schedule, finding the checkpoint to
resume from (`state.restore_trainer_state` reads it back) and `TrainerSetup`, what a trainer's
`setup` hands its loop."""

from __future__ import annotations

import argparse
import math
import os
import re
from dataclasses import dataclass

import torch

from .state import STATE_NAME


def cosine_lr(step: int, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """Multiplier of the peak lr: linear warmup, then cosine decay to `min_ratio`.

    Not transformers' `get_cosine_with_min_lr_schedule_with_warmup`: its warmup starts at 0
    (step / warmup), ours at 1 / warmup ((step + 1) / warmup), so its values differ.
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def cosine_schedule(optimizer, warmup: int, total: int, min_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """`cosine_lr` as a scheduler (its state dict is what checkpoints save)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_lr(s, warmup, total, min_ratio))


def add_batch_args(p: argparse.ArgumentParser, *, batch_size: int) -> None:
    """`--batch-size` / `--grad-accum` of the accelerate trainers (metastate, memdlm); the default
    micro-batch is each trainer's."""
    p.add_argument("--batch-size", type=int, default=batch_size, help="examples per micro-batch per process")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")


def add_schedule_args(p: argparse.ArgumentParser, *, max_steps: int, lr: float, warmup_steps: int,
                      weight_decay: float) -> None:
    """The flags of an AdamW run under `cosine_schedule` (pretrain, metastate); the step count, lr,
    warmup and weight decay defaults are each trainer's, the floor and the clip are shared."""
    p.add_argument("--max-steps", type=int, default=max_steps, help="optimizer steps")
    p.add_argument("--lr", type=float, default=lr, help="peak learning rate (AdamW)")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr as a fraction of the peak")
    p.add_argument("--warmup-steps", type=int, default=warmup_steps, help="linear warmup steps")
    p.add_argument("--weight-decay", type=float, default=weight_decay, help="AdamW weight decay (matrices only)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this (0 = off)")


def find_resume(spec: str | None, output_dir: str) -> str | None:
    """The checkpoint `--resume spec` names: a checkpoint directory (it must hold the trainer
    state), or `latest`: the highest `checkpoint-N` in `output_dir` (None when there is none yet,
    so `--resume latest` also starts a first run)."""
    if not spec:
        return None
    if spec != "latest":
        if not os.path.isfile(os.path.join(spec, STATE_NAME)):
            raise FileNotFoundError(f"--resume {spec}: no {STATE_NAME} there; pass a checkpoint-N directory or 'latest'.")
        return spec
    steps = [int(m.group(1)) for d in (os.listdir(output_dir) if os.path.isdir(output_dir) else [])
             if (m := re.fullmatch(r"checkpoint-(\d+)", d))]
    return os.path.join(output_dir, f"checkpoint-{max(steps)}") if steps else None


@dataclass
class TrainerSetup:
    """What a trainer's `setup` hands its loop; each trainer adds its own fields (keyword-only).

    model: what the loop calls (accelerate-prepared where the trainer runs under accelerate).
    step: the first step to run: 0, or the step of the checkpoint resumed from (`resume`).
    """

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    step: int = 0
    resume: str | None = None
