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
