"""The memory protocol the decoder and likelihood scorer talk to, so neither knows which method
runs. `NoMemory` is the frozen baseline: the same code path with every hook a no-op.

Callers drive a memory through two context managers (as lm-eval's `hf_steered.py` holds its
hooks), so hooks and fast weights are always removed, also when a forward raises:

    with memory.session(backbone, input_ids, attention_mask, prompt_mask, seeds):
        for every forward:                  # each denoising step / each MC likelihood pass
            with memory.step(step_info):    # MetaState: time code, hooks armed; on exit: state update
                logits = backbone.logits(...)
            memory.select(rows)             # when finished rows leave the batch

A memory implements the four lifecycle methods the context managers call: `begin` (reset per-row
state, install hooks; MemDLM runs its inner loop on the prompt), `before_forward` /
`after_forward` (around one forward) and `end` (remove everything; idempotent). Calling them
directly is for tests and subclasses; callers use `session` / `step`.

`StepInfo` tells the memory what is being forwarded. Rows are independent: state is per row,
and `select(rows)` keeps a subset when finished rows leave the batch.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass
class StepInfo:
    """What the decoder is about to forward.

    Attributes:
        step: global denoising step index (0-based) within this batch.
        mask_ratio: [B] float, fraction of the generation region still masked (1 at the start).
        window: (start, end) canvas positions being forwarded (the whole canvas without cache).
        input_ids: [B, L] the rows being forwarded (under classifier-free guidance the 2B rows
            [conditional; unconditional], and mask_ratio has 2B entries).
        full: True when this forward covers the whole canvas (no cache, or a cache refresh).
        visible: [B, L] bool over the canvas, or None (= every forwarded position): what each row
            would forward if decoded alone. The block-diffusion loop shares one window among rows
            whose blocks sit at different columns and keeps forwarding rows that wait for their
            batch-mates (no visible position); a memory that changes per step reads and updates
            only through this, so a row's memory does not depend on its batch-mates.
    """

    step: int
    mask_ratio: torch.Tensor
    window: tuple[int, int]
    input_ids: torch.Tensor
    full: bool = True
    visible: torch.Tensor | None = None


class Memory:
    """Base class: every hook is a no-op (this *is* the frozen baseline)."""

    @contextmanager
    def session(self, backbone, input_ids, attention_mask, prompt_mask, seeds=None):
        """The memory attached to `backbone` for one batch; detached on exit, even on error.

        Args:
            backbone: the `Backbone` being forwarded.
            input_ids / attention_mask / prompt_mask: [B, L] the batch's canvas, 1 on real
                tokens, True on prompt tokens (what the memory may read before decoding).
            seeds: one int per row (per-row randomness, e.g. MemDLM's masks).
        """
        try:
            self.begin(backbone, input_ids, attention_mask, prompt_mask, seeds)
            yield self
        finally:
            self.end()

    @contextmanager
    def step(self, info: StepInfo):
        """One forward of the session: `before_forward` on entry, `after_forward` on a clean exit
        (a forward that raised leaves no state update; the session's exit still cleans up)."""
        self.before_forward(info)
        yield self
        self.after_forward(info)

    def begin(self, backbone, input_ids, attention_mask, prompt_mask, seeds=None) -> None:
        """Reset per-request state for a new batch. input_ids/attention_mask/prompt_mask [B, L];
        prompt_mask is True on prompt tokens. seeds: list[int] per row (reproducibility)."""

    def before_forward(self, info: StepInfo) -> None:
        pass

    def after_forward(self, info: StepInfo) -> None:
        pass

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the given batch rows (LongTensor of indices)."""

    def end(self) -> None:
        """Remove hooks / adapters; the backbone is exactly the frozen model again."""

    @contextmanager
    def adapt_once(self):
        """Scope in which a memory that adapts per request (MemDLM) adapts each request once,
        although the Monte Carlo likelihood forwards its rows over several sessions."""
        yield self


class NoMemory(Memory):
    pass


class MemoryWrapper(Memory):
    """A memory around another one (counters, limits, ablations): every lifecycle method
    delegates to `inner`; a subclass overrides only what it observes or changes. Subclassing
    (not `__getattr__` forwarding) keeps `session` / `step` calling the wrapper's methods."""

    def __init__(self, inner: Memory | None = None):
        self.inner = inner if inner is not None else NoMemory()

    def begin(self, backbone, input_ids, attention_mask, prompt_mask, seeds=None) -> None:
        self.inner.begin(backbone, input_ids, attention_mask, prompt_mask, seeds)

    def before_forward(self, info: StepInfo) -> None:
        self.inner.before_forward(info)

    def after_forward(self, info: StepInfo) -> None:
        self.inner.after_forward(info)

    def select(self, rows: torch.Tensor) -> None:
        self.inner.select(rows)

    def end(self) -> None:
        self.inner.end()

    def adapt_once(self):
        return self.inner.adapt_once()
