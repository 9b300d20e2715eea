"""Optional dependencies, grouped into pip extras as lm-eval does (see pyproject.toml).

The core install loads models, decodes and runs lm-eval; each feature below imports its extra's
module at the point of use through `require`, so a missing one is one `MissingExtraError` naming
the extra to install instead of a bare ModuleNotFoundError deep in a traceback.
"""

from __future__ import annotations

import importlib

# import name -> (distribution, extra that installs it)
EXTRAS = {
    "wonderwords": ("wonderwords", "tasks"),
    "nltk": ("nltk", "tasks"),
    "jieba": ("jieba", "tasks"),
    "matplotlib": ("matplotlib", "plot"),
    "bitsandbytes": ("bitsandbytes", "quant"),
    "submitit": ("submitit", "cluster"),
}


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def require(module: str, purpose: str):
    """Import `module` (a dotted name under one of `EXTRAS`) for `purpose`, or say what to install.

    Args:
        module: e.g. "nltk.tokenize.punkt" or "matplotlib".
        purpose: what needs it, as the user sees it (e.g. "RULER's haystacks").

    Raises:
        MissingExtraError: the module's top-level package is not installed.
    """
    top = module.split(".", 1)[0]
    dist, extra = EXTRAS[top]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is None or e.name.split(".", 1)[0] != top:
            raise  # a dependency of the package itself is broken: its own error says which
        raise MissingExtraError(
            f"{dist} is needed for {purpose} but is not installed: pip install 'lm-eval-dlmem[{extra}]' "
            f"(or pip install {dist})."
        ) from e
