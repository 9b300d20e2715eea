"""Checkpoints shipped inside the package, loadable by name with no network.

    lm_eval --model metastate-llada --model_args pretrained=tiny-llada,metastate=tiny-llada-metastate ...

| name                   | what                                                                  |
|------------------------|-----------------------------------------------------------------------|
| `tiny-llada`           | a small LLaDA-architecture dLLM trained from scratch on our synthetic |
|                        | RULER/BABILong-style data (`lm-eval-dlmem train tiny-default`)        |
| `tiny-llada-metastate` | a MetaState trained on top of it (`lm-eval-dlmem train metastate`)    |
| `tiny-llada-memdlm`    | a MemDLM outer LoRA adapter trained on top of it (`... train memdlm`) |

Weights are stored in bfloat16 to keep the wheel small; `config.json` records float32, so
`dtype=auto` loads them as float32. See docs/tiny_default.md for how they were made and scored.
"""

from __future__ import annotations

import os

EMBEDDED_DIR = os.path.dirname(os.path.abspath(__file__))
NAMES = ("tiny-llada", "tiny-llada-metastate", "tiny-llada-memdlm")


def resolve_embedded(name) -> str | None:
    """The directory of an embedded checkpoint, or None when `name` is not an embedded name.

    Args:
        name: a model/memory argument as the user wrote it (`tiny-llada`, a path, a hub id, None).

    Returns:
        The absolute directory for an embedded name; None for anything else, so callers go on
        with their usual path / hub resolution. A local directory called like an embedded name
        wins over the embedded copy (`./tiny-llada` or an existing relative path).

    Raises:
        FileNotFoundError: an embedded name whose files are missing from this install.
    """
    if not isinstance(name, str) or name not in NAMES or os.path.exists(name):
        return None
    path = os.path.join(EMBEDDED_DIR, name)
    if not os.path.isdir(path) or not any(f.endswith(".safetensors") for f in os.listdir(path)):
        raise FileNotFoundError(
            f"The embedded checkpoint {name!r} is missing from this install ({path}). Reinstall "
            "lm-eval-dlmem, or rebuild it with `lm-eval-dlmem train tiny-default --out DIR` and pass DIR."
        )
    return path


__all__ = ["NAMES", "EMBEDDED_DIR", "resolve_embedded"]
