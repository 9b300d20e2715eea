"""The trainer state of a training checkpoint (`trainer_state.pt`: optimizer and scheduler state
dicts, step, run args), read back weights-only.

What we save is tensors, numbers, strings, lists and dicts, which `torch.load(weights_only=True)`
reads; anything else in the file (a pickled object whose `__reduce__` runs code) is refused
before it is built, so resuming from a checkpoint someone else wrote cannot run their code.
"""

from __future__ import annotations

import os
import pickle

import torch

STATE_NAME = "trainer_state.pt"


def load_trainer_state(checkpoint: str) -> dict:
    """`trainer_state.pt` of a checkpoint directory, weights-only, on the CPU."""
    path = os.path.join(checkpoint, STATE_NAME)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"{path} holds more than tensors, numbers and strings, so it is not loaded (unpickling it could "
            f"run code; torch said: {first}). Resume from a checkpoint written by lm-eval-dlmem train, or "
            "start over without --resume."
        ) from None


def save_trainer_state(checkpoint: str, optimizer, scheduler, step: int, args=None) -> None:
    """Write `trainer_state.pt`: the optimizer and scheduler state dicts, the step and (when
    given) the run's args, all of which `load_trainer_state` reads back weights-only."""
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step}
    if args is not None:
        state["args"] = vars(args)
    torch.save(state, os.path.join(checkpoint, STATE_NAME))


def restore_trainer_state(checkpoint: str, optimizer, scheduler) -> int:
    """Load a checkpoint's optimizer and scheduler state (weights-only) into `optimizer` /
    `scheduler`; returns the step to continue from."""
    state = load_trainer_state(checkpoint)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return int(state["step"])
