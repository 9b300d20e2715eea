"""Numeric checks shared by model args, `DecodeConfig` and sweep files.

Torch-free on purpose: `lm-eval-dlmem sweep --dry_run` and `compare` validate with these without
paying for a torch import.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Range:
    """The values a numeric arg may take. `check` also refuses NaN and infinity, which compare
    False with every bound and would otherwise slip through `x < 0` style checks.

    Args:
        lo / hi: bounds (None = unbounded); `lo_open` / `hi_open` exclude the bound itself.
        hint: appended to the error (what the arg means, what unset does).
    """

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    hint: str = ""

    def __str__(self) -> str:
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"

    def contains(self, value) -> bool:
        if not math.isfinite(value):
            return False
        above = self.lo is None or (value > self.lo if self.lo_open else value >= self.lo)
        below = self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)
        return above and below

    def check(self, label: str, value) -> None:
        """Raise ValueError naming `label` (the arg as the user typed it) unless value is None or inside."""
        if value is None or self.contains(value):
            return
        what = "is not a finite number" if not math.isfinite(value) else "is out of range"
        hint = f" {self.hint}" if self.hint else ""
        raise ValueError(f"{label}={value} {what}: it must be {self}{hint}.")


POSITIVE = Range(0, lo_open=True)
NON_NEGATIVE = Range(0)
UNIT = Range(0, 1)


def check_batch_size(label: str, value) -> None:
    """batch_size is a positive integer, `auto` or `auto:N` (lm-eval's spellings)."""
    text = str(value).strip().lower()
    number = text.removeprefix("auto:") if text.startswith("auto:") else text
    if text == "auto" or (number.isdigit() and int(number) > 0):
        return
    raise ValueError(f"{label}={value} must be a positive integer or 'auto'.")
