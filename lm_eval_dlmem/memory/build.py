"""The memory a run's model args ask for, assembled on its backbone.

`metastate=` loads a MetaState (under the `metastate_carry=` ablation, `carry.py`); `adapter=` applies the outer MemDLM LoRA (a new `Backbone` whose
model is the PeftModel) and `inner_steps=` > 0 adds the inference inner loop on top; otherwise the
frozen baseline `NoMemory`.
"""

from __future__ import annotations

import dataclasses

from .base import Memory, NoMemory


def build_memory(args, backbone) -> tuple[object, Memory]:
    """Args: `ModelArgs`; the loaded `Backbone`.

    Returns:
        (backbone, memory): the backbone every later call must use (the adapted one when
        `adapter=` is given, else `backbone` itself) and the memory built on it.
    """
    if args.metastate:
        from .carry import with_carry
        from .metastate import load_memory_for

        return backbone, with_carry(load_memory_for(args.metastate, backbone), args.metastate_carry)
    if args.adapter:
        backbone = _with_adapter(args, backbone)
    if args.inner_steps > 0:
        from .fast_weights import FastWeightMemory

        return backbone, FastWeightMemory(backbone, memdlm_config(args))
    return backbone, NoMemory()


def memdlm_config(args):
    """`MemDLMConfig` from the `inner_*` model args (same names) and the run's seed."""
    from .fast_weights import MemDLMConfig

    given = args.flat()
    return MemDLMConfig(**{f.name: given[f.name] for f in dataclasses.fields(MemDLMConfig) if f.name in given})


def _with_adapter(args, backbone):
    """`apply_adapter`, with PEFT's shape errors turned into one that names both checkpoints."""
    from ..backbones.adapters import AdapterKeysError, apply_adapter

    try:
        return apply_adapter(backbone, args.adapter, strict=args.strict_weights)
    except AdapterKeysError:
        raise  # names the keys itself
    except (RuntimeError, ValueError) as e:  # PEFT: no matching modules / size mismatch
        cfg = backbone.config
        raise ValueError(
            f"adapter={args.adapter!r} does not fit pretrained={args.pretrained!r} ({backbone.family}, "
            f"hidden size {cfg.hidden_size}, {cfg.num_hidden_layers} layers); it was made for another "
            f"backbone (see base_model_name_or_path in its adapter_config.json). "
            f"PEFT said: {' '.join(line.strip() for line in str(e).strip().splitlines()[:2])}"
        ) from e
