"""How many masked positions each denoising step commits.

All schedules are computed on the host as plain Python ints, once per block: every row starts a
block with the same number of masked positions, so the counts are shared by the batch and the
decode loop never has to read a count back from the device.
"""

from __future__ import annotations

import torch


def llada_transfer_counts(n_masked: int, steps: int) -> list[int]:
    """LLaDA's linear schedule (`get_num_transfer_tokens` in ML-GSAI/LLaDA generate.py).

    The interval [0, 1] is split into `steps` equal pieces; under the linear noise schedule each
    step commits the same expected number of tokens, so every step gets `n_masked // steps` and
    the first `n_masked % steps` steps one more.

    Args:
        n_masked: masked positions in the block at its start.
        steps: denoising steps for this block.

    Returns:
        list of `steps` ints summing to `n_masked` (zeros when steps > n_masked).
    """
    if steps <= 0:
        raise ValueError(f"steps={steps} must be > 0.")
    base, extra = divmod(n_masked, steps)
    return [base + (1 if i < extra else 0) for i in range(steps)]


def dream_timesteps(steps: int, eps: float) -> torch.Tensor:
    """Dream's time grid: `steps + 1` float32 points from 1 down to `eps`."""
    return torch.linspace(1, eps, steps + 1)


def dream_transfer_counts(n_masked: int, steps: int, eps: float) -> list[int]:
    """Dream's commit counts for the confidence algorithms (`maskgit_plus`, `topk_margin`,
    `entropy`), replaying `diffusion_generate`'s float32 arithmetic exactly.

    At step i (time t -> s) a masked position would unmask with probability 1 - s/t, so the step
    commits `int(m * (1 - s/t))` of the `m` positions still masked (floored, so early steps often
    commit none); the last step commits everything left.

    Args:
        n_masked: masked positions at the start (the block, or the whole generation).
        steps: denoising steps.
        eps: final time (`diffusion_generate`'s `eps`, 1e-3 by default).

    Returns:
        list of `steps` ints summing to `n_masked`.
    """
    ts = dream_timesteps(steps, eps)
    counts, left = [], n_masked
    for i in range(steps):
        if i < steps - 1:
            # the reference divides an int64 sum by the batch size: a float32 tensor
            m = torch.tensor(left, dtype=torch.int64) / 1
            n = int(m * (1 - ts[i + 1] / ts[i]))
        else:
            n = left
        counts.append(n)
        left -= n
    return counts


def dream_transfer_probability(step: int, steps: int, eps: float) -> torch.Tensor | float:
    """Dream `origin`: probability that a masked position unmasks at `step` (1 at the last).
    A float32 scalar tensor, as in the reference, so `rand < p` compares in the same precision."""
    if step >= steps - 1:
        return 1.0
    ts = dream_timesteps(steps, eps)
    return 1 - ts[step + 1] / ts[step]
