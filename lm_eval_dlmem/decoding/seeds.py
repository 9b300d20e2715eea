"""Every seed the package derives from a user's `seed`, in one place.

Results must not depend on batch make-up, request order, process rank or resume point, so each
unit of randomness (a request, a row, a rolling window, a training step) draws from its own
generator, seeded by a pure function of the user's seed and the unit's index. All derivations
share one form, `base * stride + index`: with a stride larger than any index, distinct
(base, index) pairs give distinct seeds. The strides are fixed forever: changing one changes
every sampled number the package has published.

All functions return plain Python ints (exact; no float or tensor arithmetic).
"""

from __future__ import annotations

import zlib

MIX = 1_000_003  # prime stride between base seeds: room for a million indices per base
WINDOW_STRIDE = 10_007  # prime stride between texts' rolling windows (a text has < 10_007 windows)
RATIO_STRIDE = 1009  # prime stride between the mask ratios of one row (analysis/nll)
RANK_STRIDE = 7919  # prime stride between MemDLM training steps (room for 7919 ranks)
REQUEST_MODULUS = 2**31 - 1  # request seeds stay positive 32-bit ints
GENERATOR_MODULUS = 2**63  # torch.Generator.manual_seed takes a signed 64-bit value


def derive(base: int, index: int, stride: int = MIX) -> int:
    """The one derivation: `base * stride + index`."""
    return int(base) * stride + int(index)


def request_seed(base: int, content: bytes) -> int:
    """A harness request's seed from its content (JSON bytes): independent of batch and order."""
    return derive(base, zlib.crc32(content)) % REQUEST_MODULUS


def row_seeds(base: int, n: int, offset: int = 0) -> list[int]:
    """Default seeds of n rows: `base + offset + i` (the row's index in the whole run)."""
    return [int(base) + int(offset) + i for i in range(n)]


def memory_seed(base: int, row_seed: int) -> int:
    """A memory's per-row seed (MemDLM masks, fast-weight init, adapter dropout) from its
    config seed and the row's request seed."""
    return derive(base, row_seed) % GENERATOR_MODULUS


def window_seed(text_seed: int, window: int) -> int:
    """Seed of rolling window `window` of a text (loglikelihood_rolling)."""
    return derive(text_seed, window, WINDOW_STRIDE)


def ratio_seed(row_seed: int, ratio_index: int) -> int:
    """Seed of a row's mask at its `ratio_index`-th mask ratio (analysis/nll static masks)."""
    return derive(row_seed, ratio_index, RATIO_STRIDE)


def step_seed(base: int, step: int, rank: int = 0, stride: int = 1) -> int:
    """A training micro-step's seed: `base * MIX + step * stride + rank`, so it depends only on
    (seed, step, rank) and a resumed run draws what an uninterrupted one would. `stride` spaces
    the steps for the ranks (the process count, or `RANK_STRIDE`)."""
    return derive(base, int(step) * stride + int(rank))
