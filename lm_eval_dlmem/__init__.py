"""lm-eval-dlmem: evaluate discrete diffusion LMs (LLaDA, Dream, LLaDA-MoE), frozen or with
MetaState / MemDLM memory, inside EleutherAI's lm-evaluation-harness.

Public API (imported lazily, so `import lm_eval_dlmem` stays cheap):
    load_backbone, Backbone, DecodeConfig, generate, make_tiny_checkpoint
"""

__version__ = "0.1.0"

_LAZY = {
    "load_backbone": "lm_eval_dlmem.backbones.loading",
    "Backbone": "lm_eval_dlmem.backbones.loading",
    "FamilySpec": "lm_eval_dlmem.backbones.spec",
    "DecodeConfig": "lm_eval_dlmem.decoding.config",
    "generate": "lm_eval_dlmem.decoding.engine",
    "make_tiny_checkpoint": "lm_eval_dlmem.testing",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lm_eval_dlmem' has no attribute {name!r}")
