"""Diffusion decoding and likelihood: the decode loop (`generate`), its strategies, schedules and
cache modes, and the Monte Carlo likelihood (`loglikelihood`, `loglikelihood_rolling`)."""

from .config import DecodeConfig
from .engine import generate
from .likelihood import loglikelihood, loglikelihood_rolling

__all__ = ["DecodeConfig", "generate", "loglikelihood", "loglikelihood_rolling"]
