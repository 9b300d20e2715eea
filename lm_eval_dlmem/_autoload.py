"""Run by `lm_eval_dlmem.pth` at interpreter start-up, in *every* Python process of the
environment. It must be cheap and must never raise: it only looks at argv, and registers our
model names (as lazy "module:Class" strings, nothing heavy is imported) when the process is the
lm-eval CLI: `lm_eval`, `lm-eval`, `python -m lm_eval`, or `accelerate launch -m lm_eval`.
`LM_EVAL_DLMEM_AUTOLOAD=1` forces it, `=0` disables it.
"""

import os
import sys

MODELS = {
    "metastate-llada": "lm_eval_dlmem.harness:MetaStateLLaDA",
    "metastate-dream": "lm_eval_dlmem.harness:MetaStateDream",
    "memdlm-llada-moe": "lm_eval_dlmem.harness:MemDLMLLaDAMoE",
    "dlm": "lm_eval_dlmem.harness:DlmLM",
}

_CLI_NAMES = {"lm_eval", "lm-eval", "lm_eval.exe", "lm-eval.exe"}


def is_lm_eval_process(argv0: str, orig_argv: list) -> bool:
    if os.path.basename(argv0 or "") in _CLI_NAMES:
        return True
    for i, arg in enumerate(orig_argv[:-1]):
        if arg == "-m" and orig_argv[i + 1] in ("lm_eval", "lm_eval.__main__"):
            return True
    return False


def register() -> None:
    """Register our models in lm-eval's registry (after its built-ins, so `hf`/`dummy` stay)."""
    import lm_eval.models  # noqa: F401  (fills the registry with the built-ins first)
    from lm_eval.api.registry import model_registry

    for name, target in MODELS.items():
        if name not in model_registry:
            model_registry.register(name, target=target)


def _autoload() -> None:
    flag = os.environ.get("LM_EVAL_DLMEM_AUTOLOAD")
    if flag == "0":
        return
    argv = getattr(sys, "argv", None) or [""]
    if flag != "1" and not is_lm_eval_process(argv[0], getattr(sys, "orig_argv", [])):
        return
    try:
        register()
    except Exception as e:  # never break the interpreter start-up
        if os.environ.get("LM_EVAL_DLMEM_DEBUG"):
            print(f"lm_eval_dlmem autoload skipped: {e!r}", file=sys.stderr)


_autoload()
