"""Memory methods the decoder can run with: the protocol, the frozen baseline, MetaState."""

from .base import Memory, MemoryWrapper, NoMemory, StepInfo
from .metastate import MetaState, MetaStateConfig, load_memory_for

__all__ = ["Memory", "MemoryWrapper", "MetaState", "MetaStateConfig", "NoMemory", "StepInfo", "load_memory_for"]

from .fast_weights import FastWeightMemory, MemDLMConfig, apply_adapter  # noqa: E402  MemDLM
__all__ += ["FastWeightMemory", "MemDLMConfig", "apply_adapter"]
