"""lm-eval-dlmem: evaluate discrete diffusion LMs (LLaDA, Dream, LLaDA-MoE, LLaDA2.x), frozen or with
MetaState / MemDLM memory, inside EleutherAI's lm-evaluation-harness.

Public API (imported lazily, so `import lm_eval_dlmem` stays cheap):
    load_backbone, Backbone, DecodeConfig, generate, make_tiny_checkpoint

Importing the package registers our model names (metastate-llada, metastate-dream,
memdlm-llada-moe, memdlm-llada2, dlm) in lm-eval's model registry, so `lm_eval.simple_evaluate(model=...)` finds
them from a script or notebook, whichever of the two is imported first. The import stays cheap:
it imports neither lm-eval nor torch; the names are registered (as lazy "module:Class" strings)
when lm-eval's registry loads. `register()` is public for code that clears lm-eval's registry.
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

__all__ = sorted(_LAZY) + ["register"]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lm_eval_dlmem' has no attribute {name!r}")


from ._autoload import register, register_when_lm_eval_loads  # noqa: E402  (stdlib only)

register_when_lm_eval_loads()
