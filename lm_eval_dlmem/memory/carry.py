"""No-carry ablations of MetaState (`metastate_carry=` model arg).

A trained MetaState helps in two ways that a plain evaluation cannot tell apart: the state
carried from forward to forward (memory), and the gated Injector adding learned slot content
within a forward (extra capacity). These wrappers keep the trained modules and cut the carry:

- `full` (default): the state is carried across every forward of a request (the method).
- `none` (`ResetEachForward`): every forward starts from the learned initial slots; the
  Injector still writes (what the untouched slots give), nothing read at an earlier forward
  reaches a later one. The gain that survives is capacity, not memory.
- `first_block` (`FreezeAfterFirstBlock`): the state is carried during the first
  semi-autoregressive block, then frozen: later blocks read that state, never update it.

Likelihood requests are unaffected in substance: each Monte Carlo sample is one forward from
fresh slots anyway.
"""

from __future__ import annotations

from .base import MemoryWrapper, StepInfo

CARRY_MODES = ("full", "none", "first_block")


class ResetEachForward(MemoryWrapper):
    """`metastate_carry=none`: the wrapped MetaState's state is its learned initial slots at
    every forward (state [B, M, d] reset before each `before_forward`)."""

    def before_forward(self, info: StepInfo) -> None:
        ms = self.inner
        ms.state = ms.slot_init[None].expand(ms.state.shape[0], -1, -1)
        super().before_forward(info)


class FreezeAfterFirstBlock(MemoryWrapper):
    """`metastate_carry=first_block`: the state is updated by the forwards of block 0 only; the
    forwards of later blocks (`StepInfo.block` > 0) use the state block 0 ended with. A forward
    outside the decode loops (a likelihood sample: `block` None) has no later block: it updates."""

    def before_forward(self, info: StepInfo) -> None:
        self._kept = self.inner.state if info.block else None
        super().before_forward(info)

    def after_forward(self, info: StepInfo) -> None:
        super().after_forward(info)
        if self._kept is not None:
            self.inner.state = self._kept


def with_carry(memory, carry: str):
    """`memory` under the `metastate_carry` mode `carry` (see the module docstring)."""
    if carry not in CARRY_MODES:
        raise ValueError(f"metastate_carry={carry!r}; choose one of {', '.join(CARRY_MODES)}.")
    wrappers = {"full": None, "none": ResetEachForward, "first_block": FreezeAfterFirstBlock}
    return memory if wrappers[carry] is None else wrappers[carry](memory)
