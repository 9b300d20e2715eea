"""Registration of our model names in lm-eval, run at interpreter start-up via `lm_eval_dlmem.pth`.

The .pth line runs in *every* Python process of the environment, so it only imports this module
when an argument mentions lm_eval / lm-eval (a substring test, microseconds). Here the exact gate
decides: the process must be the lm-eval CLI (`lm_eval`, `lm-eval`, `python -m lm_eval`, also as
`accelerate launch -m lm_eval` starts its workers). Then the names are registered as lazy
"module:Class" strings, so nothing of ours is imported until lm-eval builds the model. Never raises.
`LM_EVAL_DLMEM_AUTOLOAD=1` forces it, `=0` disables it.
"""

import os
import sys

MODELS = {
    "metastate-llada": "lm_eval_dlmem.harness:MetaStateLLaDA",
    "metastate-dream": "lm_eval_dlmem.harness:MetaStateDream",
    "memdlm-llada-moe": "lm_eval_dlmem.harness:MemDLMLLaDAMoE",
    "memdlm-llada2": "lm_eval_dlmem.harness:MemDLMLLaDA2",
    "dlm": "lm_eval_dlmem.harness:DlmLM",
}

_CLI_NAMES = {"lm_eval", "lm-eval", "lm_eval.exe", "lm-eval.exe"}


def is_lm_eval_process(argv0: str, orig_argv: list) -> bool:
    """True for the lm-eval CLI: the `lm_eval` / `lm-eval` console scripts, or `python [options]
    -m lm_eval` (accelerate's workers run `python -u -m lm_eval`). A script or `-c` command that
    merely passes `-m lm_eval` on to itself (`pytest -m lm_eval`) is not lm-eval."""
    if (argv0 or "").replace("\\", "/").rsplit("/", 1)[-1] in _CLI_NAMES:  # also Windows paths
        return True
    return interpreter_module(orig_argv) in ("lm_eval", "lm_eval.__main__")


def interpreter_module(orig_argv: list) -> str | None:
    """MODULE of `python [options] -m MODULE ...`; None for a script, `-c` or the REPL.

    Walks the interpreter's own options only: they end at the first non-option (the script).
    Short options combine as CPython allows (`-um lm_eval`, `-mlm_eval`, `-Wignore`)."""
    args = iter(orig_argv[1:])
    for arg in args:
        if arg in ("-", "--") or not arg.startswith("-"):
            return None
        if arg.startswith("--"):
            if arg == "--check-hash-based-pycs":
                next(args, None)
            continue
        for j, ch in enumerate(arg[1:], start=2):
            if ch in "cmWX":
                value = arg[j:] or next(args, None)
                if ch in "cm":
                    return value if ch == "m" else None
                break
    return None


def register() -> None:
    """Register our models in lm-eval's registry (after its built-ins, so `hf`/`dummy` stay)."""
    import lm_eval.models  # noqa: F401  (fills the registry with the built-ins first)
    from lm_eval.api.registry import model_registry

    for name, target in MODELS.items():
        if name not in model_registry:
            model_registry.register(name, target=target)


REGISTRY_MODULE = "lm_eval.api.registry"


def register_when_lm_eval_loads() -> None:
    """Register our names now if lm-eval's registry is loaded, else right after it loads.

    Called by `import lm_eval_dlmem`: importing lm-eval costs ~30 ms and the package is also
    imported at start-up by our .pth line in processes that merely mention lm_eval (`pip install
    lm_eval`), so the package never imports lm-eval itself; a one-shot import hook registers as
    soon as anything imports `lm_eval.api.registry` (simple_evaluate, get_model, the CLI)."""
    if REGISTRY_MODULE in sys.modules:
        register()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())


class _RegisterAfterImport:
    """Meta-path finder for `lm_eval.api.registry` only: lets the normal finders locate it and
    wraps its loader so that `register()` runs once the module has executed. Removes itself."""

    def find_spec(self, name, path=None, target=None):
        if name != REGISTRY_MODULE:
            return None
        import importlib.util

        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


class _RegisteringLoader:
    """Delegates to lm-eval's loader, then registers our names in the freshly executed registry."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        try:
            register()
        except Exception as e:  # lm-eval itself must still import; our names are then missing, said once
            print(f"lm_eval_dlmem: could not register its models with lm-eval ({e!r}); call "
                  "lm_eval_dlmem.register() after importing lm_eval to see the cause.", file=sys.stderr)

    def __getattr__(self, name):  # get_resource_reader, get_source, ... as lm-eval's loader has them
        return getattr(self.loader, name)


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
